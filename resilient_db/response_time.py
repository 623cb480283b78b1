"""Response-time monitors for the ``fastest_response`` reader selection strategy (DESIGN §6, §7).

One :class:`ResponseTimeMonitor` per instance (driver, host name, port) is shared by every
connection of the process that selected the ``fastest_response_strategy`` plugin, with one
daemon thread and one server connection of its own. Every ``interval`` it times
:data:`SAMPLES` round trips on that connection (PostgreSQL: ``SELECT 1`` through libpq's
asynchronous API; MySQL: ``COM_PING``: the probes of ``efm``, sent without blocking) and
publishes their median with the moment it was taken. The median, not the mean: one round trip
delayed by a garbage collection or a scheduling hiccup of our own must not move a host. Each
round trip is bounded by :attr:`ResponseTimeMonitor.timeout` (the interval, at most
:data:`MAX_TIMEOUT`), and the connect before it by the same bound in the driver's whole
seconds (at least 2, libpq's minimum); a host that does not answer within it, or cannot
be reached, has no measurement (:attr:`ResponseTimeMonitor.measured` ``None``), so the
strategy ranks it behind every measured host, and is retried at the next interval on a new
connection.

Connections read measurements with :func:`response_times` (a dict lookup per host, no I/O),
which is what :class:`~resilient_db.selection.SelectionContext` carries.

Lifecycle: nothing starts at import; a monitor's thread starts with the first connection that
attaches, runs as a daemon, is supervised (a crash is logged, counted in :attr:`crashes`,
recorded as ``response_time.monitor_restarted`` and restarted with backoff), ends
``disposal`` seconds after its last connection went away (it keeps measuring meanwhile, so
short-lived connections find fresh numbers), and stops with :func:`resilient_db.shutdown`
without being waited for. After ``fork()`` the child abandons the inherited monitors without a
word to the server and starts its own lazily (``_lifecycle``).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from . import _lifecycle
from ._decisions import Decision, get_decision_sink
from ._monitors import MonitorRegistry, SupervisedMonitor
from ._pipeline import PluginContext
from .drivers.base import DriverDialect
from .efm_monitor import Probe, probe_for
from .hosts import Host
from .selection import FastestResponse, Strategy

__all__ = [
    "EXTRA_KEY",
    "MAX_TIMEOUT",
    "MEASURING_APPLICATION_NAME",
    "SAMPLES",
    "MeasureUser",
    "Measurer",
    "ResponseTimeMonitor",
    "measure",
    "monitor_for",
    "monitors",
    "response_times",
    "selection_times",
    "stop_all",
]

log = logging.getLogger("resilient_db.response_time")

#: Application name of the measuring connections (PostgreSQL shows it in pg_stat_activity).
MEASURING_APPLICATION_NAME = "resilient_db-response-time"
#: Round trips timed per measurement (their median is published).
SAMPLES = 5
#: Upper bound of one round trip and of connecting, seconds (the interval, when shorter). A
#: reader slower than this to answer ``SELECT 1`` is no candidate for "fastest" anyway.
MAX_TIMEOUT = 10.0


class MeasureUser(Protocol):
    """What a monitor needs from a connection that uses it (the ``fastest_response_strategy``
    plugin)."""

    def open_measuring_connection(self, host: Host, timeout: float) -> Any:
        """A new autocommit driver connection to ``host`` for measuring, opened within about
        ``timeout`` seconds through the connection's inner connect chain (credentials
        plugins apply); raises the driver's error otherwise."""
        ...


class _NoReplyError(Exception):
    """Internal: a round trip got no reply within the timeout."""


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ResponseTimeMonitor(SupervisedMonitor):
    """The response-time monitor of one instance (``host``; ``address`` is its
    ``Host.address``), shared by every connection to its cluster in the process that uses
    ``fastest_response``.

    Read :attr:`measured` (``(seconds, measured_at)``, ``measured_at`` in
    ``time.monotonic()`` seconds; ``None``: no usable measurement), :attr:`measurements`,
    :attr:`failures`, :attr:`crashes` any time.
    """

    _log = log

    def __init__(self, key: tuple[Any, ...], host: Host, driver: DriverDialect, *,
                 interval: float, disposal: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.address = host.address
        super().__init__(key, driver, registry=_registry, component="response_time",
                         thread_name=f"resilient_db-response-time[{self.address}]",
                         label=f"response-time monitor of {self.address}",
                         disposal=disposal, clock=clock)
        self.interval = interval
        self._probe: Probe | None = None
        #: The last measurement, ``(seconds, measured_at)``; ``None``: none usable.
        self.measured: tuple[float, float] | None = None
        #: Measurements published, and measurements that failed (diagnostics, tests).
        self.measurements = 0
        self.failures = 0
        #: Whether the last attempt failed (``response_time.unreachable`` is recorded once per
        #: run of failures).
        self._unreachable = False

    # --- what connections read and do ---------------------------------------------------------
    @property
    def timeout(self) -> float:
        """Bound of one round trip and of connecting (seconds)."""
        return min(self.interval, MAX_TIMEOUT)

    def attach(self, user: MeasureUser, *, interval: float, disposal: float) -> bool:
        """Register a connection using this monitor (held weakly); the shortest interval and
        the longest disposal time of the connections using it apply. Starts the thread if it
        is not running. False when the monitor stopped meanwhile (disposed, shut down): get
        a new one."""

        def adopt() -> None:
            if interval < self.interval:
                self.interval = interval
                self._cond.notify_all()  # the pause in progress was based on the old interval

        return self._attach(user, disposal, adopt)

    # --- the thread ----------------------------------------------------------------------------
    def _record_restart(self, exc: Exception, backoff: float) -> None:
        get_decision_sink().record(Decision(
            "response_time.monitor_restarted", "fastest_response_strategy", {
                "server.address": self.host.host, "server.port": self.host.port,
                "error.type": type(exc).__name__,
                "resilient_db.monitor.crashes": self.crashes,
                "resilient_db.response_time.backoff": backoff}))

    def _step(self, started: float, idle_until: float) -> None:
        self._measure()
        # The interval read anew: attach() may have shortened it meanwhile.
        self._pause_until(lambda: min(started + self.interval, idle_until))

    def _measure(self) -> None:
        """One measurement: connect if needed, time :data:`SAMPLES` round trips, publish their
        median (or, on a failure, no measurement)."""
        timeout = self.timeout
        try:
            probe = self._probe if self._probe is not None else self._connect(timeout)
            samples = [self._round_trip(probe, timeout) for _ in range(SAMPLES)]
        except Exception as exc:
            self._close()
            if self._stopping.is_set():
                return  # stop() broke the socket
            self._failed(exc)
            return
        seconds = statistics.median(samples)
        self.measured = (seconds, self._clock())
        self.measurements += 1
        self._unreachable = False
        get_decision_sink().record(Decision("response_time.measured", "fastest_response_strategy", {
            "server.address": self.host.host, "server.port": self.host.port,
            "resilient_db.instance.id": self.host.instance_id,
            "resilient_db.response_time.seconds": seconds,
            "resilient_db.response_time.samples": len(samples)}))

    def _round_trip(self, probe: Probe, timeout: float) -> float:
        start = self._clock()
        deadline = start + timeout
        probe.send()
        while not probe.poll(max(0.0, deadline - self._clock())):
            if self._stopping.is_set():
                raise _NoReplyError("stopping")
            if self._clock() >= deadline:
                raise _NoReplyError(f"no reply within {timeout:g} s")
        return self._clock() - start

    def _failed(self, exc: BaseException) -> None:
        self.measured = None
        self.failures += 1
        why = _describe(exc)
        log.debug("response time of %s not measured: %s", self.address, why)
        if self._unreachable:
            return
        self._unreachable = True
        get_decision_sink().record(Decision("response_time.unreachable",
                                            "fastest_response_strategy", {
            "server.address": self.host.host, "server.port": self.host.port,
            "resilient_db.instance.id": self.host.instance_id,
            "resilient_db.response_time.last_error": why,
            "resilient_db.response_time.timeout": self.timeout}))

    def _connect(self, timeout: float) -> Probe:
        conn = self._some_user().open_measuring_connection(self.host, timeout)
        try:
            probe = probe_for(self.driver, conn)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        if not self._adopt(conn):
            raise _NoReplyError("stopping")
        self._probe = probe
        return probe

    def _drop_connection_state(self) -> None:
        self._probe = None

    def _disposed(self) -> None:
        self.measured = None
        log.debug("response-time monitor of %s disposed after %.0f s without users",
                  self.address, self.disposal)
        get_decision_sink().record(Decision(
            "response_time.monitor_disposed", "fastest_response_strategy", {
                "server.address": self.host.host, "server.port": self.host.port,
                "resilient_db.response_time.disposal": self.disposal}))

    def __repr__(self) -> str:
        return (f"<ResponseTimeMonitor {self.address} interval={self.interval:g} "
                f"measured={self.measured} users={self.users}>")


# --- the registry --------------------------------------------------------------------------------

_registry: MonitorRegistry[ResponseTimeMonitor] = MonitorRegistry(
    "response_time.monitors_stopped", "resilient_db.response_time.monitors")


def monitor_for(key: tuple[Any, ...], create: Callable[[], ResponseTimeMonitor],
                ) -> ResponseTimeMonitor:
    """The monitor of instance ``key``, created with ``create`` when there is none (or the one
    there was stopped or disposed)."""
    return _registry.get_or_create(key, create)


def monitors() -> list[ResponseTimeMonitor]:
    """Every live monitor of the process (tests, diagnostics)."""
    return _registry.all()


def response_times(monitors: Iterable[ResponseTimeMonitor],
                   ) -> Mapping[str, tuple[float, float]]:
    """``Host.address -> (seconds, measured_at)`` of the monitors that have a measurement (no
    I/O; what ``SelectionContext.response_times`` carries)."""
    times: dict[str, tuple[float, float]] = {}
    for monitor in monitors:
        measured = monitor.measured
        if measured is not None and not monitor.stopped:
            times[monitor.address] = measured
    return times


#: ``PluginContext.extra`` key of a connection's ``fastest_response_strategy`` plugin (a weak
#: reference to a :class:`Measurer`).
EXTRA_KEY = "fastest_response_strategy"

_NO_TIMES: Mapping[str, tuple[float, float]] = MappingProxyType({})


class Measurer(Protocol):
    """What the ``fastest_response_strategy`` plugin offers the other plugins of its
    connection."""

    def times(self, hosts: Iterable[Host]) -> Mapping[str, tuple[float, float]]:
        """Measurements of ``hosts`` (``Host.address -> (seconds, measured_at)``; hosts not
        measured yet are absent), after making sure each has a monitor this connection
        uses."""
        ...


def _measurer(ctx: PluginContext) -> Measurer | None:
    ref = ctx.extra.get(EXTRA_KEY)
    found = ref() if callable(ref) else None
    return found if found is not None and hasattr(found, "times") else None


def measure(ctx: PluginContext, hosts: Iterable[Host]) -> None:
    """Have ``hosts`` measured for the connection of ``ctx`` from now on, when it selected
    ``fastest_response_strategy`` (nothing otherwise). ``failover`` calls it when it learns
    the cluster's topology, so that measurements exist before the first selection."""
    measurer = _measurer(ctx)
    if measurer is not None:
        measurer.times(hosts)


def selection_times(ctx: PluginContext, strategy: Strategy, hosts: Iterable[Host],
                    ) -> Mapping[str, tuple[float, float]]:
    """What ``SelectionContext.response_times`` carries for a selection among ``hosts`` by
    ``strategy`` on the connection of ``ctx``: the measurements when the strategy is
    ``fastest_response`` (each host gets a monitor if it had none: a reader added since
    is measured from now on), empty otherwise (no work: other strategies never read them).
    The one place every selecting plugin (``failover``, ``initial_connection``, read/write
    splitting) gets them from."""
    if strategy.name != FastestResponse.name:
        return _NO_TIMES
    measurer = _measurer(ctx)
    if measurer is None:
        return _NO_TIMES
    return measurer.times(hosts)


def stop_all() -> None:
    """Stop every monitor and forget them (``resilient_db.shutdown``); connections that need
    one later start a new one."""
    _registry.stop_all()


_lifecycle.on_fork_child(_registry.reset_in_child)
