"""One run per run directory (RUN_DIR/run.lock) and `app-dist train --nproc-per-node`, the
launcher wrapper whose exit code is the run's own: real launches, from outside."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.distributed import TCPStore

from app_dist.cli import main as cli_main
from app_dist.foundations import run_lock
from app_dist.foundations.distributed import _agree_on_round
from app_dist.foundations.run_layout import CheckpointFiles, RunLayout
from app_dist.foundations.run_lock import RunDirectoryInUse, RunLock, check_free, read_holder
from app_dist.training.checkpoint import verify
from app_dist.training.launcher import (
    build_parser,
    launcher_command,
    launcher_environment,
    run_exit_code,
)

from .conftest import (
    REPO,
    app_dist_train,
    checkpoint_folder,
    deepspeed_run_args,
    digits_run_args,
    final_masks_and_weights,
    launch,
    launch_trainer,
    rank_processes,
    read_metrics,
    run_trainer,
    trainer_command,
    trainer_env,
    wait_for,
)

NO_WANDB = "log.wandb.mode=disabled"


def write_lock(run_dir: Path, **fields) -> None:
    """A lock file as another launch would have left it."""
    now = time.time()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": None,
              "started": now, "heartbeat": now, "token": "left-behind", **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    RunLayout(run_dir).lock.write_text(json.dumps(record))


def dead_pid() -> int:
    """The pid of a process of this host that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- the lock, in this process -------------------------------------------------------------

def test_the_lock_is_exclusive_names_its_holder_and_is_removed_on_release(tmp_path):
    with RunLock.acquire(tmp_path) as held:
        assert read_holder(RunLayout(tmp_path).lock) == held.holder
        with pytest.raises(RunDirectoryInUse) as refused:
            RunLock.acquire(tmp_path)
        message = str(refused.value)
        assert f"run directory {tmp_path} is in use by pid {os.getpid()} on host " \
               f"{socket.gethostname()} since " in message
        assert str(RunLayout(tmp_path).lock) in message and "\n" not in message
        with pytest.raises(RunDirectoryInUse):
            check_free(tmp_path)
    assert not RunLayout(tmp_path).lock.exists()
    check_free(tmp_path)
    RunLock.acquire(tmp_path).release()  # free again


def test_a_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    write_lock(tmp_path, pid=dead_pid())
    check_free(tmp_path)
    with RunLock.acquire(tmp_path) as held:
        assert read_holder(RunLayout(tmp_path).lock).token == held.holder.token


def test_a_lock_whose_pid_is_now_another_process_is_taken_over(tmp_path):
    write_lock(tmp_path, pid=os.getpid(), pid_started=1)  # this pid, started at another time
    with RunLock.acquire(tmp_path):
        pass


def test_another_hosts_lock_is_taken_over_only_once_its_heartbeat_is_old(tmp_path):
    fresh = time.time() - run_lock.STALE_AFTER_S / 2
    write_lock(tmp_path, host="elsewhere", pid=1, started=fresh - 3600, heartbeat=fresh)
    with pytest.raises(RunDirectoryInUse, match="in use by pid 1 on host elsewhere since"):
        RunLock.acquire(tmp_path)
    old = time.time() - run_lock.STALE_AFTER_S - 60
    write_lock(tmp_path, host="elsewhere", pid=1, started=old - 3600, heartbeat=old)
    with RunLock.acquire(tmp_path) as held:
        assert read_holder(RunLayout(tmp_path).lock).host == held.holder.host


def test_an_unreadable_lock_counts_as_held_until_it_is_old(tmp_path):
    """A launch killed between creating the file and writing it leaves an empty lock: held
    while its modification time is recent, stale after the heartbeat bound."""
    lock = RunLayout(tmp_path).lock
    for content in (b"", b"\xd9\x00\xff garbage that is no UTF-8 text"):  # empty or damaged
        lock.write_bytes(content)
        with pytest.raises(RunDirectoryInUse, match="on host \\?"):
            RunLock.acquire(tmp_path)
        old = time.time() - run_lock.STALE_AFTER_S - 60
        os.utime(lock, (old, old))
        RunLock.acquire(tmp_path).release()


def test_the_heartbeat_is_refreshed_and_a_taken_over_lock_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    held = RunLock.acquire(tmp_path)
    first = read_holder(held.path).heartbeat
    deadline = time.monotonic() + 5
    while read_holder(held.path).heartbeat == first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert read_holder(held.path).heartbeat > first
    held.path.unlink()  # another launch judged it stale and took it over
    write_lock(tmp_path, token="the-new-holder")
    time.sleep(0.2)
    held.release()
    assert read_holder(held.path).token == "the-new-holder"


# --- the wrapper, without a launch -----------------------------------------------------------

def test_launcher_command_lines():
    def command(*args: str) -> list[str]:
        return launcher_command(build_parser().parse_args([*args, "--config", "c.yaml", "k=v"]),
                                Path("/x/train.py"))

    single = command("--nproc-per-node", "2")
    assert single[1:] == ["-m", "app_dist.training.quiet_torchrun", "--nproc_per_node", "2",
                          "--standalone", "/x/train.py", "--config", "c.yaml", "k=v"]
    nodes = command("--nproc-per-node", "8", "--nnodes", "2", "--rdzv-endpoint", "head:29500",
                    "--max-restarts", "3")
    assert nodes[3:] == ["--nproc_per_node", "8", "--nnodes", "2", "--rdzv_backend", "c10d",
                         "--rdzv_endpoint", "head:29500", "--max_restarts", "3",
                         "/x/train.py", "--config", "c.yaml", "k=v"]
    deepspeed = command("--nproc-per-node", "2", "--launcher", "deepspeed", "--hostfile", "h",
                        "--nnodes", "2", "--master-addr", "head", "--master-port", "29600",
                        "--launcher-arg=--no_ssh", "--node-rank", "1")
    assert deepspeed[1:] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                             "--num_nodes", "2", "--hostfile", "h", "--node_rank", "1",
                             "--master_addr", "head", "--master_port", "29600", "--no_ssh",
                             "/x/train.py", "--config", "c.yaml", "k=v"]


def test_the_wrapper_gives_c10d_nodes_a_store_per_round_unless_the_user_chose():
    def environment(*args: str, **given: str) -> dict[str, str]:
        parsed = build_parser().parse_args(["--nproc-per-node", "1", *args, "--config", "c"])
        return launcher_environment(parsed, {"PATH": "/bin", **given})

    c10d = ("--nnodes", "2", "--rdzv-endpoint", "head:29500")
    assert environment(*c10d) == {"PATH": "/bin", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    assert environment(*c10d, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0")[
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"
    assert environment() == {"PATH": "/bin"}
    assert environment("--nnodes", "2", "--master-addr", "head", "--node-rank", "1") == {
        "PATH": "/bin"}


@pytest.mark.parametrize("launcher_code, outcome, expected", [
    (0, {"status": "finished", "exit_code": 0}, 0),
    (1, {"status": "preempted", "exit_code": 75}, 75),
    (143, {"status": "preempted", "exit_code": 75}, 75),
    (1, {"status": "bad_input", "exit_code": 2}, 2),
    (1, {"status": "finished", "exit_code": 0}, 1),  # a crash after the run ended
    (1, None, 1),  # a crash before rank 0 could write it
    (137, {"status": "preempted", "exit_code": 75}, 75),  # torchrun SIGKILLed its ranks late
])
def test_the_wrapper_exits_with_the_runs_code_only_when_the_launcher_failed(
        launcher_code, outcome, expected):
    assert run_exit_code(launcher_code, outcome) == expected


@pytest.mark.slow  # two Python start-ups, one importing torch
def test_signals_to_the_wrapper_reach_the_launchers_process_group(tmp_path):
    """supervise() forwards SIGTERM to the child's group: here a stand-in launcher whose own
    child (a stand-in rank in the same group) saves its place and exits 75."""
    rank = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        def stop(signum, frame):
            pathlib.Path({str(tmp_path / 'rank-got')!r}).write_text(str(signum))
            sys.exit(75)
        signal.signal(signal.SIGTERM, stop)
        pathlib.Path({str(tmp_path / 'ready')!r}).write_text('')
        time.sleep(60)
    """)
    fake_launcher = textwrap.dedent(f"""
        import signal, subprocess, sys
        signal.signal(signal.SIGTERM, lambda *a: None)  # the launcher waits for its rank
        sys.exit(subprocess.run([sys.executable, "-c", {rank!r}]).returncode)
    """)
    wrapper = launch([sys.executable, "-c", "import sys; from app_dist.training.launcher "
                      "import supervise; sys.exit(supervise(sys.argv[1:]))", sys.executable,
                      "-c", fake_launcher])
    assert wait_for(tmp_path / "ready", wrapper, timeout=60)
    os.kill(wrapper.pid, signal.SIGTERM)
    assert wrapper.wait(timeout=30) == 75
    assert (tmp_path / "rank-got").read_text() == str(int(signal.SIGTERM))


def test_the_wrapper_checks_its_input_without_importing_torch(digits_shards, tmp_path):
    """`app-dist train --nproc-per-node N` reads the config, the manifest and the data plan
    and checks the run directory before any launcher starts; none of that needs torch, whose
    import would add 2-3 s to every launch and to every bad input's one line. Here all of it
    runs and the run directory (under a file) is what is refused."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["train", "--nproc-per-node", "2", "--config", str(REPO / "configs/digits.yaml"),
            f"data.shards={digits_shards}", f"run.dir={blocker / 'run'}"]
    script = ("import sys; from app_dist.cli import main; code = main(sys.argv[1:]); "
              "print(code, [m for m in ('torch', 'torchvision', 'deepspeed', 'ray') "
              "if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "2 []", (result.stdout, result.stderr)
    (line,) = error_lines(result.stderr)
    assert "config key 'run.dir'" in line and "Not a directory" in line


def app_dist_train_in_process(capsys: pytest.CaptureFixture[str],
                              *args: str) -> subprocess.CompletedProcess[str]:
    """`app-dist train ARGS` through the CLI's main in this process (for input the wrapper
    refuses before it starts any launcher; real launches use app_dist_train)."""
    code = cli_main(["train", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_bad_input_through_the_wrapper_is_one_line_and_exit_2_before_any_launcher(
        digits_shards, tmp_path, launcher, capsys):
    (tmp_path / "a-file").write_text("")
    for extra, culprit in ((["train.epochz=1"], "train.epochz"),
                           (["train.batch_size=63"], "not divisible by the world size 2"),
                           ([f"run.dir={tmp_path / 'a-file' / 'run'}"], "cannot write to")):
        result = app_dist_train_in_process(
            capsys, "--nproc-per-node", "2", "--launcher", launcher,
            *digits_run_args(digits_shards, tmp_path / "run"), *extra)
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.strip().splitlines() == error_lines(result.stderr)
        assert len(error_lines(result.stderr)) == 1 and culprit in result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert not (tmp_path / "run").exists()
    if launcher != "torchrun":
        return
    usage = app_dist_train_in_process(capsys, "--nnodes", "2", "--config",
                                      "configs/digits.yaml")
    assert usage.returncode == 2
    assert error_lines(usage.stderr) == usage.stderr.strip().splitlines()
    assert "--nnodes needs --nproc-per-node" in usage.stderr


def launcher_tracebacks(output: str) -> list[str]:
    """The tracebacks in a launch's output, each as its last line (the exception)."""
    found, inside = [], False
    for line in output.splitlines():
        if "Traceback (most recent call last)" in line:
            inside = True
        elif inside and not line.startswith((" ", "[rank")) and line.strip():
            found.append(line)
            inside = False
    return found


def empty_the_shard(shards: Path, name: str) -> None:
    """Replace a shard by a valid tar with no members (its checksum no longer matches)."""
    (shards / name).write_bytes(b"\0" * 10240)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_config_error_under_raw_torchrun_is_printed_once(digits_shards, tmp_path):
    """Every rank finds the same config error before the process group starts: the node's
    first rank says it; torchrun then adds its own report, which no project code controls."""
    result = subprocess.run(
        trainer_command(digits_run_args(digits_shards, tmp_path / "run",
                                        "prune.target_density=7"), nproc=2),
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1  # torchrun's code for any failed rank
    assert len(error_lines(output)) == 1 and "prune.target_density" in output, output[-3000:]
    assert launcher_tracebacks(output) == [
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: "], output[-3000:]
    assert "[rank" not in output


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("deepspeed",
                                                               marks=pytest.mark.deepspeed)])
def test_bad_input_one_rank_finds_after_the_group_started_names_the_culprit_once(
        digits_shards, tmp_path, launcher):
    """A damaged shard read without checksums: only the rank reading it finds it, after the
    process group started. That rank prints the one line and records bad_input in the
    outcome file before exiting; the other rank, whose collective then fails, reads the file
    and exits without a traceback. Through `app-dist train` the launch exits 2."""
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    empty_the_shard(shards, "train-000001.tar")
    args = digits_run_args(shards, tmp_path / "run", "data.verify_checksums=false", NO_WANDB)
    result = subprocess.run(trainer_command(args, nproc=2, launcher=launcher), cwd=REPO,
                            env=trainer_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    (line,) = error_lines(output)
    assert "train-000001.tar" in line and output.count("train-000001.tar") == 1, output[-3000:]
    assert "[rank" not in output and "Connection closed" not in output, output[-3000:]
    if launcher == "torchrun":
        assert launcher_tracebacks(output) == [
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: "]
    else:  # the deepspeed launcher passes the failing rank's code through
        assert result.returncode == 2 and launcher_tracebacks(output) == [], output[-3000:]
        # It does not choose the engine: the run says which one it trains with.
        assert "started by the deepspeed launcher, training with engine.kind=ddp" in output
    outcome = json.loads(RunLayout(tmp_path / "run").outcome.read_text())
    assert outcome["status"] == "bad_input" and "train-000001.tar" in outcome["message"]

    wrapped = app_dist_train("--nproc-per-node", "2", "--launcher", launcher, *args)
    assert wrapped.returncode == 2, wrapped.stderr[-3000:]
    assert len(error_lines(wrapped.stdout + wrapped.stderr)) == 1
    # Through the wrapper, torchrun's own report is one line: the failing rank and its code.
    assert launcher_tracebacks(wrapped.stdout + wrapped.stderr) == [], wrapped.stderr[-3000:]
    if launcher == "torchrun":
        assert "[app-dist] torchrun: rank " in wrapped.stderr and " exited 2 first" in (
            wrapped.stderr)


# --- real launches ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.distributed
def test_a_second_launch_on_a_running_run_directory_is_refused_and_the_first_is_unharmed(
        digits_shards, tmp_path):
    """Two launches of the same command at once: the second stops quickly with one line
    naming the first's rank 0; the first ends with exactly 4 records and every checkpoint
    intact. The first's ranks are stopped (SIGSTOP) while the second runs, so the first
    cannot finish before the second has asked for the lock."""
    run_dir = tmp_path / "shared"
    args = digits_run_args(digits_shards, run_dir, "data.megabatches=4", NO_WANDB)
    first = launch_trainer(args, nproc=2, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(checkpoint_folder(run_dir, 1) / CheckpointFiles.MARKER, first,
                        timeout=300)
        holder = read_holder(RunLayout(run_dir).lock)
        ranks = rank_processes(first.pid)
        assert holder is not None and holder.pid in ranks
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            second = run_trainer(args, nproc=2, timeout=300)  # torchrun, directly
            torchrun_seconds = time.monotonic() - started
            wrapped = app_dist_train("--nproc-per-node", "2", *args, timeout=300)
        finally:
            for pid in ranks:
                os.kill(pid, signal.SIGCONT)
        assert first.poll() is None  # still training while both were refused

        expected = f"is in use by pid {holder.pid} on host {holder.host} since"
        assert second.returncode != 0 and expected in second.stderr
        (line,) = error_lines(second.stderr)  # rank 0's; rank 1 exits quietly
        assert expected in line
        assert torchrun_seconds < 120  # start-up only: no data read, no step trained
        assert wrapped.returncode == 2
        assert wrapped.stderr.strip().splitlines() == error_lines(wrapped.stderr)
        assert len(error_lines(wrapped.stderr)) == 1 and expected in wrapped.stderr
        assert "quiet_torchrun" not in wrapped.stdout  # no launcher was started

        _, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stderr[-3000:]
    assert [record["megabatch"] for record in read_metrics(run_dir)] == [1, 2, 3, 4]
    layout = RunLayout(run_dir)
    assert sorted(path.name for path in layout.checkpoints.iterdir()) == [
        layout.checkpoint(t).name for t in range(1, 5)]  # nothing set aside as unusable
    assert all(verify(layout.checkpoint(t)) is None for t in range(1, 5))
    assert not layout.lock.exists()


@pytest.mark.slow
def test_a_lock_left_on_a_dead_host_is_taken_over_once_its_heartbeat_is_old(digits_shards,
                                                                            tmp_path):
    run_dir = tmp_path / "from-a-dead-host"
    old = time.time() - run_lock.STALE_AFTER_S - 60
    write_lock(run_dir, host="a-dead-node", pid=4242, started=old - 600, heartbeat=old)
    result = run_trainer(digits_run_args(digits_shards, run_dir, "data.megabatches=2",
                                         "train.epochs=1", "data.num_workers=0"), nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pid 4242 on host a-dead-node" in result.stdout and "heartbeat is" in result.stdout
    assert len(read_metrics(run_dir)) == 2 and not RunLayout(run_dir).lock.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_max_restarts_after_rank_0_is_sigkilled_restarts_with_the_lock(
        digits_shards, uninterrupted, tmp_path):
    """Rank 0 holds the lock; SIGKILL it after megabatch 1: torchrun restarts both ranks, and
    the new rank 0 takes the dead one's lock over (its pid no longer runs) and resumes."""
    run_dir = tmp_path / "restarted"
    log = tmp_path / "launcher.log"
    with log.open("w") as output:
        launcher = launch_trainer(digits_run_args(digits_shards, run_dir, NO_WANDB), nproc=2,
                                  launcher_args=["--max-restarts", "1"], stdout=output,
                                  stderr=subprocess.STDOUT)
        try:
            assert wait_for(checkpoint_folder(run_dir, 1) / CheckpointFiles.MARKER, launcher,
                            timeout=300)
            holder = read_holder(RunLayout(run_dir).lock)
            assert holder is not None and holder.pid in rank_processes(launcher.pid)
            os.kill(holder.pid, signal.SIGKILL)
            code = launcher.wait(timeout=600)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert f"taking over the stale lock of {run_dir} (pid {holder.pid} on host" in text
    assert read_metrics(run_dir) == read_metrics(uninterrupted)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("deepspeed",
                                                               marks=pytest.mark.deepspeed)])
def test_sigterm_to_the_wrapper_mid_megabatch_exits_75_and_the_same_command_resumes(
        digits_shards, uninterrupted, zero_runs, tmp_path, launcher):
    """The wrapper exits once every process of the launch has ended, with the run's 75 and
    no launcher traceback. The deepspeed runner dies of the forwarded SIGTERM at once, while
    its ranks still write their pre-emption checkpoint: an exit then would let a retry find
    the run directory still in use (exit 2) or the port taken."""
    run_dir = tmp_path / "preempted"
    paused = tmp_path / "paused"
    if launcher == "torchrun":
        run_args, reference = digits_run_args(digits_shards, run_dir, NO_WANDB), uninterrupted
    else:  # zero_runs(2)'s settings
        run_args = deepspeed_run_args(digits_shards, run_dir, 2, NO_WANDB)
        reference = zero_runs(2)
    args = ["--nproc-per-node", "2", "--launcher", launcher, *run_args]
    command = [sys.executable, "-m", "app_dist.cli", "train", *args]
    fault = f"pause:rank=0,megabatch=2,epoch=0,step=2,seconds=3,announce={paused}"
    wrapper = launch(command, env={"APP_DIST_FAULT": fault}, stderr=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)
    try:
        assert wait_for(paused, wrapper, timeout=300)
        launch_processes = psutil.Process(wrapper.pid).children(recursive=True)
        os.kill(wrapper.pid, signal.SIGTERM)  # as a scheduler's notice, to the wrapper only
        stdout, stderr = wrapper.communicate(timeout=300)
        still_running = [process for process in launch_processes if process.is_running()
                         and process.status() != psutil.STATUS_ZOMBIE]
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
    assert wrapper.returncode == 75, stderr[-3000:]
    assert still_running == []
    assert "pre-empted in megabatch 2" in stdout + stderr
    assert launcher_tracebacks(stdout + stderr) == [], stderr[-3000:]
    assert (RunLayout(run_dir).checkpoint(1, partial=True) / CheckpointFiles.MARKER).is_file()

    # The same command again: the wrapper runs both ranks to the end, as the launcher does.
    resumed = app_dist_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming megabatch 2" in resumed.stdout
    assert read_metrics(run_dir) == read_metrics(reference)
    engine = "ddp" if launcher == "torchrun" else "deepspeed"
    masks, weights = final_masks_and_weights(run_dir, engine)
    want_masks, want_weights = final_masks_and_weights(reference, engine)
    assert all(torch.equal(masks[name], want_masks[name]) for name in want_masks)
    assert all(torch.equal(weights[name], want_weights[name]) for name in want_weights)
    assert json.loads(RunLayout(run_dir).outcome.read_text())["status"] == "finished"


# --- one store namespace per rendezvous round ------------------------------------------------

def test_the_ranks_of_a_round_agree_on_a_fresh_namespace_whatever_an_earlier_round_left():
    """A real TCPStore holding what a dead earlier round wrote (its leader token, its ranks'
    answers and rank 0's acknowledgements): the three ranks of the new round, started in any
    order (rank 0 last), agree on one token that is not the dead round's."""
    timeout = datetime.timedelta(seconds=30)
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)

    def client() -> TCPStore:
        return TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout)

    old = _run_ranks(client, 2, timeout)
    assert len(set(old)) == 1
    new = _run_ranks(client, 3, timeout, rank_0_delay=0.5)
    assert len(set(new)) == 1 and new[0] != old[0]


def _run_ranks(client, world_size: int, timeout, rank_0_delay: float = 0.0) -> list[str]:
    """Every rank of one round in a thread of its own; the token each returned."""
    tokens: list[str] = [""] * world_size

    def rank(number: int) -> None:
        if number == 0:
            time.sleep(rank_0_delay)  # the others read the earlier round's leader token first
        tokens[number] = _agree_on_round(client(), number, world_size, timeout)

    threads = [threading.Thread(target=rank, args=(number,)) for number in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return tokens
