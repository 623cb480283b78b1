"""The ``fastest_response_strategy`` plugin end to end on simulated clusters (Aurora PostgreSQL
and the Aurora MySQL look-alike on MariaDB), one reader made slower for real by kernel-level
packet delay (``chaos.netfault`` ``packet_delay``: existing connections slow down as on a slow
network): failover and ``initial_connection`` choose the fast reader, and follow when the other
one becomes the slow one; measurements refresh at the interval; one monitor (one server
session) per instance however many connections; a blackholed reader gets no measurement;
disposal, shutdown and the decisions recorded."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from chaos.netfault import NetworkFaults
from resilient_db import response_time
from resilient_db.plugins.fastest_response_strategy import FastestResponseStrategyPlugin
from resilient_db.response_time import ResponseTimeMonitor
from simulator.cluster import Cluster, Instance, Timeline

from .clusters import SharedClusters, settle_roles
from .test_fork import in_child, session_id
from .waiting import wait_for, wait_until

pytestmark = pytest.mark.real_server

TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.5)
#: Measurement interval of the tests (seconds): also the bound of one round trip.
INTERVAL = 0.5
#: Extra round-trip time of the slowed reader. Well below INTERVAL (a delayed round trip must
#: still be measured) and far above a loopback round trip.
DELAY = 0.15
PLUGINS = "failover,fastest_response_strategy"


@dataclass
class Env:
    name: str  # "pg" | "mysql"
    cluster: Cluster
    target: Callable[..., Any]
    extra: dict[str, Any]
    instance_sql: str
    opened: list[Any] = field(default_factory=list)

    def connect(self, endpoint: str | None = None, *, plugins: str = PLUGINS,
                **extra: Any) -> resilient_db.ConnectionProxy:
        kwargs = {**self.cluster.connect_kwargs(endpoint or self.cluster.writer.endpoint),
                  **self.extra, "autocommit": True, "connect_timeout": 5,
                  "failover_timeout_sec": 30, "response_measurement_interval_ms": INTERVAL * 1000,
                  **extra}
        conn = resilient_db.connect(self.target, plugins=plugins, **kwargs)
        self.opened.append(conn)
        return conn

    def instance(self, conn: Any) -> str:
        """The instance ``conn`` is on (a failover on the way is completed first)."""
        for _ in range(2):
            try:
                cur = conn.cursor()
                cur.execute(self.instance_sql)
                row = cur.fetchone()
                cur.close()
                return str(row[0])
            except resilient_db.FailoverSuccessError:
                continue
        raise AssertionError("two failovers in a row")

    def backend(self, conn: Any) -> int:
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()" if self.name == "pg" else "SELECT CONNECTION_ID()")
        value = int(cur.fetchone()[0])
        cur.close()
        return value

    def kill(self, conn: Any) -> None:
        """End ``conn``'s server session on the writer (its next statement fails over)."""
        backend = self.backend(conn)
        with self.cluster.superuser() as su:
            cur = su.cursor()
            cur.execute(f"SELECT pg_terminate_backend({backend})" if self.name == "pg"
                        else f"KILL {backend}")

    def close_opened(self) -> None:
        for conn in self.opened:
            with contextlib.suppress(Exception):
                conn.close()
        self.opened.clear()


@pytest.fixture(scope="module")
def clusters() -> Iterator[SharedClusters]:
    """One Aurora cluster per engine, started when a test first asks for it."""
    with SharedClusters(lambda engine: Cluster.start(engine, readers=2, timeline=TIMELINE),
                        settle_roles) as shared:
        yield shared


@pytest.fixture(params=["pg", "mysql"])
def env(request: pytest.FixtureRequest, clusters: SharedClusters) -> Iterator[Env]:
    """The engine's cluster, settled before and after the test (tests/clusters.py)."""
    shared = clusters.get(f"aurora-{request.param}")
    cluster = shared.acquire()
    if request.param == "pg":
        environment = Env("pg", cluster, psycopg.Connection.connect, {},
                          "SELECT pg_catalog.aurora_db_instance_identifier()")
    else:
        environment = Env("mysql", cluster, mysql.connector.connect,
                          {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"},
                          "SELECT aurora_sim.aurora_server_id()")
    yield environment
    resilient_db.shutdown()  # no monitor of a test outlives it
    environment.close_opened()
    shared.release()


@pytest.fixture
def faults(network_faults: NetworkFaults) -> NetworkFaults:
    return network_faults


def frs(conn: Any) -> FastestResponseStrategyPlugin:
    found = conn.resilient.plugin("fastest_response_strategy")
    assert isinstance(found, FastestResponseStrategyPlugin)
    return found


def monitor_of(instance: Instance) -> ResponseTimeMonitor:
    """The live monitor of ``instance`` (its topology address is its endpoint and port)."""
    address = f"{instance.endpoint}:{instance.port}".lower()
    for monitor in response_time.monitors():
        if monitor.address.lower() == address:
            return monitor
    raise AssertionError(f"no response-time monitor of {address}: "
                         f"{[m.address for m in response_time.monitors()]}")


def measured(instance: Instance) -> float | None:
    try:
        found = monitor_of(instance).measured
    except AssertionError:
        return None
    return None if found is None else found[0]


def wait_slow_and_fast(slow: Instance, fast: Instance) -> None:
    """Until the measurements show ``slow`` at least DELAY slower than ``fast``."""
    wait_for(f"{slow.id} measured slower than {fast.id}",
             lambda: (measured(slow), measured(fast)),
             lambda pair: pair[0] is not None and pair[1] is not None
             and pair[0] >= DELAY and pair[1] < pair[0] - DELAY / 2)


def threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


# --- the choice ----------------------------------------------------------------------------------


def failover_lands_on(env: Env) -> str:
    """A fresh connection to the writer whose session is killed fails over in strict_reader
    mode with fastest_response: the reader it lands on."""
    conn = env.connect(failover_mode="strict_reader",
                       failover_reader_host_selector_strategy="fastest_response")
    assert env.instance(conn) == env.cluster.writer.id
    env.kill(conn)
    return env.instance(conn)


def test_failover_chooses_the_fast_reader_and_follows_a_change(
        env: Env, faults: NetworkFaults, sink: resilient_db.CollectingSink) -> None:
    first, second = env.cluster.readers
    watcher = env.connect(failover_reader_host_selector_strategy="fastest_response")
    # Every instance is measured from the first connection on (the topology failover read).
    wait_until("every instance measured",
               lambda: all(measured(i) is not None for i in env.cluster.instances.values()))
    assert len(frs(watcher).times(())) == 0  # no host asked: nothing attached, nothing read

    fault = faults.packet_delay(first.address, delay=DELAY)
    wait_slow_and_fast(first, second)
    # Random would land on `first` half of the time: four landings out of four are no luck.
    assert [failover_lands_on(env) for _ in range(4)] == [second.id] * 4
    chosen = [d for d in sink.of_kind("reader.selected")
              if d.attributes["resilient_db.selection.strategy"] == "fastest_response"]
    assert len(chosen) >= 4
    for decision in chosen[-4:]:
        attributes = decision.attributes
        assert attributes["resilient_db.instance.id"] == second.id
        assert attributes["resilient_db.selection.measured"] == 2
        assert attributes["resilient_db.selection.response_time"] < DELAY

    # The other reader becomes the slow one: the measurements follow, and so does the choice.
    faults.heal(fault)
    faults.packet_delay(second.address, delay=DELAY)
    wait_slow_and_fast(second, first)
    assert [failover_lands_on(env) for _ in range(4)] == [first.id] * 4


def test_initial_connection_through_the_reader_endpoint_chooses_the_fast_reader(
        env: Env, faults: NetworkFaults) -> None:
    first, second = env.cluster.readers
    env.connect()  # its failover plugin serves the topology to initial_connection
    wait_until("every instance measured",
               lambda: all(measured(i) is not None for i in env.cluster.instances.values()))
    faults.packet_delay(second.address, delay=DELAY)
    wait_slow_and_fast(second, first)
    reader_endpoint = env.cluster.reader_endpoint
    landed = [env.instance(env.connect(
        reader_endpoint, plugins="initial_connection,fastest_response_strategy,failover",
        initial_connection_host_selector_strategy="fastest_response")) for _ in range(4)]
    assert landed == [first.id] * 4


# --- measuring -----------------------------------------------------------------------------------


def test_measurements_refresh_at_the_interval(env: Env, sink: resilient_db.CollectingSink,
                                              ) -> None:
    conn = env.connect()
    reader = env.cluster.readers[0]
    wait_until("the reader measured", lambda: measured(reader) is not None)
    monitor = monitor_of(reader)
    assert monitor.interval == INTERVAL and monitor.timeout == INTERVAL
    before, (_, at_before) = monitor.measurements, monitor.measured or (0.0, 0.0)
    wait_until("three more measurements", lambda: monitor.measurements >= before + 3)
    assert monitor.measured is not None and monitor.measured[1] > at_before
    records = [d for d in sink.of_kind("response_time.measured")
               if d.attributes["resilient_db.instance.id"] == reader.id]
    assert len(records) >= 4
    assert records[-1].plugin == "fastest_response_strategy"
    assert 0 < records[-1].attributes["resilient_db.response_time.seconds"] < INTERVAL
    assert records[-1].attributes["resilient_db.response_time.samples"] == \
        response_time.SAMPLES
    # A connection with a shorter interval speeds the shared monitor up; never slows it down.
    env.connect(response_measurement_interval_ms=200)
    assert monitor.interval == 0.2
    env.connect(response_measurement_interval_ms=5000)
    assert monitor.interval == 0.2
    assert frs(conn).interval == INTERVAL


def test_a_blackholed_reader_has_no_measurement_until_it_answers(
        env: Env, faults: NetworkFaults, sink: resilient_db.CollectingSink) -> None:
    env.connect()
    first, second = env.cluster.readers
    wait_until("the readers measured",
               lambda: measured(first) is not None and measured(second) is not None)
    fault = faults.blackhole(first.address)
    monitor = monitor_of(first)
    wait_until("the blackholed reader unmeasured", lambda: monitor.measured is None)
    unreachable = wait_for("a response_time.unreachable decision",
                           lambda: sink.of_kind("response_time.unreachable"), bool)
    assert unreachable[0].attributes["resilient_db.instance.id"] == first.id
    assert unreachable[0].attributes["resilient_db.response_time.timeout"] == INTERVAL
    # The other reader is measured all along, and a failover avoids the silent one.
    assert measured(second) is not None
    assert failover_lands_on(env) == second.id
    faults.heal(fault)
    wait_until("the reader measured again", lambda: monitor.measured is not None)
    assert len(sink.of_kind("response_time.unreachable")) == 1  # once per run of failures


def test_one_monitor_and_one_session_per_instance_for_many_connections(env: Env) -> None:
    conns = [env.connect() for _ in range(12)]
    instances = list(env.cluster.instances.values())
    wait_until("every instance measured", lambda: all(measured(i) is not None
                                                     for i in instances))
    assert len(response_time.monitors()) == len(instances) == 3
    assert all(monitor_of(i).users == len(conns) for i in instances)
    assert len(threads("resilient_db-response-time")) == 3
    for instance in instances:
        monitor = monitor_of(instance)
        ident = (monitor._conn.pgconn.backend_pid if env.name == "pg"
                 else monitor._conn.connection_id)
        with env.cluster.superuser(instance.id) as su:
            cur = su.cursor()
            if env.name == "pg":
                cur.execute("SELECT pid FROM pg_catalog.pg_stat_activity "
                            "WHERE application_name = %s",
                            (response_time.MEASURING_APPLICATION_NAME,))
            else:
                cur.execute("SELECT id FROM information_schema.processlist WHERE id = %s",
                            (ident,))
            sessions = [int(row[0]) for row in cur.fetchall()]
        assert sessions == [ident], (instance.id, sessions)
    # Closing the connections lets go of the monitors (they live on until disposal).
    for conn in conns:
        conn.close()
    assert all(monitor_of(i).users == 0 for i in instances)


# --- lifecycle -----------------------------------------------------------------------------------


def test_an_unused_monitor_is_disposed(env: Env, sink: resilient_db.CollectingSink) -> None:
    conn = env.connect(monitor_disposal_time_ms=300)
    reader = env.cluster.readers[0]
    wait_until("the reader measured", lambda: measured(reader) is not None)
    monitor = monitor_of(reader)
    env.opened.remove(conn)
    del conn  # dropped without close(): the monitors hold their users weakly
    gc.collect()
    wait_until("the monitor disposed", lambda: not monitor.running)
    assert monitor not in response_time.monitors() and not monitor.connection_open
    assert monitor.measured is None
    disposed = [d for d in sink.of_kind("response_time.monitor_disposed")
                if d.attributes["server.address"] == reader.endpoint]
    assert disposed and disposed[0].attributes["resilient_db.response_time.disposal"] == 0.3


def test_shutdown_stops_monitors_and_a_new_connection_starts_them_again(
        env: Env, faults: NetworkFaults, sink: resilient_db.CollectingSink) -> None:
    env.connect()
    reader = env.cluster.readers[0]
    wait_until("the reader measured", lambda: measured(reader) is not None)
    monitor = monitor_of(reader)
    faults.blackhole(reader.address)  # its next round trip blocks until the timeout
    wait_until("the monitor waiting on a silent reader", lambda: monitor.measured is None)
    resilient_db.shutdown()
    assert monitor.stopped and response_time.monitors() == []
    wait_until("monitor threads ended", lambda: not threads("resilient_db-response-time"))
    stopped = sink.of_kind("response_time.monitors_stopped")
    assert stopped and stopped[-1].attributes["resilient_db.response_time.monitors"] == 3
    faults.clear()
    env.connect()
    wait_until("the reader measured by a new monitor", lambda: measured(reader) is not None)
    assert monitor_of(reader) is not monitor


def test_a_forked_child_starts_its_own_monitors_and_leaves_the_parents_alone(env: Env) -> None:
    env.connect()
    reader = env.cluster.readers[0]
    wait_until("the reader measured", lambda: measured(reader) is not None)
    monitor = monitor_of(reader)
    session = session_id(env.name, monitor._conn)

    def child() -> dict[str, Any]:
        inherited = response_time.monitors()  # abandoned: the parent's, not the child's
        conn = env.connect()
        wait_until("the child's own measurement", lambda: measured(reader) is not None)
        own = monitor_of(reader)
        result = {"inherited": len(inherited), "own_is_new": own is not monitor,
                  "parent_monitor_stopped": monitor.stopped,
                  "own_session": session_id(env.name, own._conn)}
        conn.close()
        resilient_db.shutdown()
        return result

    result = in_child(child)
    assert result == {"inherited": 0, "own_is_new": True, "parent_monitor_stopped": True,
                      "own_session": result["own_session"]}
    assert result["own_session"] != session
    # The parent's monitor measures on, on the same session.
    before = monitor.measurements
    wait_until("the parent's monitor measuring on", lambda: monitor.measurements > before + 1)
    assert not monitor.stopped and session_id(env.name, monitor._conn) == session


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("value", [50, -1, "often", 0])
def test_a_bad_interval_is_a_configuration_error(value: object) -> None:
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, plugins=PLUGINS,
                             host="db.cluster-abc123.us-east-1.rds.amazonaws.com",
                             response_measurement_interval_ms=value)
    assert info.value.parameter == "response_measurement_interval_ms"


@pytest.mark.unit
@pytest.mark.parametrize("prop", ["failover_reader_host_selector_strategy",
                                  "initial_connection_host_selector_strategy"])
def test_fastest_response_without_the_plugin_names_the_fix(prop: str) -> None:
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, plugins="initial_connection,failover",
                             host="db.cluster-abc123.us-east-1.rds.amazonaws.com",
                             **{prop: "fastest_response"})
    assert info.value.parameter == prop
    assert "add fastest_response_strategy to plugins" in str(info.value)


@pytest.mark.unit
def test_frt_prefixed_properties_are_known_but_not_supported() -> None:
    kwargs: dict[str, Any] = {"frt-connect_timeout": 3}
    with pytest.raises(resilient_db.ConfigurationError, match="known AWS property"):
        resilient_db.connect(psycopg.Connection.connect, plugins=PLUGINS,
                             host="db.cluster-abc123.us-east-1.rds.amazonaws.com", **kwargs)
