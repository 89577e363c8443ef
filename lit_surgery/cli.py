"""The command line: ``lit-surgery fit|validate|test|predict|tune|plain ...``.

One jsonargparse parser tree. ``fit``, ``validate``, ``test`` and ``predict`` are train.py's
LightningCLI (:class:`~lit_surgery.lightning.cli.SurgeryCLI`, a jsonargparse parser with
``--config`` and ``--print_config``), so ``lit-surgery fit --config C`` is ``python train.py
fit --config C``; train.py is this command under its own name. ``tune`` and ``plain`` are
parsed here and run :func:`lit_surgery.tune.study.tune` and :func:`lit_surgery.plain.main`;
their options are spelled with dashes, as they always were.

Each command imports only what it runs (``plain`` starts without Lightning or Optuna).
Every command reports bad input the same way: ``PROG COMMAND: error: MESSAGE`` on one line,
exit status 2 (:func:`lit_surgery.errors.run_command`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import yaml
from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import NonNegativeInt, PositiveInt

from lit_surgery.errors import UsageError, run_command

if TYPE_CHECKING:
    import optuna

LIGHTNING_COMMANDS = {
    "fit": "train with surgery; then test, export and summarise the winner",
    "validate": "validate a model (e.g. --ckpt_path)",
    "test": "test a model (e.g. --ckpt_path)",
    "predict": "predict with a model (e.g. --ckpt_path)",
}
COMMANDS = {
    **LIGHTNING_COMMANDS,
    "tune": "tune surgery and optimiser settings with Optuna from a sweep file",
    "plain": "surgery on digits in a plain PyTorch loop (no Lightning)",
}
OPTIMIZERS = ("sgd", "adam")
"""``lit-surgery plain --optimizer`` (:data:`lit_surgery.plain.OPTIMIZERS`, named here so that
building the parser imports no torch)."""


def tune_parser() -> ArgumentParser:
    """``lit-surgery tune``'s options. Those not given (null) come from the sweep file."""
    parser = ArgumentParser(
        description="Tune surgery and optimiser settings with Optuna from a sweep file. "
        "Re-running the command resumes the study. Options that are not given (null) come "
        "from the sweep file.",
        exit_on_error=False,
    )
    parser.add_argument("sweep", type=str, help="sweep YAML, e.g. sweeps/digits.yaml")
    parser.add_argument(
        "--storage",
        type=str,
        default=None,
        help="Optuna storage URL, or 'memory' for a throwaway study (null: the sweep's, "
        "else sqlite:///OUT_DIR/STUDY.db)",
    )
    parser.add_argument(
        "--study-name", type=str, default=None, help="the study (null: the sweep's name)"
    )
    parser.add_argument(
        "--n-trials",
        type=NonNegativeInt,
        default=None,
        help="run at most this many trials in this process (null: until the study holds "
        "--total-trials)",
    )
    parser.add_argument(
        "--total-trials",
        type=NonNegativeInt,
        default=None,
        help="stop when the study holds this many trials, any state, all workers (null: the "
        "sweep's n_trials, unless --n-trials is given)",
    )
    parser.add_argument(
        "--out-dir",
        type=str,
        default="runs/tune",
        help="trial folders go to OUT_DIR/STUDY/trial-NNNN",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        type=str,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fix a training setting for this worker, e.g. data.data_dir=/data (repeatable)",
    )
    parser.add_argument(
        "--sampler-seed",
        type=int,
        default=None,
        help="the sampler's seed; workers started together need different ones (null: the "
        "sweep's seed plus the number of trials already in the study)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=PositiveInt,
        default=None,
        help="seconds between a running trial's heartbeats (RDB storages)",
    )
    parser.add_argument(
        "--grace-period",
        type=PositiveInt,
        default=None,
        help="seconds without a heartbeat before a running trial is failed",
    )
    parser.add_argument(
        "--max-retry",
        type=NonNegativeInt,
        default=None,
        help="re-run a failed (stale) trial this many times",
    )
    parser.add_argument(
        "--threads",
        type=NonNegativeInt,
        default=1,
        help="torch CPU threads of this worker (1: fastest for small networks, and several "
        "workers can share a machine; 0: torch's choice)",
    )
    parser.add_argument("--check", action="store_true", help="validate the sweep and exit")
    parser.add_argument(
        "--export",
        type=str,
        default=None,
        metavar="PATH",
        help="after the study, write the best (or --trial) trial's training config here",
    )
    parser.add_argument(
        "--trial", type=int, default=None, help="the trial to export (e.g. a Pareto point)"
    )
    return parser


def plain_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="Neural network surgery on digits in a plain PyTorch loop.",
        exit_on_error=False,
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[4], help="start widths")
    parser.add_argument("--max-epochs", type=int, default=40, help="epochs of the winner's lineage")
    parser.add_argument(
        "--initial-epochs", type=int, default=5, help="plain training before the first generation"
    )
    parser.add_argument(
        "--epoch-step", type=int, default=5, help="a generation every this many epochs"
    )
    parser.add_argument("--paper", action="store_true", help="the reference's choices")
    parser.add_argument(
        "--random-walk",
        action="store_true",
        help="the ablation baseline: one random candidate per generation",
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="the optimiser")
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default 0.02; 0.005 with --paper)"
    )
    parser.add_argument(
        "--momentum", type=float, default=None, help="SGD's momentum (default 0.9; 0 with --paper)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the split, the start network and the choices"
    )
    return parser


def build_parser(prog: str = "lit-surgery") -> ArgumentParser:
    """The whole tree. The Lightning commands' entries only list them: :class:`SurgeryCLI`
    parses them (:func:`run`), so that the other commands never build its parser."""
    parser = ArgumentParser(
        prog=prog,
        description="Train a network while optimising its topology (neural network surgery). "
        f"{', '.join(LIGHTNING_COMMANDS)}: LightningCLI with --config and --print_config, the "
        f"same as python train.py fit ... ({prog} fit --help lists every setting).",
        exit_on_error=False,
    )
    commands = parser.add_subcommands(dest="command")
    for name, help_ in LIGHTNING_COMMANDS.items():
        commands.add_subcommand(name, ArgumentParser(description=help_), help=help_)
    commands.add_subcommand("tune", tune_parser(), help=COMMANDS["tune"])
    commands.add_subcommand("plain", plain_parser(), help=COMMANDS["plain"])
    return parser


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as a mapping, each value read as YAML (``3``, ``[4, 4]``)."""
    sets = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        sets[key] = yaml.safe_load(value)
    return sets


def tune(options: Namespace) -> optuna.Study | None:
    """``lit-surgery tune`` with the options as :func:`tune_parser` parsed them."""
    from rich.console import Console

    from lit_surgery.tune import study

    study.quiet()
    given = {**options.as_dict(), "sets": parse_sets(options.sets)}
    return study.tune(**given, console=Console(soft_wrap=True))


def plain(options: Namespace) -> None:
    """``lit-surgery plain`` with the options as :func:`plain_parser` parsed them."""
    from lit_surgery.plain import main

    main(**options.as_dict())


def run(argv: list[str], *, prog: str, own_argv: bool) -> None:
    """Run the command ``argv`` names. ``own_argv``: ``argv`` is this process's command line
    (see :func:`~lit_surgery.lightning.cli.run_cli`)."""
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from lit_surgery.lightning.cli import run_cli

        run_cli(argv, prog=prog, own_argv=own_argv)
        return
    parser = build_parser(prog)
    if not argv:
        parser.print_help()
        return
    options = parser.parse_args(argv)
    {"tune": tune, "plain": plain}[options.command](options[options.command])


def main(argv: Sequence[str] | None = None, *, prog: str = "lit-surgery") -> None:
    """``lit-surgery ...`` (``argv``: instead of ``sys.argv[1:]``); bad input prints one line
    and exits with status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if a != "--debug"), "")
    run_command(
        f"{prog} {command}" if command in COMMANDS else prog,
        partial(run, prog=prog, own_argv=argv is None),
        args,
    )


if __name__ == "__main__":  # python -m lit_surgery.cli (e.g. workers without the script)
    main()
