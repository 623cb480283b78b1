"""psycopg_pool over resilient_db: pooled connections that fail over, and a pool that drops
the ones left pinned to a demoted writer.

    from resilient_db.integrations.psycopg_pool import ResilientConnectionPool

    with ResilientConnectionPool("host=db.cluster-xyz.rds.amazonaws.com dbname=app user=app",
                                 plugins="failover,efm", failover_timeout_sec=30,
                                 min_size=4, max_size=10) as pool:
        with pool.connection() as conn:
            conn.execute("INSERT INTO t VALUES (1)")

Two pieces:

- :class:`PooledConnection`: the ``connection_class`` psycopg_pool builds connections with.
  Its ``connect(conninfo, **kwargs)`` opens a resilient_db connection
  (``resilient_db.connect(psycopg.Connection.connect, ...)``); ``kwargs`` carries resilient_db
  properties (``plugins`` included) next to psycopg's arguments, split as everywhere. It is a
  psycopg connection proxy with what psycopg_pool needs of a ``psycopg.Connection``: the
  attributes the pool sets on its connections (``_pool``, ``_created_at``, ``_expire_at``)
  live on the proxy, so they survive a failover that replaces the physical connection;
  ``with conn:`` commits or rolls back and closes only a connection that belongs to no pool
  (psycopg's rule); ``close()`` returns the connection to a ``close_returns=True`` pool. The
  rest (``pgconn.transaction_status``, ``closed``, ``broken``, ``autocommit``, ``execute``)
  is the proxy's: I/O through the pipeline, the rest read from the current physical
  connection. Plain proxies (``resilient_db.connect``) are untouched: the pool's cost is on
  this class only.
- :class:`ResilientConnectionPool`: a ``psycopg_pool.ConnectionPool`` of those, taking
  resilient_db properties as keyword arguments. On top of the stock pool: a connection opened
  before the cluster's writer changed (its ``failover`` plugin reports ``stale``) and that
  nothing else moves (no ``aurora_connection_tracker`` among its plugins) is **evicted** when
  it is checked out, returned, or met by :meth:`~ResilientConnectionPool.check`: closed, and
  replaced by a new connection, which reaches the new writer. It is the same test, and the
  same lazy epoch mechanism, as the SQLAlchemy dialects' checkout hook
  (``resilient_db.integrations._stale``). A failover outcome that leaves the connection
  working on the new writer (``FailoverSuccessError``, ``TransactionResolutionUnknownError``)
  raised during a health check (``check=`` callback, :meth:`check`) counts as alive: the
  connection is kept. ``close()`` closes the pooled connections, which releases their
  monitors (the topology monitor and host monitors stop ``monitor_disposal_time_ms`` after
  their last connection), like ``engine.dispose()`` for SQLAlchemy.

What the application sees: failover outcomes are raised from the statement (or the commit of
``with pool.connection()``) that met the failure, as with a single connection
(docs/errors.md); the connection is then on the new writer and goes back to the pool as a
healthy one. ``FailoverFailedError`` leaves the connection closed: the pool discards it and
opens another.

For asyncio, :class:`AsyncPooledConnection` (a ``resilient_db.connect_async`` proxy) and
:class:`ResilientAsyncConnectionPool` (a ``psycopg_pool.AsyncConnectionPool``) are the same
two pieces, awaited, with ``connect_async``'s plugins.

psycopg_pool offers no hook for checkout-time eviction, so :class:`ResilientConnectionPool`
uses two of its internals (``_close_connection`` and the ``AddConnection`` task, exactly as
the stock pool's own ``drain()`` does); ``psycopg-pool>=3.2`` is required.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
from psycopg_pool.pool import AddConnection
from psycopg_pool.pool_async import AddConnection as AsyncAddConnection

from .._aio import AsyncConnectionProxy, open_async, prepare_async
from .._connect import _UNSET, open_proxy, prepare
from ..drivers import driver_for
from ..drivers.psycopg import PsycopgConnectionProxy
from ..errors import ConfigurationError, FailoverSuccessError, TransactionResolutionUnknownError
from ._stale import record_recycled, untracked_failover

if TYPE_CHECKING:
    from .._pipeline import Plugin

__all__ = ["POOL_EVICTED", "AsyncPooledConnection", "PooledConnection",
           "ResilientAsyncConnectionPool", "ResilientConnectionPool"]

log = logging.getLogger("resilient_db.psycopg_pool")

#: The decision recorded when the pool evicts a connection opened before the writer changed;
#: its ``resilient_db.pool.event`` attribute says when: ``checkout``, ``return`` or ``check``.
POOL_EVICTED = "psycopg_pool.evicted"

#: Outcomes after which the connection works, on the new writer: alive for a health check.
_REPLACED = (FailoverSuccessError, TransactionResolutionUnknownError)

#: The attributes psycopg_pool sets on its connections: kept on the proxy, not on the
#: physical connection that a failover replaces.
_POOL_ATTRS = frozenset({"_pool", "_created_at", "_expire_at"})


class _Pooled:
    """What the threaded and the asyncio pooled connections share: the attributes
    psycopg_pool sets, kept on the proxy, and ``stale``. Mixed in before the proxy class,
    whose ``__init__`` must have run before :meth:`_init_pooled`."""

    __slots__ = ()
    _pool: Any
    _created_at: float
    _expire_at: float
    _untracked: Any

    def _init_pooled(self) -> None:
        object.__setattr__(self, "_pool", None)
        object.__setattr__(self, "_created_at", 0.0)
        object.__setattr__(self, "_expire_at", float("inf"))
        # Looked up once: the plugin whose ``stale`` tells the pool to evict this connection.
        object.__setattr__(self, "_untracked", untracked_failover(self))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _POOL_ATTRS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def stale(self) -> bool:
        """The pool must evict this connection: it was opened before the cluster's writer
        changed, and no ``aurora_connection_tracker`` moves it."""
        failover = self._untracked
        return failover is not None and bool(failover.stale)


class PooledConnection(_Pooled, PsycopgConnectionProxy):
    """A resilient_db psycopg connection that psycopg_pool can pool (``connection_class``);
    see the module docstring."""

    __slots__ = ("_created_at", "_expire_at", "_pool", "_untracked")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._init_pooled()

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> PooledConnection:
        """What psycopg_pool calls to open a connection: ``resilient_db.connect`` with
        ``psycopg.Connection.connect``; ``kwargs`` holds psycopg's arguments and resilient_db
        properties, ``plugins`` included (omitted: the default list)."""
        plugins = kwargs.pop("plugins", _UNSET)
        conn = open_proxy(psycopg.Connection.connect, conninfo, plugins, kwargs, cls)
        assert isinstance(conn, cls)
        return conn

    def close(self) -> None:
        """Close the connection, or, checked out of a ``close_returns=True`` pool, return it
        to the pool (psycopg's rule)."""
        pool = self._pool
        if pool is not None and getattr(pool, "close_returns", False) and not self.closed:
            pool.putconn(self)
            return
        super().close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Any:
        """psycopg's rule: commit (or, on an exception, roll back) and close, but leave a
        connection that belongs to a pool open (the pool takes it back)."""
        if self._pool is None:
            return super().__exit__(exc_type, exc, tb)
        if self.closed:
            return None
        if exc_type is None:
            self.commit()  # through the pipeline: a failover here raises its outcome
        else:
            try:
                self.rollback()
            except Exception as error:  # do not hide the exception that ended the block
                log.warning("error ignored in rollback on %r: %s", self, error)
        return None


_POOL_PARAMETERS = frozenset(
    name for name, param in inspect.signature(ConnectionPool.__init__).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY)


class _Evicting:
    """What both pools add to the stock pool's surface."""

    _evictions: int

    @property
    def evictions(self) -> int:
        """How many connections this pool evicted because the writer changed since they were
        opened."""
        return self._evictions


class ResilientConnectionPool(_Evicting, ConnectionPool[Any]):  # CT is bound to psycopg.Connection
    """A ``psycopg_pool.ConnectionPool`` of resilient_db connections that evicts connections
    opened before a writer change (see the module docstring).

    ``conninfo``: as for ``resilient_db.connect`` (psycopg's key names), or a callable
    returning it (then checked only when the pool connects). ``plugins``: as for
    ``resilient_db.connect`` (omitted: the default list). Every other keyword argument is
    either a ``ConnectionPool`` parameter (``min_size``, ``max_size``, ``timeout``,
    ``check``, ``open``, ...: psycopg_pool's defaults) or a connection argument: a
    resilient_db property or a psycopg connect argument, merged over ``kwargs`` (a dict, or a
    callable returning one). ``connection_class``: :class:`PooledConnection` or a subclass.
    Input is checked here, before any connection: ``ConfigurationError`` names the parameter.
    """

    def __init__(
        self,
        conninfo: str | Callable[[], str] = "",
        *,
        plugins: str | Iterable[str | type[Plugin]] | None = _UNSET,
        connection_class: type[PooledConnection] = PooledConnection,
        kwargs: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
        check: Callable[[PooledConnection], None] | None = None,
        **options: Any,
    ) -> None:
        pool_options, merged = _pool_arguments(conninfo, plugins, connection_class, kwargs,
                                               options, asynchronous=False)
        self._evictions = 0
        self._user_check = check
        super().__init__(conninfo, connection_class=connection_class, kwargs=merged,
                         check=None if check is None else self._check_live, **pool_options)

    def getconn(self, timeout: float | None = None) -> PooledConnection:
        """A connection from the pool (see ``ConnectionPool.getconn``); one opened before the
        writer changed is evicted on the way and the next one taken, within ``timeout``."""
        if timeout is None:
            timeout = self.timeout
        deadline = monotonic() + timeout
        while True:
            try:
                conn = super().getconn(max(deadline - monotonic(), 0.001))
            except PoolTimeout:
                raise PoolTimeout(f"couldn't get a connection after {timeout:.2f} sec") from None
            if not conn.stale:
                return conn  # type: ignore[no-any-return]
            self._evict(conn, "checkout")

    def putconn(self, conn: PooledConnection) -> None:
        """Return ``conn`` to the pool (see ``ConnectionPool.putconn``); one opened before the
        writer changed is evicted instead (closed and replaced)."""
        if not self.closed and isinstance(conn, PooledConnection) and conn.stale:
            self._check_pool_putconn(conn)  # type: ignore[arg-type]
            self._evict(conn, "return")
            return
        super().putconn(conn)

    def check(self) -> None:
        """Evict the idle connections opened before the writer changed, then check the others
        (see ``ConnectionPool.check``)."""
        with self._lock:
            stale = [conn for conn in self._pool if conn.stale]
            for conn in stale:
                self._pool.remove(conn)
        for conn in stale:
            self._evict(conn, "check")
        super().check()

    @staticmethod
    def check_connection(conn: PooledConnection) -> None:
        """``ConnectionPool.check_connection``, where a failover during the check that leaves
        the connection working on the new writer means alive. A connection that fails the
        check is closed (its monitors released) before the error propagates."""
        try:
            ConnectionPool.check_connection(conn)  # type: ignore[type-var]
        except _REPLACED:
            return
        except Exception:
            object.__setattr__(conn, "_pool", None)  # close for real, never return it
            with suppress(Exception):
                conn.close()
            raise

    def _check_live(self, conn: PooledConnection) -> None:
        """The ``check`` callback given to the stock pool: skipped for a stale connection
        (:meth:`getconn` evicts it next); a failover during the user's check that leaves the
        connection working on the new writer means alive."""
        if conn.stale:
            return
        assert self._user_check is not None
        try:
            self._user_check(conn)
        except _REPLACED:
            return

    def _evict(self, conn: PooledConnection, event: str) -> None:
        """Close ``conn`` (opened before the writer changed) and have a new connection
        opened in its place, as the stock pool does for an expired one."""
        with self._lock:
            self._evictions += 1
        with suppress(Exception):  # a decision sink never raises; the log must not either
            record_recycled(POOL_EVICTED, conn._untracked, conn, log,
                            **{"resilient_db.pool.event": event})
        try:
            self._close_connection(conn)
        except Exception as error:  # the old writer may be gone: nothing to say goodbye to
            log.debug("closing an evicted connection failed: %s", error)
        self.run_task(AddConnection(self))


# --- asyncio ------------------------------------------------------------------------------


class AsyncPooledConnection(_Pooled, AsyncConnectionProxy):
    """A resilient_db asyncio psycopg connection (``resilient_db.connect_async``) that
    ``psycopg_pool.AsyncConnectionPool`` can pool; the asyncio twin of
    :class:`PooledConnection`, with ``connect_async``'s plugins (``failover``, ``efm``)."""

    __slots__ = ("_created_at", "_expire_at", "_pool", "_untracked")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._init_pooled()

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> AsyncPooledConnection:
        """What psycopg_pool awaits to open a connection: ``resilient_db.connect_async`` with
        ``psycopg.AsyncConnection.connect``; ``kwargs`` holds psycopg's arguments and
        resilient_db properties, ``plugins`` included (omitted: ``failover,efm``)."""
        plugins = kwargs.pop("plugins", _UNSET)
        conn = await open_async(psycopg.AsyncConnection.connect, conninfo, plugins, kwargs, cls)
        assert isinstance(conn, cls)
        return conn

    async def close(self) -> None:
        """Close the connection, or, checked out of a ``close_returns=True`` pool, return it
        to the pool (psycopg's rule)."""
        pool = self._pool
        if pool is not None and getattr(pool, "close_returns", False) and not self.closed:
            await pool.putconn(self)
            return
        await super().close()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """psycopg's rule: commit (or, on an exception, roll back) and close, but leave a
        connection that belongs to a pool open (the pool takes it back)."""
        if self._pool is None:
            await super().__aexit__(exc_type, exc, tb)
            return
        if self.closed:
            return
        if exc_type is None:
            await self.commit()  # through failover: a failover here raises its outcome
        else:
            try:
                await self.rollback()
            except Exception as error:  # do not hide the exception that ended the block
                log.warning("error ignored in rollback on %r: %s", self, error)


_ASYNC_POOL_PARAMETERS = frozenset(
    name for name, param in inspect.signature(AsyncConnectionPool.__init__).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY)


class ResilientAsyncConnectionPool(_Evicting, AsyncConnectionPool[Any]):
    """A ``psycopg_pool.AsyncConnectionPool`` of :class:`AsyncPooledConnection` that evicts
    connections opened before a writer change: :class:`ResilientConnectionPool` for asyncio
    (the same parameters, checks and eviction points; ``getconn``, ``putconn``, ``check``
    and ``close`` are awaited, and ``open`` follows psycopg_pool's asyncio rules:
    ``open=False`` then ``await pool.open()``, or ``async with``)."""

    def __init__(
        self,
        conninfo: str | Callable[[], Any] = "",
        *,
        plugins: str | Iterable[str | type[Plugin]] | None = _UNSET,
        connection_class: type[AsyncPooledConnection] = AsyncPooledConnection,
        kwargs: dict[str, Any] | Callable[[], Any] | None = None,
        check: Callable[[AsyncPooledConnection], Awaitable[None]] | None = None,
        **options: Any,
    ) -> None:
        pool_options, merged = _pool_arguments(conninfo, plugins, connection_class, kwargs,
                                               options, asynchronous=True)
        self._evictions = 0
        self._user_check = check
        super().__init__(conninfo, connection_class=connection_class, kwargs=merged,
                         check=None if check is None else self._check_live, **pool_options)

    async def getconn(self, timeout: float | None = None) -> AsyncPooledConnection:
        """A connection from the pool; one opened before the writer changed is evicted on the
        way and the next one taken, within ``timeout``."""
        if timeout is None:
            timeout = self.timeout
        deadline = monotonic() + timeout
        while True:
            try:
                conn = await super().getconn(max(deadline - monotonic(), 0.001))
            except PoolTimeout:
                raise PoolTimeout(f"couldn't get a connection after {timeout:.2f} sec") from None
            if not conn.stale:
                return conn  # type: ignore[no-any-return]
            await self._evict(conn, "checkout")

    async def putconn(self, conn: AsyncPooledConnection) -> None:
        """Return ``conn`` to the pool; one opened before the writer changed is evicted
        instead (closed and replaced)."""
        if not self.closed and isinstance(conn, AsyncPooledConnection) and conn.stale:
            self._check_pool_putconn(conn)  # type: ignore[arg-type]
            await self._evict(conn, "return")
            return
        await super().putconn(conn)

    async def check(self) -> None:
        """Evict the idle connections opened before the writer changed, then check the others
        (see ``AsyncConnectionPool.check``)."""
        async with self._lock:
            stale = [conn for conn in self._pool if conn.stale]
            for conn in stale:
                self._pool.remove(conn)
        for conn in stale:
            await self._evict(conn, "check")
        await super().check()

    @staticmethod
    async def check_connection(conn: AsyncPooledConnection) -> None:
        """``AsyncConnectionPool.check_connection``, where a failover during the check that
        leaves the connection working on the new writer means alive. A connection that fails
        the check is closed (its monitors released) before the error propagates."""
        try:
            await AsyncConnectionPool.check_connection(conn)  # type: ignore[type-var]
        except _REPLACED:
            return
        except Exception:
            object.__setattr__(conn, "_pool", None)  # close for real, never return it
            with suppress(Exception):
                await conn.close()
            raise

    async def _check_live(self, conn: AsyncPooledConnection) -> None:
        """The ``check`` callback given to the stock pool (see
        :meth:`ResilientConnectionPool._check_live`)."""
        if conn.stale:
            return
        assert self._user_check is not None
        try:
            await self._user_check(conn)
        except _REPLACED:
            return

    async def _evict(self, conn: AsyncPooledConnection, event: str) -> None:
        """Close ``conn`` (opened before the writer changed) and have a new connection
        opened in its place."""
        self._evictions += 1  # one event loop: no lock needed
        with suppress(Exception):
            record_recycled(POOL_EVICTED, conn._untracked, conn, log,
                            **{"resilient_db.pool.event": event})
        try:
            await self._close_connection(conn)
        except Exception as error:  # the old writer may be gone: nothing to say goodbye to
            log.debug("closing an evicted connection failed: %s", error)
        self.run_task(AsyncAddConnection(self))


def _pool_arguments(conninfo: Any, plugins: Any, connection_class: Any, kwargs: Any,
                    options: dict[str, Any], *, asynchronous: bool,
                    ) -> tuple[dict[str, Any], Any]:
    """A pool's keyword arguments split into the stock pool's own and the connections'
    ``kwargs`` (merged over the user's), checked before any connection is attempted."""
    expected = AsyncPooledConnection if asynchronous else PooledConnection
    if not (isinstance(connection_class, type) and issubclass(connection_class, expected)):
        raise ConfigurationError(
            f"connection_class must be {expected.__name__} or a subclass of it, not "
            f"{connection_class!r}: the pool evicts and checks resilient_db connections",
            parameter="connection_class", value=repr(connection_class))
    parameters = _ASYNC_POOL_PARAMETERS if asynchronous else _POOL_PARAMETERS
    pool_options = {k: v for k, v in options.items() if k in parameters}
    connect_args = {k: v for k, v in options.items() if k not in parameters}
    if plugins is not _UNSET:
        connect_args["plugins"] = plugins
    merged = _merge_kwargs(kwargs, connect_args)
    if not callable(conninfo) and not callable(merged):
        _validate(conninfo, merged, asynchronous=asynchronous)
    return pool_options, merged


def _merge_kwargs(kwargs: dict[str, Any] | Callable[[], dict[str, Any]] | None,
                  connect_args: dict[str, Any]) -> Any:
    """The pool's ``kwargs``: ``kwargs`` with ``connect_args`` (the pool's own keyword
    arguments) over it; a callable ``kwargs`` stays a callable, merged on each call."""
    if callable(kwargs):
        source = kwargs

        def merged() -> dict[str, Any]:
            return {**source(), **connect_args}

        return merged
    return {**(kwargs or {}), **connect_args}


def _validate(conninfo: str, kwargs: dict[str, Any], *, asynchronous: bool = False) -> None:
    """Check the connection arguments before the pool opens any connection (psycopg_pool
    would only log each failed attempt and retry); an unknown name that resembles a pool
    parameter gets that suggestion."""
    args = dict(kwargs)
    plugins = args.pop("plugins", _UNSET)
    try:
        if asynchronous:
            prepare_async(psycopg.AsyncConnection.connect, conninfo, plugins, args)
        else:
            prepare(driver_for(psycopg.Connection.connect, None), conninfo, plugins, args)
    except ConfigurationError as error:
        name = error.parameter
        known = _ASYNC_POOL_PARAMETERS if asynchronous else _POOL_PARAMETERS
        close = difflib.get_close_matches(name, known, n=1) if name else []
        if name in args and close:
            raise ConfigurationError(
                f"unknown parameter {name!r}: it is neither a ConnectionPool parameter, a "
                f"resilient_db property nor a psycopg connect parameter (did you mean the pool "
                f"parameter {close[0]!r}?)", parameter=name) from None
        raise
