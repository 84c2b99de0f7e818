"""One pruning step on every rank: score, sum scores over ranks, threshold once, verify.

Every rank computes the same threshold from the same all-reduced scores, so the masks agree
by construction; the checksum comparison afterwards turns any divergence (a nondeterministic
kernel, a rank-dependent seed) into an error naming the layer instead of a silent drift.
Data-dependent criteria (SNIP, GraSP) sum their per-rank parts with one all-reduce per pass;
SynFlow sees no data, so rank 0 computes it and broadcasts the scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import ConfigError, agreed
from app_dist.foundations.seeding import derived_seed
from app_dist.models.registry import classifier_of
from app_dist.pruning.channels import channel_masks_from_scores, random_group_scores
from app_dist.pruning.masks import MaskSet, mask_checksums
from app_dist.pruning.n_m import n_m_masks_from_scores
from app_dist.pruning.scores import (
    GRASP_SAMPLES_PER_CLASS,
    SYNFLOW_ITERATIONS,
    class_balanced_batches,
    grasp_gradient,
    grasp_hessian_gradient_product,
    grasp_scores_from_products,
    magnitude_scores,
    random_scores,
    snip_gradient_sums,
    snip_scores_from_gradients,
    synflow_iterated_scores,
)
from app_dist.pruning.structures import CHANNEL_CRITERIA
from app_dist.pruning.threshold import masks_from_scores

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
                   scoring_batches: ScoringBatches, seed: int, megabatch: int, *,
                   density: float = 1.0, scope: str = "global",
                   synflow_iterations: int = SYNFLOW_ITERATIONS,
                   class_source: ScoringBatches | None = None) -> dict[str, torch.Tensor]:
    """Scores of every prunable weight, identical on every rank (CPU tensors).

    `density` and `scope` are the step's target: iterative SynFlow prunes towards it in
    rounds and returns scores whose top `density` of the survivors is its last round's mask.
    `class_source` (default: the scoring batches) is where GraSP draws its class-balanced
    batches from: the whole training part of the megabatch, read only as far as needed, so
    that a small scoring sample cannot leave them short.
    """
    if criterion == "magnitude":
        return magnitude_scores(masks.weights)
    if criterion == "random":
        return random_scores(masks.weights, derived_seed(seed, "random-criterion", megabatch))
    if criterion == "snip":
        sums = snip_gradient_sums(model, masks.weights, scoring_batches(), platform.device)
        return snip_scores_from_gradients(masks.weights, _all_reduce_dict(sums, platform))
    if criterion == "grasp":
        return _grasp_scores(model, masks, platform, class_source or scoring_batches, megabatch)
    if criterion == "synflow":
        return _synflow_scores(model, masks, platform, scoring_batches, density, scope,
                               synflow_iterations)
    raise ValueError(f"unknown pruning criterion '{criterion}'")


def _grasp_scores(model: nn.Module, masks: MaskSet, platform: Platform,
                  class_source: ScoringBatches, megabatch: int) -> dict[str, torch.Tensor]:
    """GraSP over all ranks: g from the first class-balanced batch of every rank (summed),
    then H g from the second (summed). Each rank takes its share of the 10 samples per class
    of each batch from its own share of the scoring sample."""
    per_rank = -(-GRASP_SAMPLES_PER_CLASS // platform.world_size)
    num_classes = classifier_of(model).out_features
    first, second = class_balanced_batches(class_source(), num_classes, per_rank, count=2)
    _require_full_batches([first, second], num_classes, per_rank, platform, megabatch)
    gradient = grasp_gradient(model, masks.weights, first, platform.device)
    gradient = _all_reduce_dict(gradient, platform)
    product = grasp_hessian_gradient_product(model, masks.weights, second, gradient,
                                             platform.device)
    return grasp_scores_from_products(masks.weights, _all_reduce_dict(product, platform))


def _require_full_batches(batches: list, num_classes: int, per_class: int,
                          platform: Platform, megabatch: int) -> None:
    """Stop (on every rank, agreed) when a class-balanced batch of any rank lacks samples of a
    class: GraSP on short or empty batches degrades silently (all-zero scores prune by index)."""
    missing = torch.zeros(num_classes, dtype=torch.float64)
    for _, labels in batches:
        found = torch.bincount(labels.long(), minlength=num_classes)[:num_classes]
        missing += (per_class - found).clamp(min=0).double()
    missing = platform.all_reduce_sum(missing) if platform.distributed else missing
    if missing.sum() == 0:
        return
    worst = int(missing.argmax())
    error = ConfigError(
        f"config key 'prune.criterion' = 'grasp': its 2 class-balanced batches need "
        f"{GRASP_SAMPLES_PER_CLASS} samples of each class each, and megabatch {megabatch}'s "
        f"training part is {int(missing.sum())} short (class {worst}: {int(missing[worst])} "
        f"missing{', over ' + str(platform.world_size) + ' ranks' if platform.distributed else ''}"
        f"); use fewer, larger megabatches (data.megabatches) or another prune.criterion")
    raise agreed(error, platform.is_primary)


def _synflow_scores(model: nn.Module, masks: MaskSet, platform: Platform,
                    scoring_batches: ScoringBatches, density: float, scope: str,
                    iterations: int) -> dict[str, torch.Tensor]:
    """Iterative SynFlow computed once, on rank 0, and broadcast: identical on every rank
    whatever the ranks' kernels or thread counts. The input shape (SynFlow feeds one
    all-ones image) is that of the scoring batches, as in the authors' code."""
    scores = {name: torch.empty(weight.shape) for name, weight in masks.weights.items()}
    if platform.is_primary:
        images, _ = next(iter(scoring_batches()))
        current = {name: mask.detach() for name, mask in masks.masks.items()}
        scores = synflow_iterated_scores(model, current, tuple(images.shape[1:]), density,
                                         scope, iterations)
    if not platform.distributed:
        return scores
    flat = platform.broadcast(torch.cat([s.reshape(-1) for s in scores.values()]))
    parts = flat.split([s.numel() for s in scores.values()])
    return {name: part.view_as(scores[name]) for name, part in zip(scores, parts)}


def verify_identical_masks(masks: dict[str, torch.Tensor], platform: Platform) -> None:
    """Compare per-layer mask checksums across ranks; raise naming the first differing layer."""
    if not platform.distributed:
        return
    gathered = platform.all_gather(mask_checksums(masks))
    names = list(masks)
    for rank, checksums in enumerate(gathered[1:], start=1):
        differing = (checksums != gathered[0]).nonzero().view(-1).tolist()
        if differing:
            raise MaskMismatchError(
                f"masks differ between rank 0 and rank {rank} in layer {names[differing[0]]} "
                f"({len(differing)} layer(s) in all)"
            )


def prune_step(module: nn.Module, masks: MaskSet, platform: Platform,
               scoring_batches: ScoringBatches, *, density: float, criterion: str, scope: str,
               seed: int, megabatch: int, synflow_iterations: int = SYNFLOW_ITERATIONS,
               class_source: ScoringBatches | None = None,
               scores_on_every_rank: bool = False) -> dict[str, torch.Tensor]:
    """New masks at `density`, nested in `masks` (a pruned weight stays pruned), for the model
    `module` (uncompiled, as scoring runs eagerly in full precision). Call on every rank: the
    result is identical on all of them, which is verified before it is returned. Installing
    the masks is the caller's job (the engine's `apply_masks`). `class_source`: see
    compute_scores. `scores_on_every_rank` (prune.scoring=whole): the batches are the whole
    scoring sample on every rank, so each rank computes the scores alone, as a single process
    would, with nothing summed over ranks. With a channel plan (prune.structure=channel) whole
    channel groups are pruned (see _channel_step); with an N:M pattern (prune.structure=2:4)
    each group of M keeps its best N = density * M survivors (app_dist/pruning/n_m.py),
    from the same all-reduced scores, checked across ranks the same way."""
    if masks.channel_plan is not None:
        new_masks = _channel_step(module, masks, scorer_for(platform, scores_on_every_rank),
                                  scoring_batches, density=density, criterion=criterion,
                                  seed=seed, megabatch=megabatch)
        verify_identical_masks(new_masks, platform)
        return new_masks
    scores = compute_scores(criterion, module, masks,
                            scorer_for(platform, scores_on_every_rank), scoring_batches, seed,
                            megabatch, density=density, scope=scope,
                            synflow_iterations=synflow_iterations, class_source=class_source)
    current = {name: mask.cpu() for name, mask in masks.masks.items()}
    if masks.n_m is not None:
        # The N:M schedule's densities are N_t / M exactly (n_m.n_m_density_schedule).
        keep = int(round(density * masks.n_m.m))
        new_masks = n_m_masks_from_scores(scores, current, keep, masks.n_m.m)
    else:
        new_masks = masks_from_scores(scores, current, density, scope)
    verify_identical_masks(new_masks, platform)
    return new_masks


def scorer_for(platform: Platform, scores_on_every_rank: bool) -> Platform:
    """The platform criteria sum over: a single process when every rank scores the whole
    sample (prune.scoring=whole)."""
    if scores_on_every_rank and platform.distributed:
        return Platform(rank=0, world_size=1, local_rank=platform.local_rank,
                        device=platform.device)
    return platform


def _channel_step(module: nn.Module, masks: MaskSet, scorer: Platform,
                  scoring_batches: ScoringBatches, *, density: float, criterion: str,
                  seed: int, megabatch: int) -> dict[str, torch.Tensor]:
    """prune.structure=channel: per-weight scores summed per channel group (the same
    all-reduced scores as unstructured runs, so identical on every rank), then whole groups
    pruned lowest first (channels.channel_masks_from_scores)."""
    plan = masks.channel_plan
    assert plan is not None
    if criterion == "random":
        group_scores = random_group_scores(plan, derived_seed(seed, "random-criterion",
                                                              megabatch))
    elif criterion in CHANNEL_CRITERIA:
        scores = compute_scores(criterion, module, masks, scorer, scoring_batches, seed,
                                megabatch)
        group_scores = plan.group_scores(scores)
    else:
        raise ValueError(f"criterion '{criterion}' has no channel form; use one of "
                         f"{', '.join(CHANNEL_CRITERIA)}")
    current = {name: mask.cpu() for name, mask in masks.masks.items()}
    return channel_masks_from_scores(plan, group_scores, current, density)
