"""Where this node's readers open shard files: the shard folder itself (a local `data.shards`),
or the shard cache, whose entries are named by content (remote shards, see shard_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app_dist.data.manifest import ShardInfo


def entry_name(shard: ShardInfo) -> str:
    """A cached shard's file name, `<sha256>-<shard name>`: content-addressed (never stale,
    shareable between runs), and a message naming the file names the shard."""
    return f"{shard.sha256}-{shard.name}"


@dataclass(frozen=True)
class ShardFiles:
    """Plain data, so reader processes get it pickled."""

    directory: Path
    cached: bool = False  # True: `directory` is a shard cache

    def path(self, shard: ShardInfo) -> Path:
        return self.directory / (entry_name(shard) if self.cached else shard.name)
