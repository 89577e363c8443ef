"""The ``lit-surgery`` command: sub-commands for the ways of running surgery."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {
    "plain": ("lit_surgery.plain", "surgery on digits in a plain PyTorch loop"),
    "tune": ("lit_surgery.tuning", "tune surgery settings with Optuna from a sweep file"),
}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items())
        message = f"usage: lit-surgery COMMAND [ARGS]\n\ncommands:\n{usage}"
        if args and args[0] not in ("-h", "--help"):
            sys.exit(f"lit-surgery: unknown command {args[0]!r}\n{message}")
        print(message)
        return
    module = __import__(COMMANDS[args[0]][0], fromlist=["main"])
    module.main(args[1:])


if __name__ == "__main__":  # python -m lit_surgery.cli (e.g. workers without the script)
    main()
