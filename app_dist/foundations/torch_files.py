"""Torch files that are complete or absent, hashed as written, and loaded without running
pickled code.

`atomic_torch_save` writes through foundations.files' atomic temporary-then-rename and hashes
the bytes on their way to the disk, so sealing a checkpoint needs no second read of them;
`load_torch_file` is the one way the project reads a torch file.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from app_dist.foundations.errors import CheckpointError
from app_dist.foundations.files import atomic_file, file_sha256

# sha256 of the files this process wrote with atomic_torch_save, computed as they were
# written. {path: (size, mtime_ns, digest)}, trusted only while the file's size and
# modification time are unchanged; verifying a file always reads it.
_HASHED_ON_WRITE: dict[Path, tuple[int, int, str]] = {}
_HASHED_ON_WRITE_LIMIT = 256  # files sealed by other ranks are never popped here


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
    # torch.save (ours and DeepSpeed's) writes zip archives; torch.load would also try the
    # legacy plain-pickle format, and its refusal then reads as advice to load unsafely.
    try:
        with Path(path).open("rb") as file:
            archive = zipfile.is_zipfile(file)
    except OSError as error:
        raise CheckpointError(f"cannot load {path}: {error.strerror or error}") from None
    if not archive:
        raise CheckpointError(f"cannot load {path}: not a file torch.save wrote (no zip "
                              "archive: damaged, truncated or another kind of file)")
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
    if refused is None and isinstance(error, pickle.UnpicklingError):
        # Its first lines suggest weights_only=False; the unpickler's own reason follows.
        marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line),
                      None)
        refused = (lines[marker + 1] if marker is not None and marker + 1 < len(lines)
                   else "not loadable as weights only")
    if refused is not None:
        return f"refused: it holds pickled code or a type no checkpoint holds ({refused})"
    return lines[0] if lines else type(error).__name__
