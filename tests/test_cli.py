"""`python train.py fit|validate|test|predict --config ...` through LightningCLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from lit_surgery.lightning.cli import main

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
    for name in ("model.safetensors", "topology.json", "widths.png", "spectra.png",
                 "candidates.csv", "history.json", "checkpoints/last.ckpt", "metrics.csv"):
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
    assert (run_dirs[0] / "model.safetensors").is_file()
    assert (run_dirs[0] / "checkpoints").is_dir()


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


def test_cli_defaults_wandb_offline_checkpoint_lr_monitor_rich_bar_report():
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import WandbLogger

    from lit_surgery.lightning.callbacks import SurgeryReport
    from lit_surgery.lightning.cli import SurgeryCLI
    from lit_surgery.lightning.loop import SurgeryFitLoop

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


def test_what_the_user_turns_off_stays_off(tmp_path, capsys, monkeypatch):
    """No logger, no checkpointing, no progress bar: the CLI's own defaults (learning-rate
    monitor, checkpoint callback, rich bar) follow, and the run still tests and exports."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

    from lit_surgery.lightning.cli import SurgeryCLI

    monkeypatch.chdir(tmp_path)
    off = ["--trainer.logger=false", "--trainer.enable_checkpointing=false",
           "--trainer.enable_progress_bar=false"]
    cli = SurgeryCLI(args=["--config", str(ROOT / "configs/digits.yaml"), *off], run=False)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert not any(issubclass(k, LearningRateMonitor | ModelCheckpoint | ProgressBar)
                   for k in kinds), kinds
    main(["fit", "--config", str(ROOT / "configs/digits.yaml"), *SHORT, *off])
    out = capsys.readouterr().out
    assert "test accuracy: " in out and "exported: " in out
    assert (tmp_path / "model.safetensors").is_file()  # default_root_dir: no logger's dir
    assert not list(tmp_path.rglob("*.ckpt"))
