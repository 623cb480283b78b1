"""The psycopg_pool integration (resilient_db.integrations.psycopg_pool): input checks, and on
a real PostgreSQL server and a simulated Aurora PostgreSQL cluster, checkout and return,
``check()``, a writer crash in the middle of a checkout, eviction of the connections opened
before the writer changed, six threads writing through a writer crash with nothing lost, and
``close()`` releasing the monitors."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

import resilient_db
from resilient_db import efm_monitor, topology
from resilient_db._pipeline import CLOSED
from resilient_db.integrations import psycopg_pool as integration
from resilient_db.integrations.psycopg_pool import (
    AsyncPooledConnection,
    PooledConnection,
    ResilientAsyncConnectionPool,
    ResilientConnectionPool,
)
from simulator.cluster import Cluster, Timeline
from simulator.local import LocalServer

from .aio import run, until
from .clusters import SharedCluster, settle_roles
from .waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)
INSTANCE_SQL = "SELECT pg_catalog.aurora_db_instance_identifier()"
BACKEND_SQL = ("SELECT pg_catalog.inet_server_addr()::text, pg_catalog.inet_server_port(), "
               "pg_catalog.pg_backend_pid()")
RETRYABLE = (resilient_db.FailoverSuccessError, resilient_db.TransactionResolutionUnknownError)


def _conninfo(kwargs: dict[str, Any]) -> str:
    return make_conninfo(**{k: str(v) for k, v in kwargs.items()})


# --- packaging and input checks (no server) --------------------------------------------------


@pytest.mark.unit
def test_pyproject_declares_the_extra() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with (ROOT / "pyproject.toml").open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(r.startswith("psycopg-pool>=3.2") for r in extras["psycopg_pool"])
    assert "psycopg_pool" in extras["dev"][0]


@pytest.mark.unit
def test_the_pool_internals_used_for_eviction_exist() -> None:
    """ResilientConnectionPool evicts through these (as the stock drain() does): an upgrade of
    psycopg_pool that renames them must fail here, not silently stop evicting."""
    from psycopg_pool.pool import AddConnection

    for name in ("_close_connection", "_check_pool_putconn", "run_task", "check_connection"):
        assert callable(getattr(ConnectionPool, name)), name
    pool = ConnectionPool("", open=False)
    assert hasattr(pool, "_lock") and hasattr(pool, "_pool")
    AddConnection(pool)  # the signature the integration calls


#: Bad input either pool refuses: (options, the parameter named, a hint in the message).
BAD_INPUT: list[tuple[dict[str, Any], str, str]] = [
    ({"failovr_timeout_sec": 5}, "failovr_timeout_sec", "failover_timeout_sec"),
    ({"min_szie": 2}, "min_szie", "'min_size'"),
    ({"plugins": "failovr"}, "plugins", "'failover'"),
    ({"failover_timeout_sec": "soon"}, "failover_timeout_sec", "soon"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("options", "parameter", "hint"), [
    *BAD_INPUT,
    ({"connection_class": psycopg.Connection}, "connection_class", "PooledConnection"),
    ({"kwargs": {"failure_detection_time": 1}}, "failure_detection_time",
     "failure_detection_time_ms"),
])
def test_bad_input_names_the_parameter(options: dict[str, Any], parameter: str,
                                       hint: str) -> None:
    """Refused when the pool is built, before any connection is attempted (the host does not
    exist: a connection attempt would fail differently, and only in the pool's log)."""
    _assert_refused(ResilientConnectionPool, options, parameter, hint)


def _assert_refused(pool_class: type[Any], options: dict[str, Any], parameter: str,
                    hint: str) -> None:
    with pytest.raises(resilient_db.ConfigurationError) as info:
        pool_class("host=nowhere.invalid dbname=app", open=False, **options)
    assert info.value.parameter == parameter
    assert hint in str(info.value)


@pytest.mark.unit
def test_good_input_is_split_between_pool_and_connections() -> None:
    pool = ResilientConnectionPool("host=nowhere.invalid dbname=app", plugins="failover",
                                   failover_timeout_sec=5, connect_timeout=3, min_size=1,
                                   max_size=2, open=False, kwargs={"application_name": "a"})
    assert (pool.min_size, pool.max_size) == (1, 2)
    assert pool.connection_class is PooledConnection
    assert pool.kwargs == {"application_name": "a", "failover_timeout_sec": 5,
                           "connect_timeout": 3, "plugins": "failover"}


@pytest.mark.unit
def test_pooled_connection_class_refuses_another_driver() -> None:
    mysql_connector = pytest.importorskip("mysql.connector")
    from resilient_db._connect import open_proxy

    with pytest.raises(resilient_db.ConfigurationError) as info:
        open_proxy(mysql_connector.connect, "", "", {"host": "nowhere.invalid"},
                   PooledConnection)
    assert info.value.parameter == "connection_class"


# --- one real server ---------------------------------------------------------------------------


@pytest.fixture
def server_pool(pg_server: LocalServer) -> Iterator[ResilientConnectionPool]:
    pool = ResilientConnectionPool(_conninfo(pg_server.connect_kwargs()), plugins="",
                                   min_size=2, max_size=2, open=True, timeout=30)
    try:
        pool.wait(timeout=30)
        yield pool
    finally:
        pool.close()


def _backend(conn: Any) -> tuple[Any, ...]:
    row = conn.execute(BACKEND_SQL).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.real_server
def test_checkout_commits_rolls_back_and_returns(server_pool: ResilientConnectionPool,
                                                 pg_server: LocalServer) -> None:
    table = "pool_basic"
    with psycopg.connect(_conninfo(pg_server.connect_kwargs()), autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {table}")
        admin.execute(f"CREATE TABLE {table} (id int primary key)")
    with server_pool.connection() as conn:
        assert isinstance(conn, PooledConnection)
        assert isinstance(conn, resilient_db.ConnectionProxy)
        assert conn.resilient.plugins == ()
        first = _backend(conn)
        conn.execute(f"INSERT INTO {table} VALUES (1)")  # committed by the block
    assert not conn.closed  # back in the pool, open
    with pytest.raises(ZeroDivisionError), server_pool.connection() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (2)")
        raise ZeroDivisionError  # rolled back by the block
    seen = set()
    for _ in range(4):
        with server_pool.connection() as conn:
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            seen.add(_backend(conn))
    assert first in seen and len(seen) == 2  # the same two pooled sessions, reused
    with psycopg.connect(_conninfo(pg_server.connect_kwargs())) as admin:
        assert admin.execute(f"SELECT id FROM {table}").fetchall() == [(1,)]
    stats = server_pool.get_stats()
    assert stats["pool_available"] == 2 and stats.get("connections_lost", 0) == 0


@pytest.mark.real_server
def test_close_returns_gives_the_connection_back(pg_server: LocalServer) -> None:
    with ResilientConnectionPool(_conninfo(pg_server.connect_kwargs()), plugins="",
                                 min_size=1, max_size=1, close_returns=True,
                                 open=True) as pool:
        conn = pool.getconn()
        backend = _backend(conn)
        conn.close()  # returned, not closed
        again = pool.getconn()
        assert again is conn and not again.closed and _backend(again) == backend
        pool.putconn(again)


@pytest.mark.real_server
def test_stock_pool_with_the_connection_class(pg_server: LocalServer) -> None:
    """psycopg_pool's own ConnectionPool hands out resilient_db connections when given
    ``connection_class=PooledConnection``; resilient_db properties go in ``kwargs``."""
    # PooledConnection is a proxy, not a psycopg.Connection subclass: type checkers object to
    # it as the pool's CT (docs/integrations/psycopg_pool.md).
    with ConnectionPool(_conninfo(pg_server.connect_kwargs()),  # type: ignore[type-var]
                        connection_class=PooledConnection,
                        kwargs={"plugins": "execute_time", "application_name": "stock"},
                        min_size=1, max_size=1, open=True) as pool:
        with pool.connection() as conn:
            assert isinstance(conn, PooledConnection)
            assert conn.resilient.plugins == ("execute_time",)
            row = conn.execute("SELECT pg_catalog.current_setting('application_name')")
            assert row.fetchone() == ("stock",)
        pool.check()
        with pool.connection() as again:
            assert again is conn
    assert conn.closed


@pytest.mark.real_server
def test_check_replaces_a_connection_whose_session_was_killed(
        server_pool: ResilientConnectionPool, pg_server: LocalServer) -> None:
    with server_pool.connection() as a, server_pool.connection() as b:
        pids = {_backend(a)[2], _backend(b)[2]}
        victim_conn, victim = a, _backend(a)[2]
    with psycopg.connect(_conninfo(pg_server.connect_kwargs()), autocommit=True) as admin:
        admin.execute("SELECT pg_catalog.pg_terminate_backend(%s)", (victim,))
    server_pool.check()
    # Closed by the pool's check, not only broken: its pipeline told its plugins to let go of
    # their monitors.
    assert victim_conn.resilient.pipeline.state is CLOSED
    wait_until("the pool back to two connections",
               lambda: server_pool.get_stats()["pool_available"] == 2)
    assert server_pool.get_stats()["connections_lost"] == 1
    with server_pool.connection() as a, server_pool.connection() as b:
        now = {_backend(a)[2], _backend(b)[2]}
    assert victim not in now and len(now & pids) == 1


# --- a simulated Aurora PostgreSQL cluster -----------------------------------------------------


@dataclass
class Env:
    cluster: Cluster
    pools: list[ResilientConnectionPool] = field(default_factory=list)

    def pool(self, plugins: str | None = "failover", **options: Any) -> ResilientConnectionPool:
        """An open pool on the cluster (writer) endpoint; ``plugins=None``: the default list."""
        kw = self.cluster.connect_kwargs()
        if plugins is not None:
            options["plugins"] = plugins
        options.setdefault("open", True)
        pool = ResilientConnectionPool(_conninfo(kw), connect_timeout=5, **options)
        self.pools.append(pool)
        pool.wait(timeout=60)
        return pool

    def ids_on_writer(self) -> set[int]:
        with self.cluster.superuser(self.cluster.writer.id) as conn:
            cur = conn.cursor()
            cur.execute("SELECT id FROM pool_items")
            return {int(row[0]) for row in cur.fetchall()}

    def close_pools(self) -> None:
        for pool in self.pools:
            with contextlib.suppress(Exception):
                pool.close()
        self.pools.clear()


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: Cluster.start("aurora-pg", readers=1, timeline=TIMELINE),
                       settle_roles) as shared:
        yield shared


@pytest.fixture
def env(pg_cluster: SharedCluster) -> Iterator[Env]:
    """The module's cluster, settled before and after the test (tests/clusters.py), with an
    empty pool_items table."""
    cluster = pg_cluster.acquire()
    with psycopg.connect(_conninfo(cluster.connect_kwargs()), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pool_items")
        conn.execute("CREATE TABLE pool_items (id int primary key, worker int)")
    wait_until("readers following the writer", cluster.settled)
    environment = Env(cluster)
    yield environment
    environment.close_pools()
    pg_cluster.release()


def promoted(events: list[Any]) -> str:
    return str(next(e.instance for e in events if e.name == "promoted"))


def instance_of(conn: Any) -> str:
    row = conn.execute(INSTANCE_SQL).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.real_server
@pytest.mark.parametrize("in_transaction", [True, False], ids=["transaction", "autocommit"])
def test_writer_crash_mid_checkout(env: Env, in_transaction: bool) -> None:
    """The statement that meets the crash raises the failover outcome (CONVENTIONS: "resolution
    unknown" in a transaction, "success" outside one), both resilient_db's and psycopg's
    OperationalError; the connection then works on the new writer, and every connection the
    pool hands out afterwards does too, with no error."""
    pool = env.pool(min_size=3, max_size=3)
    old = env.cluster.writer.id
    conn = pool.getconn()
    assert instance_of(conn) == old
    conn.commit()
    conn.autocommit = not in_transaction
    conn.execute("INSERT INTO pool_items VALUES (1, 0)")
    new = promoted(env.cluster.failover())
    expected = (resilient_db.TransactionResolutionUnknownError if in_transaction
                else resilient_db.FailoverSuccessError)
    with pytest.raises(expected) as info:
        conn.execute("INSERT INTO pool_items VALUES (2, 0)")
    assert isinstance(info.value, psycopg.OperationalError)
    if in_transaction:
        conn.rollback()
    assert instance_of(conn) == new != old
    conn.rollback()
    conn.autocommit = False
    pool.putconn(conn)  # healthy, on the new writer: kept
    for n in range(3, 9):  # every pooled connection, twice over
        with pool.connection() as c:
            assert instance_of(c) == new
            c.execute("INSERT INTO pool_items VALUES (%s, 0)", (n,))
    stored = env.ids_on_writer()
    assert set(range(3, 9)) <= stored
    assert (1 in stored) is not in_transaction  # committed alone, or lost with its transaction
    # The two connections idle through the crash were evicted (the failover of the first one
    # moved the topology epoch on), and replaced.
    assert pool.evictions == 2
    wait_until("the pool back to three connections",
               lambda: pool.get_stats()["pool_available"] == 3)


@pytest.mark.real_server
@pytest.mark.parametrize("idle_evicted_at", ["checkout", "check"])
def test_connections_opened_before_the_writer_changed_are_evicted(
        env: Env, idle_evicted_at: str, sink: resilient_db.CollectingSink) -> None:
    """Idle in the pool, or checked out and unused, while the writer changes: the pool closes
    them (at return, checkout or check()) and opens new ones; the application gets only
    sessions on the new writer (told by server address and backend pid) and sees no error.
    A short topology refresh lets the monitor see the new writer without a failing
    statement."""
    pool = env.pool(min_size=3, max_size=3, topology_refresh_ms=500)
    held = [pool.getconn() for _ in range(3)]
    old = env.cluster.writer.id
    assert {instance_of(c) for c in held} == {old}
    before = {_backend(c) for c in held}
    for conn in held:
        conn.commit()
    for conn in held[1:]:
        pool.putconn(conn)  # idle in the pool
    kept = held[0]  # checked out across the failover, unused
    new = promoted(env.cluster.failover())
    wait_until("the topology monitor saw the new writer",
               lambda: all(c.stale for c in held), timeout=60)
    pool.putconn(kept)
    assert pool.evictions == 1 and kept.closed
    if idle_evicted_at == "check":
        pool.check()
        assert pool.evictions == 3
    fresh = [pool.getconn() for _ in range(3)]
    try:
        for conn in fresh:
            assert instance_of(conn) == new
            assert _backend(conn) not in before
            assert not conn.stale
    finally:
        for conn in fresh:
            pool.putconn(conn)
    assert pool.evictions == 3
    assert all(c.closed for c in held)
    evicted = [d for d in sink.decisions if d.kind == integration.POOL_EVICTED]
    assert len(evicted) == 3
    assert {d.attributes["resilient_db.instance.id"] for d in evicted} == {old}
    events = sorted(d.attributes["resilient_db.pool.event"] for d in evicted)
    assert events == sorted(["return", idle_evicted_at, idle_evicted_at])


@pytest.mark.real_server
def test_with_the_tracker_connections_are_moved_not_evicted(env: Env) -> None:
    """The default plugin list has aurora_connection_tracker: it moves the pooled connections
    itself, so the pool evicts none, and still every write reaches the new writer."""
    pool = env.pool(plugins=None, min_size=2, max_size=2, topology_refresh_ms=500)
    held = [pool.getconn() for _ in range(2)]
    for conn in held:
        conn.commit()
        pool.putconn(conn)
    failovers = [c.resilient.plugin("failover") for c in held]
    new = promoted(env.cluster.failover())
    wait_until("the topology monitor saw the new writer",
               lambda: all(f.stale for f in failovers), timeout=60)
    for n in range(4):
        with pool.connection() as conn:
            conn.execute("INSERT INTO pool_items VALUES (%s, 0)", (n,))
            assert instance_of(conn) == new
    assert pool.evictions == 0
    assert set(range(4)) <= env.ids_on_writer()


@pytest.mark.real_server
@pytest.mark.parametrize("plugins", [None, "failover"], ids=["default-plugins", "evicting"])
def test_six_threads_through_a_writer_crash_lose_nothing(env: Env, plugins: str | None) -> None:
    """Six threads insert rows through one pool while the writer crashes (default plugins:
    the tracker moves idle connections; ``failover`` alone: the pool evicts them; those in
    use fail over themselves);
    a row counts as acknowledged when its ``with pool.connection()`` block committed. The
    retry loop is the one an application writes: on a failover outcome, run the transaction
    again; a duplicate key on a retry means the unknown outcome was a commit. Every
    acknowledged row is on the new writer afterwards."""
    # Two connections more than threads: some are idle in the pool when the writer crashes.
    pool = env.pool(plugins=plugins, min_size=8, max_size=8)
    workers, per_worker = 6, 400
    acknowledged: list[set[int]] = [set() for _ in range(workers)]
    retries = [0] * workers
    errors: list[BaseException] = []
    after_failover = threading.Event()
    started = threading.Barrier(workers + 1)

    def insert(worker: int, key: int) -> None:
        for attempt in range(5):
            try:
                with pool.connection() as conn:
                    conn.execute("INSERT INTO pool_items VALUES (%s, %s)", (key, worker))
                return
            except psycopg.errors.UniqueViolation:
                if attempt == 0:
                    raise  # not a retry: a real duplicate
                return
            except RETRYABLE:
                retries[worker] += 1
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def work(worker: int) -> None:
        try:
            started.wait(timeout=60)
            for seq in range(per_worker):
                key = worker * 100_000 + seq
                insert(worker, key)
                acknowledged[worker].add(key)
                if after_failover.is_set() and seq >= per_worker // 2:
                    return
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    wait_until("every worker committed a few rows",
               lambda: all(len(a) >= 5 for a in acknowledged) or bool(errors))
    before = env.cluster.writer.id
    new = promoted(env.cluster.failover())
    after_failover.set()
    mark = [len(a) for a in acknowledged]
    wait_until("every worker committed after the failover",
               lambda: all(len(a) > m + 5 for a, m in zip(acknowledged, mark, strict=True))
               or bool(errors) or not any(t.is_alive() for t in threads), timeout=120)
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert new != before and env.cluster.writer.id == new
    if plugins == "failover":  # idle ones evicted; with the tracker, moved instead
        assert pool.evictions >= 1
    else:
        assert pool.evictions == 0
    stored = env.ids_on_writer()
    wanted = set().union(*acknowledged)
    assert wanted <= stored, f"lost {sorted(wanted - stored)[:10]}"
    with pool.connection() as conn:
        assert instance_of(conn) == new


def _monitor_sessions(cluster: Cluster) -> int:
    total = 0
    for instance in cluster.instances.values():
        if instance.role == "stopped":
            continue
        with cluster.superuser(instance.id) as conn:
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM pg_catalog.pg_stat_activity "
                        "WHERE application_name IN (%s, %s)",
                        (topology.MONITOR_APPLICATION_NAME, efm_monitor.PROBE_APPLICATION_NAME))
            total += int(cur.fetchone()[0])
    return total


@pytest.mark.real_server
def test_close_releases_monitors(env: Env) -> None:
    """After ``pool.close()`` no monitor thread or monitoring session serves the pool's
    connections: the topology monitor and efm's host monitors end ``monitor_disposal_time_ms``
    after their last connection."""
    resilient_db.shutdown()  # host monitors keep the longest disposal time asked: start afresh
    pool = env.pool(plugins="failover,efm", min_size=3, max_size=3,
                    monitor_disposal_time_ms=200, topology_refresh_ms=200)
    held = [pool.getconn() for _ in range(3)]
    for conn in held:
        conn.execute("SELECT 1")  # efm attaches on a statement
        conn.commit()
    topo = held[0].resilient.plugin("failover").monitor()
    host_monitors = [m for m in efm_monitor.monitors() if m.running]
    assert host_monitors and topo.running
    for conn in held:
        pool.putconn(conn)
    pool.close()
    # Closed by the pool: each pipeline told its plugins to let go (efm's host monitors).
    assert all(c.resilient.pipeline.state is CLOSED for c in held)
    # Each connection unsubscribed from the topology monitor when it was closed: the monitor
    # ends although the application still holds the closed connection objects.
    wait_until("the topology monitor ended",
               lambda: not topo.running and not topo.connection_open, timeout=60)
    wait_until("the host monitors stopped",
               lambda: all(m.stopped and not m.running for m in host_monitors), timeout=60)
    names = [t.name for t in threading.enumerate()
             if t.name.startswith(("resilient_db-topology", "resilient_db-efm"))]
    assert not names, names
    wait_until("no monitoring session left on the servers",
               lambda: _monitor_sessions(env.cluster) == 0, timeout=60)
    assert all(c.closed for c in held)  # still referenced until here


# --- asyncio: ResilientAsyncConnectionPool ---------------------------------------------------


@pytest.mark.unit
def test_the_async_pool_internals_used_for_eviction_exist() -> None:
    """As for the threaded pool: ResilientAsyncConnectionPool evicts through these."""
    from psycopg_pool import AsyncConnectionPool
    from psycopg_pool.pool_async import AddConnection

    for name in ("_close_connection", "_check_pool_putconn", "run_task", "check_connection"):
        assert callable(getattr(AsyncConnectionPool, name)), name

    async def build() -> None:
        pool = AsyncConnectionPool("", open=False)
        assert hasattr(pool, "_pool")
        AddConnection(pool)  # the signature the integration calls

    run(build())


@pytest.mark.unit
@pytest.mark.parametrize(("options", "parameter", "hint"), [
    *BAD_INPUT,
    ({"plugins": "failover,read_write_splitting"}, "plugins", "connect_async"),
    ({"connection_class": PooledConnection}, "connection_class", "AsyncPooledConnection"),
    ({"connection_class": psycopg.AsyncConnection}, "connection_class",
     "AsyncPooledConnection"),
])
def test_async_pool_bad_input_names_the_parameter(options: dict[str, Any], parameter: str,
                                                  hint: str) -> None:
    _assert_refused(ResilientAsyncConnectionPool, options, parameter, hint)


@pytest.mark.unit
def test_async_pooled_connection_refuses_another_driver_proxy() -> None:
    mysql_aio = pytest.importorskip("mysql.connector.aio")
    from resilient_db._aio import open_async

    with pytest.raises(resilient_db.ConfigurationError) as info:
        run(open_async(mysql_aio.connect, "", "", {"host": "nowhere.invalid"},
                       AsyncPooledConnection))
    assert info.value.parameter == "target" and "AsyncPooledConnection" in str(info.value)


async def _async_pool(env: Env, plugins: str | None = "failover",
                      **options: Any) -> ResilientAsyncConnectionPool:
    """An open asyncio pool on the cluster (writer) endpoint, full."""
    if plugins is not None:
        options["plugins"] = plugins
    pool = ResilientAsyncConnectionPool(_conninfo(env.cluster.connect_kwargs()),
                                        connect_timeout=5, open=False, **options)
    await pool.open(wait=True, timeout=60)
    return pool


async def _instance_of(conn: Any) -> str:
    cur = await conn.execute(INSTANCE_SQL)
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def _ids_on(conn: Any) -> set[int]:
    cur = await conn.execute("SELECT id FROM pool_items")
    return {int(row[0]) for row in await cur.fetchall()}


@pytest.mark.real_server
@pytest.mark.parametrize("in_transaction", [True, False], ids=["transaction", "autocommit"])
def test_async_pool_writer_crash_mid_checkout(env: Env, in_transaction: bool) -> None:
    """The asyncio twin of test_writer_crash_mid_checkout: the awaited statement that meets
    the crash raises the failover outcome; the connection then works on the new writer, the
    connections idle through the crash are evicted, and every later checkout is on the new
    writer."""
    async def main() -> None:
        async with await _async_pool(env, min_size=3, max_size=3) as pool:
            old = env.cluster.writer.id
            conn = await pool.getconn()
            assert isinstance(conn, AsyncPooledConnection)
            assert await _instance_of(conn) == old
            await conn.commit()
            await conn.set_autocommit(not in_transaction)
            await conn.execute("INSERT INTO pool_items VALUES (1, 0)")
            new = promoted(await asyncio.to_thread(env.cluster.failover))
            expected = (resilient_db.TransactionResolutionUnknownError if in_transaction
                        else resilient_db.FailoverSuccessError)
            with pytest.raises(expected) as info:
                await conn.execute("INSERT INTO pool_items VALUES (2, 0)")
            assert isinstance(info.value, psycopg.OperationalError)
            await conn.rollback()
            assert await _instance_of(conn) == new != old
            await conn.rollback()
            await conn.set_autocommit(False)
            await pool.putconn(conn)  # healthy, on the new writer: kept
            for n in range(3, 9):  # every pooled connection, twice over
                async with pool.connection() as c:
                    assert await _instance_of(c) == new
                    await c.execute("INSERT INTO pool_items VALUES (%s, 0)", (n,))
            async with pool.connection() as c:
                stored = await _ids_on(c)
            assert set(range(3, 9)) <= stored
            assert (1 in stored) is not in_transaction
            assert pool.evictions == 2
            await until(lambda: pool.get_stats()["pool_available"] == 3, timeout=60)

    run(main())


@pytest.mark.real_server
@pytest.mark.parametrize("idle_evicted_at", ["checkout", "check"])
def test_async_pool_evicts_connections_opened_before_the_writer_changed(
        env: Env, idle_evicted_at: str, sink: resilient_db.CollectingSink) -> None:
    """Idle in the pool, or checked out and unused, while the writer changes: evicted at
    return, checkout or ``check()``, replaced by sessions on the new writer, no error."""
    async def main() -> None:
        async with await _async_pool(env, min_size=3, max_size=3,
                                     topology_refresh_ms=500) as pool:
            held = [await pool.getconn() for _ in range(3)]
            old = env.cluster.writer.id
            assert {await _instance_of(c) for c in held} == {old}
            for conn in held:
                await conn.commit()
            for conn in held[1:]:
                await pool.putconn(conn)
            kept = held[0]
            new = promoted(await asyncio.to_thread(env.cluster.failover))
            await until(lambda: all(c.stale for c in held), timeout=60)
            await pool.putconn(kept)
            assert pool.evictions == 1 and kept.closed
            if idle_evicted_at == "check":
                await pool.check()
                assert pool.evictions == 3
            fresh = [await pool.getconn() for _ in range(3)]
            for conn in fresh:
                assert await _instance_of(conn) == new
                assert not conn.stale
                await pool.putconn(conn)
            assert pool.evictions == 3
            assert all(c.closed for c in held)

    run(main())
    evicted = [d for d in sink.decisions if d.kind == integration.POOL_EVICTED]
    assert len(evicted) == 3
    events = sorted(d.attributes["resilient_db.pool.event"] for d in evicted)
    assert events == sorted(["return", idle_evicted_at, idle_evicted_at])


@pytest.mark.real_server
def test_async_pool_six_tasks_through_a_writer_crash_lose_nothing(env: Env) -> None:
    """Six tasks insert rows through one asyncio pool while the writer crashes (two idle
    connections more than tasks: those are evicted, those in use fail over themselves); a
    row counts as acknowledged when its ``async with pool.connection()`` block committed, and
    every acknowledged row is on the new writer afterwards."""
    workers, per_worker = 6, 400
    acknowledged: list[set[int]] = [set() for _ in range(workers)]

    async def insert(pool: ResilientAsyncConnectionPool, worker: int, key: int) -> None:
        for attempt in range(5):
            try:
                async with pool.connection() as conn:
                    await conn.execute("INSERT INTO pool_items VALUES (%s, %s)", (key, worker))
                return
            except psycopg.errors.UniqueViolation:
                if attempt == 0:
                    raise  # not a retry: a real duplicate
                return
            except RETRYABLE:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    async def main() -> tuple[str, str, int]:
        async with await _async_pool(env, min_size=8, max_size=8) as pool:
            after_failover = asyncio.Event()

            async def work(worker: int) -> None:
                for seq in range(per_worker):
                    key = worker * 100_000 + seq
                    await insert(pool, worker, key)
                    acknowledged[worker].add(key)
                    if after_failover.is_set() and seq >= per_worker // 2:
                        return

            tasks = [asyncio.create_task(work(w)) for w in range(workers)]
            await until(lambda: all(len(a) >= 5 for a in acknowledged)
                        or any(t.done() for t in tasks), timeout=60)
            before = env.cluster.writer.id
            new = promoted(await asyncio.to_thread(env.cluster.failover))
            after_failover.set()
            await asyncio.gather(*tasks)  # a task's error fails the test here
            async with pool.connection() as conn:
                assert await _instance_of(conn) == new
            return before, new, pool.evictions

    before, new, evictions = run(main())
    assert new != before and env.cluster.writer.id == new
    assert evictions >= 1
    stored = env.ids_on_writer()
    wanted = set().union(*acknowledged)
    assert wanted <= stored, f"lost {sorted(wanted - stored)[:10]}"


@pytest.mark.real_server
def test_async_pool_close_releases_monitors(env: Env) -> None:
    """After ``await pool.close()`` no monitor thread or monitoring session serves the pool's
    connections, although the application still holds the closed connection objects."""
    resilient_db.shutdown()

    async def main() -> tuple[list[Any], Any]:
        pool = await _async_pool(env, plugins="failover,efm", min_size=3, max_size=3,
                                 monitor_disposal_time_ms=200, topology_refresh_ms=200)
        held = [await pool.getconn() for _ in range(3)]
        for conn in held:
            await conn.execute("SELECT 1")
            await conn.commit()
        topo = held[0].resilient.plugin("failover").monitor()
        assert topo.running and any(m.running for m in efm_monitor.monitors())
        for conn in held:
            await pool.putconn(conn)
        await pool.close()
        assert all(c.resilient.pipeline.state is CLOSED for c in held)
        return held, topo

    held, topo = run(main())
    wait_until("the topology monitor ended",
               lambda: not topo.running and not topo.connection_open, timeout=60)
    wait_until("the monitor threads ended", lambda: not any(
        t.name.startswith(("resilient_db-topology", "resilient_db-efm"))
        for t in threading.enumerate()), timeout=60)
    wait_until("no monitoring session left on the servers",
               lambda: _monitor_sessions(env.cluster) == 0, timeout=60)
    assert all(c.closed for c in held)  # still referenced until here


@pytest.mark.real_server
def test_async_pool_checkout_commit_rollback_close_returns(pg_server: LocalServer) -> None:
    """On one server: a block commits, a failed block rolls back, ``async with conn`` on a
    pooled connection leaves it open (psycopg's rule), ``close()`` with ``close_returns``
    gives it back, and the stock ``AsyncConnectionPool`` takes the connection class too."""
    from psycopg_pool import AsyncConnectionPool

    conninfo = _conninfo(pg_server.connect_kwargs())
    table = "apool_basic"
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {table}")
        admin.execute(f"CREATE TABLE {table} (id int primary key)")

    async def main() -> None:
        async with ResilientAsyncConnectionPool(conninfo, plugins="", min_size=1, max_size=1,
                                                close_returns=True, open=False) as pool:
            async with pool.connection() as conn:
                assert isinstance(conn, resilient_db.AsyncConnectionProxy)
                backend = _backend_of(await (await conn.execute(BACKEND_SQL)).fetchone())
                await conn.execute(f"INSERT INTO {table} VALUES (1)")  # committed by the block
            with pytest.raises(ZeroDivisionError):
                async with pool.connection() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES (2)")
                    raise ZeroDivisionError  # rolled back by the block
            conn = await pool.getconn()
            async with conn:  # commits, stays open: it belongs to the pool
                await conn.execute(f"INSERT INTO {table} VALUES (3)")
            assert not conn.closed
            await conn.close()  # close_returns: back in the pool, open
            again = await pool.getconn()
            assert again is conn and not again.closed
            assert _backend_of(await (await again.execute(BACKEND_SQL)).fetchone()) == backend
            await pool.putconn(again)
        async with AsyncConnectionPool(conninfo,  # type: ignore[type-var]
                                       connection_class=AsyncPooledConnection,
                                       kwargs={"plugins": "failover"}, min_size=1,
                                       open=False) as stock, stock.connection() as conn:
            assert conn.resilient.plugins == ("failover",)
            await conn.execute("SELECT 1")

    run(main())
    with psycopg.connect(conninfo) as admin:
        assert admin.execute(f"SELECT id FROM {table} ORDER BY id").fetchall() == [(1,), (3,)]


def _backend_of(row: Any) -> tuple[Any, ...]:
    assert row is not None
    return tuple(row)
