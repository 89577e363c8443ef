"""Two DDP processes on CPU (gloo): every rank must hold bit-identical networks and
optimiser state after every surgery and after training on different shards, and train as
one process does (eagerly) on the same global batches, by eager or compiled steps; a CNN
with batch norm keeps identical networks and running statistics too."""

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from ddp_check import DATA, make_model  # pytest puts tests/ on sys.path
from lightning.pytorch.callbacks import Callback

from lit_surgery.data import SurgeryDataModule
from lit_surgery.lightning.loop import attach


class FirstEpochs(Callback):
    """The parameters after each epoch before the first surgery, then stop."""

    def __init__(self, epochs: int) -> None:
        self.epochs, self.params = epochs, []

    def on_train_epoch_end(self, trainer, module) -> None:
        self.params.append(torch.cat([p.detach().reshape(-1) for p in module.parameters()]))
        trainer.should_stop = len(self.params) == self.epochs


def _one_process(tmp_path, batch_size: int, steps_per_batch: int, epochs: int) -> list:
    pl.seed_everything(0)
    record = FirstEpochs(epochs)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=8, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
        default_root_dir=tmp_path,
    )
    attach(trainer)
    data = SurgeryDataModule(
        "digits", batch_size=batch_size, steps_per_batch=steps_per_batch, **DATA
    )
    trainer.fit(make_model(), data)
    return record.params


# steps_per_batch 1: Lightning's automatic optimisation, DDP's reducer averages gradients;
# 4: manual optimisation, the module averages each micro-step's gradients itself, in eager
# steps or as the hook between the compiled step's two graphs; cnn: a CNN with batch norm
# (eager: the compiled step does not carry running statistics)
@pytest.mark.parametrize(("steps_per_batch", "mode"),
                         [(1, "eager"), (4, "eager"), (4, "compile"), (4, "cnn")],
                         ids=["1-eager", "4-eager", "4-compiled", "4-cnn"])
def test_ddp_ranks_stay_identical_through_surgery(tmp_path, steps_per_batch, mode):
    out = tmp_path / "hashes.json"
    script = Path(__file__).with_name("ddp_check.py")
    command = [sys.executable, str(script), str(out), str(tmp_path), str(steps_per_batch)]
    extra = [] if mode == "eager" else [mode]
    subprocess.run(command + extra, check=True, cwd=tmp_path, timeout=600)
    data = json.loads(out.read_text())
    records = data["records"]
    compile = mode == "compile"
    assert data["automatic_optimization"] == (steps_per_batch == 1 and not compile)
    assert [e["kind"] for e in data["events"]][-1] == "end"
    generations = {"eager": 3, "compile": 1, "cnn": 2}[mode]
    assert len(data["events"]) == generations + 1  # and the end
    changed = {tuple(r["ranks"][0]["topologies"]) for r in records}
    assert len(changed) > 1, "surgery never changed the population"
    for r in records:
        first, second = r["ranks"]
        assert first == second, f"ranks differ at {r['label']}, epoch {r['epoch']}"
    # surgery then further training: new parameters are synchronised by the new DDP wrapper
    after = [r for r in records if r["label"].startswith("epoch end") and r["surgeries"] > 0]
    assert len(after) == 2 * generations
    if compile:  # every population trained by its two graphs (the hook between them)
        trained = {tuple(r["ranks"][0]["topologies"]) for r in records
                   if r["label"].startswith("epoch end")}
        assert records[-1]["ranks"][0]["graphs"] == 2 * len(trained)
    if mode == "cnn":  # trained: running statistics (identical, above) moved off their start
        assert len({r["ranks"][0]["buffers"] for r in records}) > 1
        return  # batch norm on a rank's own batches differs from one process on both
    # before the first surgery: two ranks on batches of 32 train as one eager process on 64
    ddp = [torch.tensor(r["params"]) for r in records if "params" in r]
    single = _one_process(tmp_path / "single", 64, steps_per_batch, len(ddp))
    assert len(ddp) == 2
    for a, b in zip(ddp, single, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
