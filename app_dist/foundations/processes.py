"""Linux's process-lifetime controls (prctl), for the processes app-dist starts and waits for.
Each returns False where the kernel or platform lacks it, and the caller carries on without."""

from __future__ import annotations

import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_subreaper(on: bool) -> bool:
    """Make this process the one that adopts its descendants whose parent dies
    (PR_SET_CHILD_SUBREAPER), or stop; so that it can wait for a launcher's ranks after the
    launcher itself has gone."""
    return _prctl(PR_SET_CHILD_SUBREAPER, int(on))


def signal_me_when_parent_dies(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` to this process when the thread that started it ends
    (PR_SET_PDEATHSIG): for a child started in a session of its own, so that even a SIGKILL
    to its parent (which no handler sees) does not leave it running. Called in the child,
    as a Popen preexec_fn."""
    return _prctl(PR_SET_PDEATHSIG, int(signum))
