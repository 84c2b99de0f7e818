"""Mask synchronisation and checkpoints for ResNet-50 (CIFAR stem, 23.5M prunable weights) on
2 ranks (gloo, one core each).

    python bench/sync_and_checkpoint.py [--rounds 3] [--no-write]

Mask synchronisation is what a pruning step adds on top of computing scores: the score
all-reduce (one flat float32 collective), the global threshold (kthvalue over all weights),
installing the masks (weights and momentum zeroed) and the cross-rank checksum comparison.
It is reported as a fraction of one megabatch's training, estimated from the training step
time measured in the same run (batch 64 split over the 2 ranks) times the steps of a
megabatch: the paper's CIFAR-10 setting (6,250-image megabatches, 90% trained, 50 epochs:
4,350 steps at t = 1, more later with replay) and the small benchmark setting (1,125
training images, 2 epochs: 34 steps).

Checkpoints: the trainer's Checkpointer (every file written to a temporary name, fsync'd,
renamed; sha256 of every file in COMPLETE.json, verified again when loading; old
checkpoints retired) saving and loading the full state (model, SGD momentum, scheduler,
masks, per-rank RNG and masks) and restoring it, against plain torch.save + torch.load +
load_state_dict of the same tensors, and against that plain version with the same two
guarantees added (fsync after writing, sha256 after writing and before loading): the first
ratio is the issue's target, the second what our machinery costs beyond its guarantees.
Rounds take turns; medians.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_row, load_average, median  # noqa: E402

PAPER_STEPS = 50 * (5625 // 64)  # t = 1 of the paper's CIFAR-10 setting
SMALL_STEPS = 2 * (1125 // 64)  # t = 1 of bench/end_to_end.py's setting
WORLD = 2
BATCH_PER_RANK = 32


def worker(rank: int, port: int, rounds: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share two cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from app_dist.config import Config
    from app_dist.engine.ddp import DDPEngine
    from app_dist.foundations.distributed import Platform
    from app_dist.foundations.files import file_sha256
    from app_dist.models.registry import build_model
    from app_dist.pruning.masks import MaskSet, attach_masks
    from app_dist.pruning.pruner import _all_reduce_dict, verify_identical_masks
    from app_dist.pruning.threshold import masks_from_scores
    from app_dist.training.checkpoint import Checkpointer

    platform = Platform(rank, WORLD, rank, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model("resnet50", 10, mean=[0.5] * 3, std=[0.25] * 3)
    masks = MaskSet(model, attach_masks(model))
    engine = DDPEngine(model, masks, platform, Config())
    generator = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (BATCH_PER_RANK, 3, 32, 32), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, 10, (BATCH_PER_RANK,), generator=generator)

    def timed(action, *args):
        """(seconds between barriers on both sides, the action's result)"""
        dist.barrier()
        started = time.perf_counter()
        result = action(*args)
        dist.barrier()
        return time.perf_counter() - started, result

    steps = [timed(engine.train_step, images, labels)[0] for _ in range(2 + rounds)][2:]

    def install(new_masks: dict) -> None:
        engine.apply_masks(new_masks)
        verify_identical_masks(masks.masks, platform)

    ones = {name: torch.ones_like(mask) for name, mask in masks.masks.items()}
    sync: dict[str, list[float]] = {"all-reduce": [], "threshold": [], "install+checksum": []}
    for _ in range(rounds):
        masks.set(ones)
        scores = {name: torch.rand(w.shape, generator=generator)
                  for name, w in masks.weights.items()}
        seconds, summed = timed(_all_reduce_dict, scores, platform)
        sync["all-reduce"].append(seconds)
        current = {name: mask.cpu() for name, mask in masks.masks.items()}
        seconds, new_masks = timed(masks_from_scores, summed, current, 0.8, "global")
        sync["threshold"].append(seconds)
        sync["install+checksum"].append(timed(install, new_masks)[0])

    def states(megabatch: int) -> tuple[dict, dict]:
        """What the loop checkpoints after a megabatch: shared state, this rank's state."""
        return ({"masks": masks.state_dict(), "run": {"completed": megabatch},
                 "progress": None, "settings": {}, "world_size": WORLD},
                {"masks": masks.state_dict(), "pruned_residue": engine.pruned_residue(),
                 "epoch_sums": None, "buffers": None})

    def ours_save(checkpointer: Checkpointer, megabatch: int) -> None:
        shared_state, rank_state = states(megabatch)
        checkpointer.write(megabatch, shared_state, rank_state, engine)

    def ours_load(checkpointer: Checkpointer) -> None:
        found = checkpointer.latest()
        masks.load_state_dict(found.load_state()["masks"])
        engine.load(found.path)
        found.load_rank_state(rank)

    def raw_save(path: Path, megabatch: int, guarantees: bool) -> None:
        """torch.save of what our checkpoint holds (engine.pt + state.pt + the rank files);
        with `guarantees`, also fsync'd and hashed as our checkpoints are."""
        shared_state, rank_state = states(megabatch)
        everything = {"rank": rank_state}
        if rank == 0:
            everything.update(model=model.state_dict(), optimizer=engine.optimizer.state_dict(),
                              scheduler=engine.scheduler.state_dict(), state=shared_state)
        with path.open("wb") as handle:
            torch.save(everything, handle)
            if guarantees:
                handle.flush()
                os.fsync(handle.fileno())
        if guarantees:
            file_sha256(path)

    def raw_load(path: Path, guarantees: bool) -> None:
        """torch.load and restore into the model, optimizer and masks (what a resume does)."""
        if guarantees:
            file_sha256(path)
        everything = torch.load(path, weights_only=True)
        if rank == 0:
            model.load_state_dict(everything["model"])
            engine.optimizer.load_state_dict(everything["optimizer"])
        masks.load_state_dict(everything["rank"]["masks"])

    checkpoint: dict[str, list[float]] = {name: [] for name in (
        "ours save", "ours load", "raw save", "raw load", "guarded save", "guarded load")}
    shared = Path(tempfile.gettempdir()) / f"app-dist-ckpt-bench-{port}"
    checkpointer = Checkpointer(shared, platform, keep_last=2)
    with tempfile.TemporaryDirectory(prefix=f"app-dist-ckpt-{rank}-") as local:
        raw = Path(local) / "raw.pt"
        for megabatch in range(1, rounds + 1):
            for kind, guarantees in (("raw", False), ("guarded", True)):
                checkpoint[f"{kind} save"].append(timed(raw_save, raw, megabatch,
                                                        guarantees)[0])
                checkpoint[f"{kind} load"].append(timed(raw_load, raw, guarantees)[0])
            checkpoint["ours save"].append(timed(ours_save, checkpointer, megabatch)[0])
            checkpoint["ours load"].append(timed(ours_load, checkpointer)[0])
    if rank == 0:
        import shutil

        shutil.rmtree(shared, ignore_errors=True)
        results.update(step=median(steps), sync={k: median(v) for k, v in sync.items()},
                       checkpoint={k: median(v) for k, v in checkpoint.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    loads = [load_average()]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(port, args.rounds, results), nprocs=WORLD, join=True)
        results = dict(results)
    loads.append(load_average())
    step, sync, ckpt = results["step"], results["sync"], results["checkpoint"]
    total = sum(sync.values())
    ours = ckpt["ours save"] + ckpt["ours load"]
    raw = ckpt["raw save"] + ckpt["raw load"]
    guarded = ckpt["guarded save"] + ckpt["guarded load"]
    result = (f"resnet50 on 2 ranks: step (batch 2x{BATCH_PER_RANK}) {step:.2f} s; mask sync "
              f"{total:.2f} s (all-reduce {sync['all-reduce']:.2f}, threshold "
              f"{sync['threshold']:.2f}, install+checksum {sync['install+checksum']:.2f}) = "
              f"{100 * total / (step * PAPER_STEPS):.3f}% of a paper megabatch "
              f"({PAPER_STEPS} steps), {100 * total / (step * SMALL_STEPS):.1f}% of a "
              f"{SMALL_STEPS}-step one; checkpoint save+load {ours:.2f} s "
              f"(save {ckpt['ours save']:.2f}, load {ckpt['ours load']:.2f}) vs raw "
              f"torch.save+torch.load+restore {raw:.2f} s = {ours / raw:.2f}x, vs the same "
              f"with fsync and sha256 at save and load {guarded:.2f} s = {ours / guarded:.2f}x; "
              f"load {min(loads):.2f}..{max(loads):.2f}")
    print(result)
    if not args.no_write:
        append_row("mask sync + checkpoint (resnet50, 2 ranks)", "bench/sync_and_checkpoint.py",
                   result)


if __name__ == "__main__":
    main()
