"""One exception family for bad user input, so entry points can print one line and exit 2."""


class AppDistError(Exception):
    """Bad input (config, CLI flag, shard, checkpoint): the message names the culprit."""


class ConfigError(AppDistError):
    """A config key is unknown, mistyped or holds an impossible value."""


class DataError(AppDistError):
    """A shard, manifest or sample cannot be used."""


class CheckpointError(AppDistError):
    """A checkpoint is missing, corrupt or does not match the run."""
