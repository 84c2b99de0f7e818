"""prune.structure=N:M (2:4, 4:8, ...): in every group of M consecutive weights along a layer's
input dimension at most N are kept, so the final masks fit the sparse tensor cores of recent
GPUs (2:4: torch.sparse.to_sparse_semi_structured) by construction.

Groups (the layouts the kernels read, so that a valid mask here is a valid sparse operand):
- Linear weight (out, in): M consecutive entries of a row, i.e. along `in`. F.linear computes
  x @ W.T, and to_sparse_semi_structured takes W row-major with 2:4 along its rows.
- Conv2d weight (out, in, kh, kw): M consecutive input channels at one kernel position, the
  reduction dimension of an NHWC implicit GEMM (NVIDIA's ASP and TensorRT group convolution
  weights this way). torch has no sparse convolution kernel: these masks make the model N:M
  but not faster in torch.
A layer whose input dimension is not a multiple of M (a first convolution with 1 or 3 input
channels) has no such groups: it stays dense and is reported (`n_m_layers`), rather than
refusing every CNN and ViT stem.

Progressive and nested (docs/CRITERIA.md): a step to N keeps, in each group, the N best-scored
weights among those still alive, so masks only shrink and every eligible layer sits at exactly
N/M. Ties go to the lower index in the group (a stable sort), so every rank and rerun agrees.
"""

from __future__ import annotations

import math

import torch

from app_dist.pruning.structures import NMPattern


def n_m_steps(method: str, megabatches: int, pattern: NMPattern) -> list[int]:
    """N for megabatch t = 1..T (the density of megabatch t is N_t / M).

    app: N falls from M (dense) at t = 1 to the target N at t = T in equal steps, rounded:
    N_t = M - floor((t - 1) (M - N) / (T - 1) + 1/2). For 2:4 with T = 3: 4:4, 3:4, 2:4 (the
    issue's progression); T = 4: 4, 3, 3, 2; T = 8: 4, 4, 3, 3, 3, 3, 2, 2; T = 1: 2. The
    first megabatch is trained dense so the first N:M step is scored on trained weights (an
    unstructured APP step to 0.8 has no N:M counterpart: 3:4 is already 0.75). With T - 1 <
    M - N some values are skipped (nesting holds all the same: 4:8 with T = 2 is 8, 4).
    osp: N from t = 1 on. dense: M (nothing pruned)."""
    if method == "dense":
        return [pattern.m] * megabatches
    if method == "osp" or (method == "app" and megabatches == 1):
        return [pattern.n] * megabatches
    if method != "app":
        raise ValueError(f"unknown pruning method '{method}'")
    fall = pattern.m - pattern.n
    return [pattern.m - math.floor((t - 1) * fall / (megabatches - 1) + 0.5)
            for t in range(1, megabatches + 1)]


def n_m_density_schedule(method: str, megabatches: int, pattern: NMPattern) -> list[float]:
    """d_t = N_t / M: the density of every N:M-eligible layer while training on t."""
    return [n / pattern.m for n in n_m_steps(method, megabatches, pattern)]


def has_groups(shape: torch.Size | tuple[int, ...], m: int) -> bool:
    """Whether a Linear (2-d) or Conv2d (4-d) weight of `shape` splits into groups of m."""
    return len(shape) in (2, 4) and shape[1] % m == 0


def grouped(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """A (groups, m) view or copy of a weight-shaped tensor, one row per group (layout in the
    module docstring). ungrouped() inverts it."""
    if tensor.dim() == 4:  # (out, in, kh, kw) -> (out, kh, kw, in): input channels innermost
        tensor = tensor.permute(0, 2, 3, 1)
    return tensor.reshape(-1, m)


def ungrouped(groups: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 4:
        out, inputs, kh, kw = shape
        return groups.reshape(out, kh, kw, inputs).permute(0, 3, 1, 2).contiguous()
    return groups.reshape(shape)


def keep_best_n(scores: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The mask (dtype of `mask`) keeping, in each group of m, the n highest-scored weights
    still alive in `mask` (fewer when fewer are alive): nested, exactly n per group when at
    least n were alive. Ties: the lower index in the group."""
    alive = grouped(mask.detach().cpu().bool(), m)
    values = grouped(scores.detach().cpu().float(), m)
    values = torch.where(alive, values, torch.tensor(float("-inf")))
    # A NaN score would sort above everything; treat it as the lowest live score instead.
    values = torch.where(torch.isnan(values), torch.tensor(-torch.finfo(torch.float32).max),
                         values)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    kept = torch.zeros_like(alive)
    kept.scatter_(1, order[:, :n], True)
    kept &= alive
    return ungrouped(kept, mask.shape).to(mask.dtype)


def n_m_masks_from_scores(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                          n: int, m: int) -> dict[str, torch.Tensor]:
    """New nested masks: keep_best_n in every layer that has groups of m; a layer without
    (has_groups false) keeps its current mask (dense)."""
    return {name: keep_best_n(scores[name], mask, n, m) if has_groups(mask.shape, m)
            else mask.detach().cpu().clone() for name, mask in masks.items()}


def is_n_m(mask: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m holds at most n kept weights (False for a layer without groups)."""
    if not has_groups(mask.shape, m):
        return False
    return bool((grouped(mask.detach().cpu().bool(), m).sum(1) <= n).all())


def n_m_summary(masks: dict[str, torch.Tensor], pattern: NMPattern) -> dict[str, dict]:
    """Per layer: whether it has groups of M, whether its mask is valid N:M and valid 2:4
    (what torch's semi-structured kernels take), and its density."""
    return {name: {"shape": list(mask.shape), "grouped": has_groups(mask.shape, pattern.m),
                   "n_m_valid": is_n_m(mask, pattern.n, pattern.m),
                   "valid_2_4": is_n_m(mask, 2, 4),
                   "density": float(mask.float().mean())}
            for name, mask in masks.items()}
