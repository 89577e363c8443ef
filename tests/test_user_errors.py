"""Bad input through every command line: one line on stderr naming the value and what is
allowed, exit status 2, nothing written; the traceback only with --debug or
LIT_SURGERY_DEBUG=1."""

import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

# Lightning's log handlers write to the stderr of the moment it is imported: here, not a
# test's captured (and then closed) one
import lit_surgery.lightning.cli  # noqa: F401
from lit_surgery import cli

train_main = partial(cli.main, prog="train.py")  # python train.py ...

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
SHORT = ["--model.surgery.max_epochs=2", "--model.surgery.initial_epochs=2"]


def _inputs(folder: Path) -> dict[str, str]:
    """Bad files for the table, in their own folder (outside the run's directory)."""
    folder.mkdir()
    (folder / "empty").mkdir()
    (folder / "garbage.ckpt").write_bytes(b"\x00not a checkpoint at all" * 10)
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "loops": {}},
               folder / "foreign.ckpt")
    torch.save({"state_dict": {}, "surgery": {"version": 99}}, folder / "future.ckpt")
    (folder / "broken.yaml").write_text("model: [unclosed\n")
    (folder / "typo.yaml").write_text("model:\n  hidden: [4]\n  surgerie:\n    max_epochs: 3\n")
    np.savez(folder / "keys.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4, dtype=int))
    x, y = np.zeros((4, 3)), np.zeros(4, dtype=int)
    np.savez(folder / "nan.npz", x_train=x + np.nan, y_train=y, x_val=x, y_val=y)
    sweep = yaml.safe_load((ROOT / "sweeps" / "digits.yaml").read_text())
    sweep["base"] = DIGITS
    (folder / "sampler.yaml").write_text(
        yaml.safe_dump({**sweep, "sampler": {"name": "FancySampler"}}))
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return {p.name: str(p) for p in folder.iterdir()}


def _fit(*args):
    return ("train", ["fit", "--config", DIGITS, *SHORT, *args])


# (id, command, its arguments ({name} is a file of _inputs), what the message must say)
CASES = [
    ("unknown key", *_fit("--model.surgery.no_such_setting=1"), "no_such_setting"),
    ("bad setting", *_fit("--model.surgery.epoch_step=0"),
     "epoch_step=0 is invalid: an integer >= 1"),
    ("bad choice", *_fit("--model.surgery.ranking=best"),  # checked by jsonargparse (Literal)
     "Expected a typing.Literal['modest', 'bottleneck', 'paper']. Got value: best"),
    ("schedule", *_fit("--model.surgery.initial_epochs=5"),
     "max_epochs=2 is invalid: an integer >= initial_epochs (5)"),
    ("threshold", *_fit("--model.surgery.sv_threshold_rel=2"),
     "sv_threshold_rel=2.0 is invalid: a number in [0, 1]"),
    ("wrong type", *_fit("--model.hidden=abc"), 'Parser key "model.hidden"'),
    ("zero width", *_fit("--model.hidden=[0]"), "layer width must be a positive integer, got 0"),
    ("activation", *_fit("--model.activation=swish"),
     "unknown activation 'swish'; allowed: ['gelu', 'leaky_relu', 'linear'"),
    ("dataset", *_fit("--data.dataset=imagenet"),
     "unknown dataset 'imagenet'; choose one of digits, fashion_mnist"),
    ("batch size", *_fit("--data.batch_size=0"), "batch_size must be an integer >= 1, got 0"),
    ("val fraction", *_fit("--data.val_fraction=1.5"), "val_fraction must be in (0, 1), got 1.5"),
    ("no config", "train", ["fit", "--config", "{nothing.yaml}"], "File does not exist"),
    ("broken yaml", "train", ["fit", "--config", "{broken.yaml}"],
     "Problems parsing config: while parsing a flow sequence"),
    ("typo in config", "train", ["fit", "--config", "{typo.yaml}"], "surgerie"),
    ("missing files", *_fit("--data.dataset=mnist", "--data.data_dir={empty}",
                            "--data.download=false"), "train-images-idx3-ubyte"),
    ("no npz", *_fit("--data.dataset=npz", "--data.npz_path={nothing.npz}"), "npz: no file at"),
    ("npz keys", *_fit("--data.dataset=npz", "--data.npz_path={keys.npz}"),
     "missing key(s) x_val, y_val"),
    ("npz values", *_fit("--data.dataset=npz", "--data.npz_path={nan.npz}"),
     "x_train must be finite numbers"),
    ("garbage ckpt", *_fit("--ckpt_path={garbage.ckpt}"), "is not a readable checkpoint"),
    ("missing ckpt", *_fit("--ckpt_path={nothing.ckpt}"), "nothing.ckpt': no such file"),
    ("foreign ckpt", *_fit("--ckpt_path={foreign.ckpt}"), "not written by lit_surgery"),
    ("future ckpt", *_fit("--ckpt_path={future.ckpt}"),
     "surgery state version 99; this lit_surgery reads version 1"),
    ("test garbage", "train", ["test", "--config", DIGITS, "--ckpt_path={garbage.ckpt}"],
     "is not a readable checkpoint"),
    ("sampler", "lit", ["tune", "{sampler.yaml}", "--out-dir={out}"],
     "unknown sampler 'FancySampler'; choose one of"),
    ("no sweep", "lit", ["tune", "{nothing.yaml}", "--out-dir={out}"], "cannot read sweep file"),
    ("bad --set", "lit", ["tune", "{sweep.yaml}", "--set", "data.batch_size"],
     "--set 'data.batch_size': expected KEY=VALUE"),
    ("negative trials", "lit", ["tune", "{sweep.yaml}", "--n-trials=-1", "--out-dir={out}"],
     '"n_trials": Not of type NonNegativeInt: -1 does not conform to restriction v>=0'),
    ("zero heartbeat", "lit", ["tune", "{sweep.yaml}", "--heartbeat-interval", "0"],
     '"heartbeat_interval": Not of type PositiveInt: 0 does not conform to restriction v>0'),
    ("tune no sweep", "lit", ["tune", "--check"],
     "the following arguments are required: tune.sweep"),
    ("fit setting", "lit", ["fit", "--config", DIGITS, *SHORT, "--model.surgery.epoch_step=0"],
     "epoch_step=0 is invalid: an integer >= 1"),
    ("tune option", "lit", ["tune", "{sweep.yaml}", "--bogus"], "unrecognized arguments: --bogus"),
    ("plain width", "lit", ["plain", "--hidden", "0"], "layer width must be a positive integer"),
    ("plain schedule", "lit", ["plain", "--max-epochs", "2", "--initial-epochs", "5"],
     "max_epochs=2 is invalid"),
    ("plain optimizer", "lit", ["plain", "--optimizer", "rmsprop"],
     "argument --optimizer: invalid choice: 'rmsprop'"),
    ("command", "lit", ["fitt"], "invalid choice: 'fitt' (choose from 'fit', 'validate', "
     "'test', 'predict', 'tune', 'plain')"),
]
PROGS = {"train": "train.py", "lit": "lit-surgery"}


def _written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize(("command", "args", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, command, args,
                                            message):
    files = _inputs(tmp_path / "in")
    files["out"] = str(tmp_path / "run" / "out")

    def path(match: re.Match) -> str:  # {name}: a file of _inputs, else one that is not there
        return files.get(match.group(1), str(tmp_path / "in" / match.group(1)))

    args = [re.sub(r"\{([^}]+)\}", path, a) for a in args]
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    monkeypatch.delenv("LIT_SURGERY_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        (train_main if command == "train" else cli.main)(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]  # before it, at most Lightning's own start-up notes
    known = args[0] if args[0] in cli.COMMANDS else None  # the command, as the user typed it
    assert line.startswith(" ".join(filter(None, (PROGS[command], known))) + ": error: "), err
    assert message in line
    assert "Traceback" not in "\n".join(err)
    assert _written(run) == []  # no config, log, checkpoint, study or export


def test_the_status_and_the_traceback_from_a_real_process(tmp_path):
    """As a user sees it: exit status 2 and one line; with --debug, the traceback."""
    argv = [sys.executable, str(ROOT / "train.py"), "fit", "--config", DIGITS,
            "--model.surgery.epoch_step=0"]
    env = {k: v for k, v in os.environ.items() if k != "LIT_SURGERY_DEBUG"}
    plain = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines()[-1] == (
        "train.py fit: error: epoch_step=0 is invalid: an integer >= 1")
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([*argv, "--debug"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "SettingsError: epoch_step=0 is invalid" in debug.stderr


def test_debug_environment_raises_the_error_itself(tmp_path, monkeypatch):
    from lit_surgery.core.settings import SettingsError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIT_SURGERY_DEBUG", "1")
    with pytest.raises(SettingsError, match="epoch_step=0 is invalid"):
        train_main(["fit", "--config", DIGITS, "--model.surgery.epoch_step=0"])
    with pytest.raises(SettingsError, match="max_epochs=2 is invalid"):
        cli.main(["plain", "--max-epochs", "2", "--initial-epochs", "5"])
