"""Megabatch checkpoints: written atomically, verified on load, never loaded half-written.

The Checkpointer is the one place a checkpoint's payload is assembled (`save`) and taken apart
(`restore`); folder and file names come from app_dist.foundations.run_layout, atomic writes
and sha256 from app_dist.foundations.files.

All files are written into a hidden temporary folder which is renamed into place only after
COMPLETE.json is in it, so a folder named megabatch-NNNN is complete or absent. The run
directory must be shared by all ranks (as on any cluster file system).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app_dist.config import Config, changed_settings, computation_settings
from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import CheckpointError
from app_dist.foundations.files import atomic_write_json, file_sha256, fsync_directory
from app_dist.foundations.run_layout import CheckpointFiles, CheckpointFolder, RunLayout
from app_dist.foundations.torch_files import atomic_torch_save, load_torch_file, sha256_of_written
from app_dist.training.state import MegabatchProgress, RunState, rank_local_buffers

log = logging.getLogger("app_dist")

MARKER = CheckpointFiles.MARKER
STATE = CheckpointFiles.STATE


def _fingerprint(folder: Path) -> tuple:
    """(name, size, mtime) of every file in `folder`: changes when any file is rewritten."""
    return tuple(sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in folder.rglob("*") if p.is_file()))


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types torch.load(weights_only=True) accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": _python_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """A verified checkpoint folder: after megabatch `megabatch` completed, or (partial) in the
    middle of megabatch `megabatch + 1`, written when a pre-emption notice arrived."""

    path: Path
    megabatch: int
    world_size: int
    partial: bool = False

    @property
    def order(self) -> tuple[int, int]:
        """megabatch-3 (3, 0) < preempted-4, i.e. inside megabatch 4 (3, 1) < megabatch-4."""
        return (self.megabatch, 1 if self.partial else 0)

    def load_state(self) -> dict[str, Any]:
        return load_torch_file(self.path / STATE)

    def load_rank_state(self, rank: int) -> dict[str, Any]:
        return load_torch_file(self.path / CheckpointFiles.rank(rank))


@dataclass(frozen=True)
class Unusable:
    """A checkpoint-named folder that does not verify, and why."""

    path: Path
    reason: str


def examine(folder: CheckpointFolder) -> Checkpoint | Unusable:
    """Verify one checkpoint folder (reads and hashes every file)."""
    problem = verify(folder.path)
    if problem:
        return Unusable(folder.path, problem)
    marker = json.loads((folder.path / MARKER).read_text())
    return Checkpoint(folder.path, marker["megabatch"], marker["world_size"], folder.partial)


def scan_checkpoints(run_dir: Path | RunLayout) -> list[Checkpoint | Unusable]:
    """Every checkpoint folder of a run directory, oldest first, verified. Needs no process
    group: `app-dist inspect` and `export` read runs with it."""
    layout = run_dir if isinstance(run_dir, RunLayout) else RunLayout(run_dir)
    return [examine(folder) for folder in layout.checkpoint_folders()]


class Checkpointer:
    """Saves and restores the megabatch checkpoints of one run directory.

    `save` and `restore` take the state from the objects that hold it (run state, progress,
    the engine with its masks) and give it back to them; `write` is the file-level part: one
    payload for rank 0, one per rank, and the engine's own files, sealed atomically."""

    def __init__(self, run_dir: Path | RunLayout, platform: Platform, keep_last: int,
                 config: Config | None = None,
                 input_shape: tuple[int, int, int] | None = None) -> None:
        self.layout = run_dir if isinstance(run_dir, RunLayout) else RunLayout(run_dir)
        self.platform = platform
        self.keep_last = keep_last
        self.config = config
        # (C, H, W) the model sees, saved for `app-dist export`, which times the exported model
        # on inputs of that shape and cannot tell it from the weights.
        self.input_shape = input_shape
        # Folders this process sealed or verified, with the size and mtime of every file then:
        # retiring old checkpoints after every save re-hashes only folders whose files changed
        # since (a resume, in a new process, hashes what it loads).
        self._verified: dict[Path, tuple] = {}

    @classmethod
    def for_run(cls, config: Config, run_dir: Path, platform: Platform,
                input_shape: tuple[int, int, int] | None = None) -> Checkpointer:
        return cls(run_dir, platform, config.checkpoint.keep_last, config, input_shape)

    def folder(self, megabatch: int, partial: bool = False) -> Path:
        """megabatch-NNNN after megabatch NNNN; preempted-NNNN inside megabatch NNNN."""
        return self.layout.checkpoint(megabatch, partial)

    # ------------------------------------------------------------------ run state

    @functools.cached_property
    def _computation_settings(self) -> dict[str, Any]:
        # Through OmegaConf (~30 ms), and a run's config stays as it is once it trains:
        # worked out at the first save, not at every one.
        return computation_settings(self.config)

    def save(self, run: RunState, engine: Any, progress: MegabatchProgress | None = None
             ) -> Path:
        """Checkpoint after megabatch run.completed (progress None) or inside the next one
        (a pre-emption). All ranks call it."""
        assert self.config is not None, "save() needs the run's config (Checkpointer.for_run)"
        masks = engine.masks
        return self.write(run.completed, {
            "masks": masks.state_dict(),
            "run": run.to_dict(),
            "progress": None if progress is None else progress.shared_state(),
            "settings": self._computation_settings,
            "world_size": self.platform.world_size,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
        }, rank_state={
            # Audit trail: every rank's own masks and residue, compared across ranks in tests.
            "masks": masks.state_dict(),
            "pruned_residue": engine.pruned_residue(),
            "epoch_sums": None if progress is None else progress.epoch_sums,
            # Mid-epoch each rank's BatchNorm statistics are its own (averaged at epoch end).
            "buffers": None if progress is None else rank_local_buffers(engine.module),
        }, engine=engine, partial=progress is not None)

    def restore(self, engine: Any) -> tuple[RunState, MegabatchProgress | None]:
        """The run state to continue from (the last valid checkpoint's, loaded into `engine`
        and its masks, or a fresh one), and the progress inside a megabatch when that
        checkpoint was written at a pre-emption. All ranks call it."""
        config = self.config
        assert config is not None, "restore() needs the run's config (Checkpointer.for_run)"
        if not config.checkpoint.resume:
            if self.platform.is_primary and any(self.layout.checkpoints.glob("megabatch-*")):
                log.info("checkpoint.resume=false: starting over; each earlier checkpoint is "
                         "kept aside (NAME.replaced-TIME) when the new run replaces it")
            return RunState(), None
        checkpoint = self.latest()
        if checkpoint is None:
            return RunState(), None
        saved = checkpoint.load_state()
        platform = self.platform
        if (saved["world_size"] != platform.world_size
                and not config.checkpoint.allow_world_size_change):
            raise CheckpointError(
                f"{checkpoint.path} was written by {saved['world_size']} ranks, this run has "
                f"{platform.world_size}; set checkpoint.allow_world_size_change=true to "
                "continue anyway")
        # The perf switches compare as resolved (config.perf is resolved by now): what the
        # run computed with, whether the user wrote auto or true.
        changes = changed_settings(saved["settings"], config)
        if changes and not config.checkpoint.allow_config_change:
            switches = ("; perf switches are compared as resolved on this device and engine "
                        "(auto may choose otherwise elsewhere): set one to its saved value to "
                        "continue with it" if any(c.startswith("perf.") for c in changes[:4])
                        else "")
            raise CheckpointError(
                f"{checkpoint.path} was made with other settings ({'; '.join(changes[:4])}"
                f"{switches}); set checkpoint.allow_config_change=true, or "
                "checkpoint.resume=false to start over")
        engine.masks.load_state_dict(saved["masks"])
        engine.load(checkpoint.path)
        rank_state = (checkpoint.load_rank_state(platform.rank)
                      if platform.rank < checkpoint.world_size else None)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        run = RunState.from_dict(saved["run"])
        if saved.get("progress") is None:
            log.info("resuming after megabatch %d from %s", run.completed, checkpoint.path)
            return run, None
        if rank_state is None or checkpoint.world_size != platform.world_size:
            raise CheckpointError(f"{checkpoint.path} was written mid-megabatch by "
                                  f"{checkpoint.world_size} ranks: resume it with as many")
        progress = MegabatchProgress(**saved["progress"], epoch_sums=rank_state["epoch_sums"])
        engine.module.load_state_dict(rank_state["buffers"], strict=False)
        where = (f"at epoch {progress.epoch + 1}, step {progress.steps_done}"
                 if progress.epoch < config.train.epochs
                 else "after its last epoch, at its test pass")
        log.info("resuming megabatch %d %s from %s", progress.megabatch, where, checkpoint.path)
        return run, progress

    # ------------------------------------------------------------------ files

    def write(self, megabatch: int, state: dict[str, Any], rank_state: dict[str, Any],
              engine: Any, partial: bool = False) -> Path:
        """Write checkpoint `megabatch`. Call on every rank: `state` is saved from rank 0,
        `rank_state` (plus the RNG states) from every rank into its own file, and the engine
        writes its own files (DeepSpeed's go into a subfolder, from every rank)."""
        final = self.folder(megabatch, partial)
        staging = self.layout.staging(final)
        if self.platform.is_primary:
            try:
                self.layout.checkpoints.mkdir(parents=True, exist_ok=True)
                if staging.exists():  # left by a crash during an earlier save: never valid
                    shutil.rmtree(staging)
                staging.mkdir()
            except OSError as error:
                raise _cannot_write(final, error) from None
        self.platform.barrier()
        try:
            atomic_torch_save({"rng": rng_state(), **rank_state},
                              staging / CheckpointFiles.rank(self.platform.rank))
            if self.platform.is_primary:
                atomic_torch_save(state, staging / STATE)
            engine.save(staging)
            self.platform.barrier()
            if self.platform.is_primary:
                self._seal(staging, final, megabatch, partial)
        except OSError as error:
            # Disk full, quota, read-only mount (torch's own writer reports it as OSError too,
            # see atomic_torch_save): the earlier checkpoints are untouched because nothing is
            # renamed into place before COMPLETE.json is written.
            if self.platform.is_primary:
                shutil.rmtree(staging, ignore_errors=True)
            raise _cannot_write(final, error) from None
        if self.platform.is_primary:
            self._retire_old()
        self.platform.barrier()
        return final

    def _seal(self, staging: Path, final: Path, megabatch: int, partial: bool) -> None:
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*")
                       if p.is_file() and not p.name.startswith("."))
        atomic_write_json(staging / MARKER, {
            "megabatch": megabatch,
            "partial": partial,
            "world_size": self.platform.world_size,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "sha256": {name: sha256_of_written(staging / name) for name in files},
        })
        fsync_directory(staging)
        if final.exists():
            # A resume skipped this damaged checkpoint, or checkpoint.resume=false starts
            # over: keep it for inspection rather than deleting it.
            aside = self.layout.set_aside(final, "replaced", int(time.time()))
            log.warning("keeping the earlier checkpoint %s as %s", final, aside)
            os.replace(final, aside)
        os.replace(staging, final)
        fsync_directory(self.layout.checkpoints)
        self._verified[final] = _fingerprint(final)

    def _retire_old(self) -> None:
        """Keep the newest `keep_last` valid megabatch checkpoints and no pre-emption
        checkpoint older than the newest one. Damaged folders are never deleted here: they
        are evidence, and they never count towards keep_last, so the valid ones survive."""
        valid = [c for c in self.scan() if isinstance(c, Checkpoint)]
        newest = valid[-1]
        complete = [c for c in valid if not c.partial]
        stale = complete[: -self.keep_last] + [c for c in valid
                                                if c.partial and c.order < newest.order]
        for old in stale:
            shutil.rmtree(old.path)
            self._verified.pop(old.path, None)

    def scan(self) -> list[Checkpoint | Unusable]:
        """Every checkpoint folder, oldest first: a Checkpoint, or Unusable with the reason."""
        return [self._examine(folder) for folder in self.layout.checkpoint_folders()]

    def _examine(self, folder: CheckpointFolder) -> Checkpoint | Unusable:
        """`examine`, skipping the hashing for folders unchanged since this process sealed or
        verified them."""
        fingerprint = _fingerprint(folder.path)
        if self._verified.get(folder.path) != fingerprint:
            found = examine(folder)
            if isinstance(found, Unusable):
                return found
            self._verified[folder.path] = fingerprint
            return found
        marker = json.loads((folder.path / MARKER).read_text())
        return Checkpoint(folder.path, marker["megabatch"], marker["world_size"], folder.partial)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, chosen on rank 0 and agreed by all ranks.
        Damaged newer ones are reported and left on disk."""
        choice = None
        if self.platform.is_primary:
            # Newest first, verifying (hashing) only until one verifies.
            for folder in reversed(self.layout.checkpoint_folders()):
                item = self._examine(folder)
                if isinstance(item, Checkpoint):
                    choice = (str(item.path), item.megabatch, item.world_size, item.partial)
                    break
                log.warning("skipping checkpoint %s: %s", item.path, item.reason)
        choice = self.platform.broadcast_object(choice)
        if choice is None:
            return None
        return Checkpoint(Path(choice[0]), choice[1], choice[2], choice[3])


def _cannot_write(final: Path, error: OSError) -> CheckpointError:
    return CheckpointError(f"cannot write checkpoint {final}: {error.strerror or error}; "
                           "earlier checkpoints are intact")


def _inside(name: str) -> bool:
    """Whether a file name from a marker stays inside the checkpoint folder."""
    path = Path(name)
    return not path.is_absolute() and ".." not in path.parts


def verify(folder: Path) -> str | None:
    """None when the folder is a complete checkpoint whose files match their sha256,
    else a one-line reason."""
    marker_path = folder / MARKER
    if not marker_path.is_file():
        return f"no {MARKER} (incomplete write)"
    try:
        marker = json.loads(marker_path.read_text())
        expected = marker["sha256"]
        int(marker["megabatch"]), int(marker["world_size"])
    except (ValueError, KeyError, TypeError) as error:
        return f"{MARKER} is unreadable ({error})"
    if not isinstance(expected, dict) or not all(
            isinstance(name, str) and isinstance(digest, str) and _inside(name)
            for name, digest in expected.items()):
        return f"{MARKER} is unreadable (its sha256 is not a map of file names to digests)"
    if STATE not in expected:
        return f"{MARKER} lists no {STATE}"
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its sha256 (corrupt or truncated)"
    return None
