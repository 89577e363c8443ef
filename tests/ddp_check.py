"""Run by tests/test_ddp.py: a 2-process CPU (gloo) DDP fit with surgery that records, on
every rank, a hash of all parameters and of the optimiser state after each surgery, after
each epoch's training and at the end; rank 0 writes all ranks' hashes to argv[1], with
the parameters themselves after each epoch before the first surgery. argv[3] is
data.steps_per_batch (above 1: manual optimisation with its own gradient all-reduce); an
argv[4] of "compile" trains by the compiled step (``aot_eager``: the graphs traced as with
inductor, without its code generation, which takes tens of seconds per graph here) and
records how many graphs had compiled at each check; an argv[4] of "cnn" trains a CNN with
batch norm on Fashion-MNIST-shaped data instead (the hashes then cover the running
statistics, which each rank updates from its own batches and the module averages)."""

import hashlib
import json
import os
import sys
from functools import partial

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from images import fashion_like
from lightning.pytorch.callbacks import Callback
from torch._dynamo.testing import CompileCounterWithBackend

from lit_surgery.core.compiled import StepCompiler
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.topology import ConvLayer
from lit_surgery.data import SurgeryDataModule
from lit_surgery.lightning.loop import attach
from lit_surgery.lightning.module import SurgeryModule

# 1,616 training samples (181 for validation, none for test): two ranks drop none, so their
# global batches are a single process's batches of twice the size (tests/test_ddp.py
# compares the two)
DATA = dict(val_fraction=0.1006, use_test_as_val=True)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class HashCheck(Callback):
    def __init__(self) -> None:
        self.records: list[dict] = []

    def _check(self, trainer, module, label: str) -> None:
        params = _digest(module.population.parameters())
        state = trainer.optimizers[0].state_dict()["state"] if trainer.optimizers else {}
        opt = _digest(v for k in sorted(state) for v in state[k].values()
                      if isinstance(v, torch.Tensor))
        mine = {"params": params, "optimizer": opt, "topologies":
                [net.topology.describe() for net in module.population],
                "buffers": _digest(module.population.buffers())}
        if isinstance(module.step_compiler.backend, CompileCounterWithBackend):
            mine["graphs"] = module.step_compiler.backend.frame_count
        gathered = [None] * trainer.world_size
        dist.all_gather_object(gathered, mine)
        self.records.append({"label": label, "epoch": trainer.current_epoch,
                             "surgeries": len(module.events), "ranks": gathered})
        if label.startswith("epoch end") and not module.events:
            self.records[-1]["params"] = torch.cat(
                [p.detach().reshape(-1) for p in module.population.parameters()]).tolist()

    def on_train_epoch_start(self, trainer, module) -> None:
        self._check(trainer, module, "epoch start (after any surgery)")

    def on_train_epoch_end(self, trainer, module) -> None:
        self._check(trainer, module, "epoch end (after training)")

    def on_fit_end(self, trainer, module) -> None:
        self._check(trainer, module, "end")
        if trainer.is_global_zero:
            with open(sys.argv[1], "w") as f:
                json.dump({"records": self.records, "events": module.events,
                           "automatic_optimization": module.automatic_optimization}, f)


def make_model(compile: bool = False) -> SurgeryModule:
    """Three generations; one when compiled (each population compiles its own graphs)."""
    settings = SurgerySettings(max_epochs=4 if compile else 8, initial_epochs=2, epoch_step=2)
    model = SurgeryModule(hidden=[6], surgery=settings, compile=compile,
                          optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    if compile:
        model.step_compiler = StepCompiler(backend=CompileCounterWithBackend("aot_eager"))
    return model


def make_cnn() -> SurgeryModule:
    """Two generations of a CNN whose first block has batch norm."""
    settings = SurgerySettings(max_epochs=5, initial_epochs=1, epoch_step=2)
    conv = [ConvLayer(4, batch_norm=True, pool=2), ConvLayer(6, pool=2)]
    return SurgeryModule(hidden=[8], conv=conv, surgery=settings,
                         optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def main() -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    cnn = sys.argv[4:] == ["cnn"]
    model = make_cnn() if cnn else make_model(compile=sys.argv[4:] == ["compile"])
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=model.settings.max_epochs,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[HashCheck()], default_root_dir=sys.argv[2],
    )
    attach(trainer)
    if cnn:  # written by rank 0 before DDP starts the other rank
        path = f"{sys.argv[2]}/cnn.npz"
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            fashion_like(path, n_train=256, n_val=64)
        data = SurgeryDataModule("npz", npz_path=path, steps_per_batch=int(sys.argv[3]))
    else:
        data = SurgeryDataModule("digits", steps_per_batch=int(sys.argv[3]), **DATA)
    trainer.fit(model, data)
    dist.destroy_process_group()  # a clean exit: gloo's threads must not outlive Python


if __name__ == "__main__":
    main()
