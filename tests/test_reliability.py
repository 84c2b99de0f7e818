"""Faults and bad input (docs/RELIABILITY.md): every scenario injected for real."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from app_dist.foundations.distributed import Platform
from app_dist.foundations.errors import CheckpointError
from app_dist.foundations.files import file_sha256
from app_dist.train import main as train_main
from app_dist.training.checkpoint import Checkpointer, verify
from app_dist.training.faults import FaultInjector

from .conftest import (
    REPO,
    checkpoint_folder,
    copy_shards,
    digits_run_args,
    first_sample_key,
    launch_trainer,
    rank_processes,
    read_metrics,
    reseal,
    rewrite_shard,
    run_trainer,
    short_run_args,
)

CPU = Platform(0, 1, 0, torch.device("cpu"))


# --- pre-emption (SIGTERM) ---------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_exit_code_is_75_in_a_single_process(digits_shards, tmp_path):
    fault = {"APP_DIST_FAULT": "sigterm:rank=0,megabatch=1,epoch=0,step=1"}
    args = digits_run_args(digits_shards, tmp_path / "run", "data.megabatches=2")
    result = run_trainer(args, nproc=1, env=fault)
    assert result.returncode == 75, result.stderr[-2000:]


# --- damaged checkpoints ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.distributed
def test_corrupt_newest_checkpoint_is_reported_kept_and_skipped(digits_shards, uninterrupted,
                                                                tmp_path):
    run_dir = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, run_dir)
    newest = checkpoint_folder(run_dir, 3)
    engine_file = newest / "engine.pt"
    engine_file.write_bytes(engine_file.read_bytes()[: engine_file.stat().st_size // 2])
    assert "does not match its sha256" in verify(newest)

    resumed = run_trainer(digits_run_args(digits_shards, run_dir), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "skipping checkpoint" in output and "megabatch-0003" in output
    assert "resuming after megabatch 2" in output
    assert read_metrics(run_dir) == read_metrics(uninterrupted)
    kept_aside = list((run_dir / "checkpoints").glob("megabatch-0003.replaced-*"))
    assert len(kept_aside) == 1 and verify(kept_aside[0]) is not None  # bad file not deleted
    assert verify(checkpoint_folder(run_dir, 3)) is None


class FakeEngine:
    """Writes one real engine file, or fails like a full disk."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save(self, folder: Path) -> None:
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save({"weights": torch.ones(3)}, folder / "engine.pt")


def test_disk_full_while_checkpointing_is_a_clear_error_and_keeps_the_previous(tmp_path):
    checkpointer = Checkpointer(tmp_path, CPU, keep_last=2)
    checkpointer.write(1, {"x": 1}, {}, FakeEngine())
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        checkpointer.write(2, {"x": 2}, {}, FakeEngine(fail=True))
    assert verify(checkpointer.folder(1)) is None
    assert not checkpointer.folder(2).exists()
    assert not list((tmp_path / "checkpoints").glob(".*incomplete"))
    assert checkpointer.latest().megabatch == 1


def test_retention_never_deletes_the_only_valid_checkpoint(tmp_path):
    checkpointer = Checkpointer(tmp_path, CPU, keep_last=1)
    checkpointer.write(1, {}, {}, FakeEngine())
    checkpointer.write(2, {}, {}, FakeEngine())
    assert not checkpointer.folder(1).exists()
    (checkpointer.folder(2) / "state.pt").write_bytes(b"garbage")  # newest now damaged
    checkpointer.write(3, {}, {}, FakeEngine())
    assert verify(checkpointer.folder(3)) is None
    assert checkpointer.folder(2).exists()  # damaged: kept as evidence, not counted
    (checkpointer.folder(3) / "engine.pt").write_bytes(b"garbage")
    assert checkpointer.latest() is None  # nothing valid left: start over, never load garbage


class CodeRunningPayload:
    """What a checkpoint must never unpickle: loading it would run a shell command."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    checkpointer = Checkpointer(tmp_path, CPU, keep_last=2)
    checkpointer.write(1, {"x": 1}, {}, FakeEngine())
    folder = checkpointer.folder(1)
    torch.save({"evil": CodeRunningPayload()}, folder / "state.pt")
    reseal(folder, "state.pt")  # even if checksums match
    with pytest.raises(CheckpointError, match="cannot load"):
        checkpointer.latest().load_state()


def test_a_checkpoint_file_torch_save_did_not_write_is_named_without_unsafe_advice(tmp_path):
    """A plain pickle (here one whose loading would run code) and a truncated archive, each
    with its sha256 updated: one line naming the file, never torch's advice to retry with
    weights_only=False."""
    checkpointer = Checkpointer(tmp_path, CPU, keep_last=2)
    checkpointer.write(1, {"x": 1}, {}, FakeEngine())
    folder = checkpointer.folder(1)
    state = folder / "state.pt"
    whole = state.read_bytes()
    for content in (pickle.dumps({"evil": CodeRunningPayload()}), whole[: len(whole) // 2]):
        state.write_bytes(content)
        reseal(folder, "state.pt")
        with pytest.raises(CheckpointError) as error:
            checkpointer.latest().load_state()
        message = str(error.value)
        assert message.startswith(f"cannot load {state}: not a file torch.save wrote")
        assert "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("sha256", [["state.pt"], {"state.pt": 1}, {"../state.pt": "0" * 64}])
def test_a_marker_whose_sha256_is_no_map_of_names_is_a_reason_not_a_crash(tmp_path, sha256):
    checkpointer = Checkpointer(tmp_path, CPU, keep_last=2)
    checkpointer.write(1, {"x": 1}, {}, FakeEngine())
    marker_path = checkpointer.folder(1) / "COMPLETE.json"
    marker = json.loads(marker_path.read_text())
    marker["sha256"] = sha256
    marker_path.write_text(json.dumps(marker))
    assert "is unreadable" in verify(checkpointer.folder(1))
    assert checkpointer.latest() is None


@pytest.mark.slow
def test_unwritable_run_directory_is_a_one_line_error(digits_shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_trainer(digits_run_args(digits_shards, blocker / "run"), nproc=1)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: config key 'run.dir'")
    assert len(result.stderr.strip().splitlines()) == 1


# --- bad data ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (lambda s: {**s, "cls": b"99"}, "label 99 outside 0..9"),
    (lambda s: {k: v for k, v in s.items() if k != "cls"}, "no label (.cls)"),
    (lambda s: {**s, "png": b"\x89PNG not really"}, "cannot decode image"),
])
def test_bad_sample_stops_the_run_naming_shard_and_key(digits_shards, tmp_path, damage, message):
    shards = copy_shards(digits_shards, tmp_path / "shards")
    rewrite_shard(shards, "train-000000.tar", damage)
    key = first_sample_key(shards, "train-000000.tar")
    result = run_trainer(digits_run_args(shards, tmp_path / "run", "data.megabatches=2"), nproc=1)
    assert result.returncode == 2
    assert "train-000000.tar" in result.stderr and message in result.stderr
    assert key in result.stderr


@pytest.mark.slow
def test_shard_whose_checksum_differs_is_refused_before_training(digits_shards, tmp_path):
    shards = copy_shards(digits_shards, tmp_path / "shards")
    target = shards / "train-000003.tar"
    target.write_bytes(target.read_bytes()[:-1024])  # truncated
    result = run_trainer(digits_run_args(shards, tmp_path / "run"), nproc=1)
    assert result.returncode == 2
    assert "train-000003.tar" in result.stderr and "sha256" in result.stderr


@pytest.mark.slow
def test_truncated_shard_is_caught_while_reading_even_without_checksums(digits_shards,
                                                                        tmp_path):
    shards = copy_shards(digits_shards, tmp_path / "shards")
    target = shards / "train-000001.tar"
    target.write_bytes(target.read_bytes()[:3000])
    args = digits_run_args(shards, tmp_path / "run", "data.verify_checksums=false",
                           "data.megabatches=2")
    result = run_trainer(args, nproc=1)
    assert result.returncode == 2
    assert "train-000001.tar" in result.stderr or "truncated" in result.stderr


# --- bad config and CLI -------------------------------------------------------------------

@pytest.mark.parametrize("extra, culprit", [
    (["--nonsense"], "--nonsense"),
    (["train.batch_size=63"], "train.batch_size"),  # not divisible by 2 ranks
    (["data.megabatches=1000"], "data.megabatches=1000"),
])
def test_bad_cli_input_is_one_line_before_any_process_group(digits_shards, tmp_path, extra,
                                                            culprit, capsys, monkeypatch):
    """As rank 0 of 2 (WORLD_SIZE=2), through the entry point's main in this process: these
    are found before the process group starts (real launches: test_run_lock_and_launcher)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main(digits_run_args(digits_shards, tmp_path / "run", *extra)) == 2
    stderr = capsys.readouterr().err
    assert culprit in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


# --- the soak test ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.distributed
def test_soak_12_megabatches_with_3_random_rank_kills(digits_shards, tmp_path):
    """torchrun --max-restarts 3; a random rank is SIGKILLed at a random moment, three times;
    the final metrics equal the uninterrupted run's."""
    shards = tmp_path / "small-shards"
    from app_dist.data.prepare.shards import write_shards

    write_shards("digits", None, str(shards), samples_per_shard=10, seed=0)
    args = ["--config", str(REPO / "configs/digits.yaml"), f"data.shards={shards}",
            "data.megabatches=12", "train.epochs=1", "train.batch_size=16",
            "log.progress=false", "data.eval_batch_size=300"]
    reference = run_trainer([*args, f"run.dir={tmp_path / 'reference'}"], nproc=2, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "soak"
    launcher = launch_trainer([*args, f"run.dir={run_dir}"], nproc=2,
                              launcher_args=["--max-restarts", "3"], stderr=subprocess.PIPE,
                              text=True)
    chooser = random.Random(2024)
    kills = 0
    deadline = time.time() + 600
    while kills < 3 and launcher.poll() is None and time.time() < deadline:
        time.sleep(chooser.uniform(1.5, 5.0))
        workers = rank_processes(launcher.pid)
        if len(workers) == 2:
            os.kill(chooser.choice(workers), 9)
            kills += 1
    _, stderr = launcher.communicate(timeout=600)
    assert kills == 3, "the run finished before three kills: make it longer"
    assert launcher.returncode == 0, stderr[-3000:]
    reference_metrics = read_metrics(tmp_path / "reference")
    assert len(reference_metrics) == 12
    assert read_metrics(run_dir) == reference_metrics


def test_a_digest_taken_while_writing_is_used_only_for_the_unchanged_file(tmp_path: Path) -> None:
    """Sealing trusts the sha256 computed as torch.save wrote the file, not a rewrite since."""
    from app_dist.foundations.torch_files import atomic_torch_save, sha256_of_written

    path = tmp_path / "engine.pt"
    atomic_torch_save({"weights": torch.arange(1000.0)}, path)
    assert sha256_of_written(path) == file_sha256(path)
    atomic_torch_save({"weights": torch.arange(1000.0)}, path)
    data = bytearray(path.read_bytes())
    data[-30] ^= 0xFF  # same size, new contents, a later mtime
    time.sleep(0.01)
    path.write_bytes(bytes(data))
    assert sha256_of_written(path) == file_sha256(path)


# --- the fault hook itself -----------------------------------------------------------------

def test_a_pause_fires_once_even_across_processes_that_share_its_announce_file(tmp_path):
    """A worker Ray Train restarts has no attempt count: the pause a test used already (its
    announce file written by the earlier worker) must not hold the restarted one again."""
    announce = tmp_path / "paused"
    spec = f"pause:rank=0,megabatch=1,at=checkpointed,seconds=2,announce={announce}"
    timings = []
    for _process in range(2):
        injector = FaultInjector(spec, rank=0)
        injector.megabatch_start(1)
        started = time.monotonic()
        injector.checkpoint_end(tmp_path, partial=False)
        timings.append(time.monotonic() - started)
    assert timings[0] >= 2 and timings[1] < 1, timings
    assert announce.read_text() == str(os.getpid())


@pytest.mark.slow
def test_resume_false_starts_over_and_keeps_the_earlier_checkpoints_aside(
        digits_shards, finished_run, tmp_path):
    run_dir = tmp_path / "app"
    shutil.copytree(finished_run, run_dir)
    again = run_trainer(short_run_args(digits_shards, run_dir, "checkpoint.resume=false"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint.resume=false: starting over" in again.stdout
    assert "resuming" not in again.stdout
    names = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    aside = [name for name in names if ".replaced-" in name]
    assert [name for name in names if name not in aside] == ["megabatch-0001", "megabatch-0002"]
    assert [name.split(".")[0] for name in aside] == ["megabatch-0001", "megabatch-0002"]
    assert all(verify(run_dir / "checkpoints" / name) is None for name in names)
    assert read_metrics(run_dir) == read_metrics(finished_run)  # the same seed, trained again
