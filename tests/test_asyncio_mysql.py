"""The asyncio front over ``mysql.connector.aio`` (``resilient_db.connect_async``) on a
simulated Aurora MySQL cluster (MariaDB): basic use, writer failover under load with
concurrent tasks (no acknowledged write lost), ``socket_timeout`` cancelling a slow statement
on the server, cancellation of a task at an await, the failure monitor aborting an awaited
statement on a blackholed writer, bad input. Plain ``asyncio.run`` in each test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import mysql.connector
import mysql.connector.aio
import pytest
from mysql.connector import errors as myerrors

import resilient_db
from chaos.netfault import NetworkFaults
from resilient_db import AsyncMysqlConnectionProxy
from resilient_db.drivers import get_driver
from resilient_db.drivers.mysql_connector_aio import MysqlConnectorAioDriver, transport_socket
from simulator.cluster import Cluster, Timeline

from .aio import cancel_after, cancellation_points, failover_plugin, promoted, run, until
from .clusters import SharedCluster, settle_roles

pytestmark = pytest.mark.real_server

T = TypeVar("T")
TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)
LOOKALIKE = "aurora_sim"
INSTANCE = f"SELECT {LOOKALIKE}.aurora_server_id()"
#: efm settings: a statement on a dead host is aborted within GRACE + INTERVAL * COUNT.
GRACE, INTERVAL, COUNT = 0.3, 0.2, 2
MARGIN = 3.0  # liveness margin for a loaded 2-core machine
EFM: dict[str, Any] = {"failure_detection_time_ms": GRACE * 1000,
                       "failure_detection_interval_ms": INTERVAL * 1000,
                       "failure_detection_count": COUNT}


@pytest.fixture(scope="module")
def module_cluster() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: Cluster.start("aurora-mysql", readers=2, timeline=TIMELINE),
                       settle_roles) as shared:
        yield shared


@pytest.fixture
def cluster(module_cluster: SharedCluster) -> Iterator[Cluster]:
    """The module's cluster, settled before and after the test (tests/clusters.py)."""
    yield from module_cluster.fixture()


def kwargs_for(cluster: Cluster, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
    # ssl_disabled: mysql.connector.aio fails its connect on a server without TLS otherwise.
    return {**cluster.connect_kwargs(endpoint or cluster.writer_endpoint), "autocommit": True,
            "ssl_disabled": True, "connect_timeout": 5, **extra}


async def aconnect(cluster: Cluster, endpoint: str | None = None, *,
                   plugins: str = "failover", **extra: Any) -> AsyncMysqlConnectionProxy:
    conn = await resilient_db.connect_async(
        mysql.connector.aio.connect, plugins=plugins,
        **kwargs_for(cluster, endpoint, **{"failover_timeout_sec": 30,
                                           "aurora_mysql_lookalike_schema": LOOKALIKE,
                                           **extra}))
    assert isinstance(conn, AsyncMysqlConnectionProxy)
    return conn


async def one(conn: AsyncMysqlConnectionProxy, sql: str) -> Any:
    # Buffered: tasks sharing a connection take turns per statement, and the driver reads an
    # unbuffered cursor's rows at fetch time (another task's statement could come between).
    cur = await conn.cursor(buffered=True)
    await cur.execute(sql)
    rows = await cur.fetchall()
    await cur.close()
    return rows[0][0] if rows else None


def make_table(cluster: Cluster) -> str:
    name = f"t{time.monotonic_ns()}"
    with cluster.superuser() as conn:
        cur = conn.cursor()
        cur.execute(f"CREATE TABLE {cluster.connect_kwargs()['database']}.{name} "
                    "(id bigint primary key, inst varchar(64))")
    return name


def rows_of(cluster: Cluster, table: str) -> dict[int, str]:
    with cluster.superuser() as conn:
        cur = conn.cursor()
        cur.execute(f"SELECT id, inst FROM {cluster.connect_kwargs()['database']}.{table}")
        return {int(k): str(v) for k, v in cur.fetchall()}


def running(cluster: Cluster, text: str) -> int:
    """Statements containing ``text`` running on the writer (not this query itself)."""
    with cluster.superuser() as conn:
        cur = conn.cursor()
        cur.execute("SELECT info FROM information_schema.processlist WHERE info IS NOT NULL")
        return sum(1 for (info,) in cur.fetchall()
                   if text in str(info) and "processlist" not in str(info))


# --- basic use ------------------------------------------------------------------------------


def test_basic_use(cluster: Cluster) -> None:
    table = make_table(cluster)

    async def main() -> None:
        conn = await aconnect(cluster, plugins="failover,efm")
        assert conn.resilient.plugins == ("failover", "efm")
        assert failover_plugin(conn).instance_id == cluster.writer.id
        assert await one(conn, INSTANCE) == cluster.writer.id
        # The private attributes the driver dialect reads (fails loudly on a rename).
        assert transport_socket(conn.resilient.raw) is not None
        assert isinstance(conn.resilient.pipeline.ctx.driver, MysqlConnectorAioDriver)
        # The blocking dialect reaches it too (a failure monitor first created for a blocking
        # connection breaks asyncio connections to the same host with it).
        blocking = get_driver("mysql-connector")
        sock = blocking.socket_of(conn.resilient.raw)
        assert sock is not None and sock.getpeername()[1] == cluster.port
        sock.close()
        assert not blocking.is_closed(conn.resilient.raw)
        async with await conn.cursor() as cur:
            await cur.execute(f"INSERT INTO {table} VALUES (%s, 'a')", (1,))
            await cur.executemany(f"INSERT INTO {table} VALUES (%s, 'b')", [(2,), (3,)])
            await cur.execute(f"SELECT id FROM {table} ORDER BY id")
            assert await cur.fetchone() == (1,)
            assert await cur.fetchmany(1) == [(2,)]
            assert await cur.fetchall() == [(3,)]
        await conn.set_autocommit(False)
        assert await conn.get_autocommit() is False
        assert conn.resilient.session_state == {"autocommit": False}
        cur = await conn.cursor()
        await cur.execute(f"INSERT INTO {table} VALUES (4, 'rolled back')")
        await conn.rollback()
        await cur.execute(f"INSERT INTO {table} VALUES (5, 'committed')")
        await conn.commit()
        await conn.set_autocommit(True)
        await conn.start_transaction()
        await cur.execute(f"INSERT INTO {table} VALUES (6, 'tx')")
        await conn.commit()
        with pytest.raises(myerrors.IntegrityError):  # driver errors keep their identity
            await cur.execute(f"INSERT INTO {table} VALUES (6, 'again')")
        await conn.set_read_only(True)
        with pytest.raises(myerrors.DatabaseError) as info:
            await cur.execute(f"INSERT INTO {table} VALUES (7, 'refused')")
        assert info.value.errno == 1792 and failover_plugin(conn).failovers == 0
        await conn.set_read_only(False)
        async with conn:
            await one(conn, "SELECT 1")
        assert conn.resilient.raw.is_socket_connected() is False

    run(main())
    assert set(rows_of(cluster, table)) == {1, 2, 3, 5, 6}


# --- failover ---------------------------------------------------------------------------------


def test_writer_failover_under_load_loses_no_acknowledged_write(cluster: Cluster) -> None:
    """Four tasks, each on its own connection, stream idempotent inserts through a writer
    crash; a fifth writes in transactions and handles TransactionResolutionUnknownError. Every
    acknowledged row is on the new writer; only documented outcomes were raised."""
    table = make_table(cluster)
    old = cluster.writer.id
    upsert = f"INSERT IGNORE INTO {table} VALUES (%s, {LOOKALIKE}.aurora_server_id())"
    acked: dict[int, str] = {}
    outcomes: list[str] = []
    unexpected: list[BaseException] = []

    async def writer(task: int, stop: asyncio.Event) -> None:
        conn = await aconnect(cluster)
        cur = await conn.cursor()
        key = task * 1_000_000
        try:
            while not stop.is_set():
                key += 1
                try:
                    with resilient_db.call_options(idempotent=True):
                        await cur.execute(upsert, (key,))
                except resilient_db.FailoverSuccessError:
                    outcomes.append("success")  # only if the retry itself failed over
                    continue
                acked[key] = failover_plugin(conn).instance_id or "?"
        except BaseException as exc:
            unexpected.append(exc)
        finally:
            await conn.close()

    async def transactions(stop: asyncio.Event) -> None:
        conn = await aconnect(cluster, autocommit=False)
        cur = await conn.cursor()
        key = 9_000_000
        try:
            while not stop.is_set():
                key += 1
                try:
                    await cur.execute(upsert, (key,))
                    await conn.commit()
                except resilient_db.TransactionResolutionUnknownError:
                    outcomes.append("unknown")  # the row may or may not be there
                    continue
                except resilient_db.FailoverSuccessError:
                    outcomes.append("success")
                    continue
                acked[key] = failover_plugin(conn).instance_id or "?"
        except BaseException as exc:
            unexpected.append(exc)
        finally:
            await conn.close()

    async def main() -> str:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(writer(i, stop)) for i in range(1, 5)]
        tasks.append(asyncio.create_task(transactions(stop)))
        await until(lambda: len(acked) > 50)
        events = await asyncio.to_thread(cluster.failover)
        new = promoted(events)
        await until(lambda: sum(1 for v in acked.values() if v == new) > 50, timeout=60)
        stop.set()
        await asyncio.gather(*tasks)
        return new

    new = run(main())
    assert not unexpected, unexpected
    assert new == cluster.writer.id
    rows = rows_of(cluster, table)
    assert set(acked) <= set(rows), "an acknowledged write was lost"
    assert set(rows.values()) <= {old, new}, "a reader accepted a write"
    assert {v for v in acked.values()} == {old, new}
    assert set(outcomes) <= {"unknown", "success"}


def test_read_only_errors_fail_over_only_after_the_role_check(
        cluster: Cluster, sink: resilient_db.CollectingSink) -> None:
    """On a reader (a connection pinned to a demoted writer) a read-only error (1290) fails
    over once the role check, run on the asyncio connection, confirms it; a user's read-only
    session on the writer (1792) is left alone."""
    table = make_table(cluster)
    reader = cluster.readers[0]
    insert = f"INSERT INTO {table} VALUES (%s, {LOOKALIKE}.aurora_server_id())"

    async def main() -> None:
        conn = await aconnect(cluster, reader.endpoint, failover_mode="strict_writer")
        assert await one(conn, INSTANCE) == reader.id
        cur = await conn.cursor()
        with pytest.raises(resilient_db.FailoverSuccessError) as info:
            await cur.execute(insert, (1,))
        assert not info.value.statement_sent  # refused by the reader: not applied
        await cur.execute(insert, (1,))
        assert await one(conn, INSTANCE) == cluster.writer.id
        await conn.close()

        conn = await aconnect(cluster)
        await conn.set_read_only(True)
        cur = await conn.cursor()
        with pytest.raises(myerrors.DatabaseError) as error:
            await cur.execute(insert, (2,))
        assert not isinstance(error.value, resilient_db.Error)
        assert failover_plugin(conn).failovers == 0
        verdicts = [d.attributes["resilient_db.failover.triggered"]
                    for d in sink.of_kind("failover.read_only_error")]
        assert verdicts == [True, False]
        await conn.set_read_only(False)
        await cur.execute(insert, (3,))
        await conn.close()

    run(main())
    assert rows_of(cluster, table) == {1: cluster.writer.id, 3: cluster.writer.id}


def test_blackholed_writer_under_load_efm_and_failover_lose_nothing(
        cluster: Cluster, network_faults: NetworkFaults) -> None:
    """Four tasks stream idempotent inserts; the writer is blackholed (statements hang, no
    RST), then the cluster promotes a reader while the blackhole stays. efm aborts the hung
    awaits, failover moves every task to the new writer, every acknowledged row is there."""
    table = make_table(cluster)
    old = cluster.writer
    upsert = f"INSERT IGNORE INTO {table} VALUES (%s, {LOOKALIKE}.aurora_server_id())"
    acked: dict[int, str] = {}
    unexpected: list[BaseException] = []

    async def writer(task: int, stop: asyncio.Event) -> None:
        conn = await aconnect(cluster, plugins="failover,efm", **EFM)
        cur = await conn.cursor()
        key = task * 1_000_000
        try:
            while not stop.is_set():
                key += 1
                try:
                    with resilient_db.call_options(idempotent=True):
                        await cur.execute(upsert, (key,))
                except resilient_db.FailoverSuccessError:
                    continue  # only if the transparent retry itself failed over
                acked[key] = failover_plugin(conn).instance_id or "?"
        except BaseException as exc:
            unexpected.append(exc)
        finally:
            await conn.close()

    def fault() -> list[Any]:
        network_faults.blackhole(old.address)
        try:
            return cluster.failover()  # crash + promotion; the old writer stays blackholed
        finally:
            network_faults.clear()

    async def main() -> str:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(writer(i, stop)) for i in range(1, 5)]
        await until(lambda: len(acked) > 50)
        events = await asyncio.to_thread(fault)
        new = promoted(events)
        await until(lambda: sum(1 for v in acked.values() if v == new) > 50, timeout=60)
        stop.set()
        await asyncio.gather(*tasks)
        return new

    new = run(main())
    assert not unexpected, unexpected
    rows = rows_of(cluster, table)
    assert set(acked) <= set(rows), "an acknowledged write was lost"
    assert set(rows.values()) <= {old.id, new}, "a reader accepted a write"
    assert {v for v in acked.values()} == {old.id, new}


# --- deadlines --------------------------------------------------------------------------------


def test_socket_timeout_cancels_a_slow_statement_on_the_server(cluster: Cluster) -> None:
    async def main() -> None:
        conn = await aconnect(cluster, socket_timeout=0.5)
        cur = await conn.cursor()
        started = time.monotonic()
        with pytest.raises(resilient_db.QueryTimeoutError) as info:
            await cur.execute("SELECT SLEEP(5)")
        assert time.monotonic() - started < 0.5 + MARGIN
        assert isinstance(info.value, myerrors.OperationalError)
        assert info.value.cancelled and "cancelled on the server" in str(info.value)
        cause = info.value.__cause__
        assert isinstance(cause, myerrors.DatabaseError) and cause.errno == 1317  # KILL QUERY
        # Not a failover: the same connection, usable.
        assert failover_plugin(conn).failovers == 0
        await cur.execute("SELECT 1")
        assert await cur.fetchall() == [(1,)]
        # A per-call timeout overrides socket_timeout, both ways.
        with resilient_db.call_options(timeout=0):
            await cur.execute("SELECT SLEEP(0.8)")
            assert await cur.fetchall() == [(0,)]
        with resilient_db.call_options(timeout=0.2), pytest.raises(
                resilient_db.QueryTimeoutError):
            await cur.execute("SELECT SLEEP(1)")
        await conn.close()

    run(main())


# --- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("plugins", ["failover,efm", ""])
def test_cancelling_a_task_at_an_await_leaves_a_usable_connection(
        cluster: Cluster, plugins: str) -> None:
    """A task cancelled while its statement runs: the statement is ended on the server (not
    left running), its answer read, and the connection serves the next statement (no
    "unread result", no lost connection, no failover)."""
    marker = f"SLEEP(30) /* c{time.monotonic_ns()} */"

    async def main() -> None:
        conn = await aconnect(cluster, plugins=plugins)
        cur = await conn.cursor()
        task = asyncio.create_task(cur.execute(f"SELECT {marker}"))
        await until(lambda: running(cluster, marker) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert running(cluster, marker) == 0  # ended on the server, not merely abandoned
        for _ in range(3):
            await cur.execute("SELECT 1")
            assert await cur.fetchall() == [(1,)]
        if plugins:
            assert failover_plugin(conn).failovers == 0
        # Cancelled before the statement was sent (waiting for the connection's turn).
        blocker = asyncio.create_task(one(conn, "SELECT SLEEP(0.5)"))
        waiter = asyncio.create_task(one(conn, "SELECT 2"))
        await asyncio.sleep(0.1)
        waiter.cancel()
        assert await blocker == 0
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await one(conn, "SELECT 3") == 3
        await conn.close()

    run(main())


def test_cancelling_a_statement_blocked_on_a_blackholed_writer(
        cluster: Cluster, network_faults: NetworkFaults) -> None:
    """Neither the kill nor the answer can arrive: the cancellation still ends within
    about three times query_timeout_grace (kill, answer, after the socket is broken), and
    the connection is left broken, with the driver's lost-connection error next."""
    grace = 0.5

    async def main() -> None:
        conn = await aconnect(cluster, plugins="", query_timeout_grace=grace)
        cur = await conn.cursor()
        await cur.execute("SELECT 1")
        await cur.fetchall()
        network_faults.blackhole(cluster.writer.address)
        task = asyncio.create_task(cur.execute("SELECT SLEEP(30)"))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 3 * grace + MARGIN
        with pytest.raises(myerrors.Error) as info:
            await cur.execute("SELECT 1")
        assert info.value.errno in (2013, 2055), info.value
        network_faults.clear()
        await conn.close()

    run(main())


def test_failover_inside_a_transaction_is_resolution_unknown(cluster: Cluster) -> None:
    table = make_table(cluster)

    async def main() -> None:
        conn = await aconnect(cluster, autocommit=False)
        cur = await conn.cursor()
        await cur.execute(f"INSERT INTO {table} VALUES (1, 'in tx')")
        await asyncio.to_thread(cluster.failover)
        with pytest.raises(resilient_db.TransactionResolutionUnknownError) as info:
            await conn.commit()
        assert isinstance(info.value, myerrors.OperationalError)
        # The connection works on the new writer, the session's autocommit=False restored.
        assert await one(conn, INSTANCE) == cluster.writer.id
        assert await conn.get_autocommit() is False
        await conn.rollback()
        await conn.close()

    run(main())


def test_cancelling_connect_at_every_await_leaks_nothing(cluster: Cluster) -> None:
    """connect_async cancelled at each point of the driver's connect in turn (TCP connect,
    handshake, authentication, the first statements): no server session is left behind
    (a connect cancelled inside the driver finishes on its own and is closed). One event
    loop for the whole schedule, as in an application."""
    user = f"rdbc{time.monotonic_ns() % 10**9}"
    with cluster.superuser() as admin:
        cur = admin.cursor()
        cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'")
        cur.execute(f"GRANT ALL ON *.* TO '{user}'@'%'")

    def sessions() -> int:
        with cluster.superuser() as admin:
            cur = admin.cursor()
            cur.execute("SELECT count(*) FROM information_schema.processlist WHERE user = %s",
                        (user,))
            return int(cur.fetchone()[0])

    async def main() -> int:
        cancelled_at = 0
        for steps, delay in cancellation_points():
            result = await cancel_after(steps, aconnect(cluster, plugins="", user=user,
                                                        password="pw"), delay)
            expected = 0 if result is None else 1
            await until(lambda expected=expected: sessions() == expected)  # type: ignore[misc]
            if result is not None:
                await result.close()
                await until(lambda: sessions() == 0)
                break
            cancelled_at += 1
            assert delay < 30, "connect never finished"
        return cancelled_at

    assert run(main()) >= 5


# --- failure monitoring -----------------------------------------------------------------------


def test_efm_aborts_an_awaited_statement_on_a_blackholed_writer(
        cluster: Cluster, network_faults: NetworkFaults) -> None:
    async def main() -> None:
        conn = await aconnect(cluster, plugins="efm", **EFM)
        cur = await conn.cursor()
        await cur.execute("SELECT 1")
        await cur.fetchall()
        network_faults.blackhole(cluster.writer.address)
        started = time.monotonic()
        with pytest.raises(myerrors.Error) as info:
            await cur.execute("SELECT SLEEP(30)")
        elapsed = time.monotonic() - started
        assert not isinstance(info.value, resilient_db.Error)  # the driver's own error
        assert info.value.errno in (2013, 2055), info.value
        assert elapsed < GRACE + INTERVAL * COUNT + MARGIN, elapsed
        assert any("efm" in note for note in getattr(info.value, "__notes__", []))
        network_faults.clear()
        await conn.close()

    run(main())


def test_efm_abort_then_failover_to_the_promoted_writer(
        cluster: Cluster, network_faults: NetworkFaults) -> None:
    old = cluster.writer

    async def main() -> str:
        conn = await aconnect(cluster, plugins="failover,efm", **EFM)
        cur = await conn.cursor()

        def fault() -> list[Any]:
            network_faults.blackhole(old.address)
            events = cluster.failover()  # crash + promotion; the blackhole stays meanwhile
            network_faults.clear()
            return events

        statement = asyncio.create_task(cur.execute("SELECT SLEEP(60)"))
        await asyncio.sleep(0.5)  # let the statement pass efm's grace period
        events = await asyncio.to_thread(fault)
        started = time.monotonic()
        with pytest.raises(resilient_db.FailoverSuccessError) as info:
            await statement
        assert isinstance(info.value, myerrors.OperationalError)
        assert time.monotonic() - started < 30
        new = promoted(events)
        assert await one(conn, INSTANCE) == new
        await conn.close()
        return new

    assert run(main()) == cluster.writer.id


# --- bad input --------------------------------------------------------------------------------


def test_bad_input_is_a_configuration_error() -> None:
    async def main() -> None:
        with pytest.raises(resilient_db.ConfigurationError) as info:
            await resilient_db.connect_async(mysql.connector.aio.connect, host="x",
                                             plugins="failover,read_write_splitting")
        assert info.value.parameter == "plugins" and "read_write_splitting" in str(info.value)
        with pytest.raises(resilient_db.ConfigurationError, match="blocking") as info:
            await resilient_db.connect_async(mysql.connector.connect, host="x")
        assert info.value.parameter == "target"
        with pytest.raises(resilient_db.ConfigurationError, match="not a connect callable"):
            await resilient_db.connect_async(mysql.connector.aio.MySQLConnection, host="x")
        with pytest.raises(resilient_db.ConfigurationError) as info:
            await resilient_db.connect_async(mysql.connector.aio.connect, host="x",
                                             wrapper_driver_dialect="psycopg")
        assert info.value.parameter == "wrapper_driver_dialect"
        with pytest.raises(resilient_db.ConfigurationError) as info:
            await resilient_db.connect_async(mysql.connector.aio.connect, host="x",
                                             aurora_mysql_lookalike_schema="s",
                                             wrapper_dialect="aurora-pg")
        assert info.value.parameter == "wrapper_dialect"
        with pytest.raises(resilient_db.ConfigurationError, match="did you mean"):
            await resilient_db.connect_async(mysql.connector.aio.connect, host="x",
                                             failover_timeout_secs=3)

    run(main())
    with pytest.raises(resilient_db.ConfigurationError, match="connect_async"):
        resilient_db.connect(mysql.connector.aio.connect, host="x")
