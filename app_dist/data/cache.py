"""Decode once (perf.cache_decoded): decoded uint8 samples kept in this rank's memory.

A JPEG is decoded the first time this rank reads it; every later pass (the next epoch, the
next megabatch's replay, the test set at every megabatch) augments the kept tensor instead,
in the training process, with no reader processes competing for the cores.

The cached path reproduces the shard path exactly: each reader of the plan takes its
samples in shard order, shuffles them with the same streaming buffer and seed, draws its
augmentations from the same generator, and the readers' batches are interleaved the way a
DataLoader with one worker per reader interleaves them (`round_robin`). So data order and
augmentation stay a pure function of (seed, megabatch, epoch, rank) whether the cache is on,
warm or full.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch

from app_dist.data.augment import SampleTransform
from app_dist.data.manifest import SplitInfo
from app_dist.data.pipeline import (
    Batch,
    augment_generator,
    batched,
    reader_order,
    round_robin,
    without_skipped,
)
from app_dist.data.plan import ShardCounts
from app_dist.data.stream import Selection
from app_dist.foundations.errors import DataError

log = logging.getLogger("app_dist")

CachedSample = tuple[torch.Tensor, int]  # decoded uint8 image, label

# What fills the cache: a selection -> chunks of (indices, labels, decoded images).
Decoder = Callable[[Selection], Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]]


def plan_indices(worker_shards: ShardCounts, selection: Selection) -> np.ndarray:
    """The selected sample indices in one reader's shards, in shard (= key) order."""
    parts = []
    for shard, _ in worker_shards:
        lo, hi = np.searchsorted(selection.indices, [shard.first_index,
                                                     shard.first_index + shard.count])
        parts.append(selection.indices[lo:hi])
    return np.concatenate(parts) if parts else np.array([], dtype=np.int64)


class DecodedCache:
    """Decoded images and labels by (split, sample index), up to `max_bytes` of images."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        # id(split) -> (the split, kept alive so its id stays unique; index -> (image, label),
        # or None for a bad sample that data.bad_samples=skip leaves out)
        self._stores: dict[int, tuple[SplitInfo, dict[int, CachedSample | None]]] = {}
        self._warned = False

    def __len__(self) -> int:
        return sum(len(store) for _, store in self._stores.values())

    def _store(self, split: SplitInfo) -> dict[int, CachedSample | None]:
        return self._stores.setdefault(id(split), (split, {}))[1]

    def ensure(self, plan: list[ShardCounts], selection: Selection, decoder: Decoder) -> bool:
        """Decode what `plan` reads of `selection` and is not cached yet. False (and the
        caller reads the shards) when that would exceed the memory budget."""
        store = self._store(selection.split)
        needed = np.concatenate([plan_indices(shards, selection) for shards in plan])
        missing = np.array([i for i in needed.tolist() if i not in store], dtype=np.int64)
        if missing.size == 0:
            return True
        if not self._fits(missing.size):
            if not self._warned:
                log.warning("perf.cache_decoded: %d MB of decoded images reached "
                            "perf.cache_max_mb=%d; further samples are read from the shards",
                            self.bytes >> 20, self.max_bytes >> 20)
                self._warned = True
            return False
        for indices, labels, images in decoder(Selection(selection.split, np.sort(missing))):
            for index, label, image in zip(indices.tolist(), labels.tolist(), images):
                store[index] = (image, label)
                self.bytes += image.numel() * image.element_size()
        for index in missing.tolist():
            # The decoder skipped it (data.bad_samples=skip; otherwise it raised): remember it
            # as bad, so every pass skips it the way the shard readers do.
            store.setdefault(index, None)
        return True

    def _fits(self, count: int) -> bool:
        cached = len(self)
        if cached == 0:
            return True  # nothing to estimate from yet: the first fill decides
        return self.bytes + count * self.bytes / cached <= self.max_bytes

    def batches(self, plan: list[ShardCounts], selection: Selection, *,
                transform: SampleTransform, batch_size: int, train: bool, seed: int,
                shuffle_buffer: int = 1, count: int | None = None,
                pin_memory: bool = False) -> CachedBatches:
        """The batches the shard readers would produce for this plan, from memory."""
        return CachedBatches(self._store(selection.split), plan, selection, transform,
                             batch_size, train, seed, shuffle_buffer if train else 1, count,
                             pin_memory)


class CachedBatches:
    def __init__(self, store: dict[int, CachedSample | None], plan: list[ShardCounts],
                 selection: Selection, transform: SampleTransform, batch_size: int,
                 train: bool, seed: int, shuffle_buffer: int, count: int | None,
                 pin_memory: bool) -> None:
        self.store = store
        self.readers = [plan_indices(shards, selection) for shards in plan]
        self.transform = transform
        self.batch_size = batch_size
        self.drop_last = train
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.count = count
        self.pin_memory = pin_memory
        # Bad samples in the last pass's plan (data.bad_samples=skip), counted whole, as the
        # shard readers count them (`Batches.count_every_skip`), also past `count` batches.
        self.skipped = 0

    def __len__(self) -> int:
        if self.count is not None:
            return self.count
        return sum(-(-len(indices) // self.batch_size) for indices in self.readers)

    def _reader(self, worker: int) -> Iterator[Batch]:
        order = reader_order(iter(self.readers[worker].tolist()), self.seed, worker,
                             self.shuffle_buffer)
        generator = augment_generator(self.seed, worker)
        items = (self._item(self.store[i], generator) for i in order)
        kept = without_skipped(items, refill=self.drop_last)
        return batched(kept, self.batch_size, self.drop_last)

    def _item(self, cached: CachedSample | None,
              generator: torch.Generator) -> tuple[torch.Tensor, int] | None:
        if cached is None:
            return None
        return self.transform.augment_decoded(cached[0], generator), cached[1]

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = 0
        batches = round_robin([self._reader(w) for w in range(len(self.readers))])
        produced = 0
        for images, labels in batches:
            if self.count is not None and produced == self.count:
                self.skipped = self._bad_in_plan()
                return
            produced += 1
            yield (images.pin_memory(), labels.pin_memory()) if self.pin_memory else (images,
                                                                                      labels)
        if self.count is not None and produced < self.count:
            raise DataError(f"the cached samples fill {produced} batches, fewer than the "
                            f"{self.count} the plan promises")
        self.skipped = self._bad_in_plan()

    def _bad_in_plan(self) -> int:
        return sum(self.store[index] is None for indices in self.readers
                   for index in indices.tolist())
