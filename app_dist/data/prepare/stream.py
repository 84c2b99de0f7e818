"""`app-dist shards append STREAM --from SHARDS --megabatches T`: publish the next megabatch of
a stream, as new data arrives in ALMA. STREAM is a folder, or an s3:// or gs:// URL.

The first call publishes the test split and megabatch 1; each later call the next megabatch,
until T. Megabatch t is SHARDS' training shards [(t-1) n / T, t n / T): the cut a run over
SHARDS with data.megabatches=T makes, so a run that follows the stream (data.follow=true)
computes what a run over SHARDS computes. Each call copies the megabatch's shards first and
rewrites STREAM/manifest.json last (atomically: a rename, or one object put), listing the
published shards and, under "stream", the declared T and each megabatch's shard bounds. A
reader therefore never sees a megabatch whose shards are not all there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from app_dist.config import DataSettings
from app_dist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo, StreamInfo
from app_dist.data.source import load_manifest
from app_dist.foundations.commands import ArgumentParser, command
from app_dist.foundations.errors import AppDistError, ConfigError, DataError
from app_dist.foundations.storage import Retry, check_location, folder_at, redact

STREAM_RETRY = Retry(attempts=3)


def append_megabatch(stream: str, source: str, megabatches: int | None) -> Manifest:
    """Publish the next megabatch of `stream` from the shard folder `source`; the new
    manifest."""
    check_location(stream, "STREAM", writable=True)
    origin = Manifest.load(source)
    if origin.stream is not None:
        raise DataError(f"--from {source}: is itself a stream; give the complete shard folder")
    current = _current(stream)
    if current is None:
        if megabatches is None:
            raise ConfigError("--megabatches: required for a stream's first megabatch")
        info = StreamInfo(megabatches=megabatches, bounds=(0,))
    else:
        info = current.stream
        if megabatches is not None and megabatches != info.megabatches:
            raise ConfigError(f"--megabatches {megabatches}: the stream {redact(stream)} "
                              f"declares {info.megabatches}")
        if (current.dataset, current.classes, current.samples_per_shard) != (
                origin.dataset, origin.classes, origin.samples_per_shard):
            raise DataError(f"--from {source}: not the shards {redact(stream)} was started from")
    if info.published == info.megabatches:
        raise DataError(f"{redact(stream)}: all {info.megabatches} megabatches are published")
    train = origin.splits["train"].shards
    if info.megabatches > len(train):
        raise ConfigError(f"--megabatches {info.megabatches}: {source} has only {len(train)} "
                          "training shards")
    t = info.published + 1
    end = t * len(train) // info.megabatches
    new = train[info.bounds[-1]:end]
    if current is None:
        new = [*origin.splits["test"].shards, *new]
    folder = folder_at(stream, STREAM_RETRY, key="STREAM")
    for shard in new:  # the shards first ...
        folder.upload(Path(source) / shard.name, shard.name)
    published = dataclasses.replace(
        origin,
        splits={"train": _split(train[:end]), "test": origin.splits["test"]},
        stream=StreamInfo(megabatches=info.megabatches, bounds=(*info.bounds, end)))
    # ... then the manifest that lists them
    folder.write_text(MANIFEST_NAME, json.dumps(published.to_dict(), indent=2) + "\n")
    return published


def _split(shards: list[ShardInfo]) -> SplitInfo:
    return SplitInfo(num_samples=sum(s.count for s in shards), shards=list(shards))


def _current(stream: str) -> Manifest | None:
    """The stream's manifest, None before its first megabatch."""
    if not folder_at(stream, STREAM_RETRY, key="STREAM").exists(MANIFEST_NAME):
        return None
    manifest = load_manifest(stream, DataSettings(fetch_attempts=STREAM_RETRY.attempts))
    if manifest.stream is None:
        raise DataError(f"{redact(stream)}: holds shards that are not a stream")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="app-dist shards append",
                            description="Publish the next megabatch of a stream.")
    parser.add_argument("stream", help="the stream: a folder, s3:// or gs:// URL")
    parser.add_argument("--from", dest="source", required=True,
                        help="the complete shard folder the megabatches come from")
    parser.add_argument("--megabatches", type=int, default=None,
                        help="T, the stream's declared horizon (required the first time)")
    return parser


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    try:
        published = append_megabatch(args.stream, args.source, args.megabatches)
    except OSError as error:
        raise AppDistError(f"{error.filename or args.stream}: {error.strerror or error}"
                           ) from None
    info = published.stream
    assert info is not None
    shards = info.bounds[-1] - info.bounds[-2]
    print(f"published megabatch {info.published} of {info.megabatches} to "
          f"{redact(args.stream)}: {shards} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
