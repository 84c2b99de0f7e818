"""Selections -> batches, reading WebDataset shards in DataLoader workers.

Shards are split first across ranks, then across each rank's workers (explicit node and
worker splitters), after a per-epoch seeded shuffle of the shard list. Because the manifest
gives exact sample counts, every rank computes every rank's plan without communicating and
they all agree on one batch count per epoch: no rank runs out early and hangs DDP.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import queue as queue_module
import select
import signal
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from app_dist.data.augment import Draw, SampleTransform, decode
from app_dist.data.manifest import ShardInfo
from app_dist.data.prepare.sources import image_header
from app_dist.data.stream import Selection
from app_dist.foundations.errors import DataError
from app_dist.foundations.seeding import derived_seed, numpy_rng

ShardCounts = list[tuple[ShardInfo, int]]
T = TypeVar("T")
log = logging.getLogger("app_dist")


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

    def __init__(self, directory: Path, worker_shards: list[ShardCounts], selection: Selection,
                 transform: SampleTransform, image_ext: str, num_classes: int, batch_size: int,
                 drop_last: bool, shuffle_buffer: int, seed: int, encoded: bool = False,
                 skip_bad: bool = False) -> None:
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
        self.encoded = encoded
        self.skip_bad = skip_bad

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
        log.warning("skipped a bad sample (data.bad_samples=skip): %s", error)
        tally.count += 1

    def _samples(self, worker: int) -> Iterator[dict]:
        """The selected samples of the worker's shards, in shard order, with their labels."""
        pipeline = wds.DataPipeline(
            lambda: _open_local_shards(self.urls[worker]),
            lambda streams: wds.tariterators.tar_file_expander(streams,
                                                               handler=_raise_naming_shard),
            lambda files: wds.tariterators.group_by_keys(files, handler=_raise_naming_shard),
            self._selected,
        )
        return iter(pipeline)

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


def _start_reader(trainer_pid: int, worker_id: int) -> None:
    """A pre-emption notice is for the training process to act on (finish the step, write a
    checkpoint); readers must not die first and break the step in flight, so they ignore
    SIGTERM. They end with the trainer instead: `stop_readers` kills them on its way out, and
    `_exit_with` ends them when it is gone, however it went (SIGKILL included)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with(trainer_pid)
    if not logging.getLogger().handlers:
        # A fresh process: log skipped samples the way the trainer logs.
        logging.basicConfig(format="[app-dist] %(message)s", stream=sys.stdout,
                            level=logging.INFO)


def _exit_with(trainer_pid: int) -> None:
    """Exit this reader as soon as the training process ends. A reader's parent is the fork
    server, which lives as long as any reader does, so torch's own check (has my parent
    changed?) never fires, and a reader blocked on a full queue would never check at all."""
    try:
        handle = os.pidfd_open(trainer_pid)
    except ProcessLookupError:  # it ended while this reader was starting
        os._exit(0)
    except (AttributeError, OSError):  # not Linux >= 5.3: torch's own check remains
        return

    def watch() -> None:
        select.select([handle], [], [])  # readable once the process has exited
        os._exit(0)

    threading.Thread(target=watch, name="app-dist-trainer-watch", daemon=True).start()


def stop_readers() -> None:
    """Kill reader processes still alive (an error left an epoch unfinished). Call before the
    process exits: multiprocessing would otherwise SIGTERM them, which they ignore, and wait
    for them forever."""
    # torch's SIGCHLD handler would report these deliberate kills as a crashed worker. It is
    # only ever installed from the main thread (a Ray Train worker runs us in another one,
    # where signal.signal itself would raise).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
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
    """Exactly `count` batches from a DataLoader (or all of them when count is None).

    Readers send each batch with the number of bad samples they skipped before it; those
    counts are summed into `skipped` and stripped, so consumers see (images, labels)."""

    def __init__(self, loader: Iterable, count: int | None, expected_samples: int | None) -> None:
        self.loader = loader
        self.count = count
        self.expected_samples = expected_samples
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
                if len(batch[1]) == 0:
                    continue  # a reader's closing report of skipped samples
                seen += len(batch[1])
                produced += 1
                yield tuple(batch)
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


class ReaderPool:
    """DataLoader worker processes that live for the whole run (perf.persistent_workers)
    instead of being started for every pass. Each pass hands every worker its reader (the
    same ShardReader a one-pass DataLoader would pickle) through the worker's own queue;
    torch restarts the persistent workers' iteration and each one reads its share. Workers
    beyond the pass's reader count read nothing, which keeps the batch order of a one-pass
    DataLoader with one worker per reader."""

    def __init__(self, num_workers: int, pin_memory: bool) -> None:
        context = reader_context()
        self.jobs = [context.Queue() for _ in range(num_workers)]
        self.loader = DataLoader(_PooledReader(self.jobs), batch_size=None,
                                 num_workers=num_workers, persistent_workers=True,
                                 multiprocessing_context=context, pin_memory=pin_memory,
                                 prefetch_factor=4,
                                 worker_init_fn=partial(_start_reader, os.getpid()))
        # Registered after multiprocessing's own exit handler, so it runs first: the workers
        # ignore SIGTERM, and multiprocessing would terminate them with it and wait forever.
        atexit.register(_close_pool, weakref.ref(self))

    def pass_over(self, reader: ShardReader) -> Iterable:
        return _PoolPass(self, reader)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the pool is garbage collected)."""
        iterator = self.loader._iterator
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None


def _close_pool(pool: weakref.ref) -> None:
    alive = pool()
    if alive is not None:
        alive.close()


class _PoolPass:
    def __init__(self, pool: ReaderPool, reader: ShardReader) -> None:
        self.pool = pool
        self.reader = reader

    def __iter__(self) -> Iterator:
        # The job is queued before the iteration starts, so a worker always finds it there.
        for queue in self.pool.jobs:
            queue.put(self.reader)
        return iter(self.pool.loader)


class _PooledReader(IterableDataset):
    JOB_TIMEOUT_S = 600

    def __init__(self, jobs: list) -> None:
        super().__init__()
        self.jobs = jobs

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        assert info is not None, "a pooled reader runs in DataLoader workers only"
        try:
            job = self.jobs[info.id].get(timeout=self.JOB_TIMEOUT_S)
        except queue_module.Empty:
            raise DataError(f"reader process {info.id} received no work for "
                            f"{self.JOB_TIMEOUT_S} s") from None
        while True:  # a pass stopped before this worker started leaves its job behind
            try:
                job = self.jobs[info.id].get_nowait()
            except queue_module.Empty:
                break
        return job.read(info.id)


def make_batches(directory: Path, worker_shards: list[ShardCounts], selection: Selection, *,
                 transform: SampleTransform, image_ext: str, num_classes: int, batch_size: int,
                 num_workers: int, train: bool, seed: int, shuffle_buffer: int = 1,
                 count: int | None = None, pin_memory: bool = False,
                 pool: ReaderPool | None = None, encoded: bool = False,
                 skip_bad: bool = False) -> Batches:
    """A batch iterable over the reader plan. Training: shuffled, full batches only, exactly
    `count` of them. Evaluation: in order, partial last batches, every planned sample once.
    With a `pool`, its persistent workers read; `encoded` batches are left for
    `device_decode.decode_on_device`. `skip_bad`: bad samples are skipped and counted
    instead of raising (training refills their slots, evaluation leaves them out)."""
    reader = ShardReader(directory, worker_shards, selection, transform, image_ext, num_classes,
                         batch_size, drop_last=train, shuffle_buffer=shuffle_buffer if train else 1,
                         seed=seed, encoded=encoded, skip_bad=skip_bad)
    expected = None if train else sum(count for shards in worker_shards for _, count in shards)
    return Batches(_loader(reader, num_workers, pin_memory, pool), count, expected)


def _loader(reader: ShardReader, num_workers: int, pin_memory: bool,
            pool: ReaderPool | None) -> Iterable:
    if pool is not None and num_workers > 0:
        return pool.pass_over(reader)
    processes = len(reader.urls) if num_workers > 0 else 0
    return DataLoader(reader, batch_size=None, num_workers=processes, pin_memory=pin_memory,
                      prefetch_factor=4 if processes else None,
                      multiprocessing_context=reader_context() if processes else None,
                      worker_init_fn=partial(_start_reader, os.getpid()) if processes else None)


def reader_context() -> multiprocessing.context.BaseContext:
    """Reader processes start from a fork server, not as forks of the training process. A fork
    copies every lock that another thread holds at that instant (a finished pass's queue
    feeder thread exiting, gloo's or wandb's threads), and the reader can wait on it forever;
    this was seen as a reader stuck in CPython's after-fork thread cleanup. The server is a
    fresh single-threaded process that has imported the reading code once, so starting a
    reader from it is still cheap."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context()  # no fork server (Windows): spawn
    # app_dist.train too: every reader re-runs the main script (`app_dist/train.py`), and
    # with its imports already loaded that costs milliseconds instead of 0.2 s per reader.
    multiprocessing.set_forkserver_preload(["app_dist.data.loader", "app_dist.train"])
    return multiprocessing.get_context("forkserver")


def start_reader_server(num_workers: int) -> None:
    """Start the fork server now, so that its imports (2-3 s) overlap the trainer's own
    start-up instead of delaying the first pass."""
    if num_workers > 0 and reader_context().get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()


def decode_samples(directory: Path, selection: Selection, *, channels: int, image_ext: str,
                   num_classes: int, num_workers: int, pool: ReaderPool | None = None,
                   skip_bad: bool = False,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
    """Every sample of `selection`, decoded and not augmented, in chunks of (indices,
    labels, images) read by up to `num_workers` processes in any order. Raises DataError
    when the shards hold fewer of them than the manifest promises. With `skip_bad`, bad
    samples are left out of the chunks instead of raising."""
    readers = split_for_workers(list(selection.shard_counts), num_workers)
    transform = SampleTransform(channels, "none", 0, train=False)
    reader = DecodeReader(directory, readers, selection, transform, image_ext, num_classes,
                          batch_size=DecodeReader.CHUNK, drop_last=False, shuffle_buffer=1,
                          seed=0, skip_bad=skip_bad)
    for indices, labels, flat, shapes in Batches(_loader(reader, num_workers, False, pool),
                                                 None, len(selection)):
        yield indices, labels, unpack(flat, shapes)
