"""Fault injection for the reliability tests: kill or pre-empt this rank at a chosen step.

APP_DIST_FAULT="SIGNAL:rank=R,megabatch=M,epoch=E,step=S[,attempt=A]" sends SIGNAL (sigkill or
sigterm) to this process once it has finished step S of epoch E of megabatch M on rank R, on
launcher attempt A (TORCHELASTIC_RESTART_COUNT, default 0) only, so a restarted job does not
kill itself again. Unset in normal use: the trainer then does not register the callback.
"""

from __future__ import annotations

import os
import signal

from app_dist.training.events import TRAIN, Callback

SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}
FAULT_ENV = "APP_DIST_FAULT"


def _parse(spec: str) -> tuple[signal.Signals, dict[str, int]]:
    name, _, fields = spec.partition(":")
    where = {key: int(value) for key, value in
             (item.split("=") for item in fields.split(",") if item)}
    return SIGNALS[name.strip().lower()], where


class FaultInjector(Callback):
    def __init__(self, spec: str, rank: int) -> None:
        chosen, where = _parse(spec)
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.target = None
        if where.get("rank", 0) == rank and where.get("attempt", 0) == attempt:
            self.target = (chosen, where.get("megabatch", 1), where.get("epoch", 0),
                           where.get("step", 0))
        self.position = (0, 0)

    @classmethod
    def from_environment(cls, rank: int) -> FaultInjector | None:
        spec = os.environ.get(FAULT_ENV, "")
        return cls(spec, rank) if spec else None

    def epoch_start(self, megabatch: int, epoch: int) -> None:
        self.position = (megabatch, epoch)

    def batch_end(self, phase: str, step: int) -> None:
        if (phase == TRAIN and self.target is not None
                and self.target[1:] == (*self.position, step)):
            chosen = self.target[0]
            self.target = None
            os.kill(os.getpid(), chosen)
