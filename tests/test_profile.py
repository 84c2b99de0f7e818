"""`app-dist profile`: one real megabatch, timed phase by phase."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # `app-dist profile` trains a real megabatch

PHASES = ["data", "forward", "backward", "optimizer", "mask ops", "pruning", "validation data",
          "validation compute", "test data", "test compute", "checkpoint", "other"]


def test_profile_times_every_phase_of_one_megabatch_and_accounts_for_its_wall_time(
        digits_shards):
    result = subprocess.run([sys.executable, "-m", "app_dist.cli", "profile", "--config",
                             str(REPO / "configs/digits.yaml"), f"data.shards={digits_shards}",
                             "log.wandb.mode=disabled", "train.epochs=2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    wall = float(re.search(r"megabatch 1: ([\d.]+) s wall", result.stdout).group(1))
    rows = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^([a-z ]+?)\s+([\d.]+)\s+([\d.]+)%", result.stdout, re.M)}
    assert list(rows) == PHASES
    assert sum(share for _, share in rows.values()) == pytest.approx(100, abs=0.5)
    # Each row and the wall time are printed to 0.01 s: their rounding adds up.
    rounding = 0.005 * (len(rows) + 1)
    assert sum(seconds for seconds, _ in rows.values()) == pytest.approx(wall, rel=0.02,
                                                                         abs=rounding)
    assert rows["pruning"][0] > 0 and rows["forward"][0] > 0 and rows["test compute"][0] > 0
