"""The plain-PyTorch driver on digits: real training, real surgery."""

import pytest

from lit_surgery.operators import GROW, SHRINK
from lit_surgery.plain import PlainTrainer, main, run
from lit_surgery.policy import SurgerySettings

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
    best, surgeon = run([8], settings, seed=1, verbose=False)
    assert best.epochs == 12 and best.metric > 0.5
    assert {r["op"] for r in surgeon.history.to_dict()["candidates"]} >= {"B", "AN", "AL"}


def test_command_line_prints_generations_and_result(capsys):
    main(["--hidden", "6", "--max-epochs", "6", "--initial-epochs", "2", "--epoch-step", "2"])
    out = capsys.readouterr().out
    assert out.count("generation ") == 2
    assert "final topology: 64-[" in out and "final validation accuracy: " in out


def test_bad_trainer_arguments():
    from lit_surgery.data import digits

    with pytest.raises(ValueError, match="optimizer must be one of"):
        PlainTrainer(digits(), optimizer="lbfgs")
    with pytest.raises(ValueError, match="batch_size"):
        PlainTrainer(digits(), batch_size=0)
