"""What prune.structure and the settings that go with it may say, checked when a config is
loaded: the N:M patterns (the masks themselves: n_m.py) and the channel criteria and budgets
(channels.py). Nothing here imports torch, so validating a config does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Group sizes accepted: 4 (2:4 is what torch's semi-structured kernels run) and 8 (4:8,
# NVIDIA's other published pattern; valid masks, no torch kernel).
GROUP_SIZES = (4, 8)
# Per-weight criteria whose scores compare weights within a group. SynFlow is left out: its
# iterated rounds prune towards an unstructured density and its scores rank for that mask.
N_M_CRITERIA = ("snip", "magnitude", "random", "grasp")
_PATTERN = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class NMPattern:
    """Keep at most `n` of every `m` consecutive weights (0 < n < m)."""

    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m


def parse_structure(text: str) -> NMPattern | None:
    """The N:M pattern a prune.structure value names, None for a word (unstructured, channel).
    Raises ValueError (one line) for an N:M text outside 0 < N < M, M in GROUP_SIZES."""
    found = _PATTERN.match(text.strip())
    if found is None:
        return None
    n, m = int(found.group(1)), int(found.group(2))
    if m not in GROUP_SIZES:
        raise ValueError(f"M must be one of {', '.join(map(str, GROUP_SIZES))} (got {text})")
    if not 0 < n < m:
        raise ValueError(f"N must be in 1..{m - 1} (got {text})")
    return NMPattern(n, m)


CHANNEL_CRITERIA = ("snip", "magnitude", "random")

# What a channel run's density schedule counts (prune.budget): the convolutions' weights, as
# unstructured runs do, or their multiply-accumulates (a weight costs its layer's output
# pixels), which is what inference time follows.
BUDGETS = ("weights", "flops")
