"""The run configuration: a typed schema, YAML files, dotlist overrides, one-line errors.

The dataclasses below are the single source of truth for every setting. `load_config` merges
a YAML file and `key=value` overrides onto them; OmegaConf rejects unknown keys and wrong
types, `validate` rejects impossible values, and both surface as `ConfigError` naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Union

from omegaconf import DictConfig, OmegaConf

from app_dist.foundations.config_loading import key_rule_checker, load_structured
from app_dist.foundations.storage import check_location
from app_dist.models.names import MODEL_NAMES, STEMS
from app_dist.pruning.structures import BUDGETS, CHANNEL_CRITERIA, N_M_CRITERIA, parse_structure

REPLAY_POLICIES = ("full", "none", "window", "buffer")
AUGMENTATIONS = ("none", "cifar", "imagenet")
BAD_SAMPLE_POLICIES = ("error", "skip")
PRUNE_METHODS = ("dense", "osp", "app")
CRITERIA = ("snip", "magnitude", "random", "grasp", "synflow")
SCORINGS = ("split", "whole")
SCOPES = ("global", "local")
# ... or an N:M pattern "N:M" (2:4, 4:8; app_dist/pruning/structures.py parses and checks it).
STRUCTURES = ("unstructured", "channel")
WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("ddp", "deepspeed")
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_MODES = ("off", "bf16", "fp16")
LOADERS = ("torch", "dali")
# A speed switch's values: auto (decided per device and engine when the run starts, see
# app_dist.engine.acceleration.resolve_perf), or on/off as the user says.
AUTO = "auto"
SWITCH_VALUES = (AUTO, "true", "false")
# The smallest final density a run may ask for: 1e-6 keeps 25 weights of ResNet-50 and 0 of
# most smaller networks, so anything below is a typo (sparsity_level=200: density 4e-20).
MIN_DENSITY = 1e-6


@dataclass
class RunSettings:
    name: str = "app"  # names the run directory and the wandb run
    # Empty: runs/<name>-<hash of the settings>, so the same command finds its own run again.
    dir: str = ""
    # Initial weights, augmentation, reader shuffles, random-criterion scores, and the
    # megabatches' validation splits unless data.stream_seed is set. Not which samples form
    # a megabatch: that is data.stream_seed's (pruning ties go by flat index, no seed).
    seed: int = 1
    device: str = "auto"  # auto: cuda when a GPU is visible (nccl), else cpu (gloo)


@dataclass
class DataSettings:
    # A folder holding manifest.json (see app_dist.data.prepare.shards): a local path, or a
    # URL: s3://bucket/prefix, gs://bucket/prefix, http(s)://host/path (see data.cache_dir).
    shards: str = "data/digits"
    megabatches: int = 4  # T: equal chunks the training set arrives in (ALMA)
    val_fraction: float = 0.1  # of every megabatch, held out for best-epoch selection
    # Permutes the training shards into megabatches and draws the validation splits, so
    # that seeds vary the data each megabatch holds. null: the shards' written order (the
    # shard writer's --seed) and validation splits drawn from run.seed.
    stream_seed: Optional[int] = None
    replay: str = "full"  # what megabatch t trains on: full = all of 1..t (paper)
    replay_window: int = 2  # megabatches kept by replay=window
    replay_buffer: int = 1000  # training samples kept by replay=buffer
    augment: str = "cifar"  # train only: pad-crop + flip (cifar), resized crop + flip (imagenet)
    image_size: int = 224  # crop size for augment=imagenet
    num_workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 1000  # samples in the streaming shuffle buffer of each reader
    # Per rank, for validation and test passes. 0 = auto: the per-rank training batch on the
    # CPU (small batches stay in cache: resnet20s evaluates 1.7x faster at 64 than at 512 on
    # 2 cores), 512 on a GPU.
    eval_batch_size: int = 0
    # sha256 of every local shard against the manifest at start (remote shards: each one
    # as it arrives, always).
    verify_checksums: bool = True
    # A stream whose megabatches arrive while the run trains (`app-dist shards append`):
    # train megabatch t as soon as it is published, then wait for t+1.
    follow: bool = False
    follow_timeout_s: float = 86400.0  # waiting longer for one megabatch stops the run
    follow_poll_s: float = 2.0  # how often the stream's manifest is read while waiting
    # Remote shards (data.shards = s3://, gs://, http(s)://...): fetched into this node's
    # shard cache, shared by its ranks and runs, named by sha256 so never stale.
    cache_dir: str = "~/.cache/app-dist/shards"
    cache_max_gb: float = 50.0  # least recently used shards leave past it
    fetch_attempts: int = 5  # per shard and file, before the run stops naming it
    fetch_backoff_s: float = 1.0  # wait before the 2nd attempt; doubled before each next one
    # A sample with no/out-of-range label or an undecodable image: error (stop, naming shard
    # and key) or skip (count it; in training its slot is refilled so ranks stay in step).
    bad_samples: str = "error"


@dataclass
class ModelSettings:
    # resnet20s/32s/44s/56s, resnet18/34/50, vgg16_bn, digits_cnn, vit_cifar (32x32),
    # vit_digits (8x8; ViTs: set prune.include_linear=true to prune their Linear layers)
    name: str = "resnet20s"
    stem: str = "cifar"  # cifar: 3x3 conv for 32x32 inputs; imagenet: 7x7/2 + max-pool
    # Input normalisation inside the model, one value per channel (CIFAR-10 here).
    mean: List[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: List[float] = field(default_factory=lambda: [0.2470, 0.2435, 0.2616])
    # BatchNorm in training normalises with the statistics of the global batch (all ranks'
    # shares together) instead of each rank's share, so training does not depend on the
    # number of ranks through them: one small all-reduce per BatchNorm layer per forward and
    # backward (docs/CRITERIA.md).
    sync_batchnorm: bool = False  # DDP and DeepSpeed; no effect in a single process


@dataclass
class TrainSettings:
    epochs: int = 50  # per megabatch
    batch_size: int = 64  # global: split evenly over the ranks
    lr: float = 0.1  # restarted at every megabatch
    momentum: float = 0.9  # SGD momentum, carried over between megabatches
    weight_decay: float = 1e-4  # SGD weight decay (pruned weights stay exactly zero)
    milestones: List[int] = field(default_factory=lambda: [20, 40])  # epochs: lr *= gamma
    gamma: float = 0.1  # MultiStepLR decay factor at each milestone
    # Stop a megabatch's training after this many epochs without a validation accuracy gain
    # of more than min_delta over its best so far (ALMA's code: 25). 0 = off, as in the paper.
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0  # gain needed to count as a new best (with patience)


@dataclass
class PruneSettings:
    method: str = "app"  # dense, osp (one-shot at t=1) or app (progressive, every t)
    criterion: str = "snip"  # the score that decides which weights to keep
    scope: str = "global"  # global: one threshold over all layers; local: each layer to d_t
    sparsity_level: float = 4.5  # tau: final density 0.8 ** tau
    target_density: Optional[float] = None  # when set, replaces sparsity_level
    snip_fraction: float = 0.2  # of a megabatch's training part, scored by SNIP/GraSP
    include_linear: bool = False  # also prune Linear layers (never the classifier)
    synflow_iterations: int = 100  # re-scoring rounds of each SynFlow prune step (paper: 100)
    # Who scores SNIP/GraSP's sample. split: each rank its share, the sums all-reduced (fast;
    # batch composition and BatchNorm statistics depend on the number of ranks). whole: every
    # rank the whole sample in the same global batches: a pruning step's masks do not depend
    # on the number of ranks, at world-size times the scoring compute.
    scoring: str = "split"
    # What one pruned unit is. unstructured: single weights (the paper). channel: whole
    # convolution filters with their BatchNorm channel and the readers' input channels,
    # residual-coupled channels together (docs/CRITERIA.md); `app-dist export` then writes a
    # physically smaller dense model. Criteria: snip, magnitude, random; scope global.
    # N:M (2:4, 4:8, any 0 < N < M with M 4 or 8): at most N of every M consecutive weights
    # along a layer's input dimension, progressive as N falls (app: M at t=1 down to N at
    # t=T; osp: N at t=1); the density follows from N, so no target_density. Export
    # marks the 2:4 Linear layers for torch's semi-structured sparse GPU kernels.
    structure: str = "unstructured"
    # What the density schedule counts with prune.structure=channel. weights: the kept share
    # of the convolutions' weights (as unstructured runs). flops: their kept share of
    # multiply-accumulates on the stream's image size, which inference time follows (a
    # weight of a 32x32 layer costs 16 times one of an 8x8 layer); target_density=0.333 then
    # means a third of the dense FLOPs.
    budget: str = "weights"


@dataclass
class EngineSettings:
    kind: str = "ddp"  # ddp | deepspeed
    timeout_s: int = 600  # collective timeout: a lost rank fails the job instead of hanging it
    # DeepSpeed only (app_dist/engine/deepspeed_config.py translates these):
    zero_stage: int = 1  # 0, 1 or 2; ZeRO-3 is refused (masks need whole weights)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (half precisions: GPU and ZeRO 1/2 only)
    gradient_accumulation: int = 1  # micro-batches of train.batch_size per optimizer step
    gradient_clipping: float = 0.0  # max global gradient norm; 0 = off
    deepspeed_config: str = ""  # a raw DeepSpeed JSON whose keys override the translated ones


@dataclass
class CheckpointSettings:
    resume: bool = True  # continue from the newest checkpoint that verifies
    keep_last: int = 2  # megabatch checkpoints kept on disk
    allow_config_change: bool = False  # resume although computation settings changed
    allow_world_size_change: bool = False  # resume with another number of ranks
    # After every megabatch, rank 0 publishes the model as it is then (the anytime model) in
    # the compact sparse export form, with its metrics: "" = RUN_DIR/anytime/, or a folder,
    # s3:// or gs:// URL (the newest replaces the last, atomically). "off": not published.
    anytime_to: str = ""


@dataclass
class WandbSettings:
    mode: str = "offline"  # offline: files in RUN_DIR/wandb, `wandb sync` uploads later
    project: str = "app-dist"  # the wandb project
    group: str = ""  # wandb group: runs of one sweep share it


@dataclass
class LogSettings:
    progress: bool = True  # tqdm progress bars on rank 0
    wandb: WandbSettings = field(default_factory=WandbSettings)


# Speed switches. The switches that are `auto | true | false` default to auto: on where they
# are faster, decided when the run starts from its device and engine (the run's log says what
# auto chose). The cache and worker switches give bit-identical results; channels_last,
# fold_batchnorm, compile and cudnn_benchmark change float rounding (each is deterministic,
# but a run with one on ends at other metrics than a run with it off); autocast computes in
# half precision. docs/PERFORMANCE.md says what each one buys and costs.
@dataclass
class PerfSettings:
    # Keep every decoded sample (uint8) in memory per rank once read, augment from there:
    # each image is decoded once per run instead of once per pass. auto: on when the
    # manifest's images share one size and the whole dataset decoded fits in cache_max_mb.
    cache_decoded: Union[bool, str] = AUTO
    cache_max_mb: int = 4096  # per rank; past it samples are read from the shards again
    # DataLoader worker processes live for the whole run instead of one pass each. auto: on.
    persistent_workers: Union[bool, str] = AUTO
    # At a megabatch's first epoch, get the next megabatch's new shards ready in the
    # background: fetched into the shard cache (remote shards) or read ahead by the OS.
    prefetch_shards: bool = True
    pin_memory: bool = True  # page-locked batches and non-blocking copies (GPU only)
    # NHWC weights and activations (faster convolutions on GPUs and with mkldnn on CPUs).
    # auto: on with engine.kind=ddp, off with deepspeed (which cannot broadcast NHWC weights).
    channels_last: Union[bool, str] = AUTO
    autocast: str = "off"  # off | bf16 | fp16: mixed-precision forward (GPU, engine ddp)
    # torch.compile the model (training and evaluation forward). auto: on on a GPU with
    # engine.kind=ddp; off on the CPU, where compiling takes minutes.
    compile: Union[bool, str] = AUTO
    # Decode JPEG batches on the GPU (torchvision.io.decode_jpeg), for 224x224-class images.
    gpu_decode: bool = False
    # Who decodes and augments the readers' batches: torch (the readers themselves, or
    # gpu_decode) or dali (an NVIDIA DALI pipeline: nvJPEG on a GPU, its CPU operators on a
    # CPU-only machine; JPEG shards only). Same samples, order and draws either way.
    loader: str = "torch"
    # cuDNN times its convolution algorithms on the first batch of each shape and keeps the
    # fastest: faster on fixed-size GPU inputs, but the choice (and the float rounding) may
    # differ between runs, so metrics are reproducible only to float tolerance. auto: on on
    # a GPU; the CPU has no cuDNN.
    cudnn_benchmark: Union[bool, str] = AUTO
    # Evaluate a copy of the model with each BatchNorm folded into the convolution before
    # it: one pass over the activations fewer; metrics equal to float rounding. auto: on.
    fold_batchnorm: Union[bool, str] = AUTO


@dataclass
class Config:
    run: RunSettings = field(default_factory=RunSettings)
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    prune: PruneSettings = field(default_factory=PruneSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    log: LogSettings = field(default_factory=LogSettings)
    perf: PerfSettings = field(default_factory=PerfSettings)


# Keys that may differ between a run and its resume without changing what is computed.
# data.bad_samples: a run stopped by a bad sample must resume with skip. Up to the stop it
# computed exactly what a skipping run computes (it had met no bad sample). The shard cache
# and fetch settings change where bytes wait, never which bytes (each shard's sha256 is checked).
RESUME_NEUTRAL_PREFIXES = ("checkpoint.", "log.", "run.dir", "data.verify_checksums",
                           "data.bad_samples", "data.cache_dir", "data.cache_max_gb",
                           "data.follow",
                           "data.fetch_attempts", "data.fetch_backoff_s",
                           "perf.cache_decoded", "perf.cache_max_mb", "perf.persistent_workers",
                           "perf.prefetch_shards", "perf.pin_memory")


# The perf switches whose default is auto.
AUTO_SWITCHES = ("cache_decoded", "persistent_workers", "channels_last", "fold_batchnorm",
                 "compile", "cudnn_benchmark")


def switch_text(value: bool | str) -> str:
    """A switch's value as a config file spells it: auto, true or false."""
    return str(value).lower() if isinstance(value, bool) else value


def plain_perf(**switches: bool) -> PerfSettings:
    """Every auto switch off, then `switches` on or off: the settings of a run with no
    speed-up beyond the ones that are plainly on (pin_memory, prefetch_shards), which the
    exact switches are tested against and readers built outside a run use."""
    return PerfSettings(**{**{name: False for name in AUTO_SWITCHES}, **switches})


def require_resolved(perf: PerfSettings) -> None:
    """Code that acts on the switches gets them resolved (resolve_perf): a truthy "auto"
    must never pass for an explicit true."""
    unresolved = [name for name in AUTO_SWITCHES if not isinstance(getattr(perf, name), bool)]
    if unresolved:
        raise ValueError(f"perf.{unresolved[0]} is {getattr(perf, unresolved[0])!r}: resolve "
                         "auto for the run's device first "
                         "(app_dist.engine.acceleration.resolve_perf)")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Schema <- YAML file <- `key=value` overrides, validated; raises ConfigError on bad input.
    `path` None: the schema defaults (for code and tests; commands require a file)."""
    config = load_structured(Config, path, overrides or [], family="config")
    validate(config)
    return config


_require = key_rule_checker("config")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, value, f"must be one of {', '.join(choices)}")


def validate(config: Config) -> None:
    """Reject impossible values before any process group starts."""
    data, train, prune = config.data, config.train, config.prune
    _one_of("run.device", config.run.device, DEVICES)
    _require(data.megabatches >= 1, "data.megabatches", data.megabatches, "must be >= 1")
    _require(0 < data.val_fraction < 1, "data.val_fraction", data.val_fraction, "must be in (0, 1)")
    _one_of("data.replay", data.replay, REPLAY_POLICIES)
    _require(data.replay_window >= 1, "data.replay_window", data.replay_window, "must be >= 1")
    _require(data.replay_buffer >= 1, "data.replay_buffer", data.replay_buffer, "must be >= 1")
    _one_of("data.augment", data.augment, AUGMENTATIONS)
    _one_of("data.bad_samples", data.bad_samples, BAD_SAMPLE_POLICIES)
    _require(data.num_workers >= 0, "data.num_workers", data.num_workers, "must be >= 0")
    _require(data.shuffle_buffer >= 1, "data.shuffle_buffer", data.shuffle_buffer, "must be >= 1")
    _require(data.cache_max_gb > 0, "data.cache_max_gb", data.cache_max_gb, "must be > 0")
    _require(data.follow_timeout_s > 0, "data.follow_timeout_s", data.follow_timeout_s,
             "must be > 0")
    _require(data.follow_poll_s > 0, "data.follow_poll_s", data.follow_poll_s, "must be > 0")
    _require(data.fetch_attempts >= 1, "data.fetch_attempts", data.fetch_attempts,
             "must be >= 1")
    _require(data.fetch_backoff_s >= 0, "data.fetch_backoff_s", data.fetch_backoff_s,
             "must be >= 0")
    _require(data.eval_batch_size >= 0, "data.eval_batch_size", data.eval_batch_size,
             "must be >= 0 (0: auto)")
    _require(len(config.model.mean) == len(config.model.std), "model.std", config.model.std,
             "must have as many entries as model.mean")
    _require(all(s > 0 for s in config.model.std), "model.std", config.model.std, "must be > 0")
    _one_of("model.name", config.model.name, MODEL_NAMES)
    _one_of("model.stem", config.model.stem, STEMS)
    _require(train.epochs >= 1, "train.epochs", train.epochs, "must be >= 1")
    _require(train.batch_size >= 1, "train.batch_size", train.batch_size, "must be >= 1")
    _require(train.lr > 0, "train.lr", train.lr, "must be > 0")
    _require(0 <= train.momentum < 1, "train.momentum", train.momentum, "must be in [0, 1)")
    _require(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "must be >= 0")
    _require(list(train.milestones) == sorted(train.milestones), "train.milestones",
             train.milestones, "must be increasing")
    _one_of("prune.method", prune.method, PRUNE_METHODS)
    _one_of("prune.criterion", prune.criterion, CRITERIA)
    _one_of("prune.scope", prune.scope, SCOPES)
    _one_of("prune.scoring", prune.scoring, SCORINGS)
    _validate_structure(config)
    _one_of("prune.budget", prune.budget, BUDGETS)
    _require(prune.budget == "weights" or prune.structure == "channel", "prune.budget",
             prune.budget, "flops needs prune.structure=channel (unstructured and N:M zeros "
             "do not make convolutions cheaper)")
    if prune.structure == "channel":
        _require(prune.criterion in CHANNEL_CRITERIA, "prune.criterion", prune.criterion,
                 "has no channel form with prune.structure=channel (GraSP's signed per-weight "
                 "scores and SynFlow's per-weight rounds do not add up to a channel's effect); "
                 f"use one of {', '.join(CHANNEL_CRITERIA)}")
        _require(prune.scope == "global", "prune.scope", prune.scope,
                 "must be global with prune.structure=channel (residual-coupled channels span "
                 "several layers, so no per-layer density can be met)")
        _require(not prune.include_linear, "prune.include_linear", prune.include_linear,
                 "must be false with prune.structure=channel (channels are convolution "
                 "filters)")
    if prune.target_density is not None:
        _require(0 < prune.target_density <= 1, "prune.target_density", prune.target_density,
                 "density must be in (0, 1]")
        _require(prune.target_density >= MIN_DENSITY, "prune.target_density",
                 prune.target_density, "must be >= 1e-6 (a smaller density keeps no weight of "
                 "a real network)")
        # APP's first step is density 0.8 (level 1); a target above it would make the
        # schedule rise and every later prune a no-op while reports print the target.
        _require(prune.method != "app" or prune.target_density <= 0.8, "prune.target_density",
                 prune.target_density, "must be <= 0.8 with prune.method=app (its first step "
                 "prunes to 0.8); for a single prune to a higher density use prune.method=osp")
    else:
        _require(prune.sparsity_level >= 1, "prune.sparsity_level", prune.sparsity_level,
                 "must be >= 1 (final density 0.8 ** sparsity_level <= 0.8)")
        _require(0.8**prune.sparsity_level >= MIN_DENSITY, "prune.sparsity_level",
                 prune.sparsity_level, "must be <= 61.9 (final density 0.8 ** sparsity_level "
                 ">= 1e-6; a smaller density keeps no weight of a real network)")
    _require(prune.synflow_iterations >= 1, "prune.synflow_iterations",
             prune.synflow_iterations, "must be >= 1")
    _require(train.early_stopping_patience >= 0, "train.early_stopping_patience",
             train.early_stopping_patience, "must be >= 0 (0 turns early stopping off)")
    _require(train.early_stopping_min_delta >= 0, "train.early_stopping_min_delta",
             train.early_stopping_min_delta, "must be >= 0 (a fraction of accuracy)")
    _require(0 < prune.snip_fraction <= 1, "prune.snip_fraction", prune.snip_fraction,
             "must be in (0, 1]")
    _one_of("engine.kind", config.engine.kind, ENGINES)
    _require(config.engine.timeout_s >= 1, "engine.timeout_s", config.engine.timeout_s,
             "must be >= 1")
    _validate_engine(config)
    _validate_perf(config)
    if config.checkpoint.anytime_to not in ("", "off"):
        check_location(config.checkpoint.anytime_to, "checkpoint.anytime_to", writable=True)
    _require(config.checkpoint.keep_last >= 1, "checkpoint.keep_last",
             config.checkpoint.keep_last, "must be >= 1 (the newest checkpoint is always kept)")
    _one_of("log.wandb.mode", config.log.wandb.mode, WANDB_MODES)


def _validate_structure(config: Config) -> None:
    """prune.structure: a word of STRUCTURES or an N:M pattern, and what N:M excludes."""
    prune = config.prune
    try:
        pattern = parse_structure(prune.structure)
    except ValueError as error:
        _require(False, "prune.structure", prune.structure, f"N:M pattern: {error}")
        return
    if pattern is None and prune.structure.isdigit():
        # An unquoted `structure: 2:4` in a YAML file arrives as the base-60 number 124.
        n, m = divmod(int(prune.structure), 60)
        _require(False, "prune.structure", prune.structure,
                 f"YAML reads an unquoted {n}:{m} as the base-60 number {prune.structure}: "
                 f'quote it, "{n}:{m}"')
    _require(pattern is not None or prune.structure in STRUCTURES, "prune.structure",
             prune.structure, "must be unstructured, channel or an N:M pattern (0 < N < M, M 4 "
             "or 8: 2:4, 4:8, ...)")
    if pattern is None:
        return
    _require(prune.target_density is None, "prune.target_density", prune.target_density,
             "must be unset with an N:M prune.structure (the density follows from N: N/M)")
    _require(prune.criterion in N_M_CRITERIA, "prune.criterion", prune.criterion,
             "has no N:M form (SynFlow's iterated rounds prune towards an unstructured "
             "density); use snip, magnitude, random or grasp with an N:M prune.structure")


def _validate_engine(config: Config) -> None:
    engine = config.engine
    _require(engine.zero_stage in (0, 1, 2), "engine.zero_stage", engine.zero_stage,
             "must be 0, 1 or 2 (ZeRO-3 is not supported: its partitioned weights are empty "
             "outside forward, where masks and pruning scores need them)")
    _one_of("engine.precision", engine.precision, PRECISIONS)
    _require(engine.gradient_accumulation >= 1, "engine.gradient_accumulation",
             engine.gradient_accumulation, "must be >= 1")
    _require(engine.gradient_clipping >= 0, "engine.gradient_clipping",
             engine.gradient_clipping, "must be >= 0 (0 turns clipping off)")
    if engine.kind != "deepspeed":
        for key, value, default in (("precision", engine.precision, "fp32"),
                                    ("gradient_accumulation", engine.gradient_accumulation, 1),
                                    ("gradient_clipping", engine.gradient_clipping, 0.0),
                                    ("deepspeed_config", engine.deepspeed_config, "")):
            _require(value == default, f"engine.{key}", value,
                     f"only engine.kind=deepspeed uses it (engine.kind is '{engine.kind}')")
        return
    half = engine.precision != "fp32"
    _require(not half or engine.zero_stage >= 1, "engine.precision", engine.precision,
             "needs engine.zero_stage 1 or 2 (at stage 0 DeepSpeed's half-precision optimizer "
             "keeps an fp32 master copy that masks cannot reach)")
    _require(not half or config.run.device != "cpu", "engine.precision", engine.precision,
             "half precision needs a GPU (run.device is cpu); use fp32")
    _require(not engine.deepspeed_config or Path(engine.deepspeed_config).is_file(),
             "engine.deepspeed_config", engine.deepspeed_config,
             "no such file (must name a DeepSpeed JSON file)")


def _validate_perf(config: Config) -> None:
    perf = config.perf
    # Each switch spelled out: docs/CONFIG.md lists the rules of the literal keys.
    _one_of("perf.cache_decoded", switch_text(perf.cache_decoded), SWITCH_VALUES)
    _one_of("perf.persistent_workers", switch_text(perf.persistent_workers), SWITCH_VALUES)
    _one_of("perf.channels_last", switch_text(perf.channels_last), SWITCH_VALUES)
    _one_of("perf.compile", switch_text(perf.compile), SWITCH_VALUES)
    _one_of("perf.cudnn_benchmark", switch_text(perf.cudnn_benchmark), SWITCH_VALUES)
    _one_of("perf.fold_batchnorm", switch_text(perf.fold_batchnorm), SWITCH_VALUES)
    _require(perf.cache_max_mb >= 1, "perf.cache_max_mb", perf.cache_max_mb, "must be >= 1")
    _one_of("perf.autocast", perf.autocast, AUTOCAST_MODES)
    on_cpu = config.run.device == "cpu"
    _require(perf.autocast == "off" or not on_cpu, "perf.autocast", perf.autocast,
             "mixed precision is for GPUs (run.device is cpu); use off")
    _require(perf.autocast == "off" or config.engine.kind == "ddp", "perf.autocast",
             perf.autocast, "engine.kind=deepspeed sets its precision with engine.precision")
    _require(perf.channels_last is not True or config.engine.kind == "ddp", "perf.channels_last",
             perf.channels_last, "engine.kind=deepspeed broadcasts parameters as flat bytes, "
             "which channels_last weights are not; use engine.kind=ddp or channels_last=false")
    _require(not perf.gpu_decode or not on_cpu, "perf.gpu_decode", perf.gpu_decode,
             "decoding on the GPU needs a GPU (run.device is cpu)")
    _require(not (perf.gpu_decode and perf.cache_decoded is True), "perf.gpu_decode",
             perf.gpu_decode,
             "cannot be combined with perf.cache_decoded (the cache holds CPU-decoded images)")
    _require(not (perf.gpu_decode and config.data.bad_samples == "skip"), "perf.gpu_decode",
             perf.gpu_decode, "cannot be combined with data.bad_samples=skip (an image that "
             "fails on the GPU is found after its batch was formed)")
    _one_of("perf.loader", perf.loader, LOADERS)
    dali = perf.loader == "dali"
    _require(not (dali and perf.gpu_decode), "perf.loader", perf.loader,
             "cannot be combined with perf.gpu_decode (both decode the readers' JPEG "
             "batches: choose one)")
    _require(not (dali and perf.cache_decoded is True), "perf.loader", perf.loader,
             "cannot be combined with perf.cache_decoded (the cache holds torch-decoded images)")
    _require(not (dali and config.data.bad_samples == "skip"), "perf.loader", perf.loader,
             "cannot be combined with data.bad_samples=skip (DALI decodes a whole batch at "
             "once: a bad image is found after its batch was formed)")


def final_density(prune: PruneSettings) -> float:
    """The density a pruned run ends at: target_density if given, else 0.8 ** sparsity_level;
    N/M for an N:M structure (that of its layers with groups of M; others stay dense)."""
    pattern = parse_structure(prune.structure)
    if pattern is not None:
        return pattern.density
    if prune.target_density is not None:
        return prune.target_density
    return 0.8**prune.sparsity_level


def sparsity_level(prune: PruneSettings) -> float:
    """tau, derived from target_density when that is how the user gave the target."""
    if prune.target_density is not None:
        return math.log(prune.target_density) / math.log(0.8)
    return prune.sparsity_level


def to_dict(config: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, (dict, DictConfig)):
            flat.update(flatten(dict(value), f"{name}."))
        else:
            flat[name] = value
    return flat


def computation_settings(config: Config) -> dict[str, Any]:
    """The flattened settings that decide what a run computes (resume-neutral keys left out)."""
    return {
        key: value
        for key, value in flatten(to_dict(config)).items()
        if not key.startswith(RESUME_NEUTRAL_PREFIXES)
    }


def config_hash(config: Config) -> str:
    """A short stable hash of the settings that decide what a run computes. Only settings away
    from their defaults enter it, so a key a later version adds (at the default, which computes
    what the earlier version did) leaves the default run directory `runs/<name>-<hash>` of the
    same command where it was, and the command resumes there."""
    defaults = _default_settings()
    chosen = {k: v for k, v in computation_settings(config).items()
              if k not in defaults or defaults[k] != v}
    text = json.dumps(chosen, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def changed_settings(saved: dict[str, Any], current: Config) -> list[str]:
    """`key: saved -> current` for every computation setting that differs. A key the saved
    run does not record (it was written by a version without it) counts as its default."""
    now = computation_settings(current)
    defaults = _default_settings()
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k, defaults.get(k))!r} -> {now.get(k)!r}" for k in keys
            if saved.get(k, defaults.get(k)) != now.get(k)]


def _default_settings() -> dict[str, Any]:
    return computation_settings(Config())


def run_directory(config: Config) -> Path:
    if config.run.dir:
        return Path(config.run.dir)
    return Path("runs") / f"{config.run.name}-{config_hash(config)}"
