"""`app-dist train --nproc-per-node N ...`: start the ranks of one run with torchrun or the
deepspeed launcher, and exit with the run's own exit code.

    app-dist train --nproc-per-node 2 --config configs/digits.yaml [key=value ...]
    app-dist train --nproc-per-node 8 --nnodes 2 --rdzv-endpoint HEAD:29500 --config ...
    app-dist train --nproc-per-node 8 --launcher deepspeed --config ... engine.kind=deepspeed

Launchers hide a run's exit code: torchrun turns any failed rank into its own exit code 1 and
a ~30-line ChildFailedError traceback (a pre-empted run's 75 and bad input's 2 included; a
SIGTERMed torchrun exits 1 as well). The deepspeed launcher passes a rank's code through on one
node (DeepSpeed 0.19); the wrapper gives both launchers one contract. It

1. checks the input first, as run_input.py's `prepare` does in every rank (config, data
   plan, batch divisible by the world size), and that the run directory can be created and,
   on one node, that no live run holds it: bad input is one `error:` line and exit 2 before
   any launcher starts;
2. removes the outcome file an earlier launch left in the run directory, starts the launcher
   as a child in a process group of its own and forwards SIGTERM, SIGINT and SIGHUP to that
   group (a pre-emption notice delivered to the wrapper reaches the ranks through the
   launcher, which signals each rank's group);
3. waits; when the launcher failed, also for the processes it started (the deepspeed runner
   dies of SIGTERM at once while its ranks still write their pre-emption checkpoint); then,
   when the run's outcome file (written by rank 0 as the run ends) says `preempted` or
   `bad_input`, exits 75 or 2, else with the launcher's own code. torchrun runs through
   quiet_torchrun.py, whose failure is one line instead of its traceback; everything the
   ranks print passes through unchanged.

Without --nproc-per-node, `app-dist train` trains in this process, as app_dist/train.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from app_dist.config import load_config, run_directory
from app_dist.foundations.commands import (
    BAD_INPUT,
    PREEMPTED,
    ArgumentParser,
    UsageError,
    missing_config,
    run_command,
    shell_exit_code,
)
from app_dist.foundations.errors import ConfigError
from app_dist.foundations.files import why_folder_cannot_be_made
from app_dist.foundations.processes import set_subreaper
from app_dist.foundations.run_layout import RunLayout
from app_dist.foundations.run_lock import check_free
from app_dist.foundations.signals import heeded_signals, preemption_listening
from app_dist.training.run_input import build_parser as trainer_parser
from app_dist.training.run_input import prepare

LAUNCHERS = ("torchrun", "deepspeed")
# The outcome file's status -> the wrapper's exit code when the launcher failed.
OUTCOME_EXIT_CODES = {"preempted": PREEMPTED, "bad_input": BAD_INPUT}
# torchrun, reporting a failed launch in one line with the failing rank's exit code.
QUIET_TORCHRUN = "app_dist.training.quiet_torchrun"
# How long the wrapper waits, after a failed or signalled launcher exited, for the processes it
# started (the deepspeed runner dies of SIGTERM at once while its ranks still write their
# pre-emption checkpoint): more than the launchers' own 30 s between their stop signal and
# SIGKILL.
DRAIN_TIMEOUT_S = 60.0
# What every rank runs (found by path: importing app_dist.train would import torch, which the
# wrapper does not need; see the module docstring of run_input.py).
TRAINER_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"

# Flags that only mean something with --nproc-per-node: (attribute, flag).
_LAUNCH_FLAGS = (("nnodes", "--nnodes"), ("node_rank", "--node-rank"),
                 ("master_addr", "--master-addr"), ("master_port", "--master-port"),
                 ("rdzv_endpoint", "--rdzv-endpoint"), ("max_restarts", "--max-restarts"),
                 ("hostfile", "--hostfile"), ("launcher", "--launcher"),
                 ("launcher_arg", "--launcher-arg"))


def build_parser() -> ArgumentParser:
    parser = trainer_parser()
    parser.description = ("Train APP / OSP / dense under the megabatch stream: in this process, "
                          "or with --nproc-per-node on N ranks per node through torchrun or the "
                          "deepspeed launcher, exiting with the run's own code (0 finished, 2 "
                          "bad input, 75 pre-empted: run the same command again).")
    group = parser.add_argument_group("launching ranks (all need --nproc-per-node)")
    group.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=None,
                       metavar="N", help="ranks per node (one per GPU); starts the launcher")
    group.add_argument("--launcher", choices=LAUNCHERS, default=None,
                       help="torchrun (default) or deepspeed")
    group.add_argument("--nnodes", type=int, default=None, help="nodes (default 1)")
    group.add_argument("--node-rank", type=int, default=None,
                       help="this node's rank (static rendezvous, or deepspeed --no_ssh)")
    group.add_argument("--master-addr", default=None, help="address of node 0")
    group.add_argument("--master-port", type=int, default=None,
                       help="port on node 0 (default: a free one on a single node)")
    group.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="torchrun c10d rendezvous endpoint (multi-node without node ranks)")
    group.add_argument("--max-restarts", type=int, default=None,
                       help="torchrun: restart all ranks up to this many times after a failure")
    group.add_argument("--hostfile", default=None, help="deepspeed: its hostfile")
    group.add_argument("--launcher-arg", action="append", default=None, metavar="ARG",
                       help="passed to the launcher unchanged (repeatable), e.g. "
                            "--launcher-arg=--no_ssh")
    return parser


def launcher_command(args: argparse.Namespace, script: Path) -> list[str]:
    """The launcher's command line for the parsed `args`, running `script` on every rank."""
    nnodes = args.nnodes or 1
    launcher = args.launcher or "torchrun"
    run = ["--config", args.config, *args.overrides]
    extra = list(args.launcher_arg or [])
    if launcher == "deepspeed":
        command = [sys.executable, "-m", "deepspeed.launcher.runner",
                   "--num_gpus", str(args.nproc_per_node)]
        if nnodes > 1:
            command += ["--num_nodes", str(nnodes)]
        if args.hostfile:
            command += ["--hostfile", args.hostfile]
        if args.node_rank is not None:
            command += ["--node_rank", str(args.node_rank)]
        if args.master_addr:
            command += ["--master_addr", args.master_addr]
        port = args.master_port
        if port is None and nnodes == 1:
            port = free_port()  # deepspeed's default 29500 collides with any other local job
        if port is not None:
            command += ["--master_port", str(port)]
        return [*command, *extra, str(script), *run]
    command = [sys.executable, "-m", QUIET_TORCHRUN, "--nproc_per_node", str(args.nproc_per_node)]
    if (nnodes == 1 and not args.rdzv_endpoint and not args.master_addr
            and args.master_port is None):
        command += ["--standalone"]  # a free rendezvous port on this machine
    else:
        command += ["--nnodes", str(nnodes)]
        if args.rdzv_endpoint:
            command += ["--rdzv_backend", "c10d", "--rdzv_endpoint", args.rdzv_endpoint]
        if args.node_rank is not None:
            command += ["--node_rank", str(args.node_rank)]
        if args.master_addr:
            command += ["--master_addr", args.master_addr]
        if args.master_port is not None:
            command += ["--master_port", str(args.master_port)]
    if args.max_restarts is not None:
        command += ["--max_restarts", str(args.max_restarts)]
    return [*command, *extra, str(script), *run]


# torchrun's c10d rendezvous shares one store server, created by the first round's rank-0 agent,
# with every later round, and an agent builds its bootstrap information (the store's address)
# only in its first round. A node started again after it was lost joins a later round for the
# first time and waits for an address the surviving rank-0 agent never publishes again: both
# agents fail 60 s later (torch 2.14). Without the shared store, rank 0 publishes a fresh
# address in every round and its rank hosts the process group's store itself.
C10D_ENVIRONMENT = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def launcher_environment(args: argparse.Namespace,
                         environment: dict[str, str]) -> dict[str, str]:
    """The launcher's environment: `environment` with C10D_ENVIRONMENT under torchrun's c10d
    rendezvous (where the user has not set those variables)."""
    if (args.launcher or "torchrun") == "torchrun" and args.rdzv_endpoint:
        return {**C10D_ENVIRONMENT, **environment}
    return dict(environment)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_launch_flags(args: argparse.Namespace) -> None:
    """Usage errors of the launch flags (before anything starts)."""
    if args.nproc_per_node is None:
        given = [flag for attribute, flag in _LAUNCH_FLAGS
                 if getattr(args, attribute) is not None]
        if given:
            raise UsageError(f"app-dist train: {given[0]} needs --nproc-per-node N (the ranks "
                             "per node to launch); see `app-dist train --help`")
        return
    for attribute, flag in (("nproc_per_node", "--nproc-per-node"), ("nnodes", "--nnodes")):
        value = getattr(args, attribute)
        if value is not None and value < 1:
            raise UsageError(f"app-dist train: {flag} {value}: must be >= 1")
    if args.local_rank is not None:
        raise UsageError("app-dist train: --local_rank is for the ranks a launcher starts, "
                         "not for --nproc-per-node")
    launcher = args.launcher or "torchrun"
    only = {"torchrun": (("rdzv_endpoint", "--rdzv-endpoint"),
                         ("max_restarts", "--max-restarts")),
            "deepspeed": (("hostfile", "--hostfile"),)}
    for other, flags in only.items():
        for attribute, flag in flags:
            if other != launcher and getattr(args, attribute) is not None:
                raise UsageError(f"app-dist train: {flag} is {other}'s; this launch uses "
                                 f"--launcher {launcher}")


def check_writable(run_dir: Path) -> None:
    """The error rank 0 would stop with when it cannot create `run_dir` (its nearest existing
    folder is a file or not writable), raised here before any launcher starts."""
    found = why_folder_cannot_be_made(run_dir)
    if found is not None:
        problem, existing = found
        raise ConfigError(f"config key 'run.dir': cannot write to {run_dir} ({problem}: "
                          f"{existing})")


def read_outcome(path: Path) -> dict | None:
    """The outcome file rank 0 wrote as the run ended, or None (absent or unreadable)."""
    try:
        outcome = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return outcome if isinstance(outcome, dict) else None


def run_exit_code(launcher_code: int, outcome: dict | None) -> int:
    """The wrapper's exit code: the run's own (75 pre-empted, 2 bad input) when the launcher
    failed and the outcome file says so, else the launcher's."""
    if launcher_code != 0 and outcome is not None:
        return OUTCOME_EXIT_CODES.get(outcome.get("status"), launcher_code)
    return launcher_code


def supervise(command: list[str], environment: dict[str, str] | None = None) -> int:
    """Run `command` in a process group of its own until it ends, forwarding SIGTERM, SIGINT
    and SIGHUP to that group (those this process does not ignore: under `nohup` a hang-up
    stays ignored); when it failed, wait for the processes it started too. Its exit code
    (128 + N when signal N ended it)."""
    child: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)  # arrived while starting: delivered once it runs
            return
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # already gone
            pass

    previous = {number: signal.signal(number, forward) for number in heeded_signals()}
    adopts_orphans = set_subreaper(True)
    try:
        child = subprocess.Popen(command, start_new_session=True, env=environment)
        for signum in pending:
            forward(signum, None)
        code = child.wait()
        if code != 0:
            wait_for_the_launch(child.pid, DRAIN_TIMEOUT_S)
    finally:
        if adopts_orphans:
            set_subreaper(False)
        for number, handler in previous.items():
            signal.signal(number, handler)
    return shell_exit_code(code)


def wait_for_the_launch(group: int, timeout_s: float) -> bool:
    """After the launcher exited, wait up to `timeout_s` until no process is left in its
    process group `group` (those it started that are this process's children now, adopted
    as a subreaper, are reaped as they end; other children are left alone). The run's
    outcome file is final only then. False when some were still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-group, os.WNOHANG)[0] > 0:  # reap the group's ended children
                pass
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return True
        if time.monotonic() >= deadline:
            _say(f"[app-dist] processes of the launch still run after {timeout_s:.0f} s; not "
                 "waiting for them")
            return False
        if not announced:
            _say("[app-dist] the launcher has exited; waiting for its ranks to finish")
            announced = True
        time.sleep(0.2)


def _say(line: str) -> None:
    """A line on stderr, if there still is one (after a hang-up writes fail with EIO)."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def launch(args: argparse.Namespace) -> int:
    """Check the input, start the launcher, wait, and return the run's exit code."""
    if args.config is None:
        raise missing_config("app-dist train")
    nnodes = args.nnodes or 1
    config = load_config(args.config, args.overrides)
    prepare(config, world_size=args.nproc_per_node * nnodes)
    run_dir = run_directory(config)
    check_writable(run_dir)
    if nnodes == 1:  # on several nodes rank 0 alone knows whether it got the lock
        check_free(run_dir)
    outcome = RunLayout(run_dir).outcome
    with contextlib.suppress(OSError):  # an unwritable run.dir is rank 0's one-line error
        outcome.unlink(missing_ok=True)  # an earlier launch's: it must not speak for this one
    command = launcher_command(args, TRAINER_SCRIPT)
    print(f"[app-dist] {shlex.join(command)}", flush=True)
    launcher_code = supervise(command, launcher_environment(args, dict(os.environ)))
    ended = read_outcome(outcome)
    code = run_exit_code(launcher_code, ended)
    if code != launcher_code:
        _say(f"[app-dist] the launcher exited {launcher_code}; the run's outcome is "
             f"{ended['status']!r}: exit {code}")
    return code


def main(argv: list[str] | None = None) -> int:
    """`app-dist train`: in this process without --nproc-per-node (app_dist/train.py's
    main, given the same arguments), else through a launcher (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def body(args: argparse.Namespace) -> int:
        check_launch_flags(args)
        if args.nproc_per_node is None:
            with preemption_listening():  # before torch's import, as train.py
                from app_dist.train import main as train_here  # only now: it imports torch

                return train_here(argv)
        return launch(args)

    return run_command(build_parser(), argv, body)
