"""The contract every `app-dist` command keeps with its user.

    exit 0    done (and `--help`, which prints the usage and options)
    exit 2    bad input: one line `error: <what is wrong, naming the file, key or flag>` on
              stderr, no traceback (every AppDistError, and every usage error); silent for
              ReportedElsewhere, whose line another process of the launch prints

A command is a parser and a body; `run_command` (or the `command` decorator) does the rest:

    @command(build_parser)
    def main(args: argparse.Namespace) -> int:
        ...                       # raise AppDistError subclasses for bad input
        return 0

    main(["--flag", "x"])         # what `app-dist NAME --flag x` calls; main() reads sys.argv
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from app_dist.foundations.errors import AppDistError, ReportedElsewhere, one_line

BAD_INPUT = 2  # the documented exit code of bad input (README, docs/TROUBLESHOOTING.md)
PREEMPTED = 75  # EX_TEMPFAIL: try again later; distinct from errors (1) and bad input (2)


def shell_exit_code(status: int) -> int:
    """A child's exit status (Popen.returncode, negative when signal N ended it) as a shell
    reports it: 128 + N for a signal."""
    return 128 - status if status < 0 else status


Body = Callable[[argparse.Namespace], int]
Main = Callable[..., int]


class UsageError(AppDistError):
    """A command-line flag or argument is unknown, missing or malformed."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage error raises UsageError (the message plus where to find
    help) instead of printing the whole usage block; `--help` still prints and exits 0."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def missing_config(prog: str) -> UsageError:
    """The error of a training command run without --config (the schema defaults alone are no
    run: they name no data and a model for another input)."""
    return UsageError(f"{prog}: --config is missing; pass a training config, e.g. --config "
                      f"configs/digits.yaml (see `{prog} --help`)")


def report_bad_input(error: BaseException) -> int:
    """Print `error: <one line>` on stderr; the exit code of bad input."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return BAD_INPUT


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, body: Body) -> int:
    """Parse `argv` (None: sys.argv) and return body(arguments): 0 after --help, and
    BAD_INPUT after one `error:` line when parsing or the body raises AppDistError."""
    try:
        try:
            arguments = parser.parse_args(argv)
        except SystemExit as exit_:  # --help printed the usage
            return int(exit_.code or 0)
        return body(arguments)
    except ReportedElsewhere:
        return BAD_INPUT
    except AppDistError as error:
        return report_bad_input(error)


def command(build_parser: Callable[[], argparse.ArgumentParser]) -> Callable[[Body], Main]:
    """Turn `body(arguments) -> exit code` into `main(argv=None) -> exit code` that keeps the
    contract above (see run_command)."""

    def decorate(body: Body) -> Main:
        def main(argv: list[str] | None = None) -> int:
            return run_command(build_parser(), argv, body)

        main.__module__, main.__qualname__, main.__doc__ = (body.__module__, body.__qualname__,
                                                            body.__doc__)
        return main

    return decorate


def exit_without_teardown(code: int) -> NoReturn:
    """End the process with `code` at once, after flushing the log and standard streams,
    skipping the interpreter's teardown: freeing the objects of torch and torchvision one by
    one takes about 1 s per process (measured: 0.5 s after `import torch` alone) and
    achieves nothing for a process that has already closed what it wrote. For the trainer's
    entry point only, where every rank has released its lock, reader processes, process
    group and wandb run before main() returns; never in a process that runs other code
    after (tests, Ray workers)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
