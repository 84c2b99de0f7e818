"""`app-dist export`: the sparse file shrinks with the density, and load_exported gives back a
plain dense nn.Module whose outputs equal the masked model's exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from app_dist.cli import main as cli_main
from app_dist.data.manifest import Manifest
from app_dist.data.reader import StreamReader
from app_dist.data.source import LocalShards
from app_dist.data.stream import MegabatchStream
from app_dist.foundations.distributed import Platform
from app_dist.foundations.run_layout import CheckpointFiles
from app_dist.models.registry import build_model
from app_dist.models.sparse_file import (
    ExportError,
    dense_state,
    load_exported,
    pack_mask,
    sparse_payload,
    unpack_mask,
)
from app_dist.pruning.masks import attach_masks
from app_dist.results.export import export_run

from .conftest import checkpoint_folder


def masked_model_from_checkpoint(folder: Path, manifest: Manifest) -> nn.Module:
    """The model exactly as training left it: masked layers, weights from engine.pt."""
    model = build_model("digits_cnn", manifest.num_classes, in_channels=1, mean=[0.305],
                        std=[0.375])
    attach_masks(model)
    model.load_state_dict(torch.load(folder / "engine.pt", weights_only=True)["model"])
    return model.eval()


def test_mask_bits_round_trip_for_any_length():
    generator = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (3, 5, 3, 3)]:
        mask = torch.rand(shape, generator=generator) < 0.4
        bits = pack_mask(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
        assert torch.equal(unpack_mask(bits, list(shape)), mask)


def test_payload_folds_masks_and_keeps_nearly_dense_weights_plain():
    model = build_model("digits_cnn", 10, in_channels=1, mean=[0.3], std=[0.4])
    masks = attach_masks(model)
    names = list(masks)
    masks[names[0]].zero_()  # everything pruned
    masks[names[1]].copy_(torch.rand(masks[names[1]].shape) < 0.3)
    with torch.no_grad():
        model.get_parameter(names[1]).add_(1.0)  # non-zero everywhere, pruned positions too
    dense, sparse = sparse_payload(model.state_dict(), {n: m.bool() for n, m in masks.items()})
    assert not any(name.endswith("weight_mask") for name in [*dense, *sparse])
    assert set(sparse) == {names[0], names[1]} and names[2] in dense  # all-ones: plain
    assert sparse[names[0]]["values"].numel() == 0
    restored = dense_state(dense, sparse)
    weight = model.get_parameter(names[1]).detach()
    assert torch.equal(restored[names[1]], weight * masks[names[1]])
    assert torch.count_nonzero(restored[names[0]]) == 0


@pytest.mark.slow
def test_export_is_small_and_reloads_as_a_plain_model_with_identical_outputs(finished_run,
                                                                             digits_shards,
                                                                             tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert cli_main(["export", str(finished_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "density 0.366" in printed

    final = checkpoint_folder(finished_run, 2)
    dense_bytes = len(_saved({k: v for k, v in torch.load(final / "engine.pt",
                                                          weights_only=True)["model"].items()
                              if not k.endswith("weight_mask")}))
    assert out.stat().st_size <= 0.45 * dense_bytes

    plain = load_exported(out)
    assert not any(name.endswith("weight_mask") for name, _ in plain.named_buffers())
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is nn.Conv2d for m in convs)  # not the masked subclass
    assert not plain.training

    manifest = Manifest.load(digits_shards)
    masked = masked_model_from_checkpoint(final, manifest)
    stream = MegabatchStream(manifest, 2, 0.1, "full", 2, 100, seed=1)
    platform = Platform(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    from app_dist.config import DataSettings

    reader = StreamReader(LocalShards(digits_shards), manifest, stream,
                          DataSettings(augment="none", num_workers=0), 64, platform, seed=1)
    compared = 0
    with torch.no_grad():
        for images, _ in reader.evaluation(stream.test_selection()):
            assert torch.equal(plain(images), masked(images))
            compared += len(images)
    assert compared == manifest.splits["test"].num_samples
    state = torch.load(final / "state.pt", weights_only=True)
    kept = sum(int(m.sum()) for m in state["masks"].values())
    nonzero = sum(int(torch.count_nonzero(m.weight)) for m in convs)
    assert nonzero <= kept


def _saved(value) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.slow
def test_export_skips_a_damaged_newest_checkpoint(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    newest = checkpoint_folder(copy, 2) / CheckpointFiles.ENGINE
    newest.write_bytes(newest.read_bytes()[:100])
    exported = export_run(copy)
    assert exported.path == copy / "model-sparse.pt"
    source = torch.load(exported.path, weights_only=True)["source"]
    assert source["checkpoint"] == "megabatch-0001"
    assert source["density"] == pytest.approx(0.8, abs=1e-4)


def test_export_errors_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "no complete megabatch checkpoint" in error
    assert len(error.splitlines()) == 1
    assert cli_main(["export", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pt"
    torch.save({"format": "something else"}, bogus)
    with pytest.raises(ExportError, match="not an app-dist sparse export"):
        load_exported(bogus)
    (tmp_path / "text.pt").write_text(json.dumps({"a": 1}))
    with pytest.raises(ExportError, match="cannot load"):
        load_exported(tmp_path / "text.pt")
