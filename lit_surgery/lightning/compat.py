"""The private Lightning API that surgery inside ``fit`` needs, in one place.

Lightning has no public way to run code between epochs inside its fit loop, to re-wrap a
changed module in DDP, or to count steps taken on the bare optimiser; each use below says
why it is needed. :func:`missing` lists what the installed Lightning lacks, and a test
fails with that list, so an upgrade that changes any of it is caught at once.
``pyproject.toml`` admits the Lightning releases the tests have run on (:data:`TESTED`).
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loops import _FitLoop
from lightning.pytorch.strategies import DDPStrategy, Strategy

TESTED = ">=2.6,<2.7"
"""Lightning releases the test suite has run on (2.6.6)."""

FitLoop = _FitLoop
"""Surgery runs between epochs inside one ``fit``: the only place is a subclass of the fit
loop installed as ``trainer.fit_loop`` (``on_advance_start`` runs before the epoch's hooks).
It also reads ``epoch_progress`` to trigger surgery by epoch number, so a resumed run
neither repeats nor skips a generation."""


def optimizers_to_device(optimizers: list[torch.optim.Optimizer], device: torch.device) -> None:
    """Optimiser state loaded after surgery lives on the CPU; Lightning moves state to the
    device only at setup, with this private helper."""
    _optimizers_to_device(optimizers, device)


def apply_layer_sync(strategy: Strategy, module: pl.LightningModule) -> pl.LightningModule:
    """A changed module must get the strategy's layer sync (``sync_batchnorm``) again before
    DDP wraps it; the strategy keeps the plugin only as ``_layer_sync``."""
    sync = strategy._layer_sync
    return sync.apply(module) if sync else module


def manual_step_progress(trainer: pl.Trainer) -> Any:
    """The step counter of manual optimisation: chunked steps (``steps_per_batch``) step the
    bare optimiser, and counting them here keeps ``global_step``, logging and checkpoints
    right."""
    return trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress


INSTANTIATE_TRAINER = "_instantiate_trainer"
"""LightningCLI's hook that receives the trainer config and the callbacks it adds:
``lightning/cli.py`` overrides it to drop the defaults (checkpoint, learning-rate monitor,
progress bar) that the user turned off, which must happen before ``Trainer`` raises on a
checkpoint callback with checkpointing off."""


def missing() -> list[str]:
    """What of the above the installed Lightning lacks or has changed (empty if all is
    well). The imports at the top fail on their own if a name is gone."""
    problems = []
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, devices=1
    )
    loop = trainer.fit_loop
    if not isinstance(loop, _FitLoop) or not hasattr(_FitLoop, "on_advance_start"):
        problems.append("lightning.pytorch.loops._FitLoop with on_advance_start")
    for name in ("epoch_progress", "epoch_loop"):
        if not hasattr(loop, name):
            problems.append(f"_FitLoop.{name}")
    if not hasattr(DDPStrategy(), "_layer_sync"):
        problems.append("DDPStrategy._layer_sync")
    try:
        manual_step_progress(trainer).increment_completed()
    except AttributeError as err:
        problems.append(f"fit_loop.epoch_loop.manual_optimization.optim_step_progress ({err})")
    params = list(inspect.signature(getattr(LightningCLI, INSTANTIATE_TRAINER)).parameters)
    if params != ["self", "config", "callbacks"]:
        problems.append(f"LightningCLI.{INSTANTIATE_TRAINER}(self, config, callbacks): {params}")
    return problems
