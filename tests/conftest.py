"""Shared fixtures. Real servers come from the simulator's launcher (simulator.pytest_plugin):
throwaway PostgreSQL and MariaDB processes started by the tests, never the machine's
services."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mysql.connector
import psycopg
import pytest
from hypothesis import HealthCheck, settings

import resilient_db
from resilient_db import _deadline
from resilient_db.plugins import dev
from simulator.local import LocalServer

pytest_plugins = ["simulator.pytest_plugin", "chaos.pytest_plugin"]

# Hypothesis' per-example deadline and too-slow health check are timing asserts: on a loaded
# CI machine they fail tests whose logic is right (CONVENTIONS.md: speed goals live in
# benchmarks). Properties still run their full number of examples.
settings.register_profile(
    "resilient_db", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("resilient_db")

_names = itertools.count()


@dataclass
class Backend:
    """One driver against one real server, as the tests use it."""

    name: str  # "pg" | "mysql"
    target: Callable[..., Any]
    kwargs: dict[str, Any]
    server: LocalServer
    unique_violation: type[BaseException]
    operational_error: type[BaseException]

    def raw(self, **extra: Any) -> Any:
        """A plain driver connection (no resilient_db), for set-up and cross-checks."""
        return self.target(**{**self.kwargs, **extra})

    def connect(self, conninfo: str = "", **extra: Any) -> resilient_db.ConnectionProxy:
        """Through resilient_db; no plugins unless ``plugins=`` says (``plugins=None``: the
        default list)."""
        extra.setdefault("plugins", "")
        return resilient_db.connect(self.target, conninfo, **{**self.kwargs, **extra})

    def table(self) -> str:
        """A fresh table name with (id int primary key, v text)."""
        name = f"t_{self.name}_{next(_names)}"
        conn = self.raw(autocommit=True)
        try:
            cur = conn.cursor()
            cur.execute(f"CREATE TABLE {name} (id int primary key, v varchar(50))")
            cur.close()
        finally:
            conn.close()
        return name


@pytest.fixture(scope="session")
def pg_backend(pg_server: LocalServer) -> Backend:
    return Backend("pg", psycopg.Connection.connect, pg_server.connect_kwargs(), pg_server,
                   psycopg.errors.UniqueViolation, psycopg.OperationalError)


@pytest.fixture(scope="session")
def mysql_backend(mysql_server: LocalServer) -> Backend:
    return Backend("mysql", mysql.connector.connect,
                   {**mysql_server.connect_kwargs(), "use_pure": True}, mysql_server,
                   mysql.connector.errors.IntegrityError, mysql.connector.errors.OperationalError)


@pytest.fixture(params=["pg", "mysql"])
def backend(request: pytest.FixtureRequest) -> Backend:
    fixture: Backend = request.getfixturevalue(f"{request.param}_backend")
    return fixture


@pytest.fixture(scope="module", autouse=True)
def _stop_monitors() -> Iterator[None]:
    """No background work a module's tests started (monitor threads and their sessions)
    outlives the module."""
    yield
    resilient_db.shutdown()


@pytest.fixture(autouse=True)
def _disarm_dev_plugin() -> Iterator[None]:
    yield
    dev.reset()


@pytest.fixture(autouse=True)
def _forget_per_call_deadlines() -> Iterator[None]:
    """call_options(timeout=...) puts the deadline stage into every connection from then on
    (process-wide, one-way); each test starts as a process that has not used it."""
    yield
    _deadline.reset_per_call()


@pytest.fixture
def sink() -> Iterator[resilient_db.CollectingSink]:
    collecting = resilient_db.CollectingSink()
    old = resilient_db.set_decision_sink(collecting)
    try:
        yield collecting
    finally:
        resilient_db.set_decision_sink(old)
