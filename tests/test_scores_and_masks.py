import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app_dist.models.registry import build_model
from app_dist.pruning.masks import MaskSet, attach_masks
from app_dist.pruning.scores import (
    magnitude_scores,
    random_scores,
    snip_gradient_sums,
    snip_scores_from_gradients,
)


class Tiny(nn.Module):
    """conv(1->1, 1x1, no bias) -> flatten -> linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.fc = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_snip_score_equals_hand_computed_gradient_times_weight():
    model = Tiny()
    with torch.no_grad():
        model.conv.weight.fill_(2.0)
        model.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    masks = MaskSet(model, attach_masks(model))
    x = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])
    y = torch.tensor([0])
    # logits = [2*1, 2*2] = [2, 4]; dL/dlogit0 = softmax0 - 1, dL/dlogit1 = softmax1.
    p = torch.softmax(torch.tensor([2.0, 4.0]), 0)
    grad_w = (p[0] - 1) * 1.0 + p[1] * 2.0  # d logits / d w = [x0, x1] = [1, 2]
    sums = snip_gradient_sums(model, masks.weights, [(x, y)], torch.device("cpu"))
    scores = snip_scores_from_gradients(masks.weights, sums)
    assert scores["conv.weight"].item() == pytest.approx(abs(float(grad_w) * 2.0), rel=1e-6)


def test_snip_accumulates_gradients_over_batches_and_restores_batchnorm():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_channels=1, mean=[0.3], std=[0.4])
    masks = MaskSet(model, attach_masks(model))
    batches = [(torch.randint(0, 255, (8, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (8,)))
               for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sums = snip_gradient_sums(model, masks.weights, batches, torch.device("cpu"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    expected = {name: torch.zeros_like(w) for name, w in masks.weights.items()}
    for images, labels in batches:
        loss = F.cross_entropy(model(images), labels, reduction="sum")
        for name, grad in zip(expected, torch.autograd.grad(loss, list(masks.weights.values()))):
            expected[name] += grad
        model.load_state_dict(before)
    for name in expected:
        torch.testing.assert_close(sums[name], expected[name])


def test_snip_weighs_every_sample_the_same_whatever_its_batch():
    """Issue 14: with per-batch means, the 2 samples of a short last batch weighed 4 times
    as much as the 8 of a full one. Without BatchNorm samples are independent, so 8 + 2 must
    score exactly as one batch of 10."""
    torch.manual_seed(0)
    model = Tiny()
    masks = MaskSet(model, attach_masks(model))
    images, labels = torch.randn(10, 1, 2, 2), torch.randint(0, 2, (10,))
    whole = snip_gradient_sums(model, masks.weights, [(images, labels)], torch.device("cpu"))
    split = snip_gradient_sums(model, masks.weights, [(images[:8], labels[:8]),
                                                      (images[8:], labels[8:])],
                               torch.device("cpu"))
    for name in whole:
        torch.testing.assert_close(split[name], whole[name])


def test_magnitude_and_random_scores():
    model = Tiny()
    masks = MaskSet(model, attach_masks(model))
    assert torch.equal(magnitude_scores(masks.weights)["conv.weight"], model.conv.weight.abs())
    a, b = random_scores(masks.weights, seed=7), random_scores(masks.weights, seed=7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv.weight"], random_scores(masks.weights, 8)["conv.weight"])


def test_attach_masks_covers_every_conv_and_never_the_classifier():
    model = build_model("resnet20s", 10, mean=[0.5] * 3, std=[0.5] * 3)
    names = set(attach_masks(model, include_linear=True))
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert names == convs  # resnet20s has only the classifier as Linear
    assert "net.conv1.weight" in names and not any("linear" in n or "fc" in n for n in names)
    assert all(k in model.state_dict() for k in names)  # parameter names unchanged


def test_pruned_weights_stay_zero_through_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_channels=1, mean=[0.3], std=[0.4])
    masks = MaskSet(model, attach_masks(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    images = torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (16,))

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        masks.apply_to_weights()

    for _ in range(3):  # build up momentum everywhere
        step()
    new = {n: (torch.rand(m.shape) < 0.5).float() for n, m in masks.masks.items()}
    masks.update(new, optimizer)
    for _ in range(3):
        step()
    residue = masks.pruned_residue(optimizer)
    assert residue == {"weights": 0.0, "optimizer_state": 0.0}
    for name, weight in masks.weights.items():
        assert torch.equal(weight * (1 - new[name]), torch.zeros_like(weight))
        assert torch.equal(weight.grad * (1 - new[name]), torch.zeros_like(weight))


def test_without_momentum_zeroing_pruned_weights_would_move():
    """The invariant above can fail: skipping the optimizer-state reset leaves momentum alive."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_channels=1, mean=[0.3], std=[0.4])
    masks = MaskSet(model, attach_masks(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (16,))
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    masks.update({n: torch.zeros(m.shape) for n, m in masks.masks.items()}, optimizer=None)
    assert masks.pruned_residue(optimizer)["optimizer_state"] > 0


def test_masked_gradients_keep_their_weights_layout_under_channels_last():
    """DDP copies every gradient whose strides differ from its weight's (its bucket view):
    1x1 convolutions under channels_last, most of ResNet-50's weights, have two stride sets
    for the same memory, and the masked gradient must take the weight's."""
    model = build_model("resnet50", 10, in_channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    MaskSet(model, attach_masks(model), None, None)
    model.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    F.cross_entropy(model(images), torch.tensor([1, 2])).backward()
    weights = [(name, p) for name, p in model.named_parameters() if p.dim() == 4]
    assert any(p.shape[2:] == (1, 1) for _, p in weights)
    assert [name for name, p in weights if p.grad.stride() != p.stride()] == []
