"""``lit-surgery tune``: Optuna studies of surgery settings on digits with tiny schedules.

SQLite and in-memory storages in this process; a real PostgreSQL server (started by ``make
test`` through ``.ci/postgres.sh``, URL in ``LIT_SURGERY_TEST_POSTGRES``) for several worker
processes on one study and a worker killed mid-trial.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from rich.console import Console
from test_reporting import _wandb_records

from lit_surgery import cli, tuning
from lit_surgery.lightning_cli import main as train_main
from lit_surgery.sweep import SweepError, check_sweep, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SHORT = {
    "model.surgery.max_epochs": 4,
    "model.surgery.initial_epochs": 2,
    "model.surgery.epoch_step": 2,
}
PARAMS = {
    "model.optimizer.init_args.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
    "model.surgery.sv_threshold_abs": {"type": "float", "low": 0.1, "high": 0.5},
    "model.surgery.screen_batches.AN": {"type": "int", "low": 1, "high": 4},
    "model.surgery.include_random": {"type": "categorical", "choices": [True, False]},
}


def write_sweep(path: Path, **changes) -> Path:
    """A sweep of 1-2 s trials: digits, 4 epochs, one generation."""
    sweep = {
        "name": "tiny",
        "base": str(ROOT / "configs" / "digits.yaml"),
        "overrides": dict(SHORT),
        "n_trials": 3,
        "seed": 0,
        "objectives": [{"metric": "val_acc", "direction": "maximize"}],
        "sampler": {"name": "RandomSampler"},
        "wandb": {"project": "test-tune"},
        "params": dict(PARAMS),
    }
    sweep.update(changes)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def tune(*argv: str) -> optuna.Study:
    """``lit-surgery tune ARGV`` in this process, returning the study."""
    tuning._quiet()
    return tuning.run(tuning.build_parser().parse_args(list(argv)), Console(soft_wrap=True))


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in sorted(study.get_trials(), key=lambda t: t.number)]


def offline_run(trial_dir: Path):
    """The W&B offline run of a trial: (group, display name, config keys)."""
    (wandb_file,) = trial_dir.glob("wandb/offline-run-*/*.wandb")
    for record in _wandb_records(wandb_file):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            keys = {item.key: item.value_json for item in run.config.update}
            return run.run_group, run.display_name, keys
    raise AssertionError("no run record")


# --------------------------------------------------------------------------------------
# SQLite: resume, export, W&B


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory):
    """A 3-trial study in the default storage (``runs/tune/tiny.db`` under the working
    directory): 2 trials, then a second invocation that resumes it to the sweep's 3."""
    tmp = tmp_path_factory.mktemp("study")
    sweep = write_sweep(tmp / "tiny.yaml")
    outputs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        for argv in (["--n-trials", "2"], [], ["--export", "best.yaml"]):
            start = time.perf_counter()
            cli.main(["tune", str(sweep), *argv])
            outputs.append(time.perf_counter() - start)
    storage = f"sqlite:///{tmp / 'runs' / 'tune' / 'tiny.db'}"
    return tmp, optuna.load_study(study_name="tiny", storage=storage), outputs


def test_sqlite_study_resumes_in_a_second_invocation(digits_study, capsys):
    tmp, study, _ = digits_study
    assert (tmp / "runs" / "tune" / "tiny.db").is_file()  # the default storage
    assert states(study) == ["COMPLETE"] * 3  # 2, then resumed to the sweep's n_trials
    for trial in study.trials:
        attrs = trial.user_attrs
        assert attrs["seed"] == trial.number  # the sweep's seed 0 plus the trial number
        assert attrs["config"]["model"]["seed"] == trial.number
        assert attrs["topology"].startswith("64-[") and attrs["num_params"] > 0
        assert trial.value == attrs["val_acc"]
        # the validation accuracy after every epoch, for the pruner
        assert sorted(trial.intermediate_values) == [0, 1, 2, 3]
        assert (
            tmp / "runs" / "tune" / "tiny" / f"trial-{trial.number:04d}" / "config.yaml"
        ).is_file()
    assert (tmp / "runs" / "tune" / "tiny" / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_export_alone_runs_no_trial(digits_study, monkeypatch):
    tmp, _, _ = digits_study
    sweep = write_sweep(tmp / "more.yaml", n_trials=10)  # the study is below this target
    monkeypatch.chdir(tmp)
    study = tune(str(sweep), "--export", "again.yaml")
    assert len(study.trials) == 3 and (tmp / "again.yaml").is_file()


def test_each_trial_is_a_wandb_run_in_the_study_group(digits_study):
    tmp, study, _ = digits_study
    for trial in study.trials:
        group, name, config = offline_run(
            tmp / "runs" / "tune" / "tiny" / f"trial-{trial.number:04d}"
        )
        assert group == "tiny" and name == f"tiny-trial-{trial.number}"
        for key, value in trial.params.items():
            assert yaml.safe_load(config[key]) == value
        assert config["optuna/trial"] == str(trial.number)


def test_third_invocation_runs_nothing_and_exports_the_best(digits_study):
    tmp, study, _ = digits_study
    assert len(study.trials) == 3  # the target was reached: nothing more ran
    exported = yaml.safe_load((tmp / "best.yaml").read_text())
    best = study.best_trial
    assert exported == best.user_attrs["config"]
    assert (
        exported["model"]["optimizer"]["init_args"]["lr"]
        == best.params["model.optimizer.init_args.lr"]
    )
    assert (
        exported["model"]["surgery"]["screen_batches"]["AN"]
        == best.params["model.surgery.screen_batches.AN"]
    )
    assert exported["model"]["surgery"]["max_epochs"] == 4  # the sweep's overrides


def test_exported_config_trains_and_reproduces_the_trial(
    digits_study, tmp_path, capsys, monkeypatch
):
    tmp, study, _ = digits_study
    monkeypatch.chdir(tmp_path)
    train_main(
        [
            "fit",
            "--config",
            str(tmp / "best.yaml"),
            "--trainer.logger=CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    out = capsys.readouterr().out
    best = study.best_trial.user_attrs
    assert f"final topology: {best['topology']} " in out
    assert f"params={best['num_params']}" in out
    assert f"test accuracy: {best['test_acc']:.4f}" in out


# --------------------------------------------------------------------------------------
# Failures, pruning, several objectives


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    real = tuning.fit_trial
    calls = []

    def flaky(config, *args, **kwargs):
        calls.append(config)
        if len(calls) == 2:
            raise RuntimeError("out of luck in trial 1")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(tuning, "fit_trial", flaky)
    sweep = write_sweep(tmp_path / "s.yaml")
    study = tune(str(sweep), "--storage", "memory", "--out-dir", str(tmp_path))
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: out of luck in trial 1"


def test_the_pruner_stops_a_bad_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'p.db'}"
    sweep = write_sweep(
        tmp_path / "p.yaml",
        overrides={**SHORT, "model.surgery.max_epochs": 6},
        params={
            "model.optimizer.init_args.lr": PARAMS["model.optimizer.init_args.lr"] | {"low": 1e-5}
        },
        pruner={"name": "MedianPruner", "n_startup_trials": 1, "n_warmup_steps": 1},
    )
    study = optuna.create_study(storage=storage, study_name="p", direction="maximize")
    study.enqueue_trial({"model.optimizer.init_args.lr": 0.05})  # learns
    study.enqueue_trial({"model.optimizer.init_args.lr": 1e-5})  # barely moves
    study = tune(
        str(sweep),
        "--storage",
        storage,
        "--study-name",
        "p",
        "--n-trials",
        "2",
        "--out-dir",
        str(tmp_path),
    )
    good, bad = study.trials
    # every epoch reported (retried generations add epochs to the schedule's 6)
    assert good.state == TrialState.COMPLETE and len(good.intermediate_values) >= 6
    assert bad.state == TrialState.PRUNED
    assert max(bad.intermediate_values) < 5  # stopped before the schedule's end
    # its W&B run was closed, marked as pruned
    group, _, _ = offline_run(tmp_path / "p" / "trial-0001")
    assert group == "p"


def test_multi_objective_study_prints_and_plots_the_pareto_front(tmp_path, capsys):
    sweep = write_sweep(
        tmp_path / "m.yaml",
        name="m",
        objectives=[
            {"metric": "val_acc", "direction": "maximize"},
            {"metric": "num_params", "direction": "minimize"},
        ],
        sampler={"name": "NSGAIISampler", "population_size": 4},
        params={**PARAMS, "model.hidden": {"type": "categorical", "choices": [[4], [12]]}},
    )
    study = tune(
        str(sweep),
        "--storage",
        "memory",
        "--out-dir",
        str(tmp_path),
        "--total-trials",
        "3",
        "--export",
        str(tmp_path / "point.yaml"),
        "--trial",
        "0",
    )
    out = capsys.readouterr().out
    front = study.best_trials
    assert front and all(t.state == TrialState.COMPLETE for t in front)
    assert "Pareto front (val_acc vs num_params)" in out
    for trial in front:
        assert trial.values[1] == trial.user_attrs["num_params"]
        assert trial.user_attrs["topology"] in out
    assert (tmp_path / "m" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # a list-valued choice reaches the config as a list
    exported = yaml.safe_load((tmp_path / "point.yaml").read_text())
    assert exported["model"]["hidden"] in ([4], [12])
    assert exported == study.trials[0].user_attrs["config"]


# --------------------------------------------------------------------------------------
# Bad sweep files: a clear error before any trial


BAD = [
    (
        {
            "params": {
                **PARAMS,
                "model.surgery.no_such_setting": {"type": "float", "low": 0, "high": 1},
            }
        },
        "unknown parameter 'model.surgery.no_such_setting'",
    ),
    (
        {"params": {"model.optimizer.init_args.lrr": {"type": "float", "low": 0.1, "high": 1}}},
        "unknown parameter 'model.optimizer.init_args.lrr'",
    ),
    (
        {"params": {"model.surgery.sv_threshold_abs": {"type": "float", "low": 0.5, "high": 0.5}}},
        "empty range low=0.5 >= high=0.5",
    ),
    (
        {"params": {"model.surgery.epoch_step": {"type": "int", "low": 4, "high": 2}}},
        "empty range low=4 >= high=2",
    ),
    ({"params": {}}, "'params' (the search space) is empty"),
    ({"sampler": {"name": "FancySampler"}}, "unknown sampler 'FancySampler'; choose one of"),
    (
        {"sampler": {"name": "TPESampler", "n_startup_trial": 3}},
        "sampler TPESampler with {'n_startup_trial': 3}",
    ),
    ({"pruner": {"name": "EarlyPruner"}}, "unknown pruner 'EarlyPruner'"),
    (
        {"objectives": [{"metric": "val_acc", "direction": "maximise"}]},
        "unknown direction 'maximise'; choose one of maximize, minimize",
    ),
    (
        {"objectives": [{"metric": "test_acc", "direction": "maximize"}]},
        "unknown objective metric 'test_acc'",
    ),
    (
        {
            "objectives": [
                {"metric": "val_acc", "direction": "maximize"},
                {"metric": "num_params", "direction": "minimize"},
            ],
            "pruner": {"name": "MedianPruner"},
        },
        "a pruner needs a single objective",
    ),
    (
        {"params": {"model.surgery.sv_threshold_rel": {"type": "float", "low": 0.1, "high": 2.0}}},
        "parameter 'model.surgery.sv_threshold_rel': 2.0 is not a valid value: "
        "sv_threshold_rel=2.0 is invalid",
    ),
    (
        {"params": {"model.surgery.screen_batches.XX": {"type": "int", "low": 1, "high": 3}}},
        "parameter 'model.surgery.screen_batches.XX'",
    ),
    (
        {"params": {"model.surgery.add_fraction": {"type": "uniform", "low": 0.1, "high": 1}}},
        "unknown type 'uniform'",
    ),
    ({"sampler": {"name": "GridSampler"}}, "GridSampler needs a finite grid"),
    ({"trials": 3}, "unknown keys ['trials']"),
    ({"base": "no/such/config.yaml"}, "cannot read base config"),
]


@pytest.mark.parametrize(("changes", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_a_bad_sweep_file_fails_before_any_trial(tmp_path, changes, message):
    sweep = write_sweep(tmp_path / "bad.yaml", **changes)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tune", str(sweep), "--out-dir", str(tmp_path / "out")])
    assert message in str(exit_.value)
    assert str(exit_.value).startswith("lit-surgery tune: ")
    assert not (tmp_path / "out").exists()  # no storage, no trial folder


@pytest.mark.parametrize("name", ["digits", "digits_pareto", "fashion_mnist"])
def test_shipped_sweeps_are_valid(name):
    sweep = load_sweep(ROOT / "sweeps" / f"{name}.yaml")
    check_sweep(sweep)
    names = {p.name for p in sweep.params}
    if name != "digits_pareto":
        for key in (
            "sv_threshold_abs",
            "sv_threshold_rel",
            "add_fraction",
            "epoch_step",
            "parallel_branches",
            "include_random",
            "screen_batches.AN",
            "screen_batches.OL",
            "type_weights.AN",
            "type_weights.T",
        ):
            assert f"model.surgery.{key}" in names
        assert "model.optimizer.init_args.lr" in names


def test_set_overrides_and_bad_set(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml"), {"data.batch_size": 16})
    assert sweep.overrides["data.batch_size"] == 16
    with pytest.raises(SweepError, match="expected KEY=VALUE"):
        tuning._parse_sets(["data.batch_size"])


# --------------------------------------------------------------------------------------
# PostgreSQL: several workers, a killed worker


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get("LIT_SURGERY_TEST_POSTGRES")
    if not url:
        message = (
            "LIT_SURGERY_TEST_POSTGRES is not set: `make test` starts a server "
            "(.ci/postgres.sh); by hand: export LIT_SURGERY_TEST_POSTGRES=$(make -s "
            "postgres)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


def worker(tmp_path: Path, name: str, *argv: str, log: str) -> subprocess.Popen:
    """``python -m lit_surgery.cli tune ...`` in its own process, output to a log file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = open(tmp_path / log, "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lit_surgery.cli",
            "tune",
            *argv,
            "--study-name",
            name,
            "--out-dir",
            str(tmp_path / "runs"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def wait(process: subprocess.Popen, tmp_path: Path, log: str, timeout: float = 240) -> None:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert code == 0, (tmp_path / log).read_text()[-3000:]


def test_two_workers_share_one_postgres_study(postgres_url, tmp_path):
    name = f"workers-{uuid.uuid4().hex[:8]}"
    sweep = write_sweep(tmp_path / "w.yaml", n_trials=8)
    procs = [
        worker(
            tmp_path,
            name,
            str(sweep),
            "--storage",
            postgres_url,
            "--sampler-seed",
            str(seed),
            log=f"w{seed}.log",
        )
        for seed in (1, 2)
    ]
    for seed, proc in zip((1, 2), procs, strict=True):
        wait(proc, tmp_path, f"w{seed}.log")
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials()
    numbers = sorted(t.number for t in trials)
    # every trial exactly once: numbers unique and contiguous, each finished by one worker
    assert numbers == list(range(len(trials)))
    assert 8 <= len(trials) <= 9  # the target; a race may start one more, never lose one
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2  # both processes did trials
    for t in trials:
        assert (tmp_path / "runs" / name / f"trial-{t.number:04d}" / "config.yaml").is_file()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_killed_worker_leaves_its_trial_failed_and_the_study_finishes(postgres_url, tmp_path):
    name = f"kill-{uuid.uuid4().hex[:8]}"
    sweep = write_sweep(tmp_path / "k.yaml", n_trials=4)
    beat = ["--heartbeat-interval", "1", "--grace-period", "3", "--max-retry", "1"]
    # this worker's trials are long (400 epochs): it is killed during its first one
    slow = worker(
        tmp_path,
        name,
        str(sweep),
        "--storage",
        postgres_url,
        *beat,
        "--set",
        "model.surgery.max_epochs=400",
        "--set",
        "model.surgery.initial_epochs=400",
        log="slow.log",
    )
    deadline = time.monotonic() + 120
    while True:
        assert slow.poll() is None, (tmp_path / "slow.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial started"
        try:
            study = optuna.load_study(study_name=name, storage=postgres_url)
            running = study.get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study does not exist yet
            running = []
        if running:
            break
        time.sleep(0.5)
    time.sleep(2)  # well into training (and its heartbeats)
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    killed = running[0].number
    time.sleep(4)  # past the grace period: its trial is stale now
    fast = worker(tmp_path, name, str(sweep), "--storage", postgres_url, *beat, log="fast.log")
    wait(fast, tmp_path, "fast.log")

    trials = {
        t.number: t for t in optuna.load_study(study_name=name, storage=postgres_url).get_trials()
    }
    assert sorted(trials) == list(range(4))  # the study finished at its target
    assert trials[killed].state == TrialState.FAIL
    retries = [
        t
        for t in trials.values()
        if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed
    ]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == trials[killed].params
    others = [t for n, t in trials.items() if n != killed]
    assert all(t.state == TrialState.COMPLETE for t in others)
