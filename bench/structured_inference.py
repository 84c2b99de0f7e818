"""Inference speed of what the two structures export: dense ResNet-20 vs its unstructured APP
export (density 0.366: zeros in dense tensors) vs a channel-pruned ResNet-20 at about 1/3 of
the dense FLOPs (fewer channels), on this CPU (or `--device cuda`: a GPU, fp32), side by
side in one process.

    python bench/structured_inference.py [--flops 0.333] [--rounds 5] [--threads N] [--no-write]
        [--device cpu|cuda] [--run RUN_DIR]  # RUN_DIR: also a trained channel run's export

Speed does not depend on the weights' values, only on the shapes (channel) or on nothing
(unstructured), so the models are pruned once at initialisation: unstructured by magnitude,
channel by the random criterion (one draw per channel group), which thins every layer about
evenly, as a trained SNIP run's masks roughly do; magnitude at initialisation would instead
follow the layers' init scales (Kaiming: smaller weights where fan-in is larger) and empty
whole stages. The channels are pruned with the FLOPs budget (prune.budget=flops) to --flops
of the convolutions' FLOPs. Every model is timed as exported and as deployed (BatchNorm
folded, channels-last). Models take turns round by round (app_dist/results/latency.py);
figures are medians. Appends a row to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app_dist.engine.folding import conv_batchnorm_pairs, folded_copy  # noqa: E402
from app_dist.models.registry import build_model  # noqa: E402
from app_dist.models.sparse_file import load_exported, sparse_model  # noqa: E402
from app_dist.pruning.channels import (  # noqa: E402
    build_channel_plan,
    channel_masks_from_scores,
    random_group_scores,
)
from app_dist.pruning.masks import MaskSet, attach_channel_masks, attach_masks  # noqa: E402
from app_dist.pruning.scores import magnitude_scores  # noqa: E402
from app_dist.pruning.threshold import masks_from_scores  # noqa: E402
from app_dist.results.channel_export import channel_model, load_channel_export  # noqa: E402
from app_dist.results.latency import compare_inference  # noqa: E402
from bench.common import append_row  # noqa: E402

ARCHITECTURE = {"name": "resnet20s", "num_classes": 10, "in_channels": 3, "stem": "cifar",
                "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


def fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20s", 10, mean=ARCHITECTURE["mean"], std=ARCHITECTURE["std"])


def unstructured_export(folder: Path, density: float) -> torch.nn.Module:
    model = fresh()
    masks = MaskSet(model, attach_masks(model))
    current = {name: mask.clone() for name, mask in masks.masks.items()}
    masks.update(masks_from_scores(magnitude_scores(masks.weights), current, density, "global"),
                 None)
    path = folder / "unstructured.pt"
    torch.save(sparse_model(model.state_dict(), masks.state_dict(), ARCHITECTURE, {}), path)
    return load_exported(path)


def channel_export(folder: Path, flops: float) -> tuple[torch.nn.Module, float, float]:
    """(small model, parameter density, FLOPs fraction) with whole channels pruned to the
    `flops` fraction of the convolutions' FLOPs (prune.budget=flops: the plan meets it as
    closely as whole channel groups allow)."""
    model = fresh()
    plan = build_channel_plan(model, torch.zeros(1, 3, 32, 32), budget="flops")
    attach_channel_masks(model, plan)
    masks = MaskSet(model, attach_masks(model), plan)
    ones = {name: torch.ones_like(mask) for name, mask in masks.masks.items()}
    chosen = channel_masks_from_scores(plan, random_group_scores(plan, seed=0), ones, flops)
    masks.update(chosen, None)
    path = folder / "channel.pt"
    torch.save(channel_model(model.state_dict(), masks.state_dict(), ARCHITECTURE, {}), path)
    return load_channel_export(path), masks.density(), plan.flops_fraction(chosen)


def deployed(model: torch.nn.Module) -> torch.nn.Module:
    """The model as one deploys it for CPU inference: BatchNorms folded into the convolutions
    (app_dist/engine/folding.py, as perf.fold_batchnorm evaluates) and channels-last weights."""
    return folded_copy(model, conv_batchnorm_pairs(model)).to(
        memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", type=float, default=1 / 3)
    parser.add_argument("--density", type=float, default=0.8**4.5,
                        help="the unstructured export's density")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the models run (cuda: timed with synchronisation)")
    parser.add_argument("--run", type=Path, default=None,
                        help="a finished prune.structure=channel run exported with app-dist "
                             "export: its model-channel.pt is timed as 'trained'")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA GPU is visible")

    with tempfile.TemporaryDirectory() as folder:
        small, density, fraction = channel_export(Path(folder), args.flops)
        models = {"dense": fresh().eval(),
                  "unstructured": unstructured_export(Path(folder), args.density),
                  "channel": small}
    trained = ""
    if args.run is not None:
        models["trained"] = load_channel_export(args.run / "model-channel.pt")
        last = json.loads((args.run / "metrics.jsonl").read_text().splitlines()[-1])
        trained = (f"; trained: {args.run.name} (density {last['density']:.3f} = "
                   f"{last['flops_fraction']:.3f} of the conv FLOPs)")
    parameters = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    # Every model twice: as exported, and folded + channels-last (what a deployment does to
    # dense and pruned models alike), all taking turns in the same rounds.
    models.update({f"{name} folded": deployed(model) for name, model in list(models.items())})
    models = {name: model.to(args.device) for name, model in models.items()}
    timings = compare_inference(models, (3, 32, 32), batches=(1, 256), rounds=args.rounds,
                                device=args.device)
    parts = []
    for batch, ms in timings.items():
        speed = {name: batch / (value / 1e3) for name, value in ms.items()}
        for form in ("", " folded"):
            dense = speed["dense" + form]
            others = ", ".join(
                f"{name} {speed[name + form]:.0f} ({speed[name + form] / dense:.2f}x)"
                for name in ("unstructured", "channel", "trained") if name + form in speed)
            parts.append(f"batch {batch}{form or ' as exported'}: dense {dense:.0f} img/s, "
                         f"{others}")
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{torch.get_num_threads()} threads")
    result = (f"resnet20s, {where}; unstructured export at density "
              f"{args.density:.3f}; channel at density {density:.3f} = {fraction:.3f} of the "
              f"conv FLOPs, {parameters['channel']:,} of {parameters['dense']:,} parameters"
              + trained + "; " + "; ".join(parts))
    print(result)
    if not args.no_write:
        append_row("inference: dense vs unstructured vs channel export "
                   f"({'GPU' if args.device == 'cuda' else 'CPU'})",
                   "bench/structured_inference.py", result)


if __name__ == "__main__":
    main()
