"""One pruning step on every rank: score, sum scores over ranks, threshold once, verify.

Every rank computes the same threshold from the same all-reduced scores, so the masks agree
by construction; the checksum comparison afterwards turns any divergence (a nondeterministic
kernel, a rank-dependent seed) into an error naming the layer instead of a silent drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from app_dist.distributed import Platform
from app_dist.engine.base import Engine
from app_dist.pruning.masks import MaskSet
from app_dist.pruning.scores import (
    magnitude_scores,
    random_scores,
    snip_gradient_sums,
    snip_scores_from_gradients,
)
from app_dist.pruning.threshold import masks_from_scores
from app_dist.seeding import derived_seed

ScoringBatches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class MaskMismatchError(RuntimeError):
    """Ranks ended a pruning step with different masks."""


def _all_reduce_dict(values: dict[str, torch.Tensor],
                     platform: Platform) -> dict[str, torch.Tensor]:
    """Sum a dict of tensors over ranks with a single collective."""
    if not platform.distributed:
        return values
    flat = platform.all_reduce_sum(torch.cat([v.reshape(-1) for v in values.values()]))
    sizes = [v.numel() for v in values.values()]
    return {name: part.view_as(values[name]) for name, part in zip(values, flat.split(sizes))}


def compute_scores(criterion: str, model: nn.Module, masks: MaskSet, platform: Platform,
                   scoring_batches: ScoringBatches, seed: int, megabatch: int
                   ) -> dict[str, torch.Tensor]:
    """Scores of every prunable weight, identical on every rank (CPU tensors)."""
    if criterion == "magnitude":
        return magnitude_scores(masks.weights)
    if criterion == "random":
        return random_scores(masks.weights, derived_seed(seed, "random-criterion", megabatch))
    if criterion == "snip":
        sums = snip_gradient_sums(model, masks.weights, scoring_batches(), platform.device)
        return snip_scores_from_gradients(masks.weights, _all_reduce_dict(sums, platform))
    raise ValueError(f"unknown pruning criterion '{criterion}'")


def verify_identical_masks(masks: MaskSet, platform: Platform) -> None:
    """Compare per-layer mask checksums across ranks; raise naming the first differing layer."""
    if not platform.distributed:
        return
    gathered = platform.all_gather(masks.checksums())
    names = list(masks.masks)
    for rank, checksums in enumerate(gathered[1:], start=1):
        differing = (checksums != gathered[0]).nonzero().view(-1).tolist()
        if differing:
            raise MaskMismatchError(
                f"masks differ between rank 0 and rank {rank} in layer {names[differing[0]]} "
                f"({len(differing)} layer(s) in all)"
            )


def prune_step(*, density: float, criterion: str, scope: str, engine: Engine,
               platform: Platform, scoring_batches: ScoringBatches, seed: int,
               megabatch: int) -> None:
    """Prune the engine's model to `density` (nested in the current mask) on every rank."""
    masks = engine.masks
    scores = compute_scores(criterion, engine.module, masks, platform, scoring_batches, seed,
                            megabatch)
    current = {name: mask.cpu() for name, mask in masks.masks.items()}
    masks.set(masks_from_scores(scores, current, density, scope))
    engine.masks_changed()
    verify_identical_masks(masks, platform)
