"""Optimiser state follows surgery (lit_surgery.core.optim_state.transfer_state).

After a few real optimiser steps (SGD with momentum, Adam, Adam with AMSGrad, Adagrad),
the state is carried through each operator and compared by value with what the operator
documents: parameters an operator keeps keep their state exactly; the copies of a split
unit (AN) get their parent's state, the first moments split like the weights (times the
share on the scaled side) and the averages of squared gradients copied, so that a step on
the carried state alone keeps the function; new parameters have no state; training goes on.

Example counts come from the Hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st

from lit_surgery.core.network import SurgeryNet, build, param_layout
from lit_surgery.core.operators import OPERATOR_CODES, Mutation, add_neurons, operator
from lit_surgery.core.optim_state import transfer_state
from lit_surgery.core.topology import POSITIVELY_HOMOGENEOUS, Layer, Topology

ALL_ACTS = ("relu", "leaky_relu", "linear", "tanh", "sigmoid", "gelu")
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "amsgrad": (torch.optim.Adam, {"lr": 1e-3, "amsgrad": True}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
}
# The moment tensors of each optimiser, and whether AN splits them like the weights (first
# moments) or copies them (averages of squared gradients).
MOMENTS = {
    "sgd": {"momentum_buffer": True},
    "adam": {"exp_avg": True, "exp_avg_sq": False},
    "amsgrad": {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False},
    "adagrad": {"sum": False},
}
kinds = st.sampled_from(sorted(OPTIMIZERS))
seeds = st.integers(0, 10_000)


# --------------------------------------------------------------------------- helpers


@st.composite
def topologies(draw, min_depth=1, max_depth=3):
    depth = draw(st.integers(min_depth, max_depth))
    hidden = tuple(
        Layer(draw(st.integers(1, 8)), draw(st.sampled_from(ALL_ACTS)), draw(st.booleans()))
        for _ in range(depth)
    )
    return Topology(draw(st.integers(1, 8)), hidden, draw(st.integers(1, 4)))


def batch(topology: Topology, seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, topology.input_size, generator=gen, dtype=dtype)
    y = torch.randn(16, topology.output_size, generator=gen, dtype=dtype)
    return x, y


def step(net: SurgeryNet, opt: torch.optim.Optimizer, seed: int) -> None:
    x, y = batch(net.topology, seed, next(net.parameters()).dtype)
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    opt.step()


def optimizer(net: SurgeryNet, kind: str) -> torch.optim.Optimizer:
    cls, hyper = OPTIMIZERS[kind]
    return cls(net.parameters(), **hyper)


def trained(topology: Topology, seed: int, kind: str, steps: int = 2, dtype=torch.float32):
    torch.manual_seed(seed)
    net = build(topology).to(dtype)
    opt = optimizer(net, kind)
    for s in range(steps):
        step(net, opt, seed + s)
    return net, opt


def carry(net, opt, mutation: Mutation, kind: str):
    """Transfer, build the new optimiser, load; returns (new_state, new_opt)."""
    old_shapes = [p.shape for p in net.parameters()]
    new_state = transfer_state(opt.state_dict(), mutation.param_map, old_shapes)
    new_opt = optimizer(mutation.net, kind)
    new_opt.load_state_dict(new_state)
    return new_state, new_opt


def old_state(opt: torch.optim.Optimizer) -> list[dict]:
    """State per parameter, in order (cloned)."""

    def clone(v):
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    return [{k: clone(v) for k, v in opt.state[p].items()} for p in opt.param_groups[0]["params"]]


def assert_same_state(got: dict, want: dict, where) -> None:
    assert got.keys() == want.keys(), where
    for key, value in want.items():
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value)), (where, key)


def apply(code: str, net: SurgeryNet, layer: int, amount: int, seed: int) -> Mutation:
    op = operator(code)
    if code == "B":
        return op.apply(net)
    if code == "AN":
        return op.apply(net, layer, amount, generator=torch.Generator().manual_seed(seed))
    if code in ("AL", "RL"):
        return op.apply(net, layer)
    return op.apply(net, layer, amount)


# --------------------------------------------------------------------------- B


@given(topologies(), seeds, kinds)
def test_base_keeps_every_state_tensor(topo, seed, kind):
    net, opt = trained(topo, seed, kind)
    before = old_state(opt)
    m = operator("B").apply(net)
    new_state, new_opt = carry(net, opt, m, kind)
    new_params = list(m.net.parameters())
    assert sorted(new_state["state"]) == list(range(len(new_params)))
    for i, p in enumerate(new_params):
        assert_same_state(new_opt.state[p], before[i], i)
    step(m.net, new_opt, seed + 100)
    assert all(torch.isfinite(p).all() for p in new_params)


# --------------------------------------------------------------------------- AN


def split_layout(topo: Topology, layer: int) -> tuple[int, int | None, int]:
    """Positions of the widened layer's weight and bias and of the next layer's weight."""
    w_pos = sum(1 + h.bias for h in topo.hidden[:layer])
    b_pos = w_pos + 1 if topo.hidden[layer].bias else None
    return w_pos, b_pos, w_pos + 1 + topo.hidden[layer].bias


@given(topologies(), seeds, kinds, st.sampled_from(["asymmetric", "equal"]), st.data())
def test_add_neurons_state_follows_the_split(topo, seed, kind, split, data):
    """Copy j of unit p: on the side whose weights were scaled by the share a_j (incoming
    for ReLU-like units, outgoing otherwise) the first moments are p's times a_j; all other
    slices (the other side, averages of squared gradients, step counts) are p's as they
    are. Other parameters keep their state."""
    layer = data.draw(st.integers(0, topo.depth - 1))
    width = topo.hidden[layer].width
    amount = data.draw(st.integers(1, 2 * width + 1))
    net, opt = trained(topo, seed, kind)
    before = old_state(opt)
    m = add_neurons(net, layer, amount, split=split, generator=torch.Generator().manual_seed(seed))
    new_state, new_opt = carry(net, opt, m, kind)
    new_params = list(m.net.parameters())
    assert sorted(new_state["state"]) == list(range(len(new_params)))

    w_pos, b_pos, next_pos = split_layout(topo, layer)
    parent = m.param_map[w_pos].index[0]  # checked against the weights in test_operators
    incoming = topo.hidden[layer].activation in POSITIVELY_HOMOGENEOUS
    event(f"{kind}, {split} split, {'incoming' if incoming else 'outgoing'} side")
    side = m.param_map[w_pos].scale[0] if incoming else m.param_map[next_pos].scale[1]
    share = torch.tensor(side, dtype=torch.float32)
    rows = list(parent)
    for i, p in enumerate(new_params):
        got, old = new_opt.state[p], before[i]  # AN keeps the number and order of parameters
        assert got.keys() == old.keys()
        if "step" in old:
            assert torch.equal(torch.as_tensor(got["step"]), torch.as_tensor(old["step"]))
        for key, first_moment in MOMENTS[kind].items():
            if i in (w_pos, b_pos):  # rows: split for an incoming split, else copied
                want, scaled = old[key][rows], incoming and first_moment
                if scaled:
                    want = want * share.view(-1, *[1] * (want.dim() - 1))
            elif i == next_pos:  # columns: split for an outgoing split, else copied
                want, scaled = old[key][:, rows], not incoming and first_moment
                if scaled:
                    want = want * share
            else:
                want, scaled = old[key], False
            if scaled:
                torch.testing.assert_close(got[key], want, rtol=1e-6, atol=0)
            else:
                assert torch.equal(got[key], want), (i, key)
    step(m.net, new_opt, seed + 100)
    assert all(torch.isfinite(p).all() for p in new_params)


@pytest.mark.parametrize("code", ["AL", "AN"])
@given(topo=topologies(), seed=seeds, kind=kinds, data=st.data())
def test_step_on_carried_state_keeps_the_function(code, topo, seed, kind, data):
    """The reason for the rule above: a step driven by the optimiser state alone (zero
    gradient) moves the child exactly as the parent's moves the parent, so they still
    compute the same function (float64). Holds for the operators that keep the function
    and carry every old parameter's state (B trivially)."""
    layer = data.draw(st.integers(0, topo.depth - 1))
    amount = data.draw(st.integers(1, 2 * topo.hidden[layer].width + 1))
    net, opt = trained(topo, seed, kind, dtype=torch.float64)
    if code == "AN":
        split = data.draw(st.sampled_from(["asymmetric", "equal"]))
        m = add_neurons(
            net, layer, amount, split=split, generator=torch.Generator().manual_seed(seed)
        )
    else:
        m = apply(code, net, layer, amount, seed)
    _, new_opt = carry(net, opt, m, kind)
    for model, optim in ((net, opt), (m.net, new_opt)):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optim.step()
    x, _ = batch(topo, seed + 200, torch.float64)
    with torch.no_grad():
        want, got = net(x), m.net(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * (1 + want.abs().max().item()))


@given(topologies(), seeds, kinds, st.data())
def test_equal_split_copies_stay_copies(topo, seed, kind, data):
    """Carried state keeps the split's symmetry as it is: copies of an equal split stay
    copies while training (the reference's defect, kept in its mode; asymmetric copies
    drift apart, tests/test_operators.py). State for the first copy only would not."""
    layer = data.draw(st.integers(0, topo.depth - 1))
    width = topo.hidden[layer].width
    amount = data.draw(st.integers(1, 2 * width + 1))
    net, opt = trained(topo, seed, kind)
    m = add_neurons(
        net, layer, amount, split="equal", generator=torch.Generator().manual_seed(seed)
    )
    _, new_opt = carry(net, opt, m, kind)
    for s in range(2):
        step(m.net, new_opt, seed + 100 + s)
    parent = m.param_map[split_layout(topo, layer)[0]].index[0]
    lin, nxt = m.net.linear(layer), m.net.linear(layer + 1)
    for j in range(width, width + amount):
        p = parent[j]
        torch.testing.assert_close(lin.weight[j], lin.weight[p], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(nxt.weight[:, j], nxt.weight[:, p], rtol=1e-6, atol=1e-7)
        if lin.bias is not None:
            torch.testing.assert_close(lin.bias[j], lin.bias[p], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- AL, RL, OL, T


def kept_from(code: str, layer: int, key: tuple[int, str]) -> tuple[int, str] | None:
    """The old parameter (layer, kind) whose state the new parameter ``key`` keeps whole,
    as each operator's docstring says; None: a new value, no state."""
    i, kind = key
    if code == "AL":  # the identity layer inserted after ``layer`` is new
        return None if i == layer + 1 else (i - (i > layer + 1), kind)
    if code == "RL":  # ``layer`` merged into the next: the merged layer is new
        return None if i == layer else (i + (i > layer), kind)
    if code == "OL":  # rotated: the layer and the next weight; the next bias stays
        return None if i == layer or key == (layer + 1, "weight") else key
    if code == "T":  # new factor layer, then U_k (new) with the old layer's bias
        return None if i == layer or key == (layer + 1, "weight") else (i - (i > layer), kind)
    raise AssertionError(code)


@st.composite
def operations(draw, code: str):
    """A topology, layer and amount that ``code`` accepts."""
    topo = draw(topologies(min_depth=2 if code == "RL" else 1))
    layer = draw(st.integers(0, topo.depth - 1))
    width = topo.hidden[layer].width
    if code == "OL":
        assume(width >= 2)
        return topo, layer, draw(st.integers(1, width - 1))
    if code == "T":
        full = min(width, topo.fan_in(layer))
        assume(full >= 2)
        return topo, layer, width - draw(st.integers(1, full - 1))
    return topo, layer, 0


@pytest.mark.parametrize("code", ["AL", "RL", "OL", "T"])
@given(data=st.data(), seed=seeds, kind=kinds)
def test_operator_state_by_value(code, data, seed, kind):
    topo, layer, amount = data.draw(operations(code))
    net, opt = trained(topo, seed, kind)
    before = old_state(opt)
    m = apply(code, net, layer, amount, seed)
    new_state, new_opt = carry(net, opt, m, kind)
    old_pos = {key: i for i, key in enumerate(param_layout(topo))}
    new_params = list(m.net.parameters())
    fresh = []
    for i, (key, p) in enumerate(zip(param_layout(m.net.topology), new_params, strict=True)):
        origin = old_pos.get(kept_from(code, layer, key))
        if origin is None:
            assert i not in new_state["state"] and not new_opt.state[p], (code, key)
            fresh.append(p)
        else:
            assert_same_state(new_opt.state[p], before[origin], (code, key))
    assert fresh, f"{code} made no new parameter"
    step(m.net, new_opt, seed + 100)
    assert all(new_opt.state[p] for p in new_params)  # the new ones now have state too
    assert all(torch.isfinite(p).all() for p in new_params)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("code", ["B", "AN", "AL"])
def test_transfer_does_not_share_state_with_old_optimizer(kind, code):
    topo = Topology(4, (Layer(5), Layer(3)), 2)
    net, opt = trained(topo, 0, kind)
    saved = opt.state_dict()
    frozen = copy.deepcopy(saved)
    m = apply(code, net, 0, 2, 0)
    _, new_opt = carry(net, opt, m, kind)
    step(m.net, new_opt, 100)
    for pid, entry in frozen["state"].items():
        for key in MOMENTS[kind]:
            assert torch.equal(saved["state"][pid][key], entry[key]), (pid, key)


def test_transfer_does_not_modify_input_state_dict():
    topo = Topology(4, (Layer(5), Layer(3)), 2)
    for kind in OPTIMIZERS:
        net, opt = trained(topo, 0, kind)
        saved = opt.state_dict()
        frozen = copy.deepcopy(saved)
        for code in OPERATOR_CODES:
            m = apply(code, net, 0, 2, 0)
            transfer_state(saved, m.param_map, [p.shape for p in net.parameters()])
        assert saved["param_groups"] == frozen["param_groups"]
        for pid, entry in frozen["state"].items():
            for key, value in entry.items():
                got = torch.as_tensor(saved["state"][pid][key])
                assert torch.equal(got, torch.as_tensor(value))


def test_state_of_untrained_optimizer_transfers_to_nothing():
    topo = Topology(4, (Layer(5),), 2)
    torch.manual_seed(0)
    net = build(topo)
    opt = torch.optim.Adam(net.parameters())
    m = operator("AN").apply(net, 0, 3, generator=torch.Generator().manual_seed(0))
    new_state = transfer_state(opt.state_dict(), m.param_map, [p.shape for p in net.parameters()])
    assert new_state["state"] == {}
    new_opt = torch.optim.Adam(m.net.parameters())
    new_opt.load_state_dict(new_state)
    step(m.net, new_opt, 1)


def test_hyperparameters_are_carried():
    topo = Topology(4, (Layer(5),), 2)
    net, opt = trained(topo, 0, "sgd")
    m = operator("B").apply(net)
    new_state = transfer_state(opt.state_dict(), m.param_map, [p.shape for p in net.parameters()])
    group = new_state["param_groups"][0]
    assert group["lr"] == 0.01 and group["momentum"] == 0.9


# --------------------------------------------------------------------------- errors


def test_more_than_one_param_group_raises():
    topo = Topology(4, (Layer(5),), 2)
    torch.manual_seed(0)
    net = build(topo)
    params = list(net.parameters())
    opt = torch.optim.SGD(
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], lr=0.01, momentum=0.9
    )
    step(net, opt, 0)
    m = operator("B").apply(net)
    with pytest.raises(ValueError, match="group"):
        transfer_state(opt.state_dict(), m.param_map, [p.shape for p in params])


@pytest.mark.parametrize("delta", [-1, 1])
def test_mismatched_number_of_shapes_raises(delta):
    topo = Topology(4, (Layer(5),), 2)
    net, opt = trained(topo, 0, "adam")
    shapes = [p.shape for p in net.parameters()]
    shapes = shapes[:-1] if delta < 0 else [*shapes, torch.Size([3])]
    m = operator("B").apply(net)
    with pytest.raises(ValueError):
        transfer_state(opt.state_dict(), m.param_map, shapes)
