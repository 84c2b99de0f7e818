"""The options users know from the paper and the authors' code, each in a real (single-process,
in-process) training run on the real digits: Linear pruning, the target as a density or as
tau, the replay policies, early stopping on validation, and sequences of 1 to 100 megabatches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app_dist.foundations.run_layout import CheckpointFiles, RunLayout
from app_dist.pruning.schedule import density_schedule
from app_dist.pruning.threshold import keep_count
from app_dist.train import main as train_main
from app_dist.training.record import WALL_CLOCK_KEYS

from .conftest import REPO


def train(shards: Path, run_dir: Path, *overrides: str) -> list[dict]:
    """One in-process run of app-dist train (T = 3, 1 epoch unless overridden); its records."""
    code = train_main(["--config", str(REPO / "configs/digits.yaml"), f"data.shards={shards}",
                       f"run.dir={run_dir}", "data.megabatches=3", "train.epochs=1",
                       "data.num_workers=0", "log.progress=false", "log.wandb.mode=disabled",
                       "prune.criterion=magnitude", *overrides])
    assert code == 0
    lines = RunLayout(run_dir).metrics.read_text().splitlines()
    return [json.loads(line) for line in lines]


def final_masks(run_dir: Path, megabatch: int) -> dict[str, torch.Tensor]:
    folder = RunLayout(run_dir).checkpoint(megabatch)
    return torch.load(folder / CheckpointFiles.STATE, weights_only=True)["masks"]


@pytest.mark.slow
def test_include_linear_prunes_hidden_linear_layers_but_never_the_classifier(digits_shards,
                                                                             tmp_path):
    records = train(digits_shards, tmp_path / "linear", "model.name=digits_cnn_mlp",
                    "prune.include_linear=true", "data.megabatches=2")
    masks = final_masks(tmp_path / "linear", 2)
    # digits_cnn_mlp: convs net.0, net.3, net.7; hidden Linear net.12; classifier net.14.
    assert set(masks) == {"net.0.weight", "net.3.weight", "net.7.weight", "net.12.weight"}
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == keep_count(0.8**4.5, total)
    assert 0 < masks["net.12.weight"].float().mean() < 1  # the Linear layer was pruned
    assert records[-1]["prunable_parameters"] == total
    engine = torch.load(RunLayout(tmp_path / "linear").checkpoint(2) / CheckpointFiles.ENGINE,
                        weights_only=True)["model"]
    assert torch.count_nonzero(engine["net.12.weight"][~masks["net.12.weight"]]) == 0

    without = train(digits_shards, tmp_path / "conv-only", "model.name=digits_cnn_mlp",
                    "data.megabatches=2")
    assert set(final_masks(tmp_path / "conv-only", 2)) == set(masks) - {"net.12.weight"}
    assert without[-1]["prunable_parameters"] == total - 64 * 64


@pytest.mark.slow
def test_target_density_and_sparsity_level_give_the_same_run(digits_shards, tmp_path):
    by_tau = train(digits_shards, tmp_path / "tau", "prune.sparsity_level=3",
                   "data.megabatches=2")
    by_density = train(digits_shards, tmp_path / "density", "prune.target_density=0.512",
                       "data.megabatches=2")
    targets = []
    for record in by_tau + by_density:
        for wall_clock in WALL_CLOCK_KEYS:
            record.pop(wall_clock)
        targets.append(record.pop("target_density"))  # equal up to float rounding
    assert by_tau == by_density
    assert targets == pytest.approx(density_schedule("app", 2, 3) * 2, rel=1e-12)
    tau_masks = final_masks(tmp_path / "tau", 2)
    density_masks = final_masks(tmp_path / "density", 2)
    assert all(torch.equal(tau_masks[name], density_masks[name]) for name in tau_masks)
    other = train(digits_shards, tmp_path / "other", "prune.target_density=0.6",
                  "data.megabatches=1")
    assert other[0]["density"] == pytest.approx(0.6, abs=1e-4)


# digits: 1,500 training samples in 60 shards, so T = 3 gives megabatches of 500 = 450 train
# + 50 validation samples. Expected (train, validation) sizes at t = 1, 2, 3:
REPLAY_SIZES = {
    "full": ([450, 900, 1350], [50, 100, 150]),
    "none": ([450, 450, 450], [50, 50, 50]),
    "window": ([450, 900, 900], [50, 100, 100]),  # replay_window = 2
    # megabatch t + a reservoir of 100 earlier training samples (11 for validation: 100 x 1/9)
    "buffer": ([450, 550, 550], [50, 61, 61]),
}


@pytest.mark.parametrize("replay", list(REPLAY_SIZES))
@pytest.mark.slow
def test_replay_policies_train_and_validate_on_their_sets(replay, digits_shards, tmp_path):
    records = train(digits_shards, tmp_path / replay, f"data.replay={replay}",
                    "data.replay_window=2", "data.replay_buffer=100")
    train_sizes, val_sizes = REPLAY_SIZES[replay]
    assert [r["train_samples"] for r in records] == train_sizes
    assert [r["val_samples"] for r in records] == val_sizes
    assert records[-1]["cer_count"] == sum(r["test_errors"] for r in records)


@pytest.mark.slow
def test_early_stopping_stops_a_megabatch_after_patience_epochs_without_gain(digits_shards,
                                                                            tmp_path):
    # A gain of more than 100 points is impossible: every megabatch stops after 1 + 1 epochs.
    stopped = train(digits_shards, tmp_path / "stopped", "train.epochs=3",
                    "train.early_stopping_patience=1", "train.early_stopping_min_delta=1.0",
                    "data.megabatches=2")
    assert [r["epochs_trained"] for r in stopped] == [2, 2]
    assert [r["best_epoch"] for r in stopped] == [1, 1]
    full = train(digits_shards, tmp_path / "full", "train.epochs=2", "data.megabatches=1",
                 "train.early_stopping_min_delta=1.0")  # min_delta alone changes nothing
    assert [r["epochs_trained"] for r in full] == [2]


def test_early_stopping_settings_are_validated(tmp_path, capsys):
    for override, message in [("train.early_stopping_patience=-1", "must be >= 0"),
                              ("train.early_stopping_min_delta=-0.1", "must be >= 0"),
                              ("prune.synflow_iterations=0", "must be >= 1")]:
        code = train_main(["--config", str(REPO / "configs/digits.yaml"), override])
        error = capsys.readouterr().err.strip()
        assert code == 2 and message in error and override.split("=")[0] in error
        assert len(error.splitlines()) == 1


@pytest.fixture(scope="module")
def small_digits_shards(tmp_path_factory) -> Path:
    """Digits in shards of 10 samples (150 training shards): room for T = 100 megabatches."""
    from app_dist.data.prepare.shards import write_shards

    out = tmp_path_factory.mktemp("digits10") / "shards"
    write_shards("digits", None, str(out), samples_per_shard=10, seed=0)
    return out


@pytest.mark.slow
def test_a_single_megabatch_prunes_straight_to_the_final_density(digits_shards, tmp_path):
    records = train(digits_shards, tmp_path / "one", "data.megabatches=1")
    assert len(records) == 1
    assert records[0]["density"] == pytest.approx(0.8**4.5, abs=1e-4)


@pytest.mark.slow
def test_one_hundred_megabatches(small_digits_shards, tmp_path):
    run_dir = tmp_path / "long"
    records = train(small_digits_shards, run_dir, "data.megabatches=100", "train.batch_size=8",
                    "data.replay=window", "data.replay_window=3", "checkpoint.keep_last=2")
    assert [r["megabatch"] for r in records] == list(range(1, 101))
    schedule = density_schedule("app", 100, 4.5)
    total = records[0]["prunable_parameters"]
    assert [r["kept_parameters"] for r in records] == [keep_count(d, total) for d in schedule]
    assert records[-1]["density"] == pytest.approx(0.8**4.5, abs=1e-4)
    assert records[-1]["cer_count"] == sum(r["test_errors"] for r in records)
    assert records[-1]["cer"] == pytest.approx(records[-1]["cer_count"] / 297)
    layout = RunLayout(run_dir)
    assert sorted(layout.checkpoints.iterdir()) == [layout.checkpoint(99), layout.checkpoint(100)]
    masks_99, masks_100 = final_masks(run_dir, 99), final_masks(run_dir, 100)
    assert all(bool((masks_100[n] <= masks_99[n]).all()) for n in masks_100)  # nested
