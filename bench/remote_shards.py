"""Reading shards from an S3-compatible server against reading them from local disk: images per
second of training passes (decode + augmentation + batching, the trainer's StreamReader, one
rank, two reader processes), for the first epoch (the shard cache empty: every shard fetched)
and for later epochs (served from the node's shard cache), side by side in one run. Then a
short 2-rank training run from the server publishing its anytime model to the server: the
seconds from each megabatch's end to its model being published there. Last, a run following
a stream in the server (data.follow=true): the seconds from a megabatch's manifest landing
(`app-dist shards append` returning) to the run training on it.

    python bench/remote_shards.py [--images 5000] [--rounds 3] [--no-write]

The server is moto's standalone S3 server on 127.0.0.1 (tests/storage_servers.py): no real
network latency or bandwidth limit, so the first-epoch figure is the cost of the S3 protocol,
the sha256 check and the cache's disk writes, a lower bound for a real bucket.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    append_row,
    cifar_shards,
    load_average,
    median,
    run_trainer,
)
from tests.storage_servers import S3Server, require  # noqa: E402


def epoch_images_per_second(location: str, cache: Path, env: dict[str, str]) -> float:
    import os

    import torch

    from app_dist.config import DataSettings, plain_perf
    from app_dist.data.reader import StreamReader
    from app_dist.data.source import load_manifest, open_shards
    from app_dist.data.stream import MegabatchStream
    from app_dist.foundations.distributed import Platform

    os.environ.update(env)
    data = DataSettings(shards=location, num_workers=2, cache_dir=str(cache))
    manifest = load_manifest(location, data)
    stream = MegabatchStream(manifest, 1, 0.1, "full", 2, 1000, 1)
    reader = StreamReader(open_shards(location, data), manifest, stream, data, 64,
                          Platform(0, 1, 0, torch.device("cpu")), seed=1,
                          perf=plain_perf(prefetch_shards=False))
    started = time.perf_counter()
    count = sum(len(labels) for _, labels in reader.train_epoch(1, 0))
    return count / (time.perf_counter() - started)


def publish_seconds(s3: S3Server, shards_url: str, work: Path) -> list[float]:
    run = run_trainer(["--config", "configs/cifar10.yaml", f"data.shards={shards_url}",
                       f"run.dir={work / 'run'}", f"data.cache_dir={work / 'run-cache'}",
                       "data.megabatches=3", "train.epochs=1", "log.progress=false",
                       "model.name=resnet20s", "checkpoint.anytime_to=s3://models/bench"],
                      nproc=2, env=s3.env)
    return [float(seconds) for seconds in
            re.findall(r"anytime model of megabatch \d+ published to \S+ in ([0-9.]+) s",
                       run.stdout)]


def arrival_seconds(s3: S3Server, shards: Path, work: Path) -> list[float]:
    """A 1-rank run following a stream in S3 (data.follow=true, polled every 2 s, the
    default): seconds from `app-dist shards append` returning to the run's first log line of
    that megabatch (its pruning), for megabatches 2 and 3."""
    import os
    import subprocess
    import threading

    from app_dist.data.prepare.stream import append_megabatch

    os.environ.update(s3.env)
    s3.make_bucket("streams")
    stream = "s3://streams/cifar10"
    append_megabatch(stream, str(shards), 3)
    command = [sys.executable, "-u", "app_dist/train.py", "--config", "configs/cifar10.yaml",
               f"data.shards={stream}", f"run.dir={work / 'follow'}",
               f"data.cache_dir={work / 'follow-cache'}", "data.megabatches=3",
               "train.epochs=1", "log.progress=false", "model.name=resnet20s",
               "data.follow=true"]
    run = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env={**os.environ, "WANDB_MODE": "disabled"})
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend(
        (time.monotonic(), line) for line in run.stdout), daemon=True)
    reader.start()

    def seen(text: str) -> float | None:
        return next((at for at, line in list(lines) if text in line), None)

    latencies = []
    for megabatch in (2, 3):
        while seen(f"waiting for megabatch {megabatch} of 3") is None:
            if run.poll() is not None:
                sys.exit("error: the follow run ended early:\n"
                         + "".join(text for _, text in lines))
            time.sleep(0.05)
        append_megabatch(stream, str(shards), None)
        published = time.monotonic()
        while (started := seen(f"megabatch {megabatch}: pruned")) is None:
            time.sleep(0.01)
        latencies.append(started - published)
    run.wait(timeout=1800)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    require("s3fs")
    require("moto")
    shards = cifar_shards(args.images, 1000)
    s3 = S3Server()
    s3.start()
    try:
        url = s3.upload(shards, "datasets", "cifar10")
        s3.make_bucket("models")
        local, cold, warm = [], [], []
        with tempfile.TemporaryDirectory(prefix="app-dist-bench-") as scratch:
            work = Path(scratch)
            for round_ in range(args.rounds):
                cache = work / f"cache-{round_}"  # empty: the first epoch fetches every shard
                local.append(epoch_images_per_second(str(shards), cache, s3.env))
                cold.append(epoch_images_per_second(url, cache, s3.env))
                warm.append(epoch_images_per_second(url, cache, s3.env))
            published = publish_seconds(s3, url, work)
            arrivals = arrival_seconds(s3, shards, work)
    finally:
        s3.stop()
    result = (f"{args.images} CIFAR-10 JPEGs, 1 rank, 2 readers; img/s (median of "
              f"{args.rounds}): local {median(local):.0f}, S3 first epoch (cache empty) "
              f"{median(cold):.0f} ({median(cold) / median(local):.2f}x), S3 cached "
              f"{median(warm):.0f} ({median(warm) / median(local):.2f}x); anytime model "
              f"published to S3 after each megabatch (2 ranks, resnet20s): "
              f"{', '.join(f'{s:.2f}' for s in published)} s; a followed S3 stream "
              f"(1 rank, polled every 2 s): from `shards append` returning to training on "
              f"megabatches 2 and 3: {', '.join(f'{s:.2f}' for s in arrivals)} s")
    print(result)
    print(f"load average {load_average():.2f}")
    if not args.no_write:
        append_row("remote shards (moto S3 on 127.0.0.1) vs local", "bench/remote_shards.py",
                   result)


if __name__ == "__main__":
    main()
