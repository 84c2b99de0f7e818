"""Model-side speed switches in one place: perf.channels_last, perf.compile, perf.autocast.

`accelerate` changes the model in place before an engine wraps it, so every engine (DDP,
DeepSpeed) and every caller (training, evaluation, scoring) sees the same model and the same
state-dict names. Masks stay exact under all three switches: a masked layer multiplies
`weight * weight_mask` inside its forward (traced by torch.compile as ordinary graph inputs,
so in-place mask updates are seen without recompiling), the product is formed in fp32 before
autocast casts it, and a zero stays a zero in every dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from app_dist.config import PerfSettings
from app_dist.foundations.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(perf: PerfSettings, device: torch.device) -> None:
    """Refuse GPU-only switches once the device is known (run.device=auto may pick the CPU)."""
    if device.type == "cuda":
        return
    if perf.autocast != "off":
        raise ConfigError(f"config key 'perf.autocast' = {perf.autocast!r}: mixed precision "
                          f"is for GPUs and this run is on {device.type}; use off")
    if perf.gpu_decode:
        raise ConfigError(f"config key 'perf.gpu_decode' = True: this run is on {device.type}, "
                          "not a GPU; set perf.gpu_decode=false")


def accelerate(model: nn.Module, perf: PerfSettings, device: torch.device) -> nn.Module:
    """Apply perf.channels_last and perf.compile to `model` in place and return it (and
    perf.cudnn_benchmark, a process-wide cuDNN setting).

    channels_last converts every 4-d parameter and buffer (the conv weights and their masks)
    to NHWC; parameters keep their identity, so masks, hooks and optimizers built on them
    still hold. compile uses `Module.compile`, which compiles the module's call without
    wrapping it: state-dict keys stay unprefixed and checkpoints stay interchangeable with
    eager runs. Call before the engine wraps the model (DDP, DeepSpeed).
    """
    check_device(perf, device)
    torch.backends.cudnn.benchmark = perf.cudnn_benchmark and device.type == "cuda"
    if perf.channels_last:
        model.to(memory_format=torch.channels_last)
    if perf.compile:
        model.compile()
    return model


def autocast(perf: PerfSettings, device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed-precision context of a forward pass (a no-op when perf.autocast is off).
    Losses are computed from `logits.float()` outside it."""
    if perf.autocast == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[perf.autocast])


def needs_loss_scaling(perf: PerfSettings) -> bool:
    """fp16 gradients underflow without a loss scale; bf16 has fp32's range."""
    return perf.autocast == "fp16"


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run a compiled model eagerly: for one-off passes (pruning scores) that would pay for a
    compilation, and for GraSP's double backward, which compiled graphs cannot run."""
    with torch.compiler.set_stance("force_eager"):
        yield
