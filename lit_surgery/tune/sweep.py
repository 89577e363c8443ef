"""Sweep files: what ``lit-surgery tune`` reads, as plain, validated dataclasses.

A sweep file (``sweeps/*.yaml``) names a training config (the YAML that ``python train.py
fit --config`` reads), fixed changes to it, a search space of Optuna distributions whose
names are the config's own dotted keys (``model.surgery.sv_threshold_abs``,
``model.surgery.screen_batches.AN``, ``model.optimizer.init_args.lr``), the objective(s),
sampler, pruner and number of trials. :func:`load_sweep` parses it; :func:`check_sweep`
proves, before any trial, that every parameter is a real setting at both ends of its range
(a dry run through train.py's own LightningCLI parser), so a typo costs seconds, not a study.
:func:`trial_config` builds one trial's training config, which is also what an export writes.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from lit_surgery.errors import UserError
from lit_surgery.tune.metrics import METRICS

SWEEP_KEYS = (
    "name",
    "base",
    "overrides",
    "params",
    "objectives",
    "sampler",
    "pruner",
    "n_trials",
    "seed",
    "storage",
    "heartbeat",
    "wandb",
)
PARAM_TYPES = {
    "float": ("low", "high", "log", "step"),
    "int": ("low", "high", "log", "step"),
    "categorical": ("choices",),
}
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = (
    "TPESampler",
    "RandomSampler",
    "GridSampler",
    "NSGAIISampler",
    "NSGAIIISampler",
    "QMCSampler",
    "GPSampler",
    "CmaEsSampler",
    "BruteForceSampler",
)
PRUNERS = (
    "MedianPruner",
    "PercentilePruner",
    "SuccessiveHalvingPruner",
    "HyperbandPruner",
    "ThresholdPruner",
    "WilcoxonPruner",
    "NopPruner",
)


class SweepError(UserError):
    """A sweep file that cannot run; the message names the bad entry and what is allowed."""




@dataclass(frozen=True)
class Param:
    """One search-space entry; ``name`` is a dotted key of the training config."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return self.decode(trial.suggest_categorical(self.name, self.stored_choices()))
        if self.type == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def checked_values(self) -> list[Any]:
        """What the dry run tries: both ends (a categorical's first and last choice), and
        any choices between."""
        return list(self.choices) if self.type == "categorical" else list(self.ends())

    def ends(self) -> tuple[Any, Any]:
        """The extreme values a trial can get (what the dry run checks)."""
        if self.type == "categorical":
            return self.choices[0], self.choices[-1]
        if self.step is None:
            return self.low, self.high
        top = self.low + math.floor((self.high - self.low) / self.step + 1e-9) * self.step
        return self.low, int(top) if self.type == "int" else top

    def stored_choices(self) -> list[Any]:
        """The choices as Optuna stores them: lists and mappings (e.g. ``model.hidden``
        widths) as JSON text, since Optuna keeps only scalars."""
        return [_encode(c) for c in self.choices]

    def decode(self, stored: Any) -> Any:
        """The config value of an Optuna parameter value (see :meth:`stored_choices`)."""
        if self.type == "categorical":
            for choice in self.choices:
                if _encode(choice) == stored:
                    return copy.deepcopy(choice)
        return stored

    def grid(self) -> list[Any]:
        """Every value, for GridSampler (categorical or stepped parameters only)."""
        if self.type == "categorical":
            return self.stored_choices()
        step = self.step if self.step is not None else (1 if self.type == "int" else None)
        if step is None or self.log:
            raise SweepError(
                f"GridSampler needs a finite grid: give {self.name!r} as categorical or with "
                f"a step (and no log)"
            )
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        return [self.low + i * step for i in range(count)]


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass(frozen=True)
class Spec:
    """A sampler or pruner: an Optuna class name and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Heartbeat:
    """Failure detection with an RDB storage: a worker that sends no heartbeat for
    ``grace_period`` seconds has its running trial marked failed (by whichever worker
    notices next), and re-queued up to ``max_retry`` times."""

    interval: int = 10
    grace_period: int = 30
    max_retry: int = 0


@dataclass(frozen=True)
class Sweep:
    """A parsed, structurally valid sweep file (see :func:`check_sweep` for the dry run)."""

    path: Path
    name: str
    base_path: Path
    base: dict[str, Any]
    overrides: dict[str, Any]
    params: tuple[Param, ...]
    objectives: tuple[Objective, ...]
    sampler: Spec
    pruner: Spec | None
    n_trials: int
    seed: int
    storage: str | None
    heartbeat: Heartbeat
    wandb: dict[str, Any]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _encode(choice: Any) -> Any:
    return json.dumps(choice) if isinstance(choice, list | dict) else choice


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{what} must be a mapping, got {value!r}")
    return dict(value)


def _spec(value: Any, what: str, allowed: Sequence[str]) -> Spec:
    if isinstance(value, str):
        value = {"name": value}
    value = _mapping(value, what)
    name = value.pop("name", None)
    if name not in allowed:
        raise SweepError(f"unknown {what} {name!r}; choose one of {', '.join(allowed)}")
    return Spec(name, value)


def _param(name: Any, spec: Any) -> Param:
    if not isinstance(name, str) or not all(name.split(".")):
        raise SweepError(f"parameter name {name!r} must be a dotted config key")
    spec = _mapping(spec, f"parameter {name!r}")
    kind = spec.pop("type", None)
    if kind not in PARAM_TYPES:
        raise SweepError(
            f"parameter {name!r}: unknown type {kind!r}; choose one of {', '.join(PARAM_TYPES)}"
        )
    extra = set(spec) - set(PARAM_TYPES[kind])
    if extra:
        raise SweepError(
            f"parameter {name!r}: unknown keys {sorted(extra)} for type {kind!r}; "
            f"allowed: {', '.join(PARAM_TYPES[kind])}"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SweepError(f"parameter {name!r}: choices must be a non-empty list")
        stored = [_encode(c) for c in choices]
        if len(set(map(repr, stored))) != len(stored):
            raise SweepError(f"parameter {name!r}: choices repeat: {choices!r}")
        return Param(name, kind, choices=tuple(choices))
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log")
    check = _is_int if kind == "int" else _is_num
    for key, value in (("low", low), ("high", high)):
        if not check(value):
            raise SweepError(f"parameter {name!r}: {key}={value!r} must be a {kind}")
    if low >= high:
        raise SweepError(f"parameter {name!r}: empty range low={low!r} >= high={high!r}")
    if log is not None and not isinstance(log, bool):
        raise SweepError(f"parameter {name!r}: log={log!r} must be true or false")
    if log and low <= 0:
        raise SweepError(f"parameter {name!r}: a log range needs low > 0, got {low!r}")
    if step is not None and (not check(step) or step <= 0):
        raise SweepError(f"parameter {name!r}: step={step!r} must be a positive {kind}")
    if step is not None and log:
        raise SweepError(f"parameter {name!r}: step and log do not go together (Optuna)")
    return Param(name, kind, low, high, step, bool(log))


def load_sweep(path: str | Path, sets: dict[str, Any] | None = None) -> Sweep:
    """Parse a sweep file; ``sets`` are fixed overrides from the command line (``--set``),
    applied after the file's own ``overrides``. Raises :class:`SweepError`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SweepError(f"cannot read sweep file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise SweepError(f"sweep file {path} is not valid YAML: {err}") from err
    raw = _mapping(raw, f"sweep file {path}")
    unknown = set(raw) - set(SWEEP_KEYS)
    if unknown:
        raise SweepError(
            f"sweep file {path}: unknown keys {sorted(unknown)}; allowed: {', '.join(SWEEP_KEYS)}"
        )
    if not isinstance(raw.get("base"), str):
        raise SweepError(f"sweep file {path}: 'base' must name a training config YAML")
    base_path = (path.parent / raw["base"]).resolve()
    try:
        base = _mapping(yaml.safe_load(base_path.read_text()), f"base config {base_path}")
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"sweep file {path}: cannot read base config: {err}") from err
    params = _mapping(raw.get("params"), "params")
    if not params:
        raise SweepError(f"sweep file {path}: 'params' (the search space) is empty")
    objectives = raw.get("objectives", [{"metric": "val_acc", "direction": "maximize"}])
    if not isinstance(objectives, list) or not objectives:
        raise SweepError("objectives must be a non-empty list of {metric, direction}")
    parsed: list[Objective] = []
    for entry in objectives:
        entry = _mapping(entry, "an objective")
        metric, direction = entry.pop("metric", None), entry.pop("direction", None)
        if entry:
            raise SweepError(f"objective: unknown keys {sorted(entry)}; allowed: metric, direction")
        if metric not in METRICS:
            raise SweepError(
                f"unknown objective metric {metric!r}; choose one of {', '.join(METRICS)}"
            )
        if direction not in DIRECTIONS:
            raise SweepError(
                f"objective {metric!r}: unknown direction {direction!r}; choose "
                f"one of {', '.join(DIRECTIONS)}"
            )
        parsed.append(Objective(metric, direction))
    if len({o.metric for o in parsed}) != len(parsed):
        raise SweepError("objectives: each metric at most once")
    pruner = _spec(raw["pruner"], "pruner", PRUNERS) if raw.get("pruner") else None
    if pruner is not None and pruner.name != "NopPruner":
        if len(parsed) > 1:
            raise SweepError(
                "a pruner needs a single objective (Optuna cannot prune "
                "multi-objective trials); remove 'pruner'"
            )
        if METRICS[parsed[0].metric].per_epoch is None:
            raise SweepError(
                f"objective {parsed[0].metric!r} has no per-epoch value to prune "
                f"on; remove 'pruner'"
            )
    heartbeat = _mapping(raw.get("heartbeat"), "heartbeat")
    unknown = set(heartbeat) - {"interval", "grace_period", "max_retry"}
    if unknown:
        raise SweepError(
            f"heartbeat: unknown keys {sorted(unknown)}; allowed: interval, grace_period, max_retry"
        )
    wandb_ = {"project": "lit-surgery-tune", "offline": True, **_mapping(raw.get("wandb"), "wandb")}
    if set(wandb_) - {"project", "offline", "entity"}:
        raise SweepError("wandb: allowed keys are project, offline, entity")
    n_trials, seed = raw.get("n_trials", 20), raw.get("seed", 0)
    if not _is_int(n_trials) or n_trials < 1:
        raise SweepError(f"n_trials={n_trials!r} must be an integer >= 1")
    if not _is_int(seed):
        raise SweepError(f"seed={seed!r} must be an integer")
    storage = raw.get("storage")
    if storage is not None and not isinstance(storage, str):
        raise SweepError(f"storage={storage!r} must be a storage URL")
    sweep = Sweep(
        path=path,
        name=str(raw.get("name") or path.stem),
        base_path=base_path,
        base=base,
        overrides={**_mapping(raw.get("overrides"), "overrides"), **(sets or {})},
        params=tuple(_param(k, v) for k, v in params.items()),
        objectives=tuple(parsed),
        sampler=_spec(raw.get("sampler", "TPESampler"), "sampler", SAMPLERS),
        pruner=pruner,
        n_trials=n_trials,
        seed=seed,
        storage=storage,
        heartbeat=check_heartbeat(Heartbeat(**heartbeat)),
        wandb=wandb_,
    )
    for key in sweep.overrides:
        set_key(copy.deepcopy(base), key, None)  # a key into a non-mapping fails here
    return sweep


def check_heartbeat(beat: Heartbeat) -> Heartbeat:
    for name in ("interval", "grace_period"):
        value = getattr(beat, name)
        if not _is_int(value) or value < 1:
            raise SweepError(f"heartbeat {name}={value!r} must be an integer >= 1 (seconds)")
    if not _is_int(beat.max_retry) or beat.max_retry < 0:
        raise SweepError(f"heartbeat max_retry={beat.max_retry!r} must be an integer >= 0")
    return beat



# Training configs of trials


def set_key(config: dict[str, Any], key: str, value: Any) -> None:
    """``config[a][b][c] = value`` for ``key`` ``a.b.c``, creating mappings on the way."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise SweepError(f"cannot set {key!r}: {where!r} is {child!r}, not a mapping")
        node = child
    node[parts[-1]] = value
