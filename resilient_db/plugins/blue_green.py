"""``blue_green`` (AWS code ``bg``): ride through an RDS blue/green switchover.

One process-wide status monitor per deployment (``bg_id``; :mod:`resilient_db.blue_green`)
reads the metadata RDS publishes; every connection that selected the plugin acts on its
:class:`~resilient_db.blue_green.Status`, phase by phase, as the AWS wrapper does:

- ``CREATED`` (deployment exists): nothing changes.
- ``PREPARATION``: new connections to a blue host name go to the blue instance's address as
  resolved before the switchover (the name is kept for TLS and IAM), whatever DNS says next.
- ``IN_PROGRESS``: statements on connections to either side, and new connections to green
  names or to addresses of either side, are held back until the phase ends (at most
  ``bg_connect_timeout_ms``, then :class:`~resilient_db.SwitchoverError`); new connections to
  blue names go to the blue address (held too with ``bg_suspend_new_blue_connections``).
- ``POST`` (and ``COMPLETED`` until DNS caught up): new connections to a blue name go to the
  green counterpart's address, keeping the name; connections to green names are refused
  (``SwitchoverError``): RDS deletes those names.
- ``COMPLETED``, or ``bg_switchover_timeout_ms`` after the start: DNS as is.

Beyond the AWS wrapper: RDS ends every session during the switchover, and a connection still
on the old blue instance could only fail. So a held statement on a connection to the blue side
is moved to the green counterpart before it is sent (the statement was never sent: moving it
is safe), and a statement that failed on the blue side because of the switchover (session
ended, instance read-only) is handled like a failover: the connection is moved to green, and
the statement runs again there when it is known not to have been applied (a read-only refusal
outside a transaction, or marked ``idempotent``); otherwise ``FailoverSuccessError`` (statement
possibly applied) or ``TransactionResolutionUnknownError`` (a transaction was open).

Cost: the plugin is dormant (out of every chain) while no switchover concerns the connection;
the monitor rebuilds its connections' chains when the phase changes.

Decisions: ``blue_green.phase_changed`` (monitor), ``blue_green.connect_routed`` (substituted
address), ``blue_green.rejected``, ``blue_green.suspended`` / ``blue_green.resumed`` (a connect or
statement held, and for how long), ``blue_green.moved`` (a connection moved from blue to green),
``blue_green.timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from typing import Any

from .. import blue_green as bg
from .._options import current_options
from .._params import (
    BG_CONNECT_TIMEOUT,
    BG_ID,
    BG_INTERVAL_BASELINE,
    BG_INTERVAL_HIGH,
    BG_INTERVAL_INCREASED,
    BG_SUSPEND_NEW_BLUE_CONNECTIONS,
    BG_SWITCHOVER_TIMEOUT,
    MONITOR_DISPOSAL_TIME,
)
from .._pipeline import (
    DEFER_FAILOVER,
    STATEMENT_OPS,
    Call,
    ConnectContext,
    ConnectHandler,
    ConnectionChanged,
    Handler,
    Op,
    Plugin,
    PluginContext,
)
from ..blue_green import Action, Phase, Side, Status
from ..errors import (
    Error,
    FailoverSuccessError,
    SwitchoverError,
    TransactionResolutionUnknownError,
)

__all__ = ["BlueGreenPlugin"]

log = logging.getLogger("resilient_db.plugins.blue_green")

#: Connect arguments that would bypass the address chosen.
_ADDRESS_ARGS = ("hostaddr", "unix_socket")
#: Application name of the monitor's connection (PostgreSQL shows it in pg_stat_activity).
MONITOR_APPLICATION_NAME = "resilient_db-blue-green"


class BlueGreenPlugin(Plugin):
    """See the module docstring."""

    code = "blue_green"
    # CURSOR: mysql-connector's cursor() checks the connection (a session the switchover
    # ended fails there first).
    intercepts = STATEMENT_OPS | frozenset({Op.COMMIT, Op.ROLLBACK, Op.CURSOR})

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        self.bg_id: str = (settings[BG_ID] or "1").strip().lower()
        self.connect_timeout: float = settings[BG_CONNECT_TIMEOUT] or 30.0
        self.switchover_timeout: float = settings[BG_SWITCHOVER_TIMEOUT] or 180.0
        self.intervals = bg.Intervals(settings[BG_INTERVAL_BASELINE] or 60.0,
                                      settings[BG_INTERVAL_INCREASED] or 1.0,
                                      settings[BG_INTERVAL_HIGH] or 0.1)
        self.suspend_blue: bool = settings[BG_SUSPEND_NEW_BLUE_CONNECTIONS]
        disposal = settings[MONITOR_DISPOSAL_TIME]
        self.disposal: float = 60.0 if disposal is None else disposal
        self._lock = threading.Lock()
        self._monitor: bg.BlueGreenMonitor | None = None
        self._closed = False
        self._inner_connect: ConnectHandler | None = None
        self._args: dict[str, Any] = {}
        self._target: Any = None
        self._host = ctx.host
        #: The address the physical connection reached (``None``: unknown).
        self.address: str | None = None
        #: The status last used to classify the connection, and the side found then.
        self._seen: Status | None = None
        self._side: Side | None = None
        #: Whether the connection must be looked at before its next statement.
        self._act = False
        #: The physical connection changed without this plugin's connect hook.
        self._address_stale = False
        #: The initial connect is done (until then the plugin must stay in the chains).
        self._connected = False
        #: Connections moved from blue to green, connects held back (diagnostics, tests).
        self.moved = 0
        self.held = 0
        # failover (inside this plugin) leaves errors a switchover explains to this plugin;
        # weak: a cycle would outlive `del conn`.
        ctx.extra[DEFER_FAILOVER] = weakref.WeakMethod(self.handles_error)

    # --- connect phase -------------------------------------------------------------------------
    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        if ctx.initial:
            self._inner_connect = proceed
            self._args = dict(ctx.args)
            self._target = ctx.target
            self._host = ctx.host
        monitor = self._attach()
        status = monitor.status if monitor is not None else bg.UNKNOWN
        started = time.monotonic()
        deadline = started + self.connect_timeout
        held = False
        while True:
            route = bg.connect_route(status, ctx.host.host, suspend_blue=self.suspend_blue)
            if route.action is not Action.SUSPEND or monitor is None:
                break
            if not held:
                held = True
                self.held += 1
                self._decide("blue_green.suspended", status, ctx.host.host,
                             what="connect", reason=route.reason)
            left = deadline - time.monotonic()
            if left <= 0:
                self._timeout(status, ctx.host.host, "connect", started)
            status = monitor.wait_change(status, min(left, 1.0))
        if held:
            self._decide("blue_green.resumed", status, ctx.host.host, what="connect",
                         waited=time.monotonic() - started)
        if route.action is Action.REJECT:
            self._decide("blue_green.rejected", status, ctx.host.host, reason=route.reason)
            raise ctx.driver.error(
                SwitchoverError,
                f"blue/green switchover ({status.phase.name}): connections to green host "
                f"{ctx.host.host} are refused: {route.reason}",
                host=ctx.host.host, phase=status.phase.name)
        if route.action is Action.SUBSTITUTE and route.address is not None:
            raw = proceed(_substituted(ctx, route.address))
            self._decide("blue_green.connect_routed", status, ctx.host.host,
                         reason=route.reason,
                         extra={"network.peer.address": route.address,
                                "resilient_db.blue_green.counterpart": route.counterpart or ""})
            log.info("blue/green %s: %s connects to %s (%s)", status.phase.name,
                     ctx.host.host, route.address, route.reason)
            self._note_address(raw, route.address)
            self._after_initial(ctx)
            return raw
        raw = proceed(ctx)
        self._note_address(raw, None)
        self._after_initial(ctx)
        return raw

    def _after_initial(self, ctx: ConnectContext) -> None:
        if ctx.initial and not self._connected:
            self._connected = True
            self.ctx.rebuild()  # dormant from now on while no switchover concerns it

    def dormant(self) -> bool:
        """Out of every chain (free per statement) while no deployment or switchover
        concerns this connection: the monitor wakes it (``status_changed``) when that
        changes. Never before the initial connect, whose hook attaches the monitor."""
        monitor = self._monitor
        if monitor is None or not self._connected:
            return False
        status = monitor.status
        if status is not self._seen:
            self._classify(status)
        return status.quiet and not self._act

    def status_changed(self) -> None:
        """Called by the monitor (its thread) when the deployment's status changed."""
        self.ctx.rebuild()

    def _note_address(self, raw: Any, address: str | None) -> None:
        if address is None:
            address = _peer_address(self.ctx.driver, raw)
        self.address = address
        self._seen = None  # classify again before the next statement

    def on_connection_changed(self, event: ConnectionChanged) -> None:
        if event.reason == "close":
            self._release()
        elif event.reason != "blue_green":
            # Replaced by another plugin (failover) through its own connect: where the new
            # connection went is read from it before the next statement.
            self._address_stale = True
            self._seen = None

    def _attach(self) -> bg.BlueGreenMonitor | None:
        with self._lock:
            if self._closed:
                return None
            monitor = self._monitor
        if monitor is not None and not monitor.stopped:
            return monitor
        driver = self.ctx.driver
        key = (driver.code, self.bg_id)

        def create() -> bg.BlueGreenMonitor:
            return bg.BlueGreenMonitor(key, self.bg_id, driver, intervals=self.intervals,
                                       switchover_timeout=self.switchover_timeout,
                                       disposal=self.disposal)

        while True:
            monitor = bg.monitor_for(key, create)
            if monitor.attach(self, intervals=self.intervals,
                              switchover_timeout=self.switchover_timeout,
                              disposal=self.disposal):
                break
        with self._lock:
            if self._closed:
                monitor.detach(self)
                return None
            self._monitor = monitor
        return monitor

    def _release(self) -> None:
        with self._lock:
            self._closed = True
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.detach(self)

    def open_monitoring_connection(self, timeout: float) -> Any:
        """An autocommit connection to the host the application connected to, through this
        connection's inner connect chain (credentials plugins apply)."""
        driver = self.ctx.driver
        args = dict(self._args)
        for name in _ADDRESS_ARGS:
            args.pop(name, None)
        args["host"] = self._host.host
        if self._host.port is not None:
            args["port"] = self._host.port
        args["autocommit"] = True
        whole = max(2, int(-(-timeout // 1)))
        if driver.code == "psycopg":
            args["connect_timeout"] = whole
            args["application_name"] = MONITOR_APPLICATION_NAME
        else:
            args.pop("connect_timeout", None)
            args["connection_timeout"] = whole
        ctx = ConnectContext(self._host, args, self.ctx.settings, driver, self._target,
                             initial=False)
        connect = self._inner_connect
        if connect is None:
            return driver.connect(self._target, args, self.ctx.settings)
        return connect(ctx)

    def handles_error(self, exc: BaseException) -> bool:
        """Whether this plugin handles ``exc`` itself (``failover`` then leaves it alone): a
        lost session or a read-only refusal on a connection to either side while a
        switchover is underway (``PREPARATION`` to ``POST``, or ``COMPLETED`` while DNS
        catches up)."""
        monitor = self._monitor
        if monitor is None:
            return False
        status = monitor.status
        if status.routing_phase not in (Phase.PREPARATION, Phase.IN_PROGRESS, Phase.POST):
            return False
        if status is not self._seen:
            self._classify(status)
        if self._side is None:
            return False
        driver = self.ctx.driver
        return driver.is_disconnect(exc) or driver.is_read_only_error(exc)

    # --- execute phase -------------------------------------------------------------------------
    def wrap_execute(self, proceed: Handler) -> Handler:
        def handler(call: Call) -> Any:
            monitor = self._monitor
            if monitor is None:
                return proceed(call)
            status = monitor.status
            if status is not self._seen:
                if self._address_stale:
                    self._address_stale = False
                    self.address = _peer_address(self.ctx.driver, call.raw)
                self._classify(status)
            if not self._act:
                return proceed(call)
            return self._during_switchover(call, proceed, monitor)

        inner = getattr(proceed, "statement", None)
        if inner is None:
            return handler

        def statement(cursor: Any, raw_cursor: Any, query: Any, params: Any) -> Any:
            # Keeps the inner layers' statement shortcut (Chains.statement: no call object
            # per statement) while no switchover needs this layer.
            monitor = self._monitor
            if monitor is not None and (monitor.status is not self._seen or self._act):
                return handler(Call(Op.EXECUTE, "Cursor.execute", raw_cursor.execute,
                                    (query, params), {}, cursor._conn, cursor._raw_conn))
            return inner(cursor, raw_cursor, query, params)

        handler.statement = statement  # type: ignore[attr-defined]
        return handler

    def _classify(self, status: Status) -> None:
        """Which side the connection is on, and whether its statements need attention now
        (cheap; once per status change)."""
        self._seen = status
        deployment = status.deployment
        side = None
        if deployment is not None:
            side = deployment.side_of(self.address) if self.address else None
            if side is None:
                side = deployment.side_of(self._host.host)
        self._side = side
        phase = status.routing_phase
        self._act = side is not None and (
            phase is Phase.IN_PROGRESS
            or (side is Side.BLUE and phase >= Phase.PREPARATION and self._on_blue(status)))

    def _on_blue(self, status: Status) -> bool:
        """Whether the physical connection is on a blue instance (by the address it
        reached: the names themselves move)."""
        deployment = status.deployment
        if deployment is None or self.address is None:
            return False
        return any(self.address in deployment.addresses.get(name, ())
                   for name in deployment.blue)

    def _during_switchover(self, call: Call, proceed: Handler,
                           monitor: bg.BlueGreenMonitor) -> Any:
        status = self._hold(monitor, monitor.status, call.method)
        if (status.routing_phase >= Phase.POST and self._on_blue(status)
                and not self._in_transaction(call.raw)):
            # (In a transaction: its session is gone or going; the call fails below.)
            call = self._move(call, status, "held statement not sent yet")
        snapshot = self._tx_snapshot(call.raw)
        try:
            return proceed(call)
        except Error:
            raise
        except Exception as exc:
            driver = self.ctx.driver
            if not (driver.is_disconnect(exc) or driver.is_read_only_error(exc)):
                raise
            if not self._on_blue(monitor.status) and monitor.status.phase < Phase.PREPARATION:
                raise
            return self._recover(call, proceed, monitor, exc, snapshot)

    def _hold(self, monitor: bg.BlueGreenMonitor, status: Status, what: str) -> Status:
        """Wait while the switchover is ``IN_PROGRESS`` (bounded); the status after."""
        if not bg.holds_statements(status, self._side):
            return status
        started = time.monotonic()
        deadline = started + self.connect_timeout
        host = self._host.host
        self._decide("blue_green.suspended", status, host, what=what, reason="switchover "
                     "in progress")
        while bg.holds_statements(status, self._side):
            left = deadline - time.monotonic()
            if left <= 0:
                self._timeout(status, host, what, started)
            status = monitor.wait_change(status, min(left, 1.0))
        self._decide("blue_green.resumed", status, host, what=what,
                     waited=time.monotonic() - started)
        return status

    def _recover(self, call: Call, proceed: Handler, monitor: bg.BlueGreenMonitor,
                 exc: Exception, snapshot: Any) -> Any:
        """A statement on the blue side failed the way a switchover makes it fail: wait for
        the names to move, move the connection to green, then retry or report."""
        driver = self.ctx.driver
        in_transaction = driver.was_in_transaction(call.raw, snapshot)
        refused = driver.is_read_only_error(exc)
        monitor.poke()
        started = time.monotonic()
        deadline = started + self.connect_timeout
        status = monitor.status
        host = self._host.host
        self._decide("blue_green.suspended", status, host, what=call.method,
                     reason=f"statement failed on blue: {type(exc).__name__}")
        while status.routing_phase < Phase.POST and not status.timed_out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise exc
            status = monitor.wait_change(status, min(left, 1.0))
        self._decide("blue_green.resumed", status, host, what=call.method,
                     waited=time.monotonic() - started)
        if not self._on_blue(status):
            raise exc
        moved = self._move(call, status, f"statement failed on blue: {type(exc).__name__}")
        if in_transaction:
            raise driver.error(
                TransactionResolutionUnknownError,
                f"blue/green switchover: the transaction open on {host} was ended by the "
                "switchover; the connection now points at the green instance",
                host=host, failed_host=host, statement_sent=True) from exc
        idempotent = bool(current_options().idempotent) or call.op is Op.CURSOR
        if refused or idempotent:
            return proceed(moved)
        raise driver.error(
            FailoverSuccessError,
            f"blue/green switchover: the connection to {host} was ended by the switchover "
            "and now points at the green instance; the statement may have been applied",
            host=host, failed_host=host, statement_sent=True) from exc

    def _move(self, call: Call, status: Status, why: str) -> Call:
        """Replace the physical connection with one to the green counterpart (its address,
        the application's host name kept); the call re-aimed at it."""
        route = bg.connect_route(status, self._host.host, suspend_blue=False)
        host = self._host
        args = dict(self._args)
        ctx = ConnectContext(host, args, self.ctx.settings, self.ctx.driver, self._target,
                             initial=False)
        if route.action is Action.SUBSTITUTE and route.address is not None:
            ctx = _substituted(ctx, route.address)
        connect = self._inner_connect
        if connect is None:
            raise self.ctx.driver.error(
                SwitchoverError, "blue/green: the connection cannot be reopened",
                host=host.host, phase=status.phase.name)
        raw = connect(ctx)
        old: Any = call.raw
        resilient = call.connection.resilient
        resilient.replace_raw(raw, host, "blue_green")
        with contextlib.suppress(Exception):
            old.close()
        self._note_address(raw, route.address if route.action is Action.SUBSTITUTE else None)
        self._classify(status)
        self.ctx.rebuild()  # dormant again once on green and the switchover is over
        self.moved += 1
        self._decide("blue_green.moved", status, host.host, reason=why,
                     extra={"network.peer.address": self.address or ""})
        log.info("blue/green %s: connection to %s moved to %s (%s)", status.phase.name,
                 host.host, self.address, why)
        retargeted = resilient.retarget(call)
        return retargeted if retargeted is not None else call

    def _in_transaction(self, raw: Any) -> bool:
        from ..drivers.base import TxStatus

        try:
            return self.ctx.driver.transaction_status(raw) is not TxStatus.IDLE
        except Exception:
            return True

    def _tx_snapshot(self, raw: Any) -> Any:
        try:
            return self.ctx.driver.tx_snapshot(raw)
        except Exception:
            return None

    # --- decisions -----------------------------------------------------------------------------
    def _timeout(self, status: Status, host: str, what: str, started: float) -> None:
        waited = time.monotonic() - started
        self._decide("blue_green.timeout", status, host, what=what, waited=waited)
        raise self.ctx.driver.error(
            SwitchoverError,
            f"blue/green switchover still {status.phase.name} after {waited:.1f} s: {what} on "
            f"{host} not sent (bg_connect_timeout_ms={self.connect_timeout * 1000:g}); "
            "retry later",
            host=host, phase=status.phase.name, waited=waited)

    def _decide(self, kind: str, status: Status, host: str, *, what: str = "",
                reason: str = "", waited: float | None = None,
                extra: dict[str, Any] | None = None) -> None:
        attributes: dict[str, Any] = {
            "server.address": host,
            "resilient_db.blue_green.id": self.bg_id,
            "resilient_db.blue_green.phase": status.phase.name,
        }
        if what:
            attributes["resilient_db.blue_green.call"] = what
        if reason:
            attributes["resilient_db.blue_green.reason"] = reason
        if waited is not None:
            attributes["resilient_db.blue_green.waited"] = waited
        if extra:
            attributes.update(extra)
        self.ctx.decide(kind, self.code, **attributes)

    def __repr__(self) -> str:
        return f"<BlueGreenPlugin {self.bg_id} side={self._side} address={self.address}>"


def _substituted(ctx: ConnectContext, address: str) -> ConnectContext:
    """``ctx`` sent to ``address`` with the host name kept where the driver allows: libpq's
    ``hostaddr`` (TLS and the IAM token still use the name); mysql-connector connects to the
    address (its ``server_hostname`` check, when enabled, would need the name: documented)."""
    args = dict(ctx.args)
    for name in _ADDRESS_ARGS:
        args.pop(name, None)
    if ctx.driver.code == "psycopg":
        args["host"] = ctx.host.host
        args["hostaddr"] = address
    else:
        args["host"] = address
    if ctx.host.port is not None:
        args["port"] = ctx.host.port
    return ConnectContext(ctx.host, args, ctx.settings, ctx.driver, ctx.target,
                          initial=ctx.initial)


def _peer_address(driver: Any, raw: Any) -> str | None:
    try:
        sock = driver.socket_of(raw)
    except Exception:
        return None
    if sock is None:
        return None
    try:
        peer = sock.getpeername()
        return str(peer[0]) if isinstance(peer, tuple) else None
    except OSError:
        return None
    finally:
        sock.close()


