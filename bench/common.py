"""What the benchmark scripts share: the benchmark shards, the trainer as a subprocess, the
machine's description (with its load), and appending rows to docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "docs" / "BENCHMARKS.md"
CIFAR_JPG = Path(os.environ.get("APP_DIST_CIFAR_JPG", "/tmp/cifar10-jpg"))
# The tests' default too (tests/conftest.py): a `shared/data` folder beside the checkout.
IMAGENET_SAMPLE = Path(os.environ.get("APP_DIST_IMAGENET_SAMPLE", REPO.parent / "shared" / "data"
                                      / "imagenet-sample-restricted"))
WORK = Path(os.environ.get("APP_DIST_BENCH_DIR", "/tmp/app-dist-bench"))


def load_average() -> float:
    """The 1-minute load average: above the core count, other work shares the cores and
    every figure measured meanwhile is suspect."""
    return os.getloadavg()[0]


def machine() -> str:
    return (f"{platform.node()}, {os.cpu_count()} cores, torch {torch.__version__.split('+')[0]}"
            f", load {load_average():.2f}")


def median(values: list[float]) -> float:
    return statistics.median(values)


def cifar_shards(limit: int | None, test_limit: int | None, samples_per_shard: int = 125
                 ) -> Path:
    """CIFAR-10 JPEG shards of the first `limit` permuted training images (all 10,000 test
    images unless `test_limit`), written once into the benchmark folder and reused."""
    from app_dist.data.prepare.shards import write_shards

    if not CIFAR_JPG.is_dir():
        sys.exit(f"error: the CIFAR-10 JPEG folder {CIFAR_JPG} does not exist "
                 "(tar -xf cifar10-jpg.tar, or set APP_DIST_CIFAR_JPG)")
    out = WORK / f"cifar10-{limit or 'all'}-{test_limit or 'all'}-{samples_per_shard}"
    if not (out / "manifest.json").exists():
        write_shards("imagefolder", str(CIFAR_JPG), str(out), samples_per_shard, seed=0,
                     limit=limit, test_limit=test_limit, overwrite=True)
    return out


def run_trainer(overrides: list[str], nproc: int = 1, entry: str = "app_dist/train.py",
                env: dict[str, str] | None = None, timeout: int = 1800
                ) -> subprocess.CompletedProcess[str]:
    """app_dist/train.py as users run it: python for one rank, torchrun (gloo) for more."""
    if nproc == 1:
        command = [sys.executable, str(REPO / entry)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(nproc), "--master_port", str(_free_port()), str(REPO / entry)]
    result = subprocess.run(command + overrides, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout,
                            env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})
    if result.returncode != 0:
        sys.exit(f"error: the trainer failed:\n{result.stderr[-3000:]}")
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prune_like_the_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          density: float = 0.8) -> None:
    """Masks at `density` (global magnitude; APP's first megabatch keeps 0.8) with the
    trainer's masked forward and gradient hooks, and `optimizer.step` re-zeroing the pruned
    weights after every step, as the engine does: a bare loop with our masking cost."""
    from app_dist.pruning.masks import MaskSet, attach_masks
    from app_dist.pruning.threshold import masks_from_scores

    masks = MaskSet(model, attach_masks(model))
    scores = {name: w.detach().abs() for name, w in masks.weights.items()}
    current = {name: m.clone() for name, m in masks.masks.items()}
    masks.update(masks_from_scores(scores, current, density, "global"), optimizer)
    step = optimizer.step

    def step_and_mask(*args, **kwargs):
        result = step(*args, **kwargs)
        masks.apply_to_weights()
        return result

    optimizer.step = step_and_mask  # type: ignore[method-assign]


def trainable(model: torch.nn.Module, masked: bool
              ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """`model` in training mode with the reference setting's SGD (lr 0.1, momentum 0.9,
    weight decay 1e-4), pruned like the engine at density 0.8 when `masked`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    if masked:
        prune_like_the_engine(model, optimizer)
    return model.train(), optimizer


def append_row(what: str, script: str, result: str) -> None:
    """One row of docs/BENCHMARKS.md: date, what, the exact command, machine, result."""
    command = " ".join(["python", script, *sys.argv[1:]])
    row = f"| {date.today()} | {what} | `{command}` | {machine()} | {result} |\n"
    with BENCHMARKS.open("a") as handle:
        handle.write(row)
    print(f"appended to {BENCHMARKS.relative_to(REPO)}: {what}")
