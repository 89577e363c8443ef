"""AN's ``split="fresh"`` (lit_surgery.core.operators.add_neurons): each unit is split at
most once and the other new units are fresh (default initial incoming weights, zero
outgoing weights). Checked: the function is kept (dense layers and conv blocks, batch norm
in train and eval mode), the mutation contract holds, the new units' outgoing weights are
zero, the map and the carried optimiser state mark them new, a step on the carried state
alone keeps the function, and one SGD step moves the widened layer's output at most twice
as far as the parent's, where the asymmetric split of 4 units into 132 moves it 33 times
as far (the collapse of docs/METHOD.md, "Growing a start that is too small")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_conv_operators import BLOCKS, CASES, assert_same, case, checked, inputs
from test_conv_operators import make_net as make_cnn
from test_operators import (
    ALL_ACTS,
    assert_gradients_follow_map,
    assert_same_function,
    check_mutation,
    dtypes,
    make_inputs,
    make_net,
    mapped,
    seeds,
    snapshot,
    topologies,
)

from lit_surgery.core.network import SurgeryNet, build
from lit_surgery.core.operators import Mutation, add_neurons
from lit_surgery.core.optim_state import transfer_state
from lit_surgery.core.topology import POSITIVELY_HOMOGENEOUS, Layer, Topology


def positions(topo: Topology, layer: int) -> tuple[int, int | None, int]:
    """Positions of the widened layer's weight and bias and of the next layer's weight
    (dense layers)."""
    w = sum(1 + h.bias for h in topo.hidden[:layer])
    b = w + 1 if topo.hidden[layer].bias else None
    return w, b, w + 1 + topo.hidden[layer].bias


def fresh(net: SurgeryNet, layer: int, amount: int, seed: int = 0) -> Mutation:
    gen = torch.Generator().manual_seed(seed)
    return add_neurons(net, layer, amount, split="fresh", generator=gen)


@given(topologies(ALL_ACTS), seeds, dtypes, st.data())
def test_fresh_split_is_exact_and_the_new_units_are_silent(topo, seed, dtype, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    n = topo.hidden[layer].width
    amount = data.draw(st.integers(1, 3 * n + 2))
    net = make_net(topo, seed, dtype)
    before = snapshot(net)
    m = fresh(net, layer, amount, seed)
    assert m.net.topology.hidden[layer].width == n + amount
    assert_same_function(net, m.net, make_inputs(topo, seed, dtype))
    check_mutation(net, before, m)
    if dtype == torch.float64:
        assert_gradients_follow_map(net, m, seed)

    w_pos, b_pos, next_pos = positions(topo, layer)
    rows, cols = m.param_map[w_pos], m.param_map[next_pos]
    parent = rows.index[0]
    assert cols.index == (None, parent)
    split = min(amount, n)  # each unit split at most once
    new = n + amount - (n + split)
    assert parent[: n + split] == tuple(range(n)) + tuple(sorted(parent[n : n + split]))
    assert len(set(parent[n : n + split])) == split
    incoming = topo.hidden[layer].activation in POSITIVELY_HOMOGENEOUS
    if new == 0:  # nothing fresh: exactly the asymmetric split
        other = add_neurons(net, layer, amount, generator=torch.Generator().manual_seed(seed))
        for p, q in zip(m.net.parameters(), other.net.parameters(), strict=True):
            assert torch.equal(p, q)
        assert m.param_map == other.param_map
        return
    scaled, copied = (rows.scale[0], cols.scale[1]) if incoming else (cols.scale[1], rows.scale[0])
    assert scaled[n + split :] == copied[n + split :] == (0.0,) * new  # new slices
    assert copied[: n + split] == (1.0,) * (n + split)
    shares = torch.zeros(n, dtype=torch.float64).index_add_(
        0, torch.tensor(parent[: n + split]), torch.tensor(scaled[: n + split], dtype=torch.float64)
    )
    torch.testing.assert_close(shares, torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    if b_pos is not None:
        assert m.param_map[b_pos].scale == (rows.scale[0],)
    lin, nxt = m.net.linear(layer), m.net.linear(layer + 1)
    assert not nxt.weight[:, n + split :].any()  # silent: zero outgoing weights
    bound = topo.fan_in(layer) ** -0.5  # torch's default initialisation
    assert lin.weight[n + split :].abs().max() <= bound
    assert lin.weight[n + split :].any()
    if lin.bias is not None:
        assert lin.bias[n + split :].abs().max() <= bound


@pytest.mark.parametrize(("block", "nxt"), CASES)
def test_fresh_channels_are_exact(block, nxt):
    """Conv blocks: 3 or 4 channels widened by 9 (each split once, the rest new) keep the
    function in eval and, with batch norm, in train mode; the new channels have a new batch
    norm's rows and zero outgoing weights (a next conv's in-channels, or their columns after
    the flatten)."""
    topo = case(block, nxt)
    n = topo.hidden[0].width
    net = make_cnn(topo)
    x = inputs(topo)
    m = checked(net, "AN", 0, 9, split="fresh")
    assert_same(net, m.net, x)
    kernel = m.net.linear(0).weight
    assert kernel[2 * n :].any() and kernel[2 * n :].abs().max() <= kernel[0].numel() ** -0.5
    w_next = m.net.linear(1).weight
    assert not w_next.reshape(w_next.shape[0], n + 9, -1)[:, 2 * n :].any()
    if BLOCKS[block].batch_norm:
        state = m.net.norm_states()[0]
        ones = torch.ones(9 - n, dtype=torch.float64)
        assert torch.equal(state["weight"][2 * n :], ones)
        assert torch.equal(state["running_var"][2 * n :], ones)
        assert not state["bias"][2 * n :].any() and not state["running_mean"][2 * n :].any()
        net.train(), m.net.train()
        assert_same(net, m.net, x)


def trained(topo: Topology, kind: str, seed: int = 0) -> tuple[SurgeryNet, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = build(topo).double()
    opt = optimizer(net, kind)
    for s in range(2):
        gen = torch.Generator().manual_seed(seed + s)
        x = torch.randn(16, topo.input_size, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    return net, opt


def optimizer(net: SurgeryNet, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    return torch.optim.Adam(net.parameters(), lr=1e-3)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_fresh_units_start_without_momentum(kind, activation):
    """The new units' first moments are zero (SGD's momentum as a new parameter's), their
    averages of squared gradients those of unit ``j % n``; the split copies' state is the
    asymmetric split's. A step on the carried state alone keeps the function."""
    topo = Topology(5, (Layer(3, activation), Layer(4, "relu")), 2)
    net, opt = trained(topo, kind)
    m = fresh(net, 0, 8)  # 3 split, 5 new
    state = transfer_state(opt.state_dict(), m.param_map, [p.shape for p in net.parameters()])
    new_opt = optimizer(m.net, kind)
    new_opt.load_state_dict(state)
    first = "momentum_buffer" if kind == "sgd" else "exp_avg"
    old = [opt.state[p] for p in net.parameters()]
    carried = [new_opt.state[p] for p in list(m.net.parameters())[:3]]
    for i, (got, dim) in enumerate(zip(carried, (0, 0, 1), strict=True)):
        split, new = (slice(None),) * dim + (slice(0, 6),), (slice(None),) * dim + (slice(6, None),)
        want = mapped(old[i][first], m.param_map[i])  # the asymmetric split's rule
        assert torch.equal(got[first][split], want[split]) and want[split].any()
        assert not got[first][new].any()
        if kind == "adam":
            parents = (slice(None),) * dim + ([0, 1, 2, 0, 1],)
            assert torch.equal(got["exp_avg_sq"][new], old[i]["exp_avg_sq"][parents])
    for model, optim in ((net, opt), (m.net, new_opt)):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optim.step()
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert_same_function(net, m.net, x, rel=1e-9)


def step_change(net: SurgeryNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How far one SGD step on layer 0's incoming weights and bias moves what the next
    layer receives from it (the next layer's weights held fixed)."""
    lin, nxt = net.linear(0), net.linear(1)
    before = torch.relu(lin(x)) @ nxt.weight.T
    torch.nn.functional.cross_entropy(net(x), y).backward()
    with torch.no_grad():
        lin.weight -= 1e-3 * lin.weight.grad
        lin.bias -= 1e-3 * lin.bias.grad
        return torch.relu(lin(x)) @ nxt.weight.T - before


def test_a_step_moves_the_widened_layer_as_its_parent_not_copies_times():
    """Each copy's incoming gradient is its parent's whole gradient: 4 units split into 132
    (33 copies each) move the layer's output 33 times as far as the parent's; the fresh
    split (2 copies each, 128 silent units) at most twice as far."""
    topo = Topology.mlp(20, [4], 3)
    torch.manual_seed(0)
    parent = build(topo).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    ratio = {}
    for split in ("asymmetric", "fresh"):
        child = add_neurons(parent, 0, 128, split=split, generator=torch.Generator().manual_seed(0))
        base = step_change(build(topo, parent.layer_weights()).double(), x, y).norm()
        ratio[split] = (step_change(child.net, x, y).norm() / base).item()
    assert ratio["asymmetric"] > 30
    assert ratio["fresh"] <= 2.01
