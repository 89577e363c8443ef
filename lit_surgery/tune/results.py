"""What a study produced, for the user: one line per finished trial, the best trial (or the
Pareto front) as a table and a plot, and the chosen trial's training config as a YAML that
``python train.py fit --config`` (or ``lit-surgery fit --config``) trains again.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from lit_surgery.tune.sweep import Sweep, SweepError
from lit_surgery.tune.trials import trial_config


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
