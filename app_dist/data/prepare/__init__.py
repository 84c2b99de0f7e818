"""Offline data preparation: shard writing, image sources, ImageNet label maps."""
