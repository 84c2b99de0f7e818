"""Put a trial's last reported megabatch checkpoint where the trainer looks for it.

Ray Train keeps a copy of every checkpoint a trial reported (in the sweep's storage) and hands
the newest one to a restarted trial through `ray.train.get_checkpoint()`. The trainer resumes
from RUN_DIR/checkpoints/megabatch-NNNN/ by itself, so a restart only has to make that folder
hold the reported checkpoint. The reported one is the truth: Tune has seen exactly the
megabatches up to it, so a newer local checkpoint that was written but never reported (the
trial died between the two) is set aside and its megabatch trained again, which keeps one
report per megabatch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from app_dist.foundations.errors import CheckpointError
from app_dist.foundations.run_layout import RunLayout
from app_dist.training.checkpoint import MARKER, verify

log = logging.getLogger("app_dist")


@dataclass(frozen=True)
class Restored:
    megabatch: int
    copied: bool  # False: the run directory already held this checkpoint, byte for byte
    set_aside: tuple[Path, ...]  # newer, unreported checkpoints moved out of the trainer's way


def restore_reported_checkpoint(reported: Path, run_dir: Path) -> Restored:
    """Make `run_dir` resume from the checkpoint folder `reported` (verified by the sha256 in
    its COMPLETE.json). Call on one process only; the others must wait for it."""
    problem = verify(reported)
    if problem:
        raise CheckpointError(f"reported checkpoint {reported}: {problem}")
    marker = json.loads((reported / MARKER).read_text())
    megabatch = int(marker["megabatch"])
    target = RunLayout(run_dir).checkpoint(megabatch)
    held = target.is_dir() and verify(target) is None and _same_marker(target, reported)
    # A pre-emption checkpoint inside the next megabatch continues the local lineage: keep it
    # only when the local checkpoint it grew from is the reported one.
    set_aside = set_aside_unreported(run_dir, after=megabatch, keep_next_partial=held)
    if held:
        return Restored(megabatch, copied=False, set_aside=set_aside)
    staging = RunLayout.staging(target)
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(reported, staging)
    problem = verify(staging)
    if problem:
        raise CheckpointError(f"copy of {reported} in {staging}: {problem}")
    if target.exists():
        aside = RunLayout.set_aside(target, "replaced", time.time_ns())
        log.warning("keeping %s, which differs from the reported checkpoint, as %s",
                    target, aside)
        os.replace(target, aside)
    os.replace(staging, target)
    log.info("restored the reported checkpoint of megabatch %d into %s", megabatch, target)
    return Restored(megabatch, copied=True, set_aside=set_aside)


def _same_marker(local: Path, reported: Path) -> bool:
    """Both folders verify against their COMPLETE.json, so equal markers mean equal files."""
    return _digests(local) == _digests(reported)


def _digests(folder: Path) -> dict[str, str]:
    return json.loads((folder / MARKER).read_text())["sha256"]


def set_aside_unreported(run_dir: Path, after: int,
                         keep_next_partial: bool = False) -> tuple[Path, ...]:
    """Move checkpoints newer than megabatch `after` out of the trainer's sight (renamed
    NAME.unreported-<ns>, kept for inspection) and return their new paths: megabatch-NNNN for
    NNNN > after, and pre-emption checkpoints preempted-NNNN (inside megabatch NNNN) for
    NNNN > after + 1, or NNNN = after + 1 too unless `keep_next_partial`."""
    # A pre-emption checkpoint inside megabatch after + 1 has `after` completed megabatches.
    newer = [f.path for f in RunLayout(run_dir).checkpoint_folders()
             if f.completed > after
             or (f.partial and f.completed == after and not keep_next_partial)]
    moved = []
    for folder in sorted(newer):
        aside = RunLayout.set_aside(folder, "unreported", time.time_ns())
        log.warning("setting aside %s: Tune has seen megabatches up to %d only, so the "
                    "trial trains on from there", folder, after)
        os.replace(folder, aside)
        moved.append(aside)
    return tuple(moved)
