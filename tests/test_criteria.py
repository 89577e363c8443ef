import math

import pytest
import torch

from lit_surgery.core.criteria import (
    Candidate,
    best_per_type,
    depth_factor,
    propose,
    rank_key,
    removable,
    singular_values,
)
from lit_surgery.core.network import build
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.topology import Topology


@pytest.mark.parametrize(
    ("values", "abs_t", "rel_t", "expected"),
    [
        ([5.0, 1.0, 0.2, 0.01], 0.3, 5e-3, 2),  # absolute threshold
        ([100.0, 0.6, 0.4], 0.3, 5e-3, 1),  # relative: 0.5 > 0.3 decides
        ([1.0, 0.9, 0.8], 0.3, 5e-3, 0),
        ([0.1, 0.1], 0.3, 5e-3, 2),
        ([], 0.3, 5e-3, 0),
    ],
)
def test_removable_counts(values, abs_t, rel_t, expected):
    assert removable(torch.tensor(values), abs_t, rel_t) == expected


def test_depth_factor_grows_to_one():
    assert [depth_factor(i, 3) for i in range(3)] == [0.5, 0.75, 1.0]


def _net(diag0, diag1):
    """4-4-4-3 ReLU net whose hidden weights are diagonal with the given values."""
    net = build(Topology.mlp(4, [4, 4], 3))
    with torch.no_grad():
        net.linear(0).weight.copy_(torch.diag(torch.tensor(diag0)))
        net.linear(1).weight.copy_(torch.diag(torch.tensor(diag1)))
    return net


def test_singular_values_incoming_outgoing_and_padding():
    net = _net([1.0, 1.0, 0.1, 0.01], [2.0, 0.5, 0.2, 0.05])
    assert torch.allclose(singular_values(net, 0, "incoming"), torch.tensor([1.0, 1.0, 0.1, 0.01]))
    assert torch.allclose(singular_values(net, 0, "outgoing"), torch.tensor([2.0, 0.5, 0.2, 0.05]))
    wide = build(Topology.mlp(3, [5], 2))
    s = singular_values(wide, 0, "incoming")
    assert s.shape == (5,) and torch.all(s[3:] == 0) and torch.all(s[:3] > 0)
    with pytest.raises(ValueError, match="sv_source"):
        singular_values(net, 0, "sideways")
    # the reference's count: min(n_in, n_out) values, no zeros for the missing rank
    assert torch.equal(singular_values(wide, 0, "incoming", pad=False), s[:3])


def _by(cands, op, layer):
    return [c for c in cands if c.op == op and c.layer == layer]


def test_proposal_weights_amounts_and_ratios():
    net = _net([1.0, 1.0, 0.1, 0.01], [2.0, 1.5, 1.2, 1.0])
    cands = propose(net, SurgerySettings(sv_source="incoming"))
    # layer 0: r = 2 of 4, d = 2/3; layer 1: r = 0, d = 1
    an0 = _by(cands, "AN", 0)
    assert sorted(c.amount for c in an0) == [2, 20] and all(c.weight == 0.5 for c in an0)
    (al0,) = _by(cands, "AL", 0)
    assert al0.weight == pytest.approx(0.5 * 2 / 3) and al0.activation == "relu"
    (ol0,) = _by(cands, "OL", 0)
    assert ol0.amount == 2 and ol0.weight == 0.5
    (rl0,) = _by(cands, "RL", 0)
    assert rl0.weight == pytest.approx(0.5 * 2 / 3)
    # T at rank 2 of a 4x4 weight saves nothing (8 + 12 vs 20): not proposed
    assert not _by(cands, "T", 0)
    assert not _by(cands, "OL", 1) and not _by(cands, "T", 1)
    assert all(c.weight == 1.0 for c in _by(cands, "AN", 1))
    for c in cands:
        assert c.param_ratio > 0
    start = net.topology.num_params
    assert ol0.param_ratio == pytest.approx((start - 2 * 4 - 2 - 2 * 4) / start)


def test_paper_criterion_estimates_q_and_keeps_t_that_saves_nothing():
    net = _net([1.0, 1.0, 0.1, 0.01], [2.0, 1.5, 1.2, 1.0])  # 4-[4, 4]-3, 55 parameters
    cands = propose(net, SurgerySettings(sv_source="incoming", criterion="paper"))
    (t0,) = _by(cands, "T", 0)  # rank 2 of 4x4: 2 x (4 + 4) weights for 4 x 4: no saving
    assert t0.amount == 2 and t0.param_ratio == (55 - 4 * 4 + 2 * (4 + 4)) / 55 == 1
    (ol0,) = _by(cands, "OL", 0)  # the reference leaves out the next layer's weights
    assert ol0.param_ratio == (55 - (4 + 1) * 2) / 55
    assert {c.param_ratio for c in _by(cands, "AN", 1)} == {(55 + 5 * 2) / 55, (55 + 5 * 20) / 55}


def test_outgoing_source_counts_from_next_layer():
    net = _net([1.0, 1.0, 1.0, 1.0], [0.01, 0.01, 0.01, 2.0])
    incoming = propose(net, SurgerySettings(sv_source="incoming"))
    outgoing = propose(net, SurgerySettings(sv_source="outgoing"))
    assert not _by(incoming, "OL", 0)
    (ol,) = _by(outgoing, "OL", 0)
    assert ol.amount == 3


def test_type_weights_and_al_activation_setting():
    net = _net([1.0, 1.0, 0.1, 0.01], [2.0, 1.5, 1.2, 1.0])
    settings = SurgerySettings(type_weights={"AN": 0.0, "OL": 2.0}, al_activation="linear")
    cands = propose(net, settings)
    assert all(c.weight == 0 for c in cands if c.op == "AN")
    assert _by(cands, "OL", 0)[0].weight == 1.0
    assert all(c.activation == "linear" for c in cands if c.op == "AL")


def test_an_amounts_follow_the_settings():
    net = _net([1.0, 1.0, 0.1, 0.01], [2.0, 1.5, 1.2, 1.0])  # width 4
    cands = propose(net, SurgerySettings(add_fraction=1.0, add_multiplier=3))
    assert sorted(c.amount for c in _by(cands, "AN", 0)) == [4, 12]


def test_non_finite_layer_gets_remove_layer_with_weight_one():
    net = _net([1.0, 1.0, 0.1, 0.01], [2.0, 1.5, 1.2, 1.0])
    with torch.no_grad():
        net.linear(1).weight[0, 0] = math.nan
    cands = propose(net, SurgerySettings())
    # layer 0's outgoing matrix and layer 1's incoming are the bad matrix
    assert [(c.op, c.layer, c.weight) for c in cands if c.layer == 1] == [("RL", 1, 1.0)]
    assert [(c.op, c.weight) for c in cands if c.layer == 0] == [("RL", 1.0)]


def test_ranking_paper_prefers_big_growth_modest_prefers_small():
    small = Candidate("AN", 0, 2, 0.8, 1.2)
    big = Candidate("AN", 0, 20, 0.8, 3.0)
    heavy = Candidate("AN", 1, 2, 0.9, 1.5)
    assert best_per_type([small, big], "paper") == [big]
    assert best_per_type([small, big], "modest") == [small]
    assert best_per_type([small, big, heavy], "paper") == [heavy]  # weight first
    assert rank_key(small, "modest") > rank_key(big, "modest")
    with pytest.raises(ValueError, match="ranking"):
        rank_key(small, "best")


def test_bottleneck_ranking_widens_the_most_compressive_saturated_layer():
    net = build(Topology.mlp(64, [4, 4, 4], 10))  # random init: no removable units
    settings = SurgerySettings(sv_threshold_abs=0.0, sv_threshold_rel=0.0)
    cands = [c for c in propose(net, settings) if c.op == "AN"]
    assert best_per_type(cands, "bottleneck")[0].layer == 0  # 64 inputs per 4 units
    assert best_per_type(cands, "modest")[0].layer == 1  # the cheapest widening
    assert best_per_type(cands, "bottleneck")[0].amount == 2  # then the smaller change


def test_size_budget_drops_growth_above_it_and_keeps_shrinking_steps():
    torch.manual_seed(0)
    net = build(Topology.mlp(64, [8, 8], 10))  # 680 parameters
    before = net.topology.num_params
    free = propose(net, SurgerySettings())
    assert any(before * c.param_ratio > 1000 for c in free)  # the budget has work to do
    budget = propose(net, SurgerySettings(max_params=1000))
    assert budget and all(round(before * c.param_ratio) <= 1000 for c in budget)
    assert {c for c in free if round(before * c.param_ratio) <= 1000} == set(budget)
    # a start above the budget may still shrink, never grow
    above = propose(net, SurgerySettings(max_params=100))
    assert above and all(c.param_ratio < 1 for c in above)
