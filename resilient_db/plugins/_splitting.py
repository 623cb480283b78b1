"""The switching core shared by ``read_write_splitting`` (instances from the topology) and
``srw`` (two endpoints): setting ``read_only`` moves the connection to a reader and clearing it
moves it back to the writer, never inside an open transaction.

One connection holds at most two physical connections besides the ones failover replaces: the
writer's and a reader's (:class:`Slot`). The one it left stays open for the way back, so
switching back and forth costs no connect and, after the first time, no statement: only the
session attributes that differ between the two are applied (``read_only`` itself among them).
``close()`` closes both, or gives them back to their internal pool (``splitting_pool``).

A subclass says where to go (:meth:`SplittingPlugin.open_reader`,
:meth:`SplittingPlugin.open_writer`) and whether a cached connection is still good
(:meth:`SplittingPlugin.still_valid`); the core does the rest: the transaction check, the
session state, the swap (``conn.resilient.replace_raw``), the pool, the failover mode
(:meth:`~resilient_db.plugins.failover.FailoverPlugin.follow`: a reader mode while on a
reader, so a reader failing during reads fails over to another reader; the writer mode on the
writer) and a decision for each step.

Decisions: ``splitting.switched``, ``splitting.refused``, ``splitting.stayed``,
``splitting.dropped``; ``reader.selected`` and ``pool.*`` from the helpers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from .. import _lifecycle, _pools
from .._params import (
    CONNECT_TIMEOUT,
    SPLITTING_POOL,
    SPLITTING_POOL_IDLE_TIMEOUT,
    SPLITTING_POOL_MAX_SIZE,
    SPLITTING_POOL_TIMEOUT,
)
from .._pipeline import (
    Call,
    ConnectContext,
    ConnectHandler,
    ConnectionChanged,
    Handler,
    HostSpec,
    Op,
    Plugin,
    PluginContext,
)
from ..drivers.base import TxStatus
from ..errors import ReadWriteSplittingError
from ..failover_core import FailoverMode
from ..hosts import Host, Role
from ..topology import read_self_report
from ..watchdog import abort_after
from . import _cluster_connect as cc

if TYPE_CHECKING:
    from .failover import FailoverPlugin

__all__ = ["Slot", "SplittingPlugin"]

log = logging.getLogger("resilient_db.plugins.splitting")

_MISSING: Final = object()
_CLOSE = Op.CLOSE
#: Bound on one connect (and its role check) when ``connect_timeout`` is not set.
_DEFAULT_CONNECT_BOUND = 30.0


class WrongRoleError(Exception):
    """Internal: a new connection reached an instance of the other role."""


@dataclass(eq=False)
class Slot:
    """One physical connection the plugin holds: where it goes, what it is, the session
    attributes known to be set on it, and its pool (``None``: not pooled)."""

    raw: Any
    host: HostSpec
    role: Role
    instance_id: str | None
    epoch: int
    pool: _pools.Pool | None = None
    session: dict[str, Any] = field(default_factory=dict)
    source: str = "new"  # how it was obtained: "initial", "new", "pool", "failover"
    #: Made read-only on the server for every statement (staying on the writer, no reader).
    forced: bool = False
    finalizer: weakref.finalize[Any, Any] | None = None


class SplittingPlugin(Plugin):
    """See the module docstring. ``switches``: how many times this connection moved."""

    intercepts = frozenset({Op.SESSION, Op.CLOSE})

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        self.pooled: bool = settings[SPLITTING_POOL]
        self.pool_max_size: int = settings[SPLITTING_POOL_MAX_SIZE] or 10
        self.pool_idle_timeout: float | None = settings[SPLITTING_POOL_IDLE_TIMEOUT]
        self.pool_timeout: float = settings[SPLITTING_POOL_TIMEOUT] or 0.0
        self.switches = 0
        self.writer: Slot | None = None
        self.reader: Slot | None = None
        self.current: Slot | None = None
        self._lock = threading.RLock()
        self._args: dict[str, Any] = {}
        self._target: Any = None
        self._proxy: weakref.ReferenceType[Any] | None = None
        self._writer_mode: FailoverMode | None = None
        self._pending: tuple[Any, HostSpec] | None = None
        _live.add(self)

    # --- what a subclass provides ----------------------------------------------------------
    def open_reader(self, proxy: Any) -> Slot | None:
        """A connection to a reader, or ``None`` when the cluster has none to offer (the
        connection then stays where it is)."""
        raise NotImplementedError

    def open_writer(self, proxy: Any) -> Slot:
        """A connection to the writer; raises ``ReadWriteSplittingError`` when none can be
        had."""
        raise NotImplementedError

    def still_valid(self, slot: Slot) -> str | None:
        """Why a cached connection must not be used again (``None``: it may)."""
        return None

    def initial_role(self, host: HostSpec) -> tuple[Role, str | None]:
        """The role and instance of the application's own connection, as far as known."""
        failover = self.failover()
        if failover is not None and failover.role is not Role.UNKNOWN:
            return failover.role, failover.instance_id
        return Role.WRITER, None

    # --- helpers for subclasses ------------------------------------------------------------
    def failover(self) -> FailoverPlugin | None:
        """The failover plugin of the same connection, if any (and enabled)."""
        ref = self.ctx.extra.get("failover")
        plugin = ref() if ref is not None else None
        if plugin is None or plugin.dormant():
            return None
        return plugin  # type: ignore[no-any-return]

    def epoch(self) -> int:
        """The topology epoch now (``0`` without a topology monitor)."""
        failover = self.failover()
        monitor = getattr(failover, "_monitor", None) if failover is not None else None
        return monitor.epoch if monitor is not None else 0

    def connect_bound(self) -> float:
        """Seconds one connect and its role check may take."""
        bound: float | None = self.ctx.settings[CONNECT_TIMEOUT]
        return bound or _DEFAULT_CONNECT_BOUND

    def context_for(self, host: HostSpec) -> ConnectContext:
        """The application's connect arguments aimed at ``host``, the connect timeout capped
        by :meth:`connect_bound`."""
        base = ConnectContext(host, self._args, self.ctx.settings, self.ctx.driver,
                              self._target, initial=False)
        return cc.instance_context(base, host, self.connect_bound())

    def open_verified(self, proxy: Any, ctx: ConnectContext, role: Role | None,
                      expected: str | None = None) -> tuple[Any, str | None]:
        """A new connection through the connection's connect chain (credentials plugins
        apply), its role checked (``role`` ``None``: not checked, nothing asked). Raises
        :class:`WrongRoleError` (the connection closed) when the instance is not ``role`` or
        not ``expected``."""
        driver = self.ctx.driver
        raw = proxy.resilient.pipeline.connect(ctx)
        if role is None:
            return raw, None
        try:
            dialect = cc.dialect_for(ctx, self.ctx.extra, raw)
            port = cc.port_of(ctx)
            with abort_after(self.connect_bound(), lambda: driver.abort(raw)):
                report = read_self_report(driver, dialect, raw, Host(ctx.host.host, port),
                                          cc.addressing_for(ctx), with_topology=False)
            if expected is not None and report.instance_id not in (None, expected):
                raise WrongRoleError(f"reached instance {report.instance_id}, not {expected}")
            if not cc.has_role(report, role):
                raise WrongRoleError(f"{cc.role_text(report)}, not a {role.value}")
        except BaseException:
            cc.close_quietly(raw)
            raise
        return raw, report.instance_id

    def obtain(self, proxy: Any, host: HostSpec, role: Role,
               opener: Callable[[ConnectContext], tuple[Any, str | None]]) -> Slot:
        """A connection to ``host``: from its pool when pooling is on (a new one opened with
        ``opener`` on a miss), else a new one. ``opener(ctx) -> (raw, instance_id)`` opens
        through the connection's connect chain and verifies the role (raising when wrong)."""
        ctx = self.context_for(host)
        epoch = self.epoch()
        opened: dict[str, str | None] = {}

        def open_one() -> Any:
            raw, instance = opener(ctx)
            opened["instance"] = instance
            return raw

        if not self.pooled:
            raw = open_one()
            return Slot(raw, host, role, opened.get("instance"), epoch, source="new")
        key = _pools.PoolKey.of(self.ctx.driver, host.host, host.port, self._args)
        pool = _pools.pool_for(key, self.ctx.driver, self.pool_max_size, self.pool_idle_timeout)
        try:
            raw, hit, session = pool.acquire(epoch, open_one, self.pool_timeout)
        except _pools.PoolExhaustedError:
            raise ReadWriteSplittingError(
                f"the internal pool of {key} is full ({self.pool_max_size} connections, "
                f"splitting_pool_max_size) and none came back within "
                f"{self.pool_timeout:g} s (splitting_pool_timeout); the connection stays "
                "where it was", reason="pool_exhausted", host=str(host)) from None
        slot = Slot(raw, host, role, opened.get("instance"), epoch, pool=pool,
                    session=session, source="pool" if hit else "new")
        # An application connection dropped without close() gives its pooled connections
        # up (closed: their session state is unknown) instead of holding the pool's room.
        slot.finalizer = weakref.finalize(proxy, pool.discard, raw, "abandoned")
        return slot

    # --- connect phase ---------------------------------------------------------------------
    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        raw = proceed(ctx)
        if ctx.initial:
            self._args = dict(ctx.args)
            self._target = ctx.target
            self._pending = (raw, ctx.host)
        return raw

    def on_connection_changed(self, event: ConnectionChanged) -> None:
        if event.reason == "connect" and self._pending is not None:
            raw, host = self._pending
            self._pending = None
            # The role is read lazily (failover learns it after this notification).
            self.current = Slot(raw, event.new_host or host, Role.UNKNOWN, None, self.epoch(),
                                source="initial")
        elif event.reason not in ("connect", "close", "read_write_splitting"):
            # Failover (or the tracker) replaced the connection: the old one is gone, and so
            # is its place in its pool.
            proxy = self._proxy() if self._proxy is not None else None
            if proxy is not None:
                with self._lock:
                    self._sync(proxy)

    # --- execute phase ---------------------------------------------------------------------
    def execute(self, call: Call, proceed: Handler) -> Any:
        if call.op is _CLOSE:
            if call.method.startswith("Connection."):
                return self._close(call, proceed)
            return proceed(call)
        if call.args[1] != "read_only":
            return proceed(call)
        if self._proxy is None:
            self._proxy = weakref.ref(call.connection)
        with self._lock:
            return self._set_read_only(call, proceed, call.args[2])

    def _sync(self, proxy: Any) -> Slot:
        """The slot of the physical connection ``proxy`` uses now (failover may have replaced
        it since: the replaced one is forgotten, and given up by its pool)."""
        raw = proxy._raw
        current = self.current
        if current is not None and current.raw is raw:
            if current.role is Role.UNKNOWN:
                current.role, current.instance_id = self.initial_role(current.host)
                failover = self.failover()
                current.epoch = failover.epoch if failover is not None else 0
            return current
        if current is not None:
            self._forget(current, "failover")
        failover = self.failover()
        role = failover.role if failover is not None else Role.UNKNOWN
        instance = failover.instance_id if failover is not None else None
        slot = Slot(raw, proxy._host, role if role is not Role.UNKNOWN else Role.WRITER,
                    instance, failover.epoch if failover is not None else 0,
                    source="failover")
        slot.session = dict(proxy._session)
        self.current = slot
        return slot

    def _forget(self, slot: Slot, reason: str) -> None:
        """``slot`` was replaced under the proxy (failover closed it)."""
        if slot is self.writer:
            self.writer = None
        if slot is self.reader:
            self.reader = None
        if slot.pool is not None:
            if slot.finalizer is not None:
                slot.finalizer.detach()
            slot.pool.discard(slot.raw, reason)

    def _let_go(self, slot: Slot, reason: str) -> None:
        """Stop holding ``slot``: back to its pool (reset there), or closed."""
        if slot is self.writer:
            self.writer = None
        if slot is self.reader:
            self.reader = None
        if slot.finalizer is not None:
            slot.finalizer.detach()
        if slot.pool is not None:
            slot.pool.release(slot.raw, self._prepare_reader if slot.role is Role.READER
                              else None)
        else:
            with contextlib.suppress(Exception):
                slot.raw.close()
        if reason != "close":
            self.ctx.decide("splitting.dropped", self.code, **{
                "server.address": slot.host.host, "server.port": slot.host.port,
                "resilient_db.instance.id": slot.instance_id,
                "resilient_db.splitting.role": slot.role.value,
                "resilient_db.splitting.reason": reason})

    def _prepare_reader(self, raw: Any) -> dict[str, Any]:
        """A reader connection going back to its pool, just reset: read-only again for its
        next user (who sets ``read_only`` to come to it)."""
        self.ctx.driver.set_session_attribute(raw, "read_only", True)
        return {"read_only": True}

    def _set_read_only(self, call: Call, proceed: Handler, value: Any) -> Any:
        proxy = call.connection
        driver = self.ctx.driver
        raw = proxy._raw
        if driver.is_closed(raw):
            return proceed(call)  # the driver's own "connection is closed" error
        current = self._sync(proxy)
        want = Role.READER if value else Role.WRITER
        status = driver.transaction_status(raw)
        if status in (TxStatus.IN_TRANSACTION, TxStatus.IN_ERROR, TxStatus.ACTIVE):
            self.ctx.decide("splitting.refused", self.code, **{
                "server.address": current.host.host, "resilient_db.splitting.role": want.value,
                "resilient_db.splitting.reason": "in_transaction"})
            raise ReadWriteSplittingError(
                f"cannot set read_only={value!r} while a transaction is open on {current.host}: "
                "commit or roll back first (the connection stays where it is, its session "
                "unchanged)", reason="in_transaction", host=str(current.host))
        if current.role is want:
            result = proceed(call)
            current.session["read_only"] = value
            if current.forced and not value:
                driver.enforce_read_only(raw, False)
                current.forced = False
            return result
        started = time.monotonic()
        target = self._target_for(proxy, want)
        if target is None:  # no reader: stay on the writer, read-only there
            result = proceed(call)
            current.session["read_only"] = value
            # Read-only for every statement, autocommit ones too (psycopg applies read_only
            # only to the transactions it begins).
            driver.enforce_read_only(raw, True)
            current.forced = True
            return result
        state = {**proxy._session, "read_only": value}
        self._install(proxy, current, target, state, started)
        return None

    def _target_for(self, proxy: Any, want: Role) -> Slot | None:
        cached = self.reader if want is Role.READER else self.writer
        if cached is not None:
            problem = "closed" if self.ctx.driver.is_closed(cached.raw) else self.still_valid(
                cached)
            if problem is None:
                cached.source = "cached"
                return cached
            self._let_go(cached, problem)
        if want is Role.READER:
            slot = self.open_reader(proxy)
            if slot is None:
                return None
            self.reader = slot
        else:
            slot = self.open_writer(proxy)
            self.writer = slot
        return slot

    def _install(self, proxy: Any, current: Slot, target: Slot, state: dict[str, Any],
                 started: float) -> None:
        driver = self.ctx.driver
        known, defaults = target.session, driver.session_defaults
        diff = {k: v for k, v in state.items() if known.get(k, defaults.get(k, _MISSING)) != v}
        try:
            if diff:
                driver.apply_session_state(target.raw, diff)
            if target.forced and not state.get("read_only"):
                driver.enforce_read_only(target.raw, False)
                target.forced = False
        except Exception as exc:
            if target.source != "cached":
                self._let_go(target, "session_failed")
                raise
            # The cached connection broke while idle: one more try with a fresh one.
            log.debug("cached %s connection unusable (%r): opening another", target.role.value,
                      exc)
            self._let_go(target, "broken")
            again = self._target_for(proxy, target.role)
            if again is None:
                raise
            target = again
            driver.apply_session_state(target.raw, state)
        target.session = dict(state)
        current.session = dict(proxy._session)
        if current.role is Role.WRITER:
            if self.writer is not None and self.writer is not current:
                self._let_go(self.writer, "replaced")  # failover had moved it onto a writer
            self.writer = current
        elif current.role is Role.READER:
            if self.reader is not None and self.reader is not current:
                self._let_go(self.reader, "replaced")
            self.reader = current
        proxy.resilient.replace_raw(target.raw, target.host, "read_write_splitting",
                                    session_applied=True)
        self.current = target
        self.switches += 1
        failover = self.failover()
        if failover is not None:
            if self._writer_mode is None:
                self._writer_mode = failover.mode
            failover.follow(instance_id=target.instance_id, role=target.role,
                            mode=self._mode_for(target.role))
        self.ctx.decide("splitting.switched", self.code, **{
            "server.address": target.host.host, "server.port": target.host.port,
            "resilient_db.instance.id": target.instance_id,
            "resilient_db.splitting.role": target.role.value,
            "resilient_db.splitting.from": current.instance_id or current.host.host,
            "resilient_db.splitting.source": target.source,
            "resilient_db.splitting.elapsed": time.monotonic() - started})

    def _mode_for(self, role: Role) -> FailoverMode:
        """Failover's mode on a connection now on ``role``: a reader mode on a reader (the
        configured one when it is a reader mode), the writer's own on the writer."""
        configured = self._writer_mode or FailoverMode.STRICT_WRITER
        if role is Role.READER:
            if configured is FailoverMode.STRICT_WRITER:
                return FailoverMode.READER_OR_WRITER
            return configured
        return FailoverMode.STRICT_WRITER

    # --- close -----------------------------------------------------------------------------
    def _close(self, call: Call, proceed: Handler) -> Any:
        proxy = call.connection
        with self._lock:
            current = None if self.ctx.driver.is_closed(proxy._raw) else self._sync(proxy)
            keep = None
            if current is not None and current.pool is not None:
                # Never leave a pooled connection under a closed proxy (a later call would
                # reach a session someone else uses by then): the proxy closes a connection
                # of its own instead, and the pooled one goes back to its pool.
                keep = next((s for s in (self.writer, self.reader)
                             if s is not None and s is not current and s.pool is None), None)
            for slot in (self.writer, self.reader):
                if slot is not None and slot is not current and slot is not keep:
                    self._let_go(slot, "close")
            self.writer = self.reader = None
            self.current = None
            if current is None or current.pool is None:
                return proceed(call)
            if keep is None:  # nothing of its own to close: this one is closed for real
                self._forget(current, "close")
                return proceed(call)
            self._let_go(current, "close")
            object.__setattr__(proxy, "_raw", keep.raw)
            method = call.method.partition(".")[2]
            return proceed(call.replace(fn=getattr(keep.raw, method), raw=keep.raw))


#: Every splitting plugin alive, for the fork handler below.
_live: weakref.WeakSet[SplittingPlugin] = weakref.WeakSet()


def _forget_in_child() -> None:
    """In a child after ``fork()``: the connections a plugin holds besides the application's
    current one (which the proxy disarms itself) are the parent's sessions too: cut them off
    without a word (``DriverDialect.forget``) and let go of them."""
    for plugin in list(_live):
        plugin._lock = threading.RLock()
        current = plugin.current
        for slot in (plugin.writer, plugin.reader):
            if slot is not None and slot is not current:
                if slot.finalizer is not None:
                    slot.finalizer.detach()
                plugin.ctx.driver.forget(slot.raw)
        plugin.writer = plugin.reader = None


_lifecycle.on_fork_child(_forget_in_child)
