"""GraSP and SynFlow: scores against hand-derived values on tiny networks, and identical masks
on every rank of real 2-rank runs (random too: its generator must be seeded alike on every
rank; SNIP's 2-rank run is in test_distributed_runs.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import ConfigError
from app_dist.pruning.masks import MaskSet, attach_masks
from app_dist.pruning.pruner import compute_scores
from app_dist.pruning.schedule import density_schedule
from app_dist.pruning.scores import (
    GRASP_TEMPERATURE,
    class_balanced_batches,
    grasp_gradient,
    grasp_hessian_gradient_product,
    grasp_scores_from_products,
    synflow_iterated_scores,
    synflow_scores,
)
from app_dist.pruning.threshold import keep_count, masks_from_scores

from .conftest import REPO, run_trainer

CPU = torch.device("cpu")
SINGLE = Platform(rank=0, world_size=1, local_rank=0, device=CPU)


class TwoChannel(nn.Module):
    """conv(1->2, 1x1, no bias) [-> BatchNorm] -> flatten(8) -> linear classifier(8->2).

    Without BatchNorm the logits are z = w1 * u1 + w2 * u2 with u_c = F_c x, where F_c is the
    2x4 block of the classifier that reads channel c: derivatives in w are closed-form.
    """

    def __init__(self, batchnorm: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2) if batchnorm else nn.Identity()
        self.fc = nn.Linear(8, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).flatten(1))


CLASSIFIER = torch.tensor([[0.5, -1.0, 0.25, 2.0, -0.75, 1.5, 0.1, -0.2],
                           [-0.3, 0.8, 1.2, -0.6, 0.4, -1.1, 0.9, 0.7]])
CONV = [0.7, -1.3]


def two_channel(batchnorm: bool = False, bias: bool = False) -> tuple[TwoChannel, MaskSet]:
    model = TwoChannel(batchnorm, bias)
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor(CONV).view(2, 1, 1, 1))
        model.fc.weight.copy_(CLASSIFIER)
    return model, MaskSet(model, attach_masks(model))


def closed_form_grasp(images: np.ndarray, labels: np.ndarray, temperature: float,
                      g_images: np.ndarray, g_labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """g (from the g batch) and H g (H from the other batch) of the summed cross-entropy of
    z / T, for z = w1 u1 + w2 u2: dz/dw_c = u_c, so
    dL/dw_c = sum_n (p_n - e_y)^T u_c,n / T and H_cd = sum_n u_c,n^T (diag p - p p^T) u_d,n / T^2.
    """
    F = CLASSIFIER.double().numpy()
    blocks = [F[:, 0:4], F[:, 4:8]]  # channel c occupies flattened positions 4c .. 4c+3
    w = np.array(CONV)

    def features(x):  # u_c for every sample: (n, channel, logit)
        flat = x.reshape(len(x), 4)
        return np.stack([flat @ block.T for block in blocks], axis=1)

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    u = features(g_images)
    p = softmax(np.einsum("c,nck->nk", w, u) / temperature)
    residual = p - np.eye(2)[g_labels]
    g = np.einsum("nk,nck->c", residual, u) / temperature

    u = features(images)
    p = softmax(np.einsum("c,nck->nk", w, u) / temperature)
    curvature = np.stack([np.diag(row) - np.outer(row, row) for row in p])
    hessian = np.einsum("nck,nkl,ndl->cd", u, curvature, u) / temperature**2
    hg = hessian @ g
    return g, hg, hg * w


def test_grasp_matches_the_closed_form_gradient_hessian_product_and_score():
    model, masks = two_channel()
    rng = np.random.default_rng(3)
    first = (torch.tensor(rng.normal(size=(3, 1, 2, 2)), dtype=torch.float32),
             torch.tensor([0, 1, 1]))
    second = (torch.tensor(rng.normal(size=(4, 1, 2, 2)), dtype=torch.float32),
              torch.tensor([1, 0, 0, 1]))
    g, hg, expected = closed_form_grasp(second[0].double().numpy(), second[1].numpy(),
                                        GRASP_TEMPERATURE, first[0].double().numpy(),
                                        first[1].numpy())
    gradient = grasp_gradient(model, masks.weights, first, CPU)
    product = grasp_hessian_gradient_product(model, masks.weights, second, gradient, CPU)
    scores = grasp_scores_from_products(masks.weights, product)
    np.testing.assert_allclose(gradient["conv.weight"].view(-1).numpy(), g, rtol=1e-4)
    np.testing.assert_allclose(product["conv.weight"].view(-1).numpy(), hg, rtol=1e-3)
    np.testing.assert_allclose(scores["conv.weight"].view(-1).numpy(), expected, rtol=1e-3)
    # The temperature matters: without it the product is far larger (about T^3 here).
    untempered = grasp_hessian_gradient_product(
        model, masks.weights, second, grasp_gradient(model, masks.weights, first, CPU, 1.0),
        CPU, 1.0)
    assert not np.allclose(untempered["conv.weight"].view(-1).numpy(), hg, rtol=0.5)


def test_grasp_keeps_the_largest_signed_score_not_the_largest_magnitude():
    scores = {"w": torch.tensor([-5.0, 1.0, 0.5, -0.1])}
    kept = masks_from_scores(scores, {"w": torch.ones(4)}, 0.5, "global")["w"]
    assert kept.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_grasp_through_compute_scores_uses_class_balanced_batches_and_restores_the_model():
    torch.manual_seed(0)
    model, masks = two_channel(batchnorm=True)
    images = torch.randn(40, 1, 2, 2)
    labels = torch.tensor([0, 1] * 20)
    batches = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 40, 8)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = compute_scores("grasp", model, masks, SINGLE, lambda: iter(batches), seed=1,
                            megabatch=1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics put back
    first, second = class_balanced_batches(batches, 2, 10)
    gradient = grasp_gradient(model, masks.weights, first, CPU)
    product = grasp_hessian_gradient_product(model, masks.weights, second, gradient, CPU)
    expected = grasp_scores_from_products(masks.weights, product)
    assert torch.equal(scores["conv.weight"], expected["conv.weight"])


def test_grasp_draws_its_batches_from_the_class_source_and_refuses_short_ones():
    """Issue 14: a scoring sample too small for 2 x 10 samples per class made GraSP score on
    short (or empty) batches without a word. The batches now come from the class source (the
    megabatch's training part, read as far as needed); if even that is short, one line."""
    torch.manual_seed(0)
    model, masks = two_channel()
    images, labels = torch.randn(40, 1, 2, 2), torch.tensor([0, 1] * 20)
    batches = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 40, 8)]
    small_sample = batches[:1]  # 4 samples per class: both GraSP batches would be short
    scores = compute_scores("grasp", model, masks, SINGLE, lambda: iter(small_sample), seed=1,
                            megabatch=1, class_source=lambda: iter(batches))
    first, second = class_balanced_batches(batches, 2, 10)
    expected = grasp_scores_from_products(masks.weights, grasp_hessian_gradient_product(
        model, masks.weights, second, grasp_gradient(model, masks.weights, first, CPU), CPU))
    assert torch.equal(scores["conv.weight"], expected["conv.weight"])
    with pytest.raises(ConfigError, match=r"megabatch 3's training part is 32 short \(class 0: "
                                          r"16 missing\).*data.megabatches"):
        compute_scores("grasp", model, masks, SINGLE, lambda: iter(small_sample), seed=1,
                       megabatch=3)


def test_class_balanced_batches_take_per_class_samples_in_stream_order():
    labels = torch.tensor([2, 0, 0, 1, 0, 2, 0, 1, 1, 2, 0, 1, 2])
    images = torch.arange(len(labels)).float().view(-1, 1)  # image value = stream position
    stream = [(images[i:i + 4], labels[i:i + 4]) for i in range(0, len(labels), 4)]
    first, second = class_balanced_batches(stream, 3, per_class=2, count=2)
    assert first[1].tolist() == [0, 0, 1, 1, 2, 2]
    assert first[0].view(-1).tolist() == [1, 2, 3, 7, 0, 5]
    assert second[0].view(-1).tolist() == [4, 6, 8, 11, 9, 12]
    short, empty = class_balanced_batches([(images[:2], labels[:2])], 3, per_class=2)
    assert short[1].tolist() == [0, 2] and len(empty[1]) == 0
    assert grasp_gradient(nn.Linear(1, 3), {}, empty, CPU) == {}


def test_synflow_matches_the_closed_form_with_abs_weights_batchnorm_in_eval_and_bias():
    model, masks = two_channel(batchnorm=True, bias=True)
    with torch.no_grad():
        model.bn.running_mean.fill_(-0.5)
        model.bn.running_var.fill_(4.0)
        model.bn.weight.fill_(-1.5)
        model.bn.bias.fill_(-0.25)
        model.fc.bias.copy_(torch.tensor([-0.4, 0.3]))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = synflow_scores(model, dict(masks.masks), (1, 2, 2))
    # With every parameter and buffer made absolute and BatchNorm in eval mode, each channel's
    # pixels all hold h_c = (|w_c| - 0.5) / sqrt(4 + eps) * 1.5 + 0.25 on the all-ones input,
    # R = sum_c h_c S_c + |b1| + |b2| with S_c the sum of |F| over channel c's block, and
    # dR/d|w_c| = 1.5 / sqrt(4 + eps) * S_c. The scores are |w_c| dR/d|w_c|, divided by R.
    slope = 1.5 / math.sqrt(4.0 + 1e-5)
    blocks = [CLASSIFIER[:, 0:4].abs().sum().item(), CLASSIFIER[:, 4:8].abs().sum().item()]
    heights = [(abs(w) - 0.5) * slope + 0.25 for w in CONV]
    flow = sum(h * s for h, s in zip(heights, blocks)) + 0.4 + 0.3
    expected = [abs(w) * slope * s / flow for w, s in zip(CONV, blocks)]
    np.testing.assert_allclose(scores["conv.weight"].view(-1).numpy(), expected, rtol=1e-6)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.conv.weight.grad is None


def test_synflow_ignores_pruned_weights_through_their_masks():
    model, masks = two_channel()
    scores = synflow_scores(model, {"conv.weight": torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)},
                            (1, 2, 2))
    assert scores["conv.weight"].view(-1).tolist() == [0.0, pytest.approx(1.0)]


def test_iterated_synflow_prunes_in_exponential_rounds_ending_at_the_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    masks = MaskSet(model, attach_masks(model))
    current = {name: torch.ones(m.shape) for name, m in masks.masks.items()}
    total = sum(m.numel() for m in current.values())
    one_round = synflow_iterated_scores(model, current, (1, 6, 6), 0.2, "global", iterations=1)
    assert all(torch.isfinite(s).all() for s in one_round.values())
    assert torch.equal(one_round["0.weight"], synflow_scores(model, current, (1, 6, 6))["0.weight"])

    iterated = synflow_iterated_scores(model, current, (1, 6, 6), 0.2, "global", iterations=5)
    survivors = sum(int(torch.isfinite(s).sum()) for s in iterated.values())
    assert survivors == keep_count(0.2 ** (4 / 5), total)  # after rounds 1..4 of 5
    final = masks_from_scores(iterated, current, 0.2, "global")
    assert sum(int(m.sum()) for m in final.values()) == keep_count(0.2, total)
    one_shot = masks_from_scores(one_round, current, 0.2, "global")
    assert any(not torch.equal(final[n], one_shot[n]) for n in final)  # the rounds mattered


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("criterion", ["grasp", "synflow", "random"])
def test_two_rank_runs_have_identical_masks_on_every_rank(criterion, digits_shards, tmp_path):
    run_dir = tmp_path / criterion
    result = run_trainer(["--config", str(REPO / "configs/digits.yaml"),
                          f"data.shards={digits_shards}", f"run.dir={run_dir}",
                          "data.megabatches=2", "train.epochs=1", "log.progress=false",
                          "log.wandb.mode=disabled", "checkpoint.keep_last=5",
                          f"prune.criterion={criterion}", "prune.snip_fraction=1.0",
                          "prune.synflow_iterations=20"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    schedule = density_schedule("app", 2, 4.5)
    for t in (1, 2):
        folder = run_dir / "checkpoints" / f"megabatch-{t:04d}"
        ranks = [torch.load(folder / f"rank-{r:05d}.pt", weights_only=True)["masks"]
                 for r in range(2)]
        for name, mask in ranks[0].items():
            assert torch.equal(mask, ranks[1][name]), (t, name)
        kept = sum(int(m.sum()) for m in ranks[0].values())
        total = sum(m.numel() for m in ranks[0].values())
        assert kept == keep_count(schedule[t - 1], total)
