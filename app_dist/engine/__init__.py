"""Training engines: how a model, its optimizer and its masks take one step on one rank.

The megabatch loop talks only to the `Engine` interface; `build_engine` picks the
implementation named by `engine.kind`.
"""

from __future__ import annotations

import logging

from torch import nn

from app_dist.config import Config
from app_dist.engine.acceleration import accelerate
from app_dist.engine.base import Engine, StepResult
from app_dist.foundations.distributed import Platform
from app_dist.models.batchnorm import synchronise_batchnorm
from app_dist.pruning.masks import MaskSet

log = logging.getLogger("app_dist")


def build_engine(config: Config, model: nn.Module, masks: MaskSet, platform: Platform) -> Engine:
    # model.sync_batchnorm, perf.channels_last and perf.compile change the model in place,
    # before any engine wraps it (and before compiling, which then traces the synced layers).
    if config.model.sync_batchnorm and platform.distributed:
        layers = synchronise_batchnorm(model)
        log.info("model.sync_batchnorm: %d BatchNorm layers normalise with the statistics of "
                 "the global batch over %d ranks", layers, platform.world_size)
    accelerate(model, config.perf, platform.device)
    if config.engine.kind == "ddp":
        from app_dist.engine.ddp import DDPEngine

        return DDPEngine(model, masks, platform, config)
    if config.engine.kind == "deepspeed":
        from app_dist.engine.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, masks, platform, config)
    raise ValueError(f"unknown engine.kind '{config.engine.kind}'")


__all__ = ["Engine", "StepResult", "build_engine"]
