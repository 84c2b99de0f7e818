"""The ALMA megabatch stream as pure bookkeeping: which samples each megabatch trains and
validates on. Nothing here reads images; `app_dist.data.plan` and `app_dist.data.batches`
turn a Selection into batches.

The training split (already permuted once by the shard writer) is cut into T megabatches of
consecutive shards, or, with a stream seed, of shards in an order drawn from it (so that seeds
can vary which data each megabatch holds without writing the shards again; the shard is the
unit, as shards are read whole). Each megabatch's 90/10 train/validation split is drawn from
the stream seed (else the run's seed), and the replay policy decides which earlier megabatches
are trained on again (docs/METHOD.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from app_dist.data.manifest import Manifest, ShardInfo, SplitInfo
from app_dist.foundations.errors import DataError
from app_dist.foundations.seeding import numpy_rng


@dataclass(frozen=True, eq=False)
class Selection:
    """A subset of one split: sorted sample indices (the shard keys) and the split they index."""

    split: SplitInfo
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.indices.size)

    @cached_property
    def shard_counts(self) -> list[tuple[ShardInfo, int]]:
        """(shard, number of selected samples in it) for every shard holding any, in order."""
        starts = np.array([s.first_index for s in self.split.shards])
        ends = starts + np.array([s.count for s in self.split.shards])
        lo = np.searchsorted(self.indices, starts)
        hi = np.searchsorted(self.indices, ends)
        return [(s, int(end - start)) for s, start, end in zip(self.split.shards, lo, hi)
                if end > start]

    @cached_property
    def membership(self) -> np.ndarray:
        """A bool per sample of the split: cheap to test in a worker for every key read."""
        member = np.zeros(self.split.num_samples, dtype=bool)
        member[self.indices] = True
        return member

    def first(self, count: int) -> Selection:
        return Selection(self.split, self.indices[:count])


def _union(split: SplitInfo, parts: list[np.ndarray]) -> Selection:
    return Selection(split, np.unique(np.concatenate(parts)) if parts else np.array([], int))


def reservoir(items: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Algorithm R over `items` in stream order: a uniform sample of `size` of them."""
    if items.size <= size:
        return items.copy()
    kept = items[:size].copy()
    draws = rng.integers(0, np.arange(size, items.size) + 1)
    for position, slot in enumerate(draws, start=size):
        if slot < size:
            kept[slot] = items[position]
    return kept


class MegabatchStream:
    """Megabatches t = 1..T over a shard manifest; every method is a pure function of (t, seed)."""

    def __init__(self, manifest: Manifest, megabatches: int, val_fraction: float, replay: str,
                 replay_window: int, replay_buffer: int, seed: int,
                 stream_seed: int | None = None) -> None:
        shards = manifest.splits["train"].shards
        if manifest.stream is not None:
            if megabatches != manifest.stream.megabatches:
                raise DataError(f"data.megabatches={megabatches} but the stream declares "
                                f"{manifest.stream.megabatches} megabatches")
            if stream_seed is not None:
                raise DataError("data.stream_seed cannot reorder a stream whose megabatches "
                                "arrive in order: leave it null")
        elif megabatches > len(shards):
            raise DataError(
                f"data.megabatches={megabatches} but {manifest.dataset} has only {len(shards)} "
                "training shards: write smaller shards (--samples-per-shard) or use fewer "
                "megabatches"
            )
        self.megabatches = megabatches
        self.val_fraction = val_fraction
        self.replay = replay
        self.replay_window = replay_window
        self.replay_buffer = replay_buffer
        self.seed = seed
        # The validation splits' seed; the replay buffer keeps drawing from the run's seed.
        self.split_seed = seed if stream_seed is None else stream_seed
        self._splits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._use(manifest, stream_seed)

    def _use(self, manifest: Manifest, stream_seed: int | None = None) -> None:
        shards = manifest.splits["train"].shards
        self.manifest = manifest
        self.train_split = manifest.splits["train"]
        # Megabatch t holds the shards at positions [bounds[t-1], bounds[t]) of this order:
        # as published (a stream), else equal up to one shard.
        self._order = (np.arange(len(shards)) if stream_seed is None
                       else numpy_rng(stream_seed, "shard-order").permutation(len(shards)))
        self._bounds = (list(manifest.stream.bounds) if manifest.stream is not None else
                        [t * len(shards) // self.megabatches
                         for t in range(self.megabatches + 1)])

    @property
    def published(self) -> int:
        """Megabatches whose data is here (all T, except for a stream still arriving)."""
        return len(self._bounds) - 1

    def extend(self, manifest: Manifest) -> None:
        """The stream's manifest with more megabatches published: the earlier ones are
        unchanged (their shards and bounds are a prefix of the new ones)."""
        if (manifest.stream is None or manifest.stream.bounds[: len(self._bounds)]
                != tuple(self._bounds)):
            raise DataError("the stream's manifest changed its published megabatches")
        self._use(manifest)

    def _check(self, t: int) -> None:
        if not 1 <= t <= self.megabatches:
            raise ValueError(f"megabatch {t} outside 1..{self.megabatches}")

    def megabatch_shards(self, t: int) -> list[ShardInfo]:
        self._check(t)
        if t > self.published:
            raise DataError(f"megabatch {t} of the stream has not arrived ({self.published} "
                            f"of {self.megabatches} published)")
        positions = np.sort(self._order[self._bounds[t - 1] : self._bounds[t]])
        return [self.train_split.shards[int(i)] for i in positions]

    def megabatch_split(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(train indices, validation indices) of megabatch t, each sorted."""
        if t not in self._splits:
            shards = self.megabatch_shards(t)
            indices = np.concatenate([np.arange(s.first_index, s.first_index + s.count)
                                      for s in shards])
            order = numpy_rng(self.split_seed, "val-split", t).permutation(indices.size)
            val_count = int(round(self.val_fraction * indices.size))
            val = np.sort(indices[order[:val_count]])
            train = np.sort(indices[order[val_count:]])
            self._splits[t] = (train, val)
        return self._splits[t]

    def _replayed(self, t: int, part: int) -> list[np.ndarray]:
        if self.replay == "full":
            return [self.megabatch_split(s)[part] for s in range(1, t + 1)]
        if self.replay == "none":
            return [self.megabatch_split(t)[part]]
        if self.replay == "window":
            first = max(1, t - self.replay_window + 1)
            return [self.megabatch_split(s)[part] for s in range(first, t + 1)]
        if self.replay == "buffer":
            earlier = [self.megabatch_split(s)[part] for s in range(1, t)]
            size = self.replay_buffer
            if part == 1:  # validation keeps the same train:val proportion as the data
                size = max(1, round(size * self.val_fraction / (1 - self.val_fraction)))
            history = np.concatenate(earlier) if earlier else np.array([], dtype=int)
            kept = reservoir(history, size, numpy_rng(self.seed, "replay-buffer", part))
            return [self.megabatch_split(t)[part], kept]
        raise ValueError(f"unknown replay policy '{self.replay}'")

    def train_selection(self, t: int) -> Selection:
        self._check(t)
        return _union(self.train_split, self._replayed(t, 0))

    def val_selection(self, t: int) -> Selection:
        self._check(t)
        return _union(self.train_split, self._replayed(t, 1))

    def test_selection(self) -> Selection:
        split = self.manifest.splits["test"]
        return Selection(split, np.arange(split.num_samples))

    def megabatch_train_size(self, t: int) -> int:
        return int(self.megabatch_split(t)[0].size)
