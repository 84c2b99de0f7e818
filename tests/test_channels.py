"""prune.structure=channel: residual-coupled channel groups of ResNet-20 (exact counts), nested
whole-channel masks at the schedule's densities, BatchNorm channels that output zero, the
physically smaller export (plain nn.Module and ONNX) equal to the masked model, and a real
2-rank digits run that ends with identical masks on both ranks and exports a smaller model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from app_dist.config import load_config
from app_dist.engine.folding import conv_batchnorm_pairs, folded_copy
from app_dist.foundations.errors import ConfigError
from app_dist.foundations.run_layout import CheckpointFiles
from app_dist.models.registry import build_model
from app_dist.pruning.channels import build_channel_plan, channel_masks_from_scores
from app_dist.pruning.masks import MaskSet, attach_channel_masks, attach_masks
from app_dist.pruning.scores import magnitude_scores
from app_dist.results.channel_export import channel_model, export_onnx, load_channel_export

from .conftest import (
    checkpoint_folder,
    digits_run_args,
    read_metrics,
    rewound_copy,
    run_trainer,
)

CIFAR = {"name": "resnet20s", "num_classes": 10, "in_channels": 3, "stem": "cifar",
         "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}


def channel_model_and_masks(architecture: dict = CIFAR, size: int = 32,
                            budget: str = "weights"):
    torch.manual_seed(0)
    model = build_model(architecture["name"], architecture["num_classes"],
                        in_channels=architecture["in_channels"], stem=architecture["stem"],
                        mean=architecture["mean"], std=architecture["std"])
    plan = build_channel_plan(model, torch.zeros(1, architecture["in_channels"], size, size),
                              budget)
    attach_channel_masks(model, plan)
    return model, MaskSet(model, attach_masks(model), plan)


def prune_to(masks: MaskSet, density: float) -> None:
    plan = masks.channel_plan
    scores = plan.group_scores(magnitude_scores(masks.weights))
    current = {name: mask.cpu() for name, mask in masks.masks.items()}
    masks.update(channel_masks_from_scores(plan, scores, current, density), None)


def test_resnet20_groups_follow_the_residual_stream_across_option_a_shortcuts():
    _, masks = channel_model_and_masks()
    groups = masks.channel_plan.groups
    # 9 blocks' inner channels (3 x 16 + 3 x 32 + 3 x 64) + 64 residual-stream channels.
    assert len(groups) == 336 + 64
    by_filters = {}
    for group in groups:
        by_filters[len(group.filters)] = by_filters.get(len(group.filters), 0) + 1
    # stem + 9 conv2: stage-1 channels run through stages 2 and 3 (16); stage-2 channels
    # that are zero padding of the shortcut start in stage 2 (16: 6 filters); stage-3 ones
    # (32: 3 filters); inner channels have one filter each.
    assert by_filters == {10: 16, 6: 16, 3: 32, 1: 336}
    first = next(g for g in groups if ("net.conv1.weight", 0) in g.filters)
    # Option A puts stage-1 channel i at i + 8 in stage 2 and at i + 24 in stage 3.
    assert ("net.layer2.0.conv2.weight", 8) in first.filters
    assert ("net.layer3.2.conv2.weight", 24) in first.filters
    assert first.linear_inputs == [("net.linear", 24)]
    assert len(first.norms) == 10 and len(first.inputs) == 9  # every block's conv1 reads it


def test_masks_are_nested_whole_channels_near_the_schedule_and_pruned_channels_are_zero():
    model, masks = channel_model_and_masks()
    plan = masks.channel_plan
    previous = {name: mask.clone() for name, mask in masks.masks.items()}
    for density in (0.8, 0.64, 0.512, 0.366):
        prune_to(masks, density)
        assert abs(masks.density() - density) < 0.01
        for name, mask in masks.masks.items():
            assert bool((mask <= previous[name]).all()), name  # nested
        previous = {name: mask.clone() for name, mask in masks.masks.items()}
        alive = plan.group_alive(masks.masks)
        for group, is_alive in zip(plan.groups, alive):  # all of a group or none of it
            values = {bool(masks.masks[n].select(d, i).any()) for n, d, i in
                      group.weight_slices() if n not in {f for f, _ in group.filters}}
            assert values <= {is_alive} or not is_alive
            assert all(bool(masks.masks[n][i].any()) == is_alive for n, i in group.filters)
    record = masks.structure_record()
    assert 0 < record["flops_fraction"] < 1 and record["channel_groups_kept"] < 400
    # A pruned residual channel is exactly zero at every block output, BN shift or not:
    # prune the stage-1 residual channel 0 (lowest score) on top of the current masks.
    index = next(i for i, g in enumerate(plan.groups) if ("net.conv1.weight", 0) in g.filters)
    scores = torch.ones(len(plan.groups))
    scores[index] = -1.0
    current = {name: mask.clone() for name, mask in masks.masks.items()}
    masks.update(channel_masks_from_scores(plan, scores, current, masks.density() - 0.02),
                 None)
    assert not plan.group_alive(masks.masks)[index]
    channel = dict(plan.groups[index].norms)["net.layer3.2.bn2"]
    outputs = {}
    model.net.layer3[2].register_forward_hook(lambda m, i, o: outputs.setdefault("out", o))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.fill_(0.5)
        model.train()(torch.rand(4, 3, 32, 32))
    assert torch.count_nonzero(outputs["out"][:, channel]) == 0


def test_a_flops_budget_meets_the_flops_target_and_prunes_where_the_flops_are():
    stage_1 = [f"net.layer1.{block}.conv{i}.weight" for block in range(3) for i in (1, 2)]
    by_budget = {}
    for budget in ("weights", "flops"):
        _, masks = channel_model_and_masks(budget=budget)
        previous = {name: mask.clone() for name, mask in masks.masks.items()}
        for density in (0.8, 0.5, 1 / 3):
            prune_to(masks, density)
            record = masks.structure_record()
            reached = record["flops_fraction"] if budget == "flops" else masks.density()
            assert abs(reached - density) < 0.01, (budget, density, reached)
            assert all(bool((m <= previous[n]).all()) for n, m in masks.masks.items())
            previous = {name: mask.clone() for name, mask in masks.masks.items()}
        by_budget[budget] = (masks.density(), record["flops_fraction"],
                             sum(float(masks.masks[n].sum()) for n in stage_1)
                             / sum(masks.masks[n].numel() for n in stage_1))
    (weights_density, weights_flops, weights_stage_1) = by_budget["weights"]
    (flops_density, flops_flops, flops_stage_1) = by_budget["flops"]
    # At the same target the weights budget keeps more FLOPs than asked for: it spares the
    # 32x32 stage, whose weights are few but cost 16 times an 8x8 stage's each.
    assert weights_flops > 0.4 and flops_stage_1 < weights_stage_1
    assert flops_density > weights_density  # the FLOPs budget keeps more weights instead


def test_no_convolution_loses_all_its_channels():
    _, masks = channel_model_and_masks()
    prune_to(masks, 0.01)
    for name, mask in masks.masks.items():
        assert bool(mask.flatten(1).any(1).any()), name


def _with_statistics(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(32, 3, 32, 32))
    return model.eval()


def test_export_removes_channels_and_matches_the_masked_model_also_as_onnx(tmp_path):
    model, masks = channel_model_and_masks()
    prune_to(masks, 0.366)
    model = _with_statistics(model)
    exported = channel_model(model.state_dict(), {n: m.bool() for n, m in masks.masks.items()},
                             CIFAR, {"run_dir": "test"})
    path = tmp_path / "model-channel.pt"
    torch.save(exported, path)
    small = load_channel_export(path)
    assert sum(p.numel() for p in small.parameters()) == exported["source"]["parameters"]
    assert exported["source"]["parameters"] < 0.45 * exported["source"]["dense_parameters"]
    assert not any("mask" in name for name, _ in small.named_buffers())
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m) is nn.Conv2d for m in convs)
    dense_channels = sum(m.out_channels for m in build_model(
        "resnet20s", 10, mean=[0.5] * 3, std=[0.25] * 3).modules() if isinstance(m, nn.Conv2d))
    assert sum(m.out_channels for m in convs) < 0.7 * dense_channels
    images = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(images), small(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    onnxruntime = pytest.importorskip("onnxruntime")
    onnx_path = export_onnx(small, tmp_path / "model.onnx", (3, 32, 32))
    session = onnxruntime.InferenceSession(str(onnx_path))
    (logits,) = session.run(None, {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-5, atol=1e-5)


def test_folded_evaluation_keeps_pruned_channels_zero():
    model, masks = channel_model_and_masks()
    prune_to(masks, 0.5)
    model = _with_statistics(model)
    folded = folded_copy(model, conv_batchnorm_pairs(model))
    images = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override, key", [
    ("prune.criterion=grasp", "prune.criterion"),
    ("prune.criterion=synflow", "prune.criterion"),
    ("prune.scope=local", "prune.scope"),
    ("prune.include_linear=true", "prune.include_linear"),
    ("prune.budget=params", "prune.budget"),
])
def test_unsupported_channel_combinations_are_refused_in_one_line(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["prune.structure=channel", override])
    assert key in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_channel_run_has_identical_masks_and_exports_a_smaller_equal_model(
        digits_shards, tmp_path, capsys):
    from app_dist.cli import main as cli_main

    # The FLOPs budget: the schedule's densities are FLOPs fractions (the weights budget's
    # steps are the unstructured runs' and test_masks_are_nested_... checks its masks).
    settings = ("prune.structure=channel", "prune.budget=flops", "data.megabatches=2",
                "train.epochs=1")
    run_dir = tmp_path / "channel"
    result = run_trainer(digits_run_args(digits_shards, run_dir, *settings), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [round(r["target_density"], 3) for r in records] == [0.8, 0.366]
    for record in records:
        assert abs(record["flops_fraction"] - record["target_density"]) < 0.03
        assert record["density"] > record["flops_fraction"]
    assert "megabatches, final FLOPs 0.366" in result.stdout + result.stderr
    logged = re.findall(r"pruned to density ([0-9.]+), FLOPs ([0-9.]+)",
                        result.stdout + result.stderr)
    assert [(round(float(d), 3), round(float(f), 3)) for d, f in logged] == [
        (round(r["density"], 3), round(r["flops_fraction"], 3)) for r in records]
    final = checkpoint_folder(run_dir, 2)
    rank_masks = [torch.load(final / CheckpointFiles.rank(r), weights_only=True)["masks"]
                  for r in (0, 1)]
    assert all(torch.equal(rank_masks[0][n], rank_masks[1][n]) for n in rank_masks[0])

    # Resumed after megabatch 1 (its BatchNorm channel masks rebuilt from the saved weight
    # masks), the run ends where the uninterrupted one did.
    resumed = rewound_copy(run_dir, tmp_path / "resumed", megabatch=1)
    result = run_trainer(digits_run_args(digits_shards, resumed, *settings), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resum" in result.stdout + result.stderr
    assert read_metrics(resumed) == records
    for name, key in ((CheckpointFiles.ENGINE, "model"), (CheckpointFiles.STATE, "masks")):
        want, got = [torch.load(folder / name, weights_only=True)[key]
                     for folder in (final, checkpoint_folder(resumed, 2))]
        assert all(torch.equal(got[n], want[n]) for n in want), name

    out, onnx_path = tmp_path / "small.pt", tmp_path / "small.onnx"
    assert cli_main(["export", str(run_dir), "--out", str(out), "--onnx", str(onnx_path)]) == 0
    assert "parameters" in capsys.readouterr().out
    assert_export_equals_masked_model(out, final, digits_shards,
                                      torch.load(final / "engine.pt", weights_only=True)["model"])
    assert onnx_path.is_file()
    # The run report shows the export: parameters, file size, measured speed vs dense.
    from app_dist.results.report import _export_section

    summary = json.loads((run_dir / "export-summary.json").read_text())
    assert summary["parameters"] < summary["dense_parameters"]
    assert set(summary["latency_ms"]) == {"1", "256"}
    assert summary["input"] == [1, 8, 8]  # timed on digits' own size, which the run recorded
    section = "".join(_export_section(run_dir))
    assert "ms per batch of 256" in section and "file bytes" in section


def assert_export_equals_masked_model(exported: Path, final: Path, shards: Path,
                                      module_state: dict) -> None:
    """The channel export at `exported` is smaller than the digits CNN masked with the masks
    of checkpoint `final` and holding `module_state`, and computes what it computes."""
    from sklearn.datasets import load_digits

    from app_dist.data.manifest import Manifest

    small = load_channel_export(exported)
    architecture = {"name": "digits_cnn", "num_classes": Manifest.load(shards).num_classes,
                    "in_channels": 1, "stem": "cifar", "mean": [0.305], "std": [0.375]}
    masked, masks = channel_model_and_masks(architecture, size=8)
    masks.load_state_dict(torch.load(final / "state.pt", weights_only=True)["masks"])
    masked.load_state_dict(module_state)
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in masked.parameters())
    images = torch.tensor(load_digits().images[:256] / 16.0, dtype=torch.float32).unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(small(images), masked.eval()(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.distributed
def test_a_deepspeed_channel_run_keeps_pruned_channels_zero_in_every_copy_and_exports(
        digits_shards, tmp_path):
    """ZeRO-2 on 2 ranks under the deepspeed launcher: the FLOPs schedule is met, both ranks
    hold the same masks, the pruned weights are zero in the model, the fp32 master and the
    momentum (each rank's audit), and `app-dist export` reads DeepSpeed's checkpoint into the
    smaller model, equal to the masked one."""
    from app_dist.cli import main as cli_main
    from app_dist.engine.deepspeed_engine import saved_module_state

    run_dir = tmp_path / "channel-zero2"
    result = run_trainer(digits_run_args(
        digits_shards, run_dir, "prune.structure=channel", "prune.budget=flops",
        "data.megabatches=2", "train.epochs=1", "engine.kind=deepspeed", "engine.zero_stage=2"),
        nproc=2, launcher="deepspeed", timeout=400)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    records = read_metrics(run_dir)
    assert [round(r["target_density"], 3) for r in records] == [0.8, 0.366]
    assert all(abs(r["flops_fraction"] - r["target_density"]) < 0.03 for r in records)
    final = checkpoint_folder(run_dir, 2)
    audits = [torch.load(final / CheckpointFiles.rank(r), weights_only=True) for r in (0, 1)]
    masks = torch.load(final / CheckpointFiles.STATE, weights_only=True)["masks"]
    for audit in audits:
        assert all(torch.equal(audit["masks"][n], masks[n]) for n in masks)
        assert audit["pruned_residue"] == {"weights": 0.0, "master_weights": 0.0,
                                           "optimizer_state": 0.0}
    module_state = saved_module_state(final)
    assert any(not mask.all() for mask in masks.values())
    for name, mask in masks.items():
        assert not module_state[name][~mask.bool()].any(), name

    out = tmp_path / "small.pt"
    assert cli_main(["export", str(run_dir), "--out", str(out), "--no-latency"]) == 0
    assert_export_equals_masked_model(out, final, digits_shards, module_state)


def test_a_flops_budget_without_channel_structure_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"'prune\.budget' = 'flops'.*prune\.structure=channel"):
        load_config(None, ["prune.budget=flops"])
