"""Per-megabatch metrics: CER, the metrics.jsonl record, wandb, and the summary table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from app_dist.config import Config, to_dict


def cumulative_error(errors_per_megabatch: list[int], test_size: int) -> tuple[int, float]:
    """CER after the last megabatch given: (count of test mistakes summed over megabatches,
    the same normalised by the test set size, i.e. the sum of test error rates)."""
    total = int(sum(errors_per_megabatch))
    return total, total / test_size


class MetricsLog:
    """metrics.jsonl in the run directory, written by rank 0 only.

    On start the file is rewritten from the checkpoint's history, so a crash between the
    checkpoint and the log line neither loses nor duplicates a megabatch.
    """

    def __init__(self, run_dir: Path, history: list[dict[str, Any]]) -> None:
        self.path = run_dir / "metrics.jsonl"
        temporary = self.path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(json.dumps(record) + "\n" for record in history))
        os.replace(temporary, self.path)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class WandbLog:
    """An offline-by-default wandb run, resumed by id, with `megabatch` as its x-axis."""

    def __init__(self, config: Config, run_dir: Path, run_id: str) -> None:
        settings = config.log.wandb
        self.run = None
        if settings.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=settings.project, group=settings.group or None, name=config.run.name,
            id=run_id, resume="allow", mode=settings.mode, dir=str(run_dir),
            config=to_dict(config), settings=wandb.Settings(silent=True, console="off"),
        )
        self.run.define_metric("megabatch")
        self.run.define_metric("*", step_metric="megabatch")

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            flat = {k: v for k, v in record.items() if not isinstance(v, dict)}
            self.run.log(flat)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


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
