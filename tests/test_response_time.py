"""Response-time monitors without a server: a typed fake probe and connection, an injected
clock. What a measurement is (the median of the round trips), what a silent or unreachable
host gets (no measurement, one decision per run of failures), supervision, disposal, and the
helper that fills ``SelectionContext.response_times``. The same monitors against real servers:
``tests/test_fastest_response.py``."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import resilient_db
from resilient_db import response_time
from resilient_db._pipeline import HostSpec, PluginContext
from resilient_db._properties import Settings
from resilient_db.drivers import driver_for
from resilient_db.hosts import Host
from resilient_db.response_time import ResponseTimeMonitor
from resilient_db.selection import FastestResponse, Random

from .waiting import wait_until

pytestmark = pytest.mark.unit

HOST = Host("instance-1.db", 5432, instance_id="instance-1")
DRIVER = driver_for(psycopg.Connection.connect, None)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeConnection:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeProbe:
    """Answers each round trip after the next of ``latencies`` (seconds on ``clock``); ``None``
    in the script: no answer (the wait runs out)."""

    def __init__(self, clock: Clock, latencies: list[float | None]) -> None:
        self.clock = clock
        self.latencies = latencies
        self.sent = 0

    def send(self) -> None:
        self.sent += 1

    def poll(self, timeout: float) -> bool:
        latency = self.latencies.pop(0) if self.latencies else 0.001
        if latency is None or latency > timeout:
            self.clock.now += timeout
            return False
        self.clock.now += latency
        return True


class User:
    """A connection using the monitor: opens fake connections, or fails to."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.opened: list[FakeConnection] = []

    def open_measuring_connection(self, host: Host, timeout: float) -> Any:
        if self.error is not None:
            raise self.error
        conn = FakeConnection()
        self.opened.append(conn)
        return conn


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Clock, list[float | None]]]:
    """The clock and the latency script every fake probe reads."""
    clock, latencies = Clock(), list[float | None]()

    def probe_for(driver: Any, conn: Any) -> FakeProbe:
        return FakeProbe(clock, latencies)

    monkeypatch.setattr(response_time, "probe_for", probe_for)
    yield clock, latencies
    resilient_db.shutdown()


def monitor(clock: Clock, user: User | None = None, **kw: Any) -> ResponseTimeMonitor:
    settings: dict[str, Any] = {"interval": 1.0, "disposal": 60.0, **kw}
    made = ResponseTimeMonitor(("psycopg", HOST.host, HOST.port), HOST, DRIVER, clock=clock,
                               **settings)
    if user is not None:
        made._users.add(user)  # a user without starting the thread: tests call _measure
    return made


def test_a_measurement_is_the_median_of_the_round_trips(
        script: tuple[Clock, list[float | None]], sink: resilient_db.CollectingSink) -> None:
    clock, latencies = script
    latencies[:] = [0.010, 0.500, 0.020, 0.030, 0.020]  # one hiccup does not move the host
    user = User()
    m = monitor(clock, user)
    m._measure()
    assert m.measured is not None
    assert m.measured[0] == pytest.approx(0.020) and m.measured[1] == clock.now
    assert m.measurements == 1 and m.connection_open and len(user.opened) == 1
    (decision,) = sink.of_kind("response_time.measured")
    assert decision.attributes["resilient_db.response_time.seconds"] == pytest.approx(0.020)
    assert decision.attributes["resilient_db.response_time.samples"] == response_time.SAMPLES
    assert decision.attributes["resilient_db.instance.id"] == "instance-1"
    m._measure()  # the connection is kept for the next measurement
    assert len(user.opened) == 1 and m.measurements == 2


def test_a_silent_host_has_no_measurement_and_one_decision_per_run_of_failures(
        script: tuple[Clock, list[float | None]], sink: resilient_db.CollectingSink) -> None:
    clock, latencies = script
    user = User()
    m = monitor(clock, user, interval=0.5)
    m._measure()
    assert m.measured is not None
    latencies[:] = [0.001, None]  # the second round trip is never answered
    started = clock.now
    m._measure()
    assert m.measured is None and m.failures == 1
    assert clock.now - started == pytest.approx(0.501)  # bounded by the timeout (the interval)
    assert user.opened[0].closed and not m.connection_open  # reconnect next time
    latencies[:] = [None]
    m._measure()
    assert m.failures == 2
    unreachable = sink.of_kind("response_time.unreachable")
    assert len(unreachable) == 1
    assert unreachable[0].attributes["resilient_db.response_time.timeout"] == 0.5
    assert "no reply within 0.5 s" in unreachable[0].attributes[
        "resilient_db.response_time.last_error"]
    m._measure()  # answers again, on a new connection
    assert m.measured is not None and len(user.opened) == 3
    latencies[:] = [None]
    m._measure()
    assert len(sink.of_kind("response_time.unreachable")) == 2  # a new run of failures


def test_an_unreachable_host_has_no_measurement(
        script: tuple[Clock, list[float | None]], sink: resilient_db.CollectingSink) -> None:
    clock, _ = script
    user = User(ConnectionRefusedError("refused"))  # held weakly by the monitor: keep it
    m = monitor(clock, user)
    m._measure()
    assert m.measured is None and m.failures == 1
    (decision,) = sink.of_kind("response_time.unreachable")
    assert "ConnectionRefusedError: refused" in decision.attributes[
        "resilient_db.response_time.last_error"]


def test_the_timeout_is_the_interval_up_to_a_bound() -> None:
    assert monitor(Clock(), interval=0.3).timeout == 0.3
    assert monitor(Clock(), interval=30.0).timeout == response_time.MAX_TIMEOUT


def test_a_crashed_monitor_restarts_and_is_counted(
        script: tuple[Clock, list[float | None]], sink: resilient_db.CollectingSink) -> None:
    m = ResponseTimeMonitor(("psycopg", "crash", 1), Host("crash", 1), DRIVER, interval=1.0,
                            disposal=60.0)
    runs: list[int] = []

    def run() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("boom")

    m._run = run  # type: ignore[method-assign]
    user = User()
    assert m.attach(user, interval=1.0, disposal=60.0)
    wait_until("the monitor ran twice and ended", lambda: len(runs) == 2 and not m.running)
    assert m.crashes == 1
    (decision,) = sink.of_kind("response_time.monitor_restarted")
    assert decision.attributes["error.type"] == "RuntimeError"
    assert decision.attributes["resilient_db.monitor.crashes"] == 1


def test_attach_takes_the_shortest_interval_and_the_longest_disposal(
        script: tuple[Clock, list[float | None]]) -> None:
    m = ResponseTimeMonitor(("psycopg", "a", 1), Host("a", 1), DRIVER, interval=1.0,
                            disposal=5.0)
    one, two = User(), User()
    assert m.attach(one, interval=0.5, disposal=1.0)
    assert m.attach(two, interval=2.0, disposal=9.0)
    assert (m.interval, m.disposal, m.users) == (0.5, 9.0, 2)
    m.stop()
    assert not m.attach(User(), interval=1.0, disposal=1.0)  # stopped: get a new one
    assert m.users == 0


def test_a_monitor_without_users_is_disposed(
        script: tuple[Clock, list[float | None]], sink: resilient_db.CollectingSink) -> None:
    key = ("psycopg", "disposed", 1)
    made: list[ResponseTimeMonitor] = []

    def create() -> ResponseTimeMonitor:
        made.append(ResponseTimeMonitor(key, Host("disposed", 1), DRIVER, interval=0.1,
                                        disposal=0.2))
        return made[-1]

    m = response_time.monitor_for(key, create)
    user = User()
    assert m.attach(user, interval=0.1, disposal=0.2)
    m.detach(user)
    wait_until("the monitor disposed", lambda: not m.running)
    assert m.stopped and m not in response_time.monitors() and not m.connection_open
    assert sink.of_kind("response_time.monitor_disposed")
    assert response_time.monitor_for(key, create) is not m  # a new one next time
    assert len(made) == 2


def test_response_times_reads_only_measured_live_monitors() -> None:
    a = monitor(Clock())
    b = ResponseTimeMonitor(("psycopg", "b", 1), Host("b", 1), DRIVER, interval=1.0,
                            disposal=1.0)
    c = ResponseTimeMonitor(("psycopg", "c", 1), Host("c", 1), DRIVER, interval=1.0,
                            disposal=1.0)
    a.measured, b.measured = (0.01, 5.0), (0.02, 6.0)
    b.stop()
    assert response_time.response_times([a, b, c]) == {HOST.address: (0.01, 5.0)}


class Measurer:
    def __init__(self) -> None:
        self.asked: list[tuple[Host, ...]] = []

    def times(self, hosts: Any) -> dict[str, tuple[float, float]]:
        self.asked.append(tuple(hosts))
        return {HOST.address: (0.01, 1.0)}


def test_selection_times_only_for_fastest_response_with_the_plugin() -> None:
    ctx = PluginContext(Settings({}), DRIVER, HostSpec("h"))
    assert response_time.selection_times(ctx, FastestResponse(), [HOST]) == {}
    measurer = Measurer()
    ctx.extra[response_time.EXTRA_KEY] = weakref.ref(measurer)
    assert response_time.selection_times(ctx, Random(), [HOST]) == {}
    assert measurer.asked == []  # other strategies cost nothing
    assert response_time.selection_times(ctx, FastestResponse(), [HOST]) == {
        HOST.address: (0.01, 1.0)}
    response_time.measure(ctx, [HOST])
    assert measurer.asked == [(HOST,), (HOST,)]
    del measurer  # held weakly: a dropped plugin is no measurer
    assert response_time.selection_times(ctx, FastestResponse(), [HOST]) == {}

