"""The asyncio front: ``await resilient_db.connect_async(psycopg.AsyncConnection.connect, ...)``
or ``connect_async(mysql.connector.aio.connect, ...)``.

Everything that decides is shared with the sync front; this module only awaits:

- input: ``_connect.prepare`` (conninfo, properties, plugin list, validation);
- failover: the connection's :class:`~resilient_db.plugins.failover.FailoverPlugin` object
  (the cluster's shared topology monitor, mode, host list, bad-host memory, error triggers,
  :meth:`~resilient_db.plugins.failover.FailoverPlugin.reconnect_flow`, outcome
  classification and error messages); this module drives its reconnect flow with awaits
  (:class:`_AsyncFailover`) and runs the topology statements on the asyncio connection through
  the same I/O-free flows (:mod:`resilient_db._flows`);
- failure monitoring: the connection's :class:`~resilient_db.plugins.efm.EfmPlugin` object
  and its host's monitor thread, which breaks the socket of an awaited statement on a dead
  host exactly as for a blocked thread (``shutdown(SHUT_RDWR)`` is safe from another thread:
  the event loop sees the socket readable, the driver raises its network error);
- deadlines: on the event loop itself (``loop.call_later``), with the sync front's steps:
  server-side cancel (psycopg's ``cancel_safe``; MySQL: ``KILL QUERY`` on a side
  connection), then, ``query_timeout_grace`` later, the socket is broken;
  ``QueryTimeoutError``, never a failover.

What differs per driver is one small adapter (:class:`_AioDriver`: open, internal query,
transaction snapshot, server-side cancel, session re-apply, how a cancelled task's statement
is settled); the plugins get the blocking driver dialect of the same driver (for
``mysql.connector.aio``, :class:`~resilient_db.drivers.mysql_connector_aio.MysqlConnectorAioDriver`,
which reaches the socket through the asyncio transport).

What runs on other threads: only what already ran there for the sync front (the shared
topology and failure monitors, with blocking connections of their own) and the rare role
check of a read-only error inside a failed transaction (a short side connection, bounded by
``topology_probe_timeout_sec``; ``asyncio.to_thread``). No statement of the application is
ever run on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Final

from . import _options, dialects
from ._connect import _UNSET, Prepared, prepare
from ._decisions import decision_span, get_decision_sink
from ._flows import Rows, run_async
from ._options import current_options
from ._params import (
    AURORA_MYSQL_LOOKALIKE_SCHEMA,
    CONNECT_TIMEOUT,
    ENABLE_TELEMETRY,
    QUERY_TIMEOUT_GRACE,
    SOCKET_TIMEOUT,
    WRAPPER_DIALECT,
    WRAPPER_DRIVER_DIALECT,
)
from ._pipeline import Call, ConnectionChanged, HostSpec, Op, Pipeline, Plugin, PluginContext
from .dialects.base import Answer
from .drivers import get_driver
from .drivers.base import DriverDialect, NetworkOptions, TxStatus, describe_target
from .errors import ConfigurationError, ConnectAttempt, FailoverSuccessError, QueryTimeoutError
from .failover_core import Attempt, FailoverPlan, classify_outcome
from .hosts import Host
from .plugins.efm import EfmPlugin
from .plugins.failover import (
    _REDOABLE,
    CHECK_ROLE,
    FailoverPlugin,
    PlanStep,
    TryStep,
    _NoConnectionError,
)
from .topology import TopologyMonitor, self_report_flow

__all__ = ["AsyncConnectionProxy", "AsyncCursorProxy", "AsyncMysqlConnectionProxy",
           "AsyncMysqlCursorProxy", "connect_async"]

log = logging.getLogger("resilient_db.asyncio")

#: Plugins the asyncio front runs. The others' hooks are blocking calls on a blocking
#: connection; selecting one is a ``ConfigurationError`` (rather than silently not applied).
ASYNC_PLUGINS: Final = frozenset({"failover", "efm"})
#: ``plugins`` omitted: the sync default list's plugins that the asyncio front runs.
ASYNC_DEFAULT: Final = "failover,efm"
#: How often a failover waiting for the topology monitor's verdict looks again (the monitor
#: works on its own thread; waiting here never blocks the loop or holds a thread).
_POLL: Final = 0.02
_INF: Final = float("inf")
_RETRY: Final = object()

_EXECUTE = Op.EXECUTE
_EXECUTEMANY = Op.EXECUTEMANY
_FETCH = Op.FETCH
_COMMIT = Op.COMMIT
_ROLLBACK = Op.ROLLBACK
_TRANSACTION = Op.TRANSACTION
_SESSION = Op.SESSION
_CURSOR = Op.CURSOR
#: Ops that go through deadline, efm and failover (opening a cursor does no I/O, but psycopg
#: refuses it on a lost connection: like the sync front's, it is opened on the new one).
_GUARDED: Final = frozenset({_EXECUTE, _EXECUTEMANY, _COMMIT, _ROLLBACK, _TRANSACTION, _SESSION,
                             _CURSOR})
_SESSION_ORDER: Final = ("autocommit", "isolation_level", "read_only", "deferrable")


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigurationError(
            f"connect_async needs psycopg ({exc}); install it with "
            "pip install 'resilient_db[psycopg]'", parameter="target") from exc
    return psycopg


def _sync_target(target: Any) -> tuple[_AioDriver, Any]:
    """The asyncio driver adapter for ``target`` and the blocking connect callable matching
    it (for the side connections of the shared monitors); ``ConfigurationError`` for anything
    but psycopg's ``AsyncConnection.connect`` and ``mysql.connector.aio.connect``."""
    usage = "pass psycopg.AsyncConnection.connect or mysql.connector.aio.connect"
    if not callable(target):
        raise ConfigurationError(
            f"target must be a connect callable, not {type(target).__name__}: {usage} (it "
            "comes first: await resilient_db.connect_async(target, conninfo, **kwargs))",
            parameter="target", value=describe_target(target))
    inner = target
    while hasattr(inner, "func") and hasattr(inner, "keywords"):  # functools.partial
        inner = inner.func
    owner = getattr(inner, "__self__", inner)
    module = str(getattr(owner, "__module__", "") or "")
    if module == "mysql.connector.aio" or module.startswith("mysql.connector.aio."):
        if inspect.isclass(inner):
            raise ConfigurationError(
                f"target is the class {inner.__qualname__}, not a connect callable: {usage}",
                parameter="target", value=describe_target(target))
        import mysql.connector

        return _MYSQL, mysql.connector.connect
    if module == "mysql.connector" or module.startswith("mysql.connector."):
        raise ConfigurationError(
            f"target {describe_target(target)} is blocking: connect_async needs "
            "mysql.connector.aio.connect (or use resilient_db.connect)",
            parameter="target", value=describe_target(target))
    psycopg = _psycopg()
    if inspect.isclass(owner) and issubclass(owner, psycopg.AsyncConnection):
        if inner is owner:
            raise ConfigurationError(
                f"target is the class {owner.__qualname__}, not a connect callable: {usage}",
                parameter="target", value=describe_target(target))
        return _PSYCOPG, psycopg.Connection.connect
    if inspect.isclass(owner) and issubclass(owner, psycopg.Connection):
        raise ConfigurationError(
            f"target {describe_target(target)} is blocking: connect_async needs "
            "psycopg.AsyncConnection.connect (or use resilient_db.connect)",
            parameter="target", value=describe_target(target))
    raise ConfigurationError(
        f"target {describe_target(target)} is not a supported asyncio driver: {usage}",
        parameter="target", value=describe_target(target))


async def connect_async(
    target: Callable[..., Any],
    conninfo: str = "",
    *,
    plugins: str | Iterable[str | type[Plugin]] | None = _UNSET,
    **kwargs: Any,
) -> AsyncConnectionProxy:
    """Open an asyncio connection through ``target`` (``psycopg.AsyncConnection.connect`` or
    ``mysql.connector.aio.connect``).

    Arguments as :func:`resilient_db.connect` (the same properties, validation and errors);
    ``plugins`` omitted: ``"failover,efm"``; only ``failover`` and ``efm`` are supported.
    Returns an :class:`AsyncConnectionProxy` (:class:`AsyncMysqlConnectionProxy` for
    mysql-connector). Cancelling the awaiting task closes whatever was opened.
    """
    return await open_async(target, conninfo, plugins, kwargs)


@dataclasses.dataclass(frozen=True)
class PreparedAsync:
    """What :func:`prepare_async` checked: the asyncio driver, the blocking ``target`` that
    side connections use, the properties and plugin classes, and the dialect to verify."""

    aio: _AioDriver
    sync_target: Callable[..., Any]
    prepared: Prepared
    forced_dialect: Any


def prepare_async(target: Callable[..., Any], conninfo: str,
                  plugins: str | Iterable[str | type[Plugin]] | None,
                  kwargs: dict[str, Any]) -> PreparedAsync:
    """Check everything :func:`connect_async` is given, before any I/O (``ConfigurationError``
    names the parameter). Also what a pool checks when it is created."""
    aio, sync_target = _sync_target(target)
    if "wrapper_driver_dialect" in kwargs:
        forced = WRAPPER_DRIVER_DIALECT.parse(kwargs["wrapper_driver_dialect"])
        if forced not in (None, aio.code):
            raise ConfigurationError(
                f"target {describe_target(target)} is the {aio.code} driver, not {forced!r}",
                parameter="wrapper_driver_dialect", value=forced)
    driver = aio.driver
    prepared = prepare(driver, conninfo, plugins, kwargs, default=ASYNC_DEFAULT)
    settings = prepared.settings
    unsupported = [cls.code for cls in prepared.classes if cls.code not in ASYNC_PLUGINS]
    if unsupported:
        raise ConfigurationError(
            f"plugins {', '.join(unsupported)} are not supported by connect_async (it runs "
            f"{', '.join(sorted(ASYNC_PLUGINS))}); leave them out or use resilient_db.connect",
            parameter="plugins", value=",".join(unsupported))
    forced_dialect: Any = settings[WRAPPER_DIALECT]
    lookalike = settings[AURORA_MYSQL_LOOKALIKE_SCHEMA]
    if lookalike is not None:
        if aio.code != "mysql-connector":
            raise ConfigurationError(
                "aurora_mysql_lookalike_schema is a MySQL setting, and the target is "
                f"{aio.code}", parameter="aurora_mysql_lookalike_schema")
        if forced_dialect not in (None, "aurora-mysql"):
            raise ConfigurationError(
                f"aurora_mysql_lookalike_schema is set, so the dialect is aurora-mysql; it "
                f"conflicts with wrapper_dialect={forced_dialect!r}",
                parameter="wrapper_dialect", value=forced_dialect)
        forced_dialect = dialects.aurora_mysql_lookalike(lookalike)
    return PreparedAsync(aio, sync_target, prepared, forced_dialect)


async def open_async(target: Callable[..., Any], conninfo: str,
                     plugins: str | Iterable[str | type[Plugin]] | None,
                     kwargs: dict[str, Any],
                     proxy_class: type[AsyncConnectionProxy] | None = None,
                     ) -> AsyncConnectionProxy:
    """:func:`connect_async`, building ``proxy_class`` (the driver's proxy class or a
    subclass of it; omitted: the driver's)."""
    checked = prepare_async(target, conninfo, plugins, kwargs)
    aio, sync_target, prepared = checked.aio, checked.sync_target, checked.prepared
    forced_dialect = checked.forced_dialect
    driver, settings = aio.driver, prepared.settings
    if proxy_class is not None and not issubclass(proxy_class, aio.proxy_class):
        raise ConfigurationError(
            f"{proxy_class.__name__} is not a {aio.proxy_class.__name__}, the proxy class of "
            f"the {aio.code} driver that target {describe_target(target)} is",
            parameter="target", value=describe_target(target))
    if settings[ENABLE_TELEMETRY]:
        from .telemetry import _activate

        _activate(settings)  # decision telemetry; per-statement spans are the sync front's

    host = prepared.host
    codes = frozenset(cls.code for cls in prepared.classes)
    ctx = PluginContext(settings, driver, host, plugins=codes)
    plugin_objects = [cls(ctx) for cls in prepared.classes]
    pipeline = Pipeline(plugin_objects, ctx)
    failover: FailoverPlugin | None = None
    efm: EfmPlugin | None = None
    for plugin in plugin_objects:
        if isinstance(plugin, FailoverPlugin) and not plugin.dormant():
            failover = plugin
        elif isinstance(plugin, EfmPlugin) and not plugin.dormant():
            efm = plugin
        adopt = getattr(plugin, "adopt", None)
        if adopt is not None:
            adopt(prepared.driver_args, sync_target)

    raw = await aio.open(target, prepared.driver_args, settings)
    try:
        bound = settings[CONNECT_TIMEOUT] or (failover.connect_timeout if failover else None)
        if forced_dialect is not None:
            # Bounded like the connect, as in the sync front: a server that stops answering
            # after the handshake gets its socket broken (the driver's network error goes up).
            with _abort_after(bound, raw, driver):
                ctx.extra["dialect"] = await _verify(aio, forced_dialect, raw)
        if failover is not None:
            if failover.on_connect is not None:
                await _maybe_await(failover.on_connect(raw))
            await _attach(aio, failover, raw, host, bound)
    except BaseException:
        await _close_quietly(raw)
        raise
    proxy = (proxy_class or aio.proxy_class)(aio, raw, target, prepared.driver_args, pipeline,
                                             host, failover, efm)
    pipeline.notify_connection_changed(ConnectionChanged(None, host, "connect"))
    if efm is not None:
        efm.attach(raw, host)  # the host's monitor starts now, before the first long statement
    return proxy


async def _close_quietly(raw: Any) -> None:
    close = getattr(raw, "close", None)
    if close is None:
        return
    with contextlib.suppress(Exception):
        result = close()
        if inspect.isawaitable(result):
            await result


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _asker(aio: _AioDriver, conn: Any) -> Callable[[str], Awaitable[Answer]]:
    """``dialects.base.ask`` for an asyncio connection (a failed check is an answer)."""
    driver = aio.driver

    async def ask(sql: str) -> Answer:
        try:
            rows = await aio.query(conn, sql)
        except Exception as exc:
            if driver.is_disconnect(exc):
                raise
            return Answer(error=f"{type(exc).__name__}: {exc}")
        return Answer(rows=tuple(tuple(r) for r in rows))

    return ask


async def _verify(aio: _AioDriver, forced: Any, raw: Any) -> Any:
    driver = aio.driver
    dialect = dialects.get_dialect(forced) if isinstance(forced, str) else forced
    family = dialects.family_of(driver)
    if dialect.family != family:
        # the same error the sync front raises (no I/O happens before it)
        return dialects.verify(dialect, driver, raw)
    verification = await run_async(dialects.verification_flow(dialect, family),
                                   _asker(aio, raw))
    if not verification.matched:
        raise dialects.mismatch_error(verification)
    return dialect


async def _detect(aio: _AioDriver, host: HostSpec, raw: Any) -> Any:
    driver = aio.driver
    key = (driver.code, host.host, host.port)
    known = dialects.known(key)
    if known is not None:
        return known
    detection = await run_async(dialects.detection_flow(dialects.family_of(driver)),
                                _asker(aio, raw))
    return dialects.remember(key, detection)


async def _attach(aio: _AioDriver, failover: FailoverPlugin, raw: Any, host: HostSpec,
                  bound: float | None) -> None:
    """The failover plugin's attach (cluster monitor, which instance this is) over the
    asyncio connection; failures are logged as in the sync front (failover then knows only
    the address connected to)."""
    driver = failover.ctx.driver
    try:
        with _abort_after(bound, raw, driver):
            dialect = failover.ctx.extra.get("dialect")
            if not isinstance(dialect, dialects.DatabaseDialect):
                dialect = await _detect(aio, host, raw)
                failover.ctx.extra["dialect"] = dialect
            await run_async(failover.attach_flow(host, dialect),
                            lambda sql: aio.query(raw, sql))
    except Exception as exc:
        if driver.is_disconnect(exc):
            log.info("connection lost while reading the topology; failover will handle it")
        else:
            log.warning("cannot read the cluster topology (%s); failover will reconnect to %s "
                        "only", exc, host, exc_info=log.isEnabledFor(logging.DEBUG))


class _AioDriver:
    """What differs between the asyncio drivers (everything else, the decisions included,
    is the blocking driver dialect's: :attr:`driver`)."""

    code: str
    #: The blocking driver dialect the plugins, flows and error classes use.
    driver: DriverDialect
    #: Ops that go through deadline, efm and failover.
    guarded: frozenset[Op] = _GUARDED
    #: The driver runs one call at a time on a connection itself (psycopg's lock) and
    #: resolves a cancelled task's statement itself (psycopg's cancel-and-wait): calls are
    #: then awaited as they are. Else the connection's turn is always taken, plugins or not,
    #: and every call goes through :meth:`statement`.
    self_settling: bool = True

    @property
    def proxy_class(self) -> type[AsyncConnectionProxy]:
        return AsyncConnectionProxy

    async def open(self, target: Callable[..., Awaitable[Any]], args: dict[str, Any],
                   settings: Any) -> Any:
        """One physical asyncio connection (``tcp_keepalive*`` applied)."""
        raise NotImplementedError

    async def query(self, conn: Any, sql: str) -> Rows:
        """``driver.query`` for an asyncio connection: an internal statement, plain tuples,
        the application's transaction state left as it was."""
        raise NotImplementedError

    def tx_before(self, raw: Any) -> Any:
        """The transaction snapshot taken before a call (``driver.was_in_transaction``)."""
        return None

    async def cancel(self, raw: Any, target: Callable[..., Awaitable[Any]],
                     args: dict[str, Any], grace: float) -> None:
        """Cancel the running statement on the server (raises if that failed)."""
        raise NotImplementedError

    async def apply_session(self, raw: Any, session: dict[str, Any]) -> None:
        raise NotImplementedError

    def closed(self, raw: Any) -> bool:
        raise NotImplementedError

    async def statement(self, proxy: AsyncConnectionProxy,
                        make: Callable[[], Awaitable[Any]]) -> Any:
        """Await one guarded call (what a cancelled task leaves behind is the driver's
        business)."""
        return await make()

    async def returned_after_deadline(self, raw: Any) -> tuple[bool, Exception | None]:
        """A call returned after its deadline fired: whether it counts as timed out (its
        pending answer is then discarded), and the error that answer held. psycopg: no, the
        result stands."""
        return False, None


class _PsycopgAio(_AioDriver):
    code = "psycopg"

    @property
    def driver(self) -> DriverDialect:  # type: ignore[override]
        return get_driver("psycopg")

    async def open(self, target: Callable[..., Awaitable[Any]], args: dict[str, Any],
                   settings: Any) -> Any:
        options = NetworkOptions.from_settings(settings)
        conn = await target(**self.driver.network_args(args, options))
        psycopg = _psycopg()
        if not isinstance(conn, psycopg.AsyncConnection):
            await _close_quietly(conn)
            raise ConfigurationError(
                f"target {describe_target(target)} returned {type(conn).__qualname__}, not a "
                "psycopg.AsyncConnection", parameter="target", value=describe_target(target))
        return conn

    async def query(self, conn: Any, sql: str) -> Rows:
        from psycopg import pq
        from psycopg.rows import tuple_row

        idle = pq.TransactionStatus.IDLE
        was_idle = conn.info.transaction_status == idle
        try:
            async with conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(sql, prepare=False)
                rows: Rows = await cur.fetchall() if cur.description else []
        finally:
            if was_idle and not conn.closed and conn.info.transaction_status != idle:
                await conn.rollback()
        return rows

    def tx_before(self, raw: Any) -> Any:
        return raw.pgconn.transaction_status

    async def cancel(self, raw: Any, target: Callable[..., Awaitable[Any]],
                     args: dict[str, Any], grace: float) -> None:
        await raw.cancel_safe(timeout=grace)

    async def apply_session(self, raw: Any, session: dict[str, Any]) -> None:
        for name in _SESSION_ORDER:
            if name in session:
                await getattr(raw, f"set_{name}")(session[name])

    def closed(self, raw: Any) -> bool:
        return bool(raw.closed)


#: mysql-connector session attributes, in the order they are applied to a new connection.
_MYSQL_SESSION_ORDER: Final = ("database", "autocommit", "time_zone", "sql_mode")


class _MysqlAio(_AioDriver):
    """``mysql.connector.aio`` (pure Python). Server-side cancel: ``KILL QUERY`` on a short
    side connection to the same server, as the blocking front does (the statement ends with
    error 1317, the session stays). A cancelled task's statement is settled the same way
    before the connection serves anything else (the driver itself would leave its answer
    unread on the socket)."""

    code = "mysql-connector"
    self_settling = False

    @property
    def proxy_class(self) -> type[AsyncConnectionProxy]:
        return AsyncMysqlConnectionProxy

    @property
    def driver(self) -> DriverDialect:  # type: ignore[override]
        from .drivers.mysql_connector_aio import MysqlConnectorAioDriver

        driver = _MYSQL_DRIVER.get("driver")
        if driver is None:
            driver = _MYSQL_DRIVER["driver"] = MysqlConnectorAioDriver()
        return driver

    async def open(self, target: Callable[..., Awaitable[Any]], args: dict[str, Any],
                   settings: Any) -> Any:
        from mysql.connector.aio import MySQLConnectionAbstract

        from .drivers.mysql_connector_aio import MysqlConnectorAioDriver

        driver = self.driver
        args = MysqlConnectorAioDriver.aio_args(args)
        # The driver bounds only the TCP connect by connection_timeout; the handshake and
        # the first statements get the same bound here (as the blocking dialect does).
        limit = args.get("connection_timeout")
        # Run as a task of its own: cancelled inside the driver's connect, the connection it
        # is opening would be nobody's (the driver gives no handle before it returns). A
        # cancelled caller leaves the task to finish (bounded by the driver's own timeouts)
        # and close what it opened; only the bound itself cancels it.
        opening = asyncio.ensure_future(target(**args))
        try:
            waited = asyncio.shield(opening)
            conn = await (asyncio.wait_for(waited, limit) if limit else waited)
        except TimeoutError:
            opening.cancel()
            raise
        except asyncio.CancelledError:
            opening.add_done_callback(_close_when_opened)
            raise
        if not isinstance(conn, MySQLConnectionAbstract):
            await _close_quietly(conn)
            raise ConfigurationError(
                f"target {describe_target(target)} returned {type(conn).__qualname__}, not a "
                "mysql.connector.aio connection (a pooled connection is not supported)",
                parameter="target", value=describe_target(target))
        try:
            driver.configure_socket(conn, NetworkOptions.from_settings(settings))
        except BaseException:
            await _close_quietly(conn)
            raise
        return conn

    async def query(self, conn: Any, sql: str) -> Rows:
        was_idle = not conn.in_transaction
        cur = await conn.cursor(buffered=True)
        try:
            await cur.execute(sql)
            rows: Rows = [tuple(r) for r in await cur.fetchall()] if cur.with_rows else []
        finally:
            await cur.close()
            if was_idle and conn.in_transaction:
                await conn.rollback()
        return rows

    async def cancel(self, raw: Any, target: Callable[..., Awaitable[Any]],
                     args: dict[str, Any], grace: float) -> None:
        from .drivers.mysql_connector import _SIDE_CONNECTION_DROP
        from .drivers.mysql_connector_aio import MysqlConnectorAioDriver

        connection_id = int(raw.connection_id)
        side_args = {k: v for k, v in MysqlConnectorAioDriver.aio_args(args).items()
                     if k not in _SIDE_CONNECTION_DROP}
        side_args["host"] = raw.server_host
        side_args["port"] = raw.server_port
        side_args["connection_timeout"] = max(1, math.ceil(grace))  # whole seconds

        async def kill() -> None:
            side = await target(**side_args)
            try:
                cur = await side.cursor()
                await cur.execute(f"KILL QUERY {connection_id}")
                await cur.close()
            finally:
                await _close_quietly(side)

        await asyncio.wait_for(kill(), grace)

    async def apply_session(self, raw: Any, session: dict[str, Any]) -> None:
        for name in _MYSQL_SESSION_ORDER:
            if name in session:
                await getattr(raw, f"set_{name}")(session[name])
        if "read_only" in session:
            mode = "READ ONLY" if session["read_only"] else "READ WRITE"
            await raw.cmd_query(f"SET SESSION TRANSACTION {mode}")

    def closed(self, raw: Any) -> bool:
        return not raw.is_socket_connected() or self.driver.is_closed(raw)

    async def statement(self, proxy: AsyncConnectionProxy,
                        make: Callable[[], Awaitable[Any]]) -> Any:
        inner = asyncio.ensure_future(make())
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            if not inner.done():
                # Not cancelled itself (the driver would leave its answer on the socket):
                # ended on the server, its answer read, before the turn is passed on.
                await _wait_uncancelled(self._settle(proxy, inner))
            raise

    async def _settle(self, proxy: AsyncConnectionProxy, inner: asyncio.Future[Any]) -> None:
        raw = proxy._raw
        grace = proxy._grace
        try:
            await self.cancel(raw, proxy._target, proxy._args, grace)
        except Exception as exc:
            log.info("server-side cancel of a cancelled task's statement failed: %r", exc)
        done, _ = await asyncio.wait({inner}, timeout=grace)
        if not done:
            log.info("a cancelled task's statement did not end %.3g s after the cancel; "
                     "broke the connection", grace)
            self.driver.abort(raw)
            await asyncio.wait({inner}, timeout=grace)
        if inner.done() and not inner.cancelled():
            inner.exception()  # retrieved: the cancelled task is not told
            await self._discard(raw, grace)

    async def returned_after_deadline(self, raw: Any) -> tuple[bool, Exception | None]:
        # MySQL sends a result's header before its rows: an interrupted SELECT "returns" and
        # the interruption (1317) is what its rows would have been (as on the blocking front).
        return True, await self._discard(raw, 1.0)

    async def _discard(self, raw: Any, grace: float) -> Exception | None:
        """Read and drop an answer left on the connection (bounded; else broken); the
        server's error it held, if any."""
        if not getattr(raw, "unread_result", False):
            return None
        try:
            await asyncio.wait_for(raw.consume_results(), grace)
        except Exception as exc:
            # The server's error in place of the rows (1317 after KILL QUERY) is the answer
            # read to its end; anything else leaves the protocol state unknown.
            if self.driver.is_disconnect(exc) or getattr(raw, "unread_result", False) or (
                    isinstance(exc, TimeoutError)):
                log.info("could not read the rest of an abandoned answer (%r); broke the "
                         "connection", exc)
                self.driver.abort(raw)
            return exc
        return None


def _close_when_opened(task: asyncio.Future[Any]) -> None:
    """Done callback of a connect nobody awaits any more: close what it opened."""
    if task.cancelled() or task.exception() is not None:
        return
    closing = asyncio.ensure_future(_close_quietly(task.result()))
    _CLOSING.add(closing)
    closing.add_done_callback(_CLOSING.discard)


_CLOSING: set[asyncio.Future[None]] = set()  # strong references until the close is done
_MYSQL_DRIVER: dict[str, DriverDialect] = {}
_PSYCOPG: Final = _PsycopgAio()
_MYSQL: Final = _MysqlAio()


async def _wait_uncancelled(coro: Awaitable[None]) -> None:
    """Run ``coro`` to its end even if the awaiting task is cancelled again meanwhile (the
    cancellation is then delivered when it ends)."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()


class _Fired:
    """Whether an ``_abort_after`` bound fired (truthy)."""

    __slots__ = ("fired",)

    def __init__(self) -> None:
        self.fired = False

    def __bool__(self) -> bool:
        return self.fired


@contextlib.contextmanager
def _abort_after(timeout: float | None, raw: Any, driver: DriverDialect) -> Iterator[_Fired]:
    """``watchdog.abort_after`` on the event loop: break ``raw``'s socket if the block is
    still running ``timeout`` seconds from now (the awaited statement then fails at once with
    the driver's network error, instead of psycopg's own cancel-and-wait on cancellation)."""
    state = _Fired()
    if timeout is None:
        yield state
        return

    def fire() -> None:
        state.fired = True
        driver.abort(raw)

    handle = asyncio.get_running_loop().call_later(timeout, fire)
    try:
        yield state
    finally:
        handle.cancel()


class _Deadline:
    """One statement's deadline on the event loop (see the module docstring)."""

    __slots__ = ("aio", "args", "broken", "cancel_task", "cancelled", "expired", "grace",
                 "grace_handle", "handle", "raw", "target", "timeout")

    def __init__(self, aio: _AioDriver, raw: Any, target: Callable[..., Awaitable[Any]],
                 args: dict[str, Any], timeout: float, grace: float) -> None:
        self.aio = aio
        self.raw = raw
        self.target = target
        self.args = args
        self.timeout = timeout
        self.grace = grace
        self.expired = False
        self.cancelled = False
        self.broken = False
        self.cancel_task: asyncio.Task[None] | None = None
        self.grace_handle: asyncio.TimerHandle | None = None
        self.handle = asyncio.get_running_loop().call_later(timeout, self._expire)

    def _expire(self) -> None:
        self.expired = True
        loop = asyncio.get_running_loop()
        self.cancel_task = loop.create_task(self._cancel())
        self.grace_handle = loop.call_later(self.grace, self._break)

    async def _cancel(self) -> None:
        try:
            await self.aio.cancel(self.raw, self.target, self.args, self.grace)
            self.cancelled = True
        except Exception as exc:
            log.info("server-side cancel failed: %r", exc)

    def _break(self) -> None:
        if not self.broken:
            self.broken = self.aio.driver.abort(self.raw)
            log.info("statement deadline: no answer %.3g s after the cancel; broke the "
                     "connection", self.grace)

    async def settle(self) -> None:
        """The statement ended after the deadline fired: let the cancel land (bounded by the
        grace; then the socket is broken) before the next statement can start."""
        if self.grace_handle is not None:
            self.grace_handle.cancel()
        task = self.cancel_task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=self.grace)
            if not done:
                task.cancel()
                self._break()

    def stop(self, *, cancelled: bool = False) -> None:
        """The statement ended. ``cancelled``: its task was cancelled, and psycopg settles
        the statement itself; the socket is then never broken later by this deadline."""
        self.handle.cancel()
        if (cancelled or not self.expired) and self.grace_handle is not None:
            self.grace_handle.cancel()

    def error(self, proxy: AsyncConnectionProxy) -> QueryTimeoutError:
        if self.broken:
            outcome = ("the server did not end it within query_timeout_grace="
                       f"{self.grace:g} s, so the connection was broken (it is closed now)")
        elif self.cancelled:
            outcome = "it was cancelled on the server; the connection is usable"
        else:
            outcome = "the cancel could not be confirmed; the connection is usable"
        host = str(proxy._host)
        ctx = proxy._pipeline.ctx
        ctx.decide("statement.deadline_expired", None, **{
            "resilient_db.deadline.timeout": self.timeout,
            "resilient_db.deadline.cancelled": self.cancelled and not self.broken,
            "resilient_db.deadline.socket_broken": self.broken,
            "server.address": host})
        err = ctx.driver.error(
            QueryTimeoutError,
            f"statement deadline of {self.timeout:g} s expired on {host}: {outcome}",
            timeout=self.timeout, cancelled=self.cancelled and not self.broken, host=host)
        assert isinstance(err, QueryTimeoutError)
        return err


class _AsyncFailover:
    """Drives the failover plugin's decisions with awaits for one asyncio connection (the
    async twin of ``FailoverPlugin._fail_over``/``_reconnect``/``_try_once``: the same flow,
    the I/O awaited)."""

    __slots__ = ("lock", "plugin", "proxy_ref")

    def __init__(self, plugin: FailoverPlugin, proxy: AsyncConnectionProxy) -> None:
        self.plugin = plugin
        self.proxy_ref = weakref.ref(proxy)
        self.lock = asyncio.Lock()

    @property
    def proxy(self) -> AsyncConnectionProxy:
        proxy = self.proxy_ref()
        assert proxy is not None
        return proxy

    async def on_error(self, call: Call, exc: Exception, tx_before: Any,
                       retried: bool) -> object:
        """``None``: re-raise ``exc``; ``_RETRY``: run the statement again (idempotent, no
        transaction, reconnected); else raises the failover outcome."""
        plugin = self.plugin
        swaps = plugin._swaps
        trigger = plugin.trigger_of(call, exc)
        if trigger == CHECK_ROLE:
            trigger = await self._read_only_trigger(call)
        if trigger is None:
            return None
        return await self._fail_over(call, exc, trigger, swaps, tx_before, retried)

    async def _read_only_trigger(self, call: Call) -> str | None:
        plugin = self.plugin
        driver = plugin.ctx.driver
        raw = call.raw
        dialect, addressing = plugin._dialect, plugin._addressing
        report = None
        try:
            if dialect is not None and addressing is not None:
                if driver.transaction_status(raw) in (TxStatus.IDLE, TxStatus.IN_TRANSACTION):
                    here = Host(plugin.ctx.host.host, addressing.default_port,
                                instance_id=plugin.instance_id)
                    aio = self.proxy._aio
                    with _abort_after(plugin.probe_timeout, raw, driver):
                        report = await run_async(self_report_flow(dialect, here, addressing),
                                                 lambda sql: aio.query(raw, sql))
                else:
                    # Inside a failed transaction: the plugin asks the same instance on a
                    # short side connection of its own (blocking, bounded by the probe
                    # timeout): on a thread.
                    report = await asyncio.to_thread(plugin._role_report, raw)
        except Exception as exc:
            if driver.is_disconnect(exc):
                return "network"
            log.debug("role check failed: %r", exc)
            report = None
        return plugin.read_only_verdict(report, self.proxy._host)

    async def _fail_over(self, call: Call, exc: Exception, trigger: str, swaps: int,
                         tx_before: Any, retried: bool) -> object:
        plugin = self.plugin
        proxy = self.proxy
        started = time.monotonic()
        redoable = call.op in _REDOABLE
        statement_sent = trigger == "network" and not redoable
        idempotent = redoable or current_options().idempotent is True
        async with self.lock:
            old_raw = proxy._raw
            failed = proxy._host
            in_transaction = plugin._in_transaction(call, old_raw, tx_before)
            if plugin._swaps != swaps:
                host = proxy._host
                log.info("connection already failed over to %s by another task", host)
                outcome = classify_outcome(in_transaction=in_transaction,
                                           statement_sent=statement_sent, reconnected=True,
                                           idempotent=idempotent)
                get_decision_sink().record(outcome.to_decision())
            else:
                with decision_span("failover", plugin.code, {
                        "server.address": failed.host, "error.type": type(exc).__name__,
                        "resilient_db.failover.trigger": trigger,
                        "resilient_db.failover.mode": plugin.mode.value,
                        "resilient_db.failover.in_transaction": in_transaction}) as span:
                    log.info("%s on %s (%s): failing over (%s)", "connection lost"
                             if trigger == "network" else "instance is read-only",
                             failed, type(exc).__name__, plugin.mode.value)
                    monitor = plugin.monitor()
                    if trigger == "network":
                        monitor.mark_down(plugin._failed_host(failed, monitor))
                    try:
                        await self._reconnect(monitor, started)
                    except _NoConnectionError as none:
                        raise plugin.failed_error(span, exc, failed, started, none.attempts,
                                                  in_transaction=in_transaction,
                                                  statement_sent=statement_sent) from exc
                    plugin.ctx.driver.abort(old_raw)
                    await _close_quietly(old_raw)
                    host = proxy._host
                    log.info("failed over from %s to %s (instance %s) in %.0f ms", failed,
                             host, plugin.instance_id, (time.monotonic() - started) * 1000)
                    outcome = classify_outcome(in_transaction=in_transaction,
                                               statement_sent=statement_sent,
                                               reconnected=True, idempotent=idempotent)
                    get_decision_sink().record(outcome.to_decision())
                    span.set(**{"resilient_db.failover.outcome": outcome.error.__name__,
                                "server.address": host.host, "server.port": host.port,
                                "resilient_db.instance.id": plugin.instance_id})
        if not retried and idempotent and outcome.error is FailoverSuccessError:
            log.info("running the interrupted %s again on %s (idempotent)", call.method, host)
            return _RETRY
        raise plugin.outcome_error(outcome, exc, failed, host, statement_sent) from exc

    async def _reconnect(self, monitor: TopologyMonitor, started: float) -> None:
        attempts: list[ConnectAttempt] = []
        flow = self.plugin.reconnect_flow(monitor, started, started, attempts)
        reply: Any = None
        try:
            while True:
                step = flow.send(reply)
                if isinstance(step, PlanStep):
                    reply = await self._plan(monitor, step)
                elif isinstance(step, TryStep):
                    reply = await self._try(monitor, step.attempt, step.remaining, attempts)
                else:
                    await asyncio.sleep(step.delay)
                    reply = None
        except StopIteration:
            return
        finally:
            flow.close()

    async def _plan(self, monitor: TopologyMonitor, step: PlanStep) -> FailoverPlan | None:
        """The plugin's plan, polling the monitor (never waiting on its condition: that
        would block the loop) until a writer is verified or the budget is spent."""
        deadline = None if step.remaining is None else time.monotonic() + step.remaining
        while True:
            plan = self.plugin._plan(monitor, step.since, 0.0)
            if plan is not None:
                return plan
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            await asyncio.sleep(_POLL if left is None else min(_POLL, left))

    async def _try(self, monitor: TopologyMonitor, attempt: Attempt, remaining: float | None,
                   attempts: list[ConnectAttempt]) -> bool:
        plugin = self.plugin
        with plugin.attempt_span(attempt) as span:
            before = len(attempts)
            ok = await self._try_once(monitor, attempt, remaining, attempts)
            plugin.attempt_result(span, ok, attempts, before)
            return ok

    async def _try_once(self, monitor: TopologyMonitor, attempt: Attempt,
                        remaining: float | None, attempts: list[ConnectAttempt]) -> bool:
        plugin = self.plugin
        proxy = self.proxy
        host = attempt.host
        start = time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        timeout = plugin.attempt_timeout(remaining)
        spec = HostSpec(host.host, host.port)
        args = plugin.attempt_args(spec, timeout)
        aio = proxy._aio
        try:
            raw = await aio.open(proxy._target, args, plugin.ctx.settings)
        except Exception as exc:
            attempts.append(ConnectAttempt(host.host, host.port, "connect failed", repr(exc),
                                           time.monotonic() - start))
            monitor.mark_down(host)
            return False
        problem: str | None = None
        report = None
        try:
            assert plugin._dialect is not None and plugin._addressing is not None
            dialect, addressing = plugin._dialect, plugin._addressing
            with _abort_after(timeout, raw, aio.driver) as fired:
                try:
                    report = await run_async(
                        self_report_flow(dialect, host, addressing, with_topology=False),
                        lambda sql: aio.query(raw, sql))
                    problem = FailoverPlugin._role_problem(report, attempt)
                    if problem is None:
                        await aio.apply_session(raw, proxy._session)
                except Exception as exc:
                    problem = f"failed after connecting: {exc!r}"
                    if fired:
                        problem = f"no answer within {timeout:g} s after connecting ({exc!r})"
            if problem is None and plugin.on_connect is not None:
                try:
                    await _maybe_await(plugin.on_connect(raw))
                except Exception as exc:
                    problem = f"failed after connecting: {exc!r}"
        except BaseException:  # cancelled: the new connection is nobody's
            await _close_quietly(raw)
            raise
        if problem is not None:
            attempts.append(ConnectAttempt(host.host, host.port, problem, None,
                                           time.monotonic() - start))
            await _close_quietly(raw)
            return False
        assert report is not None
        proxy._install(raw, spec, "failover")
        plugin.installed(report, monitor)
        return True


class AsyncConnectionProxy:
    """An asyncio connection wrapping one ``psycopg.AsyncConnection`` at a time (it changes
    after a failover: do not keep ``resilient.raw``). Methods that do I/O are awaited as on
    psycopg's own connection; attributes that do none pass through."""

    _OWN: Final = frozenset({
        "_aio", "_raw", "_target", "_args", "_pipeline", "_host", "_session", "_closed_by_us",
        "_cursors", "_failover", "_efm", "_shell", "_timeout", "_grace", "_turn",
        "__weakref__"})

    __slots__ = ("__weakref__", "_aio", "_args", "_closed_by_us", "_cursors", "_efm",
                 "_failover", "_grace", "_host", "_pipeline", "_raw", "_session", "_shell",
                 "_target", "_timeout", "_turn")
    _aio: _AioDriver
    _raw: Any
    _target: Callable[..., Awaitable[Any]]
    _args: dict[str, Any]
    _pipeline: Pipeline
    _host: HostSpec
    _session: dict[str, Any]
    _closed_by_us: bool
    _cursors: weakref.WeakSet[AsyncCursorProxy]
    _failover: FailoverPlugin | None
    _efm: EfmPlugin | None
    _shell: _AsyncFailover | None
    _timeout: float | None
    _grace: float
    _turn: asyncio.Lock

    def __init__(self, aio: _AioDriver, raw: Any, target: Callable[..., Awaitable[Any]],
                 args: dict[str, Any], pipeline: Pipeline, host: HostSpec,
                 failover: FailoverPlugin | None, efm: EfmPlugin | None) -> None:
        own = object.__setattr__
        settings = pipeline.ctx.settings
        own(self, "_aio", aio)
        own(self, "_raw", raw)
        own(self, "_target", target)
        own(self, "_args", args)
        own(self, "_pipeline", pipeline)
        own(self, "_host", host)
        own(self, "_session", {})
        own(self, "_closed_by_us", False)
        own(self, "_cursors", weakref.WeakSet())
        own(self, "_failover", failover)
        own(self, "_efm", efm)
        own(self, "_shell", _AsyncFailover(failover, self) if failover is not None else None)
        own(self, "_timeout", settings[SOCKET_TIMEOUT] or None)
        grace = settings[QUERY_TIMEOUT_GRACE]
        own(self, "_grace", 1.0 if grace is None else grace)
        own(self, "_turn", asyncio.Lock())

    # --- resilient_db surface -----------------------------------------------------------
    @property
    def resilient(self) -> AsyncResilientView:
        return AsyncResilientView(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._raw, name, value)  # psycopg's own error for autocommit & co.

    def _install(self, raw: Any, host: HostSpec, reason: str) -> None:
        """Swap the physical connection (session state already applied to ``raw``)."""
        old = self._host
        object.__setattr__(self, "_raw", raw)
        object.__setattr__(self, "_host", host)
        for cursor in list(self._cursors):
            cursor._mark_stale()
        self._pipeline.notify_connection_changed(ConnectionChanged(old, host, reason))

    # --- the one path every awaited call takes ------------------------------------------
    async def _run(self, op: Op, method: str, make: Callable[[], Awaitable[Any]]) -> Any:
        if op not in self._aio.guarded or self._closed_by_us:
            return await make()
        if self._timeout is None and not _options._deadlines_enabled and (
                self._shell is None and self._efm is None and self._aio.self_settling):
            return await make()  # no plugin, no deadline: psycopg's own call
        timeout = _options._current.get().timeout
        if timeout is None:
            timeout = self._timeout
        # The connection's turn: tasks sharing the connection run their statements one after
        # the other (psycopg would too), so a deadline's server-side cancel always hits the
        # statement it belongs to; a deadline that expires while waiting for the turn sends
        # nothing and touches nobody else's statement.
        turn = self._turn
        if timeout and turn.locked():
            started = time.monotonic()
            try:
                await asyncio.wait_for(turn.acquire(), timeout)
            except TimeoutError:
                raise self._waited_out(timeout) from None
            timeout = max(1e-3, timeout - (time.monotonic() - started))
        else:
            await turn.acquire()
        try:
            result = await self._guarded(op, method, make, timeout, False)
            if result is _RETRY:
                result = await self._guarded(op, method, make, timeout, True)
            return result
        finally:
            turn.release()

    def _waited_out(self, timeout: float) -> QueryTimeoutError:
        host = str(self._host)
        ctx = self._pipeline.ctx
        ctx.decide("statement.deadline_expired", None, **{
            "resilient_db.deadline.timeout": timeout, "resilient_db.deadline.cancelled": False,
            "resilient_db.deadline.socket_broken": False, "server.address": host})
        err = ctx.driver.error(
            QueryTimeoutError,
            f"statement deadline of {timeout:g} s expired on {host}: it expired while waiting "
            "for the connection, held by another task's statement; nothing was sent and that "
            "statement was left alone; the connection is usable",
            timeout=timeout, cancelled=False, host=host)
        assert isinstance(err, QueryTimeoutError)
        return err

    async def _guarded(self, op: Op, method: str, make: Callable[[], Awaitable[Any]],
                       timeout: float | None, retried: bool) -> Any:
        """One try of a call through deadline, efm and failover; ``_RETRY``: run it again
        (failed over, idempotent, no transaction open)."""
        raw = self._raw
        shell = self._shell
        efm = self._efm
        aio = self._aio
        tx_before = aio.tx_before(raw) if shell is not None else None
        deadline = (_Deadline(aio, raw, self._target, self._args, timeout, self._grace)
                    if timeout else None)
        if efm is not None:
            if not efm.attached:
                efm.attach(raw, self._host)
            efm.flight_raw = raw
            efm.due = time.monotonic() + efm.grace
        try:
            result = await (make() if aio.self_settling else aio.statement(self, make))
        except Exception as exc:
            if efm is not None:
                efm.due = _INF
                efm.explain(raw, exc)
            if deadline is not None:
                deadline.stop()
                if deadline.expired:
                    await deadline.settle()
                    driver = self._pipeline.ctx.driver
                    # A disconnect the deadline did not cause (efm, the server went away)
                    # is for failover, as in the sync front.
                    if deadline.broken or not driver.is_disconnect(exc):
                        raise deadline.error(self) from exc
            if shell is None:
                raise
            call = Call(op, method, make, (), {}, self, raw)
            verdict = await shell.on_error(call, exc, tx_before, retried)
            if verdict is _RETRY:
                return _RETRY
            raise
        except BaseException:  # cancelled: the driver resolves its own statement
            if efm is not None:
                efm.due = _INF
            if deadline is not None:
                deadline.stop(cancelled=True)
            raise
        if efm is not None:
            efm.due = _INF
        if deadline is not None:
            deadline.stop()
            if deadline.expired:
                await deadline.settle()
                timed_out, cause = await aio.returned_after_deadline(raw)
                if timed_out:
                    raise deadline.error(self) from cause
        return result

    # --- psycopg's AsyncConnection API --------------------------------------------------
    def cursor(self, *args: Any, **kwargs: Any) -> AsyncCursorProxy:
        try:
            raw = self._raw.cursor(*args, **kwargs)
        except Exception as exc:
            if self._closed_by_us or self._shell is None or not (
                    self._pipeline.ctx.driver.is_disconnect(exc)):
                raise
            raw = None  # a lost connection: opened at the first use, through failover
        cursor = AsyncCursorProxy(raw, self, (args, kwargs))
        self._cursors.add(cursor)
        return cursor

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> AsyncCursorProxy:
        cursor = self.cursor()
        await cursor._execute("Connection.execute", query, params, kwargs)
        return cursor

    async def commit(self) -> None:
        # A lambda: the driver connection is read when the call runs (after a failover,
        # a retried call runs on the new one).
        await self._run(_COMMIT, "Connection.commit", lambda: self._raw.commit())  # noqa: PLW0108

    async def rollback(self) -> None:
        await self._run(_ROLLBACK, "Connection.rollback",
                        lambda: self._raw.rollback())  # noqa: PLW0108

    async def close(self) -> None:
        """Final: from here on every call gets psycopg's own "the connection is closed"
        error, and nothing reconnects it."""
        object.__setattr__(self, "_closed_by_us", True)
        try:
            await self._raw.close()
        finally:
            self._pipeline.close(self._host)

    async def set_autocommit(self, value: bool) -> None:
        await self._set_session("autocommit", value)

    async def set_read_only(self, value: bool | None) -> None:
        await self._set_session("read_only", value)

    async def set_isolation_level(self, value: Any) -> None:
        await self._set_session("isolation_level", value)

    async def set_deferrable(self, value: bool | None) -> None:
        await self._set_session("deferrable", value)

    async def _set_session(self, name: str, value: Any) -> None:
        await self._run(_SESSION, f"Connection.set_{name}",
                        lambda: getattr(self._raw, f"set_{name}")(value))
        self._session[name] = value  # restored on the connection failover opens

    @contextlib.asynccontextmanager
    async def transaction(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """psycopg's ``transaction()`` block; entering and leaving it go through failover
        (leaving it commits: a connection lost then gives ``TransactionResolutionUnknown``)."""
        cm = self._raw.transaction(*args, **kwargs)
        tx = await self._run(_TRANSACTION, "Connection.transaction.__enter__",
                             cm.__aenter__)
        try:
            yield tx
        except BaseException as exc:
            error = exc
            if not await self._run(_TRANSACTION, "Connection.transaction.__exit__",
                                   lambda: cm.__aexit__(type(error), error,
                                                        error.__traceback__)):
                raise
        else:
            await self._run(_TRANSACTION, "Connection.transaction.__exit__",
                            lambda: cm.__aexit__(None, None, None))

    async def __aenter__(self) -> AsyncConnectionProxy:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """As psycopg's: commit (or roll back after an error), then close."""
        if self._closed_by_us or self._aio.closed(self._raw):
            return
        try:
            if exc_type is None:
                await self.commit()
            else:
                try:
                    await self.rollback()
                except Exception as rollback_error:
                    log.warning("error ignored in rollback on %s: %s", self._host,
                                rollback_error)
        finally:
            await self.close()

    def __repr__(self) -> str:
        plugins = ",".join(p.code for p in self._pipeline.plugins) or "none"
        return f"<resilient_db async connection to {self._host} plugins={plugins}>"


class AsyncResilientView:
    """resilient_db's accessors for one asyncio connection: ``conn.resilient``."""

    __slots__ = ("_proxy",)

    def __init__(self, proxy: AsyncConnectionProxy) -> None:
        self._proxy = proxy

    @property
    def raw(self) -> Any:
        return self._proxy._raw

    @property
    def host(self) -> HostSpec:
        return self._proxy._host

    @property
    def session_state(self) -> dict[str, Any]:
        return dict(self._proxy._session)

    @property
    def pipeline(self) -> Pipeline:
        return self._proxy._pipeline

    @property
    def plugins(self) -> tuple[str, ...]:
        return tuple(p.code for p in self._proxy._pipeline.plugins)

    def plugin(self, code: str) -> Any:
        return self._proxy._pipeline.plugin(code)


class AsyncCursorProxy:
    """An asyncio cursor wrapping one ``psycopg.AsyncCursor``; after a failover it opens a
    new one on the new connection (same arguments) at its next use."""

    __slots__ = ("__weakref__", "_args", "_closed", "_conn", "_cur")
    _cur: Any

    def __init__(self, raw: Any, conn: AsyncConnectionProxy,
                 args: tuple[tuple[Any, ...], dict[str, Any]]) -> None:
        self._cur = raw
        self._conn = conn
        self._args = args
        self._closed = False

    def _mark_stale(self) -> None:
        self._cur = None

    def _live(self) -> Any:
        raw = self._cur
        if raw is None:
            args, kwargs = self._args
            raw = self._cur = self._conn._raw.cursor(*args, **kwargs)
        return raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in AsyncCursorProxy.__slots__:
            object.__setattr__(self, name, value)
        else:
            setattr(self._live(), name, value)

    @property
    def connection(self) -> AsyncConnectionProxy:
        return self._conn

    async def _open(self) -> Any:
        return self._live()

    async def _execute(self, method: str, query: Any, params: Any,
                       kwargs: dict[str, Any]) -> None:
        if self._cur is None:
            await self._conn._run(_CURSOR, "Connection.cursor", self._open)
        await self._conn._run(_EXECUTE, method,
                              lambda: self._live().execute(query, params, **kwargs))

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> AsyncCursorProxy:
        # _execute spelled out: one coroutine level less on the per-statement path.
        raw = self._cur
        if raw is None:
            await self._conn._run(_CURSOR, "Connection.cursor", self._open)
        await self._conn._run(_EXECUTE, "Cursor.execute",
                              lambda: self._live().execute(query, params, **kwargs))
        return self

    async def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        await self._conn._run(_EXECUTEMANY, "Cursor.executemany",
                              lambda: self._live().executemany(query, params_seq, **kwargs))

    async def fetchone(self) -> Any:
        return await self._live().fetchone()

    async def fetchmany(self, size: int = 0) -> list[Any]:
        rows: list[Any] = await self._live().fetchmany(size)
        return rows

    async def fetchall(self) -> list[Any]:
        rows: list[Any] = await self._live().fetchall()
        return rows

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._live().__aiter__()  # type: ignore[no-any-return]

    async def close(self) -> None:
        self._closed = True
        raw = self._cur
        if raw is not None:
            await raw.close()

    async def __aenter__(self) -> AsyncCursorProxy:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<resilient_db async cursor raw={self._cur!r}>"


class AsyncMysqlConnectionProxy(AsyncConnectionProxy):
    """An asyncio connection wrapping one ``mysql.connector.aio`` connection at a time: its
    API (``await conn.cursor()``, ``set_autocommit`` & co., ``start_transaction``), with the
    calls that do I/O through deadline, efm and failover. ``set_read_only`` is resilient_db's,
    as on the blocking front: ``SET SESSION TRANSACTION READ ONLY`` (``READ WRITE``),
    re-applied after a failover like the other session attributes."""

    __slots__ = ()

    async def cursor(self, *args: Any, **kwargs: Any) -> AsyncMysqlCursorProxy:  # type: ignore[override]
        cursor = AsyncMysqlCursorProxy(None, self, (args, kwargs))
        await self._run(_CURSOR, "Connection.cursor", cursor._open)
        self._cursors.add(cursor)
        return cursor

    async def execute(self, query: Any, params: Any = None,
                      **kwargs: Any) -> AsyncMysqlCursorProxy:
        raise AttributeError("a mysql.connector.aio connection has no execute(): use "
                             "await (await conn.cursor()).execute(...)")

    async def start_transaction(self, *args: Any, **kwargs: Any) -> None:
        await self._run(_TRANSACTION, "Connection.start_transaction",
                        lambda: self._raw.start_transaction(*args, **kwargs))

    async def set_database(self, value: str) -> None:
        await self._set_session("database", value)

    async def set_time_zone(self, value: str) -> None:
        await self._set_session("time_zone", value)

    async def set_sql_mode(self, value: Any) -> None:
        await self._set_session("sql_mode", value)

    async def set_read_only(self, value: bool | None) -> None:
        mode = "READ ONLY" if value else "READ WRITE"
        await self._run(_SESSION, "Connection.set_read_only",
                        lambda: self._raw.cmd_query(f"SET SESSION TRANSACTION {mode}"))
        self._session["read_only"] = bool(value)

    async def set_isolation_level(self, value: Any) -> None:
        raise AttributeError("mysql.connector.aio has no set_isolation_level(); use "
                             "start_transaction(isolation_level=...)")

    async def set_deferrable(self, value: bool | None) -> None:
        raise AttributeError("MySQL has no deferrable transactions")

    @property
    def read_only(self) -> bool:
        return bool(self._session.get("read_only", False))

    def transaction(self, *args: Any, **kwargs: Any) -> Any:
        raise AttributeError("a mysql.connector.aio connection has no transaction(): use "
                             "start_transaction() and commit()/rollback()")


class AsyncMysqlCursorProxy(AsyncCursorProxy):
    """A ``mysql.connector.aio`` cursor; after a failover a new one is opened on the new
    connection (same arguments) at its next ``execute``. Fetches read from the cursor as it
    is (an unbuffered cursor's rows are read by them, unguarded, as on the blocking front)."""

    __slots__ = ()

    def _live(self) -> Any:
        raw = self._cur
        if raw is None:
            from mysql.connector import errors as myerrors

            raise myerrors.InterfaceError(
                "the cursor's connection was replaced (failover): execute a statement first")
        return raw

    async def _open(self) -> Any:
        if self._cur is None:
            args, kwargs = self._args
            self._cur = await self._conn._raw.cursor(*args, **kwargs)
        return self._cur

    async def _execute(self, method: str, query: Any, params: Any,
                       kwargs: dict[str, Any]) -> None:
        args = () if params is None else (params,)
        await self._conn._run(_EXECUTE, method,
                              lambda: self._call("execute", query, *args, **kwargs))

    async def execute(self, query: Any, params: Any = None,
                      **kwargs: Any) -> AsyncMysqlCursorProxy:
        # A retried call (failed over, idempotent) opens its cursor on the new connection.
        await self._execute("Cursor.execute", query, params, kwargs)
        return self

    async def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        await self._conn._run(_EXECUTEMANY, "Cursor.executemany",
                              lambda: self._call("executemany", query, params_seq, **kwargs))

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        cur = await self._open()
        return await getattr(cur, name)(*args, **kwargs)

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        rows: list[Any] = await self._live().fetchmany(size)
        return rows
