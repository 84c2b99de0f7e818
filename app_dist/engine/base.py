"""The interface between the megabatch loop and a training engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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

    def apply_masks(self, new_masks: dict[str, torch.Tensor]) -> None:
        """Install new masks (name -> 0/1 tensor, from pruning) and zero the pruned positions
        everywhere the engine keeps a copy (weights, master weights, optimizer state). All
        ranks call it, with the same masks."""

    def pruned_residue(self) -> dict[str, float]:
        """The largest |value| at pruned positions of every copy the engine keeps (weights,
        master weights, optimizer state), by copy: all must be exactly 0. All ranks call it
        (DeepSpeed gathers partitioned copies); recorded per rank in every checkpoint."""

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a module state dict (the best-validation weights) into every copy the engine
        keeps. All ranks call it."""

    def save(self, folder: Path) -> None:
        """Write the engine's state (model, optimizer, scheduler) into `folder`. All ranks."""

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote. All ranks."""

    def engine_state_files(self) -> list[str]:
        """Names (relative to the checkpoint folder) that `save` writes, for documentation."""
        ...


def module_state(module: nn.Module) -> dict[str, Any]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
