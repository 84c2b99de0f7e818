"""Command-line parsing with the project's error contract: one `error:` line, exit code 2."""

from __future__ import annotations

import argparse
from typing import NoReturn

from app_dist.foundations.errors import AppDistError


class UsageError(AppDistError):
    """A command-line flag or argument is unknown, missing or malformed."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage error raises UsageError (the message plus where to find
    help) instead of printing the whole usage block; `--help` still prints and exits 0."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def parse_or_exit_code(parser: argparse.ArgumentParser, argv: list[str] | None
                       ) -> argparse.Namespace | int:
    """parser.parse_args(argv), or the exit code when it printed --help (0)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
