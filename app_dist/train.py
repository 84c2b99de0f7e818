"""Train one APP / Anytime OSP / dense run under the ALMA megabatch stream.

    python app_dist/train.py --config configs/digits.yaml [key=value ...]
    torchrun --nproc_per_node 2 app_dist/train.py --config configs/cifar10.yaml
    deepspeed app_dist/train.py --config ...      (the launcher adds --local_rank)

Reads top-down: config -> data stream -> model and masks -> engine -> resume -> megabatch loop.
Running the same command again resumes from the run directory's last valid checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script path by torchrun / deepspeed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app_dist.foundations.signals import (  # noqa: E402
    listen_for_preemption,
    preemption_listening,
)

if __name__ == "__main__":
    # Before torch's import (seconds): a stop signal that arrives while the rank starts is
    # kept for the loop, which answers it with exit 75, instead of killing the rank silently.
    listen_for_preemption()

import numpy as np
import torch

from app_dist.config import (
    Config,
    load_config,
    run_directory,
    sparsity_level,
    to_yaml,
)
from app_dist.data.augment import model_input_size
from app_dist.data.manifest import Manifest
from app_dist.data.reader import StreamReader
from app_dist.data.source import open_shards, verify_at_start
from app_dist.data.stream import MegabatchStream
from app_dist.data.workers import stop_readers
from app_dist.engine import build_engine
from app_dist.engine.acceleration import describe_perf, resolve_perf
from app_dist.foundations.commands import (
    BAD_INPUT,
    command,
    exit_without_teardown,
    missing_config,
)
from app_dist.foundations.distributed import Platform, check_device, start_platform
from app_dist.foundations.errors import (
    AppDistError,
    ConfigError,
    ReportedElsewhere,
    agreed,
    one_line,
)
from app_dist.foundations.files import atomic_write_json, atomic_write_text
from app_dist.foundations.run_layout import RunLayout
from app_dist.foundations.run_lock import RunDirectoryInUse, RunLock
from app_dist.models.registry import build_model
from app_dist.pruning.channels import ChannelGroupingError, build_channel_plan
from app_dist.pruning.masks import MaskSet, attach_channel_masks, attach_masks
from app_dist.pruning.n_m import has_groups, n_m_density_schedule
from app_dist.pruning.schedule import density_schedule
from app_dist.pruning.structures import parse_structure
from app_dist.training.anytime import AnytimeModel, anytime_target
from app_dist.training.callbacks import LogLines, ProgressBar
from app_dist.training.checkpoint import Checkpointer
from app_dist.training.events import Callback, Events
from app_dist.training.faults import FaultInjector
from app_dist.training.loop import MegabatchLoop
from app_dist.training.metrics import MetricsLog, WandbLog, summary_table
from app_dist.training.preemption import Preempted
from app_dist.training.run_input import build_parser, prepare
from app_dist.training.state import RunState

log = logging.getLogger("app_dist")

# How long a rank that leaves bad input to its node's first rank to report waits before it
# exits: more than the ranks' start-up can differ on a loaded node, where they all find it.
SILENT_RANK_GRACE_S = 10.0


class SourceFormatter(logging.Formatter):
    """`[app-dist] message` for the project's lines, `[LOGGER] message` for a library's that
    reach the root logger (torch's C++ extension builder printing DeepSpeed's compiler
    commands), so that no library line reads as the project's."""

    def format(self, record: logging.LogRecord) -> str:
        source = "app-dist" if record.name.split(".")[0] == "app_dist" else record.name
        return f"[{source}] {super().format(record)}"


def setup_logging(platform: Platform) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(SourceFormatter("%(message)s"))
    logging.basicConfig(handlers=[handler], force=True,
                        level=logging.INFO if platform.is_primary else logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_callbacks(config: Config, manifest: Manifest, platform: Platform, run_dir: Path,
                  state: RunState, schedule: list[float], extra: list[Callback],
                  mid_megabatch: bool = False) -> list[Callback]:
    """Who listens to the loop: the metrics file, wandb and the anytime model on rank 0, the
    log lines and the progress bar, fault injection when the reliability tests ask for it,
    then `extra`. `mid_megabatch`: the engine was restored from a pre-emption checkpoint."""
    callbacks: list[Callback] = []
    if platform.is_primary:
        callbacks.append(MetricsLog(run_dir, state.history))
        if state.completed < len(schedule):  # a finished run has nothing new for wandb
            callbacks.append(WandbLog(config, run_dir, state.wandb_id, state.history))
        target = anytime_target(config, run_dir)
        if target is not None:
            architecture = {"name": config.model.name, "num_classes": manifest.num_classes,
                            "in_channels": manifest.channels, "stem": config.model.stem,
                            "mean": list(config.model.mean), "std": list(config.model.std),
                            "input_shape": list(input_shape(config, manifest))}
            restored = ((state.history[-1], RunLayout(run_dir).checkpoint(state.completed))
                        if state.completed and not mid_megabatch else None)
            callbacks.append(AnytimeModel(target, architecture, run_dir, restored))
    callbacks.append(LogLines(config, len(schedule)))
    if ProgressBar.wanted(config, platform.is_primary):
        callbacks.append(ProgressBar())
    callbacks += FaultInjector.from_environment(platform.rank)
    return callbacks + extra


def train(config: Config, manifest: Manifest, stream: MegabatchStream, platform: Platform,
          callbacks: list[Callback] | None = None) -> RunState:
    """Run (or resume) the megabatch loop on this rank; `callbacks` hear its events. Rank 0
    holds the run directory's lock from before its first write until the loop ends."""
    run_dir = run_directory(config)
    lock = claim_run_directory(config, manifest, run_dir, platform)
    try:
        return _train(config, manifest, stream, platform, run_dir, callbacks)
    finally:
        if lock is not None:
            lock.release()


def claim_run_directory(config: Config, manifest: Manifest, run_dir: Path,
                        platform: Platform) -> RunLock | None:
    """Rank 0 creates the run directory, takes its lock (one run per run directory, see
    app_dist/foundations/run_lock.py) before writing anything there, writes config.yaml and
    verifies the shards. Every rank learns how that went (a broadcast), so that all of them
    stop with the bad-input code, rank 0 printing the one-line error. Rank 0 gets the held
    lock, the others None."""
    lock: RunLock | None = None
    refusal: AppDistError | None = None
    if platform.is_primary:
        try:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                lock = RunLock.acquire(run_dir)
                RunLayout(run_dir).outcome.unlink(missing_ok=True)  # the last launch's, not ours
                atomic_write_text(RunLayout(run_dir).config, to_yaml(config))
            except OSError as error:
                raise ConfigError(f"config key 'run.dir': cannot write to {run_dir} "
                                  f"({error.strerror or error})") from None
            if config.data.verify_checksums:
                verify_at_start(config.data.shards, manifest)
        except AppDistError as error:
            refusal = error
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if refusal is not None and lock is not None:
            lock.release()
            lock = None
    refusal = platform.broadcast_object(refusal)
    if refusal is not None:
        raise agreed(refusal, platform.is_primary)
    return lock


def _train(config: Config, manifest: Manifest, stream: MegabatchStream, platform: Platform,
           run_dir: Path, callbacks: list[Callback] | None) -> RunState:
    # From here on the perf switches are what auto chose for this device and engine: the
    # engine, reader and evaluator act on them, and checkpoints record them, so a resume
    # where auto decides otherwise (another device) is refused as a changed setting.
    # config.yaml and the run directory's name keep the words (auto).
    configured = config.perf
    config = dataclasses.replace(config, perf=resolve_perf(configured, platform.device,
                                                           config.engine.kind, manifest))
    seed_everything(config.run.seed)

    try:
        model = build_model(config.model.name, manifest.num_classes, in_channels=manifest.channels,
                            stem=config.model.stem, mean=config.model.mean, std=config.model.std)
    except ValueError as error:  # a model/stem/channels combination the registry refuses
        raise ConfigError(f"config key 'model': {error}") from None
    masks = _mask_set(config, model, manifest)
    engine = build_engine(config, model, masks, platform)
    checkpointer = Checkpointer.for_run(config, run_dir, platform,
                                        input_shape=input_shape(config, manifest))
    state, progress = checkpointer.restore(engine)
    if not state.wandb_id:
        state.wandb_id = platform.broadcast_object(uuid.uuid4().hex[:12])

    pattern = parse_structure(config.prune.structure)
    schedule = (n_m_density_schedule(config.prune.method, config.data.megabatches, pattern)
                if pattern is not None else
                density_schedule(config.prune.method, config.data.megabatches,
                                 sparsity_level(config.prune)))
    reader = StreamReader(open_shards(config.data.shards, config.data), manifest, stream,
                          config.data,
                          config.train.batch_size // platform.world_size, platform,
                          config.run.seed, perf=config.perf)
    listeners = run_callbacks(config, manifest, platform, run_dir, state, schedule,
                              callbacks or [], mid_megabatch=progress is not None)
    engine_name = (f"DeepSpeed ZeRO-{config.engine.zero_stage}"
                   if config.engine.kind == "deepspeed" else "DDP")
    log.info("run %s: %s/%s on %s, %d rank(s) on %s (%s), %d megabatches, final %s %.3f",
             run_dir, config.prune.method, config.prune.criterion, manifest.dataset,
             platform.world_size, platform.device, engine_name, config.data.megabatches,
             "FLOPs" if config.prune.budget == "flops" else "density",
             schedule[-1] if config.prune.method != "dense" else 1.0)
    log.info("speed switches: %s", describe_perf(configured, config.perf))
    unreached = [epoch for epoch in config.train.milestones if epoch >= config.train.epochs]
    if unreached and platform.is_primary:  # e.g. train.epochs=2 on a config made for 10
        log.warning("train.milestones %s with train.epochs = %d: the learning rate never "
                    "decays at %s (a milestone takes effect only below train.epochs)",
                    list(config.train.milestones), config.train.epochs, unreached)
    loop = MegabatchLoop(config, platform, stream, reader, engine, schedule, checkpointer,
                         Events(listeners))
    try:
        state = loop.run(state, progress)
    finally:
        for listener in listeners:
            if isinstance(listener, WandbLog):
                listener.finish()
    if platform.is_primary:
        print(summary_table(state.history), flush=True)
    return state


def input_shape(config: Config, manifest: Manifest) -> tuple[int, int, int]:
    """(C, H, W) of one input the model sees."""
    size = model_input_size(config.data.augment, config.data.image_size, manifest.image_size)
    return (manifest.channels, *size)


def _mask_set(config: Config, model: torch.nn.Module, manifest: Manifest) -> MaskSet:
    """The model's masks; with prune.structure=channel also its channel groups, traced on
    one zero image of the stream's size, and the BatchNorm channel masks they imply; with
    an N:M pattern the pattern (layers without groups of M stay dense and are logged)."""
    plan = None
    if config.prune.structure == "channel":
        try:
            plan = build_channel_plan(model, torch.zeros(1, *input_shape(config, manifest)),
                                      config.prune.budget)
        except ChannelGroupingError as error:
            raise ConfigError(f"config key 'prune.structure' = 'channel': model "
                              f"{config.model.name}: {error}") from None
        attach_channel_masks(model, plan)
    pattern = parse_structure(config.prune.structure)
    masks = MaskSet(model, attach_masks(model, config.prune.include_linear), plan, pattern)
    if pattern is not None:
        dense = [name for name, mask in masks.masks.items()
                 if not has_groups(mask.shape, pattern.m)]
        if len(dense) == len(masks.masks):
            raise ConfigError(f"config key 'prune.structure' = '{pattern}': no prunable layer "
                              f"of model {config.model.name} has an input dimension divisible "
                              f"by {pattern.m}")
        if dense:  # e.g. a stem convolution with 1 or 3 input channels
            log.info("prune.structure=%s: %d layer(s) have no groups of %d and stay dense: %s",
                     pattern, len(dense), pattern.m, ", ".join(dense))
    return masks


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    """0 when the run finished, 2 on bad input (one `error:` line, from any rank), 75 when
    pre-empted after writing a checkpoint (the same command continues)."""
    with preemption_listening():  # already, when run as a script
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        if args.config is None:
            raise missing_config("app-dist train")
        config = load_config(args.config, args.overrides)
        check_device(config.run.device)
        manifest, stream = prepare(config)
    except AppDistError as error:
        # Before the process group exists every rank of a node reads the same files and finds
        # the same error: the node's first rank says it (under torchrun, once, not per rank).
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            # The launcher stops every rank once one exits: a rank that got here first must not
            # stop the first rank before it has said it (seen under load: no line at all).
            time.sleep(SILENT_RANK_GRACE_S)
            raise ReportedElsewhere(str(error)) from None
        raise
    platform = start_platform(config.run.device, config.engine.timeout_s)
    setup_logging(platform)
    if args.local_rank is not None and config.engine.kind != "deepspeed" and platform.is_primary:
        # The deepspeed launcher passes --local_rank; it does not choose the engine.
        log.warning("started by the deepspeed launcher, training with engine.kind=%s; "
                    "engine.kind=deepspeed trains with DeepSpeed", config.engine.kind)
    outcome = RunOutcome(run_directory(config), platform.is_primary)
    try:
        train(config, manifest, stream, platform)
    except Preempted as notice:
        if platform.is_primary:
            log.warning("%s; run the same command again to continue", notice)
        return outcome.record("preempted", Preempted.exit_code, str(notice))
    except (RunDirectoryInUse, ReportedElsewhere):
        raise  # another run's directory (outcome file included), or another rank's error
    except AppDistError as error:
        # Whichever rank found it first records it, before its exit breaks the other ranks'
        # connections: they read the file and stop without a second message.
        if not outcome.record_bad_input(one_line(error)):
            raise ReportedElsewhere("a peer rank stopped on bad input") from None
        raise
    except Exception:
        if platform.distributed and outcome.bad_input_recorded():
            raise ReportedElsewhere("a peer rank stopped on bad input") from None
        raise
    finally:
        stop_readers()
        platform.shutdown()
    return outcome.record("finished", 0, "")


class RunOutcome:
    """RUN_DIR/outcome.json, written by rank 0 as a launch ends: how it ended and its exit
    code. Launchers (torchrun, deepspeed) turn every failing rank into their own exit code 1;
    this file says whether that was a pre-emption to resume (75) or bad input (2), and
    `app-dist train --nproc-per-node` exits with its code."""

    def __init__(self, run_dir: Path, is_primary: bool) -> None:
        self.path = RunLayout(run_dir).outcome
        self.is_primary = is_primary

    def record(self, status: str, exit_code: int, message: str) -> int:
        """Write the outcome on rank 0 and return `exit_code`."""
        if self.is_primary and self.path.parent.is_dir():
            try:
                atomic_write_json(self.path, _outcome(status, exit_code, message))
            except OSError as error:  # a full disk must not hide the run's own outcome
                log.warning("could not write %s: %s", self.path, error.strerror or error)
        return exit_code

    def record_bad_input(self, message: str) -> bool:
        """Record bad input this rank found, on any rank, unless a peer of this launch has
        already: False then, and the peer's message is the one printed. Creating the file
        exclusively decides between ranks that find it at the same moment (every rank's
        fetch from a storage server that has gone). Rank 0 removed the last launch's file
        before training began."""
        if not self.path.parent.is_dir():
            return True  # the run directory could not be made: the error says so
        try:
            with open(self.path, "x", encoding="utf-8") as out:
                json.dump(_outcome("bad_input", BAD_INPUT, message), out)
        except FileExistsError:
            return False
        except OSError as error:  # a full disk must not hide the error itself
            log.warning("could not write %s: %s", self.path, error.strerror or error)
        return True

    def bad_input_recorded(self) -> bool:
        """Whether a rank of this launch recorded bad input (rank 0 removed the previous
        launch's file before training began)."""
        try:
            return json.loads(self.path.read_text())["status"] == "bad_input"
        except (OSError, ValueError, KeyError, TypeError):
            return False


def _outcome(status: str, exit_code: int, message: str) -> dict[str, object]:
    return {"status": status, "exit_code": exit_code, "message": message,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S")}


if __name__ == "__main__":
    # A run that returns has written and closed everything (main's finally stopped its
    # readers and process group, train's released the lock and finished wandb): what is left
    # of an exit is the interpreter's teardown, which only costs time.
    exit_without_teardown(main())
