"""The runs behind ``docs/RESULTS.md``: every method on the same data, epochs and protocol.

A *cell* is one run: a dataset, a start topology, a schedule, a method, a seed and a
learning rate. Every method trains with the plain loop of :mod:`lit_surgery.plain` (plain
SGD on device tensors, one thread), so wall times compare like with like. The validation
split is held out from the training images; the test split is evaluated once, on the
network a run ends with.

Methods:

- ``plain``: the start topology trained for the schedule's epochs;
- ``paper``, ``default``, ``random_walk``: surgery with :meth:`SurgerySettings.paper`, the
  defaults, and the random-walk ablation;
- ``shrink``: surgery with :meth:`SurgerySettings.shrink`, the start's size as
  ``max_params`` (oversized starts only, :attr:`Grid.shrink_starts`);
- ``grow``: surgery with :meth:`SurgerySettings.grow` (small starts only,
  :attr:`Grid.grow_starts`);
- ``scratch``: the topology that ``default`` surgery ended with (same seed), trained from a
  fresh initialisation for the same epochs: does the path matter, or only the topology?
- ``grow_scratch``: the same for the topology ``grow`` ended with;
- ``search``: Optuna (TPE, median pruning per epoch) over plain MLPs (1 or 2 layers, widths
  16..256, learning rate from the grid) until it has trained as many epoch-equivalents as
  ``default`` surgery spent on that seed (branches and screening batches counted);
- ``front``: plain MLPs of fixed widths (:data:`FRONT`), the accuracy-versus-size front a
  user would simply try.

Learning rates: every method except ``search`` (which searches it) runs each rate of
:attr:`Grid.lrs` on seed 0 and keeps the one with the best final validation accuracy for its
other seeds: the same procedure for all.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from lit_surgery.core.network import build
from lit_surgery.core.policy import Surgeon
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.state import Branch
from lit_surgery.core.topology import Topology
from lit_surgery.core.training import evaluate
from lit_surgery.data import TensorSplits, load_arrays, make_splits
from lit_surgery.plain import PlainTrainer

SURGERY = ("paper", "default", "random_walk", "shrink", "grow")
SCRATCH = {"scratch": "default", "grow_scratch": "grow"}
"""Each from-scratch method and the surgery whose final topologies it trains."""
METHODS = ("plain", *SURGERY, *SCRATCH, "search", "front")
FRONT = ((16,), (64,), (256,), (16, 16), (64, 64), (256, 256))


@dataclass(frozen=True)
class Schedule:
    name: str
    initial_epochs: int
    epoch_step: int
    max_epochs: int


SCHEDULES = (Schedule("quick", 5, 5, 30), Schedule("paper", 10, 10, 100))


@dataclass(frozen=True)
class Grid:
    """What ``make reproduce`` runs (``quick()``: the reduced grid of ``QUICK=1``)."""

    datasets: tuple[str, ...] = ("fashion_mnist", "digits")
    starts: tuple[tuple[int, ...], ...] = ((4, 4, 4), (10, 10, 10), (256, 256))
    schedules: tuple[Schedule, ...] = SCHEDULES
    methods: tuple[str, ...] = METHODS
    seeds: int = 3
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1)
    front: tuple[tuple[int, ...], ...] = FRONT
    shrink_starts: tuple[tuple[int, ...], ...] = ((256, 256),)
    grow_starts: tuple[tuple[int, ...], ...] = ((4, 4, 4), (10, 10, 10))
    batch_size: int = 32
    device: str = "cpu"

    @classmethod
    def quick(cls) -> Grid:
        return cls(datasets=("digits",), schedules=SCHEDULES[:1], lrs=(0.03, 0.1))

    def schedule(self, name: str) -> Schedule:
        return next(s for s in self.schedules if s.name == name)

    def settings(self, method: str, schedule: str, start_params: int) -> SurgerySettings:
        s = asdict(self.schedule(schedule))
        del s["name"]
        if method == "paper":
            return SurgerySettings.paper(**s)
        if method == "shrink":
            return SurgerySettings.shrink(**s, max_params=start_params)
        if method == "grow":  # its own generation schedule, the grid's epochs
            return SurgerySettings.grow(max_epochs=s["max_epochs"])
        return SurgerySettings(**s, random_walk=method == "random_walk")

    def settings_for(self, cell: Cell) -> SurgerySettings:
        """``cell``'s surgery settings (``shrink``'s budget is its start's size on its data)."""
        data = load_data(cell.dataset, self.device) if cell.method == "shrink" else None
        size = Topology.mlp(data.input_size, cell.start, data.num_classes).num_params if data else 0
        return self.settings(cell.method, cell.schedule, size)

    def config(self, cell: Cell) -> dict[str, Any]:
        """What decides ``cell``'s run beyond its key, as JSON reads it back: a result that
        recorded another config was made by other settings and is stale."""
        config: dict[str, Any] = {"batch_size": self.batch_size}
        if cell.method in SURGERY:
            config["settings"] = asdict(self.settings_for(cell))
        if cell.method == "search":  # the budget follows the surgery run of its seed
            config.update(lrs=list(self.lrs), budget=cell.budget)
        return json.loads(json.dumps(config))


@dataclass(frozen=True)
class Cell:
    """One run. ``hidden``: the widths trained (``scratch``: the topology is ``topology``);
    ``budget``: epoch-equivalents a ``search`` may spend."""

    dataset: str
    start: tuple[int, ...]
    schedule: str
    method: str
    seed: int
    lr: float | None
    hidden: tuple[int, ...] = ()
    topology: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    budget: float | None = None

    @property
    def key(self) -> str:
        start = "x".join(map(str, self.start))
        hidden = "x".join(map(str, self.hidden)) or "-"
        return (
            f"{self.dataset}_{self.schedule}_{start}_{self.method}_{hidden}"
            f"_s{self.seed}_lr{self.lr}"
        )


# --------------------------------------------------------------------------- running


@cache
def load_data(dataset: str, device: str = "cpu") -> TensorSplits:
    """Normalised splits on ``device``, validation held out (seed 0, so every run sees the
    same split)."""
    arrays = load_arrays(dataset)
    return make_splits(arrays, val_fraction=0.1, use_test_as_val=False, seed=0).to(device)


class Recorder:
    """Trains epoch by epoch (branches interleaved) and records the validation curve: for
    each epoch of the run, its wall time and the best branch's accuracy and widths."""

    def __init__(self, trainer: PlainTrainer) -> None:
        self.trainer = trainer
        self.start = time.perf_counter()
        # a one-thread run's CPU time is what it costs even while other jobs share its core
        self.cpu_start = time.process_time()
        self.curve: list[dict[str, Any]] = []
        self.epochs_trained = 0

    def train(self, branches: list[Branch], epochs: int) -> list[float]:
        metrics = [0.0] * len(branches)
        for _ in range(epochs):
            for i, metric in enumerate(self.trainer.train_epoch(branches)):
                metrics[i] = math.nan if math.isnan(metrics[i]) else metric
            self.epochs_trained += len(branches)
            best = max(range(len(branches)), key=lambda i: finite(metrics[i]))
            self.curve.append(
                {
                    "epoch": len(self.curve) + 1,
                    "time": time.perf_counter() - self.start,
                    "val": metrics[best],
                    "widths": branches[best].net.topology.widths,
                    "num_params": branches[best].net.topology.num_params,
                }
            )
        return metrics


def finite(x: float | None) -> float:
    """``x``, or minus infinity for a missing or NaN (diverged) metric: for ``max``."""
    return -math.inf if x is None or math.isnan(x) else x


def _result(
    cell: Cell,
    grid: Grid,
    recorder: Recorder,
    net: torch.nn.Module,
    data: TensorSplits,
    val: float,
    **extra: Any,
) -> dict[str, Any]:
    topo = net.topology
    device = data.x_train.device
    return {
        "cell": {**asdict(cell), "key": cell.key},
        "config": grid.config(cell),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "val": val,
        "test": evaluate(net, data.x_test, data.y_test),  # the one look at the test split
        "num_params": topo.num_params,
        "widths": topo.widths,
        "topology": topo.to_dict(),
        "wall": time.perf_counter() - recorder.start,
        "cpu": time.process_time() - recorder.cpu_start,
        "curve": recorder.curve,
        "epoch_equivalents": recorder.epochs_trained,
        **extra,
    }


def _plain(cell: Cell, topo: Topology, data: TensorSplits, grid: Grid) -> dict[str, Any]:
    torch.manual_seed(cell.seed)
    net = build(topo)
    trainer = PlainTrainer(data, batch_size=grid.batch_size, lr=cell.lr, seed=cell.seed)
    recorder = Recorder(trainer)
    (val,) = recorder.train([Branch(0, net)], grid.schedule(cell.schedule).max_epochs)
    return _result(cell, grid, recorder, net, data, val)


def _surgery(cell: Cell, data: TensorSplits, grid: Grid) -> dict[str, Any]:
    torch.manual_seed(cell.seed)
    net = build(Topology.mlp(data.input_size, cell.start, data.num_classes))
    trainer = PlainTrainer(data, batch_size=grid.batch_size, lr=cell.lr, seed=cell.seed)
    recorder = Recorder(trainer)
    settings = grid.settings_for(cell)
    surgeon = Surgeon(settings, None, trainer.screen, seed=cell.seed)
    events = []
    plan = surgeon.start(net)
    while plan.kind != "end":
        metrics = recorder.train(plan.branches, plan.epochs)
        plan = surgeon.step(metrics)
        events.append(
            {
                "epoch": len(recorder.curve),
                "kind": plan.kind,
                "generation": plan.generation,
                "branches": [
                    {"change": b.change.describe(), "widths": b.net.topology.widths}
                    for b in plan.branches
                ],
            }
        )
    winner = plan.branches[0]
    screened = surgeon.history.batches_screened * grid.batch_size / len(data.y_train)
    result = _result(cell, grid, recorder, winner.net, data, winner.metric, events=events)
    result["epoch_equivalents"] = recorder.epochs_trained + screened
    return result


def _search(cell: Cell, data: TensorSplits, grid: Grid) -> dict[str, Any]:
    """Optuna over plain MLPs until ``cell.budget`` epochs are spent; the best by
    validation accuracy is the result."""
    import optuna

    epochs = grid.schedule(cell.schedule).max_epochs
    recorder = Recorder(None)  # type: ignore[arg-type]
    best: dict[str, Any] = {"val": -math.inf}

    def objective(trial: optuna.Trial) -> float:
        depth = trial.suggest_int("depth", 1, 2)
        hidden = [trial.suggest_int(f"width_{i}", 16, 256, log=True) for i in range(depth)]
        lr = trial.suggest_categorical("lr", list(grid.lrs))
        torch.manual_seed(cell.seed * 1000 + trial.number)
        net = build(Topology.mlp(data.input_size, hidden, data.num_classes))
        recorder.trainer = PlainTrainer(
            data, batch_size=grid.batch_size, lr=lr, seed=cell.seed * 1000 + trial.number
        )
        val = -math.inf
        for epoch in range(epochs):
            if recorder.epochs_trained >= cell.budget:
                break
            (val,) = recorder.train([Branch(0, net)], 1)
            if val > best["val"]:
                best.update(val=val, net=copy.deepcopy(net), params=trial.params)
            trial.report(val, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return val

    sampler = optuna.samplers.TPESampler(seed=cell.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=epochs // 5)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while recorder.epochs_trained < cell.budget:
        study.optimize(objective, n_trials=1)
    return _result(
        cell,
        grid,
        recorder,
        best["net"],
        data,
        best["val"],
        chosen=best["params"],
        trials=len(study.trials),
    )


def run_cell(cell: Cell, grid: Grid) -> dict[str, Any]:
    """Run one cell on one thread and return its result (plain data)."""
    torch.set_num_threads(1)
    data = load_data(cell.dataset, grid.device)
    if cell.method in SURGERY:
        return _surgery(cell, data, grid)
    if cell.method == "search":
        return _search(cell, data, grid)
    if cell.method in SCRATCH:
        return _plain(cell, Topology.from_dict(cell.topology), data, grid)
    return _plain(cell, Topology.mlp(data.input_size, cell.hidden, data.num_classes), data, grid)


# --------------------------------------------------------------------------- the grid


class Results:
    """Cell results as JSON files in ``folder``, one per cell: a rerun skips finished cells.

    A result made with other settings than ``config`` gives for its cell now (a preset or a
    default changed since) is *stale*: ``get`` does not return it, so the cell runs again,
    and ``put`` moves the old file to ``folder/stale/``. Results from before runs recorded
    their config are *unrecorded*: used, counted on the page, and re-run with ``refresh``."""

    def __init__(
        self,
        folder: Path,
        config: Callable[[Cell], dict[str, Any]] | None = None,
        refresh: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.refresh = refresh
        # planning reads each result, and asks for each cell's config, many times
        self._read: dict[str, dict[str, Any]] = {}
        self._config: dict[Cell, dict[str, Any]] = {}

    def path(self, cell: Cell) -> Path:
        return self.folder / f"{cell.key}.json"

    def _stored(self, cell: Cell) -> dict[str, Any] | None:
        """The file's result, current or not."""
        if cell.key not in self._read:
            path = self.path(cell)
            if not path.exists():
                return None
            self._read[cell.key] = json.loads(path.read_text())
        return self._read[cell.key]

    def state(self, cell: Cell) -> str:
        """``missing``, ``current``, ``stale`` (other settings) or ``unrecorded``."""
        result = self._stored(cell)
        if result is None:
            return "missing"
        if self.config is None:
            return "current"
        if "config" not in result:
            return "unrecorded"
        if cell not in self._config:  # by cell, not key: a search's budget is not in its key
            self._config[cell] = self.config(cell)
        return "current" if result["config"] == self._config[cell] else "stale"

    def get(self, cell: Cell) -> dict[str, Any] | None:
        """The result to use for ``cell``: None if it must (re)run."""
        state = self.state(cell)
        if state == "current" or (state == "unrecorded" and not self.refresh):
            return self._stored(cell)
        return None

    def put(self, cell: Cell, result: dict[str, Any]) -> None:
        path = self.path(cell)
        if path.exists():  # a stale or refreshed result: kept aside, not overwritten
            old = self.folder / "stale" / f"{cell.key}.{int(path.stat().st_mtime)}.json"
            old.parent.mkdir(exist_ok=True)
            path.replace(old)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)  # atomic: an interrupted run leaves no half-written result
        self._read[cell.key] = result


def chosen_lr(results: Results, cells: list[Cell]) -> float | None:
    """The rate whose seed-0 run ended with the best validation accuracy; None until all
    of ``cells`` (one per rate) are done."""
    found = [results.get(c) for c in cells]
    if any(r is None for r in found):
        return None
    return max(zip(found, cells, strict=True), key=lambda rc: finite(rc[0]["val"]))[1].lr


def _with_lrs(grid: Grid, results: Results, base: Cell) -> Iterator[Cell]:
    """``base``'s seed-0 cells at every rate, then its other seeds at the chosen rate."""
    tuning = [replace(base, seed=0, lr=lr) for lr in grid.lrs]
    yield from tuning
    lr = chosen_lr(results, tuning)
    if lr is not None:
        yield from (replace(base, seed=s, lr=lr) for s in range(1, grid.seeds))


def final_cells(grid: Grid, results: Results, base: Cell) -> list[Cell]:
    """The cells reported for ``base`` (one per seed, at the chosen rate) once known."""
    tuning = [replace(base, seed=0, lr=lr) for lr in grid.lrs]
    lr = chosen_lr(results, tuning)
    if lr is None:
        return []
    return [replace(base, seed=s, lr=lr) for s in range(grid.seeds)]


def planned(grid: Grid, results: Results) -> list[Cell]:
    """The cells of ``grid`` whose inputs are known (``scratch`` and ``search`` need
    ``default``'s result of their seed, ``grow_scratch`` ``grow``'s; later seeds, the chosen
    rate), done or not."""
    out: list[Cell] = []
    for dataset in grid.datasets:
        for schedule in (s.name for s in grid.schedules):
            for start in grid.starts:
                base = Cell(dataset, start, schedule, "plain", 0, None, hidden=start)
                for method in (m for m in grid.methods if m in SURGERY or m == "plain"):
                    only = {"shrink": grid.shrink_starts, "grow": grid.grow_starts}
                    if start in only.get(method, (start,)):
                        out += _with_lrs(grid, results, replace(base, method=method))
                out += _dependent(grid, results, base)
            if "front" in grid.methods:
                for hidden in grid.front:
                    base = Cell(dataset, (), schedule, "front", 0, None, hidden=hidden)
                    out += _with_lrs(grid, results, base)
    return list(dict.fromkeys(out))


def runnable(grid: Grid, results: Results) -> list[Cell]:
    """The planned cells that have no result yet."""
    return [c for c in planned(grid, results) if results.get(c) is None]


def _dependent(grid: Grid, results: Results, base: Cell) -> Iterator[Cell]:
    for method, surgery in SCRATCH.items():
        if method in grid.methods:
            yield from _scratch(grid, results, replace(base, method=method), surgery)
    defaults = final_cells(grid, results, replace(base, method="default"))
    done = {c.seed: r for c in defaults if (r := results.get(c)) is not None}
    if "search" in grid.methods:
        for seed, r in done.items():
            budget = round(r["epoch_equivalents"], 1)
            yield replace(base, method="search", seed=seed, lr=None, budget=budget)


def _scratch(grid: Grid, results: Results, base: Cell, surgery: str) -> Iterator[Cell]:
    """``base`` (a from-scratch method) on the topologies ``surgery`` ended with, once its
    seed 0 is done: each seed trains the topology its own surgery found."""
    cells = final_cells(grid, results, replace(base, method=surgery))
    done = {c.seed: r for c in cells if (r := results.get(c)) is not None}
    if 0 not in done:
        return
    first = replace(base, hidden=tuple(done[0]["widths"]), topology=done[0]["topology"])
    for cell in _with_lrs(grid, results, first):
        if cell.seed in done:
            r = done[cell.seed]
            yield replace(cell, hidden=tuple(r["widths"]), topology=r["topology"])
