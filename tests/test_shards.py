"""Shard writer, sources and manifest: round trips on real data (sklearn digits, a CIFAR-10
JPEG subset, the ImageNet sample) and synthetic CIFAR pickles, plus validation and CLI errors."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_dist.data.image_headers import image_header
from app_dist.data.manifest import (
    Manifest,
    ManifestError,
    shard_path,
    verify_shard,
)
from app_dist.data.prepare import shards as shards_mod
from app_dist.data.prepare.shards import main, write_shards
from app_dist.foundations.files import file_sha256
from tests.conftest import CIFAR_TAR, IMAGENET_SAMPLE

# The shared real-data folder sits next to the repository (never copied into it).
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a shard, in file order, with plain tarfile."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def read_split(directory: Path, manifest: Manifest, split: str) -> dict[str, dict[str, bytes]]:
    """key -> sample for a whole split, checking each shard holds its keys in order."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in manifest.splits[split].shards:
        samples = read_tar(shard_path(directory, shard))
        assert [k for k, _ in samples] == [
            f"{i:08d}" for i in range(shard.first_index, shard.first_index + shard.count)]
        out.update(samples)
    return out


def key_to_src(directory: Path, split: str) -> dict[str, str]:
    manifest = Manifest.load(directory)
    return {k: s["src"].decode() for k, s in read_split(directory, manifest, split).items()}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", None, str(out), 100, 0)
    return out


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/000[0-4].jpg and test/<class>/000[0-1].jpg from the real CIFAR-10 tar."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"{CIFAR_TAR} not available")
    root = tmp_path_factory.mktemp("cifar10-jpg")
    wanted = {f"train/{c}/000{i}.jpg" for c in CIFAR10_CLASSES for i in range(5)}
    wanted |= {f"test/{c}/000{i}.jpg" for c in CIFAR10_CLASSES for i in range(2)}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            if member.name in wanted:
                target = root / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    assert sum(1 for _ in root.rglob("*.jpg")) == 70
    return root


# ------------------------------------------------------------------------------ digits


def test_digits_round_trip_through_webdataset(digits_dir: Path) -> None:
    import webdataset as wds
    from sklearn.datasets import load_digits

    bunch = load_digits()
    manifest = Manifest.load(digits_dir)
    assert (manifest.image_format, manifest.channels, manifest.image_size) == ("png", 1, (8, 8))
    assert manifest.classes == [str(d) for d in range(10)] and manifest.num_classes == 10
    assert manifest.splits["test"].num_samples == 297  # round(0.165 * 1797)
    assert manifest.splits["train"].num_samples == 1500
    seen: list[int] = []
    for split in ("train", "test"):
        info = manifest.splits[split]
        assert [s.count for s in info.shards[:-1]] == [100] * (len(info.shards) - 1)
        for shard in info.shards:
            assert shard.sha256 == file_sha256(digits_dir / shard.name)
            dataset = wds.WebDataset([str(digits_dir / shard.name)], shardshuffle=False)
            samples = list(dataset)
            assert [s["__key__"] for s in samples] == [
                f"{i:08d}" for i in range(shard.first_index, shard.first_index + shard.count)]
            for sample in samples:
                src = sample["src"].decode()
                assert src.startswith("digits:")
                index = int(src.split(":")[1])
                seen.append(index)
                assert int(sample["cls"].decode()) == bunch.target[index]
                image = Image.open(io.BytesIO(sample["png"]))
                assert image.mode == "L"
                expected = [[round(v * 255 / 16) for v in row] for row in bunch.images[index]]
                assert np.array_equal(np.asarray(image), np.array(expected, dtype=np.uint8))
    assert sorted(seen) == list(range(1797))  # every sample exactly once across the splits


def test_permutation_is_seeded_and_limit_keeps_its_prefix(digits_dir: Path,
                                                          tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_shards("digits", None, str(a), 64, 0, limit=200, test_limit=50)
    write_shards("digits", None, str(b), 64, 0, limit=200, test_limit=50)
    write_shards("digits", None, str(c), 64, 1, limit=200, test_limit=50)
    ma, mb = Manifest.load(a), Manifest.load(b)
    # Same seed, same bytes: the fixed tar mtime makes shards reproducible.
    assert ma.to_dict() == mb.to_dict()
    assert key_to_src(a, "train") == key_to_src(b, "train")
    assert key_to_src(a, "train") != key_to_src(c, "train")
    assert key_to_src(a, "test") != key_to_src(c, "test")
    assert (ma.splits["train"].num_samples, ma.splits["test"].num_samples) == (200, 50)
    # --limit keeps the first N of the permuted order: a prefix of the unlimited shards.
    full = key_to_src(digits_dir, "train")
    assert key_to_src(a, "train") == {k: full[k] for k in sorted(full)[:200]}


# ------------------------------------------------------------------------------ CIFAR-10 JPEG


def test_real_cifar10_jpeg_subset_is_stored_byte_identical(cifar_subset: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = write_shards("imagefolder", str(cifar_subset), str(out), 16, 0)
    assert manifest == Manifest.load(out)
    assert manifest.classes == CIFAR10_CLASSES
    assert (manifest.image_format, manifest.channels, manifest.image_size) == ("jpg", 3, (32, 32))
    for split, count in (("train", 50), ("test", 20)):
        assert manifest.splits[split].num_samples == count
        # The documented order: key k is the source's k-th file after default_rng(seed).
        files = sorted((p.relative_to(cifar_subset).as_posix()
                        for p in (cifar_subset / split).rglob("*.jpg")),
                       key=lambda rel: (rel.split("/")[1], rel))
        perm = np.random.default_rng(0).permutation(len(files))
        samples = read_split(out, manifest, split)
        assert [s["src"].decode() for s in samples.values()] == [files[i] for i in perm]
        for sample in samples.values():
            src = sample["src"].decode()
            assert sample["jpg"] == (cifar_subset / src).read_bytes()
            assert int(sample["cls"]) == CIFAR10_CLASSES.index(src.split("/")[1])
    manifest.verify(out)


# ------------------------------------------------------------------------------ CIFAR pickles


def _batch(rng: np.random.Generator, n: int, label_key: bytes, classes: int) -> dict:
    return {b"batch_label": b"synthetic", label_key: [int(v) for v in rng.integers(0, classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * n}


def _dump(path: Path, obj: object, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _check_cifar_round_trip(out: Path, batches: dict[str, list[dict]], label_key: bytes,
                            kind: str, classes: list[str]) -> None:
    manifest = Manifest.load(out)
    manifest.verify(out)
    assert manifest.classes == classes
    assert (manifest.image_format, manifest.channels, manifest.image_size) == ("png", 3, (32, 32))
    for split, parts in batches.items():
        data = np.concatenate([p[b"data"] for p in parts])
        labels = [v for p in parts for v in p[label_key]]
        samples = read_split(out, manifest, split)
        assert len(samples) == len(labels)
        indices = []
        for sample in samples.values():
            prefix, sample_split, index = sample["src"].decode().split(":")
            assert (prefix, sample_split) == (kind, split)
            indices.append(int(index))
            assert int(sample["cls"]) == labels[int(index)]
            pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
            expected = data[int(index)].reshape(3, 32, 32).transpose(1, 2, 0)
            assert pixels.shape == (32, 32, 3) and np.array_equal(pixels, expected)
        assert sorted(indices) == list(range(len(labels)))


def test_synthetic_cifar10_batches_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    folder = tmp_path / "download" / "cifar-10-batches-py"  # torchvision's root layout
    folder.mkdir(parents=True)
    train = [_batch(rng, 3 + i, b"labels", 10) for i in range(5)]
    for i, batch in enumerate(train, start=1):
        _dump(folder / f"data_batch_{i}", batch, protocol=2)  # as the Python 2 originals
    test = [_batch(rng, 4, b"labels", 10)]
    _dump(folder / "test_batch", test[0], protocol=pickle.HIGHEST_PROTOCOL)
    _dump(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                    b"num_vis": 3072}, protocol=2)
    out = tmp_path / "shards"
    assert main(["cifar10", str(tmp_path / "download"), "--out", str(out),
                 "--samples-per-shard", "7"]) == 0
    _check_cifar_round_trip(out, {"train": train, "test": test}, b"labels", "cifar10",
                            CIFAR10_CLASSES)


def test_synthetic_cifar100_batches_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i:02d}" for i in range(100)]
    train, test = _batch(rng, 12, b"fine_labels", 100), _batch(rng, 5, b"fine_labels", 100)
    train[b"coarse_labels"] = [0] * 12
    _dump(folder / "train", train, protocol=2)
    _dump(folder / "test", test, protocol=2)
    _dump(folder / "meta", {b"fine_label_names": [n.encode() for n in names],
                            b"coarse_label_names": [b"c"] * 20}, protocol=2)
    out = tmp_path / "shards"
    write_shards("cifar100", str(folder), str(out), 5, 3)  # the folder itself works too
    _check_cifar_round_trip(out, {"train": [train], "test": [test]}, b"fine_labels",
                            "cifar100", names)


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    # A pickle naming any callable other than numpy's array rebuilders is not a batch.
    _dump(folder / "batches.meta", {b"label_names": os.getcwd}, protocol=2)
    assert main(["cifar10", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batches.meta" in err and "getcwd" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ image folders


def _png(value: int, mode: str = "RGB", size: tuple[int, int] = (4, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _make_folder(root: Path, classes: int = 3, per_class: int = 10) -> list[str]:
    files = []
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"class{c}" / f"{i:02d}.png").write_bytes(_png(10 * c + i))
            files.append(f"class{c}/{i:02d}.png")
    # Not classes: files next to the class folders and hidden folders.
    (root / "classes.tsv").write_text("x\n")
    (root / ".cache").mkdir()
    (root / ".cache" / "junk.png").write_bytes(_png(1))
    return files


def test_imagefolder_without_test_folder_carves_test_split(tmp_path: Path) -> None:
    files = _make_folder(tmp_path / "src")
    for fraction, expected_test in ((0.2, 6), (None, 3)):
        out = tmp_path / f"out-{fraction}"
        manifest = write_shards("imagefolder", str(tmp_path / "src"), str(out), 4, 0,
                                test_fraction=fraction)
        assert manifest.classes == ["class0", "class1", "class2"]
        assert (manifest.image_format, manifest.channels, manifest.image_size) == (
            "png", 3, (6, 4))
        train, test = key_to_src(out, "train"), key_to_src(out, "test")
        assert len(test) == expected_test and len(train) == 30 - expected_test
        assert sorted([*train.values(), *test.values()]) == sorted(files)


def test_imagefolder_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "src"
    _make_folder(root)
    (root / "class3").mkdir()
    assert main(["imagefolder", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "class3" in err

    (root / "class3").rmdir()
    (root / "class1" / "extra.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    assert main(["imagefolder", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "mixed image formats" in err and "class1/extra.jpg" in err and err.count("\n") == 1

    (root / "class1" / "extra.jpg").unlink()
    (root / "class1" / "00.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["imagefolder", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "class1/00.png" in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]  # no temps


def test_real_imagenet_sample(tmp_path: Path) -> None:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"{IMAGENET_SAMPLE} not available")
    out = tmp_path / "shards"
    manifest = write_shards("imagefolder", str(IMAGENET_SAMPLE), str(out), 64, 0)
    wnids = sorted(p.name for p in IMAGENET_SAMPLE.iterdir() if p.is_dir())
    assert len(wnids) == 203 and manifest.classes == wnids  # the .tsv files are not classes
    assert (manifest.image_format, manifest.channels, manifest.image_size) == ("jpg", 3, None)
    assert manifest.splits["test"].num_samples == 20  # round(0.1 * 203)
    assert manifest.splits["train"].num_samples == 183
    seen = []
    for split in ("train", "test"):
        for sample in read_split(out, manifest, split).values():
            src = sample["src"].decode()
            seen.append(src)
            assert sample["jpg"] == (IMAGENET_SAMPLE / src).read_bytes()
            assert manifest.classes[int(sample["cls"])] == src.split("/")[0]
    assert len(set(seen)) == 203


# ------------------------------------------------------------------------------ manifest


def test_tampered_shard_fails_verification(digits_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    out.mkdir()
    for path in digits_dir.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    manifest = Manifest.load(out)
    shard = manifest.splits["train"].shards[2]
    verify_shard(out, shard)
    data = bytearray((out / shard.name).read_bytes())
    data[700] ^= 0x01
    (out / shard.name).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=shard.name):
        verify_shard(out, shard)
    with pytest.raises(ManifestError, match=shard.name):
        manifest.verify(out)
    verify_shard(out, manifest.splits["train"].shards[1])  # the others are still fine


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("num_classes"), "missing key 'num_classes'"),
    (lambda d: d["splits"]["train"]["shards"][0].pop("sha256"),
     r"missing key 'splits\.train\.shards\[0\]\.sha256'"),
    (lambda d: d["splits"].pop("test"), "missing key 'splits.test'"),
    (lambda d: d.update(format="app-dist-shards/2"), "format is 'app-dist-shards/2'"),
    (lambda d: d["splits"]["test"].update(num_samples=1), "add up to 297"),
    (lambda d: d.update(channels=True), "'channels' has the wrong type"),
    (lambda d: d["splits"]["train"]["shards"][1].update(first_index=5), "expected 100"),
    (lambda d: d["splits"]["train"]["shards"][0].update(name="../x.tar"), "expected 'train"),
])
def test_manifest_validation_names_file_and_problem(digits_dir: Path, tmp_path: Path,
                                                    edit, message: str) -> None:
    data = json.loads((digits_dir / "manifest.json").read_text())
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "manifest.json") + ": ")
    assert "\n" not in str(info.value)


def test_manifest_missing_shard_file_and_not_json(digits_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text((digits_dir / "manifest.json").read_text())
    with pytest.raises(ManifestError, match="train-000000.tar is missing"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match="no such file"):
        Manifest.load(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ CLI


def test_cli_missing_folder_exits_2_with_one_line(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-folder"
    assert main(["imagefolder", str(missing), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert str(missing) in captured.err
    assert main(["digits", "--out", str(tmp_path / "o"), "--limit", "0"]) == 2
    assert capsys.readouterr().err == "error: --limit must be >= 1, got 0\n"
    assert main(["digits", "--out", str(tmp_path / "o"), "--workers", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--workers" in err and err.count("\n") == 1


def test_refuses_to_overwrite_existing_manifest(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["digits", "--out", str(out), "--limit", "50", "--test-limit", "10",
            "--samples-per-shard", "20"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "60 samples" in summary and "4 shards" in summary
    (out / "notes.txt").write_text("keep me")
    before = (out / "manifest.json").read_bytes()
    assert main(args + ["--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds manifest.json" in err and "--overwrite" in err
    assert (out / "manifest.json").read_bytes() == before
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert Manifest.load(out).seed == 1
    assert (out / "notes.txt").read_text() == "keep me"  # nothing else is touched


def test_workers_give_identical_shards(tmp_path: Path) -> None:
    one = write_shards("digits", None, str(tmp_path / "a"), 50, 0, limit=300, test_limit=60)
    two = write_shards("digits", None, str(tmp_path / "b"), 50, 0, limit=300, test_limit=60,
                       workers=3)
    assert one.to_dict() == two.to_dict()


# ------------------------------------------------------------------------------ helpers


def test_tar_writer_matches_tarfile() -> None:
    members = [("00000000.cls", b"3"), ("00000000.jpg", bytes(range(256)) * 5),
               ("00000000.src", b"x" * 512), ("00000001.cls", b"")]
    ours = io.BytesIO()
    writer = shards_mod._TarOut(ours)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), shards_mod._MTIME, 0o444
            tar.addfile(info, io.BytesIO(data))
    assert ours.getvalue() == reference.getvalue()


@pytest.mark.parametrize("mode, fmt, kwargs, channels", [
    ("RGB", "JPEG", {}, 3),
    ("RGB", "JPEG", {"progressive": True}, 3),
    ("L", "JPEG", {}, 1),
    ("CMYK", "JPEG", {}, 3),
    ("RGB", "PNG", {}, 3),
    ("RGBA", "PNG", {}, 3),
    ("L", "PNG", {}, 1),
    ("P", "PNG", {}, 3),
])
def test_image_header_agrees_with_pil(mode: str, fmt: str, kwargs: dict, channels: int) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (37, 19)).save(buffer, format=fmt, **kwargs)
    assert image_header(buffer.getvalue()) == (19, 37, channels)


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3), ("RGB", 1), ("L", 3),
                                                ("RGBA", 3), ("P", 3), ("I;16", 1)])
def test_png_decoding_gives_torchvisions_pixels_whichever_decoder_reads_it(mode, channels):
    """augment.decode reads an 8-bit PNG already in the wanted mode with Pillow (L, RGB) and
    hands every other one (converted, 16-bit, palette, alpha) and every JPEG to torchvision:
    either way the pixels are torchvision's."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    from app_dist.data.augment import decode

    pixels = np.random.default_rng(0).integers(0, 256, (9, 7, 4), dtype=np.uint8)
    image = {"L": lambda: Image.fromarray(pixels[..., 0]),
             "RGB": lambda: Image.fromarray(pixels[..., :3]),
             "RGBA": lambda: Image.fromarray(pixels),
             "P": lambda: Image.fromarray(pixels[..., :3]).quantize(16),
             "I;16": lambda: Image.fromarray(pixels[..., 0].astype(np.uint16) * 200)}[mode]()
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    expected = decode_image(torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8),
                            mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
    decoded = decode(encoded.getvalue(), channels)
    assert decoded.dtype == expected.dtype and decoded.shape == (channels, 9, 7)
    assert torch.equal(decoded, expected)
