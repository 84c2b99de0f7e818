"""`app-dist inspect RUN_DIR|CHECKPOINT_DIR`: what a run directory or a checkpoint holds.

Config summary, the megabatch reached, density per layer, the metrics so far and whether the
run can be resumed, i.e. whether its newest checkpoint verifies (COMPLETE.json present and
every file matching its sha256, exactly the test the trainer applies before resuming).
Reads files only; never modifies the run.

Exit codes: 0 resumable (the newest checkpoint verifies), 3 not resumable (no checkpoint yet,
or the newest one is damaged; the report says what a rerun would do), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from app_dist.foundations.commands import ArgumentParser, command
from app_dist.foundations.errors import AppDistError
from app_dist.foundations.run_layout import CheckpointFiles, RunLayout
from app_dist.foundations.torch_files import load_torch_file
from app_dist.results.runs import Run, describe_config, read_run
from app_dist.training.checkpoint import MARKER, Checkpoint, scan_checkpoints, verify
from app_dist.training.metrics import SUMMARY_COLUMNS, summary_table

NOT_RESUMABLE = 3  # the exit code when the report says "not resumable" (docs/TROUBLESHOOTING.md)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _mask_densities(masks: dict[str, torch.Tensor]) -> dict[str, dict[str, float | int]]:
    return {name: {"density": float(mask.float().mean()), "kept": int(mask.count_nonzero()),
                   "total": mask.numel()} for name, mask in masks.items()}


def _checkpoint_entries(run_dir: Path) -> list[dict[str, Any]]:
    """Every checkpoint folder of the run, oldest first, verified as the trainer would."""
    entries = []
    for item in scan_checkpoints(run_dir):
        if isinstance(item, Checkpoint):
            entries.append({"path": str(item.path), "megabatch": item.megabatch,
                            "world_size": item.world_size,
                            "partial": item.partial, "problem": None})
        else:
            entries.append({"path": str(item.path), "problem": item.reason})
    return entries


def _resume_verdict(entries: list[dict[str, Any]], total: int | None) -> tuple[bool, str]:
    """(whether the newest checkpoint verifies, what a rerun of the same command would do)"""
    valid = [entry for entry in entries if entry["problem"] is None]
    if not entries:
        return False, "no checkpoint yet: running the same command starts at megabatch 1"
    newest = entries[-1]
    if newest["problem"] is None:
        name = Path(newest["path"]).name
        if total is not None and newest["megabatch"] >= total and not newest["partial"]:
            return True, (f"finished ({name} verifies): running the same command again prints "
                          "the table; checkpoint.resume=false starts over")
        return True, f"yes: {name} verifies; running the same command continues from it"
    damaged = f"the newest checkpoint {Path(newest['path']).name} is unusable ({newest['problem']})"
    if valid:
        return False, (f"{damaged}; the trainer would fall back to "
                       f"{Path(valid[-1]['path']).name}")
    return False, f"{damaged} and no other checkpoint verifies: a rerun starts at megabatch 1"


def inspect_run(run: Run) -> dict[str, Any]:
    """What a run directory holds, as a JSON-ready dict."""
    entries = _checkpoint_entries(run.path)
    total = run.setting("data.megabatches")
    valid = [entry for entry in entries if entry["problem"] is None]
    reached = max([r["megabatch"] for r in run.records]
                  + [e["megabatch"] for e in valid if not e["partial"]] + [0])
    resumable, verdict = _resume_verdict(entries, total)
    layers: dict[str, Any] = {}
    source = "none"
    if valid:
        state = Checkpoint(Path(valid[-1]["path"]), valid[-1]["megabatch"],
                           valid[-1]["world_size"]).load_state()
        layers = _mask_densities(state["masks"])
        source = f"masks in {Path(valid[-1]['path']).name}"
    elif run.records and run.records[-1].get("layer_density"):
        layers = {name: {"density": value}
                  for name, value in run.records[-1]["layer_density"].items()}
        source = f"metrics.jsonl, megabatch {run.records[-1]['megabatch']}"
    return {
        "kind": "run", "path": str(run.path), "config": describe_config(run),
        "megabatches": total, "megabatch_reached": reached, "checkpoints": entries,
        "resumable": resumable, "resume": verdict, "layer_density": layers,
        "layer_density_source": source, "metrics": run.records,
    }


def inspect_checkpoint(folder: Path) -> dict[str, Any]:
    """What one checkpoint folder holds, as a JSON-ready dict."""
    problem = verify(folder)
    run_dir = folder.parent.parent
    layout = RunLayout(run_dir)
    info: dict[str, Any] = {"kind": "checkpoint", "path": str(folder), "run_dir": str(run_dir),
                            "verifies": problem is None, "problem": problem,
                            "resumable": problem is None}
    if problem is not None:
        info["resume"] = f"no: {problem}; the trainer skips this folder"
        return info
    marker = json.loads((folder / MARKER).read_text())
    state = load_torch_file(folder / CheckpointFiles.STATE)
    run = Run(path=run_dir, config=_unflatten(state.get("settings", {})),
              records=list(state.get("run", {}).get("history", [])))
    if layout.config.is_file():
        run = Run(path=run_dir, config=read_run(run_dir).config, records=run.records)
    info.update({
        "config": describe_config(run), "megabatch": marker["megabatch"],
        "partial": bool(marker.get("partial", False)), "world_size": marker["world_size"],
        "written_at": marker.get("written_at"), "files": sorted(marker["sha256"]),
        "megabatches": run.setting("data.megabatches"),
        "megabatch_reached": marker["megabatch"],
        "resume": f"yes: every file matches its sha256 ({len(marker['sha256'])} files)",
        "layer_density": _mask_densities(state["masks"]),
        "layer_density_source": f"masks in {folder.name}",
        "metrics": run.records,
    })
    return info


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Dispatch on what `path` is; AppDistError with the fix when it is neither."""
    path = Path(path)
    layout = RunLayout(path)
    if path.is_dir() and ((path / MARKER).is_file()
                          or RunLayout(path.parent.parent).is_checkpoint_folder(path)):
        return inspect_checkpoint(path)
    if path.is_dir() and not layout.config.exists() and layout.checkpoints.is_dir():
        return inspect_run(Run(path=path, config=None, records=[]))
    try:
        return inspect_run(read_run(path))
    except AppDistError as error:
        raise AppDistError(f"{error}, or one of its checkpoints/megabatch-NNNN folders"
                           ) from None


def format_report(info: dict[str, Any]) -> str:
    """The human-readable view of `inspect_path`'s dict."""
    lines = [f"{info['kind']:<13}{info['path']}"]
    if info["kind"] == "checkpoint" and not info["verifies"]:
        return "\n".join(lines + [f"{'resumable':<13}{info['resume']}"])
    lines.append(f"{'config':<13}{info['config']}")
    total = info.get("megabatches")
    reached = info["megabatch_reached"]
    lines.append(f"{'reached':<13}megabatch {reached} of {total if total is not None else '?'}")
    if info["kind"] == "checkpoint":
        kind = "pre-emption (mid-megabatch)" if info["partial"] else "end of megabatch"
        lines.append(f"{'written':<13}{info['written_at']} by {info['world_size']} rank(s), "
                     f"{kind}; files: {', '.join(info['files'])}")
    else:
        for index, entry in enumerate(info["checkpoints"]):
            title = "checkpoints" if index == 0 else ""
            status = "ok" if entry["problem"] is None else f"UNUSABLE: {entry['problem']}"
            lines.append(f"{title:<13}{Path(entry['path']).name}  {status}")
    lines.append(f"{'resumable':<13}{info['resume']}")
    layers = info["layer_density"]
    if layers:
        lines.append(f"density per layer ({info['layer_density_source']}):")
        width = max(len(name) for name in layers)
        for name, entry in layers.items():
            counts = (f"  ({entry['kept']:,} of {entry['total']:,} weights kept)"
                      if "kept" in entry else "")
            lines.append(f"  {name:<{width}}  {entry['density']:.3f}{counts}")
    records = info["metrics"]
    if records:
        lines.append("metrics so far:")
        keys = [key for key, _, _ in SUMMARY_COLUMNS]
        if all(key in record for record in records for key in keys):
            lines += ["  " + line for line in summary_table(records).splitlines()]
        else:
            lines += ["  " + json.dumps({k: r[k] for k in keys if k in r}) for r in records]
    else:
        lines.append("metrics so far: none (no megabatch finished)")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="app-dist inspect",
        description="Show what a run directory or a checkpoint folder holds: config, "
                    "megabatch reached, density per layer, metrics so far, and whether the "
                    "run can be resumed (its newest checkpoint verifies).",
        epilog=f"Exit codes: 0 resumable (the newest checkpoint verifies), {NOT_RESUMABLE} not "
               "resumable (no checkpoint yet, or the newest one fails its sha256 check; the "
               "report still prints and says what a rerun would do), 2 bad input (the path is "
               "neither a run directory nor a checkpoint folder).")
    parser.add_argument("path", metavar="RUN_DIR|CHECKPOINT_DIR",
                        help="a run directory or RUN_DIR/checkpoints/megabatch-NNNN")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    return parser


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    """0 when the run (or checkpoint) is resumable, NOT_RESUMABLE when the report says it is
    not, 2 on bad input."""
    info = inspect_path(args.path)
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0 if info["resumable"] else NOT_RESUMABLE


if __name__ == "__main__":
    sys.exit(main())
