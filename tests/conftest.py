"""Shared fixtures: real digits shards, and a launcher for real multi-process runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds

from app_dist.data.manifest import file_sha256

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's real 8x8 digits as shards of 25 samples (60 train, 12 test shards)."""
    from app_dist.data.prepare.shards import write_shards

    out = tmp_path_factory.mktemp("digits") / "shards"
    write_shards("digits", None, str(out), samples_per_shard=25, seed=0)
    return out


def run_trainer(args: list[str], nproc: int = 1, env: dict[str, str] | None = None,
                timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run app_dist/train.py for real: plain python for 1 process, torchrun (gloo) for more.
    wandb is off unless the test sets log.wandb.mode: its service process costs every run
    2-3 s, and only the tests that read what wandb wrote need it."""
    if not any(arg.startswith("log.wandb.mode=") for arg in args):
        args = [*args, "log.wandb.mode=disabled"]
    if nproc == 1:
        command = [sys.executable, str(REPO / "app_dist" / "train.py"), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(nproc), "--master_port", str(free_port()),
                   str(REPO / "app_dist" / "train.py"), *args]
    full_env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_shards(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_shard(directory: Path, name: str, edit) -> None:
    """Rewrite one shard's samples through `edit(sample) -> sample` and fix its sha256, so
    only the content is bad (the manifest checksum still matches)."""
    path = directory / name
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(edit({k: v for k, v in sample.items() if k != "__url__"}))
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == name:
                shard["sha256"] = file_sha256(path)
    manifest_path.write_text(json.dumps(manifest))


def first_sample_key(directory: Path, name: str) -> str:
    return next(iter(wds.WebDataset(str(directory / name), shardshuffle=False)))["__key__"]


def rank_processes(launcher_pid: int) -> list[int]:
    """The ranks torchrun started: its direct children (a rank's DataLoader workers share the
    rank's command line, so matching on the command line would count them too)."""
    found = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True)
    return sorted(int(pid) for pid in found.stdout.split())


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields, which legitimately differ between runs."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for wall_clock in ("seconds", "train_seconds", "train_images_per_second"):
            record.pop(wall_clock)
    return records


def digits_run_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A small real run: 3 megabatches of digits, 2 epochs each, every checkpoint kept."""
    return ["--config", str(REPO / "configs/digits.yaml"), f"data.shards={shards}",
            f"run.dir={run_dir}", "data.megabatches=3", "train.epochs=2", "log.progress=false",
            "checkpoint.keep_last=10", *extra]


@pytest.fixture(scope="session")
def uninterrupted(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference 2-rank run (torchrun, gloo) that interrupted runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_trainer(digits_run_args(digits_shards, run_dir), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def checkpoint_folder(run_dir: Path, megabatch: int) -> Path:
    return run_dir / "checkpoints" / f"megabatch-{megabatch:04d}"


def pruned_model(seed: int = 0, name: str = "resnet20s", stem: str = "cifar"
                 ) -> tuple[Any, Any]:
    """(model, MaskSet): a registry model with 10 classes pruned to density 0.4 by random
    scores (global threshold)."""
    import torch

    from app_dist.models import build_model
    from app_dist.pruning.masks import MaskSet, attach_masks
    from app_dist.pruning.threshold import masks_from_scores

    torch.manual_seed(seed)
    model = build_model(name, 10, stem=stem, mean=[0.5] * 3, std=[0.25] * 3)
    masks = MaskSet(model, attach_masks(model))
    scores = {key: torch.rand(w.shape) for key, w in masks.weights.items()}
    current = {key: m.clone() for key, m in masks.masks.items()}
    masks.update(masks_from_scores(scores, current, 0.4, "global"), optimizer=None)
    return model, masks
