"""The failover plugin end to end on simulated clusters (Aurora PostgreSQL and the Aurora
MySQL look-alike on MariaDB): writer crash and targeted failover without waiting for DNS,
failover inside a transaction, read-only errors (a writer turned read-only, a user's read-only
transaction, an instance that is a reader), no usable writer, transparent retry, cursors that
survive, one monitor connection for many application connections, shutdown."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import mysql.connector
import psycopg
import pytest
from psycopg.rows import dict_row

import resilient_db
from chaos.netfault import NetworkFaults
from resilient_db import Plugin, topology
from resilient_db._pipeline import ConnectContext, ConnectHandler
from resilient_db.drivers import get_driver
from resilient_db.hosts import Role
from resilient_db.plugins.failover import FailoverPlugin
from simulator.cluster import Cluster, Timeline

from .clusters import SharedCluster, settle_roles
from .waiting import wait_until

pytestmark = pytest.mark.real_server

TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)


def resolve(name: str) -> str:
    return socket.gethostbyname(name)


@dataclass
class Env:
    """One simulated cluster and how the application talks to it."""

    name: str  # "pg" | "mysql"
    cluster: Cluster
    target: Callable[..., Any]
    extra: dict[str, Any]
    instance_sql: str  # the id of the instance a statement runs on
    operational_error: type[BaseException]
    driver_error: type[BaseException]
    read_only_error: Callable[[BaseException], bool]
    upsert: str  # idempotent insert of (id, instance)
    opened: list[Any] = field(default_factory=list)

    def entry(self) -> str:
        """The writer endpoint when its DNS is current, else the writer's instance endpoint
        (after a failover with stale DNS the writer endpoint points at the old writer)."""
        writer = self.cluster.writer
        try:
            if resolve(self.cluster.writer_endpoint) == writer.address:
                return self.cluster.writer_endpoint
        except OSError:
            pass
        return writer.endpoint

    def connect(self, endpoint: str | None = None, *, autocommit: bool = True,
                plugins: Any = "failover", **extra: Any) -> resilient_db.ConnectionProxy:
        kwargs = {**self.cluster.connect_kwargs(endpoint or self.entry()), **self.extra,
                  "autocommit": autocommit, "connect_timeout": 5, **extra}
        conn = resilient_db.connect(self.target, plugins=plugins, **kwargs)
        self.opened.append(conn)
        return conn

    def table(self) -> str:
        name = f"t{time.monotonic_ns()}"
        conn = self.connect()
        cur = conn.cursor()
        cur.execute(f"CREATE TABLE {name} (id int primary key, inst varchar(64))")
        conn.close()
        return name

    def instance(self, conn: resilient_db.ConnectionProxy) -> str:
        cur = conn.cursor()
        cur.execute(self.instance_sql)
        row = cur.fetchone()
        cur.close()
        return str(row[0])

    def rows(self, table: str) -> dict[int, str]:
        conn = self.connect()
        cur = conn.cursor()
        cur.execute(f"SELECT id, inst FROM {table}")
        rows = {int(r[0]): str(r[1]) for r in cur.fetchall()}
        conn.close()
        return rows


def plugin(conn: resilient_db.ConnectionProxy) -> FailoverPlugin:
    found = conn.resilient.plugin("failover")
    assert isinstance(found, FailoverPlugin)
    return found


def close_connections(env: Env) -> None:
    for conn in env.opened:
        with contextlib.suppress(Exception):
            conn.close()
    env.opened.clear()


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: Cluster.start("aurora-pg", readers=2, timeline=TIMELINE),
                       settle_roles) as shared:
        yield shared


@pytest.fixture(scope="module")
def mysql_cluster() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: Cluster.start("aurora-mysql", readers=2, timeline=TIMELINE),
                       settle_roles) as shared:
        yield shared


def _pg_read_only(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.errors.ReadOnlySqlTransaction)


def _mysql_read_only(exc: BaseException) -> bool:
    return isinstance(exc, mysql.connector.Error) and exc.errno in (1290, 1792, 1836)


@pytest.fixture(params=["pg", "mysql"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    if request.param == "pg":
        shared: SharedCluster = request.getfixturevalue("pg_cluster")
        cluster = shared.acquire()
        environment = Env(
            "pg", cluster, psycopg.Connection.connect, {},
            "SELECT pg_catalog.aurora_db_instance_identifier()", psycopg.OperationalError,
            psycopg.Error, _pg_read_only,
            "INSERT INTO {t} VALUES (%s, pg_catalog.aurora_db_instance_identifier()) "
            "ON CONFLICT DO NOTHING")
    else:
        shared = request.getfixturevalue("mysql_cluster")
        cluster = shared.acquire()
        environment = Env(
            "mysql", cluster, mysql.connector.connect,
            {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"},
            "SELECT aurora_sim.aurora_server_id()", mysql.connector.errors.OperationalError,
            mysql.connector.Error, _mysql_read_only,
            "INSERT IGNORE INTO {t} VALUES (%s, aurora_sim.aurora_server_id())")
    yield environment
    close_connections(environment)
    shared.release()


def insert(env: Env, cur: Any, table: str, key: int) -> None:
    cur.execute(env.upsert.format(t=table), (key,))


def promoted(events: list[Any]) -> str:
    return str(next(e.instance for e in events if e.name == "promoted"))


# --- writer failures ----------------------------------------------------------------------------


def test_writer_crash_fails_over_without_waiting_for_dns(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    table = env.table()
    hooked: list[Any] = []
    conn = env.connect(cluster.writer_endpoint if env.entry() == cluster.writer_endpoint
                       else None, on_connect=hooked.append)
    cur = conn.cursor()
    insert(env, cur, table, 1)
    old = cluster.writer
    assert env.instance(conn) == old.id and len(hooked) == 1
    epoch = plugin(conn).epoch
    cluster.set_dns_staleness(10.0)
    try:
        new = promoted(cluster.failover())
        with pytest.raises(resilient_db.FailoverSuccessError) as info:
            insert(env, cur, table, 2)
        assert isinstance(info.value, env.operational_error)
        assert isinstance(info.value.__cause__, env.driver_error)
        assert info.value.statement_sent
        insert(env, cur, table, 3)  # the same cursor, now on the new writer
        assert env.instance(conn) == new == cluster.writer.id
        # The cluster endpoint still resolves to the dead writer: failover did not use DNS.
        assert resolve(cluster.writer_endpoint) == old.address
    finally:
        cluster.set_dns_staleness(0.0)
    state = plugin(conn)
    assert state.instance_id == new and state.failovers == 1 and state.epoch == epoch + 1
    assert len(hooked) == 2 and hooked[-1] is conn.resilient.raw
    assert env.rows(table)[3] == new
    kinds = sink.kinds()
    assert "failover.started" in kinds and "failover.outcome" in kinds
    outcome = sink.of_kind("failover.outcome")[-1]
    assert outcome.attributes["error.type"] == "FailoverSuccessError"


def test_targeted_failover(env: Env) -> None:
    cluster = env.cluster
    table = env.table()
    conn = env.connect()
    cur = conn.cursor()
    insert(env, cur, table, 1)
    target = cluster.readers[-1].id
    cluster.failover(target=target, mode="graceful")
    with pytest.raises(resilient_db.FailoverSuccessError):
        insert(env, cur, table, 2)
    insert(env, cur, table, 3)
    assert env.instance(conn) == target
    assert env.rows(table)[3] == target


def _topology_writer(env: Env, instance_id: str) -> str:
    """The writer named by the topology as ``instance_id`` itself serves it."""
    sql = ("SELECT server_id FROM pg_catalog.aurora_replica_status() "
           "WHERE session_id = 'MASTER_SESSION_ID'" if env.name == "pg" else
           "SELECT server_id FROM aurora_sim.replica_host_status "
           "WHERE session_id = 'MASTER_SESSION_ID'")
    with env.cluster.superuser(instance_id) as conn:
        cur = conn.cursor()
        cur.execute(sql)
        return str(cur.fetchone()[0])


def test_stale_topology_on_a_lagging_reader_does_not_mislead_failover(env: Env) -> None:
    """A reader that applies changes late still names the dead writer as the writer after
    the failover; the application must land on the instance that is the writer by its own
    account, never on the one a stale view names."""
    cluster = env.cluster
    table = env.table()
    conn = env.connect()
    cur = conn.cursor()
    insert(env, cur, table, 1)
    old = cluster.writer.id
    lagging = cluster.readers[-1].id
    cluster.set_replica_lag(lagging, 8.0)
    try:
        new = promoted(cluster.failover(target=cluster.readers[0].id))
        assert new != lagging
        # The lagging reader's view is stale: it still names the old writer.
        assert _topology_writer(env, lagging) == old
        with pytest.raises(resilient_db.FailoverSuccessError):
            insert(env, cur, table, 2)
        insert(env, cur, table, 3)
        assert env.instance(conn) == new
    finally:
        cluster.set_replica_lag(lagging, 0.0)
    assert env.rows(table)[3] == new


def test_failover_inside_a_transaction(env: Env) -> None:
    cluster = env.cluster
    table = env.table()
    conn = env.connect(autocommit=False)
    cur = conn.cursor()
    insert(env, cur, table, 1)  # a transaction is open now
    conn.commit()
    insert(env, cur, table, 2)  # uncommitted
    new = promoted(cluster.failover())
    with pytest.raises(resilient_db.TransactionResolutionUnknownError) as info:
        insert(env, cur, table, 3)
    assert isinstance(info.value, env.operational_error)
    # The connection is usable again, on the new writer, with autocommit still off.
    insert(env, cur, table, 4)
    conn.rollback()
    insert(env, cur, table, 5)
    conn.commit()
    assert env.instance(conn) == new
    conn.commit()
    assert set(env.rows(table)) == {1, 5}


def test_commit_interrupted_by_failover_is_unknown(env: Env) -> None:
    cluster = env.cluster
    table = env.table()
    conn = env.connect(autocommit=False)
    cur = conn.cursor()
    insert(env, cur, table, 1)
    cluster.failover()
    with pytest.raises(resilient_db.TransactionResolutionUnknownError):
        conn.commit()
    insert(env, cur, table, 2)
    conn.commit()
    assert 2 in env.rows(table)


def test_no_usable_writer_raises_failover_failed_with_attempts(env: Env) -> None:
    cluster = env.cluster
    conn = env.connect(failover_timeout_sec=1)
    cur = conn.cursor()
    writer = cluster.writer
    cur.execute("SELECT 1")
    cur.fetchall()
    cluster.kill_instance(writer.id)  # no promotion: the cluster has no writer
    try:
        start = time.monotonic()
        with pytest.raises(resilient_db.FailoverFailedError) as info:
            cur.execute("SELECT 1")
        assert time.monotonic() - start < 10
        assert isinstance(info.value, env.operational_error)
        assert isinstance(info.value.__cause__, env.driver_error)
        attempts = info.value.attempts
        assert attempts, "every attempt is listed"
        outcomes = {a.host.split(".")[0]: a.outcome for a in attempts}
        assert outcomes[writer.id] == "probe failed"
        assert all(outcomes[r.id] == "probe: is a reader" for r in cluster.readers)
    finally:
        cluster.start_instance(writer.id)
    # Once the writer is back the next statement fails over to it.
    with pytest.raises(resilient_db.FailoverSuccessError):
        cur.execute("SELECT 1")
    cur.execute("SELECT 1")
    cur.fetchall()
    assert env.instance(conn) == writer.id


def test_writer_reboot_reconnects_to_the_same_writer(env: Env) -> None:
    cluster = env.cluster
    writer = cluster.writer.id
    conn = env.connect()
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    cluster.reboot(writer)  # down for reboot_downtime, back in the same role, no promotion
    with pytest.raises(resilient_db.FailoverSuccessError):
        cur.execute("SELECT 1")
    assert env.instance(conn) == writer
    assert plugin(conn).epoch == plugin(conn).monitor().epoch  # the writer did not change


# --- read-only errors ---------------------------------------------------------------------------


def test_writer_turned_read_only_is_not_failed_over_until_it_fails(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    table = env.table()
    conn = env.connect()
    cur = conn.cursor()
    old = cluster.writer.id
    cluster.make_writer_read_only()
    with pytest.raises(Exception) as info:
        insert(env, cur, table, 1)
    # The driver's own error, untouched: the role check says the instance is still the writer.
    assert env.read_only_error(info.value)
    assert not isinstance(info.value, resilient_db.Error)
    assert plugin(conn).failovers == 0 and env.instance(conn) == old
    verdicts = sink.of_kind("failover.read_only_error")
    assert verdicts and verdicts[-1].attributes["resilient_db.failover.triggered"] is False
    new = promoted(cluster.failover())
    with pytest.raises(resilient_db.FailoverSuccessError):
        insert(env, cur, table, 2)
    insert(env, cur, table, 3)
    assert env.instance(conn) == new


def test_user_read_only_transaction_is_not_failed_over(env: Env) -> None:
    table = env.table()
    conn = env.connect()
    cur = conn.cursor()
    writer = env.cluster.writer.id
    cur.execute("BEGIN READ ONLY" if env.name == "pg" else "START TRANSACTION READ ONLY")
    with pytest.raises(Exception) as info:
        insert(env, cur, table, 1)
    assert env.read_only_error(info.value)
    assert not isinstance(info.value, resilient_db.Error)
    conn.rollback()
    insert(env, cur, table, 2)
    assert plugin(conn).failovers == 0 and env.instance(conn) == writer


@pytest.mark.parametrize("idempotent", [False, True])
def test_connection_on_a_reader_fails_over_on_read_only_error(env: Env, idempotent: bool) -> None:
    """What a connection pinned to a demoted writer sees: its instance is a reader now. The
    read-only error starts a failover only after the role check confirms it."""
    cluster = env.cluster
    table = env.table()
    reader = cluster.readers[0]
    conn = env.connect(reader.endpoint, failover_mode="strict_writer")
    cur = conn.cursor()
    assert env.instance(conn) == reader.id
    if idempotent:
        with resilient_db.call_options(idempotent=True):
            insert(env, cur, table, 1)  # run again on the writer, no error
    else:
        with pytest.raises(resilient_db.FailoverSuccessError) as info:
            insert(env, cur, table, 1)
        assert not info.value.statement_sent  # refused by the reader: not applied
        insert(env, cur, table, 1)
    assert env.instance(conn) == cluster.writer.id
    assert env.rows(table) == {1: cluster.writer.id}


# --- transparent retry, cursors, session state ---------------------------------------------------


def test_transparent_retry_of_an_idempotent_statement(env: Env) -> None:
    cluster = env.cluster
    table = env.table()
    conn = env.connect()
    cur = conn.cursor()
    insert(env, cur, table, 1)
    new = promoted(cluster.failover())
    with resilient_db.call_options(idempotent=True):
        insert(env, cur, table, 2)  # no error: run again on the new writer
    assert plugin(conn).failovers == 1
    assert env.rows(table)[2] == new


def test_cursors_keep_their_kind_and_session_state_moves(env: Env) -> None:
    cluster = env.cluster
    conn = env.connect(autocommit=False)
    if env.name == "pg":
        cur = conn.cursor(row_factory=dict_row)
        conn.autocommit = True  # set through the proxy: restored after failover
        conn.read_only = True
    else:
        cur = conn.cursor(dictionary=True)
        conn.autocommit = True
    cur.arraysize = 7
    cur.execute("SELECT 1 AS one")
    assert cur.fetchall() == [{"one": 1}]
    cluster.failover()
    with pytest.raises(resilient_db.FailoverSuccessError):
        cur.execute("SELECT 1 AS one")
    cur.execute("SELECT 1 AS one")
    assert cur.fetchall() == [{"one": 1}]
    assert cur.arraysize == 7
    raw = conn.resilient.raw
    assert raw.autocommit is True
    if env.name == "pg":
        assert raw.read_only is True


def test_no_write_reaches_a_reader_and_no_acknowledged_write_is_lost(env: Env) -> None:
    """A writer streaming idempotent inserts through a crash failover: every acknowledged row
    is on the new writer, and each was written by the instance that was the writer."""
    cluster = env.cluster
    table = env.table()
    conn = env.connect()
    cur = conn.cursor()
    acked: dict[int, str] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        key = 0
        while not stop.is_set():
            key += 1
            try:
                with resilient_db.call_options(idempotent=True):
                    insert(env, cur, table, key)
                acked[key] = plugin(conn).instance_id or "?"
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=write)
    thread.start()
    time.sleep(0.2)
    old = cluster.writer.id
    new = promoted(cluster.failover())
    wait_until("writes on the new writer", lambda: new in acked.values())
    stop.set()
    thread.join(10)
    assert not errors, errors
    rows = env.rows(table)
    assert set(acked) <= set(rows), "an acknowledged write was lost"
    assert set(rows.values()) <= {old, new}, "a reader accepted a write"
    # Each row was written where it was acknowledged, except an insert that committed on the
    # old writer just before the crash whose acknowledgement was lost: its idempotent re-run
    # on the new writer found the row (replicated synchronously) and changed nothing.
    assert all(rows[k] == inst or (inst, rows[k]) == (new, old) for k, inst in acked.items())


# --- the shared monitor -------------------------------------------------------------------------


def _monitor_sessions(env: Env) -> int:
    """Server sessions of the topology monitor across every running instance."""
    total = 0
    for instance in env.cluster.instances.values():
        if instance.role == "stopped":
            continue
        with env.cluster.superuser(instance.id) as conn:
            cur = conn.cursor()
            if env.name == "pg":
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                            (topology.MONITOR_APPLICATION_NAME,))
            else:
                cur.execute("SELECT count(*) FROM information_schema.processlist "
                            "WHERE user = 'app'")
            total += int(cur.fetchone()[0])
    return total


def test_two_hundred_connections_share_one_monitor_connection(env: Env) -> None:
    # PostgreSQL: the monitor's sessions by application name; MariaDB: every session of the
    # application user, minus the application's own connections (alive until the failover).
    conns = [env.connect(topology_refresh_ms=50) for _ in range(200)]
    keys = {plugin(c).monitor().key for c in conns}
    assert len(keys) == 1
    monitor = plugin(conns[0]).monitor()
    assert monitor.subscribers >= 200
    app = 0 if env.name == "pg" else 200
    wait_until("one monitor connection", lambda: _monitor_sessions(env) == app + 1)
    time.sleep(0.3)  # several refreshes at 50 ms
    # The bound is "at most one": under load a refresh may time out and its connection be
    # replaced, so the monitor can be between connections at the moment of counting.
    assert _monitor_sessions(env) <= app + 1
    # After a failover the probes were short-lived: one monitor connection again (the
    # application's connections died with the old writer and were not used since).
    env.cluster.failover()
    wait_until("the monitor back to one connection", lambda: _monitor_sessions(env) == 1)
    time.sleep(0.3)
    assert _monitor_sessions(env) <= 1


def test_shutdown_stops_monitor_threads_and_failover_still_works(env: Env) -> None:
    conn = env.connect()
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    assert any(m.running for m in topology.monitors())
    resilient_db.shutdown()
    wait_until("monitor threads ended", lambda: not any(
        t.name.startswith("resilient_db-topology") for t in threading.enumerate()))
    assert topology.monitors() == []
    new = promoted(env.cluster.failover())
    with pytest.raises(resilient_db.FailoverSuccessError):
        cur.execute("SELECT 1")
    assert env.instance(conn) == new


def test_closing_the_last_connection_ends_the_monitor(env: Env) -> None:
    # The application still holds the closed connection (env.opened does): closing it, not
    # the garbage collector, is what releases the monitor and its server session.
    # A monitor keeps the longest disposal time any connection asked (earlier tests': the
    # default 60 s): start with a fresh one.
    resilient_db.shutdown()
    conn = env.connect(topology_refresh_ms=60_000, monitor_disposal_time_ms=200)
    monitor = plugin(conn).monitor()
    wait_until("the monitor reading", lambda: monitor.running and monitor.connection_open)
    conn.close()
    wait_until("the monitor ended", lambda: not monitor.running and not monitor.connection_open)
    assert monitor.subscribers == 0 and conn in env.opened
    with pytest.raises(env.driver_error):
        conn.cursor().execute("SELECT 1")  # closed stays closed: no new subscription either
    assert not monitor.running


def test_connections_opened_one_after_another_share_one_monitor_session(env: Env) -> None:
    # A connection per request, each closed before the next: the monitor outlives each by
    # monitor_disposal_time_ms (default 60 s), so its thread and server session carry over
    # instead of being torn down and reopened per request.
    first = env.connect()
    monitor = plugin(first).monitor()
    wait_until("the monitor reading", lambda: monitor.running and monitor.connection_open)
    thread = monitor._thread
    first.close()
    for _ in range(5):
        conn = env.connect()
        assert plugin(conn).monitor() is monitor
        cur = conn.cursor()
        cur.execute("SELECT 1")
        cur.fetchall()
        conn.close()
    assert monitor.running and monitor._thread is thread and monitor.connection_open


# --- reader mode, Multi-AZ clusters, servers without topology ------------------------------------


def test_reader_failure_in_reader_mode(env: Env) -> None:
    cluster = env.cluster
    reader, other = cluster.readers[0], cluster.readers[1]
    conn = env.connect(reader.endpoint, failover_mode="strict_reader")
    cur = conn.cursor()
    assert env.instance(conn) == reader.id
    cluster.kill_instance(reader.id)
    try:
        with pytest.raises(resilient_db.FailoverSuccessError):
            cur.execute("SELECT 1")
        assert env.instance(conn) == other.id  # a reader, never the writer
    finally:
        cluster.start_instance(reader.id)


@pytest.fixture(scope="module", params=["multi-az-pg", "multi-az-mysql"])
def multi_az(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Cluster.start(request.param, timeline=TIMELINE) as cluster:
        yield cluster


def test_multi_az_writer_crash(multi_az: Cluster) -> None:
    pg = multi_az.flavour.engine == "postgresql"
    target: Callable[..., Any] = psycopg.Connection.connect if pg else mysql.connector.connect
    extra: dict[str, Any] = {} if pg else {"use_pure": True}
    conn = resilient_db.connect(target, plugins="failover", autocommit=True,
                                **multi_az.connect_kwargs(), **extra)
    try:
        cur = conn.cursor()
        cur.execute("CREATE TABLE mz (id int primary key)")
        new = promoted(multi_az.failover())
        with pytest.raises(resilient_db.FailoverSuccessError):
            cur.execute("INSERT INTO mz VALUES (1)")
        cur.execute("INSERT INTO mz VALUES (2)")
        assert conn.resilient.host.host == multi_az.instance(new).endpoint
        assert plugin(conn).role is Role.WRITER
    finally:
        conn.close()


def test_server_without_topology_reconnects_to_the_same_endpoint(backend: Any) -> None:
    conn = backend.connect(plugins="failover", autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute("SELECT 1")
        cur.fetchall()
        old = conn.resilient.raw
        conn.resilient.pipeline.ctx.driver.abort(old)  # the network breaks under it
        with pytest.raises(resilient_db.FailoverSuccessError) as info:
            cur.execute("SELECT 1")
        assert isinstance(info.value, backend.operational_error)
        cur.execute("SELECT 1")
        assert cur.fetchall() == [(1,)]
        assert conn.resilient.raw is not old
    finally:
        conn.close()


@pytest.mark.parametrize("plugins", ["failover", "failover,efm"])
def test_opening_a_cursor_on_a_lost_connection_fails_over(env: Env, plugins: str) -> None:
    """mysql-connector's ``cursor()`` checks the connection and raises on a lost one; opening
    a cursor sends nothing, so with no transaction open the cursor is simply opened on the new
    writer. Inside a transaction the loss is reported as an unknown outcome. (psycopg's
    ``cursor()`` does no I/O: there the loss shows at the first statement.) With ``efm`` too,
    ``cursor()`` takes the fused layer's shortcut (``Chains.opener``)."""
    cluster = env.cluster
    conn = env.connect(plugins=plugins)
    assert (conn.resilient.pipeline.chains.opener is not None) == ("efm" in plugins)
    assert env.instance(conn) == cluster.writer.id
    new = promoted(cluster.failover())
    cur = conn.cursor()  # mysql: no error, nothing was lost
    if env.name == "pg":
        with pytest.raises(resilient_db.FailoverSuccessError):
            cur.execute(env.instance_sql)
    cur.execute(env.instance_sql)
    assert str(cur.fetchone()[0]) == new
    tx = env.connect(autocommit=False, plugins=plugins)
    tx_cur = tx.cursor()
    tx_cur.execute(env.instance_sql)
    tx_cur.fetchall()  # a transaction is open now
    newer = promoted(cluster.failover())
    with pytest.raises(resilient_db.TransactionResolutionUnknownError):
        tx.cursor().execute(env.instance_sql)
    again = tx.cursor()
    again.execute(env.instance_sql)
    assert str(again.fetchone()[0]) == newer


# --- internal reads on an instance that stops answering ------------------------------------------

#: Liveness margin for a loaded machine (the bounds under test are a few seconds).
MARGIN = 3.0


class BlackholeAfterConnect(Plugin):
    """Blackholes the instance a connection was just opened to, once (for the next connect
    that is ``initial`` or not, as the test says): an instance that stops answering right
    after the handshake. Listed before ``failover``, it sees the application's connects and
    failover's, not the topology monitor's."""

    code = "test_blackhole_after_connect"
    faults: ClassVar[NetworkFaults | None] = None
    initial: ClassVar[bool] = False

    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        raw = proceed(ctx)
        cls = type(self)
        if cls.faults is not None and ctx.initial is cls.initial:
            faults, cls.faults = cls.faults, None
            faults.blackhole(socket.gethostbyname(ctx.host.host))
        return raw


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[tuple[Any, float]]]:
    """Run ``fn`` on a daemon thread; the list gets ``(result or exception, seconds)``."""
    outcome: list[tuple[Any, float]] = []

    def run() -> None:
        start = time.monotonic()
        try:
            result: Any = fn()
        except BaseException as exc:
            result = exc
        outcome.append((result, time.monotonic() - start))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.fixture
def blackholes(network_faults: NetworkFaults) -> Iterator[NetworkFaults]:
    try:
        yield network_faults
    finally:
        BlackholeAfterConnect.faults = None
        network_faults.clear()


def test_role_check_on_a_connection_to_a_blackholed_instance_is_bounded(
        env: Env, blackholes: NetworkFaults) -> None:
    """The role check after a read-only error runs on the application's connection, which has
    no read timeout: on an instance that stopped answering it ends after
    ``topology_probe_timeout`` with the driver's network error (then a failover trigger), not
    when the network heals."""
    conn = env.connect(topology_probe_timeout=1.0)
    assert env.instance(conn) == env.cluster.writer.id
    blackholes.blackhole(env.cluster.writer.address)
    thread, outcome = in_thread(lambda: plugin(conn)._role_report(conn.resilient.raw))
    thread.join(10.0)
    blackholes.clear()  # an unbounded read wakes now, and fails the asserts below
    thread.join(30.0)
    assert outcome, "the role check did not end even after the blackhole was lifted"
    error, elapsed = outcome[0]
    assert elapsed < 1.0 + MARGIN, elapsed
    assert isinstance(error, Exception) and plugin(conn).ctx.driver.is_disconnect(error), error


def test_failover_to_an_instance_that_stops_answering_after_the_connect_keeps_its_budget(
        env: Env, blackholes: NetworkFaults) -> None:
    """The connect timeout bounds the connect; the role check on the new connection is bounded
    too: the instance failover connected to is blackholed right after the handshake, and the
    failover ends with ``FailoverFailedError`` within its budget instead of hanging."""
    conn = env.connect(plugins=[BlackholeAfterConnect, "failover"],
                       auto_sort_wrapper_plugin_order=False, failover_timeout_sec=4,
                       failover_reader_connect_timeout_sec=1.5)
    cur = conn.cursor()
    cur.execute(env.instance_sql)
    cur.fetchall()
    BlackholeAfterConnect.initial, BlackholeAfterConnect.faults = False, blackholes
    plugin(conn).ctx.driver.abort(conn.resilient.raw)  # the next statement fails over
    thread, outcome = in_thread(lambda: cur.execute(env.instance_sql))
    thread.join(15.0)
    blackholes.clear()
    thread.join(30.0)
    assert BlackholeAfterConnect.faults is None, "failover connected to the writer"
    assert outcome, "the failover did not end even after the blackhole was lifted"
    error, elapsed = outcome[0]
    assert elapsed < 4 + MARGIN, elapsed
    assert isinstance(error, resilient_db.FailoverFailedError), error
    assert any("after connecting" in a.outcome for a in error.attempts), error.attempts


def test_connecting_to_an_instance_that_stops_answering_after_the_handshake_is_bounded(
        env: Env, blackholes: NetworkFaults) -> None:
    """What ``connect()`` reads after the handshake is bounded by ``connect_timeout``: the
    check of a forced dialect (here the MySQL look-alike's: ``connect()`` raises the driver's
    network error) and the failover plugin's first topology read (``connect()`` returns;
    failover handles the dead connection at the first statement)."""
    writer = env.cluster.writer
    BlackholeAfterConnect.initial, BlackholeAfterConnect.faults = True, blackholes
    thread, outcome = in_thread(lambda: env.connect(
        writer.endpoint, plugins=[BlackholeAfterConnect, "failover"],
        auto_sort_wrapper_plugin_order=False, connect_timeout=1.5))
    thread.join(15.0)
    blackholes.clear()
    thread.join(30.0)
    assert BlackholeAfterConnect.faults is None, "the connect went through the plugin"
    assert outcome, "connect() did not return even after the blackhole was lifted"
    result, elapsed = outcome[0]
    assert elapsed < 1.5 + MARGIN, elapsed
    if env.name == "mysql":
        assert isinstance(result, env.operational_error), result
        assert get_driver("mysql-connector").is_disconnect(result), result
    else:
        assert isinstance(result, resilient_db.ConnectionProxy), result
