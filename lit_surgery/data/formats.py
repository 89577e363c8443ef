"""File formats to numpy arrays: IDX (MNIST, Fashion-MNIST), the CIFAR-10 python tarball
(read without unpickling code), SVHN's ``.mat``, ``npz`` files, and scikit-learn's bundled
digits. Each loader checks structure and says what is wrong with a file.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from lit_surgery.data.sources import DATASETS, SOURCES, DataError, DataNotFoundError, fetch

# --------------------------------------------------------------------------------------
# File formats -> numpy arrays

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with gzip's magic (whatever its name)."""
    raw = Path(path).read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: corrupt gzip file ({err})") from err


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or plain, checking magic and length."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'missing'})")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header truncated ({len(raw)} bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX shape {shape} needs {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzipped when the name ends in ``.gz`` (for test data)."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX has no type code for dtype {array.dtype}")
    body = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    body += np.ascontiguousarray(array, _IDX_TYPES[code]).tobytes()
    Path(path).write_bytes(gzip.compress(body) if str(path).endswith(".gz") else body)


@dataclass
class ArraySplits:
    """A dataset as numpy arrays: inputs N x ..., integer labels N; val/test optional."""

    x_train: np.ndarray
    y_train: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


def _check_pair(name: str, x: np.ndarray, y: np.ndarray, num_classes: int | None) -> None:
    if len(x) == 0:
        raise DataError(f"x_{name} is empty")
    if x.ndim < 2:
        raise DataError(f"x_{name} must be N x features (2-D or more), got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"y_{name} must be 1-D with len(x_{name}) = {len(x)}, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"y_{name} must hold integer class labels, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"y_{name} has negative label {y.min()}")
    if num_classes is not None and y.max() >= num_classes:
        raise DataError(
            f"y_{name} has label {y.max()}, but the classes are 0..{num_classes - 1} "
            "(for npz: those up to max(y_train); a class never trained on cannot be learned)"
        )


def load_digits_arrays() -> ArraySplits:
    """scikit-learn's bundled 8x8 digits (1,797 x 64, 10 classes): no files, no test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return ArraySplits(bunch.data, bunch.target.astype(np.int64), 10)


def load_mnist_like(folder: str | Path, num_classes: int = 10) -> ArraySplits:
    """MNIST-format IDX files in ``folder``; images come back as N x 1 x H x W uint8."""
    folder = Path(folder)
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
        if x.ndim != 3:
            raise DataError(f"{prefix} images: expected N x H x W, got shape {x.shape}")
        x = x[:, None]
        _check_pair(split, x, y, num_classes)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype(np.int64)
    return ArraySplits(num_classes=num_classes, **arrays)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle can run arbitrary code."""

    _ALLOWED: ClassVar = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_cifar10(folder: str | Path) -> ArraySplits:
    """CIFAR-10's python tarball, read in place (no extraction): N x 3 x 32 x 32 uint8."""
    path = Path(folder) / "cifar-10-python.tar.gz"
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    members = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in members:
                f = tar.extractfile(f"cifar-10-batches-py/{member}")
                if f is None:
                    raise KeyError(member)
                batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
                x = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(batch[b"labels"], np.int64)
                parts["test" if member == "test_batch" else "train"].append((x, y))
    except (
        tarfile.TarError,
        pickle.UnpicklingError,
        EOFError,
        LookupError,
        TypeError,
        ValueError,
    ) as err:
        raise DataError(f"{path}: not a CIFAR-10 python tarball ({err!r})") from err
    arrays = {}
    for split, pairs in parts.items():
        x, y = (np.concatenate(a) for a in zip(*pairs, strict=True))
        _check_pair(split, x, y, 10)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return ArraySplits(num_classes=10, **arrays)


def load_svhn(folder: str | Path) -> ArraySplits:
    """SVHN's cropped digits (``*_32x32.mat``): N x 3 x 32 x 32 uint8; label 10 is digit 0."""
    from scipy.io import loadmat  # scipy comes with scikit-learn
    from scipy.io.matlab import MatReadError

    arrays = {}
    for split in ("train", "test"):
        path = Path(folder) / f"{split}_32x32.mat"
        try:
            mat = loadmat(path)
            x, y = mat["X"], mat["y"].reshape(-1).astype(np.int64)
        except (KeyError, ValueError, OSError, MatReadError) as err:
            raise DataError(f"{path}: not an SVHN .mat file with X and y ({err!r})") from err
        if x.ndim != 4 or x.shape[2] != 3:
            raise DataError(f"{path}: X must be H x W x 3 x N, got shape {x.shape}")
        y[y == 10] = 0
        x = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
        _check_pair(split, x, y, 10)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return ArraySplits(num_classes=10, **arrays)


_NPZ_REQUIRED = ("x_train", "y_train", "x_val", "y_val")
_NPZ_OPTIONAL = ("x_test", "y_test")


def load_npz(path: str | Path) -> ArraySplits:
    """Your own data: an ``.npz`` with x_train, y_train, x_val, y_val (and x_test, y_test).

    Labels are integers >= 0; the classes are 0..max(y_train), so a val/test label above
    max(y_train) is an error (it could never be predicted). Inputs must be finite and have
    the same per-sample shape in every split.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"npz: no file at {path} (keys {', '.join(_NPZ_REQUIRED)})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npz of plain arrays ({err})") from err
    missing = [k for k in _NPZ_REQUIRED if k not in arrays]
    if ("x_test" in arrays) != ("y_test" in arrays):
        missing.append("y_test" if "x_test" in arrays else "x_test")
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; has {sorted(arrays)}")
    unknown = sorted(set(arrays) - {*_NPZ_REQUIRED, *_NPZ_OPTIONAL})
    if unknown:
        allowed = ", ".join(_NPZ_REQUIRED + _NPZ_OPTIONAL)
        raise DataError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {allowed}")
    _check_pair("train", arrays["x_train"], arrays["y_train"], None)
    num_classes = int(arrays["y_train"].max()) + 1
    for split in ("val", "test")[: 1 + ("x_test" in arrays)]:
        x = arrays[f"x_{split}"]
        _check_pair(split, x, arrays[f"y_{split}"], num_classes)
        if x.shape[1:] != arrays["x_train"].shape[1:]:
            raise DataError(
                f"{path}: x_{split} samples have shape {x.shape[1:]}, "
                f"x_train's have {arrays['x_train'].shape[1:]}"
            )
    for key in ("x_train", "x_val", "x_test"):
        x = arrays.get(key)
        if x is not None and not (np.issubdtype(x.dtype, np.number) and np.isfinite(x).all()):
            raise DataError(f"{path}: {key} must be finite numbers (dtype {x.dtype})")
    return ArraySplits(num_classes=num_classes, **arrays)


def load_arrays(
    dataset: str,
    *,
    data_dir: str | Path | None = None,
    npz_path: str | Path | None = None,
    download: bool = False,
) -> ArraySplits:
    """Any of :data:`DATASETS` as numpy arrays (finding or downloading files as needed)."""
    if dataset == "digits":
        return load_digits_arrays()
    if dataset == "npz":
        if npz_path is None:
            raise DataError("dataset 'npz' needs npz_path")
        return load_npz(npz_path)
    if dataset not in SOURCES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    folder = fetch(dataset, data_dir, download=download)
    if dataset == "cifar10":
        return load_cifar10(folder)
    if dataset == "svhn":
        return load_svhn(folder)
    return load_mnist_like(folder)
