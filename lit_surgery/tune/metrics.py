"""What a trial produces (:class:`TrialResult`) and the metrics an objective may use:
each with its final value and, where it has one, its value after every epoch for the pruner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl

from lit_surgery.lightning.module import SurgeryModule


@dataclass
class TrialResult:
    """What one training run produced (the winner of its surgery)."""

    val_acc: float
    num_params: int
    wall_time: float
    topology: str
    widths: list[int]
    test_acc: float | None = None
    run_dir: str | None = None


@dataclass(frozen=True)
class Metric:
    """An objective: its final value, and (if it has one) its value after each epoch, which
    is what the pruner sees."""

    final: Callable[[TrialResult], float]
    per_epoch: Callable[[pl.Trainer, SurgeryModule], float | None] | None
    help: str


def _callback_metric(key: str) -> Callable[[pl.Trainer, SurgeryModule], float | None]:
    def read(trainer: pl.Trainer, module: SurgeryModule) -> float | None:
        value = trainer.callback_metrics.get(key)
        return None if value is None else float(value)

    return read


METRICS = {
    "val_acc": Metric(
        lambda r: r.val_acc, _callback_metric("val/acc"), "validation accuracy of the winner"
    ),
    "num_params": Metric(
        lambda r: float(r.num_params),
        lambda trainer, module: float(module.topology.num_params),
        "parameter count of the winner",
    ),
    "wall_time": Metric(lambda r: r.wall_time, None, "seconds of training (fit)"),
}
