"""DeepSpeed (ZeRO 0 and 1) against DDP: one masked training step of the same model on the
same batches, 2 ranks on the CPU (gloo), through the project's own engines.

    python bench/deepspeed_vs_ddp.py [--model resnet20s] [--batch 64] [--steps 10] [--rounds 9]

One process group of 2 ranks holds all three engines, each with its own copy of the same
model pruned to the same masks; they take turns in rounds (the order rotating each round)
so machine noise hits all alike. The figures are medians over rounds of the mean wall-clock
step time (the target: within 10% of DDP) and of rank 0's CPU time per step, with their ratios
to DDP. Appends a row to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app_dist.config import load_config  # noqa: E402
from app_dist.engine import build_engine  # noqa: E402
from app_dist.engine.acceleration import resolve_perf  # noqa: E402
from app_dist.foundations.distributed import start_platform  # noqa: E402
from app_dist.models.registry import build_model  # noqa: E402
from app_dist.pruning.masks import MaskSet, attach_masks  # noqa: E402
from app_dist.pruning.threshold import masks_from_scores  # noqa: E402

ENGINES = {"DDP": ["engine.kind=ddp"],
           "ZeRO-0": ["engine.kind=deepspeed", "engine.zero_stage=0"],
           "ZeRO-1": ["engine.kind=deepspeed", "engine.zero_stage=1"]}


def build_engines(args: argparse.Namespace, platform_):
    torch.manual_seed(0)
    template = build_model(args.model, 10, mean=[0.5] * 3, std=[0.25] * 3)
    engines = {}
    for name, overrides in ENGINES.items():
        # Contiguous weights for both: auto turns channels_last on for DDP only, which would
        # time the memory layout, not the engines.
        config = load_config(None, [f"train.batch_size={args.batch}", "run.device=cpu",
                                    "perf.channels_last=false", *overrides])
        config = dataclasses.replace(config, perf=resolve_perf(config.perf, platform_.device,
                                                               config.engine.kind))
        model = copy.deepcopy(template)
        masks = MaskSet(model, attach_masks(model))
        engine = build_engine(config, model, masks, platform_)
        scores = {n: w.detach().abs() for n, w in masks.weights.items()}
        current = {n: m.clone() for n, m in masks.masks.items()}
        engine.apply_masks(masks_from_scores(scores, current, args.density, "global"))
        engines[name] = engine
    return engines


def mean_step_seconds(engine, batches, steps: int) -> tuple[float, float]:
    """(wall-clock, this process's CPU time) per step: the CPU time leaves out waiting for
    the other rank, which on a shared machine is mostly waiting for a core."""
    engine.module.train()
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        images, labels = batches[step % len(batches)]
        engine.train_step(images, labels)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def rank_main(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    platform_ = start_platform("cpu", timeout_s=600)
    engines = build_engines(args, platform_)
    generator = torch.Generator().manual_seed(rank)
    per_rank = args.batch // platform_.world_size
    batches = [(torch.randint(0, 256, (per_rank, 3, 32, 32), dtype=torch.uint8,
                              generator=generator),
                torch.randint(0, 10, (per_rank,), generator=generator)) for _ in range(4)]
    for engine in engines.values():  # warm-up
        mean_step_seconds(engine, batches, 3)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    names = list(engines)
    for round_ in range(args.rounds):
        # Rotate who goes first, so no engine always follows the same one.
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            platform_.barrier()
            times[name].append(mean_step_seconds(engines[name], batches, args.steps))
    if rank == 0:
        for name, values in times.items():
            results[name] = tuple(statistics.median(column) for column in zip(*values))
        results["threads"] = torch.get_num_threads()
    platform_.barrier()
    platform_.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20s")
    parser.add_argument("--batch", type=int, default=64, help="global batch (2 ranks)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--density", type=float, default=0.8**4.5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(args, port, results), nprocs=2, join=True)
        figures = dict(results)
    (ddp, ddp_cpu) = figures["DDP"]
    parts = [f"DDP {ddp * 1e3:.1f} ms/step ({ddp_cpu * 1e3:.1f} ms CPU)"] + [
        f"{name} {figures[name][0] * 1e3:.1f} ms/step (ratio {figures[name][0] / ddp:.3f}; "
        f"CPU {figures[name][1] * 1e3:.1f} ms, ratio {figures[name][1] / ddp_cpu:.3f})"
        for name in ENGINES if name != "DDP"]
    load = os.getloadavg()[0]
    print(f"{args.model} batch {args.batch} on 2 ranks x {figures['threads']} threads, "
          f"density {args.density:.3f}, load average {load:.1f}: " + ", ".join(parts))
    if not args.no_write:
        command = "python bench/deepspeed_vs_ddp.py " + " ".join(sys.argv[1:])
        row = (f"| {date.today()} | DeepSpeed vs DDP | `{command.strip()}` | "
               f"{platform.node()} (2 ranks x {figures['threads']} threads, load "
               f"{load:.1f}) | {args.model} "
               f"b{args.batch}, masked: " + ", ".join(parts) + " |\n")
        path = REPO / "docs" / "BENCHMARKS.md"
        with path.open("a") as handle:
            handle.write(row)


if __name__ == "__main__":
    main()
