"""Where a study lives: an Optuna storage opened safely by many workers at once.

A local SQLite file by default, any RDB URL (PostgreSQL, MySQL) for several workers on one
study, ``memory`` for a throwaway one. RDB storages run heartbeats, so a worker killed
mid-trial does not leave its trial running forever (and, with ``max_retry``, the trial is
queued again).

Workers may start together on an empty database: creating Optuna's schema there is a race
that all but one worker lose with "already exists" or a unique violation, so the storage is
opened again after a short random pause while that is the error (:func:`open_storage`).
"""

from __future__ import annotations

import importlib.util
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from sqlalchemy.exc import DBAPIError

from lit_surgery.tune.sweep import Heartbeat

MEMORY_URLS = ("memory", "sqlite://", "sqlite:///:memory:")
T = TypeVar("T")

RACE_SQLSTATES = frozenset({"42710", "42P07", "23505"})
"""PostgreSQL: duplicate_object (``CREATE TYPE``), duplicate_table, unique_violation (a
catalogue row such as ``pg_type``'s, when the other worker has not committed yet, or
``alembic_version``'s row)."""
RACE_MYSQL_ERRORS = frozenset({1050, 1062})
"""MySQL and MariaDB: ER_TABLE_EXISTS_ERROR, ER_DUP_ENTRY."""
RACE_SQLITE_ERRORS = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})
"""SQLite's unique violations. Its "table ... already exists" has no code of its own: it is
SQLITE_ERROR, or SQLITE_SCHEMA when the other worker's table appeared during the statement."""
CREATE_ATTEMPTS = 20
_jitter = random.Random()  # not the global generator, which trials seed


def default_storage(out_dir: Path, study_name: str) -> str:
    return f"sqlite:///{out_dir / (study_name + '.db')}"


def is_creation_race(err: BaseException) -> bool:
    """Whether ``err`` (or the error it was raised from) says that another worker created
    the same table, type or row first: creating Optuna's schema on an empty database checks
    for each table, then creates it, so workers that start together collide."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, DBAPIError):
        cause = cause.__cause__
    if cause is None:
        return False
    orig = cause.orig
    # psycopg 3 names it sqlstate, psycopg2 pgcode
    if (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) in RACE_SQLSTATES:
        return True
    # mysql-connector and MariaDB's connector name it errno, PyMySQL and mysqlclient args[0]
    errno = getattr(orig, "errno", None)
    if errno is None and orig.args and isinstance(orig.args[0], int):
        errno = orig.args[0]
    if errno in RACE_MYSQL_ERRORS:
        return True
    name = getattr(orig, "sqlite_errorname", None)
    if name in ("SQLITE_ERROR", "SQLITE_SCHEMA"):
        return "already exists" in str(orig)
    return name in RACE_SQLITE_ERRORS


def create_with_retries(create: Callable[[], T]) -> T:
    """``create()``, called again after a short random pause (growing, at most 1 s) while it
    fails with :func:`is_creation_race`: each such failure means that another worker got
    further, so a few attempts suffice; the last of ``CREATE_ATTEMPTS`` raises."""
    for attempt in range(1, CREATE_ATTEMPTS):
        try:
            return create()
        except Exception as err:
            if not is_creation_race(err):
                raise
        time.sleep(_jitter.uniform(0.0, min(1.0, 0.05 * 2**attempt)))
    return create()


def open_storage(url: str, heartbeat: Heartbeat) -> BaseStorage:
    """An Optuna storage for ``url``; RDB storages get heartbeats (and retries), so a worker
    killed mid-trial does not leave a trial running forever. Creating the tables is safe
    while other workers do the same (:func:`create_with_retries`)."""
    if url in MEMORY_URLS:
        return InMemoryStorage()
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is not None:
        # psycopg 3 (the dev extra): SQLAlchemy 2.1's default driver, named for 2.0's sake
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        engine = {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = (
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=heartbeat.max_retry)
            if heartbeat.max_retry
            else None
        )
        return create_with_retries(
            lambda: RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat.interval,
                grace_period=heartbeat.grace_period,
                heartbeat_stale_trial_callback=retry,
            )
        )
