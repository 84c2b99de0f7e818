"""Derived seeds: every random choice is a pure function of the run seed and named coordinates.

Data order, augmentation, the random criterion and the replay buffer each draw from their own
stream, keyed by (seed, purpose, megabatch, epoch, rank, worker), so that no two of them share
state and a resumed run replays exactly what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import zlib

import numpy as np


def derived_seed(seed: int, purpose: str, *coordinates: int) -> int:
    """A 63-bit seed for `purpose` at `coordinates`, the same in every process."""
    entropy = [seed, zlib.crc32(purpose.encode()), *coordinates]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def numpy_rng(seed: int, purpose: str, *coordinates: int) -> np.random.Generator:
    return np.random.default_rng(derived_seed(seed, purpose, *coordinates))
