"""A stream whose megabatches arrive while the run trains: `app-dist shards append` publishes
them (a separate process), `data.follow=true` trains each one as it lands and waits for the
next. Pre-emption while waiting and while training, and the resume, work as in a normal run,
and the result equals the run over the complete data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app_dist.config import load_config
from app_dist.data.manifest import Manifest
from app_dist.data.prepare.stream import append_megabatch
from app_dist.foundations.errors import ConfigError, DataError
from app_dist.foundations.run_layout import CheckpointFiles, RunLayout
from app_dist.training.run_input import prepare

from .conftest import (
    REPO,
    checkpoint_folder,
    digits_run_args,
    launch_trainer,
    read_metrics,
    run_trainer,
    trainer_env,
    wait_for,
)
from .storage_servers import S3Server, require


def test_appending_publishes_megabatches_in_order_and_a_partial_stream_needs_follow(
        digits_shards, tmp_path):
    stream = tmp_path / "stream"
    with pytest.raises(ConfigError, match="--megabatches: required"):
        append_megabatch(str(stream), str(digits_shards), None)
    source = Manifest.load(digits_shards)
    first = append_megabatch(str(stream), str(digits_shards), 3)
    assert first.stream.bounds == (0, 20) and first.stream.megabatches == 3
    assert first.splits["test"] == source.splits["test"]
    assert first.splits["train"].shards == source.splits["train"].shards[:20]
    assert Manifest.load(stream) == first  # the manifest lists only what is there

    config = load_config(REPO / "configs/digits.yaml", [f"data.shards={stream}",
                                                         "data.megabatches=3"])
    with pytest.raises(DataError, match="1 of its 3 megabatches published; data.follow=true"):
        prepare(config, world_size=1)
    with pytest.raises(ConfigError, match="data.follow' = true: .* is not a stream"):
        prepare(load_config(REPO / "configs/digits.yaml",
                            [f"data.shards={digits_shards}", "data.follow=true"]), 1)
    with pytest.raises(ConfigError, match="--megabatches 4: the stream .* declares 3"):
        append_megabatch(str(stream), str(digits_shards), 4)

    append_megabatch(str(stream), str(digits_shards), None)
    last = append_megabatch(str(stream), str(digits_shards), None)
    assert last.stream.bounds == (0, 20, 40, 60) and last.stream.complete
    assert last.splits == source.splits
    with pytest.raises(DataError, match="all 3 megabatches are published"):
        append_megabatch(str(stream), str(digits_shards), None)
    _, complete = prepare(config, world_size=1)
    assert [complete.megabatch_shards(t) for t in (1, 2, 3)] == [
        source.splits["train"].shards[a:b] for a, b in ((0, 20), (20, 40), (40, 60))]


def appender(stream: Path | str, shards: Path, after_seconds: float = 0.0,
             env: dict[str, str] | None = None) -> subprocess.Popen:
    """`app-dist shards append` in a process of its own, after a delay."""
    script = ("import sys, time; time.sleep(float(sys.argv[1])); from app_dist.cli import main;"
              " sys.exit(main(['shards', 'append', *sys.argv[2:]]))")
    command = [sys.executable, "-c", script, str(after_seconds), str(stream), "--from",
               str(shards), "--megabatches", "3"]
    return subprocess.Popen(command, cwd=REPO, env=trainer_env(env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def published(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out


@pytest.mark.slow
def test_appending_to_a_bucket_publishes_each_megabatch_after_its_shards(digits_shards):
    """`app-dist shards append s3://...` against moto's S3 server: the first call finds no
    manifest (a new stream), each call uploads the megabatch's shards and then the manifest
    that lists them."""
    require("s3fs")
    require("moto")
    s3 = S3Server()
    s3.start()
    try:
        s3.make_bucket("streams")
        for t in (1, 2):
            published(appender("s3://streams/digits", digits_shards, env=s3.env))
            manifest = json.loads(s3.filesystem().cat_file("streams/digits/manifest.json"))
            assert manifest["stream"]["bounds"] == [0, 20, 40][:t + 1]
            names = {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
            stored = {path.rsplit("/", 1)[1] for path in s3.filesystem().ls("streams/digits")}
            assert names | {"manifest.json"} == stored
    finally:
        s3.stop()


def outcome(run_dir: Path) -> dict:
    return json.loads(RunLayout(run_dir).outcome.read_text())


@pytest.mark.slow
@pytest.mark.distributed
def test_a_followed_stream_survives_pre_emption_waiting_and_training_and_equals_the_full_run(
        digits_shards, uninterrupted, tmp_path):
    stream, run_dir = tmp_path / "stream", tmp_path / "run"
    args = digits_run_args(stream, run_dir, "data.follow=true", "data.follow_poll_s=0.2",
                           "log.wandb.mode=disabled")
    assert "published megabatch 1 of 3" in published(appender(stream, digits_shards))

    # 1. SIGTERM to torchrun (it passes it to the ranks) while the run waits for megabatch 2.
    run = launch_trainer(args, nproc=2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    assert wait_for(checkpoint_folder(run_dir, 1) / CheckpointFiles.MARKER, run, timeout=300)
    assert wait_for(lambda: (run_dir / "anytime" / "model.json").exists(), run, timeout=60)
    time.sleep(1.0)  # past the end of megabatch 1: polling the stream every 0.2 s
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    assert "waiting for megabatch 2 of 3" in output
    assert "pre-empted while waiting for megabatch 2" in output
    assert outcome(run_dir)["exit_code"] == 75

    # 2. Megabatch 2 lands; SIGTERM while it trains (rank 0 paused at a step to time it).
    published(appender(stream, digits_shards))
    announce = tmp_path / "training"
    run = launch_trainer(args, nproc=2, env={
        "APP_DIST_FAULT": f"pause:rank=0,megabatch=2,epoch=1,step=2,seconds=2,"
                          f"announce={announce}"})
    assert wait_for(announce, run, timeout=300)
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=120)
    assert outcome(run_dir)["exit_code"] == 75
    assert (RunLayout(run_dir).checkpoints / "preempted-0002").is_dir()

    # 3. The same command resumes megabatch 2 while megabatch 3 is being published.
    last = appender(stream, digits_shards, after_seconds=3)
    resumed = run_trainer(args, nproc=2)
    published(last)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(run_dir) == read_metrics(uninterrupted)
    final = [torch.load(checkpoint_folder(d, 3) / "state.pt", weights_only=True)["masks"]
             for d in (run_dir, uninterrupted)]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[1])
