"""The signals that ask a run to stop: each is a pre-emption (finish the step, write a
checkpoint, exit 75), never an abrupt end.

SIGTERM is what SLURM, Kubernetes, `timeout` and the launchers send before they take a
machine away; SIGINT is Ctrl-C (a terminal signals its foreground process group; torchrun's
agent forwards it to the ranks); SIGHUP is a closed terminal or ssh session. Losing the
megabatch in flight to any of them would be losing work the user can keep.

A rank listens from its first lines (app_dist/train.py, before torch's import), so a signal
that arrives while the run starts is kept until the loop can act on it; reader processes and
their fork server ignore all three (the rank decides). A signal the process was started
ignoring stays ignored: `nohup` (SIGHUP) and a background job of a script (SIGINT) keep
training. A second SIGINT stops at once (Ctrl-C twice), for a run stuck where the loop cannot
answer; a second SIGTERM does not, as launchers and schedulers often deliver one twice (to the
launcher, which passes it on, and to every process). This module imports nothing heavy: the
fork server preloads it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_received: list[int] = []  # signal numbers since listening began
_previous: dict[int, Any] | None = None  # the handlers listening replaced


def _record(signum: int, frame: Any) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received and _previous is not None:
        signal.signal(signum, _previous[signum])  # Ctrl-C twice: stop now, the usual way
        signal.raise_signal(signum)
        return
    if not _received and os.environ.get("RANK", "0") == "0":  # one line per run, not per rank
        again = "; Ctrl-C again stops at once" if signum == signal.SIGINT else ""
        try:
            os.write(2, f"[app-dist] {signal.Signals(signum).name} received: stopping after "
                        f"the step in flight, with a checkpoint (exit 75){again}\n".encode())
        except OSError:  # no terminal left (a hang-up): the outcome file still says it
            pass
    _received.append(signum)


def listen_for_preemption() -> bool:
    """Record PREEMPTION_SIGNALS from now on instead of dying of them, except those the
    process ignores. True when this call started listening (the caller then stops it), False
    when already listening or not on the main thread (only it may install handlers: Ray
    Train's worker thread trains without)."""
    global _previous
    if _previous is not None or threading.current_thread() is not threading.main_thread():
        return False
    _received.clear()
    _previous = {number: signal.signal(number, _record) for number in heeded_signals()}
    return True


def heeded_signals() -> list[int]:
    """PREEMPTION_SIGNALS but those this process was started ignoring (`nohup`: SIGHUP; a
    script's background job: SIGINT), which stay ignored."""
    return [number for number in PREEMPTION_SIGNALS
            if signal.getsignal(number) is not signal.SIG_IGN]


@contextlib.contextmanager
def preemption_listening() -> Iterator[None]:
    """Listen for the block, unless the process already listens (then it goes on after)."""
    began = listen_for_preemption()
    try:
        yield
    finally:
        if began:
            stop_listening()


def stop_listening() -> None:
    """Put back the handlers listen_for_preemption replaced and forget what was received."""
    global _previous
    if _previous is None:
        return
    for number, handler in _previous.items():
        signal.signal(number, handler)
    _previous = None
    _received.clear()


def preemption_requested() -> bool:
    """Whether a pre-emption signal arrived since listening began."""
    return bool(_received)


def ignore_preemption_signals() -> None:
    """For processes that serve a rank (readers, their fork server): the rank decides when to
    stop, and they must not die first and break the step in flight."""
    for number in PREEMPTION_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
