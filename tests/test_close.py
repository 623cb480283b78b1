"""``close()`` is final: after the application closes a connection, every use of it raises the
driver's own "connection is closed" error (the same type and message the bare driver raises)
and no plugin ever opens a new server session for it, whatever the plugins (failover, the
connection tracker after a writer change, initial_connection, stale_dns, efm). A connection
the *server* closed (a killed backend) is not a user close: it still fails over.

Real servers: simulated Aurora PostgreSQL and the Aurora MySQL look-alike on MariaDB; server
sessions are counted in ``pg_stat_activity`` / ``information_schema.processlist``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import efm_monitor, topology
from simulator.cluster import Cluster, Timeline

pytestmark = pytest.mark.real_server

TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)
SETTLE_TIMEOUT = 30.0
CYCLES = 20

#: Every plugin set that can open a physical connection after the initial one.
PLUGIN_SETS = [
    "failover",
    "aurora_connection_tracker,failover",
    "initial_connection,failover",
    "stale_dns,failover",
    "efm,failover",
    None,  # the default list: aurora_connection_tracker,failover,efm
]


def wait_until(what: str, check: Callable[[], bool], timeout: float = SETTLE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(0.05)


@dataclass
class Env:
    name: str  # "pg" | "mysql"
    cluster: Cluster
    target: Callable[..., Any]
    extra: dict[str, Any]

    def kwargs(self) -> dict[str, Any]:
        return {**self.cluster.connect_kwargs(self.cluster.writer.endpoint), **self.extra,
                "connect_timeout": 5}

    def connect(self, plugins: str | None, **extra: Any) -> resilient_db.ConnectionProxy:
        args: dict[str, Any] = {"autocommit": True, **self.kwargs(), **extra}
        if plugins is not None:
            args["plugins"] = plugins
        return resilient_db.connect(self.target, **args)

    def raw(self) -> Any:
        """A bare driver connection (no resilient_db)."""
        args = {**self.kwargs(), "autocommit": True}
        args.pop("aurora_mysql_lookalike_schema", None)
        if self.name == "mysql":
            args["connection_timeout"] = args.pop("connect_timeout")
        return self.target(**args)

    def app_sessions(self) -> int:
        """The application user's sessions on every running instance, minus resilient_db's
        own monitoring sessions (PostgreSQL: by application name; MariaDB, which cannot tell
        them apart: by the ids of this process's monitor connections)."""
        monitors = {m._conn for m in topology.monitors()} | {m._conn for m in
                                                              efm_monitor.monitors()}
        ids = (getattr(c, "connection_id", None) for c in monitors)  # mysql-connector's
        own = {int(ident) for ident in ids if ident is not None}
        total = 0
        for instance in self.cluster.instances.values():
            if instance.role == "stopped":
                continue
            with self.cluster.superuser(instance.id) as conn:
                cur = conn.cursor()
                if self.name == "pg":
                    cur.execute(
                        "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE usename = %s "
                        "AND application_name NOT IN (%s, %s)",
                        (self.kwargs()["user"], topology.MONITOR_APPLICATION_NAME,
                         efm_monitor.PROBE_APPLICATION_NAME))
                    total += int(cur.fetchone()[0])
                else:
                    cur.execute("SELECT id FROM information_schema.processlist WHERE user = %s",
                                (self.kwargs()["user"],))
                    total += sum(1 for (ident,) in cur.fetchall() if int(ident) not in own)
        return total

    def backend_id(self, conn: Any) -> int:
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()" if self.name == "pg" else "SELECT CONNECTION_ID()")
        value = int(cur.fetchone()[0])
        cur.close()
        return value

    def kill(self, backend: int) -> None:
        with self.cluster.superuser() as conn:
            cur = conn.cursor()
            cur.execute(f"SELECT pg_terminate_backend({backend})" if self.name == "pg"
                        else f"KILL {backend}")


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Cluster]:
    with Cluster.start("aurora-pg", readers=1, timeline=TIMELINE) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def mysql_cluster() -> Iterator[Cluster]:
    with Cluster.start("aurora-mysql", readers=1, timeline=TIMELINE) as cluster:
        yield cluster


@pytest.fixture(params=["pg", "mysql"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    if request.param == "pg":
        environment = Env("pg", request.getfixturevalue("pg_cluster"),
                          psycopg.Connection.connect, {})
    else:
        environment = Env("mysql", request.getfixturevalue("mysql_cluster"),
                          mysql.connector.connect,
                          {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"})
    cluster = environment.cluster
    wait_until("every instance back in a role",
               lambda: all(i.role != "stopped" for i in cluster.instances.values()))
    wait_until("readers following the writer", cluster.settled)
    yield environment


# --- what "use after close" means, per driver ------------------------------------------------

Use = Callable[[Any, Any], Any]  # (connection, a cursor opened before close) -> anything


def _transaction(conn: Any, cur: Any) -> None:
    with conn.transaction():
        pass


def _pipeline(conn: Any, cur: Any) -> None:
    with conn.pipeline():
        pass


COMMON_USES: dict[str, Use] = {
    "cursor()": lambda conn, cur: conn.cursor(),
    "cursor.execute": lambda conn, cur: cur.execute("SELECT 1"),
    "commit": lambda conn, cur: conn.commit(),
    "rollback": lambda conn, cur: conn.rollback(),
    "fetch": lambda conn, cur: cur.fetchall(),  # rows were read before close()
}
PG_USES: dict[str, Use] = {
    "connection.execute": lambda conn, cur: conn.execute("SELECT 1"),
    "transaction()": _transaction,
    "pipeline()": _pipeline,
}
MYSQL_USES: dict[str, Use] = {
    "cmd_query": lambda conn, cur: conn.cmd_query("SELECT 1"),
    "start_transaction": lambda conn, cur: conn.start_transaction(),
}


def uses(env: Env) -> dict[str, Use]:
    return {**COMMON_USES, **(PG_USES if env.name == "pg" else MYSQL_USES)}


def driver_outcome(use: Use, conn: Any, cur: Any) -> tuple[type[BaseException], str] | None:
    """What ``use`` raises (type, message), or ``None`` when it returns."""
    try:
        use(conn, cur)
    except Exception as exc:
        return type(exc), str(exc)
    return None


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("plugins", PLUGIN_SETS, ids=lambda p: p or "default")
def test_a_closed_connection_raises_the_drivers_error_and_never_reconnects(
        env: Env, plugins: str | None) -> None:
    # What the bare driver does after close() is the reference: same type, same message.
    bare = env.raw()
    bare_cur = bare.cursor()
    bare_cur.execute("SELECT 1")
    bare_cur.fetchall()
    bare.close()
    expected = {name: driver_outcome(use, bare, bare_cur) for name, use in uses(env).items()}
    # Every call that would talk to the server raises (a fetch of rows already read may not).
    assert all(outcome is not None for name, outcome in expected.items() if name != "fetch"), \
        expected

    keep = env.connect(plugins)  # keeps the cluster's monitors alive and busy meanwhile
    keep.cursor().execute("SELECT 1")
    baseline = env.app_sessions()
    kept: list[Any] = []
    wrong: list[str] = []
    for _ in range(CYCLES):
        conn = env.connect(plugins)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        cur.fetchall()
        raw = conn.resilient.raw
        conn.close()
        for name, use in uses(env).items():
            got = driver_outcome(use, conn, cur)
            if got != expected[name]:
                wrong.append(f"{name} after close(): {got!r}, not {expected[name]!r}")
        if conn.resilient.raw is not raw:
            wrong.append("close() was undone by a reconnect")
        kept.append(conn)  # a leaked session would stay open while its proxy lives
    # Sessions first: they show the leak even when the errors above also went wrong.
    wait_until(f"no more application sessions than before ({baseline}) after {CYCLES} "
               "close-then-use cycles", lambda: env.app_sessions() <= baseline, timeout=10)
    assert not wrong, "\n".join(sorted(set(wrong)))
    for conn in kept:
        conn.close()  # a second close is fine
    keep.close()


def test_the_tracker_does_not_move_a_closed_connection_after_a_writer_change(env: Env) -> None:
    plugins = "aurora_connection_tracker,failover"
    bare = env.raw()
    bare_cur = bare.cursor()
    bare.close()
    expected = driver_outcome(COMMON_USES["cursor.execute"], bare, bare_cur)

    closed = env.connect(plugins)
    # Open before the failover, on the same endpoint: it shares the cluster's topology
    # monitor and keeps it reading after ``closed`` let go of it (a monitor stops reading
    # with its last open connection), so that ``closed`` learns of the writer change.
    watcher = env.connect(plugins, topology_refresh_ms=200)
    cur = closed.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    raw = closed.resilient.raw
    closed.close()
    env.cluster.failover()
    failover = closed.resilient.plugin("failover")
    wait_until("the monitor saw the new writer", lambda: failover.stale)
    baseline = env.app_sessions()
    for _ in range(CYCLES):
        assert driver_outcome(COMMON_USES["cursor.execute"], closed, cur) == expected
    assert closed.resilient.raw is raw
    wait_until(f"no more application sessions than before ({baseline})",
               lambda: env.app_sessions() <= baseline, timeout=10)
    watcher.close()


@pytest.mark.parametrize("plugins", ["failover", None], ids=["failover", "default"])
def test_a_connection_the_server_closed_still_fails_over(env: Env, plugins: str | None) -> None:
    conn = env.connect(plugins)
    try:
        cur = conn.cursor()
        old = env.backend_id(conn)
        env.kill(old)
        time.sleep(0.2)
        with pytest.raises(resilient_db.FailoverSuccessError):
            cur.execute("SELECT 1")
            cur.fetchall()
        assert env.backend_id(conn) != old
    finally:
        with contextlib.suppress(Exception):
            conn.close()
