"""``python train.py fit --config configs/<name>.yaml``: LightningCLI with surgery.

Defaults a Lightning user expects: W&B logging offline (no account, no network; ``wandb
sync`` later), checkpoints of the best validation accuracy plus ``last.ckpt``, learning-rate
monitor, rich progress bar. The surgery schedule owns the run's length:
``model.surgery.max_epochs`` sets ``trainer.max_epochs``. After ``fit`` the best network is
tested, exported (``model.safetensors`` and ``topology.json``, see
:mod:`lit_surgery.core.export`) and summarised. A user error (a bad value, missing data, a file
that is not a checkpoint) prints one line and exits with status 2.
"""

from __future__ import annotations

import os
import sys
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
from lit_surgery.data import SurgeryDataModule
from lit_surgery.errors import one_line, run_command
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
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if ckpt_path:
            check_checkpoint(str(ckpt_path))

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
        trainer, module = self.trainer, self.model
        datamodule = self.datamodule
        results = {}
        if datamodule.splits is not None and datamodule.splits.x_test is not None:
            # every rank: testing under DDP is collective
            results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        directory = self.config[self.subcommand].get("export_dir") or run_dir(trainer)
        if not trainer.is_global_zero:
            return
        path = export(module.net, directory)
        topo = module.topology
        print(f"final topology: {topo.describe()} widths={topo.widths} params={topo.num_params}")
        if "test/acc" in results:
            print(f"test accuracy: {results['test/acc']:.4f}")
        print(f"exported: {path}")


def main(args: list[str] | None = None) -> None:
    """``python train.py ...`` (``args``: instead of ``sys.argv``); a user error prints one
    line and exits with status 2."""

    def command(argv: list[str]) -> None:
        if args is None:
            sys.argv[1:] = argv  # without --debug: DDP re-launches this script with sys.argv
        SurgeryCLI(args=argv if args is not None else None)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # DDP: exit cleanly, not via atexit

    run_command("train.py", command, sys.argv[1:] if args is None else args)
