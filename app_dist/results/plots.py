"""Figures of runs against megabatch, as PNG files.

Runs are given as `{label: records}`, where records are the dicts of a run's metrics.jsonl
(one per megabatch, each with a "megabatch" key). Figures are drawn on matplotlib `Figure`
objects with the Agg canvas, never through pyplot: no display, no global figure state, safe
to call from tests and from several threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Records = Sequence[Mapping[str, Any]]

# One fixed colour and marker per method, so dense / OSP / APP look the same in every figure.
METHOD_STYLE = {"dense": ("#4d4d4d", "s"), "osp": ("#1f77b4", "^"), "app": ("#d62728", "o")}
_OTHER_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#ff7f0e"]


def _new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _style(label: str, index: int) -> tuple[str, str]:
    for method, style in METHOD_STYLE.items():
        if label == method or label.startswith(f"{method} "):
            return style
    return _OTHER_COLOURS[index % len(_OTHER_COLOURS)], "D"


def plot_runs(runs: Mapping[str, Records], key: str, ylabel: str, path: str | Path,
              title: str | None = None, scale: float = 1.0) -> Path:
    """One line per run of `record[key] * scale` against megabatch, saved as a PNG at `path`.
    Where records also hold `key_low` and `key_high` (the spread of several seeds), the band
    between them is shaded in the line's colour.

    Records without `key` are skipped (an older run may lack a newer metric). Returns `path`.
    Raises ValueError when no run has any value for `key`.
    """
    figure = _new_figure()
    axes = figure.add_subplot()
    drawn = 0
    for index, (label, records) in enumerate(runs.items()):
        points = [(r["megabatch"], r[key] * scale) for r in records if r.get(key) is not None]
        if not points:
            continue
        colour, marker = _style(label, index)
        x, y = zip(*points)
        axes.plot(x, y, color=colour, marker=marker, label=label, linewidth=1.8)
        band = [(r["megabatch"], r[f"{key}_low"] * scale, r[f"{key}_high"] * scale)
                for r in records if r.get(f"{key}_low") is not None
                and r.get(f"{key}_high") is not None]
        if band:
            bx, low, high = zip(*band)
            axes.fill_between(bx, low, high, color=colour, alpha=0.18, linewidth=0)
        drawn += 1
    if not drawn:
        raise ValueError(f"no run has a value for '{key}'")
    axes.set_xlabel("megabatch")
    axes.set_ylabel(ylabel)
    axes.set_title(title or ylabel)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(True, alpha=0.3)
    axes.legend()
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def layer_density_matrix(records: Records) -> tuple[list[str], list[int], np.ndarray]:
    """(layer names, megabatches, densities[layer, megabatch]) from the records'
    "layer_density" maps. A layer missing at some megabatch is NaN there."""
    with_layers = [r for r in records if r.get("layer_density")]
    layers: list[str] = []
    for record in with_layers:
        layers += [name for name in record["layer_density"] if name not in layers]
    megabatches = [int(r["megabatch"]) for r in with_layers]
    matrix = np.full((len(layers), len(megabatches)), np.nan)
    for column, record in enumerate(with_layers):
        for row, name in enumerate(layers):
            matrix[row, column] = record["layer_density"].get(name, np.nan)
    return layers, megabatches, matrix


def plot_layer_density(records: Records, path: str | Path, title: str = "density per layer"
                       ) -> Path:
    """Heat map of each prunable layer's density (rows, in model order) at every megabatch
    (columns), colour scale fixed to [0, 1]. Returns `path`; ValueError without layer data."""
    layers, megabatches, matrix = layer_density_matrix(records)
    if not layers:
        raise ValueError("the records hold no 'layer_density'")
    # Tall enough for one readable label per layer (ResNet-50 has 53 prunable layers).
    height = min(30.0, max(3.0, 1.2 + 0.22 * len(layers)))
    width = min(16.0, max(5.0, 3.5 + 0.45 * len(megabatches)))
    figure = _new_figure(width, height)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                        interpolation="nearest")
    axes.set_xticks(range(len(megabatches)), [str(t) for t in megabatches])
    axes.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 20 else 9)
    axes.set_xlabel("megabatch")
    axes.set_title(title)
    if len(layers) * len(megabatches) <= 160:  # numbers stay legible only on small grids
        for row in range(len(layers)):
            for column in range(len(megabatches)):
                value = matrix[row, column]
                if not np.isnan(value):
                    axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axes, label="density (kept / all weights)")
    path = Path(path)
    figure.savefig(path, format="png")
    return path
