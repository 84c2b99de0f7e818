"""Two "nodes" on one machine: each node is its own launcher process (one rank each), as on a
cluster where every node runs the same command, and the two meet over 127.0.0.1. A run split
over two nodes must compute exactly what the same run computes on two ranks of one node.

Both launchers are given OMP_NUM_THREADS=1: a one-rank node would otherwise use every core
for its rank (and torchrun sets 1 only for several ranks per node), and a different thread
count may change float summation order in the CPU kernels.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app_dist.foundations.run_layout import CheckpointFiles, RunLayout

from .conftest import (
    REPO,
    checkpoint_folder,
    deepspeed_run_args,
    digits_run_args,
    free_port,
    kill_tree,
    launch,
    rank_processes,
    read_metrics,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = str(REPO / "app_dist" / "train.py")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_nodes(commands: list[list[str]], tmp_path: Path, timeout: int = 400) -> None:
    """Start every node's command at once and wait for all; each must exit 0."""
    logs = [tmp_path / f"node-{rank}.log" for rank in range(len(commands))]
    nodes = [launch(command, env=ONE_THREAD, stdout=log.open("w"), stderr=log.open("a"))
             for command, log in zip(commands, logs)]
    try:
        codes = [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for code, log in zip(codes, logs):
        assert code == 0, log.read_text()[-3000:]


def wait_for_listener(port: int, process: subprocess.Popen, timeout: float) -> bool:
    """Until something listens on 127.0.0.1:`port` while `process` runs."""
    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return True
    return wait_for(listening, process, timeout, interval=0.1)


def final_weights(run_dir: Path, megabatch: int = 3) -> dict[str, torch.Tensor]:
    folder = RunLayout(run_dir).checkpoint(megabatch)
    return torch.load(folder / CheckpointFiles.ENGINE, weights_only=True)["model"]


def test_torchrun_over_two_nodes_with_c10d_rendezvous_equals_one_node(digits_shards, tmp_path,
                                                                      uninterrupted):
    """`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d` started twice, as two
    nodes do: the rendezvous (hosted by whichever agent binds the endpoint first) gives the two
    ranks; metrics, masks and weights equal the 2-rank single-node run's."""
    run_dir = tmp_path / "run"
    args = digits_run_args(digits_shards, run_dir, "log.wandb.mode=disabled")
    endpoint = f"127.0.0.1:{free_port()}"
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", "two-nodes", SCRIPT, *args]
    run_nodes([node, node], tmp_path)
    assert read_metrics(run_dir) == read_metrics(uninterrupted)
    weights, want = final_weights(run_dir), final_weights(uninterrupted)
    assert all(torch.equal(weights[name], want[name]) for name in want)


@pytest.mark.deepspeed
def test_the_deepspeed_launcher_over_two_nodes_without_ssh_equals_one_node(digits_shards,
                                                                          tmp_path, zero_runs):
    """The deepspeed launcher on each node with `--no_ssh --node_rank N` and a hostfile of two
    hosts of one slot each (no ssh, no pdsh: each node starts its own ranks, as a scheduler
    that runs the command on every node does); ZeRO-2 metrics equal the same run started by
    the deepspeed launcher on one node with two ranks (which sets one thread per rank)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run_dir = tmp_path / "two-nodes"
    args = deepspeed_run_args(digits_shards, run_dir, 2, "log.wandb.mode=disabled")
    port = str(free_port())
    nodes = [[sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
              "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
              "--master_port", port, SCRIPT, *args]
             for rank in (0, 1)]
    run_nodes(nodes, tmp_path)
    assert read_metrics(run_dir) == read_metrics(zero_runs(2))


def test_two_nodes_resume_after_a_killed_rank_and_after_a_lost_node_is_started_again(
        digits_shards, tmp_path, uninterrupted):
    """Two torchrun nodes (c10d rendezvous, `--max-restarts 2`, the environment CLUSTER.md
    gives every node: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). Node A starts first and hosts the
    rendezvous endpoint, as the head node does. Once megabatch 1's checkpoint is complete,
    node B's rank is SIGKILLed (a crash, an OOM kill): both agents restart their ranks in a new
    rendezvous round, which resume after megabatch 1. Once megabatch 2's checkpoint is
    complete, node B is lost whole (its agent, rank and the rank's readers SIGKILLed) and its
    command is started again, as a scheduler replaces a node: the surviving agent's rank fails,
    the agent re-rendezvouses with the new one (whose restart count starts again from 0), and
    the run resumes after megabatch 2. Metrics and final weights equal the uninterrupted 2-rank
    run's."""
    run_dir = tmp_path / "run"
    args = digits_run_args(digits_shards, run_dir, "log.wandb.mode=disabled")
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "--rdzv-id", "lost-node", "--max-restarts", "2",
               # A lost node leaves the rendezvous once it missed 3 keep-alives: 1 s apart
               # here (torch's default: 5 s), so the restart waits 3 s for it, not 15.
               "--rdzv-conf", "keep_alive_interval=1,keep_alive_max_attempt=3",
               SCRIPT, *args]
    env = {**ONE_THREAD, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    logs = [tmp_path / "node-a.log", tmp_path / "node-b.log", tmp_path / "node-b-again.log"]

    def start(log: Path) -> subprocess.Popen:
        return launch(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def output() -> str:
        return "".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs
                       if log.exists())

    node_a = start(logs[0])
    nodes = [node_a]
    try:
        assert wait_for_listener(port, node_a, timeout=60), output()
        node_b = start(logs[1])
        nodes.append(node_b)
        first = checkpoint_folder(run_dir, 1) / CheckpointFiles.MARKER
        assert wait_for(first, node_a, timeout=300), output()
        os.kill(rank_processes(node_b.pid)[0], signal.SIGKILL)
        killed = time.monotonic()
        second = checkpoint_folder(run_dir, 2) / CheckpointFiles.MARKER
        assert wait_for(second, node_a, timeout=300), output()
        lost = time.monotonic()
        kill_tree(node_b)
        nodes.append(start(logs[2]))
        codes = [nodes[0].wait(timeout=300), nodes[2].wait(timeout=300)]
        print(f"killed rank -> megabatch 2 checkpointed: {lost - killed:.1f} s; lost node -> "
              f"run finished: {time.monotonic() - lost:.1f} s")
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_tree(node)
    assert codes == [0, 0], output()
    text = "".join(log.read_text() for log in logs)
    assert "resuming after megabatch 1" in text and "resuming after megabatch 2" in text, output()
    assert read_metrics(run_dir) == read_metrics(uninterrupted)
    weights, want = final_weights(run_dir), final_weights(uninterrupted)
    assert all(torch.equal(weights[name], want[name]) for name in want)
