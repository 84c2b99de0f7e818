"""An N:M run's export (prune.structure=2:4, 4:8, ...): which layers are valid N:M, and the
exported model with its 2:4 Linear weights in torch's semi-structured sparse form on a GPU.

The file is the sparse export of every run (app_dist/models/sparse_file.py, exact weights,
loadable anywhere as a dense nn.Module); its `source` adds `structure`, per layer the
validity report of pruning.n_m.n_m_summary (`n_m_layers`), and `semi_structured`: the Linear
weights whose masks are valid 2:4 and whose shape torch's kernels take, i.e. what
load_semi_structured converts with torch.sparse.to_sparse_semi_structured. That needs a GPU
with sparse tensor cores (compute capability 8.0+) and half precision; on a CPU the export is
the dense model as for unstructured runs (same speed as dense: zeros are multiplied).
4:8 masks have no torch kernel: a 4:8 run lists only the layers that happen to be 2:4 too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from app_dist.models.sparse_file import ExportError, load_exported
from app_dist.pruning.n_m import n_m_summary
from app_dist.pruning.structures import NMPattern

# The strictest of torch's half-precision shape rules (CUTLASS: rows a multiple of 32,
# columns of 64; cuSPARSELt takes multiples of 16), so the list holds on either backend.
SEMI_STRUCTURED_ROWS, SEMI_STRUCTURED_COLUMNS = 32, 64


def semi_structured_shape_ok(shape: list[int] | torch.Size) -> bool:
    rows, columns = shape
    return rows % SEMI_STRUCTURED_ROWS == 0 and columns % SEMI_STRUCTURED_COLUMNS == 0


def n_m_source(masks: dict[str, torch.Tensor], pattern: NMPattern,
               linear_weights: set[str]) -> dict[str, Any]:
    """What an N:M export adds to its file's `source`: structure, per-layer validity, and
    the Linear weights (names in `linear_weights`) that load_semi_structured converts."""
    layers = n_m_summary(masks, pattern)
    convertible = sorted(name for name, info in layers.items()
                         if name in linear_weights and info["valid_2_4"]
                         and info["density"] < 1.0 and semi_structured_shape_ok(info["shape"]))
    return {"structure": str(pattern), "n_m_layers": layers, "semi_structured": convertible}


def to_semi_structured(model: nn.Module, weights: list[str]) -> nn.Module:
    """Replace the named Linear weights of `model` (on a CUDA device, in float16 or bfloat16)
    by torch's semi-structured sparse tensors, in place; returns the model. Inference only."""
    from torch.sparse import to_sparse_semi_structured

    for name in weights:
        layer = model.get_submodule(name.removesuffix(".weight"))
        if not isinstance(layer, nn.Linear):
            raise ExportError(f"{name} is not the weight of a Linear layer")
        layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()),
                                    requires_grad=False)
    return model


def load_semi_structured(path: str | Path, device: str | torch.device = "cuda",
                         dtype: torch.dtype = torch.float16) -> nn.Module:
    """The exported model on `device` in `dtype`, eval mode, with the file's `semi_structured`
    Linear weights in semi-structured sparse form: on a GPU with sparse tensor cores those
    matmuls run as 2:4 sparse. Raises ExportError off CUDA or for a file without N:M layers."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ExportError("semi-structured sparse weights need a CUDA device; on a CPU use "
                          "load_exported (the same model, dense)")
    source = torch.load(Path(path), map_location="cpu", weights_only=True).get("source", {})
    weights = source.get("semi_structured", [])
    if not weights:
        raise ExportError(f"{path} lists no 2:4 Linear weight (structure "
                          f"{source.get('structure', 'unstructured')})")
    model = load_exported(path).to(device=device, dtype=dtype)
    return to_semi_structured(model, weights)
