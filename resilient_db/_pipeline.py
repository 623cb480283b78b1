"""The interceptor pipeline: plugins, phases, and chains built once per connection.

A plugin subscribes to a phase by overriding its hook; for the execute phase it also names the
operations it intercepts (``intercepts``). Each connection folds its plugins into one handler
per operation, once, at connect time (starlette-style: each layer wraps the next, built by
folding the list in reverse). An operation nobody intercepts has no chain (``None``) and the
proxy calls the driver directly.

Phases and hooks (one context object per call, so new fields never break plugins):

- connect: ``connect(ctx: ConnectContext, proceed) -> raw connection`` for every physical
  connection (initial, reconnect, failover).
- execute: ``execute(call: Call, proceed) -> result`` for cursor and connection I/O.
- host list: ``hosts(ctx: HostsContext, proceed) -> tuple[HostSpec, ...]``: who may serve.
- notifications (fan-out, not chained): ``on_connection_changed``, ``on_host_changed``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ._decisions import Decision, get_decision_sink
from ._properties import Property, Settings

if TYPE_CHECKING:
    from .drivers.base import DriverDialect


class Op(enum.Enum):
    """What a pipelined call does. Plugins intercept by op, never by method-name string."""

    EXECUTE = "execute"  # Cursor.execute, psycopg Connection.execute, mysql cmd_query
    EXECUTEMANY = "executemany"
    CALLPROC = "callproc"
    FETCH = "fetch"  # fetchone/many/all, iteration, scroll, nextset, stream steps
    COPY = "copy"  # psycopg Cursor.copy (entering the block sends COPY)
    COMMIT = "commit"
    ROLLBACK = "rollback"
    TRANSACTION = "transaction"  # psycopg Connection.transaction() enter/exit, mysql start
    PIPELINE = "pipeline"  # psycopg Connection.pipeline() enter/exit
    SESSION = "session"  # setting autocommit / read only / isolation level
    CLOSE = "close"  # Cursor.close, Connection.close, leaving a `with` block


ALL_OPS: frozenset[Op] = frozenset(Op)
#: Ops that send a statement to the server (what "execute-like" plugins usually want).
STATEMENT_OPS: frozenset[Op] = frozenset(
    {Op.EXECUTE, Op.EXECUTEMANY, Op.CALLPROC, Op.COPY}
)


@dataclass(frozen=True)
class HostSpec:
    """One database instance as the application reaches it. ``port`` ``None``: driver default."""

    host: str
    port: int | None = None

    def __str__(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


class Call:
    """One pipelined call. ``fn(*args, **kwargs)`` is what the driver will run.

    Plugins may replace ``fn`` (e.g. to re-target a retried statement at a new cursor).
    ``method`` is the public method name (``"Cursor.execute"``) for logs and telemetry only.
    """

    __slots__ = ("args", "connection", "fn", "kwargs", "method", "op")

    def __init__(
        self,
        op: Op,
        method: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        connection: Any,
    ) -> None:
        self.op = op
        self.method = method
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.connection = connection


Handler = Callable[[Call], Any]


@dataclass
class ConnectContext:
    """One physical connection about to be opened.

    ``args`` are the driver's connect arguments (plugins may change them, e.g. set a
    password); ``initial`` is false for reconnects and failover connections.
    """

    host: HostSpec
    args: dict[str, Any]
    settings: Settings
    driver: DriverDialect
    target: Callable[..., Any]
    initial: bool = True


ConnectHandler = Callable[[ConnectContext], Any]


@dataclass
class HostsContext:
    """A request for the hosts that may serve this connection, with what is known so far."""

    initial: tuple[HostSpec, ...]
    settings: Settings


HostsHandler = Callable[[HostsContext], tuple[HostSpec, ...]]


@dataclass(frozen=True)
class ConnectionChanged:
    """The physical connection under a proxy was opened, replaced or closed."""

    old_host: HostSpec | None
    new_host: HostSpec | None
    reason: str


@dataclass(frozen=True)
class HostChanged:
    """A host's state changed (went down, came up, changed role)."""

    host: HostSpec
    state: str
    reason: str = ""


@dataclass
class PluginContext:
    """What a plugin instance knows about the connection it serves (one per connection)."""

    settings: Settings
    driver: DriverDialect
    host: HostSpec
    extra: dict[str, Any] = field(default_factory=dict)

    def decide(self, kind: str, plugin: str | None, **attributes: Any) -> Decision:
        """Record a decision in the process-wide sink and return it."""
        decision = Decision(kind, plugin, attributes, time.monotonic())
        get_decision_sink().record(decision)
        return decision


class Plugin:
    """Base class of every plugin. Override a hook to subscribe to its phase.

    Subclasses set ``code`` (the name users write in ``plugins=``), ``intercepts`` (ops of the
    execute phase they want; empty means none even if ``execute`` is overridden) and
    ``properties`` (third-party plugins only: built-in properties live in ``_params``).
    One instance serves one connection; process-wide state (monitors, caches) belongs in
    module-level managers that instances share.
    """

    code: ClassVar[str] = ""
    intercepts: ClassVar[frozenset[Op]] = frozenset()
    properties: ClassVar[tuple[Property[Any], ...]] = ()

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx

    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        return proceed(ctx)

    def execute(self, call: Call, proceed: Handler) -> Any:
        return proceed(call)

    def hosts(self, ctx: HostsContext, proceed: HostsHandler) -> tuple[HostSpec, ...]:
        return proceed(ctx)

    def on_connection_changed(self, event: ConnectionChanged) -> None:
        return None

    def on_host_changed(self, event: HostChanged) -> None:
        return None


def _overrides(plugin: Plugin, name: str) -> bool:
    return getattr(type(plugin), name) is not getattr(Plugin, name)


def _run_call(call: Call) -> Any:
    return call.fn(*call.args, **call.kwargs)


def _link_execute(plugin: Plugin, proceed: Handler) -> Handler:
    hook = plugin.execute

    def handler(call: Call) -> Any:
        return hook(call, proceed)

    return handler


def _link_connect(plugin: Plugin, proceed: ConnectHandler) -> ConnectHandler:
    hook = plugin.connect

    def handler(ctx: ConnectContext) -> Any:
        return hook(ctx, proceed)

    return handler


def _link_hosts(plugin: Plugin, proceed: HostsHandler) -> HostsHandler:
    hook = plugin.hosts

    def handler(ctx: HostsContext) -> tuple[HostSpec, ...]:
        return hook(ctx, proceed)

    return handler


class Chains:
    """Per-connection handlers, one attribute per op; ``None`` when nobody intercepts it."""

    __slots__ = (
        "callproc",
        "close",
        "commit",
        "copy",
        "execute",
        "executemany",
        "fetch",
        "pipeline",
        "rollback",
        "session",
        "transaction",
    )
    callproc: Handler | None
    close: Handler | None
    commit: Handler | None
    copy: Handler | None
    execute: Handler | None
    executemany: Handler | None
    fetch: Handler | None
    pipeline: Handler | None
    rollback: Handler | None
    session: Handler | None
    transaction: Handler | None

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        built: dict[tuple[int, ...], Handler] = {}
        for op in Op:
            chosen = [p for p in plugins if op in p.intercepts and _overrides(p, "execute")]
            handler: Handler | None = None
            if chosen:
                key = tuple(id(p) for p in chosen)
                handler = built.get(key)
                if handler is None:
                    handler = _run_call
                    for plugin in reversed(chosen):
                        handler = _link_execute(plugin, handler)
                    built[key] = handler
            setattr(self, op.value, handler)

    def for_op(self, op: Op) -> Handler | None:
        handler: Handler | None = getattr(self, op.value)
        return handler


class Pipeline:
    """The plugins of one connection and the chains built from them, once."""

    __slots__ = ("chains", "connect", "ctx", "hosts", "listeners", "plugins")

    def __init__(self, plugins: Sequence[Plugin], ctx: PluginContext) -> None:
        self.plugins = tuple(plugins)
        self.ctx = ctx
        self.chains = Chains(self.plugins)
        connect: ConnectHandler = _connect_terminal
        for plugin in reversed([p for p in self.plugins if _overrides(p, "connect")]):
            connect = _link_connect(plugin, connect)
        self.connect = connect
        hosts: HostsHandler = _hosts_terminal
        for plugin in reversed([p for p in self.plugins if _overrides(p, "hosts")]):
            hosts = _link_hosts(plugin, hosts)
        self.hosts = hosts
        self.listeners = tuple(
            p
            for p in self.plugins
            if _overrides(p, "on_connection_changed") or _overrides(p, "on_host_changed")
        )

    def notify_connection_changed(self, event: ConnectionChanged) -> None:
        for plugin in self.listeners:
            plugin.on_connection_changed(event)

    def notify_host_changed(self, event: HostChanged) -> None:
        for plugin in self.listeners:
            plugin.on_host_changed(event)

    def plugin(self, code: str) -> Plugin | None:
        for plugin in self.plugins:
            if plugin.code == code:
                return plugin
        return None


def _connect_terminal(ctx: ConnectContext) -> Any:
    return ctx.driver.connect(ctx.target, ctx.args)


def _hosts_terminal(ctx: HostsContext) -> tuple[HostSpec, ...]:
    return ctx.initial


def subscribed_ops(plugins: Iterable[Plugin]) -> frozenset[Op]:
    """Every op at least one of ``plugins`` intercepts (for docs and tests)."""
    ops: set[Op] = set()
    for plugin in plugins:
        if _overrides(plugin, "execute"):
            ops |= plugin.intercepts
    return frozenset(ops)
