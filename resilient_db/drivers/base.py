"""The driver boundary: what resilient_db needs from a DB-API driver, one class per driver.

A driver dialect knows the driver's connect parameters, how to tell a broken connection, how
to break a connection's socket from another thread, transaction status, error classification,
session state, and how to run an internal query without disturbing the application's
transaction. Everything driver-specific (including any private attribute) lives in the one
module of that driver.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import functools
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .. import errors
from .._params import (
    TCP_KEEPALIVE,
    TCP_KEEPALIVE_INTERVAL,
    TCP_KEEPALIVE_PROBES,
    TCP_KEEPALIVE_TIME,
)
from .._pipeline import HostSpec
from .._properties import Settings

if TYPE_CHECKING:
    from .._pipeline import Call
    from .._proxy import ConnectionProxy, CursorProxy


def describe_target(target: Any) -> str:
    """``target`` for an error message, never its bound arguments: the repr of
    ``functools.partial(connect, password=...)`` would show the password."""
    inner = target
    while isinstance(inner, functools.partial):
        inner = inner.func
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    module = getattr(inner, "__module__", None) or type(inner).__module__
    text = f"{module}.{name}" if module else name
    return f"functools.partial({text}, ...)" if inner is not target else text


def split_hosts(host: object, port: object) -> tuple[HostSpec, ...]:
    """The instances named by a ``host`` and ``port`` pair, in order.

    Follows libpq's multi-host syntax (``host=a,b port=5432,5433``, also what a
    ``postgresql://a:5432,b:5433/db`` URI becomes): one port for every host or one per host;
    an empty entry means the default (host ``localhost``, port ``None``). Ports are whole
    numbers from 1 to 65535 (int or string). Raises ``ConfigurationError`` naming ``host``
    or ``port`` otherwise.
    """
    if host is not None and not isinstance(host, str):
        raise errors.ConfigurationError(
            f"host must be a string (a name, an address, or libpq's comma-separated list), "
            f"not {type(host).__name__}: {host!r}",
            parameter="host", value=host)
    hosts = [h.strip() for h in host.split(",")] if host else [""]
    if port is None or port == "":
        ports: list[int | None] = [None]
    elif isinstance(port, str):
        ports = [_port(item.strip(), port) for item in port.split(",")]
    else:
        ports = [_port(port, port)]
    if len(ports) == 1:
        ports *= len(hosts)
    elif len(ports) != len(hosts):
        raise errors.ConfigurationError(
            f"port lists {len(ports)} ports ({port!r}) for {len(hosts)} hosts ({host!r}): give "
            "one port for every host, or one per host in the same order",
            parameter="port", value=port)
    return tuple(HostSpec(h or "localhost", p) for h, p in zip(hosts, ports, strict=True))


def _port(item: object, given: object) -> int | None:
    if item == "":
        return None  # libpq: an empty entry of a list is the default port
    if isinstance(item, int) and not isinstance(item, bool):
        number = item
    elif isinstance(item, str) and item.isascii() and item.isdigit():
        number = int(item)
    else:
        number = -1
    if not 1 <= number <= 65535:
        raise errors.ConfigurationError(
            f"port {given!r}: expected a port number from 1 to 65535 (for several hosts, "
            "a comma-separated list of them)",
            parameter="port", value=given)
    return number


@dataclass(frozen=True)
class NetworkOptions:
    """TCP settings for a connection's socket, from the ``tcp_keepalive*`` properties.
    ``None`` everywhere: leave the driver's and the OS's defaults alone.

    Keepalive times are whole seconds (what the kernel and libpq take, rounded up);
    ``user_timeout`` (seconds) is time + interval * probes when all three are set.
    """

    keepalive: bool | None = None
    idle: int | None = None
    interval: int | None = None
    probes: int | None = None
    user_timeout: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> NetworkOptions:
        enabled = settings[TCP_KEEPALIVE]
        time_, interval = settings[TCP_KEEPALIVE_TIME], settings[TCP_KEEPALIVE_INTERVAL]
        probes = settings[TCP_KEEPALIVE_PROBES]
        tuned = [p.name for p, v in ((TCP_KEEPALIVE_TIME, time_),
                                     (TCP_KEEPALIVE_INTERVAL, interval),
                                     (TCP_KEEPALIVE_PROBES, probes)) if v is not None]
        if enabled is False and tuned:
            raise errors.ConfigurationError(
                f"tcp_keepalive is false but {', '.join(tuned)} is set: keepalive settings "
                "need keepalive on; remove tcp_keepalive=false or the "
                f"{' and '.join(tuned)} setting",
                parameter="tcp_keepalive", value=False)
        if enabled is None and tuned:
            enabled = True
        idle = None if time_ is None else math.ceil(time_)
        every = None if interval is None else math.ceil(interval)
        user_timeout = None
        if enabled and idle is not None and every is not None and probes is not None:
            user_timeout = float(idle + every * probes)
        return cls(enabled, idle, every, probes, user_timeout)

    @property
    def empty(self) -> bool:
        return self.keepalive is None


NO_NETWORK_OPTIONS = NetworkOptions()


def set_socket_options(sock: socket.socket, options: NetworkOptions) -> None:
    """Apply ``options`` to a connected TCP socket (Linux option names; an option the
    platform lacks is skipped)."""
    if options.keepalive is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if options.keepalive else 0)
    if not options.keepalive:
        return
    for name, value in (("TCP_KEEPIDLE", options.idle), ("TCP_KEEPINTVL", options.interval),
                        ("TCP_KEEPCNT", options.probes)):
        if value is not None and hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    if options.user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        int(options.user_timeout * 1000))


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
    #: What the connect callable returns (checked once per physical connect).
    connection_types: ClassVar[tuple[type, ...]]
    #: The connect callable to name in errors.
    example_target: ClassVar[str]
    #: The driver itself accepts a list of hosts to try in order (libpq's ``host=a,b``).
    multi_host: ClassVar[bool] = False
    #: Attributes set on the connection that are session state to restore after a reconnect.
    session_attributes: ClassVar[frozenset[str]]
    #: What a session attribute is on a new (or reset) connection when nobody set it, where
    #: setting it costs a round trip: read/write splitting then skips setting it to that.
    session_defaults: ClassVar[Mapping[str, Any]] = {}
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

    def hosts_of(self, args: Mapping[str, Any]) -> tuple[HostSpec, ...]:
        """The instances the arguments name, in order (``ConfigurationError`` for a bad
        ``host`` or ``port``). More than one only for a driver with ``multi_host``."""
        hosts = split_hosts(args.get("host"), args.get("port"))
        if len(hosts) > 1 and not self.multi_host:
            raise errors.ConfigurationError(
                f"host {args.get('host')!r} lists several hosts, but {self.code} connects to "
                "one: give one host (for a cluster, its cluster endpoint; failover finds the "
                "other instances from the topology)",
                parameter="host", value=args.get("host"))
        return hosts

    def host_of(self, args: Mapping[str, Any]) -> HostSpec:
        """The (first) instance the arguments name."""
        return self.hosts_of(args)[0]

    # --- connection ----------------------------------------------------------------------
    def connect(self, target: Callable[..., Any], args: Mapping[str, Any],
                settings: Settings | None = None) -> Any:
        """Open a physical connection. ``settings`` (when given) carry the ``tcp_keepalive*``
        properties, applied as driver arguments or socket options; a driver argument the
        caller set explicitly (e.g. libpq ``keepalives_idle``) wins."""
        options = NO_NETWORK_OPTIONS if settings is None else NetworkOptions.from_settings(
            settings)
        if options.empty:
            return self.check_connection(target(**args), target)
        conn = self.check_connection(target(**self.network_args(args, options)), target)
        try:
            self.configure_socket(conn, options)
        except BaseException:
            conn.close()
            raise
        return conn

    def check_connection(self, conn: Any, target: Callable[..., Any]) -> Any:
        """``conn`` if it is one of the driver's connections; else ``ConfigurationError``
        (a wrapping ``target`` that returns ``None`` or something else would otherwise fail
        later, far from the cause)."""
        if isinstance(conn, self.connection_types):
            return conn
        close = getattr(conn, "close", None)
        if callable(close):
            # A failure to close it is not ours to report: the error below is the news.
            with contextlib.suppress(Exception):
                close()
        expected = " or ".join(f"{t.__module__}.{t.__qualname__}" for t in self.connection_types)
        raise errors.ConfigurationError(
            f"target {describe_target(target)} returned "
            f"{type(conn).__module__}.{type(conn).__qualname__}, not a {self.code} connection "
            f"({expected}): target must open and return the driver's connection, e.g. "
            f"{self.example_target}",
            parameter="target", value=describe_target(target))

    def network_args(self, args: Mapping[str, Any], options: NetworkOptions) -> Mapping[str, Any]:
        """``args`` with ``options`` expressed as driver arguments, where the driver has them."""
        return args

    def configure_socket(self, conn: Any, options: NetworkOptions) -> None:
        """Apply what :meth:`network_args` could not express to the connected socket."""
        return None

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

    def fileno(self, conn: Any) -> int | None:
        """The connection's own socket descriptor (not a duplicate), or ``None`` (closed, or
        not reachable for this driver)."""
        return None

    def forget(self, conn: Any) -> None:
        """In a child process after ``fork()``: cut this inherited connection off from its
        server without sending anything. The socket is shared with the parent, so the
        child's descriptor is pointed at ``/dev/null`` instead (``dup2``: nothing is closed,
        no FIN, no Terminate or COM_QUIT): whatever the child does with the connection later
        (use it, close it, let the garbage collector or interpreter exit close it, which for
        mysql-connector shuts the socket down) fails or goes nowhere, and the parent's
        session is untouched. Never raises."""
        try:
            fd = self.fileno(conn)
        except Exception:
            return
        if fd is None or fd < 0:
            return
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:
            return
        try:
            os.dup2(null, fd, inheritable=False)
        except OSError:
            pass
        finally:
            os.close(null)

    def cancel(self, conn: Any, target: Callable[..., Any] | None,
               args: Mapping[str, Any], timeout: float) -> bool:
        """Cancel the statement running on ``conn`` on the server, from another thread,
        within about ``timeout`` seconds. ``target``/``args``: how ``conn`` was opened (for
        drivers that need a side connection). Returns whether the server took the cancel.
        The default cannot cancel (the deadline then breaks the socket after its grace)."""
        return False

    def discard_pending(self, conn: Any, call: Call) -> None:
        """Drop results an interrupted statement left unread, so that the connection's next
        statement does not trip over them (MySQL). Default: nothing to do."""
        return None

    @abc.abstractmethod
    def transaction_status(self, conn: Any) -> TxStatus: ...

    def tx_snapshot(self, conn: Any) -> Any:
        """What :meth:`was_in_transaction` needs to know, read just *before* a call (cheap: it
        runs before every statement a failover-aware plugin wraps). Default: nothing."""
        return None

    def tx_snapshot_reader(self) -> Callable[[Any], Any] | None:
        """:meth:`tx_snapshot` as a callable, fetched once when a chain is built; ``None``
        when this driver needs no snapshot, so the per-statement path skips it. A driver may
        return a C-level callable (``operator.attrgetter``) to save a Python frame per
        statement."""
        if type(self).tx_snapshot is DriverDialect.tx_snapshot:
            return None
        return self.tx_snapshot

    def was_in_transaction(self, conn: Any, snapshot: Any) -> bool:
        """Whether a transaction was open when a call on ``conn`` failed, given the
        :meth:`tx_snapshot` taken before it. Unknown counts as open (an unknown outcome is
        reported, never a silently lost transaction)."""
        return self.transaction_status(conn) in (
            TxStatus.IN_TRANSACTION, TxStatus.IN_ERROR, TxStatus.UNKNOWN)

    # --- errors ----------------------------------------------------------------------------
    @abc.abstractmethod
    def is_disconnect(self, exc: BaseException) -> bool:
        """The error means the connection (or the server behind it) is gone."""

    @abc.abstractmethod
    def is_read_only_error(self, exc: BaseException) -> bool:
        """The server refused a write because it (or the transaction) is read-only."""

    def is_auth_failure(self, exc: BaseException) -> bool:
        """The server refused the login (bad password, expired or forged token). Default:
        never (a driver dialect that cannot tell gets no refresh-and-retry)."""
        return False

    # --- credentials -----------------------------------------------------------------------
    def user_of(self, args: Mapping[str, Any]) -> str | None:
        """The database user the connect arguments name (``None``: the driver's default)."""
        user = args.get("user")
        return None if user is None else str(user)

    def apply_credential(self, args: dict[str, Any], user: str | None, password: str,
                         clear_text: bool = False) -> None:
        """Set a credential in ``args`` (in place): ``user`` (``None``: keep the one given)
        and ``password``. ``clear_text``: the password must reach the server as is (an IAM
        token checked by PAM), not as a hash: drivers that choose an auth method say so."""
        if user is not None:
            args["user"] = user
        args["password"] = password

    def error(self, cls: type[errors.Error], message: str, **fields: Any) -> errors.Error:
        """An instance of ``cls`` that is also the driver's ``OperationalError`` when ``cls``
        is one of the runtime outcomes."""
        return self.error_classes.get(cls, cls)(message, **fields)

    # --- session state and internal queries -------------------------------------------------
    @abc.abstractmethod
    def apply_session_state(self, conn: Any, state: Mapping[str, Any]) -> None:
        """Set the recorded session attributes on a (new) physical connection."""

    def set_session_attribute(self, conn: Any, name: str, value: Any) -> None:
        """Set one session attribute (a name in ``session_attributes``) on ``conn``. The
        default sets the driver connection's attribute of that name."""
        setattr(conn, name, value)

    def enforce_read_only(self, conn: Any, on: bool) -> None:
        """Make the server refuse writes on ``conn`` in every statement (``on``) or stop
        doing so, when the driver's own ``read_only`` does not already (read/write splitting
        staying on the writer for want of a reader). The default does nothing."""
        return None

    @abc.abstractmethod
    def session_baseline(self, conn: Any) -> dict[str, Any]:
        """The session attributes of a new physical connection as the driver opened it, to
        restore when an internal pool takes the connection back (:meth:`reset_for_reuse`)."""

    @abc.abstractmethod
    def reset_for_reuse(self, conn: Any, baseline: Mapping[str, Any]) -> None:
        """Make ``conn`` as a new connection would be before an internal pool hands it to
        another application connection: no transaction, the server session reset (temporary
        tables, session variables, prepared statements), ``baseline`` restored. Raises when
        the connection cannot be reset (the pool then closes it)."""

    @abc.abstractmethod
    def query(self, conn: Any, sql: str) -> list[tuple[Any, ...]]:
        """Run an internal, schema-qualified statement and return plain tuples.

        Leaves the application's transaction state as it was: a transaction implicitly
        started by this query on an idle connection is rolled back.
        """
