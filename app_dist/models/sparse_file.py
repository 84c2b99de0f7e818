"""The compact sparse model file (format "app-dist-sparse/1"): what `app-dist export` writes
from a run's checkpoint and what a run publishes after every megabatch (its anytime model).

File format (a torch.save dict, loadable with weights_only=True, so no pickled code runs):
    format        "app-dist-sparse/1"
    architecture  {name, num_classes, in_channels, stem, mean, std}: enough for build_model;
                  input_shape [C, H, W]: what the model was trained on
    dense         {name: tensor} every entry of the model's state dict that is not pruned
                  (BatchNorm, biases, classifier, unpruned layers), stored as is
    sparse        {name: {"shape": [...], "bits": uint8, "values": tensor}} per pruned
                  weight: its mask packed 8 per byte (numpy.packbits order) and the kept
                  values in flat (row-major) order. A weight with (almost) nothing pruned
                  is smaller plain and goes to `dense`, folded.
    source        {run_dir, checkpoint, megabatch, density, kept, prunable}, and the
                  megabatch's metrics record in an anytime model
A pruned weight of N entries at density d takes N/8 + 4dN bytes instead of 4N, so the file
shrinks with the density: at d = 0.366 the convolution weights need 0.366 + 1/32 = 40% of their
dense bytes, and a whole ResNet-20 file measured 43% (docs/RESULTS.md).
Loading rebuilds the network with plain Conv2d / Linear layers (no mask buffers) and writes
the weights back exactly, so its outputs equal the masked model's bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app_dist.foundations.errors import AppDistError
from app_dist.models.registry import build_model

FORMAT = "app-dist-sparse/1"
MASK_SUFFIX = "weight_mask"


class ExportError(AppDistError):
    """A run directory or an exported file cannot be used."""


def sparse_model(model_state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                 architecture: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The file's content for a masked model's state dict (see the module docstring)."""
    dense, sparse = sparse_payload(model_state, masks)
    kept = sum(int(m.sum()) for m in masks.values())
    prunable = sum(m.numel() for m in masks.values())
    return {"format": FORMAT, "architecture": architecture, "dense": dense, "sparse": sparse,
            "source": {**source, "density": kept / prunable, "kept": kept,
                       "prunable": prunable}}


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


def read_export_file(path: str | Path, file_format: str, kind: str) -> dict[str, Any]:
    """An export file's dict, read without running pickled code; an ExportError naming the
    file when it cannot be read or is not of `file_format`."""
    path = Path(path)
    try:
        exported = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ExportError(f"cannot load {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(exported, dict) or exported.get("format") != file_format:
        raise ExportError(f"{path} is not an app-dist {kind} export ({file_format})")
    return exported


def load_exported(path: str | Path) -> nn.Module:
    """The exported model as an ordinary dense nn.Module (plain Conv2d / Linear, no mask
    buffers), in eval mode, with the exact weights of the run's final masked model."""
    exported = read_export_file(path, FORMAT, "sparse")
    arch = exported["architecture"]
    model = build_model(arch["name"], arch["num_classes"], in_channels=arch["in_channels"],
                        stem=arch["stem"], mean=arch["mean"], std=arch["std"])
    model.load_state_dict(dense_state(exported["dense"], exported["sparse"]), strict=True)
    return model.eval()


