"""The run directory's layout lives in one module, pruning needs no engine, and the loop's
events reach callbacks in order during a real run."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from app_dist.config import load_config
from app_dist.foundations.distributed import Platform
from app_dist.foundations.run_layout import CheckpointFiles, RunLayout, parse_checkpoint_folder
from app_dist.training.events import Callback

from .conftest import REPO

PACKAGE = REPO / "app_dist"
# File and folder names of a run directory: only app_dist/foundations/run_layout.py may spell them.
LAYOUT_NAMES = re.compile(r"^(config\.yaml|metrics\.jsonl|state\.pt|engine\.pt|COMPLETE\.json"
                          r"|outcome\.json|run\.lock(\.takeover)?)$"
                          r"|(megabatch|preempted|rank)-(\{|\[|%)")


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings, with their line numbers."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_only_the_layout_module_spells_run_directory_names() -> None:
    offenders = [f"{path.relative_to(REPO)}:{line}: {value!r}"
                 for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "run_layout.py"
                 for line, value in _code_strings(path) if LAYOUT_NAMES.search(value)]
    assert offenders == []


def test_pruning_imports_no_engine() -> None:
    for path in sorted((PACKAGE / "pruning").glob("*.py")):
        imported = [node.module or "" for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Import) for alias in node.names]
        assert not [name for name in imported if name.startswith("app_dist.engine")], path


def test_layout_names_and_order(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    assert layout.checkpoint(3) == tmp_path / "checkpoints" / "megabatch-0003"
    assert layout.checkpoint(3, partial=True) == tmp_path / "checkpoints" / "preempted-0004"
    for folder in (layout.checkpoint(3), layout.checkpoint(3, partial=True),
                   layout.checkpoint(4), layout.checkpoint(1)):
        folder.mkdir(parents=True)
    (layout.checkpoints / "megabatch-0002.replaced-17").mkdir()  # set aside: not a checkpoint
    (layout.checkpoints / ".megabatch-0005.incomplete").mkdir()  # staging: not a checkpoint
    found = layout.checkpoint_folders()
    assert [(f.completed, f.partial) for f in found] == [(1, False), (3, False), (3, True),
                                                         (4, False)]
    assert parse_checkpoint_folder(layout.checkpoint(3, partial=True)).completed == 3
    assert CheckpointFiles.rank(1) == "rank-00001.pt"


class Recorder(Callback):
    """Every event of a run, in order, with the details that place it."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def run_start(self, engine):
        self.events.append(("run_start",))

    def megabatch_start(self, megabatch):
        self.events.append(("megabatch_start", megabatch))

    def after_prune(self, megabatch, masks, pruned):
        self.events.append(("after_prune", megabatch, pruned, round(masks.density(), 4)))

    def epoch_start(self, megabatch, epoch):
        self.events.append(("epoch_start", megabatch, epoch))

    def pass_ready(self, phase, steps, steps_done):
        self.events.append(("pass_ready", phase, steps, steps_done))

    def batch_start(self, phase):
        self.events.append(("batch_start", phase))

    def batch_end(self, phase, step):
        self.events.append(("batch_end", phase, step))

    def epoch_end(self, megabatch, epoch):
        self.events.append(("epoch_end", megabatch, epoch))

    def evaluation_start(self, phase):
        self.events.append(("evaluation_start", phase))

    def evaluation_end(self, phase, result):
        self.events.append(("evaluation_end", phase, result.count))

    def checkpoint_start(self, partial):
        self.events.append(("checkpoint_start", partial))

    def checkpoint_end(self, folder, partial):
        self.events.append(("checkpoint_end", folder.name, partial))

    def megabatch_end(self, record, folder):
        self.events.append(("megabatch_end", record["megabatch"], folder.name))


@pytest.mark.slow
def test_a_run_fires_every_event_in_order_and_checkpoints_keep_their_format(
        digits_shards: Path, tmp_path: Path) -> None:
    from app_dist.train import train
    from app_dist.training.run_input import prepare

    config = load_config(REPO / "configs/digits.yaml", [
        f"data.shards={digits_shards}", f"run.dir={tmp_path}", "data.megabatches=2",
        "train.epochs=2", "data.num_workers=0", "log.wandb.mode=disabled",
        "log.progress=false"])
    manifest, stream = prepare(config)
    recorder = Recorder()
    state = train(config, manifest, stream, Platform(0, 1, 0, torch.device("cpu")),
                  callbacks=[recorder])
    events = recorder.events
    names = [event[0] for event in events]
    assert names[:3] == ["run_start", "megabatch_start", "after_prune"]
    assert events[2][1:3] == (1, True) and events[2][3] < 1.0  # APP prunes before megabatch 1
    # Each epoch: start, the pass, one batch_start/batch_end pair per step, end, validation.
    for megabatch in (1, 2):
        starts = [i for i, e in enumerate(events) if e[:2] == ("epoch_start", megabatch)]
        assert len(starts) == 2
        for begin in starts:
            ready = events[begin + 1]
            assert ready[:2] == ("pass_ready", "train") and ready[3] == 0
            steps = [e for e in events[begin + 2:begin + 2 + 2 * ready[2]]]
            assert steps == [x for step in range(1, ready[2] + 1)
                             for x in (("batch_start", "train"), ("batch_end", "train", step))]
            assert events[begin + 2 + 2 * ready[2]][0] == "epoch_end"
            assert events[begin + 3 + 2 * ready[2]] == ("evaluation_start", "validation")
    tail = [e for e in events if e[0] in ("evaluation_end", "checkpoint_start",
                                           "checkpoint_end", "megabatch_end")][-4:]
    assert [e[0] for e in tail] == ["evaluation_end", "checkpoint_start", "checkpoint_end",
                                    "megabatch_end"]
    assert tail[0][1] == "test" and tail[0][2] == len(stream.test_selection())
    assert tail[3] == ("megabatch_end", 2, "megabatch-0002") == (*tail[3][:2], tail[2][1])
    assert state.completed == 2

    # The checkpoint payload is the one earlier versions wrote (and resume from), plus the
    # input shape that `app-dist export` times the model on (it falls back to the stem's usual
    # size for earlier checkpoints, which lack it; resuming does not read it).
    folder = RunLayout(tmp_path).checkpoint(2)
    shared = torch.load(folder / CheckpointFiles.STATE, weights_only=True)
    assert set(shared) == {"masks", "run", "progress", "settings", "world_size", "input_shape"}
    assert shared["input_shape"] == [1, 8, 8]  # digits
    assert set(shared["run"]) == {"completed", "history", "wandb_id"}
    rank = torch.load(folder / CheckpointFiles.rank(0), weights_only=True)
    assert set(rank) == {"rng", "masks", "pruned_residue", "epoch_sums", "buffers"}
    engine = torch.load(folder / CheckpointFiles.ENGINE, weights_only=True)
    assert set(engine) == {"model", "optimizer", "scheduler", "scaler"}
