"""A trial's training config from a sweep and its sampled values, and the dry run that
proves a sweep's parameters before any trial (:func:`check_sweep`); the sweep's sampler and
pruner as Optuna objects.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.callbacks import Callback

from lit_surgery.lightning.cli import SurgeryCLI
from lit_surgery.tune.sweep import Sweep, SweepError, set_key


def trial_config(sweep: Sweep, values: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """The training config of one trial: base, then its seed, then the sweep's fixed
    overrides (so they can pin the seeds), then the sampled ``values``. This is exactly what
    an export writes.

    The seed goes to ``seed_everything`` and ``model.seed``, which train.py links to
    ``data.seed`` (the split): a setting is judged across splits, not tuned to one
    validation set."""
    config = copy.deepcopy(sweep.base)
    if seed is not None:
        config["seed_everything"] = seed
        set_key(config, "model.seed", seed)
    for key, value in [*sweep.overrides.items(), *values.items()]:
        set_key(config, key, copy.deepcopy(value))
    return config


def runtime_config(config: dict[str, Any], out_dir: Path | None) -> dict[str, Any]:
    """Settings of the run itself that an export leaves out: no progress bar or model
    summary (one line per trial instead), the logger set per trial, the trial's folder."""
    config = copy.deepcopy(config)
    trainer = config.setdefault("trainer", {}) or {}
    config["trainer"] = trainer
    trainer.update(logger=False, enable_progress_bar=False, enable_model_summary=False)
    if out_dir is not None:
        trainer["default_root_dir"] = str(out_dir)
    return config


def instantiate(config: dict[str, Any], callbacks: Sequence[Callback] = ()) -> SurgeryCLI:
    """Parse ``config`` with train.py's own parser and instantiate model, data and trainer
    (no training). Errors raise instead of exiting."""
    with warnings.catch_warnings():
        # ``args`` here is the whole config, not a second command line beside sys.argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return SurgeryCLI(
            args=config,
            run=False,
            save_config_callback=None,
            trainer_defaults={"callbacks": list(callbacks)},
            parser_kwargs={"exit_on_error": False},
        )


def _unknown_key(err: Exception) -> bool:
    text = str(err)
    return isinstance(err, argparse.ArgumentError) and any(
        phrase in text for phrase in ("does not accept", "not accepted", "No action for")
    )


def check_sweep(sweep: Sweep) -> None:
    """Everything that can be checked before a trial: the sampler and pruner build, and the
    training config parses and instantiates with every parameter at the low and at the high
    end of its range. Raises :class:`SweepError` naming the culprit."""
    make_sampler(sweep, seed=sweep.seed)
    make_pruner(sweep)

    def fails(values: dict[str, Any]) -> Exception | None:
        try:
            instantiate(runtime_config(trial_config(sweep, values, sweep.seed), None))
        except SweepError:
            raise
        except Exception as err:
            return err
        return None

    lows = {p.name: p.ends()[0] for p in sweep.params}
    highs = {p.name: p.ends()[1] for p in sweep.params}
    combos = [lows, highs] + [
        {**lows, p.name: value} for p in sweep.params for value in p.checked_values()[1:-1]
    ]
    if all(fails(values) is None for values in combos):
        return
    err = fails({})
    if err is not None:
        raise SweepError(
            f"the training config ({sweep.base_path} with the sweep's overrides) is invalid: {err}"
        )
    for param in sweep.params:
        for value in param.checked_values():
            err = fails({param.name: value})
            if err is None:
                continue
            if _unknown_key(err):
                raise SweepError(
                    f"unknown parameter {param.name!r}: the training config has "
                    f"no such setting ({err})"
                )
            raise SweepError(f"parameter {param.name!r}: {value!r} is not a valid value: {err}")
    raise SweepError(
        "the parameters are valid one by one but not together at the ends of their ranges"
    )


def make_sampler(sweep: Sweep, seed: int | None) -> optuna.samplers.BaseSampler:
    cls = getattr(optuna.samplers, sweep.sampler.name)
    kwargs = dict(sweep.sampler.kwargs)
    if sweep.sampler.name == "GridSampler":
        kwargs.setdefault("search_space", {p.name: p.grid() for p in sweep.params})
    if seed is not None and sweep.sampler.name != "BruteForceSampler":
        kwargs.setdefault("seed", seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**kwargs)
    except (TypeError, ValueError, ImportError, ModuleNotFoundError) as err:
        spec = sweep.sampler
        raise SweepError(f"sampler {spec.name} with {spec.kwargs}: {err}") from err


def make_pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    if sweep.pruner is None:
        return optuna.pruners.NopPruner()
    try:
        return getattr(optuna.pruners, sweep.pruner.name)(**sweep.pruner.kwargs)
    except (TypeError, ValueError) as err:
        raise SweepError(f"pruner {sweep.pruner.name} with {sweep.pruner.kwargs}: {err}") from err
