"""The DeepSpeed config dict of a run: translated from `engine.*` and `train.*`, then
overridden key by key by the raw DeepSpeed JSON a user may point at (`engine.deepspeed_config`).

Kept free of any deepspeed import so the translation is testable (and its errors raised)
without starting DeepSpeed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from app_dist.config import EngineSettings, TrainSettings
from app_dist.foundations.errors import ConfigError

# The project builds the optimizer (SGD from train.*) and steps its own per-epoch lr schedule;
# a raw file must not replace them behind the masks' back.
REFUSED_RAW_KEYS = ("optimizer", "scheduler")


def translate(engine: EngineSettings, train: TrainSettings, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config that `engine.*` and `train.*` describe.

    train.batch_size is the global batch of one micro-step (split evenly over the ranks); with
    gradient accumulation N an optimizer step sees N of them.
    """
    micro = train.batch_size // world_size
    half = engine.precision != "fp32"
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": engine.gradient_accumulation,
        "train_batch_size": micro * engine.gradient_accumulation * world_size,
        "gradient_clipping": engine.gradient_clipping,
        "zero_optimization": {"stage": engine.zero_stage},
        # ZeRO lists only its own optimizers as tested; torch's SGD is the paper's optimizer.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16"},
        # DeepSpeed 0.19 casts only parameters to half precision; BatchNorm needs its running
        # statistics in the same dtype as its weight (masks are 0/1, exact in any dtype).
        **({"data_types": {"buffer_dtype": engine.precision}} if half else {}),
        "steps_per_print": 2**31 - 1,  # the loop logs; DeepSpeed's per-step lines are noise
        "wall_clock_breakdown": False,
    }
    _skip_unused_grad_norm(config)
    return config


def _skip_unused_grad_norm(config: dict[str, Any]) -> None:
    """ZeRO 1/2 all-reduce the global gradient norm every step, for clipping and to skip
    non-finite half-precision steps. In fp32 without clipping nothing reads it, and it is a
    collective DDP does not pay for (bench/deepspeed_vs_ddp.py)."""
    zero = config.setdefault("zero_optimization", {})
    unused = (zero.get("stage", 0) in (1, 2) and precision_of(config) == "fp32"
              and not config.get("gradient_clipping"))
    if unused:
        zero["compute_grad_norm"] = False
    else:
        zero.pop("compute_grad_norm", None)


def load_raw(path: str | Path) -> dict[str, Any]:
    """A raw DeepSpeed JSON file as a dict; ConfigError naming the file when it is not one."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"engine.deepspeed_config {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"engine.deepspeed_config {path}: not JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"engine.deepspeed_config {path}: must hold a JSON object")
    return raw


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def precision_of(ds_config: dict[str, Any]) -> str:
    """fp32, bf16 or fp16: what a DeepSpeed config trains in."""
    for name in ("bf16", "fp16"):
        if (ds_config.get(name) or {}).get("enabled", False):
            return name
    return "fp32"


def deepspeed_config(engine: EngineSettings, train: TrainSettings, world_size: int,
                     device_type: str, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The translated config with `raw` (a parsed DeepSpeed JSON) merged over it, checked.

    Raises ConfigError when the result cannot keep masks exact or disagrees with the
    project's data loading: ZeRO-3, half precision on CPU or at ZeRO stage 0, an optimizer or
    scheduler section, or batch sizes other than train.batch_size and the world size give.
    """
    translated = translate(engine, train, world_size)
    where = f"engine.deepspeed_config {engine.deepspeed_config}" if raw else "engine"
    raw = raw or {}
    for key in REFUSED_RAW_KEYS:
        if key in raw:
            raise ConfigError(f"{where}: remove '{key}' (the optimizer and lr schedule come "
                              "from train.*)")
    merged = _merge(translated, raw)
    if "compute_grad_norm" not in (raw.get("zero_optimization") or {}):
        _skip_unused_grad_norm(merged)  # the raw file may have changed stage or clipping
    micro = translated["train_micro_batch_size_per_gpu"]
    if merged["train_micro_batch_size_per_gpu"] != micro:
        raise ConfigError(f"{where}: train_micro_batch_size_per_gpu "
                          f"{merged['train_micro_batch_size_per_gpu']} differs from "
                          f"train.batch_size / world size = {micro} (the loader's batch)")
    steps = merged["gradient_accumulation_steps"]
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{where}: gradient_accumulation_steps must be an integer >= 1")
    expected = micro * steps * world_size
    if "train_batch_size" in raw and raw["train_batch_size"] != expected:
        raise ConfigError(f"{where}: train_batch_size {raw['train_batch_size']} != "
                          f"micro batch {micro} x accumulation {steps} x {world_size} ranks")
    merged["train_batch_size"] = expected
    stage = (merged.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{where}: zero_optimization.stage {stage} is not supported (0, 1 "
                          "or 2; ZeRO-3 weights are empty outside forward, where masks and "
                          "pruning scores need them)")
    precision = precision_of(merged)
    if precision != "fp32":
        # Name what the user wrote: the raw file if it chose the precision, else the key.
        source = (where if "bf16" in raw or "fp16" in raw
                  else f"config key 'engine.precision' = '{precision}'")
        if device_type != "cuda":
            raise ConfigError(f"{source}: half precision needs a GPU (this run is on "
                              f"{device_type}); use fp32")
        if stage == 0:
            raise ConfigError(f"{source}: {precision} needs ZeRO stage 1 or 2 (at stage 0 "
                              "DeepSpeed's half-precision optimizer keeps an fp32 master copy "
                              "that masks cannot reach)")
    return merged
