"""Helpers shared by the connect-phase cluster plugins (``initial_connection``, ``stale_dns``):
the dialect and addressing of an endpoint, the topology monitor already serving it, opening a
connection to one instance with a bounded timeout, and asking it who it is.

No state of its own except the round-robin cursors of endpoints no monitor serves yet.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

from .. import topology
from .._params import (
    AURORA_MYSQL_LOOKALIKE_SCHEMA,
    CLUSTER_ID,
    CLUSTER_INSTANCE_HOST_PATTERN,
    WRAPPER_DIALECT,
)
from .._pipeline import ConnectContext, ConnectHandler, HostSpec
from ..dialects import DETECTION_ORDER, aurora_mysql_lookalike, cached_detect, family_of
from ..dialects import get_dialect as _get_dialect
from ..dialects.base import DatabaseDialect
from ..errors import ConnectAttempt
from ..failover_core import SelfReport
from ..hosts import Host, Role
from ..selection import RoundRobinCursor
from ..topology import Addressing, TopologyMonitor, read_self_report

#: Connect arguments that would bypass the address chosen.
_ADDRESS_ARGS = ("hostaddr", "unix_socket")

_cursor_lock = threading.Lock()
_cursors: dict[str, RoundRobinCursor] = {}


def port_of(ctx: ConnectContext) -> int:
    return ctx.host.port if ctx.host.port is not None else ctx.driver.default_port


def dialect_for(ctx: ConnectContext, extra: dict[str, Any], raw: Any) -> DatabaseDialect:
    """The database dialect of the endpoint ``ctx`` connects to: the one already known for the
    connection, else the forced one (``aurora_mysql_lookalike_schema``, ``wrapper_dialect``;
    ``connect`` verifies it afterwards), else detected once per endpoint on ``raw``."""
    known = extra.get("dialect")
    if isinstance(known, DatabaseDialect):
        return known
    schema = ctx.settings[AURORA_MYSQL_LOOKALIKE_SCHEMA]
    if schema is not None:
        return aurora_mysql_lookalike(schema)
    forced = ctx.settings[WRAPPER_DIALECT]
    if forced is not None:
        return _get_dialect(forced)
    return cached_detect((ctx.driver.code, ctx.host.host, ctx.host.port), ctx.driver, raw)


def addressing_for(ctx: ConnectContext) -> Addressing:
    return Addressing.for_host(ctx.host.host, port_of(ctx),
                               ctx.settings[CLUSTER_INSTANCE_HOST_PATTERN])


def known_monitor(ctx: ConnectContext) -> TopologyMonitor | None:
    """The topology monitor already serving connections made to this endpoint in this process
    (started by the ``failover`` plugin of an earlier connection), if any. No I/O."""
    cluster_id = ctx.settings[CLUSTER_ID]
    for code in DETECTION_ORDER[family_of(ctx.driver)]:
        key = topology.endpoint_key(ctx.driver.code, code, ctx.host.host, port_of(ctx),
                                    cluster_id)
        monitor = topology.known_monitor(key)
        if monitor is not None:
            return monitor
    return None


def cursor_for(ctx: ConnectContext, monitor: TopologyMonitor | None) -> RoundRobinCursor:
    """The cluster's shared round-robin cursor (the monitor's), else one per endpoint."""
    if monitor is not None:
        return monitor.round_robin
    with _cursor_lock:
        return _cursors.setdefault(ctx.host.host.lower(), RoundRobinCursor())


def instance_context(ctx: ConnectContext, host: HostSpec, timeout: float | None,
                     ) -> ConnectContext:
    """``ctx`` aimed at ``host``, its connect timeout capped by ``timeout`` seconds (``None``:
    unchanged), in the driver's own argument names and units (whole seconds)."""
    args = dict(ctx.args)
    for name in _ADDRESS_ARGS:
        args.pop(name, None)
    args["host"] = host.host
    if host.port is not None:
        args["port"] = host.port
    if timeout is not None:
        whole = max(1, int(-(-timeout // 1)))
        if ctx.driver.code == "psycopg":
            current = _as_int(args.get("connect_timeout"))
            args["connect_timeout"] = whole if current is None or current <= 0 else min(
                current, whole)
        else:
            current = _as_int(args.pop("connect_timeout", None))
            current = _as_int(args.get("connection_timeout")) if current is None else current
            args["connection_timeout"] = whole if current is None or current <= 0 else min(
                current, whole)
    return ConnectContext(host, args, ctx.settings, ctx.driver, ctx.target, initial=ctx.initial)


def _as_int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def open_at(ctx: ConnectContext, proceed: ConnectHandler, host: HostSpec,
            timeout: float | None) -> Any:
    """A connection to ``host`` through the rest of the connect chain."""
    return proceed(instance_context(ctx, host, timeout))


def report_on(ctx: ConnectContext, dialect: DatabaseDialect, raw: Any, host: HostSpec,
              addressing: Addressing, *, with_topology: bool) -> SelfReport:
    """What the instance behind ``raw`` says about itself (internal, schema-qualified SQL)."""
    return read_self_report(ctx.driver, dialect, raw, Host(host.host, host.port),
                            addressing, with_topology=with_topology)


def has_role(report: SelfReport, wanted: Role) -> bool:
    """Whether the instance said it has the ``wanted`` role (WRITER or READER)."""
    if report.is_reader is None:
        return False
    return report.is_reader is (wanted is Role.READER)


def role_text(report: SelfReport) -> str:
    if report.is_reader is None:
        return "did not say whether it is a reader"
    return "is a reader" if report.is_reader else "is the writer"


def attempt(host: HostSpec, outcome: str, error: BaseException | None, elapsed: float,
            ) -> ConnectAttempt:
    return ConnectAttempt(host.host, host.port, outcome,
                          None if error is None else repr(error), elapsed)


def close_quietly(raw: Any) -> None:
    with contextlib.suppress(Exception):
        raw.close()


def addresses(host: str) -> frozenset[str]:
    """The IP addresses ``host`` resolves to now (empty when it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)
