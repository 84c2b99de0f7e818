"""`app-dist profile`: where one megabatch's wall time goes, phase by phase.

    app-dist profile --config configs/cifar10.yaml [--megabatches 1] [key=value ...]

Runs the real trainer (one process) in a fresh temporary run directory and times its own
objects by wrapping them for the duration of the run: the batches the training epoch waits
for (data), the model's forward inside a training step, the optimizer step, the mask
re-application after it (mask ops), the rest of the step (loss, backward with its gradient
hooks and all-reduce: backward), pruning (scores, all-reduce, threshold, checksums), the
validation and test passes (each split into reading and computing), and the checkpoint.
"other" is what the megabatch spent outside all of these. On a GPU every boundary
synchronises the device, so the phases are exact and the total is slightly slower.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

PHASES = [
    ("data", "training batches: waiting for the reader"),
    ("forward", "training forward"),
    ("backward", "loss, backward, gradient hooks and all-reduce"),
    ("optimizer", "optimizer step"),
    ("mask ops", "re-zeroing pruned weights after each step"),
    ("pruning", "scores, all-reduce, threshold, mask checksums"),
    ("validation data", "validation batches: waiting for the reader"),
    ("validation compute", "validation forward passes"),
    ("test data", "test batches: waiting for the reader"),
    ("test compute", "test forward passes"),
    ("checkpoint", "checkpoint write (all files, sha256, fsync)"),
    ("other", "everything else (epoch bookkeeping, logging)"),
]


class MegabatchProfile:
    """Seconds per phase per megabatch, filled while `instrumented()` is active."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.walls: dict[int, float] = {}
        self.records: dict[int, dict[str, Any]] = {}
        self.megabatch = 0
        self._started = 0.0
        self._in_step = False
        self._evaluating = "test"

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[self.megabatch][phase] += seconds

    def timed(self, phase: str, function: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = self.now()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(phase, self.now() - started)
        return wrapper

    def timed_batches(self, phase: str, batches: Iterable) -> Iterable:
        profile = self

        class Timed:
            def __len__(self) -> int:
                return len(batches)  # type: ignore[arg-type]

            @property
            def skipped(self) -> int:
                return batches.skipped

            def __iter__(self) -> Iterator:
                iterator = iter(batches)
                while True:
                    started = profile.now()
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        profile.add(phase, profile.now() - started)
                        return
                    profile.add(phase, profile.now() - started)
                    yield batch

        return Timed()

    def start_megabatch(self, megabatch: int) -> None:
        self.megabatch = megabatch
        self._started = self.now()

    def end_megabatch(self, record: dict[str, Any], folder: Any) -> None:
        self.walls[self.megabatch] = self.now() - self._started
        self.records[self.megabatch] = record

    @contextlib.contextmanager
    def instrumented(self) -> Iterator[None]:
        """Wrap the loop, reader, engine and checkpointer classes the trainer builds."""
        import app_dist.train as train_module
        from app_dist.data.reader import StreamReader
        from app_dist.training.checkpoint import Checkpointer
        from app_dist.training.loop import MegabatchLoop

        profile = self
        originals = {
            (MegabatchLoop, "_prune"): MegabatchLoop._prune,
            (MegabatchLoop, "_train_megabatch"): MegabatchLoop._train_megabatch,
            (MegabatchLoop, "evaluate"): MegabatchLoop.evaluate,
            (StreamReader, "train_epoch"): StreamReader.train_epoch,
            (StreamReader, "evaluation"): StreamReader.evaluation,
            (Checkpointer, "save"): Checkpointer.save,
            (train_module, "build_engine"): train_module.build_engine,
        }

        def prune(loop: Any, megabatch: int) -> None:
            profile.start_megabatch(megabatch)
            profile.timed("pruning", originals[(MegabatchLoop, "_prune")])(loop, megabatch)

        def train_megabatch(loop: Any, *args: Any) -> Any:
            profile._evaluating = "validation"
            try:
                return originals[(MegabatchLoop, "_train_megabatch")](loop, *args)
            finally:
                profile._evaluating = "test"

        def evaluate(loop: Any, batches: Any) -> Any:
            kind = profile._evaluating
            started = profile.now()
            before = profile.seconds[profile.megabatch][f"{kind} data"]
            result = originals[(MegabatchLoop, "evaluate")](
                loop, profile.timed_batches(f"{kind} data", batches))
            waited = profile.seconds[profile.megabatch][f"{kind} data"] - before
            profile.add(f"{kind} compute", profile.now() - started - waited)
            return result

        # Building a pass can read too (the decoded-sample cache fills then): that is data.
        def train_epoch(reader: Any, megabatch: int, epoch: int) -> Iterable:
            batches = profile.timed("data", originals[(StreamReader, "train_epoch")])(
                reader, megabatch, epoch)
            return profile.timed_batches("data", batches)

        def evaluation(reader: Any, selection: Any) -> Iterable:
            return profile.timed(f"{profile._evaluating} data",
                                 originals[(StreamReader, "evaluation")])(reader, selection)

        def build_engine(*args: Any, **kwargs: Any) -> Any:
            engine = originals[(train_module, "build_engine")](*args, **kwargs)
            profile._instrument_engine(engine)
            return engine

        replacements = {
            (MegabatchLoop, "_prune"): prune,
            (MegabatchLoop, "_train_megabatch"): train_megabatch,
            (MegabatchLoop, "evaluate"): evaluate,
            (StreamReader, "train_epoch"): train_epoch,
            (StreamReader, "evaluation"): evaluation,
            (Checkpointer, "save"): lambda *a, **k: profile.timed(
                "checkpoint", originals[(Checkpointer, "save")])(*a, **k),
            (train_module, "build_engine"): build_engine,
        }
        try:
            for (owner, name), replacement in replacements.items():
                setattr(owner, name, replacement)
            yield
        finally:
            for (owner, name), original in originals.items():
                setattr(owner, name, original)

    def _instrument_engine(self, engine: Any) -> None:
        """Time the phases of `train_step` from hooks on the engine's own objects; backward is
        the step's remainder."""
        marks: dict[str, float] = {}

        def forward_started(module: Any, inputs: Any) -> None:
            if self._in_step:
                marks["forward"] = self.now()

        def forward_ended(module: Any, inputs: Any, output: Any) -> None:
            if self._in_step and "forward" in marks:
                self.add("forward", self.now() - marks.pop("forward"))

        def optimizer_started(optimizer: Any, args: Any, kwargs: Any) -> None:
            marks["optimizer"] = self.now()

        def optimizer_ended(optimizer: Any, args: Any, kwargs: Any) -> None:
            if "optimizer" in marks:
                self.add("optimizer", self.now() - marks.pop("optimizer"))

        engine.module.register_forward_pre_hook(forward_started)
        engine.module.register_forward_hook(forward_ended)
        engine.optimizer.register_step_pre_hook(optimizer_started)
        engine.optimizer.register_step_post_hook(optimizer_ended)
        engine.masks.apply_to_weights = self.timed("mask ops", engine.masks.apply_to_weights)
        step = engine.train_step

        def train_step(images: torch.Tensor, labels: torch.Tensor) -> Any:
            timed = self.seconds[self.megabatch]
            inner = sum(timed[p] for p in ("forward", "optimizer", "mask ops"))
            self._in_step = True
            started = self.now()
            try:
                return step(images, labels)
            finally:
                self._in_step = False
                spent = self.now() - started
                inner = sum(timed[p] for p in ("forward", "optimizer", "mask ops")) - inner
                self.add("backward", spent - inner)

        engine.train_step = train_step

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


def profile_run(config_path: str | None, overrides: list[str], megabatches: int
                ) -> MegabatchProfile:
    """Train `megabatches` megabatches in a fresh temporary run directory, profiled."""
    from app_dist.config import load_config
    from app_dist.foundations.distributed import start_platform
    from app_dist.train import prepare, setup_logging, train

    with tempfile.TemporaryDirectory(prefix="app-dist-profile-") as run_dir:
        config = load_config(config_path, ["log.wandb.mode=disabled", "log.progress=false",
                                           *overrides, f"run.dir={run_dir}",
                                           "checkpoint.resume=false"])
        manifest, stream = prepare(config)
        platform = start_platform(config.run.device, config.engine.timeout_s)
        setup_logging(platform)
        profile = MegabatchProfile(platform.device)

        def stop_after(record: dict[str, Any], folder: Any) -> None:
            profile.end_megabatch(record, folder)
            if record["megabatch"] >= megabatches:
                raise _Enough

        try:
            with profile.instrumented():
                train(config, manifest, stream, platform, callbacks=[stop_after])
        except _Enough:
            pass
        finally:
            from app_dist.data.loader import stop_readers

            stop_readers()
            platform.shutdown()
    return profile


def main(argv: list[str] | None = None) -> int:
    from app_dist.foundations.arguments import ArgumentParser, parse_or_exit_code
    from app_dist.foundations.errors import AppDistError, ConfigError, one_line

    parser = ArgumentParser(prog="app-dist profile", description=__doc__.splitlines()[0],
                            epilog="Overrides: key=value pairs, e.g. perf.cache_decoded=true")
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--megabatches", type=int, default=1,
                        help="profile megabatches 1..N (default 1)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    try:
        args = parse_or_exit_code(parser, argv)
        if isinstance(args, int):
            return args
        if args.megabatches < 1:
            raise ConfigError("app-dist profile: --megabatches must be >= 1")
        profile = profile_run(args.config, args.overrides, args.megabatches)
    except AppDistError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    for megabatch in sorted(profile.walls):
        print(profile.table(megabatch), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
