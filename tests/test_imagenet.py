"""The ImageNet path on real ImageNet JPEGs (../shared/data/imagenet-sample-restricted: one
full-resolution image for each of the 203 classes in the classic Restricted ImageNet ranges,
which hold 33 of the 69 classes of the balanced variant) and on small image trees laid out like
ImageNet."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from app_dist.config import load_config
from app_dist.data.manifest import Manifest
from app_dist.data.prepare.imagenet import (
    LABEL_MAPS,
    RESTRICTED_IMAGENET_BALANCED,
    RESTRICTED_IMAGENET_CLASSIC,
    imagenet_index,
)
from app_dist.data.prepare.shards import main as shards_main
from app_dist.data.prepare.shards import write_shards
from app_dist.data.stream import MegabatchStream

from .conftest import IMAGENET_SAMPLE, REPO, free_port, read_metrics, run_trainer

pytestmark = pytest.mark.skipif(not IMAGENET_SAMPLE.is_dir(),
                                reason=f"no ImageNet sample at {IMAGENET_SAMPLE}")
CLASS_TABLE = REPO / "app_dist" / "data" / "prepare" / "imagenet_classes.tsv"


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


def every_sample(shards: Path) -> list[tuple[int, str]]:
    return [sample for split in read_samples(shards).values() for sample in split]


@pytest.fixture(scope="module")
def balanced_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("balanced") / "shards"
    write_shards("imagefolder", str(IMAGENET_SAMPLE), str(out), samples_per_shard=64, seed=0,
                 label_map="restricted_imagenet")
    return out


@pytest.fixture(scope="module")
def classic_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("classic") / "shards"
    write_shards("imagefolder", str(IMAGENET_SAMPLE), str(out), samples_per_shard=64, seed=0,
                 label_map="restricted_imagenet_classic")
    return out


# The balanced super-classes the sample has images of, and how many: only the classes where
# the classic ranges (which the sample covers) and the balanced ranges overlap. It has none
# of bird, lizard, spider, big_cat, butterfly, fruit and fungus.
SAMPLE_BALANCED_COUNTS = {"turtle": 5, "crab": 4, "dog": 5, "cat": 5, "beetle": 5,
                          "monkey": 4, "fish": 5}


def test_balanced_shards_hold_exactly_the_sample_images_in_balanced_ranges(balanced_shards):
    """The default map is the paper's: 14 super-classes, labelled in the robustness library's
    order; of the sample's 203 images exactly those of the 33 balanced classes are kept."""
    manifest = Manifest.load(balanced_shards)
    assert manifest.classes == ["bird", "turtle", "lizard", "spider", "crab", "dog", "cat",
                                "big_cat", "beetle", "butterfly", "monkey", "fish", "fruit",
                                "fungus"]
    assert manifest.num_classes == 14 and manifest.channels == 3
    rows = read_table(IMAGENET_SAMPLE / "classes.tsv")
    in_balanced = {row["wnid"]: int(row["imagenet_index"]) for row in rows
                   if any(first <= int(row["imagenet_index"]) <= last
                          for _, first, last in RESTRICTED_IMAGENET_BALANCED.ranges)}
    seen = every_sample(balanced_shards)
    assert sorted(src.split("/")[0] for _, src in seen) == sorted(in_balanced)
    for label, src in seen:
        _, first, last = RESTRICTED_IMAGENET_BALANCED.ranges[label]
        assert first <= in_balanced[src.split("/")[0]] <= last, src
    counts = {manifest.classes[label]: 0 for label, _ in seen}
    for label, _ in seen:
        counts[manifest.classes[label]] += 1
    assert counts == SAMPLE_BALANCED_COUNTS


def test_the_classic_variant_stays_selectable(classic_shards):
    expected = {row["wnid"]: int(row["superclass_index"])
                for row in read_table(IMAGENET_SAMPLE / "classes.tsv")}
    seen = every_sample(classic_shards)
    assert len(seen) == 203 and len({src for _, src in seen}) == 203
    for label, src in seen:
        assert label == expected[src.split("/")[0]], src
    manifest = Manifest.load(classic_shards)
    assert manifest.classes == RESTRICTED_IMAGENET_CLASSIC.classes
    assert manifest.classes[:2] == ["dog", "cat"] and manifest.image_format == "jpg"
    assert manifest.channels == 3  # one grayscale JPEG among them: readers convert to RGB


# First and last ImageNet class of every balanced range, by name: pins each inclusive range
# (an off-by-one moves a name) independently of the range table.
BALANCED_ENDS = {
    "bird": ("brambling", "indigo_bunting"), "turtle": ("loggerhead", "box_turtle"),
    "lizard": ("agama", "green_lizard"), "spider": ("black_and_gold_garden_spider", "tarantula"),
    "crab": ("Dungeness_crab", "American_lobster"), "dog": ("Tibetan_terrier", "Lhasa"),
    "cat": ("tabby", "Egyptian_cat"), "big_cat": ("cougar", "jaguar"),
    "beetle": ("ground_beetle", "rhinoceros_beetle"), "butterfly": ("ringlet", "lycaenid"),
    "monkey": ("patas", "langur"), "fish": ("anemone_fish", "puffer"),
    "fruit": ("Granny_Smith", "fig"), "fungus": ("agaric", "hen-of-the-woods"),
}


def test_superclass_ranges_agree_with_the_public_class_table():
    table = read_table(CLASS_TABLE)
    assert len(table) == 1000 and len(imagenet_index()) == 1000
    # classic: the table's published super-class column, class by class
    for row in table:
        label = RESTRICTED_IMAGENET_CLASSIC.superclass_of(int(row["imagenet_index"]))
        name = RESTRICTED_IMAGENET_CLASSIC.classes[label] if label is not None else ""
        assert name == row["restricted_superclass"], row
    # balanced: 69 classes in 14 disjoint ranges, 5 each but monkeys 4, ends by name
    balanced = RESTRICTED_IMAGENET_BALANCED
    members = [int(row["imagenet_index"]) for row in table
               if balanced.superclass_of(int(row["imagenet_index"])) is not None]
    assert len(members) == 69
    assert [last - first + 1 for _, first, last in balanced.ranges] == [5] * 10 + [4] + [5] * 3
    ends = {name: (table[first]["name"], table[last]["name"])
            for name, first, last in balanced.ranges}
    assert ends == BALANCED_ENDS
    assert set(LABEL_MAPS) == {"restricted_imagenet", "restricted_imagenet_classic"}
    assert LABEL_MAPS["restricted_imagenet"] is balanced  # the paper's is the default name


def copy_image(source_wnid: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(next((IMAGENET_SAMPLE / source_wnid).iterdir()), target)


def test_classes_outside_the_ranges_are_dropped_in_an_imagenet_train_val_layout(tmp_path):
    root = tmp_path / "imagenet"
    # Folder order would make the loggerhead folder label 2; its wnid makes it turtle (1).
    # Bullfrog is a classic super-class (frog) but in no balanced range; tench in neither.
    for split, names in (("train", ["a", "b"]), ("val", ["c"])):
        for name in names:
            for wnid in ("n01440764", "n01641577", "n01664065"):  # tench, bullfrog, loggerhead
                copy_image("n01664065", root / split / wnid / f"{name}.JPEG")
    out = tmp_path / "shards"
    manifest = write_shards("imagefolder", str(root), str(out), samples_per_shard=8, seed=0,
                            label_map="restricted_imagenet")
    assert manifest.splits["train"].num_samples == 2 and manifest.splits["test"].num_samples == 1
    samples = every_sample(out)
    assert {label for label, _ in samples} == {1}
    assert all("n01664065" in src for _, src in samples)


def test_a_folder_that_is_not_a_wnid_is_refused_in_one_line(tmp_path, capsys):
    for name in "abcdefghij":  # enough for the default 10% test carve
        copy_image("n01641577", tmp_path / "images" / "frogs" / f"{name}.JPEG")
    code = shards_main(["imagefolder", str(tmp_path / "images"), "--out",
                        str(tmp_path / "shards"), "--label-map", "restricted_imagenet"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert "class folder 'frogs' is not an ImageNet-1k wnid" in error


def test_few_shot_keeps_n_seeded_training_images_per_class(tmp_path, classic_shards):
    shards = [tmp_path / name for name in ("a", "b")]
    for out in shards:
        write_shards("imagefolder", str(IMAGENET_SAMPLE), str(out), samples_per_shard=64, seed=0,
                     label_map="restricted_imagenet_classic", shots_per_class=2)
    first, second = (read_samples(out) for out in shards)
    assert first == second  # seeded
    labels = [label for label, _ in first["train"]]
    assert sorted(labels) == sorted(list(range(9)) * 2)
    assert first["test"] == read_samples(classic_shards)["test"]  # test split stays whole
    code = shards_main(["imagefolder", str(IMAGENET_SAMPLE), "--out", str(tmp_path / "c"),
                        "--label-map", "restricted_imagenet_classic", "--shots-per-class", "540"])
    assert code == 2


def test_the_sample_cannot_make_a_balanced_few_shot_set(tmp_path, capsys):
    """The sample has no bird images at all: the writer says so instead of writing a few-shot
    set that silently lacks 7 of the 14 super-classes."""
    code = shards_main(["imagefolder", str(IMAGENET_SAMPLE), "--out", str(tmp_path / "shards"),
                        "--label-map", "restricted_imagenet", "--shots-per-class", "1"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert "class 'bird' has only 0 training images" in error


def balanced_tree(root: Path, train_per_class: int) -> None:
    """An ImageNet train/ + val/ layout with every one of the 69 balanced classes (plus one
    class outside the ranges), tiny identical JPEGs: enough to count and label, not to learn."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    by_index = {index: wnid for wnid, index in imagenet_index().items()}
    indices = [i for _, first, last in RESTRICTED_IMAGENET_BALANCED.ranges
               for i in range(first, last + 1)] + [0]
    for index in indices:
        for split, count in (("train", train_per_class), ("val", 1)):
            folder = root / split / by_index[index]
            folder.mkdir(parents=True)
            for n in range(count):
                (folder / f"{by_index[index]}_{n}.JPEG").write_bytes(jpeg)


def test_the_few_shot_setting_is_balanced_seeded_and_cut_into_equal_megabatches(tmp_path):
    """The paper's few-shot setting scaled down: 540 shots x 14 super-classes in shards of 63
    give T = 10 megabatches of 756; here 10 shots in shards of 7 give T = 10 megabatches of
    14 (14 x 10 / 7 = 20 shards, 2 per megabatch)."""
    balanced_tree(tmp_path / "imagenet", train_per_class=3)  # monkeys: 4 x 3 = 12 >= 10
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        outs[name] = tmp_path / name
        write_shards("imagefolder", str(tmp_path / "imagenet"), str(outs[name]),
                     samples_per_shard=7, seed=seed, label_map="restricted_imagenet",
                     shots_per_class=10)
    first = read_samples(outs["a"])
    assert first == read_samples(outs["b"])  # seeded
    assert first["train"] != read_samples(outs["c"])["train"]
    labels = [label for label, _ in first["train"]]
    assert sorted(labels) == sorted(list(range(14)) * 10)  # balanced across super-classes
    index = imagenet_index()
    for label, src in first["train"] + first["test"]:
        assert RESTRICTED_IMAGENET_BALANCED.superclass_of(index[src.split("/")[1]]) == label
    assert len(first["test"]) == 69  # val/ stays whole, the class outside the ranges dropped
    manifest = Manifest.load(outs["a"])
    stream = MegabatchStream(manifest, 10, 0.1, "none", 2, 1000, seed=1)
    sizes = [len(stream.train_selection(t)) + len(stream.val_selection(t)) for t in range(1, 11)]
    assert sizes == [14] * 10


def test_imagenet_configs_hold_the_paper_settings():
    imagenet = load_config(REPO / "configs/imagenet.yaml")
    assert (imagenet.model.name, imagenet.model.stem) == ("resnet50", "imagenet")
    assert imagenet.data.augment == "imagenet" and imagenet.data.image_size == 224
    assert imagenet.engine.kind == "deepspeed"
    assert imagenet.model.mean == [0.485, 0.456, 0.406]
    for name, megabatches in (("restricted_imagenet", 3), ("restricted_imagenet_fewshot", 10)):
        config = load_config(REPO / f"configs/{name}.yaml")
        assert config.data.megabatches == megabatches
        # 32x32, as the authors ran Restricted ImageNet; the small-image stem for it
        assert (config.data.augment, config.data.image_size) == ("imagenet", 32)
        assert (config.model.name, config.model.stem) == ("resnet50", "cifar")
        text = (REPO / f"configs/{name}.yaml").read_text()
        assert "--label-map restricted_imagenet " in text  # the balanced map
    # The few-shot shards the config's own command writes: 540 x 14 = 7,560 images in shards
    # of 63 cut evenly into T = 10 megabatches of 756.
    command = (REPO / "configs/restricted_imagenet_fewshot.yaml").read_text()
    shots = int(re.search(r"--shots-per-class (\d+)", command).group(1))
    per_shard = int(re.search(r"--samples-per-shard (\d+)", command).group(1))
    train = shots * len(RESTRICTED_IMAGENET_BALANCED.classes)
    assert (shots, train) == (540, 7560)
    assert train % per_shard == 0 and (train // per_shard) % 10 == 0
    assert train // 10 == 756


@pytest.mark.slow
@pytest.mark.deepspeed
def test_resnet50_trains_at_224_on_real_jpegs_through_the_deepspeed_launcher(tmp_path):
    """`deepspeed app_dist/train.py --config configs/imagenet.yaml`, shrunk to a few steps:
    JPEG bytes decoded in a DataLoader worker, RandomResizedCrop(224) + flip, ResNet-50 with
    the ImageNet stem, SNIP pruning, a DeepSpeed checkpoint."""
    shards = tmp_path / "shards"
    write_shards("imagefolder", str(IMAGENET_SAMPLE), str(shards), samples_per_shard=4, seed=0,
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


@pytest.mark.slow
def test_the_paper_restricted_imagenet_config_trains_at_32x32_on_real_jpegs(tmp_path,
                                                                            balanced_shards):
    """configs/restricted_imagenet.yaml shrunk to a few steps on the sample's balanced shards
    (DDP: the DeepSpeed launcher path is the test above): full-size JPEGs to 32x32 resized
    crops, ResNet-50 with the CIFAR stem, SNIP pruning."""
    run_dir = tmp_path / "run"
    result = run_trainer(["--config", "configs/restricted_imagenet.yaml",
                          f"data.shards={balanced_shards}", f"run.dir={run_dir}",
                          "engine.kind=ddp", "data.megabatches=1", "train.epochs=1",
                          "train.batch_size=4", "data.num_workers=1", "data.eval_batch_size=8",
                          "log.progress=false"])
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    (record,) = read_metrics(run_dir)
    assert record["density"] == pytest.approx(0.8**4.5, abs=1e-3)  # T = 1: the final level
    assert record["train_samples"] + record["val_samples"] == \
        Manifest.load(balanced_shards).splits["train"].num_samples
