"""PEP 249 connection and cursor proxies.

Every call that does I/O goes through the connection's pipeline (``Op``); attributes that do
no I/O pass straight through to the driver object so native features keep working. With no
plugin intercepting an op the proxy calls the driver directly: the cost is one attribute read
and one ``is None`` test. Rows are never wrapped or copied.

Driver-specific methods (psycopg's ``Connection.execute``/``transaction``/``pipeline`` and
``Cursor.copy``/``stream``; mysql-connector's ``cmd_query``/``start_transaction``/...) live in
the subclasses each driver dialect names.

After ``fork()``, a connection the child inherited is the parent's session: in the child its
socket is cut off without a word to the server (``DriverDialect.forget``) and every call
raises ``ForkedConnectionError`` (also the driver's ``OperationalError``), except ``close()``,
which sends nothing. Checked once, in the child, never on the per-statement path.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _lifecycle
from ._open_counts import Seat, address_for
from ._pipeline import (
    CLOSED,
    Call,
    Chains,
    ConnectionChanged,
    HostSpec,
    Op,
    Pipeline,
)
from .errors import ForkedConnectionError

if TYPE_CHECKING:
    from .drivers.base import DriverDialect

_OWN_CONNECTION_ATTRS = frozenset(
    {"_raw", "_driver", "_pipeline", "_chains", "_host", "_session", "_closed_by_us",
     "_cursors", "_seat", "__weakref__"}
)

# Enum member lookups cost ~0.2 µs each on Python 3.11: the hot paths (here and in the driver
# modules, which import these) use plain module constants.
_CALLPROC = Op.CALLPROC
_CLOSE = Op.CLOSE
_CURSOR = Op.CURSOR
_COMMIT = Op.COMMIT
_COPY = Op.COPY
_EXECUTE = Op.EXECUTE
_EXECUTEMANY = Op.EXECUTEMANY
_FETCH = Op.FETCH
_PIPELINE = Op.PIPELINE
_ROLLBACK = Op.ROLLBACK
_SESSION = Op.SESSION
_TRANSACTION = Op.TRANSACTION
_RETARGETABLE = frozenset({Op.EXECUTE, Op.EXECUTEMANY, Op.CALLPROC, Op.CURSOR, Op.SESSION})
# Cursor attributes bound to the driver cursor: after the physical connection is replaced they
# are dropped from the instance and rebuilt on first use (see CursorProxy._rebind).
_BOUND_ATTRS = frozenset({"_cur"})
_FETCH_METHODS = ("fetchone", "fetchmany", "fetchall")


class _Cursors:
    """The live cursor proxies of a connection (to rebind after a failover), held weakly.

    Cheaper than a ``weakref.WeakSet`` where it matters: registering a cursor is one weak
    reference without a callback and a list append (``Connection.execute`` opens a cursor per
    statement); dead references are dropped when the list has doubled since the last prune."""

    __slots__ = ("_limit", "_refs")

    def __init__(self) -> None:
        self._refs: list[weakref.ReferenceType[CursorProxy]] = []
        self._limit = 64

    def add(self, cursor: CursorProxy) -> None:
        refs = self._refs
        refs.append(weakref.ref(cursor))
        if len(refs) > self._limit:
            refs[:] = [r for r in refs if r() is not None]
            self._limit = max(64, 2 * len(refs))

    def __iter__(self) -> Iterator[CursorProxy]:
        return iter([c for c in (r() for r in self._refs) if c is not None])

    def __len__(self) -> int:
        return sum(1 for r in self._refs if r() is not None)


class ConnectionProxy:
    """A PEP 249 connection wrapping one physical driver connection at a time.

    ``raw`` is the current driver connection (it changes after a failover: do not keep it).
    """

    __slots__ = ("__weakref__", "_chains", "_closed_by_us", "_cursors", "_driver", "_host",
                 "_pipeline", "_raw", "_seat", "_session")
    _raw: Any
    _driver: DriverDialect
    _pipeline: Pipeline
    _chains: Chains
    _host: HostSpec
    _session: dict[str, Any]
    _closed_by_us: bool
    _cursors: _Cursors
    _seat: Seat

    def __init__(
        self, raw: Any, driver: DriverDialect, pipeline: Pipeline, host: HostSpec
    ) -> None:
        object.__setattr__(self, "_raw", raw)
        object.__setattr__(self, "_driver", driver)
        object.__setattr__(self, "_pipeline", pipeline)
        object.__setattr__(self, "_chains", pipeline.chains)
        object.__setattr__(self, "_host", host)
        # Session attributes the application set, to restore on a new physical connection.
        object.__setattr__(self, "_session", {})
        object.__setattr__(self, "_closed_by_us", False)
        # Live cursor proxies, rebound lazily after the physical connection is replaced.
        object.__setattr__(self, "_cursors", _Cursors())
        # This connection in the process-wide per-host counts (least_connections), until it is
        # closed or collected.
        object.__setattr__(self, "_seat", Seat(address_for(raw, host, driver.default_port)))
        _live.add(self)

    # --- resilient_db surface -----------------------------------------------------------------
    @property
    def resilient(self) -> ResilientView:
        """resilient_db's own view of this connection (a namespace, so that no name of ours
        shadows a driver attribute): current raw connection, host, plugins, session state."""
        return ResilientView(self)

    # --- pass-through -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN_CONNECTION_ATTRS:
            object.__setattr__(self, name, value)
        elif name in self._driver.session_attributes:
            self._set_session(name, value)
        else:
            setattr(self._raw, name, value)

    def _set_session(self, name: str, value: Any) -> None:
        raw = self._raw
        chain = self._chains.session
        if chain is None:
            setattr(raw, name, value)
        else:
            chain(Call(_SESSION, f"Connection.{name}", setattr, (raw, name, value), {}, self,
                       raw))
        self._session[name] = value

    def _call(self, op: Op, method: str, fn: Callable[..., Any], *args: Any,
              **kwargs: Any) -> Any:
        chain = self._chains.for_op(op)
        if chain is None:
            return fn(*args, **kwargs)
        return chain(Call(op, method, fn, args, kwargs, self))

    def _wrap_cursor(self, raw_cursor: Any) -> CursorProxy:
        return self._driver.cursor_proxy(raw_cursor, self)

    # --- PEP 249 ------------------------------------------------------------------------------
    def cursor(self, *args: Any, **kwargs: Any) -> CursorProxy:
        # Through the pipeline when a plugin asks: mysql-connector's cursor() checks the
        # connection and raises on a dead one, which failover must see.
        chain = self._chains.cursor
        raw = self._raw
        if chain is None:
            raw_cursor = raw.cursor(*args, **kwargs)
        else:
            raw_cursor = chain(Call(_CURSOR, "Connection.cursor", raw.cursor, args, kwargs,
                                    self, raw))
        proxy = self._driver.cursor_proxy(raw_cursor, self)
        if args or kwargs:  # remembered to open the same kind of cursor after a failover
            proxy.__dict__["_cursor_args"] = (args, kwargs)
        return proxy

    def commit(self) -> None:
        chain = self._chains.commit
        raw = self._raw
        if chain is None:
            raw.commit()
        else:
            chain(Call(_COMMIT, "Connection.commit", raw.commit, (), {}, self, raw))

    def rollback(self) -> None:
        chain = self._chains.rollback
        raw = self._raw
        if chain is None:
            raw.rollback()
        else:
            chain(Call(_ROLLBACK, "Connection.rollback", raw.rollback, (), {}, self, raw))

    def close(self) -> None:
        # Final: from here on every call goes straight to the closed driver connection (its
        # own "connection is closed" error) and nothing reconnects it (Pipeline.close).
        object.__setattr__(self, "_closed_by_us", True)
        try:
            self._call(_CLOSE, "Connection.close", self._raw.close)
        finally:
            self._seat.release()
            self._pipeline.close(self._host)

    def __enter__(self) -> ConnectionProxy:
        self._raw.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any:
        object.__setattr__(self, "_closed_by_us", True)
        try:
            return self._call(_CLOSE, "Connection.__exit__", self._raw.__exit__, exc_type, exc,
                              tb)
        finally:
            self._seat.release()
            self._pipeline.close(self._host)

    def _inherited(self, parent_pid: int) -> None:
        """In a child process after ``fork()``: this connection is the parent's session. Cut
        its socket off (nothing is sent) and make every call raise ``ForkedConnectionError``;
        ``close()`` is allowed and sends nothing."""
        pipeline = self._pipeline
        if pipeline.state is CLOSED:
            return  # closed before fork(): its calls raise the driver's own error already
        self._seat.address = None  # counted in the parent, not here (_open_counts reset)
        driver = self._driver
        driver.forget(self._raw)
        host = str(self._host)

        def handler(call: Call) -> Any:
            if call.op is _CLOSE:
                return None  # a close would end the parent's session: there is nothing to do
            raise driver.error(
                ForkedConnectionError,
                f"the connection is closed in this process: it was opened in process "
                f"{parent_pid} (to {host}) before fork(), and its session belongs to that "
                "process. Open a new connection in the child (nothing was sent to the "
                "server; the parent's session is untouched)",
                host=host, parent_pid=parent_pid)

        pipeline.fork(handler)
        for cursor in list(self._cursors):
            cursor._unbind_fetch()

    def __repr__(self) -> str:
        plugins = ",".join(p.code for p in self._pipeline.plugins) or "none"
        return f"<resilient_db connection to {self._host} plugins={plugins} raw={self._raw!r}>"


class ResilientView:
    """resilient_db's accessors for one connection: ``conn.resilient``."""

    __slots__ = ("_proxy",)

    def __init__(self, proxy: ConnectionProxy) -> None:
        self._proxy = proxy

    @property
    def raw(self) -> Any:
        """The driver connection in use now (it changes after a failover: do not keep it)."""
        return self._proxy._raw

    @property
    def host(self) -> HostSpec:
        """The instance this connection is connected to now."""
        return self._proxy._host

    @property
    def session_state(self) -> dict[str, Any]:
        """Session attributes set through the proxy (re-applied after a reconnect)."""
        return dict(self._proxy._session)

    @property
    def pipeline(self) -> Pipeline:
        return self._proxy._pipeline

    @property
    def plugins(self) -> tuple[str, ...]:
        """Codes of the active plugins, outermost first."""
        return tuple(p.code for p in self._proxy._pipeline.plugins)

    def plugin(self, code: str) -> Any:
        """The active plugin instance with ``code``, or ``None``."""
        return self._proxy._pipeline.plugin(code)

    def replace_raw(self, raw: Any, host: HostSpec, reason: str) -> None:
        """Swap the physical connection (failover, reconnect): session state is re-applied and
        plugins are notified. The old connection is not closed here.

        Cursors opened before keep working: each is rebound to a new driver cursor (opened
        with the same arguments, with the attributes set on it since) the first time it is
        used again."""
        proxy = self._proxy
        proxy._driver.apply_session_state(raw, proxy._session)
        old = proxy._host
        object.__setattr__(proxy, "_raw", raw)
        object.__setattr__(proxy, "_host", host)
        proxy._seat.move(address_for(raw, host, proxy._driver.default_port))
        for cursor in list(proxy._cursors):
            cursor._mark_stale()
        proxy._pipeline.notify_connection_changed(ConnectionChanged(old, host, reason))

    def retarget(self, call: Call) -> Call | None:
        """``call`` re-aimed at the current physical connection (after :meth:`replace_raw`),
        for a plugin that runs an interrupted statement again: a ``Connection.*`` method of
        the new driver connection, a ``Cursor.*`` method of the rebound cursor that made
        the call, or a session attribute set on the new driver connection. ``None`` when the
        call cannot be re-aimed (not a statement, or its cursor is gone)."""
        if call.op not in _RETARGETABLE:
            return None
        proxy = self._proxy
        if call.op is _SESSION:  # setattr(raw, name, value): the same on the new connection
            return call.replace(args=(proxy._raw, *call.args[1:]))
        kind, _, name = call.method.partition(".")
        if kind == "Connection":
            fn = getattr(proxy._raw, name, None)
        elif kind == "Cursor":
            owner = getattr(call.fn, "__self__", None)
            fn = None
            for cursor in list(proxy._cursors):
                if cursor._bound_to(owner):
                    fn = getattr(cursor._cur, name, None)
                    break
        else:
            fn = None
        return None if fn is None else call.replace(fn=fn, raw=proxy._raw)


class CursorProxy:
    """A PEP 249 cursor wrapping one driver cursor.

    When no plugin intercepts fetches, ``fetchone``/``fetchmany``/``fetchall`` are the driver
    cursor's own bound methods (stored in the instance, shadowing the class's), so reading
    rows costs nothing extra.
    """

    _cur: Any
    _conn: ConnectionProxy
    _chains: Chains

    def __init__(self, raw: Any, connection: ConnectionProxy) -> None:
        state = self.__dict__
        state["_conn"] = connection
        state["_chains"] = connection._chains
        self._bind(raw)
        cursors = getattr(connection, "_cursors", None)
        if cursors is not None:
            cursors.add(self)

    def _bind(self, raw: Any) -> None:
        state = self.__dict__
        state["_cur"] = raw
        if _FETCH not in state["_conn"]._pipeline.may_intercept:
            # No plugin of this connection, even a dormant one, intercepts fetches.
            state["fetchone"] = raw.fetchone
            state["fetchmany"] = raw.fetchmany
            state["fetchall"] = raw.fetchall

    # --- rebinding after the connection's physical connection was replaced -------------------
    def _mark_stale(self) -> None:
        """Forget the driver cursor (it belongs to the old physical connection); the next use
        of this cursor opens a new one (:meth:`_rebind`). The hot path is untouched: the
        attributes it reads are simply missing until then, which routes the first access
        through ``__getattr__``."""
        state = self.__dict__
        if "_cur" not in state:
            return
        state["_stale_cur"] = state.pop("_cur")
        state.pop("execute", None)
        for name in _FETCH_METHODS:
            state.pop(name, None)

    def _rebind(self) -> None:
        state = self.__dict__
        state.pop("_stale_cur", None)
        conn: ConnectionProxy = state["_conn"]
        args, kwargs = state.get("_cursor_args", ((), {}))
        raw = conn._raw.cursor(*args, **kwargs)
        for name, value in state.get("_cursor_attrs", {}).items():
            setattr(raw, name, value)
        if state.get("_closed"):
            raw.close()
        self._bind(raw)

    def _unbind_fetch(self) -> None:
        """Route fetches through the chains again (a connection inherited across fork())."""
        state = self.__dict__
        for name in _FETCH_METHODS:
            state.pop(name, None)

    def _bound_to(self, raw: Any) -> bool:
        """Whether ``raw`` is (or, before a rebind, was) this proxy's driver cursor."""
        state = self.__dict__
        return raw is not None and (state.get("_cur") is raw or state.get("_stale_cur") is raw)

    @property
    def connection(self) -> ConnectionProxy:
        """The resilient_db connection (not the driver's), as PEP 249 asks."""
        return self._conn

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__
        if name in _BOUND_ATTRS:
            if "_stale_cur" not in state:
                raise AttributeError(name)
            self._rebind()
            return state[name]
        return getattr(self._cur, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cur, name, value)
        # Kept to set again on the driver cursor that replaces this one after a failover.
        self.__dict__.setdefault("_cursor_attrs", {})[name] = value

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self._cur)))

    def _call(self, op: Op, method: str, fn: Callable[..., Any], *args: Any,
              **kwargs: Any) -> Any:
        chain = self._chains.for_op(op)
        if chain is None:
            return fn(*args, **kwargs)
        return chain(Call(op, method, fn, args, kwargs, self._conn))

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        # The first statement on this driver cursor: install the fast path, then run it.
        return self._fast_execute()(query, params, **kwargs)

    def _fast_execute(self) -> Callable[..., Any]:
        """Build this cursor's ``execute`` for its current driver cursor and store it in the
        instance, where it shadows the method above until a failover rebinds the cursor.

        The hottest path of the library. The proxies define ``__getattr__`` (the
        pass-through), so CPython 3.11 cannot specialize attribute reads on them: each
        costs several times a read from a plain object. This closure reads none: what it
        needs is in its cells. It holds the proxy weakly (a strong reference would be a
        cycle, delaying the driver cursor's release to the garbage collector). The call
        object for pipelined statements is made on the first one and reused (see ``Call``);
        a plugin re-entering this cursor gets a new one."""
        state = self.__dict__
        raw = self._cur  # rebinds first if a failover made the driver cursor stale
        raw_execute = raw.execute
        chains: Chains = state["_chains"]
        conn: ConnectionProxy = state["_conn"]
        raw_conn = conn._raw  # the driver connection raw belongs to (see _rebind)
        proxy = weakref.ref(self)
        reused: Call | None = None

        def execute(query: Any, params: Any = None, **kwargs: Any) -> Any:
            nonlocal reused
            chain = chains.execute
            if chain is None:
                result = raw_execute(query, params, **kwargs) if kwargs else raw_execute(
                    query, params)
            else:
                call = reused
                if call is None or call.busy:
                    call = Call(_EXECUTE, "Cursor.execute", raw_execute, (), {}, conn, raw_conn)
                    if reused is None:
                        reused = call
                call.args = (query, params)
                call.kwargs = kwargs
                call.busy = True
                try:
                    result = chain(call)
                finally:
                    call.busy = False
            if result is raw:  # the driver returned its cursor: return the proxy
                cursor = proxy()
                return result if cursor is None else cursor
            return result

        state["execute"] = execute
        return execute

    def executemany(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        result = self._call(_EXECUTEMANY, "Cursor.executemany", self._cur.executemany,
                            query, *args, **kwargs)
        return self if result is self._cur else result

    def fetchone(self) -> Any:
        chain = self._chains.fetch
        if chain is None:
            return self._cur.fetchone()
        return chain(Call(_FETCH, "Cursor.fetchone", self._cur.fetchone, (), {},
                                     self._conn))

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(_FETCH, "Cursor.fetchmany", self._cur.fetchmany, *args, **kwargs)

    def fetchall(self) -> Any:
        chain = self._chains.fetch
        if chain is None:
            return self._cur.fetchall()
        return chain(Call(_FETCH, "Cursor.fetchall", self._cur.fetchall, (), {},
                                     self._conn))

    def nextset(self) -> Any:
        return self._call(_FETCH, "Cursor.nextset", self._cur.nextset)

    def __iter__(self) -> Iterator[Any]:
        if self._chains.fetch is None:
            return iter(self._cur)
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        fetchone = self.fetchone
        while True:
            row = fetchone()
            if row is None:
                return
            yield row

    def close(self) -> None:
        state = self.__dict__
        state["_closed"] = True
        if "_stale_cur" in state:
            return  # its connection is gone; a new cursor would be opened only to be closed
        self._call(_CLOSE, "Cursor.close", self._cur.close)

    def __enter__(self) -> CursorProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<resilient_db cursor raw={self._cur!r}>"


class PipelinedContext:
    """A driver context manager whose enter and exit do I/O (``transaction()``, ``pipeline()``,
    ``copy()``): both go through the pipeline as ``op``."""

    __slots__ = ("_cm", "_conn", "_method", "_op")

    def __init__(self, cm: Any, op: Op, method: str, conn: ConnectionProxy) -> None:
        self._cm = cm
        self._op = op
        self._method = method
        self._conn = conn

    def __enter__(self) -> Any:
        return self._conn._call(self._op, f"{self._method}.__enter__", self._cm.__enter__)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any:
        return self._conn._call(self._op, f"{self._method}.__exit__", self._cm.__exit__,
                                exc_type, exc, tb)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cm, name)


# Every connection proxy of the process (weakly; adding costs one set insertion per connect),
# so that a forked child can disarm the ones it inherited (ConnectionProxy._inherited).
_live: weakref.WeakSet[ConnectionProxy] = weakref.WeakSet()
_pid = os.getpid()


def _reset_in_child() -> None:
    global _live, _pid
    parent, _pid = _pid, os.getpid()
    inherited, _live = list(_live), weakref.WeakSet()
    for proxy in inherited:
        proxy._inherited(parent)


_lifecycle.on_fork_child(_reset_in_child)
