"""Datasets as tensors: whole splits live on the device and batches are slices of them.

Small networks train at the speed of the framework around them, so there is no per-sample
collation and no ``DataLoader``: loaders read a dataset into numpy arrays
(:class:`ArraySplits`), :func:`make_splits` normalises them into :class:`TensorSplits`, and
:class:`TensorBatches` slices batches out of those tensors. :class:`SurgeryDataModule` wires
this into Lightning.

Files: Fashion-MNIST, MNIST, CIFAR-10 and SVHN are read from ``data_dir`` (default
``$XDG_CACHE_HOME/lit_surgery/<dataset>``), Fashion-MNIST also from Debian's package
``dataset-fashion-mnist``, and downloaded when allowed. Downloads are checked against the
published MD5s (the ones torchvision uses); files you place yourself are only checked for
structure, since e.g. Debian recompresses the gzip files (same content, other MD5s).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lit_surgery.errors import UserError

DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "svhn", "npz")


class DataError(UserError):
    """Bad data or data settings: a file that is malformed, fails its checksum or does not
    fit the expected layout; an unknown dataset; a split or batch size that cannot work."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The files are not there and could not be downloaded; the message says how to get them."""


# --------------------------------------------------------------------------------------
# Where each dataset's files come from


@dataclass(frozen=True)
class Source:
    """A dataset's files (name -> published MD5), base URLs to try in order, system dirs."""

    files: dict[str, str]
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()


SOURCES: dict[str, Source] = {
    "fashion_mnist": Source(
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        ("/usr/share/datasets/fashion-mnist",),  # Debian: apt install dataset-fashion-mnist
    ),
    "mnist": Source(
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    ),
    "cifar10": Source(
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        ("https://www.cs.toronto.edu/~kriz/",),
    ),
    "svhn": Source(
        {
            "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
            "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
        },
        ("http://ufldl.stanford.edu/housenumbers/",),
    ),
}


def default_data_dir(dataset: str) -> Path:
    """Where downloads go when no ``data_dir`` is given: the user's cache, not the work tree."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lit_surgery" / dataset


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch into a temporary file beside ``dest``; rename only once the MD5 matches.

    A failed, interrupted or corrupt download leaves nothing behind, so a later run never
    mistakes a partial file for the real one (and concurrent ranks cannot see half a file).
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"checksum mismatch: MD5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download_any(mirrors: tuple[str, ...], dest: Path, md5: str) -> list[str]:
    """Try each mirror in turn; the reasons they all failed, or [] once one succeeded."""
    failures = []
    for mirror in mirrors:
        try:
            _download(mirror + dest.name, dest, md5)
            return []
        except (OSError, DataError) as err:
            failures.append(f"{mirror + dest.name}: {err}")
    return failures


def fetch(dataset: str, data_dir: str | Path | None = None, *, download: bool = False) -> Path:
    """The directory holding all of ``dataset``'s files, downloading missing ones if allowed.

    Looks in ``data_dir`` (or :func:`default_data_dir`), then the source's system dirs;
    downloads into the first. Raises :class:`DataNotFoundError` with the files, the
    directories searched and the URLs when the files are neither there nor downloadable.
    """
    source = SOURCES[dataset]
    target = Path(data_dir) if data_dir is not None else default_data_dir(dataset)
    searched = [target, *map(Path, source.system_dirs)]
    for folder in searched:
        if all((folder / name).is_file() for name in source.files):
            return folder
    failures: list[str] = []
    if download:
        target.mkdir(parents=True, exist_ok=True)
        for name, md5 in source.files.items():
            if not (target / name).is_file():
                failures += _download_any(source.mirrors, target / name, md5)
        if not failures:
            return target
    missing = [name for name in source.files if not (target / name).is_file()]
    lines = [
        f"{dataset}: files not found: {', '.join(missing)}.",
        f"Searched: {', '.join(map(str, searched))}.",
        f"Put these files in {target} (as downloaded, not unpacked):",
        *(
            f"  {name}  from {source.mirrors[0] + name}  MD5 {source.files[name]}"
            for name in missing
        ),
    ]
    if source.system_dirs:
        lines.append(f"or install the Debian package that fills {source.system_dirs[0]}.")
    if failures:
        lines += ["Downloads failed:", *(f"  {f}" for f in failures)]
    else:
        lines.append("or pass download=True (SurgeryDataModule.prepare_data downloads).")
    raise DataNotFoundError("\n".join(lines))


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


# --------------------------------------------------------------------------------------
# Batches


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends on (seed, epoch) only, not on what ran before."""
    state = np.random.SeedSequence([seed & (2**64 - 1), epoch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class TensorBatches:
    """(x, y) batches sliced from tensors on any device; iterable once per epoch.

    With ``shuffle`` an epoch's order is a permutation drawn from ``(seed, epoch)`` alone,
    so resuming from a checkpoint at an epoch boundary replays exactly the same batches.
    With ``world_size > 1`` every rank takes an equal, disjoint, strided share of that
    permutation and the remainder is dropped, so all ranks run the same number of steps.
    ``sampler`` returns self so Lightning's per-epoch ``set_epoch`` call reaches us (and
    ``batch_sampler`` is None, as Lightning's DataLoader checks expect). With
    ``y=None`` it yields input batches only (for prediction).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor | None,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world {world_size}")
        if y is not None and len(y) != len(x):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if len(x) < world_size:
            raise ValueError(f"{len(x)} samples cannot be shared among {world_size} ranks")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.batch_sampler = None

    @property
    def sampler(self) -> TensorBatches:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return len(self.x) // self.world_size

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def indices(self) -> Tensor | None:
        """This rank's sample order for the current epoch (CPU), or None for 0..N-1."""
        if not self.shuffle and self.world_size == 1:
            return None
        n = len(self.x)
        order = (
            torch.randperm(n, generator=_epoch_generator(self.seed, self.epoch))
            if self.shuffle
            else torch.arange(n)
        )
        return order[self.rank : self.num_samples * self.world_size : self.world_size]

    def __iter__(self) -> Iterator:
        order = self.indices()
        if order is not None:
            order = order.to(self.x.device)
        for i in range(len(self)):
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = s if order is None else order[s]
            yield self.x[idx] if self.y is None else (self.x[idx], self.y[idx])


def random_batches(
    x: Tensor, y: Tensor, n: int, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """``n`` batches in random order for short screening re-training of a candidate.

    Consecutive passes of fresh permutations, so no sample repeats before all were seen.
    All indices are drawn up front: the generator advances the same however many batches
    the caller consumes.
    """
    if n < 0 or batch_size < 1 or len(x) == 0:
        raise ValueError(f"need n >= 0, batch_size >= 1, samples: {n}, {batch_size}, {len(x)}")
    needed, dev = n * batch_size, generator.device
    passes = [torch.randperm(len(x), generator=generator, device=dev)]
    while sum(map(len, passes)) < needed:
        passes.append(torch.randperm(len(x), generator=generator, device=dev))
    order = torch.cat(passes)[:needed].to(x.device)
    return ((x[b], y[b]) for b in order.split(batch_size))


# --------------------------------------------------------------------------------------
# Lightning


class SurgeryDataModule(pl.LightningDataModule):
    """One of :data:`DATASETS` as tensors on the training device, batched by TensorBatches.

    ``prepare_data`` downloads (Lightning runs it on one process per node); ``setup`` loads
    the arrays once, without downloading, into normalised float32 CPU tensors
    (:attr:`splits`). The dataloaders move them to ``trainer.strategy.root_device``.
    Training is sharded by global rank; validation and test are not: every rank evaluates
    the whole split, so metrics are exact and equal on all ranks (no padding, no dropped
    samples) at the price of repeated work on small evaluation sets.

    ``npz`` files bring their own val split, so ``val_fraction`` is unused and
    ``use_test_as_val`` is refused for them.

    ``steps_per_batch`` hands the trainer ``steps_per_batch`` consecutive mini-batches at a
    time; :class:`~lit_surgery.module.SurgeryModule` takes one optimiser step per
    ``batch_size`` samples of it, so training is the same as with 1, but Lightning's fixed
    per-batch overhead is paid once per chunk (it dominates small networks' steps).
    """

    def __init__(
        self,
        dataset: str = "digits",
        data_dir: str | None = None,
        npz_path: str | None = None,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        use_test_as_val: bool = False,
        seed: int = 0,
        download: bool = True,
        eval_batch_size: int = 1024,
        steps_per_batch: int = 1,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        if (dataset == "npz") != (npz_path is not None):
            raise DataError(
                f"npz_path goes with dataset 'npz' only; got {dataset!r}, {npz_path!r}"
            )
        sizes = (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("steps_per_batch", steps_per_batch),
        )
        for name, size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise DataError(f"{name} must be an integer >= 1, got {size!r}")
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if dataset == "npz" and use_test_as_val:
            raise DataError("use_test_as_val does not apply to 'npz': the file has its own x_val")
        self.save_hyperparameters()
        self.dataset, self.data_dir, self.npz_path = dataset, data_dir, npz_path
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_batch = steps_per_batch
        self.val_fraction, self.use_test_as_val = val_fraction, use_test_as_val
        self.seed, self.download = seed, download
        self.splits: TensorSplits | None = None
        self._on_device: TensorSplits | None = None

    def prepare_data(self) -> None:
        if self.dataset in SOURCES:
            fetch(self.dataset, self.data_dir, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            arrays = load_arrays(self.dataset, data_dir=self.data_dir, npz_path=self.npz_path)
            self.splits = make_splits(
                arrays,
                val_fraction=self.val_fraction,
                use_test_as_val=self.use_test_as_val,
                seed=self.seed,
            )

    def _loaded(self) -> TensorSplits:
        """The splits, loading them first if needed (so shapes can size a model early)."""
        if self.splits is None:
            self.prepare_data()
            self.setup()
        assert self.splits is not None
        return self.splits

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._loaded().input_shape

    @property
    def input_size(self) -> int:
        return self._loaded().input_size

    @property
    def num_classes(self) -> int:
        return self._loaded().num_classes

    def device_splits(self) -> TensorSplits:
        """The splits on the trainer's device (moved once, then reused)."""
        splits = self._loaded()
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if self._on_device is None or self._on_device.x_train.device != device:
            self._on_device = splits.to(device)
        return self._on_device

    def train_dataloader(self) -> TensorBatches:
        s, trainer = self.device_splits(), self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return TensorBatches(
            s.x_train,
            s.y_train,
            self.batch_size * self.steps_per_batch,  # the module steps once per batch_size
            shuffle=True,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )

    def val_dataloader(self) -> TensorBatches:
        s = self.device_splits()
        return TensorBatches(s.x_val, s.y_val, self.eval_batch_size)

    def _test(self) -> TensorSplits:
        s = self.device_splits()
        if s.x_test is None:
            raise DataError(f"dataset {self.dataset!r} has no test split (npz without x_test)")
        return s

    def test_dataloader(self) -> TensorBatches:
        s = self._test()
        return TensorBatches(s.x_test, s.y_test, self.eval_batch_size)

    def predict_dataloader(self) -> TensorBatches:
        return TensorBatches(self._test().x_test, None, self.eval_batch_size)
