"""Where a run's shards come from (`data.shards`): a local folder, or a folder in object storage
or behind HTTP whose shards are fetched into the node's shard cache. Either way the readers
open local files: `ShardFiles` tells them where, and `ensure` puts the shards a pass reads
there first. The manifest is read from the same place as the shards.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from app_dist.config import DataSettings
from app_dist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from app_dist.data.shard_cache import ChecksumMismatch, ShardCache
from app_dist.data.shard_files import ShardFiles, entry_name
from app_dist.foundations.errors import DataError
from app_dist.foundations.storage import (
    RemoteFolder,
    Retry,
    check_location,
    is_remote,
    local_path,
    redact,
)

log = logging.getLogger("app_dist")


class ShardSource(Protocol):
    files: ShardFiles

    def ensure(self, shards: Iterable[ShardInfo]) -> None:
        """Make every one of `shards` readable at files.path(shard) (download, verify)."""

    def prefetch(self, shards: Iterable[ShardInfo]) -> None:
        """Start getting `shards` ready in the background; errors wait for `ensure`."""


def load_manifest(location: str, settings: DataSettings) -> Manifest:
    """The manifest at `location` (data.shards), validated; ConfigError/ManifestError/
    DataError with one line naming it otherwise."""
    check_location(location)
    if not is_remote(location):
        return Manifest.load(local_path(location))
    folder = RemoteFolder(location, retry_of(settings))
    return Manifest.from_json(folder.read_text(MANIFEST_NAME),
                              f"{redact(location).rstrip('/')}/{MANIFEST_NAME}")


def open_shards(location: str, settings: DataSettings) -> ShardSource:
    if is_remote(location):
        return RemoteShards(RemoteFolder(location, retry_of(settings)),
                            ShardCache(cache_directory(settings),
                                       int(settings.cache_max_gb * (1 << 30))))
    return LocalShards(Path(local_path(location)))


def verify_at_start(location: str, manifest: Manifest) -> None:
    """data.verify_checksums: every local shard's sha256 before training. Remote shards are
    verified as they arrive instead (reading them all up front is what streaming avoids)."""
    if not is_remote(location):
        manifest.verify(local_path(location))


def retry_of(settings: DataSettings) -> Retry:
    return Retry(attempts=settings.fetch_attempts, backoff_s=settings.fetch_backoff_s)


def cache_directory(settings: DataSettings) -> Path:
    return Path(os.path.expanduser(settings.cache_dir))


class LocalShards:
    def __init__(self, directory: Path) -> None:
        self.files = ShardFiles(directory)

    def ensure(self, shards: Iterable[ShardInfo]) -> None:
        return None  # already here; a missing or damaged one is named by its reader

    def prefetch(self, shards: Iterable[ShardInfo]) -> None:
        """Ask the OS to read the shards into its page cache, so that the first epoch that
        reads them does not wait on the disk."""
        paths = [str(self.files.path(shard)) for shard in shards]
        threading.Thread(target=_read_ahead, args=(paths,), daemon=True,
                         name="app-dist-prefetch").start()


class RemoteShards:
    """Shards fetched from `folder` into this node's `cache` (shared by its ranks and runs)."""

    def __init__(self, folder: RemoteFolder, cache: ShardCache) -> None:
        self.folder = folder
        self.cache = cache
        self.files = ShardFiles(cache.directory, cached=True)
        self.fetched_shards = 0  # by this process, for the log line and the benchmark
        self.fetched_bytes = 0

    def ensure(self, shards: Iterable[ShardInfo]) -> None:
        wanted = list({shard.name: shard for shard in shards}.values())
        keep = frozenset(entry_name(shard) for shard in wanted)
        started, count, size = time.monotonic(), self.fetched_shards, self.fetched_bytes
        for shard in wanted:
            self._fetch(shard, keep)
        if self.fetched_shards > count:
            log.info("fetched %d shard(s), %.1f MB, from %s in %.1f s",
                     self.fetched_shards - count, (self.fetched_bytes - size) / 1e6, self.folder,
                     time.monotonic() - started)

    def prefetch(self, shards: Iterable[ShardInfo]) -> None:
        threading.Thread(target=self._prefetch, args=(list(shards),), daemon=True,
                         name="app-dist-prefetch").start()

    def _prefetch(self, shards: list[ShardInfo]) -> None:
        keep = frozenset(entry_name(shard) for shard in shards)
        for shard in shards:
            try:
                self._fetch(shard, keep)
            except DataError as error:  # the pass that needs the shard tries again, and says
                log.debug("prefetch: %s", error)
                return

    def _fetch(self, shard: ShardInfo, keep: frozenset[str]) -> bool:
        try:
            fetched = self.cache.insert(shard, lambda out: self.folder.download(shard.name, out),
                                        keep)
        except ChecksumMismatch as mismatch:
            raise DataError(f"{self.folder}/{shard.name}: sha256 {mismatch.actual} does not "
                            f"match the manifest's {shard.sha256} (changed on the server?)"
                            ) from None
        except OSError as error:  # the cache's own disk (full, read-only)
            raise DataError(f"shard cache {self.cache.directory}: cannot store {shard.name}: "
                            f"{error.strerror or error}") from None
        if fetched:
            self.fetched_shards += 1
            self.fetched_bytes += shard_size(self.cache.path(shard))
        return fetched


def shard_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # already evicted by another run sharing the cache
        return 0


def _read_ahead(paths: list[str]) -> None:
    if not hasattr(os, "posix_fadvise"):  # not on macOS: reading ahead is only a hint anyway
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # the reader names a missing shard when it gets there
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
