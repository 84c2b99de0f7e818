"""Density schedules of the three methods (docs/METHOD.md section 2)."""

from __future__ import annotations

import numpy as np


def app_levels(megabatches: int, sparsity_level: float) -> list[float]:
    """level_t = linspace(1, tau, T)[t-1]; with T = 1 the single megabatch is the last one,
    so it takes the final level tau (numpy's linspace would give 1)."""
    if megabatches == 1:
        return [float(sparsity_level)]
    return [float(x) for x in np.linspace(1.0, sparsity_level, megabatches)]


def density_schedule(method: str, megabatches: int, sparsity_level: float) -> list[float]:
    """Density d_t for t = 1..T: the fraction of prunable weights kept while training on t.

    dense: 1 everywhere. osp: the final density 0.8 ** tau from t = 1 on. app: 0.8 ** level_t.
    """
    final = 0.8**sparsity_level
    if method == "dense":
        return [1.0] * megabatches
    if method == "osp":
        return [final] * megabatches
    if method == "app":
        return [0.8**level for level in app_levels(megabatches, sparsity_level)]
    raise ValueError(f"unknown pruning method '{method}'")
