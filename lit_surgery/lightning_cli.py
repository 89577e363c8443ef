"""``python train.py fit --config configs/<name>.yaml``: LightningCLI with surgery.

Defaults a Lightning user expects: W&B logging offline (no account, no network; ``wandb
sync`` later), checkpoints of the best validation accuracy plus ``last.ckpt``, learning-rate
monitor, rich progress bar. The surgery schedule owns the run's length:
``model.surgery.max_epochs`` sets ``trainer.max_epochs``. After ``fit`` the best network is
tested, exported as a plain ``torch.nn.Sequential`` and summarised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_surgery.data import SurgeryDataModule
from lit_surgery.loop import attach
from lit_surgery.module import SurgeryModule
from lit_surgery.reporting import SurgeryReport, run_dir


def export(module: SurgeryModule, directory: str | Path) -> Path:
    """Write ``model.pt`` (a pickled ``nn.Sequential``: loads with plain torch,
    ``torch.load(path, weights_only=False)``) and ``topology.json`` beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(module.net.to_sequential().cpu().eval(), tmp)
    os.replace(tmp, path)
    (directory / "topology.json").write_text(json.dumps(module.topology.to_dict(), indent=2))
    return path


class SurgeryCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
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
            help="where model.pt and topology.json go (default: the run's dir)",
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        """The rich progress bar, unless the bar is off or another one is configured."""
        configured = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        attach(self.trainer)

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
        path = export(module, directory)
        topo = module.topology
        print(f"final topology: {topo.describe()} widths={topo.widths} params={topo.num_params}")
        if "test/acc" in results:
            print(f"test accuracy: {results['test/acc']:.4f}")
        print(f"exported: {path}")


def main(args: list[str] | None = None) -> None:
    SurgeryCLI(args=args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # DDP: exit cleanly, not via atexit
