"""``SurgeryDataModule``: the datasets as a Lightning ``LightningDataModule`` whose
tensors live on the training device.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lit_surgery.data.batching import TensorBatches
from lit_surgery.data.formats import load_arrays
from lit_surgery.data.sources import DATASETS, SOURCES, DataError, fetch
from lit_surgery.data.splits import TensorSplits, make_splits

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
    time; :class:`~lit_surgery.lightning.module.SurgeryModule` takes one optimiser step per
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
