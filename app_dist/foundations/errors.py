"""One exception family for bad user input, so entry points can print one line and exit 2."""


class AppDistError(Exception):
    """Bad input (config, CLI flag, shard, checkpoint): the message names the culprit."""


class ConfigError(AppDistError):
    """A config key is unknown, mistyped or holds an impossible value."""


class DataError(AppDistError):
    """A shard, manifest or sample cannot be used."""


class CheckpointError(AppDistError):
    """A checkpoint is missing, corrupt or does not match the run."""


class ReportedElsewhere(AppDistError):
    """Bad input that another process of the same launch reports: this process exits with
    the bad-input code without printing, so that the user reads the culprit once (under
    torchrun every rank finds the same config error; after a broadcast every rank holds the
    same refusal; a rank whose peer stopped on bad input sees only the broken connection)."""


def agreed(error: AppDistError, is_primary: bool) -> AppDistError:
    """The error to raise for bad input every rank found together (through a broadcast or an
    all-reduce): rank 0 raises it and prints its line, the others exit quietly."""
    return error if is_primary else ReportedElsewhere(str(error))


def one_line(error: BaseException) -> str:
    """The message of `error` as one line. An error raised in a DataLoader worker arrives
    re-wrapped as "Caught X in DataLoader worker process N.\\nOriginal Traceback ...": the
    original message is the traceback's last line."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return lines[0]
