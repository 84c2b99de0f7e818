"""The megabatch loop: for t = 1..T, prune to d_t, train E epochs keeping the best-validation
weights, evaluate them on the test set, checkpoint, log (APP_SPEC.md sections 1, 2 and 4)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from app_dist.checkpoint import Checkpointer
from app_dist.config import Config, computation_settings
from app_dist.data.loader import Batches
from app_dist.data.reader import StreamReader
from app_dist.distributed import Platform
from app_dist.engine import Engine
from app_dist.metrics import MetricsLog, WandbLog, cumulative_error
from app_dist.pruning.pruner import prune_step
from app_dist.pruning.threshold import keep_count

log = logging.getLogger("app_dist")

# Called on every rank after megabatch t is checkpointed: (metrics record, checkpoint folder).
# Ray Tune reporting plugs in here; the loop itself knows nothing about who listens.
MegabatchCallback = Callable[[dict[str, Any], Path], None]


@dataclass
class RunState:
    """What the loop carries from one megabatch to the next besides the engine's state."""

    completed: int = 0  # megabatches finished and checkpointed
    history: list[dict[str, Any]] = field(default_factory=list)
    wandb_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"completed": self.completed, "history": self.history, "wandb_id": self.wandb_id}


@dataclass
class Evaluation:
    correct: int
    count: int
    loss: float

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.count)


class MegabatchLoop:
    def __init__(self, config: Config, platform: Platform, reader: StreamReader, engine: Engine,
                 schedule: list[float], checkpointer: Checkpointer, metrics: MetricsLog | None,
                 wandb: WandbLog | None,
                 callbacks: list[MegabatchCallback] | None = None) -> None:
        self.config = config
        self.platform = platform
        self.reader = reader
        self.engine = engine
        self.schedule = schedule
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.wandb = wandb
        self.callbacks = callbacks or []
        self.show_progress = platform.is_primary and config.log.progress

    def run(self, state: RunState) -> RunState:
        for megabatch in range(state.completed + 1, len(self.schedule) + 1):
            started = time.perf_counter()
            self._prune(megabatch)
            record = self._train_megabatch(megabatch)
            test = self.evaluate(self.reader.evaluation(self.reader.stream.test_selection()))
            errors = [r["test_errors"] for r in state.history] + [test.count - test.correct]
            cer_count, cer = cumulative_error(errors, test.count)
            record.update(test_accuracy=test.accuracy, test_loss=test.loss,
                          test_errors=test.count - test.correct, cer_count=cer_count, cer=cer,
                          seconds=time.perf_counter() - started)
            state.history.append(record)
            state.completed = megabatch
            folder = self._checkpoint(state)
            if self.metrics is not None:
                self.metrics.append(record)
            if self.wandb is not None:
                self.wandb.log(record)
            log.info("megabatch %d/%d: density %.3f, val %.2f%%, test %.2f%%, CER %.3f, %.1f s",
                     megabatch, len(self.schedule), record["density"],
                     100 * record["val_accuracy"], 100 * record["test_accuracy"], cer,
                     record["seconds"])
            for callback in self.callbacks:
                callback(record, folder)
        return state

    def _prune(self, megabatch: int) -> None:
        masks = self.engine.masks
        density = self.schedule[megabatch - 1]
        if keep_count(density, masks.total) >= masks.kept:
            return
        settings = self.config.prune
        started = time.perf_counter()
        prune_step(density=density, criterion=settings.criterion, scope=settings.scope,
                   engine=self.engine, platform=self.platform,
                   scoring_batches=lambda: self.reader.scoring(megabatch, settings.snip_fraction),
                   seed=self.config.run.seed, megabatch=megabatch)
        log.info("megabatch %d: pruned to density %.4f (%s, %s) in %.2f s", megabatch,
                 masks.density(), settings.criterion, settings.scope,
                 time.perf_counter() - started)

    def _train_megabatch(self, megabatch: int) -> dict[str, Any]:
        engine, stream = self.engine, self.reader.stream
        engine.start_megabatch()
        best: dict[str, Any] | None = None
        images_seen, train_seconds = 0, 0.0
        val_selection = stream.val_selection(megabatch)
        for epoch in range(self.config.train.epochs):
            epoch_started = time.perf_counter()
            train = self._train_epoch(megabatch, epoch)
            train_seconds += time.perf_counter() - epoch_started
            images_seen += train.count
            engine.end_epoch()
            val = self.evaluate(self.reader.evaluation(val_selection))
            if best is None or val.accuracy > best["val_accuracy"]:
                best = {"epoch": epoch + 1, "val_accuracy": val.accuracy,
                        "train_accuracy": train.accuracy, "train_loss": train.loss,
                        "weights": copy.deepcopy(engine.module.state_dict())}
        assert best is not None
        # Warm start: megabatch t+1 (and the test pass of t) uses the best-validation weights.
        engine.load_weights(best.pop("weights"))
        masks = engine.masks
        return {
            "megabatch": megabatch,
            "target_density": self.schedule[megabatch - 1],
            "density": masks.density(),
            "kept_parameters": masks.kept,
            "prunable_parameters": masks.total,
            "total_parameters": sum(p.numel() for p in engine.module.parameters()),
            "layer_density": masks.layer_densities(),
            "train_samples": len(stream.train_selection(megabatch)),
            "val_samples": len(val_selection),
            "best_epoch": best["epoch"],
            "train_accuracy": best["train_accuracy"],
            "train_loss": best["train_loss"],
            "val_accuracy": best["val_accuracy"],
            "generalization_gap": 100 * (best["train_accuracy"] - best["val_accuracy"]),
            "train_images_per_second": images_seen * self.platform.world_size / train_seconds,
        }

    def _train_epoch(self, megabatch: int, epoch: int) -> Evaluation:
        self.engine.module.train()
        batches = self.reader.train_epoch(megabatch, epoch)
        sums = torch.zeros(2, device=self.platform.device)  # loss sum, correct
        count = 0
        progress = tqdm(batches, disable=not self.show_progress, leave=False, mininterval=2,
                        desc=f"megabatch {megabatch} epoch {epoch + 1}")
        for images, labels in progress:
            step = self.engine.train_step(images, labels)
            sums[0] += step.loss_sum
            sums[1] += step.correct
            count += step.count
        totals = self.platform.all_reduce_sum(
            torch.cat([sums.double().cpu(), torch.tensor([float(count)], dtype=torch.float64)]))
        total = int(totals[2])
        return Evaluation(correct=int(totals[1]), count=total, loss=float(totals[0]) / total)

    @torch.inference_mode()
    def evaluate(self, batches: Batches) -> Evaluation:
        """Accuracy of the bare module over this rank's share, summed over ranks."""
        module, device = self.engine.module, self.platform.device
        module.eval()
        sums = torch.zeros(3, dtype=torch.float64)  # correct, count, loss sum
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            logits = module(images)
            sums[0] += int((logits.argmax(1) == labels).sum())
            sums[1] += labels.numel()
            sums[2] += float(F.cross_entropy(logits, labels, reduction="sum"))
        self.platform.all_reduce_sum(sums)
        count = int(sums[1])
        return Evaluation(correct=int(sums[0]), count=count, loss=float(sums[2]) / max(1, count))

    def _checkpoint(self, state: RunState) -> Path:
        masks = self.engine.masks
        return self.checkpointer.save(state.completed, {
            "masks": masks.state_dict(),
            "run": state.to_dict(),
            "settings": computation_settings(self.config),
            "world_size": self.platform.world_size,
        }, rank_state={
            # Audit trail: every rank's own masks and residue, compared across ranks in tests.
            "masks": masks.state_dict(),
            "pruned_residue": masks.pruned_residue(self.engine.optimizer),
        }, engine=self.engine)
