"""Training an experiment's runs as subprocesses, and collecting what they wrote.

Each run is app_dist/train.py in its own process (plain python for one process, torchrun for
more), so a run is exactly what the same `app-dist train` command would produce. A run whose
metrics already hold every megabatch is not trained again, and an interrupted one resumes from
its checkpoint, so re-running the experiment continues where it stopped. `parallel` runs train
at the same time, the machine's cores split between them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app_dist.experiment.spec import ExperimentSpec, PlannedRun
from app_dist.foundations.errors import AppDistError
from app_dist.foundations.run_layout import RunLayout
from app_dist.results.runs import read_metrics
from app_dist.training.run_input import prepare

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"


class ExperimentError(AppDistError):
    """A run of the experiment failed or its outputs are missing."""


def train_command(spec: ExperimentSpec, run: PlannedRun) -> list[str]:
    """The command line that trains `run`."""
    launcher = [sys.executable, str(TRAIN_SCRIPT)]
    if spec.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(spec.nproc), str(TRAIN_SCRIPT)]
    return [*launcher, "--config", spec.train_config, *run.overrides]


def is_finished(run: PlannedRun) -> bool:
    """True when the run's metrics.jsonl holds all of its megabatches. A last record torn by
    a crash (no newline) does not count: the trainer writes it again on resume."""
    metrics = RunLayout(run.run_dir).metrics
    return metrics.is_file() and len(read_metrics(metrics)) >= run.config.data.megabatches


def _environment(spec: ExperimentSpec) -> dict[str, str]:
    """The runs' environment: wandb offline unless set, and the cores split between the
    runs that train at the same time (unless OMP_NUM_THREADS is set)."""
    threads = max(1, (os.cpu_count() or 1) // spec.parallel)
    return {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}


def train_runs(spec: ExperimentSpec, planned: list[PlannedRun]) -> None:
    """Train every unfinished run, `spec.parallel` at a time, each as its own subprocess
    writing RUN_DIR/train.log. Raises ExperimentError naming the first run that failed
    (after the runs in flight have ended)."""
    pending = []
    for run in planned:
        if is_finished(run):
            print(f"{run.key}: finished already", flush=True)
        else:
            pending.append(run)
    # What each run's ranks would refuse (missing shards, a batch the ranks do not divide):
    # one line before any run starts, not a failure after the first ones have trained.
    for run in pending:
        prepare(run.config, world_size=spec.nproc)
    running: list[tuple[PlannedRun, subprocess.Popen, float]] = []
    failures: list[str] = []
    while pending or running:
        while pending and len(running) < spec.parallel and not failures:
            run = pending.pop(0)
            run.run_dir.mkdir(parents=True, exist_ok=True)
            log_path = run.run_dir / "train.log"
            print(f"{run.key}: training (log: {log_path})", flush=True)
            with log_path.open("a") as log:
                process = subprocess.Popen(train_command(spec, run), stdout=log,
                                           stderr=subprocess.STDOUT, env=_environment(spec))
            running.append((run, process, time.perf_counter()))
        if not running:
            break
        time.sleep(1.0)
        for entry in list(running):
            run, process, started = entry
            code = process.poll()
            if code is None:
                continue
            running.remove(entry)
            if code == 0:
                print(f"{run.key}: done in {time.perf_counter() - started:.0f} s", flush=True)
                continue
            log_path = run.run_dir / "train.log"
            tail = log_path.read_text().strip().splitlines()[-1:] or ["(empty log)"]
            failures.append(f"run {run.key} exited with {code}: {tail[0]} (full log: "
                            f"{log_path})")
    if failures:
        raise ExperimentError(failures[0])


@dataclass
class RunResult:
    run: PlannedRun
    records: list[dict[str, Any]]
    sparse_bytes: int
    dense_bytes: int

    @property
    def last(self) -> dict[str, Any]:
        return self.records[-1]

    @property
    def seconds(self) -> float:
        """Wall time of the run's megabatches as measured inside the run (resumes included,
        process start-up not)."""
        return float(sum(record["seconds"] for record in self.records))


def collect(planned: list[PlannedRun]) -> list[RunResult]:
    """Metrics of every finished run plus the sizes of its exported sparse model."""
    from app_dist.results.export import export_run

    results = []
    for run in planned:
        if not is_finished(run):
            raise ExperimentError(f"run {run.key} has not finished ({run.run_dir}); run the "
                                  "experiment without --report-only first")
        exported = export_run(run.run_dir)
        results.append(RunResult(run, read_metrics(RunLayout(run.run_dir).metrics),
                                 exported.sparse_bytes, exported.dense_bytes))
    return results
