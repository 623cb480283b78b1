"""Timestamped control-plane events (CONVENTIONS.md "Simulator events").

Every control-plane action records what happened as :class:`Event` values, with wall-clock and
``time.monotonic()`` times, and returns the events it caused. Names used by tests and reports:
``writer_stopped``, ``network_fault``, ``promoted``, ``topology_updated``, ``dns_updated``,
``rejoined_as_reader``, ``switchover_phase``, plus the others listed in :data:`EVENT_NAMES`.
"Time to recover" is measured from ``promoted``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["EVENT_NAMES", "Event", "EventLog"]

#: Every event name the simulator records.
EVENT_NAMES = frozenset(
    {
        "cluster_started",
        "cluster_stopped",
        "instance_started",
        "instance_stopped",
        "instance_killed",
        "writer_stopped",
        "writer_read_only",
        "network_fault",
        "failover_started",
        "promoted",
        "topology_updated",
        "dns_updated",
        "replica_following",
        "rejoined_as_reader",
        "reboot_started",
        "reboot_finished",
        "reader_added",
        "reader_removed",
        "replica_lag_set",
        "dns_staleness_set",
        "switchover_phase",
        "switchover_finished",
        "sessions_ended",
        "data_copied",
        "iam_enabled",
        "custom_endpoint_created",
        "custom_endpoint_modified",
        "custom_endpoint_deleted",
        # a proxied cluster (Cluster(proxied=True)): the proxy in front of an instance
        "proxy_created",
        # Aurora Global Database (Cluster.add_secondary_region, switchover_global, ...)
        "region_added",
        "global_switchover_started",
        "global_switchover_completed",
        "global_failover_started",
        "global_failover_completed",
        "region_restored",
        # chaos/secrets.py: a new password in the workload's secret and on the database
        "secret_rotated",
        # simulator/limitless.py: a Limitless shard group's transaction routers
        "shard_group_started",
        "shard_group_stopped",
        "router_started",
        "router_stopped",
        "router_killed",
        "router_load_set",
        "router_list_updated",
        "router_sessions_ended",
    }
)

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``instance`` is the instance id (``None`` for the cluster);
    ``wall`` is ``time.time()``, ``mono`` is ``time.monotonic()``; ``detail`` holds extra
    facts (e.g. the new writer, the phase)."""

    name: str
    instance: str | None
    wall: float
    mono: float
    detail: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "instance": self.instance, "wall": self.wall,
                "mono": self.mono, "detail": dict(self.detail)}


class EventLog:
    """An append-only, thread-safe list of events with waiting."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: list[Event] = []

    def record(self, name: str, instance: str | None = None, **detail: Any) -> Event:
        if name not in EVENT_NAMES:
            raise ValueError(f"unknown event name {name!r}; add it to EVENT_NAMES")
        event = Event(name, instance, time.time(), time.monotonic(), MappingProxyType(detail))
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
        return event

    def events(self, name: str | None = None, *, since: float | None = None) -> list[Event]:
        """Events (of one name), optionally only those at or after monotonic time ``since``."""
        with self._cond:
            return [e for e in self._events
                    if (name is None or e.name == name) and (since is None or e.mono >= since)]

    def last(self, name: str) -> Event | None:
        with self._cond:
            for event in reversed(self._events):
                if event.name == name:
                    return event
        return None

    def wait_for(self, name: str, *, since: float = 0.0, timeout: float = 30.0) -> Event:
        """Block until an event ``name`` at or after ``since`` exists; ``TimeoutError`` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self._events:
                    if event.name == name and event.mono >= since:
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {name!r} event within {timeout:g} s")
                self._cond.wait(remaining)

    def extend(self, events: Iterable[Event]) -> None:
        with self._cond:
            self._events.extend(events)
            self._cond.notify_all()
