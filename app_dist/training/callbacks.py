"""What a person watching a run sees: the log lines and the progress bar, as event callbacks."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app_dist.config import Config
from app_dist.pruning.masks import MaskSet
from app_dist.training.events import TRAIN, Callback

log = logging.getLogger("app_dist")


class LogLines(Callback):
    """One line per pruning step and per finished megabatch (shown on rank 0; warnings on
    every rank)."""

    def __init__(self, config: Config, megabatches: int) -> None:
        self.prune = config.prune
        self.megabatches = megabatches
        self._pruning_started = 0.0

    def megabatch_start(self, megabatch: int) -> None:
        self._pruning_started = time.perf_counter()

    def after_prune(self, megabatch: int, masks: MaskSet, pruned: bool) -> None:
        if pruned:
            # Channel runs also say the FLOPs kept: with prune.budget=flops that is d_t.
            flops = masks.structure_record().get("flops_fraction")
            log.info("megabatch %d: pruned to density %.4f%s (%s, %s) in %.2f s", megabatch,
                     masks.density(), "" if flops is None else f", FLOPs {flops:.4f}",
                     self.prune.criterion, self.prune.scope,
                     time.perf_counter() - self._pruning_started)

    def megabatch_end(self, record: dict[str, Any], folder: Path) -> None:
        megabatch = record["megabatch"]
        if record["skipped_samples"]:
            log.warning("megabatch %d: %d bad sample(s) skipped over its passes "
                        "(data.bad_samples=skip)", megabatch, record["skipped_samples"])
        log.info("megabatch %d/%d: density %.3f, val %.2f%%, test %.2f%%, CER %.3f, %.1f s",
                 megabatch, self.megabatches, record["density"],
                 100 * record["val_accuracy"], 100 * record["test_accuracy"], record["cer"],
                 record["seconds"])


class ProgressBar(Callback):
    """A tqdm bar per training epoch, only where a person watches (in a log file bars are
    noise): rank 0, log.progress on, stderr a terminal."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.title = ""

    @staticmethod
    def wanted(config: Config, is_primary: bool) -> bool:
        return is_primary and config.log.progress and sys.stderr.isatty()

    def epoch_start(self, megabatch: int, epoch: int) -> None:
        self.title = f"megabatch {megabatch} epoch {epoch + 1}"

    def pass_ready(self, phase: str, steps: int | None, steps_done: int) -> None:
        if phase == TRAIN:
            self.bar = tqdm(total=steps, initial=steps_done, leave=False, mininterval=2,
                            desc=self.title)

    def batch_end(self, phase: str, step: int) -> None:
        if phase == TRAIN and self.bar is not None:
            self.bar.update(1)

    def epoch_end(self, megabatch: int, epoch: int) -> None:
        self._close()

    def checkpoint_start(self, partial: bool) -> None:
        self._close()  # a pre-emption ends the epoch early

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
