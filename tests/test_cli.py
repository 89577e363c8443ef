"""The command line: `lit-surgery fit|validate|test|predict --config ...` (LightningCLI, also
`python train.py ...`), and the parsers of `lit-surgery tune` and `lit-surgery plain`."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lit_surgery import cli
from lit_surgery.cli import main

# Lightning's log handlers write to the stderr of the moment it is imported: here, not a
# test's captured (and then closed) one
from lit_surgery.lightning.cli import SurgeryCLI

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
    result = subprocess.run([sys.executable, "train.py", "fit", "--help"], cwd=ROOT, text=True,
                            capture_output=True, check=True)
    assert result.stdout.startswith("usage: train.py [options] fit ")
    assert "--model.surgery.max_epochs" in result.stdout and "--print_config" in result.stdout


def _option_help(text: str) -> dict[str, str]:
    """Each option of a ``--help`` text and its own words (jsonargparse's type and default
    left out)."""
    helps: dict[str, str] = {}
    for line in text.split("options:")[-1].splitlines():
        if line.startswith("  -"):
            names, _, words = line.strip().partition("  ")
            option = names.split()[0].rstrip(",")
            helps[option] = words
        elif line.startswith(" " * 8) and helps:
            helps[option] += " " + line.strip()
    return {k: re.sub(r"\((type: .*?, )?default: .*?\)$", "", " ".join(v.split())).strip()
            for k, v in helps.items()}


def test_help_lists_every_command_and_every_option(capsys):
    main([])  # no command: the help, exit status 0
    top = capsys.readouterr().out
    assert top.startswith("usage: lit-surgery {fit,validate,test,predict,tune,plain} ...")
    for name, help_ in cli.COMMANDS.items():
        assert f"    {name} " in top and " ".join(help_.split()[:3]) in top
    for command, options in [
        ("tune", ["--storage", "--study-name", "--n-trials", "--total-trials", "--out-dir",
                  "--set", "--sampler-seed", "--heartbeat-interval", "--grace-period",
                  "--max-retry", "--threads", "--check", "--export", "--trial"]),
        ("plain", ["--hidden", "--max-epochs", "--initial-epochs", "--epoch-step", "--paper",
                   "--random-walk", "--optimizer", "--lr", "--momentum", "--batch-size",
                   "--seed"]),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: lit-surgery [options] {command} ")
        helps = _option_help(text)
        assert sorted(helps) == sorted(["-h", *options])
        assert all(helps.values()), helps  # every option says what it is for


TUNE = ["tune", "s.yaml", "--storage", "memory", "--study-name", "s", "--n-trials", "1",
        "--total-trials", "2", "--out-dir", "o", "--set", "a=1", "--set", "b.c=[2]",
        "--sampler-seed", "3", "--heartbeat-interval", "4", "--grace-period", "5",
        "--max-retry", "0", "--threads", "0", "--check", "--export", "e.yaml", "--trial", "7"]
PLAIN = ["plain", "--hidden", "4", "5", "--max-epochs", "9", "--initial-epochs", "3",
         "--epoch-step", "2", "--paper", "--random-walk", "--optimizer", "adam", "--lr", "0.1",
         "--momentum", "0.5", "--batch-size", "8", "--seed", "6"]


def test_tune_and_plain_keep_their_option_spellings_and_defaults():
    from lit_surgery import plain
    from lit_surgery.tune import study

    parser = cli.build_parser()
    tune = parser.parse_args(TUNE).tune.as_dict()
    assert tune == {
        "sweep": "s.yaml", "storage": "memory", "study_name": "s", "n_trials": 1,
        "total_trials": 2, "out_dir": "o", "sets": ["a=1", "b.c=[2]"], "sampler_seed": 3,
        "heartbeat_interval": 4, "grace_period": 5, "max_retry": 0, "threads": 0,
        "check": True, "export": "e.yaml", "trial": 7,
    }
    assert parser.parse_args(["tune", "s.yaml"]).tune.as_dict() == {
        **dict.fromkeys(tune, None), "sweep": "s.yaml", "out_dir": "runs/tune", "sets": [],
        "threads": 1, "check": False,
    }
    assert parser.parse_args(PLAIN).plain.as_dict() == {
        "hidden": [4, 5], "max_epochs": 9, "initial_epochs": 3, "epoch_step": 2, "paper": True,
        "random_walk": True, "optimizer": "adam", "lr": 0.1, "momentum": 0.5, "batch_size": 8,
        "seed": 6,
    }
    assert parser.parse_args(["plain"]).plain.as_dict() == {
        "hidden": [4], "max_epochs": 40, "initial_epochs": 5, "epoch_step": 5, "paper": False,
        "random_walk": False, "optimizer": "sgd", "lr": None, "momentum": None, "batch_size": 32,
        "seed": 0,
    }
    # what the parsers give is what the commands take, by name
    assert set(inspect.signature(study.tune).parameters) == {*tune, "console"}
    assert list(inspect.signature(plain.main).parameters) == list(
        parser.parse_args(["plain"]).plain.as_dict())
    assert set(cli.OPTIMIZERS) == set(plain.OPTIMIZERS)


def test_cli_defaults_wandb_offline_checkpoint_lr_monitor_rich_bar_report():
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import WandbLogger

    from lit_surgery.lightning.callbacks import SurgeryReport
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


def test_the_grow_config_is_the_grow_preset():
    from lit_surgery.core.settings import SurgerySettings

    cli = SurgeryCLI(args=["--config", str(ROOT / "configs/fashion_mnist_quick_grow.yaml")],
                     run=False)
    assert cli.model.settings == SurgerySettings.grow(max_epochs=30)


def test_what_the_user_turns_off_stays_off(tmp_path, capsys, monkeypatch):
    """No logger, no checkpointing, no progress bar: the CLI's own defaults (learning-rate
    monitor, checkpoint callback, rich bar) follow, and the run still tests and exports."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar


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


def test_plain_command_runs_without_lightning():
    """``lit-surgery plain`` imports only what it runs (the parsers import no Lightning)."""
    from test_layout import BLOCK

    code = BLOCK + (
        "from lit_surgery.cli import main\n"
        "main(['plain', '--hidden', '4', '--max-epochs', '2', '--initial-epochs', '1',"
        " '--epoch-step', '1'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert "final topology: 64-[" in result.stdout


def test_finished_summary_says_what_was_done():
    """What ``fit`` prints after :func:`finish_fit`: no test line without a test split, no
    export line on a rank that exported nothing."""
    from lit_surgery.core.topology import Topology
    from lit_surgery.lightning.cli import Finished

    topo = Topology.mlp(64, [4], 10)
    full = Finished(topo, 0.91234, Path("run"), Path("run/model.safetensors")).summary()
    assert full.splitlines() == [
        f"final topology: {topo.describe()} widths=[4] params={topo.num_params}",
        "test accuracy: 0.9123",
        "exported: run/model.safetensors",
    ]
    assert Finished(topo, None, Path("run"), None).summary() == full.splitlines()[0]
