"""The MariaDB cluster engine (simulator.mysql_cluster) against real servers: the interface the
dialects read (from the writer and from every reader), control-plane timelines, durability
across failovers, read-only readers, and cleanup.

One cluster per flavour serves the module; ``mz`` and ``au`` restore it before and after each
test (tests.clusters), so a test that fails half-way cannot fail the next one. What the
control plane writes on the writer reaches a reader by replication: tests wait for it there
(tests.waiting), they never assume it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import mysql.connector
import pytest

import resilient_db
from resilient_db.dialects import (
    DatabaseDialect,
    aurora_mysql_lookalike,
    detect,
    get_dialect,
    verify,
)
from resilient_db.drivers import DriverDialect, get_driver
from simulator._addresses import claim_is_held
from simulator.cluster import Cluster, ClusterError, Instance, Timeline, connect_runtime
from simulator.events import Event
from simulator.local import LocalServer
from simulator.mysql_cluster import LOOKALIKE_SCHEMA, MysqlClusterEngine
from simulator.names import HostsFile

from .clusters import BACKENDS, SharedCluster, SharedClusters, cluster_options, start_stopped
from .waiting import wait_until as wait_for_condition

pytestmark = pytest.mark.real_server

DRIVER: DriverDialect = get_driver("mysql-connector")
LOOKALIKE = aurora_mysql_lookalike(LOOKALIKE_SCHEMA)
# Generous bounds (liveness, not speed: speed goals live in the report and benchmarks).
SETTLE_TIMEOUT = 30.0
#: A rejoin on the container backend starts a new container: up to 17 s for ``docker run``
#: alone with both cores busy.
REJOIN_TIMEOUT = 90.0
#: A promotion takes well under a second on a quiet machine; on a loaded 2-core one it can
#: queue behind server start-ups. The speed goal is benchmarks/failover_time.py's.
PROMOTION_BOUND = 30.0


# --------------------------------------------------------------------------------------------
# helpers


def engine_of(cluster: Cluster) -> MysqlClusterEngine:
    return cast(MysqlClusterEngine, cluster.engine)


def app_connect(cluster: Cluster, endpoint: str | None = None, **extra: Any) -> Any:
    """The application user, through a DNS name (default: the writer endpoint)."""
    return mysql.connector.connect(**{**cluster.connect_kwargs(endpoint), "use_pure": True,
                                      "autocommit": True, "connection_timeout": 5, **extra})


def query(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    cursor = conn.cursor()
    try:
        cursor.execute(sql)
        return [tuple(row) for row in cursor.fetchall()] if cursor.with_rows else []
    finally:
        cursor.close()


def on(cluster: Cluster, instance: Instance, sql: str) -> list[tuple[Any, ...]]:
    """``sql`` as the application user on one instance (through its instance endpoint)."""
    conn = app_connect(cluster, instance.endpoint)
    try:
        return query(conn, sql)
    finally:
        conn.close()


def wait_until(predicate: Any, timeout: float = SETTLE_TIMEOUT, what: str = "condition",
               describe: Any = None) -> None:
    """:func:`tests.waiting.wait_until`, reporting ``describe()`` (when given) on timeout."""
    try:
        wait_for_condition(what, predicate, timeout)
    except AssertionError as exc:
        if describe is None:
            raise
        raise AssertionError(f"{exc}; state: {describe()}") from None


def names(events: list[Event]) -> list[str]:
    return [event.name for event in events]


def in_order(events: list[Event], *expected: str) -> bool:
    """``expected`` occur in ``events`` in this order (other events may come between)."""
    remaining = iter(names(events))
    return all(name in remaining for name in expected)


def settle(cluster: Cluster, instance_ids: frozenset[str]) -> None:
    """Undo what a test changed, whether it passed or not: wait for a pending rejoin, start
    what is stopped, remove readers it added, restart replication a test stopped, clear lags,
    stale rows and a read-only writer; then wait until every reader has applied everything
    the writer has."""
    if any(i.role == "stopped" for i in cluster.instances.values()):
        with contextlib.suppress(TimeoutError):
            cluster.events.wait_for("rejoined_as_reader",
                                    since=cluster.events.events()[-1].mono,
                                    timeout=SETTLE_TIMEOUT)
    start_stopped(cluster)
    for instance in list(cluster.instances.values()):
        if instance.id not in instance_ids and instance.role == "reader":
            cluster.remove_reader(instance.id)
    assert set(cluster.instances) == instance_ids, (
        f"instances {sorted(cluster.instances)}, expected {sorted(instance_ids)}")
    engine = engine_of(cluster)
    if not engine.following(cluster.writer, cluster.readers):
        for reader in cluster.readers:  # e.g. a test stopped its I/O thread
            engine.follow(reader, cluster.writer)
    for reader in cluster.readers:
        if reader.lag:
            cluster.set_replica_lag(reader.id, 0)
    for instance in cluster.instances.values():
        if instance.status_age is not None:
            cluster.set_status_age(instance.id, None)
    with cluster.superuser() as conn:
        if query(conn, "SELECT @@read_only")[0][0]:
            cluster.make_writer_read_only(False)
    replayed(cluster)


def replayed(cluster: Cluster) -> None:
    """Wait until every reader replicates from the writer (what a Multi-AZ reader reports
    as the writer) and has applied everything the writer has (the control plane's topology
    rows included)."""
    engine = engine_of(cluster)
    writer_id = engine.server_id(cluster.writer.id)

    def replicating() -> bool:
        status = engine.status()
        return all(
            status[r.id].get("replica", {}).get("Master_Server_Id") == writer_id
            and status[r.id]["replica"]["Slave_SQL_Running"] == "Yes"
            and status[r.id]["gtid_current_pos"] == status[cluster.writer.id]["gtid_current_pos"]
            for r in cluster.readers)

    wait_until(replicating, what="readers replicating from the writer",
               describe=engine.status)


def caught_up(cluster: Cluster, reader: Instance) -> None:
    """Wait until ``reader`` has applied everything the writer has."""
    engine = engine_of(cluster)

    def applied() -> bool:
        status = engine.status()
        return bool(status[reader.id]["gtid_current_pos"]
                    == status[cluster.writer.id]["gtid_current_pos"])

    wait_until(applied, what=f"{reader.id} caught up", describe=engine.status)


def make_table(cluster: Cluster, name: str) -> None:
    conn = app_connect(cluster)
    try:
        query(conn, f"DROP TABLE IF EXISTS {name}")
        query(conn, f"CREATE TABLE {name} (id INT PRIMARY KEY)")
    finally:
        conn.close()


def ids_on(cluster: Cluster, instance: Instance, table: str) -> set[int]:
    with cluster.superuser(instance.id) as conn:
        return {int(row[0]) for row in query(conn, f"SELECT id FROM test.{table}")}


def write_error(cluster: Cluster, instance: Instance) -> Any:
    """Try a write as the application user on ``instance``; return the error (or None)."""
    conn = app_connect(cluster, instance.endpoint)
    try:
        query(conn, "CREATE TABLE IF NOT EXISTS ro_probe (id INT PRIMARY KEY)")
        query(conn, "REPLACE INTO ro_probe VALUES (1)")
    except mysql.connector.Error as exc:
        return exc
    finally:
        conn.close()
    return None


class Writer:
    """A thread committing numbered rows through the writer endpoint, reconnecting after
    errors; ``acked`` are the rows whose commit returned."""

    def __init__(self, cluster: Cluster, table: str) -> None:
        # Computed once: the endpoint is a name, whichever instance it resolves to.
        self.kwargs = {**cluster.connect_kwargs(), "use_pure": True, "autocommit": True,
                       "connection_timeout": 2}
        self.table = table
        self.acked: list[int] = []
        self.acked_at: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        conn: Any = None
        number = 0
        while not self._stop.is_set():
            number += 1
            try:
                if conn is None:
                    conn = mysql.connector.connect(**self.kwargs)
                query(conn, f"INSERT INTO {self.table} VALUES ({number})")
            except mysql.connector.Error:
                self.errors += 1
                if conn is not None:
                    with_suppressed_close(conn)
                conn = None
                time.sleep(0.01)
                continue
            self.acked.append(number)
            self.acked_at.append(time.monotonic())
        if conn is not None:
            with_suppressed_close(conn)

    def wait_for_rows(self, count: int, *, after: float = 0.0) -> None:
        wait_until(lambda: sum(t >= after for t in self.acked_at) >= count,
                   what=f"{count} acknowledged rows")


def with_suppressed_close(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


# --------------------------------------------------------------------------------------------
# fixtures: one cluster per flavour for the module, settled before each test


@pytest.fixture(scope="module")
def multi_az_shared() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: Cluster.start("multi-az-mysql"), settle) as shared:
        yield shared


@pytest.fixture(scope="module")
def aurora_clusters() -> Iterator[SharedClusters]:
    with SharedClusters(lambda name: Cluster.start("aurora-mysql", readers=2,
                                                      **cluster_options(name)),
                        settle) as clusters:
        yield clusters


@pytest.fixture(params=BACKENDS)
def aurora_shared(request: pytest.FixtureRequest,
                  aurora_clusters: SharedClusters) -> SharedCluster:
    """On every backend: the Aurora tests are the cluster contract (tests/clusters.py)."""
    return aurora_clusters.get(request.param)


@pytest.fixture
def mz(multi_az_shared: SharedCluster) -> Iterator[Cluster]:
    yield from multi_az_shared.fixture()


@pytest.fixture
def au(aurora_shared: SharedCluster) -> Iterator[Cluster]:
    yield from aurora_shared.fixture()


# --------------------------------------------------------------------------------------------
# fidelity: the dialects' own checks and queries, from every instance


def test_three_instance_cluster_starts(mz: Cluster) -> None:
    # A liveness check only: the start-up time goal is benchmarks/sim_startup.py's.
    assert [i.role for i in mz.instances.values()].count("reader") == 2


def test_multi_az_interface_from_every_instance(mz: Cluster) -> None:
    engine = engine_of(mz)
    writer = mz.writer
    writer_server_id = str(engine.server_id(writer.id))
    endpoints = {str(engine.server_id(i.id)): i.endpoint for i in mz.instances.values()}
    for instance in mz.instances.values():
        conn = app_connect(mz, instance.endpoint)
        try:
            dialect = detect(DRIVER, conn)
            assert dialect.code == "multi-az-mysql", instance.id
            verify("multi-az-mysql", DRIVER, conn)
            own_id = dialect.parse_instance_id(query(conn, dialect.instance_id_query))
            assert own_id == str(engine.server_id(instance.id))
            assert dialect.parse_is_reader(query(conn, dialect.is_reader_query)) is (
                instance.role == "reader")
            assert dialect.writer_id_query is not None
            seen_writer = dialect.parse_writer_id(query(conn, dialect.writer_id_query))
            assert seen_writer == (None if instance is writer else writer_server_id)
            assert dialect.topology_query is not None
            topology = dialect.parse_topology(query(conn, dialect.topology_query),
                                              writer_id=seen_writer or own_id)
            assert topology.writer is not None
            assert topology.writer.instance_id == writer_server_id
            assert {r.instance_id: r.endpoint for r in topology.rows} == endpoints
            assert {r.port for r in topology.rows} == {mz.port}
            assert query(conn, "SELECT @@report_host, @@version_comment") == [
                (instance.endpoint, "Source distribution")]
        finally:
            conn.close()


def test_resilient_db_connect_verifies_multi_az(mz: Cluster) -> None:
    kwargs = mz.connect_kwargs()
    conn = resilient_db.connect(mysql.connector.connect, **kwargs, use_pure=True,
                                wrapper_dialect="multi-az-mysql")
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT @@server_id")
        assert cursor.fetchall() == [(engine_of(mz).server_id(mz.writer.id),)]
    finally:
        conn.close()


def test_replication_is_semi_synchronous_after_sync(mz: Cluster) -> None:
    with mz.superuser() as conn:
        settings = dict(query(conn, "SHOW GLOBAL VARIABLES WHERE Variable_name IN ("
                                    "'rpl_semi_sync_master_enabled', 'gtid_strict_mode', "
                                    "'rpl_semi_sync_master_wait_point', 'log_slave_updates')"))
        assert settings == {"rpl_semi_sync_master_enabled": "ON", "gtid_strict_mode": "ON",
                            "rpl_semi_sync_master_wait_point": "AFTER_SYNC",
                            "log_slave_updates": "ON"}
        before = dict(query(conn, "SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_%'"))
        assert before["Rpl_semi_sync_master_status"] == "ON"
        assert before["Rpl_semi_sync_master_clients"] == "2"
        query(conn, "CREATE TABLE IF NOT EXISTS test.semi (id INT PRIMARY KEY)")
        query(conn, "REPLACE INTO test.semi VALUES (1)")
        after = dict(query(conn, "SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_yes_tx'"))
        assert int(after["Rpl_semi_sync_master_yes_tx"]) > int(
            before["Rpl_semi_sync_master_yes_tx"])


def test_readers_refuse_application_writes(mz: Cluster) -> None:
    for reader in mz.readers:
        exc = write_error(mz, reader)
        assert exc is not None and exc.errno == 1290, reader.id
        assert DRIVER.is_read_only_error(exc)
    assert write_error(mz, mz.writer) is None
    grants = " ".join(row[0] for row in on(mz, mz.writer, "SHOW GRANTS"))
    for privilege in ("SUPER", "READ_ONLY ADMIN", "BINLOG ADMIN", "ALL PRIVILEGES ON *.*"):
        assert privilege not in grants


def test_aurora_lookalike_from_every_instance(au: Cluster) -> None:
    writer = au.writer
    for instance in au.instances.values():
        conn = app_connect(au, instance.endpoint)
        try:
            dialect = verify(LOOKALIKE, DRIVER, conn)
            # aurora_version cannot exist on MariaDB: detection stops at the RDS dialect.
            assert detect(DRIVER, conn).code == "rds-mysql"
            assert dialect.parse_instance_id(query(conn, dialect.instance_id_query)) == (
                instance.id)
            assert dialect.parse_is_reader(query(conn, dialect.is_reader_query)) is (
                instance.role == "reader")
            assert dialect.topology_query is not None
            rows = query(conn, dialect.topology_query)
            topology = dialect.parse_topology(rows)
            assert topology.writer is not None and topology.writer.instance_id == writer.id
            assert {r.instance_id for r in topology.readers} == {r.id for r in au.readers}
            assert topology.ignored == ()
            sessions = {row[0]: row[1] for row in rows}
            assert sessions[writer.id] == "MASTER_SESSION_ID"
            assert all(sessions[r.id] not in ("", "MASTER_SESSION_ID") for r in au.readers)
        finally:
            conn.close()
    assert on(au, writer, "SELECT @@report_host") == [(writer.endpoint,)]
    assert au.host_pattern.replace("?", writer.id) == writer.endpoint


def test_resilient_db_connect_with_lookalike_schema(au: Cluster) -> None:
    conn = resilient_db.connect(mysql.connector.connect, **au.connect_kwargs(), use_pure=True,
                                aurora_mysql_lookalike_schema=LOOKALIKE_SCHEMA)
    try:
        cursor = conn.cursor()
        cursor.execute(f"SELECT {LOOKALIKE_SCHEMA}.aurora_server_id()")
        assert cursor.fetchall() == [(au.writer.id,)]
    finally:
        conn.close()


def test_aurora_stale_rows_are_ignored(au: Cluster) -> None:
    reader = au.readers[0]
    assert in_order(au.set_status_age(reader.id, 600.0), "topology_updated")
    replayed(au)  # the rows are written on the writer; read here from a reader
    assert LOOKALIKE.topology_query is not None
    topology = LOOKALIKE.parse_topology(on(au, au.readers[-1], LOOKALIKE.topology_query))
    assert reader.id not in {r.instance_id for r in topology.rows}
    assert [r.instance_id for r in topology.ignored] == [reader.id]
    au.set_status_age(reader.id, None)
    topology = LOOKALIKE.parse_topology(on(au, au.writer, LOOKALIKE.topology_query))
    assert reader.id in {r.instance_id for r in topology.readers}


@pytest.mark.parametrize("flavour", ["rds-mysql", "mysql"])
def test_single_instance_flavours(flavour: str) -> None:
    with Cluster.start(flavour) as cluster:
        assert list(cluster.instances) == ["instance-1"] and not cluster.readers
        conn = app_connect(cluster)
        try:
            assert detect(DRIVER, conn).code == flavour
            query(conn, "CREATE TABLE single (id INT PRIMARY KEY)")
            query(conn, "INSERT INTO single VALUES (1)")
            report_host = query(conn, "SELECT @@report_host")[0][0]
            assert report_host == (cluster.writer.endpoint if flavour == "rds-mysql" else None)
        finally:
            conn.close()
        with pytest.raises(ClusterError, match="no reader"):
            cluster.failover()


# --------------------------------------------------------------------------------------------
# control-plane timelines


def topology_writer(cluster: Cluster, dialect: DatabaseDialect, instance: Instance) -> str | None:
    """The writer id the dialect reads from ``instance``."""
    conn = app_connect(cluster, instance.endpoint)
    try:
        writer_id = None
        if dialect.writer_id_query is not None:
            writer_id = dialect.parse_writer_id(query(conn, dialect.writer_id_query))
        if writer_id is None:
            writer_id = dialect.parse_instance_id(query(conn, dialect.instance_id_query))
        assert dialect.topology_query is not None
        topology = dialect.parse_topology(query(conn, dialect.topology_query),
                                          writer_id=writer_id)
        return None if topology.writer is None else topology.writer.instance_id
    finally:
        conn.close()


def test_crash_failover_timeline(mz: Cluster) -> None:
    old = mz.writer
    events = mz.failover()
    assert in_order(events, "failover_started", "writer_stopped", "promoted",
                    "replica_following", "topology_updated")
    assert names(events).count("replica_following") == 1
    stopped, promoted = (next(e for e in events if e.name == name)
                         for name in ("writer_stopped", "promoted"))
    took = promoted.mono - stopped.mono - mz.timeline.detection_delay
    assert took < PROMOTION_BOUND
    new = mz.instance(promoted.instance or "")
    assert new.role == "writer" and old.role == "stopped"
    assert mz.events.wait_for("dns_updated", since=promoted.mono).instance == new.id
    rejoined = mz.events.wait_for("rejoined_as_reader", since=promoted.mono, timeout=30)
    assert rejoined.instance == old.id and mz.instance(old.id).role == "reader"
    replayed(mz)  # the topology is written on the new writer; read here everywhere
    multi_az = get_dialect("multi-az-mysql")
    new_server_id = str(engine_of(mz).server_id(new.id))
    for instance in mz.instances.values():
        assert topology_writer(mz, multi_az, instance) == new_server_id
    exc = write_error(mz, old)
    assert exc is not None and exc.errno == 1290


def test_targeted_graceful_failover(mz: Cluster) -> None:
    target = mz.readers[-1]
    old = mz.writer
    events = mz.failover(target.id, mode="graceful")
    assert in_order(events, "failover_started", "writer_stopped", "promoted", "topology_updated")
    promoted = next(e for e in events if e.name == "promoted")
    assert promoted.instance == target.id and mz.writer is target
    mz.events.wait_for("rejoined_as_reader", since=promoted.mono, timeout=30)
    assert old.role == "reader"
    assert write_error(mz, target) is None


def test_writer_read_only_toggle(mz: Cluster) -> None:
    conn = app_connect(mz)  # open before the change, like a pooled connection
    try:
        make_table(mz, "toggle")
        events = mz.make_writer_read_only(True)
        assert in_order(events, "writer_read_only")
        with pytest.raises(mysql.connector.Error) as caught:
            query(conn, "INSERT INTO toggle VALUES (1)")
        assert caught.value.errno == 1290
        assert DRIVER.is_read_only_error(caught.value)
        mz.make_writer_read_only(False)
        query(conn, "INSERT INTO toggle VALUES (2)")
    finally:
        conn.close()


def test_reboot_keeps_roles(mz: Cluster) -> None:
    make_table(mz, "reboot")
    for instance in (mz.readers[0], mz.writer):
        role = instance.role
        events = mz.reboot(instance.id)
        assert in_order(events, "reboot_started", "reboot_finished")
        assert instance.role == role and instance.runtime.is_running()
    conn = app_connect(mz)
    try:
        query(conn, "INSERT INTO reboot VALUES (1)")
    finally:
        conn.close()
    for reader in mz.readers:
        wait_until(lambda r=reader: 1 in ids_on(mz, r, "reboot"), what=f"row on {reader.id}")


def test_kill_and_start_a_reader(mz: Cluster) -> None:
    reader = mz.readers[0]
    make_table(mz, "killed")
    assert in_order(mz.kill_instance(reader.id), "instance_killed")
    assert not reader.runtime.is_running()
    conn = app_connect(mz)
    try:
        query(conn, "INSERT INTO killed VALUES (1)")  # the other reader acknowledges
    finally:
        conn.close()
    events = mz.start_instance(reader.id)
    assert in_order(events, "rejoined_as_reader", "topology_updated")
    assert reader.role == "reader"
    wait_until(lambda: 1 in ids_on(mz, reader, "killed"), what="row on the restarted reader")


def test_kill_and_start_the_writer_without_failover(mz: Cluster) -> None:
    writer = mz.writer
    make_table(mz, "writer_restart")
    mz.kill_instance(writer.id)
    events = mz.start_instance(writer.id)
    assert in_order(events, "instance_started") and mz.writer is writer
    conn = app_connect(mz)
    try:
        query(conn, "INSERT INTO writer_restart VALUES (1)")
    finally:
        conn.close()
    for reader in mz.readers:
        wait_until(lambda r=reader: 1 in ids_on(mz, r, "writer_restart"), what="row replicated")


def test_replica_lag_is_visible(au: Cluster) -> None:
    reader = au.readers[0]
    make_table(au, "lagged")
    caught_up(au, reader)
    events = au.set_replica_lag(reader.id, 2)
    assert in_order(events, "replica_lag_set")
    with au.superuser(reader.id) as conn:
        status = conn.cursor(dictionary=True)
        status.execute("SHOW REPLICA STATUS")
        assert status.fetchall()[0]["SQL_Delay"] == 2
    assert LOOKALIKE.topology_query is not None
    topology = LOOKALIKE.parse_topology(on(au, au.writer, LOOKALIKE.topology_query))
    lags = {r.instance_id: r.lag_seconds for r in topology.rows}
    assert lags[reader.id] == 2.0
    conn = app_connect(au)
    try:
        query(conn, "INSERT INTO lagged VALUES (1)")
    finally:
        conn.close()
    written = time.monotonic()
    wait_until(lambda: 1 in ids_on(au, reader, "lagged"), timeout=15, what="lagged row")
    assert time.monotonic() - written >= 1.5


def test_add_and_remove_a_reader(au: Cluster) -> None:
    events = au.add_reader()
    assert in_order(events, "instance_started", "reader_added", "topology_updated")
    added = au.instance(next(e for e in events if e.name == "reader_added").instance or "")
    assert added.role == "reader"
    assert on(au, added, f"SELECT {LOOKALIKE_SCHEMA}.aurora_server_id()") == [(added.id,)]
    replayed(au)  # the new topology rows are written on the writer; read here everywhere
    assert LOOKALIKE.topology_query is not None
    for instance in au.instances.values():
        topology = LOOKALIKE.parse_topology(on(au, instance, LOOKALIKE.topology_query))
        assert added.id in {r.instance_id for r in topology.readers}
    server = cast(LocalServer, added.runtime)
    events = au.remove_reader(added.id)
    assert in_order(events, "reader_removed", "topology_updated")
    assert added.id not in au.instances and not server.base_dir.exists()
    topology = LOOKALIKE.parse_topology(on(au, au.writer, LOOKALIKE.topology_query))
    assert added.id not in {r.instance_id for r in topology.rows + topology.ignored}


def test_aurora_failover_topology(au: Cluster) -> None:
    old = au.writer
    events = au.failover()
    new = au.writer
    assert LOOKALIKE.topology_query is not None
    topology = LOOKALIKE.parse_topology(on(au, new, LOOKALIKE.topology_query))
    assert topology.writer is not None and topology.writer.instance_id == new.id
    # The old writer's last report (MASTER_SESSION_ID, no longer updated) loses to the new one.
    assert [r.instance_id for r in topology.ignored] == [old.id]
    au.events.wait_for("rejoined_as_reader", since=events[-1].mono, timeout=REJOIN_TIMEOUT)
    replayed(au)  # the topology is written on the new writer; read here everywhere
    for instance in au.instances.values():
        assert topology_writer(au, LOOKALIKE, instance) == new.id
    topology = LOOKALIKE.parse_topology(on(au, old, LOOKALIKE.topology_query))
    assert old.id in {r.instance_id for r in topology.readers}


def test_blue_green_metadata_in_rds_topology() -> None:
    fast = Timeline(switchover_phase=0.05)
    with Cluster.start("rds-mysql", timeline=fast) as blue, \
            Cluster.start("rds-mysql", port=blue.port) as green:
        blue.create_blue_green(green)
        bg_query = "SELECT version, endpoint, port, role, status FROM mysql.rds_topology"
        rows = on(blue, blue.writer, bg_query)
        assert {row[4] for row in rows} == {"AVAILABLE"}
        assert (("1.0", green.writer_endpoint, green.port, "BLUE_GREEN_DEPLOYMENT_TARGET",
                 "AVAILABLE") in rows)
        conn = app_connect(blue)
        try:  # blue/green metadata, not a Multi-AZ topology
            assert detect(DRIVER, conn).code == "rds-mysql"
        finally:
            conn.close()
        events = blue.switchover()
        assert in_order(events, "switchover_phase", "writer_read_only", "dns_updated",
                        "switchover_finished")
        # RDS deletes the green names: green answers to the blue names.
        with pytest.raises(OSError):
            socket.getaddrinfo(green.writer.endpoint, green.port)
        rows = on(blue, blue.writer, bg_query)
        assert {row[4] for row in rows} == {"SWITCHOVER_COMPLETED"}
        # The blue names now reach the green writer.
        direct = connect_runtime(green.writer.runtime)
        try:
            assert query(direct, "SELECT @@server_id") == query_writer(blue)
        finally:
            direct.close()


def query_writer(cluster: Cluster) -> list[tuple[Any, ...]]:
    conn = app_connect(cluster)
    try:
        return query(conn, "SELECT @@server_id")
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# durability: no acknowledged commit is lost


def test_no_acknowledged_write_lost_in_crash_failover(mz: Cluster) -> None:
    make_table(mz, "stream")
    with Writer(mz, "stream") as writer:
        writer.wait_for_rows(200)
        events = mz.failover()
        promoted = events[names(events).index("promoted")]
        writer.wait_for_rows(50, after=promoted.mono)
    new = mz.writer
    on_new = ids_on(mz, new, "stream")
    missing = set(writer.acked) - on_new
    assert not missing, f"acknowledged rows lost: {sorted(missing)[:20]}"
    assert writer.errors > 0  # the stream did see the failover
    # The old writer comes back with exactly the new writer's rows: whatever it wrote without
    # an acknowledgement was rolled back, nothing diverges.
    old = mz.instance(events[0].instance or "")
    mz.events.wait_for("rejoined_as_reader", since=promoted.mono, timeout=30)
    caught_up(mz, old)
    assert ids_on(mz, old, "stream") == on_new


def test_targeted_crash_failover_to_a_reader_that_is_behind(mz: Cluster) -> None:
    """The target's I/O thread is stopped, so it lacks rows another reader acknowledged; it
    catches up from that reader before it is promoted."""
    target, _ = mz.readers
    make_table(mz, "behind")
    caught_up(mz, target)
    with mz.superuser(target.id) as conn:
        query(conn, "STOP SLAVE IO_THREAD")
    conn = app_connect(mz)
    try:
        for number in range(1, 21):
            query(conn, f"INSERT INTO behind VALUES ({number})")
    finally:
        conn.close()
    assert not ids_on(mz, target, "behind") & set(range(1, 21))
    mz.failover(target.id)
    assert mz.writer is target
    assert set(range(1, 21)) <= ids_on(mz, target, "behind")


def test_promoting_a_lagged_reader_applies_what_it_received(mz: Cluster) -> None:
    target = mz.readers[0]
    make_table(mz, "held_back")
    caught_up(mz, target)
    mz.set_replica_lag(target.id, 60)
    conn = app_connect(mz)
    try:
        for number in range(1, 11):
            query(conn, f"INSERT INTO held_back VALUES ({number})")
    finally:
        conn.close()
    # Received (in the relay log) but held back by MASTER_DELAY.
    wait_until(lambda: engine_of(mz).replication_position(target)
               >= engine_of(mz).replication_position(mz.writer), what="relay log filled")
    mz.failover(target.id)
    assert set(range(1, 11)) <= ids_on(mz, target, "held_back")


def test_old_writer_rolls_back_what_was_never_acknowledged(mz: Cluster) -> None:
    """A commit waits for an acknowledgement (readers frozen) when the writer crashes: the old
    writer has it in its binary log, unacknowledged. It restarts as a replica with
    init-rpl-role=SLAVE, truncates it, and takes the new writer's history instead."""
    old = mz.writer
    make_table(mz, "in_doubt")
    for reader in mz.readers:
        caught_up(mz, reader)
    frozen = [cast(LocalServer, r.runtime).pid for r in mz.readers]
    for pid in frozen:
        os.kill(cast(int, pid), signal.SIGSTOP)
    def resume() -> None:
        for pid in frozen:
            os.kill(cast(int, pid), signal.SIGCONT)

    resumed = threading.Timer(0.1, resume)
    try:
        conn = app_connect(mz)
        blocked = threading.Thread(target=with_suppressed_error, daemon=True,
                                   args=(query, conn, "INSERT INTO in_doubt VALUES (1)"))
        with mz.superuser() as root:
            before = query(root, "SELECT @@gtid_binlog_pos")[0][0]
            blocked.start()
            wait_until(lambda: query(root, "SELECT @@gtid_binlog_pos")[0][0] != before,
                       what="the commit in the binary log")
        assert blocked.is_alive()  # waiting for an acknowledgement
        resumed.start()
        events = mz.failover()
    finally:
        resumed.cancel()
        resume()
    promoted = next(e for e in events if e.name == "promoted")
    mz.events.wait_for("rejoined_as_reader", since=promoted.mono, timeout=30)
    caught_up(mz, old)
    log = cast(LocalServer, old.runtime).log_path.read_text(errors="replace")
    assert "Successfully truncated binlog" in log
    assert ids_on(mz, old, "in_doubt") == ids_on(mz, mz.writer, "in_doubt")


def with_suppressed_error(function: Any, *args: Any) -> None:
    with contextlib.suppress(mysql.connector.Error):
        function(*args)


def test_diverged_old_writer_is_rebuilt(mz: Cluster) -> None:
    """An old writer that committed what the new writer never got (as after an asynchronous
    fallback) cannot replicate; it is rebuilt from the template and copies everything."""
    old = mz.writer
    make_table(mz, "diverged")
    timeline = mz.timeline
    mz.timeline = dataclasses.replace(timeline, rejoin_delay=None)
    try:
        mz.failover()
    finally:
        mz.timeline = timeline
    server = cast(LocalServer, old.runtime)
    server.start()  # still configured as a writer: it accepts the superuser's commit
    with mz.superuser(old.id) as root:
        query(root, "INSERT INTO test.diverged VALUES (666)")
    server.kill()
    events = mz.start_instance(old.id)
    assert in_order(events, "rejoined_as_reader")
    caught_up(mz, old)
    assert 666 not in ids_on(mz, old, "diverged")
    conn = app_connect(mz)
    try:
        query(conn, "INSERT INTO diverged VALUES (1)")
    finally:
        conn.close()
    caught_up(mz, old)
    assert ids_on(mz, old, "diverged") == {1}


# --------------------------------------------------------------------------------------------
# cleanup


def test_nothing_left_after_stop() -> None:
    cluster = Cluster.start("aurora-mysql", readers=1, timeline=Timeline(detection_delay=0.0))
    try:
        cluster.failover()
        cluster.events.wait_for("rejoined_as_reader", timeout=30)
        servers = [cast(LocalServer, i.runtime) for i in cluster.instances.values()]
        pids = [cast(int, s.pid) for s in servers]
        assert all(pids) and HostsFile().entries(cluster.name)
    finally:
        cluster.stop()
    for server, pid in zip(servers, pids, strict=True):
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
        assert not server.base_dir.exists()
        assert not claim_is_held(server.host)
    assert HostsFile().entries(cluster.name) == []


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"
