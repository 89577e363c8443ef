"""Reports of a surgery run: what the topology did, which candidates competed, and why.

Surgery's outcome is not one curve but a history: widths that change between epochs,
candidates screened and rejected each generation, a genealogy of branches. Scalar loggers
show only the first, so :class:`SurgeryReport` adds the rest, for any logger or none:

- every epoch: ``model/width_{i}`` and ``model/num_branches`` to every logger (next to the
  module's own ``model/num_params`` and ``model/depth``);
- every generation: the candidate table (``surgery/candidates`` in W&B, ``candidates.csv``
  on disk) and the genealogy (``surgery/genealogy`` in W&B, ``genealogy.json``);
- at the end: the winner's ``surgery/final_*`` size and accuracy to every logger;
  ``widths.png``, ``spectra.png`` (also W&B images) and ``history.json``.

Files are written on global rank zero only (:mod:`lit_surgery.report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from lit_surgery.report.figures import plot_spectra, plot_widths
from lit_surgery.report.tables import (
    CANDIDATE_COLUMNS,
    GENEALOGY_COLUMNS,
    candidate_rows,
    genealogy_rows,
    json_safe,
    write_csv,
    write_json,
)


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's own folder: a W&B run's ``save_dir/project/version`` (where Lightning puts
    its checkpoints), another logger's ``log_dir``, else ``default_root_dir``. Call it on
    every rank (``trainer.log_dir`` broadcasts)."""
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        return (
            Path(logger.save_dir or trainer.default_root_dir)
            / str(logger.name)
            / str(logger.version)
        )
    return Path(trainer.log_dir or trainer.default_root_dir)


class SurgeryReport(Callback):
    """Logs and files that show what surgery did (see the module docstring for the list).

    Args:
        out_dir: where the files go; default: :func:`run_dir`, the run's own folder (beside
            its checkpoints).
        plots: draw ``widths.png`` and ``spectra.png`` at the end of ``fit``.

    Works with no logger, one or several. Does nothing for modules without surgery state
    (no ``surgeon``), so it can stay in a shared config.
    """

    def __init__(self, out_dir: str | None = None, plots: bool = True) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.plots = plots
        self._dir: Path | None = None
        self._logged = 0
        """Candidate records already reported in this fit."""

    # -------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts, so it must be read on every rank: here, not in a
        # rank-zero-only hook.
        self._dir = Path(self.out_dir) if self.out_dir is not None else run_dir(trainer)
        self._logged = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks run before the module's own on_train_epoch_end, so the current epoch is
        # not in ``epoch_log`` yet: read the leading network (what it is about to log).
        population = getattr(pl_module, "population", None)
        if not population:
            return
        for i, width in enumerate(population[0].topology.widths):
            pl_module.log(f"model/width_{i}", float(width))
        pl_module.log("model/num_branches", float(len(population)))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Surgery runs at the start of an epoch, before this hook: a generation concluded
        # there has its records in the history by now.
        self._report_generations(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last generation concludes after the last epoch, so poll once more.
        self._report_generations(trainer, pl_module)
        self._log_result(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not hasattr(pl_module, "surgeon"):
            return
        out = self._out_dir(trainer)
        self._write_tables(out, pl_module)  # also when no generation ran
        write_json(out / "history.json", self.history(pl_module))
        if not self.plots:
            return
        images = {
            "surgery/widths": plot_widths(pl_module.epoch_log, pl_module.events, out / "widths.png")
        }
        if len(pl_module.population):
            images["surgery/spectra"] = plot_spectra(
                pl_module.population[0],
                out / "spectra.png",
                source=pl_module.settings.sv_source,
                threshold=pl_module.settings.sv_threshold_abs,
            )
        for logger in self._wandb_loggers(trainer):
            for key, path in images.items():
                logger.log_image(key=key, images=[str(path)], step=trainer.global_step)

    # -------------------------------------------------------------- reporting

    @staticmethod
    def history(pl_module: pl.LightningModule) -> dict[str, Any]:
        """What ``history.json`` holds: the policy's history, surgery events, epoch log."""
        return {
            **pl_module.surgeon.history.to_dict(),
            "events": list(pl_module.events),
            "epoch_log": list(pl_module.epoch_log),
        }

    @staticmethod
    def _log_result(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The winner's size as ``surgery/final_*``: the per-epoch ``model/*`` values show the
        leading branch of the last cycle, which need not be the branch that won at the end."""
        population = getattr(pl_module, "population", None)
        if not trainer.is_global_zero or not population or not trainer.loggers:
            return
        topology = population[0].topology
        metrics = {f"surgery/final_width_{i}": float(w) for i, w in enumerate(topology.widths)}
        metrics["surgery/final_depth"] = float(topology.depth)
        metrics["surgery/final_num_params"] = float(topology.num_params)
        branches = getattr(pl_module, "branches", None)
        if branches and branches[0].metric is not None:
            metrics["surgery/final_val_acc"] = float(branches[0].metric)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _report_generations(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """If concluded generations added candidate records since the last report, log the
        whole table again (cumulative: W&B shows the latest, the CSV is rewritten) and the
        genealogy. Records enter the history complete, when their generation concludes."""
        if not trainer.is_global_zero or not hasattr(pl_module, "surgeon"):
            return
        history = pl_module.surgeon.history
        if len(history.candidates) == self._logged:
            return
        self._logged = len(history.candidates)
        candidates, genealogy = self._write_tables(self._out_dir(trainer), pl_module)
        for logger in self._wandb_loggers(trainer):
            step = trainer.global_step
            logger.log_table(
                key="surgery/candidates",
                columns=list(CANDIDATE_COLUMNS),
                data=json_safe(candidates),
                step=step,
            )
            logger.log_table(
                key="surgery/genealogy",
                columns=list(GENEALOGY_COLUMNS),
                data=json_safe(genealogy),
                step=step,
            )

    @staticmethod
    def _write_tables(out: Path, pl_module: pl.LightningModule) -> tuple[list, list]:
        """``candidates.csv`` and ``genealogy.json`` as they stand; returns the table rows."""
        history = pl_module.surgeon.history
        candidates = candidate_rows(history.candidates)
        write_csv(out / "candidates.csv", CANDIDATE_COLUMNS, candidates)
        write_json(out / "genealogy.json", history.to_dict()["genealogy"])
        return candidates, genealogy_rows(history.genealogy)

    def _out_dir(self, trainer: pl.Trainer) -> Path:
        if self._dir is None:  # used without setup (e.g. hooks called by hand)
            self._dir = Path(self.out_dir or trainer.default_root_dir)
        return self._dir

    @staticmethod
    def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
