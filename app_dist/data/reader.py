"""Batches of one megabatch stream for this rank: training epochs, evaluation, scoring.

Every pass goes through `_batches`, which picks how the plan's samples are read: from the
decoded-sample cache (perf.cache_decoded), left encoded for GPU decoding (perf.gpu_decode)
or for a DALI pipeline (perf.loader=dali), or decoded by reader processes (started per
pass, or kept in a pool with perf.persistent_workers). All ways give the same batches in the
same order (DALI and GPU decoding: the same samples and draws, pixels to decoder rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from app_dist.config import DataSettings, PerfSettings, plain_perf, require_resolved
from app_dist.data.augment import SampleTransform
from app_dist.data.batches import decode_samples, make_batches
from app_dist.data.cache import DecodedCache
from app_dist.data.dali_decode import DaliDecoder
from app_dist.data.device_decode import Batch, decode_batch, decode_on_device
from app_dist.data.manifest import Manifest
from app_dist.data.plan import ShardCounts, evaluation_plan, training_plan
from app_dist.data.source import ShardSource
from app_dist.data.stream import MegabatchStream, Selection
from app_dist.data.workers import ReaderPool, start_reader_server
from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import ConfigError
from app_dist.foundations.seeding import derived_seed

# A decoded-cache fill of at most this many samples runs in the training process: starting
# reader processes (each rank's fork server imports torch: 2-3 s of a core) costs more than
# decoding a few thousand small images. Larger fills, and every pass the cache does not
# serve, use data.num_workers reader processes.
IN_PROCESS_DECODE = 4096


class Pass(Protocol):
    """One pass over batches of (images, labels). After it, `skipped` holds the bad samples
    it left out on this rank (data.bad_samples=skip)."""

    skipped: int

    def __iter__(self) -> Iterator: ...

    def __len__(self) -> int: ...


class StreamReader:
    def __init__(self, source: ShardSource, manifest: Manifest, stream: MegabatchStream,
                 settings: DataSettings, batch_per_rank: int, platform: Platform,
                 seed: int, perf: PerfSettings | None = None) -> None:
        self.source = source
        self.manifest = manifest
        self.stream = stream
        self.settings = settings
        self.batch_per_rank = batch_per_rank
        self.platform = platform
        self.seed = seed
        self.perf = perf or plain_perf()
        require_resolved(self.perf)
        channels, augment, size = manifest.channels, settings.augment, settings.image_size
        self.train_transform = SampleTransform(channels, augment, size, train=True)
        self.eval_transform = SampleTransform(channels, augment, size, train=False)
        on_gpu = platform.device.type == "cuda"
        self.pin_memory = on_gpu and self.perf.pin_memory
        self.cache = (DecodedCache(self.perf.cache_max_mb << 20) if self.perf.cache_decoded
                      else None)
        self.pool = (ReaderPool(settings.num_workers, self.pin_memory)
                     if self.perf.persistent_workers and settings.num_workers > 0 else None)
        self.decode_device = platform.device if self.perf.gpu_decode else None
        if self.perf.gpu_decode and (not on_gpu or manifest.image_format != "jpg"):
            raise ConfigError(
                "config key 'perf.gpu_decode' = True: needs JPEG shards and a GPU (shards are "
                f"{manifest.image_format}, the device is {platform.device.type})")
        # perf.loader=dali: the same readers send encoded batches, DALI decodes them (on this
        # device: nvJPEG on a GPU, DALI's CPU operators on a CPU-only machine).
        self.dali = (DaliDecoder(platform.device, settings.num_workers)
                     if self.perf.loader == "dali" else None)
        if self.dali is not None and manifest.image_format != "jpg":
            raise ConfigError("config key 'perf.loader' = 'dali': needs JPEG shards (shards "
                              f"are {manifest.image_format}); use perf.loader=torch")
        self.skip_bad = settings.bad_samples == "skip"
        self.eval_batch_size = settings.eval_batch_size or (512 if on_gpu else batch_per_rank)
        self.prefetched: list[str] = []  # shard files asked for ahead of their megabatch
        if settings.num_workers > 0 and self._needs_readers():
            start_reader_server(settings.num_workers)  # its imports overlap the start-up

    def _needs_readers(self) -> bool:
        """Whether passes will use reader processes: unless the decoded cache serves them all
        and each fill (a megabatch's new samples, the test split) is decoded in-process."""
        if self.cache is None or self.dali is not None or self.decode_device is not None:
            return True
        splits = self.manifest.splits
        largest_fill = max(splits["test"].num_samples,
                           -(-splits["train"].num_samples // self.stream.megabatches))
        return largest_fill > IN_PROCESS_DECODE

    def train_epoch(self, megabatch: int, epoch: int) -> Pass:
        """Shuffled, augmented full batches; the same count on every rank."""
        selection = self.stream.train_selection(megabatch)
        plan = training_plan(selection, seed=self.seed, megabatch=megabatch, epoch=epoch,
                             rank=self.platform.rank, world_size=self.platform.world_size,
                             num_workers=self.settings.num_workers,
                             batch_size=self.batch_per_rank)
        if epoch == 0 and self.perf.prefetch_shards:
            self.prefetch_next(megabatch)
        seed = derived_seed(self.seed, "train-epoch", megabatch, epoch, self.platform.rank)
        return self._batches(plan.worker_shards, selection, transform=self.train_transform,
                             batch_size=self.batch_per_rank, train=True, seed=seed,
                             shuffle_buffer=self.settings.shuffle_buffer, count=plan.batches)

    def evaluation(self, selection: Selection) -> Pass:
        """This rank's share of `selection`, unaugmented, every sample exactly once."""
        plan = evaluation_plan(selection, rank=self.platform.rank,
                               world_size=self.platform.world_size,
                               num_workers=self.settings.num_workers)
        return self._batches(plan, selection, transform=self.eval_transform,
                             batch_size=self.eval_batch_size, train=False,
                             seed=self.seed)

    def scoring(self, megabatch: int, fraction: float, whole: bool = False) -> Pass:
        """This rank's share of the scoring sample: the first `fraction` x megabatch size
        samples of the current training set, unaugmented, in training-sized batches; with
        `whole` (prune.scoring=whole) all of it, in global-batch-sized batches read as one
        rank of one would, so that every rank and every number of ranks sees the same
        batches. It skips bad samples without a log line and is not counted in
        skipped_samples: every sample it reads is read (logged, counted) again by each
        training epoch of the megabatch."""
        count = max(1, round(fraction * self.stream.megabatch_train_size(megabatch)))
        selection = self.stream.train_selection(megabatch).first(count)
        rank, ranks = (0, 1) if whole else (self.platform.rank, self.platform.world_size)
        plan = evaluation_plan(selection, rank=rank, world_size=ranks,
                               num_workers=self.settings.num_workers)
        batch_size = self.batch_per_rank * (self.platform.world_size if whole else 1)
        return self._batches(plan, selection, transform=self.eval_transform,
                             batch_size=batch_size, train=False, seed=self.seed,
                             log_skips=False)

    def _batches(self, plan: list[ShardCounts], selection: Selection, *,
                 transform: SampleTransform, batch_size: int, train: bool, seed: int,
                 shuffle_buffer: int = 1, count: int | None = None,
                 log_skips: bool = True) -> Pass:
        options = {"transform": transform, "batch_size": batch_size, "train": train,
                   "seed": seed, "shuffle_buffer": shuffle_buffer, "count": count}
        if self.cache is not None and self.cache.ensure(plan, selection, self._decode):
            return self.cache.batches(plan, selection, pin_memory=self.pin_memory, **options)
        self.source.ensure(shard for shards in plan for shard, _ in shards)
        batches = make_batches(self.source.files, plan, selection,
                               image_ext=self.manifest.image_format,
                               num_classes=self.manifest.num_classes,
                               num_workers=self.settings.num_workers,
                               pin_memory=self.pin_memory, pool=self.pool,
                               encoded=self.decode_device is not None or self.dali is not None,
                               skip_bad=self.skip_bad, log_skips=log_skips, **options)
        if self.dali is not None:
            return _OnDevice(batches, transform, self.platform.device, self.dali)
        if self.decode_device is None:
            return batches
        return _OnDevice(batches, transform, self.decode_device)

    def _decode(self, selection: Selection) -> Iterable:
        self.source.ensure(shard for shard, _ in selection.shard_counts)
        workers = 0 if len(selection) <= IN_PROCESS_DECODE else self.settings.num_workers
        return decode_samples(self.source.files, selection, channels=self.manifest.channels,
                              image_ext=self.manifest.image_format,
                              num_classes=self.manifest.num_classes, num_workers=workers,
                              pool=self.pool if workers else None, skip_bad=self.skip_bad)

    def prefetch_next(self, megabatch: int) -> None:
        """Get megabatch+1's new shards ready in the background while this megabatch trains
        (fetched into the shard cache, or read into the OS's page cache): the first epoch
        that reads them does not wait for them."""
        if megabatch >= self.stream.published:  # the last, or the next has not arrived
            return
        shards = self.stream.megabatch_shards(megabatch + 1)
        self.prefetched = [str(self.source.files.path(shard)) for shard in shards]
        self.source.prefetch(shards)


class _OnDevice:
    """Encoded batches decoded on the device (perf.gpu_decode), or by DALI (perf.loader=dali,
    `decode` its DaliDecoder)."""

    def __init__(self, batches: Iterable, transform: SampleTransform, device,
                 decode: Callable[..., Batch] = decode_batch) -> None:
        self.batches = batches
        self.transform = transform
        self.device = device
        self.decode = decode

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    @property
    def skipped(self) -> int:
        return self.batches.skipped  # type: ignore[attr-defined]

    def __iter__(self):
        return decode_on_device(self.batches, self.transform, self.device, self.decode)
