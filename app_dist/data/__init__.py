"""Data: shard writing, the megabatch stream and the WebDataset readers."""
