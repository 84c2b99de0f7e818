"""`app-dist export RUN_DIR [--out FILE] [--onnx FILE]`: the run's final model (its last complete
checkpoint) with its masks folded in, in the compact sparse file of
app_dist/models/sparse_file.py, and `load_exported(FILE)` to get an ordinary dense nn.Module
back. A prune.structure=channel run exports the physically smaller dense network instead
(app_dist/results/channel_export.py); an N:M run (prune.structure=2:4) the sparse file with
its N:M layers marked, whose 2:4 Linear weights load as semi-structured sparse tensors on a
GPU (app_dist/results/n_m_export.py). A run also publishes the sparse file after every
megabatch (its anytime model, app_dist/training/anytime.py)."""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app_dist.engine.deepspeed_engine import saved_module_state
from app_dist.foundations.commands import ArgumentParser, command
from app_dist.foundations.errors import CheckpointError
from app_dist.foundations.files import atomic_write_json
from app_dist.foundations.run_layout import CheckpointFiles, RunLayout
from app_dist.foundations.torch_files import atomic_torch_save, load_torch_file
from app_dist.models.registry import build_model, classifier_of
from app_dist.models.sparse_file import (
    MASK_SUFFIX,
    ExportError,
    dense_state,
    load_exported,
    sparse_model,
)
from app_dist.models.vit import VIT_SHAPES
from app_dist.pruning.structures import NMPattern, parse_structure
from app_dist.results.channel_export import (
    TRACE_SIZE,
    build_architecture,
    channel_model,
    export_onnx,
    load_channel_export,
)
from app_dist.results.latency import compare_inference
from app_dist.results.n_m_export import load_semi_structured, n_m_source
from app_dist.training.checkpoint import Checkpoint, examine

DEFAULT_NAME = "model-sparse.pt"
CHANNEL_NAME = "model-channel.pt"  # prune.structure=channel: the physically smaller model


@dataclass
class Exported:
    path: Path
    sparse_bytes: int  # the file written
    dense_bytes: int  # torch.save of the same model's plain state dict, for comparison
    density: float
    structure: str = "unstructured"
    parameters: int = 0  # of the exported model (channel: the smaller network)
    dense_parameters: int = 0
    onnx: Path | None = None


def last_complete_checkpoint(run_dir: Path) -> Checkpoint:
    """The newest megabatch-NNNN checkpoint that verifies (pre-emption checkpoints hold a
    megabatch in the middle of training: not a final model). ExportError if none."""
    problems = []
    for folder in reversed(RunLayout(run_dir).checkpoint_folders()):
        if folder.partial:
            continue
        found = examine(folder)
        if isinstance(found, Checkpoint):
            return found
        problems.append(f"{folder.path.name}: {found.reason}")
    detail = f" ({'; '.join(problems[:2])})" if problems else ""
    raise ExportError(f"{run_dir} holds no complete megabatch checkpoint{detail}; pass the "
                      "run.dir of a run that finished at least one megabatch")


def _model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The module state dict the engine saved: engine.pt's "model" (DDP engine), or the
    module DeepSpeed saved (engine.kind=deepspeed)."""
    engine_file = folder / CheckpointFiles.ENGINE
    if engine_file.is_file():
        state = load_torch_file(engine_file)
        if "model" not in state:
            raise ExportError(f"{engine_file} holds no 'model' state dict")
        return state["model"]
    module_state = saved_module_state(folder)
    if module_state is not None:
        return module_state
    raise ExportError(f"{folder} has neither {CheckpointFiles.ENGINE} (engine.kind=ddp) nor "
                      f"a DeepSpeed model-states file (engine.kind=deepspeed)")


def _architecture(settings: dict[str, Any], weights: dict[str, torch.Tensor],
                  where: Path) -> dict[str, Any]:
    """What build_model needs, from the run's settings and the shapes of its weights: the
    input channels of the first convolution and the outputs of the classifier."""
    try:
        name, stem = settings["model.name"], settings["model.stem"]
        mean, std = list(settings["model.mean"]), list(settings["model.std"])
    except KeyError as missing:
        raise ExportError(f"{where / CheckpointFiles.STATE}: settings lack {missing}") from None
    first_conv = next((w for w in weights.values() if w.dim() == 4), None)
    if first_conv is None:
        raise ExportError(f"{where}: the model has no convolution")
    in_channels = int(first_conv.shape[1])
    probe = build_model(name, 2, in_channels=in_channels, stem=stem, mean=mean, std=std)
    classifier = classifier_of(probe)
    classifier_name = next(n for n, m in probe.named_modules() if m is classifier)
    num_classes = int(weights[f"{classifier_name}.weight"].shape[0])
    return {"name": name, "num_classes": num_classes, "in_channels": in_channels,
            "stem": stem, "mean": mean, "std": std}


def _usual_input_shape(architecture: dict[str, Any]) -> list[int]:
    """(C, H, W) for a checkpoint that does not record its input shape: a ViT's fixed image
    size, 224 for the ImageNet stem, else 32."""
    name, stem = architecture["name"], architecture["stem"]
    size = VIT_SHAPES[name].image_size if name in VIT_SHAPES else 224 if stem == "imagenet" \
        else 32
    return [architecture["in_channels"], size, size]


def _saved_size(value: Any) -> int:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getbuffer().nbytes


def export_run(run_dir: str | Path, out: str | Path | None = None,
               onnx: str | Path | None = None, latency: bool = True) -> Exported:
    """Write RUN_DIR's final model (last complete checkpoint) in sparse form to `out`
    (default RUN_DIR/model-sparse.pt); a prune.structure=channel run's as the physically
    smaller dense model (default RUN_DIR/model-channel.pt), and as ONNX to `onnx` if given,
    with RUN_DIR/export-summary.json (sizes and, with `latency`, measured speed).
    Raises ExportError / CheckpointError on bad input."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory; pass the run.dir of a run")
    checkpoint = last_complete_checkpoint(run_dir)
    folder = checkpoint.path
    state = checkpoint.load_state()
    if "masks" not in state or "settings" not in state:
        raise CheckpointError(f"{folder / CheckpointFiles.STATE} lacks masks or settings")
    model_state = _model_state(folder)
    architecture = _architecture(state["settings"], model_state, folder)
    # The shape the model was trained on (checkpoints before this key: the stem's usual size).
    architecture["input_shape"] = state.get("input_shape") or _usual_input_shape(architecture)
    source = {"run_dir": str(run_dir), "checkpoint": folder.name,
              "megabatch": checkpoint.megabatch}
    structure = str(state["settings"].get("prune.structure", "unstructured"))
    if structure == "channel":
        return _export_channel(run_dir, out, model_state, state["masks"], architecture, source,
                               onnx, latency)
    if onnx is not None:
        raise ExportError("--onnx is for prune.structure=channel runs (an unstructured model "
                          "exports as a dense network: export it from load_exported)")
    pattern = parse_structure(structure)
    exported = sparse_model(model_state, state["masks"], architecture, source)
    if pattern is not None:
        exported["source"].update(n_m_source(state["masks"], pattern,
                                             _linear_weights(architecture)))
    path = Path(out) if out is not None else run_dir / DEFAULT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(exported, path)
    plain = dense_state(exported["dense"], exported["sparse"])
    result = Exported(path, path.stat().st_size, _saved_size(plain),
                      exported["source"]["density"], structure=structure)
    if pattern is not None:
        _n_m_summary(run_dir, result, exported, architecture, pattern, latency)
    return result


def _linear_weights(architecture: dict[str, Any]) -> set[str]:
    model = build_architecture(architecture)
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear)}


def _n_m_summary(run_dir: Path, result: Exported, exported: dict[str, Any],
                 architecture: dict[str, Any], pattern: NMPattern, latency: bool) -> None:
    """export-summary.json of an N:M export: stored values against all parameters, which
    layers are valid N:M, which Linear weights go semi-structured on a GPU, and (latency)
    the CPU time per batch of the exported model against the dense one (the same dense
    computation on a CPU) and, where this machine has a GPU, the float16 time of the dense
    model against the semi-structured one."""
    source = exported["source"]
    stored = (sum(v.numel() for v in exported["dense"].values())
              + sum(e["values"].numel() for e in exported["sparse"].values()))
    dense_parameters = sum(v.numel() for v in exported["dense"].values()) + sum(
        int(torch.tensor(e["shape"]).prod()) for e in exported["sparse"].values())
    result.parameters, result.dense_parameters = stored, dense_parameters
    layers = source["n_m_layers"]
    info = {"parameters": stored, "dense_parameters": dense_parameters,
            "density": source["density"]}
    extra = {"structure": str(pattern), "semi_structured": source["semi_structured"],
             "n_m_valid_layers": sorted(n for n, v in layers.items() if v["n_m_valid"]),
             "dense_layers": sorted(n for n, v in layers.items() if not v["grouped"])}
    gpu = latency and torch.cuda.is_available() and bool(source["semi_structured"])
    write_export_summary(run_dir, result.path, result.dense_bytes, info, architecture, latency,
                         load=load_exported, extra=extra, gpu=gpu)


def _export_channel(run_dir: Path, out: str | Path | None, model_state: dict[str, torch.Tensor],
                    masks: dict[str, torch.Tensor], architecture: dict[str, Any],
                    source: dict[str, Any], onnx: str | Path | None,
                    latency: bool) -> Exported:
    exported = channel_model(model_state, masks, architecture, source)
    path = Path(out) if out is not None else run_dir / CHANNEL_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(exported, path)
    onnx_path = None
    if onnx is not None:
        onnx_path = export_onnx(load_channel_export(path), onnx,
                                (architecture["in_channels"], TRACE_SIZE, TRACE_SIZE))
    plain = {k: v for k, v in model_state.items() if not k.endswith(MASK_SUFFIX)}
    info = exported["source"]
    write_export_summary(run_dir, path, _saved_size(plain), info, architecture, latency)
    return Exported(path, path.stat().st_size, _saved_size(plain), info["density"],
                    structure="channel", parameters=info["parameters"],
                    dense_parameters=info["dense_parameters"], onnx=onnx_path)


def write_export_summary(run_dir: Path, path: Path, dense_bytes: int, info: dict[str, Any],
                         architecture: dict[str, Any], latency: bool,
                         load: Callable[[Path], nn.Module] = load_channel_export,
                         extra: dict[str, Any] | None = None, gpu: bool = False) -> Path:
    """RUN_DIR/export-summary.json, which `app-dist report` shows: the exported model's
    parameters and file size against the dense model's, and (latency) the milliseconds per
    batch of both, measured here on the CPU at batch 1 and a large batch; with `gpu` (an N:M
    export on a machine with a GPU) also in float16 on the GPU, the exported model with its
    semi-structured weights (`gpu_latency_ms`). `load` reads the exported file, `extra` adds
    keys."""
    summary: dict[str, Any] = {**(extra or {}),
        "file": str(path), "file_bytes": path.stat().st_size, "dense_file_bytes": dense_bytes,
        "parameters": info["parameters"], "dense_parameters": info["dense_parameters"],
        "density": info["density"], "measured_on": f"{platform.node()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__.split('+')[0]}"}
    if latency:
        large = 32 if architecture["stem"] == "imagenet" else 256
        models = {"dense": build_architecture(architecture), "exported": load(path)}
        shape = tuple(architecture["input_shape"])
        timings = compare_inference(models, shape, batches=(1, large), rounds=3, budget_s=0.2)
        summary["input"] = list(shape)
        summary["latency_ms"] = {str(batch): ms for batch, ms in timings.items()}
        if gpu:
            summary["gpu_latency_ms"] = _gpu_latency(path, architecture, shape)
            summary["gpu"] = torch.cuda.get_device_name()
    target = RunLayout(run_dir).export_summary
    atomic_write_json(target, summary)
    return target


def _gpu_latency(path: Path, architecture: dict[str, Any], shape: tuple[int, ...]
                 ) -> dict[str, dict[str, float]]:
    """float16 on the GPU: the dense model against the export with its semi-structured
    Linear weights, at batch 1 and 1024."""
    dense = build_architecture(architecture).to("cuda", torch.float16)
    models = {"dense": dense, "exported": load_semi_structured(path)}
    timings = compare_inference(models, shape, batches=(1, 1024), rounds=5, budget_s=0.2,
                                device="cuda", dtype=torch.float16)
    return {str(batch): ms for batch, ms in timings.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="app-dist export",
                            description="Write a run's final model in compact sparse form.")
    parser.add_argument("run_dir", help="the run.dir of a run (holds checkpoints/)")
    parser.add_argument("--out", default=None,
                        help=f"output file (default RUN_DIR/{DEFAULT_NAME}, or "
                             f"RUN_DIR/{CHANNEL_NAME} for a prune.structure=channel run)")
    parser.add_argument("--no-latency", action="store_true",
                        help="channel and N:M runs: skip measuring inference speed against "
                             f"the dense model ({RunLayout(Path('RUN_DIR')).export_summary} "
                             "then holds sizes only)")
    parser.add_argument("--onnx", default=None,
                        help="prune.structure=channel runs: also write the smaller model "
                             "as ONNX to this file (needs the onnx package)")
    return parser


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    exported = export_run(args.run_dir, args.out, args.onnx, latency=not args.no_latency)
    if exported.structure == "channel":
        print(f"wrote {exported.path}: {exported.parameters:,} parameters "
              f"({exported.parameters / exported.dense_parameters:.1%} of "
              f"{exported.dense_parameters:,}), {exported.sparse_bytes:,} bytes, channels "
              f"removed at density {exported.density:.3f}"
              + (f"; ONNX {exported.onnx}" if exported.onnx else ""))
        return 0
    if parse_structure(exported.structure) is not None:
        summary = json.loads(RunLayout(Path(args.run_dir)).export_summary.read_text())
        print(f"wrote {exported.path}: {exported.structure} at density {exported.density:.3f}"
              f", {exported.sparse_bytes:,} bytes; {len(summary['semi_structured'])} Linear "
              "weight(s) load as semi-structured sparse on a GPU (n_m_export."
              "load_semi_structured)")
        return 0
    print(f"wrote {exported.path}: {exported.sparse_bytes:,} bytes at density "
          f"{exported.density:.3f} ({exported.sparse_bytes / exported.dense_bytes:.1%} of the "
          f"{exported.dense_bytes:,} bytes of the dense state dict)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
