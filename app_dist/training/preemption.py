"""Pre-emption: SIGTERM becomes a flag that all ranks agree on between steps, so every rank
stops after the same step, a checkpoint is written, and the run exits with code 75."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from app_dist.foundations.distributed import Platform


class Preempted(Exception):
    """SIGTERM arrived: the step in flight finished and a checkpoint was written."""

    exit_code = 75  # EX_TEMPFAIL: try again later; distinct from errors (1) and bad input (2)


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
        if step % self.CHECK_EVERY:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0], dtype=torch.float64)
        return bool(platform.all_reduce_sum(flag).item() > 0)

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
