"""Tests for app_dist.models: shapes, parameter counts, in-model normalisation, classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app_dist.models import registry
from app_dist.models.names import VIT_NAMES
from app_dist.models.registry import MODEL_NAMES, build_model, classifier_of
from app_dist.models.vit import VIT_SHAPES

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DIGITS_MEAN = (0.3,)
DIGITS_STD = (0.4,)
NUM_CLASSES = 7  # deliberately not 10, so a hard-coded head size would show


def _build(name: str, num_classes: int = NUM_CLASSES, stem: str = "cifar") -> nn.Module:
    if name == "digits_cnn":
        return build_model(
            name, num_classes, in_channels=1, stem=stem, mean=DIGITS_MEAN, std=DIGITS_STD
        )
    return build_model(name, num_classes, stem=stem, mean=CIFAR_MEAN, std=CIFAR_STD)


def _uint8_batch(name: str, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # vit_digits' position embeddings fix its input at 8x8.
    size = 8 if name == "vit_digits" else size
    shape = (4, 1, 8, 8) if name == "digits_cnn" else (2, 3, size, size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def test_model_names_are_the_documented_set() -> None:
    expected = {
        "resnet20s",
        "resnet32s",
        "resnet44s",
        "resnet56s",
        "resnet18",
        "resnet34",
        "resnet50",
        "vgg16_bn",
        "digits_cnn",
        "digits_cnn_mlp",
        "vit_cifar",
        "vit_digits",
    }
    assert set(MODEL_NAMES) == expected
    assert set(registry._BUILDERS) == expected  # config accepts a name only if it builds
    assert set(VIT_NAMES) == set(VIT_SHAPES)  # a shape without a name is never offered


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_shape_small_inputs(name: str) -> None:
    model = _build(name).eval()
    x = _uint8_batch(name)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (x.shape[0], NUM_CLASSES)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_logits_shape_imagenet_stem(name: str) -> None:
    model = _build(name, num_classes=13, stem="imagenet").eval()
    assert model.net.conv1.kernel_size == (7, 7)
    assert isinstance(model.net.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        out = model(_uint8_batch(name, size=224))
    assert out.shape == (2, 13)


def test_cifar_stem_replaces_torchvision_stem() -> None:
    net = _build("resnet18").net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.bias is None
    assert isinstance(net.maxpool, nn.Identity)


@pytest.mark.parametrize(("name", "expected"), [("resnet20s", 269_722), ("resnet56s", 853_018)])
def test_cifar_resnet_parameter_count(name: str, expected: int) -> None:
    # He et al. 2016, Table 6: ResNet-20 has 0.27M and ResNet-56 0.85M parameters.
    model = _build(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_option_a_shortcut_is_parameter_free_and_pads_channels() -> None:
    block = _build("resnet20s").net.layer2[0]
    assert list(block.shortcut.parameters()) == []
    x = torch.randn(2, 16, 32, 32)
    y = block.shortcut(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_uint8_and_float_inputs_give_identical_logits(name: str) -> None:
    model = _build(name).eval()
    x = _uint8_batch(name)
    with torch.no_grad():
        from_uint8 = model(x)
        from_float = model(x.float() / 255)
    assert torch.equal(from_uint8, from_float)


def test_normalization_values_and_channels_last() -> None:
    norm = _build("resnet20s").normalize
    x = torch.rand(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    y = norm(x)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (x - mean) / std)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x8 = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(norm(x8), ((1 - mean) / std).expand(1, 3, 2, 2))


def test_float_input_is_not_modified_in_place() -> None:
    model = _build("digits_cnn").eval()
    x = torch.rand(4, 1, 8, 8)
    before = x.clone()
    with torch.no_grad():
        model(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", ["resnet20s", "resnet18", "digits_cnn"])
def test_normalization_buffers_not_in_state_dict(name: str) -> None:
    model = _build(name)
    buffer_names = {n for n, _ in model.named_buffers()}
    assert {"normalize.mean", "normalize.std"} <= buffer_names
    keys = set(model.state_dict())
    assert not any(k.startswith("normalize.") for k in keys)
    # A fresh model with different statistics loads the checkpoint strictly.
    other = build_model(
        name,
        NUM_CLASSES,
        in_channels=1 if name == "digits_cnn" else 3,
        mean=(0.5,) * (1 if name == "digits_cnn" else 3),
        std=(0.5,) * (1 if name == "digits_cnn" else 3),
    )
    other.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_classifier_of_returns_final_linear(name: str) -> None:
    model = _build(name)
    head = classifier_of(model)
    assert isinstance(head, nn.Linear)
    assert head.out_features == NUM_CLASSES
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert head is linears[-1]


def test_classifier_of_vgg_imagenet_picks_last_of_three_linears() -> None:
    model = _build("vgg16_bn", stem="imagenet")
    head = classifier_of(model)
    assert head is model.net.classifier[-1]
    assert (head.in_features, head.out_features) == (4096, NUM_CLASSES)


def test_unknown_model_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet21s'") as info:
        build_model("resnet21s", 10, mean=CIFAR_MEAN, std=CIFAR_STD)
    assert "resnet20s" in str(info.value) and "\n" not in str(info.value)


def test_unknown_stem_raises() -> None:
    with pytest.raises(ValueError, match="unknown stem 'tiny'"):
        build_model("resnet18", 10, stem="tiny", mean=CIFAR_MEAN, std=CIFAR_STD)


def test_mean_std_length_must_match_in_channels() -> None:
    with pytest.raises(ValueError, match="3 values"):
        build_model("resnet20s", 10, mean=(0.5,), std=(0.5,))
