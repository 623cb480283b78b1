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
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from ._decisions import Decision, get_decision_sink
from ._open_counts import note_opened
from ._properties import Property, Settings

if TYPE_CHECKING:
    from .drivers.base import DriverDialect
    from .hosts import TopologySnapshot


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
    CURSOR = "cursor"  # Connection.cursor (mysql-connector checks the connection there)


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
    """One pipelined call: ``fn(*args, **kwargs)`` is what the driver will run.

    Fields: ``op`` (:class:`Op`), ``method`` (the public method name, e.g.
    ``"Cursor.execute"``, for logs and telemetry only), ``fn``, ``args``, ``kwargs``,
    ``connection`` (the resilient_db connection), ``raw`` (the driver connection ``fn`` runs
    on; default: the connection's current one). Plugins on the per-statement path read
    ``call.raw``, not ``call.connection._raw``: an attribute of a proxy goes through its
    ``__getattr__`` pass-through, which CPython cannot specialize (several times slower).

    A call object is valid for the duration of the hook only: a cursor reuses one object for
    its successive statements (allocating one per statement is a measurable share of the
    per-query budget), so copy what you need to keep. A plugin that re-targets a call (a
    retried statement on a new cursor) passes ``call.replace(fn=...)`` on, never mutates it.
    """

    __slots__ = ("args", "busy", "connection", "fn", "kwargs", "method", "op", "raw")

    def __init__(
        self,
        op: Op,
        method: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        connection: Any,
        raw: Any = None,
    ) -> None:
        self.op = op
        self.method = method
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.connection = connection
        # Read from the proxy only when not given (slow path: connection-level calls pass it).
        self.raw = getattr(connection, "_raw", None) if raw is None else raw
        self.busy = False

    def replace(self, **changes: Any) -> Call:
        """A new call with some fields changed."""
        unknown = set(changes) - set(_CALL_FIELDS)
        if unknown:
            raise TypeError(f"Call has no field(s) {sorted(unknown)}")
        fields = {name: getattr(self, name) for name in _CALL_FIELDS}
        fields.update(changes)
        return Call(**fields)

    def __repr__(self) -> str:
        return f"Call({self.op.name}, {self.method!r}, args={self.args!r})"


_CALL_FIELDS = ("op", "method", "fn", "args", "kwargs", "connection", "raw")


Handler = Callable[[Call], Any]
#: ``statement(cursor, raw_cursor, query, params)``: what the execute chain does with
#: ``Call(Op.EXECUTE, "Cursor.execute", raw_cursor.execute, (query, params), {},
#: cursor.connection, cursor's driver connection)``, for the one call shape that every
#: statement has, without building the call object first (a layer builds it when it needs
#: one: on an error). Offered by a ``wrap_execute`` layer as an attribute ``statement`` of the
#: handler it returns; used only while that handler is the outermost (``Chains.statement``).
StatementHandler = Callable[[Any, Any, Any, Any], Any]
#: ``opener(connection, raw)``: what the cursor chain does with ``Call(Op.CURSOR,
#: "Connection.cursor", raw.cursor, (), {}, connection, raw)`` (``cursor()`` without
#: arguments: ORMs open one per statement), without building the call first. Offered like
#: :data:`StatementHandler`, as an attribute ``opener`` of a ``wrap_execute`` layer's handler;
#: used only while that handler is the outermost of the cursor chain (``Chains.opener``).
OpenerHandler = Callable[[Any, Any], Any]


@dataclass
class ConnectContext:
    """One physical connection about to be opened.

    ``args`` are the driver's connect arguments (plugins may change them, e.g. set a
    password); ``initial`` is false for reconnects and failover connections.
    """

    host: HostSpec
    args: dict[str, Any] = field(repr=False)  # holds the password: never in a repr or log
    settings: Settings
    driver: DriverDialect
    target: Callable[..., Any] = field(repr=False)  # a partial may hold the password too
    initial: bool = True


ConnectHandler = Callable[[ConnectContext], Any]


@dataclass
class HostsContext:
    """A request for the hosts that may serve this connection, with what is known so far.

    ``initial``: the candidates (failover passes every instance of the topology).
    ``topology``: the snapshot they come from, for instance ids and roles (``None``: hosts
    named by the user or found through DNS only). ``excluded``: filled by a plugin that
    leaves a host out, its address (``hosts.address_of``) -> why, so that the caller can say
    why the host was not tried (``custom_endpoint``: not a member of the endpoint).
    """

    initial: tuple[HostSpec, ...]
    settings: Settings
    topology: TopologySnapshot | None = None
    excluded: dict[str, str] = field(default_factory=dict)


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


#: ``PluginContext.extra`` key of the connection's credentials hook, set by an auth plugin
#: (``resilient_db.auth``): ``hook(host: HostSpec, args: dict) -> dict`` returns a copy of
#: driver connect arguments carrying a current credential for ``host``. For side connections
#: that do not go through the connect chain (MySQL's ``KILL QUERY`` connection).
CREDENTIALS_HOOK = "credentials"

#: ``PluginContext.extra`` key of a hook set by a plugin that handles some connection errors
#: itself, from outside ``failover`` (``blue_green`` during a switchover): a weak reference
#: to ``hook(exc) -> bool``. ``failover`` leaves an error for which the hook returns true to
#: that plugin (re-raised untouched) instead of failing over.
DEFER_FAILOVER = "defer_failover"


@dataclass
class PluginContext:
    """What a plugin instance knows about the connection it serves (one per connection).

    ``extra``: what plugins of the same connection share (e.g. :data:`CREDENTIALS_HOOK`).
    """

    settings: Settings
    driver: DriverDialect
    host: HostSpec
    extra: dict[str, Any] = field(default_factory=dict)
    #: Codes of every plugin selected for the connection (dormant ones included), known before
    #: any plugin is created: a plugin whose settings depend on another one being selected
    #: (a ``fastest_response`` strategy on ``fastest_response_strategy``) checks here.
    plugins: frozenset[str] = frozenset()
    #: Rebuild this connection's chains (set by the pipeline; for plugins whose dormancy
    #: changed).
    rebuild: Callable[[], None] = field(default=lambda: None, repr=False)
    #: This connection's host list (the ``hosts`` phase, set by the pipeline): the hosts of a
    #: request that may serve the connection. For plugins that choose instances (failover,
    #: initial connection, read/write splitting); ``hosts.allowed_only`` applies it to a
    #: topology snapshot.
    hosts: HostsHandler = field(default=lambda request: request.initial, repr=False)

    def decide(self, kind: str, plugin: str | None, **attributes: Any) -> Decision:
        """Record a decision in the process-wide sink and return it."""
        decision = Decision(kind, plugin, attributes, time.monotonic())
        get_decision_sink().record(decision)
        return decision


class Plugin:
    """Base class of every plugin. Override a hook to subscribe to its phase.

    Subclasses set ``code`` (the name users write in ``plugins=``), ``intercepts`` (ops of the
    execute phase they want; empty means none even if ``execute`` is overridden) and
    ``properties`` (third-party plugins only: built-in properties live in ``_params``), and
    ``single_host`` (true: the plugin finds the cluster's instances itself, so a driver-level
    host list such as libpq's ``host=a,b`` is refused when it is selected).
    One instance serves one connection; process-wide state (monitors, caches) belongs in
    module-level managers that instances share.

    Two optional refinements for plugins on the hot path:

    - ``wrap_execute(proceed) -> handler``: build this plugin's layer of the execute chain
      once (a closure over ``proceed``), instead of the default layer that calls
      ``self.execute(call, proceed)``. Saves a Python frame per call.
    - ``dormant() -> bool``: while true the plugin is left out of every chain (it costs
      nothing). A plugin whose dormancy changes calls ``self.ctx.rebuild()``.
    """

    code: ClassVar[str] = ""
    intercepts: ClassVar[frozenset[Op]] = frozenset()
    properties: ClassVar[tuple[Property[Any], ...]] = ()
    single_host: ClassVar[bool] = False

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx

    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        return proceed(ctx)

    def execute(self, call: Call, proceed: Handler) -> Any:
        return proceed(call)

    def wrap_execute(self, proceed: Handler) -> Handler:
        hook = self.execute

        def handler(call: Call) -> Any:
            return hook(call, proceed)

        return handler

    def hosts(self, ctx: HostsContext, proceed: HostsHandler) -> tuple[HostSpec, ...]:
        return proceed(ctx)

    def on_connection_changed(self, event: ConnectionChanged) -> None:
        return None

    def on_host_changed(self, event: HostChanged) -> None:
        return None

    def dormant(self) -> bool:
        return False


def _overrides(plugin: Plugin, name: str) -> bool:
    return getattr(type(plugin), name) is not getattr(Plugin, name)


def _intercepts(plugin: Plugin, op: Op) -> bool:
    return op in plugin.intercepts and (
        _overrides(plugin, "execute") or _overrides(plugin, "wrap_execute")
    )


def _run_call(call: Call) -> Any:
    if call.kwargs:
        return call.fn(*call.args, **call.kwargs)
    return call.fn(*call.args)


#: The innermost handler of every execute chain: runs the driver call. A ``wrap_execute``
#: layer whose ``proceed is RUN_CALL`` may call ``call.fn`` itself and save a frame.
RUN_CALL: Handler = _run_call

#: What an :func:`guarded_execute` error hook returns to let the driver's error go up
#: untouched (any other value is the call's result, e.g. that of a transparent retry).
RERAISE: Final[Any] = object()


class TxSnapshotHolder(Protocol):
    """Where :func:`guarded_execute` keeps the driver's transaction snapshot taken before the
    current call (the plugin instance; its error hook reads it)."""

    _tx_before: Any


def guarded_execute(
    proceed: Handler,
    state: TxSnapshotHolder,
    snapshot: Callable[[Any], Any] | None,
    on_error: Callable[[Call, Exception, Handler], Any],
) -> Handler:
    """An execute layer that keeps ``snapshot(call.raw)`` (the driver's cheap transaction
    snapshot, ``None``: the driver needs none) in ``state._tx_before``, runs the rest of the
    chain (``proceed``; the driver call itself when ``proceed`` is :data:`RUN_CALL`, one frame
    less) and hands an ``Exception`` to ``on_error(call, exc, proceed)``: its :data:`RERAISE`
    re-raises the error untouched, any other value is returned. For the plugins that fail a
    connection over (``failover``, ``limitless``)."""
    if proceed is RUN_CALL:  # innermost: call the driver here, one frame less
        def handler(call: Call) -> Any:
            if snapshot is not None:
                state._tx_before = snapshot(call.raw)
            try:
                kwargs = call.kwargs
                return call.fn(*call.args, **kwargs) if kwargs else call.fn(*call.args)
            except Exception as exc:
                result = on_error(call, exc, proceed)
                if result is RERAISE:
                    raise
                return result
        return handler

    def chained(call: Call) -> Any:
        if snapshot is not None:
            state._tx_before = snapshot(call.raw)
        try:
            return proceed(call)
        except Exception as exc:
            result = on_error(call, exc, proceed)
            if result is RERAISE:
                raise
            return result
    return chained


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


_SLOT = {op: op.value for op in Op}  # enum .value is a slow property on Python 3.11


class Chains:
    """Per-connection handlers, one attribute per op; ``None`` when nobody intercepts it.

    Proxies read ``chains.<op>`` on every call, so a rebuild (a plugin waking from dormancy)
    takes effect on the next call, on every thread.
    """

    __slots__ = (
        "callproc",
        "close",
        "commit",
        "copy",
        "cursor",
        "execute",
        "executemany",
        "fetch",
        "opener",
        "pipeline",
        "rollback",
        "session",
        "statement",
        "transaction",
    )
    callproc: Handler | None
    close: Handler | None
    commit: Handler | None
    copy: Handler | None
    cursor: Handler | None
    execute: Handler | None
    executemany: Handler | None
    fetch: Handler | None
    pipeline: Handler | None
    rollback: Handler | None
    session: Handler | None
    transaction: Handler | None
    #: The execute chain's shortcut for ``Cursor.execute(query, params)`` without keyword
    #: arguments, when its outermost layer offers one (``handler.statement``: see
    #: :data:`StatementHandler`): the cursor then builds no ``Call`` unless the statement
    #: fails. ``None``: every statement goes through ``execute``.
    statement: StatementHandler | None
    #: The cursor chain's shortcut for ``Connection.cursor()`` without arguments, when its
    #: outermost layer offers one (``handler.opener``: see :data:`OpenerHandler`). ``None``:
    #: every ``cursor()`` goes through ``cursor``.
    opener: OpenerHandler | None

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        self.build(plugins)

    def build(self, plugins: Sequence[Plugin]) -> None:
        built: dict[tuple[int, ...], Handler] = {}
        for op in Op:
            chosen = [p for p in plugins if _intercepts(p, op)]
            handler: Handler | None = None
            if chosen:
                key = tuple(id(p) for p in chosen)
                handler = built.get(key)
                if handler is None:
                    handler = _run_call
                    for plugin in reversed(chosen):
                        handler = plugin.wrap_execute(handler)
                    built[key] = handler
            setattr(self, op.value, handler)
        self.statement = getattr(self.execute, "statement", None)
        self.opener = getattr(self.cursor, "opener", None)

    def fill(self, handler: Handler) -> None:
        """Every op runs ``handler`` (a connection inherited across ``fork()``)."""
        for op in Op:
            setattr(self, op.value, handler)
        self.statement = None
        self.opener = None

    def for_op(self, op: Op) -> Handler | None:
        handler: Handler | None = getattr(self, _SLOT[op])
        return handler


#: A pipeline's state: open, closed by the application (``close()``), or inherited by a
#: child process across ``fork()``.
OPEN = "open"
CLOSED = "closed"
FORKED = "forked"


class Pipeline:
    """The plugins of one connection and the chains built from them, once (and again only
    when a plugin's dormancy changes).

    ``state`` is :data:`OPEN` until the application closes the connection (:data:`CLOSED`:
    every chain is empty from then on, so calls go straight to the closed driver connection,
    which raises its own "connection is closed" error, and no plugin can reconnect it) or the
    process forks (:data:`FORKED`, in the child: see ``ConnectionProxy._inherited``)."""

    __slots__ = ("__weakref__", "chains", "connect", "ctx", "fetch_may_be_intercepted",
                 "forked_handler", "hosts", "inner", "listeners", "may_intercept", "plugins",
                 "state")

    def __init__(self, plugins: Sequence[Plugin], ctx: PluginContext,
                 inner: Sequence[Plugin] = ()) -> None:
        self.plugins = tuple(plugins)
        #: resilient_db's own stages, innermost in every chain after the plugins and not
        #: listed in ``plugins`` (the statement deadline, ``_deadline.DeadlineStage``).
        self.inner = tuple(inner)
        self.ctx = ctx
        self.state = OPEN
        #: In a forked child: the handler every op of an inherited connection gets.
        self.forked_handler: Handler | None = None
        #: Ops some plugin intercepts when awake: the others can never have a chain.
        self.may_intercept = subscribed_ops(self.plugins + self.inner)
        #: ``Op.FETCH in may_intercept``, read for every new cursor (SQLAlchemy and Django
        #: open one per statement): an enum's hash is a Python-level call.
        self.fetch_may_be_intercepted = Op.FETCH in self.may_intercept
        self.chains = Chains(())
        self.listeners = tuple(
            p
            for p in self.plugins
            if _overrides(p, "on_connection_changed") or _overrides(p, "on_host_changed")
        )
        self.rebuild()
        ref = weakref.ref(self)

        def rebuild() -> None:
            pipeline = ref()
            if pipeline is not None:
                pipeline.rebuild()

        ctx.rebuild = rebuild

        def hosts(request: HostsContext) -> tuple[HostSpec, ...]:
            pipeline = ref()
            return request.initial if pipeline is None else pipeline.hosts(request)

        ctx.hosts = hosts

    def rebuild(self) -> None:
        """(Re)build every chain from the plugins that are not dormant (none once closed: a
        plugin waking up later, e.g. the connection tracker after a writer change, must not
        bring a closed connection back)."""
        if self.state is not OPEN:
            self.chains.build(())
            if self.forked_handler is not None:
                self.chains.fill(self.forked_handler)
            return
        awake = [p for p in self.plugins + self.inner if not p.dormant()]
        self.chains.build(awake)
        connect: ConnectHandler = _connect_terminal
        for plugin in reversed([p for p in awake if _overrides(p, "connect")]):
            connect = _link_connect(plugin, connect)
        self.connect = connect
        hosts: HostsHandler = _hosts_terminal
        for plugin in reversed([p for p in awake if _overrides(p, "hosts")]):
            hosts = _link_hosts(plugin, hosts)
        self.hosts = hosts

    def close(self, host: HostSpec) -> None:
        """The application closed the connection (``host``: where it was): empty every
        chain for good and tell the plugins (``ConnectionChanged`` with reason ``"close"``)
        so that they let go of monitors. Idempotent."""
        if self.state is not OPEN:
            return
        self.state = CLOSED
        self.rebuild()
        self.notify_connection_changed(ConnectionChanged(host, None, "close"))

    def fork(self, handler: Handler) -> None:
        """In a child process after ``fork()``: every op of this (inherited) connection runs
        ``handler`` instead of the driver call (see ``ConnectionProxy._inherited``)."""
        self.state = FORKED
        self.forked_handler = handler
        self.rebuild()

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
    raw = ctx.driver.connect(ctx.target, ctx.args, ctx.settings)
    # Where this physical connection went, for the per-host connection counts.
    note_opened(raw, ctx.host, ctx.driver.default_port)
    return raw


def _hosts_terminal(ctx: HostsContext) -> tuple[HostSpec, ...]:
    return ctx.initial


def subscribed_ops(plugins: Iterable[Plugin]) -> frozenset[Op]:
    """Every op at least one of ``plugins`` intercepts (for docs and tests)."""
    ops: set[Op] = set()
    for plugin in plugins:
        ops |= {op for op in plugin.intercepts if _intercepts(plugin, op)}
    return frozenset(ops)
