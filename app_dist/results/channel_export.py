"""The physically smaller model of a prune.structure=channel run (format "app-dist-channel/1").

The masked model keeps every channel at full size with zeros; this file holds the network
with the pruned channels removed: fewer filters, BatchNorm channels, input channels and
classifier inputs, no masks. It runs faster on any backend because the convolutions are
smaller dense convolutions (unlike unstructured masks, which only make the file smaller).

File format (a torch.save dict, loadable with weights_only=True: no pickled code runs):
    format        "app-dist-channel/1"
    architecture  {name, num_classes, in_channels, stem, mean, std}: for build_model;
                  input_shape [C, H, W]: what the model was trained on
    removed       {module name: {"out": [channel...], "in": [channel...]}} for convolutions,
                  BatchNorms and Linear layers; {"pad": [before, after]} for option-A
                  shortcuts (their zero channels left after pruning)
    state         the small model's state dict
    source        {run_dir, checkpoint, megabatch, density, parameters, dense_parameters}
Loading builds the full network, removes the same channels (torch-pruning's layer pruning
functions), and loads the state dict strictly: an ordinary nn.Module.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app_dist.models.cifar_resnet import ShortcutA
from app_dist.models.registry import build_model
from app_dist.models.sparse_file import MASK_SUFFIX, ExportError, read_export_file
from app_dist.pruning.channels import ChannelPlan, build_channel_plan

FORMAT = "app-dist-channel/1"
# Grouping needs only the graph, which does not depend on the image size; 32 x 32 passes
# every registered model (the ImageNet stem included).
TRACE_SIZE = 32


def build_architecture(architecture: dict[str, Any]) -> nn.Module:
    return build_model(architecture["name"], architecture["num_classes"],
                       in_channels=architecture["in_channels"], stem=architecture["stem"],
                       mean=architecture["mean"], std=architecture["std"])


def removed_channels(plan: ChannelPlan, masks: dict[str, torch.Tensor], model: nn.Module
                     ) -> dict[str, dict[str, list[int]]]:
    """What the pruned groups of `masks` remove, per module (the file's `removed`)."""
    removed: dict[str, dict[str, set[int]]] = {}

    def add(module: str, side: str, channel: int) -> None:
        removed.setdefault(module, {}).setdefault(side, set()).add(channel)

    for group, alive in zip(plan.groups, plan.group_alive(masks)):
        if alive:
            continue
        for name, channel in group.filters:
            add(name.removesuffix(".weight"), "out", channel)
        for name, channel in group.inputs:
            add(name.removesuffix(".weight"), "in", channel)
        for name, channel in group.norms:
            add(name, "out", channel)
        for name, channel in group.linear_inputs:
            add(name, "in", channel)
        for name, channel in group.shifts:
            add(name, "shift_out", channel)
    out: dict[str, dict[str, list[int]]] = {}
    for module_name, sides in removed.items():
        module = model.get_submodule(module_name)
        if isinstance(module, ShortcutA):
            out[module_name] = {"pad": _shortcut_pad(module, sides.get("shift_out", set()))}
        else:
            out[module_name] = {side: sorted(channels) for side, channels in sides.items()}
    return out


def _shortcut_pad(shortcut: ShortcutA, removed: set[int]) -> list[int]:
    """An option-A shortcut places its input's channels after pad[0] zero channels; removed
    output channels inside that range left with their input channels (same group), so only
    the zero channels before and after need recounting."""
    before, after = shortcut.pad
    total = before + after + shortcut.in_planes
    return [before - sum(1 for c in removed if c < before),
            after - sum(1 for c in removed if c >= total - after)]


def remove_channels(model: nn.Module, removed: dict[str, dict[str, list[int]]]) -> nn.Module:
    """Remove the listed channels from `model` in place (torch-pruning's layer functions)."""
    import torch_pruning as tp  # only channel exports need it

    for module_name, sides in removed.items():
        module = model.get_submodule(module_name)
        if "pad" in sides:
            module.pad = tuple(int(p) for p in sides["pad"])
        elif isinstance(module, nn.Conv2d):
            if sides.get("out"):
                tp.prune_conv_out_channels(module, sides["out"])
            if sides.get("in"):
                tp.prune_conv_in_channels(module, sides["in"])
        elif isinstance(module, nn.BatchNorm2d):
            tp.prune_batchnorm_out_channels(module, sides["out"])
        elif isinstance(module, nn.Linear):
            tp.prune_linear_in_channels(module, sides["in"])
        else:
            raise ExportError(f"cannot remove channels from {module_name} "
                              f"({type(module).__name__})")
    return model


def channel_model(model_state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                  architecture: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The file's content for a channel-pruned run's masked state dict and masks."""
    model = build_architecture(architecture)
    dense_parameters = sum(p.numel() for p in model.parameters())
    state = {}
    for name, value in model_state.items():
        if name.endswith(MASK_SUFFIX):
            continue
        state[name] = value * masks[name].to(value.dtype) if name in masks else value
    model.load_state_dict(state, strict=True)
    trace = torch.zeros(1, architecture["in_channels"], TRACE_SIZE, TRACE_SIZE)
    plan = build_channel_plan(model, trace)
    removed = removed_channels(plan, {n: m.bool() for n, m in masks.items()}, model)
    remove_channels(model, removed)
    kept = sum(int(m.sum()) for m in masks.values())
    prunable = sum(m.numel() for m in masks.values())
    return {"format": FORMAT, "architecture": architecture, "removed": removed,
            "state": model.state_dict(),
            "source": {**source, "density": kept / prunable,
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "dense_parameters": dense_parameters}}


def load_channel_export(path: str | Path) -> nn.Module:
    """The exported small model as an ordinary nn.Module, in eval mode."""
    exported = read_export_file(path, FORMAT, "channel")
    model = remove_channels(build_architecture(exported["architecture"]), exported["removed"])
    model.load_state_dict(exported["state"], strict=True)
    return model.eval()


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...]) -> Path:
    """`model` as ONNX (batch dimension dynamic), through torch's TorchScript-based exporter,
    which needs only the `onnx` package (the default dynamo exporter also needs onnxscript)."""
    path = Path(path)
    try:
        import onnx  # noqa: F401 - checked here to name the missing package in one line
    except ImportError:
        raise ExportError("ONNX export needs the onnx package (pip install 'app-dist[export]')"
                          ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():  # its deprecation notice, on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"},
                                                                 "logits": {0: "batch"}},
                          dynamo=False)
    return path
