"""The decision sink: where plugins report what they decided and why.

Every plugin decision (failover started or finished, host marked down, reader chosen, token
fetched or cached, statement timed, ...) is a :class:`Decision` value handed to the process-wide
sink. Until telemetry is configured the sink is a no-op; the telemetry layer installs a sink
that turns decisions into spans, events and metrics. Tests install a :class:`CollectingSink`.

A sink must never raise and must be cheap: ``record`` is called on connect and failover paths.
Per-statement decisions are only built when ``sink.enabled`` is true, so a disabled sink costs
one attribute read on the hot path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

__all__ = [
    "CollectingSink",
    "Decision",
    "DecisionSink",
    "NullSink",
    "get_decision_sink",
    "set_decision_sink",
]

log = logging.getLogger("resilient_db.decisions")

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Decision:
    """One decision. ``kind`` is a dotted name (``connect.completed``, ``failover.started``);
    ``plugin`` the code of the plugin that decided (``None`` for the core); ``attributes`` use
    OpenTelemetry semantic-convention names where one exists (``server.address``,
    ``error.type``); ``at`` is ``time.monotonic()`` when it was decided.
    """

    kind: str
    plugin: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    at: float = field(default_factory=time.monotonic)


class DecisionSink(Protocol):
    """Receives decisions. ``enabled`` false means per-statement decisions are not built."""

    enabled: bool

    def record(self, decision: Decision) -> None: ...


class NullSink:
    """The default sink: drops everything."""

    enabled = False

    def record(self, decision: Decision) -> None:
        return None


class CollectingSink:
    """Keeps every decision in memory (tests and demos). Thread-safe."""

    enabled = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.decisions: list[Decision] = []

    def record(self, decision: Decision) -> None:
        with self._lock:
            self.decisions.append(decision)

    def kinds(self) -> list[str]:
        with self._lock:
            return [d.kind for d in self.decisions]

    def of_kind(self, kind: str) -> list[Decision]:
        with self._lock:
            return [d for d in self.decisions if d.kind == kind]


class _SafeSink:
    """Wraps a user sink so that a failing sink never breaks a connection."""

    __slots__ = ("enabled", "inner")

    def __init__(self, inner: DecisionSink) -> None:
        self.inner = inner
        self.enabled = bool(getattr(inner, "enabled", True))

    def record(self, decision: Decision) -> None:
        try:
            self.inner.record(decision)
        except Exception:  # telemetry never raises
            log.debug("decision sink %r failed on %s", self.inner, decision.kind, exc_info=True)


_NULL = NullSink()
_sink: DecisionSink = _NULL


def set_decision_sink(sink: DecisionSink | None) -> DecisionSink:
    """Install ``sink`` process-wide (``None`` restores the no-op sink); returns the old one."""
    global _sink
    old = _sink
    _sink = _NULL if sink is None else _SafeSink(sink)
    return old.inner if isinstance(old, _SafeSink) else old


def get_decision_sink() -> DecisionSink:
    """The sink in force now. Read it at the moment of recording, not once at import."""
    return _sink
