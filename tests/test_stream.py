import numpy as np
import pytest
import torch

from app_dist.config import DataSettings
from app_dist.data.manifest import Manifest
from app_dist.data.plan import training_plan
from app_dist.data.reader import StreamReader
from app_dist.data.source import LocalShards
from app_dist.data.stream import MegabatchStream, reservoir
from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import DataError


def make_stream(shards, replay="full", megabatches=4, **kw):
    return MegabatchStream(Manifest.load(shards), megabatches, 0.1, replay, kw.get("window", 2),
                           kw.get("buffer", 100), seed=1)


def test_megabatches_are_disjoint_slices_with_a_seeded_90_10_split(digits_shards):
    stream = make_stream(digits_shards)
    seen = []
    for t in range(1, 5):
        train, val = stream.megabatch_split(t)
        assert len(val) == round(0.1 * (len(train) + len(val)))
        assert not set(train) & set(val)
        seen.extend(train.tolist() + val.tolist())
    assert sorted(seen) == list(range(1500))
    again = make_stream(digits_shards)
    assert np.array_equal(again.megabatch_split(3)[1], stream.megabatch_split(3)[1])
    other = MegabatchStream(Manifest.load(digits_shards), 4, 0.1, "full", 2, 100, seed=2)
    assert not np.array_equal(other.megabatch_split(3)[1], stream.megabatch_split(3)[1])


def test_a_stream_seed_varies_which_shards_each_megabatch_holds_and_the_val_splits(
        digits_shards):
    """Issue 14: run.seed never changed megabatch membership (fixed by the shard writer), so
    "N seeds" varied only initialisation and augmentation. data.stream_seed permutes the
    training shards into megabatches and draws the validation splits."""
    manifest = Manifest.load(digits_shards)

    def stream(run_seed: int, stream_seed: int | None) -> MegabatchStream:
        return MegabatchStream(manifest, 4, 0.1, "full", 2, 100, seed=run_seed,
                               stream_seed=stream_seed)

    def membership(s: MegabatchStream) -> list[list[str]]:
        return [[shard.name for shard in s.megabatch_shards(t)] for t in range(1, 5)]

    written = membership(stream(1, None))
    shards = [shard.name for shard in manifest.splits["train"].shards]
    bounds = [t * len(shards) // 4 for t in range(5)]
    assert written == [shards[bounds[t]:bounds[t + 1]] for t in range(4)]  # as before
    seeded = membership(stream(1, 5))
    assert seeded != written and membership(stream(9, 5)) == seeded  # the run seed: no effect
    assert sorted(sum(seeded, [])) == sorted(shards)  # a partition of every training shard
    assert [len(m) for m in seeded] == [len(m) for m in written]  # equal up to one shard
    assert membership(stream(1, 6)) != seeded
    for t in range(1, 5):
        train, val = stream(1, 5).megabatch_split(t)
        held = {i for s in stream(1, 5).megabatch_shards(t)
                for i in range(s.first_index, s.first_index + s.count)}
        assert set(train) | set(val) == held and not set(train) & set(val)
    # The validation split follows the stream seed when one is set, else the run seed.
    assert np.array_equal(stream(1, 5).megabatch_split(2)[1], stream(2, 5).megabatch_split(2)[1])
    assert not np.array_equal(stream(1, None).megabatch_split(2)[1],
                              stream(2, None).megabatch_split(2)[1])


def test_replay_policies_select_what_the_spec_says(digits_shards):
    full, none = make_stream(digits_shards, "full"), make_stream(digits_shards, "none")
    window = make_stream(digits_shards, "window", window=2)
    buffer = make_stream(digits_shards, "buffer", buffer=100)
    parts = [set(full.megabatch_split(t)[0].tolist()) for t in range(1, 5)]
    assert set(full.train_selection(3).indices.tolist()) == parts[0] | parts[1] | parts[2]
    assert set(none.train_selection(3).indices.tolist()) == parts[2]
    assert set(window.train_selection(3).indices.tolist()) == parts[1] | parts[2]
    chosen = set(buffer.train_selection(3).indices.tolist())
    assert parts[2] <= chosen and len(chosen - parts[2]) == 100
    assert (chosen - parts[2]) <= parts[0] | parts[1]


def test_reservoir_is_uniform_sized_and_prefix_consistent():
    items = np.arange(1000)
    kept = reservoir(items, 50, np.random.default_rng(0))
    assert len(set(kept.tolist())) == 50
    assert np.array_equal(kept, reservoir(items, 50, np.random.default_rng(0)))


def test_more_megabatches_than_shards_is_refused(digits_shards):
    with pytest.raises(DataError, match="megabatches=61"):
        make_stream(digits_shards, megabatches=61)


@pytest.mark.parametrize("world_size, workers", [(2, 1), (2, 2), (3, 2)])
def test_every_rank_plans_the_same_batch_count(digits_shards, world_size, workers):
    stream = make_stream(digits_shards, megabatches=4)
    for t in range(1, 5):
        for epoch in range(3):
            plans = [training_plan(stream.train_selection(t), seed=1, megabatch=t, epoch=epoch,
                                   rank=r, world_size=world_size, num_workers=workers,
                                   batch_size=16) for r in range(world_size)]
            assert len({p.batches for p in plans}) == 1
            shards = [s.name for p in plans for w in p.worker_shards for s, _ in w]
            assert len(shards) == len(set(shards))  # no shard read by two ranks or readers


def reader_for(shards, rank, world_size, workers=2):
    manifest = Manifest.load(shards)
    stream = make_stream(shards)
    settings = DataSettings(shards=str(shards), augment="none", num_workers=workers,
                            shuffle_buffer=64)
    platform = Platform(rank, world_size, rank, torch.device("cpu"))
    return StreamReader(LocalShards(shards), manifest, stream, settings, 16, platform, seed=1)


def test_ranks_yield_equal_batch_counts_of_disjoint_samples(digits_shards):
    batches = [list(reader_for(digits_shards, r, 2).train_epoch(2, 0)) for r in range(2)]
    assert len(batches[0]) == len(batches[1]) > 0
    assert all(images.shape == (16, 1, 8, 8) and images.dtype == torch.uint8
               for rank in batches for images, _ in rank)


def test_data_order_is_a_pure_function_of_seed_megabatch_epoch_rank(digits_shards):
    def labels(reader, epoch):
        return torch.cat([y for _, y in reader.train_epoch(2, epoch)])

    a, b = reader_for(digits_shards, 0, 2), reader_for(digits_shards, 0, 2)
    assert torch.equal(labels(a, 0), labels(b, 0))
    assert not torch.equal(labels(a, 0), labels(a, 1))


def test_evaluation_reads_every_sample_exactly_once_across_ranks(digits_shards):
    stream = make_stream(digits_shards)
    counts = [sum(len(y) for _, y in reader_for(digits_shards, r, 3).evaluation(
        stream.test_selection())) for r in range(3)]
    assert sum(counts) == 297
