"""Speed switches in one place: what `auto` means on this run's device and engine
(`resolve_perf`), and the model-side switches perf.channels_last, perf.compile,
perf.autocast.

`accelerate` changes the model in place before an engine wraps it, so every engine (DDP,
DeepSpeed) and every caller (training, evaluation, scoring) sees the same model and the same
state-dict names. Masks stay exact under all three switches: a masked layer multiplies
`weight * weight_mask` inside its forward (traced by torch.compile as ordinary graph inputs,
so in-place mask updates are seen without recompiling), the product is formed in fp32 before
autocast casts it, and a zero stays a zero in every dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from app_dist.config import AUTO, AUTO_SWITCHES, PerfSettings, require_resolved, switch_text
from app_dist.data.manifest import Manifest
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


def resolve_perf(perf: PerfSettings, device: torch.device, engine_kind: str,
                 manifest: Manifest | None = None) -> PerfSettings:
    """`perf` with every `auto` switch decided for a run on `device` with `engine.kind`
    `engine_kind` reading `manifest`'s shards (None: no dataset, the cache stays off); the
    switches the user set are kept as set. The one place auto is decided: a run resolves
    once, when its device is known, and hands the result to everything that acts on it.

    auto is on where it is faster and changes at most float rounding:
      cache_decoded       the images share one size and the whole dataset decoded fits in
                          perf.cache_max_mb (an upper bound on what one rank keeps); off for
                          variable-size images (ImageNet), with perf.gpu_decode and
                          with perf.loader=dali
      persistent_workers  on
      channels_last       engine ddp (CPU and GPU); DeepSpeed broadcasts flat bytes
      fold_batchnorm      on
      compile             a CUDA device with engine ddp (compiling takes minutes on a CPU;
                          DeepSpeed wraps the model in its own engine, untested compiled)
      cudnn_benchmark     a CUDA device (the CPU has no cuDNN)
    """
    on_gpu = device.type == "cuda"
    automatic = {
        "cache_decoded": (not perf.gpu_decode and perf.loader != "dali"
                          and _dataset_fits(manifest, perf.cache_max_mb)),
        "persistent_workers": True,
        "channels_last": engine_kind == "ddp",
        "fold_batchnorm": True,
        "compile": on_gpu and engine_kind == "ddp",
        "cudnn_benchmark": on_gpu,
    }
    assert set(automatic) == set(AUTO_SWITCHES)
    return dataclasses.replace(perf, **{name: automatic[name] if getattr(perf, name) == AUTO
                                        else getattr(perf, name) for name in AUTO_SWITCHES})


def _dataset_fits(manifest: Manifest | None, max_mb: int) -> bool:
    """Whether every sample of `manifest` decoded (uint8, channels x H x W) fits in `max_mb`.
    Needs one image size for all samples: with sizes that vary the total is unknown."""
    if manifest is None or manifest.image_size is None:
        return False
    height, width = manifest.image_size
    samples = sum(split.num_samples for split in manifest.splits.values())
    return samples * manifest.channels * height * width <= max_mb << 20


def describe_perf(configured: PerfSettings, resolved: PerfSettings) -> str:
    """One line for the run's log: every auto-capable switch as resolved, `(auto)` after the
    ones auto decided, e.g. `channels_last=true (auto), compile=false (auto), ...`."""
    return ", ".join(f"{name}={switch_text(getattr(resolved, name))}"
                     + (" (auto)" if getattr(configured, name) == AUTO else "")
                     for name in AUTO_SWITCHES)


def accelerate(model: nn.Module, perf: PerfSettings, device: torch.device) -> nn.Module:
    """Apply perf.channels_last and perf.compile to `model` in place and return it (and
    perf.cudnn_benchmark, a process-wide cuDNN setting).

    channels_last converts every 4-d parameter and buffer (the conv weights and their masks)
    to NHWC; parameters keep their identity, so masks, hooks and optimizers built on them
    still hold. compile uses `Module.compile`, which compiles the module's call without
    wrapping it: state-dict keys stay unprefixed and checkpoints stay interchangeable with
    eager runs. Call before the engine wraps the model (DDP, DeepSpeed), with `perf`
    resolved (resolve_perf).
    """
    require_resolved(perf)
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
