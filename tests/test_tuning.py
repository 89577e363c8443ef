"""``lit-surgery tune``: Optuna studies of surgery settings on digits with tiny schedules.

SQLite and in-memory storages in this process; a real PostgreSQL server (started by ``make
test`` through ``.ci/postgres.sh``, URL in ``LIT_SURGERY_TEST_POSTGRES``) for several worker
processes on one study and a worker killed mid-trial.
"""

import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import psycopg
import pytest
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from test_reporting import _wandb_records

from lit_surgery import cli
from lit_surgery.errors import UsageError
from lit_surgery.tune import storage as storages
from lit_surgery.tune import study as tuning
from lit_surgery.tune.sweep import Heartbeat, load_sweep
from lit_surgery.tune.trials import check_sweep

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
    return cli.tune(cli.build_parser().parse_args(["tune", *argv]).tune)


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
    cli.main(
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


def test_an_accuracy_only_study_with_a_size_budget_never_exceeds_it(tmp_path):
    """model.surgery.max_params: no branch of any trial (screened, trained or the winner) has
    more parameters, though the search asks for accuracy alone (no size penalty). The start,
    64-[4]-10, has 310; AN x20 alone would make 1,810."""
    budget = 600
    sweep = write_sweep(
        tmp_path / "b.yaml",
        overrides={**SHORT, "model.surgery.max_epochs": 6, "model.surgery.max_params": budget,
                   "model.surgery.size_penalty": 0.0, "model.surgery.add_multiplier": 10},
        params={"model.optimizer.init_args.lr": PARAMS["model.optimizer.init_args.lr"]},
    )
    study = tune(str(sweep), "--storage", "memory", "--out-dir", str(tmp_path), "--n-trials", "2")
    assert states(study) == ["COMPLETE"] * 2
    sizes = []
    for trial in study.trials:
        assert trial.user_attrs["num_params"] <= budget
        history = json.loads((Path(trial.user_attrs["run_dir"]) / "history.json").read_text())
        sizes += [node["num_params"] for node in history["genealogy"].values()]
    assert len(sizes) > 2 and max(sizes) <= budget and max(sizes) > 310  # it did grow


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
def test_a_bad_sweep_file_fails_before_any_trial(tmp_path, capsys, changes, message):
    sweep = write_sweep(tmp_path / "bad.yaml", **changes)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tune", str(sweep), "--out-dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lit-surgery tune: error: ") and message in line
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
    assert cli.parse_sets(["data.batch_size=16", "model.hidden=[4, 4]", "a.b=x=y"]) == {
        "data.batch_size": 16,
        "model.hidden": [4, 4],
        "a.b": "x=y",
    }
    for item in ("data.batch_size", "=3"):
        with pytest.raises(UsageError, match="expected KEY=VALUE"):
            cli.parse_sets([item])


# --------------------------------------------------------------------------------------
# Workers that start together; a killed worker's trial


class PyMySQLError(Exception):
    """PyMySQL's and mysqlclient's errors: ``args`` is ``(errno, message)``."""


class ConnectorError(Exception):
    """mysql-connector's and MariaDB Connector/Python's errors: an ``errno`` attribute."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno, self.sqlstate = errno, "23000" if errno == 1062 else "42S01"


class Psycopg2Error(Exception):
    """psycopg2's errors: a ``pgcode`` attribute."""

    def __init__(self, pgcode: str) -> None:
        super().__init__(f"error {pgcode}")
        self.pgcode = pgcode


def sqlite_error(*statements: str) -> Exception:
    """The error that SQLite itself raises for the last of ``statements``."""
    connection = sqlite3.connect(":memory:")
    try:
        for statement in statements:
            connection.execute(statement)
    except sqlite3.Error as err:
        return err
    finally:
        connection.close()
    raise AssertionError("no error")


def dbapi(orig: Exception) -> DBAPIError:
    """``orig`` as SQLAlchemy raises it."""
    return DBAPIError.instance("CREATE TABLE studies ...", {}, orig, type(orig))


def storage_error(orig: Exception) -> Exception:
    """``orig`` as Optuna re-raises it from a session's commit."""
    try:
        raise optuna.exceptions.StorageInternalError("commit failed") from dbapi(orig)
    except optuna.exceptions.StorageInternalError as err:
        return err


TABLE = "CREATE TABLE studies (study_id INTEGER PRIMARY KEY)"
RACES = {
    "pg duplicate type": dbapi(psycopg.errors.DuplicateObject('type "studydirection" exists')),
    "pg duplicate table": dbapi(psycopg.errors.DuplicateTable('relation "studies" exists')),
    "pg catalogue row": dbapi(psycopg.errors.UniqueViolation("pg_type_typname_nsp_index")),
    "psycopg2 duplicate type": dbapi(Psycopg2Error("42710")),
    "mysql table exists": dbapi(PyMySQLError(1050, "Table 'studies' already exists")),
    "mysql duplicate row": dbapi(PyMySQLError(1062, "Duplicate entry 'v3.2.0.a'")),
    "connector duplicate row": dbapi(ConnectorError(1062, "Duplicate entry '1'")),
    "sqlite table exists": dbapi(sqlite_error(TABLE, TABLE)),
    "sqlite duplicate row": dbapi(
        sqlite_error(TABLE, "INSERT INTO studies VALUES (1)", "INSERT INTO studies VALUES (1)")
    ),
    "under optuna's error": storage_error(PyMySQLError(1050, "Table 'trials' already exists")),
}
NOT_RACES = {
    "pg undefined table": dbapi(psycopg.errors.UndefinedTable('relation "trials" does not exist')),
    "pg foreign key": dbapi(psycopg.errors.ForeignKeyViolation("trial 7 is not present")),
    "pg cannot connect": dbapi(psycopg.OperationalError("connection refused")),
    "psycopg2 check": dbapi(Psycopg2Error("23514")),
    "mysql no such table": dbapi(PyMySQLError(1146, "Table 'optuna.trials' doesn't exist")),
    "mysql deadlock": dbapi(PyMySQLError(1213, "Deadlock found")),
    "connector access denied": dbapi(ConnectorError(1045, "Access denied")),
    "sqlite no such table": dbapi(sqlite_error("SELECT * FROM trials")),
    "sqlite check": dbapi(
        sqlite_error("CREATE TABLE v (id INTEGER CHECK (id = 1))", "INSERT INTO v VALUES (2)")
    ),
    "not a database error": ValueError("Table 'studies' already exists"),
}


@pytest.mark.parametrize("err", RACES.values(), ids=RACES.keys())
def test_schema_creation_races_are_retried(err):
    assert storages.is_creation_race(err)


@pytest.mark.parametrize("err", NOT_RACES.values(), ids=NOT_RACES.keys())
def test_other_database_errors_are_not_retried(err):
    assert not storages.is_creation_race(err)


def test_creation_is_retried_while_another_worker_is_first(monkeypatch):
    calls = []

    def create(fails: int, err: Exception):
        def attempt():
            calls.append(err)
            if len(calls) <= fails:
                raise err
            return "storage"

        calls.clear()
        return attempt

    race, other = RACES["pg duplicate type"], NOT_RACES["pg undefined table"]
    assert storages.create_with_retries(create(2, race)) == "storage" and len(calls) == 3
    with pytest.raises(DBAPIError) as raised:
        storages.create_with_retries(create(1, other))
    assert raised.value is other and len(calls) == 1
    monkeypatch.setattr(storages, "CREATE_ATTEMPTS", 3)
    with pytest.raises(DBAPIError):  # bounded: the last attempt's error
        storages.create_with_retries(create(3, race))
    assert len(calls) == 3


def open_together(url: str, sweep_path: Path, workers: int = 4) -> list[str]:
    """``workers`` threads, each with its own connections, open the storage and the study
    at the same moment; returns the study names they got."""
    sweep = load_sweep(sweep_path)
    barrier = threading.Barrier(workers)

    def open_() -> str:
        barrier.wait()
        storage = storages.open_storage(url, Heartbeat(interval=1, grace_period=3))
        return tuning.open_study(sweep, storage, "race").study_name

    with ThreadPoolExecutor(workers) as pool:
        return [f.result() for f in [pool.submit(open_) for _ in range(workers)]]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_workers_opening_one_new_sqlite_file_together(tmp_path):
    # without the retries, some fail in every round: "table ... already exists", or a
    # unique violation on alembic_version
    sweep = write_sweep(tmp_path / "s.yaml")
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'race-{attempt}.db'}"
        assert open_together(url, sweep) == ["race"] * 4
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["race"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_worker_at_the_target_stays_to_run_a_dead_workers_retry(tmp_path):
    """The study is at its target (1), but the trial that makes it so belongs to a worker
    that died after its first heartbeat. The next worker waits until that trial is stale,
    fails it, and runs its retry before it exits."""
    url = f"sqlite:///{tmp_path / 'dead.db'}"
    sweep = write_sweep(tmp_path / "d.yaml", n_trials=1)
    beat = Heartbeat(interval=1, grace_period=1, max_retry=1)
    storage = storages.open_storage(url, beat)
    trial = tuning.open_study(load_sweep(sweep), storage, "d").ask()
    lr = trial.suggest_float("model.optimizer.init_args.lr", 0.01, 0.1, log=True)
    storage.record_heartbeat(trial._trial_id)  # then no more: its worker died
    flags = ["--heartbeat-interval", "1", "--grace-period", "1", "--max-retry", "1"]
    study = tune(
        str(sweep), "--storage", url, "--study-name", "d", "--out-dir", str(tmp_path), *flags
    )
    failed, retry = study.trials
    assert failed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert retry.params["model.optimizer.init_args.lr"] == lr


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


@pytest.fixture
def new_database(postgres_url):
    """Makes empty databases on the test server (``CREATE DATABASE``), dropped afterwards."""
    names = []

    def new() -> str:
        names.append(f"race_{uuid.uuid4().hex[:12]}")
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {names[-1]}")
        return make_url(postgres_url).set(database=names[-1]).render_as_string(False)

    yield new
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        for name in names:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


SPAWNER = """
import contextlib, json, multiprocessing, os, sys, time
import matplotlib
matplotlib.use("Agg")
import alembic.script, matplotlib.pyplot, optuna.visualization.matplotlib, psycopg
import sklearn.datasets, sqlalchemy.dialects.postgresql.psycopg, wandb
import lit_surgery.tune.study  # the slow imports: once, before the workers fork
from lit_surgery import cli
from lit_surgery.tune.trials import check_sweep
from lit_surgery.tune.sweep import load_sweep

with contextlib.redirect_stdout(sys.stderr):  # stdout answers the test
    check_sweep(load_sweep(sys.argv[1]))  # the first parsing of a config is slow too

def worker(start, argv, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    time.sleep(max(0.0, start - time.time()))
    cli.main(argv)

fork = multiprocessing.get_context("fork")
for line in sys.stdin:
    start, jobs = json.loads(line)
    workers = [fork.Process(target=worker, args=(start, *job)) for job in jobs]
    for w in workers:
        w.start()
    print(json.dumps([w.pid for w in workers]), flush=True)
    for w in workers:
        w.join()
    print(json.dumps([w.exitcode for w in workers]), flush=True)
"""


def read_line(spawner: subprocess.Popen, timeout: float = 180) -> list:
    ready, _, _ = select.select([spawner.stdout], [], [], timeout)
    assert ready, f"no answer from the workers within {timeout} s"
    return json.loads(spawner.stdout.readline())


WORKERS, TARGET, ROUNDS, KILL_ROUND = 4, 6, 5, 2


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_workers_started_together_on_new_databases(new_database, tmp_path):
    """4 ``lit-surgery tune`` processes start at one instant on an empty PostgreSQL database,
    5 times; in one round a worker is killed (SIGKILL) during its trial. The workers fork
    from one process that has imported everything, each sleeps until the round's start
    time, then runs the command: the schema, the study and the first trials are created
    at the same moment."""
    sweep = write_sweep(
        tmp_path / "race.yaml",
        n_trials=TARGET,
        overrides={**SHORT, "report.plots": False},  # W&B and plots cost time, test nothing here
        wandb={"project": "test-tune", "offline": False},
    )
    flags = ["--heartbeat-interval", "1", "--grace-period", "3", "--max-retry", "1"]
    slow = ["--set", "model.surgery.max_epochs=9999", "--set", "model.surgery.initial_epochs=9999"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    spawner = subprocess.Popen(
        [sys.executable, "-c", SPAWNER, str(sweep)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its process group: the spawner and its workers
    )
    try:
        for round_ in range(ROUNDS):
            url, out = new_database(), tmp_path / f"round-{round_}"
            jobs = [
                (
                    ["tune", str(sweep), "--storage", url, "--out-dir", str(out)]
                    + ["--sampler-seed", str(i), *flags]
                    + (slow if round_ == KILL_ROUND and i == 0 else []),
                    str(tmp_path / f"round-{round_}-worker-{i}.log"),
                )
                for i in range(WORKERS)
            ]
            spawner.stdin.write(json.dumps([time.time() + 0.5, jobs]) + "\n")
            spawner.stdin.flush()
            pids = read_line(spawner)
            killed = kill_in_trial(url, pids[0]) if round_ == KILL_ROUND else None
            codes = read_line(spawner)
            logs = {i: Path(log).read_text()[-3000:] for i, (_, log) in enumerate(jobs)}
            expected = [0] * WORKERS if killed is None else [-signal.SIGKILL] + [0] * (WORKERS - 1)
            assert codes == expected, logs
            check_round(url, out, killed)
    finally:
        spawner.stdin.close()
        try:
            spawner.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a round failed: stop its workers too
            os.killpg(spawner.pid, signal.SIGKILL)
            spawner.wait()


def kill_in_trial(url: str, pid: int) -> int:
    """SIGKILL worker ``pid`` during its (long) trial once the study holds its target number
    of trials: no worker starts a new trial after that, so only workers that stay at the
    target can fail the dead worker's trial and run its retry. Returns the trial's number."""
    storage = storages.open_storage(url, Heartbeat())  # as the workers create the schema
    deadline = time.monotonic() + 120
    worker = f"{socket.gethostname()}:{pid}"
    while True:
        assert time.monotonic() < deadline, "the study did not reach its target"
        try:
            trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
        except KeyError:  # no study yet
            trials = []
        mine = [
            t.number
            for t in trials
            if t.state == TrialState.RUNNING and t.user_attrs.get("worker") == worker
        ]
        if mine and len(trials) >= TARGET:
            break
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return mine[0]


def check_round(url: str, out: Path, killed: int | None) -> None:
    trials = {t.number: t for t in optuna.load_study(study_name="tiny", storage=url).trials}
    assert sorted(trials) == list(range(len(trials)))  # each number once
    retried = {
        n: RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for n, t in trials.items()
    }
    retries = [trials[n] for n, of in retried.items() if of is not None]
    # the target, or a little more: workers that finish together may each start one more
    # trial, and a retry that starts after the target adds one
    assert TARGET <= len(trials) <= TARGET + WORKERS - 1 + len(retries)
    if killed is None:
        assert not retries
    else:
        assert trials[killed].state == TrialState.FAIL
        (retry,) = retries
        assert retried[retry.number] == killed and retry.params == trials[killed].params
    done = [t for t in trials.values() if t.number != killed]
    assert all(t.state == TrialState.COMPLETE for t in done)
    assert len({t.user_attrs["worker"] for t in done}) >= 2  # the workers shared the study
    for t in done:
        assert (out / "tiny" / f"trial-{t.number:04d}" / "config.yaml").is_file()
