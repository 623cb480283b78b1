"""``SupervisedMonitor``, the skeleton of the per-key monitors (``efm``, response time,
blue/green), through a minimal subclass: supervision restarts a crashing step with doubling
backoff, ``stop()`` wakes a thread blocked in a query by aborting its connection and the
thread is gone soon after, the last user leaving disposes of the monitor, ``shutdown()`` stops
it, a forked child abandons it without touching the parent's session.

The connection cases use real servers (PostgreSQL and MariaDB from the harness); the rest
needs none. Waits are bounded polls on conditions, never sleeps."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import _lifecycle, _monitors
from resilient_db._decisions import Decision, get_decision_sink
from resilient_db._monitors import FIRST_RESTART_BACKOFF, MonitorRegistry, SupervisedMonitor
from resilient_db.drivers import driver_for
from tests.conftest import Backend

from .test_fork import in_child, session_alive, session_id
from .waiting import wait_until

#: Bound for a stopped monitor's thread to end (a liveness bound for a busy machine; the
#: blocking query lasts far longer, so a thread that was not woken fails it).
JOIN_TIMEOUT = 30.0
#: What the blocked-query test runs: far longer than JOIN_TIMEOUT.
LONG_SLEEP = 300

_registry: MonitorRegistry[Worker] = MonitorRegistry("test_monitor.monitors_stopped",
                                                     "resilient_db.test_monitor.monitors")
_lifecycle.on_fork_child(_registry.reset_in_child)  # as every monitor module does at import

_keys = iter(range(10**6))


class User:
    """A connection using the monitor: it opens the monitor's connection."""

    def __init__(self, backend: Backend | None = None) -> None:
        self.backend = backend

    def open_connection(self) -> Any:
        assert self.backend is not None, "this test's monitor opens no connection"
        return self.backend.raw(autocommit=True)


Action = Callable[["Worker"], None]


def select_one(worker: Worker) -> None:
    """A step that keeps a connection and runs ``SELECT 1`` on it."""
    try:
        if worker._conn is None:
            conn = worker._some_user().open_connection()
            if not worker._adopt(conn):
                return
        worker.driver.query(worker._conn, "SELECT 1")
        worker.queries += 1
    except Exception as exc:
        worker._close()
        if not worker._stopping.is_set():
            worker.errors.append(exc)


class Worker(SupervisedMonitor):
    """The smallest subclass: ``action`` is the step's work; the pause after it lasts
    ``interval`` (or until the monitor may be disposed of)."""

    _log = logging.getLogger("resilient_db.test_monitor")

    def __init__(self, backend: Backend | None, action: Action, *, disposal: float = 60.0,
                 interval: float = 0.02, key: tuple[str, int] | None = None) -> None:
        key = key if key is not None else ("test", next(_keys))
        target = backend.target if backend is not None else psycopg.Connection.connect
        super().__init__(key, driver_for(target, None), registry=_registry,
                         component="test_monitor", thread_name=f"resilient_db-test[{key[1]}]",
                         label=f"test monitor {key[1]}", disposal=disposal)
        self.test_key = key
        self.action = action
        self.interval = interval
        self.step_starts: list[float] = []
        self.queries = 0
        self.errors: list[BaseException] = []
        self.disposed_count = 0
        self.released: list[Any] = []
        self.dropped = 0

    def attach(self, user: User, *, disposal: float = 0.0) -> bool:
        return self._attach(user, disposal)

    def _step(self, now: float, idle_until: float) -> None:
        self.step_starts.append(now)
        self.action(self)
        wake = min(now + self.interval, idle_until)
        with self._cond:
            while not self._stopping.is_set():
                left = wake - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)

    def _record_restart(self, exc: Exception, backoff: float) -> None:
        get_decision_sink().record(Decision("test_monitor.restarted", None, {
            "error.type": type(exc).__name__, "backoff": backoff, "crashes": self.crashes}))

    def _drop_connection_state(self) -> None:
        self.dropped += 1

    def _disposed(self) -> None:
        self.disposed_count += 1

    def _released(self, users: list[Any]) -> None:
        self.released.extend(users)


def create(key: tuple[str, int], backend: Backend | None, action: Action,
           **settings: float) -> Worker:
    """The registry's monitor of ``key`` (made as the monitor modules make theirs)."""
    return _registry.get_or_create(key, lambda: Worker(backend, action, key=key, **settings))


def idle(worker: Worker) -> None:
    """A step that does no I/O."""


def joined(worker: Worker) -> bool:
    """Whether the monitor's thread ended within JOIN_TIMEOUT."""
    thread = worker._thread
    assert thread is not None
    thread.join(JOIN_TIMEOUT)
    return not thread.is_alive()


@pytest.fixture(autouse=True)
def _stop_background_work() -> Iterator[None]:
    yield
    resilient_db.shutdown()
    _registry.stop_all()  # also the monitors whose thread never started


# --- supervision ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_crashing_step_restarts_with_doubling_backoff_up_to_the_cap(
        monkeypatch: pytest.MonkeyPatch, sink: resilient_db.CollectingSink,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(_monitors, "MAX_RESTART_BACKOFF", 0.3)

    def crash_four_times(worker: Worker) -> None:
        if len(worker.step_starts) <= 4:
            raise RuntimeError(f"boom {len(worker.step_starts)}")

    caplog.set_level(logging.WARNING, "resilient_db.test_monitor")
    worker = Worker(None, crash_four_times)
    user = User()
    assert worker.attach(user)
    wait_until("two steps after four crashes", lambda: len(worker.step_starts) >= 6)
    assert worker.crashes == 4 and worker.running and not worker.stopped
    restarts = sink.of_kind("test_monitor.restarted")
    assert [d.attributes["backoff"] for d in restarts] == [FIRST_RESTART_BACKOFF, 0.2, 0.3, 0.3]
    assert [d.attributes["crashes"] for d in restarts] == [1, 2, 3, 4]
    assert {d.attributes["error.type"] for d in restarts} == {"RuntimeError"}
    # Each restart came at least its backoff after the crashed step (lower bounds only).
    gaps = [b - a for a, b in zip(worker.step_starts, worker.step_starts[1:5], strict=False)]
    for gap, backoff in zip(gaps, [0.1, 0.2, 0.3, 0.3], strict=True):
        assert gap >= backoff - 0.005, (gaps, backoff)
    # A crash lets the connection go before the restart.
    assert worker.dropped >= 4
    messages = [r.getMessage() for r in caplog.records if r.name == "resilient_db.test_monitor"]
    assert messages[0] == (f"test monitor {worker.test_key[1]} crashed (1 so far); restarting in "
                           "0.1 s")
    worker.stop()
    assert joined(worker)


@pytest.mark.unit
def test_the_monitor_thread_runs_with_instrumentation_suppressed() -> None:
    """DESIGN §9: internal statements (probes, topology, status reads) make no driver-level
    instrumentation spans; every monitor class (efm included) runs its thread suppressed."""
    from resilient_db.blue_green import BlueGreenMonitor
    from resilient_db.efm_monitor import HostMonitor
    from resilient_db.response_time import ResponseTimeMonitor
    from resilient_db.telemetry.context import is_suppressed

    seen: list[bool] = []
    worker = Worker(None, lambda w: seen.append(is_suppressed()))
    assert worker.attach(User())
    wait_until("a step", lambda: bool(seen))
    worker.stop()
    assert joined(worker)
    assert seen[0] is True and not is_suppressed()
    for cls in (HostMonitor, ResponseTimeMonitor, BlueGreenMonitor):
        assert cls._suppress_instrumentation, cls


@pytest.mark.real_server
def test_a_crash_closes_the_connection_and_the_restart_opens_a_new_one(
        backend: Backend) -> None:
    sessions: list[int] = []

    def crash_once_connected(worker: Worker) -> None:
        select_one(worker)
        if worker._conn is not None and len(sessions) < 2:
            ident = session_id(backend.name, worker._conn)
            if ident not in sessions:
                sessions.append(ident)
            if len(sessions) == 1:
                raise RuntimeError("crash with a connection open")

    worker = Worker(backend, crash_once_connected)
    user = User(backend)
    assert worker.attach(user)
    wait_until("a second connection after the crash", lambda: len(sessions) == 2)
    assert worker.crashes == 1 and worker.errors == []
    wait_until("the crashed step's session ended on the server",
               lambda: not session_alive(backend, sessions[0]))
    assert session_alive(backend, sessions[1])
    worker.stop()
    assert joined(worker)


# --- stop ----------------------------------------------------------------------------------------


@pytest.mark.real_server
def test_stop_wakes_a_thread_blocked_in_a_query_by_aborting_its_connection(
        backend: Backend) -> None:
    woken: list[BaseException] = []
    sleep = (f"SELECT pg_catalog.pg_sleep({LONG_SLEEP})" if backend.name == "pg"
             else f"SELECT SLEEP({LONG_SLEEP})")

    def block(worker: Worker) -> None:
        conn = worker._some_user().open_connection()
        if not worker._adopt(conn):
            return
        try:
            worker.driver.query(conn, sleep)
        except Exception as exc:
            woken.append(exc)
            worker._close()
            if worker._stopping.is_set():
                return
            raise
        raise AssertionError("the blocking query returned")

    worker = Worker(backend, block)
    user = User(backend)
    assert worker.attach(user)
    conn = wait_until("the monitor's connection", lambda: worker._conn)
    ident = session_id(backend.name, conn)
    wait_until("the query is running on the server", lambda: running_sleep(backend, ident))
    assert worker.running

    started = time.monotonic()
    worker.stop()
    stop_took = time.monotonic() - started
    assert joined(worker), "the thread blocked in the query was not woken"
    woke_after = time.monotonic() - started
    assert stop_took < 5.0 and woke_after < JOIN_TIMEOUT  # liveness bounds: nothing waited
    driver_error = psycopg.Error if backend.name == "pg" else mysql.connector.Error
    assert len(woken) == 1 and isinstance(woken[0], driver_error), woken  # the driver's own
    assert worker.crashes == 0 and worker.stopped and not worker.running
    assert not worker.connection_open
    assert worker.released == [user] and worker.users == 0
    assert not worker.attach(User(backend))  # stopped: a caller gets a new one


def running_sleep(backend: Backend, ident: int) -> bool:
    conn = backend.raw(autocommit=True)
    try:
        cur = conn.cursor()
        if backend.name == "pg":
            cur.execute("SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid = %s "
                        "AND state = 'active' AND query LIKE '%%pg_sleep%%'", (ident,))
        else:
            cur.execute("SELECT count(*) FROM information_schema.processlist WHERE id = %s "
                        "AND info LIKE '%SLEEP%'", (ident,))
        return int(cur.fetchone()[0]) == 1
    finally:
        conn.close()


@pytest.mark.unit
def test_shutdown_stops_the_registrys_monitors_and_their_threads(
        sink: resilient_db.CollectingSink) -> None:
    worker = create(("shutdown", next(_keys)), None, idle)
    user = User()
    assert worker.attach(user)
    thread = worker._thread
    assert thread is not None and thread.daemon
    assert thread.name == f"resilient_db-test[{worker.test_key[1]}]"
    assert "test_monitor" in _lifecycle.running()
    wait_until("a step ran", lambda: worker.step_starts)

    resilient_db.shutdown()
    assert worker.stopped and joined(worker)
    assert _registry.all() == []
    (stopped,) = sink.of_kind("test_monitor.monitors_stopped")
    assert stopped.attributes["resilient_db.test_monitor.monitors"] == 1
    assert worker.released == [user]
    assert create(worker.test_key, None, idle) is not worker  # a new one when needed


# --- disposal ------------------------------------------------------------------------------------


@pytest.mark.real_server
def test_the_last_user_leaving_disposes_of_the_monitor(backend: Backend) -> None:
    disposal = 0.3
    worker = create(("dispose", next(_keys)), backend, select_one, disposal=disposal)
    first, second = User(backend), User(backend)
    assert worker.attach(first) and worker.attach(second)
    conn = wait_until("the monitor's connection", lambda: worker._conn)
    ident = session_id(backend.name, conn)

    worker.detach(first)
    # One user left: steps go on well past the disposal time, the monitor stays.
    steps = len(worker.step_starts)
    wait_until("steps after the first detach",
               lambda: worker.step_starts[-1] - worker.step_starts[steps - 1] > 2 * disposal)
    assert not worker.stopped and worker.disposed_count == 0

    left_at = time.monotonic()
    worker.detach(second)
    assert joined(worker), "the monitor was not disposed of"
    assert time.monotonic() - left_at >= disposal
    assert worker.stopped and worker.disposed_count == 1 and not worker.connection_open
    assert worker not in _registry.all() and worker.crashes == 0 and worker.errors == []
    wait_until("the monitor's session ended", lambda: not session_alive(backend, ident))
    assert not worker.attach(User(backend))


@pytest.mark.unit
def test_a_user_gone_by_garbage_collection_leaves_too() -> None:
    worker = Worker(None, idle, disposal=0.1)
    assert worker.attach(User())  # held weakly: nothing else keeps it
    gc.collect()
    assert joined(worker), "the monitor was not disposed of"
    assert worker.stopped and worker.disposed_count == 1


@pytest.mark.unit
def test_disposal_yields_to_a_user_that_arrived() -> None:
    worker = create(("yield", next(_keys)), None, idle)
    user = User()
    worker._users.add(user)  # a user, without starting the thread: _dispose is called directly
    assert not worker._dispose()
    assert not worker.stopped and worker in _registry.all()
    worker.detach(user)
    assert worker._dispose()
    assert worker.stopped and worker not in _registry.all() and worker.disposed_count == 1


# --- fork ----------------------------------------------------------------------------------------


@pytest.mark.real_server
def test_a_forked_child_abandons_the_monitor_without_touching_the_parents_session(
        backend: Backend) -> None:
    worker = create(("fork", next(_keys)), backend, select_one)
    user = User(backend)
    assert worker.attach(user)
    conn = wait_until("the monitor's connection", lambda: worker._conn)
    ident = session_id(backend.name, conn)

    def child() -> dict[str, Any]:
        return {"stopped": worker.stopped, "running": worker.running,
                "connection_open": worker.connection_open, "users": worker.users,
                "registry": len(_registry.all()), "attach": worker.attach(User(backend)),
                "lock_free": worker._cond.acquire(blocking=False)}

    report = in_child(child)
    assert report == {"stopped": True, "running": False, "connection_open": False,
                      "users": 0, "registry": 0, "attach": False, "lock_free": True}
    # The parent's monitor goes on, on the same session.
    queries = worker.queries
    wait_until("more steps in the parent", lambda: worker.queries > queries + 3)
    assert worker._conn is not None and session_id(backend.name, worker._conn) == ident
    assert worker.errors == [] and not worker.stopped and session_alive(backend, ident)


@pytest.mark.unit
def test_a_connection_opened_while_stopping_is_closed_not_kept() -> None:
    class Conn:
        closed = False

        def close(self) -> None:
            self.closed = True

    worker = Worker(None, idle)
    kept, late = Conn(), Conn()
    assert worker._adopt(kept) and worker._conn is kept
    worker._close()  # the driver's abort of a non-driver object is a no-op
    assert kept.closed and not worker.connection_open and worker.dropped == 1
    worker.stop()
    assert not worker._adopt(late) and late.closed and not worker.connection_open


@pytest.mark.unit
def test_no_monitor_thread_is_left_behind() -> None:
    worker = Worker(None, idle)
    assert worker.attach(User())
    worker.stop()
    assert joined(worker)
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("resilient_db-test")]
    assert leftover == []
