"""Which samples each rank and each of its readers reads, per epoch: pure data plans.

Shards are split first across ranks, then across each rank's workers (explicit node and
worker splitters), after a per-epoch seeded shuffle of the shard list. Because the manifest
gives exact sample counts, every rank computes every rank's plan without communicating and
they all agree on one batch count per epoch: no rank runs out early and hangs DDP. Nothing
here reads a shard; `app_dist.data.batches` reads what a plan names.
"""

from __future__ import annotations

from dataclasses import dataclass

from app_dist.data.manifest import ShardInfo
from app_dist.data.stream import Selection
from app_dist.foundations.errors import DataError
from app_dist.foundations.seeding import numpy_rng

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
