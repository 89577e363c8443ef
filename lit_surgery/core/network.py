"""The ``torch.nn`` network built from a :class:`~lit_surgery.core.topology.Topology`.

Parameters come in a stable order (hidden layers in order, each weight then bias, then a
conv block's batch-norm weight and bias, then the output layer): a fresh build of the same
topology has the same order, which is what optimiser state and operator parameter maps
index by.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lit_surgery.core.topology import LAYER_KINDS, ConvLayer, Topology

LayerWeights = tuple[Tensor, Tensor | None]
NormState = dict[str, Tensor] | None
"""A batch norm's weight, bias, running_mean, running_var and num_batches_tracked; None for
a layer without one."""


class SurgeryNet(nn.Module):
    """Conv blocks on the input seen as ``input_shape``, flatten, dense layers, output layer
    (logits; softmax lives in the loss)."""

    def __init__(self, topology: Topology) -> None:
        super().__init__()
        self.topology = topology
        self.hidden = nn.ModuleList(
            nn.Sequential(*LAYER_KINDS[layer.kind].block(topology.fan_in(i), layer))
            for i, layer in enumerate(topology.hidden)
        )
        self.output = nn.Linear(topology.fan_in(topology.depth), topology.output_size)

    def forward(self, x: Tensor) -> Tensor:
        convs = self.topology.num_conv
        x = x.reshape(-1, *self.topology.input_shape) if convs else x.flatten(1)
        for i, block in enumerate(self.hidden):
            if i == convs:
                x = x.flatten(1)
            x = block(x)
        return self.output(x.flatten(1))

    def linear(self, index: int) -> nn.Linear | nn.Conv2d:
        """The affine map of layer ``index`` (a Conv2d for a conv block); ``index == depth``
        is the output layer."""
        return self.output if index == self.topology.depth else self.hidden[index][0]

    def norm(self, index: int) -> nn.BatchNorm2d | None:
        """The batch norm of conv block ``index``, None for a layer without one."""
        if index == self.topology.depth:
            return None
        return next((m for m in self.hidden[index] if isinstance(m, nn.BatchNorm2d)), None)

    def incoming_matrix(self, index: int) -> Tensor:
        """Layer ``index``'s weight as the matrix the SVD criteria read, one row per unit
        (:meth:`Topology.matrix_shape`): a conv kernel as (out, in * kh * kw)."""
        w = self.linear(index).weight.detach()
        return w.reshape(w.shape[0], -1)

    def outgoing_matrix(self, index: int) -> Tensor:
        """The next layer's weights that read hidden layer ``index``'s units, one row per
        unit: a channel's row holds all its weights in the next conv (``weight[:, c]``), or
        its ``H * W`` columns of the dense layer after the flatten."""
        w = self.linear(index + 1).weight.detach()
        width = self.topology.hidden[index].width
        return w.transpose(0, 1).reshape(width, -1)

    def layer_weights(self) -> list[LayerWeights]:
        """Detached copies of (weight, bias) for every hidden layer and the output layer (a
        conv weight is 4-D: out, in, kh, kw)."""
        layers = [self.linear(i) for i in range(self.topology.depth + 1)]
        return [
            (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for m in layers
        ]

    def norm_states(self) -> list[NormState]:
        """Detached copies of every layer's batch-norm state (None where there is none): the
        running statistics are part of the function in eval mode, so surgery carries them."""
        return [
            None if bn is None else {k: v.detach().clone() for k, v in bn.state_dict().items()}
            for bn in map(self.norm, range(self.topology.depth + 1))
        ]

    def to_sequential(self) -> nn.Sequential:
        """A plain ``nn.Sequential`` with the same function, loadable without lit_surgery:
        Flatten, Unflatten to ``input_shape`` and the conv blocks' modules if any, Flatten,
        the dense layers' modules, the output Linear (identity activations left out)."""
        convs = self.topology.num_conv

        def unpacked(blocks: nn.ModuleList) -> list[nn.Module]:
            return [m for block in blocks for m in block if not isinstance(m, nn.Identity)]

        head = [nn.Flatten(), nn.Unflatten(1, self.topology.input_shape)] if convs else []
        modules = [
            *head,
            *unpacked(self.hidden[:convs]),
            nn.Flatten(),
            *unpacked(self.hidden[convs:]),
            self.output,
        ]
        return copy.deepcopy(nn.Sequential(*modules))


def build(
    topology: Topology,
    weights: Sequence[LayerWeights] | None = None,
    norms: Sequence[NormState] | None = None,
    *,
    like: nn.Module | None = None,
) -> SurgeryNet:
    """Build a network, optionally with given (weight, bias) and batch-norm state per layer
    (as :meth:`SurgeryNet.layer_weights` and :meth:`SurgeryNet.norm_states` give them);
    batch norms without a given state start fresh.

    ``like`` gives the device and dtype (those of its first parameter).
    """
    net = SurgeryNet(topology)
    if like is not None:
        ref = next(like.parameters())
        net = net.to(device=ref.device, dtype=ref.dtype)
    layers = topology.depth + 1
    for name, given in (("weights", weights), ("norms", norms)):
        if given is not None and len(given) != layers:
            raise ValueError(f"expected {name} for {layers} layers, got {len(given)}")
    with torch.no_grad():
        for i, (w, b) in enumerate(weights or ()):
            layer = net.linear(i)
            if w.shape != layer.weight.shape:
                raise ValueError(
                    f"layer {i}: weight of shape {tuple(w.shape)} given, the topology needs "
                    f"{tuple(layer.weight.shape)}"
                )
            layer.weight.copy_(w)
            if (b is None) != (layer.bias is None):
                raise ValueError(f"layer {i}: bias given does not match the topology")
            if b is not None:
                layer.bias.copy_(b)
    for i, state in enumerate(norms or ()):
        bn = net.norm(i)
        if (state is None) != (bn is None):
            raise ValueError(f"layer {i}: batch-norm state given does not match the topology")
        if bn is not None and state is not None:
            bn.load_state_dict(state)
    return net


def param_layout(topology: Topology) -> list[tuple[int, str]]:
    """(layer index, "weight" | "bias" | "bn_weight" | "bn_bias") for each parameter, in
    ``parameters()`` order."""
    layout: list[tuple[int, str]] = []
    for i, layer in enumerate(topology.hidden):
        layout.append((i, "weight"))
        if layer.bias:
            layout.append((i, "bias"))
        if isinstance(layer, ConvLayer) and layer.batch_norm:
            layout += [(i, "bn_weight"), (i, "bn_bias")]
    layout += [(topology.depth, "weight"), (topology.depth, "bias")]
    return layout
