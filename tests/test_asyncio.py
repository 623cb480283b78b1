"""The asyncio front (``resilient_db.connect_async`` over ``psycopg.AsyncConnection``) on a
simulated Aurora PostgreSQL cluster: basic use, writer failover under load with concurrent
tasks (no acknowledged write lost), failover inside a transaction, the failure monitor
aborting an awaited statement on a blackholed writer, ``socket_timeout`` bounding an await,
cancellation at every await (no leaked connection or thread, a clear state), a closed
connection, bad input. Plain ``asyncio.run`` in each test (no pytest-asyncio)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import psycopg
import pytest

import resilient_db
from chaos.netfault import NetworkFaults
from resilient_db import AsyncConnectionProxy
from simulator.cluster import Cluster, Timeline

from .aio import cancel_after, cancellation_points, failover_plugin, promoted, run, until
from .clusters import SharedCluster, settle_roles
from .waiting import wait_until

pytestmark = pytest.mark.real_server

T = TypeVar("T")
TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)
INSTANCE = "SELECT pg_catalog.aurora_db_instance_identifier()"
#: efm settings: a statement on a dead host is aborted within GRACE + INTERVAL * COUNT.
GRACE, INTERVAL, COUNT = 0.3, 0.2, 2
MARGIN = 3.0  # liveness margin for a loaded 2-core machine
APP = "rdb-async-test"  # application_name of the test's own connections (leak counting)


@pytest.fixture(scope="module")
def module_cluster() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: Cluster.start("aurora-pg", readers=2, timeline=TIMELINE),
                       settle_roles) as shared:
        yield shared


@pytest.fixture
def cluster(module_cluster: SharedCluster) -> Iterator[Cluster]:
    """The module's cluster, settled before and after the test (tests/clusters.py)."""
    yield from module_cluster.fixture()


def kwargs_for(cluster: Cluster, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
    return {**cluster.connect_kwargs(endpoint or cluster.writer.endpoint), "autocommit": True,
            "connect_timeout": 5, "application_name": APP, **extra}


async def aconnect(cluster: Cluster, endpoint: str | None = None, *,
                   plugins: str = "failover", **extra: Any) -> AsyncConnectionProxy:
    return await resilient_db.connect_async(
        psycopg.AsyncConnection.connect, plugins=plugins,
        **kwargs_for(cluster, endpoint, **{"failover_timeout_sec": 30, **extra}))


async def instance_of(conn: AsyncConnectionProxy) -> str:
    cur = await conn.execute(INSTANCE)
    row = await cur.fetchone()
    return str(row[0])


def make_table(cluster: Cluster) -> str:
    name = f"t{time.monotonic_ns()}"
    with psycopg.connect(**kwargs_for(cluster, application_name="rdb-setup")) as conn:
        conn.execute(f"CREATE TABLE {name} (id int primary key, inst text)")
    return name


def rows_of(cluster: Cluster, table: str) -> dict[int, str]:
    with psycopg.connect(**kwargs_for(cluster, application_name="rdb-setup")) as conn:
        return {int(k): str(v) for k, v in conn.execute(f"SELECT id, inst FROM {table}")}


def sessions(cluster: Cluster, application_name: str = APP) -> int:
    """Server sessions with ``application_name`` across every running instance."""
    total = 0
    for instance in cluster.instances.values():
        if instance.role == "stopped":
            continue
        with cluster.superuser(instance.id) as conn:
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                        (application_name,))
            total += int(cur.fetchone()[0])
    return total


def no_sessions_left(cluster: Cluster) -> None:
    # A server session ends a moment after the client closes it: wait for it (bounded).
    wait_until("no session of the test's connections left", lambda: sessions(cluster) == 0)


def foreign_threads() -> set[threading.Thread]:
    """Threads other than the main one and resilient_db's shared, supervised monitors."""
    return {t for t in threading.enumerate()
            if t is not threading.main_thread() and not t.name.startswith("resilient_db")}


# --- basic use ------------------------------------------------------------------------------


def test_basic_use(cluster: Cluster) -> None:
    table = make_table(cluster)

    async def main() -> None:
        conn = await aconnect(cluster, cluster.writer_endpoint, plugins="failover,efm")
        assert conn.resilient.plugins == ("failover", "efm")
        assert failover_plugin(conn).instance_id == cluster.writer.id
        assert await instance_of(conn) == cluster.writer.id
        async with conn.cursor() as cur:
            await cur.execute(f"INSERT INTO {table} VALUES (%s, 'a')", (1,))
            await cur.executemany(f"INSERT INTO {table} VALUES (%s, 'b')", [(2,), (3,)])
            await cur.execute(f"SELECT id FROM {table} ORDER BY id")
            assert cur.description is not None and cur.rowcount == 3
            assert [r[0] async for r in cur] == [1, 2, 3]
            await cur.execute(f"SELECT id FROM {table} ORDER BY id")
            assert await cur.fetchmany(2) == [(1,), (2,)]
            assert await cur.fetchall() == [(3,)]
        await conn.set_autocommit(False)
        assert conn.autocommit is False and conn.resilient.session_state == {"autocommit": False}
        await conn.execute(f"INSERT INTO {table} VALUES (4, 'rolled back')")
        await conn.rollback()
        await conn.execute(f"INSERT INTO {table} VALUES (5, 'committed')")
        await conn.commit()
        await conn.set_autocommit(True)
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (6, 'tx')")
        with pytest.raises(psycopg.errors.UniqueViolation):  # driver errors keep identity
            await conn.execute(f"INSERT INTO {table} VALUES (6, 'again')")
        async with conn:
            await conn.execute("SELECT 1")
        assert conn.closed

        # A forced dialect is verified on the asyncio connection (the family check first).
        forced = await aconnect(cluster, wrapper_dialect="aurora-pg")
        assert forced.resilient.pipeline.ctx.extra["dialect"].code == "aurora-pg"
        await forced.close()
        with pytest.raises(resilient_db.DialectMismatchError):
            await aconnect(cluster, wrapper_dialect="aurora-mysql")

    run(main())
    assert set(rows_of(cluster, table)) == {1, 2, 3, 5, 6}
    no_sessions_left(cluster)


# --- failover ---------------------------------------------------------------------------------


def test_writer_failover_under_load_loses_no_acknowledged_write(cluster: Cluster) -> None:
    """Four tasks, each on its own connection, stream idempotent inserts through a writer
    crash; a fifth writes in transactions and handles TransactionResolutionUnknownError. Every
    acknowledged row is on the new writer; only documented outcomes were raised."""
    table = make_table(cluster)
    old = cluster.writer.id
    upsert = (f"INSERT INTO {table} VALUES (%s, pg_catalog.aurora_db_instance_identifier()) "
              "ON CONFLICT DO NOTHING")
    acked: dict[int, str] = {}
    outcomes: list[str] = []
    unexpected: list[BaseException] = []

    async def writer(task: int, stop: asyncio.Event) -> None:
        conn = await aconnect(cluster, cluster.writer_endpoint)
        key = task * 1_000_000
        try:
            while not stop.is_set():
                key += 1
                try:
                    with resilient_db.call_options(idempotent=True):
                        await conn.execute(upsert, (key,))
                except resilient_db.FailoverSuccessError:
                    outcomes.append("success")  # only if the retry itself failed over
                    continue
                acked[key] = failover_plugin(conn).instance_id or "?"
        except BaseException as exc:
            unexpected.append(exc)
        finally:
            await conn.close()

    async def transactions(stop: asyncio.Event) -> None:
        conn = await aconnect(cluster, cluster.writer_endpoint, autocommit=False)
        key = 9_000_000
        try:
            while not stop.is_set():
                key += 1
                try:
                    await conn.execute(upsert, (key,))
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
    rows = rows_of(cluster, table)
    assert set(acked) <= set(rows), "an acknowledged write was lost"
    assert set(rows.values()) <= {old, new}, "a reader accepted a write"
    assert {v for v in acked.values()} == {old, new}
    assert set(outcomes) <= {"unknown", "success"}
    no_sessions_left(cluster)


def test_failover_inside_a_transaction_is_resolution_unknown(
        cluster: Cluster, sink: resilient_db.CollectingSink) -> None:
    table = make_table(cluster)

    async def main() -> None:
        conn = await aconnect(cluster, autocommit=False)
        cur = conn.cursor()
        await cur.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        new = promoted(await asyncio.to_thread(cluster.failover))
        with pytest.raises(resilient_db.TransactionResolutionUnknownError) as info:
            await cur.execute(f"INSERT INTO {table} VALUES (2, 'x')")
        assert isinstance(info.value, psycopg.OperationalError)
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
        # The same decisions as the sync front, from the same core.
        kinds = sink.kinds()
        for kind in ("failover.started", "failover.plan", "failover.attempt.started",
                     "failover.outcome", "failover.finished"):
            assert kind in kinds, (kind, kinds)
        outcome = sink.of_kind("failover.outcome")[-1].attributes
        assert outcome["error.type"] == "TransactionResolutionUnknownError"
        assert outcome["resilient_db.failover.in_transaction"] is True
        # The connection is usable on the new writer; the old cursor is rebound.
        await cur.execute(INSTANCE)
        assert (await cur.fetchone())[0] == new
        assert conn.autocommit is False  # session state moved
        await conn.rollback()
        await conn.set_autocommit(True)
        # Inside a transaction block: the outcome leaves the block, which fails over once.
        newer = ""
        with pytest.raises(resilient_db.TransactionResolutionUnknownError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (3, 'x')")
                newer = promoted(await asyncio.to_thread(cluster.failover))
                await conn.execute(f"INSERT INTO {table} VALUES (4, 'x')")
        assert failover_plugin(conn).failovers == 2
        assert await instance_of(conn) == newer
        await conn.close()

    run(main())


def test_failover_without_a_writer_fails_with_attempts_then_recovers(cluster: Cluster) -> None:
    writer = cluster.writer

    async def main() -> None:
        conn = await aconnect(cluster, failover_timeout_sec=1)
        cur = await conn.execute("SELECT 1")
        cluster.kill_instance(writer.id)  # no promotion: the cluster has no writer
        try:
            started = time.monotonic()
            with pytest.raises(resilient_db.FailoverFailedError) as info:
                await cur.execute("SELECT 1")
            assert time.monotonic() - started < 1 + MARGIN
            assert isinstance(info.value, psycopg.OperationalError)
            outcomes = {a.host.split(".")[0]: a.outcome for a in info.value.attempts}
            assert outcomes[writer.id] == "probe failed"
            assert all(outcomes[r.id] == "probe: is a reader" for r in cluster.readers)
        finally:
            await asyncio.to_thread(cluster.start_instance, writer.id)
        with pytest.raises(resilient_db.FailoverSuccessError):
            await cur.execute("SELECT 1")
        assert await instance_of(conn) == writer.id
        await conn.close()

    run(main())


def test_read_only_errors_fail_over_only_after_the_role_check(
        cluster: Cluster, sink: resilient_db.CollectingSink) -> None:
    """On a reader (what a connection pinned to a demoted writer sees) a read-only error fails
    over once the role check confirms it; a user's read-only transaction on the writer (the
    check then runs on a side connection: the transaction is aborted) is left alone."""
    table = make_table(cluster)
    reader = cluster.readers[0]
    insert = f"INSERT INTO {table} VALUES (%s, pg_catalog.aurora_db_instance_identifier())"

    async def main() -> None:
        conn = await aconnect(cluster, reader.endpoint, failover_mode="strict_writer")
        assert await instance_of(conn) == reader.id
        with pytest.raises(resilient_db.FailoverSuccessError) as info:
            await conn.execute(insert, (1,))
        assert not info.value.statement_sent  # refused by the reader: not applied
        await conn.execute(insert, (1,))
        assert await instance_of(conn) == cluster.writer.id
        await conn.close()

        conn = await aconnect(cluster)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as error:
            async with conn.transaction():
                await conn.execute("SET TRANSACTION READ ONLY")
                await conn.execute(insert, (2,))
        assert not isinstance(error.value, resilient_db.Error)
        assert failover_plugin(conn).failovers == 0
        verdicts = [d.attributes["resilient_db.failover.triggered"]
                    for d in sink.of_kind("failover.read_only_error")]
        assert verdicts == [True, False]
        await conn.execute(insert, (3,))
        await conn.close()

    run(main())
    assert rows_of(cluster, table) == {1: cluster.writer.id, 3: cluster.writer.id}


# --- closed connections, bad input -----------------------------------------------------------


def test_closed_connection_raises_and_never_reconnects(cluster: Cluster) -> None:
    async def main() -> None:
        conn = await aconnect(cluster, plugins="failover,efm")
        cur = conn.cursor()
        await conn.close()
        raw = conn.resilient.raw
        with pytest.raises(psycopg.OperationalError) as info:
            await conn.execute("SELECT 1")
        assert not isinstance(info.value, resilient_db.Error)
        await asyncio.to_thread(cluster.failover)
        for attempt in (lambda: cur.execute("SELECT 1"), conn.commit,
                        lambda: conn.execute("SELECT 1")):
            with pytest.raises(psycopg.OperationalError) as info:
                await attempt()
            assert not isinstance(info.value, resilient_db.Error)
        assert conn.resilient.raw is raw and raw.closed

    run(main())
    no_sessions_left(cluster)


def test_bad_input_is_a_configuration_error() -> None:
    async def main() -> None:
        with pytest.raises(resilient_db.ConfigurationError, match="AsyncConnection") as info:
            await resilient_db.connect_async(psycopg.Connection.connect, "host=x")
        assert info.value.parameter == "target"
        with pytest.raises(resilient_db.ConfigurationError, match="not a connect callable"):
            await resilient_db.connect_async(psycopg.AsyncConnection, "host=x")
        with pytest.raises(resilient_db.ConfigurationError, match="target must be"):
            await resilient_db.connect_async("host=x")  # type: ignore[arg-type]
        with pytest.raises(resilient_db.ConfigurationError) as info:
            await resilient_db.connect_async(psycopg.AsyncConnection.connect, "host=x",
                                             plugins="failover,read_write_splitting")
        assert info.value.parameter == "plugins" and "read_write_splitting" in str(info.value)
        with pytest.raises(resilient_db.ConfigurationError, match="did you mean"):
            await resilient_db.connect_async(psycopg.AsyncConnection.connect, "host=x",
                                             failover_timeout_secs=3)
        with pytest.raises(resilient_db.ConfigurationError) as info:
            await resilient_db.connect_async(psycopg.AsyncConnection.connect, "host=x",
                                             socket_timeout=-1)
        assert info.value.parameter == "socket_timeout"
        import mysql.connector

        # mysql.connector.aio is supported (tests/test_asyncio_mysql.py); the blocking one not.
        with pytest.raises(resilient_db.ConfigurationError, match="is blocking"):
            await resilient_db.connect_async(mysql.connector.connect, "host=x")

    run(main())
    with pytest.raises(resilient_db.ConfigurationError, match="connect_async"):
        resilient_db.connect(psycopg.AsyncConnection.connect, "host=x")


# --- deadlines --------------------------------------------------------------------------------


def test_socket_timeout_cancels_a_slow_statement_on_the_server(cluster: Cluster) -> None:
    async def main() -> None:
        conn = await aconnect(cluster, socket_timeout=0.5)
        cur = conn.cursor()
        started = time.monotonic()
        with pytest.raises(resilient_db.QueryTimeoutError) as info:
            await cur.execute("SELECT pg_sleep(10)")
        assert time.monotonic() - started < 0.5 + MARGIN
        assert isinstance(info.value, psycopg.OperationalError)
        assert info.value.cancelled and "cancelled on the server" in str(info.value)
        assert isinstance(info.value.__cause__, psycopg.errors.QueryCanceled)
        # Not a failover: the same connection, usable.
        assert failover_plugin(conn).failovers == 0
        await cur.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        # A per-call timeout overrides socket_timeout, both ways.
        with resilient_db.call_options(timeout=0):
            await cur.execute("SELECT pg_sleep(0.8)")
        with resilient_db.call_options(timeout=0.2), pytest.raises(
                resilient_db.QueryTimeoutError):
            await cur.execute("SELECT pg_sleep(0.45)")
        await conn.close()

    run(main())


def test_a_deadline_never_cancels_another_tasks_statement(cluster: Cluster) -> None:
    """Two tasks share a connection: the second one's deadline expires while the first one's
    statement holds the connection; the first statement is left alone."""
    async def main() -> None:
        conn = await aconnect(cluster)

        async def long() -> Any:
            with resilient_db.call_options(timeout=0):
                cur = await conn.execute("SELECT pg_sleep(1.0), 'done'")
                return await cur.fetchone()

        async def short() -> None:
            with resilient_db.call_options(timeout=0.3):
                await conn.execute("SELECT 1")

        first = asyncio.create_task(long())
        await until(lambda: _active(cluster, "SELECT pg_sleep(1.0), 'done'") == 1)
        with pytest.raises(resilient_db.QueryTimeoutError, match="waiting for the connection"):
            await short()
        assert (await first)[1] == "done"
        await conn.close()

    run(main())


def test_socket_timeout_bounds_an_await_on_a_blackholed_writer(
        cluster: Cluster, network_faults: NetworkFaults) -> None:
    async def main() -> None:
        conn = await aconnect(cluster, plugins="", socket_timeout=1.0,
                              query_timeout_grace=0.5)
        await conn.execute("SELECT 1")
        network_faults.blackhole(cluster.writer.address)
        started = time.monotonic()
        with pytest.raises(resilient_db.QueryTimeoutError) as info:
            await conn.execute("SELECT 1")
        assert time.monotonic() - started < 1.0 + 0.5 + MARGIN
        assert "connection was broken" in str(info.value) and not info.value.cancelled
        assert conn.broken
        await conn.close()

    run(main())


# --- failure monitoring -----------------------------------------------------------------------


EFM: dict[str, Any] = {"failure_detection_time_ms": GRACE * 1000, "failure_detection_interval_ms":
       INTERVAL * 1000, "failure_detection_count": COUNT}


def test_efm_aborts_an_awaited_statement_on_a_blackholed_writer(
        cluster: Cluster, network_faults: NetworkFaults) -> None:
    async def main() -> None:
        conn = await aconnect(cluster, plugins="efm", **EFM)
        cur = await conn.execute("SELECT 1")
        network_faults.blackhole(cluster.writer.address)
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            await cur.execute("SELECT pg_sleep(30)")
        elapsed = time.monotonic() - started
        assert not isinstance(info.value, resilient_db.Error)  # the driver's own error
        assert elapsed < GRACE + INTERVAL * COUNT + MARGIN, elapsed
        assert any("efm" in note for note in getattr(info.value, "__notes__", []))
        await conn.close()

    run(main())


def test_efm_abort_then_failover_to_the_promoted_writer(
        cluster: Cluster, network_faults: NetworkFaults) -> None:
    old = cluster.writer

    async def main() -> str:
        conn = await aconnect(cluster, plugins="failover,efm", **EFM)
        cur = await conn.execute("SELECT 1")

        def fault() -> list[Any]:
            network_faults.blackhole(old.address)
            events = cluster.failover()  # crash + promotion; the blackhole stays meanwhile
            network_faults.clear()
            return events

        statement = asyncio.create_task(cur.execute("SELECT pg_sleep(60)"))
        await asyncio.sleep(0.5)  # let the statement pass its grace period on the server
        events = await asyncio.to_thread(fault)
        started = time.monotonic()
        with pytest.raises(resilient_db.FailoverSuccessError):
            await statement
        assert time.monotonic() - started < 30
        new = promoted(events)
        assert await instance_of(conn) == new
        await conn.close()
        return new

    new = run(main())
    assert new == cluster.writer.id


# --- cancellation -----------------------------------------------------------------------------


def test_cancelling_connect_at_every_await_leaks_nothing(cluster: Cluster) -> None:
    """connect_async cancelled at each of its awaits in turn (the driver's connect, dialect
    detection, the topology read): no server session and no thread is left behind."""
    threads = foreign_threads()
    cancelled_at = 0
    for steps, delay in cancellation_points():
        result = run(cancel_after(steps, aconnect(cluster, cluster.writer_endpoint,
                                                   plugins="failover,efm"), delay))
        expected = 0 if result is None else 1
        wait_until(f"no session left after a cancel at step {steps} + {delay:.4f} s",
                   lambda expected=expected: sessions(cluster) == expected)  # type: ignore[misc]
        if result is not None:
            run(result.close())
            break
        cancelled_at += 1
        assert delay < 30, "connect never finished"
    assert cancelled_at >= 5, cancelled_at
    assert foreign_threads() <= threads


def test_cancelling_statements_at_every_await_leaves_a_clear_state(cluster: Cluster) -> None:
    """A unit of work (execute, fetch, execute in a transaction, commit) cancelled after each
    number of loop turns: the connection is then usable (or, for a cancel psycopg could not
    resolve, closed), no transaction is left open, no statement runs on the server."""
    table = make_table(cluster)
    threads = foreign_threads()

    async def work(conn: AsyncConnectionProxy, key: int) -> bool:
        cur = await conn.execute("SELECT pg_sleep(0.01), 1")
        await cur.fetchall()
        await conn.set_autocommit(False)
        await cur.execute(f"INSERT INTO {table} VALUES (%s, 'x')", (key,))
        await conn.commit()
        await conn.set_autocommit(True)
        return True

    async def main() -> int:
        conn = await aconnect(cluster, plugins="failover,efm", socket_timeout=30, **EFM)
        efm = conn.resilient.plugin("efm")
        cancels = 0
        for key, (steps, delay) in enumerate(cancellation_points()):
            # Only a unit that finished before its cancel ends the schedule: a cancel that
            # lands after the server committed (the row is there, the task still cancelled;
            # more likely on a loaded machine, where one loop turn covers more I/O) is one
            # more cancellation point, checked like the others.
            done = await cancel_after(steps, work(conn, key), delay) is not None
            assert efm.due == float("inf"), "the cancelled statement is still registered"
            if conn.resilient.raw.closed:
                pytest.fail(f"psycopg closed the connection after a cancel at {steps} + "
                            f"{delay:.4f} s")
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await conn.rollback()
            if not conn.autocommit:
                await conn.set_autocommit(True)
            await conn.execute("SELECT 1")  # usable
            if done:
                break
            cancels += 1
            assert delay < 30
        await conn.close()
        return cancels

    assert run(main()) >= 5
    no_sessions_left(cluster)
    assert foreign_threads() <= threads


def test_cancelling_a_slow_commit_cancels_it_on_the_server(cluster: Cluster) -> None:
    """COMMIT held by a deferred trigger (pg_sleep): the cancelled commit is cancelled on the
    server, the row is not there, the connection is idle and usable."""
    table = make_table(cluster)
    with psycopg.connect(**kwargs_for(cluster, application_name="rdb-setup")) as setup:
        setup.execute(f"CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS "
                      "$$ BEGIN PERFORM pg_sleep(20); RETURN NULL; END $$")
        setup.execute(f"CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {table} DEFERRABLE "
                      f"INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {table}_slow()")

    async def main() -> None:
        conn = await aconnect(cluster, autocommit=False)
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        commit = asyncio.create_task(conn.commit())
        await until(lambda: _active(cluster, "COMMIT") == 1)
        started = time.monotonic()
        commit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await commit
        assert time.monotonic() - started < MARGIN
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        assert await cur.fetchone() == (0,)
        assert failover_plugin(conn).failovers == 0
        await conn.close()

    run(main())
    wait_until("no COMMIT running", lambda: _active(cluster, "COMMIT") == 0)


def _active(cluster: Cluster, query: str) -> int:
    with cluster.superuser(cluster.writer.id) as conn:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND "
                    "state = 'active' AND query = %s", (APP, query))
        return int(cur.fetchone()[0])


def test_cancelling_a_failover_in_progress(cluster: Cluster) -> None:
    """The writer is down and nothing is promoted yet: a statement waits in failover. Cancelled
    there, it ends at once, holds nothing (lock, new connection, thread), and the connection
    fails over at its next statement once a writer is back."""
    writer = cluster.writer
    threads = foreign_threads()

    async def main() -> None:
        conn = await aconnect(cluster)
        cur = await conn.execute("SELECT 1")
        shell = conn._shell
        assert shell is not None
        cluster.kill_instance(writer.id)
        try:
            statement = asyncio.create_task(cur.execute("SELECT 1"))
            await until(shell.lock.locked)
            await asyncio.sleep(0.3)  # let it poll the monitor and try the dead writer
            started = time.monotonic()
            statement.cancel()
            with pytest.raises(asyncio.CancelledError):
                await statement
            assert time.monotonic() - started < 1.0
            assert not shell.lock.locked()
            assert failover_plugin(conn).failovers == 0
        finally:
            cluster.start_instance(writer.id)
        with pytest.raises(resilient_db.FailoverSuccessError):
            await cur.execute("SELECT 1")
        assert await instance_of(conn) == writer.id
        await conn.close()

    run(main())
    no_sessions_left(cluster)
    assert foreign_threads() <= threads


# --- SQLAlchemy's asyncio engine --------------------------------------------------------------


def engine_url(cluster: Cluster) -> Any:
    """The cluster's writer endpoint as a ``postgresql+resilient_psycopg`` URL (``failover,efm``,
    a 30 s failover budget, the test's application_name)."""
    import sqlalchemy as sa

    kw = cluster.connect_kwargs(cluster.writer_endpoint)
    return sa.URL.create("postgresql+resilient_psycopg", username=str(kw["user"]),
                         password=str(kw["password"]), host=str(kw["host"]),
                         port=int(kw["port"]), database=str(kw["dbname"]),
                         query={"resilient_db_plugins": "failover,efm",
                                "failover_timeout_sec": "30", "application_name": APP})


def test_sqlalchemy_async_engine_through_a_writer_failover(
        cluster: Cluster, sink: resilient_db.CollectingSink) -> None:
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.ext.asyncio import create_async_engine

    table = make_table(cluster)
    url = engine_url(cluster)
    insert = sa.text(f"INSERT INTO {table} VALUES (:k, "
                     "pg_catalog.aurora_db_instance_identifier())")

    async def main() -> str:
        engine = create_async_engine(url, pool_size=2)
        try:
            async with engine.begin() as conn:
                await conn.execute(insert, {"k": 1})
                assert conn.sync_connection is not None
                raw = await conn.get_raw_connection()
                assert isinstance(raw.driver_connection, AsyncConnectionProxy)
            new = promoted(await asyncio.to_thread(cluster.failover))
            try:
                async with engine.begin() as conn:
                    await conn.execute(insert, {"k": 2})
            except sa_exc.OperationalError as error:
                # The pooled connection failed over under the statement.
                assert isinstance(error.orig, resilient_db.FailoverSuccessError)
                assert not error.connection_invalidated  # it works, on the new writer
                async with engine.begin() as conn:  # the application's retry
                    await conn.execute(insert, {"k": 2})
            else:
                # The topology monitor saw the new writer first: the checkout recycled the
                # stale pooled connection.
                assert sink.of_kind("sqlalchemy.pool_recycled")
            async with engine.connect() as conn:
                found = (await conn.execute(sa.text(INSTANCE))).scalar_one()
            assert found == new
            return new
        finally:
            await engine.dispose()

    new = run(main())
    rows = rows_of(cluster, table)
    assert rows[2] == new and set(rows) == {1, 2}
    no_sessions_left(cluster)


def test_sqlalchemy_async_engine_under_load_loses_nothing(cluster: Cluster) -> None:
    """Four tasks share one pooled async engine (``failover,efm``), each committing one-row
    transactions while the writer crashes. A transaction that ends in a resilient_db outcome
    (``FailoverSuccessError``, ``TransactionResolutionUnknownError``, as ``.orig`` of
    SQLAlchemy's ``OperationalError``) is not acknowledged and the task goes on; every
    acknowledged commit is on the new writer afterwards, both writers took acknowledged
    commits, nothing else was raised, and ``dispose()`` leaves no session."""
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.ext.asyncio import create_async_engine

    table = make_table(cluster)
    old = cluster.writer.id
    url = engine_url(cluster)
    insert = sa.text(f"INSERT INTO {table} VALUES (:k, "
                     "pg_catalog.aurora_db_instance_identifier()) RETURNING inst")
    acked: dict[int, str] = {}
    outcomes: list[str] = []
    unexpected: list[BaseException] = []

    async def worker(engine: Any, task: int, stop: asyncio.Event) -> None:
        key = task * 1_000_000
        try:
            while not stop.is_set():
                key += 1
                try:
                    async with engine.begin() as conn:
                        instance = (await conn.execute(insert, {"k": key})).scalar_one()
                except sa_exc.OperationalError as error:
                    if not isinstance(error.orig, (resilient_db.FailoverSuccessError,
                                                   resilient_db.TransactionResolutionUnknownError)):
                        raise
                    outcomes.append(type(error.orig).__name__)
                    continue
                acked[key] = instance
        except BaseException as exc:
            unexpected.append(exc)

    async def main() -> str:
        engine = create_async_engine(url, pool_size=4, max_overflow=0)
        try:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(worker(engine, i, stop)) for i in range(1, 5)]
            await until(lambda: len(acked) > 50 or bool(unexpected))
            new = promoted(await asyncio.to_thread(cluster.failover))
            await until(lambda: sum(1 for v in acked.values() if v == new) > 50
                         or bool(unexpected), timeout=60)
            stop.set()
            await asyncio.gather(*tasks)
            return new
        finally:
            await engine.dispose()

    new = run(main())
    assert not unexpected, unexpected
    rows = rows_of(cluster, table)
    assert set(acked) <= set(rows), "an acknowledged commit was lost"
    assert all(rows[k] == v for k, v in acked.items())
    assert set(rows.values()) <= {old, new}, "a reader accepted a write"
    assert set(acked.values()) == {old, new}
    assert set(outcomes) <= {"FailoverSuccessError", "TransactionResolutionUnknownError"}
    no_sessions_left(cluster)


def test_cancelling_a_statement_blocked_on_a_blackholed_writer(
        cluster: Cluster, network_faults: NetworkFaults) -> None:
    """psycopg answers a cancelled await by cancelling on the server (its cancel connection to
    a blackholed host gives up after 5 s) and then waiting for the statement, which efm's abort
    ends at once (the registration lasts until the await is over): the task ends within about
    5 s, psycopg closes the connection, and it fails over at its next statement."""
    writer = cluster.writer

    async def main() -> None:
        conn = await aconnect(cluster, plugins="failover,efm", **EFM)
        cur = await conn.execute("SELECT 1")
        network_faults.blackhole(writer.address)
        statement = asyncio.create_task(cur.execute("SELECT pg_sleep(30)"))
        await asyncio.wait({statement}, timeout=GRACE + 0.2)  # past the grace period
        started = time.monotonic()
        statement.cancel()
        with pytest.raises(asyncio.CancelledError):
            await statement
        assert time.monotonic() - started < 5.0 + MARGIN  # psycopg's cancel timeout
        assert conn.resilient.raw.closed
        network_faults.clear()
        with pytest.raises(resilient_db.FailoverSuccessError):
            await cur.execute("SELECT 1")
        assert await instance_of(conn) == writer.id
        await conn.close()

    run(main())


def test_blackholed_writer_under_load_efm_and_failover_lose_nothing(
        cluster: Cluster, network_faults: NetworkFaults) -> None:
    """Four tasks stream idempotent inserts; the writer is blackholed (statements hang, no
    RST), then the cluster promotes a reader while the blackhole stays. efm aborts the hung
    awaits, failover moves every task to the new writer, every acknowledged row is there."""
    table = make_table(cluster)
    old = cluster.writer
    upsert = (f"INSERT INTO {table} VALUES (%s, pg_catalog.aurora_db_instance_identifier()) "
              "ON CONFLICT DO NOTHING")
    acked: dict[int, str] = {}
    unexpected: list[BaseException] = []

    async def writer(task: int, stop: asyncio.Event) -> None:
        conn = await aconnect(cluster, cluster.writer_endpoint, plugins="failover,efm", **EFM)
        key = task * 1_000_000
        try:
            while not stop.is_set():
                key += 1
                try:
                    with resilient_db.call_options(idempotent=True):
                        await conn.execute(upsert, (key,))
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

    async def main() -> tuple[str, float]:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(writer(i, stop)) for i in range(1, 5)]
        await until(lambda: len(acked) > 50)
        events = await asyncio.to_thread(fault)
        new = promoted(events)
        at = next(e.mono for e in events if e.name == "promoted")
        await until(lambda: new in acked.values(), timeout=60)
        recovered = time.monotonic() - at
        await until(lambda: sum(1 for v in acked.values() if v == new) > 50, timeout=60)
        stop.set()
        await asyncio.gather(*tasks)
        return new, recovered

    new, recovered = run(main())
    print(f"promoted -> first acknowledged write on the new writer: {recovered:.2f} s, "
          f"{len(acked)} writes acknowledged")
    assert not unexpected, unexpected
    assert recovered < 30, recovered
    rows = rows_of(cluster, table)
    assert set(acked) <= set(rows), "an acknowledged write was lost"
    assert set(rows.values()) <= {old.id, new}, "a reader accepted a write"
    no_sessions_left(cluster)
