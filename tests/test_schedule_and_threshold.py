import math

import pytest
import torch

from app_dist.pruning.schedule import density_schedule
from app_dist.pruning.threshold import keep_top, masks_from_scores
from app_dist.training.metrics import cumulative_error


def test_app_schedule_matches_the_paper_numbers_for_T8_tau45():
    expected = [0.800, 0.716, 0.640, 0.572, 0.512, 0.458, 0.410, 0.366]
    assert [round(d, 3) for d in density_schedule("app", 8, 4.5)] == expected


def test_app_schedule_ends_at_the_target_and_osp_starts_there():
    assert density_schedule("app", 8, 4.5)[-1] == pytest.approx(0.8**4.5)
    assert density_schedule("osp", 8, 4.5) == [pytest.approx(0.8**4.5)] * 8
    assert density_schedule("dense", 3, 4.5) == [1.0, 1.0, 1.0]
    assert density_schedule("app", 1, 4.5) == [pytest.approx(0.8**4.5)]


def test_keep_top_keeps_exactly_k_and_breaks_ties_by_lowest_index():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    kept = keep_top(scores, 3)
    assert kept.tolist() == [False, True, True, True, False, False]
    assert int(keep_top(scores, 0).sum()) == 0
    assert bool(keep_top(scores, 6).all())


@pytest.mark.parametrize("keep", [1, 7, 500, 999])
def test_keep_top_count_is_exact_even_when_all_scores_tie(keep):
    assert int(keep_top(torch.zeros(1000), keep).sum()) == keep
    assert keep_top(torch.zeros(1000), keep)[:keep].all()


def test_global_masks_are_nested_and_hit_the_density_exactly():
    torch.manual_seed(0)
    masks = {"a": torch.ones(10, 10), "b": torch.ones(5, 20)}
    total = 200
    for density in [0.8, 0.64, 0.512, 0.366]:
        scores = {name: torch.randn(m.shape) for name, m in masks.items()}
        new = masks_from_scores(scores, masks, density, "global")
        assert sum(int(m.sum()) for m in new.values()) == round(density * total)
        for name in masks:  # nothing pruned comes back
            assert not bool(((new[name] == 1) & (masks[name] == 0)).any())
        masks = new


def test_local_scope_prunes_each_layer_to_the_density():
    masks = {"a": torch.ones(100), "b": torch.ones(40)}
    scores = {"a": torch.arange(100.0), "b": -torch.arange(40.0)}
    new = masks_from_scores(scores, masks, 0.5, "local")
    assert int(new["a"].sum()) == 50 and int(new["b"].sum()) == 20
    assert new["a"][50:].all() and new["b"][:20].all()


def test_global_scope_compares_scores_across_layers():
    masks = {"a": torch.ones(4), "b": torch.ones(4)}
    scores = {"a": torch.tensor([9.0, 8, 7, 6]), "b": torch.tensor([1.0, 2, 3, 4])}
    new = masks_from_scores(scores, masks, 0.5, "global")
    assert new["a"].tolist() == [1, 1, 1, 1] and new["b"].tolist() == [0, 0, 0, 0]


def test_cumulative_error_rate_sums_counts_and_rates():
    count, normalised = cumulative_error([30, 20, 10], test_size=100)
    assert count == 60 and math.isclose(normalised, 0.6)
