"""The growth preset (SurgerySettings.grow): large AN amounts, widening only, one branch."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_surgery.core.criteria import propose
from lit_surgery.core.network import build
from lit_surgery.core.operators import shrink_perturb_
from lit_surgery.core.policy import Surgeon
from lit_surgery.core.settings import SettingsError, SurgerySettings
from lit_surgery.core.topology import Topology

SCHEDULE = dict(max_epochs=20, initial_epochs=5, epoch_step=5)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build(Topology.mlp(20, [4, 4, 4], 3))


def test_add_min_sets_the_fewest_units_an_adds():
    amounts = {(c.layer, c.amount) for c in propose(_net(), SurgerySettings()) if c.op == "AN"}
    assert amounts == {(i, k) for i in range(3) for k in (2, 20)}  # max(2, 0.4), 10x that
    grow = propose(_net(), SurgerySettings.grow())
    assert {c.op for c in grow} == {"AN"}  # widen_only: nothing but AN is proposed
    assert {(c.layer, c.amount) for c in grow} == {(i, k) for i in range(3) for k in (128, 256)}
    with pytest.raises(SettingsError, match=r"^add_min=0 is invalid: an integer >= 1"):
        SurgerySettings(add_min=0)
    with pytest.raises(SettingsError, match=r"^widen_only='yes' is invalid: true or false"):
        SurgerySettings(widen_only="yes")


class Script:
    """Training that always loses accuracy (the defaults would retry); screening flat."""

    def __init__(self) -> None:
        self.trained: list[tuple[str, list[int]]] = []

    def train(self, branch, epochs):
        self.trained.append((branch.change.describe() if branch.change else "root",
                             branch.net.topology.widths))
        return (branch.metric or 0.9) - 0.01

    def screen(self, branch, batches):
        return 0.5


def test_grow_widens_each_narrow_layer_once_with_one_branch_without_retries():
    script = Script()
    exact = dict(perturb_shrink=1.0, perturb_noise=0.0)  # to see the split's own weights
    settings = SurgerySettings.grow(**{**SCHEDULE, "max_epochs": 25}, **exact)
    surgeon = Surgeon(settings, script.train, script.screen)
    best = surgeon.run(_net())
    # the layer with the most inputs per unit (20/4, then 132/4 twice), then none is
    # narrower than 128: B. No retry although every cycle loses accuracy.
    changes = [change for change, _ in script.trained[1:]]
    assert changes == ["AN@0 x128", "AN@1 x128", "AN@2 x128", "B"]
    assert surgeon.history.epochs_trained == 25  # the schedule's epochs, one branch
    assert best.net.topology.widths == [132, 132, 132]
    assert {r.op for r in surgeon.history.candidates if r.generation < 4} == {"AN"}
    # split="fresh": 4 units split once each, the other 124 new and silent (docs/METHOD.md)
    assert not best.net.linear(3).weight[:, 8:].any()
    assert best.net.linear(3).weight[:, :8].all()


def test_grow_goes_on_unchanged_where_the_budget_allows_no_widening():
    script = Script()
    settings = SurgerySettings.grow(**SCHEDULE, max_params=_net().topology.num_params + 1)
    surgeon = Surgeon(settings, script.train, script.screen)
    best = surgeon.run(_net())
    assert [change for change, _ in script.trained[1:]] == ["B"] * 3
    assert surgeon.history.fallbacks == []  # a screened B, not the fallback for divergence
    assert best.net.topology.widths == [4, 4, 4]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return all(torch.equal(p, q) for p, q in pairs)


def test_shrink_perturb_moves_each_entry_within_its_bound_reproducibly():
    net, before = _net(), _net()
    shrink_perturb_(net, 0.5, 0.1, torch.Generator().manual_seed(1))
    for i in range(4):
        new, old = net.linear(i), before.linear(i)
        bound = 0.1 / old.weight.shape[1] ** 0.5  # noise times torch's default bound
        for p, q in ((new.weight, old.weight), (new.bias, old.bias)):
            moved = (p - 0.5 * q).abs()
            assert moved.max() <= bound * (1 + 1e-6)
            assert moved.max() > bound / 2  # the noise was drawn, not left out
    again = shrink_perturb_(_net(), 0.5, 0.1, torch.Generator().manual_seed(1))
    assert _same(net, again)


def test_shrink_without_noise_scales_a_bias_free_relu_network_and_1_0_is_identity():
    net = _net()
    with torch.no_grad():
        for i in range(4):
            net.linear(i).bias.zero_()
    x = torch.randn(16, 20)
    out = net(x)
    same = shrink_perturb_(copy.deepcopy(net), 1.0, 0.0)
    assert _same(net, same)
    torch.testing.assert_close(shrink_perturb_(net, 0.5, 0.0)(x), out * 0.5**4)  # 4 layers


def _first_widening(**overrides) -> tuple:
    script = Script()
    settings = SurgerySettings.grow(**{**SCHEDULE, "max_epochs": 25}, **overrides)
    surgeon = Surgeon(settings, script.train, script.screen, seed=3)
    surgeon.start(_net())
    (child,) = surgeon.step([0.5]).branches
    return surgeon, child


def test_grow_shrinks_and_perturbs_each_widened_network_and_nothing_else():
    grow = SurgerySettings.grow()
    assert (grow.perturb_shrink, grow.perturb_noise) == (0.5, 0.5)
    surgeon, child = _first_widening()
    exact_surgeon, exact = _first_widening(perturb_shrink=1.0, perturb_noise=0.0)
    assert child.change.describe() == exact.change.describe() == "AN@0 x128"
    assert not exact.net.linear(1).weight[:, 8:].any()  # silent new units without it
    # the widened network, shrunk and perturbed with the noise the policy's generator draws
    # next (so a resumed run draws the same)
    expected = shrink_perturb_(copy.deepcopy(exact.net), 0.5, 0.5, exact_surgeon.generator)
    assert _same(child.net, expected)
    for _ in range(2):
        (parent,) = surgeon.step([0.5]).branches
    (copy_,) = surgeon.step([0.5]).branches  # nothing narrow is left: B, an exact copy
    assert copy_.change.describe() == "B"
    assert _same(copy_.net, parent.net)
