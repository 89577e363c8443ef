"""The plain-PyTorch driver on digits: real training, real surgery."""

import math
from functools import partial

import pytest
import torch

from lit_surgery import plain
from lit_surgery.cli import main
from lit_surgery.core.network import build
from lit_surgery.core.operators import GROW, SHRINK
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.state import Branch
from lit_surgery.core.topology import Topology
from lit_surgery.core.training import evaluate, train_branch
from lit_surgery.data import digits
from lit_surgery.plain import PlainTrainer, run

SCHEDULE = dict(max_epochs=40, initial_epochs=5, epoch_step=5)


def _lineage_ops(surgeon, best):
    ops, node = [], surgeon.history.genealogy[best.id]
    while node["parent"] is not None:
        ops.append(node["change"].split("@")[0])
        node = surgeon.history.genealogy[node["parent"]]
    return ops


def test_small_start_grows_and_reaches_90_percent():
    best, surgeon = run([4], SurgerySettings(**SCHEDULE), seed=0, verbose=False)
    ops = _lineage_ops(surgeon, best)
    assert any(op in GROW for op in ops), ops
    assert best.metric > 0.90
    assert best.epochs == 40


def test_large_start_shrinks_and_reaches_90_percent():
    best, surgeon = run([64, 64, 64], SurgerySettings(**SCHEDULE), seed=0, verbose=False)
    ops = _lineage_ops(surgeon, best)
    assert any(op in SHRINK for op in ops), ops
    assert best.metric > 0.90


def test_paper_mode_runs_end_to_end():
    settings = SurgerySettings.paper(max_epochs=12, initial_epochs=4, epoch_step=4)
    best, surgeon = run([8], settings, seed=1, verbose=False, carry_state=False)
    assert best.epochs == 12 and best.metric > 0.5
    assert {r["op"] for r in surgeon.history.to_dict()["candidates"]} >= {"B", "AN", "AL"}


def test_paper_driver_trains_with_plain_sgd_and_a_fresh_optimiser_per_network(monkeypatch):
    class Ran(Exception):
        pass

    def fake_run(*args, **kw):
        calls.append(kw)
        raise Ran

    calls = []
    monkeypatch.setattr(plain, "run", fake_run)
    options = dict(max_epochs=6, initial_epochs=2, epoch_step=2, random_walk=False,
                   optimizer="sgd", batch_size=32, seed=0)
    for paper, lr, momentum in [(True, None, None), (False, None, None), (True, 0.1, 0.5)]:
        with pytest.raises(Ran):
            plain.main([4], paper=paper, lr=lr, momentum=momentum, **options)
    assert [(c["lr"], c["momentum"], c["carry_state"]) for c in calls] == [
        (0.005, 0.0, False), (0.02, 0.9, True), (0.1, 0.5, False)]


def test_without_carried_state_a_branch_keeps_its_optimiser_only_for_its_cycle():
    data = digits()
    torch.manual_seed(0)
    trainer = PlainTrainer(data, momentum=0.9, carry_state=False)
    branch = Branch(0, build(Topology.mlp(64, [8], 10)))
    trainer.screen(branch, 2)
    assert branch.optimizer_state["state"]  # screening and its cycle share one optimiser
    trainer.train(branch, 1)
    assert branch.optimizer_state is None  # its children start afresh


def test_command_line_prints_generations_and_result(capsys):
    main(["plain", "--hidden", "6", "--max-epochs", "6", "--initial-epochs", "2", "--epoch-step",
          "2"])
    out = capsys.readouterr().out
    assert out.count("generation ") == 2
    assert "final topology: 64-[" in out and "final validation accuracy: " in out


def test_bad_trainer_arguments():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        PlainTrainer(digits(), optimizer="lbfgs")
    with pytest.raises(ValueError, match="batch_size"):
        PlainTrainer(digits(), batch_size=0)


def test_diverging_learning_rate_ends_with_a_finite_winner_and_names_what_diverged(capsys):
    settings = SurgerySettings(max_epochs=6, initial_epochs=2, epoch_step=2)
    best, surgeon = run([4], settings, seed=0, lr=1e3)
    out = capsys.readouterr().out
    history = surgeon.history
    assert history.diverged[0] == {
        "branch": 0, "parent": None, "generation": 0, "epochs": 2, "stage": "training"
    }
    start = history.fallbacks[0]
    assert start["generation"] == 0 and "untrained start network" in start["reason"]
    assert any(d["generation"] > 0 and d["stage"] == "training" for d in history.diverged)
    assert best.id not in {d["branch"] for d in history.diverged}
    assert all(bool(torch.isfinite(p).all()) for p in best.net.parameters())
    assert math.isfinite(best.metric)
    assert "diverged: #0 (generation 0, training, after 2 epochs)" in out
    assert f"kept last good [{start['kept'][0]}]: root #0 diverged" in out

    main(["plain", "--hidden", "4", "--max-epochs", "4", "--initial-epochs", "2", "--epoch-step",
          "2", "--lr", "1000"])
    out = capsys.readouterr().out
    assert "branches diverged and were dropped: #0" in out
    assert "final validation accuracy: nan" not in out


def test_train_branch_continues_the_optimiser_and_reports_a_non_finite_loss_as_nan():
    """The routine behind both drivers' screening (and the plain driver's training)."""
    data = digits()
    torch.manual_seed(0)
    branch = Branch(0, build(Topology.mlp(64, [8], 10)))
    sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    batches = [(data.x_train[:32], data.y_train[:32])] * 3
    metric = train_branch(branch, sgd, batches, data.x_val, data.y_val)
    assert branch.net.training and 0.0 <= metric <= 1.0
    momentum = branch.optimizer_state["state"][0]["momentum_buffer"].clone()
    assert metric == evaluate(branch.net, data.x_val, data.y_val, chunk=7)
    train_branch(branch, sgd, [], data.x_val, data.y_val)  # no batch: the state goes on
    assert torch.equal(branch.optimizer_state["state"][0]["momentum_buffer"], momentum)
    bad = [(data.x_train[:32] * math.inf, data.y_train[:32])]
    assert math.isnan(train_branch(branch, sgd, bad, data.x_val, data.y_val))
