"""From scores to masks: keep exactly round(d * N) weights, ties broken by flat index."""

from __future__ import annotations

import torch

Scores = dict[str, torch.Tensor]


def keep_count(density: float, total: int) -> int:
    return int(round(density * total))


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A bool tensor of scores' shape with exactly `keep` True entries: the largest scores,
    and among equal scores at the threshold the lowest flat indices (deterministic on every
    rank and rerun, unlike topk). O(N): one kthvalue instead of a full sort."""
    flat = scores.reshape(-1)
    total = flat.numel()
    if keep >= total:
        return torch.ones_like(flat, dtype=torch.bool).view_as(scores)
    if keep <= 0:
        return torch.zeros_like(flat, dtype=torch.bool).view_as(scores)
    threshold = torch.kthvalue(flat.float(), total - keep + 1).values
    kept = flat > threshold
    missing = keep - int(kept.sum())
    tied = torch.nonzero(flat == threshold).view(-1)
    kept[tied[:missing]] = True
    return kept.view_as(scores)


def masks_from_scores(scores: Scores, masks: dict[str, torch.Tensor], density: float,
                      scope: str) -> dict[str, torch.Tensor]:
    """New nested masks at `density` of all prunable weights (global) or of each layer (local).

    Already-pruned weights score -inf, so the kept set is the top of the survivors and no
    pruned weight comes back: the new mask is a subset of the old one.
    """
    survivors = {
        name: torch.where(masks[name].bool(), score.float(), torch.tensor(float("-inf")))
        for name, score in scores.items()
    }
    if scope == "local":
        return {
            name: keep_top(score, keep_count(density, score.numel())).to(masks[name].dtype)
            for name, score in survivors.items()
        }
    if scope != "global":
        raise ValueError(f"unknown pruning scope '{scope}'")
    names = list(survivors)
    flat = torch.cat([survivors[name].reshape(-1) for name in names])
    kept = keep_top(flat, keep_count(density, flat.numel()))
    out, start = {}, 0
    for name in names:
        size = survivors[name].numel()
        out[name] = kept[start : start + size].view_as(survivors[name]).to(masks[name].dtype)
        start += size
    return out
