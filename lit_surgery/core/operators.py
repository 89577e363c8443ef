"""The six surgery operators of SURGERY.md as pure functions, on dense layers and conv blocks.

Each takes a network and returns a :class:`Mutation`: a *new* network (the input is never
touched) and a parameter map saying which slice of which old parameter each new
parameter continues, so that optimiser state can follow (:mod:`lit_surgery.core.optim_state`).

Weights use torch's convention: a layer's weight is ``out x in`` (``out x in x kh x kw`` for
a conv). How much of the function each operator keeps on dense layers:

========  ================================================================================
``B``     identical (a deep copy).
``AN``    identical, and the new units are not copies. Units are split with unequal
          positive shares ``a_c`` (sum 1): on the incoming side for positively homogeneous
          activations (``phi(a z) = a phi(z)``), on the outgoing side (Net2Net) otherwise.
          The split units get different gradients, so they drift apart in training.
          ``split="equal"`` is the reference's split into identical copies;
          ``split="fresh"`` splits each unit at most once and adds the other units new
          (default initial incoming weights, zero outgoing weights).
``AL``    identical: identity weights and zero bias, linear, or ReLU after a layer whose
          outputs are non-negative (ReLU, sigmoid).
``RL``    identical when the removed layer is linear; otherwise its activation is lost.
``OL``    keeps the top ``n - r`` singular directions of the incoming matrix; identical for
          a linear layer whose dropped singular values are zero (the bias component outside
          the kept directions is folded into the next layer's bias).
``T``     the weight becomes its best rank-``k`` approximation: Frobenius error
          ``sqrt(sum of dropped s_j^2)`` (Eckart-Young), returned in ``Mutation.error``.
========  ================================================================================

On a conv block the units are channels and the matrix is the kernel reshaped to
``out x (in kh kw)``. The next layer's "columns" of channel ``c`` are its in-channel ``c``
(next conv) or the ``H W`` columns of ``c`` after the flatten (next dense or output layer).
A batch norm's running statistics are part of the function in eval mode; "identical"
below means in eval mode (and in train mode too for ``AN``, ``AL``, ``T``):

========  ================================================================================
``AN``    identical; split as above, but on the outgoing side when the block has a batch
          norm (it would undo an incoming scaling); the copies get their parent's batch
          norm rows (gamma, beta, running mean and variance). Max pooling commutes with
          positive scaling, so an incoming split is exact with pooling too.
``AL``    identical: a conv block with the Dirac kernel (the layer's kernel size if odd,
          else 3; padding ``k // 2``, stride 1, no pool, no batch norm, zero bias).
``RL``    the removed block's batch norm is folded into its conv (eval statistics) first.
          Into a next conv: the two convolutions become one with the full convolution of
          the kernels (size ``k1 + k2 - 1``, padding ``p1 + p2``, the next stride);
          identical on output pixels whose receptive field in the intermediate map lies
          inside it (the interior); at the borders the merged conv sees the removed conv's
          values where the original saw the next conv's zero padding (the merged conv
          equals the original with that padding replaced by the removed conv extended over
          it; ``exact=True`` refuses a next conv with padding). Into the dense part: the
          conv and the flatten are a linear map, merged exactly into the next dense (or
          output) layer, whose fan-in becomes the block's input size. A removed block with
          a max pool, or with a stride before a conv, raises :class:`OperatorError`.
``OL``    a batch norm is folded into the conv (eval statistics) first and becomes the
          identity in eval mode (mean 0, variance 1, ``gamma = sqrt(1 + eps)``), its beta
          holding the projected bias. Identical for a linear block without pooling whose
          dropped singular values are zero, except that the bias residual folded into a
          padding next conv's bias is exact on interior pixels only (pooling and other
          activations do not commute with the projection).
``T``     a conv with ``k`` channels, the same kernel, stride and padding, linear, no bias,
          then a 1x1 conv with the old channels, bias, batch norm, activation and pool;
          the reshaped weight becomes its best rank-``k`` approximation (error as above).
========  ================================================================================
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lit_surgery.core.conv_operators import (
    compose_kernels,
    conv_into_dense,
    fold_norm,
    identity_kernel,
    identity_norm,
)
from lit_surgery.core.network import LayerWeights, NormState, SurgeryNet, build, param_layout
from lit_surgery.core.topology import (
    NON_NEGATIVE,
    POSITIVELY_HOMOGENEOUS,
    ConvLayer,
    Layer,
    Topology,
)

OPERATOR_CODES = ("B", "AN", "AL", "RL", "OL", "T")
SPLITS = ("asymmetric", "equal", "fresh")
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
    (one entry per dimension; ``None`` or missing keeps the dimension whole).

    ``scale`` (one entry per dimension; ``None`` or missing: all ones) multiplies the slice:
    position ``j`` of dimension ``d`` was multiplied by ``scale[d][j]``. Only ``AN`` has
    factors other than 1 (the shares of split units); optimiser momentum follows them
    (:func:`add_neurons` says why). A factor 0 marks a new slice (``AN``'s fresh units):
    its value is not the old one's, its first moments start at zero, and it takes the
    indexed slice's averages of squared gradients (a parameter's state cannot be partly
    absent).
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
    """New layer continues old layer ``old``; rows/cols and their scales as in :class:`Source`
    (cols index a weight's dimension 1: in-channels of a conv, flattened inputs of a dense
    layer). ``weight``, ``bias`` and ``norm`` (the batch norm's affine pair, rows only) say
    which parameters are carried."""

    old: int
    rows: Index | None = None
    cols: Index | None = None
    weight: bool = True
    bias: bool = True
    norm: bool = True
    row_scale: Scale | None = None
    col_scale: Scale | None = None


@dataclass
class _Plan:
    topology: Topology
    weights: list[LayerWeights]
    norms: list[NormState]
    sources: list[_LayerSource | None] = field(default_factory=list)
    error: float = 0.0


# --------------------------------------------------------------------------- helpers


def _check_layer(topology: Topology, layer: int, what: str) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < topology.depth:
        raise OperatorError(
            f"{what}: layer {layer!r} is out of range; the network has {topology.depth} "
            f"hidden layers (0..{topology.depth - 1})"
        )


def _has_norm(layer: Layer) -> bool:
    return isinstance(layer, ConvLayer) and layer.batch_norm


def _identity_sources(n_layers: int) -> list[_LayerSource | None]:
    return [_LayerSource(i) for i in range(n_layers)]


def _finish(net: SurgeryNet, plan: _Plan) -> Mutation:
    new = build(plan.topology, plan.weights, plan.norms, like=net)
    return Mutation(new, _param_map(net.topology, plan.topology, plan.sources), plan.error)


def _param_map(old: Topology, new: Topology, sources: Sequence[_LayerSource | None]) -> ParamMap:
    old_pos = {entry: i for i, entry in enumerate(param_layout(old))}
    result: list[Source | None] = []
    for layer, kind in param_layout(new):
        src = sources[layer]
        key = None if src is None else (src.old, kind)
        carried = src is not None and {"weight": src.weight, "bias": src.bias}.get(kind, src.norm)
        if src is None or key not in old_pos or not carried:
            result.append(None)
        elif kind == "weight":
            result.append(
                Source(old_pos[key], (src.rows, src.cols), (src.row_scale, src.col_scale))
            )
        else:  # a bias or a batch norm's weight or bias: one entry per unit or channel
            result.append(Source(old_pos[key], (src.rows,), (src.row_scale,)))
    return tuple(result)


def _svd(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Full SVD in float64 of the weight as a matrix (a conv kernel as ``out x (in kh kw)``;
    small matrices: exactness matters more than speed here)."""
    u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1).double(), full_matrices=True)
    return u, s, vh


def _columns(w_next: Tensor, width: int) -> Tensor:
    """The next layer's weight as ``(out, width, g)``: the ``g`` columns that read each unit
    or channel of the layer before (a next conv's kernel taps, the ``H W`` columns of a
    channel after the flatten, 1 for dense after dense)."""
    return w_next.reshape(w_next.shape[0], width, -1)


def _uncolumns(view: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_columns` for a changed number of units."""
    return view.reshape(like.shape[0], -1, *like.shape[2:])


def _expand(
    topology: Topology, layer: int, idx: Index, scale: Scale | None
) -> tuple[Index, Scale | None]:
    """Column indices (and factors) of layer ``layer``'s units ``idx`` in the next layer's
    weight: each channel's ``H W`` flattened columns for a dense layer after the convs."""
    group = topology.fan_in(layer + 1) // topology.hidden[layer].width
    if group == 1:
        return idx, scale
    cols = tuple(c * group + j for c in idx for j in range(group))
    return cols, None if scale is None else tuple(a for a in scale for _ in range(group))


def _along(v: Tensor, dims: int) -> Tensor:
    """``v`` shaped to scale dimension 0 of a ``dims``-D tensor."""
    return v.view(-1, *[1] * (dims - 1))


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
    hidden[layer] = replace(hidden[layer], width=hidden[layer].width + amount)
    return topology.with_hidden(hidden)


def add_neurons(
    net: SurgeryNet,
    layer: int,
    amount: int,
    *,
    split: str = "asymmetric",
    generator: torch.Generator | None = None,
) -> Mutation:
    """``AN``: widen hidden layer ``layer`` by ``amount`` units (channels) by splitting
    existing ones.

    Which units are split is drawn from ``generator``. ``split="asymmetric"`` gives each
    copy a different share (drawn from [0.5, 1.5], normalised); ``"equal"`` gives 1/m.
    Copy ``c`` of unit ``p`` gets share ``a_c`` of one side and a plain copy of the other:
    incoming split ``(a_c w_p, a_c b_p | v_p)``, outgoing split ``(w_p, b_p | a_c v_p)``
    (``v_p``: the next layer's columns of ``p``). A conv block with a batch norm is split
    on the outgoing side, its batch-norm rows copied.

    ``split="fresh"`` (asymmetric shares) splits at most ``width`` units, each once, and
    adds the remaining ``amount - width`` units new: incoming weights and bias drawn from
    ``generator`` like torch's default initialisation, a new batch norm's rows, and zero
    outgoing weights, so the function is kept and they learn through their outgoing
    gradient. Why: each copy's incoming gradient is its parent's whole gradient, so a unit
    split into ``m`` copies moves about ``m`` times as fast; from a 4-unit layer widened by
    128 (33 copies) that collapsed training at SGD lr 0.03 (docs/METHOD.md, "Growing a
    start that is too small"). Here a unit moves at most twice as fast. Their optimiser
    state: first moments zero, averages of squared gradients and ``step`` those of a unit
    of the layer (:class:`Source`, factor 0).

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
    if split not in SPLITS:
        raise OperatorError(f"AN: split must be one of {SPLITS}, got {split!r}")
    topo = net.topology
    new_topo = add_neurons_topology(topo, layer, amount)
    n = topo.hidden[layer].width
    fresh = max(0, amount - n) if split == "fresh" else 0
    split_units = amount - fresh
    # Every unit gets split_units // n extra copies; split_units % n random units one more.
    extra = torch.full((n,), split_units // n, dtype=torch.long)
    extra[torch.randperm(n, generator=generator)[: split_units % n]] += 1
    parent = torch.cat([torch.arange(n), torch.repeat_interleave(torch.arange(n), extra)])
    copies = 1 + extra
    if split == "equal":
        share = 1.0 / copies[parent].double()
    else:
        raw = 0.5 + torch.rand(len(parent), generator=generator, dtype=torch.float64)
        totals = torch.zeros(n, dtype=torch.float64).index_add_(0, parent, raw)
        share = raw / totals[parent]

    weights, norms = net.layer_weights(), net.norm_states()
    w, b = weights[layer]
    w_next, b_next = weights[layer + 1]
    hidden = topo.hidden[layer]
    incoming = hidden.activation in POSITIVELY_HOMOGENEOUS and not _has_norm(hidden)
    scale_in = share.to(w.dtype) if incoming else torch.ones(len(parent), dtype=w.dtype)
    scale_out = torch.ones_like(scale_in) if incoming else share.to(w.dtype)
    scale_in, scale_out = scale_in.to(w.device), scale_out.to(w.device)
    parent_d = parent.to(w.device)
    new_w, new_b = _fresh_units(w, b, fresh, generator)
    weights[layer] = (
        torch.cat([w[parent_d] * _along(scale_in, w.dim()), new_w]),
        None if b is None else torch.cat([b[parent_d] * scale_in, new_b]),
    )
    state = norms[layer]
    if state is not None:
        blank = torch.nn.BatchNorm2d(fresh).state_dict()  # a new batch norm's rows
        rows = {k: torch.cat([v[parent_d], blank[k].to(v)]) for k, v in state.items() if v.dim()}
        norms[layer] = {**state, **rows}
    view = _columns(w_next, n)[:, parent_d] * scale_out[None, :, None]
    silent = view.new_zeros(view.shape[0], fresh, view.shape[2])  # fresh units: no output yet
    weights[layer + 1] = (_uncolumns(torch.cat([view, silent], dim=1), w_next), b_next)

    # Every copy continues its parent unit; a fresh unit is a new slice (factor 0) of unit
    # j % n, whose averages of squared gradients it takes (optim_state).
    carried: Index = tuple(parent.tolist()) + tuple(j % n for j in range(fresh))
    shares: Scale = tuple(share.tolist())

    def factors(scaled: bool) -> Scale | None:
        kept = shares if scaled else (1.0,) * len(shares)
        return kept + (0.0,) * fresh if fresh else shares if scaled else None

    cols, col_scale = _expand(topo, layer, carried, factors(not incoming))
    sources = _identity_sources(topo.depth + 1)
    sources[layer] = _LayerSource(layer, rows=carried, row_scale=factors(incoming))
    sources[layer + 1] = _LayerSource(layer + 1, cols=cols, col_scale=col_scale)
    return _finish(net, _Plan(new_topo, weights, norms, sources))


def _fresh_units(
    w: Tensor, b: Tensor | None, count: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    """Incoming weights and bias of ``count`` new units, drawn like torch's default
    initialisation of the layer (uniform within ``1/sqrt(fan_in)``) from ``generator``."""
    bound = w[0].numel() ** -0.5

    def draw(*shape: int) -> Tensor:
        u = torch.rand(*shape, generator=generator, dtype=torch.float64)
        return ((2 * u - 1) * bound).to(w)

    return draw(count, *w.shape[1:]), None if b is None else draw(count)


def shrink_perturb_(
    net: SurgeryNet, shrink: float, noise: float, generator: torch.Generator | None = None
) -> SurgeryNet:
    """In place: every layer's weight and bias ``theta <- shrink * theta + noise * theta0``,
    ``theta0`` a fresh default initialisation drawn from ``generator``; batch norms untouched.

    Not an operator and not function-preserving: it undoes part of what a warm-started
    network has fitted, so that a widened network generalises like one trained from the
    start (Ash & Adams, "On warm-starting neural network training", 2020; docs/METHOD.md).
    Bound: each entry moves at most ``noise / sqrt(fan_in)`` from ``shrink * theta``; with
    ``noise=0`` a bias-free ReLU network's output is scaled by ``shrink ** (depth + 1)``."""
    with torch.no_grad():
        for i in range(net.topology.depth + 1):
            layer = net.linear(i)
            w0, b0 = _fresh_units(layer.weight, layer.bias, layer.weight.shape[0], generator)
            layer.weight.mul_(shrink).add_(w0, alpha=noise)
            if layer.bias is not None:
                layer.bias.mul_(shrink).add_(b0, alpha=noise)
    return net


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
    new: Layer = Layer(before.width, activation, True)
    if isinstance(before, ConvLayer):  # a conv block, since no dense layer may precede one
        k = before.kernel_size if before.kernel_size % 2 else 3
        new = ConvLayer(before.width, activation, True, kernel_size=k, padding=k // 2)
    hidden = list(topology.hidden)
    hidden.insert(layer + 1, new)
    return topology.with_hidden(hidden)


def add_layer(net: SurgeryNet, layer: int, activation: str = "linear") -> Mutation:
    """``AL``: insert an identity layer after hidden layer ``layer``: the identity matrix,
    or for a conv block an identity conv block (Dirac kernel, same padding), zero bias."""
    new_topo = add_layer_topology(net.topology, layer, activation)
    weights, norms = net.layer_weights(), net.norm_states()
    w = weights[layer][0]
    added = new_topo.hidden[layer + 1]
    if isinstance(added, ConvLayer):
        eye = identity_kernel(added.width, added.kernel_size, like=w)
    else:
        eye = torch.eye(added.width, dtype=w.dtype, device=w.device)
    weights.insert(layer + 1, (eye, torch.zeros(added.width, dtype=w.dtype, device=w.device)))
    norms.insert(layer + 1, None)
    sources = _identity_sources(net.topology.depth + 1)
    sources.insert(layer + 1, None)
    return _finish(net, _Plan(new_topo, weights, norms, sources))


# --------------------------------------------------------------------------- RL


def _check_conv_removal(topology: Topology, layer: int, exact: bool) -> None:
    """Why conv block ``layer`` cannot be merged into the next layer, if it cannot."""
    removed = topology.hidden[layer]
    assert isinstance(removed, ConvLayer)
    where = f"RL: conv layer {layer} ({removed.describe()})"
    if removed.pool > 1:
        raise OperatorError(
            f"{where} max-pools its output (pool {removed.pool}); a max pool is not linear, "
            f"so the block cannot be merged into the next layer"
        )
    if layer + 1 < topology.num_conv:
        nxt = topology.hidden[layer + 1]
        assert isinstance(nxt, ConvLayer)
        if removed.stride != 1:
            raise OperatorError(
                f"{where} has stride {removed.stride}; merging it into the next conv needs "
                f"stride 1 (a strided conv followed by a conv is not one conv)"
            )
        if exact and nxt.padding:
            raise OperatorError(
                f"{where}: merging it into conv layer {layer + 1}, which pads by "
                f"{nxt.padding}, is exact on interior pixels only (pass exact=False)"
            )


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
    if isinstance(removed, ConvLayer):
        _check_conv_removal(topology, layer, exact)
    hidden = list(topology.hidden)
    del hidden[layer]
    biased = removed.bias or _has_norm(removed)  # a folded batch norm leaves a bias
    if layer < len(hidden):
        nxt = hidden[layer]
        if isinstance(nxt, ConvLayer):
            assert isinstance(removed, ConvLayer)
            hidden[layer] = replace(
                nxt,
                kernel_size=removed.kernel_size + nxt.kernel_size - 1,
                padding=removed.padding + nxt.padding,
                bias=nxt.bias or biased,
            )
        elif biased and not nxt.bias:
            hidden[layer] = replace(nxt, bias=True)
    return topology.with_hidden(hidden)


def remove_layer(net: SurgeryNet, layer: int, *, exact: bool = False) -> Mutation:
    """``RL``: merge hidden layer ``layer`` into the next: ``W' = W_next W``, ``b' = W_next b +
    b_next``; a conv block's batch norm is folded into it (eval statistics) first. A conv
    into a conv: the composed kernel (:func:`compose_kernels`); a conv into the dense part:
    ``W_next`` times the conv's matrix (:func:`conv_into_dense`). The next layer keeps its
    batch norm. Non-finite merged weights are replaced by a fresh default initialisation."""
    topo = net.topology
    new_topo = remove_layer_topology(topo, layer, exact)
    weights, norms = net.layer_weights(), net.norm_states()
    (w, b), (w_next, b_next) = weights[layer], weights[layer + 1]
    bn = net.norm(layer)
    if bn is not None:
        w, b = fold_norm(w, b, bn)
    removed = topo.hidden[layer]
    if not isinstance(removed, ConvLayer):
        merged_w = w_next @ w
    elif layer + 1 < topo.num_conv:
        merged_w = compose_kernels(w, w_next)
    else:
        shapes = (topo.shapes[layer], topo.output_shape(layer))
        merged_w = conv_into_dense(w, w_next, *shapes, removed.stride, removed.padding)
    merged_b = None
    if b is not None or b_next is not None:
        merged_b = torch.zeros(w_next.shape[0], dtype=w.dtype, device=w.device)
        if b is not None:
            merged_b = merged_b + _columns(w_next, removed.width).sum(2) @ b
        if b_next is not None:
            merged_b = merged_b + b_next
    if not (
        torch.isfinite(merged_w).all() and (merged_b is None or torch.isfinite(merged_b).all())
    ):
        fresh = build(new_topo, like=net).linear(layer)
        merged_w = fresh.weight.detach()
        merged_b = None if fresh.bias is None else fresh.bias.detach()
    weights[layer : layer + 2] = [(merged_w, merged_b)]
    norms[layer : layer + 2] = [norms[layer + 1]]
    sources = _identity_sources(topo.depth + 1)
    sources[layer : layer + 2] = [_LayerSource(layer + 1, weight=False, bias=False)]
    return _finish(net, _Plan(new_topo, weights, norms, sources))


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
    hidden[layer] = replace(old, width=keep)
    biased = old.bias or _has_norm(old)
    if old.is_linear and biased and layer + 1 < len(hidden) and not hidden[layer + 1].bias:
        hidden[layer + 1] = replace(hidden[layer + 1], bias=True)  # the bias residual's home
    return topology.with_hidden(hidden)


def remove_neurons(net: SurgeryNet, layer: int, amount: int) -> Mutation:
    """``OL``: keep the top ``n - amount`` left singular directions of the incoming matrix:
    ``W' = U_k^T W``, ``b' = U_k^T b``, ``W_next' = W_next U_k`` (on each channel's column
    group). A conv block's batch norm is folded into ``W, b`` first and becomes the identity
    in eval mode, its beta holding ``b'``."""
    topo = net.topology
    new_topo = remove_neurons_topology(topo, layer, amount)
    keep, width = new_topo.hidden[layer].width, topo.hidden[layer].width
    weights, norms = net.layer_weights(), net.norm_states()
    (w, b), (w_next, b_next) = weights[layer], weights[layer + 1]
    bn = net.norm(layer)
    if bn is not None:
        w, b = fold_norm(w, b, bn)
    u, _, _ = _svd(w)
    uk = u[:, :keep].to(w.dtype)
    view = _columns(w_next, width)
    new_b = None if b is None else uk.T @ b
    if b is not None and topo.hidden[layer].is_linear:
        if b_next is None:
            b_next = w_next.new_zeros(w_next.shape[0])
        b_next = b_next + view.sum(2) @ (b - uk @ new_b)  # the residual, as the next sees it
    if bn is not None:
        assert new_b is not None  # folding always gives a bias
        norms[layer] = identity_norm(new_b, bn)
        new_b = torch.zeros_like(new_b) if topo.hidden[layer].bias else None
    projected = (uk.T @ w.reshape(width, -1)).reshape(keep, *w.shape[1:])
    weights[layer] = (projected, new_b)
    weights[layer + 1] = (_uncolumns(torch.einsum("ocg,ck->okg", view, uk), w_next), b_next)
    sources = _identity_sources(topo.depth + 1)
    sources[layer] = None
    sources[layer + 1] = _LayerSource(layer + 1, weight=False)
    return _finish(net, _Plan(new_topo, weights, norms, sources))


# --------------------------------------------------------------------------- T


def truncate_topology(topology: Topology, layer: int, amount: int) -> Topology:
    """``amount`` is the rank given up: the factorisation keeps rank ``n - amount``."""
    rank = _check_removal(topology, layer, amount, "T")
    full = min(topology.matrix_shape(layer))
    if rank >= full:
        raise OperatorError(
            f"T: rank {rank} (= {topology.hidden[layer].width} - {amount}) would not truncate "
            f"layer {layer}, whose weight has rank at most {full}"
        )
    hidden = list(topology.hidden)
    old = hidden[layer]
    if isinstance(old, ConvLayer):
        # The old kernel, stride and padding; no bias, batch norm or pool.
        first: Layer = replace(
            old, width=rank, activation="linear", bias=False, batch_norm=False, pool=1
        )
        hidden[layer] = replace(old, kernel_size=1, stride=1, padding=0)
    else:
        first = Layer(rank, "linear", False)
    hidden.insert(layer, first)
    return topology.with_hidden(hidden)


def truncate(net: SurgeryNet, layer: int, amount: int) -> Mutation:
    """``T``: factorise hidden layer ``layer``'s weight as ``U_k (S_k V_k^T)``: a new linear
    bias-free layer of ``k`` units, then the old layer with weight ``U_k`` (for a conv: a
    ``k``-channel conv with the old kernel, then the old block as a 1x1 conv)."""
    new_topo = truncate_topology(net.topology, layer, amount)
    rank = new_topo.hidden[layer].width
    weights, norms = net.layer_weights(), net.norm_states()
    w, b = weights[layer]
    u, s, vh = _svd(w)
    first = (s[:rank, None] * vh[:rank]).to(w.dtype).reshape(rank, *w.shape[1:])
    second = u[:, :rank].to(w.dtype).reshape(w.shape[0], rank, *[1] * (w.dim() - 2))
    weights[layer : layer + 1] = [(first, None), (second, b)]
    norms.insert(layer, None)
    sources = _identity_sources(net.topology.depth + 1)
    sources[layer : layer + 1] = [None, _LayerSource(layer, weight=False)]
    error = float(s[rank:].pow(2).sum().sqrt())
    return _finish(net, _Plan(new_topo, weights, norms, sources, error))


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
