"""2 ranks against 1 on the same global batch, and the peak memory of each rank.

    python bench/scaling.py [--rounds 2] [--no-write]

Throughput: our trainer on 2,000 CIFAR-10 JPEGs (one megabatch, 4 epochs, resnet20s, global
batch 64, the decode-once cache filled by the training process itself, data.num_workers=0:
no reader process competes for the cores, and none has to start; with a reader process, its
start-up of about 3 s dominated a megabatch this short and blurred the comparison), as
`python app_dist/train.py` (1 rank, 2 threads; and pinned to 1 thread) and as `torchrun
--nproc_per_node 2` (2 ranks of 32, 1 thread each, gloo). Scaling = 2-rank img/s / 1-rank
img/s: a second rank adds no cores to a machine whose cores the single rank already uses,
only a gradient all-reduce per step and a second copy of everything, so with perfect
intra-op threading 1.0 would be the ceiling; the 1-thread rank shows what one core does.

Memory: peak RSS per rank (ru_maxrss of the training process, and of its reader processes)
for resnet20s and resnet50 (CIFAR stem) at global batch 64 on 2 ranks, from the same
trainer running one short megabatch (train, SNIP, validation, test, checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    append_row,
    cifar_shards,
    load_average,
    median,
    metrics,
    run_trainer,
)

COMMON = ["--config", "configs/cifar10.yaml", "log.progress=false", "log.wandb.mode=disabled",
          "checkpoint.resume=false", "perf.cache_decoded=true", "train.batch_size=64"]


def throughput(shards: Path, nproc: int, threads: int | None = None) -> float:
    """Training img/s of one megabatch; `threads` pins the intra-op threads per rank (else
    the trainer's default: the cores divided among the ranks)."""
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    with tempfile.TemporaryDirectory(prefix="app-dist-scaling-") as run_dir:
        run_trainer([*COMMON, f"data.shards={shards}", f"run.dir={run_dir}",
                     "data.megabatches=1", "train.epochs=4", "data.num_workers=0",
                     "prune.method=dense"], nproc=nproc, env=env)
        return metrics(Path(run_dir))[0]["train_images_per_second"]


def peak_memory(model: str) -> list[dict]:
    """Per-rank peak RSS of a 2-rank run: one megabatch of 225 training images (batches of
    32 per rank), 1 epoch, a 500-image test pass, one SNIP pruning step."""
    shards = cifar_shards(250, 500)
    with tempfile.TemporaryDirectory(prefix="app-dist-rss-") as folder:
        run_trainer([*COMMON, f"data.shards={shards}", f"run.dir={folder}/run",
                     "data.megabatches=1", "train.epochs=1", "data.num_workers=1",
                     f"model.name={model}", "data.eval_batch_size=250"], nproc=2,
                    entry="bench/peak_rss.py", env={"APP_DIST_RSS_DIR": folder},
                    timeout=3600)
        return [json.loads((Path(folder) / f"rank-{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    loads = [load_average()]
    shards = cifar_shards(2000, 500)
    setups = {"1 rank, 2 threads": (1, None), "1 rank, 1 thread": (1, 1),
              "2 ranks, 1 thread each": (2, None)}
    rates: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, (nproc, threads) in setups.items():
            rates[name].append(throughput(shards, nproc, threads))
            loads.append(load_average())
        print(", ".join(f"{name} {values[-1]:.0f} img/s" for name, values in rates.items()),
              flush=True)
    one, single, two = (median(rates[name]) for name in setups)
    memory = {model: peak_memory(model) for model in ("resnet20s", "resnet50")}
    loads.append(load_average())
    rss = "; ".join(f"{model} peak RSS per rank " + ", ".join(
        f"{r['self_mb']:.0f} MB (+ reader {r['children_mb']:.0f} MB)" for r in ranks)
        for model, ranks in memory.items())
    result = (f"resnet20s global batch 64: 1 rank {one:.0f} img/s (2 threads; "
              f"{single:.0f} with 1 thread), 2 ranks {two:.0f} img/s, "
              f"2 ranks / 1 rank {two / one:.2f} (/ 1 thread: {two / single:.2f}); {rss}; "
              f"load {min(loads):.2f}..{max(loads):.2f}")
    print(result)
    if not args.no_write:
        append_row("scaling 1 -> 2 ranks, peak memory", "bench/scaling.py", result)


if __name__ == "__main__":
    main()
