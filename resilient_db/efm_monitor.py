"""Host failure monitors for the ``efm`` plugin (DESIGN §2, §6, §7).

One :class:`HostMonitor` per host (the peer address of the application's physical
connections) is shared by every connection of the process, with one thread and one probe
connection. Per statement a connection only registers itself as in flight: its driver
connection stores two attributes on itself (its ``efm`` plugin instance, one of the monitor's
users): its driver connection and the moment its grace period ends
(``failure_detection_time_ms``), reset when the statement returns. The monitor reads them
(:meth:`HostMonitor.in_flight`).

Detection (:meth:`HostMonitor._active_step`): once an in-flight statement has outlived its
grace period, the host is probed every ``interval``. A probe is one round trip on the probe
connection, sent without blocking (PostgreSQL: ``SELECT 1`` through libpq's asynchronous API;
MySQL: ``COM_PING`` on the socket); it stays outstanding until its reply arrives, and each
``interval`` it spends unanswered counts as one failure. A late reply (a latency spike
shorter than ``interval * count``) is still a success, so it resets the count. After
``count`` consecutive failures the host is declared dead: every driver connection in flight on
it is aborted (``DriverDialect.abort``: its socket is shut down, the blocked thread wakes with
the driver's own network error, which the ``failover`` plugin handles), and the host is marked
down in the cluster's topology monitor. The host is probed on (reconnecting every ``interval``)
and marked up again when it answers.

Bound: a statement on a host that stops answering is aborted at most
``grace + interval * count`` after it started (plus the thread's wake-up latency).

Our own lateness is not the host's failure: a failure is counted only when the monitor thread
runs within ``slack`` of the moment it planned to, and only for a probe that has been
outstanding a full ``interval``; replies are read before failures are counted. A process that
was stopped (SIGSTOP), swapped or starved past a tick finds the reply waiting and counts a
success; a connect attempt that took much longer than its own timeout is discarded.

Lifecycle: nothing starts at import; a monitor's thread starts with the first connection that
attaches, runs as a daemon, is supervised (a crash is logged, counted in :attr:`crashes`,
recorded as ``efm.monitor_restarted`` and restarted with backoff), ends
``monitor_disposal_time`` after its last connection went away, and stops with
:func:`resilient_db.shutdown` without being waited for.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import _lifecycle
from ._decisions import Decision, get_decision_sink
from ._monitors import MonitorRegistry, SupervisedMonitor
from .drivers.base import DriverDialect

__all__ = ["HostMonitor", "MonitorUser", "Probe", "ProbeTarget", "monitor_for", "monitors",
           "probe_for", "stop_all"]

_INF = float("inf")

log = logging.getLogger("resilient_db.efm")

#: Application name of the probe connections (PostgreSQL shows it in pg_stat_activity).
PROBE_APPLICATION_NAME = "resilient_db-efm"
#: Shortest sleep of the monitor loop (a grace period of 0 must not spin).
MIN_WAIT = 0.01
#: The monitor thread counts a failure only when it runs at most this late (seconds, or half
#: the interval when that is longer): beyond that, the process itself was late.
MIN_SLACK = 0.1


@dataclass(frozen=True)
class ProbeTarget:
    """Where a monitor's probe connection goes: ``name`` is the host name the application
    used (kept for TLS and authentication), ``address`` the peer address its physical
    connection reached (an IP address, or ``None`` for a Unix socket), ``port`` its port."""

    name: str
    address: str | None
    port: int | None


class MonitorUser(Protocol):
    """What a monitor needs from a connection that uses it (the ``efm`` plugin)."""

    #: The driver connection of the statement in flight (or of the last one).
    flight_raw: Any
    #: When the grace period of the statement in flight ends (``time.monotonic()``); inf
    #: when no statement is in flight.
    due: float

    def open_probe_connection(self, target: ProbeTarget, timeout: float) -> Any:
        """A new autocommit driver connection to ``target`` for probing, opened within about
        ``timeout`` seconds (raises the driver's error otherwise)."""
        ...

    def host_availability_changed(self, up: bool) -> None:
        """The host was declared dead (``up`` false) or answers again."""
        ...

    def detached(self) -> None:
        """The monitor stopped (shutdown, disposal): attach again at the next statement."""
        ...


# --- probes --------------------------------------------------------------------------------------


class _Probe:
    """One probe connection's non-blocking round trip. ``send`` starts one; ``poll(timeout)``
    waits up to ``timeout`` seconds and returns whether the reply came (raises when the
    connection is broken)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def fileno(self) -> int:
        raise NotImplementedError

    def send(self) -> None:
        raise NotImplementedError

    def _read(self) -> bool:
        raise NotImplementedError

    def poll(self, timeout: float) -> bool:
        if self._read():
            return True
        if timeout > 0:
            ready, _, _ = select.select([self.fileno()], [], [], timeout)
            if ready:
                return self._read()
        return False


class _PgProbe(_Probe):
    """psycopg: ``SELECT 1`` through the public libpq wrapper (``Connection.pgconn``). The
    probe connection is used for nothing else, so psycopg's own state is never involved."""

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self.pgconn = conn.pgconn
        self.pgconn.nonblocking = 1
        self._pending = False

    def fileno(self) -> int:
        return int(self.pgconn.socket)

    def send(self) -> None:
        self.pgconn.send_query(b"SELECT 1")
        self.pgconn.flush()
        self._pending = True

    def _read(self) -> bool:
        from psycopg import OperationalError, pq

        if not self._pending:
            return False
        pgconn = self.pgconn
        pgconn.consume_input()
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                self._pending = False
                return True
            if result.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
                raise OperationalError(f"probe failed: {result.error_message!r}")
        if pgconn.status != pq.ConnStatus.OK:
            raise OperationalError("probe connection lost")
        return False


_COM_PING = b"\x01\x00\x00\x00\x0e"  # length 1, sequence 0, COM_PING


class _MysqlProbe(_Probe):
    """mysql-connector (pure-Python): ``COM_PING`` written to and read from the connection's
    socket (``MySQLConnection._socket.sock``, the private attribute the driver dialect uses
    too). The probe connection is opened uncompressed and used for nothing else."""

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        sock = getattr(getattr(conn, "_socket", None), "sock", None)
        if not isinstance(sock, socket.socket):
            raise RuntimeError("the mysql-connector probe needs a pure-Python connection")
        self.sock = sock
        sock.setblocking(False)
        self._buffer = b""
        self._pending = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self) -> None:
        self._buffer = b""
        self.sock.sendall(_COM_PING)
        self._pending = True

    def _read(self) -> bool:
        if not self._pending:
            return False
        while True:
            try:
                chunk = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if type(exc).__name__ == "SSLWantReadError":
                    break
                raise
            if not chunk:
                raise ConnectionResetError("probe connection closed by the server")
            self._buffer += chunk
        buffer = self._buffer
        if len(buffer) < 4:
            return False
        length = int.from_bytes(buffer[:3], "little")
        if len(buffer) < 4 + length:
            return False
        self._pending = False
        if length and buffer[4] == 0xFF:
            raise ConnectionError(f"probe refused: {buffer[7:4 + length]!r}")
        return True


def _probe_for(driver: DriverDialect, conn: Any) -> _Probe:
    if driver.code == "psycopg":
        return _PgProbe(conn)
    return _MysqlProbe(conn)


#: A probe connection's non-blocking round trip, public for the other per-host monitor that
#: times the same round trip (``resilient_db.response_time``).
Probe = _Probe
probe_for = _probe_for


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the monitor ---------------------------------------------------------------------------------


class HostMonitor(SupervisedMonitor):
    """The failure monitor of one host (``target``; ``address`` is ``ip:port``, or the
    socket directory for a Unix socket), shared by every connection to it in the process.

    :meth:`in_flight` maps a driver connection running a statement on this host to the moment
    (``time.monotonic()``) its grace period ends, read from the users (each writes its own
    two attributes per statement: no lock, no shared dict). Read :attr:`down`,
    :attr:`crashes`, :attr:`detections` any time.
    """

    _log = log

    def __init__(self, key: tuple[Any, ...], target: ProbeTarget, driver: DriverDialect, *,
                 interval: float, count: int, grace: float, disposal: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target
        self.address = (f"{target.address}:{target.port}" if target.address is not None
                        else target.name)
        super().__init__(key, driver, registry=_registry, component="efm",
                         thread_name=f"resilient_db-efm[{self.address}]",
                         label=f"failure monitor of {self.address}", disposal=disposal,
                         clock=clock)
        self.interval = interval
        self.count = count
        self.grace = grace
        #: Driver connections this monitor aborted (the plugin tells the application why).
        self.aborted: weakref.WeakSet[Any] = weakref.WeakSet()
        self._probe: _Probe | None = None
        self._sent_at: float | None = None  # when the outstanding probe was sent
        self._failures = 0
        self._first_failure_at: float | None = None
        self._down_since: float | None = None
        self._last_connect_try = float("-inf")
        #: Times the host was declared dead.
        self.detections = 0
        #: Probe outcomes discarded because the monitor itself ran late.
        self.late_discards = 0
        #: Probes answered, and intervals a probe spent unanswered (diagnostics, tests).
        self.probes_ok = 0
        self.failed_probes = 0

    # --- what connections read and do ---------------------------------------------------------
    @property
    def down(self) -> bool:
        """Whether the host is declared dead now."""
        return self._down_since is not None

    def in_flight(self) -> dict[Any, float]:
        """The driver connections with a statement in flight on this host now, each with the
        moment its grace period ends (the earliest, when threads share a connection)."""
        with self._cond:
            users = list(self._users)
        flights: dict[Any, float] = {}
        for user in users:
            due = user.due  # read before the connection: the statement stores it after
            raw = user.flight_raw
            if due != _INF and raw is not None and due < flights.get(raw, _INF):
                flights[raw] = due
        return flights

    def attach(self, user: MonitorUser, *, interval: float, count: int, grace: float,
               disposal: float) -> bool:
        """Register a connection using this monitor (held weakly); the strictest settings of
        the connections using it apply. Starts the thread if it is not running. False when
        the monitor stopped meanwhile (disposed, shut down): get a new one."""

        def adopt() -> None:
            self.interval = min(self.interval, interval)
            self.count = min(self.count, count)
            if grace < self.grace:
                self.grace = grace
                self._cond.notify_all()  # the idle wait in _step is based on the grace period

        return self._attach(user, disposal, adopt)

    def _released(self, users: list[Any]) -> None:
        for user in users:
            with contextlib.suppress(Exception):
                user.detached()

    # --- the thread ----------------------------------------------------------------------------
    def _record_restart(self, exc: Exception, backoff: float) -> None:
        get_decision_sink().record(Decision("efm.monitor_restarted", "efm", {
            "server.address": self.address, "error.type": type(exc).__name__,
            "resilient_db.efm.crashes": self.crashes,
            "resilient_db.efm.backoff": backoff}))

    def _step(self, now: float, idle_until: float) -> None:
        # The base counts the monitor idle when it has no users: a statement in flight always
        # has one (in_flight() reads the users' attributes).
        due = min(self.in_flight().values(), default=None)
        if self._down_since is not None or (due is not None and due <= now):
            self._active_step(now)
            return
        # Idle: no statement has outlived its grace period. One that starts after `now`
        # cannot need a probe before now + grace, so waking then misses nothing. (Users
        # leave without a word, by garbage collection: look again within `disposal`.)
        self._reset_probe_state()
        self._keep_connection(now)
        wake = min(now + max(min(self.grace, self.disposal), MIN_WAIT), idle_until)
        if due is not None:
            wake = min(wake, due)
        with self._cond:
            if not self._stopping.is_set():
                self._cond.wait(max(MIN_WAIT, wake - self._clock()))

    def _slack(self) -> float:
        return max(MIN_SLACK, self.interval / 2)

    def _reset_probe_state(self) -> None:
        self._failures = 0
        self._first_failure_at = None

    def _keep_connection(self, now: float) -> None:
        """While idle: have the probe connection ready (retried at most every interval)."""
        if self._conn is not None or now - self._last_connect_try < self.interval:
            return
        self._last_connect_try = now
        with contextlib.suppress(Exception):
            self._connect()

    def _connect(self) -> None:
        conn = self._some_user().open_probe_connection(self.target, self.interval)
        try:
            probe = _probe_for(self.driver, conn)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        if self._adopt(conn):
            self._probe, self._sent_at = probe, None

    def _drop_connection_state(self) -> None:
        self._probe, self._sent_at = None, None

    def _active_step(self, now: float) -> None:
        """One step of probing: send a probe if none is outstanding, wait for its reply until
        the next tick, count a failure per unanswered interval."""
        interval = self.interval
        if self._probe is None:
            if now - self._last_connect_try < interval:
                self._sleep(self._last_connect_try + interval - now)
                return
            self._last_connect_try = now
            try:
                self._connect()
            except Exception as exc:
                if self._stopping.is_set():
                    return
                elapsed = self._clock() - now
                limit = max(interval, 2.0) + self._slack()  # psycopg waits at least 2 s
                if elapsed > limit:
                    self.late_discards += 1
                    log.debug("probe connect to %s took %.2f s (limit %.2f): discarded",
                              self.address, elapsed, limit)
                    return
                # An unanswered connect attempt is an unanswered probe for as long as it
                # lasted (at least one).
                self._failed(now, max(1, int(elapsed / interval)), _describe(exc))
                return
            self._answered(now)  # the server took part in a complete handshake
            return
        probe = self._probe
        try:
            if self._sent_at is None:
                probe.send()
                self._sent_at = now
            tick = self._sent_at + interval
            answered = probe.poll(max(0.0, tick - self._clock()))
        except Exception as exc:
            self._close()
            if self._stopping.is_set():
                return  # stop() broke the probe's socket
            self._failed(now, 1, _describe(exc))
            # Reconnect at the next tick, not at once (a refused host would spin).
            self._last_connect_try = now
            return
        if answered:
            self._sent_at = None
            self.probes_ok += 1
            self._answered(now)
            self._sleep(tick - self._clock())  # one probe per interval
            return
        late = self._clock()
        if late - tick > self._slack():
            # The thread ran late (process stopped, starved): the reply may not have had
            # the chance we planned for. Give the same probe a new interval.
            self.late_discards += 1
            log.debug("failure monitor of %s ran %.2f s late: probe outcome discarded",
                      self.address, late - tick)
            self._sent_at = late
            return
        if late < tick:
            return  # woken early (stop); the loop looks again
        self._sent_at = tick  # still outstanding: the next interval starts now
        self._failed(tick - interval, 1, "no reply")

    def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._cond:
            if not self._stopping.is_set():
                self._cond.wait(seconds)

    def _failed(self, since: float, failures: int, why: str) -> None:
        if self._first_failure_at is None:
            self._first_failure_at = since
        self._failures += failures
        self.failed_probes += failures
        log.debug("probe of %s failed (%s): %d of %d", self.address, why, self._failures,
                  self.count)
        if self._failures >= self.count:
            if self._down_since is None:
                self._declare_dead(why)
            else:
                self._abort_inflight(only_due=True)

    def _answered(self, now: float) -> None:
        self._reset_probe_state()
        if self._down_since is not None:
            down_for = self._clock() - self._down_since
            self._down_since = None
            log.info("host %s answers again after %.1f s: marked up", self.address, down_for)
            get_decision_sink().record(Decision("efm.host_up", "efm", {
                "server.address": self.address, "resilient_db.efm.down_for": down_for}))
            self._notify_users(up=True)

    def _declare_dead(self, why: str) -> None:
        now = self._clock()
        first = self._first_failure_at if self._first_failure_at is not None else now
        self._down_since = now
        self.detections += 1
        # Marked down first, so that the failover an abort starts already knows.
        self._notify_users(up=False)
        get_decision_sink().record(Decision("efm.host_down", "efm", {
            "server.address": self.address,
            "resilient_db.efm.detection_time": now - first,
            # The telemetry layer's detection-time histogram reads this name.
            "resilient_db.detection.duration": now - first,
            "resilient_db.efm.failures": self._failures,
            "resilient_db.efm.last_error": why,
            "resilient_db.efm.interval": self.interval,
            "resilient_db.efm.count": self.count,
            "resilient_db.efm.grace": self.grace,
            "resilient_db.efm.in_flight": len(self.in_flight())}))
        aborted = self._abort_inflight(only_due=False)
        log.warning("host %s declared dead: %d probes unanswered over %.2f s (%s); %d in-flight "
                    "connection(s) aborted", self.address, self._failures, now - first, why,
                    aborted)
        self._close()

    def _abort_inflight(self, *, only_due: bool) -> int:
        """Abort the driver connections in flight on this host (``only_due``: those past their
        grace period: while the host is down, a statement that just started may still be
        answered by a host coming back)."""
        now = self._clock()
        sink = get_decision_sink()
        aborted = 0
        for raw, due in self.in_flight().items():
            if only_due and due > now:
                continue
            if raw in self.aborted:
                continue
            self.aborted.add(raw)
            broken = self.driver.abort(raw)
            aborted += 1
            sink.record(Decision("efm.aborted", "efm", {
                "server.address": self.address,
                "resilient_db.efm.statement_age": now - (due - self.grace),
                "resilient_db.efm.socket_shut_down": broken}))
        return aborted

    def _notify_users(self, *, up: bool) -> None:
        for user in self._live_users():
            try:
                user.host_availability_changed(up)
            except Exception:
                log.debug("host availability hook failed", exc_info=True)

    def _disposed(self) -> None:
        log.debug("failure monitor of %s disposed after %.0f s without users", self.address,
                  self.disposal)


# --- the registry --------------------------------------------------------------------------------

_registry: MonitorRegistry[HostMonitor] = MonitorRegistry("efm.monitors_stopped",
                                                          "resilient_db.efm.monitors")


def monitor_for(key: tuple[Any, ...], create: Callable[[], HostMonitor]) -> HostMonitor:
    """The monitor of host ``key``, created with ``create`` when there is none (or the one
    there was stopped or disposed)."""
    return _registry.get_or_create(key, create)


def monitors() -> list[HostMonitor]:
    """Every live monitor of the process (tests, diagnostics)."""
    return _registry.all()


def stop_all() -> None:
    """Stop every monitor and forget them (``resilient_db.shutdown``); connections that need
    one later start a new one."""
    _registry.stop_all()


_lifecycle.on_fork_child(_registry.reset_in_child)
