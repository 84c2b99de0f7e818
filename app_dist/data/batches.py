"""A plan's batches as one pass: `make_batches` (training, evaluation, scoring) and
`decode_samples` (filling the decoded-sample cache) run the plan's readers in reader processes
and hand the result to `Batches`, which yields exactly the promised batches, sums the bad
samples the readers skipped, and raises when the shards hold fewer samples than the manifest
promises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from app_dist.data.augment import SampleTransform
from app_dist.data.pipeline import DecodeReader, ShardReader, unpack
from app_dist.data.plan import ShardCounts, split_for_workers
from app_dist.data.shard_files import ShardFiles
from app_dist.data.stream import Selection
from app_dist.data.workers import ReaderPool, reader_loader
from app_dist.foundations.errors import DataError


def make_batches(files: ShardFiles, worker_shards: list[ShardCounts], selection: Selection, *,
                 transform: SampleTransform, image_ext: str, num_classes: int, batch_size: int,
                 num_workers: int, train: bool, seed: int, shuffle_buffer: int = 1,
                 count: int | None = None, pin_memory: bool = False,
                 pool: ReaderPool | None = None, encoded: bool = False,
                 skip_bad: bool = False, log_skips: bool = True) -> Batches:
    """A batch iterable over the reader plan. Training: shuffled, full batches only, exactly
    `count` of them. Evaluation: in order, partial last batches, every planned sample once.
    With a `pool`, its persistent workers read; `encoded` batches are left for
    `device_decode.decode_on_device`. `skip_bad`: bad samples are skipped and counted
    instead of raising (training refills their slots, evaluation leaves them out), each with
    a log line unless `log_skips` is False."""
    reader = ShardReader(files, worker_shards, selection, transform, image_ext, num_classes,
                         batch_size, drop_last=train, shuffle_buffer=shuffle_buffer if train else 1,
                         seed=seed, encoded=encoded, skip_bad=skip_bad, log_skips=log_skips)
    expected = None if train else sum(count for shards in worker_shards for _, count in shards)
    return Batches(reader_loader(reader, num_workers, pin_memory, pool), count, expected,
                   count_every_skip=skip_bad)


def decode_samples(files: ShardFiles, selection: Selection, *, channels: int, image_ext: str,
                   num_classes: int, num_workers: int, pool: ReaderPool | None = None,
                   skip_bad: bool = False,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
    """Every sample of `selection`, decoded and not augmented, in chunks of (indices,
    labels, images) read by up to `num_workers` processes in any order. Raises DataError
    when the shards hold fewer of them than the manifest promises. With `skip_bad`, bad
    samples are left out of the chunks instead of raising."""
    readers = split_for_workers(list(selection.shard_counts), num_workers)
    transform = SampleTransform(channels, "none", 0, train=False)
    reader = DecodeReader(files, readers, selection, transform, image_ext, num_classes,
                          batch_size=DecodeReader.CHUNK, drop_last=False, shuffle_buffer=1,
                          seed=0, skip_bad=skip_bad)
    for indices, labels, flat, shapes in Batches(reader_loader(reader, num_workers, False, pool),
                                                 None, len(selection)):
        yield indices, labels, unpack(flat, shapes)


class Batches:
    """Exactly `count` batches from a DataLoader (or all of them when count is None).

    Readers send each batch with the number of bad samples they skipped before it; those
    counts are summed into `skipped` and stripped, so consumers see (images, labels).
    `count_every_skip` (data.bad_samples=skip): after the `count`-th batch the readers are
    read to their end, their batches dropped, so that `skipped` counts every bad sample of
    the plan once, also those in a batch past the agreed count or in a reader's dropped
    remainder (else the count depends on where the shuffle put them)."""

    def __init__(self, loader: Iterable, count: int | None, expected_samples: int | None,
                 count_every_skip: bool = False) -> None:
        self.loader = loader
        self.count = count
        self.expected_samples = expected_samples
        self.count_every_skip = count_every_skip
        self.skipped = 0

    def __len__(self) -> int:
        return self.count if self.count is not None else len(self.loader)  # type: ignore

    def __iter__(self) -> Iterator:
        self.skipped = 0
        if self.count == 0:
            return
        iterator = iter(self.loader)
        seen = produced = 0
        try:
            for *batch, skipped in iterator:
                self.skipped += int(skipped)
                if len(batch[1]) == 0 or produced == self.count:
                    continue  # a reader's closing report of skipped samples, or a drained batch
                seen += len(batch[1])
                produced += 1
                yield tuple(batch)
                if produced == self.count and not self.count_every_skip:
                    return
            if produced == self.count:
                return
        except Exception:
            # A reader's error keeps the iterator alive in its traceback, and with it worker
            # processes that ignore SIGTERM: stop them now, or the exit waits for them.
            _stop_workers(iterator)
            raise
        finally:
            del iterator  # shuts the workers down when we stop before the end
        if self.count is not None:
            raise DataError(f"shards yielded fewer than the {self.count} batches "
                            "their manifest promises: a shard is truncated?")
        if self.expected_samples is not None and seen + self.skipped != self.expected_samples:
            raise DataError(f"read {seen + self.skipped} samples where the manifest promises "
                            f"{self.expected_samples}: a shard is truncated or altered")


def _stop_workers(iterator: Iterator) -> None:
    shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
    if shutdown is not None:
        shutdown()
