"""Masking overhead: one training step of the masked (APP) model against the same model dense.

    python bench/masking_overhead.py [--model resnet20s] [--batch 64] [--steps 30] [--rounds 5]

Both models take turns in the same process (dense round, masked round, ...), so machine noise
hits both alike; the figure is the ratio of the medians. Appends a row to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app_dist.models.registry import build_model  # noqa: E402
from app_dist.pruning.masks import MaskSet, attach_masks  # noqa: E402
from app_dist.pruning.threshold import masks_from_scores  # noqa: E402


def make(model_name: str, masked: bool, density: float):
    torch.manual_seed(0)
    model = build_model(model_name, 10, mean=[0.5] * 3, std=[0.25] * 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    masks = None
    if masked:
        masks = MaskSet(model, attach_masks(model))
        scores = {name: w.detach().abs() for name, w in masks.weights.items()}
        current = {name: m.clone() for name, m in masks.masks.items()}
        masks.update(masks_from_scores(scores, current, density, "global"), optimizer)
    return model, optimizer, masks


def step_seconds(model, optimizer, masks, images, labels, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if masks is not None:
            masks.apply_to_weights()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20s")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.8**4.5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.batch,))
    runs = {"dense": make(args.model, False, 1.0), "masked": make(args.model, True, args.density)}
    for model, optimizer, masks in runs.values():  # warm-up
        step_seconds(model, optimizer, masks, images, labels, 5)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, optimizer, masks) in runs.items():
            times[name].append(step_seconds(model, optimizer, masks, images, labels, args.steps))
    dense, masked = statistics.median(times["dense"]), statistics.median(times["masked"])
    ratio = masked / dense
    print(f"{args.model} batch {args.batch}, {torch.get_num_threads()} threads: dense step "
          f"{dense * 1e3:.1f} ms, masked step (density {args.density:.3f}) {masked * 1e3:.1f} ms, "
          f"ratio {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%)")
    if not args.no_write:
        command = "python bench/masking_overhead.py " + " ".join(sys.argv[1:])
        row = (f"| {date.today()} | masking overhead | `{command.strip()}` | {platform.node()} "
               f"({torch.get_num_threads()} threads) | {args.model} b{args.batch}: dense "
               f"{dense * 1e3:.1f} ms/step, masked {masked * 1e3:.1f} ms/step, ratio "
               f"{ratio:.3f} |\n")
        path = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
        if not path.exists():
            path.write_text("# Benchmarks\n\nEvery row: the command that produced it, the machine, "
                            "figures measured side by side in one run (medians of rounds).\n\n"
                            "| date | what | command | machine | result |\n|---|---|---|---|---|\n")
        with path.open("a") as handle:
            handle.write(row)


if __name__ == "__main__":
    main()
