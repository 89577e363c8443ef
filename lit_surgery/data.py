"""Datasets as tensors: whole splits live on the device and batches are slices of them.

Small networks train at the speed of the framework around them, so no per-sample
collation: :class:`TensorSplits` holds normalised float features and integer labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class TensorSplits:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    num_classes: int

    @property
    def input_size(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    def to(self, device: torch.device | str) -> TensorSplits:
        return TensorSplits(
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_val.to(device),
            self.y_val.to(device),
            self.num_classes,
        )


def split_and_normalise(
    x: np.ndarray, y: np.ndarray, *, val_fraction: float, seed: int
) -> TensorSplits:
    """Seeded random validation split; mean and std from the training part only."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = round(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    x = x.astype(np.float32)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    x = (x - mean) / std
    return TensorSplits(
        torch.from_numpy(x[train]),
        torch.from_numpy(y[train].astype(np.int64)),
        torch.from_numpy(x[val]),
        torch.from_numpy(y[val].astype(np.int64)),
        int(y.max()) + 1,
    )


def digits(*, val_fraction: float = 0.2, seed: int = 0) -> TensorSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return split_and_normalise(bunch.data, bunch.target, val_fraction=val_fraction, seed=seed)
