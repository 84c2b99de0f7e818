"""Inference speed of a 2:4 ViT export against the dense ViT: on this CPU (fp32; the export is
the dense network with zeros, so about 1.0x is expected and the row says so) and, where a
GPU is present, in float16 with the Linear weights as torch semi-structured sparse tensors
(app_dist/results/n_m_export.py): each Linear layer alone at a large batch (the issue's
target: >= 1.3x) and the whole model end to end.

    python bench/n_m_inference.py [--model vit_cifar] [--batch 1024] [--rounds 5]
                                  [--threads N] [--no-write] [--json FILE]

Speed does not depend on the weights' values, only on the pattern, so the model is pruned
once at initialisation (magnitude, 4:4 -> 3:4 -> 2:4, nested as in a run). Models take turns
round by round (app_dist/results/latency.py); figures are medians. Appends rows to
docs/BENCHMARKS.md (CPU and, when measured, GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app_dist.models.registry import build_model  # noqa: E402
from app_dist.models.sparse_file import load_exported, sparse_model  # noqa: E402
from app_dist.models.vit import VIT_SHAPES  # noqa: E402
from app_dist.pruning.masks import MaskSet, attach_masks  # noqa: E402
from app_dist.pruning.n_m import n_m_masks_from_scores  # noqa: E402
from app_dist.pruning.scores import magnitude_scores  # noqa: E402
from app_dist.pruning.structures import NMPattern  # noqa: E402
from app_dist.results.latency import compare_inference  # noqa: E402
from app_dist.results.n_m_export import load_semi_structured, n_m_source  # noqa: E402
from bench.common import append_row, machine  # noqa: E402

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def export_2_4(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(name, 10, mean=MEAN, std=STD)
    masks = MaskSet(model, attach_masks(model, include_linear=True), n_m=NMPattern(2, 4))
    for n in (3, 2):
        current = {k: m.clone() for k, m in masks.masks.items()}
        masks.update(n_m_masks_from_scores(magnitude_scores(masks.weights), current, n, 4), None)
    architecture = {"name": name, "num_classes": 10, "in_channels": 3, "stem": "cifar",
                    "mean": MEAN, "std": STD}
    exported = sparse_model(model.state_dict(), masks.state_dict(), architecture, {})
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    exported["source"].update(n_m_source(masks.state_dict(), NMPattern(2, 4), linears))
    path = folder / "vit-2-4.pt"
    torch.save(exported, path)
    return path


def _linear_ms(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               repeats: int = 50) -> float:
    F.linear(x, weight, bias)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        F.linear(x, weight, bias)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - started) / repeats


@torch.inference_mode()
def gpu_linear_layers(path: Path, rows: int, rounds: int) -> dict[str, dict[str, float]]:
    """Each semi-structured Linear of the export alone on `rows` tokens (fp16): {weight name:
    {dense, sparse} ms}, medians over rounds, the two taking turns."""
    from torch.sparse import to_sparse_semi_structured

    names = torch.load(path, weights_only=True)["source"]["semi_structured"]
    model = load_exported(path).to("cuda", torch.float16)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        layer = model.get_submodule(name.removesuffix(".weight"))
        dense_weight = layer.weight.detach()
        sparse_weight = to_sparse_semi_structured(dense_weight)
        x = torch.rand(rows, layer.in_features, device="cuda", dtype=torch.float16)
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        for _ in range(rounds):
            times["dense"].append(_linear_ms(x, dense_weight, layer.bias))
            times["sparse"].append(_linear_ms(x, sparse_weight, layer.bias))
        out[name] = {k: statistics.median(v) for k, v in times.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_cifar", choices=sorted(VIT_SHAPES))
    parser.add_argument("--batch", type=int, default=1024, help="the GPU's large batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = VIT_SHAPES[args.model].image_size
    figures: dict[str, object] = {"machine": machine(), "model": args.model}
    with tempfile.TemporaryDirectory() as folder:
        path = export_2_4(args.model, Path(folder))
        converted = torch.load(path, weights_only=True)["source"]["semi_structured"]
        torch.manual_seed(0)
        models = {"dense": build_model(args.model, 10, mean=MEAN, std=STD),
                  "exported": load_exported(path)}
        cpu = compare_inference(models, (3, size, size), batches=(1, 256), rounds=args.rounds)
        figures["cpu_ms"] = cpu
        parts = [f"batch {b}: dense {b / ms['dense'] * 1e3:.0f} img/s, 2:4 export "
                 f"{b / ms['exported'] * 1e3:.0f} ({ms['dense'] / ms['exported']:.2f}x)"
                 for b, ms in cpu.items()]
        cpu_row = (f"{args.model}, {torch.get_num_threads()} threads, fp32; 2:4 export "
                   f"(density 0.5 in {len(converted)} Linear layers; the CPU runs it dense, "
                   "so no speed-up is expected); " + "; ".join(parts))
        print(cpu_row)
        if not args.no_write:
            append_row("inference: dense vs 2:4 ViT export (CPU)",
                       "bench/n_m_inference.py", cpu_row)
        if torch.cuda.is_available():
            figures["gpu"] = torch.cuda.get_device_name()
            rows = args.batch * ((size // VIT_SHAPES[args.model].patch_size) ** 2 + 1)
            layers = gpu_linear_layers(path, rows, args.rounds)
            figures["gpu_linear_ms"] = layers
            dense_sum = sum(v["dense"] for v in layers.values())
            sparse_sum = sum(v["sparse"] for v in layers.values())
            torch.manual_seed(0)
            gpu_models = {"dense": build_model(args.model, 10, mean=MEAN, std=STD).to(
                "cuda", torch.float16), "exported": load_semi_structured(path)}
            end_to_end = compare_inference(gpu_models, (3, size, size),
                                           batches=(1, args.batch), rounds=args.rounds,
                                           device="cuda", dtype=torch.float16)
            figures["gpu_model_ms"] = end_to_end
            per_shape = ", ".join(
                f"{name.split('.')[-2]}@{name.split('.')[2]} {v['dense'] / v['sparse']:.2f}x"
                for name, v in layers.items())
            model_parts = [f"batch {b}: {ms['dense'] / ms['exported']:.2f}x"
                           for b, ms in end_to_end.items()]
            gpu_row = (f"{args.model} on {figures['gpu']}, fp16, {rows} tokens per Linear; "
                       f"the {len(layers)} semi-structured Linear layers together "
                       f"{dense_sum:.3f} ms dense vs {sparse_sum:.3f} ms 2:4 "
                       f"({dense_sum / sparse_sum:.2f}x; per layer: {per_shape}); whole model "
                       + ", ".join(model_parts))
            print(gpu_row)
            if not args.no_write:
                append_row("inference: dense vs 2:4 ViT export (GPU, semi-structured)",
                           "bench/n_m_inference.py", gpu_row)
        else:
            print("no GPU here: the semi-structured (GPU) part was not measured")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
