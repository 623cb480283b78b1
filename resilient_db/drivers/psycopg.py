"""Driver dialect for psycopg 3 (sync ``psycopg.Connection``).

Only public psycopg API is used: ``Connection.fileno()`` for the socket, ``info`` for
transaction status, ``broken``/``closed``, ``errors.*`` and ``sqlstate`` for classification.
"""

from __future__ import annotations

import operator
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import psycopg
from psycopg import pq
from psycopg.rows import tuple_row

from .. import errors
from .._pipeline import Call
from .._properties import parse_bool
from .._proxy import (
    _COMMIT,
    _COPY,
    _EXECUTE,
    _FETCH,
    _PIPELINE,
    _ROLLBACK,
    _TRANSACTION,
    ConnectionProxy,
    CursorProxy,
    PipelinedContext,
)
from .base import DriverDialect, NetworkOptions, TxStatus

__all__ = [
    "FailoverFailedError",
    "FailoverSuccessError",
    "ForkedConnectionError",
    "PsycopgDriver",
    "QueryTimeoutError",
    "SwitchoverError",
    "TransactionResolutionUnknownError",
]


# The runtime outcomes, catchable as resilient_db errors and as psycopg.OperationalError.
class FailoverSuccessError(errors.FailoverSuccessError, psycopg.OperationalError):
    __module__ = __name__



class TransactionResolutionUnknownError(
    errors.TransactionResolutionUnknownError, psycopg.OperationalError
):
    __module__ = __name__


class FailoverFailedError(errors.FailoverFailedError, psycopg.OperationalError):
    __module__ = __name__


class QueryTimeoutError(errors.QueryTimeoutError, psycopg.OperationalError):
    __module__ = __name__


class SwitchoverError(errors.SwitchoverError, psycopg.OperationalError):
    __module__ = __name__


class ForkedConnectionError(errors.ForkedConnectionError, psycopg.OperationalError):
    __module__ = __name__


# SQLSTATEs that mean the session is gone: class 08 (connection exception), admin shutdown,
# crash shutdown, cannot connect now, and idle-session timeout.
_DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03", "57P05"})
_READ_ONLY_STATE = "25006"
# invalid_password, invalid_authorization_specification.
_AUTH_STATES = frozenset({"28P01", "28000"})

_TX = {
    pq.TransactionStatus.IDLE: TxStatus.IDLE,
    pq.TransactionStatus.ACTIVE: TxStatus.ACTIVE,
    pq.TransactionStatus.INTRANS: TxStatus.IN_TRANSACTION,
    pq.TransactionStatus.INERROR: TxStatus.IN_ERROR,
    pq.TransactionStatus.UNKNOWN: TxStatus.UNKNOWN,
}
_PG_TX_STATUS = operator.attrgetter("pgconn.transaction_status")
# libpq statuses with a transaction open (IntEnum members: equal to the raw ints).
_PG_OPEN = frozenset({pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR})

#: Session attributes in the order they are re-applied (autocommit first: the others apply to
#: the transactions psycopg starts).
_SESSION_ORDER = ("autocommit", "isolation_level", "read_only", "deferrable")

# psycopg's own connect keywords (beyond libpq's parameters).
_PSYCOPG_KEYWORDS = frozenset(
    {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
)


def _parse_bool(name: str, value: str) -> bool:
    result = parse_bool(value)
    if result is None:
        raise errors.ConfigurationError(
            f"psycopg parameter {name!r}: invalid value {value!r}; expected true or false",
            parameter=name,
            value=value,
        )
    return result


class PsycopgConnectionProxy(ConnectionProxy):
    """psycopg's connection extras, pipelined."""

    __slots__ = ()

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> CursorProxy:
        raw = self._raw
        chain = self._chains.execute
        if chain is None:
            cursor = raw.execute(query, *args, **kwargs)
        else:
            cursor = chain(Call(_EXECUTE, "Connection.execute", raw.execute, (query, *args),
                                kwargs, self, raw))
        return PsycopgCursorProxy(cursor, self)

    def transaction(self, *args: Any, **kwargs: Any) -> PipelinedContext:
        return PipelinedContext(
            self._raw.transaction(*args, **kwargs), _TRANSACTION, "Connection.transaction",
            self,
        )

    def pipeline(self) -> PipelinedContext:
        return PipelinedContext(self._raw.pipeline(), _PIPELINE, "Connection.pipeline", self)

    def set_autocommit(self, value: bool) -> None:
        self._set_session("autocommit", value)

    def set_read_only(self, value: bool | None) -> None:
        self._set_session("read_only", value)

    def set_isolation_level(self, value: Any) -> None:
        self._set_session("isolation_level", value)

    def set_deferrable(self, value: bool | None) -> None:
        self._set_session("deferrable", value)

    def tpc_begin(self, xid: Any) -> None:
        self._call(_TRANSACTION, "Connection.tpc_begin", self._raw.tpc_begin, xid)

    def tpc_prepare(self) -> None:
        self._call(_TRANSACTION, "Connection.tpc_prepare", self._raw.tpc_prepare)

    def tpc_commit(self, xid: Any = None) -> None:
        self._call(_COMMIT, "Connection.tpc_commit", self._raw.tpc_commit, xid)

    def tpc_rollback(self, xid: Any = None) -> None:
        self._call(_ROLLBACK, "Connection.tpc_rollback", self._raw.tpc_rollback, xid)

    def tpc_recover(self) -> Any:
        return self._call(_EXECUTE, "Connection.tpc_recover", self._raw.tpc_recover)


class PsycopgCursorProxy(CursorProxy):
    """psycopg's cursor extras, pipelined."""

    __slots__ = ()

    def copy(self, statement: Any, *args: Any, **kwargs: Any) -> PipelinedContext:
        return PipelinedContext(
            self._live().copy(statement, *args, **kwargs), _COPY, "Cursor.copy", self._conn
        )

    def stream(self, query: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        rows = self._live().stream(query, *args, **kwargs)
        if self._chains.fetch is None:
            return rows  # type: ignore[no-any-return]
        return self._stream_steps(rows)

    def _stream_steps(self, rows: Iterator[Any]) -> Iterator[Any]:
        end = object()
        while True:
            chain = self._chains.fetch
            row = next(rows, end) if chain is None else chain(
                Call(_FETCH, "Cursor.stream", next, (rows, end), {}, self._conn))
            if row is end:
                return
            yield row

    def scroll(self, *args: Any, **kwargs: Any) -> None:
        self._call_op(_FETCH, "Cursor.scroll", "scroll", *args, **kwargs)

    def results(self) -> Iterator[Any]:
        raw = self._live()
        chain = self._chains.fetch
        fetch = Call(_FETCH, "Cursor.results", lambda: list(raw.results()), (), {}, self._conn)
        for _ in (fetch.fn() if chain is None else chain(fetch)):
            yield self


class PsycopgDriver(DriverDialect):
    code = "psycopg"
    database_key = "dbname"
    uri_schemes = ("postgresql", "postgres")
    default_port = 5432
    multi_host = True
    connection_types: ClassVar[tuple[type, ...]] = (psycopg.Connection,)
    example_target = "psycopg.Connection.connect"
    session_attributes = frozenset({"autocommit", "read_only", "isolation_level", "deferrable"})
    renames: ClassVar[Mapping[str, str]] = {
        "database": "dbname", "db": "dbname", "username": "user", "passwd": "password",
        "connection_timeout": "connect_timeout", "ssl_ca": "sslrootcert",
        "ssl_cert": "sslcert", "ssl_key": "sslkey",
    }
    connection_proxy = PsycopgConnectionProxy
    cursor_proxy = PsycopgCursorProxy
    OperationalError = psycopg.OperationalError
    error_classes: ClassVar[Mapping[type[errors.Error], type[errors.Error]]] = {
        errors.FailoverSuccessError: FailoverSuccessError,
        errors.TransactionResolutionUnknownError: TransactionResolutionUnknownError,
        errors.FailoverFailedError: FailoverFailedError,
        errors.QueryTimeoutError: QueryTimeoutError,
        errors.SwitchoverError: SwitchoverError,
        errors.ForkedConnectionError: ForkedConnectionError,
    }

    def __init__(self) -> None:
        libpq = frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())
        self._params = libpq | _PSYCOPG_KEYWORDS

    def param_names(self) -> frozenset[str]:
        return self._params

    def coerce_arg(self, name: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if name == "autocommit":
            return _parse_bool(name, value)
        if name == "prepare_threshold":
            if value.strip().lower() in {"", "none", "null"}:
                return None
            try:
                return int(value)
            except ValueError:
                raise errors.ConfigurationError(
                    f"psycopg parameter 'prepare_threshold': invalid value {value!r}; expected "
                    "a whole number or 'none'",
                    parameter=name,
                    value=value,
                ) from None
        return value

    def network_args(self, args: Mapping[str, Any], options: NetworkOptions) -> Mapping[str, Any]:
        # libpq applies these to its socket itself (before connecting, so the handshake is
        # covered too). Arguments given explicitly (by the user or an internal caller such as
        # the topology monitor) win.
        if options.keepalive is None:
            return args
        out = dict(args)
        out.setdefault("keepalives", 1 if options.keepalive else 0)
        if options.keepalive:
            for name, value in (("keepalives_idle", options.idle),
                                ("keepalives_interval", options.interval),
                                ("keepalives_count", options.probes)):
                if value is not None:
                    out.setdefault(name, value)
            if options.user_timeout is not None:
                out.setdefault("tcp_user_timeout", int(options.user_timeout * 1000))
        return out

    def cancel(self, conn: Any, target: Any, args: Mapping[str, Any], timeout: float) -> bool:
        # libpq's cancel request on a connection of its own; safe from another thread, and
        # bounded by ``timeout`` (psycopg >= 3.2; older releases: the blocking cancel()).
        cancel_safe = getattr(conn, "cancel_safe", None)
        if cancel_safe is not None:
            cancel_safe(timeout=timeout)
        else:
            conn.cancel()
        return True

    def is_closed(self, conn: Any) -> bool:
        return bool(conn.closed or conn.broken)

    def fileno(self, conn: Any) -> int | None:
        return None if conn.closed else int(conn.pgconn.socket)

    def socket_of(self, conn: Any) -> socket.socket | None:
        if conn.closed:
            return None
        fd = conn.fileno()
        # Work on a duplicate descriptor: shutdown() acts on the shared socket, close() only
        # on our duplicate, so psycopg's own descriptor stays valid.
        return socket.socket(fileno=os.dup(fd))

    def transaction_status(self, conn: Any) -> TxStatus:
        return _TX.get(conn.info.transaction_status, TxStatus.UNKNOWN)

    def tx_snapshot(self, conn: Any) -> Any:
        # libpq's status before the call: once the connection is lost it no longer tells.
        return conn.pgconn.transaction_status

    def tx_snapshot_reader(self) -> Callable[[Any], Any]:
        return _PG_TX_STATUS  # what tx_snapshot reads, without its Python frame

    def was_in_transaction(self, conn: Any, snapshot: Any) -> bool:
        return snapshot in _PG_OPEN  # INTRANS or INERROR before the call

    def is_disconnect(self, exc: BaseException) -> bool:
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return False
        if not isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return False
        if isinstance(exc, errors.Error):
            return False
        state = getattr(exc, "sqlstate", None)
        if state is None:
            return True
        return state.startswith("08") or state in _DISCONNECT_STATES

    def is_read_only_error(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) == _READ_ONLY_STATE

    def is_auth_failure(self, exc: BaseException) -> bool:
        if not isinstance(exc, psycopg.OperationalError) or isinstance(exc, errors.Error):
            return False
        state = getattr(exc, "sqlstate", None)
        if state in _AUTH_STATES:
            return True
        # A failed connect carries no SQLSTATE (libpq reports only the server's message):
        # password, md5/SCRAM and PAM failures all read "... authentication failed for user".
        return state is None and "authentication failed for user" in str(exc)

    def apply_session_state(self, conn: Any, state: Mapping[str, Any]) -> None:
        for name in _SESSION_ORDER:
            if name in state:
                setattr(conn, name, state[name])

    def enforce_read_only(self, conn: Any, on: bool) -> None:
        # psycopg's read_only is a BEGIN option: autocommit statements ignore it. The session
        # default covers them; set outside a transaction (the connection is idle here) so that
        # it takes effect at once and no transaction is left open.
        autocommit = conn.autocommit
        if not autocommit:
            conn.autocommit = True
        try:
            conn.execute("SET SESSION default_transaction_read_only = "
                         + ("on" if on else "off"), prepare=False)
        finally:
            if not autocommit:
                conn.autocommit = False

    def session_baseline(self, conn: Any) -> dict[str, Any]:
        # psycopg keeps these on the client (no I/O to read them).
        return {name: getattr(conn, name) for name in _SESSION_ORDER}

    def reset_for_reuse(self, conn: Any, baseline: Mapping[str, Any]) -> None:
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            conn.rollback()
        conn.autocommit = True  # DISCARD ALL cannot run inside a transaction block
        conn.execute("DISCARD ALL", prepare=False)
        for name in _SESSION_ORDER:
            if name in baseline:
                setattr(conn, name, baseline[name])

    def query(self, conn: Any, sql: str) -> list[tuple[Any, ...]]:
        was_idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
        try:
            with conn.cursor(row_factory=tuple_row) as cur:
                cur.execute(sql, prepare=False)
                rows: list[tuple[Any, ...]] = cur.fetchall() if cur.description else []
        finally:
            if was_idle and not conn.closed and (
                conn.info.transaction_status != pq.TransactionStatus.IDLE
            ):
                conn.rollback()
        return rows
