"""The process-wide registry behind each kind of background monitor (one topology monitor per
cluster, one failure monitor per host): one live monitor per key, replaced when it stopped,
all stopped at once by ``resilient_db.shutdown()``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

from ._decisions import Decision, get_decision_sink


class Monitor(Protocol):
    @property
    def stopped(self) -> bool: ...

    def stop(self) -> None: ...

    def abandon(self) -> None:
        """In a child process after ``fork()``: look stopped and let go of every connection
        without sending anything (they are the parent's sessions)."""


M = TypeVar("M", bound=Monitor)


class MonitorRegistry(Generic[M]):
    """Monitors by key. ``lock`` guards the registry; hold it to combine a lookup with state of
    your own (it is a plain lock: never call back into the registry while holding it)."""

    def __init__(self, stopped_kind: str, count_attribute: str) -> None:
        self.lock = threading.Lock()
        self._monitors: dict[Hashable, M] = {}
        self._stopped_kind = stopped_kind  # the decision recorded by stop_all
        self._count_attribute = count_attribute

    def get_locked(self, key: Hashable) -> M | None:
        """The live monitor of ``key`` (caller holds ``lock``)."""
        monitor = self._monitors.get(key)
        return monitor if monitor is not None and not monitor.stopped else None

    def get_or_create_locked(self, key: Hashable, create: Callable[[], M]) -> M:
        """The monitor of ``key``, created when there is none or it stopped (caller holds
        ``lock``)."""
        monitor = self.get_locked(key)
        if monitor is None:
            monitor = self._monitors[key] = create()
        return monitor

    def get_or_create(self, key: Hashable, create: Callable[[], M]) -> M:
        with self.lock:
            return self.get_or_create_locked(key, create)

    def discard_locked(self, key: Hashable, monitor: M) -> None:
        """Forget ``monitor`` if it is still the one registered for ``key`` (caller holds
        ``lock``)."""
        if self._monitors.get(key) is monitor:
            del self._monitors[key]

    def all(self) -> list[M]:
        with self.lock:
            return list(self._monitors.values())

    def stop_all(self, also_locked: Callable[[], None] | None = None) -> None:
        """Stop every monitor and forget them; ``also_locked`` runs under ``lock`` (to clear
        state kept beside the registry). Connections that need a monitor later start one."""
        with self.lock:
            stopping = list(self._monitors.values())
            self._monitors.clear()
            if also_locked is not None:
                also_locked()
        for monitor in stopping:
            monitor.stop()
        if stopping:
            get_decision_sink().record(Decision(self._stopped_kind, None,
                                                {self._count_attribute: len(stopping)}))

    def reset_in_child(self) -> None:
        """In a child process after ``fork()``: start empty with a fresh lock (a parent thread
        may have held the old one at fork time) and abandon the inherited monitors (their
        threads do not exist here; stopping them would close the parent's sessions). The
        child's next connection starts a monitor of its own."""
        inherited = list(self._monitors.values())
        self.lock = threading.Lock()
        self._monitors = {}
        for monitor in inherited:
            monitor.abandon()
