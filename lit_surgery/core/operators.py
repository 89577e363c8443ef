"""The six surgery operators of SURGERY.md as pure functions.

Each takes a network and returns a :class:`Mutation`: a *new* network (the input is never
touched) and a parameter map saying which slice of which old parameter each new
parameter continues, so that optimiser state can follow (:mod:`lit_surgery.core.optim_state`).

Weights use torch's convention: a layer's weight is ``out x in``. How much of the
function each operator keeps:

========  ================================================================================
``B``     identical (a deep copy).
``AN``    identical, and the new units are not copies. Units are split with unequal
          positive shares ``a_c`` (sum 1): on the incoming side for positively homogeneous
          activations (``phi(a z) = a phi(z)``), on the outgoing side (Net2Net) otherwise.
          The split units get different gradients, so they drift apart in training.
          ``split="equal"`` is the reference's split into identical copies.
``AL``    identical: identity weights and zero bias, linear, or ReLU after a layer whose
          outputs are non-negative (ReLU, sigmoid).
``RL``    identical when the removed layer is linear; otherwise its activation is lost.
``OL``    keeps the top ``n - r`` singular directions of the incoming matrix; identical for
          a linear layer whose dropped singular values are zero (the bias component outside
          the kept directions is folded into the next layer's bias).
``T``     the weight becomes its best rank-``k`` approximation: Frobenius error
          ``sqrt(sum of dropped s_j^2)`` (Eckart-Young), returned in ``Mutation.error``.
========  ================================================================================
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lit_surgery.core.network import LayerWeights, SurgeryNet, build, param_layout
from lit_surgery.core.topology import NON_NEGATIVE, POSITIVELY_HOMOGENEOUS, Layer, Topology

OPERATOR_CODES = ("B", "AN", "AL", "RL", "OL", "T")
GROW = frozenset({"AN", "AL"})
SHRINK = frozenset({"RL", "OL", "T"})

Index = tuple[int, ...]
"""Indices into one dimension of an old parameter (repeated for the copies of a split unit)."""
Scale = tuple[float, ...]
"""One factor per position along one dimension of a new parameter."""


class OperatorError(ValueError):
    """An operator that cannot apply to this network, with the reason."""


@dataclass(frozen=True)
class Source:
    """A new parameter continues old parameter ``param`` (its position), sliced by ``index``
    (one entry per dimension; ``None`` keeps the dimension whole).

    ``scale`` (one entry per dimension; ``None`` or missing: all ones) multiplies the slice:
    position ``j`` of dimension ``d`` was multiplied by ``scale[d][j]``. Only ``AN`` has
    factors other than 1 (the shares of split units); optimiser momentum follows them
    (:func:`add_neurons` says why).
    """

    param: int
    index: tuple[Index | None, ...]
    scale: tuple[Scale | None, ...] = ()


ParamMap = tuple[Source | None, ...]
"""One entry per new parameter, in ``parameters()`` order; ``None``: a new value."""


@dataclass
class Mutation:
    net: SurgeryNet
    param_map: ParamMap
    error: float = 0.0
    """For ``T``: Frobenius norm of the weight change (the Eckart-Young bound)."""


@dataclass(frozen=True)
class _LayerSource:
    """New layer continues old layer ``old``; rows/cols and their scales as in :class:`Source`."""

    old: int
    rows: Index | None = None
    cols: Index | None = None
    weight: bool = True
    bias: bool = True
    row_scale: Scale | None = None
    col_scale: Scale | None = None


@dataclass
class _Plan:
    topology: Topology
    weights: list[LayerWeights]
    sources: list[_LayerSource | None] = field(default_factory=list)
    error: float = 0.0


# --------------------------------------------------------------------------- helpers


def _check_layer(topology: Topology, layer: int, what: str) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < topology.depth:
        raise OperatorError(
            f"{what}: layer {layer!r} is out of range; the network has {topology.depth} "
            f"hidden layers (0..{topology.depth - 1})"
        )
    if topology.hidden[layer].kind != "dense":
        raise OperatorError(f"{what}: layer kind {topology.hidden[layer].kind!r} is not supported")


def _identity_sources(n_layers: int) -> list[_LayerSource | None]:
    return [_LayerSource(i) for i in range(n_layers)]


def _finish(net: SurgeryNet, plan: _Plan) -> Mutation:
    new = build(plan.topology, plan.weights, like=net)
    return Mutation(new, _param_map(net.topology, plan.topology, plan.sources), plan.error)


def _param_map(old: Topology, new: Topology, sources: Sequence[_LayerSource | None]) -> ParamMap:
    old_pos = {entry: i for i, entry in enumerate(param_layout(old))}
    result: list[Source | None] = []
    for layer, kind in param_layout(new):
        src = sources[layer]
        key = None if src is None else (src.old, kind)
        if src is None or key not in old_pos or not getattr(src, kind):
            result.append(None)
        elif kind == "weight":
            result.append(
                Source(old_pos[key], (src.rows, src.cols), (src.row_scale, src.col_scale))
            )
        else:
            result.append(Source(old_pos[key], (src.rows,), (src.row_scale,)))
    return tuple(result)


def _svd(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Full SVD in float64 (small matrices; exactness matters more than speed here)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=True)
    return u, s, vh


# --------------------------------------------------------------------------- B


def base(net: SurgeryNet) -> Mutation:
    """``B``: an unchanged copy, in memory."""
    n = len(param_layout(net.topology))
    return Mutation(copy.deepcopy(net), tuple(Source(i, ()) for i in range(n)))


# --------------------------------------------------------------------------- AN


def add_neurons_topology(topology: Topology, layer: int, amount: int) -> Topology:
    _check_layer(topology, layer, "AN")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 1:
        raise OperatorError(f"AN: amount must be a positive number of units, got {amount!r}")
    hidden = list(topology.hidden)
    hidden[layer] = Layer(
        hidden[layer].width + amount,
        hidden[layer].activation,
        hidden[layer].bias,
        hidden[layer].kind,
    )
    return topology.with_hidden(hidden)


def add_neurons(
    net: SurgeryNet,
    layer: int,
    amount: int,
    *,
    split: str = "asymmetric",
    generator: torch.Generator | None = None,
) -> Mutation:
    """``AN``: widen hidden layer ``layer`` by ``amount`` units by splitting existing ones.

    Which units are split is drawn from ``generator``. ``split="asymmetric"`` gives each
    copy a different share (drawn from [0.5, 1.5], normalised); ``"equal"`` gives 1/m.
    Copy ``c`` of unit ``p`` gets share ``a_c`` of one side and a plain copy of the other:
    incoming split ``(a_c w_p, a_c b_p | v_p)``, outgoing split ``(w_p, b_p | a_c v_p)``.

    Optimiser state (``param_map``): every copy, the first included, continues its parent
    with the parent's momentum and Adam moments, and the first moments (SGD's momentum,
    Adam's ``exp_avg``) are split like the weights: times ``a_c`` on the scaled side, copied
    on the other; averages of squared gradients (``exp_avg_sq``) and ``step`` are copied.
    Why: the momentum is the optimiser's velocity. Split like the weights, the part of the
    next update that comes from it is exactly the split of the parent's (SGD ``lr mu a_c
    m_p``; Adam ``a_c m/sqrt(v)``, as ``v`` is copied), so a step on the carried state alone
    leaves the child computing what the parent computes after the same step (tested):
    function preservation holds through the optimiser's memory, not only at the split.
    (The copies' own gradients scale the other way, ``a_c`` on the copied side, so these
    are not the moments their own optimiser would have gathered; it is the velocity that
    the next update uses.) Copying the momentum to every copy instead would move each
    copy's incoming weights by the parent's whole step on an incoming split, so the widened
    unit would move as many times as far as it has copies; the fresh gradients already do
    that (each copy's incoming gradient is the parent's whole gradient, ``phi'(a z) =
    phi'(z)``), and carried momentum would add to the jolt (copied moments gave a higher
    loss in the first steps after a split than split ones on digits). Symmetry: the
    copies' momenta are proportional to their weights; what breaks the symmetry is their
    gradients, which differ with unequal shares (an incoming split's outgoing gradients are
    ``a_c`` times the parent's). With ``split="equal"`` copies have equal weights, momenta
    and gradients and stay copies: the reference's defect is reproduced, not hidden by the
    optimiser (as it was when only the first copy kept the parent's state and the others
    started at 0).
    """
    if split not in ("asymmetric", "equal"):
        raise OperatorError(f"AN: split must be 'asymmetric' or 'equal', got {split!r}")
    topo = net.topology
    new_topo = add_neurons_topology(topo, layer, amount)
    n = topo.hidden[layer].width
    # Every unit gets amount // n extra copies; amount % n random units one more.
    extra = torch.full((n,), amount // n, dtype=torch.long)
    extra[torch.randperm(n, generator=generator)[: amount % n]] += 1
    parent = torch.cat([torch.arange(n), torch.repeat_interleave(torch.arange(n), extra)])
    copies = 1 + extra
    if split == "equal":
        share = 1.0 / copies[parent].double()
    else:
        raw = 0.5 + torch.rand(len(parent), generator=generator, dtype=torch.float64)
        totals = torch.zeros(n, dtype=torch.float64).index_add_(0, parent, raw)
        share = raw / totals[parent]

    weights = net.layer_weights()
    w, b = weights[layer]
    w_next, b_next = weights[layer + 1]
    incoming = topo.hidden[layer].activation in POSITIVELY_HOMOGENEOUS
    scale_in = share.to(w.dtype) if incoming else torch.ones(len(parent), dtype=w.dtype)
    scale_out = torch.ones_like(scale_in) if incoming else share.to(w.dtype)
    scale_in, scale_out = scale_in.to(w.device), scale_out.to(w.device)
    parent_d = parent.to(w.device)
    weights[layer] = (
        w[parent_d] * scale_in[:, None],
        None if b is None else b[parent_d] * scale_in,
    )
    weights[layer + 1] = (w_next[:, parent_d] * scale_out[None, :], b_next)

    carried: Index = tuple(parent.tolist())  # every copy continues its parent unit
    shares: Scale = tuple(share.tolist())
    sources = _identity_sources(topo.depth + 1)
    sources[layer] = _LayerSource(layer, rows=carried, row_scale=shares if incoming else None)
    sources[layer + 1] = _LayerSource(
        layer + 1, cols=carried, col_scale=None if incoming else shares
    )
    return _finish(net, _Plan(new_topo, weights, sources))


# --------------------------------------------------------------------------- AL

IDENTITY_ACTIVATIONS = ("linear", "relu")


def add_layer_topology(topology: Topology, layer: int, activation: str = "linear") -> Topology:
    _check_layer(topology, layer, "AL")
    if activation not in IDENTITY_ACTIVATIONS:
        raise OperatorError(
            f"AL: activation must be one of {IDENTITY_ACTIVATIONS}, got {activation!r}"
        )
    before = topology.hidden[layer]
    if activation == "relu" and before.activation not in NON_NEGATIVE:
        raise OperatorError(
            f"AL: a ReLU identity layer after a {before.activation!r} layer would change the "
            f"function; it is exact only after {sorted(NON_NEGATIVE)} layers (use 'linear')"
        )
    hidden = list(topology.hidden)
    hidden.insert(layer + 1, Layer(before.width, activation, True))
    return topology.with_hidden(hidden)


def add_layer(net: SurgeryNet, layer: int, activation: str = "linear") -> Mutation:
    """``AL``: insert an identity layer after hidden layer ``layer``."""
    new_topo = add_layer_topology(net.topology, layer, activation)
    weights = net.layer_weights()
    w = weights[layer][0]
    width = new_topo.hidden[layer + 1].width
    eye = torch.eye(width, dtype=w.dtype, device=w.device)
    weights.insert(layer + 1, (eye, torch.zeros(width, dtype=w.dtype, device=w.device)))
    sources = _identity_sources(net.topology.depth + 1)
    sources.insert(layer + 1, None)
    return _finish(net, _Plan(new_topo, weights, sources))


# --------------------------------------------------------------------------- RL


def remove_layer_topology(topology: Topology, layer: int, exact: bool = False) -> Topology:
    _check_layer(topology, layer, "RL")
    if topology.depth < 2:
        raise OperatorError("RL: cannot remove the only hidden layer")
    removed = topology.hidden[layer]
    if exact and not removed.is_linear:
        raise OperatorError(
            f"RL: removing layer {layer} is exact only for a linear layer; it has "
            f"activation {removed.activation!r} (pass exact=False to merge anyway)"
        )
    hidden = list(topology.hidden)
    del hidden[layer]
    if layer < len(hidden) and removed.bias and not hidden[layer].bias:
        nxt = hidden[layer]
        hidden[layer] = Layer(nxt.width, nxt.activation, True, nxt.kind)
    return topology.with_hidden(hidden)


def remove_layer(net: SurgeryNet, layer: int, *, exact: bool = False) -> Mutation:
    """``RL``: merge hidden layer ``layer`` into the next: ``W' = W_next W``, ``b' = W_next b +
    b_next``. Non-finite merged weights are replaced by a fresh default initialisation."""
    new_topo = remove_layer_topology(net.topology, layer, exact)
    weights = net.layer_weights()
    (w, b), (w_next, b_next) = weights[layer], weights[layer + 1]
    merged_w = w_next @ w
    merged_b = None
    if b is not None or b_next is not None:
        merged_b = torch.zeros(w_next.shape[0], dtype=w.dtype, device=w.device)
        if b is not None:
            merged_b = merged_b + w_next @ b
        if b_next is not None:
            merged_b = merged_b + b_next
    if not (
        torch.isfinite(merged_w).all() and (merged_b is None or torch.isfinite(merged_b).all())
    ):
        fresh = build(new_topo, like=net).linear(layer)
        merged_w = fresh.weight.detach()
        merged_b = None if fresh.bias is None else fresh.bias.detach()
    weights[layer : layer + 2] = [(merged_w, merged_b)]
    sources = _identity_sources(net.topology.depth + 1)
    sources[layer : layer + 2] = [None]
    return _finish(net, _Plan(new_topo, weights, sources))


# --------------------------------------------------------------------------- OL


def _check_removal(topology: Topology, layer: int, amount: int, what: str) -> int:
    _check_layer(topology, layer, what)
    width = topology.hidden[layer].width
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 1:
        raise OperatorError(f"{what}: amount must be at least 1 unit, got {amount!r}")
    if amount >= width:
        raise OperatorError(
            f"{what}: cannot remove {amount} of the {width} units of layer {layer}; "
            f"at most {width - 1} (a layer keeps at least one unit)"
        )
    return width - amount


def remove_neurons_topology(topology: Topology, layer: int, amount: int) -> Topology:
    keep = _check_removal(topology, layer, amount, "OL")
    hidden = list(topology.hidden)
    old = hidden[layer]
    hidden[layer] = Layer(keep, old.activation, old.bias, old.kind)
    if old.is_linear and old.bias and layer + 1 < len(hidden) and not hidden[layer + 1].bias:
        nxt = hidden[layer + 1]  # the folded bias residual needs a home
        hidden[layer + 1] = Layer(nxt.width, nxt.activation, True, nxt.kind)
    return topology.with_hidden(hidden)


def remove_neurons(net: SurgeryNet, layer: int, amount: int) -> Mutation:
    """``OL``: keep the top ``n - amount`` left singular directions of the incoming matrix:
    ``W' = U_k^T W``, ``b' = U_k^T b``, ``W_next' = W_next U_k``."""
    new_topo = remove_neurons_topology(net.topology, layer, amount)
    keep = new_topo.hidden[layer].width
    weights = net.layer_weights()
    (w, b), (w_next, b_next) = weights[layer], weights[layer + 1]
    u, _, _ = _svd(w)
    uk = u[:, :keep].to(w.dtype)
    new_b = None if b is None else uk.T @ b
    if b is not None and net.topology.hidden[layer].is_linear:
        residual = b - uk @ new_b
        b_next = (
            b_next if b_next is not None else torch.zeros_like(w_next[:, 0])
        ) + w_next @ residual
    weights[layer] = (uk.T @ w, new_b)
    weights[layer + 1] = (w_next @ uk, b_next)
    sources = _identity_sources(net.topology.depth + 1)
    sources[layer] = None
    sources[layer + 1] = _LayerSource(layer + 1, weight=False)
    return _finish(net, _Plan(new_topo, weights, sources))


# --------------------------------------------------------------------------- T


def truncate_topology(topology: Topology, layer: int, amount: int) -> Topology:
    """``amount`` is the rank given up: the factorisation keeps rank ``n - amount``."""
    rank = _check_removal(topology, layer, amount, "T")
    full = min(topology.hidden[layer].width, topology.fan_in(layer))
    if rank >= full:
        raise OperatorError(
            f"T: rank {rank} (= {topology.hidden[layer].width} - {amount}) would not truncate "
            f"layer {layer}, whose weight has rank at most {full}"
        )
    hidden = list(topology.hidden)
    hidden.insert(layer, Layer(rank, "linear", False))
    return topology.with_hidden(hidden)


def truncate(net: SurgeryNet, layer: int, amount: int) -> Mutation:
    """``T``: factorise hidden layer ``layer``'s weight as ``U_k (S_k V_k^T)``: a new linear
    bias-free layer of ``k`` units, then the old layer with weight ``U_k``."""
    new_topo = truncate_topology(net.topology, layer, amount)
    rank = new_topo.hidden[layer].width
    weights = net.layer_weights()
    w, b = weights[layer]
    u, s, vh = _svd(w)
    first = (s[:rank, None] * vh[:rank]).to(w.dtype)
    second = u[:, :rank].to(w.dtype)
    weights[layer : layer + 1] = [(first, None), (second, b)]
    sources = _identity_sources(net.topology.depth + 1)
    sources[layer : layer + 1] = [None, _LayerSource(layer, weight=False)]
    error = float(s[rank:].pow(2).sum().sqrt())
    return _finish(net, _Plan(new_topo, weights, sources, error))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Operator:
    code: str
    name: str
    topology: Callable[..., Topology]
    apply: Callable[..., Mutation]


OPERATORS: dict[str, Operator] = {
    "B": Operator(
        "B",
        "base",
        lambda topology, layer=None, amount=0: topology,
        lambda net, layer=None, amount=0: base(net),
    ),
    "AN": Operator("AN", "add neurons", add_neurons_topology, add_neurons),
    "AL": Operator(
        "AL",
        "add layer",
        lambda topology, layer, amount=0, **kw: add_layer_topology(topology, layer, **kw),
        lambda net, layer, amount=0, **kw: add_layer(net, layer, **kw),
    ),
    "RL": Operator(
        "RL",
        "remove layer",
        lambda topology, layer, amount=0, **kw: remove_layer_topology(topology, layer, **kw),
        lambda net, layer, amount=0, **kw: remove_layer(net, layer, **kw),
    ),
    "OL": Operator("OL", "remove neurons", remove_neurons_topology, remove_neurons),
    "T": Operator("T", "truncate", truncate_topology, truncate),
}


def operator(code: str) -> Operator:
    try:
        return OPERATORS[code]
    except KeyError:
        raise OperatorError(f"unknown operator {code!r}; allowed: {list(OPERATORS)}") from None
