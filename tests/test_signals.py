"""Stop signals in one process, the pieces the launches of tests/test_preemption.py and
tests/test_run_lock_and_launcher.py rely on: what listening does with each signal, how the
wrapper waits for a launch's processes, torchrun's one-line report, the anytime catch-up."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app_dist.foundations import distributed, signals
from app_dist.foundations.errors import ConfigError
from app_dist.foundations.processes import set_subreaper
from app_dist.models.registry import build_model
from app_dist.pruning.masks import MaskSet, attach_masks
from app_dist.training.anytime import POINTER_FILE, AnytimeModel
from app_dist.training.launcher import wait_for_the_launch
from app_dist.training.quiet_torchrun import failure_line


@pytest.fixture
def listening():
    """Listening for stop signals for one test, from the handlers a new Python process starts
    with, all put back after it. (In two whole-suite runs on pytest-xdist workers, with
    whatever handlers the worker's earlier tests had left, the first SIGINT below went
    unrecorded; set as here, it has not.)"""
    saved = {number: signal.getsignal(number) for number in signals.PREEMPTION_SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    assert signals.listen_for_preemption()
    yield
    signals.stop_listening()
    for number, handler in saved.items():
        signal.signal(number, handler)


def test_a_first_sigint_is_a_preemption_said_once_and_a_second_stops_at_once(listening, capfd):
    # raise_signal, not os.kill(getpid()): under pytest-xdist the process has a second thread,
    # which the kernel may pick to take a process-directed signal, so its Python handler would
    # run only some bytecodes after the kill returned.
    signal.raise_signal(signal.SIGINT)
    assert signals.preemption_requested()
    assert capfd.readouterr().err == ("[app-dist] SIGINT received: stopping after the step in "
                                      "flight, with a checkpoint (exit 75); Ctrl-C again stops "
                                      "at once\n")
    signal.raise_signal(signal.SIGTERM)  # launchers deliver SIGTERM twice: no effect
    assert capfd.readouterr().err == ""
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_a_signal_the_process_ignores_stays_ignored():
    """`nohup` starts a process with SIGHUP ignored: a logout must not stop the run."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert signals.listen_for_preemption()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        signals.stop_listening()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_only_the_main_thread_listens_and_listening_twice_is_one_listener(listening):
    assert not signals.listen_for_preemption()  # already
    answers = []
    worker = threading.Thread(target=lambda: answers.append(signals.listen_for_preemption()))
    worker.start()
    worker.join()
    assert answers == [False]  # a Ray Train worker thread trains without


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreaper is Linux's")
def test_the_wrapper_waits_for_the_launchers_orphans_and_leaves_other_children_alone():
    """A launcher that exits at once leaving a process of its group running (the deepspeed
    runner and its ranks): the wait ends when that process does, and reaps it; a child of
    this process outside the group keeps its exit status for its own wait."""
    other = subprocess.Popen(["sh", "-c", "sleep 3; exit 4"])
    assert set_subreaper(True)
    try:
        launcher = subprocess.Popen(["sh", "-c", "sleep 1 & exit 3"], start_new_session=True)
        assert launcher.wait() == 3
        started = time.monotonic()
        assert wait_for_the_launch(launcher.pid, timeout_s=20)
        waited = time.monotonic() - started
    finally:
        set_subreaper(False)
    assert 0.5 < waited < 2.5
    assert other.wait(timeout=10) == 4


@pytest.mark.parametrize("status, says", [
    (2, "exited 2 first"), (75, "exited 75 first"), (-15, "was ended by SIGTERM first"),
    (-(signal.SIGRTMIN + 2), f"was ended by signal {signal.SIGRTMIN + 2} first"),
])
def test_torchruns_failure_is_one_line_with_the_ranks_own_code(status, says):
    line = failure_line(1, 4242, status, 2)
    assert line == f"[app-dist] torchrun: rank 1 (pid 4242) {says}; 2 rank(s) failed"


def test_more_local_ranks_than_visible_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ConfigError, match=r"local rank 1 needs GPU 1, but this process sees 1 "
                                          r"\(CUDA_VISIBLE_DEVICES=3\)"):
        distributed.check_device("auto", local_rank=1)
    distributed.check_device("auto", local_rank=0)


@pytest.mark.parametrize("pointer", [None, "{not json", '{"megabatch": 1}', '{"megabatch": 3}'])
def test_a_restored_run_publishes_its_megabatch_unless_the_target_holds_it(tmp_path, pointer):
    model = build_model("digits_cnn", 10, in_channels=1, mean=[0.5], std=[0.5])
    engine = SimpleNamespace(module=model, masks=MaskSet(model, attach_masks(model), None, None))
    target = tmp_path / "anytime"
    if pointer is not None:
        target.mkdir()
        (target / POINTER_FILE).write_text(pointer)
    record = {"megabatch": 2, "test_accuracy": 0.5}
    anytime = AnytimeModel(str(target), {"name": "digits_cnn"}, tmp_path,
                           restored=(record, Path("megabatch-0002")))
    anytime.run_start(engine)
    published = json.loads((target / POINTER_FILE).read_text())
    assert published["megabatch"] == (3 if pointer == '{"megabatch": 3}' else 2)
