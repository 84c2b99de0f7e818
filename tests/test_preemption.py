"""Pre-emption delivered the way clusters and terminals deliver it, in every cell of the
matrix {launcher, whole process tree, one rank, Ctrl-C} x {DDP under torchrun, DeepSpeed
ZeRO-2 under the deepspeed launcher} x {mid-epoch, during validation, during the checkpoint
write}.

The rank pauses at the moment (the fault hook only times the fault: it writes a file and
sleeps); the test then signals from outside: SIGTERM to the launcher process (torchrun
forwards it to each rank's process group; the deepspeed runner does not forward it, so its
cell signals the runner's process group, as `timeout` and Kubernetes do), to every process of
the tree (SLURM's scancel signals them all, readers and their fork server included), or to
one rank; or SIGINT to the launcher's process group, as a terminal's Ctrl-C does. Every cell
must end with a checkpoint that verifies and an outcome file that says "preempted"; the same
command then resumes and ends with the uninterrupted run's metrics, masks and weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from app_dist.foundations.distributed import Platform
from app_dist.foundations.run_layout import CheckpointFiles, RunLayout
from app_dist.training.checkpoint import Checkpointer

from .conftest import (
    assert_phases_fit,
    digits_run_args,
    final_masks_and_weights,
    launch_trainer,
    read_metrics,
    run_trainer,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

MEGABATCHES = 3  # digits_run_args
PAUSE = "pause:rank=0,seconds=3,announce={announce},"
MOMENTS = {
    # (where rank 0 pauses, the checkpoint the pre-emption must leave)
    "mid-epoch": ("megabatch=2,epoch=0,step=2,at=step", "preempted-0002"),
    "validation": ("megabatch=2,epoch=0,at=validation", "preempted-0002"),
    "checkpoint-write": ("megabatch=1,at=checkpoint", "megabatch-0001"),
}
ENGINES = {"ddp": ("torchrun", ()),
           "deepspeed": ("deepspeed", ("engine.kind=deepspeed", "engine.zero_stage=2"))}


def run_args(shards: Path, run_dir: Path, engine: str) -> list[str]:
    # The shared reference runs' settings (digits_run_args: 3 megabatches of 2 epochs), with
    # the decode-once cache off: every pass is read by reader processes (started from a fork
    # server), which the signals then reach as well; digits is small enough to be decoded in
    # the training process otherwise. The cache is exact: it hands the model the same decoded
    # and augmented tensors, so metrics, masks and weights still equal the references' (which
    # this test checks under both engines).
    return digits_run_args(shards, run_dir, "log.wandb.mode=disabled",
                           "perf.cache_decoded=false", *ENGINES[engine][1])


@pytest.fixture
def references(request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """engine -> the run directory of the shared uninterrupted 2-rank run (DDP under torchrun:
    `uninterrupted`; DeepSpeed ZeRO-2 through the wrapper: `zero_runs(2)`), made on first use,
    that every resumed run must equal."""
    def reference(engine: str) -> Path:
        if engine == "ddp":
            return request.getfixturevalue("uninterrupted")
        return request.getfixturevalue("zero_runs")(2)

    return reference


def ranks_of(launcher_pid: int) -> list[psutil.Process]:
    """The rank processes below a launcher (torchrun: its children; deepspeed: the children
    of its launch.py), not their reader processes."""
    ranks = []
    for process in psutil.Process(launcher_pid).children(recursive=True):
        command = " ".join(process.cmdline())
        if ("app_dist/train.py" in command and "torch.distributed.run" not in command
                and "deepspeed.launcher" not in command):
            ranks.append(process)
    return sorted(ranks, key=lambda process: process.pid)


def deliver(delivery: str, launcher: subprocess.Popen, engine: str) -> None:
    if delivery == "ctrl-c":  # a terminal signals its foreground job's process group
        os.killpg(launcher.pid, signal.SIGINT)
    elif delivery == "launcher":
        if engine == "deepspeed":
            os.killpg(launcher.pid, signal.SIGTERM)  # the runner's group: runner + launch.py
        else:
            os.kill(launcher.pid, signal.SIGTERM)
    elif delivery == "tree":
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(
            recursive=True)]
        for process in tree:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
    else:
        ranks = ranks_of(launcher.pid)
        assert len(ranks) == 2, ranks
        ranks[1].send_signal(signal.SIGTERM)  # not the paused rank: the agreement carries it


# Kubernetes' default terminationGracePeriodSeconds is 30; a pod spec may set less, and 15 s
# still holds the digits run's pre-emption checkpoint with room to spare (it takes ~3 s).
GRACE_SECONDS = 15


DELIVERIES = ("launcher", "tree", "rank", "ctrl-c")
# Each cell costs 25-60 s on 2 cores, so CI runs 5 of the 24: for DDP a Latin square of the
# SIGTERM deliveries (each delivery and each moment once) and Ctrl-C (SIGINT, which torchrun
# passes on to its ranks) at validation; for DeepSpeed its checkpoint files cut off mid-write.
# Its runner's process group signalled (the launcher does not forward SIGTERM) is the
# wrapper's DeepSpeed test in test_run_lock_and_launcher.py, which also checks that the wrapper
# waits for the ranks. What a signalled rank does and a mid-epoch pre-emption checkpoint are
# the same code under both engines (DDP's rank and mid-epoch cells). APP_DIST_FULL_MATRIX=1 runs
# all 24 cells (as docs/RELIABILITY.md reports).
IN_CI = {"ddp": {("launcher", "mid-epoch"), ("tree", "validation"),
                 ("rank", "checkpoint-write"), ("ctrl-c", "validation")},
         "deepspeed": {("tree", "checkpoint-write")}}
FULL_MATRIX = os.environ.get("APP_DIST_FULL_MATRIX") == "1"
CELLS = [pytest.param(engine, delivery, moment,
                      marks=[pytest.mark.deepspeed] if engine == "deepspeed" else [])
         for engine in ENGINES for delivery in DELIVERIES for moment in MOMENTS
         if FULL_MATRIX or (delivery, moment) in IN_CI[engine]]


@pytest.mark.parametrize(("engine", "delivery", "moment"), CELLS)
def test_sigterm_from_outside_leaves_a_resumable_checkpoint_and_resumes_exactly(
        engine: str, delivery: str, moment: str, digits_shards: Path, tmp_path: Path,
        references) -> None:
    where, expected_checkpoint = MOMENTS[moment]
    run_dir = tmp_path / "run"
    announce = tmp_path / "paused"
    fault = PAUSE.format(announce=announce) + where
    launcher = launch_trainer(run_args(digits_shards, run_dir, engine), nproc=2,
                              launcher=ENGINES[engine][0], env={"APP_DIST_FAULT": fault})
    try:
        assert wait_for(announce, launcher, timeout=300), "the run never reached the moment"
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(
            recursive=True)]
        deliver(delivery, launcher, engine)
        # The deepspeed runner dies at once; the job has ended when every process has. SIGTERM
        # to torchrun is also what the kubelet sends a pod's main process: that job must end
        # by itself, its pre-emption checkpoint written, inside the pod's grace period.
        in_time = GRACE_SECONDS if (engine, delivery) == ("ddp", "launcher") else 180
        _, alive = psutil.wait_procs(tree, timeout=in_time)
        for process in alive:
            process.kill()
        assert not alive, f"still running {in_time} s after the pre-emption: {alive}"
    finally:
        if launcher.poll() is None:  # the test failed early: leave nothing running
            for process in psutil.Process(launcher.pid).children(recursive=True):
                process.kill()
            launcher.kill()
        launcher.wait()
    outcome = json.loads(RunLayout(run_dir).outcome.read_text())
    assert outcome["status"] == "preempted" and outcome["exit_code"] == 75, outcome
    latest = Checkpointer(run_dir, Platform(0, 1, 0, torch.device("cpu")), 10).latest()
    assert latest is not None and latest.path.name == expected_checkpoint
    if latest.partial:
        # Megabatch 2's time so far travels with it: its pruning and its training steps (in
        # the mid-epoch cell, those of an unfinished first epoch).
        progress = torch.load(latest.path / CheckpointFiles.STATE, weights_only=True)["progress"]
        assert progress["prune_seconds"] > 0 and progress["train_seconds"] > 0, progress

    # The same command again (without the fault) finishes the run.
    launcher_name = ENGINES[engine][0]
    resumed = run_trainer(run_args(digits_shards, run_dir, engine), nproc=2,
                          launcher=launcher_name)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = references(engine)
    assert read_metrics(run_dir) == read_metrics(reference)
    for line in RunLayout(run_dir).metrics.read_text().splitlines():
        assert_phases_fit(json.loads(line))
    masks, weights = final_masks_and_weights(run_dir, engine)
    want_masks, want_weights = final_masks_and_weights(reference, engine)
    assert all(torch.equal(masks[name], want_masks[name]) for name in want_masks)
    assert all(torch.equal(weights[name], want_weights[name]) for name in want_weights)


def test_kubernetes_grace_period_exceeded_leaves_the_previous_checkpoint_to_resume_from(
        digits_shards: Path, tmp_path: Path, references) -> None:
    """What the kubelet does to a pod: SIGTERM to the container's main process (here the
    launcher), then SIGKILL to every process left GRACE_SECONDS later. Rank 0 holds the
    end-of-megabatch-2 checkpoint past the grace period, so SIGKILL arrives before it is
    written: the previous checkpoint must be intact, and the same command resumes from it and
    ends with the uninterrupted run's metrics, masks and weights. (A pre-emption checkpoint
    that fits in the grace period is the ddp-launcher cell above.)"""
    run_dir = tmp_path / "run"
    announce = tmp_path / "paused"
    fault = f"pause:rank=0,seconds=120,announce={announce},megabatch=2,at=checkpoint"
    launcher = launch_trainer(run_args(digits_shards, run_dir, "ddp"), nproc=2,
                              env={"APP_DIST_FAULT": fault})
    try:
        assert wait_for(announce, launcher, timeout=300), "the run never reached the moment"
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(
            recursive=True)]
        launcher.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=GRACE_SECONDS)
        assert alive, "the run ended inside the grace period: the case needs a longer pause"
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
    latest = Checkpointer(run_dir, Platform(0, 1, 0, torch.device("cpu")), 10).latest()
    assert latest is not None and latest.path.name == "megabatch-0001"

    resumed = run_trainer(run_args(digits_shards, run_dir, "ddp"), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = references("ddp")
    assert read_metrics(run_dir) == read_metrics(reference)
    masks, weights = final_masks_and_weights(run_dir, "ddp")
    want_masks, want_weights = final_masks_and_weights(reference, "ddp")
    assert all(torch.equal(masks[name], want_masks[name]) for name in want_masks)
    assert all(torch.equal(weights[name], want_weights[name]) for name in want_weights)
