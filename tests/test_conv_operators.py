"""The surgery operators on conv blocks (lit_surgery.core.operators, conv_operators).

Each operator's documented effect is checked on small float64 CNNs in eval mode (batch
norms with random running statistics, so that carrying them matters): AN, AL, T (low-rank
weight), RL into the dense part and OL (linear, low-rank) keep the output to rounding; RL
into a padding conv keeps interior pixels and is, over the whole map, the original with the
intermediate zero padding replaced by the removed conv's values; T's weight change is the
Eckart-Young bound. Every mutation satisfies the contract of tests/test_operators.py
(parameter map, parameter count, input untouched), its topology function gives the
topology built, and optimiser state (SGD momentum) follows the parameter map.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_operators import check_mutation, mapped, snapshot

from lit_surgery.core.network import SurgeryNet, build, param_layout
from lit_surgery.core.operators import (
    Mutation,
    OperatorError,
    add_layer,
    add_neurons,
    operator,
    remove_layer,
    remove_neurons,
    truncate,
)
from lit_surgery.core.optim_state import transfer_state
from lit_surgery.core.topology import ConvLayer, Topology

ATOL = 1e-10  # float64, relative to the output's size


def cnn(*conv: ConvLayer, dense=(5,), shape=(2, 6, 6), out=3) -> Topology:
    return Topology.cnn(shape, conv, dense, out)


def make_net(topo: Topology, seed: int = 0) -> SurgeryNet:
    """float64, eval mode, batch norms with random affine pairs and running statistics."""
    torch.manual_seed(seed)
    net = build(topo).double()
    with torch.no_grad():
        for i in range(topo.depth):
            bn = net.norm(i)
            if bn is not None:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def inputs(topo: Topology, seed: int = 1, batch: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, topo.input_size, generator=gen, dtype=torch.float64)


def low_rank(net: SurgeryNet, layer: int, rank: int, seed: int = 2) -> None:
    """Give layer ``layer``'s weight matrix rank ``rank``."""
    gen = torch.Generator().manual_seed(seed)
    w = net.linear(layer).weight
    a = torch.randn(w.shape[0], rank, generator=gen, dtype=w.dtype)
    b = torch.randn(rank, w[0].numel(), generator=gen, dtype=w.dtype) / math.sqrt(w[0].numel())
    with torch.no_grad():
        w.copy_((a @ b).reshape(w.shape))


def assert_same(old: SurgeryNet, new: SurgeryNet, x: torch.Tensor) -> None:
    with torch.no_grad():
        a, b = old(x), new(x)
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= ATOL * (1 + a.abs().max().item()), f"output changed by {diff:.3g}"


def conv_output(net: SurgeryNet, layer: int, x: torch.Tensor) -> torch.Tensor:
    """What layer ``layer``'s Conv2d computes on the network input ``x``."""
    seen = []
    handle = net.linear(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[0]


def interior(topo: Topology, layer: int) -> torch.Tensor:
    """Mask of conv ``layer``'s output pixels whose receptive field lies inside its input
    (they never read the zero padding)."""
    conv = topo.hidden[layer]
    assert isinstance(conv, ConvLayer)
    size = topo.shapes[layer][1:]
    axes = []
    for n in size:
        out = (n + 2 * conv.padding - conv.kernel_size) // conv.stride + 1
        start = torch.arange(out) * conv.stride - conv.padding
        axes.append((start >= 0) & (start + conv.kernel_size <= n))
    return axes[0][:, None] & axes[1][None, :]


def checked(net: SurgeryNet, code: str, layer: int, amount: int = 0, **kw) -> Mutation:
    """Apply ``code``; the contract of every mutation and its topology function."""
    before = snapshot(net)
    if code == "AN":
        kw.setdefault("generator", torch.Generator().manual_seed(layer))
    m = operator(code).apply(net, layer, amount, **kw)
    options = {k: v for k, v in kw.items() if k in ("activation", "exact")}
    assert m.net.topology == operator(code).topology(net.topology, layer, amount, **options)
    # OL on a linear layer folds the bias residual into the next bias, whose state it keeps.
    changed = net.topology.hidden[layer]
    biased = changed.bias or (isinstance(changed, ConvLayer) and changed.batch_norm)
    check_mutation(net, before, m, carried_exact=not (code == "OL" and changed.is_linear
                                                      and biased))
    m.net.eval()
    return m


# Conv blocks in several configurations: batch norm, pool, stride, bias, activation.
PLAIN = ConvLayer(3)
BN = ConvLayer(3, batch_norm=True, bias=False)
POOL = ConvLayer(3, "linear", pool=2)
STRIDE = ConvLayer(4, "tanh", kernel_size=3, stride=2, padding=0, batch_norm=True)
BLOCKS = {"plain": PLAIN, "bn": BN, "pool": POOL, "stride": STRIDE}
# Next layers: a conv, a dense layer after the flatten, the output layer after the flatten.
NEXT = {
    "conv": ((ConvLayer(4, kernel_size=1, padding=0, batch_norm=True),), (5,)),
    "dense": ((), (5,)),
    "output": ((), ()),
}
CASES = [(b, n) for b in BLOCKS for n in NEXT]


def case(block: str, nxt: str) -> Topology:
    convs, dense = NEXT[nxt]
    return cnn(BLOCKS[block], *convs, dense=dense)


# --------------------------------------------------------------------------- AN


@pytest.mark.parametrize(("block", "nxt"), CASES)
@pytest.mark.parametrize("split", ["asymmetric", "equal"])
def test_add_channels_is_exact(block, nxt, split):
    topo = case(block, nxt)
    net = make_net(topo)
    x = inputs(topo)
    m = checked(net, "AN", 0, 4, split=split)
    assert m.net.topology.hidden[0].width == topo.hidden[0].width + 4
    assert_same(net, m.net, x)
    parent = m.param_map[0].index[0]
    w_old, w_new = net.linear(0).weight, m.net.linear(0).weight
    if BLOCKS[block].batch_norm:  # outgoing split: rows and batch-norm rows copied
        assert torch.equal(w_new, w_old[list(parent)])
        old_bn, new_bn = net.norm_states()[0], m.net.norm_states()[0]
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(new_bn[key], old_bn[key][list(parent)]), key
        # Copies normalise alike on a batch too: exact in train mode as well.
        net.train(), m.net.train()
        assert_same(net, m.net, x)


def test_add_channels_copies_differ_in_gradient():
    topo = case("bn", "dense")
    net = make_net(topo)
    m = add_neurons(net, 0, 3, generator=torch.Generator().manual_seed(0))
    m.net.train()
    F.mse_loss(m.net(inputs(topo)), torch.zeros(8, 3, dtype=torch.float64)).backward()
    parent = m.param_map[0].index[0]
    grad = m.net.linear(0).weight.grad
    for j in range(3, 6):
        assert not torch.allclose(grad[j], grad[parent[j]])


# --------------------------------------------------------------------------- AL


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("nxt", NEXT)
def test_add_conv_block_is_identity(block, nxt):
    topo = case(block, nxt)
    net = make_net(topo)
    m = checked(net, "AL", 0)
    added = m.net.topology.hidden[1]
    assert isinstance(added, ConvLayer) and not added.batch_norm
    assert (added.kernel_size, added.stride, added.padding, added.pool) == (3, 1, 1, 1)
    assert m.net.topology.output_shape(1) == topo.output_shape(0)
    assert_same(net, m.net, inputs(topo))


@pytest.mark.parametrize(("kernel", "want"), [(1, 1), (2, 3), (5, 5)])
def test_add_conv_block_kernel(kernel, want):
    """The layer's kernel when odd (same padding needs it), else 3; ReLU after ReLU."""
    topo = cnn(ConvLayer(3, kernel_size=kernel, padding=kernel // 2), shape=(1, 8, 8))
    net = make_net(topo)
    m = checked(net, "AL", 0, activation="relu")
    added = m.net.topology.hidden[1]
    assert (added.kernel_size, added.padding, added.activation) == (want, want // 2, "relu")
    assert_same(net, m.net, inputs(topo))


def test_add_relu_conv_block_after_signed_block_raises():
    net = make_net(cnn(ConvLayer(3, "tanh")))
    with pytest.raises(OperatorError, match="tanh"):
        add_layer(net, 0, "relu")


# --------------------------------------------------------------------------- T


@pytest.mark.parametrize(("block", "nxt"), CASES)
def test_truncate_conv_error_is_eckart_young(block, nxt):
    """The k-channel conv then the 1x1 conv compute the old block with its weight replaced
    by the product of the factors, whose distance to the old weight is the reported error
    (the Eckart-Young bound)."""
    topo = case(block, nxt)
    net = make_net(topo)
    m = checked(net, "T", 0, 1)
    first, second = m.net.topology.hidden[:2]
    old = topo.hidden[0]
    assert (first.width, first.activation, first.bias, first.batch_norm, first.pool) == (
        old.width - 1, "linear", False, False, 1
    )
    assert (first.kernel_size, first.stride, first.padding) == (
        old.kernel_size, old.stride, old.padding
    )
    assert (second.kernel_size, second.stride, second.padding) == (1, 1, 0)
    w = net.linear(0).weight
    product = m.net.linear(1).weight.flatten(1) @ m.net.linear(0).weight.flatten(1)
    s = torch.linalg.svdvals(w.flatten(1))
    assert m.error == pytest.approx(s[first.width :].norm().item(), rel=1e-9)
    assert (product - w.flatten(1)).norm().item() == pytest.approx(m.error, rel=1e-6)
    # The whole function: the old network with the approximated weight.
    approx = make_net(topo)
    with torch.no_grad():
        approx.linear(0).weight.copy_(product.reshape(w.shape))
    assert_same(approx, m.net, inputs(topo))


@pytest.mark.parametrize("block", BLOCKS)
def test_truncate_low_rank_conv_is_exact(block):
    topo = case(block, "conv")
    net = make_net(topo)
    low_rank(net, 0, 2)
    m = checked(net, "T", 0, topo.hidden[0].width - 2)
    assert m.error < 1e-10
    assert_same(net, m.net, inputs(topo))
    net.train(), m.net.train()  # the batch norm stays on the old channels: train mode too
    assert_same(net, m.net, inputs(topo))


def test_truncate_conv_that_would_not_truncate_raises():
    net = make_net(cnn(ConvLayer(4, kernel_size=1, padding=0), shape=(1, 4, 4)))
    with pytest.raises(OperatorError, match="rank at most 1"):
        truncate(net, 0, 1)


# --------------------------------------------------------------------------- RL


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_remove_conv_into_padded_conv(bn, stride):
    """Interior pixels exact; over the whole map the merged conv is the next conv applied
    (without padding) to the removed conv extended over the next conv's padding."""
    removed = ConvLayer(3, "linear", batch_norm=bn, bias=not bn)
    nxt = ConvLayer(4, stride=stride, batch_norm=True)
    topo = cnn(removed, nxt, shape=(2, 8, 8))
    net = make_net(topo)
    x = inputs(topo)
    m = checked(net, "RL", 0)
    merged = m.net.topology.hidden[0]
    assert (merged.kernel_size, merged.padding, merged.stride) == (5, 2, stride)
    want, got = conv_output(net, 1, x), conv_output(m.net, 0, x)
    inside = interior(topo, 1)
    assert inside.any() and not inside.all()
    torch.testing.assert_close(got[..., inside], want[..., inside], rtol=0, atol=ATOL)
    assert not torch.allclose(got, want)  # the borders differ
    image = x.view(-1, *topo.input_shape)
    w, b = net.linear(0).weight, net.linear(0).bias
    if bn:  # the eval-mode batch norm as an affine map
        norm = net.norm(0)
        g = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        w, b = w * g.view(-1, 1, 1, 1), norm.bias - g * norm.running_mean
    extended = F.conv2d(image, w, b, padding=removed.padding + nxt.padding)
    second = net.linear(1)
    whole = F.conv2d(extended, second.weight, second.bias, stride=stride)
    torch.testing.assert_close(got, whole, rtol=0, atol=ATOL)
    with pytest.raises(OperatorError, match="interior"):
        remove_layer(net, 0, exact=True)


def test_remove_conv_into_unpadded_conv_is_exact():
    nxt = ConvLayer(4, padding=0, batch_norm=True, pool=2)  # keeps its batch norm
    topo = cnn(ConvLayer(3, "linear", batch_norm=True), nxt)
    net = make_net(topo)
    m = checked(net, "RL", 0, exact=True)
    assert_same(net, m.net, inputs(topo))


@pytest.mark.parametrize("nxt", ["dense", "output"])
@pytest.mark.parametrize(
    "removed",
    [
        ConvLayer(3, "linear"),
        ConvLayer(3, "linear", stride=2, padding=0, bias=False, batch_norm=True),
        ConvLayer(2, "linear", kernel_size=4, stride=3, padding=2, batch_norm=True),
    ],
    ids=lambda layer: layer.describe(),
)
def test_remove_conv_into_dense_is_exact(removed, nxt):
    """Conv and flatten form a linear map, merged into the next dense layer exactly, with
    any stride and padding; the dense layer's fan-in becomes the block's input size."""
    before = ConvLayer(2, batch_norm=True, pool=2)
    topo = cnn(before, removed, dense=NEXT[nxt][1], shape=(1, 12, 12))
    net = make_net(topo)
    m = checked(net, "RL", 1, exact=True)
    assert m.net.topology.num_conv == 1
    assert m.net.topology.fan_in(1) == math.prod(topo.output_shape(0))
    assert_same(net, m.net, inputs(topo))


def test_remove_nonlinear_conv_loses_its_activation():
    topo = cnn(ConvLayer(3), ConvLayer(4, padding=0))
    net = make_net(topo)
    with pytest.raises(OperatorError, match="linear"):
        remove_layer(net, 0, exact=True)
    m = checked(net, "RL", 0)
    with torch.no_grad():
        assert torch.isfinite(m.net(inputs(topo))).all()


@pytest.mark.parametrize(
    ("topo", "layer", "reason"),
    [
        (cnn(ConvLayer(3, pool=2), ConvLayer(4)), 0, "max-pools its output (pool 2)"),
        (cnn(ConvLayer(3, pool=2), dense=(5,)), 0, "max pool is not linear"),
        (cnn(ConvLayer(3, stride=2), ConvLayer(4)), 0, "stride 2; merging it into the next "
         "conv needs stride 1"),
        (cnn(ConvLayer(3), dense=()), 0, "only hidden layer"),
    ],
)
def test_remove_conv_that_cannot_merge_raises(topo, layer, reason):
    net = make_net(topo)
    before = snapshot(net)
    with pytest.raises(OperatorError, match=re.escape(reason)):
        remove_layer(net, layer)
    with pytest.raises(OperatorError, match=re.escape(reason)):
        operator("RL").topology(topo, layer)
    check = snapshot(net)
    assert all(torch.equal(check[k], v) for k, v in before.items())


# --------------------------------------------------------------------------- OL


@pytest.mark.parametrize(("bn", "bias"), [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("nxt", NEXT)
def test_remove_channels_of_low_rank_linear_conv(bn, bias, nxt):
    """Exact when the dropped singular values are zero, except that a bias residual folded
    into a padding next conv's bias is exact on interior pixels only."""
    convs, dense = NEXT[nxt]
    padded = (ConvLayer(4, batch_norm=True),) if convs else ()  # a padding next conv
    topo = cnn(ConvLayer(4, "linear", bias=bias, batch_norm=bn), *padded, dense=dense)
    net = make_net(topo)
    low_rank(net, 0, 2)
    x = inputs(topo)
    m = checked(net, "OL", 0, 2)
    assert m.net.topology.hidden[0].width == 2
    if convs and (bias or bn):
        want, got = conv_output(net, 1, x), conv_output(m.net, 1, x)
        inside = interior(topo, 1)
        torch.testing.assert_close(got[..., inside], want[..., inside], rtol=0, atol=ATOL)
        assert not torch.allclose(got, want)
    else:
        assert_same(net, m.net, x)
    if bn:  # folded: the batch norm is the identity in eval mode, beta holds the bias
        state = m.net.norm_states()[0]
        assert torch.equal(state["running_mean"], torch.zeros(2, dtype=torch.float64))
        assert torch.equal(state["running_var"], torch.ones(2, dtype=torch.float64))


def test_remove_channels_before_a_bias_free_conv():
    """The bias residual of a linear conv gets a new bias in a next conv that had none."""
    topo = cnn(ConvLayer(4, "linear"), ConvLayer(3, bias=False, kernel_size=1, padding=0))
    net = make_net(topo)
    low_rank(net, 0, 2)
    m = checked(net, "OL", 0, 2)
    assert m.net.topology.hidden[1].bias
    assert_same(net, m.net, inputs(topo))


def test_remove_channels_keeps_top_directions():
    """Any conv: the kept filters are the top left singular directions applied to W."""
    topo = case("stride", "dense")
    net = make_net(topo)
    m = remove_neurons(net, 0, 1)
    w = net.linear(0).weight.flatten(1)
    bn = net.norm(0)
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    u = torch.linalg.svd(g[:, None] * w).U[:, :3]
    torch.testing.assert_close(m.net.linear(0).weight.flatten(1), u.T @ (g[:, None] * w))


def test_remove_channels_with_pool_is_not_exact():
    """Max pooling does not commute with the projection: documented as not exact."""
    topo = cnn(ConvLayer(4, "linear", pool=2))
    net = make_net(topo)
    low_rank(net, 0, 2)
    m = remove_neurons(net, 0, 2)
    with torch.no_grad():
        assert not torch.allclose(net(inputs(topo)), m.net(inputs(topo)))


# --------------------------------------------------------------------------- dense in a CNN


@pytest.mark.parametrize("code", ["AN", "AL", "RL", "OL", "T"])
def test_dense_layers_of_a_cnn(code):
    """Operators on the dense part of a CNN keep working (layer 1: the first dense)."""
    topo = cnn(ConvLayer(3, batch_norm=True, pool=2), dense=(6, 4))
    net = make_net(topo)
    if code in ("RL", "OL"):  # exact for a linear layer (OL: of low rank)
        topo = topo.with_hidden([topo.hidden[0], replace(topo.hidden[1], activation="linear"),
                                 topo.hidden[2]])
        net = make_net(topo)
        low_rank(net, 1, 2)
    m = checked(net, code, 1, {"AN": 3, "OL": 2, "T": 4}.get(code, 0))
    if code != "T":
        assert_same(net, m.net, inputs(topo))


# --------------------------------------------------------------------------- optimiser state


def trained(topo: Topology, steps: int = 2):
    torch.manual_seed(0)
    net = make_net(topo).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for s in range(steps):
        x = inputs(topo, seed=10 + s)
        opt.zero_grad()
        F.mse_loss(net(x), torch.ones(len(x), topo.output_size, dtype=x.dtype)).backward()
        opt.step()
    return net.eval(), opt


OPTIM_CASES = [
    ("AN", 0, 4, cnn(ConvLayer(3, pool=2), dense=(5,))),  # incoming split, dense next
    ("AN", 0, 4, cnn(BN, ConvLayer(4, "tanh"))),  # outgoing split, conv next
    ("AN", 1, 3, cnn(PLAIN, BN)),  # outgoing split, output next
    ("T", 0, 1, cnn(BN, ConvLayer(4))),
    ("T", 1, 1, cnn(PLAIN, STRIDE)),
    ("AL", 0, 0, cnn(BN, STRIDE)),
    ("RL", 0, 0, cnn(ConvLayer(3, "linear", batch_norm=True), ConvLayer(4, batch_norm=True))),
    ("OL", 0, 1, cnn(BN, STRIDE)),
]


@pytest.mark.parametrize(("code", "layer", "amount", "topo"), OPTIM_CASES)
def test_momentum_follows_the_parameter_map(code, layer, amount, topo):
    """SGD momentum carried by transfer_state is the old momentum sliced and scaled as the
    map says (4-D kernels, flattened columns, batch-norm rows); new parameters start
    without state; training goes on."""
    net, opt = trained(topo)
    old = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    m = checked(net, code, layer, amount)
    new_opt = torch.optim.SGD(m.net.parameters(), lr=0.01, momentum=0.9)
    shapes = [p.shape for p in net.parameters()]
    new_opt.load_state_dict(transfer_state(opt.state_dict(), m.param_map, shapes))
    kinds = set()
    for key, p, src in zip(param_layout(m.net.topology), m.net.parameters(), m.param_map,
                           strict=True):
        if src is None:
            assert not new_opt.state[p], key
        else:
            want = mapped(old[src.param], src)
            assert torch.equal(new_opt.state[p]["momentum_buffer"], want), key
            kinds.add(key[1])
    assert "weight" in kinds
    assert "bn_weight" in kinds or all(state is None for state in net.norm_states())
    x = inputs(topo, seed=20)
    m.net.train()
    F.mse_loss(m.net(x), torch.ones(len(x), topo.output_size, dtype=x.dtype)).backward()
    new_opt.step()
    assert all(torch.isfinite(p).all() for p in m.net.parameters())


@pytest.mark.parametrize("case_", OPTIM_CASES[:3], ids=["incoming", "outgoing", "output"])
def test_step_on_carried_momentum_keeps_the_split_function(case_):
    """As for dense AN: a step driven by the carried momentum alone (zero gradient) keeps
    the child computing what the parent computes after the same step."""
    _, layer, amount, topo = case_
    net, opt = trained(topo)
    m = add_neurons(net, layer, amount, generator=torch.Generator().manual_seed(0))
    new_opt = torch.optim.SGD(m.net.parameters(), lr=0.01, momentum=0.9)
    shapes = [p.shape for p in net.parameters()]
    new_opt.load_state_dict(transfer_state(opt.state_dict(), m.param_map, shapes))
    for model, optim in ((net, opt), (m.net.eval(), new_opt)):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optim.step()
    assert_same(net, m.net, inputs(topo))


# --------------------------------------------------------------------------- random CNNs


@st.composite
def cnns(draw):
    def block(width: int) -> ConvLayer:
        k = draw(st.integers(1, 3))
        return ConvLayer(
            width,
            draw(st.sampled_from(["relu", "linear", "tanh"])),
            draw(st.booleans()),
            kernel_size=k,
            stride=draw(st.integers(1, 2)),
            padding=draw(st.integers(0, k // 2 + 1)),
            batch_norm=draw(st.booleans()),
            pool=draw(st.sampled_from([1, 1, 2])),
        )

    convs = [block(draw(st.integers(1, 5))) for _ in range(draw(st.integers(1, 3)))]
    dense = draw(st.lists(st.integers(1, 4), max_size=2))
    shape = (draw(st.integers(1, 2)), draw(st.integers(5, 9)), draw(st.integers(5, 9)))
    try:
        return cnn(*convs, dense=dense, shape=shape, out=2)
    except ValueError:  # a block that does not fit its input
        return cnn(ConvLayer(2), dense=dense, shape=shape, out=2)


@settings(max_examples=max(20, settings().max_examples // 5))
@given(cnns(), st.sampled_from(["AN", "AL", "RL", "OL", "T"]), st.data())
def test_every_operator_on_random_cnns(topo, code, data):
    """The contract on random CNNs; AN and AL exact; whatever is refused is refused with an
    OperatorError, the input untouched."""
    net = make_net(topo, data.draw(st.integers(0, 100)))
    layer = data.draw(st.integers(0, topo.depth - 1))
    amount = data.draw(st.integers(1, topo.hidden[layer].width + 1))
    before = snapshot(net)
    try:
        m = checked(net, code, layer, amount if code in ("AN", "OL", "T") else 0)
    except OperatorError:
        event(f"{code} refused")
        after = snapshot(net)
        assert all(torch.equal(after[k], v) for k, v in before.items())
        return
    event(f"{code} on a {'conv' if layer < topo.num_conv else 'dense'} layer")
    if code in ("AN", "AL"):
        assert_same(net, m.net, inputs(topo))
    with torch.no_grad():
        assert torch.isfinite(m.net(inputs(topo))).all()
