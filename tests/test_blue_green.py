"""The ``blue_green`` plugin (AWS ``bg``) end to end on simulated blue/green deployments of
real servers: Aurora PostgreSQL and the Aurora MySQL look-alike (both sides with a writer and
a reader), RDS PostgreSQL and RDS MySQL (single instances). The simulator publishes the
metadata RDS publishes, ends every application session during ``SWITCHOVER_IN_PROGRESS``,
copies blue's data to green, moves the blue names to green and deletes the green names
(``docs/simulator.md``).

Each test has its own deployment: a switchover renames the blue cluster for good. Phases last
:data:`PHASE` seconds, long enough for a test to act inside one on a loaded machine."""

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
from resilient_db import blue_green as bg
from resilient_db.blue_green import Phase
from simulator.cluster import Cluster, Timeline, connect_runtime

from .test_fork import in_child, session_id
from .waiting import wait_for

pytestmark = pytest.mark.real_server

#: Length of each switchover phase (seconds).
PHASE = 2.0
TIMELINE = Timeline(switchover_phase=PHASE)


@dataclass
class Deployment:
    flavour: str
    blue: Cluster
    green: Cluster
    target: Callable[..., Any]
    extra: dict[str, Any]
    opened: list[Any] = field(default_factory=list)
    switching: threading.Thread | None = None

    @property
    def pg(self) -> bool:
        return self.blue.flavour.engine == "postgresql"

    @property
    def bg_id(self) -> str:
        return self.blue.name

    def connect(self, host: str | None = None, **props: Any) -> resilient_db.ConnectionProxy:
        kwargs = {**self.blue.connect_kwargs(host), **self.extra, "autocommit": True,
                  "connect_timeout": 5, "bg_id": self.bg_id,
                  "bg_interval_baseline_ms": 100, "bg_interval_increased_ms": 50,
                  "bg_interval_high_ms": 50, "monitor_disposal_time_ms": 500,
                  "plugins": "bg", **props}
        conn = resilient_db.connect(self.target, **kwargs)
        self.opened.append(conn)
        return conn

    def monitor(self) -> bg.BlueGreenMonitor:
        found = [m for m in bg.monitors() if m.bg_id == self.bg_id.lower()]
        assert len(found) == 1, found
        return found[0]

    def wait_phase(self, wanted: Phase, *, routing: bool = False) -> bg.Status:
        def phase(status: bg.Status) -> Phase:
            return status.routing_phase if routing else status.phase

        return wait_for(f"blue/green phase {wanted.name}", lambda: self.monitor().status,
                        lambda s: phase(s) is wanted)

    def switchover(self) -> None:
        self.switching = threading.Thread(target=self.blue.switchover, daemon=True)
        self.switching.start()

    def finish(self) -> None:
        if self.switching is not None:
            self.switching.join(timeout=120)
            assert not self.switching.is_alive(), "switchover did not finish"

    def execute(self, conn: Any, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        cur = conn.cursor()
        try:
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []
        finally:
            cur.close()

    def green_ids(self) -> set[int]:
        """Ids in the table on the green writer (by its address: no DNS)."""
        conn = connect_runtime(self.green.writer.runtime)
        try:
            cur = conn.cursor()
            cur.execute("SELECT id FROM bg_t")
            return {int(row[0]) for row in cur.fetchall()}
        finally:
            conn.close()


def _start(flavour: str, *, pair: bool = True,
           timeline: Timeline = TIMELINE) -> Iterator[Deployment]:
    readers = 1 if flavour.startswith("aurora") else None
    pg = flavour.endswith("pg")
    with Cluster.start(flavour, readers=readers, timeline=timeline) as blue, \
            Cluster.start(flavour, readers=readers, port=blue.port,
                          name=f"{blue.name}g") as green:
        target: Callable[..., Any] = psycopg.Connection.connect if pg else mysql.connector.connect
        deployment = Deployment(flavour, blue, green, target, {} if pg else {"use_pure": True})
        setup = deployment.connect(plugins="")
        deployment.execute(setup, "CREATE TABLE bg_t (id INT PRIMARY KEY, note VARCHAR(40))")
        setup.close()
        if pair:
            blue.create_blue_green(green)
        try:
            yield deployment
        finally:
            for conn in deployment.opened:
                with contextlib.suppress(Exception):
                    conn.close()
            if deployment.switching is not None:
                deployment.switching.join(timeout=120)


@pytest.fixture(params=["aurora-pg", "aurora-mysql"])
def aurora(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    yield from _start(request.param)


@pytest.fixture(params=["rds-pg", "rds-mysql"])
def rds(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    yield from _start(request.param)


def peer(conn: Any) -> str | None:
    plugin = conn.resilient.plugin("blue_green")
    assert plugin is not None
    address: str | None = plugin.address
    return address


def test_switchover_phase_by_phase(aurora: Deployment,
                                   sink: resilient_db.CollectingSink) -> None:
    d = aurora
    conn = d.connect()
    d.execute(conn, "INSERT INTO bg_t VALUES (1, 'before')")
    assert peer(conn) == d.blue.writer.address
    d.wait_phase(Phase.CREATED)
    # No switchover: the plugin is out of the chains (nothing per statement).
    assert conn.resilient.pipeline.chains.execute is None
    d.switchover()

    # IN_PROGRESS: the statement is held (not sent), then runs on green.
    d.wait_phase(Phase.IN_PROGRESS)
    wait_for("the plugin back in the chain", lambda: conn.resilient.pipeline.chains.execute,
             lambda chain: chain is not None)
    d.execute(conn, "INSERT INTO bg_t VALUES (2, 'held')")
    assert peer(conn) == d.green.writer.address
    held = [x for x in sink.of_kind("blue_green.suspended")
            if x.attributes["resilient_db.blue_green.call"] != "connect"]
    assert held, sink.kinds()
    resumed = sink.of_kind("blue_green.resumed")
    assert resumed and resumed[-1].attributes["resilient_db.blue_green.waited"] > 0
    moved = sink.of_kind("blue_green.moved")
    assert moved and moved[-1].attributes["network.peer.address"] == d.green.writer.address

    # POST: a blue name leads to the green counterpart's address; green names are refused.
    d.wait_phase(Phase.POST, routing=True)
    routed = d.connect()
    assert peer(routed) == d.green.writer.address
    assert sink.of_kind("blue_green.connect_routed")
    reader = d.connect(d.blue.reader_endpoint)
    assert peer(reader) == d.green.readers[0].address
    with pytest.raises(resilient_db.SwitchoverError) as refused:
        d.connect(d.green.writer_endpoint)
    assert isinstance(refused.value, psycopg.OperationalError if d.pg
                      else mysql.connector.errors.OperationalError)
    assert refused.value.phase in ("POST", "COMPLETED")
    assert sink.of_kind("blue_green.rejected")

    # COMPLETED (and DNS caught up): DNS as is; the blue names lead to green.
    d.finish()
    d.wait_phase(Phase.COMPLETED, routing=True)
    after = d.connect()
    assert peer(after) == d.green.writer.address
    d.execute(after, "INSERT INTO bg_t VALUES (3, 'after')")
    assert after.resilient.pipeline.chains.execute is None  # dormant again
    assert conn.resilient.pipeline.chains.execute is None  # moved to green: dormant too
    assert {1, 2, 3} <= d.green_ids()
    phases = [x.attributes["resilient_db.blue_green.phase"]
              for x in sink.of_kind("blue_green.phase_changed")]
    for phase in ("CREATED", "PREPARATION", "IN_PROGRESS", "POST", "COMPLETED"):
        assert phase in phases, phases


@pytest.mark.parametrize("flavour", ["aurora-pg", "aurora-mysql"])
def test_green_metadata_trailing_blue_does_not_send_blue_names_back(
        flavour: str, sink: resilient_db.CollectingSink) -> None:
    """RDS updates the two sides' metadata separately. Once the names move, the monitor reads
    green (the blue names lead there), whose copy still said IN_PROGRESS for a while: taken as
    news, a connection to the blue reader endpoint went to the old blue reader (loaded CI
    run 17; here green trails blue by 1.5 s)."""
    lag = Timeline(switchover_phase=PHASE, green_metadata_lag=1.5)
    with contextlib.contextmanager(_start)(flavour, timeline=lag) as d:
        conn = d.connect()
        d.wait_phase(Phase.CREATED)
        d.switchover()
        d.wait_phase(Phase.POST)
        # Inside the lag: blue already says POST, green (read from now on) not yet.
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            reader = d.connect(d.blue.reader_endpoint)
            assert peer(reader) == d.green.readers[0].address
            reader.close()
            time.sleep(0.05)
        d.finish()
        routed = [Phase[x.attributes["resilient_db.blue_green.routing_phase"]]
                  for x in sink.of_kind("blue_green.phase_changed")]
        assert routed == sorted(routed), routed  # never back
        assert sink.of_kind("blue_green.metadata_lagging"), sink.kinds()
        d.execute(conn, "SELECT 1")


def test_switchover_under_load_loses_nothing(aurora: Deployment,
                                            sink: resilient_db.CollectingSink) -> None:
    # With failover too (the usual setup): a session the switchover ends is left to
    # blue_green (failover's DEFER_FAILOVER hook), not failed over within the blue cluster.
    d = aurora
    threads, acknowledged, errors = 4, [], []
    lock = threading.Lock()
    stop = threading.Event()
    lookalike = {} if d.pg else {"aurora_mysql_lookalike_schema": "aurora_sim"}
    conns = [d.connect(plugins="bg,failover", **lookalike) for _ in range(threads)]
    d.wait_phase(Phase.CREATED)

    def work(n: int, conn: Any) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            key = n * 1_000_000 + i
            try:
                d.execute(conn, "INSERT INTO bg_t VALUES (%s, 'load')", (key,))
            except resilient_db.FailoverSuccessError:
                continue  # possibly applied; not acknowledged
            except Exception as exc:
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                acknowledged.append(key)
            time.sleep(0.005)

    workers = [threading.Thread(target=work, args=(n, c), daemon=True)
               for n, c in enumerate(conns)]
    for worker in workers:
        worker.start()
    wait_for("writes before the switchover", lambda: len(acknowledged), lambda n: n >= 20)
    d.switchover()
    d.finish()
    before = len(acknowledged)
    wait_for("writes after the switchover", lambda: len(acknowledged),
             lambda n: n >= before + 20)
    stop.set()
    for worker in workers:
        worker.join(timeout=60)
    assert errors == []
    assert set(acknowledged) - d.green_ids() == set()
    assert all(peer(c) == d.green.writer.address for c in conns)
    assert not sink.of_kind("failover.started"), sink.kinds()


def test_held_statement_times_out_with_a_clear_error(aurora: Deployment,
                                                     sink: resilient_db.CollectingSink) -> None:
    d = aurora
    conn = d.connect(bg_connect_timeout_ms=200)
    d.wait_phase(Phase.CREATED)
    d.switchover()
    d.wait_phase(Phase.IN_PROGRESS)
    with pytest.raises(resilient_db.SwitchoverError, match="bg_connect_timeout_ms") as timed:
        d.execute(conn, "INSERT INTO bg_t VALUES (7, 'late')")
    assert timed.value.waited >= 0.2
    assert sink.of_kind("blue_green.timeout")
    d.finish()
    # The connection is usable again: moved to green before its next statement.
    d.execute(conn, "INSERT INTO bg_t VALUES (8, 'later')")
    assert peer(conn) == d.green.writer.address
    assert 7 not in d.green_ids() and 8 in d.green_ids()


@pytest.fixture(params=["aurora-pg", "aurora-mysql"])
def unpaired(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    yield from _start(request.param, pair=False)


def test_deployment_created_after_the_first_connection(unpaired: Deployment) -> None:
    d = unpaired
    conn = d.connect()
    wait_for("a metadata read", lambda: d.monitor().reads, lambda n: n >= 2)
    assert d.monitor().status.phase is Phase.NOT_CREATED
    d.blue.create_blue_green(d.green)
    status = d.wait_phase(Phase.CREATED)
    assert status.deployment is not None
    assert d.blue.writer_endpoint in status.deployment.blue
    assert d.green.writer_endpoint in status.deployment.green
    d.execute(conn, "INSERT INTO bg_t VALUES (1, 'created')")


def test_fork_child_starts_its_own_monitor(aurora: Deployment) -> None:
    d = aurora
    engine = "pg" if d.pg else "mysql"
    conn = d.connect()
    monitor = d.monitor()
    d.wait_phase(Phase.CREATED)
    session = session_id(engine, monitor._conn)

    def child() -> dict[str, Any]:
        inherited = bg.monitors()  # abandoned: the parent's, not the child's
        own_conn = d.connect()
        own = d.monitor()
        wait_for("the child's monitor to see the deployment", lambda: own.status.phase,
                 lambda p: p is Phase.CREATED)
        result = {"inherited": len(inherited), "own_is_new": own is not monitor,
                  "parent_monitor_stopped": monitor.stopped,
                  "own_session": session_id(engine, own._conn)}
        own_conn.close()
        resilient_db.shutdown()
        return result

    result = in_child(child)
    assert result == {"inherited": 0, "own_is_new": True, "parent_monitor_stopped": True,
                      "own_session": result["own_session"]}
    assert result["own_session"] != session
    # The parent's monitor reads on, on the same session.
    before = monitor.reads
    wait_for("the parent's monitor reading on", lambda: monitor.reads, lambda n: n > before + 1)
    assert not monitor.stopped and session_id(engine, monitor._conn) == session
    conn.close()


def test_rds_instances(rds: Deployment) -> None:
    d = rds
    conn = d.connect()
    d.wait_phase(Phase.CREATED)
    d.switchover()
    d.wait_phase(Phase.IN_PROGRESS)
    d.execute(conn, "INSERT INTO bg_t VALUES (1, 'held')")
    assert peer(conn) == d.green.writer.address
    d.finish()
    d.wait_phase(Phase.COMPLETED, routing=True)
    assert 1 in d.green_ids()


def test_without_deployment_dns_is_used_and_shutdown_stops_the_monitor() -> None:
    with Cluster.start("aurora-pg", readers=0) as cluster:
        conn = resilient_db.connect(psycopg.Connection.connect, **cluster.connect_kwargs(),
                                    plugins="bg", bg_id=cluster.name, autocommit=True)
        monitor = next(m for m in bg.monitors() if m.bg_id == cluster.name.lower())
        wait_for("a metadata read", lambda: monitor.reads, lambda n: n >= 1)
        assert monitor.status.phase is Phase.NOT_CREATED
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert peer(conn) == cluster.writer.address
        resilient_db.shutdown()
        assert monitor.stopped
        wait_for("the monitor thread to end", lambda: monitor.running, lambda r: not r)
        conn.close()


@pytest.mark.unit
@pytest.mark.parametrize(("name", "value"), [
    ("bg_connect_timeout_ms", -1), ("bg_connect_timeout_ms", 0),
    ("bg_switchover_timeout_ms", "soon"), ("bg_interval_high_ms", 1),
    ("bg_interval_baseline_ms", 5), ("bg_id", " "),
    ("bg_suspend_new_blue_connections", "maybe"),
])
def test_bad_properties(name: str, value: Any) -> None:
    with pytest.raises(resilient_db.ConfigurationError) as bad:
        resilient_db.connect(psycopg.Connection.connect, host="db.example", plugins="bg",
                             **{name: value})
    assert bad.value.parameter == name


@pytest.mark.unit
def test_aws_code_and_properties_are_accepted() -> None:
    from resilient_db._aws_properties import aws_unsupported
    from resilient_db._plugin_registry import resolve

    classes = resolve(["bg"])
    assert [c.code for c in classes] == ["blue_green"]
    for name in ("bg_id", "bg_connect_timeout_ms", "bg_switchover_timeout_ms",
                 "bg_interval_baseline_ms", "bg_interval_increased_ms", "bg_interval_high_ms",
                 "bg_suspend_new_blue_connections"):
        assert aws_unsupported(name) is None
