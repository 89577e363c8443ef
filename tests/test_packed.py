"""Branches trained as one packed network take the same steps as one after the other."""

import copy
import math
from functools import partial

import pytest
import torch

from lit_surgery.core.network import build
from lit_surgery.core.packed import MIN_WIDTH, PackedMLPs, packable, train_packed
from lit_surgery.core.state import Branch
from lit_surgery.core.topology import Layer, Topology
from lit_surgery.core.training import train_branch
from lit_surgery.data import digits
from lit_surgery.plain import PlainTrainer

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(200, 20, generator=g), torch.randint(0, 4, (200,), generator=g)
    return x, y, x[:50] + 0.1, y[:50]


def _nets(*hidden):
    torch.manual_seed(1)
    return [build(Topology.mlp(20, h, 4)) for h in hidden]


def _sequential(branches, x, y, orders, x_val, y_val, optimizer=SGD):
    """What the packed step must equal: train_branch on each branch's rows in turn."""
    return [
        train_branch(b, optimizer, [(x[o[j]], y[o[j]]) for o in orders], x_val, y_val)
        for j, b in enumerate(branches)
    ]


def _assert_same(a, b):
    for ba, bb in zip(a, b, strict=True):
        for pa, pb in zip(ba.net.parameters(), bb.net.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
        sa, sb = ba.optimizer_state, bb.optimizer_state
        assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
        for i, entry in sa["state"].items():
            torch.testing.assert_close(
                entry["momentum_buffer"], sb["state"][i]["momentum_buffer"], rtol=0, atol=1e-6
            )


@pytest.mark.parametrize("min_width", [MIN_WIDTH, 1])  # padded to 16, or only to the widest
@pytest.mark.parametrize(
    "hidden",
    [
        ([5, 7], [3], [6, 4, 2]),  # widths padded, two branches continued by ReLU identities
        ((Layer(4, "tanh"),), (Layer(6, "tanh"), Layer(3, "linear"))),  # a linear identity
    ],
)
def test_branches_of_other_widths_and_depths_take_the_same_steps_as_one_by_one(
    hidden, min_width
):
    x, y, x_val, y_val = _data()
    torch.manual_seed(1)
    nets = [
        build(Topology(20, h, 4) if isinstance(h, tuple) else Topology.mlp(20, h, 4))
        for h in hidden
    ]
    assert packable(nets, SGD) is None
    widest = max(n.topology.hidden[0].width for n in nets)
    assert PackedMLPs(nets, min_width).weights[0].shape[2] == max(min_width, widest)
    one = [Branch(i, copy.deepcopy(n)) for i, n in enumerate(nets)]
    packed = [Branch(i, copy.deepcopy(n)) for i, n in enumerate(nets)]
    # branch 0 continues an optimiser state, the others start fresh
    train_branch(one[0], SGD, [(x[:16], y[:16])], x_val, y_val)
    packed[0] = copy.deepcopy(one[0])
    g = torch.Generator().manual_seed(2)
    orders = [torch.stack([torch.randperm(200, generator=g)[:16] for _ in nets]) for _ in range(40)]
    metrics = _sequential(one, x, y, orders, x_val, y_val)
    assert train_packed(packed, SGD, x, y, orders, x_val, y_val, min_width) == metrics
    _assert_same(one, packed)
    for trained, start in zip(one, nets, strict=True):  # the steps did something
        assert not torch.equal(trained.net.output.weight, start.output.weight)


def test_without_momentum_and_with_a_last_short_batch():
    x, y, x_val, y_val = _data(3)
    plain_sgd = partial(torch.optim.SGD, lr=0.1)
    nets = _nets([8], [8, 8])
    one = [Branch(i, copy.deepcopy(n)) for i, n in enumerate(nets)]
    packed = [Branch(i, copy.deepcopy(n)) for i, n in enumerate(nets)]
    perms = torch.stack([torch.randperm(200), torch.randperm(200)])
    orders = list(perms.split(48, dim=1))  # the last batch holds 8 rows
    metrics = _sequential(one, x, y, orders, x_val, y_val, plain_sgd)
    assert train_packed(packed, plain_sgd, x, y, orders, x_val, y_val) == metrics
    _assert_same(one, packed)
    assert packed[0].optimizer_state["state"] == {}  # as torch leaves SGD without momentum


def test_a_diverging_branch_reports_nan_and_the_other_trains_on():
    x, y, x_val, y_val = _data()
    nets = _nets([6], [6])
    with torch.no_grad():
        nets[1].output.bias.fill_(math.inf)
    branches = [Branch(i, n) for i, n in enumerate(nets)]
    orders = [torch.stack([torch.arange(16), torch.arange(16)])] * 5
    first, second = train_packed(branches, SGD, x, y, orders, x_val, y_val)
    assert math.isfinite(first) and math.isnan(second)


@pytest.mark.parametrize(
    ("hidden", "optimizer", "reason"),
    [
        (([4], [4]), partial(torch.optim.Adam, lr=0.01), "not SGD"),
        (([4], [4]), partial(torch.optim.SGD, lr=0.1, weight_decay=1e-4), "weight decay"),
        (([4], [4]), partial(torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.5), "dampening"),
    ],
)
def test_optimisers_that_would_move_the_padding_are_refused(hidden, optimizer, reason):
    assert reason in packable(_nets(*hidden), optimizer)


def test_topologies_whose_padding_would_change_their_function_are_refused():
    def net(*layers):
        return build(Topology(20, tuple(layers), 4))

    relu, tanh = Layer(4), Layer(4, activation="tanh")
    assert "phi(0) != 0" in packable([net(Layer(4, activation="sigmoid")), net(relu)], SGD)
    assert "different activations" in packable([net(tanh), net(relu)], SGD)
    # a shallower branch is continued by identity layers: a ReLU keeps a non-negative
    # input, so the branch must end with a ReLU; a linear layer keeps any input
    assert "can be negative" in packable([net(tanh), net(tanh, Layer(3))], SGD)
    assert packable([net(relu), net(relu, Layer(3))], SGD) is None
    assert packable([net(tanh), net(tanh, Layer(3, activation="linear"))], SGD) is None
    assert "identity layer of tanh" in packable([net(relu), net(relu, Layer(3, "tanh"))], SGD)
    assert "no hidden layer" in packable([net(), net(relu)], SGD)
    no_bias = net(Layer(4, bias=False))
    assert "dense one with bias" in packable([no_bias, net(Layer(4))], SGD)


def test_the_plain_trainer_packs_an_epoch_of_several_branches_as_it_would_train_them():
    data = digits(seed=0)
    topologies = [Topology.mlp(data.input_size, h, data.num_classes) for h in ([12, 6], [20])]
    torch.manual_seed(0)
    nets = [build(t) for t in topologies]

    def trained(pack):
        trainer = PlainTrainer(data, batch_size=32, lr=0.05, momentum=0.9, seed=3)
        branches = [Branch(i, copy.deepcopy(n)) for i, n in enumerate(nets)]
        for _ in range(2):
            if pack:
                metrics = trainer.train_epoch(branches)
            else:
                metrics = [trainer.train(b, 1) for b in branches]
        return branches, metrics, trainer.epoch

    (one, m_one, e_one), (packed, m_packed, e_packed) = trained(False), trained(True)
    assert e_one == e_packed == 4  # each branch its own epochs of the run, in order
    _assert_same(one, packed)
    assert m_packed == pytest.approx(m_one, abs=2 / len(data.y_val))
