"""`app-dist export RUN_DIR [--out FILE]`: the final model with its masks folded in, stored
sparse, and `load_exported(FILE)` to get an ordinary dense nn.Module back.

File format (a torch.save dict, loadable with weights_only=True, so no pickled code runs):
    format        "app-dist-sparse/1"
    architecture  {name, num_classes, in_channels, stem, mean, std}: enough for build_model
    dense         {name: tensor} every entry of the model's state dict that is not pruned
                  (BatchNorm, biases, classifier, unpruned layers), stored as is
    sparse        {name: {"shape": [...], "bits": uint8, "values": tensor}} per pruned
                  weight: its mask packed 8 per byte (numpy.packbits order) and the kept
                  values in flat (row-major) order. A weight with (almost) nothing pruned
                  is smaller plain and goes to `dense`, folded.
    source        {run_dir, checkpoint, megabatch, density, kept, prunable}
A pruned weight of N entries at density d takes N/8 + 4dN bytes instead of 4N, so the file
shrinks with the density: at d = 0.366 the convolution weights need 0.366 + 1/32 = 40% of their
dense bytes, and a whole ResNet-20 file measured 43% (docs/RESULTS.md).
Loading rebuilds the network with plain Conv2d / Linear layers (no mask buffers) and writes
the weights back exactly, so its outputs equal the masked model's bit for bit.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app_dist.foundations.commands import ArgumentParser, command
from app_dist.foundations.errors import AppDistError, CheckpointError
from app_dist.foundations.files import atomic_torch_save, load_torch_file
from app_dist.foundations.run_layout import CheckpointFiles, RunLayout
from app_dist.models import build_model, classifier_of
from app_dist.training.checkpoint import Checkpoint, examine

FORMAT = "app-dist-sparse/1"
DEFAULT_NAME = "model-sparse.pt"
MASK_SUFFIX = "weight_mask"


class ExportError(AppDistError):
    """A run directory or an exported file cannot be used."""


@dataclass
class Exported:
    path: Path
    sparse_bytes: int  # the file written
    dense_bytes: int  # torch.save of the same model's plain state dict, for comparison
    density: float


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
    """The module state dict the engine saved: engine.pt's "model" (DDP engine)."""
    engine_file = folder / CheckpointFiles.ENGINE
    if not engine_file.is_file():
        raise ExportError(f"{folder} has no {CheckpointFiles.ENGINE}: export reads checkpoints "
                          "of the DDP engine (engine.kind=ddp)")
    state = load_torch_file(engine_file)
    if "model" not in state:
        raise ExportError(f"{engine_file} holds no 'model' state dict")
    return state["model"]


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


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bits, 8 per byte, flat row-major order."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(bool)))


def unpack_mask(bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    count = int(np.prod(shape)) if shape else 1
    unpacked = np.unpackbits(bits.numpy(), count=count).astype(bool)
    return torch.from_numpy(unpacked).view(*shape)


def _sparse_is_smaller(kept: torch.Tensor, element_size: int) -> bool:
    """Bits + kept values beat the plain tensor below a density of 1 - 1/(8 * element_size)
    (0.969 for float32): a dense run's weights stay plain."""
    return kept.numel() / 8 + int(kept.sum()) * element_size < kept.numel() * element_size


def sparse_payload(model_state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(dense entries, sparse entries) of a masked model's state dict: mask buffers dropped,
    every masked weight folded (weight * mask) and stored as bits + kept values, or plain
    where that is smaller (nothing or almost nothing pruned)."""
    dense: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    for name, value in model_state.items():
        if name.endswith(MASK_SUFFIX):
            continue
        kept = masks[name].bool() if name in masks else None
        if kept is not None and _sparse_is_smaller(kept, value.element_size()):
            sparse[name] = {"shape": list(value.shape), "bits": pack_mask(kept),
                            "values": value[kept].clone()}
        else:
            dense[name] = value * kept.to(value.dtype) if kept is not None else value.clone()
    missing = set(masks) - set(sparse) - set(dense)
    if missing:
        raise ExportError(f"masks name weights the model lacks: {sorted(missing)[:3]}")
    return dense, sparse


def dense_state(dense: dict[str, torch.Tensor], sparse: dict[str, dict[str, Any]]
                ) -> dict[str, torch.Tensor]:
    """The plain state dict back: zeros where a weight was pruned, the kept values elsewhere."""
    state = dict(dense)
    for name, entry in sparse.items():
        kept = unpack_mask(entry["bits"], entry["shape"])
        values = entry["values"]
        weight = torch.zeros(entry["shape"], dtype=values.dtype)
        weight[kept] = values
        state[name] = weight
    return state


def _saved_size(value: Any) -> int:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getbuffer().nbytes


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Exported:
    """Write RUN_DIR's final model (last complete checkpoint) in sparse form to `out`
    (default RUN_DIR/model-sparse.pt). Raises ExportError / CheckpointError on bad input."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory; pass the run.dir of a run")
    checkpoint = last_complete_checkpoint(run_dir)
    folder = checkpoint.path
    state = checkpoint.load_state()
    if "masks" not in state or "settings" not in state:
        raise CheckpointError(f"{folder / CheckpointFiles.STATE} lacks masks or settings")
    masks = state["masks"]
    model_state = _model_state(folder)
    dense, sparse = sparse_payload(model_state, masks)
    plain = dense_state(dense, sparse)
    kept = sum(int(m.sum()) for m in masks.values())
    prunable = sum(m.numel() for m in masks.values())
    exported = {
        "format": FORMAT,
        "architecture": _architecture(state["settings"], plain, folder),
        "dense": dense,
        "sparse": sparse,
        "source": {"run_dir": str(run_dir), "checkpoint": folder.name,
                   "megabatch": checkpoint.megabatch, "density": kept / prunable,
                   "kept": kept, "prunable": prunable},
    }
    path = Path(out) if out is not None else run_dir / DEFAULT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(exported, path)
    return Exported(path, path.stat().st_size, _saved_size(plain), kept / prunable)


def load_exported(path: str | Path) -> nn.Module:
    """The exported model as an ordinary dense nn.Module (plain Conv2d / Linear, no mask
    buffers), in eval mode, with the exact weights of the run's final masked model."""
    path = Path(path)
    try:
        exported = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ExportError(f"cannot load {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(exported, dict) or exported.get("format") != FORMAT:
        raise ExportError(f"{path} is not an app-dist sparse export ({FORMAT})")
    arch = exported["architecture"]
    model = build_model(arch["name"], arch["num_classes"], in_channels=arch["in_channels"],
                        stem=arch["stem"], mean=arch["mean"], std=arch["std"])
    model.load_state_dict(dense_state(exported["dense"], exported["sparse"]), strict=True)
    return model.eval()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="app-dist export",
                            description="Write a run's final model in compact sparse form.")
    parser.add_argument("run_dir", help="the run.dir of a run (holds checkpoints/)")
    parser.add_argument("--out", default=None,
                        help=f"output file (default RUN_DIR/{DEFAULT_NAME})")
    return parser


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    exported = export_run(args.run_dir, args.out)
    print(f"wrote {exported.path}: {exported.sparse_bytes:,} bytes at density "
          f"{exported.density:.3f} ({exported.sparse_bytes / exported.dense_bytes:.1%} of the "
          f"{exported.dense_bytes:,} bytes of the dense state dict)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
