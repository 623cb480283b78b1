"""gdb_failover and gdb_rw end to end on a simulated Aurora Global Database (PostgreSQL, and
the Aurora MySQL look-alike on MariaDB): a primary cluster in us-east-1 (writer + one reader)
and a secondary cluster in us-west-2 (one reader) replicating from it.

Planned global switchover and unplanned global failover under a write workload (no
acknowledged write lost, none accepted by a reader), the home-region modes choosing the right
instances, and gdb_rw keeping reads in the home region and writes on the global writer."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import topology
from resilient_db.plugins.gdb_failover import GdbFailoverPlugin
from simulator.cluster import Cluster, Timeline

from .clusters import SharedCluster, settle_global
from .waiting import wait_until

pytestmark = pytest.mark.real_server

TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)
HOME = "us-east-1"
AWAY = "us-west-2"


@dataclass
class Env:
    """The global database and how the application talks to it."""

    name: str  # "pg" | "mysql"
    cluster: Cluster
    target: Callable[..., Any]
    extra: dict[str, Any]
    instance_sql: str
    reader_sql: str  # true on a reader
    upsert: str
    read_only_error: Callable[[BaseException], bool]
    opened: list[Any] = field(default_factory=list)

    def connect(self, endpoint: str, *, plugins: str = "gdb_failover",
                **extra: Any) -> resilient_db.ConnectionProxy:
        kwargs = {**self.cluster.connect_kwargs(endpoint), **self.extra, "autocommit": True,
                  "connect_timeout": 5,
                  "global_cluster_instance_host_patterns": self.cluster.global_host_patterns,
                  "failover_timeout_sec": 60, **extra}
        conn = resilient_db.connect(self.target, plugins=plugins, **kwargs)
        self.opened.append(conn)
        return conn

    def one(self, conn: resilient_db.ConnectionProxy, sql: str) -> Any:
        cur = conn.cursor()
        cur.execute(sql)
        row = cur.fetchone()
        cur.close()
        return row[0]

    def instance(self, conn: resilient_db.ConnectionProxy) -> str:
        return str(self.one(conn, self.instance_sql))

    def is_reader(self, conn: resilient_db.ConnectionProxy) -> bool:
        return bool(int(self.one(conn, self.reader_sql)))

    def region(self, instance_id: str) -> str:
        return self.cluster.region_of(self.cluster.instance(instance_id))

    def table(self) -> str:
        name = f"t{time.monotonic_ns()}"
        conn = self.connect(self.cluster.global_writer_endpoint, failover_home_region=HOME)
        cur = conn.cursor()
        cur.execute(f"CREATE TABLE {name} (id int primary key, inst varchar(64))")
        conn.close()
        return name

    def rows(self, table: str) -> dict[int, str]:
        conn = self.connect(self.cluster.global_writer_endpoint, failover_home_region=HOME)
        cur = conn.cursor()
        cur.execute(f"SELECT id, inst FROM {table}")
        rows = {int(r[0]): str(r[1]) for r in cur.fetchall()}
        conn.close()
        return rows


#: The module's invariant, restored before and after each test (tests/clusters.py): the
#: instances it started with, us-east-1 primary with instance-1 its writer, every reader
#: following it and caught up.
settle_cluster = settle_global(HOME, "instance-1")


def close_connections(env: Env) -> None:
    for conn in env.opened:
        with contextlib.suppress(Exception):
            conn.close()
    env.opened.clear()


def _start(flavour: str) -> Cluster:
    cluster = Cluster.start(flavour, readers=1, region=HOME, timeline=TIMELINE)
    try:
        cluster.add_secondary_region(AWAY, 1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def pg_global() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: _start("aurora-pg"), settle_cluster) as shared:
        yield shared


@pytest.fixture(scope="module")
def mysql_global() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: _start("aurora-mysql"), settle_cluster) as shared:
        yield shared


@pytest.fixture(params=["pg", "mysql"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """The module's global database, settled before and after the test (a cluster that cannot
    be settled is replaced, and the test that broke it fails at teardown: tests/clusters.py),
    with fresh topology monitors: settling may have switched the writer back behind their
    back, and a monitor naming the old writer would mislead the next test until its next
    refresh."""
    shared: SharedCluster = request.getfixturevalue(f"{request.param}_global")
    cluster = shared.acquire()
    topology.stop_all()
    if request.param == "pg":
        environment = Env(
            "pg", cluster, psycopg.Connection.connect, {},
            "SELECT pg_catalog.aurora_db_instance_identifier()",
            "SELECT pg_catalog.pg_is_in_recovery()::int",
            "INSERT INTO {t} VALUES (%s, pg_catalog.aurora_db_instance_identifier()) "
            "ON CONFLICT DO NOTHING",
            lambda exc: isinstance(exc, psycopg.errors.ReadOnlySqlTransaction))
    else:
        environment = Env(
            "mysql", cluster, mysql.connector.connect,
            {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"},
            "SELECT aurora_sim.aurora_server_id()", "SELECT @@read_only",
            "INSERT IGNORE INTO {t} VALUES (%s, aurora_sim.aurora_server_id())",
            lambda exc: isinstance(exc, mysql.connector.Error) and exc.errno in (
                1290, 1792, 1836))
    yield environment
    close_connections(environment)
    try:
        shared.release()
    finally:
        topology.stop_all()


def gdb(conn: resilient_db.ConnectionProxy) -> GdbFailoverPlugin:
    found = conn.resilient.plugin("gdb_failover")
    assert isinstance(found, GdbFailoverPlugin)
    return found


def moved(env: Env, conn: resilient_db.ConnectionProxy) -> str:
    """The instance ``conn`` is on after a failover it has yet to notice. psycopg raises
    ``FailoverSuccessError`` at the next statement; mysql-connector pings the server when a
    cursor is opened, and failover moves a connection lost there silently (no statement was
    interrupted)."""
    try:
        env.instance(conn)
    except resilient_db.FailoverSuccessError:
        assert env.name == "pg"
    assert gdb(conn).failovers == 1
    return env.instance(conn)


def modes(sink: resilient_db.CollectingSink) -> list[tuple[bool, str]]:
    return [(d.attributes["resilient_db.gdb.home_active"],
             d.attributes["resilient_db.failover.mode"])
            for d in sink.of_kind("gdb_failover.mode")]


# --- the simulator's global topology --------------------------------------------------------


def test_global_topology_lists_every_region(env: Env) -> None:
    cluster = env.cluster
    sql = ("SELECT server_id, session_id, aws_region FROM "
           "pg_catalog.aurora_global_db_instance_status() ORDER BY server_id"
           if env.name == "pg" else
           "SELECT SERVER_ID, SESSION_ID, AWS_REGION FROM "
           "aurora_sim.aurora_global_db_instance_status ORDER BY SERVER_ID")
    for instance in cluster.instances.values():  # the same answer from every instance
        with cluster.superuser(instance.id) as conn:
            cur = conn.cursor()
            rows = wait_until_rows(cur, sql, 3)
        assert [(r[0], r[1] == "MASTER_SESSION_ID", r[2]) for r in rows] == [
            ("instance-1", True, HOME), ("instance-2", False, HOME),
            ("instance-3", False, AWAY)]


def test_settle_brings_back_the_home_writer(env: Env) -> None:
    """What a test may leave behind (the primary region moved away, an instance killed) is
    undone by the module's settle: the next test starts from instance-1 writing in
    us-east-1 (tests/clusters.py)."""
    cluster = env.cluster
    cluster.switchover_global(AWAY)
    cluster.kill_instance("instance-2")
    assert cluster.primary_region == AWAY and cluster.writer.id == "instance-3"
    settle_cluster(cluster, frozenset(cluster.instances))
    assert cluster.primary_region == HOME and cluster.writer.id == "instance-1"
    assert cluster.settled()
    assert sorted(r.id for r in cluster.readers) == ["instance-2", "instance-3"]


def wait_until_rows(cur: Any, sql: str, count: int) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []

    def enough() -> bool:
        nonlocal rows
        cur.execute(sql)
        rows = [tuple(r) for r in cur.fetchall()]
        return len(rows) == count

    wait_until(f"{count} topology rows", enough)
    return rows


# --- gdb_failover ---------------------------------------------------------------------------


def _workload(env: Env, conn: resilient_db.ConnectionProxy, table: str,
              acked: dict[int, str], errors: list[BaseException], refused: list[int],
              retried: list[int], stop: threading.Event) -> threading.Thread:
    """Idempotent inserts; a read-only refusal is retried (a planned switchover first turns
    the writer read-only: the writer refuses writes until the new one is promoted, and
    failover does not treat a writer's read-only error as a failure)."""
    cur = conn.cursor()

    def write() -> None:
        key = 0
        while not stop.is_set():
            key += 1
            try:
                with resilient_db.call_options(idempotent=True):
                    cur.execute(env.upsert.format(t=table), (key,))
                acked[key] = gdb(conn).instance_id or "?"
            except resilient_db.FailoverSuccessError:
                # Moved without an open transaction: the application runs it again (a
                # read-only refusal that failed over is not retried transparently).
                retried.append(key)
            except BaseException as exc:
                if env.read_only_error(exc) and len(refused) < 10_000:
                    refused.append(key)
                    stop.wait(0.01)  # back-off of the application's retry loop
                    continue
                errors.append(exc)
                return

    thread = threading.Thread(target=write)
    thread.start()
    return thread


@pytest.mark.parametrize("kind", ["planned", "unplanned"])
def test_global_failover_under_a_write_workload_follows_the_writer(
        env: Env, kind: str, sink: resilient_db.CollectingSink) -> None:
    """strict-writer in and out of home: writes continue on the new primary region's writer;
    no acknowledged write is lost and no reader accepted one."""
    cluster = env.cluster
    table = env.table()
    conn = env.connect(cluster.writer_endpoint, active_home_failover_mode="strict-writer",
                       inactive_home_failover_mode="strict-writer")
    assert gdb(conn).home == HOME  # from the us-east-1 cluster endpoint's name
    acked: dict[int, str] = {}
    errors: list[BaseException] = []
    refused: list[int] = []
    retried: list[int] = []
    stop = threading.Event()
    thread = _workload(env, conn, table, acked, errors, refused, retried, stop)
    try:
        wait_until("writes on the first writer", lambda: len(acked) >= 5)
        old = cluster.writer.id
        if kind == "planned":
            cluster.switchover_global(AWAY)
        else:
            cluster.failover_global(AWAY)
        new = cluster.writer.id
        assert env.region(new) == AWAY
        wait_until("writes on the new primary region's writer",
                   lambda: new in acked.values() or errors, timeout=60)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert not (set(refused) | set(retried)) & set(acked)
    assert len(retried) <= 2  # at most once per failover (the graceful stop, the promotion)
    if kind == "unplanned":
        assert not refused  # no writer turned read-only: it was lost
    rows = env.rows(table)
    assert set(acked) <= set(rows), "an acknowledged write was lost"
    assert set(rows.values()) <= {old, new}, "a reader accepted a write"
    assert gdb(conn).failovers >= 1
    # The last round saw the primary region elsewhere: the inactive-home mode applied.
    assert modes(sink)[-1] == (False, "strict-writer")


def test_inactive_home_strict_home_reader_stays_in_the_home_region(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    """Example 3 of the AWS docs turned around: follow the writer while it is home; once the
    primary region moved away, serve reads from a home-region reader instead."""
    cluster = env.cluster
    conn = env.connect(cluster.writer_endpoint, active_home_failover_mode="strict-writer",
                       inactive_home_failover_mode="strict-home-reader")
    assert env.instance(conn) == "instance-1"
    cluster.switchover_global(AWAY)
    moved(env, conn)
    now = env.instance(conn)
    assert env.region(now) == HOME and env.is_reader(conn)
    assert modes(sink)[-1] == (False, "strict-home-reader")
    decision = gdb(conn).last_decision
    assert decision is not None and decision.primary == AWAY


def test_strict_out_of_home_reader_never_picks_the_writer(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    """Home us-west-2 (whose only instance is a reader), inactive (the primary is us-east-1):
    when that reader fails, strict-out-of-home-reader moves to us-east-1's reader, not to
    its writer."""
    cluster = env.cluster
    conn = env.connect(cluster.region_reader_endpoint(AWAY),
                       inactive_home_failover_mode="strict-out-of-home-reader")
    assert gdb(conn).home == AWAY
    assert env.instance(conn) == "instance-3"
    cluster.kill_instance("instance-3")
    moved(env, conn)
    assert env.instance(conn) == "instance-2" and env.is_reader(conn)
    assert modes(sink)[-1] == (False, "strict-out-of-home-reader")


def test_home_reader_or_writer_falls_back_to_the_writer(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    """Home us-west-2, its reader down: home-reader-or-writer takes the writer (us-east-1)."""
    cluster = env.cluster
    conn = env.connect(cluster.region_reader_endpoint(AWAY))  # default mode for a reader name
    assert gdb(conn).inactive_mode.value == "home-reader-or-writer"
    cluster.kill_instance("instance-3")
    moved(env, conn)
    assert env.instance(conn) == cluster.writer.id == "instance-1"
    assert modes(sink)[-1] == (False, "home-reader-or-writer")


def test_failover_with_global_patterns_follows_the_writer_across_regions(env: Env) -> None:
    """The plain failover plugin reads the global topology once
    global_cluster_instance_host_patterns is set."""
    cluster = env.cluster
    conn = env.connect(cluster.writer_endpoint, plugins="failover")
    assert env.instance(conn) == "instance-1"
    cluster.switchover_global(AWAY)
    try:
        env.instance(conn)
    except resilient_db.FailoverSuccessError:
        assert env.name == "pg"
    assert env.instance(conn) == cluster.writer.id and env.region(cluster.writer.id) == AWAY


# --- gdb_rw ---------------------------------------------------------------------------------


@pytest.mark.parametrize("plugins", ["gdb_rw,gdb_failover", "gdb_rw,failover"])
def test_gdb_rw_reads_in_the_home_region_and_writes_on_the_global_writer(
        env: Env, plugins: str) -> None:
    """With gdb_failover or failover (which reads the global topology when gdb_rw is
    selected)."""
    cluster = env.cluster
    table = env.table()
    conn = env.connect(cluster.writer_endpoint, plugins=plugins)
    cur = conn.cursor()
    cur.execute(env.upsert.format(t=table), (1,))
    seen: set[str] = set()
    for _ in range(6):
        conn.read_only = True
        seen.add(env.instance(conn))
        assert env.is_reader(conn)
        conn.read_only = False
        assert env.instance(conn) == "instance-1"
    assert seen == {"instance-2"}  # the home region's reader, never us-west-2's
    cur.execute(env.upsert.format(t=table), (2,))
    assert env.rows(table) == {1: "instance-1", 2: "instance-1"}


def test_gdb_rw_refuses_a_writer_outside_the_home_region(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    conn = env.connect(cluster.region_reader_endpoint(AWAY), plugins="gdb_rw,gdb_failover")
    conn.read_only = True
    assert env.instance(conn) == "instance-3"
    with pytest.raises(resilient_db.ReadWriteSplittingError) as info:
        conn.read_only = False
    assert info.value.reason == "writer_out_of_home", str(info.value)
    assert env.instance(conn) == "instance-3"  # stayed, usable
    assert sink.of_kind("gdb_rw.writer_refused")
    # Allowed to follow the writer out of home: the switch goes to us-east-1's writer.
    free = env.connect(cluster.region_reader_endpoint(AWAY), plugins="gdb_rw,gdb_failover",
                       gdb_rw_restrict_writer_to_home_region=False)
    free.read_only = True
    free.read_only = False
    assert env.instance(free) == "instance-1" and not env.is_reader(free)
    # Once us-west-2 is the primary region the home writer is allowed.
    cluster.switchover_global(AWAY)
    writer = cluster.writer.id
    home = env.connect(cluster.region_writer_endpoint(AWAY), plugins="gdb_rw,gdb_failover")
    home.read_only = True
    home.read_only = False
    assert env.instance(home) == writer and env.region(writer) == AWAY


def test_gdb_rw_finds_the_writer_when_the_known_one_answers_as_a_reader(env: Env) -> None:
    """A global switchover the topology monitor has not seen yet (it refreshes every 30 s and
    none of its connections failed): switching to the writer it knows reaches a reader, so the
    monitor looks again and the writer it verifies is used."""
    cluster = env.cluster
    # The monitor must not refresh between its first read and the switch below: a 10-minute
    # rate, and the switchover only once that first read verified instance-1 (under load the
    # monitor thread's first read can come after the switchover and see it).
    conn = env.connect(cluster.region_reader_endpoint(AWAY), plugins="gdb_rw,gdb_failover",
                       gdb_rw_restrict_writer_to_home_region=False,
                       topology_refresh_ms=600_000)
    conn.read_only = True
    assert env.instance(conn) == "instance-3"
    monitor = gdb(conn).monitor()
    wait_until("the monitor verified the writer itself",
               lambda: monitor.verified_at > 0 and monitor.writer is not None
               and monitor.writer.instance_id == "instance-1", timeout=60)
    cluster.switchover_global(AWAY)
    wait_until("the old writer back as a reader", cluster.settled)
    known = monitor.writer
    assert known is not None and known.instance_id == "instance-1"  # not seen yet
    conn.read_only = False
    assert env.instance(conn) == cluster.writer.id == "instance-3"
    assert not env.is_reader(conn)
