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

The figures are built by :func:`plot_widths` and :func:`plot_spectra`, which need no trainer,
so a run can be re-plotted from ``history.json`` afterwards. Figures use matplotlib's
object API with the Agg canvas, never ``pyplot``: no global backend state, no display
needed, safe next to whatever the caller does with pyplot.

Files are written on global rank zero only, each to a temporary name first and then
renamed, so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lit_surgery.criteria import singular_values
from lit_surgery.network import SurgeryNet
from lit_surgery.topology import Topology

CANDIDATE_COLUMNS = (
    "generation",
    "parent",
    "type",
    "layer",
    "amount",
    "weight",
    "param_ratio",
    "screen_metric",
    "score",
    "kept",
    "attempt",
    "trained",
    "metric",
    "branch",
    "activation",
)
"""Columns of the candidate table; ``type`` is the operator code (``CandidateRecord.op``)."""

GENEALOGY_COLUMNS = ("id", "parent", "generation", "change", "topology", "num_params", "metric")


# ---------------------------------------------------------------------------- plain data


def _finite(value: Any) -> Any:
    """Non-finite floats as ``None``, recursively: strict JSON has no NaN or infinity (a
    discarded candidate's score is ``-inf``, its metric NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def candidate_rows(records: Iterable[Any]) -> list[list[Any]]:
    """One row per ``CandidateRecord`` (or its dict), in :data:`CANDIDATE_COLUMNS` order."""
    rows = []
    for record in records:
        data = dict(record) if isinstance(record, Mapping) else asdict(record)
        data["type"] = data.pop("op")
        rows.append([data.get(column) for column in CANDIDATE_COLUMNS])
    return rows


def genealogy_rows(genealogy: Mapping[Any, Mapping[str, Any]]) -> list[list[Any]]:
    """One row per branch of ``History.genealogy``, topology in its short form."""
    rows = []
    for branch_id, node in sorted(genealogy.items(), key=lambda item: int(item[0])):
        topology = node.get("topology")
        if isinstance(topology, Mapping):
            topology = Topology.from_dict(dict(topology)).describe()
        rows.append(
            [
                int(branch_id),
                node.get("parent"),
                node.get("generation"),
                node.get("change"),
                topology,
                node.get("num_params"),
                node.get("metric"),
            ]
        )
    return rows


# ---------------------------------------------------------------------------- atomic files


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place (an
    atomic replace on POSIX and Windows), so ``path`` is always either old or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Strict JSON (non-finite floats as ``null``), written atomically."""
    path = Path(path)
    text = json.dumps(_finite(data), indent=2, allow_nan=False, default=str)
    _write_atomic(path, (text + "\n").encode())
    return path


def write_csv(
    path: str | os.PathLike[str], columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> Path:
    """A CSV with a header row, written atomically (the whole table each time: it is small,
    and a rewrite stays correct after a resume, where appending would duplicate rows)."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    _write_atomic(path, buffer.getvalue().encode())
    return path


def _save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    FigureCanvasAgg(figure)  # attach an Agg canvas: rendering needs no pyplot, no display
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    _write_atomic(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------------------- figures


def plot_widths(
    epoch_log: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
) -> Path:
    """The leading branch's topology over training, as a PNG at ``path``.

    ``epoch_log`` and ``events`` are :class:`~lit_surgery.module.SurgeryModule`'s lists
    (or ``history.json``'s). The x axis counts epochs trained, so an entry of epoch ``e``
    (0-based) sits at ``e + 1`` and covers the epoch before it (step drawing), and a surgery
    event at ``epoch`` (epochs done) is a vertical line between the two topologies it
    separates, labelled with the population's new leader (after ``end``: the winner, which
    the epoch log, showing the last cycle's leader, may not contain). Layer ``i`` has a gap
    where the network had no layer ``i``. The parameter count is on the right axis, since it
    is on another scale than widths.
    """
    figure = Figure(figsize=(8, 4.5))
    ax = figure.add_subplot()
    x = [int(entry["epoch"]) + 1 for entry in epoch_log]
    depth = max((len(entry["widths"]) for entry in epoch_log), default=0)
    for i in range(depth):
        y = [e["widths"][i] if i < len(e["widths"]) else math.nan for e in epoch_log]
        ax.plot(x, y, drawstyle="steps-pre", marker=".", label=f"width of layer {i}")
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("units")
    ax.set_xlim(0, max([*x, *(int(e["epoch"]) for e in events), 1]) + 0.5)
    ax.set_ylim(bottom=0)
    params = ax.twinx()
    params.plot(
        x,
        [entry["num_params"] for entry in epoch_log],
        drawstyle="steps-pre",
        color="black",
        linestyle="--",
        label="parameters",
    )
    params.set_ylabel("parameters")
    params.set_ylim(bottom=0)
    colours = {"generation": "tab:green", "retry": "tab:orange", "end": "tab:red"}
    for event in events:
        kind, epoch = event["kind"], int(event["epoch"])
        ax.axvline(epoch, color=colours.get(kind, "grey"), linestyle=":", linewidth=1)
        leader = (event.get("population") or [{}])[0].get("topology", "")
        ax.annotate(
            f"{kind} {event['generation']} {leader}".strip(),
            (epoch, 1),
            xycoords=("data", "axes fraction"),
            xytext=(2, -4),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=8,
            color=colours.get(kind, "grey"),
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"},
        )
    lines, labels = ax.get_legend_handles_labels()
    more_lines, more_labels = params.get_legend_handles_labels()
    ax.legend(lines + more_lines, labels + more_labels, loc="lower right", fontsize=8)
    if not epoch_log:
        ax.text(0.5, 0.5, "no epochs logged", ha="center", transform=ax.transAxes)
    ax.set_title("leading branch: hidden widths and parameters")
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_spectra(
    net: SurgeryNet,
    path: str | os.PathLike[str],
    source: str = "incoming",
    threshold: float | None = None,
) -> Path:
    """Singular value spectra of every hidden layer of ``net``, as a PNG at ``path``.

    These are the numbers the surgery criterion reads (``criteria.singular_values`` with the
    run's ``sv_source``): values below ``threshold`` (the absolute threshold, drawn as a
    line) count as removable units, and the legend says how many per layer. The y axis is
    logarithmic, since spectra span decades; exact zeros (a layer wider than its matrix's
    rank) cannot sit on it and are drawn as hollow markers at the bottom edge.
    """
    figure = Figure(figsize=(7, 4.5))
    ax = figure.add_subplot()
    spectra = [
        singular_values(net, i, source).detach().cpu().double().tolist()
        for i in range(net.topology.depth)
    ]
    positive = [v for s in spectra for v in s if v > 0]
    floor = min([*positive, *([threshold] if threshold else [])], default=1.0) / 10
    zero_label = "exactly 0 (drawn at the bottom)"
    for i, s in enumerate(spectra):
        rank = range(1, len(s) + 1)
        below = "" if threshold is None else f", {sum(v < threshold for v in s)} below"
        (line,) = ax.plot(
            rank,
            [v if v > 0 else math.nan for v in s],
            marker="o",
            markersize=3,
            label=f"layer {i} ({len(s)} units{below})",
        )
        zeros = [k for k, v in zip(rank, s, strict=True) if v <= 0]
        if zeros:
            ax.plot(
                zeros,
                [floor] * len(zeros),
                "o",
                mfc="none",
                color=line.get_color(),
                label=zero_label,
            )
            zero_label = "_nolegend_"
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)
    ax.set_xlabel("index (descending)")
    ax.set_ylabel(f"singular value ({source} weights)")
    ax.set_title(f"singular value spectra of {net.topology.describe()}")
    if spectra or threshold is not None:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no hidden layers", ha="center", transform=ax.transAxes)
    figure.tight_layout()
    return _save_figure(figure, path)


# ---------------------------------------------------------------------------- callback


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
                data=_finite(candidates),
                step=step,
            )
            logger.log_table(
                key="surgery/genealogy",
                columns=list(GENEALOGY_COLUMNS),
                data=_finite(genealogy),
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
