"""Reading a finished or running run directory: its config.yaml and metrics.jsonl.

Used by `app-dist report` and `app-dist inspect`; reads plain YAML/JSON (not the typed schema),
so a run written by an older version with keys that no longer exist still reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from app_dist.config import PruneSettings, final_density
from app_dist.foundations.errors import AppDistError
from app_dist.foundations.run_layout import RunLayout

HINT = ("pass the folder `app-dist train` wrote (run.dir, by default runs/<run.name>-<hash>), "
        "which holds config.yaml and metrics.jsonl")


@dataclass
class Run:
    """One run directory as written by the trainer."""

    path: Path
    config: dict[str, Any] | None  # the resolved config.yaml, None if absent
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, in order

    def setting(self, dotted: str, default: Any = None) -> Any:
        """config value at `a.b.c`, or `default` when absent."""
        node: Any = self.config or {}
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def read_config(path: Path) -> dict[str, Any]:
    """A config.yaml as a plain dict; AppDistError naming the file when it is not YAML."""
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OmegaConfBaseException, ValueError, OSError) as error:
        raise AppDistError(f"{path} is not a readable config: {str(error).splitlines()[0]}"
                           ) from None
    if not isinstance(loaded, dict):
        raise AppDistError(f"{path} is not a config mapping")
    return loaded  # type: ignore[return-value]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line without its newline is a write cut short by
    a crash and is ignored (the trainer rewrites it on resume); any other bad line is an error."""
    complete_lines = path.read_text().split("\n")[:-1]
    records = []
    for number, line in enumerate(complete_lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise AppDistError(f"{path} line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict) or "megabatch" not in record:
            raise AppDistError(f"{path} line {number} is not a megabatch record")
        records.append(record)
    return records


def read_run(path: str | Path) -> Run:
    """The run directory at `path`; AppDistError with the fix when it is not one."""
    path = Path(path)
    if not path.exists():
        raise AppDistError(f"{path} does not exist; {HINT}")
    if not path.is_dir():
        raise AppDistError(f"{path} is not a directory; {HINT}")
    config_path, metrics_path = RunLayout(path).config, RunLayout(path).metrics
    if not config_path.is_file() and not metrics_path.is_file():
        raise AppDistError(f"{path} holds neither config.yaml nor metrics.jsonl; {HINT}")
    config = read_config(config_path) if config_path.is_file() else None
    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    return Run(path=path, config=config, records=records)


def describe_config(run: Run) -> str:
    """One line: what this run trains, how it prunes, on which data."""
    if run.config is None:
        return "no config.yaml"
    method = run.setting("prune.method", "?")
    pruning = "no pruning" if method == "dense" else (
        f"{method}/{run.setting('prune.criterion', '?')} {run.setting('prune.scope', '?')}, "
        f"final density {final_density_of(run):.3f}")
    return (f"{run.setting('run.name', '?')}: {pruning}; model {run.setting('model.name', '?')} "
            f"on {run.setting('data.shards', '?')}; {run.setting('data.megabatches', '?')} "
            f"megabatches, {run.setting('train.epochs', '?')} epoch(s) each, batch "
            f"{run.setting('train.batch_size', '?')}, lr {run.setting('train.lr', '?')}, replay "
            f"{run.setting('data.replay', '?')}, seed {run.setting('run.seed', '?')}")


def final_density_of(run: Run) -> float:
    """The density the run's schedule ends at (1.0 for dense), from its config."""
    known = {f.name for f in fields(PruneSettings)}
    saved = run.setting("prune") or {}
    prune = PruneSettings(**{key: value for key, value in saved.items() if key in known})
    return 1.0 if prune.method == "dense" else final_density(prune)
