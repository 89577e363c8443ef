"""``lit-surgery tune``: tune the surgery itself (and the optimiser) with Optuna.

The study comes from a sweep file (:mod:`lit_surgery.tune.sweep`). Each trial is one in-process
``fit`` of train.py's :class:`~lit_surgery.lightning.cli.SurgeryCLI` with the surgery loop
attached, a W&B run (offline by default) in a group named after the study with the trial's
parameters in its config, and a callback that reports the objective after every epoch so
the study's pruner can stop it. The study lives in an Optuna storage: a local SQLite file by
default, any RDB URL (PostgreSQL, MySQL) for several workers on one study; heartbeats mark a
killed worker's trial failed (and can re-queue it). Re-running the command resumes the
study. The chosen trial is exported as a training config YAML.

Workers may start together on an empty database: creating Optuna's schema there is a race
that all but one worker lose with "already exists" or a unique violation, so the storage is
opened again after a short random pause while that is the error (:func:`open_storage`).
Optuna itself loads a study that another worker created first. A worker that runs to the
study's target with heartbeat retries on stays while any trial is still running anywhere:
a killed worker's trial is failed once its heartbeat is stale and its retry runs in a
worker that is still there (:func:`run_study`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import random
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import optuna
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from lit_surgery.core.export import export
from lit_surgery.errors import ArgParser, run_command
from lit_surgery.lightning.callbacks import run_dir
from lit_surgery.lightning.loop import attach
from lit_surgery.lightning.module import SurgeryModule
from lit_surgery.tune.sweep import (
    METRICS,
    Heartbeat,
    Sweep,
    SweepError,
    TrialResult,
    check_heartbeat,
    check_sweep,
    instantiate,
    load_sweep,
    make_pruner,
    make_sampler,
    runtime_config,
    trial_config,
)

MEMORY_URLS = ("memory", "sqlite://", "sqlite:///:memory:")
DEFAULT_OUT = Path("runs/tune")
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
    then test the winner and export it beside the checkpoints."""
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
    test_acc = None
    splits = cli.datamodule.splits
    if splits is not None and splits.x_test is not None:
        results = trainer.test(module, datamodule=cli.datamodule, verbose=False)[0]
        test_acc = results.get("test/acc")
    directory = run_dir(trainer)
    export(module.net, directory)
    topo = module.topology
    return TrialResult(
        val_acc=float(winner),
        num_params=int(topo.num_params),
        wall_time=wall,
        topology=topo.describe(),
        widths=list(topo.widths),
        test_acc=None if test_acc is None else float(test_acc),
        run_dir=str(directory),
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


def default_storage(out_dir: Path, study_name: str) -> str:
    return f"sqlite:///{out_dir / (study_name + '.db')}"


T = TypeVar("T")

RACE_SQLSTATES = frozenset({"42710", "42P07", "23505"})
"""PostgreSQL: duplicate_object (``CREATE TYPE``), duplicate_table, unique_violation (a
catalogue row such as ``pg_type``'s, when the other worker has not committed yet, or
``alembic_version``'s row)."""
RACE_MYSQL_ERRORS = frozenset({1050, 1062})
"""MySQL and MariaDB: ER_TABLE_EXISTS_ERROR, ER_DUP_ENTRY."""
RACE_SQLITE_ERRORS = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})
"""SQLite's unique violations. Its "table ... already exists" has no code of its own: it is
SQLITE_ERROR, or SQLITE_SCHEMA when the other worker's table appeared during the statement."""
CREATE_ATTEMPTS = 20
_jitter = random.Random()  # not the global generator, which trials seed


def is_creation_race(err: BaseException) -> bool:
    """Whether ``err`` (or the error it was raised from) says that another worker created
    the same table, type or row first: creating Optuna's schema on an empty database checks
    for each table, then creates it, so workers that start together collide."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, DBAPIError):
        cause = cause.__cause__
    if cause is None:
        return False
    orig = cause.orig
    # psycopg 3 names it sqlstate, psycopg2 pgcode
    if (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) in RACE_SQLSTATES:
        return True
    # mysql-connector and MariaDB's connector name it errno, PyMySQL and mysqlclient args[0]
    errno = getattr(orig, "errno", None)
    if errno is None and orig.args and isinstance(orig.args[0], int):
        errno = orig.args[0]
    if errno in RACE_MYSQL_ERRORS:
        return True
    name = getattr(orig, "sqlite_errorname", None)
    if name in ("SQLITE_ERROR", "SQLITE_SCHEMA"):
        return "already exists" in str(orig)
    return name in RACE_SQLITE_ERRORS


def create_with_retries(create: Callable[[], T]) -> T:
    """``create()``, called again after a short random pause (growing, at most 1 s) while it
    fails with :func:`is_creation_race`: each such failure means that another worker got
    further, so a few attempts suffice; the last of ``CREATE_ATTEMPTS`` raises."""
    for attempt in range(1, CREATE_ATTEMPTS):
        try:
            return create()
        except Exception as err:
            if not is_creation_race(err):
                raise
        time.sleep(_jitter.uniform(0.0, min(1.0, 0.05 * 2**attempt)))
    return create()


def open_storage(url: str, heartbeat: Heartbeat) -> BaseStorage:
    """An Optuna storage for ``url``; RDB storages get heartbeats (and retries), so a worker
    killed mid-trial does not leave a trial running forever. Creating the tables is safe
    while other workers do the same (:func:`create_with_retries`)."""
    if url in MEMORY_URLS:
        return InMemoryStorage()
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is not None:
        # psycopg 3 (the dev extra): SQLAlchemy 2.1's default driver, named for 2.0's sake
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        engine = {"pool_pre_ping": True}
    retry = None
    if heartbeat.max_retry:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=heartbeat.max_retry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return create_with_retries(
            lambda: RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat.interval,
                grace_period=heartbeat.grace_period,
                heartbeat_stale_trial_callback=retry,
            )
        )


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


def _short(name: str) -> str:
    for prefix in ("model.optimizer.init_args.", "model.surgery.", "model.", "data."):
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_line(trial: FrozenTrial, metrics: Sequence[str]) -> str:
    """One line per finished trial (progress of a long study)."""
    attrs = trial.user_attrs
    parts = [f"trial {trial.number} {trial.state.name}"]
    if trial.state == TrialState.COMPLETE:
        parts.append(" ".join(f"{m}={_fmt(v)}" for m, v in zip(metrics, trial.values, strict=True)))
    if "topology" in attrs:
        parts.append(f"{attrs['topology']} ({attrs.get('wall_time', 0):.1f} s)")
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        parts.append(f"at epoch {step}: {_fmt(trial.intermediate_values[step])}")
    if "error" in attrs:
        parts.append(f"error: {attrs['error']}")
    params = " ".join(f"{_short(k)}={_fmt(v)}" for k, v in trial.params.items())
    return " | ".join([*parts, params])


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


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    return sorted(study.best_trials, key=lambda t: t.values)


def summarize(study: optuna.Study, sweep: Sweep, out_dir: Path, console: Console) -> Path | None:
    """Print the outcome (the best trial, or the Pareto front) and plot it; returns the plot."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    console.print(
        f"study {study.study_name!r}: {len(trials)} trials "
        + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    )
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return None
    metrics = [o.metric for o in sweep.objectives]
    if sweep.multi_objective:
        table = Table(title=f"Pareto front ({' vs '.join(metrics)})")
        for column in ("trial", *metrics, "topology", "params"):
            table.add_column(column)
        for t in pareto_front(study):
            params = " ".join(f"{_short(k)}={_fmt(v)}" for k, v in t.params.items())
            table.add_row(
                str(t.number),
                *(_fmt(v) for v in t.values),
                str(t.user_attrs.get("topology", "")),
                params,
            )
        console.print(table)
    else:
        best = study.best_trial
        table = Table(title=f"best trial {best.number}: {metrics[0]}={_fmt(best.value)}")
        table.add_column("setting")
        table.add_column("value")
        for key, value in best.params.items():
            table.add_row(key, _fmt(value))
        for key in ("topology", "num_params", "test_acc", "wall_time", "seed"):
            if key in best.user_attrs:
                table.add_row(key, _fmt(best.user_attrs[key]))
        console.print(table)
    return plot_study(study, sweep, out_dir)


def plot_study(study: optuna.Study, sweep: Sweep, out_dir: Path) -> Path:
    """``pareto.png`` (several objectives) or ``history.png`` (one), with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    metrics = [o.metric for o in sweep.objectives]
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if sweep.multi_objective:
            ax = plots.plot_pareto_front(study, target_names=metrics)
            path = out_dir / "pareto.png"
        else:
            ax = plots.plot_optimization_history(study, target_name=metrics[0])
            path = out_dir / "history.png"
    ax.figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
    return path


def chosen_trial(study: optuna.Study, sweep: Sweep, number: int | None) -> FrozenTrial:
    """Trial ``number``, else the best (one objective) or the Pareto trial best in the first
    objective."""
    if number is not None:
        found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not found or found[0].state != TrialState.COMPLETE:
            state = found[0].state.name if found else "absent"
            raise SweepError(f"trial {number} cannot be exported: it is {state}, not COMPLETE")
        return found[0]
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise SweepError(f"study {study.study_name!r} has no complete trial to export")
    if not sweep.multi_objective:
        return study.best_trial
    sign = [1 if d == "maximize" else -1 for d in sweep.directions]
    return max(
        study.best_trials, key=lambda t: [s * v for s, v in zip(sign, t.values, strict=True)]
    )


def export_trial(
    study: optuna.Study, sweep: Sweep, path: str | Path, number: int | None = None
) -> tuple[Path, FrozenTrial]:
    """Write the trial's training config (base config + its parameters, each in its nested
    place) as a YAML that ``python train.py fit --config PATH`` trains."""
    trial = chosen_trial(study, sweep, number)
    config = trial.user_attrs.get("config")
    if config is None:  # a trial of another tool: rebuild it from its parameters
        values = {p.name: p.decode(trial.params[p.name]) for p in sweep.params}
        config = trial_config(sweep, values, trial.user_attrs.get("seed"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = ", ".join(
        f"{o.metric}={_fmt(v)}" for o, v in zip(sweep.objectives, trial.values, strict=True)
    )
    header = (
        f"# Exported by `lit-surgery tune` from study {study.study_name!r}, trial "
        f"{trial.number} ({scores}, topology {trial.user_attrs.get('topology', '?')}).\n"
        f"# Sweep: {sweep.path}. Train: python train.py fit --config {path}\n"
    )
    threads = trial.user_attrs.get("threads")
    if threads:
        header += (
            f"# The trial ran on {threads} torch thread(s); with the same, e.g. "
            f"OMP_NUM_THREADS={threads}, training repeats it exactly.\n"
        )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path, trial


# --------------------------------------------------------------------------------------
# Command line


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    sets = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(f"--set {item!r}: expected KEY=VALUE")
        sets[key] = yaml.safe_load(value)
    return sets


def _quiet() -> None:
    """One line per trial instead of Lightning's and W&B's per-run chatter."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # failures still log their error
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # the same advice for every trial of a small network (few batches, deprecations)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(
        prog="lit-surgery tune",
        description="Tune surgery and optimiser settings with Optuna from a sweep file. "
        "Re-running the command resumes the study.",
    )
    parser.add_argument("sweep", help="sweep YAML, e.g. sweeps/digits.yaml")
    parser.add_argument(
        "--storage",
        help="Optuna storage URL (default: the sweep's, else "
        "sqlite:///OUT_DIR/STUDY.db); 'memory' for a throwaway study",
    )
    parser.add_argument("--study-name", help="default: the sweep's name")
    parser.add_argument(
        "--n-trials",
        type=int,
        help="run at most this many trials in this "
        "process (default: until the study holds --total-trials)",
    )
    parser.add_argument(
        "--total-trials",
        type=int,
        help="stop when the study holds this "
        "many trials, any state, all workers (default: the sweep's n_trials, "
        "unless --n-trials is given)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT,
        help="trial folders go to OUT_DIR/STUDY/trial-NNNN (default runs/tune)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fix a training setting for this worker, e.g. data.data_dir=/data",
    )
    parser.add_argument(
        "--sampler-seed",
        type=int,
        help="default: the sweep's seed plus the "
        "number of trials already in the study; give workers started together "
        "different seeds",
    )
    parser.add_argument("--heartbeat-interval", type=int, help="seconds (RDB storages)")
    parser.add_argument(
        "--grace-period",
        type=int,
        help="seconds without a heartbeat before a running trial is failed",
    )
    parser.add_argument(
        "--max-retry", type=int, help="re-run a failed (stale) trial this many times"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of this "
        "worker (default 1: fastest for small networks, and several workers "
        "can share a machine; 0: torch's choice)",
    )
    parser.add_argument("--check", action="store_true", help="validate the sweep and exit")
    parser.add_argument(
        "--export",
        type=Path,
        metavar="PATH",
        help="after the study, write the best (or --trial) trial's training config here",
    )
    parser.add_argument("--trial", type=int, help="the trial to export (e.g. a Pareto point)")
    return parser


def run(args: argparse.Namespace, console: Console) -> optuna.Study | None:
    sweep = load_sweep(args.sweep, _parse_sets(args.set))
    beat = Heartbeat(
        interval=args.heartbeat_interval or sweep.heartbeat.interval,
        grace_period=args.grace_period or sweep.heartbeat.grace_period,
        max_retry=sweep.heartbeat.max_retry if args.max_retry is None else args.max_retry,
    )
    check_heartbeat(beat)
    for name in ("n_trials", "total_trials"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise SweepError(f"--{name.replace('_', '-')}={value} must be >= 0")
    if args.threads < 0:
        raise SweepError(f"--threads={args.threads} must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_sweep(sweep)
    if args.check:
        console.print(
            f"sweep {sweep.path} is valid: {len(sweep.params)} parameters, objectives "
            f"{[(o.metric, o.direction) for o in sweep.objectives]}, {sweep.sampler.name}, "
            f"{sweep.pruner.name if sweep.pruner else 'no pruner'}"
        )
        return None
    name = args.study_name or sweep.name
    url = args.storage or sweep.storage or default_storage(args.out_dir, name)
    storage = open_storage(url, beat)
    study = open_study(sweep, storage, name, args.sampler_seed)
    existing = len(study.get_trials(deepcopy=False))
    total, n_trials = args.total_trials, args.n_trials
    if args.export is not None and total is None and n_trials is None:
        n_trials = 0  # --export alone exports from the study as it is
    elif total is None and n_trials is None:
        total = sweep.n_trials
    out_dir = args.out_dir / name
    console.print(
        f"study {name!r}: {existing} trials so far"
        + (f", target {total}" if total is not None else "")
        + (f", at most {n_trials} in this process" if n_trials is not None else "")
        + f"; trials in {out_dir}/"
    )
    start = time.perf_counter()
    ran = run_study(
        study,
        TrialObjective(sweep, name, out_dir),
        n_trials=n_trials,
        total_trials=total,
        retry_poll=beat.interval if beat.max_retry and isinstance(storage, RDBStorage) else None,
    )
    console.print(f"{ran} trials run by this process in {time.perf_counter() - start:.1f} s")
    plot = summarize(study, sweep, out_dir, console)
    if plot is not None:
        console.print(f"plot: {plot}")
    if args.export is not None:
        path, trial = export_trial(study, sweep, args.export, args.trial)
        console.print(
            f"exported trial {trial.number}: {path} (python train.py fit --config {path})"
        )
    return study


def main(argv: Sequence[str] | None = None) -> None:
    """``lit-surgery tune``. Bad input raises a :class:`~lit_surgery.errors.UserError`
    (:class:`SweepError`, :class:`~lit_surgery.errors.UsageError`), which the command line
    prints as one line."""
    args = build_parser().parse_args(argv)
    _quiet()
    run(args, Console(soft_wrap=True))


if __name__ == "__main__":
    run_command("lit-surgery tune", main, sys.argv[1:])
