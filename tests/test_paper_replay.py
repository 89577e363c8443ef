"""Replay: paper mode decides as the reference does.

The reference is the authors' TensorFlow code, ElisabethJS/neural-network-surgery at commit
f6904be, files main/NAS.py (class NasTrainer) and main/Modification.py. Its rules are
restated below in numpy, from its formulas, without lit_surgery's code: the candidates of
``__create_potential_modification_candidates``, the selection of
``__select_from_candidates``, the score of ``Modification.calculate_score``, survival by
``__evaluate_modifications`` and the retry loop of ``__perform_surgery``. Fixed-weight
networks then go through a scripted generation of :class:`Surgeon` in paper mode, and every
decision is compared. Where the reference is broken, paper mode keeps our fix
(docs/METHOD.md, "Paper mode and the reference"); :func:`reference_candidates` applies the
same fixes, each marked.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import yaml

from lit_surgery.core.network import build
from lit_surgery.core.policy import Surgeon
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.state import Branch
from lit_surgery.core.topology import Layer, Topology

# NAS.py, NasTrainer.config: sv_treshold_abs, sv_treshold_rel
ABS, REL = 0.3, 5e-3
# NAS.py, class modificationType: the order in which __select_from_candidates visits types
TYPE_ORDER = ["B", "AN", "AL", "OL", "RL", "T"]


class Cand(NamedTuple):
    op: str
    layer: int | None  # 0-based hidden layer
    amount: int
    weight: float  # the reference's "probability"
    q: float  # the reference's "parameter_increase"

    @property
    def key(self) -> tuple[str, int | None, int]:
        return self.op, self.layer, self.amount


# --------------------------------------------------------------------------- the reference


def reference_candidates(kernels: list[np.ndarray], biases: list[np.ndarray | None]) -> list[Cand]:
    """NAS.py, __create_potential_modification_candidates, for Keras kernels (in x out) of the
    hidden layers and the output layer. Keras' model.layers are [Flatten, hidden..., output],
    so layer_count = L + 2 and the loop ``for i in range(2, layer_count)`` visits hidden layer
    i - 1 (1-based): its units from the layer config, its singular values ``svs[i]`` from
    model.layers[i], the *next* layer's kernel, and ``layer_weight_shape`` from its own."""
    total = sum(k.size for k in kernels) + sum(b.size for b in biases if b is not None)
    depth = len(kernels) - 1
    layer_count = depth + 2
    # "parent is always added": B with probability 1.0 and parameter_increase 1.0
    cands = [Cand("B", None, 0, 1.0, 1.0)]
    for i in range(2, layer_count):
        j = i - 2
        m, n = kernels[j].shape
        bias = 0 if biases[j] is None else 1  # bias_multiplicator
        # Modification.singular_values: np.linalg.svd(kernel, compute_uv=False), min(m, n) values
        sv = np.linalg.svd(kernels[j + 1], compute_uv=False)
        removable = len([s for s in sv if s < ABS or s < REL * sv[0]])
        add = max(2, n // 10)
        remove = min(removable, n - 1)  # the max(1, ...) before it is overwritten
        p_add_neuron = 1 - removable / n
        p_add_layer = p_add_neuron * (i / (layer_count - 1))
        p_remove_neuron = removable / n
        p_remove_layer = p_remove_neuron * (i / (layer_count - 1))
        cands += [
            Cand("AL", j, 0, p_add_layer, (total + n * (n + 1)) / total),
            Cand("RL", j, 0, p_remove_layer, (total - m * n - bias * n) / total),
            Cand("AN", j, add, p_add_neuron, (total + (m + 1) * add) / total),
            Cand("AN", j, add * 10, p_add_neuron, (total + (m + 1) * add * 10) / total),
            Cand("OL", j, remove, p_remove_neuron, (total - (m + bias) * remove) / total),
            Cand("T", j, remove, p_remove_neuron, (total - m * n + (n - remove) * (m + n)) / total),
        ]
    return [c for c in cands if not broken(c, kernels)]


def broken(c: Cand, kernels: list[np.ndarray]) -> bool:
    """The reference's candidates that paper mode does not propose (docs/METHOD.md's table)."""
    if c.op in ("OL", "T") and c.amount == 0:
        return True  # fix: a removal of 0 units is a no-op candidate
    if c.op == "T":
        m, n = kernels[c.layer].shape
        # fix: PerformTruncatedSVD keeps min(n - r, len(s)) units: no truncation at all
        return n - c.amount >= min(m, n)
    return c.op == "RL" and len(kernels) == 2  # fix: the only hidden layer is never removed


def reference_select(untried: list[Cand]) -> list[Cand]:
    """NAS.py, __select_from_candidates without the random member: every B, and per type the
    first after ``cands.sort(key=lambda x: (x.probability, x.parameter_increase),
    reverse=True)`` (a stable sort: the first proposed wins ties)."""
    chosen = []
    for op in TYPE_ORDER:
        of_type = sorted(
            (c for c in untried if c.op == op), key=lambda c: (c.weight, c.q), reverse=True
        )
        chosen += of_type if op == "B" else of_type[:1]
    return chosen


def reference_score(new: float, old: float, q: float) -> float:
    """Modification.calculate_score: new_value + exp(new_value - old_value) * exp(-q)."""
    return new + np.exp(new - old) * np.exp(-q)


def reference_generation(
    cands: list[Cand],
    screen: Callable[[Cand], float],
    train: Callable[[Cand], float],
    last_best_value: float,
    max_retries_per_epoch: int = 3,
    parallel_branches: int = 2,
) -> tuple[list[list[Cand]], dict, list[Cand], Cand]:
    """One generation of NAS.py's __perform_surgery, epoch_step 1 (so the score after
    training compares with the screening value: the only fit is the top-up), and the winner
    of __evaluate_modifications(current_branches, desired_number=1). Returns the rounds'
    selections, every screened candidate's score, the kept and the winner."""
    untried = list(cands)
    rounds, scores, new_branches = [], {}, []
    current_best, current_best_value, tries = None, 0, 0
    final_scores = {}
    while True:
        tries += 1
        selected = reference_select(untried)
        untried = [c for c in untried if c not in selected]  # candidate.trained = True
        if not selected:  # "no more candidates selectable"
            new_branches += [current_best] if current_best else []
            break
        rounds.append(selected)
        for c in selected:
            scores[c.key] = reference_score(screen(c), last_best_value, c.q)
        # __evaluate_modifications: the best parallel_branches by score, stable
        trained = sorted(selected, key=lambda c: scores[c.key], reverse=True)
        for c in trained[:parallel_branches]:
            value = train(c)
            final_scores[c.key] = reference_score(value, screen(c), c.q)
            if value > current_best_value:
                current_best, current_best_value = c, value
            if value >= last_best_value:
                new_branches.append(c)
        if new_branches:
            break
        if max_retries_per_epoch <= tries:
            new_branches.append(current_best)  # __get_last_best
            break
    winner = max(new_branches, key=lambda c: final_scores[c.key])
    return rounds, scores, new_branches, winner


# --------------------------------------------------------------------------- networks


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def _weight(out: int, inn: int, values: list[float] | None, gen: torch.Generator) -> torch.Tensor:
    """A torch weight (out x in) with the given singular values (random ones if None)."""
    if values is None:
        return torch.randn(out, inn, generator=gen, dtype=torch.float64) / math.sqrt(inn)
    k = min(out, inn)
    assert len(values) == k
    u, v = _orthonormal(out, k, gen), _orthonormal(inn, k, gen)
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def _net(topology: Topology, values: list[list[float] | None], seed: int = 0):
    """A network of ``topology`` whose layer ``i`` (the output layer last) has singular values
    ``values[i]``; biases random where the topology has them."""
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for i, vals in enumerate(values):
        out = topology.output_size if i == topology.depth else topology.hidden[i].width
        has_bias = i == topology.depth or topology.hidden[i].bias
        w = _weight(out, topology.fan_in(i), vals, gen).float()
        weights.append((w, torch.randn(out, generator=gen) * 0.1 if has_bias else None))
    return build(topology, weights)


def _keras(net) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Kernels in Keras' layout (in x out), float64 of the same float32 values, and biases."""
    layers = [net.linear(i) for i in range(net.topology.depth + 1)]
    kernels = [lin.weight.detach().double().numpy().T for lin in layers]
    biases = [None if lin.bias is None else lin.bias.detach().double().numpy() for lin in layers]
    return kernels, biases


def mlp(inputs: int, widths: list[int], outputs: int = 10) -> Topology:
    return Topology.mlp(inputs, widths, outputs)


NETWORKS = {
    # 784-[4,4,4]-10: non-square (784 -> 4, 4 -> 10) and square neighbours. Outgoing singular
    # values give r = 2, 1, 3: T at layer 1 (r = 1 of 4 on a square layer) has q > 1
    "784-[4,4,4]-10": (
        mlp(784, [4, 4, 4]),
        [None, [2.0, 1.0, 0.2, 0.01], [1.5, 1.2, 0.9, 0.1], [3.0, 0.25, 0.1, 0.05]],
    ),
    # 784-[10,10,10]-10, nothing removable: every RL weighs 0, and the reference's estimate of
    # q (RL removes m n + n) ranks RL at layer 1 first, where the exact q ties all three
    "784-[10,10,10]-10": (mlp(784, [10, 10, 10]), [None, [1.0] * 10, [1.0] * 10, [1.0] * 10]),
    # the same with square layers that have removable units: T with q >= 1 at layers 1 and 2
    "784-[10,10,10]-10 removable": (
        mlp(784, [10, 10, 10]),
        [None, [2.0] * 7 + [0.2, 0.1, 0.05], [2.0] * 8 + [0.1, 0.01], [2.0] * 9 + [0.01]],
    ),
    # 20-[30,10]-10: 10 outgoing singular values for 30 units: r = 1, where zero padding to
    # the width would add 20; T keeping 29 of 30 units of a rank-20 weight truncates nothing
    "20-[30,10]-10": (mlp(20, [30, 10]), [None, [3.0] * 9 + [0.1], [1.0] * 10]),
    # linear and bias-free layers (as T and AL leave them), ReLU around them
    "12-[6r,3l*,6l,6r]-4": (
        Topology(12, (Layer(6), Layer(3, "linear", False), Layer(6, "linear"), Layer(6)), 4),
        [
            None,
            [2.0, 1.0, 0.1],
            [1.0, 0.5, 0.01],
            [2.0, 1.0, 0.5, 0.4, 0.2, 0.1],
            [1.0, 0.9, 0.8, 0.05],
        ],
    ),
    # one hidden layer: the reference would remove it (no fix needed for AN, AL, OL, T)
    "784-[4]-10": (mlp(784, [4]), [None, [1.0, 0.8, 0.2, 0.02]]),
}


def _paper(**overrides) -> SurgerySettings:
    schedule = dict(initial_epochs=1, epoch_step=1, max_epochs=2, include_random=False)
    return SurgerySettings.paper(**{**schedule, **overrides})


def _metric(key: tuple, salt: str, low: float = 0.70) -> float:
    """A scripted validation accuracy in [low, low + 0.2): fixed per candidate, spread."""
    return low + (zlib.crc32(f"{salt}{key}".encode()) % 2000) / 10_000


def _replay(net, settings, screen, train, root_metric):
    """One generation of :class:`Surgeon` with scripted metrics; returns it and the winner."""
    generations = []
    surgeon = Surgeon(
        settings,
        lambda branch, epochs: train(branch.change),
        lambda branch, batches: screen(branch.change),
        on_generation=lambda *args: generations.append(args),
    )
    surgeon.start(net)
    plan = surgeon.step([root_metric])
    while plan.kind != "end":
        plan = surgeon.step([surgeon.train(b, plan.epochs) for b in plan.branches])
    (winner,) = plan.branches
    ((_, records, survivors),) = generations
    return records, survivors, winner


def _key(c) -> tuple[str, int | None, int]:
    return c.op, c.layer, c.amount


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", NETWORKS)
def test_candidates_weights_and_q_are_the_references(name):
    topology, values = NETWORKS[name]
    net = _net(topology, values)
    expected = reference_candidates(*_keras(net))
    surgeon = Surgeon(_paper(), None, lambda b, n: 0.0)
    got = surgeon.propose(net)
    assert sorted(_key(c) for c in got) == sorted(c.key for c in expected if c.op != "B")
    by_key = {c.key: c for c in expected}
    for c in got:
        assert c.weight == pytest.approx(by_key[_key(c)].weight, rel=1e-12), c
        assert c.param_ratio == pytest.approx(by_key[_key(c)].q, rel=1e-12), c


def test_the_cases_each_network_stands_for():
    """What the networks above exercise (guards against a network that tests nothing)."""
    cands = {
        name: {c.key: c for c in reference_candidates(*_keras(_net(*NETWORKS[name])))}
        for name in NETWORKS
    }
    # T on square layers with q >= 1 (r <= n/2), proposed as by the reference
    assert cands["784-[4,4,4]-10"][("T", 1, 1)].q > 1
    assert cands["784-[10,10,10]-10 removable"][("T", 1, 2)].q > 1
    assert cands["784-[10,10,10]-10 removable"][("T", 2, 1)].q > 1
    # unpadded: one removable unit of 30 (padding would count 21)
    assert ("OL", 0, 1) in cands["20-[30,10]-10"]
    assert not any(op == "T" and layer == 0 for op, layer, _ in cands["20-[30,10]-10"])
    # the reference's q of RL: the first layer of a 784-input network looks like most of it
    assert cands["784-[10,10,10]-10"][("RL", 0, 0)].q < 0.05
    # bias-free layer 1: OL removes (m + 0) r, RL m n; AN adds (m + 1) k all the same
    linear = cands["12-[6r,3l*,6l,6r]-4"]
    total = _net(*NETWORKS["12-[6r,3l*,6l,6r]-4"]).topology.num_params
    assert linear[("RL", 1, 0)].q == (total - 18) / total
    assert linear[("AN", 1, 2)].q == (total + 14) / total
    assert linear[("T", 1, 1)].q == 1.0  # - 6 * 3 + 2 * (6 + 3): proposed all the same
    # the only hidden layer is never removed (the reference leaves no hidden layer)
    assert not any(op == "RL" for op, _, _ in cands["784-[4]-10"])


@pytest.mark.parametrize("name", NETWORKS)
def test_selection_scores_survivors_and_winner_are_the_references(name):
    topology, values = NETWORKS[name]
    net = _net(topology, values)
    expected = reference_candidates(*_keras(net))

    def screen(c):
        return _metric(_key(c), "screen")

    def train(c):
        return _metric(_key(c), "train", low=0.72)

    root = 0.8
    rounds, scores, kept, winner = reference_generation(expected, screen, train, root)
    records, survivors, got_winner = _replay(net, _paper(), screen, train, root)

    screened = [r for r in records if r.screen_metric is not None]
    for attempt, selected in enumerate(rounds):
        assert sorted(_key(r) for r in screened if r.attempt == attempt) == sorted(
            c.key for c in selected
        )
    assert len(rounds) == len({r.attempt for r in screened})
    for r in screened:
        assert r.score == pytest.approx(scores[_key(r)], rel=1e-12)
    assert sorted(_key(b.change) for b in survivors) == sorted(c.key for c in kept)
    assert _key(got_winner.change) == winner.key


def test_ties_on_tied_weights_go_as_the_references_estimate_of_q():
    """784-[10,10,10]-10 with nothing removable: RL at layer 1, not the first RL proposed."""
    net = _net(*NETWORKS["784-[10,10,10]-10"])
    expected = {c.op: c.key for c in reference_select(reference_candidates(*_keras(net)))}
    assert expected["RL"] == ("RL", 1, 0) and expected["AN"] == ("AN", 0, 20)
    records, _, _ = _replay(net, _paper(), lambda c: 0.8, lambda c: 0.81, 0.8)
    assert {r.op: _key(r) for r in records if r.screen_metric is not None} == expected
    # with exact q every RL has q = 8070 / 8180: the first (layer 0) would be picked
    exact, _, _ = _replay(net, _paper(criterion="exact"), lambda c: 0.8, lambda c: 0.81, 0.8)
    assert next(_key(r) for r in exact if r.op == "RL" and r.screen_metric is not None) == (
        "RL",
        0,
        0,
    )


def test_winner_by_the_score_after_training():
    """The reference recomputes the score after every training and picks the winner by it:
    here RL at layer 1 leads by the screening score and by accuracy, B by the score after
    the cycle (it gained more), so B wins."""
    net = _net(*NETWORKS["784-[10,10,10]-10"])
    expected = reference_candidates(*_keras(net))
    by_op = {c.op: c for c in reference_select(expected)}
    b, rl = by_op["B"].key, by_op["RL"].key  # q = 1 and q = 8070 / 8180 (the estimate)
    screened = {b: 0.80, rl: 0.83}
    trained = {b: 0.85, rl: 0.851}

    def screen(c):
        return screened.get(_key(c), 0.5)

    def train(c):
        return trained.get(_key(c), 0.5)

    _, scores, kept, winner = reference_generation(expected, screen, train, 0.8)
    assert sorted(c.key for c in kept) == sorted([b, rl]) and winner.key == b
    assert scores[rl] > scores[b]  # by the screening score RL would win
    records, _, got = _replay(net, _paper(), screen, train, 0.8)
    assert _key(got.change) == b and got.metric < trained[rl]
    assert got.score == pytest.approx(reference_score(0.85, 0.80, 1.0))
    assert {_key(r): r.score for r in records if r.screen_metric is not None}[rl] == (
        pytest.approx(scores[rl])
    )


def test_three_selection_rounds_then_the_best_so_far():
    """No trained candidate reaches the previous best: the reference selects 3 times
    (max_retries_per_epoch = 3 counts rounds), then keeps the most accurate one."""
    net = _net(*NETWORKS["784-[4,4,4]-10"])
    expected = reference_candidates(*_keras(net))

    def screen(c):
        return _metric(_key(c), "screen")

    def train(c):
        return _metric(_key(c), "train", low=0.5)  # below the root's 0.8: never kept

    rounds, _, kept, _ = reference_generation(expected, screen, train, 0.8)
    assert len(rounds) == 3 and len(kept) == 1
    records, survivors, got = _replay(net, _paper(), screen, train, 0.8)
    assert {r.attempt for r in records if r.screen_metric is not None} == {0, 1, 2}
    assert [_key(b.change) for b in survivors] == [kept[0].key] == [_key(got.change)]


def test_the_random_member_comes_from_the_unchosen_non_base_candidates():
    """__select_from_candidates draws it from each type's candidates after the chosen one."""
    net = _net(*NETWORKS["784-[4,4,4]-10"])
    cands = reference_candidates(*_keras(net))
    chosen = {c.key for c in reference_select(cands)}
    not_chosen = {c.key for c in cands} - chosen
    for seed in range(5):
        surgeon = Surgeon(_paper(include_random=True), None, lambda b, n: 0.0, seed=seed)
        root = Branch(0, net, metric=0.8)
        pool = [(root, c) for c in surgeon.propose(net)]
        picked = {_key(pool[i][1]) for i in surgeon.select(pool, list(range(len(pool))))}
        assert len(picked - chosen) == 1 and picked - chosen <= not_chosen


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*paper*.yaml")))
def test_paper_configs_make_the_same_choices_as_paper_settings(path):
    config = yaml.safe_load(path.read_text())
    default, paper = SurgerySettings().to_dict(), SurgerySettings.paper().to_dict()
    choices = {k: v for k, v in paper.items() if v != default[k]}
    assert {k: config["model"]["surgery"].get(k) for k in choices} == choices
    # the reference's optimiser: plain SGD at 0.005
    assert config["model"]["optimizer"] == {
        "class_path": "torch.optim.SGD",
        "init_args": {"lr": 0.005},
    }
