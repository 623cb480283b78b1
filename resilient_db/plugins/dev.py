"""``dev``: make the next connect or statement raise a given exception, to test applications.

Select the plugin (``plugins="...,dev"``), then arm a fault::

    from resilient_db.plugins import dev
    dev.raise_on_next_execute(psycopg.OperationalError("simulated network failure"))
    dev.raise_on_next_connect(ConnectionRefusedError())
    dev.set_execute_callback(lambda call: ... or None)   # decide per call

A fault fires once, in the innermost position of the pipeline (just before the driver), so
every other plugin (failover included) sees it as if the driver had raised it. Faults can be
restricted to one connection (``connection=``) and to some ops (``ops=``). Armed faults are
process-wide; ``reset()`` clears them. Intercepted ops: statements, commit, rollback,
transaction and pipeline blocks (not fetches, which stay on the direct path).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._pipeline import (
    STATEMENT_OPS,
    Call,
    ConnectContext,
    ConnectHandler,
    Handler,
    Op,
    Plugin,
    PluginContext,
)

__all__ = [
    "DevPlugin",
    "raise_on_next_connect",
    "raise_on_next_execute",
    "reset",
    "set_connect_callback",
    "set_execute_callback",
]

ExceptionSpec = BaseException | type[BaseException]
ConnectCallback = Callable[[ConnectContext], ExceptionSpec | None]
ExecuteCallback = Callable[[Call], ExceptionSpec | None]


@dataclass
class _Fault:
    exc: ExceptionSpec
    ops: frozenset[Op] | None
    connection: weakref.ref[Any] | None

    def matches(self, call: Call) -> bool:
        if self.ops is not None and call.op not in self.ops:
            return False
        return self.connection is None or self.connection() is call.connection


class _Armory:
    """Process-wide armed faults. While nothing is armed every dev plugin is dormant (left out
    of its connection's chains); arming or disarming rebuilds those chains."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connect_faults: list[ExceptionSpec] = []
        self.execute_faults: list[_Fault] = []
        self.connect_callback: ConnectCallback | None = None
        self.execute_callback: ExecuteCallback | None = None
        self.armed = False
        self.plugins: weakref.WeakSet[DevPlugin] = weakref.WeakSet()
        self.to_rebuild: list[DevPlugin] = []

    def update(self) -> None:
        """Recompute ``armed`` (caller holds the lock); when it changed, every dev plugin's
        chains must be rebuilt (:meth:`rebuild`, called without the lock)."""
        armed = bool(
            self.connect_faults or self.execute_faults or self.connect_callback
            or self.execute_callback
        )
        changed, self.armed = armed != self.armed, armed
        self.to_rebuild = list(self.plugins) if changed else []

    def rebuild(self) -> None:
        """Rebuild the chains of dev plugins whose dormancy changed (outside the lock)."""
        with self.lock:
            plugins, self.to_rebuild = self.to_rebuild, []
        for plugin in plugins:
            plugin.ctx.rebuild()


_armory = _Armory()


def _check(exc: object) -> ExceptionSpec:
    if isinstance(exc, BaseException) or (
        isinstance(exc, type) and issubclass(exc, BaseException)
    ):
        return exc
    raise TypeError(f"dev: expected an exception instance or class, got {exc!r}")


def raise_on_next_connect(exc: ExceptionSpec) -> None:
    """The next physical connect made by a connection with the dev plugin raises ``exc``."""
    with _armory.lock:
        _armory.connect_faults.append(_check(exc))
        _armory.update()
    _armory.rebuild()


def raise_on_next_execute(
    exc: ExceptionSpec, *, ops: Iterable[Op] | None = None, connection: Any = None
) -> None:
    """The next matching pipelined call raises ``exc`` instead of reaching the driver.

    ``ops``: only calls of these ops (default: any intercepted op). ``connection``: only calls
    on this resilient_db connection (default: any connection with the dev plugin).
    """
    fault = _Fault(
        _check(exc),
        frozenset(ops) if ops is not None else None,
        weakref.ref(connection) if connection is not None else None,
    )
    with _armory.lock:
        _armory.execute_faults.append(fault)
        _armory.update()
    _armory.rebuild()


def set_connect_callback(callback: ConnectCallback | None) -> None:
    """Call ``callback(ctx)`` before every physical connect; a returned exception is raised."""
    with _armory.lock:
        _armory.connect_callback = callback
        _armory.update()
    _armory.rebuild()


def set_execute_callback(callback: ExecuteCallback | None) -> None:
    """Call ``callback(call)`` before every intercepted call; a returned exception is raised."""
    with _armory.lock:
        _armory.execute_callback = callback
        _armory.update()
    _armory.rebuild()


def reset() -> None:
    """Disarm every fault and callback."""
    with _armory.lock:
        _armory.connect_faults.clear()
        _armory.execute_faults.clear()
        _armory.connect_callback = None
        _armory.execute_callback = None
        _armory.update()
    _armory.rebuild()


class DevPlugin(Plugin):
    code = "dev"
    intercepts = STATEMENT_OPS | {Op.COMMIT, Op.ROLLBACK, Op.TRANSACTION, Op.PIPELINE}

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        with _armory.lock:
            _armory.plugins.add(self)

    def dormant(self) -> bool:
        return not _armory.armed

    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        if _armory.armed:  # a chain built while armed may outlive the last fault briefly
            exc: ExceptionSpec | None = None
            with _armory.lock:
                if _armory.connect_faults:
                    exc = _armory.connect_faults.pop(0)
                    _armory.update()
                callback = _armory.connect_callback
            _armory.rebuild()
            if exc is None and callback is not None:
                exc = callback(ctx)
            if exc is not None:
                self.ctx.decide("dev.fault_injected", self.code, phase="connect",
                                **{"error.type": _name(exc), "server.address": ctx.host.host})
                raise exc
        return proceed(ctx)

    def execute(self, call: Call, proceed: Handler) -> Any:
        if _armory.armed:
            exc: ExceptionSpec | None = None
            with _armory.lock:
                for i, fault in enumerate(_armory.execute_faults):
                    if fault.matches(call):
                        exc = _armory.execute_faults.pop(i).exc
                        _armory.update()
                        break
                callback = _armory.execute_callback
            _armory.rebuild()
            if exc is None and callback is not None:
                exc = callback(call)
            if exc is not None:
                self.ctx.decide("dev.fault_injected", self.code, phase="execute",
                                **{"error.type": _name(exc), "db.operation.name": call.method})
                raise exc
        return proceed(call)


def _name(exc: ExceptionSpec) -> str:
    cls = exc if isinstance(exc, type) else type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"
