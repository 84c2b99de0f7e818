"""Scoring criteria (APP_SPEC.md section 3): a higher score means keep the weight.

Each function returns one score tensor per prunable weight, computed on this rank only; the
pruner sums per-rank contributions with an all-reduce, so a criterion that sees data returns
the part that adds up across ranks (SNIP: the accumulated gradient, made absolute later).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

Weights = dict[str, nn.Parameter]


def magnitude_scores(weights: Weights) -> dict[str, torch.Tensor]:
    return {name: weight.detach().abs().float().cpu() for name, weight in weights.items()}


def random_scores(weights: Weights, seed: int) -> dict[str, torch.Tensor]:
    """Uniform noise from a CPU generator seeded the same on every rank: identical masks."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(w.shape, generator=generator) for name, w in weights.items()}


def snip_gradient_sums(model: nn.Module, weights: Weights,
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       device: torch.device) -> dict[str, torch.Tensor]:
    """Gradients of the mean cross-entropy accumulated over this rank's scoring batches.

    Runs in train mode, as the method prescribes, but restores every buffer (BatchNorm running
    statistics) afterwards so that scoring leaves the model exactly as it found it.
    """
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    sums = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    for images, labels in batches:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        grads = torch.autograd.grad(loss, list(weights.values()))
        for name, grad in zip(weights, grads):
            sums[name] += grad.detach().float().cpu()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(saved_buffers[name])
    model.train(was_training)
    return sums


def snip_scores_from_gradients(weights: Weights,
                               gradient_sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|dL/dm| = |g * w| at the current weights, from the (all-reduced) gradient sums."""
    return {
        name: (gradient_sums[name] * weights[name].detach().float().cpu()).abs()
        for name in weights
    }
