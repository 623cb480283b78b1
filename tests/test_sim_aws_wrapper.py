"""Acceptance: the unmodified AWS Advanced Python Wrapper (3.1) against the simulator.

A third-party Aurora-aware client must work against the simulated clusters as against real
ones (DESIGN §12). The wrapper recognises each flavour on its own, and its failover plugin,
given only the cluster endpoint and the host pattern, survives a failover: the next
statement raises its ``FailoverSuccessError`` and the one after runs on the promoted
instance.

During failover the wrapper runs, against the simulator (seen with ``log_statement=all``):
the topology query on ``pg_catalog.aurora_replica_status()`` (filtering rows older than
300 s by ``last_update_timestamp``, keeping NULL ones), the writer check
``SELECT SERVER_ID FROM pg_catalog.aurora_replica_status() WHERE SESSION_ID =
'MASTER_SESSION_ID' AND SERVER_ID = pg_catalog.aurora_db_instance_identifier()``,
``pg_catalog.pg_is_in_recovery()`` and ``pg_catalog.aurora_db_instance_identifier()``.

The wrapper shares topology between connections with the same ``cluster_id`` (default
``"1"``) for the whole process, so each cluster here gets its own ``cluster_id``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from aws_advanced_python_wrapper import (  # type: ignore[import-untyped]
    AwsWrapperConnection,
    release_resources,
)
from aws_advanced_python_wrapper.errors import (  # type: ignore[import-untyped]
    FailoverSuccessError,
)

from simulator.cluster import Cluster, Timeline

from .waiting import wait_until

pytestmark = pytest.mark.real_server

FAILOVER_TIMEOUT = 60.0
TIMELINE = Timeline(detection_delay=0.5, rejoin_delay=1.0)


@pytest.fixture(scope="module", autouse=True)
def _release_wrapper_threads() -> Iterator[None]:
    yield
    release_resources()  # the wrapper's monitor threads


@pytest.fixture(scope="module")
def module_cluster() -> Iterator[Cluster]:
    with Cluster.start("aurora-pg", readers=2, timeline=TIMELINE) as started:
        yield started


@pytest.fixture
def cluster(module_cluster: Cluster) -> Cluster:
    """The module's cluster once settled: a failover test that failed before its old writer
    rejoined must not leave the next test a stopped instance or a reader not yet following."""
    wait_until("the cluster settled", module_cluster.settled, ignoring=(psycopg.Error,))
    return module_cluster


def wrapper_connect(cluster: Cluster, host: str | None = None, **extra: Any) -> Any:
    kwargs = cluster.connect_kwargs()
    return AwsWrapperConnection.connect(
        psycopg.Connection.connect,
        host=host or cluster.writer_endpoint, port=cluster.port, dbname=kwargs["dbname"],
        user=kwargs["user"], password=kwargs["password"],
        cluster_instance_host_pattern=cluster.host_pattern, cluster_id=cluster.name,
        autocommit=True, **extra)


def instance_id(conn: Any) -> str:
    cursor = conn.cursor()
    cursor.execute("SELECT pg_catalog.aurora_db_instance_identifier()")
    row = cursor.fetchone()
    cursor.close()
    return str(row[0])


def wait_for_rejoin(cluster: Cluster, since: float) -> None:
    cluster.events.wait_for("rejoined_as_reader", since=since, timeout=FAILOVER_TIMEOUT)


@pytest.mark.parametrize("mode", ["crash", "graceful"])
def test_failover_plugin_survives_a_failover(cluster: Cluster, mode: str) -> None:
    conn = wrapper_connect(cluster, wrapper_dialect="aurora-pg", plugins="failover",
                           failover_timeout_sec=FAILOVER_TIMEOUT)
    try:
        old = cluster.writer
        assert instance_id(conn) == old.id
        cursor = conn.cursor()
        cursor.execute("CREATE TABLE IF NOT EXISTS wrapper_writes (id int)")
        target = cluster.readers[-1].id if mode == "graceful" else None
        events = cluster.failover(target=target, mode=mode)
        promoted = next(e for e in events if e.name == "promoted")
        assert promoted.instance != old.id
        started = time.monotonic()
        with pytest.raises(FailoverSuccessError):
            cursor.execute("SELECT pg_catalog.aurora_db_instance_identifier()")
        # The same connection object, now on the promoted instance (the wrapper wants new
        # cursors after a failover).
        assert instance_id(conn) == promoted.instance == cluster.writer.id
        cursor = conn.cursor()
        cursor.execute("INSERT INTO wrapper_writes VALUES (1)")
        elapsed = time.monotonic() - started
        assert elapsed < FAILOVER_TIMEOUT
        assert time.monotonic() - promoted.mono < FAILOVER_TIMEOUT
    finally:
        conn.close()
    wait_for_rejoin(cluster, events[0].mono)


_EXPECTED = {
    "aurora-pg": "AuroraPgDialect",
    "multi-az-pg": "MultiAzClusterPgDialect",
    "rds-pg": "RdsPgDialect",
    "pg": "PgDatabaseDialect",
}


@pytest.mark.parametrize("flavour", list(_EXPECTED))
def test_wrapper_recognises_the_flavour(flavour: str, cluster: Cluster) -> None:
    """No ``wrapper_dialect``: the wrapper guesses from the host name, then checks the
    server (and keeps its guess when no check contradicts it)."""
    subjects = [cluster] if flavour == "aurora-pg" else [Cluster.start(flavour)]
    try:
        for subject in subjects:
            hosts = [subject.writer_endpoint, *(i.endpoint for i in subject.instances.values())]
            for host in hosts:
                conn = wrapper_connect(subject, host=host, plugins="failover")
                try:
                    # No public accessor for the dialect; the wrapper is pinned to 3.1.*.
                    service = conn._plugin_service
                    assert type(service.database_dialect).__name__ == _EXPECTED[flavour], host
                    topology = {h.host for h in service.all_hosts}
                    if not subject.single_instance:
                        assert topology == {i.endpoint for i in subject.instances.values()}
                finally:
                    conn.close()
    finally:
        for subject in subjects:
            if subject is not cluster:
                subject.stop()
