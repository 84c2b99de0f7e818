"""`app-dist report RUN_DIR [RUN_DIR ...]`: PNG plots and one self-contained HTML page.

Figures: test accuracy, CER, generalisation gap and density against megabatch with every run
overlaid (dense vs OSP vs APP), and one per-layer density heat map per run. The HTML page holds
a comparison table, every run's metrics table and the figures, embedded as base64 data URIs so
the single file can be mailed or attached anywhere; the PNGs are also saved beside it.
By default everything goes to FIRST_RUN_DIR/report/.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app_dist.foundations.commands import ArgumentParser, command
from app_dist.foundations.errors import AppDistError
from app_dist.foundations.run_layout import RunLayout
from app_dist.results.plots import plot_layer_density, plot_runs
from app_dist.results.runs import Run, describe_config, final_density_of, read_run

REPORT_NAME = "report.html"

# (file stem, metrics.jsonl key, axis label, scale, caption)
CURVES = [
    ("test_accuracy", "test_accuracy", "test accuracy (%)", 100.0,
     "Accuracy of each megabatch's best-validation model on the full test set."),
    ("cer", "cer", "CER (sum of test error rates)", 1.0,
     "Cumulative error rate: the test error summed over megabatches so far; lower is better."),
    ("generalization_gap", "generalization_gap", "generalisation gap (points)", 1.0,
     "Train accuracy minus validation accuracy at the best-validation epoch."),
    ("density", "density", "density (kept / prunable weights)", 1.0,
     "Measured fraction of prunable weights kept while training on each megabatch."),
]


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


# (metrics.jsonl key, column title, formatter) for each run's metrics table.
TABLE_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("megabatch", "megabatch", str),
    ("target_density", "target density", "{:.3f}".format),
    ("density", "density", "{:.3f}".format),
    ("kept_parameters", "kept weights", "{:,d}".format),
    ("train_samples", "train samples", "{:,d}".format),
    ("best_epoch", "best epoch", str),
    ("train_accuracy", "train acc", _percent),
    ("val_accuracy", "val acc", _percent),
    ("test_accuracy", "test acc", _percent),
    ("cer_count", "CER (count)", "{:,d}".format),
    ("cer", "CER", "{:.3f}".format),
    ("generalization_gap", "gen gap (points)", "{:+.2f}".format),
    ("seconds", "seconds", "{:.1f}".format),
]


@dataclass
class Figure:
    path: Path
    title: str
    caption: str


def run_labels(runs: Sequence[Run]) -> list[str]:
    """A short unique legend label per run: its pruning method, plus its folder name when
    two runs share a method (e.g. two APP runs with different criteria)."""
    bases = [str(run.setting("prune.method") or run.path.name) for run in runs]
    labels = [base if bases.count(base) == 1 else f"{base} ({run.path.name})"
              for base, run in zip(bases, runs)]
    return [label if labels.count(label) == 1 else f"{label} #{index + 1}"
            for index, label in enumerate(labels)]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "run"


def draw_figures(runs: Sequence[Run], labels: Sequence[str], out: Path) -> list[Figure]:
    """Every figure of the report as a PNG in `out`, in page order."""
    with_records = {label: run.records for label, run in zip(labels, runs) if run.records}
    figures = []
    for stem, key, ylabel, scale, caption in CURVES:
        if any(key in record for records in with_records.values() for record in records):
            path = plot_runs(with_records, key, ylabel, out / f"{stem}.png", scale=scale)
            figures.append(Figure(path, ylabel, caption))
    for label, records in with_records.items():
        densities = [d for r in records for d in (r.get("layer_density") or {}).values()]
        if densities and min(densities) < 1.0:  # a dense run's map would be one flat colour
            path = plot_layer_density(records, out / f"layer_density-{_slug(label)}.png",
                                      title=f"density per layer: {label}")
            figures.append(Figure(path, f"density per layer: {label}",
                                  "Fraction of each prunable layer's weights kept at every "
                                  "megabatch (rows in model order)."))
    return figures


def _cell(record: dict[str, Any], key: str, formatter: Callable[[Any], str]) -> str:
    value = record.get(key)
    return "&ndash;" if value is None else html.escape(formatter(value))


def _comparison_rows(runs: Sequence[Run], labels: Sequence[str]) -> list[list[str]]:
    rows = []
    for label, run in zip(labels, runs):
        last = run.records[-1] if run.records else {}
        accuracies = [r["test_accuracy"] for r in run.records if "test_accuracy" in r]
        total = run.setting("data.megabatches", "?")
        rows.append([
            html.escape(label), html.escape(str(run.path)),
            f"{len(run.records)} / {html.escape(str(total))}",
            f"{final_density_of(run):.3f}" if run.config else "&ndash;",
            _cell(last, "density", "{:.3f}".format),
            _cell(last, "test_accuracy", _percent),
            _percent(sum(accuracies) / len(accuracies)) if accuracies else "&ndash;",
            _cell(last, "cer", "{:.3f}".format),
            _cell(last, "generalization_gap", "{:+.2f}".format),
            f"{sum(r.get('seconds', 0.0) for r in run.records):.0f}",
        ])
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _export_section(run_dir: Path) -> list[str]:
    """The run's last channel or N:M export (RUN_DIR/export-summary.json, `app-dist export`):
    parameters (N:M: values stored), file size and measured inference time against the dense
    model (N:M: also float16 on a GPU, when the export was made on one)."""
    try:
        summary = json.loads(RunLayout(run_dir).export_summary.read_text())
    except (OSError, ValueError):
        return []
    rows = [["parameters", f"{summary['dense_parameters']:,}", f"{summary['parameters']:,}",
             f"{summary['parameters'] / summary['dense_parameters']:.2f}x"],
            ["file bytes", f"{summary['dense_file_bytes']:,}", f"{summary['file_bytes']:,}",
             f"{summary['file_bytes'] / summary['dense_file_bytes']:.2f}x"]]
    for batch, ms in summary.get("latency_ms", {}).items():
        rows.append([f"ms per batch of {batch}", f"{ms['dense']:.2f}", f"{ms['exported']:.2f}",
                     f"{ms['dense'] / ms['exported']:.2f}x faster"])
    for batch, ms in summary.get("gpu_latency_ms", {}).items():
        rows.append([f"GPU fp16 ms per batch of {batch}", f"{ms['dense']:.3f}",
                     f"{ms['exported']:.3f}", f"{ms['dense'] / ms['exported']:.2f}x faster"])
    structure = ""
    if "semi_structured" in summary:
        structure = (f" {summary['structure']}: {len(summary['n_m_valid_layers'])} layer(s) "
                     f"valid {summary['structure']}, {len(summary['semi_structured'])} Linear "
                     f"weight(s) semi-structured sparse on a GPU, "
                     f"{len(summary['dense_layers'])} left dense.")
    return [f"<p>Exported model <code>{html.escape(summary['file'])}</code>, measured on "
            f"{html.escape(summary['measured_on'])}:{html.escape(structure)}</p>",
            _table(["", "dense", "exported", "ratio"], [[html.escape(c) for c in row]
                                                        for row in rows])]


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; }
table { border-collapse: collapse; margin: 0.8em 0 1.6em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr));
  gap: 1em; }
figure { margin: 0; } figure img { width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
"""


def render_html(runs: Sequence[Run], labels: Sequence[str], figures: Sequence[Figure]) -> str:
    """The report page; every figure inlined as a data: URI so the file stands alone."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>app-dist report: {html.escape(', '.join(labels))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>app-dist report</h1>",
        f'<p class="meta">{len(runs)} run(s), written {time.strftime("%Y-%m-%d %H:%M")} by '
        "<code>app-dist report</code>.</p>",
        "<h2>Comparison</h2>",
        _table(["run", "directory", "megabatches done", "final target density", "density",
                "test acc", "mean test acc", "CER", "gen gap", "seconds"],
               _comparison_rows(runs, labels)),
        "<h2>Figures</h2>",
    ]
    parts.append('<div class="figures">')
    for figure in figures:
        data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(figure.title)}">'
            f"<figcaption>{html.escape(figure.caption)} "
            f"({html.escape(figure.path.name)})</figcaption></figure>")
    parts.append("</div>")
    parts.append("<h2>Runs</h2>")
    for label, run in zip(labels, runs):
        parts.append(f"<h3>{html.escape(label)}</h3>")
        parts.append(f'<p class="meta"><code>{html.escape(str(run.path))}</code>: '
                     f"{html.escape(describe_config(run))}</p>")
        parts.extend(_export_section(run.path))
        if run.records:
            rows = [[_cell(record, key, fmt) for key, _, fmt in TABLE_COLUMNS]
                    for record in run.records]
            parts.append(_table([title for _, title, _ in TABLE_COLUMNS], rows))
        else:
            parts.append("<p>No megabatch has finished yet.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None
                 ) -> tuple[Path, list[Path]]:
    """Read the runs, draw the figures into `out` (default FIRST_RUN_DIR/report) and write
    report.html there. Returns (the HTML path, the PNG paths); AppDistError when no run has a
    finished megabatch or a path is not a run directory."""
    runs = [read_run(path) for path in run_dirs]
    if not any(run.records for run in runs):
        names = ", ".join(str(run.path) for run in runs)
        raise AppDistError(f"no finished megabatch in {names} (metrics.jsonl is empty or "
                           "missing); report once the first megabatch has been checkpointed")
    out = Path(out) if out is not None else runs[0].path / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AppDistError(f"cannot create the report folder {out}: {error.strerror}; "
                           "choose another with --out") from None
    labels = run_labels(runs)
    figures = draw_figures(runs, labels, out)
    page = out / REPORT_NAME
    page.write_text(render_html(runs, labels, figures))
    return page, [figure.path for figure in figures]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="app-dist report",
        description="Plot runs against megabatch (test accuracy, CER, generalisation gap, "
                    "density, per-layer density heat maps) and write one self-contained HTML "
                    "page with the metrics tables.",
        epilog="Example: app-dist report runs/dense-* runs/osp-* runs/app-* --out reports/cmp")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (overlaid in one figure per metric)")
    parser.add_argument("--out", default=None,
                        help="folder for report.html and the PNGs (default: FIRST_RUN_DIR/report)")
    return parser


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    page, figures = write_report(args.run_dirs, args.out)
    print(f"wrote {page} ({len(figures)} figures: {', '.join(p.name for p in figures)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
