"""SQLAlchemy 2 dialects that connect through resilient_db.

    engine = sqlalchemy.create_engine(
        "postgresql+resilient_psycopg://app@db.cluster-xyz.rds.amazonaws.com/app"
        "?resilient_db_plugins=failover,efm&failure_detection_time_ms=6000")
    engine = sqlalchemy.create_engine(
        "mysql+resilient_mysqlconnector://app@db.cluster-xyz.rds.amazonaws.com/app")

Each dialect is the stock one (``postgresql+psycopg``, ``mysql+mysqlconnector``) with a few
hooks changed; the DBAPI module stays the driver's own, so SQLAlchemy classifies errors by the
driver's exception classes exactly as before. What changes, and why:

- ``connect``: the DBAPI connection is a resilient_db connection proxy (``resilient_db.connect``
  with the driver's connect callable); URL query keys and ``connect_args`` that are resilient_db
  properties (``plugins``, ``failover_timeout_sec``, ...) are split from the driver's arguments
  there, as everywhere. The plugin list is ``resilient_db_plugins`` in the URL (SQLAlchemy
  takes ``plugins`` in a URL for its own ``CreateEnginePlugin`` and removes it) or
  ``plugins`` in ``connect_args``.
- ``_type_info_fetch`` (psycopg): psycopg's ``TypeInfo.fetch`` insists on a real
  ``psycopg.Connection`` (the one place the stock dialect rejects the proxy). It is given the
  current physical connection (``conn.resilient.raw``): a catalogue read once, at dialect
  initialisation, that does not go through the pipeline. Statements always do.
- ``is_disconnect``: resilient_db's outcomes are mapped so the pool invalidates exactly what is
  unusable. ``FailoverSuccessError`` and ``TransactionResolutionUnknownError`` are *not*
  disconnects: the connection already works on the new writer, and invalidating it would close
  a healthy connection and (SQLAlchemy invalidates the whole pool on a disconnect) make every
  pooled connection reconnect, while the connections opened before the failover are handled
  lazily and for free by ``aurora_connection_tracker`` (or :func:`_recycle_stale`). The
  application sees ``sqlalchemy.exc.OperationalError`` with ``.orig`` the resilient_db error,
  rolls back and retries. ``FailoverFailedError`` (nothing usable within the budget) and
  ``ForkedConnectionError`` (the parent's session) are disconnects: the connection is
  discarded and the pool reconnects. ``QueryTimeoutError`` is not (the connection is fine).
- ``do_ping`` (only with ``pool_pre_ping=True``): a ping that fails over successfully means the
  connection is alive, on the new writer.
- A pool ``checkout`` hook recycles a pooled connection opened under an older topology epoch
  (the writer changed since) when ``aurora_connection_tracker`` is not among its plugins, so
  a pooled connection never serves the demoted writer; with the tracker, the tracker moves it.
- The execution option :data:`READ_ONLY_OPTION` (``resilient_db_read_only``, both engines; on
  PostgreSQL ``postgresql_readonly`` too) sets and resets ``read_only`` on the DBAPI connection,
  the attribute the ``read_write_splitting`` plugin routes on.
- ``create_async_engine("postgresql+resilient_psycopg://...")`` gets
  :class:`ResilientAsyncPsycopgDialect`: SQLAlchemy's asyncio psycopg dialect whose DBAPI
  connections are ``resilient_db.connect_async`` proxies (plugins ``failover`` and ``efm``;
  docs/asyncio.md), with the same error mapping, ping and stale-connection recycling. MySQL
  has no asyncio dialect here: ``create_async_engine`` on ``mysql+resilient_mysqlconnector``
  is refused rather than silently connecting without resilient_db.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import event, exc
from sqlalchemy.dialects.mysql.mysqlconnector import MySQLDialect_mysqlconnector
from sqlalchemy.dialects.postgresql.psycopg import (
    PGDialect_psycopg,
    PGDialectAsync_psycopg,
    _log_notices,
)
from sqlalchemy.engine.characteristics import ConnectionCharacteristic

from .. import _connect
from .._pipeline import OPEN
from .._proxy import ConnectionProxy
from ..errors import (
    ConfigurationError,
    FailoverFailedError,
    FailoverSuccessError,
    ForkedConnectionError,
    TransactionResolutionUnknownError,
)
from ._stale import record_recycled, untracked_failover

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.engine.url import URL
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

__all__ = [
    "PLUGINS_QUERY_KEY",
    "READ_ONLY_OPTION",
    "ResilientAsyncPsycopgDialect",
    "ResilientMysqlConnectorDialect",
    "ResilientPsycopgDialect",
]

log = logging.getLogger("resilient_db.sqlalchemy")

#: The execution option that sets ``read_only`` on the DBAPI connection for the duration of a
#: ``Connection`` (reset when it goes back to the pool): with ``read_write_splitting`` the
#: connection moves to a reader. Applied outside a transaction, like isolation levels.
READ_ONLY_OPTION = "resilient_db_read_only"

#: The URL query key for resilient_db's ``plugins`` (SQLAlchemy keeps ``plugins`` for itself).
PLUGINS_QUERY_KEY = "resilient_db_plugins"

#: The decision recorded when the checkout hook recycles a pooled connection.
POOL_RECYCLED = "sqlalchemy.pool_recycled"

#: Where the checkout hook keeps, per pool record, what it found about the connection: the
#: record's ``info`` is cleared when SQLAlchemy closes or invalidates the connection.
_STALE_CHECK = "resilient_db.stale_check"

#: Outcomes after which the connection is unusable: SQLAlchemy must discard it.
_DISCONNECTS = (FailoverFailedError, ForkedConnectionError)
#: Outcomes after which the connection works (on the new writer): not disconnects.
_REPLACED = (FailoverSuccessError, TransactionResolutionUnknownError)

# libpq's PQTRANS_IDLE and PQ_PIPELINE_OFF (psycopg.pq's IntEnum members equal these; psycopg
# is imported only with the dialect's connect).
_PG_IDLE = 0
_PG_PIPELINE_OFF = 0


class ReadOnlyCharacteristic(ConnectionCharacteristic):
    """``execution_options(resilient_db_read_only=True)``: ``read_only`` on the DBAPI
    connection, reset to ``False`` when the connection is returned to the pool."""

    transactional: ClassVar[bool] = True

    def reset_characteristic(self, dialect: Dialect, dbapi_conn: Any) -> None:
        dbapi_conn.read_only = False

    def set_characteristic(self, dialect: Dialect, dbapi_conn: Any, value: Any) -> None:
        dbapi_conn.read_only = bool(value)

    def get_characteristic(self, dialect: Dialect, dbapi_conn: Any) -> Any:
        return bool(getattr(dbapi_conn, "read_only", False))


def _is_disconnect(error: Exception) -> bool | None:
    """resilient_db's verdict on ``error``; ``None``: not ours, ask the stock dialect."""
    if isinstance(error, _DISCONNECTS):
        return True
    if isinstance(error, _REPLACED):
        return False
    return None


def _recycle_stale(dbapi_connection: Any, record: ConnectionPoolEntry,
                   proxy: PoolProxiedConnection) -> None:
    """Pool ``checkout`` hook: a connection opened before the writer changed is recycled (the
    pool closes it and opens a new one) unless ``aurora_connection_tracker`` moves it itself.

    Costs one dict read per checkout; the plugin look-up is done once per physical
    connection and kept in the record's ``info`` (cleared when the record reconnects)."""
    info = record.info
    failover = info.get(_STALE_CHECK, _UNSEEN)
    if failover is _UNSEEN:
        failover = info[_STALE_CHECK] = untracked_failover(dbapi_connection)
    if failover is not None and failover.stale:
        record_recycled(POOL_RECYCLED, failover, dbapi_connection, log)
        raise exc.DisconnectionError("the cluster's writer changed since this pooled connection "
                                     "was opened")


_UNSEEN: Any = object()


def _idle_psycopg(dbapi_connection: Any) -> Any:
    """The psycopg connection under ``dbapi_connection`` (a pool's connection, or the proxy
    itself) when it is idle: no transaction open, not in pipeline mode, its resilient_db
    connection open (not inherited across ``fork()``); else ``None``."""
    proxy = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
    if not isinstance(proxy, ConnectionProxy) or proxy._pipeline.state is not OPEN:
        return None
    raw = proxy._raw
    pgconn = raw.pgconn
    if pgconn.transaction_status != _PG_IDLE or pgconn.pipeline_status != _PG_PIPELINE_OFF:
        return None
    return raw


def _plugins_from_query(cparams: dict[str, Any]) -> dict[str, Any]:
    """``resilient_db_plugins`` from the URL query becomes ``plugins``; ``connect_args``
    (already merged into ``cparams`` by SQLAlchemy, over the URL) may name ``plugins``
    directly and then wins."""
    spec = cparams.pop(PLUGINS_QUERY_KEY, None)
    if spec is not None:
        if isinstance(spec, tuple):  # the key repeated in the URL
            spec = ",".join(spec)
        cparams.setdefault("plugins", spec)
    return cparams


def _refuse_async(url: URL) -> Any:
    raise ConfigurationError(
        f"{url.drivername} has no asyncio dialect yet: use create_engine (not "
        "create_async_engine), or the stock async driver without resilient_db",
        parameter="url", value=url.drivername)


class ResilientPsycopgDialect(PGDialect_psycopg):
    """``postgresql+resilient_psycopg://``: SQLAlchemy's psycopg 3 dialect over resilient_db."""

    driver = "resilient_psycopg"
    supports_statement_cache = True
    connection_characteristics = PGDialect_psycopg.connection_characteristics.union(
        {READ_ONLY_OPTION: ReadOnlyCharacteristic()})

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        import psycopg

        # Server notices are logged by a handler on each physical connection: the ones
        # failover opens get it through on_connect (see on_connect below).
        user_hook: Callable[[Any], None] | None = cparams.pop("on_connect", None)

        def on_physical_connect(raw: Any) -> None:
            raw.add_notice_handler(_log_notices)
            if user_hook is not None:
                user_hook(raw)

        conn = _connect.connect(psycopg.Connection.connect, *cargs,
                                on_connect=on_physical_connect, **_plugins_from_query(cparams))
        if conn.resilient.plugin("failover") is None:  # nobody called the hook
            on_physical_connect(conn.resilient.raw)
        return conn

    def on_connect(self) -> Callable[[Any], None] | None:
        # The stock hook adds the notice handler to the connection it is given, i.e. only to
        # the first physical connection; connect() adds it to every one.
        if self.isolation_level is None:
            return None
        level = self.isolation_level

        def set_level(conn: Any) -> None:
            self.set_isolation_level(conn, level)  # type: ignore[no-untyped-call]

        return set_level

    def do_rollback(self, dbapi_connection: Any) -> None:
        # SQLAlchemy rolls back every connection it takes back into the pool (reset on
        # return), most of them idle. psycopg's rollback() sends nothing then (no transaction,
        # not in pipeline mode) and the stock dialect relies on that; here it is called
        # directly too, without the pipeline: its plugins would see a call that does no I/O
        # and cannot fail. psycopg's own checks (a transaction block, a prepared two-phase
        # transaction) still raise. Anything else goes through the pipeline.
        raw = _idle_psycopg(dbapi_connection)
        if raw is not None:
            raw.rollback()
        else:
            dbapi_connection.rollback()

    def _type_info_fetch(self, connection: Any, name: str) -> Any:
        from psycopg.types import TypeInfo

        # TypeInfo.fetch accepts only a psycopg.Connection: give it the physical connection.
        return TypeInfo.fetch(connection.connection.driver_connection.resilient.raw, name)

    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        verdict = _is_disconnect(e)
        if verdict is None:  # the stock psycopg dialect is not annotated
            return bool(super().is_disconnect(  # type: ignore[no-untyped-call]
                e, connection, cursor))
        return verdict

    def do_ping(self, dbapi_connection: Any) -> bool:
        try:
            return bool(super().do_ping(dbapi_connection))  # type: ignore[no-untyped-call]
        except _REPLACED:
            return True  # failed over during the ping: alive, on the new writer

    @classmethod
    def engine_created(cls, engine: Engine) -> None:
        event.listen(engine.pool, "checkout", _recycle_stale)

    @classmethod
    def get_async_dialect_cls(cls, url: URL) -> Any:
        return ResilientAsyncPsycopgDialect


class ResilientAsyncPsycopgDialect(PGDialectAsync_psycopg):
    """``create_async_engine("postgresql+resilient_psycopg://...")``: SQLAlchemy's asyncio
    psycopg dialect over ``resilient_db.connect_async``. SQLAlchemy's adapter awaits the
    proxy's methods exactly as it awaits psycopg's ``AsyncConnection``'s."""

    driver = "resilient_psycopg"
    supports_statement_cache = True

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        import psycopg

        from .._aio import connect_async

        user_hook: Callable[[Any], Any] | None = cparams.pop("on_connect", None)

        def on_physical_connect(raw: Any) -> Any:
            raw.add_notice_handler(_log_notices)
            return user_hook(raw) if user_hook is not None else None

        async def creator(*args: Any, **kwargs: Any) -> Any:
            conn = await connect_async(psycopg.AsyncConnection.connect, *args,
                                       on_connect=on_physical_connect, **kwargs)
            if conn.resilient.plugin("failover") is None:  # nobody called the hook
                on_physical_connect(conn.resilient.raw)
            return conn

        dbapi: Any = self.loaded_dbapi
        return dbapi.connect(*cargs, async_creator_fn=creator, **_plugins_from_query(cparams))

    def on_connect(self) -> Callable[[Any], None] | None:
        if self.isolation_level is None:
            return None
        level = self.isolation_level

        def set_level(conn: Any) -> None:
            self.set_isolation_level(conn, level)  # type: ignore[no-untyped-call]

        return set_level

    def _type_info_fetch(self, connection: Any, name: str) -> Any:
        from psycopg.types import TypeInfo

        # As in the sync dialect: TypeInfo.fetch wants psycopg's own connection.
        adapted = connection.connection
        return adapted.await_(TypeInfo.fetch(adapted.driver_connection.resilient.raw, name))

    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        verdict = _is_disconnect(e)
        if verdict is None:
            return bool(super().is_disconnect(  # type: ignore[no-untyped-call]
                e, connection, cursor))
        return verdict

    def do_ping(self, dbapi_connection: Any) -> bool:
        try:
            return bool(super().do_ping(dbapi_connection))  # type: ignore[no-untyped-call]
        except _REPLACED:
            return True

    @classmethod
    def engine_created(cls, engine: Engine) -> None:
        event.listen(engine.pool, "checkout", _recycle_stale)


class ResilientMysqlConnectorDialect(MySQLDialect_mysqlconnector):
    """``mysql+resilient_mysqlconnector://``: SQLAlchemy's mysql-connector dialect over
    resilient_db (MySQL, and MariaDB reached through the ``mysql`` backend name)."""

    driver = "resilient_mysqlconnector"
    supports_statement_cache = True
    connection_characteristics = MySQLDialect_mysqlconnector.connection_characteristics.union(
        {READ_ONLY_OPTION: ReadOnlyCharacteristic()})

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        import mysql.connector

        return _connect.connect(mysql.connector.connect, *cargs, **_plugins_from_query(cparams))

    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        verdict = _is_disconnect(e)
        if verdict is None:
            return bool(super().is_disconnect(e, connection, cursor))
        return verdict

    def do_ping(self, dbapi_connection: Any) -> bool:
        try:
            return bool(super().do_ping(dbapi_connection))
        except _REPLACED:
            return True

    @classmethod
    def engine_created(cls, engine: Engine) -> None:
        event.listen(engine.pool, "checkout", _recycle_stale)

    @classmethod
    def get_async_dialect_cls(cls, url: URL) -> Any:
        return _refuse_async(url)
