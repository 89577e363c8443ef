"""`python train.py fit|validate|test|predict --config ...` through LightningCLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_surgery.data import DataError, DataNotFoundError
from lit_surgery.lightning_cli import main
from lit_surgery.module import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--model.surgery.max_epochs=6", "--model.surgery.initial_epochs=2",
         "--model.surgery.epoch_step=2", "--trainer.enable_progress_bar=false"]


def _fit(tmp_path, *extra, config="configs/digits.yaml"):
    args = ["fit", "--config", str(ROOT / config), *SHORT,
            "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}", *extra]
    main(args)


def _written(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())


def test_fit_from_config_trains_operates_tests_and_exports(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(tmp_path)
    out = capsys.readouterr().out
    assert "final topology: 64-[" in out and "test accuracy: " in out
    run = next(tmp_path.glob("**/version_0"))
    for name in ("model.pt", "topology.json", "widths.png", "spectra.png", "candidates.csv",
                 "history.json", "checkpoints/last.ckpt", "metrics.csv"):
        assert (run / name).is_file(), name
    metrics = (run / "metrics.csv").read_text().splitlines()[0]
    for key in ("train/loss", "val/acc", "model/num_params", "model/width_0", "lr-SGD"):
        assert key in metrics
    # validate, test and predict from the checkpoint written after surgery
    ckpt = str(run / "checkpoints" / "last.ckpt")
    for sub in ("validate", "test", "predict"):
        main([sub, "--config", str(ROOT / "configs/digits.yaml"), "--ckpt_path", ckpt,
              "--trainer.logger=false", "--trainer.enable_progress_bar=false"])


def test_default_logger_is_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    main(["fit", "--config", str(ROOT / "configs/digits.yaml"), *SHORT])
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))
    run_dirs = list((tmp_path / "runs" / "lit-surgery").iterdir())
    assert (run_dirs[0] / "model.pt").is_file() and (run_dirs[0] / "checkpoints").is_dir()


def test_print_config_shows_surgery_settings(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs/fashion_mnist_quick_paper.yaml"),
              "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "ranking: paper" in out and "max_epochs: 30" in out


def test_train_py_is_the_entry_point():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, text=True,
                            capture_output=True, check=True)
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.surgery.no_such_setting=1"], "no_such_setting"),
        (["--model.surgery.epoch_step=0"], "epoch_step=0 is invalid"),
        (["--model.surgery.ranking=best"], "ranking='best' is invalid"),
        (["--data.dataset=imagenet"], "unknown dataset 'imagenet'"),
        (["--data.batch_size=0"], "batch_size must be an integer >= 1"),
    ],
)
def test_bad_configuration_fails_before_training(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, ValueError)) as err:
        _fit(tmp_path, *args)
    text = str(err.value) + capsys.readouterr().err
    assert message in text
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("model.pt"))


def test_unknown_key_in_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden: [4]\n  surgerie:\n    max_epochs: 3\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad)])
    assert "surgerie" in capsys.readouterr().err


def test_missing_data_files_offline_name_the_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        _fit(tmp_path, "--data.dataset=mnist", f"--data.data_dir={empty}", "--data.download=false")
    assert _written(tmp_path) == []


def test_npz_with_missing_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=np.zeros((4, 3)), y_train=np.zeros(4, dtype=int))
    with pytest.raises(DataError, match="x_val"):
        _fit(tmp_path, "--data.dataset=npz", f"--data.npz_path={path}")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_resume_from_a_foreign_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": "2.6.0", "loops": {}}, foreign)
    with pytest.raises(CheckpointError, match="not written by lit_surgery"):
        _fit(tmp_path, f"--ckpt_path={foreign}")
    assert not list(tmp_path.rglob("model.pt"))



def test_cli_defaults_wandb_offline_checkpoint_lr_monitor_rich_bar_report():
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import WandbLogger

    from lit_surgery.lightning_cli import SurgeryCLI
    from lit_surgery.loop import SurgeryFitLoop
    from lit_surgery.reporting import SurgeryReport

    cli = SurgeryCLI(args=["--config", str(ROOT / "configs/digits.yaml"), "--model.seed=3"],
                     run=False)
    assert cli.datamodule.seed == 3  # one seed per run (linked), no hparams clash
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {ModelCheckpoint, LearningRateMonitor, RichProgressBar, SurgeryReport} <= kinds
    assert isinstance(cli.trainer.logger, WandbLogger)
    assert cli.trainer.logger._offline
    assert cli.trainer.max_epochs == 40  # linked to model.surgery.max_epochs
    cli.before_fit()
    assert isinstance(cli.trainer.fit_loop, SurgeryFitLoop)
