import json
from dataclasses import replace

import pytest
import torch

from lit_surgery.core.export import export, load_exported
from lit_surgery.core.network import build, param_layout
from lit_surgery.core.topology import ConvLayer, Layer, Topology, TopologyError

CNNS = [
    Topology.cnn((1, 28, 28), [ConvLayer(8, batch_norm=True, pool=2)], [16], 10),
    Topology.cnn(
        (3, 12, 10),
        [ConvLayer(4, kernel_size=5, stride=2, padding=0, bias=False, batch_norm=True),
         ConvLayer(6, "tanh", pool=2)],
        [7, 5],
        3,
    ),
    Topology.cnn((2, 9, 9), [ConvLayer(3, "linear", kernel_size=1, padding=0),
                             ConvLayer(5, stride=3, batch_norm=True)], [], 4),
    Topology(36, (Layer(5),), 2, (1, 6, 6)),  # image input, dense layers only
]


def test_json_round_trip_writes_version_2_with_conv_fields():
    topo = CNNS[1]
    data = json.loads(topo.to_json())
    assert data["version"] == 2
    assert data["input_shape"] == [3, 12, 10]
    assert data["hidden"][0] == {"width": 4, "activation": "relu", "bias": False, "kind": "conv",
                                 "kernel_size": 5, "stride": 2, "padding": 0,
                                 "batch_norm": True, "pool": 1}
    assert data["hidden"][2] == {"width": 7, "activation": "relu", "bias": True, "kind": "dense"}
    for t in CNNS:
        assert Topology.from_json(t.to_json()) == t
    assert "input_shape" not in Topology.mlp(4, [3], 2).to_dict()


def test_version_1_files_still_read():
    v1 = {"version": 1, "input_size": 5, "output_size": 2,
          "hidden": [{"width": 3, "activation": "tanh", "bias": True, "kind": "dense"}]}
    assert Topology.from_dict(v1) == Topology.mlp(5, [3], 2, "tanh")


@pytest.mark.parametrize("topo", CNNS, ids=lambda t: t.describe())
def test_num_params_counts_every_parameter(topo):
    assert topo.num_params == sum(p.numel() for p in build(topo).parameters())


def test_num_params_by_hand():
    topo = CNNS[0]  # conv 1->8 k3 + bias + BN affine; 8x14x14 -> 16; 16 -> 10
    assert topo.num_params == (8 * 9 + 8 + 16) + (8 * 14 * 14 * 16 + 16) + (16 * 10 + 10)


@pytest.mark.parametrize("topo", CNNS, ids=lambda t: t.describe())
def test_shapes_fan_in_and_matrix_shape_match_the_network(topo):
    net = build(topo).eval()
    seen = []
    for block in [*net.hidden, net.output]:
        block.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[1:])))
    net(torch.randn(2, topo.input_size))
    assert seen == [topo.output_shape(i) for i in range(topo.depth + 1)]
    for i in range(topo.depth + 1):
        weight = net.linear(i).weight
        assert weight.shape[1] == topo.fan_in(i)
        assert weight.reshape(weight.shape[0], -1).shape == topo.matrix_shape(i)


def test_output_shapes_by_hand():
    topo = CNNS[1]  # (12 - 5) // 2 + 1 = 4, (10 - 5) // 2 + 1 = 3; then k3 p1 keeps, pool halves
    assert [topo.output_shape(i) for i in range(topo.depth + 1)] == [
        (4, 4, 3), (6, 2, 1), (7,), (5,), (3,)]
    assert topo.fan_in(2) == 6 * 2 * 1
    assert topo.matrix_shape(1) == (6, 4 * 9)


@pytest.mark.parametrize(
    ("topo", "text"),
    [
        (Topology.cnn((1, 28, 28), [ConvLayer(8, batch_norm=True, pool=2),
                                    ConvLayer(16, stride=2, padding=0)], [64], 10),
         "1x28x28-[c8k3+bn+mp2, c16k3s2p0, 64r]-10"),
        (CNNS[1], "3x12x10-[c4k5s2p0*+bn, c6k3t+mp2, 7r, 5r]-3"),
        (CNNS[2], "2x9x9-[c3k1l, c5k3s3+bn]-4"),
        (CNNS[3], "1x6x6-[5r]-2"),
    ],
)
def test_describe(topo, text):
    assert topo.describe() == text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ConvLayer(3, kernel_size=0), "conv kernel_size must be an integer >= 1, got 0"),
        (lambda: ConvLayer(3, stride=1.5), "conv stride must be an integer >= 1, got 1.5"),
        (lambda: ConvLayer(3, padding=-1), "conv padding must be an integer >= 0, got -1"),
        (lambda: ConvLayer(3, pool=0), "conv pool must be an integer >= 1, got 0"),
        (lambda: ConvLayer(3, batch_norm="yes"), "batch_norm must be true or false, got 'yes'"),
        (lambda: Layer(3, kind="conv"), "a 'conv' layer must be a ConvLayer, got a Layer"),
        (lambda: ConvLayer(3, kind="dense"), "a 'dense' layer must be a Layer, got a ConvLayer"),
        (lambda: Topology(784, (ConvLayer(3),), 10), "conv layers needs input_shape"),
        (lambda: Topology(700, (), 10, (1, 28, 28)),
         r"\(1, 28, 28\) holds 784 values, but input_size is 700"),
        (lambda: Topology(4, (), 10, (1, 2, 2, 1)), r"three positive integers, got \(1, 2, 2, 1\)"),
        (lambda: Topology.cnn((0, 2, 2), [], [], 2), r"three positive integers, got \(0, 2, 2\)"),
        (lambda: Topology(784, (Layer(3), ConvLayer(3)), 10, (1, 28, 28)),
         r"conv layer 1 \(c3k3\) follows a dense layer"),
        (lambda: Topology.cnn((1, 4, 4), [ConvLayer(3, kernel_size=5, padding=0)], [], 2),
         r"conv layer 0 \(c3k5p0\) turns its input of shape \(1, 4, 4\) into \(3, 0, 0\)"),
        (lambda: Topology.cnn((1, 4, 4), [ConvLayer(3, pool=2), ConvLayer(3, pool=4)], [], 2),
         r"conv layer 1 \(c3k3\+mp4\) turns .* \(3, 2, 2\) into \(3, 0, 0\)"),
        (lambda: Topology.from_dict({"version": 2, "input_size": 4, "output_size": 2,
                                     "input_shape": [1, 2, 2],
                                     "hidden": [{"width": 2, "kind": "conv", "pool": "2"}]}),
         "conv pool must be an integer >= 1, got '2'"),
    ],
)
def test_bad_conv_topologies_raise(make, message):
    with pytest.raises(TopologyError, match=message):
        make()


def test_replace_keeps_the_conv_fields():
    layer = ConvLayer(4, "tanh", False, kernel_size=5, stride=2, padding=0, batch_norm=True,
                      pool=2)
    wider = replace(layer, width=9)
    assert isinstance(wider, ConvLayer)
    assert wider == ConvLayer(9, "tanh", False, kernel_size=5, stride=2, padding=0,
                              batch_norm=True, pool=2)


def _trained_stats(topo):
    """A net whose batch norms hold statistics and affine parameters far from a fresh one's."""
    torch.manual_seed(0)
    net = build(topo)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, topo.input_size) * 3 + 1)
        for i in range(topo.depth):
            if (bn := net.norm(i)) is not None:
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)
    return net.eval()


@pytest.mark.parametrize("topo", CNNS[:3], ids=lambda t: t.describe())
def test_build_from_weights_and_norms_reproduces_the_function(topo):
    net = _trained_stats(topo)
    x = torch.randn(6, topo.input_size)
    copy = build(topo, net.layer_weights(), net.norm_states()).eval()
    assert torch.equal(copy(x), net(x))
    without_norms = build(topo, net.layer_weights()).eval()
    assert not torch.equal(without_norms(x), net(x))  # the norms are part of the function


def test_norm_states_are_detached_copies():
    net = _trained_stats(CNNS[0])
    (state, *rest) = net.norm_states()
    assert rest == [None, None]
    assert sorted(state) == ["bias", "num_batches_tracked", "running_mean", "running_var",
                             "weight"]
    assert state["num_batches_tracked"].item() == 3
    state["running_mean"].add_(1)
    assert not torch.equal(state["running_mean"], net.norm(0).running_mean)
    assert not state["weight"].requires_grad


def test_build_rejects_norms_that_do_not_fit():
    net = build(CNNS[0])
    with pytest.raises(ValueError, match="layer 1: batch-norm state given does not match"):
        build(CNNS[0], norms=[*net.norm_states()[:1], net.norm_states()[0], None])
    with pytest.raises(ValueError, match="expected norms for 3 layers, got 1"):
        build(CNNS[0], norms=[None])
    with pytest.raises(ValueError, match=r"layer 0: weight of shape \(8, 1, 5, 5\) given"):
        build(CNNS[0], [(torch.zeros(8, 1, 5, 5), torch.zeros(8)), *net.layer_weights()[1:]])


@pytest.mark.parametrize("topo", CNNS, ids=lambda t: t.describe())
def test_param_layout_follows_named_parameters(topo):
    names = [name for name, _ in build(topo).named_parameters()]
    suffix = {"weight": "0.weight", "bias": "0.bias", "bn_weight": "1.weight", "bn_bias": "1.bias"}
    expected = [
        f"output.{kind}" if i == topo.depth else f"hidden.{i}.{suffix[kind]}"
        for i, kind in param_layout(topo)
    ]
    assert names == expected


@pytest.mark.parametrize("topo", CNNS, ids=lambda t: t.describe())
def test_sequential_export_keeps_a_cnns_function(topo):
    net = _trained_stats(topo)
    x = torch.randn(5, *(topo.input_shape or (topo.input_size,)))
    seq = net.to_sequential().eval()
    assert torch.equal(seq(x), net(x))
    assert torch.equal(net(x.flatten(1)), net(x))  # images or flat rows alike


def test_a_cnn_exports_and_loads_with_its_function(tmp_path):
    net = _trained_stats(CNNS[1])
    export(net, tmp_path)
    x = torch.randn(4, 3, 12, 10)
    assert torch.equal(load_exported(tmp_path)(x), net(x))
