"""Pruning: density schedules, scoring criteria, thresholds and the masks the engine owns."""
