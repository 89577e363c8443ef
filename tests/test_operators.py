"""Property-based tests of the six surgery operators (lit_surgery.core.operators).

Each operator's documented bound is checked over many random small networks:
B, AL, AN, RL (linear layer) and OL (linear, low-rank layer) keep the function up to
rounding; T's weight change is exactly the Eckart-Young bound. Every operator keeps the
input network untouched, reports a parameter map consistent with the old and new
parameters (each carried parameter is its source's slice times the map's factors, except
new slices, factor 0; where the function is kept, a parameter carried whole has its old
gradient), and rejects what it cannot do with an OperatorError.

Example counts come from the Hypothesis profile (tests/conftest.py): 50 per property by
default, 400 with HYPOTHESIS_PROFILE=ci (80 for the rejections of bad arguments).
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from lit_surgery.core.network import SurgeryNet, build
from lit_surgery.core.operators import (
    OPERATOR_CODES,
    Mutation,
    OperatorError,
    Source,
    add_layer,
    add_neurons,
    base,
    operator,
    remove_layer,
    remove_neurons,
    truncate,
)
from lit_surgery.core.topology import NON_NEGATIVE, POSITIVELY_HOMOGENEOUS, Layer, Topology

ALL_ACTS = ("relu", "leaky_relu", "linear", "tanh", "sigmoid", "gelu")
BASIC_ACTS = ("relu", "leaky_relu", "linear", "tanh")
REL = 1e-5  # relative bound on the output change of the exact operators
GRAD_REL = 1e-8  # the same for the gradients of parameters carried whole (float64 only)
# Rejections of bad arguments: a fifth of the profile's examples (at least 50); every other
# property runs the profile's full count (400 under HYPOTHESIS_PROFILE=ci).
ERROR_PATHS = settings(max_examples=max(50, settings().max_examples // 5))

# --------------------------------------------------------------------------- strategies


@st.composite
def topologies(draw, activations=BASIC_ACTS, min_depth=1, max_depth=4):
    depth = draw(st.integers(min_depth, max_depth))
    hidden = tuple(
        Layer(
            draw(st.integers(1, 12)),
            draw(st.sampled_from(activations)),
            draw(st.booleans()),
        )
        for _ in range(depth)
    )
    return Topology(draw(st.integers(1, 12)), hidden, draw(st.integers(1, 6)))


seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])


def make_net(topology: Topology, seed: int, dtype: torch.dtype = torch.float64) -> SurgeryNet:
    torch.manual_seed(seed)
    return build(topology).to(dtype)


def make_inputs(topology: Topology, seed: int, dtype: torch.dtype, batch: int = 32):
    gen = torch.Generator().manual_seed(seed + 1)
    return 2.0 * torch.randn(batch, topology.input_size, generator=gen, dtype=dtype)


def snapshot(net: SurgeryNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_bit_identical(net: SurgeryNet, before: dict[str, torch.Tensor]) -> None:
    after = net.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), f"input network's {key} was modified"


def assert_same_function(old: SurgeryNet, new: SurgeryNet, x: torch.Tensor, rel=REL) -> None:
    with torch.no_grad():
        a, b = old(x), new(x)
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    bound = rel * (1.0 + a.abs().max().item())
    assert diff <= bound, f"output changed by {diff:.3g} > {bound:.3g}"


def check_mutation(
    old: SurgeryNet,
    before: dict[str, torch.Tensor],
    mutation: Mutation,
    *,
    carried_exact: bool = True,
) -> None:
    """What every operator promises, whatever it does to the function."""
    assert isinstance(mutation, Mutation)
    new = mutation.net
    assert isinstance(new, SurgeryNet)
    assert new is not old
    new_params = list(new.parameters())
    old_params = list(old.parameters())
    # Topology and parameters agree.
    assert new.topology.num_params == sum(p.numel() for p in new_params)
    assert new.topology.input_size == old.topology.input_size
    assert new.topology.output_size == old.topology.output_size
    assert all(p.dtype == old_params[0].dtype for p in new_params)
    # The input network is not touched.
    assert_bit_identical(old, before)
    # The parameter map: one entry per new parameter, each slice and factor consistent.
    assert len(mutation.param_map) == len(new_params)
    for i, (src, p) in enumerate(zip(mutation.param_map, new_params, strict=True)):
        if src is None:
            continue
        assert 0 <= src.param < len(old_params), f"param {i}: source {src.param} out of range"
        o = old_params[src.param].detach()
        assert o.dim() == p.dim(), f"param {i}: {tuple(o.shape)} -> {tuple(p.shape)}"
        assert len(src.index) <= o.dim() and len(src.scale) <= o.dim()
        for d in range(o.dim()):
            idx = src.index[d] if d < len(src.index) else None
            if idx is None:
                assert p.shape[d] == o.shape[d], f"param {i} dim {d}: whole dim, sizes differ"
            else:
                assert len(idx) == p.shape[d], f"param {i} dim {d}: {len(idx)} != {p.shape[d]}"
                assert all(0 <= j < o.shape[d] for j in idx), f"param {i} dim {d}: bad index"
            scale = src.scale[d] if d < len(src.scale) else None
            if scale is not None:
                assert len(scale) == p.shape[d], f"param {i} dim {d}: {len(scale)} factors"
                assert all(0.0 <= f <= 1.0 for f in scale), f"param {i} dim {d}: {scale}"
        if carried_exact:
            got, want = carried(p.detach(), src), carried(mapped(o, src), src)
            assert torch.equal(got, want), f"param {i} is not its mapped source"
    # The new network owns its parameters: changing it leaves the old one alone.
    saved = [p.detach().clone() for p in new_params]
    with torch.no_grad():
        for p in new_params:
            p.add_(1.0)
    assert_bit_identical(old, before)
    with torch.no_grad():
        for p, value in zip(new_params, saved, strict=True):
            p.copy_(value)


def mapped(old: torch.Tensor, src: Source) -> torch.Tensor:
    """What the map says a carried parameter is: the old one, sliced, times the factors."""
    out = old
    for d, idx in enumerate(src.index):
        if idx is not None:
            out = out[(slice(None),) * d + (list(idx),)]
    for d, scale in enumerate(src.scale):
        if scale is not None:
            shape = [1] * out.dim()
            shape[d] = -1
            out = out * torch.tensor(scale, dtype=out.dtype).view(shape)
    return out


def carried(new: torch.Tensor, src: Source) -> torch.Tensor:
    """The slices of ``new`` that continue old values: factor 0 marks a new slice."""
    for d, scale in enumerate(src.scale):
        if scale is not None and 0.0 in scale:
            kept = [j for j, f in enumerate(scale) if f]
            new = new[(slice(None),) * d + (kept,)]
    return new


def assert_gradients_follow_map(old: SurgeryNet, mutation: Mutation, seed: int) -> None:
    """Where the function is kept, a parameter carried whole (no slicing, no factors) has
    the gradient of its source, so its optimiser state stays valid as it is. Only for
    float64 networks, unless the copy is bit-exact: in float32 a pre-activation within
    rounding of 0 may take the other side of a ReLU."""
    new = mutation.net
    gen = torch.Generator().manual_seed(seed + 11)
    dtype = next(old.parameters()).dtype
    x = torch.randn(16, old.topology.input_size, generator=gen, dtype=dtype)
    y = torch.randn(16, old.topology.output_size, generator=gen, dtype=dtype)
    grads = []
    for net in (old, new):
        net.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        grads.append([p.grad.detach().clone() for p in net.parameters()])
        net.zero_grad()
    old_grads, new_grads = grads
    bound = GRAD_REL * (1.0 + max(g.abs().max().item() for g in old_grads))
    for i, (src, got) in enumerate(zip(mutation.param_map, new_grads, strict=True)):
        if src is not None and all(d is None for d in src.index + src.scale):
            diff = (got - old_grads[src.param]).abs().max().item()
            assert diff <= bound, f"param {i}: gradient off the map by {diff:.3g} > {bound:.3g}"


def with_activation(topology: Topology, layer: int, activation: str) -> Topology:
    hidden = list(topology.hidden)
    old = hidden[layer]
    hidden[layer] = Layer(old.width, activation, old.bias, old.kind)
    return topology.with_hidden(hidden)


# --------------------------------------------------------------------------- B


@given(topologies(ALL_ACTS), seeds, dtypes)
def test_base_is_exact_copy(topo, seed, dtype):
    net = make_net(topo, seed, dtype)
    before = snapshot(net)
    m = operator("B").apply(net)
    assert m.net.topology == topo
    assert_same_function(net, m.net, make_inputs(topo, seed, dtype), rel=0.0)
    check_mutation(net, before, m)
    assert all(src is not None for src in m.param_map)
    assert_gradients_follow_map(net, m, seed)
    m2 = base(net)
    for p, q in zip(net.parameters(), m2.net.parameters(), strict=True):
        assert torch.equal(p, q)
        assert p.data_ptr() != q.data_ptr()


# --------------------------------------------------------------------------- AL


@given(topologies(ALL_ACTS), seeds, dtypes, st.data())
def test_add_layer_linear_is_exact(topo, seed, dtype, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    net = make_net(topo, seed, dtype)
    before = snapshot(net)
    m = operator("AL").apply(net, layer, activation="linear")
    new_topo = m.net.topology
    assert new_topo == operator("AL").topology(topo, layer, activation="linear")
    assert new_topo.depth == topo.depth + 1
    inserted = new_topo.hidden[layer + 1]
    assert inserted.width == topo.hidden[layer].width and inserted.activation == "linear"
    assert_same_function(net, m.net, make_inputs(topo, seed, dtype))
    check_mutation(net, before, m)
    # The inserted layer's parameters are new.
    weight_pos = sum(1 + h.bias for h in new_topo.hidden[: layer + 1])
    assert m.param_map[weight_pos] is None
    if dtype == torch.float64:
        assert_gradients_follow_map(net, m, seed)


@given(topologies(ALL_ACTS), seeds, dtypes, st.sampled_from(sorted(NON_NEGATIVE)), st.data())
def test_add_layer_relu_after_non_negative_layer_is_exact(topo, seed, dtype, activation, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    topo = with_activation(topo, layer, activation)
    net = make_net(topo, seed, dtype)
    before = snapshot(net)
    m = operator("AL").apply(net, layer, activation="relu")
    assert m.net.topology.hidden[layer + 1].activation == "relu"
    assert_same_function(net, m.net, make_inputs(topo, seed, dtype))
    check_mutation(net, before, m)
    if dtype == torch.float64:
        assert_gradients_follow_map(net, m, seed)


@ERROR_PATHS
@given(topologies(ALL_ACTS), seeds, st.data())
def test_add_layer_relu_after_signed_layer_leaves_input_alone(topo, seed, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    signed = sorted(set(ALL_ACTS) - NON_NEGATIVE)
    topo = with_activation(topo, layer, data.draw(st.sampled_from(signed)))
    net = make_net(topo, seed)
    before = snapshot(net)
    with pytest.raises(OperatorError):
        add_layer(net, layer, "relu")
    assert_bit_identical(net, before)


@pytest.mark.parametrize("activation", ["tanh", "linear", "leaky_relu", "gelu"])
def test_add_layer_relu_after_signed_layer_raises(activation):
    net = make_net(Topology(3, (Layer(4, activation),), 2), 0)
    with pytest.raises(OperatorError):
        add_layer(net, 0, "relu")


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu", "bogus"])
def test_add_layer_unsupported_activation_raises(activation):
    net = make_net(Topology(3, (Layer(4, "relu"),), 2), 0)
    with pytest.raises(OperatorError):
        add_layer(net, 0, activation)


# --------------------------------------------------------------------------- AN


@given(
    topologies(ALL_ACTS),
    seeds,
    dtypes,
    st.sampled_from(["asymmetric", "equal"]),
    st.data(),
)
def test_add_neurons_is_exact(topo, seed, dtype, split, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    width = topo.hidden[layer].width
    amount = data.draw(st.integers(1, 3 * width + 2))
    net = make_net(topo, seed, dtype)
    before = snapshot(net)
    m = operator("AN").apply(
        net, layer, amount, split=split, generator=torch.Generator().manual_seed(seed)
    )
    new_topo = m.net.topology
    assert new_topo == operator("AN").topology(topo, layer, amount)
    assert new_topo.hidden[layer].width == width + amount
    assert new_topo.hidden[layer].activation == topo.hidden[layer].activation
    assert new_topo.hidden[layer].bias == topo.hidden[layer].bias
    assert_same_function(net, m.net, make_inputs(topo, seed, dtype))
    check_mutation(net, before, m, carried_exact=True)
    check_split_map(net, m, layer, split)
    incoming = topo.hidden[layer].activation in POSITIVELY_HOMOGENEOUS
    event(f"{split} split, {'incoming' if incoming else 'outgoing'} side")
    if dtype == torch.float64:
        assert_gradients_follow_map(net, m, seed)

    # Same generator seed: the same result.
    m2 = add_neurons(net, layer, amount, split=split, generator=torch.Generator().manual_seed(seed))
    for p, q in zip(m.net.parameters(), m2.net.parameters(), strict=True):
        assert torch.equal(p, q)

    vectors = unit_vectors(m.net, layer)
    same = pairwise_equal(vectors)
    if split == "asymmetric":
        # The new units are not copies of their parents (nor of anything else).
        assert not same.any(), "asymmetric split left identical units"
    else:
        # The reference defect: each new unit is an exact copy of one old unit.
        for j in range(width, width + amount):
            assert same[j, :width].any(), f"equal split: unit {j} copies no old unit"


def check_split_map(old: SurgeryNet, m: Mutation, layer: int, split: str) -> None:
    """AN's map: every copy, the first included, continues its parent unit, and the shares
    are the factors of the side that was scaled (check_mutation: the weights are these)."""
    topo, width = old.topology, old.topology.hidden[layer].width
    weight_pos = sum(1 + h.bias for h in topo.hidden[:layer])
    next_pos = weight_pos + 1 + topo.hidden[layer].bias
    rows, cols = m.param_map[weight_pos], m.param_map[next_pos]
    parent = rows.index[0]
    assert rows.index == (parent, None) and cols.index == (None, parent)
    assert parent[:width] == tuple(range(width))
    copies = torch.bincount(torch.tensor(parent), minlength=width)
    assert copies.max() - copies.min() <= 1, "copies are not spread evenly over the units"
    incoming = topo.hidden[layer].activation in POSITIVELY_HOMOGENEOUS
    if incoming:
        shares = rows.scale[0]
        assert rows.scale == (shares, None) and cols.scale == (None, None)
    else:
        shares = cols.scale[1]
        assert rows.scale == (None, None) and cols.scale == (None, shares)
    if topo.hidden[layer].bias:
        assert m.param_map[weight_pos + 1].index == (parent,)
        assert m.param_map[weight_pos + 1].scale == (rows.scale[0],)
    share = torch.tensor(shares, dtype=torch.float64)
    totals = torch.zeros(width, dtype=torch.float64).index_add_(0, torch.tensor(parent), share)
    assert torch.allclose(totals, torch.ones_like(totals), rtol=0, atol=1e-12)
    if split == "equal":
        assert torch.allclose(share, 1.0 / copies[list(parent)].double(), rtol=1e-15, atol=0)


def unit_vectors(net: SurgeryNet, layer: int, grad: bool = False) -> torch.Tensor:
    """Row j: unit j's incoming weights, bias and outgoing weights (or their gradients)."""
    lin, nxt = net.linear(layer), net.linear(layer + 1)

    def get(t):
        return t.grad if grad else t.detach()

    parts = [get(lin.weight), get(nxt.weight).T]
    if lin.bias is not None:
        parts.append(get(lin.bias)[:, None])
    return torch.cat(parts, dim=1)


def pairwise_equal(v: torch.Tensor) -> torch.Tensor:
    """Boolean matrix: rows i != j with identical entries."""
    eq = (v[:, None, :] == v[None, :, :]).all(-1)
    eq.fill_diagonal_(False)
    return eq


@given(topologies(ALL_ACTS), seeds, st.sampled_from(["asymmetric", "equal"]), st.data())
def test_add_neurons_split_copies_get_different_gradients(topo, seed, split, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    width = topo.hidden[layer].width
    amount = data.draw(st.integers(1, 2 * width + 1))
    net = make_net(topo, seed)
    m = add_neurons(net, layer, amount, split=split, generator=torch.Generator().manual_seed(seed))
    new = m.net
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(64, topo.input_size, generator=gen, dtype=torch.float64)
    y = torch.randn(64, topo.output_size, generator=gen, dtype=torch.float64)
    opt = torch.optim.SGD(new.parameters(), lr=0.05)
    opt.zero_grad()
    torch.nn.functional.mse_loss(new(x), y).backward()
    grads = unit_vectors(new, layer, grad=True).clone()
    params_before = unit_vectors(new, layer).clone()
    opt.step()
    params_after = unit_vectors(new, layer)

    zero = (grads == 0).all(-1)
    if split == "asymmetric":
        same = pairwise_equal(grads) & ~(zero[:, None] & zero[None, :])
        assert not same.any(), "split copies got identical gradients"
        assert not pairwise_equal(params_after).any()
    else:
        siblings = pairwise_equal(params_before)
        for j in range(width, width + amount):
            assert siblings[j, :width].any()
        i, j = torch.nonzero(siblings, as_tuple=True)
        assert torch.allclose(grads[i], grads[j], rtol=1e-12, atol=1e-14)
        assert torch.allclose(params_after[i], params_after[j], rtol=1e-12, atol=1e-14)


def test_add_neurons_asymmetric_gradients_differ_deterministic():
    """A fixed case with live units, so the gradient property is never vacuous."""
    for activation in ("relu", "leaky_relu", "linear", "tanh", "sigmoid", "gelu"):
        topo = Topology(5, (Layer(4, activation), Layer(3, "leaky_relu")), 2)
        net = make_net(topo, 3)
        m = add_neurons(net, 0, 6, generator=torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(64, 2, generator=gen, dtype=torch.float64)
        torch.nn.functional.mse_loss(m.net(x), y).backward()
        grads = unit_vectors(m.net, 0, grad=True)
        assert not (grads == 0).all(-1).any(), activation
        assert not pairwise_equal(grads).any(), activation


@pytest.mark.parametrize("amount", [0, -1])
def test_add_neurons_bad_amount_raises(amount):
    net = make_net(Topology(3, (Layer(4),), 2), 0)
    with pytest.raises(OperatorError):
        add_neurons(net, 0, amount)


def test_add_neurons_bad_split_raises():
    net = make_net(Topology(3, (Layer(4),), 2), 0)
    with pytest.raises(OperatorError):
        add_neurons(net, 0, 2, split="random")


def test_add_neurons_split_side_matches_activation():
    """Incoming split for positively homogeneous activations, outgoing (Net2Net) otherwise."""
    for activation in ALL_ACTS:
        net = make_net(Topology(3, (Layer(2, activation),), 2), 0)
        m = add_neurons(net, 0, 2, generator=torch.Generator().manual_seed(0))
        old_w, new_w = net.linear(0).weight, m.net.linear(0).weight
        old_out, new_out = net.linear(1).weight, m.net.linear(1).weight
        if activation in POSITIVELY_HOMOGENEOUS:
            # Outgoing columns are copies; incoming rows sum back to the original.
            for j in range(4):
                assert any(torch.equal(new_out[:, j], old_out[:, p]) for p in range(2))
        else:
            for j in range(4):
                assert any(torch.equal(new_w[j], old_w[p]) for p in range(2))


# --------------------------------------------------------------------------- RL


@given(topologies(ALL_ACTS, min_depth=2), seeds, dtypes, st.data())
def test_remove_linear_layer_is_exact(topo, seed, dtype, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    topo = with_activation(topo, layer, "linear")
    net = make_net(topo, seed, dtype)
    before = snapshot(net)
    m = operator("RL").apply(net, layer, exact=True)
    new_topo = m.net.topology
    assert new_topo == operator("RL").topology(topo, layer, exact=True)
    assert new_topo.depth == topo.depth - 1
    if layer < new_topo.depth:
        merged, nxt = new_topo.hidden[layer], topo.hidden[layer + 1]
        assert merged.width == nxt.width and merged.activation == nxt.activation
        assert merged.bias == (nxt.bias or topo.hidden[layer].bias)
    assert_same_function(net, m.net, make_inputs(topo, seed, dtype))
    check_mutation(net, before, m)
    if dtype == torch.float64:
        assert_gradients_follow_map(net, m, seed)


@given(topologies(ALL_ACTS, min_depth=2), seeds, st.data())
def test_remove_nonlinear_layer(topo, seed, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    net = make_net(topo, seed)
    before = snapshot(net)
    if not topo.hidden[layer].is_linear:
        with pytest.raises(OperatorError):
            remove_layer(net, layer, exact=True)
        assert_bit_identical(net, before)
    m = remove_layer(net, layer, exact=False)
    assert m.net.topology.depth == topo.depth - 1
    check_mutation(net, before, m)
    # The merge is the composition of the two affine maps (activation dropped).
    (w, b), (w2, b2) = net.layer_weights()[layer : layer + 2]
    lin = m.net.linear(layer)
    assert torch.allclose(lin.weight, w2 @ w, rtol=1e-12, atol=1e-12)
    if lin.bias is None:
        assert b is None and b2 is None
    else:
        expected_b = torch.zeros_like(lin.bias)
        if b is not None:
            expected_b = expected_b + w2 @ b
        if b2 is not None:
            expected_b = expected_b + b2
        assert torch.allclose(lin.bias, expected_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ALL_ACTS)
@pytest.mark.parametrize("exact", [True, False])
def test_remove_only_layer_raises(activation, exact):
    net = make_net(Topology(3, (Layer(4, activation),), 2), 0)
    with pytest.raises(OperatorError):
        remove_layer(net, 0, exact=exact)


def test_remove_layer_non_finite_merge_is_reinitialised():
    topo = Topology(3, (Layer(4, "linear"), Layer(5)), 2)
    net = make_net(topo, 0)
    with torch.no_grad():
        net.linear(0).weight[0, 0] = float("inf")
    before = snapshot(net)
    m = remove_layer(net, 0)
    assert all(torch.isfinite(p).all() for p in m.net.parameters())
    assert_bit_identical(net, before)


# --------------------------------------------------------------------------- OL


@given(topologies(ALL_ACTS), seeds, st.booleans(), st.data())
def test_remove_neurons_exact_for_low_rank_linear_layer(topo, seed, layer_bias, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    old = topo.hidden[layer]
    width = data.draw(st.integers(2, 12))
    hidden = list(topo.hidden)
    hidden[layer] = Layer(width, "linear", layer_bias, old.kind)
    topo = topo.with_hidden(hidden)
    k = data.draw(st.integers(1, width - 1))
    amount = data.draw(st.integers(1, width - k))
    net = make_net(topo, seed)
    gen = torch.Generator().manual_seed(seed + 3)
    fan_in = topo.fan_in(layer)
    with torch.no_grad():
        a = torch.randn(width, k, generator=gen, dtype=torch.float64)
        b = torch.randn(k, fan_in, generator=gen, dtype=torch.float64)
        net.linear(layer).weight.copy_(a @ b / fan_in**0.5)
        if layer_bias:
            net.linear(layer).bias.copy_(torch.randn(width, generator=gen, dtype=torch.float64))
    before = snapshot(net)
    m = operator("OL").apply(net, layer, amount)
    new_topo = m.net.topology
    assert new_topo == operator("OL").topology(topo, layer, amount)
    assert new_topo.widths[layer] == width - amount
    assert_same_function(net, m.net, make_inputs(topo, seed, torch.float64))
    check_mutation(net, before, m, carried_exact=not layer_bias)
    assert_gradients_follow_map(net, m, seed)


@given(topologies(ALL_ACTS), seeds, st.data())
def test_remove_neurons_keeps_top_directions(topo, seed, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    width = topo.hidden[layer].width
    net = make_net(topo, seed)
    before = snapshot(net)
    if width < 2:
        with pytest.raises(OperatorError):
            remove_neurons(net, layer, 1)
        return
    amount = data.draw(st.integers(1, width - 1))
    m = remove_neurons(net, layer, amount)
    keep = width - amount
    check_mutation(
        net, before, m, carried_exact=not (topo.hidden[layer].is_linear and topo.hidden[layer].bias)
    )
    # The kept incoming map has the top singular values of the old one.
    s_old = torch.linalg.svdvals(net.linear(layer).weight.detach())
    s_new = torch.linalg.svdvals(m.net.linear(layer).weight.detach())
    n = min(keep, s_old.numel())
    assert torch.allclose(s_new[:n], s_old[:n], rtol=1e-9, atol=1e-12)


@ERROR_PATHS
@given(topologies(ALL_ACTS), seeds, st.data())
def test_remove_neurons_amount_bounds(topo, seed, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    width = topo.hidden[layer].width
    amount = data.draw(st.integers(-2, width + 3))
    net = make_net(topo, seed)
    if 1 <= amount < width:
        assert remove_neurons(net, layer, amount).net.topology.widths[layer] == width - amount
    else:
        with pytest.raises(OperatorError):
            remove_neurons(net, layer, amount)
        with pytest.raises(OperatorError):
            operator("OL").topology(topo, layer, amount)


# --------------------------------------------------------------------------- T


@given(topologies(ALL_ACTS), seeds, st.data())
def test_truncate_error_is_eckart_young(topo, seed, data):
    candidates = [i for i, h in enumerate(topo.hidden) if min(h.width, topo.fan_in(i)) >= 2]
    assume(candidates)
    layer = data.draw(st.sampled_from(candidates))
    old = topo.hidden[layer]
    full = min(old.width, topo.fan_in(layer))
    rank = data.draw(st.integers(1, full - 1))
    amount = old.width - rank
    net = make_net(topo, seed)
    before = snapshot(net)
    m = operator("T").apply(net, layer, amount)
    new_topo = m.net.topology
    assert new_topo == operator("T").topology(topo, layer, amount)
    assert new_topo.depth == topo.depth + 1
    factor = new_topo.hidden[layer]
    assert (factor.width, factor.activation, factor.bias) == (rank, "linear", False)
    assert new_topo.hidden[layer + 1] == old
    check_mutation(net, before, m)

    w_old = net.linear(layer).weight.detach()
    first = m.net.linear(layer).weight.detach()
    u_k = m.net.linear(layer + 1).weight.detach()
    assert torch.allclose(u_k.T @ u_k, torch.eye(rank, dtype=u_k.dtype), atol=1e-10)
    got = torch.linalg.matrix_norm(u_k @ first - w_old).item()
    s = torch.linalg.svdvals(w_old)
    bound = s[rank:].pow(2).sum().sqrt().item()
    assert abs(got - bound) <= 1e-4 * bound + 1e-10, (got, bound)
    assert abs(m.error - bound) <= 1e-4 * bound + 1e-10, (m.error, bound)
    # The bias and activation of the truncated layer are kept.
    if old.bias:
        assert torch.equal(m.net.linear(layer + 1).bias, net.linear(layer).bias)


@given(topologies(ALL_ACTS), seeds, st.data())
def test_truncate_exact_for_low_rank_weight(topo, seed, data):
    candidates = [i for i, h in enumerate(topo.hidden) if min(h.width, topo.fan_in(i)) >= 2]
    assume(candidates)
    layer = data.draw(st.sampled_from(candidates))
    old = topo.hidden[layer]
    full = min(old.width, topo.fan_in(layer))
    k = data.draw(st.integers(1, full - 1))
    rank = data.draw(st.integers(k, full - 1))
    net = make_net(topo, seed)
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        a = torch.randn(old.width, k, generator=gen, dtype=torch.float64)
        b = torch.randn(k, topo.fan_in(layer), generator=gen, dtype=torch.float64)
        net.linear(layer).weight.copy_(a @ b)
    before = snapshot(net)
    m = truncate(net, layer, old.width - rank)
    assert m.error <= 1e-9 * (1 + torch.linalg.matrix_norm(net.linear(layer).weight).item())
    assert_same_function(net, m.net, make_inputs(topo, seed, torch.float64))
    check_mutation(net, before, m)
    assert_gradients_follow_map(net, m, seed)


@ERROR_PATHS
@given(topologies(ALL_ACTS), seeds, st.data())
def test_truncate_amount_bounds(topo, seed, data):
    layer = data.draw(st.integers(0, topo.depth - 1))
    width, fan_in = topo.hidden[layer].width, topo.fan_in(layer)
    amount = data.draw(st.integers(-2, width + 3))
    net = make_net(topo, seed)
    if 1 <= amount < width and width - amount < min(width, fan_in):
        assert truncate(net, layer, amount).net.topology.widths[layer] == width - amount
    else:
        with pytest.raises(OperatorError):
            truncate(net, layer, amount)
        with pytest.raises(OperatorError):
            operator("T").topology(topo, layer, amount)


def test_truncate_that_would_not_truncate_raises():
    # Layer of 6 units fed by 3 inputs: rank is at most 3; keeping 3 (or more) is no truncation.
    net = make_net(Topology(3, (Layer(6),), 2), 0)
    for amount in (1, 2, 3):
        with pytest.raises(OperatorError, match="would not truncate"):
            truncate(net, 0, amount)
    assert truncate(net, 0, 4).net.topology.widths == [2, 6]


# --------------------------------------------------------------------------- errors


def _apply(code: str, net: SurgeryNet, layer: int) -> Mutation:
    op = operator(code)
    if code == "AN":
        return op.apply(net, layer, 1)
    if code in ("OL", "T"):
        return op.apply(net, layer, 1)
    return op.apply(net, layer)


@ERROR_PATHS
@given(
    topologies(ALL_ACTS),
    seeds,
    st.sampled_from(["AN", "AL", "RL", "OL", "T"]),
    st.one_of(st.integers(-4, -1), st.integers(0, 3)),
)
def test_out_of_range_layer_raises(topo, seed, code, offset):
    bad = offset if offset < 0 else topo.depth + offset
    net = make_net(topo, seed)
    before = snapshot(net)
    with pytest.raises(OperatorError, match=re.escape(f"layer {bad}")):
        _apply(code, net, bad)
    assert_bit_identical(net, before)


def test_unknown_operator_raises():
    with pytest.raises(OperatorError, match="XX"):
        operator("XX")
    assert set(OPERATOR_CODES) == {"B", "AN", "AL", "RL", "OL", "T"}
    for code in OPERATOR_CODES:
        assert operator(code).code == code


def test_operator_error_is_value_error():
    assert issubclass(OperatorError, ValueError)


# --------------------------------------------------------------------------- all operators


@given(topologies(ALL_ACTS), seeds, dtypes, st.sampled_from(OPERATOR_CODES), st.data())
def test_every_operator_structure(topo, seed, dtype, code, data):
    """num_params, untouched input, param map, for whatever each operator can build."""
    net = make_net(topo, seed, dtype)
    before = snapshot(net)
    layer = data.draw(st.integers(0, topo.depth - 1))
    width = topo.hidden[layer].width
    kwargs = {}
    if code == "AN":
        args = (layer, data.draw(st.integers(1, 2 * width + 1)))
        kwargs = {"generator": torch.Generator().manual_seed(seed)}
    elif code in ("OL", "T"):
        args = (layer, data.draw(st.integers(1, width + 1)))
    elif code in ("AL", "RL"):
        args = (layer,)
    else:
        args = ()
    try:
        m = operator(code).apply(net, *args, **kwargs)
    except OperatorError:
        assert_bit_identical(net, before)
        return
    carried_exact = not (code == "OL" and topo.hidden[layer].is_linear and topo.hidden[layer].bias)
    check_mutation(net, before, m, carried_exact=carried_exact)
    with torch.no_grad():
        out = m.net(make_inputs(topo, seed, dtype))
    assert out.shape == (32, topo.output_size)
    assert torch.isfinite(out).all()
