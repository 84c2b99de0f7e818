"""The ImageNet path on real ImageNet JPEGs (../shared/data/imagenet-sample-restricted: one
full-resolution image for each of the 203 classes in the Restricted ImageNet ranges)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from app_dist.config import load_config
from app_dist.data.manifest import Manifest
from app_dist.data.prepare.imagenet import (
    RESTRICTED_IMAGENET,
    imagenet_index,
    restricted_imagenet_class,
)
from app_dist.data.prepare.shards import main as shards_main
from app_dist.data.prepare.shards import write_shards

from .conftest import REPO, free_port, read_metrics

SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample-restricted"
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"no ImageNet sample at {SAMPLE}")


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def read_samples(shards: Path) -> dict[str, list[tuple[int, str]]]:
    """split -> [(label, src)] of every sample in the shards, read from the tar files."""
    manifest = Manifest.load(shards)
    samples: dict[str, list[tuple[int, str]]] = {}
    for split, info in manifest.splits.items():
        found = samples.setdefault(split, [])
        for shard in info.shards:
            with tarfile.open(shards / shard.name) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name in sorted(members):
                if name.endswith(".cls"):
                    key = name[:-4]
                    found.append((int(members[name]), members[f"{key}.src"].decode()))
    return samples


@pytest.fixture(scope="module")
def restricted_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("restricted") / "shards"
    write_shards("imagefolder", str(SAMPLE), str(out), samples_per_shard=64, seed=0,
                 label_map="restricted_imagenet")
    return out


def test_every_image_gets_the_superclass_its_wnid_says(restricted_shards):
    expected = {row["wnid"]: int(row["superclass_index"])
                for row in read_table(SAMPLE / "classes.tsv")}
    samples = read_samples(restricted_shards)
    seen = [(label, src) for split in samples.values() for label, src in split]
    assert len(seen) == 203 and len({src for _, src in seen}) == 203
    for label, src in seen:
        assert label == expected[src.split("/")[0]], src
    manifest = Manifest.load(restricted_shards)
    assert manifest.classes == [name for name, _, _ in RESTRICTED_IMAGENET]
    assert manifest.classes[:2] == ["dog", "cat"] and manifest.image_format == "jpg"
    assert manifest.channels == 3  # one grayscale JPEG among them: readers convert to RGB


def test_superclass_ranges_agree_with_the_public_class_table():
    table = read_table(REPO / "app_dist" / "data" / "prepare" / "imagenet_classes.tsv")
    assert len(table) == 1000 and len(imagenet_index()) == 1000
    names = [name for name, _, _ in RESTRICTED_IMAGENET]
    for row in table:
        label = restricted_imagenet_class(int(row["imagenet_index"]))
        assert (names[label] if label is not None else "") == row["restricted_superclass"], row


def copy_image(source_wnid: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(next((SAMPLE / source_wnid).iterdir()), target)


def test_classes_outside_the_ranges_are_dropped_in_an_imagenet_train_val_layout(tmp_path):
    root = tmp_path / "imagenet"
    # Folder order would make the frog folder label 1; its wnid makes it frog (2).
    for split, names in (("train", ["a", "b"]), ("val", ["c"])):
        for name in names:
            copy_image("n01641577", root / split / "n01641577" / f"{name}.JPEG")  # bullfrog
            copy_image("n01641577", root / split / "n01440764" / f"{name}.JPEG")  # tench
    out = tmp_path / "shards"
    manifest = write_shards("imagefolder", str(root), str(out), samples_per_shard=8, seed=0,
                            label_map="restricted_imagenet")
    assert manifest.splits["train"].num_samples == 2 and manifest.splits["test"].num_samples == 1
    samples = read_samples(out)
    assert {label for split in samples.values() for label, _ in split} == {2}
    assert all("n01641577" in src for split in samples.values() for _, src in split)


def test_a_folder_that_is_not_a_wnid_is_refused_in_one_line(tmp_path, capsys):
    for name in "abcdefghij":  # enough for the default 10% test carve
        copy_image("n01641577", tmp_path / "images" / "frogs" / f"{name}.JPEG")
    code = shards_main(["imagefolder", str(tmp_path / "images"), "--out",
                        str(tmp_path / "shards"), "--label-map", "restricted_imagenet"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert "class folder 'frogs' is not an ImageNet-1k wnid" in error


def test_few_shot_keeps_n_seeded_training_images_per_class(tmp_path, restricted_shards):
    shards = [tmp_path / name for name in ("a", "b")]
    for out in shards:
        write_shards("imagefolder", str(SAMPLE), str(out), samples_per_shard=64, seed=0,
                     label_map="restricted_imagenet", shots_per_class=2)
    first, second = (read_samples(out) for out in shards)
    assert first == second  # seeded
    labels = [label for label, _ in first["train"]]
    assert sorted(labels) == sorted(list(range(9)) * 2)
    assert first["test"] == read_samples(restricted_shards)["test"]  # test split stays whole
    code = shards_main(["imagefolder", str(SAMPLE), "--out", str(tmp_path / "c"),
                        "--label-map", "restricted_imagenet", "--shots-per-class", "540"])
    assert code == 2


def test_imagenet_configs_hold_the_paper_settings():
    imagenet = load_config(REPO / "configs/imagenet.yaml")
    assert (imagenet.model.name, imagenet.model.stem) == ("resnet50", "imagenet")
    assert imagenet.data.augment == "imagenet" and imagenet.data.image_size == 224
    assert imagenet.engine.kind == "deepspeed"
    assert imagenet.model.mean == [0.485, 0.456, 0.406]
    assert load_config(REPO / "configs/restricted_imagenet.yaml").data.megabatches == 3
    fewshot = load_config(REPO / "configs/restricted_imagenet_fewshot.yaml")
    assert fewshot.data.megabatches == 10
    assert "--shots-per-class 540" in (REPO / "configs/restricted_imagenet_fewshot.yaml"
                                       ).read_text()


@pytest.mark.slow
@pytest.mark.deepspeed
def test_resnet50_trains_at_224_on_real_jpegs_through_the_deepspeed_launcher(tmp_path):
    """`deepspeed app_dist/train.py --config configs/imagenet.yaml`, shrunk to a few steps:
    JPEG bytes decoded in a DataLoader worker, RandomResizedCrop(224) + flip, ResNet-50 with
    the ImageNet stem, SNIP pruning, a DeepSpeed checkpoint."""
    shards = tmp_path / "shards"
    write_shards("imagefolder", str(SAMPLE), str(shards), samples_per_shard=4, seed=0,
                 limit=10, test_limit=4, label_map="restricted_imagenet")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port",
               str(free_port()), str(REPO / "app_dist/train.py"),
               "--config", str(REPO / "configs/imagenet.yaml"), f"data.shards={shards}",
               f"run.dir={run_dir}", "data.megabatches=1", "train.epochs=1",
               "train.batch_size=4", "data.num_workers=1", "data.eval_batch_size=4",
               "log.progress=false"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    (record,) = read_metrics(run_dir)
    assert record["density"] == pytest.approx(0.8**4.5, abs=1e-3)
    assert record["train_samples"] == 9 and record["val_samples"] == 1
    assert record["prunable_parameters"] > 23_000_000  # ResNet-50's convolutions
    engine_files = run_dir / "checkpoints" / "megabatch-0001" / "deepspeed" / "engine"
    assert (engine_files / "mp_rank_00_model_states.pt").is_file()
