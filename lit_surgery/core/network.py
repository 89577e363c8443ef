"""The ``torch.nn`` network built from a :class:`~lit_surgery.core.topology.Topology`.

Parameters come in a stable order (hidden layers in order, each weight then bias, then
the output layer): a fresh build of the same topology has the same order, which is what
optimiser state and operator parameter maps index by.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lit_surgery.core.topology import LAYER_KINDS, Topology

LayerWeights = tuple[Tensor, Tensor | None]


class SurgeryNet(nn.Module):
    """Flatten, hidden layers, output layer (logits; softmax lives in the loss)."""

    def __init__(self, topology: Topology) -> None:
        super().__init__()
        self.topology = topology
        self.hidden = nn.ModuleList(
            nn.Sequential(*LAYER_KINDS[layer.kind].block(topology.fan_in(i), layer))
            for i, layer in enumerate(topology.hidden)
        )
        self.output = nn.Linear(topology.fan_in(topology.depth), topology.output_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for block in self.hidden:
            x = block(x)
        return self.output(x)

    def linear(self, index: int) -> nn.Linear:
        """The affine map of hidden layer ``index``; ``index == depth`` is the output layer."""
        return self.output if index == self.topology.depth else self.hidden[index][0]

    def layer_weights(self) -> list[LayerWeights]:
        """Detached copies of (weight, bias) for every hidden layer and the output layer."""
        layers = [self.linear(i) for i in range(self.topology.depth + 1)]
        return [
            (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for m in layers
        ]

    def to_sequential(self) -> nn.Sequential:
        """A plain ``nn.Sequential`` with the same function, loadable without lit_surgery."""
        modules: list[nn.Module] = [nn.Flatten()]
        for block in self.hidden:
            modules.extend(m for m in block if not isinstance(m, nn.Identity))
        modules.append(self.output)
        return copy.deepcopy(nn.Sequential(*modules))


def build(
    topology: Topology,
    weights: Sequence[LayerWeights] | None = None,
    *,
    like: nn.Module | None = None,
) -> SurgeryNet:
    """Build a network, optionally with given (weight, bias) per layer.

    ``like`` gives the device and dtype (those of its first parameter).
    """
    net = SurgeryNet(topology)
    if like is not None:
        ref = next(like.parameters())
        net = net.to(device=ref.device, dtype=ref.dtype)
    if weights is not None:
        if len(weights) != topology.depth + 1:
            raise ValueError(f"expected {topology.depth + 1} layers of weights, got {len(weights)}")
        with torch.no_grad():
            for i, (w, b) in enumerate(weights):
                layer = net.linear(i)
                layer.weight.copy_(w)
                if (b is None) != (layer.bias is None):
                    raise ValueError(f"layer {i}: bias given does not match the topology")
                if b is not None:
                    layer.bias.copy_(b)
    return net


def param_layout(topology: Topology) -> list[tuple[int, str]]:
    """(layer index, "weight" | "bias") for each parameter, in ``parameters()`` order."""
    layout: list[tuple[int, str]] = []
    for i, layer in enumerate(topology.hidden):
        layout.append((i, "weight"))
        if layer.bias:
            layout.append((i, "bias"))
    layout += [(topology.depth, "weight"), (topology.depth, "bias")]
    return layout
