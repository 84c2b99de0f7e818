"""model.sync_batchnorm: GlobalBatchNorm2d on 2 real gloo processes equals BatchNorm2d on the
whole batch in 1; in a single process (and while scoring) it is plain BatchNorm2d."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from app_dist.engine.folding import conv_batchnorm_pairs, folded_copy
from app_dist.models.batchnorm import (
    GlobalBatchNorm2d,
    per_rank_statistics,
    synchronise_batchnorm,
)
from app_dist.models.registry import build_model
from app_dist.pruning.masks import MaskedBatchNorm2d

# Rank 0 gets 3 samples, rank 1 gets 5: unequal shares check that the statistics weigh
# samples, not ranks. Channel means far from 0 check the combination of variances.
SHARES = (3, 5)
STEPS = 2


def _network() -> nn.Module:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                            nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(64, 5))
    with torch.no_grad():
        network[1].weight.uniform_(0.5, 1.5)
        network[1].bias.uniform_(-1, 1)
    return network


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(sum(SHARES), 3, 4, 4, generator=generator) * 2 + 5,
             torch.randint(0, 5, (sum(SHARES),), generator=generator)) for _ in range(STEPS)]


def _train(network: nn.Module, batches, rows: slice, total: int) -> dict[str, object]:
    """STEPS forward/backward passes on `rows` of each batch; the loss is this process's part
    of the global batch's mean cross-entropy, so parameter gradients summed over processes
    are the global batch's. Returns outputs, input gradients, gradients and final state."""
    outputs, input_grads = [], []
    for images, labels in batches:
        images = images[rows].clone().requires_grad_()
        network.zero_grad()
        logits = network(images)
        loss = nn.functional.cross_entropy(logits, labels[rows], reduction="sum") / total
        loss.backward()
        outputs.append(logits.detach())
        input_grads.append(images.grad)
    gradients = {name: p.grad.clone() for name, p in network.named_parameters()}
    return {"outputs": outputs, "input_grads": input_grads, "gradients": gradients,
            "state": {k: v.clone() for k, v in network.state_dict().items()}}


def _feature_maps() -> torch.Tensor:
    return torch.randn(sum(SHARES), 4, 2, 2, generator=torch.Generator().manual_seed(2)) * 2 + 5


def _channel_masked(layer: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """`layer` as prune.structure=channel makes it, with channel 1 pruned."""
    layer.register_buffer("channel_mask", torch.tensor([1.0, 0.0, 1.0, 1.0]), persistent=False)
    layer.__class__ = MaskedBatchNorm2d
    return layer


def _rank_worker(rank: int, store_path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=len(SHARES))
    try:
        network = _network()
        assert synchronise_batchnorm(network) == 2
        start = sum(SHARES[:rank])
        rows = slice(start, start + SHARES[rank])
        result = _train(network, _batches(), rows, sum(SHARES))
        for gradient in result["gradients"].values():
            dist.all_reduce(gradient)  # what DDP does (it averages; the loss is pre-divided)
        # per_rank_statistics: plain BatchNorm on this rank's share, and no collective.
        plain = _network()
        with per_rank_statistics(network):
            network.load_state_dict(plain.state_dict())
            images = _batches()[0][0][rows]
            result["per_rank"] = (network(images).detach(), plain(images).detach())
        # A channel-masked BatchNorm (prune.structure=channel) synchronised keeps its mask.
        masked = _channel_masked(nn.BatchNorm2d(4))
        assert synchronise_batchnorm(nn.Sequential(masked)) == 1
        result["masked"] = masked(_feature_maps()[rows]).detach()
        torch.save(result, Path(out) / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_synced_batchnorm_on_two_ranks_equals_batchnorm_on_the_whole_batch(tmp_path):
    """Outputs, input gradients, summed parameter gradients and running statistics (with
    momentum and with the cumulative average) of GlobalBatchNorm2d on 2 gloo processes, with
    3 and 5 samples of each batch, equal plain BatchNorm2d's on all 8 in one process."""
    # fork: the ranks start in half a second (spawn re-imports torch: 7 s on 2 busy cores);
    # each rank computes on one thread, so no OpenMP pool inherited from pytest is touched.
    ranks = mp.start_processes(_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)),
                               nprocs=len(SHARES), start_method="fork", join=False)
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the 2 ranks did not finish in 120 s")
    reference = _train(_network(), _batches(), slice(None), sum(SHARES))
    results = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    for step in range(STEPS):
        for key in ("outputs", "input_grads"):
            torch.testing.assert_close(torch.cat([r[key][step] for r in results]),
                                       reference[key][step], rtol=1e-5, atol=1e-6)
    for rank in results:
        for name, gradient in reference["gradients"].items():
            torch.testing.assert_close(rank["gradients"][name], gradient, rtol=1e-5,
                                       atol=1e-6, msg=name)
        for name, value in reference["state"].items():
            torch.testing.assert_close(rank["state"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=name)
        synced, plain = rank["per_rank"]
        torch.testing.assert_close(synced, plain, rtol=0, atol=0)
    whole = nn.BatchNorm2d(4)(_feature_maps()).detach()
    whole[:, 1] = 0
    torch.testing.assert_close(torch.cat([r["masked"] for r in results]), whole, rtol=1e-5,
                               atol=1e-6)
    for name, value in results[0]["state"].items():  # every rank holds the same statistics
        assert torch.equal(value, results[1]["state"][name]), name


def test_synced_batchnorm_in_one_process_is_batchnorm_exactly():
    """Without a process group of 2 or more it runs BatchNorm2d's own forward: bit for bit
    the same outputs, gradients and running statistics."""
    plain, synced = _network(), _network()
    assert synchronise_batchnorm(synced) == 2
    assert isinstance(synced[1], nn.BatchNorm2d) and type(synced[1]) is GlobalBatchNorm2d
    results = [_train(n, _batches(), slice(None), sum(SHARES)) for n in (plain, synced)]
    for key in ("outputs", "input_grads"):
        assert all(torch.equal(a, b) for a, b in zip(results[0][key], results[1][key]))
    for key in ("gradients", "state"):
        assert all(torch.equal(v, results[1][key][k]) for k, v in results[0][key].items())


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20s"])
def test_synced_model_keeps_its_state_dict_and_folds_its_batchnorms(name):
    """Converted in place: the same state_dict keys (a checkpoint loads into a plain model
    and back) and the same conv -> BatchNorm pairs for perf.fold_batchnorm."""
    channels = 1 if name == "digits_cnn" else 3
    plain = build_model(name, 10, in_channels=channels, mean=[0.5] * channels,
                        std=[0.25] * channels)
    synced = build_model(name, 10, in_channels=channels, mean=[0.5] * channels,
                         std=[0.25] * channels)
    pairs = conv_batchnorm_pairs(plain)
    assert synchronise_batchnorm(synced) == sum(isinstance(m, nn.BatchNorm2d)
                                                for m in plain.modules()) > 0
    synced.load_state_dict(plain.state_dict())
    plain.load_state_dict(synced.state_dict())
    assert list(synced.state_dict()) == list(plain.state_dict())
    assert conv_batchnorm_pairs(synced) == pairs and pairs
    images = torch.rand(4, channels, 8 if name == "digits_cnn" else 32,
                        8 if name == "digits_cnn" else 32)
    with torch.no_grad():
        torch.testing.assert_close(folded_copy(synced, pairs)(images), plain.eval()(images))
