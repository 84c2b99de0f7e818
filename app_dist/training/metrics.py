"""Per-megabatch metrics: CER, the metrics.jsonl file and wandb (event callbacks on rank 0),
and the summary table."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from app_dist.config import Config, to_dict
from app_dist.foundations.errors import AppDistError, one_line
from app_dist.foundations.files import atomic_write_text
from app_dist.foundations.run_layout import RunLayout
from app_dist.training.events import Callback

log = logging.getLogger("app_dist")


def cumulative_error(errors_per_megabatch: list[int], test_size: int) -> tuple[int, float]:
    """CER after the last megabatch given: (count of test mistakes summed over megabatches,
    the same normalised by the test set size, i.e. the sum of test error rates)."""
    total = int(sum(errors_per_megabatch))
    return total, total / test_size


class MetricsLog(Callback):
    """metrics.jsonl in the run directory, written by rank 0 only.

    On start the file is rewritten from the checkpoint's history, so a crash between the
    checkpoint and the log line neither loses nor duplicates a megabatch. A write that fails
    (a full disk) leaves the file as it was, without half a line, and raises AppDistError:
    the checkpoint holds every record, and the same command rewrites the file from it.
    """

    def __init__(self, run_dir: Path, history: list[dict[str, Any]]) -> None:
        self.path = RunLayout(run_dir).metrics
        try:
            atomic_write_text(self.path,
                              "".join(json.dumps(record) + "\n" for record in history))
        except OSError as error:
            raise self._cannot_write(error) from None

    def megabatch_end(self, record: dict[str, Any], folder: Path) -> None:
        self.append(record)

    def append(self, record: dict[str, Any]) -> None:
        size = self.path.stat().st_size
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)  # no half-written line survives
            raise self._cannot_write(error) from None

    def _cannot_write(self, error: OSError) -> AppDistError:
        return AppDistError(f"cannot write {self.path}: {error.strerror or error}; the "
                            "checkpoints hold every record: free space, then run the same "
                            "command again")


class WandbLog(Callback):
    """The run as W&B users know it, written by rank 0 only.

    Offline by default (files under RUN_DIR/wandb, uploaded later with `wandb sync`);
    `log.wandb.mode=online` streams instead, `disabled` writes nothing. The resolved config is
    the run's config; every metric is plotted against `megabatch`, which is also the wandb step,
    so a resumed run (same id, `resume="allow"`) continues its curves instead of restarting
    them; the per-layer densities of all megabatches so far are one table, `layer_density`
    (megabatch, layer, density). Runs sharing `log.wandb.group` (one sweep) are grouped, and
    the pruning method is the job type, so dense / OSP / APP split within a group.
    """

    TABLE_COLUMNS = ["megabatch", "layer", "density"]

    def __init__(self, config: Config, run_dir: Path, run_id: str,
                 history: list[dict[str, Any]] | None = None) -> None:
        settings = config.log.wandb
        self.run = None
        self.layer_rows = [row for record in history or [] for row in self._layer_rows(record)]
        if settings.mode == "disabled":
            return
        import wandb

        self._wandb = wandb
        try:
            self.run = wandb.init(
                project=settings.project, group=settings.group or None,
                job_type=config.prune.method, name=config.run.name,
                tags=[config.prune.method, config.prune.criterion, config.model.name],
                id=run_id, resume="allow", mode=settings.mode, dir=str(run_dir),
                config=to_dict(config), settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as error:  # noqa: BLE001 - wandb raises many kinds; all mean "fix setup"
            raise AppDistError(
                f"wandb could not start in mode '{settings.mode}' ({one_line(error)}); for "
                "online mode run `wandb login` or set WANDB_API_KEY, or keep "
                "log.wandb.mode=offline and upload later with `wandb sync`") from None
        self.run.define_metric("megabatch")
        self.run.define_metric("*", step_metric="megabatch")

    @staticmethod
    def _layer_rows(record: dict[str, Any]) -> list[list[Any]]:
        return [[record["megabatch"], name, density]
                for name, density in (record.get("layer_density") or {}).items()]

    def megabatch_end(self, record: dict[str, Any], folder: Path) -> None:
        self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        """One megabatch's record: its scalars, and the per-layer table so far."""
        if self.run is None:
            return
        flat = {k: v for k, v in record.items() if not isinstance(v, dict)}
        self.layer_rows += self._layer_rows(record)
        if self.layer_rows:
            flat["layer_density"] = self._wandb.Table(columns=self.TABLE_COLUMNS,
                                                      data=self.layer_rows)
        self.run.log(flat, step=int(record["megabatch"]))

    @property
    def offline_dir(self) -> str | None:
        """The folder `wandb sync` uploads, when the run is offline."""
        if self.run is None or self.run.settings.mode != "offline":
            return None
        return str(Path(self.run.dir).parent)

    def finish(self) -> None:
        if self.run is not None:
            folder = self.offline_dir
            self.run.finish()
            if folder is not None:
                log.info("wandb run saved offline; upload it with: wandb sync %s", folder)
            self.run = None


SUMMARY_COLUMNS = [
    ("megabatch", "t", "{:d}"),
    ("density", "density", "{:.3f}"),
    ("train_samples", "train n", "{:d}"),
    ("val_accuracy", "val acc", "{:.2%}"),
    ("test_accuracy", "test acc", "{:.2%}"),
    ("cer", "CER", "{:.3f}"),
    ("generalization_gap", "gen gap", "{:+.2f}"),
    ("seconds", "s", "{:.1f}"),
]


def summary_table(history: list[dict[str, Any]]) -> str:
    """A fixed-width table of the run, one row per megabatch."""
    header = [title for _, title, _ in SUMMARY_COLUMNS]
    rows = [[fmt.format(record[key]) for key, _, fmt in SUMMARY_COLUMNS] for record in history]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
