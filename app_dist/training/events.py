"""Training events: the named moments of a megabatch that other parts of a run hook into.

The loop fires an event at each moment; callbacks (the metrics file, wandb, the log line, the
progress bar, fault injection, the Ray Tune reporter, the profiler) implement the methods of
the moments they care about. The loop knows nothing about who listens, and a listener never
reaches into the loop (composer's Event/Callback is the model).

    megabatch_start
      after_prune                      (a fresh megabatch: masks now at density d_t)
      epoch_start
        pass_ready                     (phase "train": the reader built the epoch's batches)
        batch_start, batch_end ...     (batch_end carries the step number)
      epoch_end
      evaluation_start                 (phase "validation" after each epoch, "test" once)
        pass_ready, batch_start, batch_end ...
      evaluation_end
      checkpoint_start, checkpoint_end (also mid-megabatch, at a pre-emption)
    megabatch_end                      (the megabatch's metrics record and checkpoint)

Every rank fires every event; a callback that should act once checks the rank itself (or is
registered on rank 0 only, as the metrics file and wandb are).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app_dist.pruning.masks import MaskSet
    from app_dist.training.evaluation import Evaluation

TRAIN, VALIDATION, TEST = "train", "validation", "test"


class Callback:
    """Override the moments you need; each default does nothing."""

    def megabatch_start(self, megabatch: int) -> None:
        """Megabatch `megabatch` (1-based) starts, before pruning (not fired again when a
        pre-empted megabatch resumes)."""

    def after_prune(self, megabatch: int, masks: MaskSet, pruned: bool) -> None:
        """The masks of `megabatch` are in place: `pruned` to the schedule's density, or
        unchanged when the schedule asked for no lower density."""

    def run_start(self, engine: Any) -> None:
        """The engine is built and restored from the checkpoint; training is about to start."""

    def epoch_start(self, megabatch: int, epoch: int) -> None:
        """Epoch `epoch` (0-based) of `megabatch` starts, before its batches are read."""

    def pass_ready(self, phase: str, steps: int | None, steps_done: int) -> None:
        """The reader built a pass of `steps` batches (None: evaluation passes, whose length
        is known once read); building can read (a decoded-sample cache fills then). In phase
        train the first `steps_done` were trained before a pre-emption and are skipped."""

    def batch_start(self, phase: str) -> None:
        """A batch of `phase` (train, validation, test) arrived from the reader."""

    def batch_end(self, phase: str, step: int) -> None:
        """The batch is processed: `step` batches of this pass (in phase train: of this
        epoch, counting those trained before a pre-emption) are done."""

    def epoch_end(self, megabatch: int, epoch: int) -> None:
        """The training passes of epoch `epoch` ended (before its validation)."""

    def evaluation_start(self, phase: str) -> None:
        """A validation or test pass starts."""

    def evaluation_end(self, phase: str, result: Evaluation) -> None:
        """The pass ended; `result` is summed over all ranks."""

    def checkpoint_start(self, partial: bool) -> None:
        """A checkpoint is about to be written (partial: at a pre-emption)."""

    def checkpoint_end(self, folder: Path, partial: bool) -> None:
        """The checkpoint is sealed in `folder`."""

    def megabatch_end(self, record: dict[str, Any], folder: Path) -> None:
        """Megabatch record["megabatch"] is finished, evaluated and checkpointed in `folder`."""


class Events:
    """The callbacks of one run, called in registration order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def add(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def fire(self, moment: str, **details: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, moment)(**details)
