"""The sweep's result table: one row per trial (its searched values, final metrics, status),
best first by the sweep's metric, written as CSV and JSON beside the Tune results."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any

from app_dist.foundations.storage import LocalFolder, RemoteFolder

RESULT_FILES = ("results.csv", "results.json")
METRIC_COLUMNS = ("megabatch", "megabatches", "test_accuracy", "cer", "density",
                  "generalization_gap")


@dataclass(frozen=True)
class TrialOutcome:
    """What Tune knows of one trial: its sampled values, last report and error."""

    trial_id: str
    sampled: dict[str, Any]
    last_report: dict[str, Any]
    error: str | None


def status_of(outcome: TrialOutcome) -> str:
    """completed (all megabatches), stopped (by the scheduler, at a megabatch rung), error,
    or unfinished (the sweep was interrupted; running it again continues it)."""
    report = outcome.last_report
    if outcome.error:
        return "error"
    if report.get("megabatch") is not None and report.get("megabatch") == report.get(
            "megabatches"):
        return "completed"
    return "stopped" if report.get("done") else "unfinished"


def trial_rows(outcomes: list[TrialOutcome], searched: list[str], metric: str,
               mode: str) -> list[dict[str, Any]]:
    """One flat row per trial: trials that trained more megabatches first (a trial ASHA
    stopped lost at a rung, and CER, a sum over megabatches, only compares at equal
    progress), then by `metric`; trials without it last."""
    rows = []
    for outcome in outcomes:
        row: dict[str, Any] = {"trial_id": outcome.trial_id, "status": status_of(outcome)}
        row.update({key: outcome.sampled.get(key) for key in searched})
        row.update({key: outcome.last_report.get(key) for key in METRIC_COLUMNS})
        row["error"] = (outcome.error or "").splitlines()[0] if outcome.error else ""
        rows.append(row)
    sign = -1.0 if mode == "max" else 1.0

    def order(row: dict[str, Any]) -> tuple[bool, int, float, str]:
        value = row.get(metric)
        missing = not isinstance(value, (int, float)) or math.isnan(value)
        return (missing, -(row.get("megabatch") or 0), 0.0 if missing else sign * value,
                row["trial_id"])

    return sorted(rows, key=order)


def write_results(rows: list[dict[str, Any]], folder: LocalFolder | RemoteFolder) -> None:
    """results.csv and results.json in `folder` (a local folder or a bucket), each replaced
    whole."""
    columns = list(rows[0]) if rows else ["trial_id", "status"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    csv_name, json_name = RESULT_FILES
    folder.write_text(csv_name, table.getvalue())
    folder.write_text(json_name, json.dumps(rows, indent=1, default=str) + "\n")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the rows (the error column left out)."""
    if not rows:
        return "(no trials)"
    columns = [c for c in rows[0] if c != "error"]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(str(c)), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
