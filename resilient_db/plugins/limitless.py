"""``limitless``: spread connections over the transaction routers of an Aurora PostgreSQL
Limitless Database shard group by their load, and move a connection whose router fails to
another router (``docs/plugins/limitless.md``).

Connect phase (the application's connections): the shard group's
:class:`~resilient_db.limitless.RouterMonitor` is found or started (one per shard group
endpoint in the process). With a router list known, a router is chosen at random in proportion
to its weight (``weighted_random``; the weight falls as the load rises) and the connection is
opened to that router's own address; when the host given is itself a listed router, that
router. A router that cannot be reached is marked down (for one monitor interval) and the
least loaded router not marked down is tried next (``highest_weight``), at most
``limitless_max_retries_ms`` more routers; when none connects, the shard group endpoint as
given. With no router list yet (the first connection of the process) the list is read on the
spot through the shard group endpoint when ``limitless_wait_for_transaction_router_info`` is
true (retried ``limitless_get_transaction_router_max_retries`` times); otherwise the
connection goes to the shard group endpoint as given while the monitor reads the list.
A login refused is raised at once (another router would refuse it too).

Execute phase: statements, commit, rollback, transaction blocks, opening a cursor, setting a
session attribute (as ``failover``). A network error on a router marks it down and moves the
connection to the least loaded router not marked down (session state re-applied, cursors
rebound), then raises what ``failover`` raises: ``FailoverSuccessError`` (no transaction was
open), ``TransactionResolutionUnknownError`` (one was), ``FailoverFailedError`` (no router
connected, with every attempt). Inside ``call_options(idempotent=True)`` a statement
interrupted outside a transaction runs again on the new router instead. Routers are peers (any
router serves any transaction), so there is no role to check. When ``failover`` is selected
too it leaves router failures to this plugin (``DEFER_FAILOVER``).

PostgreSQL only: Limitless Database is an Aurora PostgreSQL feature, so selecting the plugin
with mysql-connector is a ``ConfigurationError``; a server without
``aurora_limitless_router_endpoints()`` is refused at connect with one too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import threading
import time
import weakref
from typing import Any

from .. import limitless
from .._decisions import decision_span, get_decision_sink
from .._options import current_options
from .._params import (
    CONNECT_TIMEOUT,
    LIMITLESS_CONNECT_MAX_RETRIES,
    LIMITLESS_GET_ROUTER_MAX_RETRIES,
    LIMITLESS_GET_ROUTER_RETRY_INTERVAL,
    LIMITLESS_MONITOR_DISPOSAL_TIME,
    LIMITLESS_MONITOR_INTERVAL,
    LIMITLESS_WAIT_FOR_ROUTER_INFO,
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
from ..errors import (
    ConfigurationError,
    ConnectAttempt,
    Error,
    FailoverFailedError,
    FailoverSuccessError,
)
from ..failover_core import classify_outcome
from ..limitless import Router, RouterChoice, RouterMonitor, choose, read_routers
from ._cluster_connect import instance_context

__all__ = ["LimitlessPlugin"]

log = logging.getLogger("resilient_db.plugins.limitless")

CODE = limitless.PLUGIN
#: Calls that send no statement: always safe to redo on the new connection.
_REDOABLE = frozenset({Op.CURSOR, Op.SESSION})
#: SQLSTATE of "function does not exist": the server is no Limitless shard group.
_UNDEFINED_FUNCTION = "42883"
#: ``resilient_db.failover.mode`` of this plugin's failovers (telemetry).
_MODE = "limitless_router"
#: Bound of connecting to one router, seconds, when ``connect_timeout`` is not set: a
#: blackholed router must not hold the connect (or a move off a failed router) for the
#: kernel's two minutes of SYN retries while other routers answer.
ROUTER_CONNECT_TIMEOUT = 10.0


class _NoRouterError(Exception):
    """Internal: no router (nor the shard group endpoint) connected."""

    def __init__(self, attempts: list[ConnectAttempt], last: BaseException | None) -> None:
        super().__init__("no router connected")
        self.attempts = attempts
        self.last = last


class LimitlessPlugin(Plugin):
    """See the module docstring. ``router``: the router this connection is on (``None``: it
    went through the shard group endpoint as given); ``failovers``: how many times it moved
    to another router."""

    code = CODE
    single_host = True  # finds the routers itself
    intercepts = STATEMENT_OPS | {Op.COMMIT, Op.ROLLBACK, Op.TRANSACTION, Op.CURSOR,
                                  Op.SESSION}
    #: Seeded by tests that check the weighted choice.
    rng: random.Random = random.Random()

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        if ctx.driver.code != "psycopg":
            raise ConfigurationError(
                f"plugin 'limitless': Aurora Limitless Database is Aurora PostgreSQL only, so "
                f"it cannot be used with the {ctx.driver.code} driver; connect with psycopg, "
                "or leave the limitless plugin out",
                parameter="plugins", value=CODE)
        settings = ctx.settings
        self.interval: float = settings[LIMITLESS_MONITOR_INTERVAL] or 7.5
        disposal = settings[LIMITLESS_MONITOR_DISPOSAL_TIME]
        self.disposal: float = 600.0 if disposal is None else disposal
        self.wait = settings[LIMITLESS_WAIT_FOR_ROUTER_INFO]
        self.fetch_interval: float = settings[LIMITLESS_GET_ROUTER_RETRY_INTERVAL] or 0.3
        fetch_retries = settings[LIMITLESS_GET_ROUTER_MAX_RETRIES]
        self.fetch_retries: int = 5 if fetch_retries is None else fetch_retries
        self.max_retries: int = settings[LIMITLESS_CONNECT_MAX_RETRIES] or 5
        #: Bound of one router connect attempt (``connect_timeout``, else 10 s).
        self.attempt_timeout: float = settings[CONNECT_TIMEOUT] or ROUTER_CONNECT_TIMEOUT
        self.router: Router | None = None
        self.failovers = 0
        self._monitor: RouterMonitor | None = None
        self._endpoint: HostSpec = ctx.host
        self._inner_connect: ConnectHandler | None = None
        self._args: dict[str, Any] = {}
        self._target: Any = None
        self._closed = False
        self._swaps = 0
        self._tx_before: Any = None
        self._lock = threading.RLock()
        # failover (if selected) leaves errors of a connection on a router to this plugin;
        # weak: a cycle would outlive `del conn`. A hook set before (blue_green's) is asked
        # too.
        self._deferred_before = ctx.extra.get(DEFER_FAILOVER)
        ctx.extra[DEFER_FAILOVER] = weakref.WeakMethod(self._owns_failure)

    # --- connect phase ---------------------------------------------------------------------
    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        if not ctx.initial:
            return proceed(ctx)  # a failover's, a monitor's or this plugin's own connection
        self._inner_connect = proceed
        self._args = dict(ctx.args)
        self._target = ctx.target
        self._endpoint = ctx.host
        monitor = self.monitor()
        routers = monitor.routers
        if not routers:
            if not self.wait:
                self._decide_endpoint("no router list yet "
                                      "(limitless_wait_for_transaction_router_info=false)")
                self.router = None
                return proceed(ctx)
            routers = self._fetch_now(ctx, proceed, monitor)
            if not routers:
                self._decide_endpoint("the router list is empty")
                self.router = None
                return proceed(ctx)
        named = next((r for r in routers if r.address == _address(ctx.host, routers)), None)
        try:
            raw, router = self._open_router(
                monitor, routers,
                lambda spec: proceed(instance_context(ctx, spec, self.attempt_timeout)),
                named=named)
        except _NoRouterError as none:
            self._decide_endpoint("no router could be reached")
            try:
                raw = proceed(ctx)
            except Exception:
                # The driver's own error goes up untouched (DESIGN §4); the routers tried
                # before are in the log and in the limitless.host_down decisions.
                log.warning("limitless: neither a router nor %s could be reached; routers "
                            "tried: %s", ctx.host, _attempts_text(none.attempts))
                raise
            router = None
        self.router = router
        return raw

    def _fetch_now(self, ctx: ConnectContext, proceed: ConnectHandler,
                   monitor: RouterMonitor) -> tuple[Router, ...]:
        """The router list read through the shard group endpoint now (one connecting thread
        at a time per shard group: the others then find it), retried
        ``limitless_get_transaction_router_max_retries`` times; raises the last error of
        connecting or reading, or returns ``()`` when the endpoint answered with no router."""
        driver = ctx.driver
        # Not the application's connection: the inner plugins must not take it for one
        # (failover's on_connect hook, its topology reading).
        side = dataclasses.replace(ctx, initial=False)
        last: BaseException | None = None
        for attempt in range(self.fetch_retries + 1):
            if attempt:
                time.sleep(self.fetch_interval)
            with monitor.fetch_lock:
                if monitor.routers:
                    return monitor.routers
                try:
                    raw = proceed(side)
                except Exception as exc:
                    if isinstance(exc, Error) or driver.is_auth_failure(exc):
                        raise
                    monitor.failed(exc, "on_connect")
                    last = exc
                    continue
                try:
                    routers = read_routers(driver, raw, _port(ctx.host, driver.default_port))
                except Exception as exc:
                    if getattr(exc, "sqlstate", None) == _UNDEFINED_FUNCTION:
                        raise ConfigurationError(
                            f"plugin 'limitless': the server behind {ctx.host} has no "
                            "pg_catalog.aurora_limitless_router_endpoints(), so it is not "
                            "an Aurora Limitless Database shard group; connect through the "
                            "DB shard group endpoint, or leave the limitless plugin out",
                            parameter="plugins", value=CODE) from None
                    monitor.failed(exc, "on_connect")
                    last = exc
                    continue
                finally:
                    with contextlib.suppress(Exception):
                        raw.close()
                if routers:
                    monitor.publish(routers, "on_connect")
                    return routers
                last = None  # answered, with no router: the endpoint itself still works
                monitor.failed(LookupError(f"{ctx.host} lists no transaction router"),
                               "on_connect")
        if last is None:
            return ()
        raise last

    def _open_router(self, monitor: RouterMonitor, routers: tuple[Router, ...],
                     open_at: Any, *, named: Router | None = None,
                     avoid: frozenset[str] = frozenset(), first: str = "weighted_random",
                     ) -> tuple[Any, Router]:
        """Connect to a router: ``named``, else one chosen by ``first`` (a strategy of
        :func:`~resilient_db.limitless.choose`); after a failure, the least loaded ones not
        marked down nor in ``avoid``, at most ``limitless_max_retries_ms`` more.
        ``_NoRouterError`` when none connected."""
        driver = self.ctx.driver
        tried: set[str] = set(avoid)
        attempts: list[ConnectAttempt] = []
        last: BaseException | None = None
        sink = get_decision_sink()
        for n in range(self.max_retries + 1):
            down = monitor.down() | tried
            if n == 0 and named is not None and named.address not in down:
                choice = RouterChoice(named, "named", (named,))
            else:
                choice = choose(routers, first if n == 0 else "highest_weight", avoid=down,
                                rng=type(self).rng)
            sink.record(choice.to_decision())
            router = choice.router
            if router is None:
                break
            tried.add(router.address)
            started = time.monotonic()
            try:
                raw = open_at(router.spec)
            except Exception as exc:
                if isinstance(exc, Error) or driver.is_auth_failure(exc):
                    raise  # a refused login (or our own verdict) is the same on every router
                attempts.append(ConnectAttempt(router.host, router.port, "connect failed",
                                               repr(exc), time.monotonic() - started))
                log.info("limitless: router %s cannot be reached (%s)", router,
                         type(exc).__name__)
                monitor.mark_down(router, exc)
                last = exc
                continue
            monitor.mark_up(router)
            return raw, router
        raise _NoRouterError(attempts, last)

    def _decide_endpoint(self, reason: str) -> None:
        self.ctx.decide("limitless.using_endpoint", CODE, **{
            "server.address": self._endpoint.host, "server.port": self._endpoint.port,
            "resilient_db.limitless.reason": reason})

    def on_connection_changed(self, event: ConnectionChanged) -> None:
        if event.reason == "close":
            with self._lock:
                self._closed = True
                monitor, self._monitor = self._monitor, None
            if monitor is not None:
                monitor.detach(self)

    # --- the monitor -----------------------------------------------------------------------
    def monitor(self) -> RouterMonitor:
        """The shard group's monitor, found or started, with this connection attached."""
        monitor = self._monitor
        if monitor is not None and not monitor.stopped:
            return monitor
        driver = self.ctx.driver
        endpoint = HostSpec(self._endpoint.host, _port(self._endpoint, driver.default_port))
        key = (driver.code, endpoint.host.lower(), endpoint.port)

        def create() -> RouterMonitor:
            return RouterMonitor(key, endpoint, driver, interval=self.interval,
                                 disposal=self.disposal)

        while True:
            monitor = limitless.monitor_for(key, create)
            if monitor.attach(self, interval=self.interval, disposal=self.disposal):
                break  # else it stopped between the two calls: the next one is new
        with self._lock:
            if not self._closed:
                self._monitor = monitor
        return monitor

    def open_router_list_connection(self, host: HostSpec, timeout: float) -> Any:
        """For the monitor: an autocommit connection to the shard group endpoint through this
        connection's inner connect chain (credentials plugins apply), with connect and read
        bounds, search_path pinned (DESIGN §10)."""
        driver = self.ctx.driver
        args = dict(self._args)
        for name in ("hostaddr", "unix_socket"):
            args.pop(name, None)
        args["host"] = host.host
        if host.port is not None:
            args["port"] = host.port
        args["autocommit"] = True
        args["connect_timeout"] = max(2, int(-(-timeout // 1)))
        args["application_name"] = limitless.MONITOR_APPLICATION_NAME
        args["tcp_user_timeout"] = int(timeout * 1000)
        options = str(args.get("options") or "")
        args["options"] = f"{options} -c search_path=pg_catalog,pg_temp".strip()
        ctx = ConnectContext(host, args, self.ctx.settings, driver, self._target,
                             initial=False)
        connect = self._inner_connect
        if connect is None:
            return driver.connect(self._target, args, self.ctx.settings)
        return connect(ctx)

    # --- execute phase ---------------------------------------------------------------------
    def _owns_failure(self, exc: BaseException) -> bool:
        """For ``failover``: whether this plugin handles ``exc`` (a network error while the
        connection is on a router), or the hook set before this plugin's does."""
        if self.router is not None and self.ctx.driver.is_disconnect(exc):
            return True
        before = self._deferred_before
        hook = before() if before is not None else None
        return bool(hook is not None and hook(exc))

    def wrap_execute(self, proceed: Handler) -> Handler:
        return guarded_execute(proceed, self, self.ctx.driver.tx_snapshot_reader(),
                               self._on_error)

    def _on_error(self, call: Call, exc: Exception, proceed: Handler, *,
                  retry: bool = True) -> Any:
        if isinstance(exc, Error):
            return RERAISE  # resilient_db's own outcome (a deadline, an inner failover)
        swaps = self._swaps  # before anything else: another thread may be moving it now
        if call.connection._closed_by_us or not self.ctx.driver.is_disconnect(exc):
            return RERAISE
        return self._fail_over(call, exc, proceed, retry, swaps)

    def _in_transaction(self, call: Call, raw: Any) -> bool:
        if call.op is Op.COMMIT:
            return True
        if call.op is Op.ROLLBACK:
            return False  # the server rolls back a lost session's transaction
        if call.op is Op.TRANSACTION and call.method.endswith("__exit__"):
            return True
        return self.ctx.driver.was_in_transaction(raw, self._tx_before)

    def _fail_over(self, call: Call, exc: Exception, proceed: Handler, retry: bool,
                   swaps: int) -> Any:
        driver = self.ctx.driver
        proxy = call.connection
        redoable = call.op in _REDOABLE
        statement_sent = not redoable
        idempotent = redoable or current_options().idempotent is True
        with self._lock:
            old_raw = proxy._raw
            failed_router = self.router
            failed = proxy._host if failed_router is None else failed_router.spec
            in_transaction = self._in_transaction(call, old_raw)
            if self._swaps != swaps:
                reconnected = True  # another thread moved the connection meanwhile
                attempts: list[ConnectAttempt] = []
            else:
                with decision_span("failover", CODE, {
                        "server.address": failed.host, "server.port": failed.port,
                        "error.type": type(exc).__name__,
                        "resilient_db.failover.trigger": "network",
                        "resilient_db.failover.mode": _MODE,
                        "resilient_db.failover.in_transaction": in_transaction}) as span:
                    log.info("connection to router %s lost (%s): moving to another router",
                             failed, type(exc).__name__)
                    monitor = self.monitor()
                    if failed_router is not None:
                        monitor.mark_down(failed_router, exc)
                    try:
                        attempts = self._move(proxy, monitor, failed_router)
                        reconnected = True
                    except _NoRouterError as none:
                        attempts, reconnected = none.attempts, False
                    outcome = classify_outcome(in_transaction=in_transaction,
                                               statement_sent=statement_sent,
                                               reconnected=reconnected, idempotent=idempotent)
                    span.set(**{"resilient_db.failover.outcome": outcome.error.__name__,
                                "resilient_db.failover.attempt_count": len(attempts),
                                "resilient_db.limitless.router": str(self.router)
                                if reconnected and self.router else None})
                if reconnected:
                    with contextlib.suppress(Exception):
                        driver.abort(old_raw)
                    with contextlib.suppress(Exception):
                        old_raw.close()
        outcome = classify_outcome(in_transaction=in_transaction, statement_sent=statement_sent,
                                   reconnected=reconnected, idempotent=idempotent)
        get_decision_sink().record(dataclasses.replace(outcome.to_decision(), plugin=CODE))
        if not reconnected:
            raise driver.error(
                FailoverFailedError,
                f"the connection to router {failed} failed ({type(exc).__name__}: {exc}) and "
                f"no other router of {self._endpoint.host} connected; {len(attempts)} "
                f"attempts: {_attempts_text(attempts)}",
                failed_host=str(failed), statement_sent=statement_sent,
                attempts=tuple(attempts)) from exc
        host = proxy._host
        if retry and idempotent and outcome.error is FailoverSuccessError:
            again = proxy.resilient.retarget(call)
            if again is not None:
                log.info("running the interrupted %s again on router %s (idempotent)",
                         call.method, host)
                try:
                    return proceed(again)
                except Exception as second:
                    result = self._on_error(again, second, proceed, retry=False)
                    if result is RERAISE:
                        raise
                    return result
        if outcome.error is FailoverSuccessError:
            applied = "may have been applied" if statement_sent else "was not applied"
            message = (f"the connection to router {failed} failed ({type(exc).__name__}: "
                       f"{exc}); it now uses router {host}. No transaction was open; the "
                       f"interrupted statement {applied}: run it again if that is safe")
        else:
            message = (f"the connection to router {failed} failed ({type(exc).__name__}: "
                       f"{exc}) while a transaction was open; it now uses router {host}. "
                       "Whether the transaction committed is unknown: do not replay it "
                       "blindly")
        raise driver.error(outcome.error, message, host=str(host), failed_host=str(failed),
                           statement_sent=statement_sent) from exc

    def _move(self, proxy: Any, monitor: RouterMonitor,
              failed: Router | None) -> list[ConnectAttempt]:
        """Connect to another router (the least loaded not marked down; the shard group
        endpoint when no router is known or none connects) and install it in ``proxy``.
        Returns the failed attempts; ``_NoRouterError`` when nothing connected."""
        driver = self.ctx.driver
        settings = self.ctx.settings

        def open_at(spec: HostSpec) -> Any:
            args = dict(self._args)
            for name in ("hostaddr", "unix_socket"):
                args.pop(name, None)
            args["host"] = spec.host
            if spec.port is not None:
                args["port"] = spec.port
            args["connect_timeout"] = max(1, int(-(-self.attempt_timeout // 1)))
            raw = proxy.resilient.pipeline.connect(ConnectContext(
                spec, args, settings, driver, self._target, initial=False))
            try:
                driver.apply_session_state(raw, proxy._session)
            except BaseException:
                with contextlib.suppress(Exception):
                    raw.close()
                raise
            return raw

        attempts: list[ConnectAttempt] = []
        routers = monitor.routers or ()
        router: Router | None = None
        raw: Any = None
        avoid = frozenset({failed.address}) if failed is not None else frozenset()
        try:
            raw, router = self._open_router(monitor, routers, open_at, avoid=avoid,
                                            first="highest_weight")
        except _NoRouterError as none:
            attempts = none.attempts
            self._decide_endpoint("no other router could be reached")
            started = time.monotonic()
            try:
                raw = open_at(self._endpoint)
            except Exception as exc:
                if isinstance(exc, Error) or driver.is_auth_failure(exc):
                    raise
                attempts.append(ConnectAttempt(self._endpoint.host, self._endpoint.port,
                                               "connect failed", repr(exc),
                                               time.monotonic() - started))
                raise _NoRouterError(attempts, exc) from None
        spec = self._endpoint if router is None else router.spec
        proxy.resilient.replace_raw(raw, spec, "failover", session_applied=True)
        self.router = router
        self._swaps += 1
        self.failovers += 1
        return attempts

    def __repr__(self) -> str:
        return f"<LimitlessPlugin router={self.router} failovers={self.failovers}>"


def _port(host: HostSpec, default: int) -> int:
    return host.port if host.port is not None else default


def _address(host: HostSpec, routers: tuple[Router, ...]) -> str:
    """``host`` as a router address (on the routers' port when it names none)."""
    port = host.port if host.port is not None else (routers[0].port if routers else None)
    return f"{host.host.lower()}:{port}"


def _attempts_text(attempts: list[ConnectAttempt]) -> str:
    return "; ".join(f"{a.host}:{a.port} {a.outcome}" + (f" ({a.error})" if a.error else "")
                     for a in attempts) or "none"

