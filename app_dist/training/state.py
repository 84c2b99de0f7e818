"""What a run carries between megabatches and what a megabatch carries between steps: the
state a checkpoint saves and a resume restores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RunState:
    """What the loop carries from one megabatch to the next besides the engine's state."""

    completed: int = 0  # megabatches finished and checkpointed
    history: list[dict[str, Any]] = field(default_factory=list)
    wandb_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"completed": self.completed, "history": self.history, "wandb_id": self.wandb_id}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunState:
        return cls(completed=saved["completed"], history=saved["history"],
                   wandb_id=saved["wandb_id"])


@dataclass
class MegabatchProgress:
    """Where training of one megabatch stands: enough to continue it after a pre-emption.

    Data order is a pure function of (seed, megabatch, epoch, rank), so a resumed epoch replays
    its batches and skips the first `steps_done` to land exactly where the stopped run was.
    """

    megabatch: int
    epoch: int = 0  # epochs finished
    steps_done: int = 0  # steps finished in the current epoch
    images_seen: int = 0
    train_seconds: float = 0.0
    best: dict[str, Any] | None = None  # best-validation epoch so far, with its weights
    # This rank's running sums of the current epoch: loss sum, correct, count.
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    skipped: int = 0  # bad samples skipped by this megabatch's finished passes, all ranks
    # Wall seconds of its pruning step and finished validation passes: with train_seconds
    # (training steps, a pre-empted epoch's included), what the megabatch spent before a
    # pre-emption, so that its record covers all of it.
    prune_seconds: float = 0.0
    validation_seconds: float = 0.0

    def shared_state(self) -> dict[str, Any]:
        """The part that is the same on every rank (saved once, by rank 0; the timings are
        rank 0's)."""
        return {"megabatch": self.megabatch, "epoch": self.epoch, "steps_done": self.steps_done,
                "images_seen": self.images_seen, "train_seconds": self.train_seconds,
                "best": self.best, "skipped": self.skipped,
                "prune_seconds": self.prune_seconds,
                "validation_seconds": self.validation_seconds}

    def seconds_so_far(self) -> float:
        """The wall seconds already spent on this megabatch in its timed phases."""
        return self.prune_seconds + self.train_seconds + self.validation_seconds


def rank_local_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that may differ between ranks (BatchNorm statistics), not the masks."""
    return {name: buffer.detach().cpu().clone() for name, buffer in module.named_buffers()
            if not name.endswith("weight_mask")}
