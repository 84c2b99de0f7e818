"""BatchNorm running statistics across ranks: what both engines do at the end of an epoch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from app_dist.foundations.distributed import Platform


@torch.no_grad()
def average_batchnorm_statistics(module: nn.Module, platform: Platform) -> None:
    """Each rank's BN running statistics saw only its own batches: average them (in fp32,
    one all-reduce) so every rank holds the same model, as timm's distribute_bn does.
    Call on every rank."""
    if not platform.distributed:
        return
    stats = [buffer for name, buffer in module.named_buffers()
             if name.endswith(("running_mean", "running_var"))]
    if not stats:
        return
    flat = torch.cat([s.reshape(-1).float() for s in stats])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= platform.world_size
    for stat, averaged in zip(stats, flat.split([s.numel() for s in stats])):
        stat.copy_(averaged.view_as(stat))
