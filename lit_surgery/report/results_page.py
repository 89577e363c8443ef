"""``docs/RESULTS.md`` from the cell results of :mod:`lit_surgery.report.experiments`:
tables per dataset and schedule, figures, and one verdict per claim of the paper and per
target of the default policy, computed from the numbers (never written by hand)."""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lit_surgery.report.experiments import SCRATCH, finite
from lit_surgery.report.figures import save_figure

LABELS = {
    "plain": "plain training of the start",
    "paper": "surgery, paper mode",
    "default": "surgery, default",
    "random_walk": "random walk (ablation)",
    "shrink": "surgery, shrink preset",
    "grow": "surgery, grow preset",
    "scratch": "surgery's final topology, from scratch",
    "grow_scratch": "grow preset's final topology, from scratch",
    "search": "Optuna search over plain MLPs",
    "front": "plain MLP",
}

SCRATCH_OF = {surgery: method for method, surgery in SCRATCH.items()}
"""Each surgery method's from-scratch rival: its final topologies trained from scratch."""


@dataclass
class Group:
    """The reported runs of one method on one start (or one front topology): the seeds
    at the learning rate chosen on seed 0's validation accuracy."""

    dataset: str
    schedule: str
    start: tuple[int, ...]
    method: str
    hidden: tuple[int, ...]
    runs: list[dict[str, Any]]

    @property
    def lr(self) -> float | None:
        return self.runs[0]["cell"]["lr"]

    def values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.runs]

    def has(self, key: str) -> bool:
        """Every run recorded ``key`` (runs from before ``cpu`` was recorded lack it)."""
        return all(key in r for r in self.runs)

    def mean(self, key: str) -> float:
        return statistics.fmean(self.values(key))

    def spread(self, key: str) -> float:
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else 0.0


def group_results(results: Iterable[dict[str, Any]]) -> list[Group]:
    """Groups of reported runs: per (dataset, schedule, start, method; front: widths), the
    runs at the rate with the best seed-0 validation accuracy (``search`` tunes its own)."""
    by_key: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        c = r["cell"]
        hidden = tuple(c["hidden"]) if c["method"] == "front" else ()
        by_key[(c["dataset"], c["schedule"], tuple(c["start"]), c["method"], hidden)].append(r)
    groups = []
    for (dataset, schedule, start, method, hidden), runs in sorted(by_key.items()):
        seed0 = [r for r in runs if r["cell"]["seed"] == 0]
        if method != "search":
            best = max(seed0, key=lambda r: finite(r["val"]))["cell"]["lr"]
            runs = [r for r in runs if r["cell"]["lr"] == best]
        runs.sort(key=lambda r: r["cell"]["seed"])
        groups.append(Group(dataset, schedule, start, method, hidden, runs))
    return groups


def _pm(group: Group, key: str, fmt: str = ".4f") -> str:
    return f"{group.mean(key):{fmt}} ± {group.spread(key):{fmt}}"


def _widths(hidden: Sequence[int]) -> str:
    return "[" + ",".join(map(str, hidden)) + "]"


def time_to_reach(run: dict[str, Any], target: float) -> float | None:
    """Seconds until ``run``'s validation curve first reached ``target``; None if never."""
    return next((p["time"] for p in run["curve"] if finite(p["val"]) >= target), None)


class Page:
    """Everything about one set of results that the page shows."""

    def __init__(self, results: list[dict[str, Any]], figures: Path, link: str) -> None:
        self.groups = group_results(results)
        self.figures = figures
        self.link = link  # how the page refers to the figures folder

    def find(
        self,
        dataset: str,
        schedule: str,
        start: tuple[int, ...],
        method: str,
        hidden: tuple[int, ...] = (),
    ) -> Group | None:
        return next(
            (
                g
                for g in self.groups
                if (g.dataset, g.schedule, g.start, g.method, g.hidden)
                == (dataset, schedule, start, method, hidden)
            ),
            None,
        )

    def cases(self) -> list[tuple[str, str]]:
        return sorted({(g.dataset, g.schedule) for g in self.groups}, reverse=True)

    def starts(self, dataset: str, schedule: str) -> list[tuple[int, ...]]:
        found = {g.start for g in self.groups if (g.dataset, g.schedule) == (dataset, schedule)}
        return sorted((s for s in found if s), key=lambda s: (max(s), len(s)))

    def front(self, dataset: str, schedule: str) -> list[Group]:
        return sorted(
            (
                g
                for g in self.groups
                if (g.dataset, g.schedule, g.method) == (dataset, schedule, "front")
            ),
            key=lambda g: g.mean("num_params"),
        )

    # ------------------------------------------------------------------ tables

    def table(self, dataset: str, schedule: str, start: tuple[int, ...]) -> list[str]:
        plain = self.find(dataset, schedule, start, "plain")
        rows = [
            "| method | test accuracy | parameters | final topology (seed 0) | epoch-equivalents "
            "| wall (s) | wall / plain | CPU / plain | reached plain's final val. acc. | lr |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method in LABELS:
            g = self.find(dataset, schedule, start, method)
            if g is None:
                continue
            wall, cpu = (_ratio(g, plain, key) for key in ("wall", "cpu"))
            rows.append(
                f"| {LABELS[method]} | {_pm(g, 'test')} (n={len(g.runs)}) "
                f"| {g.mean('num_params'):,.0f} | {_widths(g.runs[0]['widths'])} "
                f"| {g.mean('epoch_equivalents'):.1f} | {g.mean('wall'):.1f} "
                f"| {'–' if wall is None else f'{wall:.2f}'} "
                f"| {'–' if cpu is None else f'{cpu:.2f}'} "
                f"| {self._reach(g, plain)} | {g.lr if g.lr is not None else 'searched'} |"
            )
        return rows

    def _reach(self, group: Group, plain: Group | None) -> str:
        if plain is None:
            return "–"
        targets = {r["cell"]["seed"]: r["val"] for r in plain.runs}
        times = [
            time_to_reach(r, targets[r["cell"]["seed"]])
            for r in group.runs
            if r["cell"]["seed"] in targets
        ]
        reached = [t for t in times if t is not None]
        if not reached:
            return f"0/{len(times)} runs"
        return f"{len(reached)}/{len(times)} runs, after {statistics.fmean(reached):.1f} s"

    def front_table(self, dataset: str, schedule: str) -> list[str]:
        rows = ["| plain MLP | test accuracy | parameters | lr |", "|---|---|---|---|"]
        for g in self.front(dataset, schedule):
            rows.append(
                f"| {_widths(g.hidden)} | {_pm(g, 'test')} (n={len(g.runs)}) "
                f"| {g.mean('num_params'):,.0f} | {g.lr} |"
            )
        return rows

    # ------------------------------------------------------------------ figures

    def plot_curves(self, dataset: str, schedule: str) -> str:
        starts = self.starts(dataset, schedule)
        figure = Figure(figsize=(5 * len(starts), 4.2))
        for i, start in enumerate(starts):
            ax = figure.add_subplot(1, len(starts), i + 1)
            for method in ("plain", "default", "paper", "random_walk", "shrink", "grow"):
                g = self.find(dataset, schedule, start, method)
                if g is None:
                    continue
                curve = _mean_curve(g.runs, "val")
                (line,) = ax.plot(range(1, len(curve) + 1), curve, label=LABELS[method])
                if method == "default":
                    for event in g.runs[0].get("events", []):
                        if event["kind"] in ("generation", "retry"):
                            ax.axvline(event["epoch"], color=line.get_color(), alpha=0.25, lw=1)
            ax.set_title(f"start {_widths(start)}")
            ax.set_xlabel("epoch of the run (branches in parallel count once)")
            ax.set_ylabel("validation accuracy (mean over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        figure.suptitle(f"{dataset}, {schedule} schedule: thin lines mark surgery (default)")
        figure.tight_layout()
        return self._save(figure, f"{dataset}_{schedule}_curves.png")

    def plot_widths(self, dataset: str, schedule: str) -> str:
        """Widths of the leading branch over the run (seed 0): default surgery, solid, and
        the shrink preset, dashed, where it ran."""
        starts = self.starts(dataset, schedule)
        figure = Figure(figsize=(5 * len(starts), 3.8))
        for i, start in enumerate(starts):
            ax = figure.add_subplot(1, len(starts), i + 1)
            shown = []
            for method, style in (("default", "-"), ("shrink", "--")):
                g = self.find(dataset, schedule, start, method)
                if g is None:
                    continue
                shown.append(LABELS[method])
                curve = g.runs[0]["curve"]
                x = [p["epoch"] for p in curve]
                for layer in range(max(len(p["widths"]) for p in curve)):
                    y = [
                        p["widths"][layer] if layer < len(p["widths"]) else math.nan for p in curve
                    ]
                    ax.plot(
                        x,
                        y,
                        style,
                        drawstyle="steps-pre",
                        color=f"C{layer}",
                        label=f"layer {layer}, {method}",
                    )
            if not shown:
                ax.text(0.5, 0.5, "no surgery run yet", ha="center", transform=ax.transAxes)
                continue
            ax.set_yscale("log")
            ax.set_title(f"from {_widths(start)}, seed 0: {', '.join(shown)}", fontsize=9)
            ax.set_xlabel("epoch of the run")
            ax.set_ylabel("width of the leading branch")
            ax.legend(fontsize=7)
        figure.tight_layout()
        return self._save(figure, f"{dataset}_{schedule}_widths.png")

    def plot_front(self, dataset: str, schedule: str) -> str:
        figure = Figure(figsize=(8, 5))
        ax = figure.add_subplot()
        front = self.front(dataset, schedule)
        if front:
            ax.plot(
                [g.mean("num_params") for g in front],
                [g.mean("test") for g in front],
                "k--",
                marker="s",
                label=LABELS["front"] + "s (front)",
            )
        methods = [m for m in LABELS if m != "front"]
        markers = dict(zip(methods, "o^vDsPXh*", strict=True))
        for k, start in enumerate(self.starts(dataset, schedule)):
            for method, marker in markers.items():
                g = self.find(dataset, schedule, start, method)
                if g is None:
                    continue
                ax.errorbar(
                    g.mean("num_params"),
                    g.mean("test"),
                    yerr=g.spread("test"),
                    fmt=marker,
                    color=f"C{k}",
                    alpha=0.8,
                    label=f"{LABELS[method]}, start {_widths(start)}",
                )
        ax.set_xscale("log")
        ax.set_xlabel("parameters (mean over seeds)")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"{dataset}, {schedule} schedule: accuracy against size")
        figure.tight_layout()
        return self._save(figure, f"{dataset}_{schedule}_front.png")

    def _save(self, figure: Figure, name: str) -> str:
        save_figure(figure, self.figures / name)
        return f"{self.link}/{name}"

    # ------------------------------------------------------------------ verdicts

    def front_at(self, dataset: str, schedule: str, params: float) -> Group | None:
        """The most accurate plain MLP of the front with at most ``params`` parameters."""
        fits = [g for g in self.front(dataset, schedule) if g.mean("num_params") <= params]
        return max(fits, key=lambda g: g.mean("test"), default=None)


def _mean_curve(runs: list[dict[str, Any]], key: str) -> list[float]:
    length = min(len(r["curve"]) for r in runs)
    return [statistics.fmean(finite(r["curve"][i][key]) for r in runs) for i in range(length)]


Verdict = tuple[str, str, bool | None]


def claims(page: Page, dataset: str, schedule: str) -> list[Verdict]:
    """The paper's claims, measured: (claim, measurement, holds)."""
    out: list[Verdict] = []
    find: Callable[..., Group | None] = page.find
    for start in page.starts(dataset, schedule):
        plain = find(dataset, schedule, start, "plain")
        if plain is None:
            continue
        for name, method in (("default", "default"), ("paper mode", "paper")):
            g = find(dataset, schedule, start, method)
            if g is None:  # each surgery is judged once its runs are there, alone if need be
                continue
            diff = g.mean("test") - plain.mean("test")
            ratio = g.mean("num_params") / plain.mean("num_params")
            out += [
                (
                    f"surgery ({name}) from {_widths(start)} is more accurate than plain training "
                    "of the start",
                    f"{g.mean('test'):.4f} vs {plain.mean('test'):.4f} ({diff:+.4f})",
                    diff > 0,
                ),
                (
                    f"surgery ({name}) from {_widths(start)}: fewer parameters at equal accuracy",
                    f"{ratio:.2f}x the start's parameters at {diff:+.4f} accuracy",
                    ratio < 1 and g.mean("test") >= plain.mean("test") - plain.spread("test"),
                ),
                _cost(g, plain, name),
            ]
    return out


def _ratio(group: Group, plain: Group | None, key: str) -> float | None:
    """``group``'s mean ``key`` over plain training's; None without plain training or
    where a run lacks ``key`` (runs from before ``cpu`` was recorded)."""
    if plain is None or not (group.has(key) and plain.has(key)):
        return None
    return group.mean(key) / plain.mean(key)


def _cost(surgery: Group, plain: Group, name: str) -> Verdict:
    """The paper's claim and our target alike: surgery at most 1.5x plain training's time.
    By CPU time where both recorded it: a one-thread run's CPU time is its wall time on a
    core of its own, and jobs sharing its core inflate it far less than its wall time."""
    cpu = _ratio(surgery, plain, "cpu")
    cost = _ratio(surgery, plain, "wall") if cpu is None else cpu
    return (
        f"surgery ({name}) from {_widths(surgery.start)}: at most 1.5x the wall time "
        "of plain training of its start",
        f"{cost:.2f}x" + ("" if cpu is None else " (CPU time)"),
        cost <= 1.5,
    )


def targets(page: Page, dataset: str = "fashion_mnist", schedule: str = "quick") -> list[Verdict]:
    """Issue 9's targets for the default policy (and the grow preset, on small starts)."""
    out: list[Verdict] = []
    for start, method in itertools.product(((4, 4, 4), (10, 10, 10)), ("default", "grow")):
        g = page.find(dataset, schedule, start, method)
        if g is None:
            continue
        acc = g.mean("test")
        grown = f"growth from {_widths(start)} ({LABELS[method]})"
        out.append((f"{grown}: test accuracy >= 0.88", f"{acc:.4f}", acc >= 0.88))
        rivals = [
            page.front_at(dataset, schedule, g.mean("num_params")),
            page.find(dataset, schedule, start, SCRATCH_OF[method]),
        ]
        rivals = [r for r in rivals if r is not None]
        if rivals:
            best = max(rivals, key=lambda r: r.mean("test"))
            name = _widths(best.hidden) if best.method == "front" else LABELS[best.method]
            out.append(
                (
                    f"{grown}: at or above the plain-MLP front at its size "
                    f"({g.mean('num_params'):,.0f} parameters)",
                    f"{acc:.4f} vs {best.mean('test'):.4f} ({name}, "
                    f"{best.mean('num_params'):,.0f} parameters)",
                    acc >= best.mean("test"),
                )
            )
        search = page.find(dataset, schedule, start, "search")
        if search is not None:
            out.append(
                (
                    f"{grown}: at least as accurate as the Optuna search",
                    f"{acc:.4f} vs {search.mean('test'):.4f}",
                    acc >= search.mean("test"),
                )
            )
    big = (256, 256)
    plain = page.find(dataset, schedule, big, "plain")
    for method in ("default", "shrink"):
        g = page.find(dataset, schedule, big, method)
        if g is None or plain is None:
            continue
        fewer = 1 - g.mean("num_params") / plain.mean("num_params")
        loss = plain.mean("test") - g.mean("test")
        out.append(
            (
                f"shrink from [256,256] ({LABELS[method]}): >= 40% fewer parameters at no loss "
                "of test accuracy",
                f"{abs(fewer):.1%} {'fewer' if fewer >= 0 else 'more'}, accuracy "
                f"{g.mean('test'):.4f} vs {plain.mean('test'):.4f} "
                f"(n={len(g.runs)} and {len(plain.runs)} seeds)",
                fewer >= 0.4 and loss <= 0,
            )
        )
    for start, method in itertools.product(page.starts(dataset, schedule), ("default", "grow")):
        g, plain = (page.find(dataset, schedule, start, m) for m in (method, "plain"))
        if g is not None and plain is not None:
            out.append(_cost(g, plain, method))
    return out


def _verdicts(rows: list[Verdict]) -> list[str]:
    if not rows:
        return ["Not measured yet: the runs it needs have not run."]
    lines = ["| claim | measured | holds |", "|---|---|---|"]
    for claim, measured, holds in rows:
        lines.append(f"| {claim} | {measured} | {'yes' if holds else '**no**'} |")
    return lines


TRIED = (
    "Where a target is missed, docs/METHOD.md says what was tried: \"Growing a start that is "
    "too small\" (growth) and \"The cost of the default policy\" (cost)."
)


def write_page(results: list[dict[str, Any]], path: Path, *, header: Sequence[str] = ()) -> Path:
    """Write the results page at ``path`` and its figures beside it (``<stem>_figures/``)."""
    figures = path.parent / f"{path.stem.lower()}_figures"
    page = Page(results, figures, figures.name)
    lines = [*header]
    if any(ds == "fashion_mnist" and sc == "quick" for ds, sc in page.cases()):
        lines += ["", "## Targets of the default policy (Fashion-MNIST, quick schedule)", ""]
        lines += _verdicts(targets(page))
        lines += ["", TRIED]
    for dataset, schedule in page.cases():
        lines += ["", f"## {dataset}, {schedule} schedule", ""]
        lines += ["### The paper's claims", "", *_verdicts(claims(page, dataset, schedule))]
        for start in page.starts(dataset, schedule):
            lines += ["", f"### Start {_widths(start)}", "", *page.table(dataset, schedule, start)]
        if page.front(dataset, schedule):
            lines += ["", "### Plain MLPs (the front)", "", *page.front_table(dataset, schedule)]
        lines.append("")
        if page.starts(dataset, schedule):  # not when only the front has run (no starts)
            lines += [
                f"![validation accuracy]({page.plot_curves(dataset, schedule)})",
                f"![widths]({page.plot_widths(dataset, schedule)})",
            ]
        lines.append(f"![accuracy against size]({page.plot_front(dataset, schedule)})")
    path.write_text("\n".join(lines) + "\n")
    return path
