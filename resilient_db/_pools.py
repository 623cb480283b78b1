"""Internal connection pools of read/write splitting, one per instance and identity.

``read_write_splitting`` and ``srw`` (with ``splitting_pool``) take the reader and writer
connections they open from here and give them back, reset, when the application connection
closes. A pool is keyed by :class:`PoolKey`: driver, host, port, user, database and a
fingerprint of the other connect arguments (the password among them), so a connection never
serves another identity, and a credential plugin's rotating token (added inside the connect
chain, after the key is taken) does not split the pool.

Lifetimes (SQLAlchemy-style lazy invalidation, no thread):

- every connection carries the *epoch* (the cluster's topology epoch, which moves when the
  writer changes) it was opened under; a pool asked for a connection under a newer epoch
  closes its idle connections first, and a connection of an older epoch coming back is closed
  instead of kept, so a demoted writer's connection never serves a "writer" request;
- :func:`evict_host` (failover, after a host failed) closes a host's idle connections at once
  and marks the ones in use to be closed when they come back;
- an idle connection unused for longer than the idle timeout is closed when the pool is next
  used.

Each pool holds at most ``max_size`` connections, in use and idle together; a request beyond
waits (bounded) for one to come back. Every outcome is a decision: ``pool.hit``,
``pool.miss``, ``pool.evicted`` (with its reason), ``pool.exhausted``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _lifecycle
from ._decisions import Decision, get_decision_sink

if TYPE_CHECKING:
    from .drivers.base import DriverDialect

__all__ = ["Pool", "PoolExhaustedError", "PoolKey", "Pooled", "evict_host", "pool_for", "pools",
           "shutdown"]

log = logging.getLogger("resilient_db.pools")

#: Connect arguments left out of the identity fingerprint: where to connect (in the key
#: already) and timeouts (they do not change who the session belongs to).
_NOT_IDENTITY = frozenset(
    {"host", "port", "hostaddr", "connect_timeout", "connection_timeout", "read_timeout",
     "write_timeout"})


@dataclass(frozen=True)
class PoolKey:
    """Who a pooled connection belongs to: it is only ever handed to the same identity."""

    driver: str
    host: str
    port: int | None
    user: str | None
    database: str | None
    fingerprint: str  # a hash of the other connect arguments (password included)

    @classmethod
    def of(cls, driver: DriverDialect, host: str, port: int | None,
           args: Mapping[str, Any]) -> PoolKey:
        identity = sorted((k, repr(v)) for k, v in args.items() if k not in _NOT_IDENTITY)
        digest = hashlib.sha256(repr(identity).encode()).hexdigest()[:16]
        database = args.get(driver.database_key)
        return cls(driver.code, host.lower(), port, driver.user_of(args),
                   None if database is None else str(database), digest)

    def __str__(self) -> str:
        where = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"{self.user or '?'}@{where}/{self.database or ''}"


class PoolExhaustedError(Exception):
    """Internal: the pool stayed full for the whole wait."""


class Pooled:
    """One physical connection of a pool: the driver connection, the epoch it was opened
    under, the session baseline to restore, when it was last given back."""

    __slots__ = ("baseline", "epoch", "evicted", "idle_since", "raw", "session")

    def __init__(self, raw: Any, epoch: int, baseline: dict[str, Any]) -> None:
        self.raw = raw
        self.epoch = epoch
        self.baseline = baseline
        self.idle_since = 0.0
        self.evicted = False  # to be closed when it comes back (evict_host)
        #: Session attributes set on it since its reset (by ``release``'s ``prepare``).
        self.session: dict[str, Any] = {}


def _decide(kind: str, key: PoolKey, **attributes: Any) -> None:
    attrs: dict[str, Any] = {"server.address": key.host, "server.port": key.port,
                             "db.user": key.user, "db.namespace": key.database}
    attrs.update({f"resilient_db.pool.{name}": value for name, value in attributes.items()})
    get_decision_sink().record(Decision(kind, "pool", attrs, time.monotonic()))


class Pool:
    """The connections of one :class:`PoolKey`. Thread-safe; nothing is closed or opened
    while holding the lock."""

    def __init__(self, key: PoolKey, driver: DriverDialect, max_size: int,
                 idle_timeout: float | None) -> None:
        self.key = key
        self.driver = driver
        self.max_size = max_size
        self.idle_timeout = idle_timeout  # None or 0: idle connections do not expire
        self.epoch = 0
        self._idle: deque[Pooled] = deque()  # most recently returned on the right
        self._in_use: dict[int, Pooled] = {}  # id(raw) -> slot
        self._opening = 0
        self._cond = threading.Condition(threading.Lock())

    @property
    def size(self) -> int:
        """Connections held: in use, idle and being opened."""
        with self._cond:
            return len(self._idle) + len(self._in_use) + self._opening

    @property
    def idle(self) -> int:
        with self._cond:
            return len(self._idle)

    def acquire(self, epoch: int, opener: Callable[[], Any], timeout: float,
                ) -> tuple[Any, bool, dict[str, Any]]:
        """A connection opened under ``epoch`` (an idle one, else a new one from ``opener``):
        ``(raw, hit, session)``, ``session`` the attributes set on it since its reset. Waits
        up to ``timeout`` seconds for room when the pool is full, then raises
        :class:`PoolExhaustedError`."""
        deadline = time.monotonic() + timeout
        while True:
            doomed: list[tuple[Pooled, str]] = []
            found: Pooled | None = None
            with self._cond:
                while True:
                    doomed += self._sweep(epoch)
                    if self._idle:
                        found = self._idle.pop()
                        self._in_use[id(found.raw)] = found
                        break
                    if len(self._in_use) + self._opening < self.max_size:
                        self._opening += 1
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._close_all(doomed)
                        _decide("pool.exhausted", self.key, max_size=self.max_size,
                                waited=timeout)
                        raise PoolExhaustedError(str(self.key))
                    self._cond.wait(left)
            self._close_all(doomed)
            if found is not None:
                if self.driver.is_closed(found.raw):
                    self._forget(found, "closed")
                    continue
                _decide("pool.hit", self.key, epoch=epoch)
                return found.raw, True, dict(found.session)
            return self._open(epoch, opener), False, {}

    def _open(self, epoch: int, opener: Callable[[], Any]) -> Any:
        try:
            raw = opener()
            baseline = self.driver.session_baseline(raw)
        except BaseException:
            with self._cond:
                self._opening -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._opening -= 1
            self._in_use[id(raw)] = Pooled(raw, epoch, baseline)
        _decide("pool.miss", self.key, epoch=epoch)
        return raw

    def release(self, raw: Any,
                prepare: Callable[[Any], dict[str, Any]] | None = None) -> None:
        """``raw`` comes back: reset and kept idle, or closed when it is broken, evicted or of
        an older epoch. ``prepare(raw)``, after the reset, sets what its next user will want
        (a reader's read-only mode: the round trip is paid here, not on a switch) and returns
        the attributes it set."""
        with self._cond:
            slot = self._in_use.pop(id(raw), None)
        if slot is None:
            _close(raw)
            return
        reason = None
        if slot.evicted:
            reason = "failover"
        elif slot.epoch != self.epoch:
            reason = "topology"
        elif self.driver.is_closed(raw):
            reason = "closed"
        else:
            try:
                self.driver.reset_for_reuse(raw, slot.baseline)
                slot.session = prepare(raw) if prepare is not None else {}
            except Exception as exc:
                log.debug("pooled connection to %s not reusable: %r", self.key, exc)
                reason = "reset_failed"
        if reason is not None:
            self._evicted(slot, reason)
            with self._cond:
                self._cond.notify()
            return
        slot.idle_since = time.monotonic()
        with self._cond:
            self._idle.append(slot)
            self._cond.notify()

    def discard(self, raw: Any, reason: str) -> None:
        """``raw`` will not come back (broken, replaced by failover): stop counting it."""
        with self._cond:
            slot = self._in_use.pop(id(raw), None)
            self._cond.notify()
        if slot is not None:
            self._evicted(slot, reason)

    def owns(self, raw: Any) -> bool:
        with self._cond:
            return id(raw) in self._in_use

    def evict(self, reason: str) -> None:
        """Close every idle connection; the ones in use are closed when they come back."""
        with self._cond:
            doomed = [(slot, reason) for slot in self._idle]
            self._idle.clear()
            for slot in self._in_use.values():
                slot.evicted = True
            self._cond.notify_all()
        self._close_all(doomed)

    def _sweep(self, epoch: int) -> list[tuple[Pooled, str]]:
        """Under the lock: take out the idle connections to close (older epoch, idle too
        long); adopt ``epoch`` when it is newer."""
        doomed: list[tuple[Pooled, str]] = []
        if epoch != self.epoch:
            self.epoch = epoch
            doomed += [(slot, "topology") for slot in self._idle]
            self._idle.clear()
            for slot in self._in_use.values():
                if slot.epoch != epoch:
                    slot.evicted = True
        if self.idle_timeout:
            cutoff = time.monotonic() - self.idle_timeout
            while self._idle and self._idle[0].idle_since < cutoff:
                doomed.append((self._idle.popleft(), "idle"))
        return doomed

    def _forget(self, slot: Pooled, reason: str) -> None:
        with self._cond:
            self._in_use.pop(id(slot.raw), None)
            self._cond.notify()
        self._evicted(slot, reason)

    def _close_all(self, doomed: list[tuple[Pooled, str]]) -> None:
        for slot, reason in doomed:
            self._evicted(slot, reason)

    def _evicted(self, slot: Pooled, reason: str) -> None:
        _close(slot.raw)
        _decide("pool.evicted", self.key, reason=reason)

    def close(self) -> None:
        with self._cond:
            idle = list(self._idle)
            self._idle.clear()
            for slot in self._in_use.values():
                slot.evicted = True
        for slot in idle:
            _close(slot.raw)


def _close(raw: Any) -> None:
    with contextlib.suppress(Exception):
        raw.close()


_lock = threading.Lock()
_pools: dict[PoolKey, Pool] = {}


def pool_for(key: PoolKey, driver: DriverDialect, max_size: int,
             idle_timeout: float | None) -> Pool:
    """The process-wide pool of ``key`` (created on first use; the first caller's limits
    apply until :func:`shutdown`)."""
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = Pool(key, driver, max_size, idle_timeout)
            _lifecycle.register("splitting pools", shutdown)
            from . import topology  # not at import: topology imports the pipeline

            topology.add_writer_listener(_on_topology_change)
        return pool


def pools() -> list[Pool]:
    with _lock:
        return list(_pools.values())


def evict_host(driver_code: str, host: str, port: int | None) -> None:
    """``host`` failed (failover): its pools close their idle connections and the ones in use
    when they come back. Costs a dictionary scan when no pool exists."""
    if not _pools:
        return
    name = host.lower()
    for pool in pools():
        key = pool.key
        if key.driver == driver_code and key.host == name and (
                port is None or key.port in (None, port)):
            pool.evict("failover")


def _on_topology_change(monitor: Any, change: Any) -> None:
    """A cluster's writer or membership changed (monitor thread): the pools of its instances
    close their idle connections now (the ones in use when they come back) instead of at
    their next use, which may never come."""
    if not _pools or not (change.writer_changed or change.removed or change.role_changed):
        return
    snapshot = monitor.snapshot
    names = {h.host.lower() for h in snapshot.hosts} if snapshot is not None else set()
    for pool in pools():
        if pool.key.host in names:
            with pool._cond:
                pool.epoch = change.epoch
            pool.evict("topology")


def shutdown() -> None:
    """Close every idle pooled connection and forget the pools (``resilient_db.shutdown``)."""
    with _lock:
        gone = list(_pools.values())
        _pools.clear()
    for pool in gone:
        pool.close()


def _reset_in_child() -> None:
    # The parent's pooled sessions are not the child's: cut them off without a word (a close,
    # or mysql-connector's garbage collection, would end the parent's sessions).
    global _lock
    _lock = threading.Lock()
    for pool in list(_pools.values()):
        for slot in [*pool._idle, *pool._in_use.values()]:
            pool.driver.forget(slot.raw)
        pool._cond = threading.Condition(threading.Lock())
    _pools.clear()


_lifecycle.on_fork_child(_reset_in_child)
