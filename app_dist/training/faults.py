"""Fault injection for the reliability tests: kill or pre-empt this rank at a chosen step.

APP_DIST_FAULT="SIGNAL:rank=R,megabatch=M,epoch=E,step=S[,attempt=A]" sends SIGNAL (sigkill or
sigterm) to this process once it has finished step S of epoch E of megabatch M on rank R, on
launcher attempt A (TORCHELASTIC_RESTART_COUNT, default 0) only, so a restarted job does not
kill itself again. Unset in normal use; reading it costs one dict lookup per step.
"""

from __future__ import annotations

import os
import signal

SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}


def _parse(spec: str) -> tuple[signal.Signals, dict[str, int]]:
    name, _, fields = spec.partition(":")
    where = {key: int(value) for key, value in
             (item.split("=") for item in fields.split(",") if item)}
    return SIGNALS[name.strip().lower()], where


class FaultInjector:
    def __init__(self, rank: int) -> None:
        spec = os.environ.get("APP_DIST_FAULT", "")
        self.target = None
        if spec:
            chosen, where = _parse(spec)
            attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
            if where.get("rank", 0) == rank and where.get("attempt", 0) == attempt:
                self.target = (chosen, where.get("megabatch", 1), where.get("epoch", 0),
                               where.get("step", 0))

    def after_step(self, megabatch: int, epoch: int, step: int) -> None:
        if self.target is not None and self.target[1:] == (megabatch, epoch, step):
            chosen = self.target[0]
            self.target = None
            os.kill(os.getpid(), chosen)
