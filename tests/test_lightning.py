"""The Lightning module and loop: surgery inside one fit, checkpoints, resume."""

import json
import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from images import fashion_like  # pytest puts tests/ on sys.path
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.topology import ConvLayer
from lit_surgery.data import SurgeryDataModule
from lit_surgery.lightning.loop import SurgeryFitLoop, attach
from lit_surgery.lightning.module import CheckpointError, SurgeryModule

SCHEDULE = dict(max_epochs=12, initial_epochs=3, epoch_step=3)


def _model(**kw):
    settings = SurgerySettings(**{**SCHEDULE, **kw.pop("surgery", {})})
    return SurgeryModule(hidden=kw.pop("hidden", [4]), surgery=settings,
                         optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), **kw)


def _trainer(tmp_path, callbacks=(), **kw):
    kw.setdefault("max_epochs", SCHEDULE["max_epochs"])
    trainer = pl.Trainer(
        default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kw,
    )
    return attach(trainer)


def test_fit_runs_generations_inside_one_fit(tmp_path):
    model, trainer = _model(), None
    trainer = _trainer(tmp_path)
    assert isinstance(trainer.fit_loop, SurgeryFitLoop)
    trainer.fit(model, SurgeryDataModule("digits"))
    assert trainer.current_epoch == 12
    assert model.surgeon.done_generations == 3 and model.surgeon.next_boundary is None
    kinds = [(e["epoch"], e["kind"]) for e in model.events]
    assert kinds[0] == (3, "generation") and kinds[-1][1] == "end"
    history = model.surgeon.history
    assert {r.generation for r in history.candidates} == {1, 2, 3}
    winner = history.genealogy[model.branches[0].id]
    assert winner["epochs"] == SCHEDULE["max_epochs"]  # its lineage trained the schedule
    assert len(model.population) == 1 and model.branches[0].metric > 0.8
    assert [e["epoch"] for e in model.epoch_log] == list(range(trainer.current_epoch))
    # after a generation the population holds the survivors (parallel branches)
    assert max(e["branches"] for e in model.epoch_log) == 2


class StopAt(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def _params(model):
    return [p.detach().clone() for p in model.population.parameters()]


def _assert_resume_equals_uninterrupted_run(tmp_path, make, stop, data=SurgeryDataModule):
    """Fit ``make()`` whole, and stopped after ``stop`` epochs then resumed from last.ckpt:
    the same events, history and weights (batch-norm statistics included)."""
    pl.seed_everything(0)
    full = make()
    _trainer(tmp_path / "full").fit(full, data())

    pl.seed_everything(0)
    first = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path / "a", [ckpt, StopAt(stop)]).fit(first, data())
    assert first.current_epoch == stop
    resumed = make()
    _trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "ckpt2")]).fit(
        resumed, data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    assert resumed.topology == full.topology
    assert resumed.events == full.events
    # NaN metrics of diverged branches: compared as JSON text
    assert json.dumps(resumed.surgeon.history.to_dict()) == json.dumps(
        full.surgeon.history.to_dict())
    state, expected = resumed.population.state_dict(), full.population.state_dict()
    assert list(state) == list(expected)
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("stop", [6, 7])  # on a generation boundary, and mid-cycle
def test_resume_equals_uninterrupted_run(tmp_path, stop):
    _assert_resume_equals_uninterrupted_run(tmp_path, _model, stop)


def test_checkpoint_after_surgery_loads_weights_only_and_from_checkpoint(tmp_path):
    model = _model()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(tmp_path, [ckpt]).fit(model, SurgeryDataModule("digits"))
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert raw["surgery"]["population"][0]["topology"] == model.topology.to_dict()
    loaded = SurgeryModule.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert loaded.topology == model.topology
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), model.cpu()(x))


def _cnn_model():
    settings = SurgerySettings(max_epochs=5, initial_epochs=1, epoch_step=2)
    conv = [ConvLayer(4, batch_norm=True, pool=2), ConvLayer(6, pool=2)]
    return SurgeryModule(hidden=[8], conv=conv, surgery=settings,
                         optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def test_cnn_checkpoint_round_trip_and_resume(tmp_path):
    """A CNN with batch norm: the checkpoint (topology format 2, running statistics) loads
    weights-only into the same function, and a run resumed mid-cycle after surgery equals
    the uninterrupted one, statistics included."""
    path = fashion_like(tmp_path / "d.npz", n_train=256, n_val=64)
    data = partial(SurgeryDataModule, "npz", npz_path=str(path))
    _assert_resume_equals_uninterrupted_run(tmp_path, _cnn_model, 2, data)
    raw = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    topology = raw["surgery"]["population"][0]["topology"]
    assert topology["version"] == 2 and topology["hidden"][0]["kind"] == "conv"
    assert any(k.endswith("running_var") for k in raw["state_dict"])
    loaded = SurgeryModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert loaded.conv == _cnn_model().conv
    assert loaded.topology.to_dict() == topology
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, raw["state_dict"][key]), key


def test_checkpoint_not_ours_or_wrong_version_is_a_clear_error(tmp_path):
    model = _model()
    with pytest.raises(CheckpointError, match="not written by lit_surgery"):
        model.on_load_checkpoint({"state_dict": {}})
    state = model.surgery_state()
    state["version"] = 99
    with pytest.raises(CheckpointError, match="version 99"):
        model.on_load_checkpoint({"surgery": state})


def test_surgery_state_keeps_the_layout_of_version_1():
    """Checkpoints written before the state machine moved to the core still load: a change
    of these keys needs a new version (and the CLI's check of it)."""
    state = _model(input_size=64, num_classes=10).surgery_state()
    assert state["version"] == 1
    assert set(state) == {
        "version", "surgeon", "generation", "population", "next_boundary", "extra_epochs",
        "done_generations", "epoch_log", "events", "loss_sums", "input_size", "num_classes",
    }
    assert set(state["surgeon"]) == {"rng", "generator", "next_id", "history", "start"}


def test_chunked_steps_train_exactly_like_single_batches(tmp_path):
    """data.steps_per_batch only changes how batches reach Lightning, not the training."""
    results = []
    for chunk in (1, 4):
        pl.seed_everything(0)
        # compile off: chunk 1 then takes Lightning's automatic optimisation
        model = _model(surgery=dict(max_epochs=6, initial_epochs=2, epoch_step=2), compile=False)
        dm = SurgeryDataModule("digits", steps_per_batch=chunk)
        _trainer(tmp_path / str(chunk)).fit(model, dm)
        assert model.automatic_optimization == (chunk == 1)
        results.append(model)
    a, b = results
    assert a.topology == b.topology and a.events == b.events
    for p, q in zip(_params(a), _params(b), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    assert a.trainer.global_step == b.trainer.global_step  # optimiser steps, not chunks


def test_early_stopping_on_the_validation_metric_works_with_surgery(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    model = _model(surgery=dict(max_epochs=40, initial_epochs=2, epoch_step=2))
    stop = EarlyStopping(monitor="val/acc", mode="max", patience=1, min_delta=0.5)
    trainer = _trainer(tmp_path, [stop], max_epochs=40)
    trainer.fit(model, SurgeryDataModule("digits"))
    assert stop.stopped_epoch > 0 and trainer.current_epoch < 40


def test_chunked_steps_refuse_a_gradient_scaler():
    model = _model()
    trainer = pl.Trainer(logger=False)
    trainer.datamodule = SurgeryDataModule(steps_per_batch=4)
    trainer.precision_plugin.scaler = object()  # what 16-mixed precision carries
    model.trainer = trainer
    with pytest.raises(ValueError, match="does not support a gradient scaler"):
        model.setup("fit")


def _diverging_model():
    """lr 1e3: the root diverges in its initial epochs, and so do most children."""
    settings = SurgerySettings(**SCHEDULE, max_retries=1)
    return SurgeryModule(hidden=[4], surgery=settings,
                         optimizer=partial(torch.optim.SGD, lr=1e3, momentum=0.9))


def test_diverging_learning_rate_ends_with_a_finite_winner(tmp_path):
    model = _diverging_model()
    trainer = _trainer(tmp_path)
    trainer.fit(model, SurgeryDataModule("digits"))
    assert trainer.current_epoch == 12 and model.surgeon.next_boundary is None
    assert model.events[-1]["kind"] == "end"
    first = model.events[0]
    assert first["epoch"] == 3 and [d["branch"] for d in first["diverged"]] == [0]
    (start,) = first["fallbacks"]
    assert start["generation"] == 0 and "untrained start network" in start["reason"]
    assert [b["branch"] for b in first["population"]] != [0]
    diverged = [d for e in model.events for d in e["diverged"]]
    assert diverged == model.surgeon.history.diverged
    assert any(d["generation"] > 0 and d["stage"] == "training" for d in diverged)
    winner = model.branches[0]
    assert len(model.population) == 1 and model.net is winner.net
    assert winner.id not in {d["branch"] for d in diverged}
    assert math.isfinite(winner.metric)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("stop", [2, 5])  # before the root's divergence is found, and after
def test_resume_of_a_diverging_run_equals_the_uninterrupted_run(tmp_path, stop):
    _assert_resume_equals_uninterrupted_run(tmp_path, _diverging_model, stop)
