"""Optimiser state follows surgery (lit_surgery.optim_state.transfer_state).

After a few real SGD (momentum) or Adam steps, the state dict is carried through each
operator's parameter map: the new optimiser loads it, carried slices keep their state,
new slices start at zero, parameters with no source have no state, and training goes on.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lit_surgery.network import SurgeryNet, build
from lit_surgery.operators import OPERATOR_CODES, Mutation, OperatorError, operator
from lit_surgery.optim_state import transfer_state
from lit_surgery.topology import Layer, Topology

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
}
MOMENT_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}


# --------------------------------------------------------------------------- helpers


@st.composite
def topologies(draw, min_depth=1, max_depth=3):
    depth = draw(st.integers(min_depth, max_depth))
    hidden = tuple(
        Layer(
            draw(st.integers(1, 8)),
            draw(st.sampled_from(["relu", "leaky_relu", "linear", "tanh"])),
            draw(st.booleans()),
        )
        for _ in range(depth)
    )
    return Topology(draw(st.integers(1, 8)), hidden, draw(st.integers(1, 4)))


def batch(topology: Topology, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, topology.input_size, generator=gen)
    y = torch.randn(16, topology.output_size, generator=gen)
    return x, y


def step(net: SurgeryNet, opt: torch.optim.Optimizer, seed: int) -> None:
    x, y = batch(net.topology, seed)
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    opt.step()


def trained(topology: Topology, seed: int, kind: str, steps: int = 3):
    torch.manual_seed(seed)
    net = build(topology)
    cls, hyper = OPTIMIZERS[kind]
    opt = cls(net.parameters(), **hyper)
    for s in range(steps):
        step(net, opt, seed + s)
    return net, opt


def carry(net, opt, mutation: Mutation, kind: str):
    """Transfer, build the new optimiser, load; returns (new_state, new_opt)."""
    old_shapes = [p.shape for p in net.parameters()]
    new_state = transfer_state(opt.state_dict(), mutation.param_map, old_shapes)
    cls, hyper = OPTIMIZERS[kind]
    new_opt = cls(mutation.net.parameters(), **hyper)
    new_opt.load_state_dict(new_state)
    return new_state, new_opt


def old_state(opt: torch.optim.Optimizer) -> list[dict]:
    """State per parameter, in order (cloned)."""

    def clone(v):
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    return [{k: clone(v) for k, v in opt.state[p].items()} for p in opt.param_groups[0]["params"]]


def expected_moment(old: torch.Tensor, index, shape) -> torch.Tensor:
    """Element by element: new[pos] = old[index[pos]], zero where any index is -1."""
    dims = [
        index[d] if d < len(index) and index[d] is not None else tuple(range(old.shape[d]))
        for d in range(old.dim())
    ]
    out = torch.zeros(shape, dtype=old.dtype)
    for pos in itertools.product(*(range(n) for n in shape)):
        src = tuple(dims[d][pos[d]] for d in range(len(shape)))
        if all(j >= 0 for j in src):
            out[pos] = old[src]
    return out


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


@SETTINGS
@given(topologies(), st.integers(0, 10_000), st.sampled_from(sorted(OPTIMIZERS)))
def test_base_keeps_every_state_tensor(topo, seed, kind):
    net, opt = trained(topo, seed, kind)
    before = old_state(opt)
    m = operator("B").apply(net)
    new_state, new_opt = carry(net, opt, m, kind)
    new_params = list(m.net.parameters())
    assert sorted(new_state["state"]) == list(range(len(new_params)))
    for i, p in enumerate(new_params):
        got = new_opt.state[p]
        assert got.keys() == before[i].keys()
        for key, value in before[i].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), (i, key)
            else:
                assert got[key] == value
    step(m.net, new_opt, seed + 100)
    assert all(torch.isfinite(p).all() for p in new_params)


# --------------------------------------------------------------------------- AN


@SETTINGS
@given(topologies(), st.integers(0, 10_000), st.sampled_from(sorted(OPTIMIZERS)), st.data())
def test_add_neurons_carries_rows_and_zeros_new_ones(topo, seed, kind, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    width = topo.hidden[layer].width
    amount = data.draw(st.integers(1, 2 * width + 1))
    net, opt = trained(topo, seed, kind)
    before = old_state(opt)
    m = operator("AN").apply(net, layer, amount, generator=torch.Generator().manual_seed(seed))
    _, new_opt = carry(net, opt, m, kind)
    new_params = list(m.net.parameters())

    w_pos = sum(1 + h.bias for h in topo.hidden[:layer])
    b_pos = w_pos + 1 if topo.hidden[layer].bias else None
    next_w_pos = w_pos + 1 + topo.hidden[layer].bias
    for i, p in enumerate(new_params):
        got = new_opt.state[p]
        old = before[i]  # AN keeps the number and order of parameters
        for key in MOMENT_KEYS[kind]:
            value, new_value = old[key], got[key]
            assert new_value.shape == p.shape
            if i in (w_pos, b_pos):
                assert torch.equal(new_value[:width], value)
                assert torch.equal(new_value[width:], torch.zeros_like(new_value[width:]))
            elif i == next_w_pos:
                assert torch.equal(new_value[:, :width], value)
                assert torch.equal(new_value[:, width:], torch.zeros_like(new_value[:, width:]))
            else:
                assert torch.equal(new_value, value)
        if kind == "adam":
            assert torch.equal(torch.as_tensor(got["step"]), torch.as_tensor(old["step"]))
    step(m.net, new_opt, seed + 100)
    assert all(torch.isfinite(p).all() for p in new_params)


# --------------------------------------------------------------------------- AL


@SETTINGS
@given(topologies(), st.integers(0, 10_000), st.sampled_from(sorted(OPTIMIZERS)), st.data())
def test_add_layer_inserted_params_have_no_state(topo, seed, kind, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    net, opt = trained(topo, seed, kind)
    before = old_state(opt)
    m = operator("AL").apply(net, layer)
    new_state, new_opt = carry(net, opt, m, kind)
    new_params = list(m.net.parameters())
    inserted = sum(1 + h.bias for h in topo.hidden[: layer + 1])
    inserted = {inserted, inserted + 1}  # the identity layer's weight and bias
    for i, p in enumerate(new_params):
        if i in inserted:
            assert i not in new_state["state"]
            assert p not in new_opt.state or not new_opt.state[p]
        else:
            old_i = i if i < min(inserted) else i - 2
            for key in MOMENT_KEYS[kind]:
                assert torch.equal(new_opt.state[p][key], before[old_i][key])
    step(m.net, new_opt, seed + 100)
    for i in inserted:  # the new layer now has state too
        assert new_opt.state[new_params[i]]


# --------------------------------------------------------------------------- every operator


@SETTINGS
@given(
    topologies(),
    st.integers(0, 10_000),
    st.sampled_from(sorted(OPTIMIZERS)),
    st.sampled_from(OPERATOR_CODES),
    st.data(),
)
def test_every_operator_state_matches_param_map(topo, seed, kind, code, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    amount = data.draw(st.integers(1, topo.hidden[layer].width + 1))
    net, opt = trained(topo, seed, kind)
    before = old_state(opt)
    try:
        m = apply(code, net, layer, amount, seed)
    except OperatorError:
        return
    new_state, new_opt = carry(net, opt, m, kind)
    new_params = list(m.net.parameters())
    assert new_state["param_groups"][0]["params"] == list(range(len(new_params)))
    for i, (src, p) in enumerate(zip(m.param_map, new_params, strict=True)):
        if src is None:
            assert i not in new_state["state"]
            continue
        old = before[src.param]
        got = new_opt.state[p]
        assert got.keys() == old.keys()
        for key in MOMENT_KEYS[kind]:
            want = expected_moment(old[key], src.index, p.shape)
            assert torch.equal(got[key], want), (code, i, key)
        if kind == "adam":
            assert torch.equal(torch.as_tensor(got["step"]), torch.as_tensor(old["step"]))
    step(m.net, new_opt, seed + 100)
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
        for key in MOMENT_KEYS[kind]:
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
