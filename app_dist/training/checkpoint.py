"""Megabatch checkpoints: written atomically, verified on load, never loaded half-written.

Layout: RUN_DIR/checkpoints/megabatch-0003/
    state.pt        rank 0: masks, run state (history, stream position), settings
    engine.pt       the engine's files: model, optimizer, scheduler (DeepSpeed: its tag folder)
    rank-00001.pt   every rank: its RNG states and its own masks (an audit)
    COMPLETE.json   written last: megabatch, world size, sha256 of every file above

All files are written into a hidden temporary folder which is renamed into place only after
COMPLETE.json is in it, so a folder named megabatch-NNNN is complete or absent. The run
directory must be shared by all ranks (as on any cluster file system).
"""

from __future__ import annotations

import hashlib
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

from app_dist.data.manifest import file_sha256
from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import CheckpointError

log = logging.getLogger("app_dist")

MARKER = "COMPLETE.json"
STATE = "state.pt"


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# sha256 of the files this process wrote, computed as they were written: sealing a checkpoint
# then needs no second read of them. {path: (size, mtime_ns, digest)}, trusted only while the
# file's size and modification time are unchanged; verifying a checkpoint always reads.
_HASHED_ON_WRITE: dict[Path, tuple[int, int, str]] = {}
_HASHED_ON_WRITE_LIMIT = 256  # other ranks' sealed files are never popped here


class _HashingWriter:
    """What torch.save writes to: forwards every chunk to the file and into a sha256."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _sealed_sha256(path: Path) -> str:
    """sha256 of a file about to be sealed: from its write when unchanged since, else read."""
    stat = path.stat()
    known = _HASHED_ON_WRITE.pop(path, None)
    if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    return file_sha256(path)


def _fingerprint(folder: Path) -> tuple:
    """(name, size, mtime) of every file in `folder`: changes when any file is rewritten."""
    return tuple(sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in folder.rglob("*") if p.is_file()))


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_torch_save(value: Any, path: Path) -> None:
    """torch.save to a temporary name, fsync, then rename over `path`."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with temporary.open("wb") as handle:
        writer = _HashingWriter(handle)
        torch.save(value, writer)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    if len(_HASHED_ON_WRITE) >= _HASHED_ON_WRITE_LIMIT:
        _HASHED_ON_WRITE.clear()
    stat = path.stat()
    _HASHED_ON_WRITE[path] = (stat.st_size, stat.st_mtime_ns, writer.digest.hexdigest())


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
        return _load(self.path / STATE)

    def load_rank_state(self, rank: int) -> dict[str, Any]:
        return _load(self.path / _rank_file(rank))


def load_verified_file(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True (no pickled code runs), errors as CheckpointError."""
    return _load(path)


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"cannot load {path}: {str(error).splitlines()[0]}") from None


class Checkpointer:
    """Saves and finds the megabatch checkpoints of one run directory."""

    def __init__(self, run_dir: Path, platform: Platform, keep_last: int) -> None:
        self.root = run_dir / "checkpoints"
        self.platform = platform
        self.keep_last = keep_last
        # Folders this process sealed or verified, with the size and mtime of every file then:
        # retiring old checkpoints after every save re-hashes only folders whose files changed
        # since (a resume, in a new process, hashes what it loads).
        self._verified: dict[Path, tuple] = {}

    def folder(self, megabatch: int, partial: bool = False) -> Path:
        """megabatch-NNNN after megabatch NNNN; preempted-NNNN inside megabatch NNNN."""
        if partial:
            return self.root / f"preempted-{megabatch + 1:04d}"
        return self.root / f"megabatch-{megabatch:04d}"

    def save(self, megabatch: int, state: dict[str, Any], rank_state: dict[str, Any],
             engine: Any, partial: bool = False) -> Path:
        """Write checkpoint `megabatch`. Call on every rank: `state` is saved from rank 0,
        `rank_state` (plus the RNG states) from every rank into its own file, and the engine
        writes its own files (DeepSpeed's go into a subfolder, from every rank)."""
        final = self.folder(megabatch, partial)
        staging = self.root / f".{final.name}.incomplete"
        if self.platform.is_primary:
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists():  # left by a crash during an earlier save: never valid
                shutil.rmtree(staging)
            staging.mkdir()
        self.platform.barrier()
        try:
            atomic_torch_save({"rng": rng_state(), **rank_state},
                              staging / _rank_file(self.platform.rank))
            if self.platform.is_primary:
                atomic_torch_save(state, staging / STATE)
            engine.save(staging)
            self.platform.barrier()
            if self.platform.is_primary:
                self._seal(staging, final, megabatch, partial)
        except OSError as error:
            # Disk full, quota, read-only mount: the earlier checkpoints are untouched because
            # nothing is renamed into place before COMPLETE.json is written.
            if self.platform.is_primary:
                shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {final}: {error.strerror or error}; "
                                  "earlier checkpoints are intact") from None
        if self.platform.is_primary:
            self._retire_old()
        self.platform.barrier()
        return final

    def _seal(self, staging: Path, final: Path, megabatch: int, partial: bool) -> None:
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*")
                       if p.is_file() and not p.name.startswith("."))
        marker = {
            "megabatch": megabatch,
            "partial": partial,
            "world_size": self.platform.world_size,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "sha256": {name: _sealed_sha256(staging / name) for name in files},
        }
        temporary = staging / f".{MARKER}.tmp"
        temporary.write_text(json.dumps(marker, indent=1))
        os.replace(temporary, staging / MARKER)
        _fsync_dir(staging)
        if final.exists():
            # Only happens when a resume skipped a damaged newer checkpoint: keep it for
            # inspection rather than deleting it.
            aside = final.with_name(f"{final.name}.replaced-{int(time.time())}")
            log.warning("keeping the unusable checkpoint %s as %s", final, aside)
            os.replace(final, aside)
        os.replace(staging, final)
        _fsync_dir(self.root)
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

    def scan(self) -> list[Checkpoint | tuple[Path, str]]:
        """Every checkpoint folder, oldest first: a Checkpoint, or (path, why it is unusable)."""
        return [self._examine(folder, partial) for folder, partial in self._folders()]

    def _folders(self) -> list[tuple[Path, bool]]:
        """(folder, partial) of every checkpoint-named folder, oldest first, unverified."""
        if not self.root.is_dir():
            return []
        found: list[tuple[tuple[int, int], Path, bool]] = []
        for pattern, partial in (("megabatch-[0-9][0-9][0-9][0-9]", False),
                                 ("preempted-[0-9][0-9][0-9][0-9]", True)):
            for folder in self.root.glob(pattern):
                number = int(folder.name.split("-")[1])
                completed = number - 1 if partial else number
                found.append(((completed, 1 if partial else 0), folder, partial))
        return [(folder, partial) for _, folder, partial in sorted(found, key=lambda f: f[0])]

    def _examine(self, folder: Path, partial: bool) -> Checkpoint | tuple[Path, str]:
        fingerprint = _fingerprint(folder)
        problem = None if self._verified.get(folder) == fingerprint else verify(folder)
        if problem:
            return folder, problem
        self._verified[folder] = fingerprint
        marker = json.loads((folder / MARKER).read_text())
        return Checkpoint(folder, marker["megabatch"], marker["world_size"], partial)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, chosen on rank 0 and agreed by all ranks.
        Damaged newer ones are reported and left on disk."""
        choice = None
        if self.platform.is_primary:
            # Newest first, verifying (hashing) only until one verifies.
            for item in (self._examine(*found) for found in reversed(self._folders())):
                if isinstance(item, Checkpoint):
                    choice = (str(item.path), item.megabatch, item.world_size, item.partial)
                    break
                log.warning("skipping checkpoint %s: %s", item[0], item[1])
        choice = self.platform.broadcast_object(choice)
        if choice is None:
            return None
        return Checkpoint(Path(choice[0]), choice[1], choice[2], choice[3])


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
    if STATE not in expected:
        return f"{MARKER} lists no {STATE}"
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its sha256 (corrupt or truncated)"
    return None
