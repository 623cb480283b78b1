"""``efm``: enhanced failure monitoring. A statement blocked on a host that stopped answering
(blackholed network, frozen server) is aborted within ``grace + interval * count`` instead of
waiting minutes for TCP to give up; with ``failover`` the connection then moves to a healthy
instance.

Per statement the plugin only registers the driver connection as in flight on its host's
shared :class:`~resilient_db.efm_monitor.HostMonitor` (a dict store and a pop): no thread hop,
no per-query monitor context. The monitor (one thread and one probe connection per host for
the whole process) does the probing and, when it declares the host dead, shuts down the socket
of every connection in flight there: the blocked call wakes with the driver's own network error
(with a note saying why), which the ``failover`` plugin, outside this one, treats as a network
failure. The host is also marked down in the cluster's topology monitor (host selection and
reader failover try it last) until it answers again.

What it intercepts: statements (execute, executemany, callproc, copy), commit, rollback,
transaction blocks, opening a cursor and setting a session attribute (``autocommit``...):
mysql-connector's ``cursor()`` pings the server and its session setters send a ``SET``, so on
a blackholed host they block like a statement (psycopg does no I/O there; registering costs
a dict store and a pop). Not fetches: a fetch that reads from the network (server-side
cursors, ``Cursor.stream``, mysql-connector's unbuffered cursors) is not monitored.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from .. import efm_monitor
from .._params import (
    FAILURE_DETECTION_COUNT,
    FAILURE_DETECTION_ENABLED,
    FAILURE_DETECTION_INTERVAL,
    FAILURE_DETECTION_TIME,
    MONITOR_DISPOSAL_TIME,
)
from .._pipeline import (
    RUN_CALL,
    STATEMENT_OPS,
    Call,
    ConnectContext,
    ConnectHandler,
    ConnectionChanged,
    Handler,
    HostSpec,
    Op,
    Plugin,
    PluginContext,
)
from ..efm_monitor import HostMonitor, ProbeTarget

__all__ = ["EfmPlugin"]

_INF = float("inf")

log = logging.getLogger("resilient_db.plugins.efm")

#: Connect arguments that would bypass the address the probe must reach.
_ADDRESS_ARGS = ("hostaddr", "host", "port")


class EfmPlugin(Plugin):
    """See the module docstring. ``monitor``: the host monitor of the current physical
    connection (``None`` until the first statement after a connect or failover)."""

    code = "efm"
    single_host = True  # finds the cluster's instances itself
    intercepts = STATEMENT_OPS | {Op.COMMIT, Op.ROLLBACK, Op.TRANSACTION, Op.CURSOR,
                                  Op.SESSION}

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        self.enabled = settings[FAILURE_DETECTION_ENABLED]
        grace = settings[FAILURE_DETECTION_TIME]
        self.grace: float = 30.0 if grace is None else grace
        self.interval: float = settings[FAILURE_DETECTION_INTERVAL] or 5.0
        count = settings[FAILURE_DETECTION_COUNT]
        self.count: int = 3 if count is None else count
        disposal = settings[MONITOR_DISPOSAL_TIME]
        self.disposal: float = 60.0 if disposal is None else disposal
        self.monitor: HostMonitor | None = None
        #: Whether this connection has looked for its host's monitor since it connected
        #: (false: attach at the next statement; true with ``monitor`` None: not monitored).
        self.attached = False
        #: The statement in flight, as the monitor reads it (see ``HostMonitor.in_flight``):
        #: its driver connection and the moment its grace period ends (inf: none in flight).
        #: Two attribute stores per statement, the cheapest registration there is.
        self.flight_raw: Any = None
        self.due = _INF
        self._host: HostSpec = ctx.host
        self._pending_raw: Any = None
        self._inner_connect: ConnectHandler | None = None
        self._args: dict[str, Any] = {}
        self._target: Any = None

    def dormant(self) -> bool:
        return not self.enabled

    # --- connect phase -------------------------------------------------------------------------
    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        raw = proceed(ctx)
        if ctx.initial:
            self._inner_connect = proceed
            self._args = dict(ctx.args)
            self._target = ctx.target
            self._pending_raw = raw
        return raw

    def adopt(self, args: dict[str, Any], target: Any) -> None:
        """For a front that opens the application's connections itself (``connect_async``):
        the driver arguments and the blocking ``target`` probe connections use."""
        self._args = dict(args)
        self._target = target

    def on_connection_changed(self, event: ConnectionChanged) -> None:
        raw, self._pending_raw = self._pending_raw, None
        self._detach()
        if event.reason == "connect" and raw is not None and event.new_host is not None:
            # Start the host's monitor now, so its probe connection is ready before the
            # first long statement. After a failover: at the next statement.
            self._attach(raw, event.new_host)

    # --- execute phase -------------------------------------------------------------------------
    def wrap_execute(self, proceed: Handler) -> Handler:
        state = self
        clock = time.monotonic
        grace = self.grace
        if proceed is RUN_CALL:  # innermost: call the driver here, one frame less
            def handler(call: Call) -> Any:
                raw = call.raw  # not call.connection._raw: a proxy attribute is slow
                if not state.attached:
                    state._attach(raw, call.connection._host)
                state.flight_raw = raw
                state.due = clock() + grace
                try:
                    args = call.args
                    if call.kwargs:
                        return call.fn(*args, **call.kwargs)
                    if len(args) == 2:  # (statement, parameters): see _pipeline.run_call
                        return call.fn(args[0], args[1])
                    return call.fn(*args)
                except BaseException as exc:
                    state._explain(raw, exc)
                    raise
                finally:
                    state.due = _INF
            # An outer layer may do this registration itself, in its own frame (a frame is
            # the largest part of a layer's cost): see FailoverPlugin.wrap_execute.
            handler.efm = self  # type: ignore[attr-defined]
            return handler

        def chained(call: Call) -> Any:
            raw = call.raw
            if not state.attached:
                state._attach(raw, call.connection._host)
            state.flight_raw = raw
            state.due = clock() + grace
            try:
                return proceed(call)
            except BaseException as exc:
                state._explain(raw, exc)
                raise
            finally:
                state.due = _INF
        return chained

    def explain(self, raw: Any, exc: BaseException) -> None:
        """Tell the application, on the error of a statement this plugin registered, that the
        failure monitor aborted its connection (when it did)."""
        self._explain(raw, exc)

    def attach(self, raw: Any, host: HostSpec) -> None:
        """Register with the monitor of the host ``raw`` is connected to (before the first
        statement after a connect or failover: see ``attached``)."""
        self._attach(raw, host)

    def _explain(self, raw: Any, exc: BaseException) -> None:
        monitor = self.monitor
        if monitor is not None and raw in monitor.aborted:
            add_note = getattr(exc, "add_note", None)  # Python 3.11+
            if add_note is not None:
                add_note(f"resilient_db efm: host {monitor.address} stopped answering "
                         f"probes ({monitor.count} x {monitor.interval:g} s); the "
                         "connection was aborted")

    # --- the host monitor --------------------------------------------------------------------
    def _attach(self, raw: Any, host: HostSpec) -> None:
        """Find (or start) the monitor of the host ``raw`` is connected to and register with
        it; nothing is monitored when the host cannot be known."""
        driver = self.ctx.driver
        self.attached = True
        try:
            target = self._probe_target(raw, host)
        except Exception as exc:
            log.debug("cannot tell the address of %s (%r): not monitored", host, exc)
            return
        key = (driver.code, target.address or target.name, target.port)

        def create() -> HostMonitor:
            return HostMonitor(key, target, driver, interval=self.interval, count=self.count,
                               grace=self.grace, disposal=self.disposal)

        while True:
            monitor = efm_monitor.monitor_for(key, create)
            if monitor.attach(self, interval=self.interval, count=self.count,
                              grace=self.grace, disposal=self.disposal):
                break  # else it stopped between the two calls: the next one is new
        self.monitor = monitor
        self._host = host

    def _detach(self) -> None:
        monitor, self.monitor = self.monitor, None
        self.attached = False
        self.flight_raw = None
        if monitor is not None:
            monitor.detach(self)

    def _probe_target(self, raw: Any, host: HostSpec) -> ProbeTarget:
        driver = self.ctx.driver
        sock = driver.socket_of(raw)
        if sock is None:
            raise RuntimeError("no socket")
        try:
            family, peer = sock.family, sock.getpeername()
        finally:
            sock.close()
        if family in (socket.AF_INET, socket.AF_INET6):
            return ProbeTarget(host.host, str(peer[0]), int(peer[1]))
        port = host.port if host.port is not None else driver.default_port
        return ProbeTarget(host.host, None, port)

    def detached(self) -> None:
        """Called by a monitor that stopped: attach again at the next statement."""
        self.monitor = None
        self.attached = False

    # --- what the monitor asks -------------------------------------------------------------------
    def open_probe_connection(self, target: ProbeTarget, timeout: float) -> Any:
        """An autocommit connection to ``target`` through this connection's inner connect
        chain (credentials plugins apply), opened within about ``timeout`` seconds."""
        driver = self.ctx.driver
        args = dict(self._args)
        for name in _ADDRESS_ARGS:
            args.pop(name, None)
        args["host"] = target.name
        if target.port is not None:
            args["port"] = target.port
        args["autocommit"] = True
        if driver.code == "psycopg":
            if target.address is not None:
                args["hostaddr"] = target.address  # exactly the instance the app reached
            args["connect_timeout"] = max(2, int(-(-timeout // 1)))  # libpq: whole s, >= 2
            # The kernel gives up on unacknowledged data only when the host would be declared
            # dead anyway (a slow but answering host must not lose its probe connection).
            args["tcp_user_timeout"] = max(1000, int(timeout * 1000) * self.count)
            args["application_name"] = efm_monitor.PROBE_APPLICATION_NAME
        else:
            if target.address is not None:
                args["host"] = target.address
                args.pop("unix_socket", None)
            args.pop("connect_timeout", None)
            args["connection_timeout"] = timeout
            args["use_pure"] = True  # the probe reads the pure-Python connection's socket
            args["compress"] = False
        ctx = ConnectContext(HostSpec(target.name, target.port), args, self.ctx.settings, driver,
                             self._target, initial=False)
        connect = self._inner_connect
        if connect is None:
            return driver.connect(self._target, args)
        return connect(ctx)

    def host_availability_changed(self, up: bool) -> None:
        """Mark this connection's host down (or up) in the cluster's topology monitor, through
        the ``failover`` plugin of this connection when there is one."""
        ref = self.ctx.extra.get("failover")
        failover = ref() if callable(ref) else None
        mark = getattr(failover, "mark_host", None)
        if mark is not None:
            mark(self._host, up)

    def __repr__(self) -> str:
        where = self.monitor.address if self.monitor is not None else "-"
        return (f"<EfmPlugin host={where} grace={self.grace:g} interval={self.interval:g} "
                f"count={self.count}>")
