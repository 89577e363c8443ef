"""Several MLP branches trained as one network, so a step of k branches costs about one
step's framework overhead.

On a CPU an eager step of a small network is mostly overhead (kernel launches, autograd
bookkeeping, the optimiser's Python), so the policy's two branches trained one after the
other cost twice one branch. Here the branches' weights are stacked into ``(k, in, out)``
tensors, zero-padded to the widest branch at each layer, and a step is one batched matmul
per layer, one loss and one optimiser step for all of them (``benchmarks/packed.py``:
0.96-1.25x one branch's step for k = 2 at [4,4,4] to [132,132,132], against 1.81-2.09x one
after the other; 1.62x at [256,256], whose step is arithmetic).

It is exact, not an approximation: each branch trains on its own batches and its own loss,
and the padding stays out of its function. A padded unit has zero incoming and outgoing
weights and an activation with phi(0) = 0, so its output and every gradient that reaches
its weights are exactly zero. A branch shallower than the others is continued by identity
layers after its last hidden layer (a ReLU identity keeps a non-negative layer's output);
their gradients are zeroed before each step, so they stay the identity. That needs an
optimiser that leaves a parameter with zero gradient and zero state alone and treats a
missing momentum buffer as a zero one: SGD without weight decay or dampening (:func:`packable`
says what rules a population out; the caller then trains branches one by one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_surgery.core.network import SurgeryNet
from lit_surgery.core.state import Branch
from lit_surgery.core.topology import ACTIVATIONS, NON_NEGATIVE
from lit_surgery.core.training import OptimizerFactory, evaluate

MIN_WIDTH = 16
"""Packed layers are at least this wide by default (zero-padded like any narrower branch):
on the development machine's CPU a batched matmul of 32 x 784 inputs into 4-10 columns, and
its weight gradient, ran 2-4x slower than into 16. ``benchmarks/packed.py`` with and without
``--min-width 1`` at 576cf4e: two packed branches of [4,4,4] 1.08x against 1.15x one
branch's step, [10,10,10] 1.12x against 1.22x, [35,30,10] 0.96x against 1.13x, four
[10,10,10] 1.22x against 1.67x, but [10,10,10] + [14,10,10,10] 1.25x against 1.20x."""
ZERO_AT_ZERO = frozenset({"relu", "leaky_relu", "tanh", "gelu", "linear"})
"""Activations with phi(0) = 0: a zero-padded unit outputs zero."""
IDENTITY_ON_NON_NEGATIVE = frozenset({"relu", "leaky_relu", "linear"})
"""phi(z) = z for z >= 0 (linear: for every z): an identity layer with it keeps a
non-negative input."""


def packable(nets: Sequence[SurgeryNet], optimizer: OptimizerFactory) -> str | None:
    """Why ``nets`` cannot be trained as one packed network by ``optimizer``, or None."""
    probe = optimizer([nn.Parameter(torch.zeros(1))])
    if type(probe) is not torch.optim.SGD:
        return f"the optimiser is {type(probe).__name__}, not SGD"
    group = probe.param_groups[0]
    if group["weight_decay"] or group["dampening"] or group["maximize"]:
        return "SGD with weight decay, dampening or maximize"
    depth = max(net.topology.depth for net in nets)
    for net in nets:
        topo = net.topology
        if not topo.depth:
            return f"{topo.describe()} has no hidden layer"
        if topo.num_conv or any(layer.kind != "dense" or not layer.bias for layer in topo.hidden):
            return f"{topo.describe()} has a layer other than a dense one with bias"
        if bad := {layer.activation for layer in topo.hidden} - ZERO_AT_ZERO:
            return f"{topo.describe()} has activation {sorted(bad)} (phi(0) != 0)"
    activations = []
    for p in range(depth):
        acts = {net.topology.hidden[p].activation for net in nets if p < net.topology.depth}
        if len(acts) > 1:
            return f"layer {p} has different activations: {sorted(acts)}"
        activations.append(acts.pop())
    for net in nets:
        topo = net.topology
        last = topo.hidden[-1].activation
        for act in activations[topo.depth :]:
            if act not in IDENTITY_ON_NON_NEGATIVE:
                return f"{topo.describe()} cannot be continued by an identity layer of {act}"
            if act != "linear" and last not in NON_NEGATIVE:
                return f"{topo.describe()} is shallower and its last layer can be negative"
    return None


def _activations(nets: Sequence[SurgeryNet]) -> list[str]:
    """The packed network's activation at each layer (the deepest branch's)."""
    return [layer.activation for layer in max(nets, key=lambda n: n.topology.depth).topology.hidden]


class PackedMLPs(nn.Module):
    """``nets`` (all :func:`packable`) as one module: ``forward`` takes ``(k, B, inputs)``
    and returns ``(k, B, outputs)`` logits, branch j's from its own weights."""

    def __init__(self, nets: Sequence[SurgeryNet], min_width: int = MIN_WIDTH) -> None:
        super().__init__()
        self.nets = list(nets)
        k, depth = len(nets), max(net.topology.depth for net in nets)
        device = nets[0].output.weight.device

        def width(net: SurgeryNet, p: int) -> int:  # an identity layer keeps the last width
            return net.topology.hidden[min(p, net.topology.depth - 1)].width

        first = nets[0].topology
        outs = [max(min_width, *(width(net, p) for net in nets)) for p in range(depth)]
        dims = [first.fan_in(0), *outs, first.output_size]
        self.activations = [ACTIVATIONS[name]() for name in _activations(nets)]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.pieces: list[tuple[int, int, int]] = []  # (branch, its parameter, packed layer)
        frozen: dict[int, Tensor] = {}  # layer -> 0 for branches whose identity it is, else 1
        with torch.no_grad():
            for n_in, n_out in pairwise(dims):
                self.weights.append(nn.Parameter(torch.zeros(k, n_in, n_out, device=device)))
                self.biases.append(nn.Parameter(torch.zeros(k, 1, n_out, device=device)))
            for j, net in enumerate(nets):
                d = net.topology.depth
                for index, p in enumerate([*range(d), depth]):
                    self.pieces.append((j, index, p))
                    layer = net.linear(index)
                    self.weight_piece(self.weights[p], j, index).copy_(layer.weight)
                    self.bias_piece(self.biases[p], j, index).copy_(layer.bias)
                n = width(net, d)
                for p in range(d, depth):  # identities after its last hidden layer
                    self.weights[p][j, :n, :n] = torch.eye(n, device=device)
                    frozen.setdefault(p, torch.ones(k, 1, 1, device=device))[j] = 0
        self.frozen = frozen
        # the step's loops read plain lists: indexing the ParameterLists took 7% of a run
        # from [4,4,4] under cProfile (which inflates Python overhead)
        self.layers = list(zip(self.weights, self.biases, strict=True))

    def weight_piece(self, packed: Tensor, j: int, index: int) -> Tensor:
        """Branch j's parameter ``index``'s weight as a (out, in) view of ``packed`` (a
        packed weight, or a tensor shaped like one)."""
        o, i = self.nets[j].linear(index).weight.shape
        return packed[j, :i, :o].T

    def bias_piece(self, packed: Tensor, j: int, index: int) -> Tensor:
        return packed[j, 0, : self.nets[j].linear(index).weight.shape[0]]

    def flat(self) -> list[nn.Parameter]:
        """The parameters in layer order, each weight then its bias (what
        :meth:`branch_pieces` indexes)."""
        return [t for pair in self.layers for t in pair]

    def branch_pieces(self, packed: list[Tensor]) -> Iterator[tuple[int, int, Tensor]]:
        """(branch, index of its parameter, the view of ``packed`` that holds it), for
        tensors ``packed`` shaped like :meth:`flat`'s parameters."""
        for j, index, p in self.pieces:
            yield j, 2 * index, self.weight_piece(packed[2 * p], j, index)
            yield j, 2 * index + 1, self.bias_piece(packed[2 * p + 1], j, index)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for p, (w, b) in enumerate(self.layers):
            h = torch.baddbmm(b, h, w)
            if p < len(self.activations):
                h = self.activations[p](h)
        return h

    def freeze_identities(self) -> None:
        """Zero the gradients of the identity layers (call between backward and step)."""
        for p, keep in self.frozen.items():
            for t in self.layers[p]:
                t.grad.mul_(keep)

    @torch.no_grad()
    def unpack(self) -> None:
        """Copy the packed weights back into the branches' networks."""
        params = [list(net.parameters()) for net in self.nets]
        for j, index, piece in self.branch_pieces(self.flat()):
            params[j][index].copy_(piece)


def train_packed(
    branches: Sequence[Branch],
    optimizer: OptimizerFactory,
    x: Tensor,
    y: Tensor,
    orders: Iterable[Tensor],
    x_val: Tensor,
    y_val: Tensor,
    min_width: int = MIN_WIDTH,
) -> list[float]:
    """:func:`~lit_surgery.core.training.train_branch` for all ``branches`` at once: each
    ``orders`` item is a ``(k, batch)`` index tensor, row j the samples of branch j's step.
    Returns each branch's validation accuracy (NaN if one of its losses was not finite).
    ``min_width``: see :data:`MIN_WIDTH`."""
    packed = PackedMLPs([b.net for b in branches], min_width)
    params = packed.flat()
    opt = optimizer(params)
    momentum = bool(opt.defaults["momentum"])
    if momentum and any(b.optimizer_state is not None for b in branches):
        # zeros where a branch has no buffer: with dampening 0 it steps like a missing one
        buffers = [torch.zeros_like(p) for p in params]
        for j, index, piece in packed.branch_pieces(buffers):
            state = branches[j].optimizer_state
            entry = state["state"].get(index) if state is not None else None
            if entry is not None and entry.get("momentum_buffer") is not None:
                piece.copy_(entry["momentum_buffer"])
        for p, buf in zip(params, buffers, strict=True):
            opt.state[p]["momentum_buffer"] = buf
    k = len(branches)
    total = torch.zeros(k, device=x_val.device)
    for rows in orders:
        b = rows.shape[1]
        xb = x.index_select(0, rows.reshape(-1)).view(k, b, -1)
        yb = y.index_select(0, rows.reshape(-1))
        logits = packed(xb).reshape(k * b, -1)
        losses = F.cross_entropy(logits, yb, reduction="none").view(k, b).mean(1)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        packed.freeze_identities()
        opt.step()
        total += losses.detach()
    packed.unpack()
    # each branch's optimiser state as train_branch would have left it
    own = [optimizer(b.net.parameters()) for b in branches]
    if momentum:
        buffers = [opt.state[p]["momentum_buffer"] for p in params]
        nets = [list(b.net.parameters()) for b in branches]
        for j, index, piece in packed.branch_pieces(buffers):
            own[j].state[nets[j][index]]["momentum_buffer"] = piece.clone()
    for branch, o in zip(branches, own, strict=True):
        branch.optimizer_state = o.state_dict()
    finite = torch.isfinite(total).tolist()
    return [
        evaluate(b.net, x_val, y_val) if ok else math.nan
        for b, ok in zip(branches, finite, strict=True)
    ]
