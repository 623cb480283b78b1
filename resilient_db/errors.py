"""Errors raised by resilient_db itself.

Driver exceptions (``psycopg.errors.UniqueViolation``, ``mysql.connector.errors.IntegrityError``,
...) are never wrapped or replaced: they reach the application exactly as the driver raised them.
resilient_db raises its own errors only for its own outcomes::

    Exception
     └── Error                              base of everything resilient_db raises itself
          ├── ConfigurationError (ValueError)  bad property, conninfo, plugin or target
          │    └── DialectMismatchError        forced ``wrapper_dialect`` the server fails
          ├── FailoverError                    the connection failed and resilient_db acted
          │    ├── FailoverSuccessError            replaced; no open transaction was lost
          │    ├── TransactionResolutionUnknownError  replaced; open transaction's fate unknown
          │    └── FailoverFailedError             no usable connection within the budget
          ├── QueryTimeoutError                a client-side statement deadline expired
          ├── ReadWriteSplittingError          a read/write switch refused or impossible
          ├── SwitchoverError                  a blue/green switchover refused or outlasted a call
          └── ForkedConnectionError            a connection opened before fork() used in the child

The runtime outcomes (the ``FailoverError`` family, ``QueryTimeoutError``,
``SwitchoverError`` and ``ForkedConnectionError``) are also
catchable as the target driver's ``OperationalError``: each driver dialect creates one subclass
per outcome that inherits from both (``resilient_db.drivers.psycopg.FailoverSuccessError`` is a
``resilient_db.FailoverSuccessError`` *and* a ``psycopg.OperationalError``), so code and ORMs that
classify by driver type keep working. Raise them through ``DriverDialect.error(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "ConfigurationError",
    "ConnectAttempt",
    "DialectMismatchError",
    "Error",
    "FailoverError",
    "FailoverFailedError",
    "FailoverSuccessError",
    "ForkedConnectionError",
    "QueryTimeoutError",
    "ReadWriteSplittingError",
    "SwitchoverError",
    "TransactionResolutionUnknownError",
]


class Error(Exception):
    """Base class of every error resilient_db raises itself.

    Picklable, including the driver-flavoured subclasses (whose driver base classes have
    constructors of their own): the message and every structured field survive.
    """

    __module__ = "resilient_db"

    def __reduce__(self) -> tuple[Any, ...]:
        message = self.args[0] if len(self.args) == 1 else str(self)
        return (_rebuild, (type(self), message), self.__dict__)


def _rebuild(cls: type[Error], message: str) -> Error:
    obj = cls.__new__(cls)
    obj.args = (message,)
    return obj


class ConfigurationError(Error, ValueError):
    """Invalid input to :func:`resilient_db.connect`: the message names the culprit and the fix.

    ``parameter`` is the offending property, keyword or conninfo key (``None`` when the problem
    is not tied to one name); ``value`` is what was given, with secrets replaced by ``***``:
    the value of a password-like key, the password in a conninfo string or URI, and the value
    of an unknown parameter name (which may be a misspelled password key). Messages follow
    the same rule.
    """

    __module__ = "resilient_db"

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value


class DialectMismatchError(ConfigurationError):
    """``wrapper_dialect`` forces a database dialect whose checks the server does not pass.

    ``checks`` lists what was checked and what the server answered.
    """

    __module__ = "resilient_db"

    def __init__(
        self, message: str, *, dialect: str = "", checks: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message, parameter="wrapper_dialect", value=dialect)
        self.dialect = dialect
        self.checks = checks


@dataclass(frozen=True)
class ConnectAttempt:
    """One connection attempt made while failing over.

    ``error`` is the exception's ``repr`` (``None`` when the attempt connected but the instance
    had the wrong role, then ``outcome`` says so).
    """

    host: str
    port: int | None
    outcome: str
    error: str | None = None
    elapsed: float = 0.0


class FailoverError(Error):
    """The connection failed and resilient_db failed over (or tried to).

    ``host`` is the instance now in use (``None`` if none), ``failed_host`` the one that failed.
    ``statement_sent`` says whether the interrupted statement had been sent to the server: if
    it had, the server may have applied it.
    """

    __module__ = "resilient_db"

    def __init__(
        self,
        message: str = "",
        *,
        host: str | None = None,
        failed_host: str | None = None,
        statement_sent: bool = False,
    ) -> None:
        super().__init__(message)
        self.host = host
        self.failed_host = failed_host
        self.statement_sent = statement_sent


class FailoverSuccessError(FailoverError):
    """The connection was replaced; no open transaction was lost.

    The statement that was interrupted may or may not have been applied when
    ``statement_sent`` is true. Retry it if that is safe; session state (autocommit, read only,
    isolation level) has been restored on the new connection.
    """

    __module__ = "resilient_db"


class TransactionResolutionUnknownError(FailoverError):
    """A transaction was open when the connection failed; whether it committed is unknown.

    The connection is usable again (on the new instance); do not blindly replay the transaction.
    """

    __module__ = "resilient_db"


class FailoverFailedError(FailoverError):
    """No usable connection could be made within the failover budget.

    ``attempts`` lists every attempt; the exception is chained (``__cause__``) from the error
    that started the failover.
    """

    __module__ = "resilient_db"

    def __init__(
        self,
        message: str = "",
        *,
        host: str | None = None,
        failed_host: str | None = None,
        statement_sent: bool = False,
        attempts: tuple[ConnectAttempt, ...] = (),
    ) -> None:
        super().__init__(
            message, host=host, failed_host=failed_host, statement_sent=statement_sent
        )
        self.attempts = attempts


class QueryTimeoutError(Error):
    """A client-side statement deadline expired.

    ``timeout`` is the deadline in seconds; ``cancelled`` says whether the statement was
    cancelled on the server. A timeout alone never triggers failover.
    """

    __module__ = "resilient_db"

    def __init__(
        self,
        message: str = "",
        *,
        timeout: float | None = None,
        cancelled: bool = False,
        host: str | None = None,
    ) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.cancelled = cancelled
        self.host = host


class ReadWriteSplittingError(Error):
    """Setting ``read_only`` could not move the connection (``read_write_splitting``,
    ``srw``): a transaction is open (``reason`` ``"in_transaction"``), no instance of the
    wanted role could be reached (``"no_connection"``, ``attempts`` lists them), or the
    internal pool of that instance is full (``"pool_exhausted"``). The connection stays where it
    was, with its session state unchanged, and is usable.
    """

    __module__ = "resilient_db"

    def __init__(self, message: str = "", *, reason: str = "", host: str | None = None,
                 attempts: tuple[ConnectAttempt, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.host = host
        self.attempts = attempts


class SwitchoverError(Error):
    """The ``blue_green`` plugin held a connect or statement back during a blue/green
    switchover and gave up (``bg_connect_timeout_ms`` passed), or refused a connection to a
    green host name that is about to disappear. Nothing was sent to the server.

    ``host`` is the host name concerned; ``phase`` the switchover phase at that moment
    (``"IN_PROGRESS"``, ``"POST"``, ...); ``waited`` the seconds spent waiting (0 for a
    refusal). Retry later: the switchover typically completes within a minute.
    """

    __module__ = "resilient_db"

    def __init__(self, message: str = "", *, host: str | None = None, phase: str = "",
                 waited: float = 0.0) -> None:
        super().__init__(message)
        self.host = host
        self.phase = phase
        self.waited = waited


class ForkedConnectionError(Error):
    """A connection opened before ``fork()`` was used in the child process.

    Its socket is the parent's session: the child must open connections of its own. Nothing
    was sent to the server (the parent's session is untouched); ``close()`` in the child is
    allowed and sends nothing either. ``host`` is the instance the connection was on;
    ``parent_pid`` the process that opened it.
    """

    __module__ = "resilient_db"

    def __init__(self, message: str = "", *, host: str | None = None,
                 parent_pid: int | None = None) -> None:
        super().__init__(message)
        self.host = host
        self.parent_pid = parent_pid


#: The outcomes each driver dialect mirrors as a subclass of its ``OperationalError``.
RUNTIME_ERRORS: tuple[type[Error], ...] = (
    FailoverSuccessError,
    TransactionResolutionUnknownError,
    FailoverFailedError,
    QueryTimeoutError,
    SwitchoverError,
    ForkedConnectionError,
)
