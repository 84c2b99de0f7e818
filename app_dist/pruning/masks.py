"""Masks the engine owns: one 0/1 buffer per prunable weight, applied in three places.

1. Forward: a masked layer computes with `weight * weight_mask`, so a pruned weight never
   reaches an output, whatever the optimizer did to it.
2. Backward: a hook on each prunable parameter multiplies its gradient by the mask. Parameter
   hooks run before DDP's reducer, so the all-reduced gradient is already masked.
3. After every optimizer step and at every pruning step the weights are multiplied by the mask
   again, and momentum at newly pruned positions is zeroed, so nothing comes back through
   momentum or weight decay (PITFALLS.md, "Masks").

We do not use torch.nn.utils.prune: it renames `weight` to `weight_orig`, and loading such a
state dict into an unpruned model silently loses the trained weights.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from app_dist.models.registry import classifier_of
from app_dist.pruning.channels import ChannelPlan
from app_dist.pruning.n_m import grouped, has_groups
from app_dist.pruning.structures import NMPattern
from app_dist.pruning.threshold import keep_count


class MaskedConv2d(nn.Conv2d):
    weight_mask: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The mask stays fp32 when DeepSpeed casts only the parameters to half precision.
        return self._conv_forward(input, self.weight * self.weight_mask.to(self.weight.dtype),
                                  self.bias)


class MaskedLinear(nn.Linear):
    weight_mask: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight * self.weight_mask.to(self.weight.dtype), self.bias)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """prune.structure=channel: a BatchNorm whose pruned channels output exactly zero.

    Multiplying the output (not gamma and beta) makes the channel zero whatever the
    optimizer does to its gamma and beta, in train and eval mode, and gives them no gradient.
    `channel_mask` is not persistent: it follows from the convolutions' weight masks
    (ChannelPlan.norm_masks), which are what checkpoints hold, and is rewritten from them by
    MaskSet.set, so it never appears in a state dict.
    """

    channel_mask: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * self.channel_mask.to(input.dtype).view(1, -1, 1, 1)


_MASKED_CLASS = {nn.Conv2d: MaskedConv2d, nn.Linear: MaskedLinear}


def attach_channel_masks(model: nn.Module, plan: ChannelPlan) -> None:
    """Give every BatchNorm2d that a channel group names an all-ones `channel_mask` and the
    masked forward (in place, like attach_masks; call before wrapping in DDP)."""
    for name in sorted({name for group in plan.groups for name, _ in group.norms}):
        module = model.get_submodule(name)
        if type(module) is not nn.BatchNorm2d:
            raise ValueError(f"layer {name} is a {type(module).__name__}, not a BatchNorm2d")
        module.register_buffer("channel_mask", torch.ones(module.num_features), persistent=False)
        module.__class__ = MaskedBatchNorm2d


def attach_masks(model: nn.Module, include_linear: bool = False) -> dict[str, torch.Tensor]:
    """Give every prunable layer an all-ones `weight_mask` buffer and a masked forward.

    Prunable: every Conv2d; with include_linear, every Linear but the classifier. The layer's
    class is swapped in place to its masked subclass so the parameter objects and the state
    dict names (`...weight`) stay exactly as they were. Call before wrapping in DDP.
    Returns {parameter name: mask buffer}.
    """
    classifier = classifier_of(model)
    masks: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        kind = type(module)
        prunable = kind is nn.Conv2d or (include_linear and kind is nn.Linear
                                         and module is not classifier)
        if not prunable:
            continue
        module.register_buffer("weight_mask", torch.ones_like(module.weight, dtype=torch.float32))
        module.__class__ = _MASKED_CLASS[kind]
        masks[f"{name}.weight"] = module.weight_mask
    if not masks:
        raise ValueError("the model has no prunable layer (Conv2d, or Linear with include_linear)")
    return masks


def masked_gradient(grad: torch.Tensor, layer: nn.Module, weight: torch.Tensor
                    ) -> torch.Tensor:
    """`grad` with the pruned positions of `layer`'s mask zeroed, laid out as `weight` is.

    Under channels_last a weight with a size-1 dimension (a 1x1 convolution, a stem over
    1-channel images) has two stride sets for the same memory; a product takes either, and
    DDP then copies every such gradient into its bucket view (made with the weight's strides)
    after a warning that performance suffers: 36 of ResNet-50's weights, 52% of its
    parameters, are 1x1."""
    mask = layer.weight_mask.to(grad.dtype)
    if torch.is_grad_enabled():  # differentiated again (GraSP's Hessian-gradient product)
        return grad * mask
    return torch.mul(grad, mask, out=torch.empty_like(weight, dtype=grad.dtype))


class MaskSet:
    """The prunable weights of a model and their masks, addressed by parameter name."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor],
                 channel_plan: ChannelPlan | None = None,
                 n_m: NMPattern | None = None) -> None:
        params = dict(model.named_parameters())
        # prune.structure=N:M: the pattern pruning steps keep (app_dist/pruning/n_m.py).
        self.n_m = n_m
        # prune.structure=channel: the groups, and the BatchNorms whose channel masks follow
        # from the weight masks (attach_channel_masks first).
        self.channel_plan = channel_plan
        self._norms = {} if channel_plan is None else {
            name: model.get_submodule(name)
            for name in sorted({n for group in channel_plan.groups for n, _ in group.norms})}
        # Layers, not buffer tensors: model.to(device) and DeepSpeed's .half()/.bfloat16()
        # replace a module's buffer objects (parameters keep theirs), so the live mask is
        # always read from its layer.
        self._layers = {name: model.get_submodule(name.rpartition(".")[0]) for name in masks}
        self.weights = {name: params[name] for name in masks}
        self._hooks = [
            weight.register_hook(
                lambda grad, layer=layer, weight=weight: masked_gradient(grad, layer, weight))
            for weight, layer in zip(self.weights.values(), self._layers.values())
        ]

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """{parameter name: its layer's weight_mask buffer, as the forward uses it}."""
        return {name: layer.weight_mask for name, layer in self._layers.items()}

    @property
    def total(self) -> int:
        return sum(mask.numel() for mask in self.masks.values())

    @property
    def kept(self) -> int:
        return int(sum(int(mask.count_nonzero()) for mask in self.masks.values()))

    def density(self) -> float:
        return self.kept / self.total

    def keeps_at_most(self, density: float) -> bool:
        """Whether the masks keep no more than `density` of the budget: of the weights
        (rounded to whole weights), or of the convolutions' FLOPs with a FLOPs-budget
        channel plan (prune.budget=flops)."""
        plan = self.channel_plan
        if plan is not None and plan.budget == "flops":
            return plan.flops_fraction({n: m.cpu() for n, m in self.masks.items()}) <= density
        return keep_count(density, self.total) >= self.kept

    def layer_densities(self) -> dict[str, float]:
        return {name: float(mask.mean()) for name, mask in self.masks.items()}

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Re-zero pruned weights (after every optimizer step): one fused foreach kernel."""
        weights = list(self.weights.values())
        torch._foreach_mul_(weights, [m.to(w.dtype) for m, w in zip(self.masks.values(), weights)])

    @torch.no_grad()
    def set(self, new_masks: dict[str, torch.Tensor]) -> None:
        """Install new masks in place: the buffers keep their identity for DDP and the hooks.
        The engine then zeroes what it keeps at the pruned positions (`apply_masks`)."""
        for name, mask in self.masks.items():
            mask.copy_(new_masks[name].to(mask.device, mask.dtype))
        if self.channel_plan is not None:
            current = {name: mask.cpu() for name, mask in self.masks.items()}
            sizes = {name: norm.num_features for name, norm in self._norms.items()}
            for name, value in self.channel_plan.norm_masks(current, sizes).items():
                buffer = self._norms[name].channel_mask
                buffer.copy_(value.to(buffer.device, buffer.dtype))

    def structure_record(self) -> dict[str, float | int | str]:
        """prune.structure=channel: channel groups kept and the FLOPs fraction of the
        convolutions; N:M: the most weights kept in any group of M (the N the masks now
        meet), the density of the layers with groups and how many layers have none (dense);
        {} for unstructured masks. For the metrics record."""
        if self.n_m is not None:
            return self._n_m_record(self.n_m)
        if self.channel_plan is None:
            return {}
        current = {name: mask.cpu() for name, mask in self.masks.items()}
        return {"channel_groups_kept": sum(self.channel_plan.group_alive(current)),
                "channel_groups": len(self.channel_plan.groups),
                "flops_fraction": self.channel_plan.flops_fraction(current)}

    def _n_m_record(self, pattern: NMPattern) -> dict[str, float | int | str]:
        masks = {name: mask.detach().cpu() for name, mask in self.masks.items()}
        with_groups = [mask for mask in masks.values() if has_groups(mask.shape, pattern.m)]
        most = max((int(grouped(mask, pattern.m).sum(1).max()) for mask in with_groups),
                   default=0)
        kept = sum(int(mask.count_nonzero()) for mask in with_groups)
        total = sum(mask.numel() for mask in with_groups)
        return {"n_m": f"{most}:{pattern.m}", "n_m_density": kept / total if total else 1.0,
                "n_m_dense_layers": len(masks) - len(with_groups)}

    def update(self, new_masks: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer | None) -> None:
        """set() plus zeroing the weights and the optimizer state of a plain torch optimizer."""
        self.set(new_masks)
        self.apply_to_weights()
        if optimizer is not None:
            zero_optimizer_state(optimizer, self)

    def checksums(self) -> torch.Tensor:
        return mask_checksums(self.masks)

    @torch.no_grad()
    def pruned_residue(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The largest |value| at pruned positions of the weights and of the optimizer state:
        both must be exactly 0. Recorded per rank in every checkpoint as an audit."""
        weight_residue, state_residue = 0.0, 0.0
        for weight, mask in zip(self.weights.values(), self.masks.values()):
            pruned = ~mask.bool()
            if not pruned.any():
                continue
            weight_residue = max(weight_residue, float(weight[pruned].abs().max()))
            for value in optimizer.state.get(weight, {}).values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    state_residue = max(state_residue, float(value[pruned].abs().max()))
        return {"weights": weight_residue, "optimizer_state": state_residue}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.detach().bool().cpu().clone() for name, mask in self.masks.items()}

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        missing = set(self.masks) ^ set(saved)
        if missing:
            raise KeyError(f"mask names differ from the model's: {sorted(missing)[:3]}")
        self.update(saved, optimizer=None)


def mask_checksums(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """One int64 per layer, equal across ranks iff the masks are bit-identical (almost
    surely): the first 8 bytes of the sha256 of the packed mask bits."""
    values = []
    for mask in masks.values():
        bits = mask.detach().bool().cpu().flatten().numpy()
        digest = hashlib.sha256(bits.tobytes()).digest()
        values.append(int.from_bytes(digest[:8], "little", signed=True))
    return torch.tensor(values, dtype=torch.int64)


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, masks: MaskSet) -> None:
    """Zero every tensor-valued optimizer state of shape weight at pruned positions
    (SGD momentum_buffer, Adam exp_avg/exp_avg_sq, ...)."""
    for weight, mask in zip(masks.weights.values(), masks.masks.values()):
        for value in optimizer.state.get(weight, {}).values():
            if torch.is_tensor(value) and value.shape == weight.shape:
                value.mul_(mask.to(value.dtype))
