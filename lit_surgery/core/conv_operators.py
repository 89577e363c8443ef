"""Kernel algebra behind the surgery operators on conv blocks.

Plain tensor functions, no networks: :mod:`lit_surgery.core.operators` decides what to do
with a layer and calls these for the parts that only a convolution needs (folding a batch
norm, the identity kernel, merging two convolutions or a convolution and a dense layer).
Weights follow torch: a conv weight is ``out x in x kh x kw``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.grad import conv2d_input


def fold_norm(
    weight: Tensor, bias: Tensor | None, norm: nn.BatchNorm2d
) -> tuple[Tensor, Tensor]:
    """The conv followed by its batch norm in eval mode, as one conv: per out-channel
    ``g = gamma / sqrt(var + eps)``, ``W' = g W``, ``b' = g (b - mean) + beta``. Only the
    running statistics make this a fixed affine map, so it holds in eval mode."""
    assert norm.running_mean is not None and norm.running_var is not None
    g = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    shifted = -norm.running_mean if bias is None else bias - norm.running_mean
    return weight * g.view(-1, *[1] * (weight.dim() - 1)), g * shifted + norm.bias.detach()


def identity_norm(bias: Tensor, norm: nn.BatchNorm2d) -> dict[str, Tensor]:
    """The state of a batch norm that is the identity plus ``bias`` in eval mode: mean 0,
    variance 1, ``gamma = sqrt(1 + eps)``, ``beta = bias``; ``norm``'s batch count."""
    assert norm.num_batches_tracked is not None
    return {
        "weight": torch.full_like(bias, (1.0 + norm.eps) ** 0.5),
        "bias": bias.clone(),
        "running_mean": torch.zeros_like(bias),
        "running_var": torch.ones_like(bias),
        "num_batches_tracked": norm.num_batches_tracked.clone(),
    }


def identity_kernel(channels: int, kernel: int, like: Tensor) -> Tensor:
    """The Dirac kernel: with stride 1 and padding ``kernel // 2`` (odd ``kernel``) the
    convolution returns its input."""
    weight = torch.empty(channels, channels, kernel, kernel, dtype=like.dtype, device=like.device)
    return torch.nn.init.dirac_(weight)


def compose_kernels(first: Tensor, second: Tensor) -> Tensor:
    """The kernel of ``conv(second) o conv(first)`` with ``first`` at stride 1: the full
    convolution of the kernels, ``K[t] = sum_{j + l = t} second[j] first[l]``, of size
    ``k1 + k2 - 1`` (out of ``second``, in of ``first``). Applied with padding ``p1 + p2``
    and ``second``'s stride it is the composition except where ``second`` reads the
    intermediate's zero padding (see :func:`lit_surgery.core.operators.remove_layer`)."""
    k2 = second.shape[-1]
    # conv2d correlates; the flipped kernel makes it a convolution. The batch is first's in.
    images = first.transpose(0, 1)  # (in1, mid, k1, k1)
    merged = torch.nn.functional.conv2d(images, second.flip(-1, -2), padding=k2 - 1)
    return merged.transpose(0, 1).contiguous()  # (out2, in1, K, K)


def conv_into_dense(
    conv_weight: Tensor,
    dense_weight: Tensor,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    stride: int,
    padding: int,
) -> Tensor:
    """``W_dense @ M``, where ``M`` is the matrix of the conv (no bias) from inputs of shape
    ``in_shape`` to outputs of shape ``out_shape`` (C, H, W), flattened: the conv's adjoint
    applied to each row of ``W_dense`` seen as a conv output, which ``conv2d_input``
    computes (it is the conv's input gradient)."""
    rows = dense_weight.shape[0]
    grad = dense_weight.reshape(rows, *out_shape)
    merged = conv2d_input((rows, *in_shape), conv_weight, grad, stride=stride, padding=padding)
    return merged.reshape(rows, -1)
