"""Input normalisation that lives inside the model, so callers feed raw pixels."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


class InputNormalization(nn.Module):
    """Map a uint8 batch (0..255) or a float batch in [0, 1] to ``(x - mean) / std``.

    ``mean``/``std`` are non-persistent buffers shaped (1, C, 1, 1): they follow the module across
    devices but are not part of ``state_dict()``, so checkpoints hold only learned weights.
    Only broadcasting ops are used, so a ``channels_last`` input stays ``channels_last``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std need the same non-zero length, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            # .float() copies, so the in-place division never touches the caller's tensor.
            x = x.float().div_(255)
        elif not x.is_floating_point():
            raise TypeError(f"expected a uint8 or floating point batch, got {x.dtype}")
        mean = self.mean.to(dtype=x.dtype)
        std = self.std.to(dtype=x.dtype)
        return (x - mean) / std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Sequential):
    """``normalize`` followed by ``net``; reachable as ``model.normalize`` and ``model.net``."""

    def __init__(self, normalize: InputNormalization, net: nn.Module) -> None:
        super().__init__(OrderedDict([("normalize", normalize), ("net", net)]))
