"""Driver dialect for mysql-connector-python.

Verified with the pure-Python implementation (``use_pure=True``, ``MySQLConnection``). The C
extension (``CMySQLConnection``) does not load on the machines this project is tested on; the
code stays driver-neutral where it can, but breaking a C-extension connection's socket is
**unverified** (``socket_of`` returns ``None`` for it, so ``abort`` is a no-op there).

The one private attribute used: ``MySQLConnection._socket.sock`` (the TCP socket of the pure
implementation). ``tests/test_drivers.py`` fails loudly if a release renames it. The socket
methods also take a ``mysql.connector.aio`` connection (``_socket._writer``, an asyncio
``StreamWriter``: its transport's socket), since a shared failure monitor created for a
blocking connection also breaks the sockets of asyncio connections to the same host
(``tests/test_asyncio_mysql.py`` fails loudly on a rename there).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from mysql.connector import constants
from mysql.connector import errors as myerrors
from mysql.connector.abstracts import MySQLConnectionAbstract
from mysql.connector.pooling import PooledMySQLConnection

from .. import errors
from .._properties import Settings, parse_bool
from .._proxy import (
    _CALLPROC,
    _EXECUTE,
    _FETCH,
    _TRANSACTION,
    ConnectionProxy,
    CursorProxy,
)
from .base import DriverDialect, NetworkOptions, TxStatus, set_socket_options

__all__ = [
    "FailoverFailedError",
    "FailoverSuccessError",
    "ForkedConnectionError",
    "MysqlConnectorDriver",
    "QueryTimeoutError",
    "SwitchoverError",
    "TransactionResolutionUnknownError",
]



class FailoverSuccessError(errors.FailoverSuccessError, myerrors.OperationalError):
    __module__ = __name__


class TransactionResolutionUnknownError(
    errors.TransactionResolutionUnknownError, myerrors.OperationalError
):
    __module__ = __name__


class FailoverFailedError(errors.FailoverFailedError, myerrors.OperationalError):
    __module__ = __name__


class QueryTimeoutError(errors.QueryTimeoutError, myerrors.OperationalError):
    __module__ = __name__


class SwitchoverError(errors.SwitchoverError, myerrors.OperationalError):
    __module__ = __name__


class ForkedConnectionError(errors.ForkedConnectionError, myerrors.OperationalError):
    __module__ = __name__


# Client and server error numbers that mean the session is gone.
_DISCONNECT_ERRNOS = frozenset(
    {
        2002,  # CR_CONNECTION_ERROR
        2003,  # CR_CONN_HOST_ERROR
        2006,  # CR_SERVER_GONE_ERROR
        2013,  # CR_SERVER_LOST
        2055,  # CR_SERVER_LOST_EXTENDED
        2048,  # CR_INVALID_CONN_HANDLE
        4031,  # ER_CLIENT_INTERACTION_TIMEOUT
        1053,  # ER_SERVER_SHUTDOWN
        1927,  # ER_CONNECTION_KILLED (MariaDB)
        1077,  # ER_NORMAL_SHUTDOWN
        1080,  # ER_FORCING_CLOSE
    }
)
_CLIENT_TIMEOUTS: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(myerrors, "ReadTimeoutError", None),
                    getattr(myerrors, "WriteTimeoutError", None)) if cls is not None)
# --read-only / super-read-only (1290), read-only transaction (1792), innodb read-only (1836).
_READ_ONLY_ERRNOS = frozenset({1290, 1792, 1836})
# ER_ACCESS_DENIED_ERROR, ER_ACCESS_DENIED_NO_PASSWORD_ERROR.
_AUTH_ERRNOS = frozenset({1045, 1698})

_INT_ARGS = frozenset(
    {"port", "read_timeout", "write_timeout", "pool_size", "client_flags"}
)
# Seconds as a number (fractions work: the pure implementation passes it to settimeout()).
_SECONDS_ARGS = frozenset({"connection_timeout", "connect_timeout"})
_BOOL_ARGS = frozenset(
    {"autocommit", "buffered", "raw", "consume_results", "get_warnings", "raise_on_warnings",
     "use_pure", "use_unicode", "compress", "ssl_disabled", "ssl_verify_cert",
     "ssl_verify_identity", "allow_local_infile", "force_ipv6", "pool_reset_session", "dns_srv"}
)
# Documented connect arguments not listed in DEFAULT_CONFIGURATION.
_EXTRA_ARGS = frozenset(
    {"pool_name", "pool_size", "pool_reset_session", "option_files", "option_groups",
     "failover", "username", "passwd", "db", "fido_callback", "webauthn_callback",
     "tls_versions", "tls_ciphersuites"}
)


# Connect arguments a side connection (KILL QUERY) must not inherit: pooling would hand back
# a pooled connection; the timeouts are the side connection's own.
_SIDE_CONNECTION_DROP = frozenset(
    {"pool_name", "pool_size", "pool_reset_session", "connect_timeout", "connection_timeout",
     "read_timeout", "write_timeout", "failover", "host", "port", "unix_socket"}
)


def _tcp_socket(conn: Any) -> tuple[bool, Any]:
    """``(has a socket holder, the socket or None)`` of a blocking or asyncio connection:
    ``_socket.sock`` (a ``socket.socket``), or for ``mysql.connector.aio`` the socket of the
    stream transport (an ``asyncio.TransportSocket``, never used for I/O here). ``None`` when
    not connected or closed."""
    holder = getattr(conn, "_socket", None)
    if holder is None:
        return False, None
    sock = getattr(holder, "sock", None)
    if sock is None:
        transport = getattr(getattr(holder, "_writer", None), "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or not hasattr(sock, "fileno") or sock.fileno() < 0:
        return True, None
    return True, sock


class MysqlConnectionProxy(ConnectionProxy):
    """mysql-connector's connection extras, pipelined.

    ``read_only`` is resilient_db's (mysql-connector has no such attribute; the AWS wrapper
    offers the same one): setting it runs ``SET SESSION TRANSACTION READ ONLY`` (``READ
    WRITE`` for false), so the server refuses writes in every later transaction, autocommit
    statements included (error 1792); with ``read_write_splitting`` or ``srw`` it also moves
    the connection to a reader and back. Re-applied on a new physical connection like the
    other session attributes. Reading it returns the value last set (false until then).
    """

    __slots__ = ()

    @property
    def read_only(self) -> bool:
        return bool(self._session.get("read_only", False))

    def cmd_query(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call(_EXECUTE, "Connection.cmd_query", self._raw.cmd_query, query,
                          *args, **kwargs)

    def cmd_query_iter(self, statements: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call(_EXECUTE, "Connection.cmd_query_iter", self._raw.cmd_query_iter,
                          statements, *args, **kwargs)

    def start_transaction(self, *args: Any, **kwargs: Any) -> None:
        self._call(_TRANSACTION, "Connection.start_transaction",
                   self._raw.start_transaction, *args, **kwargs)

    def ping(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(_EXECUTE, "Connection.ping", self._raw.ping, *args, **kwargs)

    def is_connected(self) -> bool:
        return bool(self._call(_EXECUTE, "Connection.is_connected", self._raw.is_connected))

    def reset_session(self, *args: Any, **kwargs: Any) -> None:
        self._call(_EXECUTE, "Connection.reset_session", self._raw.reset_session, *args,
                   **kwargs)


class MysqlCursorProxy(CursorProxy):
    """mysql-connector's cursor extras, pipelined."""

    __slots__ = ()
    # What mysql-connector's pure-Python cursors set in __init__ (9.x; the private ones are
    # read by some frameworks, e.g. ``_executed``): passed through like their class's names.
    instance_attributes = (
        "arraysize", "_binary", "_connection", "_cursor_exists", "_description", "_executed",
        "_executed_list", "_have_result", "_last_insert_id", "_last_row_sent", "_next_row",
        "_nextrow", "_prepared", "_raw", "_read_timeout", "_rowcount", "_rows",
        "_stmt_map_results", "_stmt_partition", "_stmt_partitions", "_stored_results",
        "_warning_count", "_warnings", "_write_timeout",
    )

    def callproc(self, procname: str, *args: Any, **kwargs: Any) -> Any:
        return self._call_op(_CALLPROC, "Cursor.callproc", "callproc", procname, *args,
                             **kwargs)

    def fetchsets(self, *args: Any, **kwargs: Any) -> Any:
        return self._call_op(_FETCH, "Cursor.fetchsets", "fetchsets", *args, **kwargs)

    def __next__(self) -> Any:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row


#: Connection arguments (mysql-connector 9+) that bound every read/write after the connect.
_POST_CONNECT_TIMEOUTS = ("read_timeout", "write_timeout")


class MysqlConnectorDriver(DriverDialect):
    code = "mysql-connector"
    database_key = "database"
    uri_schemes = ("mysql",)
    default_port = 3306
    # mysql.connector.connect returns a pooled wrapper when a pool is named.
    connection_types: ClassVar[tuple[type, ...]] = (MySQLConnectionAbstract,
                                                    PooledMySQLConnection)
    example_target = "mysql.connector.connect"
    session_attributes = frozenset(
        {"autocommit", "database", "time_zone", "sql_mode", "read_only"})
    # The server's transaction access mode is READ WRITE until set (and after a reset).
    session_defaults: ClassVar[Mapping[str, Any]] = {"read_only": False}
    renames: ClassVar[Mapping[str, str]] = {
        "dbname": "database", "sslrootcert": "ssl_ca", "sslcert": "ssl_cert",
        "sslkey": "ssl_key", "application_name": "conn_attrs",
    }
    connection_proxy = MysqlConnectionProxy
    cursor_proxy = MysqlCursorProxy
    OperationalError = myerrors.OperationalError
    error_classes: ClassVar[Mapping[type[errors.Error], type[errors.Error]]] = {
        errors.FailoverSuccessError: FailoverSuccessError,
        errors.TransactionResolutionUnknownError: TransactionResolutionUnknownError,
        errors.FailoverFailedError: FailoverFailedError,
        errors.QueryTimeoutError: QueryTimeoutError,
        errors.SwitchoverError: SwitchoverError,
        errors.ForkedConnectionError: ForkedConnectionError,
    }

    def __init__(self) -> None:
        self._params = (
            frozenset(constants.DEFAULT_CONFIGURATION)
            | frozenset(getattr(constants, "CNX_POOL_ARGS", ()))
            | _EXTRA_ARGS
        )

    def param_names(self) -> frozenset[str]:
        return self._params

    def connect(self, target: Callable[..., Any], args: Mapping[str, Any],
                settings: Settings | None = None) -> Any:
        # mysql-connector bounds the TCP connect and the authentication by
        # connection_timeout, then drops it and sends SET NAMES (and autocommit, time_zone,
        # ...) with no read timeout: a server that stops answering right after authenticating
        # would hold connect() (an efm probe, a failover attempt, the application's connect)
        # until the network heals. The whole connect gets the bound, as libpq's
        # connect_timeout does; read/write timeouts the caller did not ask for are then
        # removed again (none by default), so statements are not bounded by them.
        limit = args.get("connection_timeout")
        added = [name for name in _POST_CONNECT_TIMEOUTS
                 if name not in args and name in self._params]
        if not limit or not added:
            return super().connect(target, args, settings)
        whole = max(1, math.ceil(limit))  # the driver takes whole seconds for these
        conn = super().connect(target, {**args, **dict.fromkeys(added, whole)}, settings)
        try:
            inner = getattr(conn, "_cnx", conn)  # a pooled connection wraps the driver's
            for name in added:
                setattr(inner, name, None)
        except BaseException:
            conn.close()
            raise
        return conn

    def coerce_arg(self, name: str, value: Any) -> Any:
        if name in _SECONDS_ARGS and not isinstance(value, (str, bool)) and value == 0:
            # 0 means no limit (libpq's meaning, and connect_timeout's documented one), but
            # mysql-connector would make the socket non-blocking and fail with EINPROGRESS.
            return None
        if not isinstance(value, str):
            return value
        if name in _INT_ARGS:
            try:
                return int(value)
            except ValueError:
                raise errors.ConfigurationError(
                    f"mysql-connector parameter {name!r}: invalid value {value!r}; expected a "
                    "whole number",
                    parameter=name,
                    value=value,
                ) from None
        if name in _SECONDS_ARGS:
            try:
                seconds = float(value)
            except ValueError:
                raise errors.ConfigurationError(
                    f"mysql-connector parameter {name!r}: invalid value {value!r}; expected "
                    "seconds as a number",
                    parameter=name,
                    value=value,
                ) from None
            if seconds == 0:
                return None  # no limit, as above
            return int(seconds) if seconds.is_integer() else seconds
        if name in _BOOL_ARGS:
            result = parse_bool(value)
            if result is None:
                raise errors.ConfigurationError(
                    f"mysql-connector parameter {name!r}: invalid value {value!r}; expected "
                    "true or false",
                    parameter=name,
                    value=value,
                )
            return result
        return value

    def is_closed(self, conn: Any) -> bool:
        # No round trip (is_connected() pings the server). mysql-connector keeps no "broken"
        # flag, so look at the socket: closed descriptor, or end-of-file pending (the peer
        # closed it, or abort() shut it down) seen with a non-blocking peek.
        _, sock = _tcp_socket(conn)
        if sock is None:
            return True
        # Peek at the TCP socket itself: an SSLSocket refuses recv() flags. Under TLS a
        # pending record (a close_notify alert) reads as "not closed"; end-of-file as closed.
        raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            raw.detach()  # the descriptor stays the driver's

    def configure_socket(self, conn: Any, options: NetworkOptions) -> None:
        # mysql-connector has no keepalive arguments: set the options on its socket once
        # connected (the handshake is bounded by connect_timeout instead). C extension:
        # no socket object to reach, so nothing is set (unverified, see the module docstring).
        sock = self.socket_of(conn)
        if sock is not None:
            try:
                set_socket_options(sock, options)  # options of the socket, not the descriptor
            finally:
                sock.close()

    def cancel(self, conn: Any, target: Any, args: Mapping[str, Any], timeout: float) -> bool:
        # KILL QUERY ends the statement and keeps the session (error 1317 on the blocked
        # connection). It needs a second connection, to the server the statement runs on,
        # with the same credentials (a user may always kill its own statements).
        if target is None:
            return False
        connection_id = int(conn.connection_id)
        side_args = {k: v for k, v in args.items() if k not in _SIDE_CONNECTION_DROP}
        side_args["host"] = conn.server_host
        side_args["port"] = conn.server_port
        # mysql-connector takes whole seconds (and at least 1) for these.
        seconds = max(1, math.ceil(timeout))
        side_args["connection_timeout"] = seconds
        side_args["read_timeout"] = seconds
        side_args["write_timeout"] = seconds
        side = target(**side_args)
        try:
            cur = side.cursor()
            cur.execute(f"KILL QUERY {connection_id}")
            cur.close()
        finally:
            side.close()
        return True

    def discard_pending(self, conn: Any, call: Any) -> None:
        if getattr(conn, "unread_result", False):
            conn.consume_results()

    def fileno(self, conn: Any) -> int | None:
        _, sock = _tcp_socket(conn)
        return None if sock is None else int(sock.fileno())

    def socket_of(self, conn: Any) -> socket.socket | None:
        _, sock = _tcp_socket(conn)
        if sock is None:
            return None
        # A second, plain socket object on a duplicate descriptor (the caller may close it
        # freely). Not sock.dup(): an SSLSocket (TLS, as IAM authentication requires) cannot
        # be duplicated; shutting the TCP socket down wakes a TLS read all the same.
        return socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))

    def transaction_status(self, conn: Any) -> TxStatus:
        if self.is_closed(conn):
            return TxStatus.UNKNOWN
        return TxStatus.IN_TRANSACTION if conn.in_transaction else TxStatus.IDLE

    def was_in_transaction(self, conn: Any, snapshot: Any) -> bool:
        # The driver keeps the server's last status flags after the connection is lost, so
        # no snapshot is needed.
        flag = getattr(conn, "in_transaction", None)
        if isinstance(flag, bool):
            return flag
        return self.transaction_status(conn) in (TxStatus.IN_TRANSACTION, TxStatus.IN_ERROR)

    def is_disconnect(self, exc: BaseException) -> bool:
        if isinstance(exc, errors.Error) or not isinstance(exc, myerrors.Error):
            return False
        if isinstance(exc, _CLIENT_TIMEOUTS):
            # The driver's own read/write timeouts (also a socket that TCP keepalive or
            # TCP_USER_TIMEOUT gave up on: ETIMEDOUT): it has closed the connection. Not the
            # server's 3024 (max_execution_time), which is a DatabaseError on a live session.
            return True
        errno = getattr(exc, "errno", None)
        if errno in _DISCONNECT_ERRNOS:
            return True
        if isinstance(exc, (myerrors.OperationalError, myerrors.InterfaceError)):
            message = str(exc).lower()
            return "lost connection" in message or "connection not available" in message
        return False

    def is_read_only_error(self, exc: BaseException) -> bool:
        return isinstance(exc, myerrors.Error) and getattr(exc, "errno", None) in _READ_ONLY_ERRNOS

    def is_auth_failure(self, exc: BaseException) -> bool:
        return (isinstance(exc, myerrors.Error) and not isinstance(exc, errors.Error)
                and getattr(exc, "errno", None) in _AUTH_ERRNOS)

    def user_of(self, args: Mapping[str, Any]) -> str | None:
        for name in ("user", "username"):
            if args.get(name) is not None:
                return str(args[name])
        return None

    def apply_credential(self, args: dict[str, Any], user: str | None, password: str,
                         clear_text: bool = False) -> None:
        if user is not None:
            args.pop("username", None)
            args["user"] = user
        for alias in ("passwd", "password1"):
            args.pop(alias, None)
        args["password"] = password
        if clear_text:
            args["auth_plugin"] = "mysql_clear_password"

    def apply_session_state(self, conn: Any, state: Mapping[str, Any]) -> None:
        for name in ("database", "autocommit", "time_zone", "sql_mode", "read_only"):
            if name in state:
                self.set_session_attribute(conn, name, state[name])

    def set_session_attribute(self, conn: Any, name: str, value: Any) -> None:
        if name == "read_only":
            # Applies to every later transaction of the session, autocommit statements too.
            mode = "READ ONLY" if value else "READ WRITE"
            conn.cmd_query(f"SET SESSION TRANSACTION {mode}")
        else:
            setattr(conn, name, value)

    def session_baseline(self, conn: Any) -> dict[str, Any]:
        # After COM_RESET_CONNECTION the server's autocommit is its global default; the
        # connect argument may have said otherwise.
        return {"autocommit": bool(conn.autocommit)}

    def reset_for_reuse(self, conn: Any, baseline: Mapping[str, Any]) -> None:
        if conn.in_transaction:
            conn.rollback()
        # COM_RESET_CONNECTION: rolls back, drops temporary tables, clears user and session
        # variables (the transaction access mode too) and prepared statements.
        conn.cmd_reset_connection()
        if "autocommit" in baseline:
            conn.autocommit = baseline["autocommit"]

    def query(self, conn: Any, sql: str) -> list[tuple[Any, ...]]:
        was_idle = not conn.in_transaction
        cur = conn.cursor(buffered=True, raw=False)
        try:
            cur.execute(sql)
            rows = [tuple(r) for r in cur.fetchall()] if cur.with_rows else []
        finally:
            cur.close()
            if was_idle and conn.in_transaction:
                conn.rollback()
        return rows

