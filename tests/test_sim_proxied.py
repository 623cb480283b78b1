"""Proxied simulated clusters (``Cluster(proxied=True)``): all application and monitor traffic
goes through the per-instance proxies (simulator.toxiproxy_server), and a failover works
through them.

The proof: a ``timeout`` toxic (Toxiproxy's blackhole) on the writer's proxy, set through
the Toxiproxy API with no iptables rule, makes resilient_db's failure monitor declare the
writer dead and abort the statement in flight; the failover plugin then reaches the writer
the cluster promotes, again through its proxy; and every session of the application user
that any server sees comes from a proxy's address. The cluster contract on a proxied
cluster is in test_sim_pg_cluster.py / test_sim_mysql_cluster.py (``local-proxied``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from chaos.faults import Toxic
from chaos.toxiproxy import ToxiproxyBackend, ToxiproxyClient, ToxiproxyError
from resilient_db.plugins.efm import EfmPlugin
from simulator._addresses import claim_is_held, listening_addresses
from simulator.cluster import Cluster, Timeline

from .clusters import require_backend
from .waiting import wait_until

pytestmark = pytest.mark.real_server

TIMELINE = Timeline(detection_delay=0.2, rejoin_delay=0.5)
#: EFM settings: a dead host is declared within INTERVAL * (COUNT + 1) of the failure.
GRACE, INTERVAL, COUNT = 0.3, 0.2, 2
#: Liveness margin for a loaded machine (speed goals live in the benchmarks).
MARGIN = 3.0

ENGINES: dict[str, tuple[str, Any, dict[str, Any], str, str]] = {
    "pg": ("aurora-pg", psycopg.Connection.connect, {},
           "SELECT pg_catalog.aurora_db_instance_identifier()", "SELECT pg_catalog.pg_sleep(60)"),
    "mysql": ("aurora-mysql", mysql.connector.connect,
              {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"},
              "SELECT aurora_sim.aurora_server_id()", "SELECT SLEEP(60)"),
}


@pytest.fixture(scope="module", params=list(ENGINES))
def proxied(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Cluster.start(ENGINES[request.param][0], readers=2, timeline=TIMELINE,
                       proxied=True) as cluster:
        yield cluster
    resilient_db.shutdown()


def sessions(cluster: Cluster, instance_id: str, user: str) -> list[tuple[str, str]]:
    """(client address, statement) of ``user``'s sessions on an instance, seen by the server
    itself (a superuser connection straight to its address)."""
    with cluster.superuser(instance_id) as conn:
        cur = conn.cursor()
        if cluster.flavour.engine == "postgresql":
            cur.execute("SELECT host(client_addr), query FROM pg_catalog.pg_stat_activity "
                        "WHERE usename = %s", (user,))
            rows = [(str(r[0]), str(r[1])) for r in cur.fetchall()]
        else:
            cur.execute("SELECT host, COALESCE(info, '') FROM information_schema.processlist "
                        "WHERE user = %s", (user,))
            rows = [(str(r[0]).rsplit(":", 1)[0], str(r[1])) for r in cur.fetchall()]
        cur.close()
        return rows


def test_a_blackholed_proxy_is_declared_dead_and_failover_goes_through_the_proxies(
        proxied: Cluster, sink: resilient_db.CollectingSink) -> None:
    cluster = proxied
    wait_until("a settled cluster", cluster.settled)
    _, target, extra, instance_sql, sleep_sql = ENGINES[
        "pg" if cluster.flavour.engine == "postgresql" else "mysql"]
    user = str(cluster.connect_kwargs()["user"])
    proxies = {i.id: i.proxy_address for i in cluster.instances.values()}
    assert all(proxies.values()) and not set(proxies.values()) & {
        i.address for i in cluster.instances.values()}
    old = cluster.writer
    conn = resilient_db.connect(target, plugins="failover,efm", **{
        **cluster.connect_kwargs(), **extra, "autocommit": True, "connect_timeout": 3,
        "failure_detection_time_ms": GRACE * 1000,
        "failure_detection_interval_ms": INTERVAL * 1000,
        "failure_detection_count": COUNT, "failover_timeout_sec": 60})
    backend = ToxiproxyBackend.for_cluster(cluster)
    efm = conn.resilient.plugin("efm")
    assert isinstance(efm, EfmPlugin)
    try:
        cur = conn.cursor()
        cur.execute(instance_sql)
        assert cur.fetchall() == [(old.id,)]
        promoted: list[Any] = []
        errors: list[BaseException] = []

        def fault() -> None:
            try:
                wait_until("the statement running on the writer", lambda: any(
                    "60" in query and "SLEEP" in query.upper()
                    for _, query in sessions(cluster, old.id, user)))
                # ... past its grace period, the writer's monitor answered through its proxy
                # (a monitor that first connects after the blackhole would wait out its
                # connect timeout instead).
                wait_until("the writer's monitor answering probes", lambda: (
                    (monitor := efm.monitor) is not None and monitor.connection_open
                    and monitor.probes_ok > 0))
                # Blackhole the writer's proxy only: the server and its address are fine.
                backend.apply(old.id, old.address, old.port, Toxic("timeout"))
                promoted.append(time.monotonic())
                wait_until("the monitor to abort the statement",
                           lambda: sink.of_kind("efm.aborted"))
                events = cluster.failover()  # crash + promotion, the old proxy still black
                promoted.append(next(e for e in events if e.name == "promoted"))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=fault, daemon=True)
        thread.start()
        started = time.monotonic()
        with pytest.raises(resilient_db.FailoverSuccessError):
            cur.execute(sleep_sql)
            cur.fetchall()
        thread.join(60)
        assert not errors, errors
        blackholed_at, event = promoted
        aborted = sink.of_kind("efm.aborted")
        assert aborted[0].at - blackholed_at < INTERVAL * (COUNT + 1) + MARGIN
        assert time.monotonic() - started < 60
        kinds = sink.kinds()
        assert kinds.index("efm.host_down") < kinds.index("failover.started")
        # The statement after the failover runs on the promoted writer, through its proxy.
        cur.execute(instance_sql)
        assert cur.fetchall() == [(event.instance,)] and event.instance == cluster.writer.id
        new = cluster.writer
        assert [a for a, _ in sessions(cluster, new.id, user)]
        for instance in cluster.instances.values():
            if instance.role == "stopped":
                continue
            seen = {address for address, _ in sessions(cluster, instance.id, user)}
            assert seen <= set(proxies.values()), (instance.id, seen, proxies)
        cur.close()
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        backend.clear()
    cluster.events.wait_for("rejoined_as_reader", since=promoted[1].mono if len(promoted) > 1
                            else 0.0, timeout=60)
    wait_until("the cluster settled again", cluster.settled)


def test_proxies_follow_membership_and_go_with_the_cluster() -> None:
    """A reader added gets its proxy (and its names lead there), a reader removed loses it,
    and stopping the cluster stops the API and every proxy and releases their addresses."""
    with Cluster.start("aurora-pg", readers=0, timeline=TIMELINE, proxied=True) as cluster:
        assert cluster.toxiproxy is not None
        client = ToxiproxyClient(cluster.toxiproxy.url)
        events = cluster.add_reader()
        added = cluster.readers[0]
        assert [e.instance for e in events if e.name == "proxy_created"] == [added.id]
        assert added.proxy_address is not None
        assert cluster.proxy_address(added.id) == f"{added.proxy_address}:{cluster.port}"
        assert sorted(client.proxies()) == ["instance-1", "instance-2"]
        assert socket.gethostbyname(added.endpoint) == added.proxy_address
        assert socket.gethostbyname(cluster.reader_endpoint) == added.proxy_address
        address = added.proxy_address
        cluster.remove_reader(added.id)
        assert sorted(client.proxies()) == ["instance-1"]
        assert not claim_is_held(address) and address not in listening_addresses()
        writer_proxy = cluster.writer.proxy_address
        url = cluster.toxiproxy.url
    assert writer_proxy is not None
    assert not claim_is_held(writer_proxy) and writer_proxy not in listening_addresses()
    with pytest.raises(ToxiproxyError, match="unreachable"):
        ToxiproxyClient(url, timeout=2).version()


@pytest.mark.docker
def test_proxied_cluster_on_containers() -> None:
    """The proxies do not depend on the instance runtime: a proxied container cluster answers
    through them (its servers listen on host loopback addresses, as local ones do)."""
    require_backend("testcontainers")
    with Cluster.start("aurora-pg", readers=1, timeline=TIMELINE, backend="testcontainers",
                       proxied=True) as cluster:
        for instance in cluster.instances.values():
            with psycopg.connect(**{**cluster.connect_kwargs(instance.endpoint),
                                    "connect_timeout": 5}) as conn:
                row = conn.execute(
                    "SELECT host(pg_catalog.inet_client_addr()), "
                    "pg_catalog.aurora_db_instance_identifier()").fetchone()
            assert row == (instance.proxy_address, instance.id)
        events = cluster.failover()
        new = next(e for e in events if e.name == "promoted").instance
        assert new is not None
        with psycopg.connect(**{**cluster.connect_kwargs(cluster.instance(new).endpoint),
                                "connect_timeout": 5}) as conn:
            assert conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone() == (False,)
