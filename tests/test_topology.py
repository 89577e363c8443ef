import json

import pytest
import torch

from lit_surgery.core.network import build, param_layout
from lit_surgery.core.topology import Layer, Topology, TopologyError


def test_json_round_trip_and_plain_data():
    topo = Topology(5, (Layer(3), Layer(4, "linear", bias=False), Layer(2, "tanh")), 2)
    data = json.loads(topo.to_json())
    assert data["hidden"][1] == {"width": 4, "activation": "linear", "bias": False, "kind": "dense"}
    assert Topology.from_json(topo.to_json()) == topo
    assert Topology.from_dict(topo.to_dict()) == topo


def test_num_params_matches_built_network():
    topo = Topology(7, (Layer(3), Layer(4, "linear", bias=False)), 2)
    net = build(topo)
    assert topo.num_params == sum(p.numel() for p in net.parameters())
    assert topo.num_params == (7 * 3 + 3) + (3 * 4) + (4 * 2 + 2)


def test_parameter_order_is_stable_and_matches_layout():
    topo = Topology.mlp(4, [3, 5], 2)
    names = [n for n, _ in build(topo).named_parameters()]
    assert names == [n for n, _ in build(topo).named_parameters()]
    assert names == ["hidden.0.0.weight", "hidden.0.0.bias", "hidden.1.0.weight",
                     "hidden.1.0.bias", "output.weight", "output.bias"]
    assert param_layout(topo) == [(0, "weight"), (0, "bias"), (1, "weight"), (1, "bias"),
                                  (2, "weight"), (2, "bias")]


def test_sequential_export_has_same_function():
    torch.manual_seed(0)
    net = build(Topology(6, (Layer(4), Layer(3, "linear"), Layer(5, "tanh")), 3))
    x = torch.randn(10, 6)
    seq = net.to_sequential()
    assert torch.equal(seq(x), net(x))
    assert not any(isinstance(m, torch.nn.Identity) for m in seq)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Layer(0), "width"),
        (lambda: Layer(3, "swish"), "unknown activation 'swish'"),
        (lambda: Layer(3, kind="conv9"), "unknown layer kind"),
        (lambda: Topology(0, (), 2), "input_size"),
        (lambda: Topology(3, (Layer(2),), -1), "output_size"),
        (lambda: Topology.from_dict({"version": 99, "input_size": 2, "hidden": [],
                                     "output_size": 2}), "version 99"),
        (lambda: Topology.from_dict({"version": 1, "input_size": 2, "hidden": [],
                                     "output_size": 2, "extra": 1}), "unknown topology keys"),
        (lambda: Topology.from_dict({"version": 1, "input_size": 2, "hidden": [{"w": 1}],
                                     "output_size": 2}), "malformed"),
    ],
)
def test_bad_topologies_raise(make, message):
    with pytest.raises(TopologyError, match=message):
        make()
