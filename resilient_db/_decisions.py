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

import itertools
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

__all__ = [
    "SPAN_ID",
    "CollectingSink",
    "Decision",
    "DecisionSink",
    "DecisionSpan",
    "NullSink",
    "decision_span",
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
    # The no-op sink stays unwrapped (restoring what this returned must not wrap it: a wrapped
    # no-op sink would look enabled-by-a-user to code that compares sinks).
    _sink = _NULL if sink is None or isinstance(sink, NullSink) else _SafeSink(sink)
    return old.inner if isinstance(old, _SafeSink) else old


def get_decision_sink() -> DecisionSink:
    """The sink in force now. Read it at the moment of recording, not once at import."""
    return _sink


# --- decision spans ----------------------------------------------------------------------------

#: Attribute that pairs a ``<kind>.started`` decision with its ``<kind>.finished`` decision.
SPAN_ID = "resilient_db.span.id"
_span_ids = itertools.count(1)


class DecisionSpan:
    """A decision with a duration: ``<kind>.started`` when opened, ``<kind>.finished`` when
    closed, both carrying the same :data:`SPAN_ID`. Decisions recorded on the same thread in
    between belong to it (the telemetry layer makes it a span and nests them in it).

    Use it as a context manager; :meth:`set` adds attributes to the finishing decision (the
    outcome); an exception leaving the block adds ``error.type``. Build with
    :func:`decision_span`."""

    __slots__ = ("attributes", "finished", "id", "kind", "plugin")

    def __init__(self, kind: str, plugin: str | None, span_id: int) -> None:
        self.kind = kind
        self.plugin = plugin
        self.id = span_id
        self.attributes: dict[str, Any] = {}
        self.finished = False

    def set(self, **attributes: Any) -> None:
        """Attributes of the finishing decision (outcome, new host, ...)."""
        self.attributes.update(attributes)

    def finish(self) -> None:
        """Record ``<kind>.finished`` (once; later calls do nothing)."""
        if self.finished:
            return
        self.finished = True
        _sink.record(Decision(f"{self.kind}.finished", self.plugin,
                              {**self.attributes, SPAN_ID: self.id}))

    def __enter__(self) -> DecisionSpan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc_type is not None and "error.type" not in self.attributes:
            self.attributes["error.type"] = exc_type.__name__
        self.finish()


def decision_span(kind: str, plugin: str | None, attributes: Mapping[str, Any] | None = None,
                  **more: Any) -> DecisionSpan:
    """Record ``<kind>.started`` with ``attributes`` (a mapping, for dotted names, and/or
    keywords) and return the :class:`DecisionSpan` that records ``<kind>.finished``."""
    span = DecisionSpan(kind, plugin, next(_span_ids))
    started = dict(attributes) if attributes else {}
    started.update(more)
    started[SPAN_ID] = span.id
    _sink.record(Decision(f"{kind}.started", plugin, started))
    return span
