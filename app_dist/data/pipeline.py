"""One reader's pipeline: a plan's shard files -> tar samples -> selected keys -> (shuffle)
-> decode + augment -> batches of (uint8 images, int64 labels).

`ShardReader` (and `DecodeReader`, which fills the decoded-sample cache) is what runs in a
reader process, or in the training process when there are none. The ordering pieces
(`reader_order`, `augment_generator`, `batched`, `round_robin`, `without_skipped`) are shared
with the cache, so every way of reading agrees sample for sample; `pack`, `pack_encoded` and
`unpack` carry batches across the process boundary as few tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from typing import TypeVar

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from app_dist.data.augment import Draw, SampleTransform, decode
from app_dist.data.image_headers import image_header
from app_dist.data.plan import ShardCounts
from app_dist.data.shard_files import ShardFiles
from app_dist.data.stream import Selection
from app_dist.foundations.errors import DataError
from app_dist.foundations.seeding import derived_seed

T = TypeVar("T")
log = logging.getLogger("app_dist")
Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, C, H, W), int64 labels (B,)


def reader_order(samples: Iterator[T], seed: int, worker: int,
                 shuffle_buffer: int) -> Iterator[T]:
    """The order in which reader `worker` uses its samples (shard order, then the streaming
    shuffle). Shared by every path that reads (shards, cache), so they agree exactly."""
    if shuffle_buffer <= 1:
        return samples
    return _shuffled(samples, shuffle_buffer,
                     np.random.default_rng(derived_seed(seed, "shuffle", worker)))


def augment_generator(seed: int, worker: int) -> torch.Generator:
    """The generator reader `worker` draws its augmentations from."""
    return torch.Generator().manual_seed(derived_seed(seed, "augment", worker))


def batched(items: Iterator[tuple[torch.Tensor, int]], batch_size: int,
            drop_last: bool) -> Iterator[Batch]:
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for image, label in items:
        images.append(image)
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images and not drop_last:
        yield torch.stack(images), torch.tensor(labels)


def round_robin(readers: list[Iterator[Batch]]) -> Iterator[Batch]:
    """Batches in the order a DataLoader with one worker per reader returns them: one from
    each reader in turn, skipping readers that ran out (torch's in-order task dispatch)."""
    active = list(readers)
    while active:
        still = []
        for reader in active:
            batch = next(reader, None)
            if batch is not None:
                still.append(reader)
                yield batch
        active = still


class SkipTally:
    """Bad samples one reader skipped (data.bad_samples=skip) and not yet reported."""

    def __init__(self) -> None:
        self.count = 0

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def without_skipped(items: Iterator[T | None], refill: bool) -> Iterator[T]:
    """The items with every skipped one (None) left out, or with `refill`, as in training,
    replaced by a neighbouring good item: then a reader yields as many items as it read and
    every rank keeps the planned number of batches (an uneven count would leave the other
    ranks waiting in a collective)."""
    if not refill:
        yield from (item for item in items if item is not None)
        return
    owed, last = 0, None
    for item in items:
        if item is None:
            if last is None:
                owed += 1  # nothing good yet: the next good item fills this slot
            else:
                yield last
            continue
        last = item
        for _ in range(1 + owed):
            yield item
        owed = 0
    if owed:
        raise DataError("data.bad_samples=skip: every sample one reader read was bad; "
                        "nothing is left to train on")


def report_skipped(batches: Iterator[Batch], tally: SkipTally) -> Iterator[tuple]:
    """Each batch with the number of samples skipped since the previous one; a final empty
    batch reports skips after the last full one (`Batches` drops it)."""
    for images, labels in batches:
        yield images, labels, tally.take()
    if tally.count:
        yield torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), tally.take()


class ShardReader(IterableDataset):
    """One reader's pipeline: shard list -> tar samples -> selected keys -> (shuffle) ->
    decode + augment -> batches of (uint8 images, int64 labels).

    encoded=True (GPU decoding) leaves the images encoded: batches are (pack_encoded's
    (bytes, lengths), list of augmentation draws, labels), drawn from the image headers, for
    `device_decode.decode_on_device` to finish in the training process."""

    def __init__(self, files: ShardFiles, worker_shards: list[ShardCounts], selection: Selection,
                 transform: SampleTransform, image_ext: str, num_classes: int, batch_size: int,
                 drop_last: bool, shuffle_buffer: int, seed: int, encoded: bool = False,
                 skip_bad: bool = False, log_skips: bool = True) -> None:
        super().__init__()
        self.urls = [[str(files.path(shard)) for shard, _ in shards]
                     for shards in worker_shards]
        # How many selected samples each shard holds by the manifest: a shard that ends early
        # (truncated, a broken tar header, an empty tar in its place) is named when it does.
        self.promised = [[count for _, count in shards] for shards in worker_shards]
        self.membership = selection.membership
        self.transform = transform
        self.image_ext = image_ext
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.encoded = encoded
        self.skip_bad = skip_bad
        self.log_skips = log_skips

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        return self.read(info.id if info is not None else 0)

    def read(self, worker: int) -> Iterator:
        """Reader `worker`'s batches (none when a pooled worker has no shards this pass)."""
        if worker >= len(self.urls):
            return
        samples = reader_order(self._samples(worker), self.seed, worker, self.shuffle_buffer)
        generator = augment_generator(self.seed, worker)
        if self.encoded:
            for encoded, draws, labels in self._encoded_batches(samples, generator):
                yield encoded, labels, draws, 0
            return
        tally = SkipTally()
        items = (self._item(sample, generator, tally) for sample in samples)
        kept = without_skipped(items, refill=self.drop_last)
        yield from report_skipped(batched(kept, self.batch_size, self.drop_last), tally)

    def _item(self, sample: dict, generator: torch.Generator,
              tally: SkipTally) -> tuple[torch.Tensor, int] | None:
        """(augmented image, label), or None for a bad sample when skipping."""
        try:
            return self._image(sample, generator), sample["label"]
        except DataError as error:
            self._skip(error, tally)
            return None

    def _skip(self, error: DataError, tally: SkipTally) -> None:
        if not self.skip_bad:
            raise error
        if self.log_skips:
            log.warning("skipped a bad sample (data.bad_samples=skip): %s", error)
        tally.count += 1

    def _samples(self, worker: int) -> Iterator[dict]:
        """The selected samples of the worker's shards, in shard order, with their labels."""
        for path, promised in zip(self.urls[worker], self.promised[worker]):
            yield from self._shard_samples(path, promised)

    def _shard_samples(self, path: str, promised: int) -> Iterator[dict]:
        """One shard's selected samples; DataError naming the shard when it cannot be read or
        holds another number of them than the manifest promises. tarfile ends a stream
        silently at a broken header after the first one, so counting is what catches it."""
        handler = partial(_raise_naming_shard, path)
        pipeline = wds.DataPipeline(
            lambda: _open_local_shards([path]),
            lambda streams: wds.tariterators.tar_file_expander(streams, handler=handler),
            lambda files: wds.tariterators.group_by_keys(files, handler=handler),
            self._selected,
        )
        found = 0
        for sample in pipeline:
            found += 1
            yield sample
        if found != promised:
            raise DataError(f"shard {path}: read {found} selected samples where the manifest "
                            f"promises {promised}: the shard is truncated or altered")

    def _encoded_batches(self, samples: Iterator[dict], generator: torch.Generator) -> Iterator:
        encoded: list[bytes] = []
        draws: list[Draw | None] = []
        labels: list[int] = []
        for sample in samples:
            data = self._image_bytes(sample)
            height, width, _ = image_header(data)
            encoded.append(data)
            draws.append(self.transform.draw(height, width, generator))
            labels.append(sample["label"])
            if len(encoded) == self.batch_size:
                yield pack_encoded(encoded), draws, torch.tensor(labels)
                encoded, draws, labels = [], [], []
        if encoded and not self.drop_last:
            yield pack_encoded(encoded), draws, torch.tensor(labels)

    def _selected(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            key = sample["__key__"]
            try:
                index = int(key)
            except ValueError:
                raise DataError(f"shard {sample['__url__']}: sample key '{key}' is not an "
                                "index (was it written by app_dist.data.prepare.shards?)") from None
            if index >= self.membership.size or not self.membership[index]:
                continue
            try:
                sample["label"] = self._label(sample)
            except DataError as error:
                if not self.skip_bad:
                    raise
                sample["error"] = str(error)  # skipped where it is used, in reading order
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

    def _image_bytes(self, sample: dict) -> bytes:
        if "error" in sample:  # a bad label, kept until here to be skipped in reading order
            raise DataError(sample["error"])
        if self.image_ext not in sample:
            raise DataError(f"shard {sample['__url__']}: sample {sample['__key__']}: "
                            f"no .{self.image_ext} image")
        return sample[self.image_ext]

    def _image(self, sample: dict, generator: torch.Generator) -> torch.Tensor:
        try:
            return self.transform(self._image_bytes(sample), generator)
        except RuntimeError as error:
            raise DataError(f"shard {sample['__url__']}: sample {sample['__key__']}: cannot "
                            f"decode image ({error})") from None


class DecodeReader(ShardReader):
    """Decodes the selected samples without augmenting them, to fill the decoded-sample
    cache: chunks of (sample indices, labels, list of uint8 images), in shard order. A chunk
    crosses from the reader process as one flat tensor (`pack`), not one shared-memory
    segment (and file descriptor) per image."""

    CHUNK = 256

    def read(self, worker: int) -> Iterator:
        if worker >= len(self.urls):
            return
        indices: list[int] = []
        labels: list[int] = []
        images: list[torch.Tensor] = []
        tally = SkipTally()
        for sample in self._samples(worker):
            try:
                images.append(self._decoded(sample))
            except DataError as error:
                self._skip(error, tally)
                continue
            indices.append(int(sample["__key__"]))
            labels.append(sample["label"])
            if len(images) == self.CHUNK:
                yield torch.tensor(indices), torch.tensor(labels), *pack(images), tally.take()
                indices, labels, images = [], [], []
        if images or tally.count:
            yield (torch.tensor(indices, dtype=torch.int64),
                   torch.tensor(labels, dtype=torch.int64), *pack(images), tally.take())

    def _decoded(self, sample: dict) -> torch.Tensor:
        try:
            return decode(self._image_bytes(sample), self.transform.channels)
        except RuntimeError as error:
            raise DataError(f"shard {sample['__url__']}: sample {sample['__key__']}: "
                            f"cannot decode image ({error})") from None


def pack(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of any sizes -> (their bytes concatenated, their shapes (N, 3))."""
    if not images:
        return torch.empty(0, dtype=torch.uint8), torch.empty((0, 3), dtype=torch.int64)
    return (torch.cat([image.reshape(-1) for image in images]),
            torch.tensor([list(image.shape) for image in images]))


def pack_encoded(files: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded images -> (their bytes concatenated, their lengths). One tensor crosses the
    process boundary instead of one per image: each tensor a DataLoader worker sends costs a
    shared-memory segment and a file descriptor, and at 256 photos per batch that capped GPU
    decoding at a third of the GPU's speed (measured on an H200)."""
    return (torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8),
            torch.tensor([len(data) for data in files]))


def unpack(flat: torch.Tensor, shapes: torch.Tensor) -> list[torch.Tensor]:
    """pack's inverse; every image is a copy in this process's own memory."""
    sizes = shapes.prod(dim=1).tolist()
    return [part.reshape(shape).clone()
            for part, shape in zip(flat.split(sizes), shapes.tolist())]


def _raise_naming_shard(path: str, error: Exception) -> bool:
    """webdataset's handler for a failed read of shard `path`: one DataError naming it.
    webdataset hands the same error to the handlers of the stages it passes through (tar
    member, then tar file) with text appended: an error already named passes unchanged."""
    if isinstance(error, DataError):  # its args may have grown by webdataset's (stream, url)
        raise DataError(error.args[0]) from None
    reason = str(error.args[0]) if error.args else str(error)
    reason = reason.split(" @ ")[0]  # webdataset appends " @ <the file object>"
    raise DataError(f"cannot read {path}: {reason} (truncated or not a tar file?)") from None


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
