"""The megabatch loop: for t = 1..T, prune to d_t, train E epochs keeping the best-validation
weights, evaluate them on the test set, checkpoint, log (APP_SPEC.md sections 1, 2 and 4)."""

from __future__ import annotations

import copy
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from app_dist.config import Config, computation_settings
from app_dist.data.reader import Pass, StreamReader
from app_dist.engine import Engine
from app_dist.engine.acceleration import autocast
from app_dist.engine.folding import EvaluationModel
from app_dist.foundations.distributed import Platform
from app_dist.pruning.pruner import prune_step
from app_dist.pruning.threshold import keep_count
from app_dist.training.checkpoint import Checkpointer
from app_dist.training.faults import FaultInjector
from app_dist.training.metrics import MetricsLog, WandbLog, cumulative_error

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
class MegabatchProgress:
    """Where training of one megabatch stands: enough to continue it after a pre-emption.

    Data order is a pure function of (seed, megabatch, epoch, rank), so a resumed epoch replays
    its batches and skips the first `steps_done` to land exactly where the stopped run was.
    """

    megabatch: int
    epoch: int = 0  # epochs finished
    steps_done: int = 0  # steps finished in the current epoch
    images_seen: int = 0
    train_seconds: float = 0.0
    best: dict[str, Any] | None = None  # best-validation epoch so far, with its weights
    # This rank's running sums of the current epoch: loss sum, correct, count.
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    skipped: int = 0  # bad samples skipped by this megabatch's finished passes, all ranks


    def shared_state(self) -> dict[str, Any]:
        """The part that is the same on every rank (saved once, by rank 0)."""
        return {"megabatch": self.megabatch, "epoch": self.epoch, "steps_done": self.steps_done,
                "images_seen": self.images_seen, "train_seconds": self.train_seconds,
                "best": self.best, "skipped": self.skipped}


def rank_local_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that may differ between ranks (BatchNorm statistics), not the masks."""
    return {name: buffer.detach().cpu().clone() for name, buffer in module.named_buffers()
            if not name.endswith("weight_mask")}


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


@dataclass
class Evaluation:
    correct: int
    count: int
    loss: float
    skipped: int = 0  # bad samples left out (data.bad_samples=skip), all ranks

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
        self.evaluation_model = EvaluationModel(config.perf.fold_batchnorm)
        # Bars only where a person watches: in a log file they are noise.
        self.show_progress = (platform.is_primary and config.log.progress
                              and sys.stderr.isatty())
        self.faults = FaultInjector(platform.rank)
        self.preemption = PreemptionNotice()

    def run(self, state: RunState, progress: MegabatchProgress | None = None) -> RunState:
        """Megabatches completed+1 .. T; `progress` continues a pre-empted megabatch.
        Raises Preempted after checkpointing when SIGTERM arrives."""
        try:
            return self._run(state, progress)
        finally:
            self.preemption.restore()

    def _run(self, state: RunState, progress: MegabatchProgress | None) -> RunState:
        for megabatch in range(state.completed + 1, len(self.schedule) + 1):
            started = time.perf_counter()
            if progress is None or progress.megabatch != megabatch:
                self._prune(megabatch)
                self.engine.start_megabatch()
                progress = MegabatchProgress(megabatch)
            record = self._train_megabatch(progress, state)
            progress = None
            test = self.evaluate(self.reader.evaluation(self.reader.stream.test_selection()))
            record["skipped_samples"] += test.skipped
            if record["skipped_samples"]:
                log.warning("megabatch %d: %d bad sample(s) skipped over its passes "
                            "(data.bad_samples=skip)", megabatch, record["skipped_samples"])
            errors = [r["test_errors"] for r in state.history] + [test.count - test.correct]
            cer_count, cer = cumulative_error(errors, test.count)
            record.update(test_accuracy=test.accuracy, test_loss=test.loss,
                          test_errors=test.count - test.correct, cer_count=cer_count, cer=cer,
                          seconds=time.perf_counter() - started + record.pop("resumed_seconds"))
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
                   seed=self.config.run.seed, megabatch=megabatch,
                   synflow_iterations=settings.synflow_iterations)
        log.info("megabatch %d: pruned to density %.4f (%s, %s) in %.2f s", megabatch,
                 masks.density(), settings.criterion, settings.scope,
                 time.perf_counter() - started)

    def _train_megabatch(self, progress: MegabatchProgress, state: RunState) -> dict[str, Any]:
        engine, stream = self.engine, self.reader.stream
        megabatch = progress.megabatch
        resumed_seconds = progress.train_seconds
        val_selection = stream.val_selection(megabatch)
        while progress.epoch < self.config.train.epochs:
            epoch_started = time.perf_counter()
            train = self._train_epoch(progress, state)
            progress.train_seconds += time.perf_counter() - epoch_started
            progress.images_seen += train.count
            engine.end_epoch()
            val = self.evaluate(self.reader.evaluation(val_selection))
            progress.skipped += train.skipped + val.skipped
            if progress.best is None or (val.accuracy
                                         > progress.best["val_accuracy"] + self._min_gain()):
                progress.best = {"epoch": progress.epoch + 1, "val_accuracy": val.accuracy,
                                 "train_accuracy": train.accuracy, "train_loss": train.loss,
                                 "weights": copy.deepcopy(engine.module.state_dict())}
            progress.epoch += 1
            progress.steps_done = 0
            progress.epoch_sums = [0.0, 0.0, 0.0]
            if self._stop_early(progress):
                break
        best = progress.best
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
            "epochs_trained": progress.epoch,
            "train_accuracy": best["train_accuracy"],
            "train_loss": best["train_loss"],
            "val_accuracy": best["val_accuracy"],
            "generalization_gap": 100 * (best["train_accuracy"] - best["val_accuracy"]),
            # images_seen is already summed over ranks (each epoch's count is all-reduced).
            "train_images": progress.images_seen,
            "train_seconds": progress.train_seconds,
            "train_images_per_second": progress.images_seen / max(progress.train_seconds, 1e-9),
            "resumed_seconds": resumed_seconds,
            # Bad samples skipped (data.bad_samples=skip), counted once per pass that met
            # them: training epochs, validations and the test pass.
            "skipped_samples": progress.skipped,
        }

    def _min_gain(self) -> float:
        """How much an epoch must beat the best validation accuracy by to become the best
        (and reset the patience): min_delta with early stopping on, as in Keras'
        EarlyStopping(restore_best_weights=True); any gain when it is off."""
        train = self.config.train
        return train.early_stopping_min_delta if train.early_stopping_patience else 0.0

    def _stop_early(self, progress: MegabatchProgress) -> bool:
        """`patience` epochs in a row without a new best. Every rank sees the same all-reduced
        validation accuracy, so all ranks stop after the same epoch."""
        patience = self.config.train.early_stopping_patience
        assert progress.best is not None
        return patience > 0 and progress.epoch - progress.best["epoch"] >= patience

    def _train_epoch(self, progress: MegabatchProgress, state: RunState) -> Evaluation:
        """One epoch (or its remainder after a pre-emption); sums agreed over ranks."""
        megabatch, epoch = progress.megabatch, progress.epoch
        self.engine.module.train()
        batches = self.reader.train_epoch(megabatch, epoch)
        sums = torch.zeros(2, device=self.platform.device, dtype=torch.float64)
        sums += torch.tensor(progress.epoch_sums[:2], dtype=torch.float64).to(sums.device)
        count = int(progress.epoch_sums[2])
        bar = tqdm(batches, disable=not self.show_progress, leave=False, mininterval=2,
                   desc=f"megabatch {megabatch} epoch {epoch + 1}")
        for index, (images, labels) in enumerate(bar):
            if index < progress.steps_done:
                continue  # replayed to reach the pre-empted run's position
            step = self.engine.train_step(images, labels)
            sums[0] += step.loss_sum
            sums[1] += step.correct
            count += step.count
            progress.steps_done = index + 1
            self.faults.after_step(megabatch, epoch, progress.steps_done)
            if self.preemption.agreed(self.platform, progress.steps_done):
                progress.epoch_sums = [float(sums[0]), float(sums[1]), float(count)]
                self._checkpoint(state, progress)
                raise Preempted(f"pre-empted in megabatch {megabatch}, epoch {epoch + 1}, "
                                f"after step {progress.steps_done}; checkpoint written")
        skipped = float(batches.skipped)
        totals = self.platform.all_reduce_sum(torch.cat([
            sums.double().cpu(), torch.tensor([float(count), skipped], dtype=torch.float64)]))
        total = int(totals[2])
        return Evaluation(correct=int(totals[1]), count=total, loss=float(totals[0]) / total,
                          skipped=int(totals[3]))

    def evaluate(self, batches: Pass) -> Evaluation:
        """Accuracy of the bare module (or its folded copy) over this rank's share, summed
        over ranks."""
        return self._evaluate(self.evaluation_model(self.engine.module), batches)

    @torch.inference_mode()
    def _evaluate(self, module: nn.Module, batches: Pass) -> Evaluation:
        device = self.platform.device
        module.eval()
        # Summed on the device: no batch waits for the host (one transfer at the end).
        # correct, count, loss sum, skipped bad samples
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(self.config.perf, device):
                logits = module(images)
            logits = logits.float()
            sums[0] += (logits.argmax(1) == labels).sum()
            sums[1] += labels.numel()
            sums[2] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums = sums.cpu()
        sums[3] = float(batches.skipped)
        self.platform.all_reduce_sum(sums)
        count = int(sums[1])
        return Evaluation(correct=int(sums[0]), count=count, loss=float(sums[2]) / max(1, count),
                          skipped=int(sums[3]))

    def _checkpoint(self, state: RunState, progress: MegabatchProgress | None = None) -> Path:
        """After a completed megabatch (progress None) or mid-megabatch (pre-emption)."""
        masks = self.engine.masks
        return self.checkpointer.save(state.completed, {
            "masks": masks.state_dict(),
            "run": state.to_dict(),
            "progress": None if progress is None else progress.shared_state(),
            "settings": computation_settings(self.config),
            "world_size": self.platform.world_size,
        }, rank_state={
            # Audit trail: every rank's own masks and residue, compared across ranks in tests.
            "masks": masks.state_dict(),
            "pruned_residue": self.engine.pruned_residue(),
            "epoch_sums": None if progress is None else progress.epoch_sums,
            # Mid-epoch each rank's BatchNorm statistics are its own (averaged at epoch end).
            "buffers": None if progress is None else rank_local_buffers(self.engine.module),
        }, engine=self.engine, partial=progress is not None)
