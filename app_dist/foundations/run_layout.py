"""The run directory's layout: the only place its file and folder names are spelled.

    RUN_DIR/config.yaml                      the resolved config of the run
    RUN_DIR/metrics.jsonl                    one JSON record per finished megabatch
    RUN_DIR/outcome.json                     how the last launch ended: finished, preempted
                                             (resumable) or bad_input, with its exit code
    RUN_DIR/run.lock                         held by rank 0 of the run writing here (one run
                                             per run directory; app_dist/foundations/run_lock.py)
    RUN_DIR/checkpoints/megabatch-0003/      after megabatch 3 completed
    RUN_DIR/checkpoints/preempted-0004/      inside megabatch 4, written at a pre-emption
        state.pt        rank 0: masks, run state (history, progress), settings
        engine.pt       the DDP engine's model, optimizer, scheduler (DeepSpeed: deepspeed/)
        unpartitioned.pt
                        DeepSpeed with ZeRO 1/2 (or bf16): the fp32 master weights and the
                        optimizer state gathered whole, by rank 0, to resume on another
                        number of ranks (DeepSpeed's own files hold one partition per rank)
        rank-00001.pt   every rank: its RNG states and its own masks (an audit)
        COMPLETE.json   written last: megabatch, world size, sha256 of every file above

Everything that reads or writes a run directory (the trainer, `app-dist inspect` and
`export`, sweep restores, the tests) goes through `RunLayout` and `CheckpointFiles`.
Listing checkpoint folders here needs no process group; verifying them is
app_dist.training.checkpoint's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_COMPLETED = "megabatch"
_PREEMPTED = "preempted"
_FOLDER_NAME = re.compile(rf"^({_COMPLETED}|{_PREEMPTED})-(\d{{4}})$")


class CheckpointFiles:
    """Names of the files inside one checkpoint folder."""

    MARKER = "COMPLETE.json"
    STATE = "state.pt"
    ENGINE = "engine.pt"
    DEEPSPEED = "deepspeed"
    UNPARTITIONED = "unpartitioned.pt"

    @staticmethod
    def rank(rank: int) -> str:
        return f"rank-{rank:05d}.pt"


@dataclass(frozen=True)
class CheckpointFolder:
    """A folder named like a checkpoint (not yet verified). `completed` megabatches are
    finished in it; `partial` ones hold progress inside megabatch completed + 1."""

    path: Path
    completed: int
    partial: bool

    @property
    def order(self) -> tuple[int, int]:
        """megabatch-3 (3, 0) < preempted-4, i.e. inside megabatch 4 (3, 1) < megabatch-4."""
        return (self.completed, 1 if self.partial else 0)


def parse_checkpoint_folder(path: Path) -> CheckpointFolder | None:
    """The checkpoint `path` names (megabatch-NNNN or preempted-NNNN), or None."""
    match = _FOLDER_NAME.match(path.name)
    if match is None:
        return None
    number = int(match.group(2))
    partial = match.group(1) == _PREEMPTED
    return CheckpointFolder(path, number - 1 if partial else number, partial)


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def outcome(self) -> Path:
        return self.root / "outcome.json"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def lock_takeover(self) -> Path:
        """Created while one launch takes over a stale lock (one launch at a time)."""
        return self.root / "run.lock.takeover"

    @property
    def export_summary(self) -> Path:
        """The last channel or N:M export's sizes and measured speed (`app-dist export`)."""
        return self.root / "export-summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, completed: int, partial: bool = False) -> Path:
        """megabatch-NNNN after megabatch NNNN; preempted-NNNN inside megabatch NNNN (when
        `completed` = NNNN - 1 megabatches are finished)."""
        if partial:
            return self.checkpoints / f"{_PREEMPTED}-{completed + 1:04d}"
        return self.checkpoints / f"{_COMPLETED}-{completed:04d}"

    @staticmethod
    def staging(final: Path) -> Path:
        """The hidden folder a checkpoint is written into before it is renamed to `final`."""
        return final.with_name(f".{final.name}.incomplete")

    @staticmethod
    def set_aside(folder: Path, reason: str, stamp: int) -> Path:
        """Where an unusable or superseded checkpoint is kept for inspection (never deleted):
        NAME.replaced-STAMP, NAME.unreported-STAMP."""
        return folder.with_name(f"{folder.name}.{reason}-{stamp}")

    def set_aside_folders(self, name: str, reason: str) -> list[Path]:
        return sorted(self.checkpoints.glob(f"{name}.{reason}-*"))

    def checkpoint_folders(self) -> list[CheckpointFolder]:
        """Every folder named like a checkpoint, oldest first (unverified)."""
        if not self.checkpoints.is_dir():
            return []
        found = [parse_checkpoint_folder(path) for path in self.checkpoints.iterdir()
                 if path.is_dir()]
        return sorted((folder for folder in found if folder is not None),
                      key=lambda folder: folder.order)

    def is_checkpoint_folder(self, path: Path) -> bool:
        return parse_checkpoint_folder(path) is not None and path.parent == self.checkpoints
