"""An experiment file: its schema, loading and validation, and the runs it plans.

An experiment file names a training config, the methods, the seeds, overrides shared by every
run, and one or more settings (each a list of further overrides). Every (setting, method, seed)
becomes one run in RUNS_DIR/<setting>/<method>-seed<seed>, its training config loaded and
validated when the experiment is planned, so a typo stops the experiment before its first run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app_dist.config import PRUNE_METHODS, Config, load_config
from app_dist.foundations.config_loading import key_rule_checker, load_structured


@dataclass
class SettingSpec:
    name: str  # a folder name: letters, digits, - and _
    title: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class ExperimentSpec:
    name: str
    train_config: str  # the YAML training config every run starts from
    methods: list[str] = field(default_factory=lambda: ["dense", "osp", "app"])
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    # A seed also sets data.stream_seed, so seeds vary which data each megabatch holds (and
    # the validation splits), not only initialisation and augmentation. The methods of one
    # seed still see the same stream: the paired comparison stays paired.
    seeds_vary_stream: bool = True
    nproc: int = 1  # processes per run: 1 = plain python, more = torchrun (gloo/nccl)
    parallel: int = 1  # runs trained at the same time (the cores are split between them)
    runs_dir: str = ""  # empty: runs/experiments/<name>
    report: str = "docs/RESULTS.md"
    plots_dir: str = "docs/results"
    overrides: list[str] = field(default_factory=list)  # for every run
    settings: list[SettingSpec] = field(default_factory=lambda: [SettingSpec("default")])
    description: str = ""  # printed above the tables


def load_experiment(path: str | Path) -> ExperimentSpec:
    """The experiment file over its schema; ConfigError naming the file and key otherwise."""
    spec = load_structured(ExperimentSpec, path, family="experiment")
    _validate(spec, Path(path))
    return spec


def _validate(spec: ExperimentSpec, path: Path) -> None:
    require = key_rule_checker("experiment", path)
    require(bool(spec.methods), "methods", spec.methods, "name at least one method")
    for method in spec.methods:
        require(method in PRUNE_METHODS, "methods", spec.methods, f"'{method}' is not one of "
                f"{', '.join(PRUNE_METHODS)}")
    require(bool(spec.seeds), "seeds", spec.seeds, "name at least one seed")
    require(len(set(spec.seeds)) == len(spec.seeds), "seeds", spec.seeds,
            "must not repeat a seed")
    require(spec.nproc >= 1, "nproc", spec.nproc, "must be >= 1")
    require(spec.parallel >= 1, "parallel", spec.parallel, "must be >= 1")
    names = [setting.name for setting in spec.settings]
    require(bool(names), "settings", names, "name at least one setting")
    require(len(set(names)) == len(names), "settings", names, "two settings share a name")
    for name in names:
        require(name.replace("-", "").replace("_", "").isalnum(), "settings", names,
                f"name '{name}' must use only letters, digits, - and _")


@dataclass
class PlannedRun:
    setting: SettingSpec
    method: str
    seed: int
    run_dir: Path
    overrides: list[str]
    config: Config

    @property
    def key(self) -> str:
        return f"{self.setting.name}/{self.method}-seed{self.seed}"


def runs_root(spec: ExperimentSpec) -> Path:
    return Path(spec.runs_dir or f"runs/experiments/{spec.name}")


def plan_runs(spec: ExperimentSpec) -> list[PlannedRun]:
    """Every (setting, method, seed) run with its overrides, each config loaded and validated
    now, so a typo stops the experiment before its first run."""
    planned = []
    for setting in spec.settings:
        for seed in spec.seeds:
            for method in spec.methods:
                run_dir = runs_root(spec) / setting.name / f"{method}-seed{seed}"
                stream = [f"data.stream_seed={seed}"] if spec.seeds_vary_stream else []
                overrides = [*spec.overrides, *setting.overrides, f"prune.method={method}",
                             f"run.seed={seed}", *stream, f"run.dir={run_dir}",
                             "log.progress=false"]
                config = load_config(spec.train_config, overrides)
                planned.append(PlannedRun(setting, method, seed, run_dir, overrides, config))
    return planned
