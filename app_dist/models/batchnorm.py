"""model.sync_batchnorm: BatchNorm whose training statistics are those of the global batch.

Under data parallelism each rank's BatchNorm normalises only its own share of the batch, so
what a run computes depends on the number of ranks. `GlobalBatchNorm2d` exchanges per-channel
(count, mean, centred sum of squares) with one all-reduce per forward and normalises with
the statistics of all ranks' batches together; the all-reduce is torch's differentiable one,
whose backward all-reduces the gradients, so the gradient is that of the global batch too.

Why not torch's nn.SyncBatchNorm: it refuses CPU tensors (torch 2.14: "SyncBatchNorm expected
input tensor to be on GPU ..."), and the tests and CI run on the CPU with gloo; it is not a
BatchNorm2d (isinstance checks of BN folding would skip it); and it synchronises whenever it
is in train mode, also in the scoring passes, where synchronising is wrong (see
`per_rank_statistics`). One module for every device keeps one tested code path; on a GPU it
costs a few more elementwise kernels than cuDNN's fused ones (not measured here: no GPU).

The module is a BatchNorm2d with another forward, converted in place by swapping the class
(as the masked layers are): parameters, buffers and state_dict keys stay those of
BatchNorm2d, so checkpoints, export and folding see no difference. Outside training mode,
without a process group of more than one rank, or inside `per_rank_statistics`, it runs
BatchNorm2d's own forward: a single process computes exactly what plain BatchNorm computes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_autograd
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d normalising with the batch statistics of every rank of the default process
    group (training mode). Every rank must call forward the same number of times, with the
    same channels: each training forward is a collective."""

    synchronise: bool = True  # False inside per_rank_statistics

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.synchronise and _world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        mean, variance, count = self._global_statistics(input)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_statistics(mean.detach(), variance.detach(), count)
        invstd = torch.rsqrt(variance + self.eps)
        scale = invstd if self.weight is None else invstd * self.weight.float()
        shape = (1, -1, 1, 1)
        output = (input.float() - mean.view(shape)) * scale.view(shape)
        if self.bias is not None:
            output = output + self.bias.float().view(shape)
        return output.to(input.dtype)

    def _global_statistics(self, input: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, biased variance, count) per channel over every rank's batch, differentiable
        (the count is a float64 scalar tensor: reading it on the host would stall a GPU).

        Each rank contributes its own (count, mean, centred sum of squares) in its row of a
        world-size x (2C + 1) table, zero elsewhere, and one all-reduce sums the table: an
        all-gather whose backward (an all-reduce of the gradients) gloo supports. The rows are
        combined as in Chan et al.'s parallel variance: no sum of squares minus squared sum,
        so no cancellation when a channel's mean is large against its spread. The table is
        float64: counts stay exact and the combination adds next to no rounding."""
        channels = input.size(1)
        count = input.numel() // channels
        if count:
            variance, mean = torch.var_mean(input.float(), dim=(0, 2, 3), correction=0)
        else:  # an empty batch on this rank adds nothing
            mean = variance = input.new_zeros(channels, dtype=torch.float32)
        mean, variance = mean.double(), variance.double()
        local = torch.cat([mean.new_full((1,), float(count)), mean, variance * count])
        rank, world_size = dist.get_rank(), dist.get_world_size()
        rows = [local if r == rank else torch.zeros_like(local) for r in range(world_size)]
        table = distributed_autograd.all_reduce(torch.stack(rows))
        counts, means, squares = table[:, :1], table[:, 1:1 + channels], table[:, 1 + channels:]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        centred = squares.sum(0) + (counts * (means - global_mean) ** 2).sum(0)
        return global_mean.float(), (centred / total).float(), total.detach()

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, variance: torch.Tensor,
                                   count: torch.Tensor) -> None:
        """As BatchNorm does: momentum (or the cumulative average when momentum is None),
        the running variance from the unbiased variance of the global batch."""
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        unbiased = variance.double() * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype) * factor)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def synchronise_batchnorm(model: nn.Module) -> int:
    """Turn every BatchNorm2d of `model` into a GlobalBatchNorm2d in place (same parameters,
    buffers and state_dict keys); returns how many. A BatchNorm2d that another class already
    extends (the channel-masked one of prune.structure=channel) gets a class with both
    forwards, its own outermost, so it keeps what it adds. Call before an engine wraps the
    model."""
    converted = 0
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
            module.__class__ = _synchronised(type(module))
            converted += 1
    return converted


@functools.cache
def _synchronised(kind: type[nn.BatchNorm2d]) -> type[GlobalBatchNorm2d]:
    if kind is nn.BatchNorm2d:
        return GlobalBatchNorm2d
    # MRO: kind's forward, then GlobalBatchNorm2d's (its super() call), then BatchNorm2d's.
    return type(f"Global{kind.__name__}", (kind, GlobalBatchNorm2d), {})


@contextmanager
def per_rank_statistics(model: nn.Module) -> Iterator[None]:
    """For the duration, `model`'s GlobalBatchNorm2d layers normalise each rank's batch alone
    (plain BatchNorm) and issue no collective. For passes where a rank's batch is not its
    share of a global batch: the pruning scores (pruning/scores.py) are computed on each rank
    alone, with prune.scoring=whole over the whole global batch on every rank (synchronising
    would count each sample world-size times and, through the backward all-reduce, multiply
    the gradient through the statistics by the world size), with split over each rank's
    share in as many batches as that share fills (ranks may hold different counts, so a
    collective per forward could hang)."""
    layers = [m for m in model.modules() if isinstance(m, GlobalBatchNorm2d)]
    saved = [layer.synchronise for layer in layers]
    for layer in layers:
        layer.synchronise = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.synchronise = value
