"""Validation and test passes: accuracy and loss of the bare model (or its BatchNorm-folded
copy) over this rank's share of a split, summed over all ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app_dist.config import Config, require_resolved
from app_dist.engine.acceleration import autocast
from app_dist.engine.folding import EvaluationModel
from app_dist.foundations.distributed import Platform
from app_dist.training.events import Events


@dataclass
class Evaluation:
    correct: int
    count: int
    loss: float
    skipped: int = 0  # bad samples left out (data.bad_samples=skip), all ranks

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.count)


class Evaluator:
    """Runs evaluation passes; fires evaluation_start/end and a batch_start/end per batch."""

    def __init__(self, config: Config, platform: Platform, events: Events | None = None) -> None:
        self.config = config
        self.platform = platform
        self.events = events or Events()
        require_resolved(config.perf)
        # Compiled with the training model (perf.compile): the folded copy is compiled too,
        # once, so evaluation runs compiled whether it folds or not.
        self.evaluation_model = EvaluationModel(config.perf.fold_batchnorm, config.perf.compile)

    def evaluate(self, module: nn.Module, read: Callable[[], Iterable],
                 phase: str = "test") -> Evaluation:
        """Accuracy of `module` (or its folded copy, perf.fold_batchnorm) over the pass that
        `read()` builds: this rank's batches, an iterable of (images, labels) with a
        `skipped` count. All ranks call it."""
        self.events.fire("evaluation_start", phase=phase)
        batches = read()
        self.events.fire("pass_ready", phase=phase, steps=None, steps_done=0)
        result = self._evaluate(self.evaluation_model(module), batches, phase)
        self.events.fire("evaluation_end", phase=phase, result=result)
        return result

    @torch.inference_mode()
    def _evaluate(self, module: nn.Module, batches: Iterable, phase: str) -> Evaluation:
        device = self.platform.device
        events = self.events
        module.eval()
        # Summed on the device: no batch waits for the host (one transfer at the end).
        # correct, count, loss sum, skipped bad samples
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for step, (images, labels) in enumerate(batches, start=1):
            events.fire("batch_start", phase=phase)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(self.config.perf, device):
                logits = module(images)
            logits = logits.float()
            sums[0] += (logits.argmax(1) == labels).sum()
            sums[1] += labels.numel()
            sums[2] += F.cross_entropy(logits, labels, reduction="sum").double()
            events.fire("batch_end", phase=phase, step=step)
        sums = sums.cpu()
        sums[3] = float(batches.skipped)  # type: ignore[attr-defined]
        self.platform.all_reduce_sum(sums)
        count = int(sums[1])
        return Evaluation(correct=int(sums[0]), count=count, loss=float(sums[2]) / max(1, count),
                          skipped=int(sums[3]))
