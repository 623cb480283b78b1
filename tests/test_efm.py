"""The ``efm`` plugin end to end on simulated clusters (Aurora PostgreSQL and the Aurora MySQL
look-alike on MariaDB) with real packet loss (``chaos.netfault`` blackholes): a blackholed
writer mid-query (alone, and with failover to the writer the cluster promotes), a blackholed
reader, a latency spike below the detection threshold (through a delaying TCP proxy), a
flapping network, recovery, the thread and connection budget with 200 connections, a process
stopped with SIGSTOP, supervision, disposal and shutdown."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from chaos.netfault import NetworkFaults
from resilient_db import efm_monitor, topology
from resilient_db.efm_monitor import HostMonitor
from resilient_db.plugins.efm import EfmPlugin
from simulator.cluster import Cluster, Timeline
from tests.conftest import Backend

from .clusters import SharedClusters, settle_roles
from .waiting import wait_until

pytestmark = pytest.mark.real_server

TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.5)
#: Detection settings of most tests: a statement on a dead host is aborted within
#: GRACE + INTERVAL * COUNT of its start (and, for a host that dies under a statement already
#: past its grace, within INTERVAL * (COUNT + 1) of the failure).
GRACE, INTERVAL, COUNT = 0.3, 0.2, 2
#: Liveness margin for the machine's load (speed goals are in benchmarks/detection_time.py).
MARGIN = 2.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Env:
    name: str  # "pg" | "mysql"
    cluster: Cluster
    target: Callable[..., Any]
    extra: dict[str, Any]
    instance_sql: str
    sleep_sql: str  # a statement that runs for {s} seconds
    driver_error: type[BaseException]
    opened: list[Any] = field(default_factory=list)

    def connect(self, endpoint: str | None = None, *, plugins: str = "failover,efm",
                **extra: Any) -> resilient_db.ConnectionProxy:
        settings = {"failure_detection_time_ms": GRACE * 1000,
                    "failure_detection_interval_ms": INTERVAL * 1000,
                    "failure_detection_count": COUNT, "failover_timeout_sec": 30}
        kwargs = {**self.cluster.connect_kwargs(endpoint or self.cluster.writer.endpoint),
                  **self.extra, "autocommit": True, "connect_timeout": 5, **settings, **extra}
        conn = resilient_db.connect(self.target, plugins=plugins, **kwargs)
        self.opened.append(conn)
        return conn

    def instance(self, conn: Any) -> str:
        cur = conn.cursor()
        cur.execute(self.instance_sql)
        row = cur.fetchone()
        cur.close()
        return str(row[0])

    def sleep(self, cur: Any, seconds: float) -> None:
        cur.execute(self.sleep_sql.format(s=seconds))
        cur.fetchall()

    def close_opened(self) -> None:
        for conn in self.opened:
            with contextlib.suppress(Exception):
                conn.close()
        self.opened.clear()


def efm(conn: Any) -> EfmPlugin:
    found = conn.resilient.plugin("efm")
    assert isinstance(found, EfmPlugin)
    return found


def monitor_of(conn: Any) -> HostMonitor:
    monitor = efm(conn).monitor
    assert monitor is not None, "the connection is attached to its host's monitor"
    return monitor


@pytest.fixture(scope="module")
def clusters() -> Iterator[SharedClusters]:
    """One Aurora cluster per engine, started when a test first asks for it."""
    with SharedClusters(lambda engine: Cluster.start(engine, readers=2, timeline=TIMELINE),
                        settle_roles) as shared:
        yield shared


def make_env(cluster: Cluster, name: str) -> Env:
    if name == "pg":
        return Env("pg", cluster, psycopg.Connection.connect, {},
                   "SELECT pg_catalog.aurora_db_instance_identifier()",
                   "SELECT pg_catalog.pg_sleep({s})", psycopg.OperationalError)
    return Env("mysql", cluster, mysql.connector.connect,
               {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"},
               "SELECT aurora_sim.aurora_server_id()", "SELECT SLEEP({s})",
               mysql.connector.Error)


@pytest.fixture(params=["pg", "mysql"])
def env(request: pytest.FixtureRequest, clusters: SharedClusters) -> Iterator[Env]:
    """The engine's cluster, settled before and after the test (tests/clusters.py)."""
    shared = clusters.get(f"aurora-{request.param}")
    environment = make_env(shared.acquire(), request.param)
    yield environment
    resilient_db.shutdown()  # no monitor of a test outlives it
    environment.close_opened()
    shared.release()


@pytest.fixture
def faults(network_faults: NetworkFaults) -> NetworkFaults:
    return network_faults


def in_background(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


# --- the writer ----------------------------------------------------------------------------------


def test_blackholed_writer_alone_fails_fast_with_the_driver_error(
        env: Env, faults: NetworkFaults, sink: resilient_db.CollectingSink) -> None:
    """Without failover the blocked statement wakes with the driver's own network error (a
    note says why) within the bound, and the host is declared dead."""
    conn = env.connect(plugins="efm")
    cur = conn.cursor()
    env.sleep(cur, 0)
    writer = env.cluster.writer
    started = time.monotonic()
    faults.blackhole(writer.address)
    with pytest.raises(env.driver_error) as info:
        env.sleep(cur, 30)
    elapsed = time.monotonic() - started
    assert not isinstance(info.value, resilient_db.Error)
    assert elapsed < GRACE + INTERVAL * COUNT + MARGIN, elapsed
    assert any("efm" in note for note in getattr(info.value, "__notes__", []))
    monitor = monitor_of(conn)
    assert monitor.down and monitor.detections == 1
    down = sink.of_kind("efm.host_down")
    assert len(down) == 1 and down[0].attributes["server.address"] == f"{writer.address}:" \
        f"{writer.port}"
    assert down[0].attributes["resilient_db.efm.failures"] >= COUNT
    # The monitor thread records the abort after breaking the socket, so the woken statement
    # can get here first on a loaded machine.
    wait_until("the efm.aborted decision", lambda: sink.of_kind("efm.aborted"))


def test_blackholed_writer_mid_query_fails_over_to_the_promoted_writer(
        env: Env, faults: NetworkFaults, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    conn = env.connect()
    cur = conn.cursor()
    table = f"t{time.monotonic_ns()}"
    cur.execute(f"CREATE TABLE {table} (id int primary key, inst varchar(64))")
    old = cluster.writer
    promoted: list[Any] = []

    def fault() -> None:
        time.sleep(0.5)  # the statement is past its grace period, probes answered so far
        promoted.append(time.monotonic())
        faults.blackhole(old.address)
        time.sleep(1.0)
        events = cluster.failover()  # crash + promotion: the control plane does not use TCP
        faults.clear()  # before the old writer rejoins (MariaDB's control plane uses TCP)
        promoted.append(next(e for e in events if e.name == "promoted"))

    started = time.monotonic()
    thread = in_background(fault)
    with pytest.raises(resilient_db.FailoverSuccessError) as info:
        env.sleep(cur, 60)
    thread.join(30)
    blackholed_at, event = promoted
    aborted = wait_until("the efm.aborted decision (the statement was aborted by the monitor)",
                         lambda: sink.of_kind("efm.aborted"))
    detection = aborted[0].at - blackholed_at
    assert detection < INTERVAL * (COUNT + 1) + MARGIN, detection
    assert time.monotonic() - started < 30
    assert isinstance(info.value.__cause__, env.driver_error)
    new = event.instance
    insert = (f"INSERT INTO {table} VALUES (1, pg_catalog.aurora_db_instance_identifier())"
              if env.name == "pg" else
              f"INSERT INTO {table} VALUES (1, aurora_sim.aurora_server_id())")
    cur.execute(insert)
    assert env.instance(conn) == new == cluster.writer.id
    kinds = sink.kinds()
    assert kinds.index("efm.host_down") < kinds.index("failover.started")


@pytest.mark.parametrize("step", ["cursor", "session"])
def test_a_call_started_on_the_blackholed_writer_follows_the_promotion(
        env: Env, faults: NetworkFaults, step: str) -> None:
    """Issue #11: the old writer stays blackholed while the cluster promotes a reader. A call
    that does network I/O on mysql-connector without being a statement (``cursor()`` pings
    the server; setting ``autocommit`` sends a ``SET``) and started after the blackhole is
    monitored like a statement: it is aborted, fails over transparently, and the next write
    lands on the new writer soon after the promotion, not when the blackhole heals.
    (psycopg does no I/O there: its blocked call is the insert, bounded the same way.)"""
    cluster = env.cluster
    conn = env.connect()
    cur = conn.cursor()
    table = f"t{time.monotonic_ns()}"
    cur.execute(f"CREATE TABLE {table} (id int primary key, inst varchar(64))")
    insert = (f"INSERT INTO {table} VALUES (1, pg_catalog.aurora_db_instance_identifier()) "
              "ON CONFLICT DO NOTHING" if env.name == "pg" else
              f"INSERT IGNORE INTO {table} VALUES (1, aurora_sim.aurora_server_id())")
    old = cluster.writer
    timeline = cluster.timeline
    # The old writer rejoins (MariaDB: by TCP to its blackholed address) after the heal.
    cluster.timeline = dataclasses.replace(timeline, rejoin_delay=15.0)
    wrote: list[float] = []
    failed: list[BaseException] = []

    def app() -> None:
        try:
            target = cur
            if step == "cursor":
                target = conn.cursor()
            else:
                conn.autocommit = True
            with resilient_db.call_options(idempotent=True):
                target.execute(insert)
            wrote.append(time.monotonic())
        except BaseException as exc:
            failed.append(exc)

    fault = faults.blackhole(old.address)
    try:
        thread = in_background(app)
        time.sleep(1.0)  # the call is blocked on the blackholed writer (MySQL: before the fix,
        # for good: nothing monitored it)
        events = cluster.failover()  # crash + promotion; the blackhole stays
        promoted = next(e for e in events if e.name == "promoted")
        thread.join(10.0)
        assert fault.active, "the old writer was blackholed all along"
    finally:
        faults.heal(fault)
        cluster.timeline = timeline
    thread.join(30.0)
    assert not failed, failed
    assert wrote, "no write within 10 s of the promotion while the old writer was blackholed"
    assert wrote[0] - promoted.mono < MARGIN + 1.0, wrote[0] - promoted.mono
    assert env.instance(conn) == promoted.instance == cluster.writer.id


# --- a reader ------------------------------------------------------------------------------------


def test_blackholed_reader_is_aborted_marked_down_then_up_again(
        env: Env, faults: NetworkFaults, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    reader = cluster.readers[0]
    conn = env.connect(reader.endpoint, plugins="efm")
    watcher = env.connect(reader.endpoint, failover_mode="strict_reader")  # topology view
    assert env.instance(conn) == reader.id
    cur = conn.cursor()
    fault = faults.blackhole(reader.address)
    started = time.monotonic()
    with pytest.raises(env.driver_error):
        env.sleep(cur, 30)
    assert time.monotonic() - started < GRACE + INTERVAL * COUNT + MARGIN
    monitor = monitor_of(conn)
    assert monitor.down
    assert monitor_of(watcher) is monitor, "one monitor per host"
    failover_monitor = watcher.resilient.plugin("failover").monitor()
    address = f"{reader.endpoint}:{reader.port}"
    now = time.monotonic()
    assert failover_monitor.bad_hosts().is_cooling(address, now), "marked down for selection"
    # The host recovers: probes get through again and it is marked up.
    faults.heal(fault)
    wait_until("the reader marked up", lambda: not monitor.down, timeout=15)
    assert not failover_monitor.bad_hosts().is_cooling(address, time.monotonic())
    assert [d.kind for d in sink.decisions if d.kind in ("efm.host_down", "efm.host_up")] == [
        "efm.host_down", "efm.host_up"]
    fresh = env.connect(reader.endpoint, plugins="efm")
    assert env.instance(fresh) == reader.id


# --- no false positives --------------------------------------------------------------------------


def test_latency_spike_below_the_detection_threshold_is_no_failure(
        env: Env, faults: NetworkFaults, sink: resilient_db.CollectingSink) -> None:
    """Replies delayed by 0.6 s (``chaos.netfault`` latency proxy, in the path of the
    application's and the probe's connections from the start): each probe spends three
    intervals of 0.2 s unanswered, below the count of 5 (1 s), so nothing is declared dead."""
    writer = env.cluster.writer
    faults.intercept(writer.address, writer.port)
    conn = env.connect(plugins="efm", failure_detection_time_ms=100,
                       failure_detection_interval_ms=200, failure_detection_count=5)
    cur = conn.cursor()
    env.sleep(cur, 0)
    monitor = monitor_of(conn)
    wait_until("the probe connection open", lambda: monitor.connection_open)
    fault = faults.latency(writer.address, writer.port, 0.6)
    env.sleep(cur, 2.5)
    faults.heal(fault)
    env.sleep(cur, 0)
    assert monitor.failed_probes >= 2, "the spike was seen: probes spent intervals unanswered"
    assert monitor.detections == 0 and not sink.of_kind("efm.host_down")
    assert monitor.probes_ok >= 2


# --- flapping ------------------------------------------------------------------------------------


def test_flapping_network(env: Env, faults: NetworkFaults,
                          sink: resilient_db.CollectingSink) -> None:
    """Outages longer than the detection time, separated by short recoveries: each outage is
    a down, each recovery an up, statements in flight during an outage fail fast, and the
    connection works once the network is stable."""
    reader = env.cluster.readers[0]
    conn = env.connect(reader.endpoint, plugins="efm", failure_detection_count=2)
    cur = conn.cursor()
    env.sleep(cur, 0)
    monitor = monitor_of(conn)
    stop = threading.Event()

    def flap() -> None:
        for _ in range(3):
            fault = faults.blackhole(reader.address)
            time.sleep(1.2)
            faults.heal(fault)
            wait_until("the host answers", lambda: not monitor.down, timeout=15)
            time.sleep(0.5)
        stop.set()

    thread = in_background(flap)
    failures = 0
    while not stop.is_set():
        try:
            start = time.monotonic()
            fresh = env.connect(reader.endpoint, plugins="efm", connect_timeout=2)
            fcur = fresh.cursor()
            env.sleep(fcur, 1)
        except Exception:
            failures += 1
            assert time.monotonic() - start < 2 + GRACE + INTERVAL * COUNT + MARGIN
    thread.join(60)
    assert failures >= 1
    kinds = [d.kind for d in sink.decisions if d.kind in ("efm.host_down", "efm.host_up")]
    assert kinds and kinds[0] == "efm.host_down"
    assert all(a != b for a, b in itertools.pairwise(kinds)), kinds  # alternate
    assert kinds[-1] == "efm.host_up" and not monitor.down
    env.sleep(cur, 0.1)
    assert monitor.crashes == 0


# --- budget --------------------------------------------------------------------------------------


def _session_marks(env: Env) -> dict[str, Any]:
    """Per instance, a mark that sessions opened from now on exceed: PostgreSQL's clock,
    MariaDB's last connection id. (Blackhole tests leave server sessions behind whose client
    end is gone: the server never saw it close; they must not count.)"""
    marks = {}
    for instance in env.cluster.instances.values():
        with env.cluster.superuser(instance.id) as conn:
            cur = conn.cursor()
            cur.execute("SELECT now()" if env.name == "pg" else "SELECT connection_id()")
            marks[instance.id] = cur.fetchone()[0]
    return marks


def _sessions(env: Env, marks: dict[str, Any]) -> int:
    """Server sessions opened since ``marks``: resilient_db's monitors (PostgreSQL, by
    application name) or every session of the application user (MariaDB)."""
    total = 0
    for instance in env.cluster.instances.values():
        with env.cluster.superuser(instance.id) as conn:
            cur = conn.cursor()
            if env.name == "pg":
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name IN "
                            "(%s, %s) AND backend_start > %s",
                            (efm_monitor.PROBE_APPLICATION_NAME,
                             topology.MONITOR_APPLICATION_NAME, marks[instance.id]))
            else:
                cur.execute("SELECT count(*) FROM information_schema.processlist "
                            "WHERE user = 'app' AND id > %s", (marks[instance.id],))
            total += int(cur.fetchone()[0])
    return total


def _threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_two_hundred_connections_to_three_instances(env: Env) -> None:
    cluster = env.cluster
    instances = list(cluster.instances.values())
    marks = _session_marks(env)
    conns = [env.connect(instances[i % 3].endpoint, failure_detection_time_ms=50)
             for i in range(200)]
    for conn in conns:
        env.sleep(conn.cursor(), 0)
    assert len({id(monitor_of(c)) for c in conns}) == 3
    app = 0 if env.name == "pg" else 200
    wait_until("every probe connection open",
               lambda: all(m.connection_open for m in efm_monitor.monitors()))
    # Statements past their grace period on every host: probes run.
    threads = [in_background(functools.partial(env.sleep, c.cursor(), 0.5)) for c in conns[:30]]
    for thread in threads:
        thread.join(30)
    assert all(m.probes_ok > 0 for m in efm_monitor.monitors())
    assert len(_threads("resilient_db-efm")) <= 3
    assert len(_threads("resilient_db-topology")) <= 1
    assert len([t for t in threading.enumerate() if "watchdog" in t.name]) <= 1
    extra = _sessions(env, marks) - app
    assert 1 <= extra <= 4, extra
    assert len(efm_monitor.monitors()) == 3


# --- lifecycle -----------------------------------------------------------------------------------


def test_shutdown_stops_monitors_without_waiting(env: Env, faults: NetworkFaults) -> None:
    reader = env.cluster.readers[0]
    conn = env.connect(reader.endpoint, plugins="efm")
    env.sleep(conn.cursor(), 0)
    monitor = monitor_of(conn)
    # mysql-connector's cursor() pings the server (outside the pipeline): open it before.
    cur = conn.cursor()
    faults.blackhole(reader.address)

    def blocked() -> None:
        with contextlib.suppress(Exception):
            env.sleep(cur, 30)

    worker = in_background(blocked)
    wait_until("the host declared dead", lambda: monitor.down)
    time.sleep(0.1)  # the monitor is now reconnecting to a blackholed host: a blocking connect
    started = time.monotonic()
    resilient_db.shutdown()
    assert time.monotonic() - started < 0.5
    assert monitor.stopped and efm_monitor.monitors() == []
    wait_until("monitor threads ended", lambda: not _threads("resilient_db-efm"))
    faults.clear()
    worker.join(5)
    # The connection attaches to a new monitor at its next statement.
    fresh = env.connect(reader.endpoint, plugins="efm")
    env.sleep(fresh.cursor(), 0)
    assert monitor_of(fresh) is not monitor and monitor_of(fresh).running


def test_monitor_is_disposed_without_users(env: Env) -> None:
    conn = env.connect(monitor_disposal_time_ms=300)
    env.sleep(conn.cursor(), 0)
    monitor = monitor_of(conn)
    assert monitor.running
    env.opened.remove(conn)
    conn.close()
    del conn
    gc.collect()
    wait_until("the monitor disposed", lambda: not monitor.running)
    assert monitor not in efm_monitor.monitors()
    assert not monitor.connection_open


def test_a_crashed_monitor_restarts_and_is_counted(
        env: Env, monkeypatch: pytest.MonkeyPatch, sink: resilient_db.CollectingSink) -> None:
    original = HostMonitor._active_step
    crashed: list[bool] = []

    def crash_once(self: HostMonitor, now: float) -> None:
        if not crashed:
            crashed.append(True)
            raise RuntimeError("injected")
        original(self, now)

    monkeypatch.setattr(HostMonitor, "_active_step", crash_once)
    conn = env.connect()
    cur = conn.cursor()
    env.sleep(cur, 1.0)  # past its grace period: the monitor probes, crashes, restarts
    monitor = monitor_of(conn)
    assert monitor.crashes == 1 and monitor.running
    restarted = sink.of_kind("efm.monitor_restarted")
    assert len(restarted) == 1 and restarted[0].attributes["error.type"] == "RuntimeError"
    wait_until("probing again", lambda: monitor.probes_ok > 0)


# --- our own lateness is not the host's failure --------------------------------------------------

_STOPPED_CHILD = textwrap.dedent("""
    import json, sys, time
    import resilient_db
    from resilient_db import efm_monitor
    sink = resilient_db.CollectingSink()
    resilient_db.set_decision_sink(sink)
    engine, kwargs, sleep_sql, seconds = json.loads(sys.argv[1])
    if engine == "pg":
        import psycopg
        target = psycopg.Connection.connect
    else:
        import mysql.connector
        target = mysql.connector.connect
    conn = resilient_db.connect(target, plugins="efm", autocommit=True,
                                failure_detection_time_ms=100, failure_detection_interval_ms=200,
                                failure_detection_count=2, **kwargs)
    cur = conn.cursor()
    done = 0
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        cur.execute(sleep_sql)
        cur.fetchall()
        done += 1
    monitor = efm_monitor.monitors()[0]
    print(json.dumps({"done": done, "kinds": sink.kinds(), "ok": monitor.probes_ok,
                      "late": monitor.late_discards, "failed": monitor.failed_probes}),
          flush=True)
""")


def test_a_process_stopped_longer_than_the_detection_time_marks_nothing_down(env: Env) -> None:
    kwargs = {**env.cluster.connect_kwargs(env.cluster.writer.endpoint), **env.extra}
    kwargs.pop("aurora_mysql_lookalike_schema", None)
    sleep_sql = env.sleep_sql.format(s=0.3)
    child = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_CHILD, json.dumps([env.name, kwargs, sleep_sql, 8.0])],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        for pause in (0.35, 0.8, 0.55):  # stops of 1.5 s > detection time 0.1 + 0.2 * 2
            time.sleep(pause)
            child.send_signal(signal.SIGSTOP)
            time.sleep(1.5)
            child.send_signal(signal.SIGCONT)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert "efm.host_down" not in report["kinds"], report
    assert "efm.aborted" not in report["kinds"], report
    assert report["ok"] > 5 and report["done"] > 5


class _SilentProbe(efm_monitor._Probe):
    """A probe that never gets its reply; each wait moves the fake clock on by what the
    test says (the time the thread actually spent)."""

    def __init__(self, clock: list[float], spent: list[float]) -> None:
        super().__init__(None)
        self.clock, self.spent = clock, spent

    def send(self) -> None:
        return None

    def poll(self, timeout: float) -> bool:
        self.clock[0] += self.spent.pop(0)
        return False


def test_a_late_tick_is_not_counted_as_a_failure() -> None:
    """The rule behind the SIGSTOP test, step by step with a fake clock: a probe whose tick
    passed while the monitor thread was not running is given a new interval, not counted."""
    from resilient_db.drivers.psycopg import PsycopgDriver

    now = [100.0]
    monitor = HostMonitor(("t",), efm_monitor.ProbeTarget("h", "127.0.0.1", 1), PsycopgDriver(),
                          interval=0.2, count=2, grace=0.0, disposal=60.0,
                          clock=lambda: now[0])
    # Waits: 1.7 s (the process was stopped: 1.5 s late), then two on-time ticks.
    monitor._probe = _SilentProbe(now, [1.7, 0.2, 0.2])
    monitor._active_step(now[0])
    assert (monitor.late_discards, monitor.failed_probes, monitor.down) == (1, 0, False)
    monitor._active_step(now[0])
    assert (monitor.failed_probes, monitor.down) == (1, False)
    monitor._active_step(now[0])
    assert (monitor.failed_probes, monitor.down, monitor.detections) == (2, True, 1)


def test_aws_codes_select_efm_and_settings_are_validated() -> None:
    from resilient_db import _plugin_registry as registry
    from resilient_db.errors import ConfigurationError

    assert registry.resolve(["host_monitoring"]) == [EfmPlugin]
    assert registry.resolve(["host_monitoring_v2", "efm"]) == [EfmPlugin]
    assert registry.resolve(["efm", "failover"])[0].code == "failover"  # failover outside
    with pytest.raises(ConfigurationError, match="failure_detection_count"):
        resilient_db.connect(psycopg.Connection.connect, plugins="efm",
                             failure_detection_count=0)
    with pytest.raises(ConfigurationError, match="failure_detection_interval_ms"):
        resilient_db.connect(psycopg.Connection.connect, plugins="efm",
                             failure_detection_interval_ms=0)


def test_disabled_by_property_costs_nothing(backend: Any) -> None:
    conn = backend.connect(plugins="efm", autocommit=True, failure_detection_enabled=False)
    try:
        cur = conn.cursor()
        cur.execute("SELECT 1")
        cur.fetchall()
        assert efm(conn).monitor is None
        assert conn.resilient.pipeline.chains.execute is None  # left out of every chain
    finally:
        conn.close()


def test_unix_socket_connection_is_monitored(pg_server: Any) -> None:
    kwargs = {**pg_server.connect_kwargs(), "host": str(pg_server.socket_dir)}
    conn = resilient_db.connect(psycopg.Connection.connect, plugins="efm", autocommit=True,
                                failure_detection_time_ms=50, failure_detection_interval_ms=100,
                                **kwargs)
    try:
        conn.execute("SELECT pg_catalog.pg_sleep(0.6)")
        monitor = monitor_of(conn)
        assert monitor.target.address is None and monitor.address == str(pg_server.socket_dir)
        # Statements past their grace period are probed every 100 ms; how many probes fit
        # in one 0.6 s statement depends on the machine's load, so run statements until two
        # probes answered (over the socket) rather than count them in a fixed time.
        wait_until("two probes answered over the socket", lambda: (
            conn.execute("SELECT pg_catalog.pg_sleep(0.3)"), monitor.probes_ok >= 2)[1])
        assert monitor.detections == 0
    finally:
        conn.close()
        resilient_db.shutdown()


def test_mysql_probe_connection_that_stops_answering_after_the_handshake_is_bounded(
        mysql_backend: Backend) -> None:
    """mysql-connector drops its connect timeout once authenticated, then sends ``SET NAMES``
    (and the autocommit ``SET``) with no read timeout: a host that stops answering in that
    window held the monitor thread, and with it every statement it should have released,
    until the network healed. The probe connection carries read/write timeouts. The window is
    made deterministic with the server's ``init_connect`` (run before the session's first
    command is answered, for users without SUPER; MariaDB gives up on it after about 5 s, so
    an unbounded probe connects late instead of failing at its 1 s bound)."""
    admin = mysql_backend.raw(autocommit=True)
    user, password = f"efm_slow_{os.getpid()}", "pw-efm-slow"
    cur = admin.cursor()
    cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'")
    cur.execute(f"GRANT SELECT ON *.* TO '{user}'@'%'")  # not SUPER: init_connect applies
    try:
        conn = mysql_backend.connect(plugins="efm", autocommit=True, user=user,
                                     password=password)
        try:
            cur.execute("SET GLOBAL init_connect = 'DO SLEEP(30)'")
            started = time.monotonic()
            with pytest.raises(mysql.connector.Error):
                probe = efm(conn).open_probe_connection(
                    efm_monitor.ProbeTarget(str(mysql_backend.kwargs["host"]), None,
                                            int(mysql_backend.kwargs["port"])), 1.0)
                probe.close()  # connected: the SET waited out the server (the test fails)
            assert time.monotonic() - started < 1.0 + 10.0
        finally:
            cur.execute("SET GLOBAL init_connect = ''")
            conn.close()
    finally:
        cur.execute(f"DROP USER '{user}'@'%'")
        admin.close()
