"""`make reproduce`: the grid's protocol (rates chosen on seed 0, dependent methods, budgets),
resuming, and the results page, on a tiny grid over digits."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import fields, replace
from pathlib import Path

import pytest

from lit_surgery.report.experiments import METHODS, Grid, Results, Schedule, planned, runnable
from lit_surgery.report.reproduce import coverage, header, main, run_grid
from lit_surgery.report.results_page import (
    TRIED,
    Group,
    _cost,
    group_results,
    time_to_reach,
    write_page,
)

TINY = Grid(
    datasets=("digits",),
    starts=((6,),),
    schedules=(Schedule("tiny", 1, 1, 3),),
    seeds=2,
    lrs=(0.02, 0.1),
    front=((8,),),
    shrink_starts=((6,),),
    grow_starts=((6,),),
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    results = Results(tmp_path_factory.mktemp("cells"), config=TINY.config)
    ran = run_grid(TINY, results, jobs=1)
    return results, ran


def _runs(results, method):
    return [r for c in planned(TINY, results) if (r := results.get(c)) and c.method == method]


def test_every_method_runs_every_seed_at_the_rate_chosen_on_seed_0(finished):
    results, ran = finished
    for method in METHODS:
        runs = _runs(results, method)
        seed0 = [r for r in runs if r["cell"]["seed"] == 0]
        assert {r["cell"]["seed"] for r in runs} == {0, 1}, method
        if method == "search":
            assert [r["cell"]["lr"] for r in runs] == [None, None]
            continue
        assert sorted(r["cell"]["lr"] for r in seed0) == sorted(TINY.lrs), method
        best = max(seed0, key=lambda r: r["val"])["cell"]["lr"]
        (later,) = [r for r in runs if r["cell"]["seed"] == 1]
        assert later["cell"]["lr"] == best, method
    assert ran == len(planned(TINY, results))


def test_scratch_trains_its_seeds_surgery_topology_and_search_keeps_the_budget(finished):
    results, _ = finished
    groups = {(g.method, g.hidden): g for g in group_results(_all(results))}
    default = groups[("default", ())]
    for method, surgery_method in (("scratch", "default"), ("grow_scratch", "grow")):
        runs = _runs(results, method)
        assert runs, method
        for run in runs:
            seed = run["cell"]["seed"]
            ended = groups[(surgery_method, ())].runs
            surgery = next(r for r in ended if r["cell"]["seed"] == seed)
            assert run["topology"] == surgery["topology"], method
            assert run["epoch_equivalents"] == 3  # the schedule's epochs, one network
    for run in _runs(results, "search"):
        surgery = next(r for r in default.runs if r["cell"]["seed"] == run["cell"]["seed"])
        budget = run["cell"]["budget"]
        assert budget == pytest.approx(surgery["epoch_equivalents"], abs=0.05)
        assert budget <= run["epoch_equivalents"] < budget + 1
    start_params = _runs(results, "plain")[0]["num_params"]
    for run in _runs(results, "shrink"):  # the start's size is its budget
        assert run["num_params"] <= start_params
        assert run["curve"][-1]["num_params"] <= start_params
    for run in _runs(results, "default"):
        assert run["epoch_equivalents"] > 3  # parallel branches and screening count
        assert len(run["curve"]) >= 3 and run["events"][-1]["kind"] == "end"


def _all(results):
    return [r for c in planned(TINY, results) if (r := results.get(c))]


def test_a_rerun_runs_nothing_and_an_interrupted_cell_runs_again(finished):
    results, _ = finished
    assert run_grid(TINY, Results(results.folder), jobs=1) == 0  # a new process: from files
    victim = next(iter(results.folder.glob("*.json")))
    victim.unlink()  # the cell a killed run never finished
    assert run_grid(TINY, Results(results.folder), jobs=1) == 1
    assert not list(results.folder.glob("*.tmp"))


def test_page_has_every_method_figures_and_verdicts(finished, tmp_path):
    results, _ = finished
    path = write_page(_all(results), tmp_path / "RESULTS.md", header=["# Results"])
    text = path.read_text()
    for label in (
        "plain training of the start",
        "surgery, paper mode",
        "surgery, default",
        "surgery, grow preset",
        "random walk",
        "surgery's final topology, from scratch",
        "grow preset's final topology, from scratch",
        "Optuna search",
        "[8]",
    ):
        assert label in text, label
    assert "| claim | measured | holds |" in text
    for name in ("default", "paper mode"):  # each claim judged for both surgeries
        for claim in ("is more accurate than plain", "fewer parameters at equal accuracy",
                      "at most 1.5x the wall time"):
            assert any(f"surgery ({name}) from [6]" in line and claim in line
                       for line in text.splitlines()), (name, claim)
    for kind in ("curves", "widths", "front"):
        figure = tmp_path / "results_figures" / f"digits_tiny_{kind}.png"
        assert figure.read_bytes()[:4] == b"\x89PNG"
        assert f"results_figures/digits_tiny_{kind}.png" in text


def test_page_of_the_front_alone(finished, tmp_path):
    """A run of ``--methods front`` alone has no start to draw curves for: its page has the
    front's table and figure (it crashed on an empty curves figure)."""
    results, _ = finished
    front = [r for r in _all(results) if r["cell"]["method"] == "front"]
    text = write_page(front, tmp_path / "RESULTS.md").read_text()
    assert "### Plain MLPs (the front)" in text and "curves" not in text
    assert (tmp_path / "results_figures" / "digits_tiny_front.png").read_bytes()[:4] == b"\x89PNG"


def test_paper_mode_is_judged_before_default_surgery_has_run(finished, tmp_path):
    """Paper mode's claims need plain training and paper mode alone (the page said "not
    measured yet" while only default surgery was missing)."""
    results, _ = finished
    runs = [r for r in _all(results) if r["cell"]["method"] in ("plain", "paper")]
    text = write_page(runs, tmp_path / "RESULTS.md").read_text()
    assert "surgery (paper mode) from [6]: fewer parameters at equal accuracy" in text
    assert "surgery (default)" not in text


def test_rate_chosen_by_seed_0_validation_not_test():
    def run(method, seed, lr, val, test):
        cell = dict(
            dataset="d", schedule="s", start=[4], method=method, seed=seed, lr=lr, hidden=[4]
        )
        return dict(cell=cell, val=val, test=test, curve=[])

    runs = [
        run("plain", 0, 0.1, 0.9, 0.5),
        run("plain", 0, 0.01, 0.8, 0.99),  # better test, worse validation: not chosen
        run("plain", 0, 0.03, math.nan, 1.0),  # diverged
        run("plain", 1, 0.1, 0.7, 0.6),
        run("plain", 1, 0.01, 0.99, 0.99),  # not the chosen rate: not reported
    ]
    (group,) = group_results(runs)
    assert group.lr == 0.1
    assert [r["cell"]["seed"] for r in group.runs] == [0, 1]
    assert group.mean("test") == pytest.approx(0.55)


def test_grow_keeps_its_own_generations_and_the_page_says_so():
    grow, default = (Grid().settings(m, "quick", 1000) for m in ("grow", "default"))
    assert (grow.initial_epochs, grow.epoch_step, grow.max_epochs) == (1, 1, 30)
    assert (default.initial_epochs, default.epoch_step, default.max_epochs) == (5, 5, 30)
    protocol = "\n".join(header(TINY, "make reproduce", ["CPU"]))
    assert "the grow preset keeps its own generations" in protocol
    without = replace(TINY, methods=("plain", "default"))
    assert "grow preset" not in "\n".join(header(without, "make reproduce", ["CPU"]))


def test_the_pages_pointer_to_what_was_tried_names_sections_that_exist():
    method = (Path(__file__).parents[1] / "docs" / "METHOD.md").read_text()
    titles = re.findall(r'"([^"]+)"', TRIED)
    assert len(titles) == 2
    for title in titles:
        assert f"\n## {title}" in method, title


def test_every_run_records_its_cpu_time_settings_and_commit(finished):
    results, _ = finished
    for cell in planned(TINY, results):
        run = results.get(cell)
        assert 0 < run["cpu"] < 10 * run["wall"] + 1, cell.key
        assert run["config"] == TINY.config(cell) and run["commit"], cell.key


def test_a_search_given_another_budget_is_stale(finished):
    """The budget is not in a search's key: a surgery run that spent other epochs (a changed
    policy, or other numerics) must still not reuse the search made for the old budget."""
    results, _ = finished
    search = next(c for c in planned(TINY, results) if c.method == "search")
    assert results.state(search) == "current"
    assert results.state(replace(search, budget=search.budget + 1)) == "stale"


class _FewerRetries(Grid):
    """TINY with grow() changed, as a commit that edits a preset would."""

    def settings(self, method, schedule, start_params):
        settings = super().settings(method, schedule, start_params)
        return replace(settings, max_retries=1) if method == "grow" else settings


def _copy(finished, tmp_path):
    folder = tmp_path / "cells"
    shutil.copytree(finished[0].folder, folder)
    return folder


def test_a_result_made_with_other_settings_runs_again_and_is_kept_aside(finished, tmp_path):
    folder = _copy(finished, tmp_path)
    changed = _FewerRetries(**{f.name: getattr(TINY, f.name) for f in fields(TINY)})
    results = Results(folder, config=changed.config)
    grow = [c for c in planned(TINY, Results(folder)) if c.method == "grow"]
    assert grow and {results.state(c) for c in grow} == {"stale"}
    assert {c.method for c in runnable(changed, results)} == {"grow"}
    page = "\n".join(coverage(planned(changed, results), results))
    assert "results made with other settings" in page
    run_grid(changed, results, jobs=1)
    assert {results.state(c) for c in planned(changed, results)} == {"current"}
    kept = sorted(p.name.rsplit(".", 2)[0] for p in (folder / "stale").glob("*.json"))
    assert kept == sorted(c.key for c in grow)  # nothing lost
    assert Results(folder, config=TINY.config).state(grow[0]) == "stale"  # and back


def test_unrecorded_results_are_used_and_refresh_runs_them_again(finished, tmp_path):
    folder = _copy(finished, tmp_path)
    cell = next(c for c in planned(TINY, Results(folder)) if c.method == "plain")
    path = Results(folder).path(cell)
    old = json.loads(path.read_text())
    del old["config"], old["commit"]  # a result from before runs recorded them
    path.write_text(json.dumps(old))
    results = Results(folder, config=TINY.config)
    assert results.state(cell) == "unrecorded" and results.get(cell) == old
    assert not runnable(TINY, results)
    assert "1 run predates the record" in "\n".join(coverage(planned(TINY, results), results))
    results.refresh = True
    assert cell in runnable(TINY, results)
    run_grid(TINY, results, jobs=1)
    assert results.state(cell) == "current" and results.get(cell)["test"] == old["test"]


def test_cost_is_judged_by_cpu_time_where_both_sides_recorded_it():
    def group(method, walls, cpus=()):
        runs = [{"wall": w} for w in walls]
        for run, cpu in zip(runs, cpus, strict=False):  # no cpus: runs from before
            run["cpu"] = cpu
        return Group("d", "s", (4,), method, (), runs)

    plain = group("plain", [10.0, 30.0], [10.0, 10.0])  # one plain run shared its core
    surgery = group("default", [40.0, 40.0], [12.0, 14.0])
    claim, measured, holds = _cost(surgery, plain, "default")
    assert (measured, holds) == ("1.30x (CPU time)", True)
    # a side without CPU times (runs from before they were recorded): wall times
    _, measured, holds = _cost(group("default", [40.0, 40.0]), plain, "default")
    assert (measured, holds) == ("2.00x", False)
    assert "at most 1.5x the wall time" in claim


def test_time_to_reach():
    run = {
        "curve": [
            {"time": 1.0, "val": 0.5},
            {"time": 2.0, "val": math.nan},
            {"time": 3.0, "val": 0.8},
        ]
    }
    assert time_to_reach(run, 0.7) == 3.0
    assert time_to_reach(run, 0.9) is None


def test_bad_jobs_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--jobs", "0"])
    assert exit_info.value.code == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err
