"""resilient_db.topology without a database: addressing, reading self reports, the role check,
cluster identity, and the shared monitor (high-rate search, probes in parallel, hand-over of
the winner's connection, supervision, weak subscribers, shutdown) against a fake cluster."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

import resilient_db
from resilient_db import _params, topology
from resilient_db._pipeline import HostSpec
from resilient_db.dialects import get_dialect
from resilient_db.dialects.base import Topology, TopologyRow
from resilient_db.dialects.pg import AURORA_INSTANCE_ID, AURORA_TOPOLOGY, IS_READER
from resilient_db.failover_core import SelfReport
from resilient_db.hosts import Host, Role, TopologySnapshot
from resilient_db.selection import STRATEGY_NAMES
from resilient_db.topology import (
    Addressing,
    TopologyMonitor,
    confirmed_role,
    read_self_report,
    server_identity,
)

pytestmark = pytest.mark.unit

AURORA_PG = get_dialect("aurora-pg")
MULTI_AZ_PG = get_dialect("multi-az-pg")
PATTERN = "?.abc123.us-east-1.rds.amazonaws.com"
CLUSTER = "db.cluster-abc123.us-east-1.rds.amazonaws.com"


def addressing() -> Addressing:
    return Addressing.for_host(CLUSTER, 5432, None)


# --- a fake Aurora PostgreSQL cluster ---------------------------------------------------------


class FakeError(Exception):
    """A driver error; ``disconnect`` says whether it means the connection is gone."""

    def __init__(self, message: str, disconnect: bool = True) -> None:
        super().__init__(message)
        self.disconnect = disconnect


class FakeCluster:
    """Instances by id: role, whether they run, whether they are blackholed; the topology
    every instance reports (readers may lag behind with a stale view)."""

    def __init__(self, *ids: str) -> None:
        self.lock = threading.Lock()
        self.roles = {i: ("writer" if n == 0 else "reader") for n, i in enumerate(ids)}
        self.down: set[str] = set()
        self.blackholed: set[str] = set()
        self.views: dict[str, str] = {}  # instance -> writer it reports (default: the truth)
        self.connects: list[str] = []
        self.open = 0
        self.gate: threading.Event | None = None  # when set: every read waits for it to open
        self.reads = 0
        self.in_read = threading.Event()

    def writer(self) -> str | None:
        return next((i for i, r in self.roles.items() if r == "writer"), None)

    def promote(self, new: str) -> None:
        with self.lock:
            for i in self.roles:
                self.roles[i] = "writer" if i == new else "reader"

    def instance_of(self, host: str) -> str:
        return host.split(".", maxsplit=1)[0]


class FakeConn:
    def __init__(self, cluster: FakeCluster, instance: str) -> None:
        self.cluster = cluster
        self.instance = instance
        self.closed = False
        self.aborted = False
        cluster.open += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.cluster.open -= 1


class FakeDriver:
    code = "psycopg"
    default_port = 5432

    def query(self, conn: FakeConn, sql: str) -> list[tuple[Any, ...]]:
        cluster = conn.cluster
        if cluster.gate is not None:
            cluster.in_read.set()
            cluster.gate.wait(5)
        cluster.reads += 1
        if conn.closed or conn.instance in cluster.down:
            raise FakeError("server closed the connection")
        if conn.instance in cluster.blackholed:
            deadline = time.monotonic() + 5  # no answer: until the read timeout or an abort
            while time.monotonic() < deadline and not conn.aborted:
                time.sleep(0.005)
            raise FakeError("aborted" if conn.aborted else "read timeout")
        role = cluster.roles[conn.instance]
        if sql == AURORA_INSTANCE_ID:
            return [(conn.instance,)]
        if sql == IS_READER:
            return [(role != "writer",)]
        if sql == AURORA_TOPOLOGY:
            writer = cluster.views.get(conn.instance, cluster.writer())
            now = datetime.now(timezone.utc)
            return [(i, "MASTER_SESSION_ID" if i == writer else f"s-{i}", 1.0, 0.0, now, now)
                    for i in cluster.roles]
        if sql == topology.PG_SYSTEM_IDENTIFIER:
            return [(42,)]
        raise FakeError(f"unexpected statement {sql}", disconnect=False)

    def is_disconnect(self, exc: BaseException) -> bool:
        return isinstance(exc, FakeError) and exc.disconnect

    def abort(self, conn: FakeConn) -> bool:
        conn.aborted = True
        return True


class Subscriber:
    """What the failover plugin is to a monitor."""

    def __init__(self, cluster: FakeCluster, *, refresh: float = 30.0, high: float = 0.01,
                 probe_timeout: float = 0.2, disposal: float = 0.0) -> None:
        self.cluster = cluster
        self.refresh_interval = refresh
        self.high_refresh_interval = high
        self.probe_timeout = probe_timeout
        self.disposal_time = disposal

    def open_monitoring_connection(self, host: HostSpec, timeout: float) -> FakeConn:
        cluster = self.cluster
        instance = cluster.instance_of(host.host)
        cluster.connects.append(instance)
        if instance in cluster.blackholed:
            time.sleep(timeout)
            raise FakeError("connect timeout")
        if instance in cluster.down:
            raise FakeError("connection refused")
        return FakeConn(cluster, instance)


def host(instance: str) -> Host:
    return Host(f"{instance}.abc123.us-east-1.rds.amazonaws.com", 5432)


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster("instance-1", "instance-2", "instance-3")


@pytest.fixture
def monitor(cluster: FakeCluster) -> Iterator[TopologyMonitor]:
    mon = TopologyMonitor("fake", FakeDriver(), AURORA_PG, addressing())
    yield mon
    mon.stop()


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- addressing and reading -------------------------------------------------------------------


def test_addressing_derives_the_pattern_from_an_rds_name() -> None:
    derived = Addressing.for_host(CLUSTER, 5432, None)
    assert str(derived.pattern) == PATTERN and not derived.explicit
    assert Addressing.for_host("10.0.0.1", 5432, None).pattern is None
    explicit = Addressing.for_host("10.0.0.1", 5432, "?.mydomain.example:6000")
    assert explicit.explicit and explicit.pattern is not None and explicit.pattern.port == 6000


def test_addressing_uses_row_endpoints_unless_a_pattern_is_set() -> None:
    rows = (TopologyRow("db-A", True, endpoint="a.abc123.us-east-1.rds.amazonaws.com", port=5433),
            TopologyRow("db-B", False, endpoint="b.abc123.us-east-1.rds.amazonaws.com", port=5433))
    snap = addressing().snapshot(Topology(rows))
    assert [h.address for h in snap.hosts] == [
        "a.abc123.us-east-1.rds.amazonaws.com:5433", "b.abc123.us-east-1.rds.amazonaws.com:5433"]
    forced = Addressing.for_host("10.0.0.1", 5432, "?.other.example").snapshot(Topology(rows))
    assert forced.writer is not None and forced.writer.host == "db-A.other.example"
    assert forced.writer.port == 5433


def test_read_self_report_on_writer_and_reader(cluster: FakeCluster) -> None:
    driver = FakeDriver()
    on_writer = read_self_report(driver, AURORA_PG, FakeConn(cluster, "instance-1"),
                                 host("instance-1"), addressing())
    assert on_writer.instance_id == "instance-1" and on_writer.is_reader is False
    assert on_writer.topology is not None and on_writer.topology.writer is not None
    assert on_writer.topology.writer.host == "instance-1.abc123.us-east-1.rds.amazonaws.com"
    assert on_writer.topology.writer.port == 5432
    bare = read_self_report(driver, AURORA_PG, FakeConn(cluster, "instance-2"),
                            host("instance-2"), addressing(), with_topology=False)
    assert bare.is_reader is True and bare.topology is None


def report(instance: str, is_reader: bool | None, writer: str | None) -> SelfReport:
    snap = None
    if writer is not None:
        snap = TopologySnapshot((Host(f"{writer}.x", 1, instance_id=writer, role=Role.WRITER),))
    return SelfReport(host(instance), 1.0, instance, is_reader, snap)


@pytest.mark.parametrize(
    ("rep", "has_topology", "role"),
    [
        (report("a", False, "a"), True, Role.WRITER),
        (report("a", True, "b"), True, Role.READER),  # demoted: follows the new writer
        (report("a", True, "a"), True, Role.WRITER),  # writer turned read-only
        (report("a", True, None), True, Role.UNKNOWN),  # read-only, nobody named
        (report("a", True, None), False, Role.READER),  # no topology: its word is all
        (report("a", None, "a"), True, Role.UNKNOWN),
        (SelfReport(host("a"), 1.0, error="boom"), True, Role.UNKNOWN),
    ],
)
def test_confirmed_role(rep: SelfReport, has_topology: bool, role: Role) -> None:
    assert confirmed_role(rep, has_topology=has_topology) is role


def test_confirmed_role_with_a_verified_writer_elsewhere() -> None:
    lagging_view = report("a", True, "a")  # rejoined as a reader; its view not replicated yet
    assert confirmed_role(lagging_view, has_topology=True, verified_writer="b") is Role.READER
    assert confirmed_role(lagging_view, has_topology=True, verified_writer="a") is Role.WRITER
    # A writable instance is the writer whatever the monitor thought before.
    assert confirmed_role(report("a", False, "a"), has_topology=True,
                          verified_writer="b") is Role.WRITER


def test_server_identity(cluster: FakeCluster) -> None:
    driver = FakeDriver()
    conn = FakeConn(cluster, "instance-1")
    assert server_identity(driver, AURORA_PG, conn, None) == "pg-system:42"
    rep = read_self_report(driver, AURORA_PG, conn, host("instance-1"), addressing())
    mysql = get_dialect("aurora-mysql")
    ident = server_identity(driver, mysql, conn, rep)
    assert ident is not None and ident.startswith("mysql-members:")
    assert ident == server_identity(driver, mysql, FakeConn(cluster, "instance-2"), rep)
    assert server_identity(driver, mysql, conn, None) is None


def test_reader_strategy_names_match_the_selection_module() -> None:
    assert _params.READER_STRATEGIES == STRATEGY_NAMES
    assert {m.lower() for m in _params.FAILOVER_MODES} == {"strict_writer", "strict_reader",
                                                           "reader_or_writer"}


# --- the monitor ------------------------------------------------------------------------------


def seed(monitor: TopologyMonitor, cluster: FakeCluster, sub: Subscriber) -> None:
    conn = FakeConn(cluster, "instance-1")  # the application's connection
    rep = read_self_report(FakeDriver(), AURORA_PG, conn, host("instance-1"), addressing())
    conn.close()
    monitor.offer(rep)
    monitor.subscribe(sub, Host(CLUSTER, 5432))


def test_offer_from_the_writer_verifies_it(monitor: TopologyMonitor,
                                           cluster: FakeCluster) -> None:
    sub = Subscriber(cluster)
    seed(monitor, cluster, sub)
    assert monitor.writer is not None and monitor.writer.instance_id == "instance-1"
    assert monitor.epoch == 0 and monitor.snapshot is not None
    assert len(monitor.snapshot.hosts) == 3
    wait_until(lambda: monitor.connection_open)
    assert cluster.open == 1  # the monitor's one connection


def test_high_rate_search_finds_the_new_writer_first_hand(monitor: TopologyMonitor,
                                                          cluster: FakeCluster) -> None:
    sub = Subscriber(cluster)
    seed(monitor, cluster, sub)
    since = time.monotonic()
    cluster.down.add("instance-1")
    cluster.roles["instance-1"] = "stopped"
    # Readers still name the old writer until the new one publishes; instance-3 lags behind.
    cluster.views["instance-3"] = "instance-1"
    found: list[Host | None] = []
    waiter = threading.Thread(target=lambda: found.append(monitor.wait_for_writer(since, 5.0)))
    waiter.start()
    time.sleep(0.1)
    assert not found  # no instance claims the role yet
    cluster.promote("instance-2")
    waiter.join(5)
    assert found and found[0] is not None and found[0].instance_id == "instance-2"
    assert monitor.epoch == 1
    election = monitor.last_election()
    assert election is not None and election.writer is not None
    # The winner's probe connection becomes the monitor's only connection.
    wait_until(lambda: cluster.open == 1 and monitor.connection_open)


def test_a_blackholed_instance_does_not_stall_the_search(monitor: TopologyMonitor,
                                                         cluster: FakeCluster) -> None:
    sub = Subscriber(cluster, refresh=0.01, probe_timeout=3.0)
    seed(monitor, cluster, sub)
    wait_until(lambda: monitor.connection_open)
    cluster.blackholed.add("instance-1")  # the monitor's own reads on it hang from now on
    time.sleep(0.05)
    cluster.promote("instance-3")
    start = time.monotonic()
    writer = monitor.wait_for_writer(start, 2.0)
    assert writer is not None and writer.instance_id == "instance-3"
    assert time.monotonic() - start < 1.0


def test_no_writer_gives_none_and_probe_verdicts(monitor: TopologyMonitor,
                                                 cluster: FakeCluster) -> None:
    sub = Subscriber(cluster)
    seed(monitor, cluster, sub)
    cluster.down.add("instance-1")
    cluster.roles["instance-1"] = "stopped"
    assert monitor.wait_for_writer(time.monotonic(), 0.3) is None
    outcomes = {a.host.split(".")[0]: a.outcome for a in monitor.probe_attempts()}
    assert outcomes["instance-1"] == "probe failed"
    assert outcomes["instance-2"] == "probe: is a reader"


def test_monitor_thread_ends_when_no_subscriber_is_left(monitor: TopologyMonitor,
                                                        cluster: FakeCluster) -> None:
    sub = Subscriber(cluster, refresh=0.02)
    seed(monitor, cluster, sub)
    wait_until(lambda: monitor.running and monitor.connection_open)
    del sub
    gc.collect()
    wait_until(lambda: not monitor.running)
    assert cluster.open == 0 and monitor.subscribers == 0


def test_monitor_thread_ends_when_its_last_subscriber_unsubscribes(
        monitor: TopologyMonitor, cluster: FakeCluster) -> None:
    # A closed connection the application still holds must not keep the monitor reading:
    # the thread ends at once, not after its (here one-minute) refresh wait.
    first, second = Subscriber(cluster, refresh=60.0), Subscriber(cluster, refresh=60.0)
    seed(monitor, cluster, first)
    monitor.subscribe(second)
    wait_until(lambda: monitor.running and monitor.connection_open)
    monitor.unsubscribe(first)
    monitor.unsubscribe(first)  # closing twice is harmless
    assert monitor.subscribers == 1
    time.sleep(0.1)
    assert monitor.running  # one subscriber left
    monitor.unsubscribe(second)
    wait_until(lambda: not monitor.running, timeout=5)
    assert cluster.open == 0 and monitor.subscribers == 0
    monitor.subscribe(first)  # a later subscriber starts it again
    wait_until(lambda: monitor.running and monitor.connection_open)


def test_the_monitor_outlives_its_last_connection_by_the_disposal_time(
        monitor: TopologyMonitor, cluster: FakeCluster) -> None:
    # A connection per request: each closes before the next opens. The monitor keeps its
    # thread and server connection between them (no new monitoring session per request),
    # without reading while nobody uses it; it ends after the disposal time.
    first = Subscriber(cluster, refresh=0.05, disposal=60.0)
    seed(monitor, cluster, first)
    wait_until(lambda: monitor.running and monitor.connection_open)
    thread = monitor._thread
    monitor.unsubscribe(first)
    time.sleep(0.3)
    reads = cluster.reads
    time.sleep(0.3)
    assert cluster.reads == reads  # idle: not reading
    assert monitor.running and monitor.connection_open and monitor._thread is thread
    connects = len(cluster.connects)
    second = Subscriber(cluster, refresh=0.05, disposal=0.2)
    monitor.subscribe(second)
    wait_until(lambda: cluster.reads > reads)  # reading again at once, same thread
    assert monitor._thread is thread and len(cluster.connects) == connects
    monitor.unsubscribe(second)
    time.sleep(1.0)
    assert monitor.running  # the longest disposal asked (60 s) still applies


def test_an_idle_monitor_ends_after_the_disposal_time(monitor: TopologyMonitor,
                                                      cluster: FakeCluster) -> None:
    sub = Subscriber(cluster, refresh=60.0, disposal=0.3)
    seed(monitor, cluster, sub)
    wait_until(lambda: monitor.running and monitor.connection_open)
    monitor.unsubscribe(sub)
    wait_until(lambda: not monitor.running, timeout=5)
    assert cluster.open == 0


def test_a_subscriber_arriving_as_the_thread_ends_gets_a_running_monitor(
        monitor: TopologyMonitor, cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # The thread found nobody left and is about to end when a connection subscribes: the
    # newcomer must not be left with a monitor that never runs.
    first = Subscriber(cluster, refresh=60.0)
    seed(monitor, cluster, first)
    wait_until(lambda: monitor.running and monitor.connection_open)
    live = monitor._live
    emptied = threading.Event()

    def deciding_to_end() -> list[Any]:
        found = live()
        if not found and not emptied.is_set():
            emptied.set()
            time.sleep(0.3)  # widen the window between "nobody left" and ending
        return found

    monkeypatch.setattr(monitor, "_live", deciding_to_end)
    monitor.unsubscribe(first)
    assert emptied.wait(5)
    second = Subscriber(cluster, refresh=60.0)
    monitor.subscribe(second)
    time.sleep(0.6)  # the old thread has ended by now
    assert monitor.running
    wait_until(lambda: monitor.connection_open)


def test_a_subscriber_leaving_during_a_refresh_ends_the_monitor(
        monitor: TopologyMonitor, cluster: FakeCluster) -> None:
    # The last connection is closed while the monitor is reading (nobody is waiting to be
    # notified): after the read the thread ends instead of starting its one-minute wait.
    sub = Subscriber(cluster, refresh=60.0)
    conn = FakeConn(cluster, "instance-1")  # the application's connection
    monitor.offer(read_self_report(FakeDriver(), AURORA_PG, conn, host("instance-1"),
                                   addressing()))
    conn.close()
    cluster.gate = threading.Event()
    monitor.subscribe(sub, Host(CLUSTER, 5432))
    assert cluster.in_read.wait(5)
    monitor.unsubscribe(sub)
    cluster.gate.set()
    wait_until(lambda: not monitor.running, timeout=5)
    assert cluster.open == 0


def test_a_crashing_monitor_is_restarted_and_counted(monitor: TopologyMonitor,
                                                     cluster: FakeCluster,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = monitor._refresh
    calls = {"n": 0}

    def flaky(subscribers: list[Any], timeout: float) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("bug")
        return real(subscribers, timeout)

    monkeypatch.setattr(monitor, "_refresh", flaky)
    sub = Subscriber(cluster)
    seed(monitor, cluster, sub)
    wait_until(lambda: monitor.crashes == 1 and monitor.connection_open)
    assert monitor.running


def test_shutdown_stops_monitors_and_a_later_use_starts_again(cluster: FakeCluster) -> None:
    def create() -> TopologyMonitor:
        return TopologyMonitor("fake-registry", FakeDriver(), AURORA_PG, addressing())

    endpoint = topology.endpoint_key("psycopg", "aurora-pg", CLUSTER, 5432, None)
    mon = topology.monitor_for("fake-registry", create, endpoint)
    assert topology.known_monitor(endpoint) is mon
    sub = Subscriber(cluster)
    seed(mon, cluster, sub)
    wait_until(lambda: mon.running)
    assert "topology" in resilient_db._lifecycle.running()
    resilient_db.shutdown()
    wait_until(lambda: not mon.running)
    assert mon.stopped and topology.known_monitor(endpoint) is None
    again = topology.monitor_for("fake-registry", create, endpoint)
    assert again is not mon and not again.stopped
    again.stop()


# --- the failover plugin's configuration (no server) --------------------------------------------


def _plugin(host: str, **values: Any) -> Any:
    from resilient_db._pipeline import PluginContext
    from resilient_db._properties import Settings, lookup
    from resilient_db.drivers import get_driver
    from resilient_db.plugins.failover import FailoverPlugin

    props = {k: lookup(k) for k in values}
    settings = Settings({p: p.parse(values[k]) for k, p in props.items() if p is not None})
    return FailoverPlugin(PluginContext(settings, get_driver("psycopg"), HostSpec(host, 5432)))


def test_failover_mode_defaults_from_the_endpoint() -> None:
    from resilient_db.failover_core import FailoverMode

    assert _plugin(CLUSTER).mode is FailoverMode.STRICT_WRITER
    reader = CLUSTER.replace(".cluster-", ".cluster-ro-")
    assert _plugin(reader).mode is FailoverMode.READER_OR_WRITER
    assert _plugin("10.1.2.3").mode is FailoverMode.STRICT_WRITER
    assert _plugin(reader, failover_mode="STRICT-READER").mode is FailoverMode.STRICT_READER


def test_failover_properties_convert_units_and_validate() -> None:
    plugin = _plugin(CLUSTER, topology_refresh_ms=500, cluster_topology_high_refresh_rate_ms="50",
                     failover_timeout_sec=7, failover_reader_host_selector_strategy="round-robin")
    assert plugin.refresh_interval == 0.5 and plugin.high_refresh_interval == 0.05
    assert plugin.timeout == 7.0 and plugin.strategy.name == "round_robin"
    assert _plugin(CLUSTER, enable_failover="false").dormant()
    with pytest.raises(resilient_db.ConfigurationError, match="on_connect"):
        _plugin(CLUSTER, on_connect="print")
    hook = _plugin(CLUSTER, on_connect=print).on_connect
    assert hook is print
