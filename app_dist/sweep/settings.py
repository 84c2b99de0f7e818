"""The sweep configuration: a typed schema over `configs/sweep_*.yaml`, its search space, and
validation that rejects a bad sweep before Ray starts, with one line naming the key.

A sweep file names a base training config (`configs/*.yaml`), fixed training overrides, and a
search space over any training key:

    search_space:
      prune.method: {grid: [app, osp, dense]}      # every value, in every sample
      prune.criterion: {choice: [snip, magnitude]}  # one value drawn per sample
      train.lr: {loguniform: [0.01, 0.2]}           # also: uniform, randint [low, high)

Relative paths (base_config, storage_path, run_root, data.shards) are resolved against the
project root (see `project_root`), so the same file works from the checkout and under
`ray submit`, which runs the script from the head node's home folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, ListConfig, OmegaConf

import app_dist
from app_dist.config import Config, load_config
from app_dist.data.source import load_manifest
from app_dist.foundations.config_loading import key_rule_checker, load_structured
from app_dist.foundations.errors import AppDistError, ConfigError
from app_dist.foundations.files import why_folder_cannot_be_made
from app_dist.foundations.storage import (
    LocalFolder,
    RemoteFolder,
    Retry,
    folder_at,
    is_remote,
    join,
    scheme_of,
)

# Top-level sections of the training config: `key=value` arguments under these go to every
# trial; anything else on the sweep command line overrides the sweep file itself.
TRAINING_SECTIONS = tuple(section.name for section in fields(Config))
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
DEFAULT_STORAGE = "runs/sweeps"
# What each trial reports once per megabatch (besides bookkeeping), and which way is better.
METRIC_DIRECTIONS = {
    "test_accuracy": "max",
    "val_accuracy": "max",
    "train_accuracy": None,
    "cer": "min",
    "cer_count": "min",
    "test_loss": "min",
    "generalization_gap": "min",
    "density": None,
}
# Keys the sweep sets for every trial itself: a search space or override naming them would be
# silently replaced, so it is refused instead.
RESERVED_TRAINING_KEYS = ("run.dir", "run.name")


@dataclass
class SchedulerSettings:
    kind: str = "asha"  # asha: stop weak trials at megabatch rungs; fifo: run every trial out
    metric: str = "test_accuracy"
    mode: str = "max"
    # The reported megabatch index. It equals Tune's training_iteration (one report per
    # megabatch) and, unlike it, stays right when Tune restarts a trial's driver.
    time_attr: str = "megabatch"
    grace_period: int = 1  # megabatches every trial trains before it can be stopped
    reduction_factor: float = 2.0
    # 0: one less than the most megabatches a trial can have. A rung at the last megabatch
    # would only kill a finishing trial before the trainer's own wrap-up (wandb, summary).
    max_t: int = 0


@dataclass
class WorkerResources:
    CPU: float = 1.0
    GPU: float = 0.0


@dataclass
class DriverResources:
    """The Tune trial process that starts and watches the trial's Ray Train run; it does no
    training. Ray refuses an empty request, so it asks for memory when it asks for no CPU."""

    CPU: float = 0.0
    memory_mb: int = 256
    # Custom Ray resources (`ray start --resources`), to keep trial drivers on nodes that stay,
    # e.g. {head: 0.01} with the head started with --resources '{"head": 1}': a driver on a
    # lost node takes its Ray Train controller along, and Tune must retry the whole trial.
    resources: Dict[str, float] = field(default_factory=dict)


@dataclass
class SweepSettings:
    name: str = "sweep"
    base_config: str = "configs/digits.yaml"
    overrides: List[str] = field(default_factory=list)  # key=value for every trial
    search_space: Dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1  # grid: repeats of the whole grid; otherwise: trials drawn
    search_seed: int = 0  # seeds the draws of choice/uniform/...: the same file, the same trials
    workers_per_trial: int = 2
    # 0: every trial trains on exactly workers_per_trial workers and waits while the cluster
    # cannot place them. k > 0: an elastic trial (Ray Train elastic scaling) on k to
    # workers_per_trial workers: it starts with as many as fit and, when a worker or node is
    # lost or resize_interval_s later more fit, restarts its worker group at the new size from
    # its last reported megabatch checkpoint (so a megabatch is trained on one size).
    min_workers_per_trial: int = 0
    resize_interval_s: float = 60.0  # elastic trials: how often Ray Train looks for more room
    resources_per_worker: WorkerResources = field(default_factory=WorkerResources)
    trial_driver: DriverResources = field(default_factory=DriverResources)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    max_concurrent_trials: int = 1
    # Per trial: worker failures Ray Train recovers from (the worker group restarts from the
    # last megabatch checkpoint), and, separately, failures of the trial driver Tune retries.
    max_failures: int = 1
    # The Tune experiment is storage_path/name: a folder, or s3:// / gs:// (Tune's results and
    # Ray Train's checkpoint copies then live in the bucket).
    storage_path: str = DEFAULT_STORAGE
    # Trial run directories, a folder every worker of a trial sees; empty: storage_path/name/runs
    # (runs/sweeps/name/runs when storage_path is a URL).
    run_root: str = ""
    worker_env: Dict[str, str] = field(default_factory=dict)  # env vars of every Train worker


@dataclass(frozen=True)
class Dimension:
    """One searched training key: how its values are drawn."""

    key: str
    distribution: str
    values: tuple[Any, ...]  # the candidates (grid, choice) or the bounds (the others)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: settings, absolute paths, the search space, the base config."""

    settings: SweepSettings
    root: Path
    base_config: Path
    storage_path: str  # an absolute local folder, or an s3:// / gs:// URL
    run_root: Path
    overrides: tuple[str, ...]  # fixed training overrides, paths made absolute
    dimensions: tuple[Dimension, ...]
    max_megabatches: int  # the most megabatches any trial can train (ASHA's max_t)

    @property
    def experiment_path(self) -> str:
        """The Tune experiment: a local folder or a URL (what Tune's storage_path/name is)."""
        return _within(self.storage_path, self.settings.name)

    @property
    def train_storage(self) -> str:
        """Where Ray Train keeps each trial's reported checkpoints and run snapshot."""
        return _within(self.experiment_path, "train")

    def experiment_folder(self) -> LocalFolder | RemoteFolder:
        """The experiment folder, for the sweep's own files (settings, result table)."""
        return folder_at(self.experiment_path, Retry(), key="storage_path")

    @property
    def trial_count(self) -> int:
        """How many trials the sweep has: num_samples times every grid's combinations (Tune's
        BasicVariantGenerator draws the other distributions once per trial)."""
        combinations = math.prod(len(d.values) for d in self.dimensions
                                 if d.distribution == "grid")
        return self.settings.num_samples * combinations

    @property
    def world_sizes(self) -> range:
        """The numbers of workers a trial may train on."""
        fewest = self.settings.min_workers_per_trial or self.settings.workers_per_trial
        return range(fewest, self.settings.workers_per_trial + 1)

    def trial_overrides(self, trial_id: str, sampled: dict[str, Any]) -> list[str]:
        """The training overrides of one trial: fixed ones, its sampled values, and its
        identity (run directory, run name = trial id, wandb group = sweep name); an elastic
        trial resumes its megabatch checkpoints on whatever number of workers it has."""
        chosen = [sampled_override(d.key, sampled[d.key], self.root) for d in self.dimensions]
        identity = [f"run.dir={override_value(str(self.run_root / trial_id))}",
                    f"run.name={override_value(trial_id)}"]
        if not any(o.startswith("log.wandb.group=") for o in self.overrides):
            identity.append(f"log.wandb.group={override_value(self.settings.name)}")
        elastic = (["checkpoint.allow_world_size_change=true"]
                   if len(self.world_sizes) > 1 else [])
        return [*self.overrides, *chosen, *elastic, *identity]


def project_root() -> Path:
    """The checkout holding the imported app_dist (an editable install: the folder with
    pyproject.toml), else the current directory."""
    checkout = Path(app_dist.__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def find_sweep_file(path: str, root: Path) -> Path:
    """`path` as given when it exists, else under the project root."""
    given = Path(path).expanduser()
    if given.is_file() or given.is_absolute():
        return given
    return root / given


def split_arguments(arguments: list[str]) -> tuple[list[str], list[str]]:
    """(sweep overrides, training overrides): `data.shards=...` goes to every trial,
    `num_samples=4` to the sweep file."""
    sweep, training = [], []
    for argument in arguments:
        if "=" not in argument:
            raise ConfigError(f"override '{argument}' is not of the form key=value")
        head = argument.split("=", 1)[0].split(".", 1)[0]
        (training if head in TRAINING_SECTIONS else sweep).append(argument)
    return sweep, training


def load_sweep(path: str | Path, arguments: list[str] | None = None,
               root: Path | None = None) -> Sweep:
    """Read, merge and validate a sweep file; raises ConfigError naming the bad key."""
    root = root or project_root()
    sweep_overrides, training_overrides = split_arguments(arguments or [])
    try:
        settings = load_structured(SweepSettings, path, sweep_overrides, family="sweep")
    except ConfigError as error:
        raise ConfigError(f"{error}{_training_config_hint(Path(path))}") from None
    settings.overrides = [*settings.overrides, *training_overrides]
    return validate_sweep(settings, root)


def _training_config_hint(path: Path) -> str:
    """What to say after a sweep file's error when the file is a training config (its top
    level has training sections and no base_config), else ''."""
    try:
        top = set(OmegaConf.load(path))
    except Exception:  # unreadable or not a mapping: the error itself says so
        return ""
    if "base_config" in top or not top & set(TRAINING_SECTIONS):
        return ""
    return (f" ({path} is a training config: a sweep file names one as base_config and "
            "searches over its keys; see configs/sweep_digits.yaml and docs/SWEEPS.md)")


def validate_sweep(settings: SweepSettings, root: Path) -> Sweep:
    """Check every sweep key, and every training config a trial can get."""
    _check_scalars(settings)
    base = _resolve(settings.base_config, root)
    if not base.is_file():
        raise ConfigError(f"sweep key 'base_config' = {settings.base_config!r}: no such file "
                          f"({base})")
    for override in settings.overrides:
        if "=" not in override:
            raise ConfigError(f"sweep key 'overrides': '{override}' is not of the form key=value")
        _refuse_reserved(override.split("=", 1)[0], "overrides")
    overrides = _fixed_overrides(settings, base, root)
    dimensions = tuple(_parse_dimension(key, spec) for key, spec in
                       _flatten_space(settings.search_space).items())
    megabatches = _check_trial_configs(settings, base, overrides, dimensions, root)
    # In object storage only Tune's files and Ray Train's checkpoint copies live in the bucket:
    # the trainer writes a folder, so the run directories default to the local layout.
    remote = is_remote(settings.storage_path)
    storage = settings.storage_path.rstrip("/") if remote else str(
        _resolve(settings.storage_path, root))
    run_root = (_resolve(settings.run_root, root) if settings.run_root
                else _resolve(DEFAULT_STORAGE if remote else storage, root) / settings.name
                / "runs")
    if not remote:
        _check_can_hold_folders("storage_path", settings.storage_path, Path(storage))
    _check_can_hold_folders("run_root" if settings.run_root else "storage_path",
                            settings.run_root or settings.storage_path, run_root)
    if settings.scheduler.kind == "asha" and settings.scheduler.grace_period > max(megabatches):
        raise ConfigError(f"sweep key 'scheduler.grace_period' = "
                          f"{settings.scheduler.grace_period}: must be <= the trials' "
                          f"megabatches ({max(megabatches)})")
    return Sweep(settings=settings, root=root, base_config=base, storage_path=storage,
                 run_root=run_root, overrides=overrides, dimensions=dimensions,
                 max_megabatches=max(megabatches))


_require = key_rule_checker("sweep")


def _check_scalars(settings: SweepSettings) -> None:
    scheduler = settings.scheduler
    _require(bool(settings.name) and "/" not in settings.name and settings.name not in (".", ".."),
             "name", settings.name, "must be a non-empty folder name")
    _require(settings.num_samples >= 1, "num_samples", settings.num_samples, "must be >= 1")
    _require(settings.workers_per_trial >= 1, "workers_per_trial", settings.workers_per_trial,
             "must be >= 1")
    _require(0 <= settings.min_workers_per_trial <= settings.workers_per_trial,
             "min_workers_per_trial", settings.min_workers_per_trial,
             f"must be 0 (not elastic) or 1..workers_per_trial ({settings.workers_per_trial})")
    _require(settings.resize_interval_s >= 0, "resize_interval_s", settings.resize_interval_s,
             "must be >= 0")
    _require(settings.resources_per_worker.CPU >= 0, "resources_per_worker.CPU",
             settings.resources_per_worker.CPU, "must be >= 0")
    _require(settings.resources_per_worker.GPU >= 0, "resources_per_worker.GPU",
             settings.resources_per_worker.GPU, "must be >= 0")
    _require(settings.resources_per_worker.CPU > 0 or settings.resources_per_worker.GPU > 0,
             "resources_per_worker", "CPU=0, GPU=0", "a worker must ask for a CPU or a GPU")
    _require(settings.trial_driver.CPU >= 0, "trial_driver.CPU", settings.trial_driver.CPU,
             "must be >= 0")
    for name, amount in settings.trial_driver.resources.items():
        _require(name not in ("CPU", "GPU", "memory"), f"trial_driver.resources.{name}", amount,
                 f"belongs in trial_driver.{'memory_mb' if name == 'memory' else name}, not "
                 "among custom resources")
        _require(amount > 0, f"trial_driver.resources.{name}", amount, "must be > 0")
    _require(settings.trial_driver.CPU > 0 or settings.trial_driver.memory_mb > 0,
             "trial_driver.memory_mb", settings.trial_driver.memory_mb,
             "must be > 0 when trial_driver.CPU is 0 (Ray refuses an empty request)")
    _require(settings.max_concurrent_trials >= 1, "max_concurrent_trials",
             settings.max_concurrent_trials, "must be >= 1 (Ray Train runs do not count "
             "against Tune's resources, so Tune needs this limit)")
    _require(settings.max_failures >= 0, "max_failures", settings.max_failures, "must be >= 0")
    _require(bool(settings.storage_path), "storage_path", settings.storage_path,
             "must name a folder")
    _require(scheme_of(settings.storage_path) in ("", "s3", "gs"), "storage_path",
             settings.storage_path, "must be a folder, file://, s3:// or gs:// (Tune and Ray "
             "Train write there)")
    _require(not is_remote(settings.run_root), "run_root", settings.run_root,
             "must be a folder (local or a shared mount): the trainer writes run directories "
             "as files; put storage_path in object storage instead")
    _require(scheduler.kind in SCHEDULERS, "scheduler.kind", scheduler.kind,
             f"must be one of {', '.join(SCHEDULERS)}")
    _require(scheduler.metric in METRIC_DIRECTIONS, "scheduler.metric", scheduler.metric,
             f"must be one of {', '.join(METRIC_DIRECTIONS)}")
    _require(scheduler.mode in ("max", "min"), "scheduler.mode", scheduler.mode,
             "must be max or min")
    better = METRIC_DIRECTIONS[scheduler.metric]
    _require(better is None or better == scheduler.mode, "scheduler.mode", scheduler.mode,
             f"{scheduler.metric} is better when it is {'higher' if better == 'max' else 'lower'}"
             f"; use mode {better}")
    _require(scheduler.time_attr in ("megabatch", "training_iteration"), "scheduler.time_attr",
             scheduler.time_attr, "must be megabatch or training_iteration")
    _require(scheduler.grace_period >= 1, "scheduler.grace_period", scheduler.grace_period,
             "must be >= 1")
    _require(scheduler.reduction_factor > 1, "scheduler.reduction_factor",
             scheduler.reduction_factor, "must be > 1")
    _require(scheduler.max_t >= 0, "scheduler.max_t", scheduler.max_t,
             "must be >= 0 (0: the trials' number of megabatches)")
    for name, value in settings.worker_env.items():
        _require(isinstance(value, str), f"worker_env.{name}", value, "must be a string")


def _check_can_hold_folders(key: str, value: str, folder: Path) -> None:
    """`folder` exists as a writable folder or can be made: its nearest existing ancestor is
    a folder this process may write in. Found here, not by Ray after it started."""
    found = why_folder_cannot_be_made(folder)
    if found is None:
        return
    problem, existing = found
    if problem == "Not a directory":
        raise ConfigError(f"sweep key '{key}' = {value!r}: {existing} is a file, not a folder")
    raise ConfigError(f"sweep key '{key}' = {value!r}: cannot write in {existing} "
                      "(permission denied)")


def _within(location: str, name: str) -> str:
    return join(location, name) if is_remote(location) else str(Path(location) / name)


def _resolve(path: str, root: Path) -> Path:
    resolved = Path(path).expanduser()
    return (resolved if resolved.is_absolute() else root / resolved).resolve()


def sampled_override(key: str, value: Any, root: Path) -> str:
    """The `key=value` override of one searched value (a relative data.shards made absolute)."""
    if key == "data.shards" and isinstance(value, str):
        value = _absolute_shards(f"{key}={value}", root).split("=", 1)[1]
    return f"{key}={override_value(value)}"


def _absolute_shards(override: str, root: Path) -> str:
    """Trials run in Ray's own working folders: a relative data.shards must be made absolute."""
    key, value = override.split("=", 1)
    if key == "data.shards" and value and _relative_folder(value):
        return f"{key}={_resolve(value, root)}"
    return override


def _relative_folder(shards: str) -> bool:
    return not scheme_of(shards) and not Path(shards).expanduser().is_absolute()


def _refuse_reserved(key: str, where: str) -> None:
    if key in RESERVED_TRAINING_KEYS:
        raise ConfigError(f"sweep key '{where}': '{key}' is set by the sweep for every trial "
                          "(the trial id names the run); remove it")


def _flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Accept both `prune.method: {grid: [...]}` and nested `prune: {method: {grid: [...]}}`."""
    flat: dict[str, Any] = {}
    for key, spec in space.items():
        name = f"{prefix}{key}"
        if isinstance(spec, (dict, DictConfig)) and not set(spec) & set(DISTRIBUTIONS):
            flat.update(_flatten_space(dict(spec), f"{name}."))
        else:
            flat[name] = spec
    return flat


def _parse_dimension(key: str, spec: Any) -> Dimension:
    where = f"search_space.{key}"
    _refuse_reserved(key, where)
    if key.split(".", 1)[0] not in TRAINING_SECTIONS:
        raise ConfigError(f"sweep key '{where}': '{key}' is not a training config key (they "
                          f"start with {', '.join(TRAINING_SECTIONS)})")
    if not isinstance(spec, (dict, DictConfig)):  # a fixed value: a one-value grid
        return Dimension(key, "grid", (_plain(spec),))
    if len(spec) != 1:
        raise ConfigError(f"sweep key '{where}': give exactly one of {', '.join(DISTRIBUTIONS)}")
    (distribution, values), = dict(spec).items()
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"sweep key '{where}.{distribution}': unknown distribution; use one "
                          f"of {', '.join(DISTRIBUTIONS)}")
    values = _plain(values)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"sweep key '{where}.{distribution}': must be a non-empty list")
    if distribution in ("uniform", "loguniform", "randint"):
        bounds_ok = (len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
                     and values[0] < values[1])
        if not bounds_ok:
            raise ConfigError(f"sweep key '{where}.{distribution}' = {values!r}: must be "
                              "[low, high] with low < high")
        if distribution == "loguniform" and values[0] <= 0:
            raise ConfigError(f"sweep key '{where}.loguniform' = {values!r}: bounds must be > 0")
        if distribution == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"sweep key '{where}.randint' = {values!r}: bounds must be "
                              "integers")
    return Dimension(key, distribution, tuple(values))


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _candidates(dimension: Dimension) -> list[Any]:
    """The values a trial can get, or the bounds of a range (both ends are checked)."""
    if dimension.distribution == "randint":  # high is exclusive
        return [dimension.values[0], dimension.values[1] - 1]
    return list(dimension.values)


def override_value(value: Any) -> str:
    """`value` written so that a `key=value` override reads it back (lists included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict, str)):
        # Flow-style YAML, which OmegaConf's dotlist parses. Strings are quoted: YAML would
        # read a trial id like 40994_00002 as the integer 4099400002.
        return json.dumps(value)
    return str(value)


def _fixed_overrides(settings: SweepSettings, base: Path, root: Path) -> tuple[str, ...]:
    """The sweep's fixed training overrides, with data.shards made absolute even when only
    the base config names it."""
    overrides = [_absolute_shards(o, root) for o in settings.overrides]
    try:
        config = load_config(base, overrides)
    except ConfigError as error:
        raise ConfigError(f"sweep key 'overrides' (base config {base}): {error}") from None
    if _relative_folder(config.data.shards):
        overrides.append(f"data.shards={_resolve(config.data.shards, root)}")
    return tuple(overrides)


def _check_trial_configs(settings: SweepSettings, base: Path, overrides: tuple[str, ...],
                         dimensions: tuple[Dimension, ...], root: Path) -> list[int]:
    """Load the training config with every candidate of every dimension (one at a time, the
    others at their first candidate), so a bad value fails here, not in trial 17 on a
    remote node. Returns the megabatch counts trials can have."""
    firsts = {d.key: _candidates(d)[0] for d in dimensions}
    variants: list[tuple[str | None, dict[str, Any]]] = [(None, firsts)]
    for dimension in dimensions:
        variants += [(dimension.key, {**firsts, dimension.key: value})
                     for value in _candidates(dimension)[1:]]
    megabatches, manifests = [], {}
    for varied, variant in variants:
        chosen = [sampled_override(k, v, root) for k, v in variant.items()]
        try:
            config = load_config(base, [*overrides, *chosen])
        except ConfigError as error:
            culprit = _searched_key_named(str(error), list(variant)) or varied
            where = f"search_space.{culprit}" if culprit else "search_space"
            raise ConfigError(f"sweep key '{where}': {error}") from None
        _check_world(settings, config)
        if config.data.shards not in manifests:
            try:
                manifests[config.data.shards] = load_manifest(config.data.shards, config.data)
            except AppDistError as error:
                raise ConfigError(f"sweep: training key 'data.shards': {error}") from None
        megabatches.append(config.data.megabatches)
    return megabatches


def _searched_key_named(message: str, keys: list[str]) -> str | None:
    """The searched key a training-config error is about (it may name a parent or a child)."""
    named = re.search(r"config key '([^']+)'", message)
    if named is None:
        return None
    key = named.group(1)
    for candidate in keys:
        if candidate == key or candidate.startswith(f"{key}.") or key.startswith(f"{candidate}."):
            return candidate
    return None


def _check_world(settings: SweepSettings, config: Config) -> None:
    """Every number of workers a trial may train on divides the batch (an elastic trial's
    range, else workers_per_trial)."""
    batch = config.train.batch_size
    if batch % settings.workers_per_trial:
        raise ConfigError(f"sweep key 'workers_per_trial' = {settings.workers_per_trial}: "
                          f"does not divide train.batch_size = {batch}")
    for workers in range(settings.min_workers_per_trial or settings.workers_per_trial,
                         settings.workers_per_trial):
        if batch % workers:
            raise ConfigError(f"sweep key 'min_workers_per_trial' = "
                              f"{settings.min_workers_per_trial}: an elastic trial may train "
                              f"on {workers} workers, which does not divide "
                              f"train.batch_size = {batch}")
