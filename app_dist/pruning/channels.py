"""prune.structure=channel: which weights, BatchNorm channels and classifier inputs belong to
one prunable channel, and how a step of the APP schedule picks whole channels.

A *channel group* is everything that must go when one convolution filter goes: the filter
(dim 0 of its weight), the BatchNorm channel it feeds, the input channel (dim 1) of every
convolution that reads it, and, through residual additions, the same for every filter whose
output is added to it. The couplings come from torch-pruning's DependencyGraph (traced once
on the pristine model), asked one output channel at a time, so its groups never need
positional alignment. Two things it gets wrong for the paper's CIFAR ResNets are handled here:
- The option-A shortcut (subsample, then zero-pad new channels on both sides) shifts channel
  i of a stage to channel i + pad of the next; torch-pruning maps it to i. It is registered
  as an opaque layer (a boundary of its groups) and the groups on its two sides are joined
  here with the shift (INDEX_SHIFTS).
- After F.adaptive_avg_pool2d(x, 1).flatten(1) it maps channel c to classifier inputs
  4c..4c+3. Classifier inputs are therefore taken from torch-pruning only when they are in
  range, else as the channel index itself when the classifier has one input per channel.

During training a pruned group is a set of mask zeros (the filter and the readers' input
channels in the convolutions' weight masks) and a zero in the BatchNorm's channel mask
(masks.MaskedBatchNorm2d), so the pruned channel is exactly zero everywhere and everything
else about masks (nesting, rank checks, checkpoints) is unchanged. Classifier columns that read
a pruned channel are not masked (the classifier is never pruned; those columns multiply
zeros) and disappear in the physical export (app_dist/results/channel_export.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from app_dist.models.cifar_resnet import ShortcutA

# Layers whose output channel index is the input channel's plus a shift (option-A shortcut:
# the input's channels land after `pad[0]` zero channels). Extend for other such layers.
INDEX_SHIFTS: dict[type[nn.Module], Callable[[nn.Module], int]] = {
    ShortcutA: lambda layer: layer.pad[0],
}

class ChannelGroupingError(ValueError):
    """The model has a layer channel pruning cannot handle consistently."""


@dataclass
class ChannelGroup:
    """One prunable channel and everything coupled to it (names as in model.named_*)."""

    filters: list[tuple[str, int]] = field(default_factory=list)  # (conv weight, out channel)
    inputs: list[tuple[str, int]] = field(default_factory=list)  # (conv weight, in channel)
    norms: list[tuple[str, int]] = field(default_factory=list)  # (BatchNorm module, channel)
    linear_inputs: list[tuple[str, int]] = field(default_factory=list)  # (Linear, in feature)
    shifts: list[tuple[str, int]] = field(default_factory=list)  # (shortcut module, out channel)

    def weight_slices(self) -> list[tuple[str, int, int]]:
        """(weight name, dim, index) of every masked slice of this group."""
        return [(n, 0, i) for n, i in self.filters] + [(n, 1, i) for n, i in self.inputs]


@dataclass
class ChannelPlan:
    """The channel groups of a model, the output size of each convolution (for FLOPs) and
    what the density budget counts (structures.BUDGETS)."""

    groups: list[ChannelGroup]
    output_pixels: dict[str, int]  # conv weight name -> H * W of its output for the traced input
    budget: str = "weights"

    def cost(self, name: str) -> int:
        """What one kept weight of layer `name` costs in the budget's unit."""
        return self.output_pixels[name] if self.budget == "flops" else 1

    def group_alive(self, masks: dict[str, torch.Tensor]) -> list[bool]:
        """A group is pruned when every one of its filters is all zeros in the masks."""
        return [any(bool(masks[n][i].any()) for n, i in group.filters) for group in self.groups]

    def norm_masks(self, masks: dict[str, torch.Tensor],
                   norm_sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        """{BatchNorm module name: 0/1 channel mask} implied by the weight masks."""
        out = {name: torch.ones(size) for name, size in norm_sizes.items()}
        for group, alive in zip(self.groups, self.group_alive(masks)):
            if not alive:
                for name, channel in group.norms:
                    out[name][channel] = 0.0
        return out

    def group_scores(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per group: the sum of the per-weight scores over all its masked slices divided by
        what the slices cost in the budget (a weight shared by two groups, filter of one and
        input channel of the other, counts in both).

        Score per cost, not the sum: the greedy choice that keeps the most score per unit of
        budget ranks groups by it. A sum ranks by size as much as by score: residual groups
        (10 filters and 9 readers in ResNet-20) always outrank a block's inner channel, which
        then collapse to 1 of 16 while the residual stream stays whole (measured: 1/3 of the
        FLOPs ran only 1.5x faster). With the weights budget this is the mean score."""
        values = []
        for group in self.groups:
            total = cost = 0.0
            for name, dim, index in group.weight_slices():
                part = scores[name].select(dim, index)
                total += float(part.double().sum())
                cost += part.numel() * self.cost(name)
            values.append(total / cost)
        return torch.tensor(values, dtype=torch.float64)

    def flops_fraction(self, masks: dict[str, torch.Tensor]) -> float:
        """Multiply-accumulates of the masked convolutions over the dense ones: kept weights
        times output pixels, per layer (FLOPs of Linear layers are not counted)."""
        kept = total = 0.0
        for name, pixels in self.output_pixels.items():
            kept += float(masks[name].sum()) * pixels
            total += masks[name].numel() * pixels
        return kept / total if total else 1.0


def build_channel_plan(model: nn.Module, example_input: torch.Tensor,
                       budget: str = "weights") -> ChannelPlan:
    """Trace `model` (unchanged; a copy is traced) on `example_input` (1, C, H, W) and return
    its channel groups, their densities counted in `budget` (structures.BUDGETS). Raises
    ChannelGroupingError naming a layer it cannot prune."""
    import torch_pruning as tp  # imported here: only channel runs need it

    model = copy.deepcopy(model).eval()

    class _Boundary(tp.pruner.BasePruningFunc):
        # Distinct in/out handlers: torch-pruning then does not couple the two sides.
        def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
            return layer

        def get_out_channels(self, layer: nn.Module) -> None:
            return None

        def get_in_channels(self, layer: nn.Module) -> None:
            return None

    boundary = _Boundary()
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example_input,
        customized_pruners={kind: boundary for kind in INDEX_SHIFTS})
    names = {module: name for name, module in model.named_modules()}
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for name, conv in convs:
        if conv.groups != 1:
            raise ChannelGroupingError(f"layer {name} is a grouped convolution")

    raw: list[ChannelGroup] = []
    seen: set[tuple[str, int]] = set()
    for name, conv in convs:
        for channel in range(conv.out_channels):
            if (f"{name}.weight", channel) in seen:
                continue
            group = _group_of(graph, tp, conv, channel, names, boundary)
            seen.update(group.filters)
            raw.append(group)
    return ChannelPlan(_join_shifted(raw, model), _output_pixels(model, example_input), budget)


def _group_of(graph, tp, conv: nn.Conv2d, channel: int, names: dict[nn.Module, str],
              boundary) -> ChannelGroup:
    """One output channel's coupled slices, from torch-pruning."""
    group = ChannelGroup()
    linears: list[tuple[nn.Linear, list[int]]] = []
    for dep, idxs in graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[channel]):
        module = dep.target.module
        handler = dep.handler
        idxs = [int(i) for i in idxs]
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters()):
            if type(module) in INDEX_SHIFTS:
                kind = "out" if handler == boundary.prune_out_channels else "in"
                shift = 0 if kind == "out" else INDEX_SHIFTS[type(module)](module)
                group.shifts += [(names[module], i + shift) for i in idxs]
            continue  # parameter-free operations (activations, additions, pooling)
        name = names[module]
        if isinstance(module, nn.Conv2d):
            into = group.filters if handler == tp.prune_conv_out_channels else group.inputs
            into += [(f"{name}.weight", i) for i in idxs]
        elif isinstance(module, nn.BatchNorm2d):
            group.norms += [(name, i) for i in idxs]
        elif isinstance(module, nn.Linear) and handler == tp.prune_linear_in_channels:
            linears.append((module, idxs))
        else:
            raise ChannelGroupingError(f"layer {name} ({type(module).__name__}) is coupled "
                                       "to convolution channels in a way channel pruning "
                                       "does not handle")
    for linear, idxs in linears:
        if len(idxs) == 1 and idxs[0] < linear.in_features:
            group.linear_inputs.append((names[linear], idxs[0]))
        elif linear.in_features == conv.out_channels:
            group.linear_inputs.append((names[linear], channel))
        else:
            raise ChannelGroupingError(f"cannot map channels of {names[conv]} to the inputs "
                                       f"of {names[linear]}")
    return group


def _join_shifted(raw: list[ChannelGroup], model: nn.Module) -> list[ChannelGroup]:
    """Merge groups that meet at an index-shifting layer (same (layer, out channel))."""
    parent = list(range(len(raw)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, int], int] = {}
    for index, group in enumerate(raw):
        for key in group.shifts:
            if key in owner:
                parent[root(index)] = root(owner[key])
            else:
                owner[key] = index
    merged: dict[int, ChannelGroup] = {}
    for index, group in enumerate(raw):
        target = merged.setdefault(root(index), ChannelGroup())
        for attribute in ("filters", "inputs", "norms", "linear_inputs", "shifts"):
            for item in getattr(group, attribute):
                if item not in getattr(target, attribute):
                    getattr(target, attribute).append(item)
    return [merged[key] for key in sorted(merged)]


def _output_pixels(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    pixels: dict[str, int] = {}
    hooks = [module.register_forward_hook(
        lambda _m, _i, out, name=name: pixels.__setitem__(f"{name}.weight",
                                                          int(out.shape[-1] * out.shape[-2])))
        for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return pixels


def channel_masks_from_scores(plan: ChannelPlan, group_scores: torch.Tensor,
                              masks: dict[str, torch.Tensor], density: float
                              ) -> dict[str, torch.Tensor]:
    """New nested masks: whole groups pruned, lowest score first (ties: lower group index
    first), until the kept share of the plan's budget (weights or FLOPs of the prunable
    convolutions) is as close to `density` as whole groups allow.

    Pruned groups stay pruned. A group whose removal would leave a convolution without any
    output channel is skipped (the network would output a constant). A group removes its
    filters and the readers' input channels, so it weighs more than its filters alone.
    """
    current = {name: mask.detach().cpu().bool().clone() for name, mask in masks.items()}
    total = sum(mask.numel() * plan.cost(name) for name, mask in current.items())
    target = density * total
    if plan.budget == "weights":  # whole weights: the target is a count, as in unstructured
        target = round(target)
    kept = float(sum(int(mask.sum()) * plan.cost(name) for name, mask in current.items()))
    alive = plan.group_alive(current)
    live_filters: dict[str, int] = {}
    for group, is_alive in zip(plan.groups, alive):
        for name, _ in group.filters if is_alive else []:
            live_filters[name] = live_filters.get(name, 0) + 1
    order = sorted((index for index, a in enumerate(alive) if a),
                   key=lambda index: (float(group_scores[index]), index))
    for index in order:
        if kept <= target:
            break
        group = plan.groups[index]
        removes: dict[str, int] = {}
        for name, _ in group.filters:
            removes[name] = removes.get(name, 0) + 1
        if any(live_filters[name] - count <= 0 for name, count in removes.items()):
            continue
        removed = sum(int(current[n].select(d, i).sum()) * plan.cost(n)
                      for n, d, i in group.weight_slices())
        # Stop above the target when that is closer than the step below it.
        if kept - target < target - (kept - removed):
            break
        for name, dim, channel in group.weight_slices():
            current[name].select(dim, channel).fill_(False)
        for name, count in removes.items():
            live_filters[name] -= count
        kept -= removed
    return {name: current[name].to(masks[name].dtype) for name in masks}


def random_group_scores(plan: ChannelPlan, seed: int) -> torch.Tensor:
    """One uniform draw per group from a generator seeded the same on every rank. (A sum of
    per-weight noise over a group would grow with its size: a size criterion, not random.)"""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(len(plan.groups), generator=generator, dtype=torch.float64)
