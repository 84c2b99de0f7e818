"""Evaluation throughput against data.eval_batch_size (and perf.channels_last): the masked
model's forward under torch.inference_mode on decoded images in memory, as loop.evaluate
runs it per rank; and training against evaluation img/s as a run computes them.

    python bench/evaluation.py [--model resnet20s] [--images 4096] [--rounds 3] [--no-write]
    python bench/evaluation.py --train-vs-eval [--rounds 3] [--no-write]

Rounds take turns over the batch sizes; medians. Picks the default of data.eval_batch_size.
--train-vs-eval builds the engine and the Evaluator from configs/cifar10.yaml (one rank on
this CPU, batch 64 for both, as auto gives) with the switches as auto resolves them here
(channels_last, fold_batchnorm) and with every switch off, and times SGD steps against
evaluation passes over the same decoded images in memory (no data loading either way).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, append_row, load_average, median  # noqa: E402

BATCHES = (64, 128, 256, 512, 1024)
# Model-side switches only: the data switches do not touch images already in memory.
ALL_OFF = ["perf.channels_last=false", "perf.fold_batchnorm=false", "perf.compile=false"]


def model_for(name: str, channels_last: bool) -> torch.nn.Module:
    from app_dist.config import plain_perf
    from app_dist.engine.acceleration import accelerate
    from app_dist.models.registry import build_model
    from app_dist.pruning.masks import MaskSet, attach_masks

    torch.manual_seed(0)
    model = build_model(name, 10, mean=[0.5] * 3, std=[0.25] * 3)
    MaskSet(model, attach_masks(model))
    accelerate(model, plain_perf(channels_last=channels_last), torch.device("cpu"))
    return model.eval()


@torch.inference_mode()
def images_per_second(model: torch.nn.Module, images: torch.Tensor, batch: int) -> float:
    model(images[:batch])  # warm-up: this shape's kernels and buffers
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        model(images[start : start + batch]).argmax(1)
    return len(images) / (time.perf_counter() - started)


def trainer_parts(overrides: list[str]) -> tuple:
    """(engine, evaluator, training batch, evaluation batch) for configs/cifar10.yaml on
    this CPU with `overrides`, perf resolved as a run resolves it."""
    import dataclasses

    from app_dist.config import load_config
    from app_dist.engine import build_engine
    from app_dist.engine.acceleration import describe_perf, resolve_perf
    from app_dist.foundations.distributed import Platform
    from app_dist.models.registry import build_model
    from app_dist.pruning.masks import MaskSet, attach_masks
    from app_dist.training.evaluation import Evaluator

    config = load_config(REPO / "configs/cifar10.yaml", ["run.device=cpu", *overrides])
    platform = Platform(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    resolved = dataclasses.replace(config, perf=resolve_perf(config.perf, platform.device,
                                                             config.engine.kind))
    print(f"{' '.join(overrides) or 'defaults'}: {describe_perf(config.perf, resolved.perf)}")
    torch.manual_seed(0)
    model = build_model(config.model.name, 10, mean=config.model.mean, std=config.model.std)
    masks = MaskSet(model, attach_masks(model))
    engine = build_engine(resolved, model, masks, platform)
    batch = config.train.batch_size  # one rank; data.eval_batch_size auto: the same on CPUs
    return engine, Evaluator(resolved, platform), batch, config.data.eval_batch_size or batch


class _Pass(list):
    skipped = 0  # what Evaluator.evaluate reads after a pass


def train_and_eval_rates(parts: tuple, images: torch.Tensor, labels: torch.Tensor
                         ) -> tuple[float, float]:
    """(training img/s, evaluation img/s) of one engine and evaluator over `images`."""
    engine, evaluator, batch, eval_batch = parts
    engine.module.train()
    for _ in range(3):  # warm-up: allocator, thread pool
        engine.train_step(images[:batch], labels[:batch])
    steps = len(images) // batch
    started = time.perf_counter()
    for step in range(steps):
        engine.train_step(images[step * batch:(step + 1) * batch],
                          labels[step * batch:(step + 1) * batch])
    train_rate = steps * batch / (time.perf_counter() - started)
    passes = _Pass((images[i:i + eval_batch], labels[i:i + eval_batch])
                   for i in range(0, len(images), eval_batch))
    evaluator.evaluate(engine.module, lambda: _Pass(passes[:2]))  # warm-up, the fold's tracing
    started = time.perf_counter()
    evaluator.evaluate(engine.module, lambda: passes)
    return train_rate, len(images) / (time.perf_counter() - started)


def train_vs_eval(args: argparse.Namespace) -> None:
    loads = [load_average()]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, 10, (args.images,), generator=generator)
    variants = {"defaults": trainer_parts([]), "all off": trainer_parts(ALL_OFF)}
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, parts in variants.items():
            rates[name].append(train_and_eval_rates(parts, images, labels))
        loads.append(load_average())
    cells = []
    for name, values in rates.items():
        train = median([v[0] for v in values])
        evaluation = median([v[1] for v in values])
        cells.append(f"{name}: train {train:.0f} img/s, eval {evaluation:.0f} img/s "
                     f"({evaluation / train:.2f}x train)")
    result = ("resnet20s (configs/cifar10.yaml, batch 64 both) " + "; ".join(cells)
              + f"; medians of {args.rounds}; {torch.get_num_threads()} threads; "
              f"load {min(loads):.2f}..{max(loads):.2f}")
    print(result)
    if not args.no_write:
        append_row("training vs evaluation", "bench/evaluation.py", result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20s")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-vs-eval", action="store_true",
                        help="training against evaluation img/s, defaults and all off")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.train_vs_eval:
        train_vs_eval(args)
        return
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
