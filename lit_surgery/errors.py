"""User errors, and how the command line shows them.

A mistake in what the user gave (a config value, a data file, a checkpoint, a sweep file)
is not a bug in lit-surgery: the user needs one line that names the bad value and what is
allowed, not a traceback. Every such error derives from :class:`UserError`;
:func:`run_command` prints it as ``PROG: error: MESSAGE`` on stderr and exits with status 2
(argparse's status for bad usage). ``--debug`` or ``LIT_SURGERY_DEBUG=1`` shows the
traceback instead. Plain Python, so the core can raise these without importing the CLI.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "LIT_SURGERY_DEBUG"
USAGE_STATUS = 2


class UserError(ValueError):
    """Bad input from the user; the message names the value and what is allowed."""


class UsageError(UserError):
    """Bad command-line arguments."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (jsonargparse's span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def debug_requested(argv: list[str]) -> bool:
    """Remove ``--debug`` from ``argv`` (in place); True if it was there or the environment
    asks. ``--debug`` also sets the environment, so processes started for this one (DDP
    ranks, workers) show tracebacks too."""
    if "--debug" in argv:
        argv[:] = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(prog: str, command: Callable[[list[str]], None], argv: Sequence[str]) -> None:
    """Run ``command(argv)``; a user error becomes one line on stderr and exit status 2."""
    from jsonargparse import ArgumentError  # LightningCLI's parse errors

    argv = list(argv)
    debug = debug_requested(argv)
    try:
        command(argv)
    except (UserError, ArgumentError) as err:
        if debug:
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(USAGE_STATUS)
