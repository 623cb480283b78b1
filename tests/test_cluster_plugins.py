"""The cluster plugins on simulated clusters (Aurora PostgreSQL and the Aurora MySQL look-alike
on MariaDB): ``aurora_connection_tracker`` (connections left on a demoted writer are recycled
or aborted before their next statement), ``initial_connection`` (a new connection lands on the
role its endpoint stands for, within a retry window that is honoured), ``stale_dns`` (the
verified writer instead of the stale cluster endpoint), and the failover plugin's default mode
through a reader endpoint. Each cluster test asserts the instance the application lands on and
that no write reached a reader; the pure parts have unit tests at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import topology
from resilient_db._plugin_registry import BUILTIN, PLANNED, resolve
from resilient_db.failover_core import FailoverMode
from resilient_db.hosts import Host, Role, TopologySnapshot
from resilient_db.plugins.aurora_connection_tracker import ConnectionTrackerPlugin
from resilient_db.plugins.failover import FailoverPlugin
from resilient_db.plugins.initial_connection import candidates, wanted_role
from resilient_db.plugins.stale_dns import StaleDnsPlugin, is_stale
from resilient_db.rds import EndpointKind
from resilient_db.selection import RoundRobinCursor, SelectionContext, strategy_from_name
from simulator.cluster import Cluster, Timeline

from .clusters import SharedCluster, settle_roles
from .waiting import wait_until

TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)
#: How long the cluster endpoint lags behind a promotion in the stale-DNS tests: long enough
#: for the old writer to rejoin as a reader and the test to run, short enough to wait out.
STALE_DNS = 12.0


#: MONITOR_RACE: a connection asking for a faster topology refresh rate used to lose its wake-up
#: when it subscribed during a refresh (fixed: TopologyMonitor._run recomputes the rate under
#: its lock before waiting). Tests that need a fast monitor still open their fast connection
#: first, so each starts from a fresh monitor at a known rate.


def resolve_name(name: str) -> str:
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
    read_only_error: Callable[[BaseException], bool]
    upsert: str  # idempotent insert of (id, instance)
    opened: list[Any] = field(default_factory=list)

    def entry(self) -> str:
        """The writer endpoint when its DNS is current, else the writer's instance endpoint."""
        writer = self.cluster.writer
        try:
            if resolve_name(self.cluster.writer_endpoint) == writer.address:
                return self.cluster.writer_endpoint
        except OSError:
            pass
        return writer.endpoint

    def connect(self, endpoint: str | None = None, *, plugins: str = "failover",
                autocommit: bool = True, **extra: Any) -> resilient_db.ConnectionProxy:
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
        conn = self.connect(plugins="")
        cur = conn.cursor()
        cur.execute(f"SELECT id, inst FROM {table}")
        rows = {int(r[0]): str(r[1]) for r in cur.fetchall()}
        conn.close()
        return rows


def failover_of(conn: resilient_db.ConnectionProxy) -> FailoverPlugin:
    found = conn.resilient.plugin("failover")
    assert isinstance(found, FailoverPlugin)
    return found


def tracker_of(conn: resilient_db.ConnectionProxy) -> ConnectionTrackerPlugin:
    found = conn.resilient.plugin("aurora_connection_tracker")
    assert isinstance(found, ConnectionTrackerPlugin)
    return found


def tracker_in_chain(conn: resilient_db.ConnectionProxy) -> bool:
    """Whether the tracker's layer is the outermost of the connection's statement chain."""
    handler = conn.resilient.pipeline.chains.execute
    return handler is not None and "ConnectionTrackerPlugin" in handler.__qualname__


def close_connections(env: Env) -> None:
    for conn in env.opened:
        with contextlib.suppress(Exception):
            conn.close()
    env.opened.clear()

def settle(cluster: Cluster, instance_ids: frozenset[str]) -> None:
    """The module's invariant, restored before and after each test (tests/clusters.py):
    :func:`settle_roles`, and the cluster endpoint naming the writer."""
    settle_roles(cluster, instance_ids)
    wait_until("the cluster endpoint naming the writer",
               lambda: resolve_name(cluster.writer_endpoint) == cluster.writer.address)


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: Cluster.start("aurora-pg", readers=2, timeline=TIMELINE),
                       settle) as shared:
        yield shared


@pytest.fixture(scope="module")
def mysql_cluster() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: Cluster.start("aurora-mysql", readers=2, timeline=TIMELINE),
                       settle) as shared:
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
            _pg_read_only,
            "INSERT INTO {t} VALUES (%s, pg_catalog.aurora_db_instance_identifier()) "
            "ON CONFLICT DO NOTHING")
    else:
        shared = request.getfixturevalue("mysql_cluster")
        cluster = shared.acquire()
        environment = Env(
            "mysql", cluster, mysql.connector.connect,
            {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"},
            "SELECT aurora_sim.aurora_server_id()", mysql.connector.errors.OperationalError,
            _mysql_read_only,
            "INSERT IGNORE INTO {t} VALUES (%s, aurora_sim.aurora_server_id())")
    yield environment
    close_connections(environment)
    shared.release()


def insert(env: Env, cur: Any, table: str, key: int) -> None:
    cur.execute(env.upsert.format(t=table), (key,))


def promoted(events: list[Any]) -> str:
    return str(next(e.instance for e in events if e.name == "promoted"))


@contextlib.contextmanager
def stale_cluster_dns(cluster: Cluster) -> Iterator[float]:
    """The cluster endpoint lags ``STALE_DNS`` seconds behind the next promotion; on the way
    out, wait until it names the writer again (so the next test starts with current DNS)."""
    since = time.monotonic()
    cluster.set_dns_staleness(STALE_DNS)
    try:
        yield since
    finally:
        cluster.set_dns_staleness(0.0)
        if cluster.events.events("promoted", since=since):
            cluster.events.wait_for("dns_updated", since=since, timeout=STALE_DNS + 30)


def assert_no_write_on_a_reader(env: Env, table: str, writers: set[str]) -> None:
    """Every row was written by an instance that was the writer when it wrote."""
    rows = env.rows(table)
    assert set(rows.values()) <= writers, f"a reader accepted a write: {rows}"


# --- aurora_connection_tracker ------------------------------------------------------------------


TRACKED = "aurora_connection_tracker,failover"


@pytest.mark.real_server
def test_tracker_recycles_connections_left_on_the_old_writer(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    old = cluster.writer.id
    # The fast-refreshing connections first: they start a fresh monitor at their rate
    # (see MONITOR_RACE).
    resilient_db.shutdown()
    idle = [env.connect(plugins=TRACKED, topology_refresh_ms=100) for _ in range(4)]
    table = env.table()
    cursors = [conn.cursor() for conn in idle]
    for key, cur in enumerate(cursors):
        insert(env, cur, table, key)
    in_tx = env.connect(plugins=TRACKED, autocommit=False)
    tx_cur = in_tx.cursor()
    insert(env, tx_cur, table, 100)  # a transaction is open on the old writer
    untracked = env.connect(plugins="failover")
    untracked_cur = untracked.cursor()
    insert(env, untracked_cur, table, 200)
    assert {env.instance(c) for c in [*idle, untracked]} == {old}
    monitor = failover_of(idle[0]).monitor()
    epoch = monitor.epoch
    # Zero cost while the writer stays: the tracker is not in the statement chain at all.
    assert not any(tracker_in_chain(c) for c in idle)

    new = promoted(cluster.failover())
    wait_until("the monitor publishing the new writer",
               lambda: monitor.epoch > epoch and monitor.writer is not None
               and monitor.writer.instance_id == new)
    marked = [d for d in sink.of_kind("tracker.marked")
              if d.attributes["resilient_db.topology.writer"] == new]
    assert marked and marked[-1].attributes["resilient_db.topology.writer_before"] == old
    assert marked[-1].attributes["resilient_db.tracker.marked"] >= 5
    assert all(tracker_in_chain(c) for c in idle)  # marked: in the chain until settled

    # Idle connections: moved before their next statement, which runs on the new writer.
    for key, (conn, cur) in enumerate(zip(idle, cursors, strict=True)):
        insert(env, cur, table, 10 + key)  # no error: the same cursor, rebound
        assert env.instance(conn) == new
        assert tracker_of(conn).recycled == 1 and tracker_of(conn).aborted == 0
        assert failover_of(conn).instance_id == new and not failover_of(conn).stale
    # A connection inside a transaction is aborted: its fate is unknown, it must not be moved
    # silently; the failover plugin says so and the connection is usable on the new writer.
    with pytest.raises(resilient_db.TransactionResolutionUnknownError):
        insert(env, tx_cur, table, 101)
    assert tracker_of(in_tx).aborted == 1
    insert(env, tx_cur, table, 102)
    in_tx.commit()
    assert env.instance(in_tx) == new
    # Without the tracker the application sees the failover on its next statement.
    with pytest.raises(resilient_db.FailoverSuccessError):
        insert(env, untracked_cur, table, 201)

    rows = env.rows(table)
    assert {k: rows[k] for k in range(4)} == dict.fromkeys(range(4), old)
    assert {k: rows[k] for k in range(10, 14)} == dict.fromkeys(range(10, 14), new)
    assert rows[102] == new and 100 not in rows and 101 not in rows
    assert_no_write_on_a_reader(env, table, {old, new})
    recycled = sink.of_kind("tracker.recycled")
    assert len(recycled) == 4
    assert {d.attributes["resilient_db.instance.id"] for d in recycled} == {new}
    # Settled connections left the execute chain again: no per-statement cost.
    assert all(tracker_of(c).dormant() for c in [*idle, in_tx])
    assert not any(tracker_in_chain(c) for c in [*idle, in_tx])


@pytest.mark.real_server
def test_tracker_leaves_connections_its_failover_already_moved(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    # A fresh monitor at the normal rate (30 s): it learns of the new writer only when this
    # connection's failover asks it to search, so the tracker cannot move the connection first.
    resilient_db.shutdown()
    conn = env.connect(plugins=TRACKED)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    time.sleep(0.3)  # let the monitor's first (immediate) refresh finish before the crash
    new = promoted(cluster.failover())
    with pytest.raises(resilient_db.FailoverSuccessError):
        cur.execute("SELECT 1")  # this connection's own failover moved it
    cur.execute("SELECT 1")
    cur.fetchall()
    assert env.instance(conn) == new
    # It was marked while failing over (still on the old writer then), and then left alone.
    assert any(d.attributes["resilient_db.topology.writer"] == new
               and d.attributes["resilient_db.tracker.marked"] >= 1
               for d in sink.of_kind("tracker.marked"))
    assert tracker_of(conn).recycled == 0 and tracker_of(conn).aborted == 0
    assert tracker_of(conn).dormant() and not tracker_in_chain(conn)


# --- initial_connection ---------------------------------------------------------------------------


@pytest.mark.real_server
def test_initial_connection_through_stale_cluster_endpoint_lands_on_the_writer(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    table = env.table()
    resilient_db.shutdown()  # no topology known in the process: DNS, then the role check
    old = cluster.writer
    with stale_cluster_dns(cluster) as since:
        new = promoted(cluster.failover())
        cluster.events.wait_for("rejoined_as_reader", since=since)
        assert resolve_name(cluster.writer_endpoint) == old.address
        plain = env.connect(cluster.writer_endpoint, plugins="")
        assert env.instance(plain) == old.id  # DNS leads to the demoted writer, a reader now
        conn = env.connect(cluster.writer_endpoint, plugins="initial_connection")
        assert env.instance(conn) == new
        insert(env, conn.cursor(), table, 1)
        assert resolve_name(cluster.writer_endpoint) == old.address  # still stale
    redirected = sink.of_kind("initial_connection.redirected")[-1]
    assert redirected.attributes["resilient_db.instance.id"] == new
    assert any("is a reader" in a
               for a in redirected.attributes["resilient_db.initial_connection.attempts"])
    assert env.rows(table) == {1: new}


@pytest.mark.real_server
def test_initial_connection_while_the_old_writer_is_still_down(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    """The cluster endpoint names a writer that is gone and no topology is known in the
    process: the reader endpoint leads to a reader whose topology names the new writer."""
    cluster = env.cluster
    table = env.table()
    resilient_db.shutdown()
    old = cluster.writer
    timeline = cluster.timeline
    cluster.timeline = dataclasses.replace(timeline, rejoin_delay=None)  # stays down
    try:
        with stale_cluster_dns(cluster):
            new = promoted(cluster.failover())
            assert resolve_name(cluster.writer_endpoint) == old.address
            assert cluster.instance(old.id).role == "stopped"
            conn = env.connect(cluster.writer_endpoint, plugins="initial_connection")
            assert env.instance(conn) == new
            insert(env, conn.cursor(), table, 1)
            redirected = sink.of_kind("initial_connection.redirected")[-1]
            attempts = redirected.attributes["resilient_db.initial_connection.attempts"]
            assert attempts[0] == f"{cluster.writer_endpoint}:{cluster.port} connect failed"
            assert f"{cluster.reader_endpoint}:{cluster.port} connected, but is a reader" in (
                attempts)
    finally:
        cluster.timeline = timeline
        if cluster.instance(old.id).role == "stopped":
            cluster.start_instance(old.id)  # rejoins as a reader
    assert env.rows(table) == {1: new}


@pytest.mark.real_server
def test_initial_connection_reader_endpoint_lands_on_a_reader(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    table = env.table()
    readers = {r.id for r in cluster.readers}
    conn = env.connect(cluster.reader_endpoint, plugins="initial_connection")
    assert env.instance(conn) in readers
    assert sink.of_kind("initial_connection.verified")
    with pytest.raises(Exception) as info:
        insert(env, conn.cursor(), table, 1)
    assert env.read_only_error(info.value) and not isinstance(info.value, resilient_db.Error)
    # Once the cluster's topology is known in the process, readers are chosen with the
    # strategy, without DNS: round robin alternates between the two readers.
    seed = env.connect(cluster.reader_endpoint, plugins="failover")
    monitor = failover_of(seed).monitor()

    def known() -> bool:
        snapshot = monitor.snapshot
        return snapshot is not None and len(snapshot.readers) == len(readers)

    wait_until("the topology known", known)
    landed = [env.instance(env.connect(
        cluster.reader_endpoint, plugins="initial_connection",
        initial_connection_host_selector_strategy="round_robin")) for _ in range(4)]
    assert set(landed) == readers
    assert all(a != b for a, b in itertools.pairwise(landed))
    assert len(sink.of_kind("initial_connection.redirected")) >= 4
    assert env.rows(table) == {}


@pytest.mark.real_server
def test_initial_connection_least_connections_balances_the_readers(env: Env) -> None:
    """least_connections counts every open application connection of the process per
    instance (whatever its plugins): new reader connections go to the least busy reader."""
    cluster = env.cluster
    readers = {r.id for r in cluster.readers}
    seed = env.connect(cluster.reader_endpoint, plugins="failover")
    monitor = failover_of(seed).monitor()

    def known() -> bool:
        snapshot = monitor.snapshot
        return snapshot is not None and len(snapshot.readers) == len(readers)

    wait_until("the topology known", known)
    busy = cluster.readers[0]
    pinned = [env.connect(busy.endpoint, plugins="") for _ in range(6)]
    assert {env.instance(c) for c in pinned} == {busy.id}
    landed = [env.instance(env.connect(
        cluster.reader_endpoint, plugins="initial_connection",
        initial_connection_host_selector_strategy="least_connections")) for _ in range(10)]
    # The first six avoid the busy reader (random would hit it half the time); then the
    # readers take turns, so the totals end up even.
    assert busy.id not in landed[:6], landed
    totals = Counter(landed) + Counter({busy.id: len(pinned)})
    assert set(totals) <= readers
    assert max(totals[r] for r in readers) - min(totals[r] for r in readers) <= 1, totals


@pytest.mark.real_server
def test_initial_connection_reader_endpoint_falls_back_to_the_writer(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    table = env.table()
    writer = cluster.writer.id
    readers = [r.id for r in cluster.readers]
    for reader in readers:
        cluster.kill_instance(reader)
    try:
        conn = env.connect(cluster.reader_endpoint, plugins="initial_connection",
                           open_connection_retry_timeout_ms=10_000)
        assert env.instance(conn) == writer
        insert(env, conn.cursor(), table, 1)  # it is the writer: the write is accepted
        fallback = sink.of_kind("initial_connection.writer_fallback")
        assert fallback and fallback[-1].attributes["resilient_db.instance.id"] == writer
    finally:
        for reader in readers:
            cluster.start_instance(reader)
    assert env.rows(table) == {1: writer}


@pytest.mark.real_server
def test_initial_connection_gives_up_when_its_window_ends(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    resilient_db.shutdown()  # no topology known: only the (dead) endpoint to try
    writer = cluster.writer.id
    cluster.kill_instance(writer)  # no promotion: the cluster endpoint leads nowhere
    try:
        start = time.monotonic()
        with pytest.raises(resilient_db.FailoverFailedError) as info:
            env.connect(cluster.writer_endpoint, plugins="initial_connection",
                        open_connection_retry_timeout_ms=1500,
                        open_connection_retry_interval_ms=300)
        elapsed = time.monotonic() - start
    finally:
        cluster.start_instance(writer)
    assert 1.5 <= elapsed < 1.5 + 10, elapsed  # the window was used in full, and not overrun
    assert isinstance(info.value, env.operational_error)
    assert "open_connection_retry_timeout_ms=1500" in str(info.value)
    assert len(info.value.attempts) >= 3  # several rounds, each listed
    # Each round: the cluster endpoint (refused), the reader endpoint to learn the topology
    # (a reader), then the writer that topology names (refused).
    outcomes = {(a.host, a.outcome) for a in info.value.attempts}
    assert (cluster.writer_endpoint, "connect failed") in outcomes
    assert (cluster.instance(writer).endpoint, "connect failed") in outcomes
    assert (cluster.reader_endpoint, "connected, but is a reader") in outcomes
    assert all(a.outcome in ("connect failed", "connected, but is a reader")
               for a in info.value.attempts)
    assert info.value.__cause__ is not None
    gave_up = sink.of_kind("initial_connection.gave_up")
    assert gave_up and gave_up[-1].attributes["resilient_db.initial_connection.rounds"] >= 3


# --- stale_dns ----------------------------------------------------------------------------------


@pytest.mark.real_server
def test_stale_dns_connects_to_the_verified_writer(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    old = cluster.writer
    # First: it starts a fresh monitor at its fast rate (see MONITOR_RACE).
    resilient_db.shutdown()
    first = env.connect(cluster.writer_endpoint, plugins="failover", topology_refresh_ms=100)
    table = env.table()
    monitor = failover_of(first).monitor()
    with stale_cluster_dns(cluster) as since:
        new = promoted(cluster.failover())
        wait_until("the monitor verifying the new writer",
                   lambda: monitor.writer is not None and monitor.writer.instance_id == new)
        # The monitor knows the writer: DNS is compared with it before connecting.
        assert resolve_name(cluster.writer_endpoint) == old.address, (
            time.monotonic() - since, cluster.events.events(since=since))
        conn = env.connect(cluster.writer_endpoint, plugins="stale_dns,failover")
        assert env.instance(conn) == new
        insert(env, conn.cursor(), table, 1)
        plugin = conn.resilient.plugin("stale_dns")
        assert isinstance(plugin, StaleDnsPlugin) and plugin.redirected == 1
        decision = sink.of_kind("stale_dns.redirected")[-1]
        assert decision.attributes["resilient_db.instance.id"] == new
        assert decision.attributes["resilient_db.stale_dns.resolved"] == (old.address,)
        assert "verified" in decision.attributes["resilient_db.stale_dns.reason"]
        # No monitor (a fresh process): through DNS to the demoted writer, now a reader,
        # whose own topology names the new writer.
        cluster.events.wait_for("rejoined_as_reader", since=since)
        resilient_db.shutdown()
        conn = env.connect(cluster.writer_endpoint, plugins="stale_dns")
        assert env.instance(conn) == new
        insert(env, conn.cursor(), table, 2)
        decision = sink.of_kind("stale_dns.redirected")[-1]
        assert "a reader" in decision.attributes["resilient_db.stale_dns.reason"]
        assert resolve_name(cluster.writer_endpoint) == old.address  # still stale
    assert env.rows(table) == {1: new, 2: new}


@pytest.mark.real_server
def test_stale_dns_does_nothing_while_dns_is_current(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    first = env.connect(cluster.writer_endpoint, plugins="failover")
    monitor = failover_of(first).monitor()
    wait_until("the writer verified", lambda: monitor.writer is not None)
    conn = env.connect(cluster.writer_endpoint, plugins="stale_dns,failover")
    assert env.instance(conn) == cluster.writer.id
    plugin = conn.resilient.plugin("stale_dns")
    assert isinstance(plugin, StaleDnsPlugin) and plugin.redirected == 0
    assert not sink.of_kind("stale_dns.redirected")
    # Any other kind of host name: the plugin is dormant (not in the connect chain).
    other = env.connect(cluster.writer.endpoint, plugins="stale_dns")
    dormant = other.resilient.plugin("stale_dns")
    assert isinstance(dormant, StaleDnsPlugin) and dormant.dormant()


# --- failover through the reader endpoint -------------------------------------------------------


@pytest.mark.real_server
def test_failover_default_mode_through_the_reader_endpoint_is_reader_or_writer(
        env: Env) -> None:
    cluster = env.cluster
    table = env.table()
    writer = cluster.writer.id
    conn = env.connect(cluster.reader_endpoint, plugins="initial_connection,failover")
    assert failover_of(conn).mode is FailoverMode.READER_OR_WRITER
    first = env.instance(conn)
    (other,) = {r.id for r in cluster.readers} - {first}
    cur = conn.cursor()
    # A write on a reader is the application's error in a reader mode: untouched, no failover.
    with pytest.raises(Exception) as refused:
        insert(env, cur, table, 1)
    assert env.read_only_error(refused.value)
    assert not isinstance(refused.value, resilient_db.Error)
    assert failover_of(conn).failovers == 0
    cluster.kill_instance(first)
    try:
        with pytest.raises(resilient_db.FailoverSuccessError) as info:
            cur.execute("SELECT 1")
        assert isinstance(info.value, env.operational_error)
        landed = env.instance(conn)
        assert landed == other != writer  # a reader first, the writer only as a last resort
        assert failover_of(conn).role is Role.READER
    finally:
        cluster.start_instance(first)
    assert env.rows(table) == {}


# --- unit tests ---------------------------------------------------------------------------------


def _host(name: str, role: Role = Role.READER, lag: float | None = None) -> Host:
    return Host(f"{name}.example", 5432, instance_id=name, role=role, lag=lag)


TOPOLOGY = TopologySnapshot((_host("w", Role.WRITER), _host("r1"), _host("r2"), _host("r3")))


@pytest.mark.unit
@pytest.mark.parametrize(("kind", "verify", "expected"), [
    (EndpointKind.CLUSTER_WRITER, None, Role.WRITER),
    (EndpointKind.GLOBAL_WRITER, None, Role.WRITER),
    (EndpointKind.CLUSTER_READER, None, Role.READER),
    (EndpointKind.INSTANCE, None, None),
    (EndpointKind.IP, None, None),
    (EndpointKind.CUSTOM, None, None),
    (EndpointKind.CLUSTER_READER, "none", None),
    (EndpointKind.INSTANCE, "writer", Role.WRITER),
    (EndpointKind.CLUSTER_WRITER, "reader", Role.READER),
])
def test_wanted_role(kind: EndpointKind, verify: str | None, expected: Role | None) -> None:
    assert wanted_role(kind, verify) is expected


@pytest.mark.unit
def test_candidates_for_a_writer_is_the_writer_only() -> None:
    ctx = SelectionContext(rng=random.Random(1))
    hosts, choice = candidates(Role.WRITER, TOPOLOGY, strategy_from_name("random"), ctx)
    assert [h.instance_id for h in hosts] == ["w"] and choice is None
    hosts, _ = candidates(Role.WRITER, TOPOLOGY, strategy_from_name("random"), ctx,
                          exclude=frozenset({"w.example:5432"}))
    assert hosts == ()
    assert candidates(Role.WRITER, None, strategy_from_name("random"), ctx) == ((), None)


@pytest.mark.unit
def test_candidates_for_a_reader_follow_the_strategy_then_the_writer_last() -> None:
    cursor = RoundRobinCursor()
    ctx = SelectionContext(rng=random.Random(1), cursor=cursor)
    strategy = strategy_from_name("round_robin")
    firsts = []
    for _ in range(4):
        hosts, choice = candidates(Role.READER, TOPOLOGY, strategy, ctx)
        assert choice is not None and choice.host == hosts[0]
        assert hosts[-1].instance_id == "w"  # the writer, as the last resort
        assert sorted(h.instance_id or "" for h in hosts[:-1]) == ["r1", "r2", "r3"]
        firsts.append(hosts[0].instance_id)
    assert firsts == ["r1", "r2", "r3", "r1"]
    # Cooling readers are never chosen first and come after the others; tried ones are out.
    hosts, _ = candidates(Role.READER, TOPOLOGY, strategy_from_name("random"), ctx,
                          cooling=frozenset({"r1.example:5432"}),
                          exclude=frozenset({"r2.example:5432"}))
    assert [h.instance_id for h in hosts] == ["r3", "r1", "w"]


@pytest.mark.unit
def test_candidates_respect_the_replica_lag_cap() -> None:
    lagged = TopologySnapshot((_host("w", Role.WRITER), _host("r1", lag=30.0),
                               _host("r2", lag=0.1)))
    ctx = SelectionContext(rng=random.Random(3))
    for _ in range(5):
        hosts, _ = candidates(Role.READER, lagged, strategy_from_name("random"), ctx,
                              max_lag=1.0)
        assert [h.instance_id for h in hosts] == ["r2", "r1", "w"]


@pytest.mark.unit
def test_candidates_without_readers_offer_the_writer() -> None:
    alone = TopologySnapshot((_host("w", Role.WRITER),))
    hosts, choice = candidates(Role.READER, alone, strategy_from_name("random"),
                               SelectionContext())
    assert [h.instance_id for h in hosts] == ["w"]
    assert choice is not None and choice.host is None


@pytest.mark.unit
def test_is_stale() -> None:
    assert is_stale(frozenset({"10.0.0.1"}), frozenset({"10.0.0.2"}))
    assert not is_stale(frozenset({"10.0.0.1", "10.0.0.2"}), frozenset({"10.0.0.2"}))
    assert not is_stale(frozenset(), frozenset({"10.0.0.2"}))  # unresolvable: not stale
    assert not is_stale(frozenset({"10.0.0.1"}), frozenset())


@pytest.mark.unit
def test_codes_are_built_in_and_ordered() -> None:
    codes = ("aurora_connection_tracker", "initial_connection", "stale_dns")
    assert all(code in BUILTIN and code not in PLANNED for code in codes)
    classes = resolve(["failover", "stale_dns", "aurora_connection_tracker",
                       "initial_connection"])
    assert [c.code for c in classes] == ["initial_connection", "aurora_connection_tracker",
                                         "stale_dns", "failover"]


@pytest.mark.unit
@pytest.mark.parametrize(("name", "value"), [
    ("initial_connection_host_selector_strategy", "fastest"),
    ("reader_initial_connection_host_selector_strategy", "nearest"),
    ("verify_opened_connection_type", "primary"),
    ("open_connection_retry_timeout_ms", -1),
    ("open_connection_retry_interval_ms", -5),
    ("open_connection_retry_interval_ms", 0),
    ("open_connection_retry_timeout_ms", "soon"),
    ("initial_connection_host_selector_strategy", "fastest_response"),
    ("response_measurement_interval_ms", 50),
    ("response_measurement_interval_ms", "often"),
    ("initial_connection_host_selector_strategy", "highest_weight"),
    ("initial_connection_host_selector_strategy", "weighted_random"),
    ("weighted_random_host_weight_pairs", "instance-1:0"),
    ("round_robin_host_weight_pairs", "instance-1"),
    ("round_robin_default_weight", 0),
])
def test_bad_input_names_the_parameter(name: str, value: object) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, plugins="initial_connection",
                             host="db.cluster-abc123.us-east-1.rds.amazonaws.com", **kwargs)
    assert info.value.parameter == name
    assert name in str(info.value)


@pytest.mark.unit
@pytest.mark.parametrize("strategy", ["fastest_response", "highest_weight", "weighted_random"])
def test_failover_refuses_a_strategy_that_would_act_as_random(strategy: str) -> None:
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, plugins="failover",
                             host="db.cluster-abc123.us-east-1.rds.amazonaws.com",
                             failover_reader_host_selector_strategy=strategy)
    assert info.value.parameter == "failover_reader_host_selector_strategy"


@pytest.mark.unit
def test_tracker_does_not_keep_connections_alive() -> None:
    """Trackers are held weakly: a dropped connection leaves the process-wide set."""
    from resilient_db._pipeline import PluginContext
    from resilient_db._properties import Settings
    from resilient_db.drivers import driver_for
    from resilient_db.plugins import aurora_connection_tracker as module

    ctx = PluginContext(Settings({}), driver_for(psycopg.Connection.connect, None),
                        resilient_db.HostSpec("h"))
    before = module.tracked()
    plugin = ConnectionTrackerPlugin(ctx)
    assert module.tracked() == before + 1 and plugin.dormant()
    del plugin
    assert module.tracked() == before


@pytest.mark.unit
def test_writer_listener_is_registered_once() -> None:
    from resilient_db.plugins import aurora_connection_tracker as module

    topology.add_writer_listener(module._on_writer_changed)
    topology.add_writer_listener(module._on_writer_changed)
    assert topology._writer_listeners.count(module._on_writer_changed) == 1
