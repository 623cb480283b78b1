"""The driver boundary: what resilient_db needs from a DB-API driver, one class per driver.

A driver dialect knows the driver's connect parameters, how to tell a broken connection, how
to break a connection's socket from another thread, transaction status, error classification,
session state, and how to run an internal query without disturbing the application's
transaction. Everything driver-specific (including any private attribute) lives in the one
module of that driver.
"""

from __future__ import annotations

import abc
import enum
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .. import errors
from .._pipeline import HostSpec

if TYPE_CHECKING:
    from .._proxy import ConnectionProxy, CursorProxy


class TxStatus(enum.Enum):
    """Transaction status of a physical connection, as far as the client knows it."""

    IDLE = "idle"  # no transaction open
    ACTIVE = "active"  # a statement is running right now
    IN_TRANSACTION = "in_transaction"
    IN_ERROR = "in_error"  # a failed transaction waiting for rollback
    UNKNOWN = "unknown"  # closed or broken


class DriverDialect(abc.ABC):
    """One supported driver. Instances are stateless and shared process-wide."""

    code: ClassVar[str]
    #: The driver's key for the database name (``dbname`` / ``database``).
    database_key: ClassVar[str]
    uri_schemes: ClassVar[tuple[str, ...]]
    default_port: ClassVar[int]
    #: Attributes set on the connection that are session state to restore after a reconnect.
    session_attributes: ClassVar[frozenset[str]]
    #: Names other drivers use for this driver's parameters, for "did you mean" hints.
    renames: ClassVar[Mapping[str, str]] = {}
    connection_proxy: ClassVar[type[ConnectionProxy]]
    cursor_proxy: ClassVar[type[CursorProxy]]

    OperationalError: ClassVar[type[Exception]]
    #: resilient_db error class -> its subclass that is also the driver's OperationalError.
    error_classes: ClassVar[Mapping[type[errors.Error], type[errors.Error]]]

    # --- arguments ---------------------------------------------------------------------
    @abc.abstractmethod
    def param_names(self) -> frozenset[str]:
        """Every connect parameter the driver accepts."""

    def coerce_arg(self, name: str, value: Any) -> Any:
        """Convert a string from a conninfo to the type the driver expects for ``name``."""
        return value

    def host_of(self, args: Mapping[str, Any]) -> HostSpec:
        host = str(args.get("host") or "localhost")
        port = args.get("port")
        return HostSpec(host, int(port) if port not in (None, "") else None)

    # --- connection ----------------------------------------------------------------------
    def connect(self, target: Callable[..., Any], args: Mapping[str, Any]) -> Any:
        return target(**args)

    @abc.abstractmethod
    def is_closed(self, conn: Any) -> bool:
        """Closed by the application or known broken (no I/O)."""

    @abc.abstractmethod
    def socket_of(self, conn: Any) -> socket.socket | None:
        """A socket object sharing the connection's socket (caller closes it), or ``None``."""

    def abort(self, conn: Any) -> bool:
        """Break the connection's socket (``shutdown(SHUT_RDWR)``) so that a thread blocked on
        it wakes with the driver's own error. Safe to call from any thread; never raises.
        Returns whether a socket was shut down.
        """
        try:
            sock = self.socket_of(conn)
        except Exception:
            return False
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            sock.close()

    @abc.abstractmethod
    def transaction_status(self, conn: Any) -> TxStatus: ...

    # --- errors ----------------------------------------------------------------------------
    @abc.abstractmethod
    def is_disconnect(self, exc: BaseException) -> bool:
        """The error means the connection (or the server behind it) is gone."""

    @abc.abstractmethod
    def is_read_only_error(self, exc: BaseException) -> bool:
        """The server refused a write because it (or the transaction) is read-only."""

    def error(self, cls: type[errors.Error], message: str, **fields: Any) -> errors.Error:
        """An instance of ``cls`` that is also the driver's ``OperationalError`` when ``cls``
        is one of the runtime outcomes."""
        return self.error_classes.get(cls, cls)(message, **fields)

    # --- session state and internal queries -------------------------------------------------
    @abc.abstractmethod
    def apply_session_state(self, conn: Any, state: Mapping[str, Any]) -> None:
        """Set the recorded session attributes on a (new) physical connection."""

    @abc.abstractmethod
    def query(self, conn: Any, sql: str) -> list[tuple[Any, ...]]:
        """Run an internal, schema-qualified statement and return plain tuples.

        Leaves the application's transaction state as it was: a transaction implicitly
        started by this query on an idle connection is rolled back.
        """
