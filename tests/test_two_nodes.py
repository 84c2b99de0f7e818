"""Two "nodes" on one machine: each node is its own launcher process (one rank each), as on a
cluster where every node runs the same command, and the two meet over 127.0.0.1. A run split
over two nodes must compute exactly what the same run computes on two ranks of one node.

Both launchers are given OMP_NUM_THREADS=1: a one-rank node would otherwise use every core
for its rank (and torchrun sets 1 only for several ranks per node), and a different thread
count may change float summation order in the CPU kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from app_dist.foundations.run_layout import CheckpointFiles, RunLayout

from .conftest import (
    REPO,
    deepspeed_run_args,
    digits_run_args,
    free_port,
    launch,
    read_metrics,
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
