"""SVD criteria: which changes to propose for a network, and how strongly.

For every hidden layer the singular values of its incoming or outgoing weight matrix
(``sv_source``; the reference uses outgoing) give the number of *removable* units ``r``:
those below an absolute threshold or below a relative threshold times the largest. A layer
with few removable units should grow; one with many should shrink (docs/METHOD.md, "The
criterion"). ``criterion: paper`` counts and estimates as the reference does. Computed on
the weights' own device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, get_args

import torch
from torch import Tensor

from lit_surgery.core.network import SurgeryNet
from lit_surgery.core.operators import OperatorError, operator
from lit_surgery.core.settings import Ranking, SurgerySettings, SvSource
from lit_surgery.core.topology import NON_NEGATIVE, Topology


@dataclass(frozen=True)
class Candidate:
    """A proposed change: operator ``op`` on hidden layer ``layer`` by ``amount`` units."""

    op: str
    layer: int | None = None
    amount: int = 0
    weight: float = 1.0
    param_ratio: float = 1.0
    activation: str | None = None
    """For ``AL``: the activation of the identity layer."""
    compression: float = 0.0
    """Inputs per unit of the layer (matrix columns / width; a conv's are ``in * kh * kw``):
    how much it has to compress."""

    @property
    def options(self) -> dict[str, Any]:
        return {} if self.activation is None else {"activation": self.activation}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.op == "B":
            return "B"
        extra = f" {self.activation}" if self.activation else ""
        amount = f" x{self.amount}" if self.amount else ""
        return f"{self.op}@{self.layer}{amount}{extra}"


def singular_values(
    net: SurgeryNet, layer: int, source: SvSource = "incoming", pad: bool = True
) -> Tensor:
    """Singular values (descending) for hidden layer ``layer``: ``min(n_in, n_out)`` of the
    matrix, with ``pad`` followed by zeros up to the layer's width.

    The matrix has one row per unit, a conv layer's channels included
    (:meth:`SurgeryNet.incoming_matrix`, :meth:`SurgeryNet.outgoing_matrix`), so conv
    blocks and dense layers are read alike. A layer wider than the matrix's rank has that
    many exactly removable directions, so the padding counts them; the reference does not
    pad (``criterion: paper``).
    """
    if source not in get_args(SvSource):
        raise ValueError(f"sv_source must be one of {get_args(SvSource)}, got {source!r}")
    matrix = net.incoming_matrix(layer) if source == "incoming" else net.outgoing_matrix(layer)
    s = torch.linalg.svdvals(matrix)
    if not pad:
        return s
    width = net.topology.hidden[layer].width
    return torch.cat([s, s.new_zeros(width - s.numel())])


def removable(s: Tensor, abs_threshold: float, rel_threshold: float) -> int:
    """Count singular values below ``abs_threshold`` or below ``rel_threshold * max``."""
    if s.numel() == 0:
        return 0
    limit = torch.clamp(s[0] * rel_threshold, min=abs_threshold)
    return int((s < limit).sum())


def depth_factor(layer: int, depth: int) -> float:
    """``(i + 1) / (L + 1)`` with ``i`` the 1-based position: grows with depth, 1 at the last."""
    return (layer + 2) / (depth + 1)


def layer_is_finite(net: SurgeryNet, layer: int) -> bool:
    lin = net.linear(layer)
    return bool(torch.isfinite(lin.weight).all()) and (
        lin.bias is None or bool(torch.isfinite(lin.bias).all())
    )


def propose(net: SurgeryNet, settings: SurgerySettings) -> list[Candidate]:
    """All candidates for ``net`` (``B`` not included), each with weight and parameter ratio,
    under ``settings``' thresholds, AN amounts, AL activation, type weights, size budget
    (``max_params``), ``widen_only`` and ``criterion``."""
    s = settings
    paper = s.criterion == "paper"
    topo = net.topology
    raw: list[Candidate] = []
    for i, layer in enumerate(topo.hidden):
        if not (layer_is_finite(net, i) and layer_is_finite(net, i + 1)):
            raw.append(Candidate("RL", i, 0, 1.0))
            continue
        n = layer.width
        sv = singular_values(net, i, s.sv_source, pad=not paper)
        r = removable(sv, s.sv_threshold_abs, s.sv_threshold_rel)
        d = depth_factor(i, topo.depth)
        p_add, p_remove = 1.0 - r / n, r / n
        k = max(s.add_min, int(n * s.add_fraction))
        squeeze = topo.matrix_shape(i)[1] / n
        raw += [
            Candidate("AN", i, k, p_add, compression=squeeze),
            Candidate("AN", i, k * s.add_multiplier, p_add, compression=squeeze),
        ]
        relu = s.al_activation == "auto" and layer.activation in NON_NEGATIVE
        raw.append(Candidate("AL", i, 0, p_add * d, activation="relu" if relu else "linear"))
        raw.append(Candidate("RL", i, 0, p_remove * d))
        amount = min(r, n - 1)
        if amount > 0:
            raw += [Candidate("OL", i, amount, p_remove), Candidate("T", i, amount, p_remove)]
    result = []
    for c in raw:
        if s.widen_only and (c.op != "AN" or topo.hidden[c.layer].width >= s.add_min):
            continue  # only narrow layers widen
        try:
            after = topology_after(topo, c).num_params
        except OperatorError:
            continue  # e.g. RL of the only layer, T that would not truncate
        ratio = after / topo.num_params
        if c.op == "T" and ratio >= 1 and not paper:
            continue  # a factorisation that does not save parameters only costs screening
        if s.max_params is not None and after > s.max_params and ratio >= 1:
            continue  # over the size budget (a shrinking step of a network above it is kept)
        weight = c.weight * s.type_weights.get(c.op, 1.0)
        q = paper_ratio(topo, c) if paper else ratio
        result.append(replace(c, weight=weight, param_ratio=q))
    return result


def paper_ratio(topology: Topology, candidate: Candidate) -> float:
    """``q`` as the reference estimates it (NAS.py, ``__create_potential_modification_
    candidates``), for hidden layer ``i`` with ``m`` inputs per unit (a conv's ``in * kh *
    kw``: :meth:`Topology.matrix_shape`), width ``n`` and bias ``b`` (0/1): exact for AL
    (``+ n (n + 1)`` for a dense layer; here counted on the new topology, which also fits
    a conv identity block) and T (``- m n + (n - r)(m + n)``); AN adds ``(m + 1) k`` (not
    the new units' outgoing weights, and a bias even without one), OL removes ``(m + b) r``
    (not the outgoing weights), RL removes ``m n + b n`` (not what the merged matrix adds
    back: on a 784-input network, removing the first layer looks like removing almost all
    of it). Batch-norm parameters are left out, as the reference has none."""
    total = topology.num_params
    if candidate.op == "B":
        return 1.0
    if candidate.op == "AL":
        return topology_after(topology, candidate).num_params / total
    i, k = candidate.layer, candidate.amount
    m, n = topology.matrix_shape(i)[1], topology.hidden[i].width
    b = int(topology.hidden[i].bias)
    change = {
        "AN": (m + 1) * k,
        "RL": -(m * n + b * n),
        "OL": -(m + b) * k,
        "T": (n - k) * (m + n) - m * n,
    }[candidate.op]
    return (total + change) / total


def rank_key(candidate: Candidate, ranking: Ranking = "modest") -> tuple[float, ...]:
    """Sort key, larger is better. ``paper``: (weight, q), so among equal weights the
    biggest network wins (the reference's choice, which makes "add 10x units" the AN pick
    every time; with ``criterion: paper`` by the reference's estimate of q). ``modest``:
    (weight, -|log q|), the smallest change wins ties.
    ``bottleneck``: like ``modest``, but among saturated layers AN widens the one with the
    most inputs per unit first (e.g. the first layer of an image MLP), not the cheapest."""
    modest = -abs(math.log(candidate.param_ratio))
    if ranking == "paper":
        return (candidate.weight, candidate.param_ratio)
    if ranking == "modest":
        return (candidate.weight, modest)
    if ranking == "bottleneck":
        return (candidate.weight, candidate.compression, modest)
    raise ValueError(f"ranking must be one of {get_args(Ranking)}, got {ranking!r}")


def best_per_type(candidates: Sequence[Candidate], ranking: Ranking = "modest") -> list[Candidate]:
    """The top-ranked candidate of each operator type, in first-seen type order."""
    best: dict[str, Candidate] = {}
    for c in candidates:
        if c.op not in best or rank_key(c, ranking) > rank_key(best[c.op], ranking):
            best[c.op] = c
    return list(best.values())


def topology_after(topology: Topology, candidate: Candidate) -> Topology:
    return operator(candidate.op).topology(
        topology, candidate.layer, candidate.amount, **candidate.options
    )
