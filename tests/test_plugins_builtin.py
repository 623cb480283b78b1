"""The shipped plugins (connect_time, execute_time, dev) against real servers."""

from __future__ import annotations

import logging

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import Op
from resilient_db.plugins import dev

from .conftest import Backend

pytestmark = pytest.mark.real_server

SLEEP = {"pg": "SELECT pg_sleep(0.05)", "mysql": "SELECT SLEEP(0.05)"}


def test_connect_time_records_and_logs(backend: Backend, sink: resilient_db.CollectingSink,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_db.plugins.connect_time")
    conn = backend.connect(plugins="connect_time")
    stats = conn.resilient.plugin("connect_time").stats
    assert stats.count == 1
    assert stats.failures == 0
    assert stats.last is not None and 0 < stats.last < 30
    [decision] = sink.of_kind("connect.timed")
    assert decision.plugin == "connect_time"
    assert decision.attributes["server.address"] == backend.kwargs["host"]
    assert decision.attributes["success"] is True
    assert "succeeded" in caplog.text
    conn.close()


def test_connect_time_slow_threshold_warns(backend: Backend,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_db.plugins.connect_time")
    backend.connect(plugins="connect_time", connect_time_slow_threshold=1e-6).close()
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_execute_time_counts_statements(backend: Backend, sink: resilient_db.CollectingSink,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_db.plugins.execute_time")
    conn = backend.connect(plugins="execute_time", execute_time_slow_threshold=0.02)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    cur.execute(SLEEP[backend.name])
    cur.fetchall()
    with pytest.raises((psycopg.errors.UndefinedTable, mysql.connector.errors.ProgrammingError)):
        cur.execute("SELECT * FROM no_such_table")
    conn.rollback()
    stats = conn.resilient.plugin("execute_time").stats
    assert stats.count == 4  # three executes and the rollback; fetches are not intercepted
    assert stats.failures == 1
    assert stats.slowest >= 0.04
    assert "Cursor.execute took" in caplog.text
    timed = sink.of_kind("statement.timed")
    assert [d.attributes["db.operation.name"] for d in timed] == [
        "Cursor.execute", "Cursor.execute", "Cursor.execute", "Connection.rollback"]
    conn.close()


def test_dev_raises_on_next_connect(backend: Backend, sink: resilient_db.CollectingSink) -> None:
    dev.raise_on_next_connect(backend.operational_error("simulated: connection refused"))
    with pytest.raises(backend.operational_error, match="simulated"):
        backend.connect(plugins="dev")
    assert sink.of_kind("dev.fault_injected")[0].attributes["phase"] == "connect"
    backend.connect(plugins="dev").close()  # fires once


def test_dev_raises_on_next_execute_once(backend: Backend) -> None:
    conn = backend.connect(plugins="dev,execute_time", autocommit=True)
    other = backend.connect(plugins="dev", autocommit=True)
    cur = conn.cursor()
    dev.raise_on_next_execute(backend.operational_error("simulated network failure"),
                              connection=conn, ops=[Op.EXECUTE])
    other.cursor().execute("SELECT 1")  # another connection: not affected
    with pytest.raises(backend.operational_error, match="simulated network failure"):
        cur.execute("SELECT 1")
    cur.execute("SELECT 1")  # fired once
    assert cur.fetchone() == (1,)
    # execute_time is outside dev: it saw the injected failure as a failed statement.
    assert conn.resilient.plugin("execute_time").stats.failures == 1
    conn.close()
    other.close()


def test_dev_execute_callback_and_op_filter(backend: Backend) -> None:
    conn = backend.connect(plugins="dev")
    dev.raise_on_next_execute(RuntimeError("commit fault"), ops=[Op.COMMIT])
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    with pytest.raises(RuntimeError, match="commit fault"):
        conn.commit()
    seen: list[str] = []

    def callback(call: resilient_db.Call) -> BaseException | None:
        seen.append(call.method)
        return ValueError("nope") if "SELECT 2" in str(call.args[0]) else None

    dev.set_execute_callback(callback)
    cur.execute("SELECT 1")
    cur.fetchall()
    with pytest.raises(ValueError, match="nope"):
        cur.execute("SELECT 2")
    assert seen == ["Cursor.execute", "Cursor.execute"]
    dev.reset()
    cur.execute("SELECT 2")
    cur.fetchall()
    conn.close()


def test_dev_rejects_non_exceptions() -> None:
    with pytest.raises(TypeError, match="exception"):
        dev.raise_on_next_execute("boom")  # type: ignore[arg-type]


def test_dev_is_dormant_until_armed(backend: Backend) -> None:
    conn = backend.connect(plugins="dev")
    chains = conn.resilient.pipeline.chains
    assert chains.execute is None  # nothing armed: the dev plugin costs nothing
    dev.raise_on_next_execute(RuntimeError("armed"), connection=conn)
    assert chains.execute is not None
    with pytest.raises(RuntimeError, match="armed"):
        conn.cursor().execute("SELECT 1")
    assert chains.execute is None  # the last fault fired: dormant again
    conn.close()
