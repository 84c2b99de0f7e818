"""The DDP engine: torch DistributedDataParallel (or the bare model in a single process)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from app_dist.config import Config
from app_dist.engine.acceleration import autocast, needs_loss_scaling
from app_dist.engine.base import StepResult, module_state
from app_dist.engine.batchnorm import average_batchnorm_statistics
from app_dist.engine.optimization import restarted_schedule, sgd_optimizer
from app_dist.foundations.distributed import Platform
from app_dist.foundations.run_layout import CheckpointFiles
from app_dist.foundations.torch_files import atomic_torch_save, load_torch_file
from app_dist.pruning.masks import MaskSet


class DDPEngine:
    def __init__(self, model: nn.Module, masks: MaskSet, platform: Platform,
                 config: Config) -> None:
        self.platform = platform
        self.settings = config.train
        self.perf = config.perf
        self.module = model.to(platform.device)
        self.masks = masks
        # Masks are registered before wrapping; buffers are not broadcast every forward because
        # that would hide a mask divergence (masks are checked by checksum instead) and BN
        # statistics are averaged once per epoch in end_epoch.
        self.model: nn.Module = self._wrap(self.module) if platform.distributed else self.module
        self.optimizer = sgd_optimizer(self.module, self.settings)
        self.scheduler = restarted_schedule(self.optimizer, self.settings)
        # perf.autocast=fp16: scaled losses keep small gradients from flushing to zero. A
        # skipped step (inf/nan gradients) leaves weights and masks as they were.
        self.scaler = torch.amp.GradScaler(platform.device.type,
                                           enabled=needs_loss_scaling(self.perf))

    def _wrap(self, module: nn.Module) -> DistributedDataParallel:
        with warnings.catch_warnings():
            # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, which still
            # syncs buffers at construction; its own message says to keep broadcast_buffers
            # until there is a way to skip that.
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated",
                                    FutureWarning)
            return DistributedDataParallel(module, broadcast_buffers=False,
                                           device_ids=[self.platform.device.index]
                                           if self.platform.device.type == "cuda" else None)

    def start_megabatch(self) -> None:
        self.scheduler = restarted_schedule(self.optimizer, self.settings)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        images = images.to(self.platform.device, non_blocking=True)
        labels = labels.to(self.platform.device, non_blocking=True)
        with autocast(self.perf, self.platform.device):
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.masks.apply_to_weights()
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).sum()
        return StepResult(loss.detach() * labels.numel(), correct, labels.numel())

    def end_epoch(self) -> None:
        self.scheduler.step()
        average_batchnorm_statistics(self.module, self.platform)

    def apply_masks(self, new_masks: dict[str, torch.Tensor]) -> None:
        self.masks.update(new_masks, self.optimizer)

    def pruned_residue(self) -> dict[str, float]:
        return self.masks.pruned_residue(self.optimizer)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    ENGINE_FILE = CheckpointFiles.ENGINE

    def engine_state_files(self) -> list[str]:
        return [self.ENGINE_FILE]

    def save(self, folder: Path) -> None:
        # DDP replicas are identical: rank 0's copy is the whole state.
        if self.platform.is_primary:
            atomic_torch_save({
                "model": module_state(self.module),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
            }, folder / self.ENGINE_FILE)

    def load(self, folder: Path) -> None:
        state = load_torch_file(folder / self.ENGINE_FILE)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when loss scaling is off
            self.scaler.load_state_dict(state["scaler"])
