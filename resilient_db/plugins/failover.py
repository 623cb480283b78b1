"""``failover``: when the instance behind a connection fails, move the connection to the new
writer (or a reader) as soon as the cluster has one, without waiting for DNS.

What it intercepts: statements (execute, executemany, callproc, copy), commit, rollback,
transaction blocks, opening a cursor and setting a session attribute (mysql-connector pings
the server in ``cursor()`` and sends a ``SET`` for ``autocommit``: a cursor opened, or a
session attribute set, on a lost connection with no transaction open is simply opened or set
on the new connection, without an error). The no-failure path is a ``try`` around the rest
of the chain (plus, on psycopg, reading the transaction status libpq already holds: after a
lost connection it no longer tells). Fetches are not intercepted: a connection lost while
reading rows fails over at the next statement.

Triggers (CONVENTIONS.md): a network error (``DriverDialect.is_disconnect``); in
``strict_writer`` mode also a read-only error, but only once a role check on that connection's
instance confirms it is no longer the writer (:func:`~resilient_db.topology.confirmed_role`):
a user's ``BEGIN READ ONLY`` on a healthy writer re-raises the driver's error untouched.

Failing over: the cluster's shared :class:`~resilient_db.topology.TopologyMonitor` searches
for a writer that confirms its role on its own connection; the plugin connects to that
instance's own address (never through the cluster endpoint's DNS) through the connection's
connect chain (credentials plugins apply), verifies the role, swaps the physical connection
(``conn.resilient.replace_raw``: session state restored, cursors rebound lazily), runs the
``on_connect`` hook, and raises the outcome as the driver-flavoured error
(:func:`~resilient_db.failover_core.classify_outcome`):

- ``FailoverSuccessError``: no transaction was open; retry the statement if safe;
- ``TransactionResolutionUnknownError``: a transaction was open; its fate is unknown;
- ``FailoverFailedError``: nothing usable within ``failover_timeout_sec``; ``attempts``.

Inside ``with resilient_db.call_options(idempotent=True):`` a statement interrupted outside a
transaction is run once on the new connection instead (transparent retry).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import threading
import time
import weakref
from collections.abc import Generator
from typing import Any, Final

from .. import _pools, response_time, topology
from .._decisions import decision_span, get_decision_sink
from .._flows import Rows, run_sync
from .._options import current_options
from .._params import (
    CLUSTER_ID,
    CLUSTER_INSTANCE_HOST_PATTERN,
    CONNECT_TIMEOUT,
    ENABLE_FAILOVER,
    FAILOVER_HOST_COOLDOWN,
    FAILOVER_MODE,
    FAILOVER_READER_CONNECT_TIMEOUT,
    FAILOVER_READER_HOST_SELECTOR_STRATEGY,
    FAILOVER_TIMEOUT,
    FAILOVER_WRITER_RECONNECT_INTERVAL,
    GLOBAL_CLUSTER_INSTANCE_HOST_PATTERNS,
    MAX_REPLICA_LAG,
    MONITOR_DISPOSAL_TIME,
    ON_CONNECT,
    TOPOLOGY_HIGH_REFRESH,
    TOPOLOGY_PROBE_TIMEOUT,
    TOPOLOGY_REFRESH,
)
from .._pipeline import (
    DEFER_FAILOVER,
    RERAISE,
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
    guarded_execute,
)
from ..dialects import cached_detect, get_dialect, global_variant
from ..dialects.base import DatabaseDialect
from ..drivers.base import TxStatus
from ..errors import (
    ConnectAttempt,
    Error,
    FailoverFailedError,
    FailoverSuccessError,
    QueryTimeoutError,
)
from ..failover_core import (
    Attempt,
    FailoverMode,
    FailoverPlan,
    Outcome,
    RetrySchedule,
    SelfReport,
    classify_outcome,
    default_mode,
    plan_attempts,
    read_only_triggers_failover,
)
from ..global_db import parse_region_patterns
from ..hosts import Host, Role, TopologySnapshot, allowed_only
from ..rds import HostPattern, classify, cluster_identity, instance_host_pattern
from ..selection import configured, selection_context
from ..telemetry.context import suppress_instrumentation
from ..topology import (
    Addressing,
    TopologyMonitor,
    confirmed_role,
    read_self_report,
    self_report_flow,
)
from ..watchdog import Armed, abort_after

__all__ = ["FailoverPlugin"]

log = logging.getLogger("resilient_db.plugins.failover")

#: :meth:`FailoverPlugin.trigger_of`: a read-only error that fails over only after a role check.
CHECK_ROLE: Final = "check-role"
_COMMIT = Op.COMMIT
_ROLLBACK = Op.ROLLBACK
_TRANSACTION = Op.TRANSACTION
#: Calls that send no statement and change nothing but the lost session: always safe to redo
#: on the new connection (opening a cursor, setting autocommit or another session attribute).
_REDOABLE = frozenset({Op.CURSOR, Op.SESSION})
#: psycopg's libpq transaction status values that mean "inside a transaction" (INTRANS,
#: INERROR); IDLE is 0, ACTIVE 1, UNKNOWN 4.
#: Connect arguments that would bypass the address failover chose.
_ADDRESS_ARGS = ("hostaddr", "unix_socket")


class _NoConnectionError(Exception):
    """Internal: the failover budget ran out."""

    def __init__(self, attempts: list[ConnectAttempt]) -> None:
        super().__init__("no usable connection")
        self.attempts = attempts


def _connect_timeout_args(driver_code: str, args: dict[str, Any], seconds: float) -> None:
    """Bound connecting (and, for monitoring, reading) by ``seconds``, in the driver's own
    argument names and units."""
    whole = max(1, int(-(-seconds // 1)))  # ceil; both drivers take whole seconds
    if driver_code == "psycopg":
        args["connect_timeout"] = whole
    else:
        args.pop("connect_timeout", None)
        args["connection_timeout"] = whole


@dataclasses.dataclass(frozen=True)
class PlanStep:
    """:meth:`FailoverPlugin.reconnect_flow` asks for the plan of the next round: the hosts
    to try, with a writer verified after ``since``, waiting up to ``remaining`` seconds."""

    since: float
    remaining: float | None


@dataclasses.dataclass(frozen=True)
class TryStep:
    """Try ``attempt`` within ``remaining`` seconds; answer whether it was installed."""

    attempt: Attempt
    remaining: float | None


@dataclasses.dataclass(frozen=True)
class SleepStep:
    """Pause ``delay`` seconds before the next round."""

    delay: float


class FailoverPlugin(Plugin):
    """See the module docstring. ``instance_id``/``role``: the instance the connection is on
    now and the role it confirmed (``None``/``UNKNOWN`` until known); ``epoch``: the topology
    epoch it was opened under (``stale`` once the writer changed since); ``failovers``: how
    many times this connection failed over."""

    code = "failover"
    single_host = True  # finds the cluster's instances itself
    intercepts = STATEMENT_OPS | {Op.COMMIT, Op.ROLLBACK, Op.TRANSACTION, Op.CURSOR,
                                  Op.SESSION}

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        self.enabled = settings[ENABLE_FAILOVER]
        self.refresh_interval: float = settings[TOPOLOGY_REFRESH] or 30.0
        self.high_refresh_interval: float = settings[TOPOLOGY_HIGH_REFRESH] or 0.1
        self.probe_timeout: float = settings[TOPOLOGY_PROBE_TIMEOUT] or 2.0
        self.disposal_time: float = settings[MONITOR_DISPOSAL_TIME] or 60.0
        self.timeout = settings[FAILOVER_TIMEOUT]
        self.connect_timeout: float = settings[FAILOVER_READER_CONNECT_TIMEOUT] or 30.0
        self.reconnect_interval: float = settings[FAILOVER_WRITER_RECONNECT_INTERVAL] or 2.0
        self.strategy, self.weights = configured(
            settings[FAILOVER_READER_HOST_SELECTOR_STRATEGY] or "random", settings,
            parameter=FAILOVER_READER_HOST_SELECTOR_STRATEGY.name, plugins=ctx.plugins)
        self.max_lag = settings[MAX_REPLICA_LAG]
        self.cooldown = settings[FAILOVER_HOST_COOLDOWN] or 0.0
        self.on_connect = settings[ON_CONNECT]
        self.endpoint = classify(ctx.host.host)
        mode = settings[FAILOVER_MODE]
        self.mode = FailoverMode.parse(mode) if mode else default_mode(self.endpoint.kind)
        patterns = settings[GLOBAL_CLUSTER_INSTANCE_HOST_PATTERNS]
        #: Aurora Global Database: each region's instance host pattern (empty: one region).
        self.region_patterns: tuple[tuple[str, HostPattern], ...] = (
            parse_region_patterns(patterns) if patterns else ())
        #: Read the global topology (every region) instead of the regional one: with
        #: ``global_cluster_instance_host_patterns``, or for the gdb_* plugins.
        self.global_topology = bool(self.region_patterns) or self.code == "gdb_failover" or (
            "gdb_rw" in ctx.plugins)

        self.instance_id: str | None = None
        self.role = Role.UNKNOWN
        self.epoch = 0
        self.failovers = 0
        self._psycopg = ctx.driver.code == "psycopg"
        self._tx_before: Any = None  # the driver's tx_snapshot before the current call
        self._swaps = 0
        self._lock = threading.RLock()
        self._rng = random.Random()
        self._pending_raw: Any = None
        self._inner_connect: ConnectHandler | None = None
        self._args: dict[str, Any] = {}
        self._target: Any = None
        self._monitor: TopologyMonitor | None = None
        self._monitor_key: tuple[str, tuple[Any, ...]] | None = None
        self._dialect: DatabaseDialect | None = None
        self._addressing: Addressing | None = None
        # Found by plugins of the same connection (the connection tracker, efm's mark_host);
        # weak: a cycle would outlive `del conn`.
        ctx.extra["failover"] = weakref.ref(self)

    def dormant(self) -> bool:
        return not self.enabled

    # --- connect phase -------------------------------------------------------------------------
    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        raw = proceed(ctx)
        if not ctx.initial:
            return raw  # failover and monitoring connections: the caller verifies them
        self._inner_connect = proceed
        self._args = dict(ctx.args)
        self._target = ctx.target
        if self.on_connect is not None:
            try:
                self.on_connect(raw)
            except BaseException:
                with contextlib.suppress(Exception):
                    raw.close()
                raise
        # The topology is read once the connection is complete (the dialect may be forced and
        # verified after this hook): see on_connection_changed.
        self._pending_raw = raw
        return raw

    def adopt(self, args: dict[str, Any], target: Any) -> None:
        """For a front that opens the application's connections itself (``connect_async``):
        the driver arguments and the blocking ``target`` that side connections (topology
        monitor, role checks) use, as the connect hook would have recorded them."""
        self._args = dict(args)
        self._target = target

    def on_connection_changed(self, event: ConnectionChanged) -> None:
        raw, self._pending_raw = self._pending_raw, None
        if event.reason == "close":
            if self._monitor is not None:
                self._monitor.unsubscribe(self)
            return
        if event.reason != "connect" or raw is None:
            return
        try:
            # Internal statements: not the application's. Part of connecting, so bounded like
            # the connect (connect_timeout, else failover's): neither driver bounds a read by
            # default, and an instance that stops answering now must not hang connect().
            driver = self.ctx.driver
            bound = self.ctx.settings[CONNECT_TIMEOUT] or self.connect_timeout
            with suppress_instrumentation(), abort_after(bound, lambda: driver.abort(raw)):
                self._attach(raw, event.new_host or self.ctx.host)
        except Exception as exc:
            if self.ctx.driver.is_disconnect(exc):
                log.info("connection lost while reading the topology; failover will handle it")
            else:
                log.warning("cannot read the cluster topology (%s); failover will reconnect to "
                            "%s only", exc, self.ctx.host, exc_info=log.isEnabledFor(logging.DEBUG))

    def _attach(self, raw: Any, host: HostSpec) -> None:
        """Find (or start) the cluster's monitor and learn which instance this is."""
        ctx = self.ctx
        driver = ctx.driver
        dialect = ctx.extra.get("dialect")
        if not isinstance(dialect, DatabaseDialect):
            dialect = cached_detect((driver.code, host.host, host.port), driver, raw)
            ctx.extra["dialect"] = dialect
        run_sync(self.attach_flow(host, dialect), lambda sql: driver.query(raw, sql))

    def attach_flow(self, host: HostSpec, dialect: DatabaseDialect) -> Generator[str, Rows, None]:
        """:meth:`_attach` after the dialect is known, as an I/O-free flow over the
        connection (:mod:`resilient_db._flows`): the sync and asyncio fronts share it."""
        ctx = self.ctx
        driver = ctx.driver
        port = host.port if host.port is not None else driver.default_port
        addressing = Addressing.for_host(host.host, port,
                                         ctx.settings[CLUSTER_INSTANCE_HOST_PATTERN])
        if self.global_topology:
            dialect, addressing = self._global(dialect, host.host, addressing)
        self._dialect = dialect
        self._addressing = addressing
        seed = Host(host.host, port)
        cluster_id = ctx.settings[CLUSTER_ID]
        endpoint = topology.endpoint_key(driver.code, dialect.code, host.host, port, cluster_id)
        monitor = topology.known_monitor(endpoint)
        if monitor is None:
            with suppress_instrumentation():
                report = yield from self_report_flow(dialect, seed, addressing)
                server = yield from topology.server_identity_flow(driver, dialect, report)
            identity = cluster_identity(host.host, port, cluster_id=cluster_id,
                                        server_identity=server)
            key = f"{dialect.code}|{identity.value}"
            monitor = self._register(key, endpoint)
            monitor.offer(report)
        else:
            with suppress_instrumentation():
                report = yield from self_report_flow(dialect, seed, addressing,
                                                     with_topology=False)
            self._monitor_key = (monitor.key, endpoint)
            self._monitor = monitor
        monitor.subscribe(self, seed)
        self._learn(report, monitor)
        snapshot = monitor.snapshot
        if snapshot is not None:
            # Response times measured from now on, so that they exist before a failover
            # needs them (fastest_response_strategy; nothing without it).
            response_time.measure(ctx, snapshot.hosts)

    def _global(self, dialect: DatabaseDialect, host: str,
                addressing: Addressing) -> tuple[DatabaseDialect, Addressing]:
        """The global topology's dialect and addressing (each region's pattern; without
        ``global_cluster_instance_host_patterns``, the pattern of the region connected to)."""
        variant = global_variant(dialect)
        if variant is None:
            log.warning("%s: the server is %s, not Aurora: no Global Database topology; "
                        "failing over within the cluster connected to", self.code,
                        dialect.description)
            return dialect, addressing
        regions = self.region_patterns
        if not regions:
            endpoint = classify(host)
            derived = instance_host_pattern(endpoint)
            if endpoint.region and derived:
                regions = ((endpoint.region, HostPattern.parse(derived)),)
        if not regions:
            log.warning("%s: global_cluster_instance_host_patterns is not set and %s names no "
                        "region: no instance of the global topology can be reached; failing "
                        "over within the cluster connected to", self.code, host)
            return dialect, addressing
        return variant, dataclasses.replace(addressing, regions=regions)

    def _register(self, key: str, endpoint: tuple[Any, ...]) -> TopologyMonitor:
        driver, dialect, addressing = self.ctx.driver, self._dialect, self._addressing
        assert dialect is not None and addressing is not None
        cooldown = self.cooldown

        def create() -> TopologyMonitor:
            return TopologyMonitor(key, driver, dialect, addressing, cooldown=cooldown)

        monitor = topology.monitor_for(key, create, endpoint)
        self._monitor_key = (key, endpoint)
        self._monitor = monitor
        return monitor

    def _learn(self, report: SelfReport, monitor: TopologyMonitor) -> None:
        self.instance_id = report.instance_id
        self.role = (Role.UNKNOWN if report.is_reader is None
                     else Role.READER if report.is_reader else Role.WRITER)
        self.epoch = monitor.epoch

    def follow(self, *, instance_id: str | None, role: Role, mode: FailoverMode) -> None:
        """For read/write splitting: the connection moved to another instance (``instance_id``
        of ``role``), and failing over from it now means ``mode`` (a reader mode while
        ``read_only`` keeps it on a reader, the configured mode on the writer)."""
        with self._lock:
            self.instance_id = instance_id
            self.role = role
            self.mode = mode
            monitor = self._monitor
            if monitor is not None:
                self.epoch = monitor.epoch

    def monitor(self) -> TopologyMonitor:
        """The cluster's monitor (started again if ``resilient_db.shutdown`` stopped it).
        A connection whose topology could not be read gets a monitor that only knows the
        address it connected to (failover then means reconnecting there)."""
        monitor = self._monitor
        if monitor is not None and not monitor.stopped:
            return monitor
        if self._monitor_key is not None:
            key, endpoint = self._monitor_key
            monitor = self._register(key, endpoint)
        else:
            driver = self.ctx.driver
            family = "pg" if self._psycopg else "mysql"
            self._dialect = self._dialect or get_dialect(family)
            host = self.ctx.host
            port = host.port if host.port is not None else driver.default_port
            self._addressing = self._addressing or Addressing(None, False, port)
            identity = cluster_identity(host.host, port, cluster_id=self.ctx.settings[CLUSTER_ID])
            endpoint = topology.endpoint_key(driver.code, self._dialect.code, host.host, port,
                                              self.ctx.settings[CLUSTER_ID])
            monitor = self._register(f"{self._dialect.code}|{identity.value}", endpoint)
        monitor.subscribe(self, Host(self.ctx.host.host, self._addressing.default_port
                                     if self._addressing else None))
        return monitor

    def mark_host(self, host: HostSpec, up: bool) -> None:
        """For a failure monitor (``efm``): ``host``, this connection's instance, was declared
        dead (``up`` false) or answers again. Kept in the cluster's bad-host memory, which host
        selection and reader failover consult."""
        monitor = self._monitor
        if monitor is None:
            return
        failed = self._failed_host(host, monitor)
        if up:
            monitor.mark_up(failed)
        else:
            monitor.mark_down(failed)

    @property
    def stale(self) -> bool:
        """The writer changed since this connection was opened (topology epoch moved on)."""
        monitor = self._monitor
        return monitor is not None and monitor.epoch != self.epoch

    def open_monitoring_connection(self, host: HostSpec, timeout: float) -> Any:
        """For the topology monitor: an autocommit connection through this connection's inner
        connect chain (credentials plugins apply), with connect and read timeouts."""
        driver = self.ctx.driver
        args = self._address_args(host)
        _connect_timeout_args(driver.code, args, timeout)
        args["autocommit"] = True
        if self._psycopg:
            args["application_name"] = topology.MONITOR_APPLICATION_NAME
            # A read stuck on an unreachable instance fails after the timeout.
            args["tcp_user_timeout"] = int(timeout * 1000)
            args["keepalives"] = 1
            args["keepalives_idle"] = max(1, int(timeout))
            args["keepalives_interval"] = 1
            args["keepalives_count"] = 2
            # Internal SQL is schema-qualified; the session pins search_path too (DESIGN §10).
            options = str(args.get("options") or "")
            args["options"] = f"{options} -c search_path=pg_catalog,pg_temp".strip()
        else:
            args["read_timeout"] = max(1, int(-(-timeout // 1)))
            args["write_timeout"] = args["read_timeout"]
        connect = self._inner_connect
        ctx = ConnectContext(host, args, self.ctx.settings, driver, self._target, initial=False)
        if connect is None:
            return driver.connect(self._target, args)
        return connect(ctx)

    def attempt_args(self, host: HostSpec, timeout: float) -> dict[str, Any]:
        """The driver's connect arguments for a failover try to ``host``."""
        args = self._address_args(host)
        _connect_timeout_args(self.ctx.driver.code, args, timeout)
        return args

    def _address_args(self, host: HostSpec) -> dict[str, Any]:
        args = dict(self._args)
        for name in _ADDRESS_ARGS:
            args.pop(name, None)
        args["host"] = host.host
        if host.port is not None:
            args["port"] = host.port
        return args

    # --- execute phase -------------------------------------------------------------------------
    def wrap_execute(self, proceed: Handler) -> Handler:
        # The no-failure path: a try around the rest of the chain, plus the driver's cheap
        # transaction snapshot (psycopg: the status libpq holds, which it no longer reports
        # once the connection is lost; a C-level getter, no Python frame) when the driver
        # needs one (mysql-connector does not: snapshot is None).
        efm = getattr(proceed, "efm", None)
        if efm is not None:  # efm is next and innermost: one frame for both
            return self._fused_with_efm(efm, proceed)
        return guarded_execute(proceed, self, self.ctx.driver.tx_snapshot_reader(),
                               self._on_error)

    def _fused_with_efm(self, efm: Any, proceed: Handler) -> Handler:
        """This layer and the ``efm`` layer after it (``proceed``, innermost: it calls the
        driver) in one frame: the default plugin set's per-statement path. The same steps in
        the same order as the two layers: failover's snapshot, efm's registration (see
        ``EfmPlugin.wrap_execute``), the driver call, efm's deregistration and explanation,
        then failover's decision. A retry goes through ``proceed``, registered again."""
        on_error = self._on_error
        state = self
        snapshot = self.ctx.driver.tx_snapshot_reader()
        clock = time.monotonic
        grace = efm.grace
        inf = float("inf")

        def handler(call: Call) -> Any:
            raw = call.raw
            if snapshot is not None:
                state._tx_before = snapshot(raw)
            if not efm.attached:
                efm.attach(raw, call.connection._host)
            efm.flight_raw = raw
            efm.due = clock() + grace
            try:
                args = call.args
                if call.kwargs:
                    result = call.fn(*args, **call.kwargs)
                elif len(args) == 2:  # (statement, parameters)
                    result = call.fn(args[0], args[1])
                else:
                    result = call.fn(*args)
            except Exception as exc:
                efm.due = inf
                efm.explain(raw, exc)
                result = on_error(call, exc, proceed)
                if result is RERAISE:
                    raise
                return result
            except BaseException as exc:
                efm.due = inf
                efm.explain(raw, exc)
                raise
            efm.due = inf
            return result

        def statement(cursor: Any, raw_cursor: Any, query: Any, params: Any) -> Any:
            # handler(Call(EXECUTE, "Cursor.execute", raw_cursor.execute, (query, params), {},
            # cursor.connection, its driver connection)), the call built only on an error.
            raw = cursor._raw_conn
            if snapshot is not None:
                state._tx_before = snapshot(raw)
            if not efm.attached:
                efm.attach(raw, cursor._conn._host)
            efm.flight_raw = raw
            efm.due = clock() + grace
            try:
                result = raw_cursor.execute(query, params)
            except Exception as exc:
                efm.due = inf
                efm.explain(raw, exc)
                call = Call(Op.EXECUTE, "Cursor.execute", raw_cursor.execute, (query, params),
                            {}, cursor._conn, raw)
                result = on_error(call, exc, proceed)
                if result is RERAISE:
                    raise
                return result
            except BaseException as exc:
                efm.due = inf
                efm.explain(raw, exc)
                raise
            efm.due = inf
            return result

        def opener(connection: Any, raw: Any) -> Any:
            # handler(Call(CURSOR, "Connection.cursor", raw.cursor, (), {}, connection, raw)),
            # the call built only on an error: ORMs open a cursor per statement.
            if snapshot is not None:
                state._tx_before = snapshot(raw)
            if not efm.attached:
                efm.attach(raw, connection._host)
            efm.flight_raw = raw
            efm.due = clock() + grace
            try:
                result = raw.cursor()
            except Exception as exc:
                efm.due = inf
                efm.explain(raw, exc)
                call = Call(Op.CURSOR, "Connection.cursor", raw.cursor, (), {}, connection, raw)
                result = on_error(call, exc, proceed)
                if result is RERAISE:
                    raise
                return result
            except BaseException as exc:
                efm.due = inf
                efm.explain(raw, exc)
                raise
            efm.due = inf
            return result

        handler.statement = statement  # type: ignore[attr-defined]
        handler.opener = opener  # type: ignore[attr-defined]
        return handler

    def _on_error(self, call: Call, exc: Exception, proceed: Handler, *,
                  retry: bool = True) -> Any:
        """Decide what an error means; returns ``RERAISE`` (the driver's error goes up
        untouched) or the result of a transparent retry, or raises the failover outcome."""
        swaps = self._swaps
        trigger = self.trigger_of(call, exc)
        if trigger == CHECK_ROLE:
            trigger = self._read_only_trigger(call)
        if trigger is None:
            return RERAISE
        return self._fail_over(call, exc, proceed, trigger, swaps, retry)

    def trigger_of(self, call: Call, exc: Exception) -> str | None:
        """What ``exc`` on ``call`` means, without I/O (both fronts): ``"network"`` (fail
        over), :data:`CHECK_ROLE` (a read-only error in writer mode: fail over only if a role
        check confirms the instance is no longer the writer), ``None`` (re-raise it)."""
        if isinstance(exc, QueryTimeoutError):
            # An expired statement deadline is not a dead host (DESIGN §2): never a trigger,
            # even though it is also the driver's OperationalError and may follow a socket
            # the deadline broke itself.
            return None
        if isinstance(exc, Error):
            return None  # resilient_db's own outcome from an inner plugin
        if call.connection._closed_by_us:
            return None  # closed by the application (another thread, mid-call): final
        defer = self.ctx.extra.get(DEFER_FAILOVER)
        hook = defer() if defer is not None else None
        if hook is not None and hook(exc):
            return None  # an outer plugin handles it (blue_green during a switchover)
        driver = self.ctx.driver
        if driver.is_disconnect(exc):
            return "network"
        if self.mode is FailoverMode.STRICT_WRITER and driver.is_read_only_error(exc):
            return CHECK_ROLE
        return None

    def _read_only_trigger(self, call: Call) -> str | None:
        """The role check of CONVENTIONS.md: ``"read-only"`` when the instance is confirmed no
        longer the writer, ``"network"`` when the check found the connection gone, ``None``
        when the error is the application's own (or the role cannot be confirmed)."""
        driver = self.ctx.driver
        proxy = call.connection
        try:
            report = self._role_report(proxy._raw)
        except Exception as exc:
            if driver.is_disconnect(exc):
                return "network"
            log.debug("role check failed: %r", exc)
            report = None
        return self.read_only_verdict(report, proxy._host)

    def read_only_verdict(self, report: SelfReport | None, host: HostSpec) -> str | None:
        """``"read-only"`` when ``report`` (the role check's, ``None``: none) confirms the
        instance is no longer the writer, else ``None``. Recorded as a decision."""
        dialect = self._dialect
        monitor = self._monitor
        verified = monitor.writer if monitor is not None else None
        role = Role.UNKNOWN if report is None else confirmed_role(
            report, has_topology=dialect is not None and dialect.topology_query is not None,
            verified_writer=verified.instance_id if verified is not None else None)
        verdict = read_only_triggers_failover(self.mode, role)
        get_decision_sink().record(verdict.to_decision())
        if not verdict.failover:
            log.debug("read-only error on %s not failed over: %s", host, verdict.reason)
            return None
        return "read-only"

    def _role_report(self, raw: Any) -> SelfReport | None:
        """What the instance of this connection says about itself: asked on the connection
        when it can still run a statement, else on a short connection to its own address."""
        driver = self.ctx.driver
        dialect, addressing = self._dialect, self._addressing
        if dialect is None or addressing is None:
            return None
        status = driver.transaction_status(raw)
        here = Host(self.ctx.host.host, addressing.default_port, instance_id=self.instance_id)
        if status in (TxStatus.IDLE, TxStatus.IN_TRANSACTION):
            # On the application's connection, which may have no read timeout: bounded like
            # the monitor's reads (a broken socket then reads as a network failure).
            with abort_after(self.probe_timeout, lambda: driver.abort(raw)):
                return read_self_report(driver, dialect, raw, here, addressing)
        # PostgreSQL after an error inside a transaction: ask the same instance on the side.
        monitor = self._monitor
        snapshot = monitor.snapshot if monitor is not None else None
        listed = snapshot.by_instance(self.instance_id) if (
            snapshot is not None and self.instance_id) else None
        target = listed or here
        conn = self.open_monitoring_connection(target.spec, self.probe_timeout)
        try:
            report = read_self_report(driver, dialect, conn, target, addressing)
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        if self.instance_id is not None and report.instance_id != self.instance_id:
            return None  # reached another instance: proves nothing about ours
        return report

    def _in_transaction(self, call: Call, raw: Any, tx_before: Any = RERAISE) -> bool:
        """Whether a transaction was open when ``call`` failed (``tx_before``: the driver's
        transaction snapshot before the call; default: the one this plugin's layer took)."""
        op = call.op
        if op is _COMMIT:
            return True
        if op is _ROLLBACK:
            return False  # the server rolls back a lost session's transaction: known outcome
        if op is _TRANSACTION and call.method.endswith("__exit__"):
            return True  # leaving a transaction block commits (or rolls back): unknown
        before = self._tx_before if tx_before is RERAISE else tx_before
        return self.ctx.driver.was_in_transaction(raw, before)

    # --- failing over ----------------------------------------------------------------------------
    def _fail_over(self, call: Call, exc: Exception, proceed: Handler, trigger: str,
                   swaps: int, retry: bool) -> Any:
        driver = self.ctx.driver
        proxy = call.connection
        started = time.monotonic()
        redoable = call.op in _REDOABLE
        statement_sent = trigger == "network" and not redoable
        idempotent = redoable or current_options().idempotent is True
        with self._lock:
            old_raw = proxy._raw
            failed = proxy._host
            in_transaction = self._in_transaction(call, old_raw)
            if self._swaps != swaps:
                # Another thread failed this connection over while this call was failing.
                host = proxy._host
                log.info("connection already failed over to %s by another thread", host)
                outcome = classify_outcome(in_transaction=in_transaction,
                                           statement_sent=statement_sent, reconnected=True,
                                           idempotent=idempotent)
                get_decision_sink().record(outcome.to_decision())
            else:
                span = decision_span("failover", self.code, {
                    "server.address": failed.host, "error.type": type(exc).__name__,
                    "resilient_db.failover.trigger": trigger,
                    "resilient_db.failover.mode": self.mode.value,
                    "resilient_db.failover.in_transaction": in_transaction})
                with span:
                    log.info("%s on %s (%s): failing over (%s)", "connection lost"
                             if trigger == "network" else "instance is read-only",
                             failed, type(exc).__name__, self.mode.value)
                    monitor = self.monitor()
                    if trigger == "network":
                        monitor.mark_down(self._failed_host(failed, monitor))
                    # Pooled connections to the failed instance (read/write splitting) must
                    # not serve anyone again: a demoted writer's never as "the writer".
                    _pools.evict_host(driver.code, failed.host, failed.port)
                    try:
                        self._reconnect(proxy, monitor, started)
                    except _NoConnectionError as none:
                        raise self.failed_error(span, exc, failed, started, none.attempts,
                                                in_transaction=in_transaction,
                                                statement_sent=statement_sent) from exc
                    with contextlib.suppress(Exception):
                        driver.abort(old_raw)
                    with contextlib.suppress(Exception):
                        old_raw.close()
                    host = proxy._host
                    log.info("failed over from %s to %s (instance %s) in %.0f ms", failed,
                             host, self.instance_id, (time.monotonic() - started) * 1000)
                    outcome = classify_outcome(in_transaction=in_transaction,
                                               statement_sent=statement_sent,
                                               reconnected=True, idempotent=idempotent)
                    get_decision_sink().record(outcome.to_decision())
                    span.set(**{"resilient_db.failover.outcome": outcome.error.__name__,
                                "server.address": host.host, "server.port": host.port,
                                "resilient_db.instance.id": self.instance_id})
        if retry and idempotent and outcome.error is FailoverSuccessError:
            again = proxy.resilient.retarget(call)
            if again is not None:
                log.info("running the interrupted %s again on %s (idempotent)", call.method,
                         host)
                try:
                    return proceed(again)
                except Exception as second:
                    result = self._on_error(again, second, proceed, retry=False)
                    if result is RERAISE:
                        raise
                    return result
        raise self.outcome_error(outcome, exc, failed, host, statement_sent) from exc

    def failed_error(self, span: Any, exc: Exception, failed: HostSpec, started: float,
                     attempts: list[ConnectAttempt], *, in_transaction: bool,
                     statement_sent: bool) -> Error:
        """The ``FailoverFailedError`` of a failover that found nothing usable (recorded as
        the outcome decision and on ``span``; both fronts)."""
        outcome = classify_outcome(in_transaction=in_transaction,
                                   statement_sent=statement_sent, reconnected=False)
        get_decision_sink().record(outcome.to_decision())
        span.set(**{"resilient_db.failover.outcome": outcome.error.__name__,
                    "resilient_db.failover.attempt_count": len(attempts)})
        elapsed = time.monotonic() - started
        log.warning("failover from %s failed after %.1f s (%d attempts)",
                    failed, elapsed, len(attempts))
        return self.ctx.driver.error(
            FailoverFailedError,
            f"the connection to {failed} failed ({type(exc).__name__}: {exc}) "
            f"and no usable {self._wanted()} was found within {elapsed:.1f} s "
            f"(failover_timeout_sec={self.timeout}); {len(attempts)} "
            "attempts: "
            + "; ".join(f"{a.host}:{a.port} {a.outcome}"
                        + (f" ({a.error})" if a.error else "")
                        for a in attempts),
            failed_host=str(failed), statement_sent=statement_sent,
            attempts=tuple(attempts))

    def outcome_error(self, outcome: Outcome, exc: Exception, failed: HostSpec,
                      host: HostSpec, statement_sent: bool) -> Error:
        """The error the application sees after a failover that reconnected (both fronts):
        ``FailoverSuccessError`` or ``TransactionResolutionUnknownError``."""
        if outcome.error is FailoverSuccessError:
            applied = "may have been applied" if statement_sent else "was not applied"
            message = (f"the connection to {failed} failed ({type(exc).__name__}: {exc}); it "
                       f"now uses {host} (instance {self.instance_id}). No transaction was "
                       f"open; the interrupted statement {applied}: run it again if that is "
                       "safe")
        else:
            message = (f"the connection to {failed} failed ({type(exc).__name__}: {exc}) while "
                       f"a transaction was open; it now uses {host} (instance "
                       f"{self.instance_id}). Whether the transaction committed is unknown: "
                       "do not replay it blindly")
        return self.ctx.driver.error(outcome.error, message, host=str(host),
                                     failed_host=str(failed), statement_sent=statement_sent)

    def _wanted(self) -> str:
        return {FailoverMode.STRICT_WRITER: "writer", FailoverMode.STRICT_READER: "reader",
                FailoverMode.READER_OR_WRITER: "reader or writer"}[self.mode]

    def _failed_host(self, failed: HostSpec, monitor: TopologyMonitor) -> Host | HostSpec:
        snapshot = monitor.snapshot
        listed = snapshot.by_instance(self.instance_id) if (
            snapshot is not None and self.instance_id) else None
        return listed or failed

    def recycle(self, proxy: Any) -> bool:
        """Move ``proxy`` to a verified instance of this connection's role now, without raising
        an outcome (the connection tracker, for an idle connection left on a demoted writer).
        A writer the monitor already verified is used as is. Returns whether it moved; the
        old physical connection is aborted and closed."""
        with self._lock:
            if proxy._closed_by_us:
                return False  # closed by the application: never reopened
            old_raw = proxy._raw
            monitor = self.monitor()
            try:
                self._reconnect(proxy, monitor, time.monotonic(),
                                since=monitor.verified_at - 1e-9)
            except _NoConnectionError:
                return False
            with contextlib.suppress(Exception):
                self.ctx.driver.abort(old_raw)
            with contextlib.suppress(Exception):
                old_raw.close()
            return True

    def _reconnect(self, proxy: Any, monitor: TopologyMonitor, started: float, *,
                   since: float | None = None) -> None:
        """Connect to a verified instance of the wanted role and install it in ``proxy``;
        ``_NoConnectionError`` when the budget runs out. ``since``: accept a writer verified
        after this moment (default ``started``)."""
        attempts: list[ConnectAttempt] = []
        flow = self.reconnect_flow(monitor, started, started if since is None else since,
                                   attempts)
        reply: Any = None
        try:
            while True:
                step = flow.send(reply)
                if isinstance(step, PlanStep):
                    reply = self._plan(monitor, step.since, step.remaining)
                elif isinstance(step, TryStep):
                    reply = self._try(proxy, monitor, step.attempt, step.remaining, attempts)
                else:
                    time.sleep(step.delay)
                    reply = None
        except StopIteration:
            return
        finally:
            flow.close()

    def reconnect_flow(self, monitor: TopologyMonitor, started: float, since: float,
                       attempts: list[ConnectAttempt],
                       ) -> Generator[PlanStep | TryStep | SleepStep, Any, None]:
        """The failover loop without its I/O, shared by the sync and asyncio fronts: yields
        :class:`PlanStep` (send the plan, ``None`` when the budget ran out waiting for a
        writer), :class:`TryStep` (send whether the attempt connected and was installed) and
        :class:`SleepStep` (send ``None``); returns once connected, raises
        ``_NoConnectionError`` (with ``attempts``, which the caller's tries fill) when the
        budget (``failover_timeout_sec``) is spent. Pacing and every decision are
        :mod:`resilient_db.failover_core`'s."""
        schedule = RetrySchedule.for_failover(self.timeout, self.reconnect_interval)
        state = schedule.start(started)
        sink = get_decision_sink()
        while True:
            remaining = state.remaining(time.monotonic())
            plan = yield PlanStep(since, remaining)
            if plan is None:
                attempts.extend(monitor.probe_attempts())
                raise _NoConnectionError(attempts)
            sink.record(plan.to_decision())
            if plan.choice is not None:
                sink.record(plan.choice.to_decision())
            for attempt in plan.attempts:
                if (yield TryStep(attempt, state.remaining(time.monotonic()))):
                    return
            since = time.monotonic()
            state = state.increment(since, "failed")
            step = state.next_step(since, self._rng)
            sink.record(step.to_decision())
            if not step.retry:
                raise _NoConnectionError(attempts)
            yield SleepStep(step.delay)

    def _plan(self, monitor: TopologyMonitor, since: float,
              remaining: float | None) -> FailoverPlan | None:
        """The hosts to try now; ``None`` when the budget ran out waiting for the monitor.
        Only hosts the connection's host list allows are planned (the ``hosts`` phase:
        ``custom_endpoint`` keeps the endpoint's members); ``_NoConnectionError`` at once when
        it allows none of the candidates (waiting would not make one a member)."""
        now = time.monotonic()
        ctx = selection_context(rng=monitor.rng, now=now, cursor=monitor.round_robin,
                                weights=self.weights)
        if self.mode is FailoverMode.STRICT_WRITER:
            writer = monitor.wait_for_writer(since, remaining)
            if writer is None:
                return None
            snapshot = monitor.snapshot
            if snapshot is None or snapshot.writer is None or (
                    snapshot.writer.address != writer.address):
                snapshot = TopologySnapshot((writer,))
            allowed, excluded = self._allowed(snapshot)
            if allowed.writer is None and writer.address in excluded:
                raise _NoConnectionError([ConnectAttempt(
                    writer.host, writer.port, f"not allowed: {excluded[writer.address]}")])
            plan = plan_attempts(self.mode, allowed, monitor.bad_hosts(), now, self.strategy,
                                 ctx, max_lag=self.max_lag)
            return dataclasses.replace(plan, excluded=tuple(excluded))
        snapshot = monitor.snapshot
        if snapshot is None or not snapshot.hosts:
            monitor.request_refresh()
            if monitor.wait_for_writer(since, remaining) is None:
                return None
            snapshot = monitor.snapshot or TopologySnapshot(())
        allowed, excluded = self._allowed(snapshot)
        ctx = dataclasses.replace(ctx, response_times=response_time.selection_times(
            self.ctx, self.strategy, allowed.hosts))
        plan = plan_attempts(self.mode, allowed, monitor.bad_hosts(), now, self.strategy, ctx,
                             max_lag=self.max_lag)
        if excluded and self.mode is FailoverMode.STRICT_READER and snapshot.readers and (
                not allowed.readers):
            # "The writer only in a cluster without readers" does not apply: the cluster has
            # readers, none of them allowed.
            plan = dataclasses.replace(plan, attempts=())
        if excluded and not plan.attempts:
            raise _NoConnectionError([
                ConnectAttempt(h.host, h.port, f"not allowed: {excluded[h.address]}")
                for h in snapshot.hosts if h.address in excluded])
        if not plan.attempts:
            monitor.request_refresh()
        return dataclasses.replace(plan, excluded=tuple(excluded))

    def _allowed(self, snapshot: TopologySnapshot) -> tuple[TopologySnapshot, dict[str, str]]:
        return allowed_only(snapshot, self.ctx.hosts, self.ctx.settings)

    def _try(self, proxy: Any, monitor: TopologyMonitor, attempt: Attempt,
             remaining: float | None, attempts: list[ConnectAttempt]) -> bool:
        """:meth:`_try_once` as a ``failover.attempt`` decision span."""
        with self.attempt_span(attempt) as span:
            before = len(attempts)
            ok = self._try_once(proxy, monitor, attempt, remaining, attempts)
            self.attempt_result(span, ok, attempts, before)
            return ok

    def attempt_span(self, attempt: Attempt) -> Any:
        """The ``failover.attempt`` decision span of one try (both fronts)."""
        host = attempt.host
        return decision_span("failover.attempt", self.code, {
            "server.address": host.host, "server.port": host.port,
            "resilient_db.instance.id": host.instance_id,
            "resilient_db.failover.attempt.reason": attempt.reason,
            "resilient_db.failover.attempt.role":
                attempt.required.value if attempt.required else "any"})

    @staticmethod
    def attempt_result(span: Any, ok: bool, attempts: list[ConnectAttempt],
                       before: int) -> None:
        span.set(**{"resilient_db.failover.attempt.result": "connected" if ok else (
            attempts[-1].outcome if len(attempts) > before else "no time left")})

    def attempt_timeout(self, remaining: float | None) -> float:
        """How long one try may take: the reader connect timeout, within the budget left."""
        return self.connect_timeout if remaining is None else min(self.connect_timeout,
                                                                  remaining)

    def installed(self, report: SelfReport, monitor: TopologyMonitor) -> None:
        """A try succeeded: the connection now runs on the instance of ``report``."""
        self._swaps += 1
        self.failovers += 1
        self._learn(report, monitor)

    def _try_once(self, proxy: Any, monitor: TopologyMonitor, attempt: Attempt,
                  remaining: float | None, attempts: list[ConnectAttempt]) -> bool:
        """Connect to ``attempt.host``, verify its role, install it. Records a failure."""
        driver = self.ctx.driver
        host = attempt.host
        start = time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        timeout = self.attempt_timeout(remaining)
        spec = HostSpec(host.host, host.port)
        args = self.attempt_args(spec, timeout)
        try:
            raw = proxy.resilient.pipeline.connect(ConnectContext(
                spec, args, self.ctx.settings, driver, self._target, initial=False))
        except Exception as exc:
            attempts.append(ConnectAttempt(host.host, host.port, "connect failed", repr(exc),
                                           time.monotonic() - start))
            monitor.mark_down(host)
            return False
        armed: Armed | None = None
        try:
            assert self._dialect is not None and self._addressing is not None
            # The connect timeout bounds only the connect: the role check and the session
            # state get the same bound (an instance that stops answering right after the
            # handshake must not hold the failover past its budget).
            with abort_after(timeout, lambda: driver.abort(raw)) as armed:
                report = read_self_report(driver, self._dialect, raw, host, self._addressing,
                                          with_topology=False)
                problem = self._role_problem(report, attempt)
                if problem is None:
                    driver.apply_session_state(raw, proxy._session)
            if armed is not None and armed.fired:
                problem = f"no answer within {timeout:g} s after connecting"
            elif problem is None and self.on_connect is not None:
                self.on_connect(raw)
        except Exception as exc:
            problem, report = f"failed after connecting: {exc!r}", None
            if armed is not None and armed.fired:
                problem = f"no answer within {timeout:g} s after connecting ({exc!r})"
        if problem is not None:
            attempts.append(ConnectAttempt(host.host, host.port, problem, None,
                                           time.monotonic() - start))
            with contextlib.suppress(Exception):
                raw.close()
            return False
        assert report is not None
        proxy.resilient.replace_raw(raw, spec, "failover")
        self.installed(report, monitor)
        return True

    @staticmethod
    def _role_problem(report: SelfReport, attempt: Attempt) -> str | None:
        expected = attempt.host.instance_id
        if expected is not None and report.instance_id not in (None, expected):
            return f"reached instance {report.instance_id}, not {expected}"
        if report.is_reader is None:
            return "did not say whether it is a reader"
        if attempt.required is Role.WRITER and report.is_reader:
            return "is a reader, not the writer"
        if attempt.required is Role.READER and not report.is_reader:
            return "is the writer, not a reader"
        return None

    def __repr__(self) -> str:
        return (f"<FailoverPlugin mode={self.mode.value} instance={self.instance_id} "
                f"role={self.role.value} epoch={self.epoch}>")
