"""A small CNN for 8x8 single-channel digit images (sklearn's digits)."""

from __future__ import annotations

from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm that follows has its own shift.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def digits_cnn(num_classes: int, in_channels: int = 1) -> nn.Sequential:
    """conv-BN-ReLU x2, maxpool to 4x4, conv-BN-ReLU, global average pool, Linear(64, classes)."""
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn_relu(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def digits_cnn_mlp(num_classes: int, in_channels: int = 1) -> nn.Sequential:
    """digits_cnn with a hidden fully connected layer, Linear(64, 64)-ReLU, before the
    classifier: the small model on which prune.include_linear has a layer to prune."""
    layers = list(digits_cnn(num_classes, in_channels))
    return nn.Sequential(*layers[:-1], nn.Linear(64, 64), nn.ReLU(), layers[-1])
