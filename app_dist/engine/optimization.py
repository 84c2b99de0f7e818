"""The optimizer and learning-rate schedule every engine uses (docs/METHOD.md section 2): SGD
with momentum and weight decay; at each megabatch the rate restarts at lr0 and falls by gamma
at the milestone epochs."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR

from app_dist.config import TrainSettings


def sgd_optimizer(module: nn.Module, settings: TrainSettings) -> torch.optim.SGD:
    return torch.optim.SGD(module.parameters(), lr=settings.lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)


def restarted_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> MultiStepLR:
    """A fresh MultiStepLR starting at lr0 (momentum buffers carry over)."""
    for group in optimizer.param_groups:
        group["lr"] = settings.lr
        group["initial_lr"] = settings.lr
    return MultiStepLR(optimizer, milestones=list(settings.milestones), gamma=settings.gamma)
