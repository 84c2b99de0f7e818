"""Model registry: build any supported network by name, with input normalisation inside."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import nn

from .cifar_resnet import cifar_resnet
from .names import CIFAR_RESNET_DEPTHS, MODEL_NAMES, STEMS, TORCHVISION_RESNET_DEPTHS, VIT_NAMES
from .normalization import InputNormalization, NormalizedModel
from .small_cnn import digits_cnn, digits_cnn_mlp
from .vit import vision_transformer


def _torchvision_resnet(arch: str, num_classes: int, in_channels: int, stem: str) -> nn.Module:
    import torchvision  # here: a digits run never needs it (augment.decode)

    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if stem == "cifar":
        # 32x32 inputs: a 7x7/2 conv plus max-pool would shrink them to 8x8 before layer1.
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


def _vgg16_bn(num_classes: int, in_channels: int, stem: str) -> nn.Module:
    import torchvision

    net = torchvision.models.vgg16_bn(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
        nn.init.kaiming_normal_(net.features[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(net.features[0].bias)
    if stem == "cifar":
        # Five max-pools take 32x32 to 1x1x512, so a single Linear head suffices.
        net.avgpool = nn.Identity()
        net.classifier = nn.Linear(512, num_classes)
        nn.init.normal_(net.classifier.weight, 0, 0.01)
        nn.init.zeros_(net.classifier.bias)
    return net


def _cifar_only(build: Callable[[int, int], nn.Module], name: str) -> Callable[..., nn.Module]:
    def builder(num_classes: int, in_channels: int, stem: str) -> nn.Module:
        if stem != "cifar":
            raise ValueError(f"model '{name}' only supports stem 'cifar', got '{stem}'")
        return build(num_classes, in_channels)

    return builder


_BUILDERS: dict[str, Callable[[int, int, str], nn.Module]] = {
    **{
        f"resnet{d}s": _cifar_only(partial(cifar_resnet, d), f"resnet{d}s")
        for d in CIFAR_RESNET_DEPTHS
    },
    **{f"resnet{d}": partial(_torchvision_resnet, f"resnet{d}") for d in TORCHVISION_RESNET_DEPTHS},
    "vgg16_bn": _vgg16_bn,
    "digits_cnn": _cifar_only(digits_cnn, "digits_cnn"),
    "digits_cnn_mlp": _cifar_only(digits_cnn_mlp, "digits_cnn_mlp"),
    # Small ViTs for fixed image sizes (vit_cifar 32x32, vit_digits 8x8): their Linear
    # layers are what N:M sparsity speeds up (prune.include_linear=true).
    **{name: _cifar_only(partial(vision_transformer, name), name) for name in VIT_NAMES},
}


def build_model(
    name: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    stem: str = "cifar",
    mean: Sequence[float],
    std: Sequence[float],
) -> NormalizedModel:
    """Return ``NormalizedModel(InputNormalization(mean, std), net)`` for the named network.

    The model takes uint8 (0..255) or float ([0, 1]) batches of shape (B, in_channels, H, W) and
    returns logits (B, num_classes). ``stem`` picks the input stem ("cifar" for 32x32-style small
    images, "imagenet" for torchvision's 7x7/2 + max-pool); the small-image-only models
    (``resnet*s``, ``digits_cnn``) accept only "cifar". Weights are freshly initialised.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_NAMES)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem '{stem}'; choose one of: {', '.join(STEMS)}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean/std need {in_channels} values (one per input channel), "
            f"got {len(mean)} and {len(std)}"
        )
    net = _BUILDERS[name](num_classes, in_channels, stem)
    return NormalizedModel(InputNormalization(mean, std), net)


def classifier_of(model: nn.Module) -> nn.Linear:
    """Return the final classifier: the last ``nn.Linear`` in ``model.modules()`` order."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return last
