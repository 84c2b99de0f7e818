"""Selections -> batches, reading WebDataset shards in DataLoader workers.

Shards are split first across ranks, then across each rank's workers (explicit node and
worker splitters), after a per-epoch seeded shuffle of the shard list. Because the manifest
gives exact sample counts, every rank computes every rank's plan without communicating and
they all agree on one batch count per epoch: no rank runs out early and hangs DDP.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from app_dist.data.augment import SampleTransform
from app_dist.data.manifest import ShardInfo
from app_dist.data.stream import Selection
from app_dist.errors import DataError
from app_dist.seeding import derived_seed, numpy_rng

ShardCounts = list[tuple[ShardInfo, int]]


def split_for_rank(shards: ShardCounts, rank: int, world_size: int) -> ShardCounts:
    """The node splitter: rank r reads every world_size-th shard starting at r."""
    return shards[rank::world_size]


def split_for_workers(shards: ShardCounts, num_workers: int) -> list[ShardCounts]:
    """The worker splitter: one shard list per reader (at least one reader, the main process
    when num_workers is 0); never more readers than shards, so none of them idles."""
    readers = max(1, min(num_workers, len(shards)))
    return [shards[w::readers] for w in range(readers)]


@dataclass(frozen=True)
class EpochPlan:
    """What each reader of this rank reads in one training epoch, and the agreed batch count."""

    worker_shards: list[ShardCounts]
    batches: int


def training_plan(selection: Selection, *, seed: int, megabatch: int, epoch: int, rank: int,
                  world_size: int, num_workers: int, batch_size: int) -> EpochPlan:
    """Shuffle the shard list with (seed, megabatch, epoch), split it, and agree on the number
    of full per-rank batches: the smallest any rank can fill (each reader drops its remainder).
    """
    shards = list(selection.shard_counts)
    order = numpy_rng(seed, "shard-order", megabatch, epoch).permutation(len(shards))
    shuffled = [shards[i] for i in order]

    def batches_of(r: int) -> int:
        readers = split_for_workers(split_for_rank(shuffled, r, world_size), num_workers)
        return sum(sum(count for _, count in reader) // batch_size for reader in readers)

    batches = min(batches_of(r) for r in range(world_size))
    if batches == 0:
        raise DataError(
            f"megabatch {megabatch}: some rank cannot fill one batch of {batch_size} from "
            f"{len(selection)} training samples in {len(shards)} shards over {world_size} ranks; "
            "use a smaller train.batch_size, fewer data.num_workers or smaller shards"
        )
    mine = split_for_workers(split_for_rank(shuffled, rank, world_size), num_workers)
    return EpochPlan(worker_shards=mine, batches=batches)


def evaluation_plan(selection: Selection, *, rank: int, world_size: int,
                    num_workers: int) -> list[ShardCounts]:
    """Every selected sample is read by exactly one rank; counts differ, which is fine because
    evaluation runs the bare module and meets the other ranks only in one final all-reduce."""
    return split_for_workers(split_for_rank(list(selection.shard_counts), rank, world_size),
                             num_workers)


class ShardReader(IterableDataset):
    """One reader's pipeline: shard list -> tar samples -> selected keys -> (shuffle) ->
    decode + augment -> batches of (uint8 images, int64 labels)."""

    def __init__(self, directory: Path, worker_shards: list[ShardCounts], selection: Selection,
                 transform: SampleTransform, image_ext: str, num_classes: int, batch_size: int,
                 drop_last: bool, shuffle_buffer: int, seed: int) -> None:
        super().__init__()
        self.urls = [[str(directory / shard.name) for shard, _ in shards]
                     for shards in worker_shards]
        self.membership = selection.membership
        self.transform = transform
        self.image_ext = image_ext
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        pipeline = wds.DataPipeline(
            lambda: _open_local_shards(self.urls[worker]),
            lambda streams: wds.tariterators.tar_file_expander(streams,
                                                               handler=_raise_naming_shard),
            lambda files: wds.tariterators.group_by_keys(files, handler=_raise_naming_shard),
            self._selected,
        )
        samples = iter(pipeline)
        if self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer,
                                np.random.default_rng(derived_seed(self.seed, "shuffle", worker)))
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "augment", worker))
        batch_images, batch_labels = [], []
        for sample in samples:
            batch_images.append(self._image(sample, generator))
            batch_labels.append(sample["label"])
            if len(batch_images) == self.batch_size:
                yield torch.stack(batch_images), torch.tensor(batch_labels)
                batch_images, batch_labels = [], []
        if batch_images and not self.drop_last:
            yield torch.stack(batch_images), torch.tensor(batch_labels)

    def _selected(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            key = sample["__key__"]
            try:
                index = int(key)
            except ValueError:
                raise DataError(f"shard {sample['__url__']}: sample key '{key}' is not an "
                                "index (was it written by app_dist.data.shards?)") from None
            if index >= self.membership.size or not self.membership[index]:
                continue
            sample["label"] = self._label(sample)
            yield sample

    def _label(self, sample: dict) -> int:
        where = f"shard {sample['__url__']}: sample {sample['__key__']}"
        if "cls" not in sample:
            raise DataError(f"{where}: no label (.cls)")
        try:
            label = int(sample["cls"])
        except ValueError:
            raise DataError(f"{where}: label {sample['cls'][:20]!r} is not an integer") from None
        if not 0 <= label < self.num_classes:
            raise DataError(f"{where}: label {label} outside 0..{self.num_classes - 1}")
        return label

    def _image(self, sample: dict, generator: torch.Generator) -> torch.Tensor:
        where = f"shard {sample['__url__']}: sample {sample['__key__']}"
        if self.image_ext not in sample:
            raise DataError(f"{where}: no .{self.image_ext} image")
        try:
            return self.transform(sample[self.image_ext], generator)
        except RuntimeError as error:
            raise DataError(f"{where}: cannot decode image ({error})") from None


def _ignore_termination(worker_id: int) -> None:
    """A pre-emption notice is for the training process to act on (finish the step, write a
    checkpoint); readers must not die first and break the step in flight. They exit with it:
    torch's worker loop notices a dead parent, and `stop_readers` ends them on the way out."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_readers() -> None:
    """Kill reader processes still alive (an error left an epoch unfinished). Call before the
    process exits: multiprocessing would otherwise SIGTERM them, which they ignore, and wait
    for them forever."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


def _raise_naming_shard(error: Exception) -> bool:
    """webdataset appends (stream, url) to a failed read's args: name the shard."""
    url = next((a for a in reversed(error.args) if isinstance(a, str) and a.endswith(".tar")),
               "a shard")
    raise DataError(f"cannot read {url}: {error.args[0] if error.args else error} "
                    "(truncated or not a tar file?)") from None


def _open_local_shards(paths: list[str]) -> Iterator[dict]:
    """Open the shards ourselves instead of through webdataset's gopen: only local files named
    by the manifest are read, never a `pipe:` or remote URL (what WDS_SECURE guards against;
    webdataset 1.0.2's secure mode refuses local files altogether, so it cannot be used)."""
    for path in paths:
        try:
            stream = open(path, "rb")
        except OSError as error:
            raise DataError(f"cannot open shard {path}: {error.strerror}") from None
        with stream:
            yield {"url": path, "stream": stream}


def _shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """A bounded shuffle buffer: fill, then emit a random element for every new one."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = int(rng.integers(len(buffer)))
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


class Batches:
    """Exactly `count` batches from a DataLoader (or all of them when count is None)."""

    def __init__(self, loader: DataLoader, count: int | None, expected_samples: int | None) -> None:
        self.loader = loader
        self.count = count
        self.expected_samples = expected_samples

    def __len__(self) -> int:
        return self.count if self.count is not None else len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        iterator = iter(self.loader)
        seen = 0
        try:
            if self.count is None:
                for batch in iterator:
                    seen += len(batch[1])
                    yield batch
            else:
                for _ in range(self.count):
                    batch = next(iterator, None)
                    if batch is None:
                        raise DataError(f"shards yielded fewer than the {self.count} batches "
                                        "their manifest promises: a shard is truncated?")
                    seen += len(batch[1])
                    yield batch
        finally:
            del iterator  # shuts the workers down when we stop before the end
        if self.expected_samples is not None and seen != self.expected_samples:
            raise DataError(f"read {seen} samples where the manifest promises "
                            f"{self.expected_samples}: a shard is truncated or altered")


def make_batches(directory: Path, worker_shards: list[ShardCounts], selection: Selection, *,
                 transform: SampleTransform, image_ext: str, num_classes: int, batch_size: int,
                 num_workers: int, train: bool, seed: int, shuffle_buffer: int = 1,
                 count: int | None = None, pin_memory: bool = False) -> Batches:
    """A batch iterable over the reader plan. Training: shuffled, full batches only, exactly
    `count` of them. Evaluation: in order, partial last batches, every planned sample once."""
    reader = ShardReader(directory, worker_shards, selection, transform, image_ext, num_classes,
                         batch_size, drop_last=train, shuffle_buffer=shuffle_buffer if train else 1,
                         seed=seed)
    processes = len(worker_shards) if num_workers > 0 else 0
    loader = DataLoader(reader, batch_size=None, num_workers=processes, pin_memory=pin_memory,
                        prefetch_factor=4 if processes else None,
                        worker_init_fn=_ignore_termination if processes else None)
    expected = None if train else sum(count for shards in worker_shards for _, count in shards)
    return Batches(loader, count, expected)
