"""The growth preset (SurgerySettings.grow): large AN amounts, widening only, one branch."""

from __future__ import annotations

import pytest
import torch

from lit_surgery.core.criteria import propose
from lit_surgery.core.network import build
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
    settings = SurgerySettings.grow(**{**SCHEDULE, "max_epochs": 25})
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
