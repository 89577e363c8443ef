"""Figures of a run: widths and parameter count over epochs with the surgery events, and the
singular value spectra. They need no trainer, so a run can be re-plotted from
``history.json``. matplotlib's object API with the Agg canvas, never ``pyplot``: no global
backend state, no display, safe next to whatever the caller does with pyplot.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lit_surgery.core.criteria import singular_values
from lit_surgery.core.network import SurgeryNet
from lit_surgery.report.tables import write_atomic


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """``figure`` as a PNG at ``path``, written atomically."""
    path = Path(path)
    FigureCanvasAgg(figure)  # attach an Agg canvas: rendering needs no pyplot, no display
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
    return path





def plot_widths(
    epoch_log: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
) -> Path:
    """The leading branch's topology over training, as a PNG at ``path``.

    ``epoch_log`` and ``events`` are :class:`~lit_surgery.lightning.module.SurgeryModule`'s lists
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
    return save_figure(figure, path)


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
    return save_figure(figure, path)
