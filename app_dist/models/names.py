"""The model names and stems a config may give, known without importing torch (validating a
config must not cost a torch import: the launcher wrapper checks the config before any rank
starts). registry.py builds each of them."""

from __future__ import annotations

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56)  # resnet20s ...: the paper's ResNets for 32x32 inputs
TORCHVISION_RESNET_DEPTHS = (18, 34, 50)
VIT_NAMES = ("vit_cifar", "vit_digits")  # vit.VIT_SHAPES has a shape for each

MODEL_NAMES: tuple[str, ...] = (
    *(f"resnet{depth}s" for depth in CIFAR_RESNET_DEPTHS),
    *(f"resnet{depth}" for depth in TORCHVISION_RESNET_DEPTHS),
    "vgg16_bn",
    "digits_cnn",
    "digits_cnn_mlp",
    *VIT_NAMES,
)
STEMS = ("cifar", "imagenet")
