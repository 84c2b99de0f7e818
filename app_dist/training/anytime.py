"""The anytime model: after every megabatch, rank 0 publishes the model as it is then, so that
a serving system can always pick up the newest one (ALMA's premise: a usable model at any time).

    TARGET/model-sparse.pt   the compact sparse file (app_dist/models/sparse_file.py; load it
                             with app_dist.models.sparse_file.load_exported), its `source`
                             holding the megabatch, the checkpoint and the metrics record
    TARGET/model.json        {"format", "megabatch", "file", "sha256", "metrics"}, written
                             after the model: a reader that finds the sha256 of the file it
                             read here has the model and the metrics of one megabatch

TARGET is checkpoint.anytime_to: RUN_DIR/anytime by default, another folder, or an s3:// or
gs:// URL. Each file is replaced whole (a local rename, or one object put), so a reader never
sees half of one. Publishing is a service beside training, not part of it: a failure (a full
disk, a store that is down) is a warning and the next megabatch publishes again; the
checkpoint remains the run's record. A run that starts again from a megabatch's checkpoint
publishes that megabatch's model first when the target holds an older one (the last
megabatch's publish failed, or the run was stopped between its checkpoint and the publish).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from app_dist.config import Config
from app_dist.engine.base import module_state
from app_dist.foundations.errors import AppDistError
from app_dist.foundations.files import atomic_write_text, file_sha256
from app_dist.foundations.storage import RemoteFolder, Retry, is_remote
from app_dist.foundations.torch_files import atomic_torch_save
from app_dist.models.sparse_file import FORMAT, sparse_model
from app_dist.training.events import Callback

log = logging.getLogger("app_dist")

MODEL_FILE = "model-sparse.pt"
POINTER_FILE = "model.json"


def anytime_target(config: Config, run_dir: Path) -> str | None:
    """Where the run publishes its anytime model; None when checkpoint.anytime_to=off."""
    setting = config.checkpoint.anytime_to
    if setting == "off":
        return None
    return setting or str(run_dir / "anytime")


class AnytimeModel(Callback):
    """Publishes the engine's model after each megabatch (rank 0 only)."""

    def __init__(self, target: str, architecture: dict[str, Any], run_dir: Path,
                 restored: tuple[dict[str, Any], Path] | None = None) -> None:
        """`restored`: the record and the folder of the megabatch checkpoint the engine's
        model was restored from (None when the run starts afresh or inside a megabatch,
        whose weights are no megabatch's model). A pre-emption inside the megabatch after a
        failed publish leaves the target one megabatch behind until that megabatch ends."""
        self.target = target
        self.architecture = architecture
        self.run_dir = run_dir
        self.remote = (RemoteFolder(target, Retry(), key="checkpoint.anytime_to")
                       if is_remote(target) else None)
        self.engine: Any = None
        self.restored = restored

    def run_start(self, engine: Any) -> None:
        self.engine = engine
        if self.restored is not None:
            record, folder = self.restored
            if self.published_megabatch() < record["megabatch"]:
                self.megabatch_end(record, folder)

    def published_megabatch(self) -> int:
        """The megabatch of the model the target holds; 0 when none can be read."""
        try:
            text = (self.remote.read_text(POINTER_FILE) if self.remote is not None
                    else (Path(self.target) / POINTER_FILE).read_text())
            return int(json.loads(text)["megabatch"])
        except (OSError, AppDistError, ValueError, KeyError, TypeError):
            return 0

    def megabatch_end(self, record: dict[str, Any], folder: Path) -> None:
        started = time.monotonic()
        model = sparse_model(module_state(self.engine.module), self.engine.masks.state_dict(),
                             self.architecture,
                             {"run_dir": str(self.run_dir), "checkpoint": folder.name,
                              "megabatch": record["megabatch"], "metrics": record})
        try:
            self._publish(model, record)
        except (OSError, AppDistError) as error:
            log.warning("anytime model of megabatch %d not published to %s: %s; the next "
                        "megabatch tries again", record["megabatch"], self._where(),
                        getattr(error, "strerror", None) or error)
            return
        log.info("anytime model of megabatch %d published to %s in %.2f s",
                 record["megabatch"], self._where(), time.monotonic() - started)

    def _publish(self, model: dict[str, Any], record: dict[str, Any]) -> None:
        if self.remote is None:
            folder = Path(self.target)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(model, folder / MODEL_FILE)
            atomic_write_text(folder / POINTER_FILE,
                              _pointer(record, file_sha256(folder / MODEL_FILE)))
            return
        with tempfile.TemporaryDirectory(prefix="app-dist-anytime-") as scratch:
            local = Path(scratch) / MODEL_FILE
            atomic_torch_save(model, local)
            self.remote.upload(local, MODEL_FILE)
            self.remote.write_text(POINTER_FILE, _pointer(record, file_sha256(local)))

    def _where(self) -> str:
        return str(self.remote) if self.remote is not None else self.target


def _pointer(record: dict[str, Any], sha256: str) -> str:
    return json.dumps({"format": FORMAT, "megabatch": record["megabatch"], "file": MODEL_FILE,
                       "sha256": sha256, "metrics": record}, indent=1) + "\n"
