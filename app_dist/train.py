"""Train one APP / Anytime OSP / dense run under the ALMA megabatch stream.

    python app_dist/train.py --config configs/digits.yaml [key=value ...]
    torchrun --nproc_per_node 2 app_dist/train.py --config configs/cifar10.yaml
    deepspeed app_dist/train.py --config ...      (the launcher adds --local_rank)

Reads top-down: config -> data stream -> model and masks -> engine -> resume -> megabatch loop.
Running the same command again resumes from the run directory's last valid checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script path by torchrun / deepspeed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from app_dist.config import (
    Config,
    changed_settings,
    load_config,
    run_directory,
    sparsity_level,
    to_yaml,
)
from app_dist.data.loader import start_reader_server, stop_readers
from app_dist.data.manifest import Manifest, verify_shard
from app_dist.data.reader import StreamReader
from app_dist.data.stream import MegabatchStream
from app_dist.engine import build_engine
from app_dist.foundations.arguments import ArgumentParser
from app_dist.foundations.distributed import Platform, start_platform
from app_dist.foundations.errors import AppDistError, CheckpointError, ConfigError, one_line
from app_dist.models import build_model
from app_dist.pruning.masks import MaskSet, attach_masks
from app_dist.pruning.schedule import density_schedule
from app_dist.training.checkpoint import Checkpointer, set_rng_state
from app_dist.training.loop import (
    MegabatchCallback,
    MegabatchLoop,
    MegabatchProgress,
    Preempted,
    RunState,
)
from app_dist.training.metrics import MetricsLog, WandbLog, summary_table

log = logging.getLogger("app_dist")


def parse_arguments(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = ArgumentParser(
        prog="app-dist train", description="Train APP / OSP / dense under the megabatch stream.",
        epilog="Overrides: key=value pairs, e.g. prune.method=osp train.epochs=2",
    )
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # added by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def prepare(config: Config) -> tuple[Manifest, MegabatchStream]:
    """Everything that can reject the input before a process group exists."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.train.batch_size % world_size:
        raise ConfigError(f"config key 'train.batch_size' = {config.train.batch_size}: not "
                          f"divisible by the world size {world_size}")
    if config.data.num_workers and config.data.num_workers > 64:
        raise ConfigError("config key 'data.num_workers' is implausibly large (> 64)")
    manifest = Manifest.load(config.data.shards)
    stream = MegabatchStream(manifest, config.data.megabatches, config.data.val_fraction,
                             config.data.replay, config.data.replay_window,
                             config.data.replay_buffer, config.run.seed)
    return manifest, stream


def setup_logging(platform: Platform) -> None:
    logging.basicConfig(format="[app-dist] %(message)s", stream=sys.stdout, force=True,
                        level=logging.INFO if platform.is_primary else logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_state(config: Config, checkpointer: Checkpointer, engine, masks: MaskSet,
                 platform: Platform) -> tuple[RunState, MegabatchProgress | None]:
    """The run state to continue from (the last valid checkpoint's, or a fresh one), and the
    progress inside a megabatch when that checkpoint was written at a pre-emption."""
    if not config.checkpoint.resume:
        return RunState(), None
    checkpoint = checkpointer.latest()
    if checkpoint is None:
        return RunState(), None
    saved = checkpoint.load_state()
    allow_resize = config.checkpoint.allow_world_size_change
    if saved["world_size"] != platform.world_size and not allow_resize:
        raise CheckpointError(
            f"{checkpoint.path} was written by {saved['world_size']} ranks, this run has "
            f"{platform.world_size}; set checkpoint.allow_world_size_change=true to continue "
            "anyway")
    changes = changed_settings(saved["settings"], config)
    if changes and not config.checkpoint.allow_config_change:
        raise CheckpointError(
            f"{checkpoint.path} was made with other settings ({'; '.join(changes[:4])}); "
            "set checkpoint.allow_config_change=true, or checkpoint.resume=false to start over")
    masks.load_state_dict(saved["masks"])
    engine.load(checkpoint.path)
    rank_state = (checkpoint.load_rank_state(platform.rank)
                  if platform.rank < checkpoint.world_size else None)
    if rank_state is not None:
        set_rng_state(rank_state["rng"])
    run = saved["run"]
    state = RunState(completed=run["completed"], history=run["history"], wandb_id=run["wandb_id"])
    progress = None
    if saved.get("progress") is not None:
        if rank_state is None or checkpoint.world_size != platform.world_size:
            raise CheckpointError(f"{checkpoint.path} was written mid-megabatch by "
                                  f"{checkpoint.world_size} ranks: resume it with as many")
        progress = MegabatchProgress(**saved["progress"], epoch_sums=rank_state["epoch_sums"])
        engine.module.load_state_dict(rank_state["buffers"], strict=False)
        log.info("resuming megabatch %d at epoch %d, step %d from %s", progress.megabatch,
                 progress.epoch + 1, progress.steps_done, checkpoint.path)
    else:
        log.info("resuming after megabatch %d from %s", state.completed, checkpoint.path)
    return state, progress


def train(config: Config, manifest: Manifest, stream: MegabatchStream, platform: Platform,
          callbacks: list[MegabatchCallback] | None = None) -> RunState:
    """Run (or resume) the megabatch loop on this rank; `callbacks` hear every megabatch."""
    run_dir = run_directory(config)
    if platform.is_primary:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(config))
        except OSError as error:
            raise ConfigError(f"config key 'run.dir': cannot write to {run_dir} "
                              f"({error.strerror or error})") from None
        if config.data.verify_checksums:
            for split in manifest.splits.values():
                for shard in split.shards:
                    verify_shard(config.data.shards, shard)
    platform.barrier()
    seed_everything(config.run.seed)

    try:
        model = build_model(config.model.name, manifest.num_classes, in_channels=manifest.channels,
                            stem=config.model.stem, mean=config.model.mean, std=config.model.std)
    except ValueError as error:  # a model/stem/channels combination the registry refuses
        raise ConfigError(f"config key 'model': {error}") from None
    masks = MaskSet(model, attach_masks(model, config.prune.include_linear))
    engine = build_engine(config, model, masks, platform)
    checkpointer = Checkpointer(run_dir, platform, config.checkpoint.keep_last)
    state, progress = resume_state(config, checkpointer, engine, masks, platform)
    if not state.wandb_id:
        state.wandb_id = platform.broadcast_object(uuid.uuid4().hex[:12])

    schedule = density_schedule(config.prune.method, config.data.megabatches,
                                sparsity_level(config.prune))
    reader = StreamReader(Path(config.data.shards), manifest, stream, config.data,
                          config.train.batch_size // platform.world_size, platform,
                          config.run.seed, perf=config.perf)
    metrics = MetricsLog(run_dir, state.history) if platform.is_primary else None
    wandb = (WandbLog(config, run_dir, state.wandb_id, state.history) if platform.is_primary
             else None)
    log.info("run %s: %s/%s on %s, %d rank(s) on %s, %d megabatches, final density %.3f",
             run_dir, config.prune.method, config.prune.criterion, manifest.dataset,
             platform.world_size, platform.device, config.data.megabatches,
             schedule[-1] if config.prune.method != "dense" else 1.0)
    loop = MegabatchLoop(config, platform, reader, engine, schedule, checkpointer, metrics, wandb,
                         callbacks)
    try:
        state = loop.run(state, progress)
    finally:
        if wandb is not None:
            wandb.finish()
    if platform.is_primary:
        print(summary_table(state.history), flush=True)
    return state


def main(argv: list[str] | None = None) -> int:
    try:
        config_path, overrides = parse_arguments(argv)
        config = load_config(config_path, overrides)
        manifest, stream = prepare(config)
    except AppDistError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    start_reader_server(config.data.num_workers)
    platform = start_platform(config.run.device, config.engine.timeout_s)
    setup_logging(platform)
    try:
        train(config, manifest, stream, platform)
    except AppDistError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except Preempted as notice:
        log.warning("%s; run the same command again to continue", notice)
        return Preempted.exit_code
    finally:
        stop_readers()
        platform.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
