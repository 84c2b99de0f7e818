"""data.bad_samples=skip: bad samples are left out and counted, ranks stay in step, and a run
stopped by a bad sample resumes with skip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app_dist.data.augment import SampleTransform
from app_dist.data.batches import decode_samples, make_batches
from app_dist.data.cache import DecodedCache
from app_dist.data.manifest import Manifest
from app_dist.data.plan import split_for_workers
from app_dist.data.shard_files import ShardFiles
from app_dist.data.stream import MegabatchStream, Selection
from app_dist.foundations.errors import DataError

from .conftest import copy_shards, digits_run_args, first_sample_key, rewrite_shard, run_trainer

DAMAGES = {  # shard -> what is wrong with its first sample
    "train-000000.tar": lambda s: {**s, "cls": b"99"},  # label out of range
    "train-000001.tar": lambda s: {k: v for k, v in s.items() if k != "cls"},  # no label
    "train-000002.tar": lambda s: {**s, "png": b"\x89PNG not really"},  # undecodable
}


@pytest.fixture(scope="module")
def damaged(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shards = copy_shards(digits_shards, tmp_path_factory.mktemp("damaged") / "shards")
    for name, edit in DAMAGES.items():
        key = first_sample_key(shards, name)
        rewrite_shard(shards, name, lambda s, key=key, edit=edit: edit(s) if s["__key__"] == key
                      else s)
    return shards


def read_pass(shards: Path, *, train: bool, skip: bool, workers: int,
              cached: bool = False) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Every training-split sample of the first 4 shards in one pass: (batches, skipped)."""
    split = Manifest.load(str(shards)).splits["train"]
    selection = Selection(split, np.arange(4 * 25))
    plan = split_for_workers(list(selection.shard_counts), max(1, workers))
    transform = SampleTransform(1, "cifar", 0, train=train)
    options = {"transform": transform, "batch_size": 16, "train": train, "seed": 3,
               "shuffle_buffer": 40}
    if cached:
        cache = DecodedCache(1 << 30)
        assert cache.ensure(plan, selection, lambda s: decode_samples(
            ShardFiles(shards), s, channels=1, image_ext="png", num_classes=10, num_workers=workers,
            skip_bad=skip))
        batches = cache.batches(plan, selection, **options)
    else:
        batches = make_batches(ShardFiles(shards), plan, selection, image_ext="png",
                               num_classes=10, num_workers=workers, skip_bad=skip, **options)
    return list(batches), batches.skipped


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_leaves_bad_samples_out_and_counts_them(digits_shards, damaged, workers):
    in_shard_order, _ = read_pass(digits_shards, train=False, skip=True, workers=0)
    kept, skipped = read_pass(damaged, train=False, skip=True, workers=workers)
    assert skipped == 3
    clean_labels = torch.cat([labels for _, labels in in_shard_order])
    kept_labels = torch.cat([labels for _, labels in kept])
    # The first sample of shards 0, 1 and 2 (of 25 each) is gone. Two readers interleave
    # their batches, and one batch fewer shifts that interleaving: compare as multisets.
    survivors = clean_labels[[i for i in range(len(clean_labels)) if i not in (0, 25, 50)]]
    assert torch.equal(kept_labels.sort().values, survivors.sort().values)
    if workers == 0:
        assert torch.equal(kept_labels, survivors)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_refills_skipped_slots_so_every_rank_keeps_its_batch_count(digits_shards,
                                                                           damaged, workers):
    clean, _ = read_pass(digits_shards, train=True, skip=True, workers=workers)
    kept, skipped = read_pass(damaged, train=True, skip=True, workers=workers)
    assert skipped == 3
    assert [len(labels) for _, labels in kept] == [len(labels) for _, labels in clean]
    assert all(int(labels.max()) < 10 for _, labels in kept)


@pytest.mark.parametrize("train", [True, False])
def test_the_decoded_cache_skips_exactly_like_the_shard_readers(damaged, train):
    from_shards, skipped_shards = read_pass(damaged, train=train, skip=True, workers=2)
    from_cache, skipped_cache = read_pass(damaged, train=train, skip=True, workers=2,
                                          cached=True)
    assert skipped_cache == skipped_shards == 3
    assert len(from_cache) == len(from_shards)
    for (images_a, labels_a), (images_b, labels_b) in zip(from_shards, from_cache):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


@pytest.mark.parametrize("cached", [False, True])
def test_without_skip_a_bad_sample_is_an_error_naming_it(damaged, cached):
    with pytest.raises(DataError, match=r"train-00000[012]\.tar: sample \d+"):
        read_pass(damaged, train=False, skip=False, workers=1, cached=cached)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_run_stopped_by_a_bad_sample_resumes_with_skip_on_two_ranks(digits_shards, tmp_path):
    shards = copy_shards(digits_shards, tmp_path / "shards")
    manifest = Manifest.load(str(shards))
    last = MegabatchStream(manifest, 3, 0.1, "full", 2, 100, seed=1).megabatch_shards(3)[-1]
    key = first_sample_key(shards, last.name)
    rewrite_shard(shards, last.name,
                  lambda s: {**s, "cls": b"42"} if s["__key__"] == key else s)
    run_dir = tmp_path / "run"
    # Read by reader processes, not the decode-once cache: the regime in which a data error
    # once left the job hanging (readers ignore SIGTERM; see stop_readers).
    readers = "perf.cache_decoded=false"

    stopped = run_trainer(digits_run_args(shards, run_dir, readers), nproc=2)
    assert stopped.returncode != 0
    assert f"{last.name}: sample {key}: label 42 outside 0..9" in stopped.stderr
    assert [r["megabatch"] for r in map(json.loads, (run_dir / "metrics.jsonl").open())] == [1, 2]

    resumed = run_trainer(digits_run_args(shards, run_dir, readers, "data.bad_samples=skip"),
                          nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after megabatch 2" in resumed.stdout
    assert "skipped a bad sample (data.bad_samples=skip): shard" in resumed.stdout
    assert f"{last.name}: sample {key}" in resumed.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["megabatch"] for r in records] == [1, 2, 3]
    assert [r["skipped_samples"] > 0 for r in records] == [False, False, True]
    # Each of the 2 epochs (train or validation, whichever holds the sample) meets it once,
    # on whichever rank reads it; the count is summed over ranks.
    assert records[2]["skipped_samples"] in (1, 2, 3, 4)
