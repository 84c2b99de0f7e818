"""Batches of one megabatch stream for this rank: training epochs, evaluation, scoring."""

from __future__ import annotations

from pathlib import Path

from app_dist.config import DataSettings
from app_dist.data.augment import SampleTransform
from app_dist.data.loader import Batches, evaluation_plan, make_batches, training_plan
from app_dist.data.manifest import Manifest
from app_dist.data.stream import MegabatchStream, Selection
from app_dist.distributed import Platform
from app_dist.seeding import derived_seed


class StreamReader:
    def __init__(self, directory: Path, manifest: Manifest, stream: MegabatchStream,
                 settings: DataSettings, batch_per_rank: int, platform: Platform,
                 seed: int) -> None:
        self.directory = directory
        self.manifest = manifest
        self.stream = stream
        self.settings = settings
        self.batch_per_rank = batch_per_rank
        self.platform = platform
        self.seed = seed
        channels, augment, size = manifest.channels, settings.augment, settings.image_size
        self.train_transform = SampleTransform(channels, augment, size, train=True)
        self.eval_transform = SampleTransform(channels, augment, size, train=False)

    def _common(self) -> dict:
        return {
            "image_ext": self.manifest.image_format,
            "num_classes": self.manifest.num_classes,
            "num_workers": self.settings.num_workers,
            "pin_memory": self.platform.device.type == "cuda",
        }

    def train_epoch(self, megabatch: int, epoch: int) -> Batches:
        """Shuffled, augmented full batches; the same count on every rank."""
        selection = self.stream.train_selection(megabatch)
        plan = training_plan(selection, seed=self.seed, megabatch=megabatch, epoch=epoch,
                             rank=self.platform.rank, world_size=self.platform.world_size,
                             num_workers=self.settings.num_workers,
                             batch_size=self.batch_per_rank)
        seed = derived_seed(self.seed, "train-epoch", megabatch, epoch, self.platform.rank)
        return make_batches(self.directory, plan.worker_shards, selection,
                            transform=self.train_transform, batch_size=self.batch_per_rank,
                            train=True, seed=seed, shuffle_buffer=self.settings.shuffle_buffer,
                            count=plan.batches, **self._common())

    def evaluation(self, selection: Selection) -> Batches:
        """This rank's share of `selection`, unaugmented, every sample exactly once."""
        plan = evaluation_plan(selection, rank=self.platform.rank,
                               world_size=self.platform.world_size,
                               num_workers=self.settings.num_workers)
        return make_batches(self.directory, plan, selection, transform=self.eval_transform,
                            batch_size=self.settings.eval_batch_size, train=False, seed=self.seed,
                            **self._common())

    def scoring(self, megabatch: int, fraction: float) -> Batches:
        """This rank's share of the scoring sample: the first `fraction` x megabatch size
        samples of the current training set, unaugmented, in training-sized batches."""
        count = max(1, round(fraction * self.stream.megabatch_train_size(megabatch)))
        selection = self.stream.train_selection(megabatch).first(count)
        plan = evaluation_plan(selection, rank=self.platform.rank,
                               world_size=self.platform.world_size,
                               num_workers=self.settings.num_workers)
        return make_batches(self.directory, plan, selection, transform=self.eval_transform,
                            batch_size=self.batch_per_rank, train=False, seed=self.seed,
                            **self._common())
