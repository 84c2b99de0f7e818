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
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from app_dist.errors import ConfigError

REPLAY_POLICIES = ("full", "none", "window", "buffer")
AUGMENTATIONS = ("none", "cifar", "imagenet")
PRUNE_METHODS = ("dense", "osp", "app")
CRITERIA = ("snip", "magnitude", "random")
SCOPES = ("global", "local")
WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("ddp",)


@dataclass
class RunSettings:
    name: str = "app"
    # Empty: runs/<name>-<hash of the settings>, so the same command finds its own run again.
    dir: str = ""
    seed: int = 1
    device: str = "auto"


@dataclass
class DataSettings:
    shards: str = "data/digits"  # a folder holding manifest.json (see app_dist.data.shards)
    megabatches: int = 4
    val_fraction: float = 0.1
    replay: str = "full"
    replay_window: int = 2  # megabatches kept by replay=window
    replay_buffer: int = 1000  # training samples kept by replay=buffer
    augment: str = "cifar"
    image_size: int = 224  # crop size for augment=imagenet
    num_workers: int = 2
    shuffle_buffer: int = 1000
    eval_batch_size: int = 512
    verify_checksums: bool = True


@dataclass
class ModelSettings:
    name: str = "resnet20s"
    stem: str = "cifar"
    mean: List[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: List[float] = field(default_factory=lambda: [0.2470, 0.2435, 0.2616])


@dataclass
class TrainSettings:
    epochs: int = 50  # per megabatch
    batch_size: int = 64  # global: split evenly over the ranks
    lr: float = 0.1  # restarted at every megabatch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: List[int] = field(default_factory=lambda: [20, 40])
    gamma: float = 0.1


@dataclass
class PruneSettings:
    method: str = "app"
    criterion: str = "snip"
    scope: str = "global"
    sparsity_level: float = 4.5  # tau: final density 0.8 ** tau
    target_density: Optional[float] = None  # when set, replaces sparsity_level
    snip_fraction: float = 0.2
    include_linear: bool = False


@dataclass
class EngineSettings:
    kind: str = "ddp"
    timeout_s: int = 600  # collective timeout: a lost rank fails the job instead of hanging it


@dataclass
class CheckpointSettings:
    resume: bool = True
    keep_last: int = 2
    allow_config_change: bool = False
    allow_world_size_change: bool = False


@dataclass
class WandbSettings:
    mode: str = "offline"
    project: str = "app-dist"
    group: str = ""


@dataclass
class LogSettings:
    progress: bool = True
    wandb: WandbSettings = field(default_factory=WandbSettings)


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


# Keys that may differ between a run and its resume without changing what is computed.
RESUME_NEUTRAL_PREFIXES = ("checkpoint.", "log.", "run.dir", "data.verify_checksums")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Schema <- YAML file <- `key=value` overrides, validated; raises ConfigError on bad input."""
    merged = OmegaConf.structured(Config)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for override in overrides or []:
            if "=" not in override:
                raise ConfigError(f"override '{override}' is not of the form key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error, path)) from None
    config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(config)
    return config


def _one_line(error: OmegaConfBaseException, path: Path | None) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    where = f" in {path}" if path is not None else ""
    if key:
        return f"config key '{key}'{where}: {message}"
    return f"config{where}: {message}"


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: {rule}")


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
    _require(data.num_workers >= 0, "data.num_workers", data.num_workers, "must be >= 0")
    _require(data.shuffle_buffer >= 1, "data.shuffle_buffer", data.shuffle_buffer, "must be >= 1")
    _require(data.eval_batch_size >= 1, "data.eval_batch_size", data.eval_batch_size,
             "must be >= 1")
    _require(len(config.model.mean) == len(config.model.std), "model.std", config.model.std,
             "must have as many entries as model.mean")
    _require(all(s > 0 for s in config.model.std), "model.std", config.model.std, "must be > 0")
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
    if prune.target_density is not None:
        _require(0 < prune.target_density <= 1, "prune.target_density", prune.target_density,
                 "density must be in (0, 1]")
    else:
        _require(prune.sparsity_level >= 1, "prune.sparsity_level", prune.sparsity_level,
                 "must be >= 1 (final density 0.8 ** sparsity_level <= 0.8)")
    _require(0 < prune.snip_fraction <= 1, "prune.snip_fraction", prune.snip_fraction,
             "must be in (0, 1]")
    _one_of("engine.kind", config.engine.kind, ENGINES)
    _require(config.engine.timeout_s >= 1, "engine.timeout_s", config.engine.timeout_s,
             "must be >= 1")
    _require(config.checkpoint.keep_last >= 1, "checkpoint.keep_last",
             config.checkpoint.keep_last, "must be >= 1 (the newest checkpoint is always kept)")
    _one_of("log.wandb.mode", config.log.wandb.mode, WANDB_MODES)


def final_density(prune: PruneSettings) -> float:
    """The density a pruned run ends at: target_density if given, else 0.8 ** sparsity_level."""
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
    """A short stable hash of the settings that decide what a run computes."""
    text = json.dumps(computation_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def changed_settings(saved: dict[str, Any], current: Config) -> list[str]:
    """`key: saved -> current` for every computation setting that differs."""
    now = computation_settings(current)
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def run_directory(config: Config) -> Path:
    if config.run.dir:
        return Path(config.run.dir)
    return Path("runs") / f"{config.run.name}-{config_hash(config)}"
