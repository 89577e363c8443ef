import json
import math
import re
from dataclasses import replace
from typing import Literal, get_args, get_origin, get_type_hints

import pytest
import torch

from lit_surgery.core.network import build
from lit_surgery.core.policy import Surgeon
from lit_surgery.core.settings import SettingsError, SurgerySettings
from lit_surgery.core.state import Branch, History
from lit_surgery.core.topology import Topology


def _net(seed=0):
    torch.manual_seed(seed)
    return build(Topology.mlp(6, [6, 6], 3))


class Script:
    """Scripted training: metrics from a function of the branch; counts calls."""

    def __init__(self, screen_metric=None, train_gain=0.01):
        self.screen_metric = screen_metric or (lambda b: 0.5)
        self.train_gain = train_gain
        self.trained: list[tuple[int, int]] = []
        self.screened: list[tuple[int, str, int]] = []

    def train(self, branch: Branch, epochs: int) -> float:
        self.trained.append((branch.id, epochs))
        gain = self.train_gain(branch) if callable(self.train_gain) else self.train_gain
        return (branch.metric or 0.5) + gain

    def screen(self, branch: Branch, batches: int) -> float:
        self.screened.append((branch.id, branch.change.op, batches))
        return self.screen_metric(branch)


def _surgeon(script, seed=0, **settings):
    base = dict(max_epochs=30, initial_epochs=5, epoch_step=10)
    return Surgeon(SurgerySettings(**{**base, **settings}), script.train, script.screen, seed=seed)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("epoch_step", 0), ("initial_epochs", -1), ("max_epochs", 2), ("parallel_branches", 0),
        ("max_retries", -1), ("include_random", "yes"), ("sv_threshold_abs", -0.1),
        ("sv_threshold_rel", 2.0), ("add_fraction", 0.0), ("add_multiplier", 0),
        ("screen_batches", {"XX": 1}), ("screen_batches", {"AN": -1}),
        ("type_weights", {"B": 1.0}), ("type_weights", {"AN": math.nan}),
        ("sv_source", "both"), ("criterion", "ours"), ("ranking", "best"),
        ("al_activation", "tanh"), ("split", "random"), ("score", "f1"), ("size_penalty", -1.0),
        ("explore", 1),
        ("select_by", "loss"), ("random_walk", None), ("epoch_step", 2.5),
    ],
)
def test_invalid_settings_name_the_setting(name, value):
    with pytest.raises(SettingsError, match=rf"^{name}=.* is invalid: "):
        SurgerySettings(**{"initial_epochs": 5, name: value})


def test_choices_are_literal_types_and_their_checks_list_the_literal():
    hints = get_type_hints(SurgerySettings)
    choices = {n: get_args(h) for n, h in hints.items() if get_origin(h) is Literal}
    assert set(choices) == {"sv_source", "criterion", "ranking", "al_activation", "split",
                            "score", "select_by"}
    for name, allowed in choices.items():
        assert getattr(SurgerySettings(), name) in allowed
        assert getattr(SurgerySettings.paper(), name) in allowed
        message = re.escape(f"{name}='x' is invalid: one of {allowed}")
        with pytest.raises(SettingsError, match=message):
            SurgerySettings(**{name: "x"})


def test_reference_numbers_are_the_defaults_and_paper_mode_changes_choices():
    d, p = SurgerySettings(), SurgerySettings.paper()
    for s in (d, p):
        assert (s.epoch_step, s.initial_epochs, s.max_epochs) == (10, 10, 100)
        assert (s.parallel_branches, s.include_random) == (2, True)
        assert (s.sv_threshold_abs, s.sv_threshold_rel, s.add_fraction) == (0.3, 5e-3, 0.1)
        assert s.screen_batches == {"B": 1, "AN": 1, "AL": 1, "T": 1, "RL": 10, "OL": 10}
    # max_retries counts re-selections; the reference's 3 counts rounds, the first included
    assert (d.max_retries, p.max_retries) == (1, 2)
    assert (p.sv_source, p.criterion, p.ranking, p.al_activation, p.split, p.score, p.explore,
            p.select_by) == ("outgoing", "paper", "paper", "linear", "equal", "paper", False,
                             "score")
    assert (d.sv_source, d.criterion, d.ranking, d.al_activation, d.split, d.score, d.explore,
            d.select_by) == ("incoming", "exact", "bottleneck", "auto", "asymmetric", "log",
                             True, "accuracy")
    assert SurgerySettings.paper(epoch_step=3).epoch_step == 3
    assert SurgerySettings(screen_batches={"AN": 5}).screen_batches["RL"] == 10


def test_schedule_cycles_and_epochs_add_up():
    s = SurgerySettings(max_epochs=32, initial_epochs=5, epoch_step=10)
    assert s.generations == 3
    assert [s.cycle_epochs(g) for g in (1, 2, 3)] == [10, 10, 7]
    assert SurgerySettings().generations == 9
    script = Script()
    surgeon = Surgeon(s, script.train, script.screen)
    best = surgeon.run(_net())
    assert best.epochs == 32
    assert surgeon.history.epochs_trained == sum(e for _, e in script.trained)
    # initial training + parallel_branches survivors per generation (no retries needed)
    assert surgeon.history.epochs_trained == 5 + 2 * (10 + 10 + 7)
    assert surgeon.history.batches_screened == sum(b for _, _, b in script.screened)


def test_selection_base_always_best_per_type_and_one_random():
    script = Script()
    surgeon = _surgeon(script, seed=3)
    root = Branch(0, _net(), metric=0.5)
    pool = [(root, c) for c in surgeon.propose(root.net)]
    from lit_surgery.core.criteria import Candidate, best_per_type

    pool.insert(0, (root, Candidate("B")))
    chosen = surgeon.select(pool, list(range(len(pool))))
    ops = [pool[i][1].op for i in chosen]
    types = {c.op for _, c in pool} - {"B"}
    assert ops[0] == "B"
    assert len(chosen) == 1 + len(types) + 1  # B, one per type, one random
    best = best_per_type([c for _, c in pool[1:]], "bottleneck")
    assert [pool[i][1] for i in chosen[1:-1]] == best
    assert len(set(chosen)) == len(chosen)
    again = _surgeon(Script(), seed=3).select(pool, list(range(len(pool))))
    assert again == chosen  # seeded
    no_random = _surgeon(Script(), include_random=False).select(pool, list(range(len(pool))))
    assert len(no_random) == 1 + len(types)


def test_scores():
    paper = _surgeon(Script(), score="paper")
    assert paper.score(0.8, 0.7, 1.2) == pytest.approx(0.8 + math.exp(0.1) * math.exp(-1.2))
    log = _surgeon(Script(), size_penalty=0.1)
    assert log.score(0.8, 0.7, 2.0) == pytest.approx(0.8 - 0.1 * math.log(2.0))
    assert log.score(math.nan, 0.7, 1.0) == -math.inf


def _screened(ops_scores):
    return [Branch(i, None, change=_cand(op), score=sc) for i, (op, sc) in enumerate(ops_scores)]


def _cand(op):
    from lit_surgery.core.criteria import Candidate

    return Candidate(op, None if op == "B" else 0, 0)


def test_survival_explore_keeps_at_most_one_base():
    screened = _screened([("B", 0.9), ("B", 0.89), ("AN", 0.8), ("OL", -math.inf)])
    explore = _surgeon(Script()).pick_to_train(screened)
    assert [(b.change.op, b.score) for b in explore] == [("B", 0.9), ("AN", 0.8)]
    reference = _surgeon(Script(), explore=False).pick_to_train(screened)
    assert [(b.change.op, b.score) for b in reference] == [("B", 0.9), ("B", 0.89)]
    one = _surgeon(Script(), parallel_branches=1).pick_to_train(screened)
    assert [b.score for b in one] == [0.9]


def _retrying_script():
    """Scripted training whose first attempt in generation 1 (calls 2-3) loses: a retry."""
    script = Script()
    script.train_gain = lambda b: -0.2 if len(script.trained) in (2, 3) else 0.1
    return script


def test_retry_with_untried_candidates_when_no_survivor_reaches_previous_best():
    script = _retrying_script()  # call 1 trains the root
    surgeon = _surgeon(script, max_epochs=15, initial_epochs=5, epoch_step=10, max_retries=2)
    surgeon.run(_net())
    records = surgeon.history.candidates
    screened = [r for r in records if r.screen_metric is not None]
    assert {r.attempt for r in screened} == {0, 1}
    assert all(r.attempt is None for r in records if r.screen_metric is None)
    first = [r for r in screened if r.attempt == 0 and r.trained]
    assert len(first) == 2 and not any(r.kept for r in first)
    kept = [r for r in records if r.kept]
    assert kept and all(r.attempt == 1 for r in kept)
    retried = [r for r in screened if r.attempt == 1]
    assert not any(r.op == "B" for r in retried)  # B was tried in the first attempt
    ids = [r.branch for r in screened]
    assert len(ids) == len(set(ids))  # no candidate screened twice


def test_fallback_keeps_best_trained_when_retries_run_out():
    script = Script(train_gain=-0.1)
    surgeon = _surgeon(script, max_epochs=15, epoch_step=10, max_retries=0)
    branches = _first_generation(surgeon, script)
    assert len(branches) == 1
    trained = [r for r in surgeon.history.candidates if r.trained]
    assert branches[0].metric == max(r.metric for r in trained)
    assert all(r.attempt == 0 for r in surgeon.history.candidates if r.screen_metric is not None)


def _first_generation(surgeon, script, root_metric=0.9):
    """Step through the root's initial epochs (that end at ``root_metric``) and a one-generation
    schedule trained by ``script``; returns the generation's survivors."""
    survivors = []
    surgeon.on_generation = lambda number, records, kept: survivors.extend(kept)
    surgeon.start(_net())
    plan = surgeon.step([root_metric])
    while plan.kind != "end":
        plan = surgeon.step([script.train(b, plan.epochs) for b in plan.branches])
    assert surgeon.done_generations == 1
    return survivors


def test_non_finite_candidates_are_discarded():
    def poison(branch):
        if branch.change.op != "B":
            with torch.no_grad():
                next(branch.net.parameters()).fill_(math.nan)
        return 0.9

    script = Script(screen_metric=poison)
    surgeon = _surgeon(script, max_epochs=15, epoch_step=10)
    survivors = _first_generation(surgeon, script)
    assert [b.change.op for b in survivors] == ["B"]
    for r in surgeon.history.candidates:
        if r.screen_metric is not None and r.op != "B":
            assert r.score == -math.inf and not r.trained


def test_random_walk_trains_one_random_candidate_without_screening():
    script = Script()
    surgeon = _surgeon(script, random_walk=True)
    best = surgeon.run(_net())
    assert script.screened == []
    assert best.epochs == 30
    per_gen = {}
    for r in surgeon.history.candidates:
        per_gen.setdefault(r.generation, []).append(r.trained)
    assert all(sum(v) == 1 for v in per_gen.values()) and len(per_gen) == 3


def test_winner_by_accuracy_or_by_score():
    a = Branch(0, None, metric=0.9, score=0.5)
    b = Branch(1, None, metric=0.8, score=0.7)
    assert _surgeon(Script()).winner([a, b]) is a
    assert _surgeon(Script(), select_by="score").winner([a, b]) is b


def test_trained_branches_are_rescored_against_their_screening_metric():
    script = Script(screen_metric=lambda b: 0.6, train_gain=0.05)
    surgeon = _surgeon(script, max_epochs=15, epoch_step=10, score="paper")
    survivors = _first_generation(surgeon, script, root_metric=0.5)
    by_branch = {r.branch: r for r in surgeon.history.candidates}
    for b in survivors:
        record = by_branch[b.id]
        assert record.score == surgeon.score(0.6, 0.5, b.change.param_ratio)  # screening
        assert b.score == surgeon.score(0.65, 0.6, b.change.param_ratio)  # after the cycle


def test_history_is_plain_data_with_genealogy():
    script = Script(screen_metric=lambda b: 0.5 + 0.01 * (b.change.op == "AN"))
    surgeon = _surgeon(script)
    best = surgeon.run(_net())
    data = json.loads(json.dumps(surgeon.history.to_dict()))
    fields = {"generation", "parent", "op", "layer", "amount", "weight", "param_ratio",
              "screen_metric", "score", "kept"}
    assert fields <= set(data["candidates"][0])
    genealogy = data["genealogy"]
    node, lineage = str(best.id), []
    while node != "None":
        lineage.append(genealogy[node]["change"])
        node = str(genealogy[node]["parent"])
    assert len(lineage) == 1 + surgeon.settings.generations  # root + one change each
    assert genealogy[str(best.id)]["epochs"] == 30


def test_paper_mode_and_default_pick_differently():
    # Paper ranking picks the biggest AN; modest the smallest.
    picks = {}
    for mode, settings in {"default": SurgerySettings(), "paper": SurgerySettings.paper()}.items():
        script = Script()
        surgeon = Surgeon(settings.replace(include_random=False, sv_source="incoming"),
                          script.train, script.screen)
        root = Branch(0, _net(), metric=0.5)
        from lit_surgery.core.criteria import Candidate

        pool = [(root, Candidate("B"))] + [(root, c) for c in surgeon.propose(root.net)]
        chosen = [pool[i][1] for i in surgeon.select(pool, list(range(len(pool))))]
        picks[mode] = next(c for c in chosen if c.op == "AN")
    assert picks["paper"].amount == 10 * picks["default"].amount


def _poison(net):
    with torch.no_grad():
        next(net.parameters()).fill_(math.nan)


def _all_finite(net):
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


def test_branch_that_diverges_mid_cycle_is_never_kept_and_never_wins():
    script = Script()
    victims = []

    def train_gain(branch):
        # the first child trained in each generation gets NaN weights, yet a high metric
        if branch.generation > 0 and branch.generation not in {b.generation for b in victims}:
            victims.append(branch)
            _poison(branch.net)
            return 0.4  # 0.5 + 0.4: a finite-looking, best accuracy
        return 0.01

    script.train_gain = train_gain
    surgeon = _surgeon(script)
    best = surgeon.run(_net())
    assert len(victims) == 3 and best not in victims and _all_finite(best.net)
    assert best.metric < 0.9
    diverged = surgeon.history.diverged
    assert [(d["branch"], d["generation"], d["stage"]) for d in diverged] == [
        (b.id, b.generation, "training") for b in victims
    ]
    assert all(d["epochs"] == b.epochs for d, b in zip(diverged, victims, strict=True))
    kept = {r.branch for r in surgeon.history.candidates if r.kept}
    assert kept.isdisjoint(b.id for b in victims)
    assert all(math.isnan(b.metric) for b in victims)


def test_every_candidate_diverging_trains_copies_of_the_untouched_parents():
    def screen(branch):  # every screened candidate, B included, gets NaN weights
        _poison(branch.net)
        return 0.9

    script = Script(screen_metric=screen)
    surgeon = _surgeon(script, max_epochs=15, epoch_step=10, max_retries=1)
    surgeon.start(_net())
    plan = surgeon.step([0.9])  # the root's initial epochs: generation 1 begins
    gen = surgeon.open
    (parent,) = gen.parents
    weights = [p.clone() for p in parent.net.parameters()]
    assert gen.attempt == 1  # screened again before giving up
    assert [b.change.op for b in gen.to_train] == ["B"]  # never empty: the parent goes on
    (copy,) = gen.to_train
    assert plan.branches == [copy] and plan.epochs == 10
    assert copy.id != parent.id and copy.net is not parent.net and copy.parent == parent.id
    assert surgeon.history.fallbacks == [
        {"generation": 1, "kept": [parent.id], "reason": "every screened candidate diverged: "
         f"the parents go on unchanged as #{copy.id}"}
    ]
    screened = [d for d in surgeon.history.diverged if d["stage"] == "screening"]
    assert screened and all(d["generation"] == 1 for d in screened)

    # the copy diverges during its cycle: the generation keeps the untouched parent
    _poison(copy.net)
    plan = surgeon.step([0.99])
    assert gen.survivors == [parent]
    assert all(torch.equal(a, b) for a, b in zip(parent.net.parameters(), weights, strict=True))
    assert surgeon.history.diverged[-1] == {
        "branch": copy.id, "parent": parent.id, "generation": 1, "epochs": 15,
        "stage": "training",
    }
    assert surgeon.history.fallbacks[-1] == {
        "generation": 1, "kept": [parent.id],
        "reason": "every trained branch diverged: the parents are kept",
    }
    assert plan.kind == "end" and plan.branches == [parent]


def test_root_that_diverges_in_its_initial_epochs_restarts_from_the_untrained_start():
    def poison_trained(branch, batches):
        if batches:
            _poison(branch.net)
        return 0.3

    script = Script(train_gain=0.2)
    script.screen = poison_trained
    train = script.train

    def train_and_poison(branch, epochs):
        if epochs:
            _poison(branch.net)
        return train(branch, epochs)

    net = _net()
    start = [p.clone() for p in net.parameters()]
    surgeon = Surgeon(
        SurgerySettings(max_epochs=25, initial_epochs=5, epoch_step=10),
        train_and_poison, poison_trained,
    )
    best = surgeon.run(net)
    assert _all_finite(best.net)
    assert all(torch.equal(a, b) for a, b in zip(best.net.parameters(), start, strict=True))
    assert best.parent is None and best.epochs == 0 and best.metric == 0.3
    history = surgeon.history
    assert history.diverged[0] == {
        "branch": 0, "parent": None, "generation": 0, "epochs": 5, "stage": "training"
    }
    assert history.fallbacks[0]["generation"] == 0 and history.fallbacks[0]["kept"] == [best.id]
    assert "untrained start network" in history.fallbacks[0]["reason"]
    assert {f["generation"] for f in history.fallbacks} == {0, 1, 2}
    assert surgeon.start_net is None  # only kept until the initial training is over
    again = History.from_dict(json.loads(json.dumps(history.to_dict())))
    assert (again.diverged, again.fallbacks) == (history.diverged, history.fallbacks)


def test_start_network_is_part_of_the_surgeon_state():
    surgeon = _surgeon(Script())
    net = _net()
    surgeon.start(net)
    other = _surgeon(Script())
    other.load_state_dict(surgeon.state_dict())
    assert other.start_net["topology"] == net.topology.to_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(other.start_net["weights"][k], v)


def test_winner_ignores_diverged_branches():
    a = Branch(0, None, metric=math.nan, score=0.9)
    b = Branch(1, None, metric=0.5, score=0.1)
    assert _surgeon(Script()).winner([a, b]) is b
    assert _surgeon(Script(), select_by="score").winner([a, b]) is b


def _drive(surgeon, script, plan, steps=None):
    """Train each plan's branches with ``script`` and step, ``steps`` times or to the end;
    returns the plans, each with the boundary that the surgeon set for it."""
    plans = []
    while plan.kind != "end" and (steps is None or len(plans) < steps):
        plan = surgeon.step([script.train(b, plan.epochs) for b in plan.branches])
        plans.append((plan, surgeon.next_boundary))
    return plans


def test_step_plans_each_cycle_and_a_retry_lengthens_the_run():
    script = _retrying_script()
    surgeon = _surgeon(script, max_epochs=25, initial_epochs=5, epoch_step=10, max_retries=2)
    assert surgeon.next_boundary is None
    with pytest.raises(RuntimeError, match="no cycle is planned"):
        surgeon.step([])
    first = surgeon.start(_net())
    assert (first.kind, first.generation, first.epochs, surgeon.next_boundary) == (
        "initial", 0, 5, 5)
    assert first.branches == surgeon.branches and first.branches[0].parent is None
    with pytest.raises(ValueError, match="expected 1 metrics, got 2"):
        surgeon.step([0.5, 0.5])
    plans = _drive(surgeon, script, first)
    assert [(p.kind, p.generation, p.epochs, len(p.branches), at) for p, at in plans] == [
        ("generation", 1, 10, 2, 15),
        ("retry", 1, 10, 2, 25),
        ("generation", 2, 10, 2, 35),
        ("end", 2, 0, 1, None),
    ]
    (winner,) = plans[-1][0].branches
    assert surgeon.branches == [winner] and winner.epochs == 25
    assert (surgeon.extra_epochs, surgeon.planned_epochs, surgeon.done_generations) == (10, 35, 2)
    # the retry trains new candidates of the same generation, the next generation its kept
    retry, second = plans[1][0], plans[2][0]
    assert all(b.generation == 1 for b in retry.branches)
    assert {b.parent for b in second.branches} <= {b.id for b in retry.branches}
    with pytest.raises(RuntimeError, match="no cycle is planned"):
        surgeon.step([0.5])


@pytest.mark.parametrize("steps", [1, 2, 3])  # in generation 1, in its retry, in generation 2
def test_state_dict_is_plain_data_that_resumes_the_run_exactly(tmp_path, steps):
    settings = dict(max_epochs=25, initial_epochs=5, epoch_step=10, max_retries=2)
    full_script = _retrying_script()
    full = _surgeon(full_script, **settings)
    _drive(full, full_script, full.start(_net()))

    script = _retrying_script()
    first = _surgeon(script, **settings)
    plan = _drive(first, script, first.start(_net()), steps)[-1][0]
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = _surgeon(script, seed=1, **settings)  # the state replaces the seed's randomness
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert [b.id for b in resumed.branches] == [b.id for b in plan.branches]
    assert all(a is b for a, b in zip(resumed.open.to_train, resumed.branches, strict=True))
    plans = _drive(resumed, script, replace(plan, branches=resumed.branches))

    assert plans[-1][0].kind == "end"
    assert json.dumps(resumed.history.to_dict()) == json.dumps(full.history.to_dict())
    assert (resumed.extra_epochs, resumed.done_generations) == (10, 2)
    (a,), (b,) = resumed.branches, full.branches
    assert a.id == b.id
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters(),
                                                 strict=True))
