"""The custom fit loop: surgery between epochs inside one ``trainer.fit``.

At each generation boundary the module operates (:meth:`SurgeryModule.operate`); if the
population changed, the loop puts the bare module back as the strategy's model, moves it
to the device, wraps it in a fresh DDP wrapper (without that DDP silently stops
synchronising new parameters), rebuilds the optimiser and scheduler, and loads the
optimiser state that the surviving parameters carried over. See docs/METHOD.md.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy

from lit_surgery.lightning.compat import FitLoop, apply_layer_sync, optimizers_to_device
from lit_surgery.lightning.module import SurgeryModule


class SurgeryFitLoop(FitLoop):
    """``trainer.fit_loop = SurgeryFitLoop(trainer)`` (done by :func:`attach`)."""

    def __init__(self, trainer: pl.Trainer, epoch_loop: Any | None = None) -> None:
        super().__init__(
            trainer, min_epochs=trainer.fit_loop.min_epochs, max_epochs=trainer.fit_loop.max_epochs
        )
        if epoch_loop is not None:
            self.epoch_loop = epoch_loop

    @property
    def module(self) -> SurgeryModule:
        module = self.trainer.lightning_module
        if not isinstance(module, SurgeryModule):
            raise TypeError(f"SurgeryFitLoop needs a SurgeryModule, got {type(module).__name__}")
        return module

    @property
    def done(self) -> bool:
        # The schedule (plus retries) sets the length; the run is not over while the last
        # generation still has to be concluded (e.g. resumed from the final epoch).
        module = self.trainer.lightning_module
        if isinstance(module, SurgeryModule):
            self.max_epochs = module.surgeon.planned_epochs
            completed = self.epoch_progress.current.completed
            if module.surgeon.next_boundary == completed and completed >= self.max_epochs:
                return False
        return super().done

    def on_run_start(self) -> None:
        super().on_run_start()
        if self.epoch_progress.current.completed >= self.max_epochs:
            self._finish()  # resumed after the last epoch, before the final conclusion

    def on_advance_start(self) -> None:
        self._operate()
        super().on_advance_start()

    def on_advance_end(self) -> None:
        super().on_advance_end()
        if self.epoch_progress.current.completed >= self.max_epochs:
            self._finish()

    def _finish(self) -> None:
        """The last generation ends with the run; ``last.ckpt`` then holds the winner."""
        if self._operate() and self.module.surgeon.next_boundary is None:
            for callback in self.trainer.checkpoint_callbacks:
                if getattr(callback, "last_model_path", ""):  # collective: every rank calls
                    self.trainer.save_checkpoint(callback.last_model_path)

    def _operate(self) -> bool:
        module = self.module
        if not module.operate(self.epoch_progress.current.completed):
            return False
        self.max_epochs = module.surgeon.planned_epochs
        with module.profile("rebuild"):
            self._rebuild()
        return True

    def _rebuild(self) -> None:
        trainer, module = self.trainer, self.module
        strategy = trainer.strategy
        old = trainer.optimizers[0] if trainer.optimizers else None
        hyper = old.state_dict()["param_groups"][0] if old is not None else {}
        schedulers = [config.scheduler.state_dict() for config in strategy.lr_scheduler_configs]
        strategy.model = module
        module.to(strategy.root_device)
        if isinstance(strategy, DDPStrategy):
            strategy.model = apply_layer_sync(strategy, module)
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)
        optimizer = trainer.optimizers[0]
        if old is not None:
            optimizer.load_state_dict(module.carried_optimizer_state(hyper))
        for config, state in zip(strategy.lr_scheduler_configs, schedulers, strict=False):
            config.scheduler.load_state_dict(state)
        optimizers_to_device(trainer.optimizers, strategy.root_device)


def attach(trainer: pl.Trainer) -> pl.Trainer:
    """Install the surgery loop on ``trainer`` (keeping its epoch loop)."""
    if not isinstance(trainer.fit_loop, SurgeryFitLoop):
        trainer.fit_loop = SurgeryFitLoop(trainer, epoch_loop=trainer.fit_loop.epoch_loop)
    return trainer
