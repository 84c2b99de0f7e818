"""The megabatch loop: for t = 1..T, prune to d_t, train E epochs keeping the best-validation
weights, evaluate them on the test set, checkpoint (docs/METHOD.md sections 1, 2 and 4).

Everything else a run does at these moments (the metrics file, wandb, the log line, the
progress bar, fault injection, Ray Tune reports, profiling) listens to the loop's events
(app_dist.training.events).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from app_dist.config import Config
from app_dist.data.reader import StreamReader
from app_dist.data.stream import MegabatchStream, Selection
from app_dist.engine import Engine
from app_dist.engine.acceleration import eager
from app_dist.foundations.distributed import Platform, device_time
from app_dist.pruning.pruner import prune_step
from app_dist.training.arrival import await_megabatch
from app_dist.training.checkpoint import Checkpointer
from app_dist.training.evaluation import Evaluation, Evaluator
from app_dist.training.events import TEST, TRAIN, VALIDATION, Events
from app_dist.training.preemption import Preempted, PreemptionNotice
from app_dist.training.record import add_test_results, training_record
from app_dist.training.state import MegabatchProgress, RunState


class MegabatchLoop:
    def __init__(self, config: Config, platform: Platform, stream: MegabatchStream,
                 reader: StreamReader, engine: Engine, schedule: list[float],
                 checkpointer: Checkpointer, events: Events | None = None) -> None:
        self.config = config
        self.platform = platform
        self.stream = stream
        self.reader = reader
        self.engine = engine
        self.schedule = schedule
        self.checkpointer = checkpointer
        self.events = events or Events()
        self.evaluator = Evaluator(config, platform, self.events)
        self.preemption = PreemptionNotice()

    def run(self, state: RunState, progress: MegabatchProgress | None = None) -> RunState:
        """Megabatches completed+1 .. T; `progress` continues a pre-empted megabatch.
        Raises Preempted after checkpointing when a stop signal arrives (SIGTERM, SIGINT,
        SIGHUP: app_dist.foundations.signals)."""
        self.events.fire("run_start", engine=self.engine)
        try:
            return self._run(state, progress)
        finally:
            self.preemption.restore()

    def _run(self, state: RunState, progress: MegabatchProgress | None) -> RunState:
        unfinished = state.completed < len(self.schedule)
        if unfinished and self.preemption.agreed_now(self.platform):  # a signal while starting
            raise Preempted("pre-empted while starting, before any training: the last "
                            "checkpoint is unchanged")
        for megabatch in range(state.completed + 1, len(self.schedule) + 1):
            # data.follow: a stream's megabatch may not have arrived yet (a no-op otherwise).
            await_megabatch(megabatch, self.stream, self.config.data, self.platform,
                            self.preemption)
            started = time.perf_counter()
            resumed_seconds = 0.0  # spent on this megabatch before a pre-emption
            if progress is None or progress.megabatch != megabatch:
                self.events.fire("megabatch_start", megabatch=megabatch)
                pruned = self._prune(megabatch)
                self.events.fire("after_prune", megabatch=megabatch, masks=self.engine.masks,
                                 pruned=pruned)
                self.engine.start_megabatch()
                # On the device clock: pruning's queued kernels count as pruning.
                progress = MegabatchProgress(
                    megabatch, prune_seconds=device_time(self.platform.device) - started)
            else:
                resumed_seconds = progress.seconds_so_far()
            record = self._train_megabatch(progress, state)
            progress = None
            test_started = time.perf_counter()
            test = self.evaluate(self.stream.test_selection(), TEST)
            finished = time.perf_counter()
            add_test_results(record, test, state.history,
                             seconds=finished - started + resumed_seconds,
                             test_seconds=finished - test_started)
            state.history.append(record)
            state.completed = megabatch
            folder = self._checkpoint(state)
            self.events.fire("megabatch_end", record=record, folder=folder)
            if megabatch < len(self.schedule) and self.preemption.agreed_now(self.platform):
                raise Preempted(f"pre-empted after megabatch {megabatch}; its checkpoint "
                                f"{folder.name} is written")
        return state

    def _prune(self, megabatch: int) -> bool:
        """Prune to the schedule's density when it is below the current one; True if it was."""
        masks = self.engine.masks
        density = self.schedule[megabatch - 1]
        if masks.keeps_at_most(density):
            return False
        # Whole channels (prune.structure=channel) meet d_t only approximately, maybe from
        # above, and N:M layers without groups stay dense: a step whose density did not fall
        # (osp after t = 1, an N held for several megabatches) leaves the masks alone.
        if megabatch > 1 and density >= self.schedule[megabatch - 2]:
            return False
        settings = self.config.prune
        whole = settings.scoring == "whole"
        with eager():  # a compiled model (perf.compile) scores eagerly, in full precision
            new_masks = prune_step(
                self.engine.module, masks, self.platform,
                lambda: self.reader.scoring(megabatch, settings.snip_fraction, whole),
                density=density, criterion=settings.criterion, scope=settings.scope,
                seed=self.config.run.seed, megabatch=megabatch,
                synflow_iterations=settings.synflow_iterations,
                class_source=lambda: self.reader.scoring(megabatch, 1.0, whole),
                scores_on_every_rank=whole)
        self.engine.apply_masks(new_masks)
        return True

    def _train_megabatch(self, progress: MegabatchProgress, state: RunState) -> dict[str, Any]:
        engine = self.engine
        megabatch = progress.megabatch
        val_selection = self.stream.val_selection(megabatch)
        while progress.epoch < self.config.train.epochs:
            train = self._train_epoch(progress, state)
            progress.images_seen += train.count
            engine.end_epoch()
            self.events.fire("epoch_end", megabatch=megabatch, epoch=progress.epoch)
            val_started = time.perf_counter()
            val = self.evaluate(val_selection, VALIDATION)
            progress.validation_seconds += time.perf_counter() - val_started
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
            if self.preemption.agreed_now(self.platform):
                self._checkpoint(state, progress)
                raise Preempted(f"pre-empted in megabatch {megabatch} after epoch "
                                f"{progress.epoch}; checkpoint written")
        best = progress.best
        assert best is not None
        # Warm start: megabatch t+1 (and the test pass of t) uses the best-validation weights.
        engine.load_weights(best.pop("weights"))
        return training_record(
            progress, best, engine.masks,
            total_parameters=sum(p.numel() for p in engine.module.parameters()),
            target_density=self.schedule[megabatch - 1],
            train_samples=len(self.stream.train_selection(megabatch)),
            val_samples=len(val_selection), world_size=self.platform.world_size)

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
        events = self.events
        started = time.perf_counter()
        self.engine.module.train()
        events.fire("epoch_start", megabatch=megabatch, epoch=epoch)
        batches = self.reader.train_epoch(megabatch, epoch)
        events.fire("pass_ready", phase=TRAIN, steps=len(batches),
                    steps_done=progress.steps_done)
        sums = torch.zeros(2, device=self.platform.device, dtype=torch.float64)
        sums += torch.tensor(progress.epoch_sums[:2], dtype=torch.float64).to(sums.device)
        count = int(progress.epoch_sums[2])
        for index, (images, labels) in enumerate(batches):
            if index < progress.steps_done:
                continue  # replayed to reach the pre-empted run's position
            events.fire("batch_start", phase=TRAIN)
            step = self.engine.train_step(images, labels)
            sums[0] += step.loss_sum
            sums[1] += step.correct
            count += step.count
            progress.steps_done = index + 1
            events.fire("batch_end", phase=TRAIN, step=progress.steps_done)
            if self.preemption.agreed(self.platform, progress.steps_done):
                progress.epoch_sums = [float(sums[0]), float(sums[1]), float(count)]
                progress.train_seconds += time.perf_counter() - started  # the steps done
                self._checkpoint(state, progress)
                raise Preempted(f"pre-empted in megabatch {megabatch}, epoch {epoch + 1}, "
                                f"after step {progress.steps_done}; checkpoint written")
        skipped = float(batches.skipped)
        totals = self.platform.all_reduce_sum(torch.cat([
            sums.double().cpu(), torch.tensor([float(count), skipped], dtype=torch.float64)]))
        total = int(totals[2])
        progress.train_seconds += time.perf_counter() - started
        return Evaluation(correct=int(totals[1]), count=total, loss=float(totals[0]) / total,
                          skipped=int(totals[3]))

    def evaluate(self, selection: Selection, phase: str) -> Evaluation:
        """Accuracy of the bare module (or its folded copy) over this rank's share of
        `selection`, summed over ranks."""
        return self.evaluator.evaluate(self.engine.module,
                                       lambda: self.reader.evaluation(selection), phase)

    def _checkpoint(self, state: RunState, progress: MegabatchProgress | None = None) -> Path:
        """After a completed megabatch (progress None) or mid-megabatch (pre-emption)."""
        partial = progress is not None
        self.events.fire("checkpoint_start", partial=partial)
        folder = self.checkpointer.save(state, self.engine, progress)
        self.events.fire("checkpoint_end", folder=folder, partial=partial)
        return folder
