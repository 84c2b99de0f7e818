"""Run a sweep on Ray Tune: start or restore the Tune experiment, then tabulate the trials.

Running the same sweep again restores it (`Tuner.can_restore` on storage_path/name): finished
trials keep their results, unfinished ones continue from their last reported megabatch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from app_dist.config import flatten
from app_dist.foundations.commands import ArgumentParser, command
from app_dist.foundations.errors import ConfigError
from app_dist.foundations.signals import heeded_signals
from app_dist.sweep.local_ray import LocalRay
from app_dist.sweep.placement_groups import release_callback
from app_dist.sweep.results import (
    RESULT_FILES,
    TrialOutcome,
    format_table,
    trial_rows,
    write_results,
)
from app_dist.sweep.settings import (
    Dimension,
    Sweep,
    SweepSettings,
    find_sweep_file,
    load_sweep,
    project_root,
)
from app_dist.sweep.trial import make_trainable

log = logging.getLogger("app_dist")

SETTINGS_FILE = "sweep.yaml"
# Settings a restored sweep may change: how it is run, not what its trials compute.
RESTORE_NEUTRAL = ("max_concurrent_trials", "max_failures", "worker_env", "trial_driver.",
                   "resize_interval_s",
                   "resources_per_worker.", "storage_path", "run_root")


def tune_space(dimensions: tuple[Dimension, ...]) -> dict[str, Any]:
    """The Tune param_space: one entry per searched training key."""
    from ray import tune

    draw = {"grid": lambda v: tune.grid_search(list(v)), "choice": lambda v: tune.choice(list(v)),
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {d.key: draw[d.distribution](d.values) for d in dimensions}


def build_scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    settings = sweep.settings.scheduler
    if settings.kind == "fifo":
        return FIFOScheduler()
    # Rungs at grace_period * reduction_factor**k up to max_t; stop_last_trials=False lets a
    # trial past max_t finish by itself: Tune stopping it at its last report would kill it
    # before the trainer's own wrap-up (wandb, summary) and save nothing.
    max_t = settings.max_t or max(sweep.max_megabatches - 1, settings.grace_period)
    return ASHAScheduler(time_attr=settings.time_attr, max_t=max_t,
                         grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor, stop_last_trials=False)


def check_same_sweep(sweep: Sweep) -> None:
    """A restored experiment keeps its search space and scheduler: refuse a changed sweep
    file instead of silently running the old one."""
    folder = sweep.experiment_folder()
    current = _settings_record(sweep)
    if not folder.exists(SETTINGS_FILE):
        return
    saved = OmegaConf.to_container(OmegaConf.create(folder.read_text(SETTINGS_FILE)),
                                   resolve=True)
    # A setting added since the sweep started is absent from its saved record: at its
    # default it changes nothing.
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(SweepSettings())))
    saved = {**{k: v for k, v in defaults.items() if k not in saved},  # type: ignore[operator]
             **saved}  # type: ignore[dict-item]
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
               for k in sorted(set(saved) | set(current))
               if not k.startswith(RESTORE_NEUTRAL)
               and saved.get(k) != current.get(k)]
    if changed:
        raise ConfigError(f"sweep '{sweep.settings.name}' in {folder} was "
                          f"started with other settings ({'; '.join(changed[:4])}); give the "
                          "sweep another name to start a new one")


def _settings_record(sweep: Sweep) -> dict[str, Any]:
    record = flatten(OmegaConf.to_container(OmegaConf.structured(sweep.settings)))
    record["overrides"] = list(sweep.overrides)
    record["base_config"] = str(sweep.base_config)
    return record


def start_or_restore(sweep: Sweep, retry_errored: bool) -> Any:
    """A Tuner for `sweep`: restored when its experiment exists, else new."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = make_trainable(sweep)
    path = sweep.experiment_path
    folder = sweep.experiment_folder()
    if tune.Tuner.can_restore(path):
        print(f"restoring sweep {sweep.settings.name} from {folder}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=retry_errored)
    folder.write_text(SETTINGS_FILE, OmegaConf.to_yaml(OmegaConf.create(_settings_record(sweep))))
    settings = sweep.settings
    searcher = BasicVariantGenerator(max_concurrent=settings.max_concurrent_trials,
                                     random_state=settings.search_seed)
    return tune.Tuner(
        trainable,
        param_space=tune_space(sweep.dimensions),
        tune_config=tune.TuneConfig(metric=settings.scheduler.metric,
                                    mode=settings.scheduler.mode, search_alg=searcher,
                                    scheduler=build_scheduler(sweep),
                                    num_samples=settings.num_samples),
        run_config=tune.RunConfig(name=settings.name, storage_path=sweep.storage_path,
                                  failure_config=tune.FailureConfig(
                                      max_failures=settings.max_failures),
                                  callbacks=[release_callback()]),
    )


def outcomes_of(result_grid: Any) -> list[TrialOutcome]:
    outcomes = []
    for result in result_grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
        outcomes.append(TrialOutcome(trial_id=trial_id, sampled=dict(result.config or {}),
                                     last_report=metrics, error=error))
    return outcomes


def run_sweep(sweep: Sweep, retry_errored: bool = False) -> list[dict[str, Any]]:
    """Run (or continue) `sweep` on the connected Ray cluster; returns the result rows, also
    written to results.csv / results.json in the experiment folder and printed."""
    check_same_sweep(sweep)
    result_grid = start_or_restore(sweep, retry_errored).fit()
    settings = sweep.settings
    rows = trial_rows(outcomes_of(result_grid), [d.key for d in sweep.dimensions],
                      settings.scheduler.metric, settings.scheduler.mode)
    folder = sweep.experiment_folder()
    write_results(rows, folder)
    print(f"\nsweep {settings.name}: {len(rows)} trials, best {settings.scheduler.metric} "
          f"first\n{format_table(rows)}\n\nwritten {RESULT_FILES[0]} and {RESULT_FILES[1]} "
          f"in {folder}", flush=True)
    return rows


def check_placeable(sweep: Sweep, started_here: bool) -> None:
    """A trial's workers and driver fit the cluster. On the local Ray this process started
    nothing will ever join, and a trial that cannot be placed would wait for ever: that is
    bad input (ConfigError). On a cluster it joined, one an autoscaler may grow, it is a
    warning."""
    import ray

    settings = sweep.settings
    fewest = sweep.world_sizes[0]
    per_worker = {"CPU": settings.resources_per_worker.CPU,
                  "GPU": settings.resources_per_worker.GPU}
    driver = settings.trial_driver.CPU
    have = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for kind in ("GPU", "CPU"):
        need = fewest * per_worker[kind] + (driver if kind == "CPU" else 0.0)
        total = have.get(kind, 0.0)
        largest_node = max((resources.get(kind, 0.0) for resources in nodes), default=0.0)
        if need > total:
            key = ("resources_per_worker.GPU" if kind == "GPU"
                   else "min_workers_per_trial" if settings.min_workers_per_trial
                   else "workers_per_trial")
            says = (f"a trial needs {need:g} {kind} ({fewest} worker(s) x {per_worker[kind]:g}"
                    f"{f' + its driver {driver:g}' if kind == 'CPU' and driver else ''}); "
                    f"the cluster has {total:g}")
        elif per_worker[kind] > largest_node:
            key = f"resources_per_worker.{kind}"
            says = (f"one worker needs {per_worker[kind]:g} {kind}; the cluster's largest "
                    f"node has {largest_node:g}")
        else:
            continue
        value = (per_worker[kind] if key.startswith("resources_per_worker")
                 else getattr(settings, key))
        if started_here:
            raise ConfigError(f"sweep key '{key}' = {value!r}: {says}, and the local Ray "
                              "started here (no cluster was running) cannot grow; lower it, or "
                              "run the sweep on a larger cluster (RAY_ADDRESS)")
        log.warning("sweep key '%s' = %r: %s now; trials wait until the cluster grows (an "
                    "autoscaler), for ever if it does not", key, value, says)
        return


def announced_cluster() -> str | None:
    """The address of the cluster to join: RAY_ADDRESS, else the one `ray start` announced on
    this machine (its ray_current_cluster file in Ray's temp dir); None when neither names one.
    Not `ray.init(address="auto")`, which when nothing is announced joins any Ray whose GCS
    process it sees on the machine: another sweep's own local Ray, whose end would then end
    this sweep's trials with it."""
    from ray._private.services import get_ray_address_from_environment  # Ray's own lookup

    return get_ray_address_from_environment(None, None)


@contextlib.contextmanager
def ray_connection(num_cpus: int | None) -> Iterator[str]:
    """Join the cluster RAY_ADDRESS names (or the one `ray start` announced on this machine),
    or start a local one (LocalRay: in a session of its own) and stop it at the end. Yields
    "joined", "started" (a local Ray of this process's own) or "already" (this process was
    connected before, and stays connected)."""
    import ray

    if ray.is_initialized():
        yield "already"
        return
    local = None
    try:
        joined = False
        if (address := announced_cluster()) is not None:
            with contextlib.suppress(ConnectionError):  # announced, but no longer there
                ray.init(address=address)
                joined = True
        if not joined:
            local = LocalRay(num_cpus)
            log.info("no Ray cluster is running: starting one on this machine for the sweep "
                     "(logs in %s)", local.temp_dir)
            ray.init(address=local.start())
        yield "joined" if joined else "started"
    finally:
        ray.shutdown()
        if local is not None:
            local.stop()


def cpu_count(text: str) -> int:
    """--num-cpus: a whole number of CPUs, at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of CPUs (a whole number, "
                                         "at least 1)")
    return int(text)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="app-dist sweep",
        description="Ray Tune sweep over distributed app-dist trials (see configs/sweep_*.yaml).",
        epilog="Overrides: key=value; training keys (data.shards=..., train.epochs=1) go to "
               "every trial, the others (num_samples=4, name=...) to the sweep file.")
    parser.add_argument("--config", required=True, help="sweep YAML file")
    parser.add_argument("--num-cpus", type=cpu_count, default=None,
                        help="CPUs of the local Ray started when no cluster is running")
    parser.add_argument("--retry-errored", action="store_true",
                        help="when restoring, also rerun trials that failed (from their last "
                             "megabatch)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    return parser


def stop_signals_as_ctrl_c() -> None:
    """SIGTERM (a scheduler, `kill`, `timeout`) and SIGHUP (a closed terminal) to the sweep's
    driver do what Ctrl-C does: Tune stops, saves the experiment and returns the trials so
    far, and the same command continues. Installed after Ray connected, whose own SIGTERM
    handler prints a crash dump and exits 1. Signals the process was started ignoring
    (`nohup`) stay ignored."""
    def as_ctrl_c(signum: int, frame: Any) -> None:
        print(f"[app-dist] {signal.Signals(signum).name} received: stopping the sweep as "
              "Ctrl-C does", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGINT)

    for number in heeded_signals():
        if number != signal.SIGINT:
            signal.signal(number, as_ctrl_c)


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    """`app-dist sweep`: 0 when every trial completed or was stopped by the scheduler, 1 when
    some failed or are unfinished (run the same command again), 2 on bad input."""
    root = project_root()
    sweep = load_sweep(find_sweep_file(args.config, root), args.overrides, root)
    check_same_sweep(sweep)
    logging.basicConfig(format="[app-dist] %(message)s", level=logging.INFO)
    try:
        with ray_connection(args.num_cpus) as connection:
            check_placeable(sweep, started_here=connection == "started")
            stop_signals_as_ctrl_c()
            rows = run_sweep(sweep, args.retry_errored)
    except KeyboardInterrupt:  # Ctrl-C before Tune listens for it, or twice
        print("sweep interrupted: run the same command again to continue", file=sys.stderr)
        return 1
    statuses = [row["status"] for row in rows]
    not_started = sweep.trial_count - len(rows)  # interrupted before Tune created them
    if not_started > 0 or any(s in ("error", "unfinished") for s in statuses):
        print(f"{statuses.count('error')} trial(s) failed, {statuses.count('unfinished')} "
              f"unfinished, {max(not_started, 0)} not started: run the same command again "
              "to continue"
              + (" (add --retry-errored to rerun failed ones)" if "error" in statuses else ""),
              file=sys.stderr)
        return 1
    return 0

