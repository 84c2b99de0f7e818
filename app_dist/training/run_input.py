"""What a run is given, and the checks that can refuse it before any process group exists:
the trainer's command line, and `prepare`, which checks the config against the data plan
and the world size. Every rank runs `prepare` at start; the launcher wrapper
(`app-dist train --nproc-per-node N`) runs it before any launcher starts, so bad input is one
line at once. Nothing here imports torch, so the wrapper does not wait for that import
(2-3 s) before its first line.
"""

from __future__ import annotations

import argparse
import os

from app_dist.config import Config
from app_dist.data.manifest import Manifest
from app_dist.data.source import load_manifest
from app_dist.data.stream import MegabatchStream
from app_dist.foundations.commands import ArgumentParser
from app_dist.foundations.errors import ConfigError, DataError


def build_parser() -> ArgumentParser:
    """`app_dist/train.py`'s command line; the launcher wrapper adds its launch flags."""
    parser = ArgumentParser(
        prog="app-dist train", description="Train APP / OSP / dense under the megabatch stream.",
        epilog="Overrides: key=value pairs, e.g. prune.method=osp train.epochs=2",
    )
    parser.add_argument("--config", help="YAML config file (see configs/), required")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # added by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def prepare(config: Config, world_size: int | None = None
            ) -> tuple[Manifest, MegabatchStream]:
    """Everything that can reject the input before a process group exists. `world_size`:
    the ranks the run will have (default: WORLD_SIZE, as the launcher sets it)."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.train.batch_size % world_size:
        raise ConfigError(f"config key 'train.batch_size' = {config.train.batch_size}: not "
                          f"divisible by the world size {world_size}")
    if config.data.num_workers and config.data.num_workers > 64:
        raise ConfigError("config key 'data.num_workers' is implausibly large (> 64)")
    manifest = load_manifest(config.data.shards, config.data)
    check_follow(config, manifest)
    stream = MegabatchStream(manifest, config.data.megabatches, config.data.val_fraction,
                             config.data.replay, config.data.replay_window,
                             config.data.replay_buffer, config.run.seed,
                             stream_seed=config.data.stream_seed)
    return manifest, stream


def check_follow(config: Config, manifest: Manifest) -> None:
    """A stream still arriving is trained with data.follow=true; data.follow needs a stream."""
    published = manifest.stream
    if config.data.follow and published is None:
        raise ConfigError(f"config key 'data.follow' = true: {config.data.shards} is not a "
                          "stream (publish one with `app-dist shards append`)")
    if published is not None and not published.complete and not config.data.follow:
        raise DataError(f"{config.data.shards}: a stream with {published.published} of its "
                        f"{published.megabatches} megabatches published; data.follow=true "
                        "trains them as they arrive")
