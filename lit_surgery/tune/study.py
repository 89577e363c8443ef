"""``lit-surgery tune``: tune the surgery itself (and the optimiser) with Optuna.

The study comes from a sweep file (:mod:`lit_surgery.tune.sweep`) and lives in an Optuna
storage (:mod:`lit_surgery.tune.storage`); re-running the command resumes it. Each trial is
one in-process ``fit`` of train.py's :class:`~lit_surgery.lightning.cli.SurgeryCLI` with the
surgery loop attached, finished as every fit is (:func:`~lit_surgery.lightning.cli.finish_fit`:
test, export), a W&B run (offline by default) in a group named after the study with the
trial's parameters in its config, and a callback that reports the objective after every
epoch so the study's pruner can stop it. A worker that runs to the study's target with
heartbeat retries on stays while any trial is still running anywhere: a killed worker's
trial is failed once its heartbeat is stale and its retry runs in a worker that is still
there (:func:`run_study`). What a study produced is shown and exported by
:mod:`lit_surgery.tune.results`; the options are :mod:`lit_surgery.cli`'s.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from lit_surgery.lightning.cli import finish_fit
from lit_surgery.lightning.loop import attach
from lit_surgery.lightning.module import SurgeryModule
from lit_surgery.tune.metrics import METRICS, TrialResult
from lit_surgery.tune.results import export_trial, summarize, trial_line
from lit_surgery.tune.storage import default_storage, open_storage
from lit_surgery.tune.sweep import Heartbeat, Sweep, SweepError, check_heartbeat, load_sweep
from lit_surgery.tune.trials import (
    check_sweep,
    instantiate,
    make_pruner,
    make_sampler,
    runtime_config,
    trial_config,
)

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
"""The trials that count towards a study's target (all but the queued)."""
LIVE = (TrialState.WAITING, TrialState.RUNNING)

# --------------------------------------------------------------------------------------
# One trial


class TrialPruning(Callback):
    """Reports the objective's per-epoch value to the trial after every validation and
    raises :class:`optuna.TrialPruned` when the study's pruner says so. (Optuna-integration's
    Lightning callback does the same; this one also reads values the module holds, such as
    the current parameter count, and needs no extra package.)"""

    def __init__(
        self,
        trial: optuna.Trial,
        read: Callable[[pl.Trainer, SurgeryModule], float | None],
        name: str,
    ) -> None:
        self.trial, self.read, self.name = trial, read, name

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = self.read(trainer, pl_module)
        if value is None or not math.isfinite(value):
            return
        epoch = trainer.current_epoch
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.name}={value:.4g}")


def fit_trial(
    config: dict[str, Any],
    out_dir: Path,
    logger: Logger | None,
    callbacks: Sequence[Callback] = (),
) -> TrialResult:
    """Train ``config`` in this process as ``train.py fit`` would (surgery loop attached),
    then finish as it does: test the winner and export it beside the checkpoints."""
    cli = instantiate(runtime_config(config, out_dir), callbacks)
    trainer, module = cli.trainer, cli.model
    if logger is not None:
        trainer.logger = logger
    attach(trainer)
    start = time.perf_counter()
    trainer.fit(module, datamodule=cli.datamodule)
    wall = time.perf_counter() - start
    winner = module.branches[0].metric
    if winner is None:
        winner = float(trainer.callback_metrics["val/acc"])
    finished = finish_fit(trainer, module, cli.datamodule)
    topo = finished.topology
    return TrialResult(
        val_acc=float(winner),
        num_params=int(topo.num_params),
        wall_time=wall,
        topology=topo.describe(),
        widths=list(topo.widths),
        test_acc=finished.test_acc,
        run_dir=str(finished.directory),
    )


class TrialObjective:
    """The Optuna objective: sample, build the trial's config, train, return the metrics."""

    def __init__(self, sweep: Sweep, study_name: str, out_dir: Path) -> None:
        self.sweep, self.study_name, self.out_dir = sweep, study_name, out_dir

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        import wandb

        sweep = self.sweep
        values = {p.name: p.suggest(trial) for p in sweep.params}
        seed = sweep.seed + trial.number
        config = trial_config(sweep, values, seed)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("config", config)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("threads", torch.get_num_threads())  # results depend on it
        # absolute: W&B's service process may have been started in another directory
        directory = (self.out_dir / f"trial-{trial.number:04d}").resolve()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        logger = WandbLogger(
            project=sweep.wandb["project"],
            entity=sweep.wandb.get("entity"),
            offline=bool(sweep.wandb["offline"]),
            save_dir=str(directory),
            name=f"{self.study_name}-trial-{trial.number}",
            group=self.study_name,
            job_type="optuna-trial",
            config={
                **values,
                "optuna/study": self.study_name,
                "optuna/trial": trial.number,
                "optuna/seed": seed,
            },
        )
        callbacks = []
        if not sweep.multi_objective:
            objective = sweep.objectives[0]
            read = METRICS[objective.metric].per_epoch
            if read is not None:
                callbacks.append(TrialPruning(trial, read, objective.metric))
        status = "failed"
        try:
            result = fit_trial(config, directory, logger, callbacks)
            status = "complete"
        except optuna.TrialPruned:
            status = "pruned"
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise
        finally:
            if wandb.run is not None:
                wandb.run.summary["optuna/state"] = status
                wandb.finish(exit_code=1 if status == "failed" else 0)
        trial.set_user_attr("val_acc", result.val_acc)
        trial.set_user_attr("num_params", result.num_params)
        trial.set_user_attr("wall_time", round(result.wall_time, 3))
        trial.set_user_attr("test_acc", result.test_acc)
        trial.set_user_attr("topology", result.topology)
        trial.set_user_attr("widths", result.widths)
        trial.set_user_attr("run_dir", result.run_dir)
        scores = [METRICS[o.metric].final(result) for o in sweep.objectives]
        return scores if sweep.multi_objective else scores[0]


# --------------------------------------------------------------------------------------
# The study


def open_study(
    sweep: Sweep, storage: BaseStorage, study_name: str, sampler_seed: int | None = None
) -> optuna.Study:
    """Create the study, or load it (resume) if the storage has it already, also when
    another worker created it a moment ago (Optuna turns that unique violation into a load).
    The sampler's seed defaults to the sweep's seed plus the trials already there, so a
    resumed study does not re-draw its first samples."""
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=sweep.directions,
        pruner=make_pruner(sweep),
        load_if_exists=True,
    )
    wanted = [optuna.study.StudyDirection[d.upper()] for d in sweep.directions]
    if list(study.directions) != wanted:
        raise SweepError(
            f"study {study_name!r} exists with directions "
            f"{[d.name.lower() for d in study.directions]}, the sweep has {sweep.directions}; "
            f"use another --study-name"
        )
    if sampler_seed is None:
        sampler_seed = sweep.seed + len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(sweep, sampler_seed)
    return study


def run_study(
    study: optuna.Study,
    objective: TrialObjective,
    *,
    n_trials: int | None,
    total_trials: int | None,
    retry_poll: float | None = None,
) -> int:
    """Run trials until this process has run ``n_trials`` or the study holds
    ``total_trials`` (finished in any state, or running in any worker); returns how many this
    process ran. A failing trial is recorded as failed and the study goes on. Queued trials
    (retries of failed ones) do not count until a worker picks them up, so they are run.

    With ``retry_poll`` (seconds; heartbeats that re-queue a dead worker's trial), a process
    that runs to the target (no ``n_trials``) then stays while any trial is running, looking
    that often: a killed worker's trial counts as running until its heartbeat is stale, and
    only then is it failed and its retry queued, which this process runs. (As with the
    target, two workers that reach for one retry at once may start one trial more.)"""
    poll = retry_poll if n_trials is None and total_trials is not None else None
    optuna.storages.fail_stale_trials(study)  # a killed worker's trial must not count as live
    if total_trials is not None:
        left = max(0, total_trials - len(study.get_trials(deepcopy=False, states=COUNTED)))
        n_trials = left if n_trials is None else min(n_trials, left)
    metrics = [o.metric for o in objective.sweep.objectives]
    ran = 0

    def progress(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran
        ran += 1
        print(trial_line(trial, metrics), flush=True)

    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [progress]
    if total_trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(total_trials, states=COUNTED))

    def optimize(n: int | None) -> None:
        study.optimize(
            objective, n_trials=n, callbacks=callbacks, catch=(Exception,), gc_after_trial=True
        )

    if n_trials != 0:
        optimize(n_trials)
    waiting = False
    while poll is not None:
        optuna.storages.fail_stale_trials(study)  # queues the retry of a dead worker's trial
        live = [t.state for t in study.get_trials(deepcopy=False, states=LIVE)]
        if TrialState.WAITING in live:
            optimize(1)  # Optuna's next trial is the queued one
        elif live:
            if not waiting:
                print(
                    f"target reached; waiting for {len(live)} trial(s) still running in other "
                    "workers (a dead worker's trial is retried here)",
                    flush=True,
                )
                waiting = True
            time.sleep(poll)
        else:
            break
    return ran


def quiet() -> None:
    """One line per trial instead of Lightning's and W&B's per-run chatter."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # failures still log their error
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # the same advice for every trial of a small network (few batches, deprecations)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec")


def tune(
    sweep: str | Path,
    *,
    sets: dict[str, Any],
    storage: str | None,
    study_name: str | None,
    n_trials: int | None,
    total_trials: int | None,
    out_dir: str | Path,
    sampler_seed: int | None,
    heartbeat_interval: int | None,
    grace_period: int | None,
    max_retry: int | None,
    threads: int,
    check: bool,
    export: str | Path | None,
    trial: int | None,
    console: Console,
) -> optuna.Study | None:
    """``lit-surgery tune``: check the sweep, open (or resume) its study, run trials to the
    target, summarise, export. The options and their defaults are the command line's
    (:func:`lit_surgery.cli.tune_parser` says what each means); returns the study, or None
    with ``check``. Bad input raises :class:`SweepError` before any trial."""
    swept = load_sweep(sweep, sets)
    beat = check_heartbeat(
        Heartbeat(
            interval=heartbeat_interval or swept.heartbeat.interval,
            grace_period=grace_period or swept.heartbeat.grace_period,
            max_retry=swept.heartbeat.max_retry if max_retry is None else max_retry,
        )
    )
    if threads:
        torch.set_num_threads(threads)
    check_sweep(swept)
    if check:
        console.print(
            f"sweep {swept.path} is valid: {len(swept.params)} parameters, objectives "
            f"{[(o.metric, o.direction) for o in swept.objectives]}, {swept.sampler.name}, "
            f"{swept.pruner.name if swept.pruner else 'no pruner'}"
        )
        return None
    name = study_name or swept.name
    url = storage or swept.storage or default_storage(Path(out_dir), name)
    opened = open_storage(url, beat)
    study = open_study(swept, opened, name, sampler_seed)
    existing = len(study.get_trials(deepcopy=False))
    if export is not None and total_trials is None and n_trials is None:
        n_trials = 0  # --export alone exports from the study as it is
    elif total_trials is None and n_trials is None:
        total_trials = swept.n_trials
    trials_dir = Path(out_dir) / name
    console.print(
        f"study {name!r}: {existing} trials so far"
        + (f", target {total_trials}" if total_trials is not None else "")
        + (f", at most {n_trials} in this process" if n_trials is not None else "")
        + f"; trials in {trials_dir}/"
    )
    start = time.perf_counter()
    ran = run_study(
        study,
        TrialObjective(swept, name, trials_dir),
        n_trials=n_trials,
        total_trials=total_trials,
        retry_poll=beat.interval if beat.max_retry and isinstance(opened, RDBStorage) else None,
    )
    console.print(f"{ran} trials run by this process in {time.perf_counter() - start:.1f} s")
    plot = summarize(study, swept, trials_dir, console)
    if plot is not None:
        console.print(f"plot: {plot}")
    if export is not None:
        path, chosen = export_trial(study, swept, export, trial)
        console.print(
            f"exported trial {chosen.number}: {path} (python train.py fit --config {path})"
        )
    return study
