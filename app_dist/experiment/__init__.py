"""`app-dist experiment EXPERIMENT.yaml`: dense vs Anytime OSP vs APP, several seeds, one report.

Reads the experiment file and plans its runs (spec.py), trains the unfinished ones as
subprocesses (runner.py), exports each final model in sparse form (app_dist.results.export),
and writes the report (report.py): a table per setting, plots, the command, the wall time.
Re-running the command continues where it stopped.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from app_dist.experiment.report import render, write_plots, write_report
from app_dist.experiment.runner import collect, train_command, train_runs
from app_dist.experiment.spec import load_experiment, plan_runs
from app_dist.foundations.commands import ArgumentParser, command


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="app-dist experiment",
                            description="Run dense / OSP / APP over seeds and write the report.")
    parser.add_argument("experiment", help="experiment YAML (see configs/experiments/)")
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: write the report from the finished runs")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the planned train commands and stop")
    return parser


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    spec = load_experiment(args.experiment)
    planned = plan_runs(spec)
    if args.dry_run:
        for run in planned:
            print(shlex.join(train_command(spec, run)))
        return 0
    if not args.report_only:
        train_runs(spec, planned)
    results = collect(planned)
    plots = {setting.name: write_plots(spec, setting,
                                       [r for r in results if r.run.setting.name == setting.name])
             for setting in spec.settings}
    wall = None if args.report_only else time.perf_counter() - started
    write_report(Path(spec.report), render(spec, args.experiment, results, plots, wall),
                 title="Results")
    print(f"wrote {spec.report} ({len(results)} runs)")
    return 0
