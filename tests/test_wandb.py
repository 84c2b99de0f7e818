"""wandb as users know it: real offline runs, read back from the files wandb wrote."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from app_dist.config import load_config
from app_dist.foundations.errors import AppDistError
from app_dist.training.metrics import WandbLog

from .conftest import run_trainer, short_run_args

_BLOCK = 32 * 1024  # wandb's record log is LevelDB's log format: 32 KiB blocks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(run_file: Path) -> list[Any]:
    """The protobuf records of an offline run-<id>.wandb file, in the order written."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a wandb record log"
    payloads, pending, position = [], b"", 7  # 7-byte file header: ident, magic, version
    while position + 7 <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < 7:  # a block's tail too short for a header is zero padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == _FULL:
            payloads.append(chunk)
        elif kind in (_FIRST, _MIDDLE):
            pending += chunk
        elif kind == _LAST:
            payloads.append(pending + chunk)
            pending = b""
        else:  # zeros: the writer padded the rest of this block
            position += -position % _BLOCK
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _finished_records(run_file: Path, timeout_s: float = 60.0) -> list[Any]:
    """The records once the file ends with the run's exit record. wandb-core (a separate
    process) may still be flushing the file for a moment after `run.finish()` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(run_file)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{run_file} never got its exit record"
        time.sleep(0.2)


def _items(update_list: Any) -> dict[str, Any]:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json)
            for item in update_list}


class OfflineRun:
    """What one offline wandb run folder says about the run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (run_file,) = folder.glob("run-*.wandb")
        records = _finished_records(run_file)
        kinds = [(r.WhichOneof("record_type"), r) for r in records]
        (self.run,) = [r.run for kind, r in kinds if kind == "run"]
        self.config = {item.key: json.loads(item.value_json) for item in self.run.config.update}
        self.metrics = [r.metric for kind, r in kinds if kind == "metric"]
        self.history = [_items(r.history.item) for kind, r in kinds if kind == "history"]
        self.summary: dict[str, Any] = {}
        for kind, record in kinds:
            if kind == "summary":
                self.summary.update(_items(record.summary.update))

    def latest_table(self, key: str) -> dict[str, Any]:
        tables = sorted((self.folder / "files" / "media" / "table").glob(f"{key}_*.table.json"),
                        key=lambda p: int(p.name.split("_")[-2]))
        assert tables, f"no {key} table in {self.folder}"
        return json.loads(tables[-1].read_text())


def _offline_runs(run_dir: Path) -> list[OfflineRun]:
    return [OfflineRun(folder) for folder in sorted((run_dir / "wandb").glob("offline-run-*"))]


def _record(megabatch: int, accuracy: float, layers: dict[str, float]) -> dict[str, Any]:
    return {"megabatch": megabatch, "density": min(layers.values()), "test_accuracy": accuracy,
            "cer": 1.0 - accuracy, "layer_density": layers}


@pytest.fixture
def wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


@pytest.mark.slow
def test_offline_run_holds_config_megabatch_axis_group_and_layer_table(
        tmp_path: Path, wandb_env: None) -> None:
    config = load_config(None, ["log.wandb.group=sweep-cifar10", "prune.method=osp",
                                "run.name=trial-00007"])
    run_dir = tmp_path / "runs" / "osp-1234"
    logger = WandbLog(config, run_dir, "abc123def456")
    logger.log(_record(1, 0.5, {"conv1.weight": 0.9, "conv2.weight": 0.3}))
    logger.log(_record(2, 0.75, {"conv1.weight": 0.8, "conv2.weight": 0.2}))
    logger.finish()

    (run,) = _offline_runs(run_dir)
    assert run.folder.name.endswith("-abc123def456")
    assert (run.run.run_id, run.run.run_group, run.run.job_type) == (
        "abc123def456", "sweep-cifar10", "osp")
    assert run.run.display_name == "trial-00007"
    assert run.config["prune"]["method"] == "osp"
    assert run.config["log"]["wandb"]["group"] == "sweep-cifar10"
    assert any(m.glob_name == "*" and m.step_metric == "megabatch" for m in run.metrics)
    assert [(h["_step"], h["megabatch"], h["test_accuracy"]) for h in run.history] == [
        (1, 1, 0.5), (2, 2, 0.75)]
    assert run.summary["test_accuracy"] == 0.75 and run.summary["megabatch"] == 2
    table = run.latest_table("layer_density")
    assert table["columns"] == ["megabatch", "layer", "density"]
    assert table["data"] == [[1, "conv1.weight", 0.9], [1, "conv2.weight", 0.3],
                             [2, "conv1.weight", 0.8], [2, "conv2.weight", 0.2]]


def test_resumed_run_keeps_its_id_and_the_layer_table_of_earlier_megabatches(
        tmp_path: Path, wandb_env: None) -> None:
    config = load_config(None, [])
    earlier = _record(1, 0.5, {"conv1.weight": 0.9})
    logger = WandbLog(config, tmp_path / "run", "resumed00001", history=[earlier])
    logger.log(_record(2, 0.6, {"conv1.weight": 0.7}))
    logger.finish()

    (run,) = _offline_runs(tmp_path / "run")
    assert run.run.run_id == "resumed00001"
    # The wandb step is the megabatch, so the resumed curve continues at 2 instead of 0.
    assert [(h["_step"], h["megabatch"]) for h in run.history] == [(2, 2)]
    assert run.latest_table("layer_density")["data"] == [[1, "conv1.weight", 0.9],
                                                          [2, "conv1.weight", 0.7]]


def test_disabled_mode_writes_nothing(tmp_path: Path, wandb_env: None) -> None:
    logger = WandbLog(load_config(None, ["log.wandb.mode=disabled"]), tmp_path, "x")
    logger.log(_record(1, 0.5, {"a": 1.0}))
    logger.finish()
    assert not (tmp_path / "wandb").exists()


def test_online_without_login_is_one_line_error_with_the_fix(
        tmp_path: Path, wandb_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a stored key
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(AppDistError) as caught:
        WandbLog(load_config(None, ["log.wandb.mode=online"]), tmp_path / "run", "y")
    message = str(caught.value)
    assert "\n" not in message
    assert "wandb login" in message and "log.wandb.mode=offline" in message


@pytest.mark.slow
def test_a_finished_run_started_again_starts_no_wandb_run(
        finished_run: Path, digits_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "app"
    shutil.copytree(finished_run, run_dir)
    again = run_trainer(short_run_args(digits_shards, run_dir, "log.wandb.mode=offline"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after megabatch 2" in again.stdout and "wandb sync" not in again.stdout
    assert len(_offline_runs(run_dir)) == 1  # the first run's


@pytest.mark.slow
def test_a_real_training_run_logs_every_megabatch_offline(
        finished_run: Path, finished_run_stdout: str) -> None:
    """The suite's shared finished run logs offline, in wandb group test-sweep."""
    run_dir = finished_run
    assert "wandb sync" in finished_run_stdout  # the user is told how to upload the offline run
    (run,) = _offline_runs(run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert run.run.run_group == "test-sweep" and run.run.job_type == "app"
    assert run.config["data"]["megabatches"] == 2
    assert [h["megabatch"] for h in run.history] == [1, 2]
    assert [h["test_accuracy"] for h in run.history] == [m["test_accuracy"] for m in metrics]
    assert run.summary["cer"] == metrics[-1]["cer"]
    rows = run.latest_table("layer_density")["data"]
    expected = [[m["megabatch"], name, density] for m in metrics
                for name, density in m["layer_density"].items()]
    assert rows == expected
