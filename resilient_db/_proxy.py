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
import threading
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

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

_set = object.__setattr__  # a proxy's own slots (its __setattr__ passes through)

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


class _Cursors:
    """The live cursor proxies of a connection (to rebind after a failover), held weakly, and
    what every new cursor proxy of the connection is built from (:func:`_new_cursor`).

    Cheaper than a ``weakref.WeakSet`` where it matters: registering a cursor is one weak
    reference without a callback and a list append (``Connection.execute`` opens a cursor per
    statement); dead references are dropped when the list has doubled since the last prune."""

    __slots__ = ("chains", "cls", "fetch_hooked", "last", "limit", "refs")

    def __init__(self, chains: Chains, fetch_hooked: bool, cls: type[CursorProxy]) -> None:
        self.refs: list[weakref.ReferenceType[CursorProxy]] = []
        self.limit = 64
        #: The connection's chains (one object for its lifetime: rebuilt in place).
        self.chains = chains
        #: ``Pipeline.fetch_may_be_intercepted``: fixed when the pipeline is made.
        self.fetch_hooked = fetch_hooked
        #: The driver's cursor proxy class (``DriverDialect.cursor_proxy``).
        self.cls = cls
        #: The last (proxy class, driver cursor class) built here, with its builder and
        #: pass-through classes: a connection opens one kind of cursor, almost always.
        self.last: tuple[type, type, type[CursorProxy], type[CursorProxy]] = (
            _Cursors, _Cursors, CursorProxy, CursorProxy)

    def add(self, cursor: CursorProxy) -> None:
        refs = self.refs
        refs.append(weakref.ref(cursor))
        if len(refs) > self.limit:
            self.prune()

    def prune(self) -> None:
        refs = self.refs
        refs[:] = [r for r in refs if r() is not None]
        self.limit = max(64, 2 * len(refs))

    def __iter__(self) -> Iterator[CursorProxy]:
        return iter([c for c in (r() for r in self.refs) if c is not None])

    def __len__(self) -> int:
        return sum(1 for r in self.refs if r() is not None)


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
        object.__setattr__(self, "_cursors", _Cursors(
            pipeline.chains, pipeline.fetch_may_be_intercepted, driver.cursor_proxy))
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
        setter = self._driver.set_session_attribute
        if chain is None:
            setter(raw, name, value)
        else:
            chain(Call(_SESSION, f"Connection.{name}", setter, (raw, name, value), {}, self,
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
        # Every read of an attribute of self is a slow one (the class has __getattr__): the
        # cursor proxy is built from what the connection's _Cursors holds.
        cursors = self._cursors
        raw = self._raw
        chains = cursors.chains
        chain = chains.cursor
        if chain is None:
            raw_cursor = raw.cursor(*args, **kwargs)
        elif chains.opener is not None and not (args or kwargs):
            raw_cursor = chains.opener(self, raw)
        else:
            raw_cursor = chain(Call(_CURSOR, "Connection.cursor", raw.cursor, args, kwargs,
                                    self, raw))
        proxy = _new_cursor(cursors.cls, raw_cursor, self, raw, cursors)
        if args or kwargs:  # remembered to open the same kind of cursor after a failover
            _set(proxy, "_cursor_args", (args, kwargs))
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

    def replace_raw(self, raw: Any, host: HostSpec, reason: str, *,
                    session_applied: bool = False) -> None:
        """Swap the physical connection (failover, reconnect): session state is re-applied
        (unless ``session_applied``: the caller already brought ``raw``'s session up to
        date, as read/write splitting does with only what differs) and plugins are notified.
        The old connection is not closed here.

        Cursors opened before keep working: each is rebound to a new driver cursor (opened
        with the same arguments, with the attributes set on it since) the first time it is
        used again."""
        proxy = self._proxy
        if not session_applied:
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
                    fn = getattr(cursor._live(), name, None)
                    break
        else:
            fn = None
        return None if fn is None else call.replace(fn=fn, raw=proxy._raw)


class CursorProxy:
    """A PEP 249 cursor wrapping one driver cursor.

    The hottest object of the library (``execute`` + ``fetchone`` per statement). Its class
    has ``__slots__`` and no ``__getattr__``, so CPython specializes every attribute read on
    it (a class with ``__getattr__`` gets none: each read costs several times as much).
    Driver attributes that do no I/O (``description``, ``rowcount``, ``arraysize``, ...) pass
    through properties generated once per (proxy class, driver cursor class): see
    :func:`_pass_through_class`. Rows are never wrapped or copied.

    After a failover replaces the physical connection the driver cursor is stale; the first
    use of this cursor then opens a new one on the new connection, with the same arguments
    and the attributes set on the old one (:meth:`_rebind`).
    """

    __slots__ = ("__weakref__", "_call", "_chains", "_closed", "_conn", "_cur",
                 "_cursor_args", "_cursor_attrs", "_raw_conn", "_stale_cur", "fetchall",
                 "fetchmany", "fetchone")
    _call: Call | None
    _chains: Chains
    _closed: bool
    _conn: ConnectionProxy
    _cur: Any  # None while stale (see _mark_stale)
    _cursor_args: tuple[tuple[Any, ...], dict[str, Any]] | None
    _cursor_attrs: dict[str, Any] | None
    _raw_conn: Any
    _stale_cur: Any
    #: The fetch methods are slots: the driver cursor's own bound methods when no plugin of
    #: the connection (even a dormant one) intercepts fetches, so reading rows costs one slot
    #: read and no frame; else (or while the cursor is stale) the pipelined ones below, which
    #: a connection whose plugins may intercept fetches has in its cursors' class instead
    #: (``_fetch_in_class``).
    fetchone: Callable[[], Any]
    fetchmany: Callable[..., Any]
    fetchall: Callable[[], Any]
    #: Whether the class defines the fetch methods (the pipelined ones, over the slots): the
    #: class of the cursors of a connection some plugin may intercept fetches of. Binding
    #: them to the instance instead would make each cursor a reference cycle (the instance
    #: holds its own bound methods), freed, with its driver cursor, only by the garbage
    #: collector: SQLAlchemy and Django open a cursor per statement.
    _fetch_in_class: ClassVar[bool] = False
    #: Attributes the driver's cursors set on the instance (not in their class): passed
    #: through too. ``arraysize`` is PEP 249's; a driver's proxy class adds its own.
    instance_attributes: ClassVar[tuple[str, ...]] = ("arraysize",)

    def __new__(cls, raw: Any, connection: ConnectionProxy) -> CursorProxy:
        return _new_cursor(cls, raw, connection, connection._raw, connection._cursors)

    def _bind(self, raw: Any) -> None:
        _set(self, "_cur", raw)
        _set(self, "_raw_conn", self._conn._raw)  # the driver connection raw belongs to
        _set(self, "_call", None)  # the reused call object holds the old driver cursor
        if self._conn._pipeline.fetch_may_be_intercepted:
            self._unbind_fetch()
        else:
            _set(self, "fetchone", raw.fetchone)
            _set(self, "fetchmany", raw.fetchmany)
            _set(self, "fetchall", raw.fetchall)

    def _unbind_fetch(self) -> None:
        """Fetch through the chains (and rebind a stale cursor first)."""
        if self._fetch_in_class:
            return  # its class's fetch methods do, always
        _set(self, "fetchone", self._fetchone)
        _set(self, "fetchmany", self._fetchmany)
        _set(self, "fetchall", self._fetchall)

    # --- rebinding after the connection's physical connection was replaced -------------------
    def _mark_stale(self) -> None:
        """Forget the driver cursor (it belongs to the old physical connection); the next use
        of this cursor opens a new one (:meth:`_rebind`)."""
        raw = self._cur
        if raw is None:
            return
        _set(self, "_stale_cur", raw)
        _set(self, "_cur", None)
        _set(self, "_call", None)
        self._unbind_fetch()

    def _live(self) -> Any:
        """The driver cursor, opened again first if a failover made it stale."""
        raw = self._cur
        if raw is None:
            raw = self._rebind()
        return raw

    def _rebind(self) -> Any:
        _set(self, "_stale_cur", None)
        conn = self._conn
        args, kwargs = self._cursor_args or ((), {})
        raw = conn._raw.cursor(*args, **kwargs)
        for name, value in (self._cursor_attrs or {}).items():
            setattr(raw, name, value)
        if self._closed:
            raw.close()
        self._bind(raw)
        return raw

    def _bound_to(self, raw: Any) -> bool:
        """Whether ``raw`` is (or, before a rebind, was) this proxy's driver cursor."""
        return raw is not None and (self._cur is raw or self._stale_cur is raw)

    @property
    def connection(self) -> ConnectionProxy:
        """The resilient_db connection (not the driver's), as PEP 249 asks."""
        return self._conn

    if TYPE_CHECKING:  # the generated pass-through properties, for type checkers only
        def __getattr__(self, name: str) -> Any: ...

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._live(), name, value)
        # Kept to set again on the driver cursor that replaces this one after a failover.
        attrs = self._cursor_attrs
        if attrs is None:
            attrs = {}
            _set(self, "_cursor_attrs", attrs)
        attrs[name] = value

    def __dir__(self) -> list[str]:
        # The driver cursor's class, not the instance: see _pass_through_class.
        return sorted(set(super().__dir__()) | set(dir(type(self._live())))
                      | set(self.instance_attributes))

    def _call_op(self, op: Op, method: str, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run the driver cursor's method ``name`` as ``op`` (through the chain, if any)."""
        fn = getattr(self._live(), name)
        chain = self._chains.for_op(op)
        if chain is None:
            return fn(*args, **kwargs)
        return chain(Call(op, method, fn, args, kwargs, self._conn))

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        """The per-statement path: specialized attribute reads only, one reused call object
        (see ``Call``; a plugin re-entering this cursor gets a new one)."""
        raw = self._cur
        if raw is None:
            raw = self._rebind()
        chains = self._chains
        chain = chains.execute
        if chain is None:
            result = raw.execute(query, params, **kwargs) if kwargs else raw.execute(
                query, params)
        elif chains.statement is not None and not kwargs:
            result = chains.statement(self, raw, query, params)
        else:
            call = self._call
            if call is None or call.busy:
                call = Call(_EXECUTE, "Cursor.execute", raw.execute, (), {}, self._conn,
                            self._raw_conn)
                if self._call is None:
                    _set(self, "_call", call)
            call.args = (query, params)
            call.kwargs = kwargs
            call.busy = True
            try:
                result = chain(call)
            finally:
                call.busy = False
        return self if result is raw else result  # the driver's own cursor: the proxy

    def executemany(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        result = self._call_op(_EXECUTEMANY, "Cursor.executemany", "executemany", query,
                               *args, **kwargs)
        return self if result is self._cur else result

    def _fetchone(self) -> Any:
        return self._call_op(_FETCH, "Cursor.fetchone", "fetchone")

    def _fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        return self._call_op(_FETCH, "Cursor.fetchmany", "fetchmany", *args, **kwargs)

    def _fetchall(self) -> Any:
        return self._call_op(_FETCH, "Cursor.fetchall", "fetchall")

    def nextset(self) -> Any:
        return self._call_op(_FETCH, "Cursor.nextset", "nextset")

    def __iter__(self) -> Iterator[Any]:
        if self._chains.fetch is None:
            return iter(self._live())
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        fetchone = self.fetchone
        while True:
            row = fetchone()
            if row is None:
                return
            yield row

    def close(self) -> None:
        _set(self, "_closed", True)
        raw = self._cur
        if raw is None:
            return  # its connection is gone; a new cursor would be opened only to be closed
        # Spelled out rather than _call_op: ORMs open and close a cursor per statement.
        chain = self._chains.close
        if chain is None:
            raw.close()
        else:
            chain(Call(_CLOSE, "Cursor.close", raw.close, (), {}, self._conn))

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
        return f"<resilient_db cursor raw={self._cur or self._stale_cur!r}>"


def _pass_through(name: str) -> property:
    def get(self: CursorProxy) -> Any:
        raw = self._cur  # _live(), spelled out: SQLAlchemy reads description per statement
        if raw is None:
            raw = self._rebind()
        return getattr(raw, name)

    def set_(self: CursorProxy, value: Any) -> None:
        CursorProxy.__setattr__(self, name, value)

    def delete(self: CursorProxy) -> None:
        delattr(self._live(), name)

    return property(get, set_, delete, f"The driver cursor's ``{name}``.")


def _new_cursor(cls: type[CursorProxy], raw: Any, connection: ConnectionProxy, raw_conn: Any,
                cursors: _Cursors) -> CursorProxy:
    """A ``cls`` proxy of the driver cursor ``raw`` of ``connection`` (whose driver connection
    is ``raw_conn``), registered in ``cursors`` (the connection's).

    ORMs (SQLAlchemy, Django) open a cursor per statement, so this is on their hot path: the
    slots are written on an instance of the *builder* class (the pass-through class without
    the pass-through ``__setattr__``, so that each write is a plain slot store, not a call of
    ``object.__setattr__``), whose class is then set to the pass-through class (the two have
    the same layout). The binding below is ``_bind``'s, spelled out."""
    raw_type = type(raw)
    last = cursors.last
    if last[0] is not cls or last[1] is not raw_type:
        made = _pass_through_class(cls, raw)
        if cursors.fetch_hooked:
            made = _FETCHING[made]
        last = cursors.last = (cls, raw_type, _BUILDERS[made], made)
    self: CursorProxy = object.__new__(last[2])
    self._conn = connection
    self._chains = cursors.chains
    self._closed = False
    self._cursor_args = None
    self._cursor_attrs = None
    self._stale_cur = None
    self._cur = raw
    self._raw_conn = raw_conn
    self._call = None
    if not cursors.fetch_hooked:  # else the class's methods fetch (_fetch_in_class)
        self.fetchone = raw.fetchone
        self.fetchmany = raw.fetchmany
        self.fetchall = raw.fetchall
    self.__class__ = last[3]
    refs = cursors.refs  # cursors.add(self), spelled out
    refs.append(weakref.ref(self))
    if len(refs) > cursors.limit:
        cursors.prune()
    return self


_PASS_THROUGH: dict[tuple[type, type], type[CursorProxy]] = {}
#: Pass-through class -> its builder (see _new_cursor).
_BUILDERS: dict[type[CursorProxy], type[CursorProxy]] = {}
#: Pass-through class -> its subclass whose fetch methods are the pipelined ones
#: (``CursorProxy._fetch_in_class``).
_FETCHING: dict[type[CursorProxy], type[CursorProxy]] = {}
_pass_through_lock = threading.Lock()


def _pass_through_class(cls: type[CursorProxy], raw: Any) -> type[CursorProxy]:
    """``cls`` extended with a pass-through property for every attribute of the driver
    cursor ``raw`` that ``cls`` does not define itself: the names its class defines, and
    the instance attributes ``cls.instance_attributes`` names (read from the driver's code,
    never from the instance: reading a driver object's ``__dict__`` makes CPython give up
    specializing every attribute access of the driver's own code on it). Made once per
    (``cls``, driver cursor class), with its builder (:func:`_new_cursor`)."""
    raw_type = type(raw)
    key = (cls, raw_type)
    made = _PASS_THROUGH.get(key)
    if made is not None:
        return made
    with _pass_through_lock:
        made = _PASS_THROUGH.get(key)
        if made is None:
            attrs = {"__slots__": (), "__module__": cls.__module__,
                     "__qualname__": cls.__qualname__}
            made = type(cls.__name__, (cls,), attrs)
            names = {n for n in dir(raw_type) if not (n.startswith("__") and n.endswith("__"))}
            names.update(cls.instance_attributes)
            for name in sorted(names):
                if not hasattr(made, name):
                    setattr(made, name, _pass_through(name))
            fetching = type(cls.__name__, (made,), {
                **attrs, "_fetch_in_class": True, "fetchone": CursorProxy._fetchone,
                "fetchmany": CursorProxy._fetchmany, "fetchall": CursorProxy._fetchall})
            for kind in (made, fetching):
                # object's own __setattr__: CPython then stores into slots directly.
                _BUILDERS[kind] = type(cls.__name__, (kind,), {
                    **attrs, "__setattr__": object.__setattr__})
            _FETCHING[made] = fetching
            _PASS_THROUGH[key] = made
    return made


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
