"""Files that are complete or absent: atomic writes, sha256, and loads that run no pickled code.

Every file the project writes for later reading (checkpoints, metrics, manifests, reports)
goes to a temporary name beside its target, is flushed and fsync'd, and is renamed over the
target: a crash leaves the old file or the new one, never half of one. Checkpoint files are
hashed as they are written, so sealing a checkpoint needs no second read of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from app_dist.foundations.errors import CheckpointError

# sha256 of the files this process wrote with atomic_torch_save, computed as they were
# written. {path: (size, mtime_ns, digest)}, trusted only while the file's size and
# modification time are unchanged; verifying a file always reads it.
_HASHED_ON_WRITE: dict[Path, tuple[int, int, str]] = {}
_HASHED_ON_WRITE_LIMIT = 256  # files sealed by other ranks are never popped here


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks; hashlib.file_digest needs 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fsync_directory(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not just the file)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_name(path: Path) -> Path:
    """The hidden name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit flush, fsync and rename it over
    `path`; on an exception remove it, leaving `path` as it was."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        with temporary.open(mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1))


class _HashingWriter:
    """What torch.save writes to: forwards every chunk to the file and into a sha256, and
    keeps the OSError of a failed write (torch's zip writer replaces it with its own)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(value: Any, path: Path) -> None:
    """torch.save to a temporary name, fsync, then rename over `path`; the sha256 of the bytes
    is remembered for `sha256_of_written`. A failed write (a full disk) raises its OSError
    and leaves `path` as it was, with no temporary file behind."""
    with atomic_file(path, "wb") as handle:
        writer = _HashingWriter(handle)
        try:
            torch.save(value, writer)
        except RuntimeError:
            # torch's zip writer reports a failed write as "[enforce fail at
            # inline_container.cc] ... unexpected pos": give the caller the real cause.
            if writer.error is None:
                raise
            raise writer.error from None
    if len(_HASHED_ON_WRITE) >= _HASHED_ON_WRITE_LIMIT:
        _HASHED_ON_WRITE.clear()
    stat = path.stat()
    _HASHED_ON_WRITE[path] = (stat.st_size, stat.st_mtime_ns, writer.digest.hexdigest())


def sha256_of_written(path: Path) -> str:
    """sha256 of a file about to be sealed: from its write when unchanged since, else read."""
    stat = path.stat()
    known = _HASHED_ON_WRITE.pop(path, None)
    if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    return file_sha256(path)


def load_torch_file(path: Path, map_location: Any = "cpu",
                    safe_globals: Sequence[Any] = ()) -> Any:
    """torch.load with weights_only=True: tensors, containers and primitive values only, plus
    the classes in `safe_globals` (those a library's own files hold, e.g. DeepSpeed's), so no
    pickled code runs. Any failure is a CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"cannot load {path}: {_load_failure(error)}") from None


def _load_failure(error: Exception) -> str:
    """One line: why torch.load failed. Its refusal of a pickled global is a paragraph whose
    first line says only that a weights-only load failed; the line naming the global is
    the one that matters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    refused = next((line for line in lines if "GLOBAL" in line), None)
    if refused is not None:
        return f"refused: it holds pickled code or a type no checkpoint holds ({refused})"
    return lines[0] if lines else type(error).__name__
