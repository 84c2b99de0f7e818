"""prune.structure=N:M: the schedule of N, nested masks that are valid N:M with exact
densities per layer (Linear along the input dimension, Conv2d along input channels), the
pruning step with SNIP/magnitude/random, one-line refusals, the small ViTs, the export
(valid masks, outputs equal to the masked model's), and a real 2-rank run on the tiny ViT
that ends with identical, valid 2:4 masks on both ranks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from app_dist.config import load_config
from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import ConfigError
from app_dist.foundations.run_layout import CheckpointFiles
from app_dist.models.registry import build_model
from app_dist.models.sparse_file import ExportError, load_exported, sparse_model
from app_dist.pruning.masks import MaskSet, attach_masks
from app_dist.pruning.n_m import (
    grouped,
    has_groups,
    is_n_m,
    keep_best_n,
    n_m_density_schedule,
    n_m_steps,
)
from app_dist.pruning.pruner import prune_step
from app_dist.pruning.structures import NMPattern, parse_structure
from app_dist.results.n_m_export import load_semi_structured, n_m_source

from .conftest import (
    checkpoint_folder,
    digits_run_args,
    read_metrics,
    rewound_copy,
    run_trainer,
)

SINGLE = Platform(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def vit_digits_masks(pattern: NMPattern | None = None):
    pattern = pattern or NMPattern(2, 4)
    torch.manual_seed(0)
    model = build_model("vit_digits", 10, in_channels=1, mean=[0.305], std=[0.375])
    return model, MaskSet(model, attach_masks(model, include_linear=True), n_m=pattern)


def digits_batches(count: int = 2, size: int = 32):
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(size, 1, 8, 8, generator=generator),
             torch.randint(0, 10, (size,), generator=generator)) for _ in range(count)]


def test_n_falls_from_m_to_n_spread_over_the_megabatches():
    two_four, four_eight = NMPattern(2, 4), NMPattern(4, 8)
    assert n_m_steps("app", 3, two_four) == [4, 3, 2]  # 4:4 -> 3:4 -> 2:4
    assert n_m_steps("app", 4, two_four) == [4, 3, 3, 2]
    assert n_m_steps("app", 8, two_four) == [4, 4, 3, 3, 3, 3, 2, 2]
    assert n_m_steps("app", 1, two_four) == [2]
    assert n_m_steps("app", 8, four_eight) == [8, 7, 7, 6, 6, 5, 5, 4]
    assert n_m_steps("app", 2, four_eight) == [8, 4]
    assert n_m_steps("osp", 3, two_four) == [2, 2, 2]
    assert n_m_steps("dense", 2, two_four) == [4, 4]
    assert n_m_density_schedule("app", 3, two_four) == [1.0, 0.75, 0.5]
    assert parse_structure("2:4") == two_four and parse_structure("channel") is None


def test_groups_run_along_the_input_dimension():
    linear = torch.arange(16.0).view(2, 8)
    assert grouped(linear, 4).tolist()[1] == [4.0, 5.0, 6.0, 7.0]
    conv = torch.zeros(2, 8, 3, 3)
    conv[0, 4:8, 1, 2] = 1.0  # input channels 4..7 at one kernel position: one group
    assert (grouped(conv, 4).sum(1) == 4).sum() == 1
    assert has_groups((5, 8, 3, 3), 4) and not has_groups((5, 3, 3, 3), 4)
    # Equal scores: the lower indices of each group are kept (every rank alike).
    kept = keep_best_n(torch.ones(2, 8), torch.ones(2, 8), 2, 4)
    assert kept[0].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]


def test_4_4_to_3_4_to_2_4_is_nested_valid_and_exact_per_layer():
    model, masks = vit_digits_masks()
    previous = {name: mask.clone() for name, mask in masks.masks.items()}
    for density, n in ((0.75, 3), (0.5, 2)):
        new = prune_step(model, masks, SINGLE, digits_batches, density=density,
                         criterion="magnitude", scope="global", seed=1, megabatch=n)
        masks.update(new, None)
        for name, mask in masks.masks.items():
            assert bool((mask <= previous[name]).all()), name
            if name == "net.patch_embed.weight":  # 1 input channel: no groups, stays dense
                assert float(mask.mean()) == 1.0
                continue
            assert float(mask.mean()) == n / 4, name
            assert is_n_m(mask, n, 4) and (grouped(mask, 4).sum(1) == n).all()
        previous = {name: mask.clone() for name, mask in masks.masks.items()}
    record = masks.structure_record()
    assert record["n_m"] == "2:4" and record["n_m_density"] == 0.5
    assert record["n_m_dense_layers"] == 1
    # Nested by score: at 2:4 each group kept the 2 largest of its 3:4 survivors.
    weight = masks.weights["net.blocks.1.fc2.weight"].detach()
    survivors = grouped(weight.abs(), 4) * grouped(masks.masks["net.blocks.1.fc2.weight"], 4)
    dropped = grouped(weight.abs(), 4) * (grouped(previous["net.blocks.1.fc2.weight"], 4)
                                          - grouped(masks.masks["net.blocks.1.fc2.weight"], 4))
    assert bool((dropped.max(1).values <= survivors.max(1).values).all())


@pytest.mark.parametrize("criterion", ["snip", "random", "grasp"])
def test_pruning_step_with_data_and_random_criteria_gives_4_8_masks(criterion):
    model, masks = vit_digits_masks(NMPattern(4, 8))
    batches = lambda: digits_batches(16, 32)  # noqa: E731 (GraSP: 20 per class)
    for density in (6 / 8, 4 / 8):
        masks.update(prune_step(model, masks, SINGLE, batches, density=density,
                                criterion=criterion, scope="global", seed=3, megabatch=1),
                     None)
    fc1 = masks.masks["net.blocks.0.fc1.weight"]
    assert is_n_m(fc1, 4, 8) and float(fc1.mean()) == 0.5 and not is_n_m(fc1, 2, 4)


@pytest.mark.parametrize("override, key", [
    ("prune.target_density=0.5", "prune.target_density"),
    ("prune.criterion=synflow", "prune.criterion"),
])
def test_n_m_refuses_what_makes_no_sense_in_one_line(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["prune.structure=2:4", override])
    assert key in str(error.value) and "\n" not in str(error.value)
    for bad in ("2:3", "4:4", "0:8"):
        with pytest.raises(ConfigError, match="prune.structure"):
            load_config(None, [f"prune.structure={bad}"])
    assert load_config(None, ["prune.structure=4:8"]).prune.structure == "4:8"


def test_vit_takes_its_image_size_only_and_prunes_its_linear_layers_but_the_head():
    model, masks = vit_digits_masks()
    assert "net.head.weight" not in masks.masks
    assert sum(name.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"))
               for name in masks.masks) == 8
    with pytest.raises(AssertionError, match="8x8"):
        model(torch.rand(1, 1, 16, 16))


def test_export_has_valid_2_4_weights_equal_outputs_and_lists_the_semi_structured_linears(
        tmp_path):
    model, masks = vit_digits_masks()
    for density in (0.75, 0.5):
        masks.update(prune_step(model, masks, SINGLE, digits_batches, density=density,
                                criterion="magnitude", scope="global", seed=1, megabatch=1),
                     None)
    architecture = {"name": "vit_digits", "num_classes": 10, "in_channels": 1,
                    "stem": "cifar", "mean": [0.305], "std": [0.375]}
    exported = sparse_model(model.state_dict(), masks.state_dict(), architecture, {})
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    exported["source"].update(n_m_source(masks.state_dict(), NMPattern(2, 4), linears))
    path = tmp_path / "model-sparse.pt"
    torch.save(exported, path)
    plain = load_exported(path)
    for name, weight in plain.state_dict().items():
        if name in masks.masks and name != "net.patch_embed.weight":
            assert is_n_m(weight != 0, 2, 4), name  # the weights themselves, not the masks
    images = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(plain(images), model.eval()(images))
    source = exported["source"]
    assert source["structure"] == "2:4" and not source["n_m_layers"]["net.patch_embed.weight"][
        "grouped"]
    # Only shapes torch's half-precision kernels take (rows % 32, columns % 64): the fc2s.
    assert source["semi_structured"] == ["net.blocks.0.fc2.weight", "net.blocks.1.fc2.weight"]
    with pytest.raises(ExportError, match="CUDA"):
        load_semi_structured(path, device="cpu")
    # vit_cifar: every one of its 24 Linear layers but the head has a kernel-ready shape.
    cifar = build_model("vit_cifar", 10, mean=[0.5] * 3, std=[0.25] * 3)
    shapes = {f"{n}.weight": m.weight for n, m in cifar.named_modules()
              if isinstance(m, nn.Linear) and n != "net.head"}
    halves = {name: keep_best_n(w.abs(), torch.ones_like(w), 2, 4) for name, w in shapes.items()}
    assert len(n_m_source(halves, NMPattern(2, 4), set(halves))["semi_structured"]) == 24


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_vit_2_4_run_ends_with_identical_valid_masks_and_exports_them(
        digits_shards, tmp_path, capsys):
    from app_dist.cli import main as cli_main

    run_dir = tmp_path / "n_m"
    options = ("model.name=vit_digits", "prune.include_linear=true", "prune.structure=2:4",
               "data.megabatches=3", "train.epochs=1")
    result = run_trainer(digits_run_args(digits_shards, run_dir, *options), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cannot trace" not in result.stderr
    records = read_metrics(run_dir)
    assert [r["target_density"] for r in records] == [1.0, 0.75, 0.5]
    assert [r["n_m"] for r in records] == ["4:4", "3:4", "2:4"]
    assert [r["n_m_density"] for r in records] == [1.0, 0.75, 0.5]
    for record in records:  # exact per layer; the 1-channel patch embedding stays dense
        assert {v for k, v in record["layer_density"].items()
                if k != "net.patch_embed.weight"} == {record["target_density"]}
    final = checkpoint_folder(run_dir, 3)
    rank_masks = [torch.load(final / CheckpointFiles.rank(r), weights_only=True)["masks"]
                  for r in (0, 1)]
    assert all(torch.equal(rank_masks[0][n], rank_masks[1][n]) for n in rank_masks[0])
    assert all(is_n_m(mask, 2, 4) for name, mask in rank_masks[0].items()
               if name != "net.patch_embed.weight")

    # Resumed after megabatch 2 (at 3:4), the last step to 2:4 gives the same run.
    resumed = rewound_copy(run_dir, tmp_path / "resumed", megabatch=2)
    result = run_trainer(digits_run_args(digits_shards, resumed, *options), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(resumed) == records
    for name, key in ((CheckpointFiles.ENGINE, "model"), (CheckpointFiles.STATE, "masks")):
        want, got = [torch.load(folder / name, weights_only=True)[key]
                     for folder in (final, checkpoint_folder(resumed, 3))]
        assert all(torch.equal(got[n], want[n]) for n in want), name

    assert cli_main(["export", str(run_dir)]) == 0
    assert "semi-structured" in capsys.readouterr().out
    summary = json.loads((run_dir / "export-summary.json").read_text())
    assert summary["structure"] == "2:4" and len(summary["n_m_valid_layers"]) == 8
    assert summary["dense_layers"] == ["net.patch_embed.weight"]
    assert set(summary["latency_ms"]) == {"1", "256"}
    plain = load_exported(run_dir / "model-sparse.pt")
    masked, masks = vit_digits_masks()
    masks.load_state_dict(torch.load(final / "state.pt", weights_only=True)["masks"])
    masked.load_state_dict(torch.load(final / "engine.pt", weights_only=True)["model"])
    images = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(plain(images), masked.eval()(images))
