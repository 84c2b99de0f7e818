"""Where shards come from: an image folder, torchvision's CIFAR-10/100 python batches, or
scikit-learn's bundled digits.

Every source becomes a SourceData: class names plus, per split ("train", "test"), a list of
lazy Records whose `encoded()` gives the image bytes to store (image files byte for byte, raw
pixel arrays as PNG). Nothing is read or encoded until the shard writer asks for a record, so
listing 60k files costs a directory scan, not a decode.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app_dist.foundations.errors import DataError
from app_dist.foundations.seeding import numpy_rng

SOURCE_KINDS = ("imagefolder", "cifar10", "cifar100", "digits")
# Sources without their own test split carve one; digits' 0.165 leaves ~297 of 1797 for test.
DEFAULT_TEST_FRACTION = {"imagefolder": 0.1, "digits": 0.165}
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


class SourceError(DataError):
    """The source cannot be sharded; the one-line message names the folder, file or option."""


@dataclass(frozen=True, eq=False)
class Record:
    """One sample before sharding: a file to copy (`path`) or pixels to encode (`pixels`)."""

    label: int
    src: str  # where it came from: a path relative to the source root, "cifar10:train:123"...
    path: str | None = None
    pixels: np.ndarray | None = None

    def encoded(self) -> bytes:
        """The bytes to store: the file's exact bytes, or the pixels as a PNG."""
        if self.path is not None:
            with open(self.path, "rb") as f:
                return f.read()
        assert self.pixels is not None
        return encode_png(self.pixels)


@dataclass
class SourceData:
    dataset: str  # short name for the manifest, e.g. "cifar10" or the folder's name
    source: str  # what it was made from, for the manifest
    classes: list[str]  # label i is classes[i]
    image_format: str  # "jpg" or "png": the extension every sample is stored under
    splits: dict[str, list[Record]]  # "train" and "test", in the source's own order

    def iter_split(self, split: str,
                   order: Sequence[int] | None = None) -> Iterator[tuple[bytes, int, str]]:
        """(encoded_bytes, label, src) for the split's records, in `order` if given."""
        records = self.splits[split]
        for i in range(len(records)) if order is None else order:
            record = records[int(i)]
            yield record.encoded(), record.label, record.src


def open_source(kind: str, source: str | None, *, seed: int,
                test_fraction: float | None = None) -> SourceData:
    """List the samples of a source of `kind` (one of SOURCE_KINDS). `test_fraction` applies only
    to sources without a test split of their own (carved with `seed`). Raises SourceError."""
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown source kind '{kind}' (choose from {', '.join(SOURCE_KINDS)})")
    if kind == "digits":
        if source is not None:
            raise SourceError(f"digits takes no SOURCE argument (got '{source}')")
        return digits(seed=seed, test_fraction=test_fraction)
    if source is None:
        raise SourceError(f"{kind} needs a SOURCE directory")
    if kind == "imagefolder":
        return imagefolder(source, seed=seed, test_fraction=test_fraction)
    if test_fraction is not None:
        raise SourceError(
            f"--test-fraction does not apply to {kind}: it has an official test split")
    return cifar(kind, source)


def carve_test(records: list[Record], fraction: float,
               seed: int) -> tuple[list[Record], list[Record]]:
    """Split records into (train, test), test = round(fraction * n) drawn with `seed`; both
    keep the source order (the shard writer permutes each split afterwards)."""
    if not 0.0 < fraction < 1.0:
        raise SourceError(f"--test-fraction must be between 0 and 1 (exclusive), got {fraction}")
    n = len(records)
    n_test = int(round(fraction * n))
    if n_test < 1 or n_test >= n:
        raise SourceError(f"--test-fraction {fraction} of {n} samples leaves an empty split")
    # Own stream, so changing how the writer permutes never changes which samples are test.
    is_test = np.zeros(n, dtype=bool)
    is_test[numpy_rng(seed, "test-split").permutation(n)[:n_test]] = True
    train = [r for r, t in zip(records, is_test, strict=True) if not t]
    test = [r for r, t in zip(records, is_test, strict=True) if t]
    return train, test


def relabel(data: SourceData, label_map: str) -> SourceData:
    """Labels from a named map of each record's class (an ImageNet wnid for the ImageNet
    maps; see app_dist.data.prepare.imagenet), never from its folder index; records the map sends
    to None are dropped. Raises SourceError when a class is not one the map knows."""
    from app_dist.data.prepare.imagenet import LabelMap

    try:
        mapping = LabelMap(label_map)
        new_labels = [mapping(name) for name in data.classes]
    except DataError as error:
        raise SourceError(f"{data.source}: {error}") from None
    splits = {
        split: [Record(new_labels[r.label], r.src, r.path, r.pixels) for r in records
                if new_labels[r.label] is not None]
        for split, records in data.splits.items()
    }
    if not splits["train"]:
        raise SourceError(f"{data.source}: no class falls under --label-map {label_map}")
    return SourceData(f"{data.dataset}-{label_map}", data.source, mapping.classes,
                      data.image_format, splits)


def few_shot(data: SourceData, shots_per_class: int, seed: int) -> SourceData:
    """Keep `shots_per_class` training records of every class, drawn with `seed`; the test
    split is untouched. Raises SourceError naming a class with fewer training records."""
    if shots_per_class < 1:
        raise SourceError(f"--shots-per-class must be >= 1, got {shots_per_class}")
    by_class: dict[int, list[Record]] = {}
    for record in data.splits["train"]:
        by_class.setdefault(record.label, []).append(record)
    chosen: list[Record] = []
    for label in range(len(data.classes)):
        records = by_class.get(label, [])
        if len(records) < shots_per_class:
            raise SourceError(f"--shots-per-class {shots_per_class}: class "
                              f"'{data.classes[label]}' has only {len(records)} training images")
        # One stream per class: the draw of a class does not depend on the other classes.
        order = numpy_rng(seed, "few-shot", label).permutation(len(records))
        chosen.extend(records[i] for i in sorted(order[:shots_per_class]))
    return SourceData(f"{data.dataset}-{shots_per_class}shot", data.source, data.classes,
                      data.image_format, {**data.splits, "train": chosen})


# ---------------------------------------------------------------------------- image folders


def _list_class(folder: Path, root: Path, label: int) -> list[Record]:
    try:
        entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    except OSError as exc:
        raise SourceError(f"{folder}: cannot list class folder: {exc.strerror}") from None
    names = sorted(e.name for e in entries
                   if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())
    if not names:
        raise SourceError(f"{folder}: class folder holds no images (.jpg, .jpeg or .png)")
    rel, base = folder.relative_to(root).as_posix(), str(folder)
    # Plain string joins: Path objects for 60k files cost more than reading them.
    return [Record(label, f"{rel}/{name}", path=os.path.join(base, name)) for name in names]


def _class_folders(directory: Path) -> list[str]:
    # Files and hidden folders next to the class folders (classes.tsv, .ipynb_checkpoints)
    # are not classes.
    return sorted(e.name for e in os.scandir(directory)
                  if e.is_dir() and not e.name.startswith("."))


def _image_format(records: list[Record], root: Path) -> str:
    seen: dict[str, str] = {}
    for r in records:
        fmt = IMAGE_SUFFIXES[os.path.splitext(r.src)[1].lower()]
        seen.setdefault(fmt, r.src)
    if len(seen) > 1:
        examples = ", ".join(f"{fmt}: {src}" for fmt, src in sorted(seen.items()))
        raise SourceError(f"{root}: mixed image formats ({examples}); convert to one format")
    return next(iter(seen))


def imagefolder(root: str | os.PathLike[str], *, seed: int,
                test_fraction: float | None = None) -> SourceData:
    """ROOT/train/<class>/* and ROOT/test/<class>/* (CIFAR layout) or ROOT/val/<class>/*
    (ImageNet layout) when both exist, else ROOT/<class>/* as the train split with a seeded
    `test_fraction` (default 0.1) carved off. Classes are the sorted train class folders;
    files are read later, byte for byte."""
    root_path = Path(root).absolute()
    if not root_path.is_dir():
        raise SourceError(f"{root}: no such directory")
    # ImageNet calls its held-out split val/; a folder with both uses test/.
    test_name = "val" if (root_path / "val").is_dir() and not (root_path / "test").is_dir() \
        else "test"
    has_train, has_test = (root_path / "train").is_dir(), (root_path / test_name).is_dir()
    if has_train != has_test:
        present, absent = ("train", "test") if has_train else (test_name, "train")
        raise SourceError(f"{root}: has {present}/ but no {absent}/ folder")
    if has_train:
        if test_fraction is not None:
            raise SourceError(f"--test-fraction does not apply: {root} has its own "
                              f"{test_name}/ split")
        classes = _class_folders(root_path / "train")
        if not classes:
            raise SourceError(f"{root_path / 'train'}: no class folders")
        index = {c: i for i, c in enumerate(classes)}
        extra = [c for c in _class_folders(root_path / test_name) if c not in index]
        if extra:
            raise SourceError(f"{root_path / test_name / extra[0]}: class not present in "
                              "train/")
        folders = {"train": "train", "test": test_name}
        splits = {
            split: [r for c in (classes if split == "train" else _class_folders(root_path / folder))
                    for r in _list_class(root_path / folder / c, root_path, index[c])]
            for split, folder in folders.items()
        }
    else:
        classes = _class_folders(root_path)
        if not classes:
            raise SourceError(f"{root}: no class folders (expected {root}/<class>/<image>)")
        records = [r for i, c in enumerate(classes)
                   for r in _list_class(root_path / c, root_path, i)]
        fraction = DEFAULT_TEST_FRACTION["imagefolder"] if test_fraction is None else test_fraction
        train, test = carve_test(records, fraction, seed)
        splits = {"train": train, "test": test}
    image_format = _image_format(splits["train"] + splits["test"], root_path)
    return SourceData(root_path.name, str(root_path), classes, image_format, splits)


# ---------------------------------------------------------------------------- CIFAR batches

_CIFAR = {
    # kind: (folder torchvision downloads into, train files, test file, meta file,
    #        label key, label-names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", b"fine_labels",
                 b"fine_label_names"),
}

# The batches are pickles (their official format); load only what a numpy array needs so a
# stray file under that name cannot run arbitrary code.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            # encoding='bytes': the official batches were pickled by Python 2.
            data = _BatchUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file (is this torchvision's download?)") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise SourceError(f"{path}: not a CIFAR python batch: {exc}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: not a CIFAR python batch (top level is not a dict)")
    return data


def _batch_arrays(path: Path, label_key: bytes) -> tuple[np.ndarray, list[int]]:
    batch = _load_batch(path)
    if b"data" not in batch or label_key not in batch:
        raise SourceError(f"{path}: missing '{label_key.decode()}' or 'data' entry")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = [int(v) for v in batch[label_key]]
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
        raise SourceError(f"{path}: data has shape {data.shape}, expected ({len(labels)}, 3072)")
    return data, labels


def cifar(kind: str, directory: str | os.PathLike[str]) -> SourceData:
    """torchvision's python batches of CIFAR-10 (`cifar10`) or CIFAR-100 fine labels
    (`cifar100`), in DIR/<folder> or DIR itself. Images are encoded as RGB PNGs."""
    folder_name, train_files, test_file, meta_file, label_key, names_key = _CIFAR[kind]
    base = Path(directory).absolute()
    if not base.is_dir():
        raise SourceError(f"{directory}: no such directory")
    folder = base / folder_name if (base / folder_name).is_dir() else base
    if not (folder / meta_file).is_file():
        raise SourceError(f"{directory}: holds neither {folder_name}/ nor {meta_file} "
                          "(expected torchvision's python download)")
    meta = _load_batch(folder / meta_file)
    if names_key not in meta:
        raise SourceError(f"{folder / meta_file}: missing '{names_key.decode()}' entry")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    splits = {}
    for split, files in (("train", train_files), ("test", [test_file])):
        arrays = [_batch_arrays(folder / name, label_key) for name in files]
        data = np.concatenate([a for a, _ in arrays])
        labels = [label for _, batch_labels in arrays for label in batch_labels]
        bad = [v for v in labels if not 0 <= v < len(classes)]
        if bad:
            raise SourceError(f"{folder}: {split} label {bad[0]} outside 0..{len(classes) - 1}")
        # Rows are channel-planar (R plane, G plane, B plane); PNG wants HWC.
        images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        splits[split] = [Record(label, f"{kind}:{split}:{i}", pixels=images[i])
                         for i, label in enumerate(labels)]
    return SourceData(kind, str(folder), classes, "png", splits)


# ---------------------------------------------------------------------------- digits


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits as uint8 0..255 (round(v * 255 / 16)) and their labels."""
    from sklearn.datasets import load_digits  # imported here: only this source needs sklearn

    bunch = load_digits()
    # v * 255 / 16 is exact in float64, and np.rint rounds halves to even like Python's round.
    pixels = np.rint(bunch.images * 255.0 / 16.0).astype(np.uint8)
    return pixels, bunch.target.astype(np.int64)


def digits(*, seed: int, test_fraction: float | None = None) -> SourceData:
    """The digits as single-channel PNGs; a seeded `test_fraction` (default 0.165) is test."""
    import sklearn

    pixels, targets = digits_pixels()
    records = [Record(int(t), f"digits:{i}", pixels=pixels[i]) for i, t in enumerate(targets)]
    fraction = DEFAULT_TEST_FRACTION["digits"] if test_fraction is None else test_fraction
    train, test = carve_test(records, fraction, seed)
    origin = f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})"
    return SourceData("digits", origin, [str(d) for d in range(10)], "png",
                      {"train": train, "test": test})


# ---------------------------------------------------------------------------- encoding


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 HxW (grayscale) or HxWx3 (RGB) pixels as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
