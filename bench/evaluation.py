"""Evaluation throughput against data.eval_batch_size (and perf.channels_last): the masked
model's forward under torch.inference_mode on decoded images in memory, as loop.evaluate
runs it per rank.

    python bench/evaluation.py [--model resnet20s] [--images 4096] [--rounds 3] [--no-write]

Rounds take turns over the batch sizes; medians. Picks the default of data.eval_batch_size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_row, load_average, median  # noqa: E402

BATCHES = (64, 128, 256, 512, 1024)


def model_for(name: str, channels_last: bool) -> torch.nn.Module:
    from app_dist.config import PerfSettings
    from app_dist.engine.acceleration import accelerate
    from app_dist.models import build_model
    from app_dist.pruning.masks import MaskSet, attach_masks

    torch.manual_seed(0)
    model = build_model(name, 10, mean=[0.5] * 3, std=[0.25] * 3)
    MaskSet(model, attach_masks(model))
    accelerate(model, PerfSettings(channels_last=channels_last), torch.device("cpu"))
    return model.eval()


@torch.inference_mode()
def images_per_second(model: torch.nn.Module, images: torch.Tensor, batch: int) -> float:
    model(images[:batch])  # warm-up: this shape's kernels and buffers
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        model(images[start : start + batch]).argmax(1)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20s")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    loads = [load_average()]
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    models = {"contiguous": model_for(args.model, False),
              "channels_last": model_for(args.model, True)}
    rates = {(layout, batch): [] for layout in models for batch in BATCHES}
    for _ in range(args.rounds):
        for (layout, batch), values in rates.items():
            values.append(images_per_second(models[layout], images, batch))
        loads.append(load_average())
    table = {key: median(values) for key, values in rates.items()}
    for layout in models:
        print(f"{layout:>14}: " + ", ".join(f"b{batch} {table[(layout, batch)]:.0f}"
                                            for batch in BATCHES) + " img/s")
    best = max(table, key=table.get)
    result = (f"{args.model} eval img/s by batch, contiguous: "
              + ", ".join(f"{b}: {table[('contiguous', b)]:.0f}" for b in BATCHES)
              + "; channels_last: "
              + ", ".join(f"{b}: {table[('channels_last', b)]:.0f}" for b in BATCHES)
              + f"; best {best[0]} b{best[1]}; {torch.get_num_threads()} threads; "
              f"load {min(loads):.2f}..{max(loads):.2f}")
    print(result)
    if not args.no_write:
        append_row("evaluation batch size", "bench/evaluation.py", result)


if __name__ == "__main__":
    main()
