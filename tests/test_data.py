"""Data loading, batching and the Lightning data module, on tiny synthetic files (no network)."""

import dataclasses
import hashlib
import io
import math
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_surgery import data
from lit_surgery.data import (
    ArraySplits,
    DataError,
    DataNotFoundError,
    SurgeryDataModule,
    TensorBatches,
    fetch,
    load_arrays,
    load_npz,
    make_splits,
    random_batches,
    read_idx,
    write_idx,
)

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _write_mnist_like(folder: Path, n_train=12, n_test=6, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 4, 5), dtype=np.uint8),
        "train-labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, 4, 5), dtype=np.uint8),
        "t10k-labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(folder / f"{stem}-idx{array.ndim}-ubyte.gz", array)
    return arrays


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _isolate(monkeypatch, tmp_path, dataset="fashion_mnist", **changes) -> None:
    """Keep the machine's own copies (e.g. Debian's Fashion-MNIST) out of a test."""
    changes.setdefault("system_dirs", (str(tmp_path / "no-system-dir"),))
    source = dataclasses.replace(data.SOURCES[dataset], **changes)
    monkeypatch.setitem(data.SOURCES, dataset, source)


# --- IDX ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, name, dtype):
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == array.dtype and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_read_idx_rejects_bad_files(tmp_path):
    write_idx(tmp_path / "good", np.zeros((3, 2), np.uint8))
    raw = (tmp_path / "good").read_bytes()
    cases = {
        "magic": b"\x01\x00" + raw[2:],
        "type": raw[:2] + b"\x42" + raw[3:],
        "short": raw[:-1],
        "long": raw + b"\0",
        "header": raw[:6],
        "empty": b"",
        "gzip": b"\x1f\x8b" + b"garbage",
    }
    for case, content in cases.items():
        (tmp_path / case).write_bytes(content)
        with pytest.raises(DataError, match=case if case == "gzip" else "IDX"):
            read_idx(tmp_path / case)


# --- finding and downloading files ---------------------------------------------------------


def test_fashion_mnist_from_data_dir(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path)
    written = _write_mnist_like(tmp_path / "fm")
    arrays = load_arrays("fashion_mnist", data_dir=tmp_path / "fm")
    assert arrays.x_train.shape == (12, 1, 4, 5) and arrays.x_train.dtype == np.uint8
    np.testing.assert_array_equal(arrays.x_train[:, 0], written["train-images"])
    np.testing.assert_array_equal(arrays.y_test, written["t10k-labels"])
    assert arrays.y_train.dtype == np.int64 and arrays.num_classes == 10


def test_fashion_mnist_falls_back_to_system_dir(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path, system_dirs=(str(tmp_path / "debian"),))
    _write_mnist_like(tmp_path / "debian", n_train=7)
    assert fetch("fashion_mnist", tmp_path / "empty") == tmp_path / "debian"
    assert load_arrays("fashion_mnist", data_dir=tmp_path / "empty").x_train.shape[0] == 7


def test_mismatched_idx_pair_is_an_error(tmp_path):
    _write_mnist_like(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="y_train"):
        data.load_mnist_like(tmp_path)


def test_missing_files_offline_say_what_to_fetch_and_where(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path)
    with pytest.raises(DataNotFoundError) as info:
        load_arrays("fashion_mnist", data_dir=tmp_path / "fm", download=False)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert "fashion_mnist" in message and str(tmp_path / "fm") in message
    assert "no-system-dir" in message and "download=True" in message
    for name, md5 in data.SOURCES["fashion_mnist"].files.items():
        assert name in message and md5 in message
    assert "fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels" in message


def test_download_checks_md5_and_tries_the_next_mirror(tmp_path, monkeypatch):
    _write_mnist_like(tmp_path / "remote")
    files = {name: _md5(tmp_path / "remote" / name) for name in IDX_FILES}
    mirrors = ((tmp_path / "gone").as_uri() + "/", (tmp_path / "remote").as_uri() + "/")
    _isolate(monkeypatch, tmp_path, "mnist", files=files, mirrors=mirrors)
    target = tmp_path / "local"
    assert fetch("mnist", target, download=True) == target
    assert sorted(os.listdir(target)) == sorted(IDX_FILES)
    arrays = load_arrays("mnist", data_dir=target)
    assert arrays.x_train.shape == (12, 1, 4, 5) and arrays.x_test.shape == (6, 1, 4, 5)


def test_checksum_mismatch_fails_and_leaves_no_file(tmp_path, monkeypatch):
    _write_mnist_like(tmp_path / "remote")
    files = {name: _md5(tmp_path / "remote" / name) for name in IDX_FILES}
    files["t10k-images-idx3-ubyte.gz"] = "0" * 32
    mirrors = ((tmp_path / "remote").as_uri() + "/",)
    _isolate(monkeypatch, tmp_path, "fashion_mnist", files=files, mirrors=mirrors)
    target = tmp_path / "local"
    with pytest.raises(DataNotFoundError, match="checksum mismatch") as info:
        fetch("fashion_mnist", target, download=True)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)
    assert "t10k-images-idx3-ubyte.gz" not in os.listdir(target)
    assert not [f for f in os.listdir(target) if f.endswith(".part")]


def test_unreachable_mirror_leaves_nothing(tmp_path, monkeypatch):
    mirrors = ((tmp_path / "gone").as_uri() + "/",)
    _isolate(monkeypatch, tmp_path, "svhn", mirrors=mirrors)
    with pytest.raises(DataNotFoundError, match="Downloads failed"):
        fetch("svhn", tmp_path / "local", download=True)
    assert os.listdir(tmp_path / "local") == []


# --- CIFAR-10 and SVHN --------------------------------------------------------------------


def _cifar_tarball(folder: Path, batches: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, payload in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_cifar10_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches, payloads = {}, {}
    for i, name in enumerate(names):
        batches[name] = {
            b"data": rng.integers(0, 256, (2 + i, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, 2 + i).tolist()),
        }
        payloads[name] = pickle.dumps(batches[name], protocol=3)
    # The real files were pickled by Python 2, naming numpy.core (protocol 3 names globals
    # in plain text, so the module path can be swapped in).
    payloads["data_batch_1"] = payloads["data_batch_1"].replace(b"numpy._core", b"numpy.core")
    _cifar_tarball(tmp_path, payloads)
    arrays = data.load_cifar10(tmp_path)
    assert arrays.x_train.shape == (2 + 3 + 4 + 5 + 6, 3, 32, 32) and arrays.x_test.shape[0] == 7
    first = batches["data_batch_1"][b"data"][1]
    np.testing.assert_array_equal(arrays.x_train[1], first.reshape(3, 32, 32))
    assert arrays.y_test.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_refuses_pickled_code_and_wrong_layout(tmp_path):
    _cifar_tarball(tmp_path / "evil", {"data_batch_1": pickle.dumps({b"data": os.path.join})})
    with pytest.raises(DataError, match="refusing to load"):
        data.load_cifar10(tmp_path / "evil")
    _cifar_tarball(
        tmp_path / "short",
        {"data_batch_1": pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})},
    )
    with pytest.raises(DataError, match="data_batch_2"):
        data.load_cifar10(tmp_path / "short")


def test_svhn_round_trip_maps_label_10_to_0(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        savemat(
            tmp_path / f"{split}_32x32.mat",
            {"X": x, "y": np.array([[10], [1], [9], [10], [2]][:n])},
        )
    arrays = data.load_svhn(tmp_path)
    assert arrays.x_train.shape == (5, 3, 32, 32) and arrays.x_test.shape == (3, 3, 32, 32)
    assert arrays.y_train.tolist() == [0, 1, 9, 0, 2] and arrays.y_test.tolist() == [0, 1, 9]
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.ones((5, 1), np.uint8)})
    assert data.load_svhn(tmp_path).x_train[4, 2, 7, 1] == x[7, 1, 2, 4]  # N, C, H, W
    savemat(tmp_path / "train_32x32.mat", {"images": x})
    with pytest.raises(DataError, match="not an SVHN"):
        data.load_svhn(tmp_path)


# --- npz ----------------------------------------------------------------------------------


def _npz_arrays(with_test=True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(20, 3)),
        "y_train": np.arange(20) % 4,
        "x_val": rng.normal(size=(6, 3)),
        "y_val": np.arange(6) % 4,
    }
    if with_test:
        arrays |= {"x_test": rng.normal(size=(5, 3)), "y_test": np.arange(5) % 3}
    return arrays


@pytest.mark.parametrize("with_test", [True, False])
def test_npz_happy_path(tmp_path, with_test):
    np.savez(tmp_path / "d.npz", **_npz_arrays(with_test))
    arrays = load_npz(tmp_path / "d.npz")
    assert arrays.num_classes == 4 and arrays.x_val.shape == (6, 3)
    assert (arrays.x_test is not None) == with_test
    splits = make_splits(arrays)
    assert splits.x_train.shape == (20, 3) and splits.x_val.shape == (6, 3)
    assert splits.x_train.dtype == torch.float32 and splits.y_val.dtype == torch.int64


NPZ_ERRORS = [
    (lambda a: a.pop("y_val"), "missing key.*y_val"),
    (lambda a: a.pop("y_test"), "missing key.*y_test"),
    (lambda a: a.update(x_tset=a["x_test"]), "unknown key.*x_tset"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "y_train must be 1-D with len"),
    (lambda a: a.update(y_val=a["y_val"].astype(float)), "y_val must hold integer"),
    (lambda a: a.update(y_train=a["y_train"] - 1), "negative label -1"),
    (lambda a: a.update(y_test=a["y_test"] + 3), "y_test has label 5.*0..3"),
    (lambda a: a.update(x_val=a["x_val"][:0], y_val=a["y_val"][:0]), "x_val is empty"),
    (lambda a: a.update(x_val=a["x_val"][:, :2]), r"x_val samples have shape \(2,\)"),
    (lambda a: a.update(x_train=np.where(a["x_train"] > 1, np.nan, a["x_train"])), "finite"),
    (lambda a: a.update(x_train=a["x_train"][:, 0]), "2-D or more"),
]


@pytest.mark.parametrize(("change", "match"), NPZ_ERRORS)
def test_npz_errors(tmp_path, change, match):
    arrays = _npz_arrays()
    change(arrays)
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_npz(tmp_path / "d.npz")


def test_npz_missing_or_unreadable(tmp_path):
    with pytest.raises(DataNotFoundError, match="no file"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", **_npz_arrays(), extra=np.array([{}], dtype=object))
    with pytest.raises(DataError, match="not a readable"):
        load_npz(tmp_path / "obj.npz")


# --- normalisation and splits -------------------------------------------------------------


def test_normalisation_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    x_train = rng.normal(3.0, 2.0, size=(500, 4))
    arrays = ArraySplits(x_train, rng.integers(0, 3, 500), 3)
    arrays.x_val, arrays.y_val = rng.normal(100.0, 50.0, size=(50, 4)), np.zeros(50, np.int64)
    arrays.x_test, arrays.y_test = x_train[:10] + 1000, np.zeros(10, np.int64)
    splits = make_splits(arrays)
    torch.testing.assert_close(splits.x_train.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        splits.x_train.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0
    )
    mean, std = x_train.mean(0), x_train.std(0)
    expected = torch.from_numpy(((arrays.x_test - mean) / std).astype(np.float32))
    torch.testing.assert_close(splits.x_test, expected)
    arrays.x_val = arrays.x_val * 10
    assert torch.equal(make_splits(arrays).x_train, splits.x_train)


def test_split_modes():
    x, y = np.arange(100.0)[:, None], np.arange(100) % 10
    digits_like = make_splits(ArraySplits(x, y, 10), val_fraction=0.2, seed=1)
    parts = [digits_like.y_train, digits_like.y_val, digits_like.y_test]
    assert [len(p) for p in parts] == [60, 20, 20]
    values = torch.cat([digits_like.x_train, digits_like.x_val, digits_like.x_test])[:, 0]
    assert len(torch.unique(values)) == 100  # disjoint

    official = ArraySplits(x, y, 10, x_test=x[:30] + 0.5, y_test=y[:30])
    carved = make_splits(official, val_fraction=0.1)
    assert (len(carved.y_train), len(carved.y_val), len(carved.y_test)) == (90, 10, 30)
    paper = make_splits(official, use_test_as_val=True)
    assert len(paper.y_train) == 100 and torch.equal(paper.y_train, torch.from_numpy(y))
    assert torch.equal(paper.x_val, paper.x_test)
    with pytest.raises(ValueError, match="val_fraction"):
        make_splits(official, val_fraction=1.0)


# --- batches ------------------------------------------------------------------------------


def _epoch(batches: TensorBatches, epoch: int) -> list[int]:
    batches.set_epoch(epoch)
    return torch.cat([y for _, y in batches]).tolist()


def test_batches_cover_every_sample_once_per_epoch():
    x = torch.arange(23.0)[:, None]
    batches = TensorBatches(x, torch.arange(23), 5, shuffle=True, seed=7)
    assert len(batches) == 5 and [len(b) for b, _ in batches] == [5, 5, 5, 5, 3]
    for epoch in range(3):
        assert sorted(_epoch(batches, epoch)) == list(range(23))
    for xb, yb in batches:
        assert torch.equal(xb[:, 0].long(), yb)
    dropped = TensorBatches(x, torch.arange(23), 5, shuffle=True, drop_last=True)
    assert len(dropped) == 4 and {len(b) for b, _ in dropped} == {5}
    assert _epoch(TensorBatches(x, torch.arange(23), 4), 9) == list(range(23))


def test_batch_order_depends_on_seed_and_epoch_only():
    y = torch.arange(50)
    a = TensorBatches(y[:, None], y, 8, shuffle=True, seed=1)
    b = TensorBatches(y[:, None], y, 8, shuffle=True, seed=1)
    seen_a = [_epoch(a, e) for e in range(3)]
    assert _epoch(b, 2) == seen_a[2]  # b never ran epochs 0 and 1
    assert seen_a[0] != seen_a[1] != seen_a[2]
    assert _epoch(TensorBatches(y[:, None], y, 8, shuffle=True, seed=2), 2) != seen_a[2]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_are_disjoint_and_equal(world_size, shuffle):
    y = torch.arange(23)
    shards = [
        TensorBatches(y[:, None], y, 4, shuffle=shuffle, seed=3, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for epoch in (0, 1):
        seen = [_epoch(s, epoch) for s in shards]
        assert {len(s) for s in seen} == {23 // world_size}
        assert len({len(s) for s in shards}) == 1
        flat = [i for s in seen for i in s]
        assert len(set(flat)) == len(flat) == 23 // world_size * world_size


def test_sampler_is_self_so_lightning_sets_the_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    batches = TensorBatches(torch.zeros(4, 1), torch.zeros(4), 2)
    assert batches.sampler is batches
    _set_sampler_epoch(batches, 5)
    assert batches.epoch == 5


def test_inputs_only_and_bad_arguments():
    x = torch.arange(10.0)[:, None]
    assert [b.shape for b in TensorBatches(x, None, 4)] == [(4, 1), (4, 1), (2, 1)]
    for kwargs, match in [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2, rank=2, world_size=2), "rank"),
        (dict(batch_size=2, world_size=11), "cannot be shared"),
    ]:
        with pytest.raises(ValueError, match=match):
            TensorBatches(x, torch.zeros(10), **kwargs)
    with pytest.raises(ValueError, match="9"):
        TensorBatches(x, torch.zeros(9), 2)


def test_random_batches():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)

    def draw(n, bs):
        return [
            yb.tolist() for _, yb in random_batches(x, y, n, bs, torch.Generator().manual_seed(0))
        ]

    first = draw(3, 3)
    assert first == draw(3, 3) and [len(b) for b in first] == [3, 3, 3]
    assert len({i for b in first for i in b}) == 9  # no repeats within a pass
    many = [i for b in draw(7, 4) for i in b]  # 28 samples: passes of fresh permutations
    assert len(many) == 28
    assert sorted(many[:10]) == sorted(many[10:20]) == list(range(10))
    for xb, yb in random_batches(x, y, 2, 4, torch.Generator().manual_seed(1)):
        assert torch.equal(xb[:, 0].long(), yb)


# --- the data module ----------------------------------------------------------------------


def test_datamodule_on_digits():
    dm = SurgeryDataModule(batch_size=64, val_fraction=0.1, eval_batch_size=100)
    assert dm.splits is None
    dm.prepare_data()
    dm.setup("fit")
    s = dm.splits
    assert dm.input_shape == (64,) and dm.input_size == 64 and dm.num_classes == 10
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (1797 - 360, 180, 180)
    train = dm.train_dataloader()
    assert isinstance(train, TensorBatches) and len(train) == math.ceil(1437 / 64)
    xb, yb = next(iter(train))
    assert xb.shape == (64, 64) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert len(dm.val_dataloader()) == 2 and len(dm.test_dataloader()) == 2
    assert next(iter(dm.predict_dataloader())).shape == (100, 64)
    paper = SurgeryDataModule(use_test_as_val=True)
    assert paper.splits is None
    assert paper.num_classes == 10  # reading shapes loads the data
    assert torch.equal(paper.splits.x_val, paper.splits.x_test)


def test_datamodule_trains_under_lightning_with_epoch_seeded_order():
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(64, 10)
            self.labels: list[list[int]] = []

        def on_train_epoch_start(self):
            self.labels.append([])

        def training_step(self, batch, _):
            x, y = batch
            self.labels[-1] += y.tolist()
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm, model = SurgeryDataModule(batch_size=256, seed=5), Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    s = dm.splits
    expected = [
        _epoch(TensorBatches(s.x_train, s.y_train, 256, shuffle=True, seed=5), e) for e in (0, 1)
    ]
    assert model.labels == expected and expected[0] != expected[1]


def test_datamodule_on_files(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path)
    _write_mnist_like(tmp_path / "fm", n_train=40, n_test=10)
    dm = SurgeryDataModule("fashion_mnist", data_dir=str(tmp_path / "fm"), download=False)
    dm.setup()
    assert dm.input_shape == (1, 4, 5) and dm.input_size == 20
    assert (len(dm.splits.y_train), len(dm.splits.y_val), len(dm.splits.y_test)) == (36, 4, 10)
    np.savez(tmp_path / "d.npz", **_npz_arrays(with_test=False))
    own = SurgeryDataModule("npz", npz_path=str(tmp_path / "d.npz"))
    assert own.input_shape == (3,) and own.num_classes == 4
    with pytest.raises(ValueError, match="no test split"):
        own.test_dataloader()
    missing = SurgeryDataModule("fashion_mnist", data_dir=str(tmp_path / "x"), download=False)
    with pytest.raises(DataNotFoundError, match=r"train-images-idx3-ubyte\.gz"):
        missing.prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dataset="imagenet"), "'imagenet'.*digits, fashion_mnist, mnist, cifar10, svhn, npz"),
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(batch_size=2.5), "batch_size.*2.5"),
        (dict(eval_batch_size=-1), "eval_batch_size.*-1"),
        (dict(val_fraction=0.0), r"val_fraction must be in \(0, 1\), got 0.0"),
        (dict(val_fraction=1.5), "val_fraction.*1.5"),
        (dict(dataset="npz"), "npz_path"),
        (dict(npz_path="x.npz"), "npz_path goes with dataset 'npz'"),
        (dict(dataset="npz", npz_path="x.npz", use_test_as_val=True), "use_test_as_val"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SurgeryDataModule(**kwargs)


def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        message = "Debian package dataset-fashion-mnist not installed (bash .ci/fashion-mnist.sh)"
        if os.environ.get("CI"):  # make test installs it: missing in CI is a failure
            pytest.fail(message)
        pytest.skip(message)
    arrays = load_arrays("fashion_mnist", data_dir=tmp_path)
    assert arrays.x_train.shape == (60000, 1, 28, 28) and arrays.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(arrays.y_test).tolist() == [1000] * 10
