"""resilient_db: failover, failure monitoring and deadlines for psycopg 3 and
mysql-connector-python on Aurora, RDS and self-managed clusters.

    import psycopg, resilient_db
    conn = resilient_db.connect(psycopg.Connection.connect, "host=... dbname=app user=u",
                                plugins="execute_time", autocommit=True)

Nothing is started at import; :func:`shutdown` stops any background work plugins started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._connect import connect
from ._decisions import (
    CollectingSink,
    Decision,
    DecisionSink,
    get_decision_sink,
    set_decision_sink,
)
from ._lifecycle import shutdown
from ._options import CallOptions, call_options, current_options
from ._pipeline import (
    ALL_OPS,
    STATEMENT_OPS,
    Call,
    ConnectContext,
    ConnectionChanged,
    HostChanged,
    HostsContext,
    HostSpec,
    Op,
    Plugin,
    PluginContext,
)
from ._properties import Property
from ._proxy import ConnectionProxy, CursorProxy
from .errors import (
    ConfigurationError,
    DialectMismatchError,
    Error,
    FailoverError,
    FailoverFailedError,
    FailoverSuccessError,
    ForkedConnectionError,
    QueryTimeoutError,
    ReadWriteSplittingError,
    SwitchoverError,
    TransactionResolutionUnknownError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._aio import (
        AsyncConnectionProxy,
        AsyncCursorProxy,
        AsyncMysqlConnectionProxy,
        AsyncMysqlCursorProxy,
        connect_async,
    )

_ASYNC_NAMES = frozenset({"AsyncConnectionProxy", "AsyncCursorProxy",
                          "AsyncMysqlConnectionProxy", "AsyncMysqlCursorProxy",
                          "connect_async"})


def __getattr__(name: str) -> Any:
    # The asyncio front is imported on first use: importing resilient_db stays as light as
    # it was for applications that never use it.
    if name in _ASYNC_NAMES:
        from . import _aio

        return getattr(_aio, name)
    raise AttributeError(f"module 'resilient_db' has no attribute {name!r}")

__all__ = [
    "ALL_OPS",
    "STATEMENT_OPS",
    "AsyncConnectionProxy",
    "AsyncCursorProxy",
    "AsyncMysqlConnectionProxy",
    "AsyncMysqlCursorProxy",
    "Call",
    "CallOptions",
    "CollectingSink",
    "ConfigurationError",
    "ConnectContext",
    "ConnectionChanged",
    "ConnectionProxy",
    "CursorProxy",
    "Decision",
    "DecisionSink",
    "DialectMismatchError",
    "Error",
    "FailoverError",
    "FailoverFailedError",
    "FailoverSuccessError",
    "ForkedConnectionError",
    "HostChanged",
    "HostSpec",
    "HostsContext",
    "Op",
    "Plugin",
    "PluginContext",
    "Property",
    "QueryTimeoutError",
    "ReadWriteSplittingError",
    "SwitchoverError",
    "TransactionResolutionUnknownError",
    "__version__",
    "call_options",
    "connect",
    "connect_async",
    "current_options",
    "get_decision_sink",
    "set_decision_sink",
    "shutdown",
]
