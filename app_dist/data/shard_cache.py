"""The per-node shard cache: remote shards kept on local disk, named by sha256 and shard name.

A shard enters the cache only whole and verified: it is downloaded to a private partial file,
its sha256 compared with the manifest's, then renamed into place. Content addressing means a
name is never reused for other bytes, so every rank and every run of a node can share one cache
folder: a shard two processes want at once is downloaded by the first to take its lock file
(fcntl.flock, released by the kernel if that process dies), and found in place by the second.

The cache is bounded: after each insertion the least recently used shards are removed until it
fits `max_bytes`, never the ones the inserting pass needs. A reader that has a removed shard open
keeps reading it (POSIX unlink semantics). The bound must hold one pass's shards for every run
that shares the cache; otherwise those runs download again what they evict from each other.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from app_dist.data.manifest import ShardInfo
from app_dist.data.shard_files import entry_name
from app_dist.foundations.files import fsync_directory

ABANDONED_AFTER_S = 3600.0

# Writes the shard's bytes to the ShardWriter it is given (a download); may raise.
Fill = Callable[["ShardWriter"], None]


class ChecksumMismatch(Exception):
    """The bytes a fill wrote do not hash to the expected sha256."""

    def __init__(self, actual: str) -> None:
        super().__init__(actual)
        self.actual = actual


class ShardCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._partial = directory / ".partial"
        self._locks = directory / ".locks"
        for folder in (directory, self._partial, self._locks):
            folder.mkdir(parents=True, exist_ok=True)
        self._remove_abandoned_partials()

    def _remove_abandoned_partials(self) -> None:
        """Partial files of downloads that were killed (SIGKILL, a lost node) would stay for
        ever. One that has not grown for ABANDONED_AFTER_S is no live download's: a download
        writes every chunk as it arrives, and a stalled one fails its retries far sooner."""
        cutoff = time.time() - ABANDONED_AFTER_S
        for partial in self._partial.iterdir():
            try:
                if partial.stat().st_mtime < cutoff:
                    partial.unlink()
            except FileNotFoundError:  # its download finished or another run removed it
                continue

    def path(self, shard: ShardInfo) -> Path:
        """Where the shard is (or will be) kept: named by content, and by name for messages."""
        return self.directory / entry_name(shard)

    def has(self, shard: ShardInfo) -> bool:
        """True (and the shard counts as just used) when it is in the cache."""
        try:
            os.utime(self.path(shard))  # mtime is the LRU clock
        except FileNotFoundError:
            return False
        return True

    def insert(self, shard: ShardInfo, fill: Fill, keep: frozenset[str] = frozenset()) -> bool:
        """Make `shard` present, calling `fill` unless another process already has (or, while
        we waited for its lock, did). True when this call filled it. Raises what `fill` raises,
        or ChecksumMismatch; nothing partial is left in the cache either way. `keep`: entry
        names (`entry_name`) not to evict for room: the ones the caller's pass reads."""
        if self.has(shard):
            return False
        name = entry_name(shard)
        with self._locked(name):
            if self.has(shard):
                return False
            partial = self._partial / f"{name}.{os.getpid()}.{time.monotonic_ns()}"
            try:
                with open(partial, "wb") as out:
                    hashing = ShardWriter(out)
                    fill(hashing)
                    out.flush()
                    os.fsync(out.fileno())
                if hashing.hexdigest() != shard.sha256:
                    raise ChecksumMismatch(hashing.hexdigest())
                os.replace(partial, self.path(shard))
                fsync_directory(self.directory)
            finally:
                partial.unlink(missing_ok=True)
        self.evict(keep | {name})
        return True

    def size(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def evict(self, keep: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Remove least recently used entries (not in `keep`) until the cache fits; their
        names."""
        entries = sorted(self._entries(), key=lambda entry: entry[2])  # oldest use first
        total = sum(size for _, size, _ in entries)
        removed = []
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if path.name in keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path.name)
        return removed

    def _entries(self) -> Iterator[tuple[Path, int, float]]:
        for path in self.directory.iterdir():
            if path.name.startswith(".") or not path.is_file():
                continue
            try:
                info = path.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            yield path, info.st_size, info.st_mtime

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with open(self._locks / f"{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class ShardWriter:
    """Where a fill writes a shard: a file that hashes what passes through it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.out.write(data)

    def restart(self) -> None:
        """Forget what was written: a retried download starts again from byte 0."""
        self.out.seek(0)
        self.out.truncate()
        self.hash = hashlib.sha256()

    def hexdigest(self) -> str:
        return self.hash.hexdigest()
