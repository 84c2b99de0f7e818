"""torchrun as `app-dist train --nproc-per-node` starts it: the same agent, whose failure is
one line and the failing rank's own exit code instead of a ~30-line traceback and exit 1.

    python -m app_dist.training.quiet_torchrun TORCHRUN_ARGS...

torchrun ends a launch whose rank failed with an uncaught ChildFailedError, and one it was
signalled to stop with an uncaught SignalException (after it has passed the signal on to its
ranks and waited for them): both print a traceback of torchrun's own code, which says
nothing about the run, and exit 1, which hides the run's 75 (pre-empted) or 2 (bad input).
The ranks have already printed what happened.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

from app_dist.foundations.commands import shell_exit_code


def failure_line(rank: int, pid: int, status: int, failed_ranks: int) -> str:
    """The one line that stands for torchrun's ChildFailedError traceback."""
    how = (f"was ended by {signal_name(-status)}" if status < 0
           else f"exited {shell_exit_code(status)}")
    return (f"[app-dist] torchrun: rank {rank} (pid {pid}) {how} first; {failed_ranks} "
            "rank(s) failed")


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return f"signal {number}"


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun(argv)
    except ChildFailedError as failed:
        rank, first = failed.get_first_failure()
        print(failure_line(rank, first.pid, first.exitcode, len(failed.failures)),
              file=sys.stderr, flush=True)
        return shell_exit_code(first.exitcode)
    except SignalException as stopped:
        print(f"[app-dist] torchrun stopped by {signal_name(int(stopped.sigval))}, after "
              "passing it to its ranks", file=sys.stderr, flush=True)
        return shell_exit_code(-int(stopped.sigval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
