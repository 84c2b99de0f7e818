"""Pre-emption: a stop signal (SIGTERM, SIGINT, SIGHUP: app_dist.foundations.signals)
becomes a flag that all ranks agree on at the same points (when the loop starts, every few
training steps, after each epoch's validation, after each megabatch's checkpoint), so every
rank stops at the same point, a checkpoint is written, and the run exits with code 75.

Whichever process of the tree receives the signal: a rank directly, every rank through its
process group (torchrun's agent passes the signal it receives on to each rank's group;
`timeout`, SLURM and Kubernetes signal the whole tree), or one rank only: the flag of one
rank is enough, the agreement is a sum over ranks. Reader processes and their fork server
ignore these signals.
"""

from __future__ import annotations

import torch

from app_dist.foundations.commands import PREEMPTED
from app_dist.foundations.distributed import Platform
from app_dist.foundations.signals import (
    listen_for_preemption,
    preemption_requested,
    stop_listening,
)


class Preempted(Exception):
    """A stop signal arrived: the step in flight finished and a checkpoint was written."""

    exit_code = PREEMPTED


class PreemptionNotice:
    """The ranks' agreement on a stop signal, checked between steps (all stop together).
    It listens for the signals unless the process already does (app_dist/train.py listens
    from its start), and stops listening on `restore` only if it began."""

    CHECK_EVERY = 5  # steps between agreements: one tiny all-reduce, amortised

    def __init__(self) -> None:
        self._listening = listen_for_preemption()

    @property
    def requested(self) -> bool:
        """Whether this rank received a stop signal."""
        return preemption_requested()

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
        if self._listening:
            stop_listening()
