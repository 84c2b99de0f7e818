"""`app-dist profile`: where one megabatch's wall time goes, phase by phase.

    app-dist profile --config configs/cifar10.yaml [--megabatches 1] [key=value ...]

Runs the real trainer (one process) in a fresh temporary run directory with one more callback
on the loop's events (app_dist.training.events), plus forward hooks on the model and step
hooks on the optimizer: the batches the training epoch waits for (data, including building
the pass), the model's forward inside a training step, the optimizer step, what follows it
in the step (re-zeroing pruned weights: mask ops), the rest of the step (loss, backward with
its gradient hooks and all-reduce: backward), pruning (scores, all-reduce, threshold,
checksums), the validation and test passes (each split into reading and computing), and the
checkpoint. "other" is what the megabatch spent outside all of these. On a GPU every boundary
synchronises the device, so the phases are exact and the total is slightly slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from app_dist.foundations.commands import ArgumentParser, UsageError, command, missing_config
from app_dist.foundations.distributed import device_time
from app_dist.pruning.masks import MaskSet
from app_dist.training.events import TRAIN, Callback

PHASES = [
    ("data", "training batches: waiting for the reader"),
    ("forward", "training forward"),
    ("backward", "loss, backward, gradient hooks and all-reduce"),
    ("optimizer", "optimizer step"),
    ("mask ops", "after the optimizer step: re-zeroing pruned weights"),
    ("pruning", "scores, all-reduce, threshold, mask checksums"),
    ("validation data", "validation batches: waiting for the reader"),
    ("validation compute", "validation forward passes"),
    ("test data", "test batches: waiting for the reader"),
    ("test compute", "test forward passes"),
    ("checkpoint", "checkpoint write (all files, sha256, fsync)"),
    ("other", "everything else (epoch bookkeeping, logging)"),
]


class MegabatchProfile(Callback):
    """Seconds per phase per megabatch, measured from the loop's events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.walls: dict[int, float] = {}
        self.records: dict[int, dict[str, Any]] = {}
        self.megabatch = 0
        self._megabatch_started = 0.0
        self._mark = 0.0  # end of the last timed piece of the current pass
        self._step_started = 0.0
        self._step_inner = 0.0  # forward + optimizer + mask ops inside the current step
        self._forward_started: float | None = None
        self._optimizer_started: float | None = None
        self._optimizer_ended: float | None = None
        self._checkpoint_started = 0.0

    def now(self) -> float:
        return device_time(self.device)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[self.megabatch][phase] += seconds

    # ------------------------------------------------------------------ engine hooks

    def run_start(self, engine: Any) -> None:
        engine.module.register_forward_pre_hook(self._forward_pre)
        engine.module.register_forward_hook(self._forward_post)
        engine.optimizer.register_step_pre_hook(self._optimizer_pre)
        engine.optimizer.register_step_post_hook(self._optimizer_post)

    def _forward_pre(self, module: Any, inputs: Any) -> None:
        if self._step_started:
            self._forward_started = self.now()

    def _forward_post(self, module: Any, inputs: Any, output: Any) -> None:
        if self._forward_started is not None:
            spent = self.now() - self._forward_started
            self.add("forward", spent)
            self._step_inner += spent
            self._forward_started = None

    def _optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._optimizer_started = self.now()

    def _optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._optimizer_started is not None:
            self._optimizer_ended = self.now()
            spent = self._optimizer_ended - self._optimizer_started
            self.add("optimizer", spent)
            self._step_inner += spent
            self._optimizer_started = None

    # ------------------------------------------------------------------ loop events

    def megabatch_start(self, megabatch: int) -> None:
        self.megabatch = megabatch
        self._megabatch_started = self.now()

    def after_prune(self, megabatch: int, masks: MaskSet, pruned: bool) -> None:
        self.add("pruning", self.now() - self._megabatch_started)

    def epoch_start(self, megabatch: int, epoch: int) -> None:
        self._mark = self.now()

    def evaluation_start(self, phase: str) -> None:
        self._mark = self.now()

    def pass_ready(self, phase: str, steps: int | None, steps_done: int) -> None:
        # Building a pass can read (the decoded-sample cache fills then): that is data.
        self._data(phase)

    def batch_start(self, phase: str) -> None:
        self._data(phase)
        if phase == TRAIN:
            self._step_started = self._mark
            self._step_inner = 0.0
            self._optimizer_ended = None

    def batch_end(self, phase: str, step: int) -> None:
        now = self.now()
        if phase == TRAIN:
            if self._optimizer_ended is not None:
                mask_ops = now - self._optimizer_ended
                self.add("mask ops", mask_ops)
                self._step_inner += mask_ops
            self.add("backward", now - self._step_started - self._step_inner)
            self._step_started = 0.0
        else:
            self.add(f"{phase} compute", now - self._mark)
        self._mark = now

    def evaluation_end(self, phase: str, result: Any) -> None:
        self._data(phase)  # the wait for the end of the pass, and the sums' all-reduce

    def _data(self, phase: str) -> None:
        now = self.now()
        self.add("data" if phase == TRAIN else f"{phase} data", now - self._mark)
        self._mark = now

    def checkpoint_start(self, partial: bool) -> None:
        self._checkpoint_started = self.now()

    def checkpoint_end(self, folder: Path, partial: bool) -> None:
        self.add("checkpoint", self.now() - self._checkpoint_started)

    def megabatch_end(self, record: dict[str, Any], folder: Path) -> None:
        self.walls[self.megabatch] = self.now() - self._megabatch_started
        self.records[self.megabatch] = record

    def table(self, megabatch: int) -> str:
        """One megabatch's phases: seconds, share of the wall time, what each one covers."""
        wall = self.walls[megabatch]
        seconds = dict(self.seconds[megabatch])
        seconds["other"] = max(0.0, wall - sum(seconds.values()))
        record = self.records[megabatch]
        lines = [f"megabatch {megabatch}: {wall:.2f} s wall, {record['train_samples']} training "
                 f"samples x {record['epochs_trained']} epochs, "
                 f"{record['train_images_per_second']:.0f} training img/s",
                 f"{'phase':<20} {'seconds':>8} {'share':>7}  covers", "-" * 78]
        for phase, covers in PHASES:
            spent = seconds.get(phase, 0.0)
            lines.append(f"{phase:<20} {spent:>8.2f} {100 * spent / wall:>6.1f}%  {covers}")
        return "\n".join(lines)


class _Enough(Exception):
    """The requested megabatches are profiled."""


class _StopAfter(Callback):
    def __init__(self, megabatches: int) -> None:
        self.megabatches = megabatches

    def megabatch_end(self, record: dict[str, Any], folder: Path) -> None:
        if record["megabatch"] >= self.megabatches:
            raise _Enough


def profile_run(config_path: str | None, overrides: list[str], megabatches: int
                ) -> MegabatchProfile:
    """Train `megabatches` megabatches in a fresh temporary run directory, profiled."""
    from app_dist.config import AUTO, load_config
    from app_dist.foundations.distributed import start_platform
    from app_dist.train import setup_logging, train
    from app_dist.training.run_input import prepare

    with tempfile.TemporaryDirectory(prefix="app-dist-profile-") as run_dir:
        config = load_config(config_path, ["log.wandb.mode=disabled", "log.progress=false",
                                           *overrides, f"run.dir={run_dir}",
                                           "checkpoint.resume=false"])
        if config.perf.compile == AUTO:
            # The forward hooks that time the steps would break a compiled graph.
            config = dataclasses.replace(config, perf=dataclasses.replace(config.perf,
                                                                          compile=False))
        manifest, stream = prepare(config)
        platform = start_platform(config.run.device, config.engine.timeout_s)
        setup_logging(platform)
        profile = MegabatchProfile(platform.device)

        try:
            train(config, manifest, stream, platform,
                  callbacks=[profile, _StopAfter(megabatches)])
        except _Enough:
            pass
        finally:
            from app_dist.data.workers import stop_readers

            stop_readers()
            platform.shutdown()
    return profile


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="app-dist profile", description=__doc__.splitlines()[0],
                            epilog="Overrides: key=value pairs, e.g. perf.cache_decoded=true")
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--megabatches", type=int, default=1,
                        help="profile megabatches 1..N (default 1)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    if args.config is None:
        raise missing_config("app-dist profile")
    if args.megabatches < 1:
        raise UsageError("app-dist profile: --megabatches must be >= 1")
    from app_dist.training.preemption import Preempted

    try:
        profile = profile_run(args.config, args.overrides, args.megabatches)
    except Preempted:  # Ctrl-C: the loop stopped at its next step; the run was a scratch one
        print("app-dist profile: stopped by a signal before the profile was complete",
              file=sys.stderr, flush=True)
        return 130
    for megabatch in sorted(profile.walls):
        print(profile.table(megabatch), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
