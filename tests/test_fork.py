"""``fork()``: a child process starts its own background work lazily (watchdog, topology and
failure monitors) and never touches the parent's sessions; connections it inherited raise
``ForkedConnectionError`` and send nothing.

Real ``os.fork()`` in the test process (the child reports through a pipe and is killed after a
hard timeout, so a broken child can never hang the suite), and a script run as a subprocess
for the child's full interpreter exit. Real servers: a throwaway PostgreSQL / MariaDB, and a
simulated Aurora cluster for failover."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import efm_monitor, topology, watchdog
from resilient_db._open_counts import open_counts
from resilient_db.efm_monitor import HostMonitor
from simulator.cluster import Cluster, Timeline
from tests.conftest import Backend

pytestmark = pytest.mark.real_server

ROOT = Path(__file__).resolve().parent.parent
#: Hard limit for one child (a broken child is killed, and the test fails, after this).
CHILD_TIMEOUT = 120.0
#: efm settings that make the monitor probe during a statement of a second or more.
EFM: dict[str, Any] = {"failure_detection_time_ms": 300, "failure_detection_interval_ms": 200,
       "failure_detection_count": 3}


def in_child(body: Callable[[], dict[str, Any]], timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
    """Run ``body`` in a forked child and return what it returned (JSON through a pipe). The
    child is SIGKILLed after ``timeout`` seconds and the test fails."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        os.close(read_fd)
        code = 0
        try:
            result = body()
        except BaseException as exc:  # everything is reported to the parent
            result = {"crash": repr(exc), "traceback": traceback.format_exc()}
            code = 1
        try:
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(write_fd, data):]
        finally:
            os._exit(code)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the child did not finish within {timeout:g} s")
            ready, _, _ = select.select([read_fd], [], [], remaining)
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                raise AssertionError(f"the child did not exit within {timeout:g} s")
            time.sleep(0.01)
        pid = 0
    finally:
        os.close(read_fd)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    report: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    assert "crash" not in report, report.get("traceback", report)
    return report


def session_id(name: str, raw: Any) -> int:
    """The server's id of a driver connection's session."""
    return int(raw.info.backend_pid) if name == "pg" else int(raw.connection_id)


def session_alive(backend: Backend, ident: int) -> bool:
    conn = backend.raw(autocommit=True)
    try:
        cur = conn.cursor()
        if backend.name == "pg":
            cur.execute("SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid = %s",
                        (ident,))
        else:
            cur.execute("SELECT count(*) FROM information_schema.processlist WHERE id = %s",
                        (ident,))
        return int(cur.fetchone()[0]) == 1
    finally:
        conn.close()


def sleep_sql(backend: Backend, seconds: float) -> str:
    return (f"SELECT pg_catalog.pg_sleep({seconds})" if backend.name == "pg"
            else f"SELECT SLEEP({seconds})")


def run(conn: Any, sql: str) -> list[Any]:
    cur = conn.cursor()
    cur.execute(sql)
    rows = list(cur.fetchall())
    cur.close()
    return rows


def wait_for_probe(timeout: float = 30.0) -> HostMonitor:
    deadline = time.monotonic() + timeout
    while True:
        monitors = [m for m in efm_monitor.monitors() if m.connection_open]
        if monitors:
            return monitors[0]
        if time.monotonic() > deadline:
            raise AssertionError("no efm probe connection")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _stop_background_work() -> Iterator[None]:
    yield
    resilient_db.shutdown()


# --- deadlines ----------------------------------------------------------------------------------


def test_deadlines_work_in_a_child(backend: Backend) -> None:
    parent = backend.connect(socket_timeout=1, autocommit=True)
    run(parent, "SELECT 1")
    assert watchdog.get_watchdog().thread is not None  # the parent's watchdog runs

    def child() -> dict[str, Any]:
        conn = backend.connect(socket_timeout=1, autocommit=True)
        started = time.monotonic()
        try:
            run(conn, sleep_sql(backend, 10))
            error = None
        except Exception as exc:
            error = type(exc).__name__
            is_timeout = isinstance(exc, resilient_db.QueryTimeoutError)
        else:
            is_timeout = False
        return {"error": error, "timeout": is_timeout, "elapsed": time.monotonic() - started}

    result = in_child(child)
    assert result["timeout"], f"the statement deadline did not fire in the child: {result}"
    assert result["elapsed"] < 8.0, result  # a 1 s deadline on a 10 s statement
    assert run(parent, "SELECT 1") == [(1,)]  # and the parent's connection is untouched
    parent.close()


def test_locks_held_by_other_threads_at_fork_time_do_not_block_the_child(
        backend: Backend) -> None:
    """A parent thread inside resilient_db at the moment of fork() (here: holding the monitor
    registries' and the watchdog's locks) does not exist in the child; its locks must not stay
    held there."""
    parent = backend.connect(plugins="failover,efm", socket_timeout=5, autocommit=True, **EFM)
    run(parent, "SELECT 1")
    locks = [topology._registry.lock, efm_monitor._registry.lock,
             watchdog.get_watchdog()._lock]
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        for lock in locks:
            lock.acquire()
        holding.set()
        release.wait()
        for lock in reversed(locks):
            lock.release()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(10)

    def child() -> dict[str, Any]:
        conn = backend.connect(plugins="failover,efm", socket_timeout=5, autocommit=True,
                               **EFM)
        rows = run(conn, "SELECT 1")
        conn.close()
        resilient_db.shutdown()
        return {"rows": [list(r) for r in rows]}

    try:
        result = in_child(child, timeout=60)
    finally:
        release.set()
        holder.join(10)
    assert result["rows"] == [[1]]
    parent.close()


# --- failover -----------------------------------------------------------------------------------

TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)


@pytest.fixture(scope="module", params=["pg", "mysql"])
def cluster_env(request: pytest.FixtureRequest) -> Iterator[tuple[str, Cluster, Any,
                                                                  dict[str, Any]]]:
    if request.param == "pg":
        with Cluster.start("aurora-pg", readers=1, timeline=TIMELINE) as cluster:
            yield "pg", cluster, psycopg.Connection.connect, {}
    else:
        with Cluster.start("aurora-mysql", readers=1, timeline=TIMELINE) as cluster:
            yield "mysql", cluster, mysql.connector.connect, {
                "use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"}


def test_failover_works_in_a_child(cluster_env: tuple[str, Cluster, Any, dict[str, Any]]) -> None:
    name, cluster, target, extra = cluster_env
    kwargs = {**cluster.connect_kwargs(cluster.writer.endpoint), **extra, "autocommit": True,
              "connect_timeout": 5, "plugins": "failover", "failover_timeout_sec": 60}
    parent = resilient_db.connect(target, **kwargs)
    run(parent, "SELECT 1")
    assert any(m.running for m in topology.monitors())  # the parent's monitor runs
    sql = "SELECT pg_backend_pid()" if name == "pg" else "SELECT CONNECTION_ID()"

    def child() -> dict[str, Any]:
        conn = resilient_db.connect(target, **kwargs)
        backend = int(run(conn, sql)[0][0])
        with cluster.superuser() as su:
            cur = su.cursor()
            cur.execute(f"SELECT pg_terminate_backend({backend})" if name == "pg"
                        else f"KILL {backend}")
        time.sleep(0.2)
        started = time.monotonic()
        # mysql-connector notices the loss in cursor(), which fails over without an error
        # (nothing was sent); psycopg at the statement: FailoverSuccessError.
        try:
            run(conn, "SELECT 1")
            error = None
        except Exception as exc:
            error = type(exc).__name__
            success = isinstance(exc, resilient_db.FailoverSuccessError)
        else:
            success = True
        elapsed = time.monotonic() - started
        after = int(run(conn, sql)[0][0])
        return {"error": error, "success": success, "elapsed": elapsed,
                "moved": after != backend}

    result = in_child(child)
    assert result["success"] and result["moved"], result
    assert result["elapsed"] < 30.0, result  # failover_timeout_sec is 60
    assert run(parent, "SELECT 1") == [(1,)]
    parent.close()


# --- the parent's sessions ----------------------------------------------------------------------


def test_a_child_never_touches_the_parents_sessions(backend: Backend) -> None:
    """The child uses and closes a connection it inherited (a clear error, nothing sent), stops
    its own background work: the parent's connection and its efm probe session live on, and
    the parent's monitor still probes."""
    parent = backend.connect(plugins="efm", autocommit=True, **EFM)
    run(parent, "SELECT 1")
    monitor = wait_for_probe()
    probe = session_id(backend.name, monitor._conn)
    app = session_id(backend.name, parent.resilient.raw)

    def child() -> dict[str, Any]:
        counts = [sum(open_counts().values())]  # the parent's connection is not the child's
        errors: list[list[Any] | None] = []
        for use in (lambda: parent.cursor().execute("SELECT 1"), parent.commit,
                    lambda: run(parent, "SELECT 1")):
            try:
                use()
                errors.append(None)
            except Exception as exc:
                errors.append([isinstance(exc, resilient_db.ForkedConnectionError),
                               isinstance(exc, backend.operational_error), str(exc)])
        parent.close()  # allowed, and sends nothing
        own = backend.connect(plugins="efm", autocommit=True, **EFM)
        counts.append(sum(open_counts().values()))
        run(own, sleep_sql(backend, 0.8))  # the child's own monitor probes
        own.close()
        counts.append(sum(open_counts().values()))
        resilient_db.shutdown()
        return {"errors": errors, "counts": counts}

    result = in_child(child)
    for error in result["errors"]:
        assert error is not None and error[0] and error[1], result
    assert "fork()" in result["errors"][0][2]
    # least_connections' input in the child: its own connections only, and closing the
    # inherited one does not take a seat from them
    assert result["counts"] == [0, 1, 0], result
    assert sum(open_counts().values()) == 1  # the parent's count is untouched
    assert session_alive(backend, probe), "the child killed the parent's efm probe session"
    assert session_alive(backend, app), "the child killed the parent's connection"
    before = monitor.probes_ok
    run(parent, sleep_sql(backend, 1.5))  # long enough for the parent's monitor to probe
    assert monitor.probes_ok > before and monitor._conn is not None
    assert session_id(backend.name, monitor._conn) == probe
    assert session_id(backend.name, parent.resilient.raw) == app
    parent.close()


CHILD_EXIT_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import mysql.connector, psycopg
    import resilient_db
    from resilient_db import efm_monitor

    name, kwargs, efm = json.loads(sys.argv[1])
    target = psycopg.Connection.connect if name == "pg" else mysql.connector.connect

    def ident(raw):
        return raw.info.backend_pid if name == "pg" else raw.connection_id

    def run(conn, sql):
        cur = conn.cursor()
        cur.execute(sql)
        return cur.fetchall()

    parent = resilient_db.connect(target, plugins="efm", autocommit=True, **kwargs, **efm)
    run(parent, "SELECT 1")
    while not any(m.connection_open for m in efm_monitor.monitors()):
        time.sleep(0.05)
    monitor = efm_monitor.monitors()[0]
    probe, app = ident(monitor._conn), ident(parent.resilient.raw)
    pid = os.fork()
    if pid == 0:
        # The child opens its own monitored connection and simply exits: atexit runs
        # resilient_db.shutdown() and the interpreter's finalization collects everything it
        # inherited (the parent's connection and monitor included).
        own = resilient_db.connect(target, plugins="efm", autocommit=True, **kwargs, **efm)
        run(own, "SELECT 1")
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    before = monitor.probes_ok
    sleep = "SELECT pg_sleep(1.5)" if name == "pg" else "SELECT SLEEP(1.5)"
    run(parent, sleep)
    print(json.dumps({"status": status, "probe": probe, "app": app,
                      "probe_after": ident(monitor._conn) if monitor._conn else None,
                      "app_after": ident(parent.resilient.raw),
                      "probed": monitor.probes_ok > before}))
    parent.close()
""")


def test_a_childs_exit_leaves_the_parents_sessions_alone(backend: Backend) -> None:
    kwargs = dict(backend.kwargs)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_EXIT_SCRIPT, json.dumps([backend.name, kwargs, EFM])],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group: a hung child is killed with it
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"the script did not finish within {CHILD_TIMEOUT:g} s") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == 0, err
    assert report["app_after"] == report["app"], f"the parent's connection was replaced: {err}"
    assert report["probe_after"] == report["probe"], f"the parent's probe session died: {err}"
    assert report["probed"], report
