"""The shard directory's `manifest.json` (format "app-dist-shards/1"): load, validate, save.

A shard directory holds `<split>-NNNNNN.tar` shards and a manifest written last, so a manifest
that loads means every shard it lists was completely written. Shard i of a split holds the
samples keyed `f"{index:08d}"` for index in [first_index, first_index + count), where
first_index = i * samples_per_shard; `app_dist.data.prepare.shards` writes this format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app_dist.foundations.errors import DataError
from app_dist.foundations.files import atomic_write_text, file_sha256

FORMAT = "app-dist-shards/1"
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "test")


class ManifestError(DataError):
    """A manifest or shard is unusable; the one-line message starts with the file's path."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    first_index: int
    count: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass(frozen=True)
class StreamInfo:
    """A stream whose megabatches are published one at a time (`app-dist shards append`):
    the declared horizon T and, per published megabatch t, its training shards
    [bounds[t-1], bounds[t]). The manifest is rewritten (last) with each megabatch."""

    megabatches: int
    bounds: tuple[int, ...]  # starts at 0; one more entry per published megabatch

    @property
    def published(self) -> int:
        return len(self.bounds) - 1

    @property
    def complete(self) -> bool:
        return self.published == self.megabatches


@dataclass
class Manifest:
    dataset: str
    source: str
    seed: int
    image_format: str  # "jpg" or "png": the extension of every sample's image member
    channels: int  # 1 (all images single-channel) or 3 (readers convert to RGB)
    image_size: tuple[int, int] | None  # (H, W) shared by every image, None when sizes vary
    classes: list[str]
    num_classes: int
    samples_per_shard: int
    splits: dict[str, SplitInfo]
    format: str = FORMAT
    stream: StreamInfo | None = None  # set for a stream of arriving megabatches

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the documented order."""
        return {
            "format": self.format,
            "dataset": self.dataset,
            "source": self.source,
            "seed": self.seed,
            "image_format": self.image_format,
            "channels": self.channels,
            "image_size": list(self.image_size) if self.image_size is not None else None,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "samples_per_shard": self.samples_per_shard,
            "splits": {
                name: {
                    "num_samples": split.num_samples,
                    "shards": [
                        {"name": s.name, "first_index": s.first_index, "count": s.count,
                         "sha256": s.sha256}
                        for s in split.shards
                    ],
                }
                for name, split in self.splits.items()
            },
            **({"stream": {"megabatches": self.stream.megabatches,
                           "bounds": list(self.stream.bounds)}} if self.stream else {}),
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `directory/manifest.json` atomically; return its path."""
        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Manifest:
        """Read and validate `directory/manifest.json`: format, keys, types, shard layout and
        that every listed shard file exists. Raises ManifestError("<path>: <problem>")."""
        path = Path(directory) / MANIFEST_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such file (not a shard directory?)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: cannot read: {exc}") from None
        manifest = cls.from_json(text, str(path))
        for split in manifest.splits.values():
            for shard in split.shards:
                if not shard_path(directory, shard).is_file():
                    raise ManifestError(f"{path}: shard file {shard.name} is missing")
        return manifest

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse and validate a manifest's text; `where` (its path or URL) starts every error."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where}: not valid JSON: {exc}") from None
        return _parse(data, where)

    def shard_paths(self, directory: str | os.PathLike[str], split: str) -> list[Path]:
        """The paths of `split`'s shards in index order."""
        return [shard_path(directory, s) for s in self.splits[split].shards]

    def verify(self, directory: str | os.PathLike[str]) -> None:
        """verify_shard on every shard of every split."""
        for split in self.splits.values():
            for shard in split.shards:
                verify_shard(directory, shard)


def shard_path(directory: str | os.PathLike[str], shard: ShardInfo) -> Path:
    return Path(directory) / shard.name


def verify_shard(directory: str | os.PathLike[str], shard: ShardInfo) -> None:
    """Recompute the shard's sha256; raise ManifestError naming the shard when it differs."""
    path = shard_path(directory, shard)
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read shard: {exc.strerror}") from None
    if actual != shard.sha256:
        raise ManifestError(
            f"{path}: sha256 {actual} does not match the manifest's {shard.sha256} "
            "(corrupt or replaced shard)"
        )


class _Reader:
    """Typed key access that reports the dotted key path on failure."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, problem: str) -> ManifestError:
        return ManifestError(f"{self.path}: {problem}")

    def get(self, obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in obj:
            raise self.fail(f"missing key '{name}'")
        value = obj[key]
        # bool is an int subclass; a true/false where a count belongs is a mistake.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise self.fail(f"key '{name}' has the wrong type ({type(value).__name__})")
        return value

    def get_int(self, obj: dict[str, Any], key: str, where: str, minimum: int) -> int:
        value = self.get(obj, key, int, where)
        if value < minimum:
            name = f"{where}.{key}" if where else key
            raise self.fail(f"key '{name}' is {value}, expected >= {minimum}")
        return value


def _parse(data: Any, path: str) -> Manifest:
    r = _Reader(path)
    if not isinstance(data, dict):
        raise r.fail("top level is not a JSON object")
    fmt = r.get(data, "format", str, "")
    if fmt != FORMAT:
        raise r.fail(f"format is '{fmt}', expected '{FORMAT}'")
    image_format = r.get(data, "image_format", str, "")
    if image_format not in ("jpg", "png"):
        raise r.fail(f"image_format is '{image_format}', expected 'jpg' or 'png'")
    channels = r.get(data, "channels", int, "")
    if channels not in (1, 3):
        raise r.fail(f"channels is {channels}, expected 1 or 3")
    size = r.get(data, "image_size", (list, type(None)), "")
    if size is not None and (
        len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                  for v in size)
    ):
        raise r.fail(f"image_size is {size}, expected [H, W] or null")
    classes = r.get(data, "classes", list, "")
    if not all(isinstance(c, str) for c in classes):
        raise r.fail("classes must be a list of strings")
    num_classes = r.get_int(data, "num_classes", "", 1)
    if num_classes != len(classes):
        raise r.fail(f"num_classes is {num_classes} but {len(classes)} classes are listed")
    per_shard = r.get_int(data, "samples_per_shard", "", 1)
    splits_obj = r.get(data, "splits", dict, "")
    splits = {}
    for split_name in SPLITS:
        split_obj = r.get(splits_obj, split_name, dict, "splits")
        splits[split_name] = _parse_split(r, split_obj, f"splits.{split_name}", split_name,
                                          per_shard)
    stream = _parse_stream(r, data["stream"], len(splits["train"].shards)) if "stream" in data \
        else None
    return Manifest(
        stream=stream,
        format=fmt,
        dataset=r.get(data, "dataset", str, ""),
        source=r.get(data, "source", str, ""),
        seed=r.get(data, "seed", int, ""),
        image_format=image_format,
        channels=channels,
        image_size=tuple(size) if size is not None else None,
        classes=classes,
        num_classes=num_classes,
        samples_per_shard=per_shard,
        splits=splits,
    )


def _parse_stream(r: _Reader, obj: Any, train_shards: int) -> StreamInfo:
    if not isinstance(obj, dict):
        raise r.fail("'stream' is not an object")
    megabatches = r.get_int(obj, "megabatches", "stream", 1)
    bounds = r.get(obj, "bounds", list, "stream")
    if (not bounds or bounds[0] != 0 or not all(isinstance(b, int) for b in bounds)
            or any(b <= a for a, b in zip(bounds, bounds[1:]))):
        raise r.fail("'stream.bounds' must start at 0 and increase")
    if len(bounds) - 1 > megabatches:
        raise r.fail(f"'stream.bounds' lists {len(bounds) - 1} megabatches, more than "
                     f"stream.megabatches={megabatches}")
    if bounds[-1] != train_shards:
        raise r.fail(f"'stream.bounds' ends at shard {bounds[-1]} but the training split has "
                     f"{train_shards} shards")
    return StreamInfo(megabatches=megabatches, bounds=tuple(bounds))


def _parse_split(r: _Reader, obj: dict[str, Any], where: str, split: str,
                 per_shard: int) -> SplitInfo:
    num_samples = r.get_int(obj, "num_samples", where, 0)
    shards = []
    for i, shard_obj in enumerate(r.get(obj, "shards", list, where)):
        at = f"{where}.shards[{i}]"
        if not isinstance(shard_obj, dict):
            raise r.fail(f"'{at}' is not an object")
        shard = ShardInfo(
            name=r.get(shard_obj, "name", str, at),
            first_index=r.get_int(shard_obj, "first_index", at, 0),
            count=r.get_int(shard_obj, "count", at, 1),
            sha256=r.get(shard_obj, "sha256", str, at),
        )
        # Names are joined to the directory: a separator would let a manifest point elsewhere.
        if shard.name != f"{split}-{i:06d}.tar":
            raise r.fail(f"'{at}.name' is '{shard.name}', expected '{split}-{i:06d}.tar'")
        if shard.first_index != i * per_shard:
            raise r.fail(f"'{at}.first_index' is {shard.first_index}, expected {i * per_shard}")
        if shard.count > per_shard:
            raise r.fail(f"'{at}.count' is {shard.count}, more than samples_per_shard")
        if len(shard.sha256) != 64 or any(c not in "0123456789abcdef" for c in shard.sha256):
            raise r.fail(f"'{at}.sha256' is not a lowercase hex sha256")
        shards.append(shard)
    # Only the last shard may be short, so index -> shard is index // samples_per_shard.
    for i, shard in enumerate(shards[:-1]):
        if shard.count != per_shard:
            raise r.fail(f"'{where}.shards[{i}].count' is {shard.count} but only the last "
                         f"shard may hold fewer than {per_shard}")
    total = sum(s.count for s in shards)
    if total != num_samples:
        raise r.fail(f"'{where}' shard counts add up to {total}, not num_samples={num_samples}")
    return SplitInfo(num_samples=num_samples, shards=shards)
