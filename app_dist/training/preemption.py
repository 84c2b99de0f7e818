"""Pre-emption: SIGTERM becomes a flag that all ranks agree on at the same points (every few
training steps, after each epoch's validation, after each megabatch's checkpoint), so every
rank stops at the same point, a checkpoint is written, and the run exits with code 75.

Whichever process of the tree receives the signal: a rank directly, every rank through its
process group (torchrun forwards SIGTERM to each rank's group; `timeout`, SLURM and Kubernetes
signal the whole tree), or one rank only: the flag of one rank is enough, the agreement is a
sum over ranks. Reader processes and their fork server ignore SIGTERM (app_dist.data).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from app_dist.foundations.commands import PREEMPTED
from app_dist.foundations.distributed import Platform


class Preempted(Exception):
    """SIGTERM arrived: the step in flight finished and a checkpoint was written."""

    exit_code = PREEMPTED


class PreemptionNotice:
    """Turns SIGTERM into a flag that the ranks agree on between steps (all stop together)."""

    CHECK_EVERY = 5  # steps between agreements: one tiny all-reduce, amortised

    def __init__(self) -> None:
        self.requested = False
        self._installed = threading.current_thread() is threading.main_thread()
        # Only the main thread may install handlers; Ray Train runs the training function in a
        # worker thread (its own shutdown handles SIGTERM there), so it trains without one.
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self, platform: Platform, step: int) -> bool:
        """After training step `step`: every CHECK_EVERY steps, whether any rank was asked
        to stop. All ranks call it after the same steps."""
        if step % self.CHECK_EVERY:
            return False
        return self.agreed_now(platform)

    def agreed_now(self, platform: Platform) -> bool:
        """Whether any rank was asked to stop (one tiny all-reduce). All ranks call it."""
        flag = torch.tensor([1.0 if self.requested else 0.0], dtype=torch.float64)
        return bool(platform.all_reduce_sum(flag).item() > 0)

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
