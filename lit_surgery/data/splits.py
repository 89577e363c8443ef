"""Arrays to normalised tensors: seeded train/validation/test splits, normalised with
statistics of the training split only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lit_surgery.data.formats import ArraySplits, load_digits_arrays
from lit_surgery.data.sources import DataError

# --------------------------------------------------------------------------------------
# Arrays -> normalised tensors


@dataclass
class TensorSplits:
    """Normalised float32 inputs (N x input_shape) and int64 labels; test is optional."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    num_classes: int
    x_test: Tensor | None = None
    y_test: Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def input_size(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    def to(self, device: torch.device | str) -> TensorSplits:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return TensorSplits(
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_val.to(device),
            self.y_val.to(device),
            self.num_classes,
            move(self.x_test),
            move(self.y_test),
        )


def _normalise(x_train: np.ndarray, *others: np.ndarray | None) -> list[Tensor | None]:
    """Float32 tensors standardised per feature (each pixel of each channel on its own).

    Mean and std come from the training split only, so nothing about validation or test
    data leaks into training; constant features (std 0) are only centred.
    """
    x_train = x_train.astype(np.float32)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    out = [(x_train - mean) / std]
    out += [None if x is None else (x.astype(np.float32) - mean) / std for x in others]
    return [None if x is None else torch.from_numpy(np.ascontiguousarray(x)) for x in out]


def _labels(y: np.ndarray | None) -> Tensor | None:
    return None if y is None else torch.from_numpy(y.astype(np.int64))


def make_splits(
    arrays: ArraySplits, *, val_fraction: float = 0.1, use_test_as_val: bool = False, seed: int = 0
) -> TensorSplits:
    """Normalised tensors with train, val and (when there is one) test splits.

    Validation: the file's own val split if it has one (npz); else the test split when
    ``use_test_as_val`` (the paper validates on the 10k test images; train keeps every
    training image); else a seeded ``val_fraction`` of the training images. Datasets without
    a test split (digits) first set aside a seeded ``val_fraction`` of the samples as test.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    x, y = arrays.x_train, arrays.y_train
    x_val, y_val, x_test, y_test = arrays.x_val, arrays.y_val, arrays.x_test, arrays.y_test
    if use_test_as_val and x_val is not None:
        raise DataError("use_test_as_val: this dataset has its own validation split")
    order = np.random.default_rng(seed).permutation(len(x))
    n = round(len(x) * val_fraction)
    if x_test is None and x_val is None:  # set aside a test split first
        x_test, y_test, order = x[order[:n]], y[order[:n]], order[n:]
    if use_test_as_val:
        x_val, y_val = x_test, y_test
    elif x_val is None:
        x_val, y_val, order = x[order[:n]], y[order[:n]], order[n:]
    if len(order) < len(x):  # something was set aside; else keep the file's order
        x, y = x[order], y[order]
    if min(len(x), len(x_val), len(x) if x_test is None else len(x_test)) == 0:
        raise DataError(f"val_fraction {val_fraction} leaves an empty split")
    xs = _normalise(x, x_val, x_test)
    return TensorSplits(
        xs[0], _labels(y), xs[1], _labels(y_val), arrays.num_classes, xs[2], _labels(y_test)
    )


def digits(*, val_fraction: float = 0.1, seed: int = 0) -> TensorSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), split as the
    datamodule splits it (seeded test and validation fractions): no download."""
    return make_splits(load_digits_arrays(), val_fraction=val_fraction, seed=seed)
