"""Fault injection for the reliability tests: kill or pre-empt this rank at a chosen moment, or
pause it there so that a test can deliver a fault from outside at exactly that moment.

    APP_DIST_FAULT="ACTION:rank=R,megabatch=M,epoch=E,step=S[,at=MOMENT][,attempt=A]
                    [,seconds=N,announce=PATH]"

ACTION is sigkill or sigterm (this process signals itself) or pause (this process writes PATH,
then sleeps N seconds: the test waits for PATH and sends its signal to the launcher, a process
group or a rank while the rank is inside MOMENT). MOMENT is `step` (after step S of epoch E of
megabatch M; the default), `validation` (as the validation pass after epoch E starts),
`test` (as megabatch M's test pass starts), `checkpoint` (as megabatch M's checkpoint
starts) or `checkpointed` (once it is written, before the megabatch's end is announced: a Ray
sweep trial has not yet reported it). Several faults, separated by `;`, each fire once at
their own moment. Only on rank R and launcher attempt A
(TORCHELASTIC_RESTART_COUNT, default 0), so a job restarted by torchrun does not fault again.
Workers Ray Train restarts have no attempt count: a pause that announces itself fires only
while its announce file does not exist yet, so a restarted worker passes the moment the test
already used. Unset in normal use: the trainer then registers nothing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from app_dist.training.events import TEST, TRAIN, VALIDATION, Callback

ACTIONS = ("sigkill", "sigterm", "pause")
MOMENTS = ("step", VALIDATION, TEST, "checkpoint", "checkpointed")
FAULT_ENV = "APP_DIST_FAULT"


class FaultInjector(Callback):
    def __init__(self, spec: str, rank: int) -> None:
        action, _, fields = spec.partition(":")
        where = dict(item.split("=", 1) for item in fields.split(",") if item)
        self.action = action.strip().lower()
        self.moment = where.get("at", "step")
        if self.action not in ACTIONS or self.moment not in MOMENTS:
            raise ValueError(f"{FAULT_ENV}={spec!r}: action one of {ACTIONS}, at= one of "
                             f"{MOMENTS}")
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.armed = (int(where.get("rank", 0)) == rank
                      and int(where.get("attempt", 0)) == attempt)
        self.megabatch = int(where.get("megabatch", 1))
        self.epoch = int(where.get("epoch", 0))
        self.step = int(where.get("step", 0))
        self.seconds = float(where.get("seconds", 0))
        self.announce = where.get("announce", "")
        self.position = (0, 0)  # (megabatch, epoch) the loop is in

    @classmethod
    def from_environment(cls, rank: int) -> list[FaultInjector]:
        return [cls(spec, rank) for spec in os.environ.get(FAULT_ENV, "").split(";")
                if spec.strip()]

    def epoch_start(self, megabatch: int, epoch: int) -> None:
        self.position = (megabatch, epoch)

    def megabatch_start(self, megabatch: int) -> None:
        self.position = (megabatch, 0)

    def batch_end(self, phase: str, step: int) -> None:
        if phase == TRAIN and step == self.step:
            self._fire("step", with_epoch=True)

    def evaluation_start(self, phase: str) -> None:
        self._fire(phase, with_epoch=phase == VALIDATION)

    def checkpoint_start(self, partial: bool) -> None:
        if not partial:
            self._fire("checkpoint", with_epoch=False)

    def checkpoint_end(self, folder: Path, partial: bool) -> None:
        if not partial:
            self._fire("checkpointed", with_epoch=False)

    def _fire(self, moment: str, with_epoch: bool) -> None:
        megabatch, epoch = self.position
        if (not self.armed or moment != self.moment or megabatch != self.megabatch
                or (with_epoch and epoch != self.epoch)):
            return
        self.armed = False
        if self.action == "pause":
            if self.announce:
                announce = Path(self.announce)
                if announce.exists():  # an earlier process (a restarted worker's) paused here
                    return
                announce.write_text(str(os.getpid()))
            time.sleep(self.seconds)
            return
        os.kill(os.getpid(), signal.SIGKILL if self.action == "sigkill" else signal.SIGTERM)
