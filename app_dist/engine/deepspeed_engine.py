"""The DeepSpeed engine: ZeRO stage 0-2 data parallelism with masks exact in every copy.

ZeRO (and DeepSpeed's half-precision optimizers) keep an fp32 master copy of the weights and
the optimizer state in their own flat partitions and write the master back into the model
after every step, so zeroing `param.data` is undone (PITFALLS.md, "DeepSpeed"). Masks stay
exact because
  - the masked forward never lets a pruned weight reach an output,
  - MaskSet's gradient hooks run before DeepSpeed's post-accumulate hooks, so the gradient
    ZeRO reduces is already zero at pruned positions and the master cannot move there,
  - when masks change (and when best weights are loaded) every rank rewrites the master
    weights and the optimizer state through deepspeed.utils.safe_set_full_* (collective-free
    writes into each rank's own partition).

The data never passes through DeepSpeed (no `training_data`): the project's loader decides
the order, so it is the same as under DDP. Nor do its checkpoint files pass through its own
checkpoint engine, which loads them with torch.load(weights_only=False), i.e. runs whatever
code a file pickles: `VerifiedCheckpointFiles` writes them atomically and reads them with
weights_only=True (PITFALLS.md, "DeepSpeed").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from app_dist.config import Config
from app_dist.engine.base import StepResult
from app_dist.engine.batchnorm import average_batchnorm_statistics
from app_dist.engine.deepspeed_config import deepspeed_config, load_raw, precision_of
from app_dist.engine.optimization import restarted_schedule, sgd_optimizer
from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import CheckpointError
from app_dist.foundations.files import atomic_torch_save, load_torch_file
from app_dist.foundations.run_layout import CheckpointFiles
from app_dist.pruning.masks import MaskSet, zero_optimizer_state

log = logging.getLogger("app_dist")

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _join_single_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group and the launcher's environment even for one process;
    outside a launcher (plain `python`) it would try MPI discovery. A store in memory needs
    no port."""
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed (0.19) pickles into its checkpoint files besides tensors,
    containers and primitive values: ZeRO's optimizer state holds its loss scaler, its stage
    enum and the addresses of parameter fragments in its flat partitions
    (torch.serialization.get_unsafe_globals_in_checkpoint on fp32 ZeRO-1/2 files; the dynamic
    scaler of fp16 runs is read from DeepSpeed's code, not from a GPU run). Plain data
    classes: unpickling them runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class VerifiedCheckpointFiles:
    """DeepSpeed's checkpoint engine with the project's file handling in place of torch's:
    every file is written atomically (a full disk raises OSError and leaves no partial file)
    and read with weights_only=True and `deepspeed_safe_globals` (a file that pickles code
    is refused with a CheckpointError naming it). Everything else (which rank writes, commit)
    is DeepSpeed's own engine's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        atomic_torch_save(state_dict, Path(path))

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_torch_file(Path(path), map_location, deepspeed_safe_globals())


class DeepSpeedEngine:
    CHECKPOINT_DIR = CheckpointFiles.DEEPSPEED  # inside the megabatch checkpoint folder
    TAG = "engine"  # DeepSpeed's tag folder: CHECKPOINT_DIR/TAG/*.pt

    def __init__(self, model: nn.Module, masks: MaskSet, platform: Platform,
                 config: Config) -> None:
        import deepspeed

        # DeepSpeed logs its whole config and every collective's setup at INFO.
        deepspeed.utils.logger.setLevel(logging.WARNING)
        raw = load_raw(config.engine.deepspeed_config) if config.engine.deepspeed_config else None
        self.ds_config = deepspeed_config(config.engine, config.train, platform.world_size,
                                          platform.device.type, raw)
        self.platform = platform
        self.settings = config.train
        self.masks = masks
        self.module = model.to(platform.device)
        # The client optimizer: ZeRO keeps it and steps it on its own fp32 partitions, so its
        # param_groups carry the lr our scheduler sets.
        self.optimizer = sgd_optimizer(self.module, self.settings)
        if not platform.distributed:
            _join_single_process_group(platform.device)
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=self.optimizer,
                                                    config=self.ds_config)
        self.engine.checkpoint_engine = VerifiedCheckpointFiles(self.engine.checkpoint_engine)
        self.zero_stage = self.engine.zero_optimization_stage()
        self.precision = precision_of(self.ds_config)
        if self.precision != "fp32":
            self._compute_in_half(HALF_DTYPES[self.precision])
        self.scheduler = restarted_schedule(self.optimizer, self.settings)

    def _compute_in_half(self, dtype: torch.dtype) -> None:
        """DeepSpeed casts the model to half; the model's input normalisation returns fp32
        (it takes uint8 pixels), so cast its output to the network's dtype. Evaluation and
        scoring run the bare module, not the DeepSpeed wrapper, so this lives on the module."""
        normalize = getattr(self.module, "normalize", None)
        if normalize is None:
            raise ValueError("half precision needs a model built by app_dist.models "
                             "(with its `normalize` input layer)")
        normalize.register_forward_hook(lambda _module, _inputs, output: output.to(dtype))

    # ------------------------------------------------------------------ training

    def start_megabatch(self) -> None:
        self.scheduler = restarted_schedule(self.optimizer, self.settings)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        images = images.to(self.platform.device, non_blocking=True)
        labels = labels.to(self.platform.device, non_blocking=True)
        logits = self.engine(images)
        loss = F.cross_entropy(logits, labels)
        self.engine.backward(loss)
        # Steps the optimizer only at a gradient-accumulation boundary, then zeroes gradients.
        self.engine.step()
        self.masks.apply_to_weights()
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).sum()
        return StepResult(loss.detach().float() * labels.numel(), correct, labels.numel())

    def end_epoch(self) -> None:
        self.scheduler.step()
        average_batchnorm_statistics(self.module, self.platform)

    # ------------------------------------------------------------------ the copies ZeRO keeps

    def _has_master(self) -> bool:
        """Whether DeepSpeed keeps a master copy apart from the model's weights. At ZeRO
        stage 0 in fp32 it steps the client optimizer on the weights themselves."""
        return any(hasattr(p, "_hp_mapping") for p in self.module.parameters())

    def _optimizer_state_keys(self) -> list[str]:
        """Names of the tensor-valued optimizer states (SGD: momentum_buffer). Every rank steps
        the same number of times, so every rank gets the same list (the gathers below are
        collectives and must match)."""
        keys: set[str] = set()
        for state in self.optimizer.state.values():
            keys.update(k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0)
        return sorted(keys)

    @torch.no_grad()
    def apply_masks(self, new_masks: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        self.masks.set(new_masks)
        self.masks.apply_to_weights()
        if not self._has_master():
            zero_optimizer_state(self.optimizer, self.masks)
            return
        self._link_optimizer_state()
        keys = self._optimizer_state_keys()
        for weight, mask in zip(self.masks.weights.values(), self.masks.masks.values()):
            # All ranks: the gets all-reduce the partitions, the sets write each rank's own.
            master = safe_get_full_fp32_param(weight)
            safe_set_full_fp32_param(weight, master * mask.to(master.dtype))
            for key in keys:
                state = safe_get_full_optimizer_state(weight, key)
                safe_set_full_optimizer_state(weight, state * mask.to(state.dtype), key)

    def _link_optimizer_state(self) -> None:
        """safe_*_optimizer_state read views into ZeRO's flat optimizer state that DeepSpeed
        links after its first step; load_checkpoint re-creates the mappings without those
        views (DeepSpeed 0.19.8), so a pruning step right after a resume would find none.
        Re-link them: the state is there, only the views are missing."""
        zero = self.engine.optimizer
        if self.optimizer.state and hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    @torch.no_grad()
    def pruned_residue(self) -> dict[str, float]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        residue = self.masks.pruned_residue(self.optimizer)
        if not self._has_master():  # the weights are the master, the client optimizer's state
            return {"weights": residue["weights"], "master_weights": residue["weights"],
                    "optimizer_state": residue["optimizer_state"]}
        self._link_optimizer_state()
        keys = self._optimizer_state_keys()
        master_residue, state_residue = 0.0, 0.0
        for weight, mask in zip(self.masks.weights.values(), self.masks.masks.values()):
            pruned = ~mask.bool()
            master = safe_get_full_fp32_param(weight)
            states = [safe_get_full_optimizer_state(weight, key) for key in keys]
            if not pruned.any():
                continue
            master_residue = max(master_residue, float(master[pruned].abs().max()))
            for state in states:
                state_residue = max(state_residue, float(state[pruned].abs().max()))
        return {"weights": residue["weights"], "master_weights": master_residue,
                "optimizer_state": state_residue}

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        self.module.load_state_dict(state)
        if self._has_master():
            for name, parameter in self.module.named_parameters():
                safe_set_full_fp32_param(parameter, state[name].to(parameter.device).float())

    # ------------------------------------------------------------------ checkpoints

    def engine_state_files(self) -> list[str]:
        return [self.CHECKPOINT_DIR]

    def save(self, folder: Path) -> None:
        """DeepSpeed's checkpoint (every rank writes its optimizer partition) into
        folder/deepspeed/engine/; the lr scheduler rides in its client_state."""
        if self.engine.micro_steps % self.engine.gradient_accumulation_steps():
            # A live run carries a partial accumulation into the next epoch (when an epoch's
            # batch count is no multiple of it); a resume from here starts that one afresh.
            log.warning("checkpoint inside a gradient accumulation: the %d micro-batch "
                        "gradient(s) accumulated so far are not saved",
                        self.engine.micro_steps % self.engine.gradient_accumulation_steps())
        self.engine.save_checkpoint(str(folder / self.CHECKPOINT_DIR), tag=self.TAG,
                                    client_state={"scheduler": self.scheduler.state_dict()},
                                    save_latest=False)

    def load(self, folder: Path) -> None:
        tag_dir = folder / self.CHECKPOINT_DIR / self.TAG
        partitions = len(list(tag_dir.glob("*optim_states.pt")))
        if self.zero_stage > 0 and partitions != self.platform.world_size:
            raise CheckpointError(
                f"{tag_dir} holds ZeRO partitions of {partitions} ranks, this run has "
                f"{self.platform.world_size}; convert it with DeepSpeed's universal checkpoint "
                "tools (ds_to_universal) first")
        loaded, client_state = self.engine.load_checkpoint(
            str(folder / self.CHECKPOINT_DIR), tag=self.TAG, load_optimizer_states=True,
            load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed found no checkpoint to load")
        self.scheduler.load_state_dict(_scheduler_state(client_state, tag_dir))


def _scheduler_state(client_state: dict[str, Any] | None, where: Path) -> dict[str, Any]:
    if not client_state or "scheduler" not in client_state:
        raise CheckpointError(f"{where}: no lr scheduler state in DeepSpeed's client_state")
    return client_state["scheduler"]
