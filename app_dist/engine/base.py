"""The interface between the megabatch loop and a training engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from app_dist.pruning.masks import MaskSet


@dataclass
class StepResult:
    """Sums over one rank's batch, kept as tensors so no step waits for a host sync."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: int


class Engine(Protocol):
    module: nn.Module  # the bare model: evaluation and scoring run it without collectives
    masks: MaskSet
    optimizer: torch.optim.Optimizer

    def start_megabatch(self) -> None:
        """Restart the learning rate at lr0 with a fresh MultiStepLR (momentum carries over)."""

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Forward, backward and optimizer step on one batch; masks stay exact afterwards."""

    def end_epoch(self) -> None:
        """Advance the lr schedule and make the non-parameter state agree across ranks."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
