"""Carry optimiser state across surgery.

The reference re-creates the optimiser after every change, throwing away momentum and
Adam's moments. Here a surviving parameter keeps its state: the operator's parameter map
says which slice of which old parameter each new one continues and by which factors it was
scaled (only the copies of a split unit, see :func:`lit_surgery.core.operators.add_neurons`);
parameters with no source start fresh. Works on ``optimizer.state_dict()`` data: every
state tensor shaped like its parameter is sliced, and scaled like the parameter unless it
is an average of squared gradients (:data:`SQUARED`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from lit_surgery.core.operators import ParamMap, Source

SQUARED = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
"""State keys that average squared gradients (Adam, AMSGrad, RMSprop, Adadelta, Adagrad):
they set the step size, not its direction, so the slices are copied unscaled (an Adam
step from the carried state is then the parent's, scaled like the weights)."""


def _remap(value: Tensor, source: Source, scaled: bool) -> Tensor:
    """Gather ``value`` along each dimension, then multiply it by ``source.scale`` if
    ``scaled``."""
    for dim, idx in enumerate(source.index):
        if idx is not None:
            where = torch.tensor(idx, dtype=torch.long, device=value.device)
            value = value.index_select(dim, where)
    for dim, scale in enumerate(source.scale if scaled else ()):
        if scale is not None:
            shape = [1] * value.dim()
            shape[dim] = -1
            value = value * torch.tensor(scale, dtype=value.dtype, device=value.device).view(shape)
    return value


def _carry(entry: dict[str, Any], source: Source, old_shape: torch.Size | None) -> dict[str, Any]:
    new: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape == old_shape:
            scaled = key not in SQUARED
            new[key] = _remap(value, source, scaled).clone()  # never share with the parent
        else:  # step counters and other per-parameter scalars
            new[key] = copy.deepcopy(value)
    return new


def transfer_state(
    state_dict: dict[str, Any],
    param_map: ParamMap,
    old_shapes: list[torch.Size],
) -> dict[str, Any]:
    """State dict for an optimiser over the new parameters (single parameter group).

    ``old_shapes`` are the old parameters' shapes, in order: they tell moment tensors
    (same shape as their parameter) from scalars. New parameters get no state, which
    every torch optimiser initialises on its first step.
    """
    groups = state_dict["param_groups"]
    if len(groups) != 1:
        raise ValueError(
            f"optimiser state transfer supports one parameter group, got {len(groups)}"
        )
    if len(groups[0]["params"]) != len(old_shapes):
        raise ValueError(
            f"optimiser state covers {len(groups[0]['params'])} parameters, "
            f"the old network has {len(old_shapes)}"
        )
    position = {pid: i for i, pid in enumerate(groups[0]["params"])}
    old_state = {position[pid]: entry for pid, entry in state_dict["state"].items()}
    new_state: dict[int, dict[str, Any]] = {}
    for i, source in enumerate(param_map):
        if source is not None and source.param in old_state:
            new_state[i] = _carry(old_state[source.param], source, old_shapes[source.param])
    group = {k: copy.deepcopy(v) for k, v in groups[0].items() if k != "params"}
    group["params"] = list(range(len(param_map)))
    return {"state": new_state, "param_groups": [group]}


def split_state(state_dict: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    """Cut the state of one optimiser over several networks' parameters (concatenated in
    order, ``sizes`` parameters each) into one state dict per network."""
    (group,) = state_dict["param_groups"]
    if len(group["params"]) != sum(sizes):
        raise ValueError(
            f"optimiser has {len(group['params'])} parameters, sizes sum to {sum(sizes)}"
        )
    position = {pid: i for i, pid in enumerate(group["params"])}
    by_position = {position[pid]: entry for pid, entry in state_dict["state"].items()}
    hyper = {k: v for k, v in group.items() if k != "params"}
    parts, offset = [], 0
    for size in sizes:
        state = {i: by_position[offset + i] for i in range(size) if offset + i in by_position}
        parts.append({"state": state, "param_groups": [{**hyper, "params": list(range(size))}]})
        offset += size
    return parts


def join_state(
    parts: list[dict[str, Any] | None], sizes: list[int], hyper: dict[str, Any]
) -> dict[str, Any]:
    """The inverse of :func:`split_state`; a ``None`` part (no state yet) starts fresh.
    Hyperparameters (e.g. the scheduled ``lr``) come from ``hyper``."""
    state, offset = {}, 0
    for part, size in zip(parts, sizes, strict=True):
        if part is not None:
            for i, entry in part["state"].items():
                state[offset + int(i)] = entry
        offset += size
    group = {k: v for k, v in hyper.items() if k != "params"}
    return {"state": state, "param_groups": [{**group, "params": list(range(offset))}]}
