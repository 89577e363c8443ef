"""``make reproduce``: run the grid of :mod:`lit_surgery.report.experiments` (several runs side
by side, one thread each; finished cells are kept, so an interrupted run resumes) and write
``docs/RESULTS.md`` with :mod:`lit_surgery.report.results_page`.

    python -m lit_surgery.report.reproduce [--quick] [--jobs N] [--out docs/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from pathlib import Path

from lit_surgery.report.experiments import (
    Cell,
    Grid,
    Results,
    planned,
    run_cell,
    runnable,
)
from lit_surgery.report.results_page import write_page


def run_grid(grid: Grid, results: Results, jobs: int) -> int:
    """Run every cell of ``grid`` not in ``results``; cells whose inputs come from other cells
    start as soon as those finish. ``jobs=1`` runs them in this process. Returns the number
    of cells run."""
    started, done, commit = time.perf_counter(), 0, _commit()

    def finish(cell: Cell, result: dict, running: int) -> None:
        nonlocal done
        result["commit"] = commit
        results.put(cell, result)
        done += 1
        print(
            f"[{done} done, {running} running, {time.perf_counter() - started:.0f} s] "
            f"{cell.key}: val {result['val']:.4f} test {result['test']:.4f} "
            f"{result['num_params']} params {result['wall']:.1f} s",
            flush=True,
        )

    if jobs == 1:
        while cells := runnable(grid, results):
            for cell in cells:
                finish(cell, run_cell(cell, grid), 0)
        return done
    context = multiprocessing.get_context("spawn")  # no threads or torch state inherited
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        running: dict[Future, Cell] = {}
        while True:
            busy = set(running.values())
            for cell in runnable(grid, results):
                if cell not in busy and len(running) < 2 * jobs:
                    running[pool.submit(run_cell, cell, grid)] = cell
                    busy.add(cell)
            if not running:
                return done
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                cell = running.pop(future)
                finish(cell, future.result(), len(running))


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(grid: Grid, command: str, devices: list[str]) -> list[str]:
    schedules = ", ".join(
        f"{s.name} ({s.initial_epochs} initial epochs, a generation every {s.epoch_step}, "
        f"{s.max_epochs} in all)"
        for s in grid.schedules
    )
    grow = (
        "; the grow preset keeps its own generations (one every epoch from the first)"
        if "grow" in grid.methods
        else ""
    )
    return [
        "# Results",
        "",
        f"Written by `{command}` at commit `{_commit()}` on "
        f"{datetime.date.today().isoformat()}. Runs trained on {', '.join(devices)} (one CPU "
        "thread per run, several side by side); a cell's runs all ran on one machine, so "
        "wall-time ratios compare like with like. Every number below comes from the runs; the "
        "verdicts are computed from them (lit_surgery/report/results_page.py).",
        "",
        "Protocol:",
        f"- data: {', '.join(grid.datasets)}; the validation split (10%) is held out from the "
        "training images, the test split is evaluated once, on the network a run ends with;",
        f"- schedules: {schedules}; every method trains for the same epochs of its network's "
        f"lineage (surgery's parallel branches and screening cost more epoch-equivalents){grow};",
        f"- plain SGD, batch {grid.batch_size}; the learning rate of every method is the best "
        f"of {list(grid.lrs)} by seed 0's final validation accuracy (the Optuna search "
        "searches it over the same values);",
        f"- {grid.seeds} seeds per cell: mean ± standard deviation;",
        "- wall times include screening and every other part of surgery, and the validation "
        "evaluation after each epoch (in every method alike). They are only as steady as "
        "the machine was: runs that shared their cores with other jobs (digits runs last "
        "seconds) can be off by several times. Runs also record their CPU time (one thread: "
        "the wall time they would take on a core of their own; \"CPU / plain\", \"–\" "
        "where a run predates it), and a cost verdict uses it where both sides have it, "
        "else wall times: read those with the load in mind.",
    ]


def runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def coverage(cells: list[Cell], results: Results) -> list[str]:
    """What of the grid has not run yet or ran with other settings (a page may be written
    from a part of it), and which commits the runs shown were measured at."""
    states = Counter(results.state(c) for c in cells)
    shown = [r for c in cells if (r := results.get(c)) is not None]
    missing = Counter(
        f"{c.dataset}, {c.schedule} schedule, {c.method}" for c in cells if results.get(c) is None
    )
    lines = []
    if missing:
        lines += [
            "",
            f"**Not complete: {sum(missing.values())} planned runs have not run yet**, and "
            "runs that depend on them (from-scratch and search) are not planned yet:",
        ]
        lines += [f"- {group}: {runs(n)}" for group, n in sorted(missing.items())]
    if stale := states["stale"]:
        lines += [
            "",
            f"**{stale} of the runs above have results made with other settings** (a preset "
            "or a default changed since): they are not shown, and `make reproduce` runs "
            "them again.",
        ]
    commits = Counter(r.get("commit", "not recorded") for r in shown)
    unrecorded = states["unrecorded"]
    if shown:
        lines += [
            "",
            "Commits the runs shown were measured at: "
            + ", ".join(f"`{c}` ({runs(n)})" for c, n in sorted(commits.items()))
            + "."
            + (
                f" {runs(unrecorded)} predate{'s' * (unrecorded == 1)} the record of each "
                "run's settings (a changed preset re-runs a recorded cell, not these): "
                "`make reproduce REFRESH=1` re-runs them."
                if unrecorded
                else ""
            ),
        ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced grid (minutes)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once")
    parser.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="folder of cell results (default: runs/reproduce[-quick])",
    )
    full = Grid()
    for name, choices in (
        ("datasets", full.datasets),
        ("schedules", [s.name for s in full.schedules]),
        ("methods", full.methods),
    ):
        parser.add_argument(
            f"--{name}",
            nargs="+",
            choices=choices,
            help=f"a part of the grid (default: all of {name})",
        )
    parser.add_argument(
        "--starts",
        nargs="+",
        type=lambda text: tuple(int(w) for w in text.split(",")),
        help="a part of the grid's start topologies, e.g. 256,256 (default: all)",
    )
    parser.add_argument("--device", default="cpu", help="where runs train (cpu, cuda, ...)")
    parser.add_argument(
        "--page-only",
        action="store_true",
        help="write the page from the results there, run nothing",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="re-run the selected cells whose results predate the record of their "
        "settings (and the cells that depend on them); the old results go to stale/",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    grid = Grid.quick() if args.quick else full
    grid = replace(
        grid,
        datasets=tuple(args.datasets or grid.datasets),
        starts=tuple(args.starts or grid.starts),
        schedules=tuple(s for s in grid.schedules if s.name in (args.schedules or [s.name])),
        methods=tuple(args.methods or grid.methods),
        device=args.device,
    )
    folder = args.results or Path("runs") / ("reproduce-quick" if args.quick else "reproduce")
    results = Results(folder, config=grid.config, refresh=args.refresh)
    print(f"grid: {asdict(grid)}\ncell results: {folder}", flush=True)
    if not args.page_only:
        run_grid(grid, results, args.jobs)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m lit_surgery.report.reproduce", *given])
    cells = planned(grid, results)
    done = [r for c in cells if (r := results.get(c)) is not None]
    devices = sorted({r.get("device", "a CPU (not recorded)") for r in done})
    lines = header(grid, command, devices) + coverage(cells, results)
    path = write_page(done, args.out, header=lines)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
