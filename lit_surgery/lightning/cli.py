"""``lit-surgery fit --config configs/<name>.yaml`` (or ``python train.py fit ...``):
LightningCLI with surgery.

Defaults a Lightning user expects: W&B logging offline (no account, no network; ``wandb
sync`` later), checkpoints of the best validation accuracy plus ``last.ckpt``, learning-rate
monitor, rich progress bar. The surgery schedule owns the run's length:
``model.surgery.max_epochs`` sets ``trainer.max_epochs``. After ``fit`` the best network is
tested, exported (``model.safetensors`` and ``topology.json``, see
:mod:`lit_surgery.core.export`) and summarised by :func:`finish_fit`, which each tuning trial
runs too. A user error (a bad value, missing data, a file that is not a checkpoint) raises
before anything is written; :mod:`lit_surgery.cli` prints it as one line.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_surgery.core.export import export
from lit_surgery.core.topology import Topology
from lit_surgery.data import SurgeryDataModule
from lit_surgery.errors import one_line
from lit_surgery.lightning.callbacks import SurgeryReport, run_dir
from lit_surgery.lightning.loop import attach
from lit_surgery.lightning.module import CHECKPOINT_VERSION, CheckpointError, SurgeryModule


def _load_failure(err: Exception) -> str:
    """The gist of a ``torch.load`` failure (its weights-only message is a paragraph)."""
    text = one_line(err)
    gist = text.partition(". ")[0]
    if "WeightsUnpickler error:" in text:
        detail = text.partition("WeightsUnpickler error:")[2].partition(" Check the")[0]
        gist = f"{gist}: {detail.strip()}"
    return f"torch.load: {gist[:300]}"


def check_checkpoint(path: str) -> None:
    """Fail before anything runs, in one line, on a ``ckpt_path`` that is not a lit-surgery
    checkpoint (``torch.load`` alone reports a garbage file as a pickle opcode, and
    LightningCLI loads the file before any of our hooks). Lightning's special values
    (``last``, ``best``, ``hpc``, ``registry``) and remote URLs are left to Lightning."""
    if path in ("last", "best", "hpc") or path.startswith("registry") or "://" in path:
        return
    if not Path(path).is_file():
        raise CheckpointError(f"ckpt_path {path!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds for a file that is not its own
        raise CheckpointError(
            f"ckpt_path {path!r} is not a readable checkpoint ({_load_failure(err)})"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("surgery"), dict):
        raise CheckpointError(
            f"ckpt_path {path!r} has no 'surgery' entry: it was not written by lit_surgery"
        )
    version = checkpoint["surgery"].get("version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"ckpt_path {path!r} has surgery state version {version!r}; this lit_surgery "
            f"reads version {CHECKPOINT_VERSION}"
        )


@dataclass(frozen=True)
class Finished:
    """What :func:`finish_fit` did with the winner."""

    topology: Topology
    test_acc: float | None
    """None without a test split."""
    directory: Path
    """Where the export goes."""
    weights: Path | None
    """The exported ``model.safetensors``; None on ranks other than 0, which export nothing."""

    def summary(self) -> str:
        topo = self.topology
        lines = [f"final topology: {topo.describe()} widths={topo.widths} params={topo.num_params}"]
        if self.test_acc is not None:
            lines.append(f"test accuracy: {self.test_acc:.4f}")
        if self.weights is not None:
            lines.append(f"exported: {self.weights}")
        return "\n".join(lines)


def finish_fit(
    trainer: Trainer,
    module: SurgeryModule,
    datamodule: SurgeryDataModule,
    export_dir: str | Path | None = None,
) -> Finished:
    """After ``fit``, what every run does with its winner (``fit`` and each tuning trial):
    test it if the data has a test split, export it (:func:`~lit_surgery.core.export.export`)
    to ``export_dir``, else the run's folder. Call it on every rank: testing under DDP is
    collective and so is finding the run's folder; rank 0 alone writes the export."""
    test_acc = None
    if datamodule.splits is not None and datamodule.splits.x_test is not None:
        results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        test_acc = results.get("test/acc")
    directory = Path(export_dir) if export_dir else run_dir(trainer)
    weights = export(module.net, directory) if trainer.is_global_zero else None
    return Finished(
        module.topology, None if test_acc is None else float(test_acc), directory, weights
    )


class SurgeryCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # parse errors raise (one line, exit 2, by main) instead of printing the usage
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(SurgeryModule, SurgeryDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.surgery.max_epochs", "trainer.max_epochs")
        # One seed per run: the split, the start network, the policy's choices.
        parser.link_arguments("model.seed", "data.seed")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SurgeryReport, "report")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"project": "lit-surgery", "offline": True, "save_dir": "runs"},
                },
                "trainer.callbacks": [
                    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                ],
            }
        )
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default=None,
            help="where model.safetensors and topology.json go (default: the run's dir)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path:
            check_checkpoint(str(ckpt_path))
        # W&B's service process resolves a relative save_dir against its own working
        # directory (where the process's first W&B run started), so a later run in another
        # directory would write its files there: make it absolute.
        loggers = config.get("trainer.logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
                save_dir = logger.init_args.get("save_dir")
                if save_dir:
                    logger.init_args.save_dir = os.path.abspath(save_dir)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        """The defaults this CLI adds follow what the user turned off: no checkpoint
        callback without checkpointing, no learning-rate monitor without a logger, the rich
        progress bar unless the bar is off or another one is configured. (A private
        LightningCLI hook: see :data:`lit_surgery.lightning.compat.INSTANTIATE_TRAINER`.)"""
        no_logger = config.get("logger") is False or config.get("logger") == []

        def wanted(c: Callback) -> bool:
            if isinstance(c, ModelCheckpoint) and config.get("enable_checkpointing") is False:
                return False
            return not (isinstance(c, LearningRateMonitor) and no_logger)

        callbacks = [c for c in callbacks if wanted(c)]
        if config.get("callbacks"):
            config["callbacks"] = [c for c in config["callbacks"] if wanted(c)]
        configured = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _check_data(self) -> None:
        """Load the data before the trainer runs, so missing or malformed data fails before
        a logger, a config file or a checkpoint is written. Only the launching process (local
        rank 0): processes that DDP starts load in ``setup``, after it, as usual."""
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            self.datamodule.prepare_data()
            self.datamodule.setup("fit")

    def before_fit(self) -> None:
        self._check_data()
        attach(self.trainer)

    def before_validate(self) -> None:
        self._check_data()

    def before_test(self) -> None:
        self._check_data()

    def before_predict(self) -> None:
        self._check_data()

    def after_fit(self) -> None:
        export_dir = self.config[self.subcommand].get("export_dir")
        finished = finish_fit(self.trainer, self.model, self.datamodule, export_dir)
        if self.trainer.is_global_zero:
            print(finished.summary())


def run_cli(argv: list[str], *, prog: str, own_argv: bool) -> None:
    """:class:`SurgeryCLI` on ``argv`` (``fit --config ...``), ``prog`` naming the command in
    its help. ``own_argv``: ``argv`` is this process's command line, which then becomes
    ``sys.argv[1:]`` as parsed (less ``--debug``, which the environment passes on): DDP
    starts the other ranks with ``sys.argv``."""
    kwargs: dict[str, Any] = {"parser_kwargs": {"prog": prog, "exit_on_error": False}}
    if own_argv:
        sys.argv[1:] = argv
    else:
        kwargs["args"] = argv
    SurgeryCLI(**kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # DDP: exit cleanly, not via atexit
