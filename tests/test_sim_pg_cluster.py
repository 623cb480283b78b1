"""The PostgreSQL flavours of the cluster simulator (simulator.pg_cluster) on real servers.

- Fidelity: from the writer and from every reader, resilient_db's own dialect code sees the
  flavour, the instance, its role and the topology; the Aurora/RDS catalog interface has the
  real names, types and values (AURORA_INTERFACE.md).
- Control plane: each action's events happen in order, within generous bounds (speed goals
  live in benchmarks/sim_startup.py), and the servers really do what the events say.
- Durability: no acknowledged commit is lost by a crash or a targeted failover.
- Robustness: teardown leaves nothing behind, even after a SIGKILL; bad input is refused
  with a message naming the culprit.

One Aurora and one Multi-AZ cluster serve most tests (module scope); ``aurora`` and
``multi_az`` restore them before and after each test (tests.clusters), so a test that fails
half-way cannot fail the next one. What the control plane writes on the writer reaches a
reader by replication: tests wait for it there (tests.waiting), they never assume it.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from resilient_db.dialects import detect, get_dialect, verify
from resilient_db.drivers import get_driver
from simulator import _addresses
from simulator.cluster import (
    BLUE_GREEN_PHASES,
    Cluster,
    ClusterError,
    Instance,
    Timeline,
)
from simulator.events import Event
from simulator.names import MARK, HostsFile
from simulator.pg_cluster import (
    APP_USER,
    AURORA_EXTENSIONS,
    PgClusterEngine,
    resource_id,
)

from .clusters import BACKENDS, SharedCluster, SharedClusters, cluster_options, start_stopped
from .waiting import wait_for, wait_until

pytestmark = pytest.mark.real_server

FAST = Timeline(detection_delay=0.2, rejoin_delay=0.3, reboot_downtime=0.2, switchover_phase=0.2)
#: Liveness bound for a control-plane step that takes about a second on a quiet machine
#: (promotion, a delayed DNS move): generous, since a step can queue behind a pg_rewind on a
#: loaded 2-core machine, and a rejoin on the container backend starts a new container
#: (``docker run`` alone took up to 17 s with both cores busy). Speed goals live in
#: benchmarks/sim_startup.py and the chaos reports.
LIVENESS = 90.0
DRIVER = get_driver("psycopg")


# --------------------------------------------------------------------------------------------
# helpers


def connect(cluster: Cluster, endpoint: str | None = None, **extra: Any) -> psycopg.Connection[
        Any]:
    """The application user, by DNS name (default: the writer endpoint)."""
    return psycopg.connect(**{**cluster.connect_kwargs(endpoint), "autocommit": True,
                              "connect_timeout": 5, **extra})


def query(cluster: Cluster, sql: str, endpoint: str | None = None) -> list[tuple[Any, ...]]:
    with connect(cluster, endpoint) as conn:
        return conn.execute(sql.encode()).fetchall()


def count(cluster: Cluster, table: str, endpoint: str) -> int:
    """Rows of ``table`` on ``endpoint`` (-1 while the table has not replicated there)."""
    try:
        return int(query(cluster, f"SELECT count(*) FROM {table}", endpoint)[0][0])
    except psycopg.errors.UndefinedTable:
        return -1


def resolve(name: str, port: int) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(name, port, socket.AF_INET,
                                                             socket.SOCK_STREAM)})


def names(events: list[Event]) -> list[str]:
    return [e.name for e in events]


def in_order(events: list[Event], *wanted: str) -> list[Event]:
    """The first event of each name, asserted to be in this order."""
    found = []
    for name in wanted:
        event = next((e for e in events if e.name == name), None)
        assert event is not None, f"no {name!r} in {names(events)}"
        found.append(event)
    monos = [e.mono for e in found]
    assert monos == sorted(monos), [(e.name, e.mono) for e in found]
    return found


def streaming_readers(cluster: Cluster) -> set[str]:
    """Application names the writer streams to."""
    with cluster.superuser() as conn:
        return {row[0] for row in conn.execute(
            "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")}


def replica_status_ids(cluster: Cluster, endpoint: str | None = None) -> set[str]:
    """The instances ``aurora_replica_status()`` lists, as seen from ``endpoint`` (a reader
    sees what it has replayed of the rows the control plane writes on the writer)."""
    return {r[0] for r in query(cluster, "SELECT server_id FROM "
                                         "pg_catalog.aurora_replica_status()", endpoint)}


def replayed_everything(cluster: Cluster) -> bool:
    """Every reader has replayed all the writer's WAL: what the control plane published on
    the writer (topology rows) is what every instance shows."""
    with cluster.superuser() as conn:
        position = conn.execute("SELECT pg_catalog.pg_current_wal_lsn()").fetchone()[0]
    for reader in cluster.readers:
        with cluster.superuser(reader.id) as conn:
            row = conn.execute("SELECT pg_catalog.pg_last_wal_replay_lsn() >= %s::pg_lsn",
                               (str(position),)).fetchone()
        if not row or not row[0]:
            return False
    return True


def settle(cluster: Cluster, instance_ids: frozenset[str]) -> None:
    """Undo what a test changed, whether it passed or not: wait for pending rejoins, start
    what is stopped, remove readers it added, restore each reader's configuration (a test may
    have rewritten it), undo lag, stale rows, DNS staleness and a read-only writer; then wait
    until every reader streams from the writer and has replayed all it wrote."""
    if any(i.role == "stopped" for i in cluster.instances.values()):
        with contextlib.suppress(TimeoutError):
            cluster.events.wait_for("rejoined_as_reader",
                                    since=cluster.events.events()[-1].mono, timeout=LIVENESS)
    start_stopped(cluster)
    for instance in list(cluster.instances.values()):
        if instance.id not in instance_ids and instance.role == "reader":
            cluster.remove_reader(instance.id)
    assert set(cluster.instances) == instance_ids, (
        f"instances {sorted(cluster.instances)}, expected {sorted(instance_ids)}")
    engine = cluster.engine
    assert isinstance(engine, PgClusterEngine)
    for reader in cluster.readers:
        engine._apply(reader)  # the configuration the engine's state says, reloaded
    cluster.set_dns_staleness(0.0)
    cluster.make_writer_read_only(False)
    for instance in cluster.instances.values():
        if instance.status_age is not None:
            cluster.set_status_age(instance.id, None)
        if instance.role == "reader" and instance.lag:
            cluster.set_replica_lag(instance.id, 0.0)
    wanted = {r.id for r in cluster.readers}
    wait_for(f"readers {sorted(wanted)} streaming", lambda: streaming_readers(cluster),
             lambda streaming: streaming == wanted, ignoring=(psycopg.OperationalError,))
    wait_until("all readers replaying everything the writer wrote",
               lambda: replayed_everything(cluster), ignoring=(psycopg.OperationalError,))


# --------------------------------------------------------------------------------------------
# clusters


@pytest.fixture(scope="module")
def aurora_clusters() -> Iterator[SharedClusters]:
    with SharedClusters(lambda name: Cluster.start("aurora-pg", readers=2, timeline=FAST,
                                                   **cluster_options(name)),
                        settle) as clusters:
        yield clusters


@pytest.fixture(params=BACKENDS)
def aurora_shared(request: pytest.FixtureRequest,
                  aurora_clusters: SharedClusters) -> SharedCluster:
    """On every backend: the Aurora tests are the cluster contract (tests/clusters.py)."""
    return aurora_clusters.get(request.param)


@pytest.fixture
def aurora(aurora_shared: SharedCluster) -> Iterator[Cluster]:
    """The shared Aurora cluster, settled before and after each test (a writer and two
    streaming readers that replayed everything; which instance is the writer varies)."""
    yield from aurora_shared.fixture()


@pytest.fixture(scope="module")
def multi_az_shared() -> Iterator[SharedCluster]:
    with SharedCluster(lambda: Cluster.start("multi-az-pg", timeline=FAST), settle) as shared:
        yield shared


@pytest.fixture
def multi_az(multi_az_shared: SharedCluster) -> Iterator[Cluster]:
    """The shared Multi-AZ cluster, settled before and after each test."""
    yield from multi_az_shared.fixture()


@pytest.fixture(scope="module")
def rds_pg() -> Iterator[Cluster]:
    with Cluster.start("rds-pg") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def plain_pg() -> Iterator[Cluster]:
    with Cluster.start("pg") as cluster:
        yield cluster


_FIXTURES = {"multi-az-pg": "multi_az", "rds-pg": "rds_pg", "pg": "plain_pg"}
# The Aurora cluster on every backend, the other flavours on the local one.
_ANY = [pytest.param(("aurora-pg", "local"), id="aurora-pg"),
        pytest.param(("aurora-pg", "testcontainers"), id="aurora-pg-testcontainers",
                     marks=pytest.mark.docker),
        pytest.param(("aurora-pg", "local-proxied"), id="aurora-pg-local-proxied"),
        *(pytest.param((flavour, "local"), id=flavour) for flavour in _FIXTURES)]


@pytest.fixture(params=_ANY)
def any_cluster(request: pytest.FixtureRequest,
                aurora_clusters: SharedClusters) -> Iterator[Cluster]:
    flavour, name = request.param
    if flavour == "aurora-pg":
        yield from aurora_clusters.get(name).fixture()
    else:
        cluster: Cluster = request.getfixturevalue(_FIXTURES[flavour])
        yield cluster


def expected_id(cluster: Cluster, instance: Instance) -> str:
    """What the flavour's dialect reports as the instance id."""
    if cluster.flavour.name == "aurora-pg":
        return instance.id
    if cluster.flavour.name == "multi-az-pg":
        return resource_id(cluster.naming.cluster_id, instance.id)
    return f"{instance.address}:{instance.port}"


# --------------------------------------------------------------------------------------------
# fidelity


def test_dialect_code_sees_every_instance_right(any_cluster: Cluster) -> None:
    cluster = any_cluster
    code = cluster.flavour.name
    dialect = get_dialect(code)
    assert len(cluster.instances) == 1 + cluster.reader_count
    for instance in cluster.instances.values():
        with connect(cluster, instance.endpoint) as conn:
            assert detect(DRIVER, conn).code == code, instance.id
            assert verify(code, DRIVER, conn) is dialect
            assert dialect.parse_instance_id(
                DRIVER.query(conn, dialect.instance_id_query)) == expected_id(cluster, instance)
            assert dialect.parse_is_reader(
                DRIVER.query(conn, dialect.is_reader_query)) is (instance.role == "reader")
            if dialect.topology_query is None:
                continue
            writer_id = None
            if dialect.writer_id_query is not None:
                writer_id = dialect.parse_writer_id(DRIVER.query(conn, dialect.writer_id_query))
                assert writer_id == expected_id(cluster, cluster.writer)
            topology = dialect.parse_topology(DRIVER.query(conn, dialect.topology_query),
                                              writer_id=writer_id)
            assert topology.writer is not None
            assert topology.writer.instance_id == expected_id(cluster, cluster.writer)
            assert {r.instance_id for r in topology.readers} == {
                expected_id(cluster, r) for r in cluster.readers}
            assert topology.ignored == ()


def test_multi_az_topology_reports_endpoints_and_ports(multi_az: Cluster) -> None:
    rows = query(multi_az, "SELECT id, endpoint, port FROM rds_tools.show_topology('test')")
    assert sorted(rows) == sorted(
        (resource_id(multi_az.naming.cluster_id, i.id), i.endpoint, multi_az.port)
        for i in multi_az.instances.values())
    # The AWS wrapper's host-id query calls show_topology without an argument.
    own = multi_az.readers[0]
    assert query(multi_az,
                 "SELECT id, SUBSTRING(endpoint FROM 0 FOR POSITION('.' IN endpoint)) "
                 "FROM rds_tools.show_topology() "
                 "WHERE id OPERATOR(pg_catalog.=) rds_tools.dbi_resource_id()",
                 own.endpoint) == [(resource_id(multi_az.naming.cluster_id, own.id), own.id)]
    assert all(r[0].startswith("db-") and len(r[0]) == 29 for r in rows)


def test_aurora_replica_status_columns_and_types(aurora: Cluster) -> None:
    rows = query(aurora, """
        SELECT a.name, pg_catalog.format_type(a.type, NULL)
          FROM pg_catalog.pg_proc AS p,
               unnest(p.proargnames, p.proallargtypes) AS a(name, type)
         WHERE p.oid = 'pg_catalog.aurora_replica_status'::pg_catalog.regproc""")
    assert rows == [
        ("server_id", "text"), ("session_id", "text"), ("durable_lsn", "bigint"),
        ("highest_lsn_rcvd", "bigint"), ("current_read_lsn", "bigint"),
        ("cur_replay_latency_in_usec", "bigint"), ("active_txns", "integer"),
        ("is_current", "boolean"), ("last_transport_error", "integer"),
        ("last_error_timestamp", "timestamp with time zone"),
        ("last_update_timestamp", "timestamp with time zone"), ("feedback_xmin", "bigint"),
        ("feedback_epoch", "integer"), ("replica_lag_in_msec", "real"),
        ("log_stream_speed_in_kib_per_second", "real"),
        ("log_buffer_sequence_number", "bigint"), ("oldest_read_view_trx_id", "bigint"),
        ("oldest_read_view_lsn", "bigint"), ("pending_read_ios", "integer"),
        ("read_ios", "bigint"), ("iops", "integer"), ("cpu", "real"),
    ]


def test_aurora_replica_status_values_from_every_instance(aurora: Cluster) -> None:
    writer = aurora.writer
    for instance in aurora.instances.values():
        rows = query(aurora, "SELECT server_id, session_id, replica_lag_in_msec, cpu, "
                             "last_update_timestamp, statement_timestamp() "
                             "FROM pg_catalog.aurora_replica_status()", instance.endpoint)
        assert {r[0] for r in rows} == set(aurora.instances)
        for server_id, session_id, lag, cpu, updated, now in rows:
            if server_id == writer.id:
                assert session_id == "MASTER_SESSION_ID"
                assert lag is None
            else:
                assert len(session_id) == 36 and session_id != "MASTER_SESSION_ID"
                assert lag == 0.0
            assert 0 < cpu < 100
            if server_id == instance.id:
                assert updated is None  # Aurora PostgreSQL >= 13.9: the row you are on
            else:
                assert 0 <= (now - updated).total_seconds() < 5
    assert [r[0] for r in query(aurora, "SELECT pg_catalog.aurora_db_instance_identifier()",
                                aurora.readers[0].endpoint)] == [aurora.readers[0].id]
    version = query(aurora, "SELECT pg_catalog.aurora_version()")[0][0]
    assert version.startswith("15.") and version.count(".") == 2


def test_stale_rows_are_ignored_by_parse_topology(aurora: Cluster) -> None:
    stale, fresh = aurora.readers
    events = aurora.set_status_age(stale.id, 600)
    assert names(events) == ["topology_updated"]
    aurora.set_status_age(aurora.writer.id, 600)  # a stale writer row still counts
    # The rows are written on the writer; the readers show them once they replayed them.
    wait_until("the readers to replay the status rows", lambda: replayed_everything(aurora))
    dialect = get_dialect("aurora-pg")
    for instance in (aurora.writer, fresh):
        with connect(aurora, instance.endpoint) as conn:
            topology = dialect.parse_topology(DRIVER.query(conn, dialect.topology_query or ""))
        assert {r.instance_id for r in topology.rows} == {aurora.writer.id, fresh.id}
        assert [r.instance_id for r in topology.ignored] == [stale.id]
    # On the stale instance itself its own row has no timestamp (Aurora >= 13.9): kept.
    with connect(aurora, stale.endpoint) as conn:
        topology = dialect.parse_topology(DRIVER.query(conn, dialect.topology_query or ""))
    assert {r.instance_id for r in topology.rows} == set(aurora.instances)
    aurora.set_status_age(stale.id, None)
    with connect(aurora) as conn:
        topology = dialect.parse_topology(DRIVER.query(conn, dialect.topology_query or ""))
    assert {r.instance_id for r in topology.rows} == set(aurora.instances)


def test_rds_extensions(any_cluster: Cluster) -> None:
    rows = query(any_cluster,
                 "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'rds.extensions'")
    flavour = any_cluster.flavour.name
    if flavour == "pg":
        assert rows == []
        return
    extensions = {e.strip() for e in rows[0][0].split(",")}
    assert "rds_tools" in extensions
    assert ("aurora_stat_utils" in extensions) is (flavour == "aurora-pg")
    if flavour == "aurora-pg":
        assert rows[0][0] == AURORA_EXTENSIONS


def test_application_user_is_not_a_superuser(aurora: Cluster) -> None:
    assert aurora.connect_kwargs()["user"] == APP_USER
    assert query(aurora, "SELECT rolsuper FROM pg_catalog.pg_roles "
                         "WHERE rolname = current_user") == [(False,)]
    with connect(aurora) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS app_owned (id int PRIMARY KEY)")
        conn.execute("INSERT INTO app_owned VALUES (1) ON CONFLICT DO NOTHING")
    reader = aurora.readers[0]
    wait_until("the table on the reader", lambda: count(aurora, "app_owned", reader.endpoint) == 1)
    with connect(aurora, reader.endpoint) as conn, pytest.raises(
            psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("INSERT INTO app_owned VALUES (2)")
    # The internal tables are the control plane's.
    with connect(aurora) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM rds_sim.replica_status")


def test_each_cluster_is_its_own_database_system(aurora: Cluster, multi_az: Cluster) -> None:
    def system_ids(cluster: Cluster) -> set[int]:
        ids = set()
        for instance in cluster.instances.values():
            with cluster.superuser(instance.id) as conn:
                row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
                ids.add(row[0])
        return ids

    aurora_ids, multi_az_ids = system_ids(aurora), system_ids(multi_az)
    assert len(aurora_ids) == 1 and len(multi_az_ids) == 1
    assert aurora_ids != multi_az_ids


def test_names_resolve_and_connect(any_cluster: Cluster) -> None:
    cluster = any_cluster
    assert cluster.port is not None
    # advertised_address: the instance's own address, or its proxy's in a proxied cluster.
    assert resolve(cluster.writer_endpoint, cluster.port) == [
        cluster.writer.advertised_address]
    for instance in cluster.instances.values():
        assert resolve(instance.endpoint, cluster.port) == [instance.advertised_address]
        assert (instance.advertised_address != instance.address) is cluster.proxied
        assert cluster.host_pattern.replace("?", instance.id) == instance.endpoint
    lines = HostsFile().entries(cluster.name)
    if cluster.single_instance:
        # RDS gives a DB instance no cluster endpoints; plain PostgreSQL is not RDS at all.
        assert cluster.writer_endpoint == cluster.reader_endpoint == cluster.writer.endpoint
        assert not any(".cluster-" in name for name, _ in lines)
        assert cluster.writer_endpoint.endswith(".rds.amazonaws.com") is (
            cluster.flavour.name == "rds-pg")
    else:
        assert ".cluster-" in cluster.writer_endpoint
        assert resolve(cluster.reader_endpoint, cluster.port) == sorted(
            r.advertised_address for r in cluster.readers)
    assert query(cluster, "SELECT host(pg_catalog.inet_server_addr())") == [
        (cluster.writer.address,)]
    if cluster.proxied:  # the server sees the proxy as its client
        assert query(cluster, "SELECT host(client_addr) FROM pg_catalog.pg_stat_activity "
                              "WHERE pid = pg_catalog.pg_backend_pid()") == [
            (cluster.writer.advertised_address,)]


# --------------------------------------------------------------------------------------------
# control plane


def test_crash_failover_timeline_with_stale_dns(aurora: Cluster) -> None:
    old = aurora.writer
    assert aurora.port is not None
    aurora.set_dns_staleness(1.0)
    events = aurora.failover()
    failover = in_order(events, "failover_started", "writer_stopped", "promoted",
                        "replica_following", "topology_updated")
    new = aurora.writer
    assert new is not old and failover[2].instance == new.id
    assert failover[2].mono - failover[1].mono >= FAST.detection_delay
    assert failover[2].mono - failover[0].mono < FAST.detection_delay + LIVENESS
    # Until dns_updated the writer endpoint still resolves to the old writer.
    assert resolve(aurora.writer_endpoint, aurora.port) == [old.advertised_address]
    dns = aurora.events.wait_for("dns_updated", since=failover[0].mono, timeout=LIVENESS)
    assert dns.instance == new.id
    # Not before the staleness window (its timer may queue behind the old writer's rejoin).
    assert 0.9 <= dns.mono - failover[2].mono < LIVENESS
    assert resolve(aurora.writer_endpoint, aurora.port) == [new.advertised_address]
    rejoined = aurora.events.wait_for("rejoined_as_reader", since=failover[0].mono,
                                      timeout=LIVENESS)
    assert rejoined.instance == old.id and rejoined.mono > failover[2].mono
    assert old.role == "reader"
    # The old writer really replicates from the new one.
    with connect(aurora) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS after_failover (id int)")
        conn.execute("INSERT INTO after_failover VALUES (1)")
    wait_until("the row on the old writer",
               lambda: count(aurora, "after_failover", old.endpoint) > 0)
    assert query(aurora, "SELECT pg_catalog.pg_is_in_recovery(), "
                         "pg_catalog.aurora_db_instance_identifier()", old.endpoint) == [
        (True, old.id)]  # its own identity, although pg_rewind copied the new writer's files
    assert old.id in streaming_readers(aurora)
    topology = get_dialect("aurora-pg").parse_topology(
        query(aurora, get_dialect("aurora-pg").topology_query or ""))
    assert topology.writer is not None and topology.writer.instance_id == new.id


def test_graceful_targeted_failover(aurora: Cluster) -> None:
    old = aurora.writer
    target = aurora.readers[-1]
    with connect(aurora) as session:
        events = aurora.failover(target=target.id, mode="graceful")
        with pytest.raises(psycopg.OperationalError):  # sessions were ended
            session.execute("SELECT 1")
    in_order(events, "failover_started", "writer_stopped", "promoted", "topology_updated")
    assert aurora.writer is target
    assert query(aurora, "SELECT pg_catalog.aurora_db_instance_identifier()") == [(target.id,)]
    aurora.events.wait_for("rejoined_as_reader", since=events[0].mono, timeout=LIVENESS)
    assert old.role == "reader"
    assert streaming_readers(aurora) == {r.id for r in aurora.readers}


def test_multi_az_failover_moves_the_writer_everywhere(multi_az: Cluster) -> None:
    old = multi_az.writer
    events = multi_az.failover()
    multi_az.events.wait_for("rejoined_as_reader", since=events[0].mono, timeout=LIVENESS)
    # The new topology is written on the new writer; the readers show it once replayed.
    wait_until("the readers to replay the new topology", lambda: replayed_everything(multi_az))
    dialect = get_dialect("multi-az-pg")
    new_id = resource_id(multi_az.naming.cluster_id, multi_az.writer.id)
    for instance in multi_az.instances.values():
        with connect(multi_az, instance.endpoint) as conn:
            writer_id = dialect.parse_writer_id(
                DRIVER.query(conn, dialect.writer_id_query or ""))
            topology = dialect.parse_topology(
                DRIVER.query(conn, dialect.topology_query or ""), writer_id=writer_id)
            assert dialect.parse_is_reader(DRIVER.query(conn, dialect.is_reader_query)) is (
                instance is not multi_az.writer)
        assert writer_id == new_id, instance.id
        assert topology.writer is not None and topology.writer.instance_id == new_id
    assert old.role == "reader"
    assert streaming_readers(multi_az) == {r.id for r in multi_az.readers}


def test_writer_turns_read_only_under_open_connections(aurora: Cluster) -> None:
    with connect(aurora) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ro_check (id int)")
        events = aurora.make_writer_read_only(True)
        assert names(events) == ["writer_read_only"]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO ro_check VALUES (1)")
        assert conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone() == (False,)
        aurora.make_writer_read_only(False)
        conn.execute("INSERT INTO ro_check VALUES (1)")


def test_reboot_keeps_roles(aurora: Cluster) -> None:
    for instance in (aurora.readers[0], aurora.writer):
        role = instance.role
        events = aurora.reboot(instance.id)
        started, finished = in_order(events, "reboot_started", "reboot_finished")
        assert finished.mono - started.mono >= FAST.reboot_downtime
        assert instance.role == role
        assert query(aurora, "SELECT pg_catalog.pg_is_in_recovery()", instance.endpoint) == [
            (role == "reader",)]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_stopped_reader_goes_stale_then_rejoins(aurora: Cluster, how: str) -> None:
    reader = aurora.readers[0]
    if how == "kill":
        events = aurora.kill_instance(reader.id)
        assert names(events) == ["instance_killed", "topology_updated"]
    else:
        events = aurora.stop_instance(reader.id)
        assert names(events) == ["instance_stopped", "topology_updated"]
    assert reader.role == "stopped"
    time.sleep(0.3)
    rows = dict(query(aurora, "SELECT server_id, now() - last_update_timestamp "
                              "FROM pg_catalog.aurora_replica_status()"))
    assert rows[reader.id] >= datetime.timedelta(seconds=0.25)  # no longer refreshed
    with connect(aurora) as conn:  # commits do not wait for the stopped reader
        conn.execute("CREATE TABLE IF NOT EXISTS while_stopped (id int)")
        conn.execute("INSERT INTO while_stopped VALUES (1)")
    events = aurora.start_instance(reader.id)
    in_order(events, "rejoined_as_reader", "topology_updated")
    assert aurora.instance(reader.id) in aurora.readers
    wait_until("the reader catching up",
               lambda: count(aurora, "while_stopped", reader.endpoint) > 0)


def test_add_and_remove_reader(aurora: Cluster) -> None:
    events = aurora.add_reader()
    in_order(events, "instance_started", "reader_added", "topology_updated")
    added = aurora.instance(events[0].instance or "")
    assert added.role == "reader" and len(aurora.instances) == 4
    wait_until("the new reader streaming", lambda: added.id in streaming_readers(aurora))
    with aurora.superuser() as conn:
        assert f'"{added.id}"' in conn.execute("SHOW synchronous_standby_names").fetchone()[0]
    assert added.id in replica_status_ids(aurora)
    # Its own view holds the topology row once replication has delivered it.
    wait_until("the new reader in its own topology view",
               lambda: added.id in replica_status_ids(aurora, added.endpoint))
    assert query(aurora, "SELECT pg_catalog.aurora_db_instance_identifier()",
                 added.endpoint) == [(added.id,)]
    base_dir = added.runtime.base_dir
    events = aurora.remove_reader(added.id)
    in_order(events, "reader_removed", "topology_updated")
    assert added.id not in aurora.instances and not base_dir.exists()
    assert added.endpoint not in dict(HostsFile().entries(aurora.name))
    assert added.id not in replica_status_ids(aurora)


def test_replica_lag_is_real_and_reported(aurora: Cluster) -> None:
    lagging = aurora.readers[0]
    with connect(aurora) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS lag_check (id int)")
    wait_until("the table on the reader", lambda: count(aurora, "lag_check", lagging.endpoint) >= 0)
    events = aurora.set_replica_lag(lagging.id, 1.5)
    assert names(events) == ["replica_lag_set"]
    dialect = get_dialect("aurora-pg")
    topology = dialect.parse_topology(query(aurora, dialect.topology_query or ""))
    lags = {r.instance_id: r.lag_seconds for r in topology.rows}
    assert lags[lagging.id] == 1.5
    with connect(aurora) as conn:
        conn.execute("INSERT INTO lag_check VALUES (1)")
        inserted = time.monotonic()
    assert query(aurora, "SELECT count(*) FROM lag_check", lagging.endpoint) == [(0,)]
    wait_until("the delayed row", lambda: query(
        aurora, "SELECT count(*) FROM lag_check", lagging.endpoint) == [(1,)])
    assert time.monotonic() - inserted >= 1.0


def test_promote_catches_up_from_a_more_advanced_reader(aurora: Cluster) -> None:
    """A crash failover to a chosen reader that received less than another one loses
    nothing: the target first streams the difference from that reader."""
    target, ahead = aurora.readers
    engine = aurora.engine
    assert isinstance(engine, PgClusterEngine)
    # Cut the target off its writer (an unreachable upstream) so that it falls behind.
    target.runtime.reconfigure({**engine._settings(target.id),
                                "primary_conninfo": "host=127.0.0.1 port=1 connect_timeout=1"})
    target.runtime.reload()
    wait_until("the target to stop streaming", lambda: target.id not in streaming_readers(
        aurora))
    with connect(aurora) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS catch_up (id int)")
        conn.execute("INSERT INTO catch_up SELECT generate_series(1, 100)")
    assert engine.replication_position(target) < engine.replication_position(ahead)
    aurora.failover(target=target.id)
    assert aurora.writer is target
    assert query(aurora, "SELECT count(*) FROM catch_up") == [(100,)]
    assert ahead.id in streaming_readers(aurora)


def test_what_a_failed_test_leaves_is_undone_before_the_next(
        aurora_shared: SharedCluster) -> None:
    """What the two tests above leave behind when they fail half-way (an added reader; a
    reader cut off its writer by a rewritten configuration) is undone when the test ends:
    the next test gets the same cluster with its own instances, all streaming."""
    cluster = aurora_shared.acquire()
    started = set(cluster.instances)
    added = cluster.instance(cluster.add_reader()[0].instance or "")
    cut_off = cluster.readers[0]
    cut_off.runtime.reconfigure({**cast(PgClusterEngine, cluster.engine)._settings(cut_off.id),
                                 "primary_conninfo": "host=127.0.0.1 port=1 connect_timeout=1"})
    cut_off.runtime.reload()
    wait_until("the reader to stop streaming",
               lambda: cut_off.id not in streaming_readers(cluster))
    aurora_shared.release()
    assert aurora_shared.acquire() is cluster  # restored, not replaced
    assert set(cluster.instances) == started and added.id not in cluster.instances
    assert streaming_readers(cluster) == {r.id for r in cluster.readers}
    assert replayed_everything(cluster)


class Writes:
    """A thread committing numbered rows through the writer endpoint, reconnecting after
    errors; ``acknowledged`` holds the ids whose commit returned."""

    def __init__(self, cluster: Cluster, table: str) -> None:
        self.cluster = cluster
        self.table = table
        self.acknowledged: list[int] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = connect(self.cluster, connect_timeout=2)
                n += 1
                conn.execute(f"INSERT INTO {self.table} VALUES (%s)", (n,))
                self.acknowledged.append(n)
            except (psycopg.Error, ClusterError):
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)
        if conn is not None:
            conn.close()

    def wait_for_more(self, count: int, timeout: float = LIVENESS) -> None:
        target = len(self.acknowledged) + count
        wait_until(f"{count} more commits", lambda: len(self.acknowledged) >= target, timeout)

    def __enter__(self) -> Writes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_no_acknowledged_commit_is_lost(aurora: Cluster) -> None:
    with connect(aurora) as conn:
        conn.execute("DROP TABLE IF EXISTS durable")
        conn.execute("CREATE TABLE durable (id int PRIMARY KEY)")
    with Writes(aurora, "durable") as writes:
        writes.wait_for_more(200)
        first = aurora.failover()  # crash: the most advanced reader is promoted
        writes.wait_for_more(200)
        aurora.events.wait_for("rejoined_as_reader", since=first[0].mono, timeout=LIVENESS)
        target = aurora.readers[0]
        aurora.failover(target=target.id)  # crash, targeted
        assert aurora.writer is target
        writes.wait_for_more(200)
    acknowledged = set(writes.acknowledged)
    present = {row[0] for row in query(aurora, "SELECT id FROM durable")}
    assert writes.errors > 0  # the failovers did interrupt the writes
    assert acknowledged - present == set()


# --------------------------------------------------------------------------------------------
# blue/green


@pytest.fixture
def blue() -> Iterator[Cluster]:
    # Its own cluster: a switchover renames the blue cluster for good.
    with Cluster.start("aurora-pg", readers=1, timeline=FAST) as cluster:
        yield cluster


def test_blue_green_switchover(blue: Cluster) -> None:
    aurora = blue
    assert aurora.port is not None
    with Cluster.start("aurora-pg", readers=0, port=aurora.port,
                       name=f"{aurora.name}green") as green:
        events = aurora.create_blue_green(green)
        assert [(e.name, e.detail["phase"]) for e in events] == [
            ("switchover_phase", "AVAILABLE")]
        metadata = "SELECT version, endpoint, port, role, status FROM " \
                   "pg_catalog.get_blue_green_fast_switchover_metadata('test')"
        for cluster in (aurora, green):
            rows = query(cluster, metadata)
            assert {r[4] for r in rows} == {"AVAILABLE"}
            assert (("1.0", aurora.writer_endpoint, aurora.port,
                     "BLUE_GREEN_DEPLOYMENT_SOURCE", "AVAILABLE") in rows)
            assert (("1.0", green.writer_endpoint, aurora.port,
                     "BLUE_GREEN_DEPLOYMENT_TARGET", "AVAILABLE") in rows)
        blue_writer = aurora.writer
        events = aurora.switchover()
        phases = [e.detail["phase"] for e in events if e.name == "switchover_phase"]
        assert phases == list(BLUE_GREEN_PHASES[1:])
        in_order(events, "writer_read_only", "dns_updated", "switchover_finished")
        monos = [e.mono for e in events if e.name == "switchover_phase"]
        assert all(b - a >= FAST.switchover_phase * 0.9 for a, b in itertools.pairwise(monos))
        # The blue names now lead to the green cluster; blue is renamed "-old1".
        assert resolve(aurora.writer_endpoint, aurora.port) == [green.writer.address]
        old_writer_endpoint = aurora.writer_endpoint.replace(".cluster-", "-old1.cluster-")
        assert resolve(old_writer_endpoint, aurora.port) == [blue_writer.address]
        assert query(aurora, "SELECT pg_catalog.aurora_db_instance_identifier(), "
                             "pg_catalog.inet_server_addr()::text")[0][1].startswith(
            green.writer.address)
        # RDS deletes the green names; the green instances answer to the blue names.
        with pytest.raises(socket.gaierror):
            resolve(green.writer_endpoint, aurora.port)
        rows = query(green, metadata, aurora.writer_endpoint)
        assert {r[4] for r in rows} == {"SWITCHOVER_COMPLETED"}
        assert ("1.0", aurora.writer_endpoint, aurora.port, "BLUE_GREEN_DEPLOYMENT_TARGET",
                "SWITCHOVER_COMPLETED") in rows
        assert ("1.0", old_writer_endpoint, aurora.port, "BLUE_GREEN_DEPLOYMENT_SOURCE",
                "SWITCHOVER_COMPLETED") in rows
        with pytest.raises(ClusterError, match="no blue/green deployment"):
            aurora.switchover()


# --------------------------------------------------------------------------------------------
# robustness


def leftovers(base_dirs: list[Path], addresses: list[str], cluster: str) -> list[str]:
    found = [f"directory {d}" for d in base_dirs if d.exists()]
    found += [f"claim {a}" for a in addresses if _addresses.claim_is_held(a)]
    found += [f"hosts line {n}" for n, _ in HostsFile().entries(cluster)]
    for d in base_dirs:
        needle = str(d)
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ")
                    if needle.encode() in cmdline:
                        found.append(f"process {entry.name}: {cmdline.decode()}")
    return found


def test_stop_leaves_nothing_behind() -> None:
    cluster = Cluster.start("aurora-pg", readers=1, timeline=FAST)
    base_dirs = [i.runtime.base_dir for i in cluster.instances.values()]
    addresses = [i.address for i in cluster.instances.values()]
    pids = [i.runtime.pid for i in cluster.instances.values()]
    assert HostsFile().entries(cluster.name)
    cluster.failover()  # leaves a pending rejoin timer behind
    cluster.stop()
    cluster.stop()  # idempotent
    assert leftovers(base_dirs, addresses, cluster.name) == []
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert names(cluster.events.events())[-1] == "cluster_stopped"


_CHILD = textwrap.dedent("""
    import json, sys, time
    from simulator.cluster import Cluster
    cluster = Cluster.start("aurora-pg", readers=1)
    print(json.dumps({
        "name": cluster.name,
        "dirs": [str(i.runtime.base_dir) for i in cluster.instances.values()],
        "addresses": [i.address for i in cluster.instances.values()],
        "pids": [i.runtime.pid for i in cluster.instances.values()],
    }), flush=True)
    time.sleep(600)
""")


def test_sigkilled_owner_leaves_nothing_after_the_next_start() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE,
                             cwd=Path(__file__).parent.parent, text=True)
    try:
        assert child.stdout is not None
        started = json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The servers die with their owner (parent-death signal) ...
    wait_until("the servers to die", lambda: not any(
        Path(f"/proc/{pid}").exists() for pid in started["pids"]), timeout=10)
    # ... and the next start sweeps their files, claims and names.
    with Cluster.start("pg"):
        pass
    assert leftovers([Path(d) for d in started["dirs"]], started["addresses"],
                     started["name"]) == []
    assert not any(started["name"] in line and MARK in line
                   for line in Path("/etc/hosts").read_text().splitlines())


def test_exit_without_stop_leaves_nothing() -> None:
    code = _CHILD.replace("time.sleep(600)", "")  # exits with the cluster still running
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=60, check=True)
    started = json.loads(result.stdout.splitlines()[0])
    assert leftovers([Path(d) for d in started["dirs"]], started["addresses"],
                     started["name"]) == []


@pytest.mark.parametrize(("kwargs", "culprit"), [
    ({"flavour": "aurora-postgres"}, "unknown flavour 'aurora-postgres'"),
    ({"flavour": "multi-az-pg", "readers": 0}, "readers=0"),
    ({"flavour": "multi-az-pg", "readers": 3}, "readers=3"),
    ({"flavour": "rds-pg", "readers": 1}, "readers=1"),
    ({"flavour": "aurora-pg", "readers": "2"}, "readers"),
    ({"flavour": "aurora-pg", "name": "my-db"}, "name 'my-db'"),
])
def test_bad_cluster_arguments(kwargs: dict[str, Any], culprit: str) -> None:
    flavour = kwargs.pop("flavour")
    with pytest.raises(ClusterError, match=culprit.replace("(", r"\(")):
        Cluster.start(flavour, **kwargs)


def test_bad_timeline() -> None:
    with pytest.raises(ClusterError, match="detection_delay"):
        Timeline(detection_delay=-1)


def test_bad_control_plane_requests(aurora: Cluster, rds_pg: Cluster,
                                    multi_az: Cluster) -> None:
    writer = aurora.writer
    with pytest.raises(ClusterError, match="'instance-9'"):
        aurora.failover(target="instance-9")
    with pytest.raises(ClusterError, match=f"'{writer.id}' is the writer"):
        aurora.failover(target=writer.id)
    with pytest.raises(ClusterError, match="mode='soft'"):
        aurora.failover(mode="soft")
    with pytest.raises(ClusterError, match="no reader to fail over to"):
        rds_pg.failover()
    with pytest.raises(ClusterError, match="is the writer"):
        aurora.remove_reader(writer.id)
    with pytest.raises(ClusterError, match="at least 2 readers"):
        multi_az.remove_reader(multi_az.readers[0].id)
    with pytest.raises(ClusterError, match="at most 2 readers"):
        multi_az.add_reader()
    with pytest.raises(ClusterError, match="already exists"):
        aurora.add_reader(writer.id)
    with pytest.raises(ClusterError, match="not a reader"):
        aurora.set_replica_lag(writer.id, 1)
    with pytest.raises(ClusterError, match="lag"):
        aurora.set_replica_lag(aurora.readers[0].id, -1)
    with pytest.raises(ClusterError, match="status age"):
        aurora.set_status_age(writer.id, -5)
    with pytest.raises(ClusterError, match="is running"):
        aurora.start_instance(writer.id)
    with pytest.raises(ClusterError, match="they must match"):
        aurora.create_blue_green(rds_pg)
    with pytest.raises(ClusterError, match="another cluster"):
        aurora.create_blue_green(aurora)
    with pytest.raises(ClusterError, match="does not support blue/green"):
        multi_az.engine.publish_blue_green(multi_az.writer, [])
