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

ZeRO's files hold one optimizer partition per rank, so every checkpoint also holds the master
weights and optimizer state gathered whole (unpartitioned.pt, tensors only, sealed with the
checkpoint's sha256 like every other file): a resume on another number of ranks
(checkpoint.allow_world_size_change) partitions them afresh (`DeepSpeedEngine.load`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
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
from app_dist.foundations.run_layout import CheckpointFiles
from app_dist.foundations.torch_files import atomic_torch_save, load_torch_file
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


SHM_ALLREDUCE_PREFIX = "deepspeed_allreduce_buffer"  # deepspeed/ops/csrc/cpu/comm/shm.cpp


def shared_allreduce_buffer_name(rank: int) -> str:
    """The /dev/shm name DeepSpeed's CPU all-reduce gives rank `rank`'s buffer."""
    return (f"{SHM_ALLREDUCE_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_shared_allreduce_buffer(platform: Platform) -> None:
    """DeepSpeed's CPU accelerator (0.19) gives every rank a 69 MB shared-memory buffer
    for its all-reduce and never unlinks it: /dev/shm is RAM, so each CPU run, finished or
    killed, kept 69 MB per rank until reboot, and a day of runs filled a 24 GiB machine.
    Every rank opens its peers' buffers by name inside deepspeed.initialize; once all have
    (the barrier), the names are no longer needed and the mappings live on without them,
    so nothing is left behind even by SIGKILL."""
    if platform.device.type != "cpu":
        return  # the buffers exist only with the CPU accelerator
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    Path("/dev/shm", shared_allreduce_buffer_name(platform.rank)).unlink(missing_ok=True)


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


def saved_module_state(folder: Path) -> dict[str, torch.Tensor] | None:
    """The module state dict DeepSpeed saved in checkpoint `folder` (its rank-0 model-states
    file, whole at ZeRO stages 0 to 2), floating tensors in float32: the weights the run
    evaluated with. None when the folder holds no DeepSpeed checkpoint. Read like every
    DeepSpeed file (weights_only with `deepspeed_safe_globals`)."""
    files = sorted((folder / DeepSpeedEngine.CHECKPOINT_DIR / DeepSpeedEngine.TAG)
                   .glob("*model_states.pt"))
    if not files:
        return None
    saved = load_torch_file(files[0], "cpu", deepspeed_safe_globals())
    if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
        raise CheckpointError(f"{files[0]} holds no 'module' state dict")
    return {name: value.float() if value.is_floating_point() else value
            for name, value in saved["module"].items()}


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
    UNPARTITIONED = CheckpointFiles.UNPARTITIONED  # beside CHECKPOINT_DIR

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
        _unlink_shared_allreduce_buffer(platform)
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

    def _gathered(self, parameters: Iterable[tuple[str, nn.Parameter]]
                  ) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        """(name, full fp32 master, {optimizer state key: full state}) of each parameter, on
        this rank's device. Call on ALL ranks with the same parameters in the same order: each
        get all-reduces the parameter's partitions."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._link_optimizer_state()
        keys = self._optimizer_state_keys()
        for name, parameter in parameters:
            yield (name, safe_get_full_fp32_param(parameter),
                   {key: safe_get_full_optimizer_state(parameter, key) for key in keys})

    @torch.no_grad()
    def apply_masks(self, new_masks: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self.masks.set(new_masks)
        self.masks.apply_to_weights()
        if not self._has_master():
            zero_optimizer_state(self.optimizer, self.masks)
            return
        # The sets write each rank's own partition (no collective).
        for name, master, states in self._gathered(self.masks.weights.items()):
            weight, mask = self.masks.weights[name], self.masks.masks[name]
            safe_set_full_fp32_param(weight, master * mask.to(master.dtype))
            for key, state in states.items():
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
        residue = self.masks.pruned_residue(self.optimizer)
        if not self._has_master():  # the weights are the master, the client optimizer's state
            return {"weights": residue["weights"], "master_weights": residue["weights"],
                    "optimizer_state": residue["optimizer_state"]}
        master_residue, state_residue = 0.0, 0.0
        for name, master, states in self._gathered(self.masks.weights.items()):
            pruned = ~self.masks.masks[name].bool()
            if not pruned.any():
                continue
            master_residue = max(master_residue, float(master[pruned].abs().max()))
            for state in states.values():
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
        return [self.CHECKPOINT_DIR, self.UNPARTITIONED]

    def save(self, folder: Path) -> None:
        """DeepSpeed's checkpoint (every rank writes its optimizer partition) into
        folder/deepspeed/engine/, the lr scheduler riding in its client_state; with a master
        copy also folder/unpartitioned.pt (rank 0), for a resume on another number of ranks.
        All ranks."""
        if self.engine.micro_steps % self.engine.gradient_accumulation_steps():
            # A live run carries a partial accumulation into the next epoch (when an epoch's
            # batch count is no multiple of it); a resume from here starts that one afresh.
            log.warning("checkpoint inside a gradient accumulation: the %d micro-batch "
                        "gradient(s) accumulated so far are not saved",
                        self.engine.micro_steps % self.engine.gradient_accumulation_steps())
        self.engine.save_checkpoint(str(folder / self.CHECKPOINT_DIR), tag=self.TAG,
                                    client_state={"scheduler": self.scheduler.state_dict()},
                                    save_latest=False)
        if self._has_master():
            self._save_unpartitioned(folder / self.UNPARTITIONED)

    @torch.no_grad()
    def _save_unpartitioned(self, path: Path) -> None:
        """The master weights and optimizer state whole, by parameter name: what no world
        size shapes. DeepSpeed's universal checkpoints would do this from its partition files
        but cannot here (0.19.8's ds_to_universal knows only Adam's exp_avg/exp_avg_sq and
        stops with KeyError 'exp_avg' on SGD's momentum_buffer; its loader reads the
        converted files with torch.load(weights_only=False) and leaves module buffers such
        as BatchNorm statistics unloaded). Gathered on all ranks (collectives), written by
        rank 0."""
        master: dict[str, torch.Tensor] = {}
        optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
        for name, weight, states in self._gathered(self.module.named_parameters()):
            master[name] = weight.cpu()
            for key, state in states.items():
                optimizer_state.setdefault(key, {})[name] = state.cpu()
        if self.platform.is_primary:
            atomic_torch_save({"master": master, "optimizer_state": optimizer_state}, path)

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote. DeepSpeed's ZeRO files hold one optimizer partition per
        rank of the run that wrote them: with as many ranks now DeepSpeed loads them; with
        another number (checkpoint.allow_world_size_change) it loads the module and the
        scheduler, and the master weights and optimizer state come from unpartitioned.pt,
        partitioned afresh for this run. All ranks."""
        tag_dir = folder / self.CHECKPOINT_DIR / self.TAG
        partitions = len(list(tag_dir.glob("*optim_states.pt")))
        unpartitioned = None
        if partitions and partitions != self.platform.world_size:
            path = folder / self.UNPARTITIONED
            if not path.is_file():
                raise CheckpointError(
                    f"{tag_dir} holds ZeRO partitions of {partitions} ranks, this run has "
                    f"{self.platform.world_size}, and no {self.UNPARTITIONED} to partition "
                    f"afresh (the checkpoint predates it): resume it with {partitions} ranks")
            unpartitioned = load_torch_file(path)
        loaded, client_state = self.engine.load_checkpoint(
            str(folder / self.CHECKPOINT_DIR), tag=self.TAG,
            load_optimizer_states=unpartitioned is None, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed found no checkpoint to load")
        self.scheduler.load_state_dict(_scheduler_state(client_state, tag_dir))
        if unpartitioned is not None:
            self._load_unpartitioned(unpartitioned, folder / self.UNPARTITIONED)

    @torch.no_grad()
    def _load_unpartitioned(self, state: dict[str, Any], where: Path) -> None:
        """Write `_save_unpartitioned`'s tensors into this run's partitions (each rank its
        own; no collective). DeepSpeed's load without optimizer states has set the master
        from the module's weights; the saved master is exact also where those are half."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        parameters = dict(self.module.named_parameters())
        master, optimizer_state = state["master"], state["optimizer_state"]
        for kind, saved in (("master weights", master), *optimizer_state.items()):
            if saved.keys() != parameters.keys():
                raise CheckpointError(f"{where}: its {kind} are for other parameters than "
                                      "this model's")
        # A fresh optimizer holds no state until its first step: create it, then link
        # DeepSpeed's per-parameter views into it, so that the sets below land there.
        for group in self.optimizer.param_groups:
            for flat in group["params"]:
                for key in optimizer_state:
                    self.optimizer.state[flat].setdefault(key, torch.zeros_like(flat))
        self._link_optimizer_state()
        for name, parameter in parameters.items():
            safe_set_full_fp32_param(parameter, master[name].to(parameter.device))
            for key, values in optimizer_state.items():
                safe_set_full_optimizer_state(parameter, values[name].to(parameter.device),
                                              key)


def _scheduler_state(client_state: dict[str, Any] | None, where: Path) -> dict[str, Any]:
    if not client_state or "scheduler" not in client_state:
        raise CheckpointError(f"{where}: no lr scheduler state in DeepSpeed's client_state")
    return client_state["scheduler"]
