"""Faults delivered the way the world delivers them (docs/RELIABILITY.md), no mocks: a real
small file system that fills up, a real checkpoint file that pickles code, damaged shards on
disk, bad samples in a shard, a damaged checkpoint given to `app-dist inspect`, a run killed
between its last checkpoint and its anytime model, a stop signal while a run starts."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from app_dist.config import load_config
from app_dist.foundations.errors import AppDistError
from app_dist.foundations.files import file_sha256
from app_dist.foundations.run_layout import CheckpointFiles, RunLayout
from app_dist.models.sparse_file import load_exported
from app_dist.training.checkpoint import verify
from app_dist.training.metrics import MetricsLog

from .conftest import (
    REPO,
    copy_shards,
    deepspeed_run_args,
    digits_run_args,
    first_sample_key,
    launch_trainer,
    read_metrics,
    reseal,
    rewrite_shard,
    run_trainer,
    short_run_args,
    trainer_command,
    trainer_env,
    wait_for,
)


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2 and exactly one `error:` line on stderr (no traceback) holding `fragments`."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# --- a full disk ---------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(where: Path, size: str):
    """A real tmpfs of `size` (mount's syntax: 2m) mounted at `where` for the block. Skipped
    when it cannot be mounted (not root, no mount namespace), except in CI (CI=true), where
    the scenario must run."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        reason = "a small tmpfs for the full-disk scenario needs root (mount -t tmpfs)"
    else:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                  str(where)], capture_output=True, text=True)
        reason = (None if mounted.returncode == 0
                  else f"mount -t tmpfs failed: {mounted.stderr.strip()}")
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(where)], capture_output=True)


def grow_disk(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def fill_disk(where: Path) -> Path:
    """Write a file until the file system is full; the file (to delete for space)."""
    filler = where / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return filler


def leftovers(run_dir: Path) -> list[Path]:
    """Staging folders (RunLayout.staging) and temporary files (files.temporary_name) of
    writes that did not complete, anywhere in a run directory."""
    return sorted(path for path in run_dir.rglob(".*")
                  if path.name.endswith(".incomplete") or ".tmp-" in path.name)


# A 1-process digits run's checkpoint is about 820 kB (engine.pt 686 kB, rank and state files
# 130 kB; measured): a 2 MiB disk holds megabatches 1 and 2, and fills up in the middle of
# megabatch 3's engine.pt.
DISK_FOR_TWO_CHECKPOINTS = "2m"


@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_checkpoint_is_one_line_and_the_run_resumes(
        digits_shards, tmp_path):
    """Before: ENOSPC reached the trainer as torch's RuntimeError ('unexpected pos'), which
    escaped the checkpointer: a traceback, and .megabatch-0003.incomplete left behind."""
    reference = tmp_path / "reference"
    uninterrupted = run_trainer(digits_run_args(digits_shards, reference))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    with small_disk(tmp_path / "disk", DISK_FOR_TWO_CHECKPOINTS) as disk:
        run_dir = disk / "run"
        layout = RunLayout(run_dir)
        args = digits_run_args(digits_shards, run_dir)
        full = run_trainer(args)
        assert_one_error_line(full, f"cannot write checkpoint {layout.checkpoint(3)}: ",
                              "No space left on device", "earlier checkpoints are intact")
        assert leftovers(run_dir) == []
        assert not layout.checkpoint(3).exists()
        assert [verify(layout.checkpoint(t)) for t in (1, 2)] == [None, None]
        assert [r["megabatch"] for r in read_metrics(run_dir)] == [1, 2]

        grow_disk(disk, "16m")  # space is there again: the same command continues
        resumed = run_trainer(args)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming after megabatch 2" in resumed.stdout
        assert read_metrics(run_dir) == read_metrics(reference)
        assert leftovers(run_dir) == []


@pytest.mark.slow
def test_a_full_disk_at_the_config_and_the_metrics_file_is_one_line(digits_shards, tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        run_dir = disk / "run"
        fill_disk(disk)
        result = run_trainer(digits_run_args(digits_shards, run_dir))
        assert_one_error_line(result, "config key 'run.dir': cannot write to",
                              "No space left on device")
        assert leftovers(run_dir) == [] and not RunLayout(run_dir).config.exists()

        # metrics.jsonl: rewritten at start, appended after every megabatch (rank 0, in
        # process here: the trainer reaches it only after a checkpoint, which needs more).
        (disk / "filler").unlink()
        record = {"megabatch": 1, "layer_density": {f"layer{i}": 0.5 for i in range(2000)}}
        metrics = MetricsLog(run_dir, [record])
        before = RunLayout(run_dir).metrics.read_bytes()
        fill_disk(disk)
        with pytest.raises(AppDistError, match=r"metrics.jsonl: No space left on device"):
            metrics.append({**record, "megabatch": 2})
        assert RunLayout(run_dir).metrics.read_bytes() == before  # no half line
        with pytest.raises(AppDistError, match=r"metrics.jsonl: No space left on device"):
            MetricsLog(run_dir, [record, {**record, "megabatch": 2}])
        assert RunLayout(run_dir).metrics.read_bytes() == before
        assert leftovers(run_dir) == []


# --- damaged shards, read without checksums ------------------------------------------------

def break_a_tar_header(path: Path) -> None:
    """Flip the name bytes of the second sample's first member header: tarfile then ends the
    archive there without an error (a bad header after the first one reads as the end)."""
    with tarfile.open(path) as archive:
        members = archive.getmembers()
    second_sample = next(m for m in members if m.name.split(".")[0]
                         != members[0].name.split(".")[0])
    data = bytearray(path.read_bytes())
    for offset in range(second_sample.offset, second_sample.offset + 100):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def replace_with_an_empty_tar(path: Path) -> None:
    buffer = io.BytesIO()
    tarfile.open(fileobj=buffer, mode="w").close()
    path.write_bytes(buffer.getvalue())


def make_a_member_claim_more_bytes(path: Path) -> None:
    """A header whose size field claims more than the file holds, its checksum fixed up (so
    tarfile believes it and reads past the end)."""
    with tarfile.open(path) as archive:
        member = archive.getmembers()[4]
    data = bytearray(path.read_bytes())
    header = bytearray(data[member.offset:member.offset + 512])
    header[124:136] = b"77777777777\0"  # size: 8 GiB
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    data[member.offset:member.offset + 512] = header
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage, fragment", [
    (break_a_tar_header, "selected samples where the manifest promises"),
    (replace_with_an_empty_tar, "read 0 selected samples where the manifest promises"),
    (make_a_member_claim_more_bytes, "unexpected end of data (truncated or not a tar file?)"),
], ids=["broken-header", "empty-tar", "size-field"])
def test_a_damaged_shard_read_without_checksums_is_named(digits_shards, tmp_path, damage,
                                                         fragment):
    """Before: the first two ended as "shards yielded fewer than the N batches their manifest
    promises" (no shard named), the third said "(truncated or not a tar file?)" twice."""
    shards = copy_shards(digits_shards, tmp_path / "shards")
    damage(shards / "train-000001.tar")
    result = run_trainer(digits_run_args(shards, tmp_path / "run", "data.verify_checksums=false",
                                         "data.megabatches=2"))
    line = assert_one_error_line(result, "train-000001.tar", fragment)
    assert line.count("truncated") == 1, line


# --- skipped_samples -----------------------------------------------------------------------

def passes_meeting(args: list[str], samples: list[tuple[str, int]]) -> list[int]:
    """Per megabatch, how many passes of the run `args` describe read one of `samples`
    ((split, index) pairs), summed over them: each training epoch and each validation whose
    selection holds a sample, and the test pass (the pruning scores' pass is not counted: its
    samples are the training set's)."""
    from app_dist.training.run_input import prepare

    config = load_config(args[1], args[2:])
    _, stream = prepare(config)  # once: it reads and checks the manifest
    epochs = config.train.epochs
    test = set(stream.test_selection().indices)
    counts = []
    for megabatch in range(1, config.data.megabatches + 1):
        train = set(stream.train_selection(megabatch).indices)
        val = set(stream.val_selection(megabatch).indices)
        counts.append(sum(int(index in test) if split == "test" else
                          epochs * (int(index in train) + int(index in val))
                          for split, index in samples))
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_skipped_samples_counts_every_pass_that_met_a_bad_sample(digits_shards, tmp_path, nproc):
    """One sample without a label in every training shard and in one test shard: the record
    counts each once per training epoch, validation and test pass that holds it, and agrees
    with the log lines. Before: a bad sample in a batch past the agreed count (or in a
    reader's dropped remainder) went uncounted, and the pruning pass logged lines that were
    never counted."""
    shards = copy_shards(digits_shards, tmp_path / "shards")
    damaged: list[tuple[str, int]] = []
    names = sorted(path.name for path in shards.glob("train-*.tar")) + ["test-000003.tar"]
    for name in names:
        key = first_sample_key(shards, name)
        rewrite_shard(shards, name, lambda s, key=key: {k: v for k, v in s.items() if k != "cls"}
                      if s["__key__"] == key else s)
        damaged.append((name.split("-")[0], int(key)))
    # The shard readers log every skip; the decode-once cache (on by auto for digits) logs a
    # bad sample once, when it first decodes it, and counts it in every pass all the same.
    args = digits_run_args(shards, tmp_path / "run", "data.bad_samples=skip",
                           "perf.cache_decoded=false")
    result = run_trainer(args, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]

    expected = passes_meeting(args, damaged)
    records = [json.loads(line) for line in RunLayout(tmp_path / "run").metrics.open()]
    assert [r["skipped_samples"] for r in records] == expected
    assert result.stdout.count("skipped a bad sample (data.bad_samples=skip)") == sum(expected)


# --- a DeepSpeed checkpoint file that pickles code ----------------------------------------

class RunsACommand:
    """Unpickling this calls os.system(command): what a malicious checkpoint file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def run_deepspeed(args: list[str]) -> subprocess.CompletedProcess[str]:
    """app_dist/train.py under `python -m deepspeed.launcher.runner --num_gpus 2` (2 ranks on
    gloo on the CPU), wandb off."""
    return subprocess.run(trainer_command([*args, "log.wandb.mode=disabled"], 2,
                                          launcher="deepspeed"),
                          cwd=REPO, env=trainer_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.distributed
def test_a_deepspeed_file_that_pickles_code_is_refused_without_running_it(digits_shards,
                                                                          zero_runs, tmp_path):
    """DeepSpeed's own checkpoint engine reads its files with torch.load(weights_only=False):
    a model_states file whose unpickling calls os.system ran that command on resume. The
    file is planted in a copy of the suite's finished ZeRO-2 run; the same command again
    loads its newest checkpoint."""
    run_dir = Path(shutil.copytree(zero_runs(2), tmp_path / "run"))
    args = deepspeed_run_args(digits_shards, run_dir, 2)

    newest = RunLayout(run_dir).checkpoint(3)
    name = f"{CheckpointFiles.DEEPSPEED}/engine/mp_rank_00_model_states.pt"
    evidence = tmp_path / "the-file-ran-code"
    genuine = torch.load(newest / name, weights_only=False)  # our own file: trusted here
    torch.save({**genuine, "payload": RunsACommand(f"touch {evidence}")}, newest / name)
    reseal(newest, name)

    resumed = run_deepspeed(args)
    assert not evidence.exists(), "unpickling ran the file's command"
    # Both ranks load the file and refuse it: the same one line from each.
    assert resumed.returncode == 2, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    errors = {line for line in resumed.stderr.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1, resumed.stderr[-3000:]
    line = errors.pop()
    assert f"cannot load {newest / name}: refused" in line and "posix.system" in line, line
    assert "Traceback" not in resumed.stderr


# --- a run killed after its last checkpoint, and signalled while it starts --------------------

def torch_is_loading(process: subprocess.Popen) -> bool:
    """Whether `process` has mapped torch's library: it is importing torch (seconds), long
    after app_dist/train.py's first lines, where a rank starts listening for stop signals."""
    try:
        return "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_the_last_megabatchs_model_is_published_when_the_run_starts_again(
        digits_shards, finished_run, tmp_path):
    """A run SIGKILLed between megabatch 1's checkpoint and its anytime publish (a lost
    node); the same command signalled (SIGHUP: a closed ssh session) while it starts; then
    run again to the end, and once more signalled while it starts. The first relaunch
    publishes megabatch 1's model and says it was pre-empted (75), nothing saved lost; the
    run ends with an uninterrupted run's model; a finished run signalled while it starts has
    nothing to stop and exits 0."""
    run_dir = tmp_path / "run"
    args = short_run_args(digits_shards, run_dir, "log.wandb.mode=disabled")
    announce = tmp_path / "checkpointed"
    fault = f"pause:rank=0,megabatch=1,at=checkpointed,seconds=120,announce={announce}"
    killed = launch_trainer(args, env={"APP_DIST_FAULT": fault})
    try:
        assert wait_for(announce, killed, timeout=300), "the run never wrote checkpoint 1"
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    pointer = run_dir / "anytime" / "model.json"
    assert not pointer.exists()  # what the kill left: checkpoint 1, no model published
    checkpoints = sorted(RunLayout(run_dir).checkpoints.iterdir())

    def signalled_while_starting() -> tuple[int, str]:
        starting = launch_trainer(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            assert wait_for(lambda: torch_is_loading(starting), starting, timeout=120)
            os.killpg(starting.pid, signal.SIGHUP)
            output, _ = starting.communicate(timeout=300)
        finally:
            if starting.poll() is None:
                os.killpg(starting.pid, signal.SIGKILL)
        return starting.returncode, output

    code, output = signalled_while_starting()
    assert code == 75, output[-3000:]
    assert "SIGHUP received: stopping after the step in flight" in output
    assert "pre-empted while starting, before any training" in output
    # The catch-up comes first: the loop acts on the signal after run_start.
    assert "anytime model of megabatch 1 published" in output
    assert json.loads(pointer.read_text())["megabatch"] == 1
    assert json.loads(RunLayout(run_dir).outcome.read_text())["status"] == "preempted"
    assert sorted(RunLayout(run_dir).checkpoints.iterdir()) == checkpoints

    again = run_trainer(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after megabatch 1" in again.stdout
    assert "anytime model of megabatch 1" not in again.stdout  # not published twice
    published = json.loads(pointer.read_text())
    assert published["megabatch"] == 2 and published["sha256"] == file_sha256(
        run_dir / "anytime" / published["file"])
    assert read_metrics(run_dir) == read_metrics(finished_run)
    model = load_exported(run_dir / "anytime" / "model-sparse.pt").state_dict()
    reference = load_exported(finished_run / "anytime" / "model-sparse.pt").state_dict()
    assert all(torch.equal(model[name], reference[name]) for name in reference)

    code, output = signalled_while_starting()
    assert code == 0 and "resuming after megabatch 2" in output, output[-3000:]
    assert json.loads(RunLayout(run_dir).outcome.read_text())["status"] == "finished"


# --- app-dist inspect ----------------------------------------------------------------------

def app_dist_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app_dist.cli", *args], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_inspect_exits_3_when_the_run_is_not_resumable(finished_run, tmp_path, capsys):
    """The damaged run through the command line as a user runs it; the other cases through
    the same command's main in this process (each would otherwise pay a Python start-up)."""
    from app_dist.cli import main as cli_main

    def inspect(*args: str) -> tuple[int, str]:
        code = cli_main(["inspect", *args])
        return code, capsys.readouterr().out

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    assert inspect(str(run_dir))[0] == 0
    newest = RunLayout(run_dir).checkpoint(2)
    with (newest / CheckpointFiles.STATE).open("r+b") as state:
        state.truncate(100)  # what a crash of the disk under a finished write leaves

    damaged_run = app_dist_cli("inspect", str(run_dir))
    assert damaged_run.returncode == 3, damaged_run.stderr
    assert "unusable" in damaged_run.stdout and "fall back to megabatch-0001" in damaged_run.stdout
    code, out = inspect(str(newest), "--json")
    assert code == 3 and json.loads(out)["resumable"] is False
    assert inspect(str(RunLayout(run_dir).checkpoint(1)))[0] == 0
    empty = tmp_path / "not-started"
    RunLayout(empty).checkpoints.mkdir(parents=True)
    assert inspect(str(empty))[0] == 3  # nothing to resume from
    assert inspect(str(tmp_path / "nope"))[0] == 2  # bad input
    help_text = app_dist_cli("inspect", "--help").stdout
    assert "3 not resumable" in " ".join(help_text.split())
