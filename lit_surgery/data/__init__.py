"""Datasets as tensors: whole splits live on the device and batches are slices of them.

Small networks train at the speed of the framework around them, so there is no per-sample
collation and no ``DataLoader``: loaders read a dataset into numpy arrays
(:class:`ArraySplits`, :mod:`.formats`), :func:`make_splits` normalises them into
:class:`TensorSplits` (:mod:`.splits`), and :class:`TensorBatches` slices batches out of
those tensors (:mod:`.batching`). :class:`SurgeryDataModule` (:mod:`.datamodule`) wires this
into Lightning; everything else here needs only torch and numpy (the DataModule is imported
on first use).

Files (:mod:`.sources`): Fashion-MNIST, MNIST, CIFAR-10 and SVHN are read from ``data_dir``
(default ``$XDG_CACHE_HOME/lit_surgery/<dataset>``), Fashion-MNIST also from Debian's
package ``dataset-fashion-mnist``, and downloaded when allowed. Downloads are checked against
the published MD5s (the ones torchvision uses); files you place yourself are only checked
for structure, since e.g. Debian recompresses the gzip files (same content, other MD5s).
"""

from __future__ import annotations

from typing import Any

from lit_surgery.data.batching import TensorBatches, random_batches
from lit_surgery.data.formats import (
    ArraySplits,
    load_arrays,
    load_cifar10,
    load_digits_arrays,
    load_mnist_like,
    load_npz,
    load_svhn,
    read_idx,
    write_idx,
)
from lit_surgery.data.sources import (
    DATASETS,
    SOURCES,
    DataError,
    DataNotFoundError,
    Source,
    default_data_dir,
    fetch,
)
from lit_surgery.data.splits import TensorSplits, digits, make_splits

__all__ = [
    "DATASETS",
    "SOURCES",
    "ArraySplits",
    "DataError",
    "DataNotFoundError",
    "Source",
    "SurgeryDataModule",
    "TensorBatches",
    "TensorSplits",
    "default_data_dir",
    "digits",
    "fetch",
    "load_arrays",
    "load_cifar10",
    "load_digits_arrays",
    "load_mnist_like",
    "load_npz",
    "load_svhn",
    "make_splits",
    "random_batches",
    "read_idx",
    "write_idx",
]


def __getattr__(name: str) -> Any:
    """``SurgeryDataModule`` on first use: it is the only part that imports Lightning."""
    if name == "SurgeryDataModule":
        from lit_surgery.data.datamodule import SurgeryDataModule

        return SurgeryDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
