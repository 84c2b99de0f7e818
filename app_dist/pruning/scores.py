"""Scoring criteria (docs/METHOD.md section 3): a higher score means keep the weight.

Each function returns one score tensor per prunable weight, computed on this rank only; the
pruner sums per-rank contributions with an all-reduce, so a criterion that sees data returns
the part that adds up across ranks (SNIP: the accumulated gradient, made absolute later;
GraSP: the gradient, then the Hessian-gradient product). SynFlow sees no data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from app_dist.models.batchnorm import per_rank_statistics
from app_dist.pruning.threshold import masks_from_scores

Weights = dict[str, nn.Parameter]
Batch = tuple[torch.Tensor, torch.Tensor]

# GraSP as in the authors' code (itself from Tanaka et al.'s SynFlow repository): logits are
# divided by a temperature of 200 and each of the two batches holds 10 samples per class.
GRASP_TEMPERATURE = 200.0
GRASP_SAMPLES_PER_CLASS = 10
# The SynFlow paper prunes in 100 rounds of exponentially decreasing density.
SYNFLOW_ITERATIONS = 100


def magnitude_scores(weights: Weights) -> dict[str, torch.Tensor]:
    return {name: weight.detach().abs().float().cpu() for name, weight in weights.items()}


def random_scores(weights: Weights, seed: int) -> dict[str, torch.Tensor]:
    """Uniform noise from a CPU generator seeded the same on every rank: identical masks."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(w.shape, generator=generator) for name, w in weights.items()}


@contextmanager
def train_mode_restoring_buffers(model: nn.Module) -> Iterator[None]:
    """Train mode (batch statistics, as the criteria prescribe) for the duration, then every
    buffer (BatchNorm running statistics) and the mode are put back exactly as they were.
    BatchNorm normalises the batch this rank scores, also with model.sync_batchnorm: a score
    pass is computed on this rank alone (per_rank_statistics says why syncing would be wrong
    with prune.scoring=whole, and could hang with split)."""
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        with per_rank_statistics(model):
            yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved_buffers[name])
        model.train(was_training)


def snip_gradient_sums(model: nn.Module, weights: Weights, batches: Iterable[Batch],
                       device: torch.device) -> dict[str, torch.Tensor]:
    """Gradients of the cross-entropy summed over this rank's scoring samples.

    Summed, not averaged per batch: every sample weighs the same, so a short last batch (64 +
    3 samples) does not give its 3 samples 21 times the weight of the others, and the sums add
    up over ranks whatever their batch sizes. (A constant factor changes no mask: with equal
    batches this ranks weights as the per-batch mean does.) Runs in train mode, as the method
    prescribes, but restores every buffer (BatchNorm running statistics) afterwards so that
    scoring leaves the model exactly as it found it.
    """
    sums = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    with train_mode_restoring_buffers(model):
        for images, labels in batches:
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images.to(device)), labels.to(device), reduction="sum")
            grads = torch.autograd.grad(loss, list(weights.values()))
            for name, grad in zip(weights, grads):
                sums[name] += grad.detach().float().cpu()
    return sums


def snip_scores_from_gradients(weights: Weights,
                               gradient_sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|dL/dm| = |g * w| at the current weights, from the (all-reduced) gradient sums."""
    return {
        name: (gradient_sums[name] * weights[name].detach().float().cpu()).abs()
        for name in weights
    }


def class_balanced_batches(batches: Iterable[Batch], num_classes: int, per_class: int,
                           count: int = 2) -> list[Batch]:
    """`count` disjoint batches holding `per_class` samples of every class each, taken in
    stream order: batch k gets the samples k*per_class .. (k+1)*per_class - 1 of each class.

    Reading stops as soon as every class is complete. A class with too few samples in
    `batches` fills the earlier batches first, so a batch can be short (or empty).
    """
    wanted = per_class * count
    images: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    for batch_images, batch_labels in batches:
        for image, label in zip(batch_images, batch_labels.tolist()):
            if len(images[label]) < wanted:
                images[label].append(image)
        if all(len(found) == wanted for found in images):
            break
    out: list[Batch] = []
    for k in range(count):
        chosen = [(image, label) for label, found in enumerate(images)
                  for image in found[k * per_class : (k + 1) * per_class]]
        if chosen:
            out.append((torch.stack([image for image, _ in chosen]),
                        torch.tensor([label for _, label in chosen])))
        else:
            out.append((torch.empty(0), torch.empty(0, dtype=torch.long)))
    return out


def _tempered_loss_sum(model: nn.Module, batch: Batch, device: torch.device,
                       temperature: float) -> torch.Tensor:
    images, labels = batch
    logits = model(images.to(device)) / temperature
    return F.cross_entropy(logits, labels.to(device), reduction="sum")


def grasp_gradient(model: nn.Module, weights: Weights, batch: Batch, device: torch.device,
                   temperature: float = GRASP_TEMPERATURE) -> dict[str, torch.Tensor]:
    """g: the gradient of the summed cross-entropy of logits / temperature over `batch`
    (train mode, buffers restored). Sums over samples, so per-rank results add up to the
    gradient over all ranks' samples. An empty batch gives zeros."""
    if len(batch[1]) == 0:
        return {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    with train_mode_restoring_buffers(model):
        loss = _tempered_loss_sum(model, batch, device, temperature)
        grads = torch.autograd.grad(loss, list(weights.values()))
    return {name: grad.detach().float().cpu() for name, grad in zip(weights, grads)}


def grasp_hessian_gradient_product(model: nn.Module, weights: Weights, batch: Batch,
                                   gradient: dict[str, torch.Tensor], device: torch.device,
                                   temperature: float = GRASP_TEMPERATURE
                                   ) -> dict[str, torch.Tensor]:
    """H g on `batch`: the gradient of (g . dL/dw) with g held fixed (double backward), where
    H is the Hessian of the summed tempered cross-entropy over `batch`. Sums over samples, so
    per-rank products add up. An empty batch gives zeros."""
    if len(batch[1]) == 0:
        return {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    params = list(weights.values())
    # The fused attention kernels (flash, memory-efficient) have no second derivative; the
    # math one does (ViTs: app_dist/models/vit.py). No effect on models without attention.
    with train_mode_restoring_buffers(model), sdpa_kernel(SDPBackend.MATH):
        loss = _tempered_loss_sum(model, batch, device, temperature)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        inner = sum((grad * gradient[name].to(grad.device, grad.dtype)).sum()
                    for name, grad in zip(weights, grads))
        products = torch.autograd.grad(inner, params)
    return {name: product.detach().float().cpu() for name, product in zip(weights, products)}


def grasp_scores_from_products(weights: Weights,
                               hessian_gradient: dict[str, torch.Tensor]
                               ) -> dict[str, torch.Tensor]:
    """(H g) * w, signed. GraSP's removal score is -(H g) * w and GraSP removes its largest
    values; keeping the largest (H g) * w is the same choice, made by our one rule "keep the
    largest score" (the authors' code computes exactly this and keeps its largest)."""
    return {name: hessian_gradient[name] * weights[name].detach().float().cpu()
            for name in weights}


def synflow_scores(model: nn.Module, masks: dict[str, torch.Tensor],
                   input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """|dR/dw * w| with R = sum of the outputs of the network whose every parameter and
    floating buffer is replaced by its absolute value, on one all-ones input, in float64
    (products of |weights| over 50 layers overflow float32), BatchNorm in eval mode.

    `masks` ({weight name: 0/1 tensor}) stand in for the model's mask buffers, so a weight
    pruned in an earlier round has no path to R. Runs through torch.func.functional_call on
    detached copies: the model's parameters, buffers and gradients are never touched, only
    its train/eval flag, which is restored.
    """
    device = next(model.parameters()).device
    tensors = {name: t.detach().abs().double()
               for name, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_floating_point()}
    for name, mask in masks.items():
        tensors[name.removesuffix("weight") + "weight_mask"] = mask.to(device, torch.float64)
    prunable = {name: tensors[name].requires_grad_() for name in masks}
    was_training = model.training
    model.eval()
    try:
        ones = torch.ones((1, *input_shape), dtype=torch.float64, device=device)
        flow = functional_call(model, tensors, (ones,)).sum()
        grads = torch.autograd.grad(flow, list(prunable.values()))
    finally:
        model.train(was_training)
    # Per layer the scores add up to about R (synaptic saliency is conserved), which can be
    # far beyond float32's range; divided by R they are fractions of the total flow.
    total_flow = float(flow.detach())
    scale = total_flow if total_flow > 0 else 1.0
    return {name: (grad * prunable[name]).detach().abs().div(scale).float().cpu()
            for name, grad in zip(prunable, grads)}


def synflow_iterated_scores(model: nn.Module, masks: dict[str, torch.Tensor],
                            input_shape: tuple[int, ...], density: float, scope: str,
                            iterations: int = SYNFLOW_ITERATIONS) -> dict[str, torch.Tensor]:
    """Iterative SynFlow from the current masks down to `density`, as scores for one final
    nested threshold.

    The SynFlow paper re-scores after every one of `iterations` rounds whose densities
    decrease exponentially (here from the current density d0 to `density`:
    d0 * (density / d0) ** (k / iterations)). The returned scores are those of the last
    round with -inf at the weights the earlier rounds removed, so that keeping the top
    `density` of the survivors of `masks` (the pruner's one threshold) gives exactly the
    mask of the last round. One prune step is thus one complete iterative SynFlow from the
    current mask to d_t: Anytime OSP gets the paper's schedule from 1 to its final density,
    APP gets it in short stretches, one per megabatch, each re-scored at the trained weights.
    """
    current = {name: mask.detach().cpu().float() for name, mask in masks.items()}
    total = sum(mask.numel() for mask in current.values())
    start = sum(float(mask.sum()) for mask in current.values()) / total
    for k in range(1, iterations):
        scores = synflow_scores(model, current, input_shape)
        current = masks_from_scores(scores, current, start * (density / start) ** (k / iterations),
                                    scope)
    scores = synflow_scores(model, current, input_shape)
    minus_infinity = torch.tensor(-math.inf, dtype=torch.float32)
    return {name: torch.where(current[name].bool(), score, minus_infinity)
            for name, score in scores.items()}
