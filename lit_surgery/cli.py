"""The ``lit-surgery`` command: sub-commands for the ways of running surgery.

Every sub-command reports bad input the same way: one line on stderr, exit status 2
(:func:`lit_surgery.errors.run_command`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from lit_surgery.errors import USAGE_STATUS, run_command

COMMANDS = {
    "plain": ("lit_surgery.plain", "surgery on digits in a plain PyTorch loop"),
    "tune": ("lit_surgery.tune.study", "tune surgery settings with Optuna from a sweep file"),
}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        usage = "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: lit-surgery COMMAND [ARGS]\n\ncommands:\n{usage}")
        return
    if args[0] not in COMMANDS:
        print(
            f"lit-surgery: error: unknown command {args[0]!r}; choose one of "
            f"{', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        sys.exit(USAGE_STATUS)
    module = importlib.import_module(COMMANDS[args[0]][0])
    run_command(f"lit-surgery {args[0]}", module.main, args[1:])


if __name__ == "__main__":  # python -m lit_surgery.cli (e.g. workers without the script)
    main()
