"""Files that are complete or absent: atomic writes and sha256 (torch files: torch_files.py).

Every file the project writes for later reading (checkpoints, metrics, manifests, reports)
goes to a temporary name beside its target, is flushed and fsync'd, and is renamed over the
target: a crash leaves the old file or the new one, never half of one. Nothing here imports
torch, so the launcher wrapper and the command-line tools that only read configs, manifests
and JSON start without it (importing torch takes 2-3 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks; hashlib.file_digest needs 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def why_folder_cannot_be_made(folder: Path) -> tuple[str, Path] | None:
    """None when `folder` exists as a folder this process may write in, or can be made: its
    nearest existing ancestor is such a folder. Else (why, that ancestor), why being
    "Not a directory" or "Permission denied" (checked up front, before a launcher or Ray
    starts, instead of failing later in a rank or a trial)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return "Not a directory", existing
    if not os.access(existing, os.W_OK | os.X_OK):
        return "Permission denied", existing
    return None


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
