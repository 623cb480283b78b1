"""The telemetry sink: decisions in, OpenTelemetry spans, span events and metrics out.

Generic rules (any decision kind, from any plugin, known or not):

- ``<kind>.started`` / ``<kind>.finished`` pairs (:func:`resilient_db.decision_span`) become
  the span ``resilient_db.<kind>``, current on the recording thread while it is open, so the
  decisions and connect spans in between nest in it;
- any other decision becomes an event named ``<kind>`` on the current resilient_db span, or
  a zero-length span ``resilient_db.<kind>`` when none is open (monitor threads);
- every decision counts in ``resilient_db.decisions`` by kind and plugin.

Known kinds also feed their own metrics (failovers, host state, detection time, topology,
monitor restarts, watchdog aborts, reader selections). Nothing here raises: a failing
provider, exporter or bad attribute is logged at DEBUG and the decision is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from .._decisions import SPAN_ID, Decision, DecisionSink
from . import names as n

log = logging.getLogger("resilient_db.telemetry")

_PRIMITIVES = (str, bool, int, float)
_STARTED = ".started"
_FINISHED = ".finished"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("resilient_db")
    except Exception:
        return "0"


VERSION = _version()


def clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes OpenTelemetry accepts: primitives and homogeneous sequences of them; ``None``
    dropped; anything else as ``str``. The decision-span id is left out."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None or key == SPAN_ID:
            continue
        if isinstance(value, _PRIMITIVES):
            out[key] = value
        elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
            out[key] = _sequence(list(value))
        else:
            out[key] = str(value)
    return out


def _sequence(items: list[Any]) -> tuple[Any, ...]:
    """A homogeneous tuple OpenTelemetry accepts (mixed items become strings)."""
    for kind in (str, bool):
        if all(isinstance(v, kind) for v in items):
            return tuple(items)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return tuple(items)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        return tuple(float(v) for v in items)
    return tuple(str(v) for v in items)


class _Open:
    __slots__ = ("at", "attributes", "span", "thread", "token")

    def __init__(self, span: Any, token: Any, attributes: Mapping[str, Any], at: float) -> None:
        self.span = span
        self.token = token
        self.attributes = attributes
        self.at = at
        self.thread = threading.get_ident()


class TelemetrySink:
    """A decision sink that emits OpenTelemetry. ``tracer_provider``/``meter_provider``:
    ``None`` means the global ones (resolved lazily, so a provider installed later is used).
    ``traces``/``metrics`` false: that signal is off. ``submit_toplevel``: decision spans
    opened outside another resilient_db span start their own trace (linked to the
    application's span) instead of nesting in the application's current span. ``forward``:
    a sink that also receives every decision (the one installed before)."""

    enabled = True

    def __init__(self, *, tracer_provider: Any = None, meter_provider: Any = None,
                 traces: bool = True, metrics: bool = True, submit_toplevel: bool = False,
                 forward: DecisionSink | None = None) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.submit_toplevel = submit_toplevel
        self.forward = forward
        self.tracer: trace.Tracer | None = (
            trace.get_tracer(n.SCOPE, VERSION, tracer_provider=tracer_provider)
            if traces else None)
        self.meter: otel_metrics.Meter | None = (
            otel_metrics.get_meter(n.SCOPE, VERSION, meter_provider=meter_provider)
            if metrics else None)
        self._lock = threading.Lock()
        self._open: dict[int, _Open] = {}
        #: Span ids (ints) of resilient_db's own spans open now: decisions become their events.
        self.ours: set[int] = set()
        self._offset_ns = time.time_ns() - time.monotonic_ns()
        self._instruments()

    # --- instruments ---------------------------------------------------------------------
    def _instruments(self) -> None:
        meter = self.meter
        self.operation_duration: Any = None
        if meter is None:
            return
        unit = {name: spec[1] for name, spec in n.METRICS.items()}

        def histogram(name: str, description: str) -> Any:
            return meter.create_histogram(name, unit=unit[name], description=description,
                                          explicit_bucket_boundaries_advisory=n.SECONDS_BUCKETS)

        def counter(name: str, description: str) -> Any:
            return meter.create_counter(name, unit=unit[name], description=description)

        self.operation_duration = histogram(
            n.METRIC_OPERATION_DURATION, "Duration of database client operations.")
        self.connection_count = meter.create_up_down_counter(
            n.METRIC_CONNECTION_COUNT, unit=unit[n.METRIC_CONNECTION_COUNT],
            description="Open resilient_db connections (state 'used': held by the "
                        "application).")
        self.create_time = histogram(n.METRIC_CONNECTION_CREATE_TIME,
                                     "Time to open one physical connection.")
        self.failovers = counter(n.METRIC_FAILOVERS, "Failovers by mode, trigger and outcome.")
        self.failover_duration = histogram(n.METRIC_FAILOVER_DURATION,
                                           "From the failure to the outcome of a failover.")
        self.host_state = meter.create_gauge(
            n.METRIC_HOST_STATE, unit=unit[n.METRIC_HOST_STATE],
            description="1 when the host was last seen up, 0 when declared down.")
        self.detection = histogram(n.METRIC_DETECTION_TIME,
                                   "From a failure being noticed to the detector's verdict.")
        self.refreshes = counter(n.METRIC_TOPOLOGY_REFRESHES, "Topology reads that verified "
                                                              "the writer.")
        self.changes = counter(n.METRIC_TOPOLOGY_CHANGES, "Topology changes.")
        self.restarts = counter(n.METRIC_MONITOR_RESTARTS, "Monitor threads restarted after a "
                                                           "crash.")
        self.aborts = counter(n.METRIC_WATCHDOG_ABORTS, "Calls the deadline watchdog aborted.")
        self.selections = counter(n.METRIC_READER_SELECTIONS, "Reader selections by strategy.")
        self.decisions = counter(n.METRIC_DECISIONS, "Every decision, by kind and plugin.")

    def ns(self, at: float) -> int:
        """A ``time.monotonic()`` value as epoch nanoseconds."""
        return int(at * 1e9) + self._offset_ns

    # --- the sink ------------------------------------------------------------------------
    def record(self, decision: Decision) -> None:
        try:
            self._record(decision)
        except Exception:  # telemetry never raises
            log.debug("telemetry failed on decision %s", decision.kind, exc_info=True)
        forward = self.forward
        if forward is not None:
            try:
                forward.record(decision)
            except Exception:
                log.debug("forwarded sink failed on %s", decision.kind, exc_info=True)

    def _record(self, decision: Decision) -> None:
        kind = decision.kind
        attributes = decision.attributes
        if self.meter is not None:
            self.decisions.add(1, {n.ATTR_DECISION_KIND: kind,
                                   n.ATTR_PLUGIN: decision.plugin or "core"})
        span_id = attributes.get(SPAN_ID)
        if span_id is not None:
            if kind.endswith(_STARTED):
                self._start(kind[: -len(_STARTED)], decision, span_id)
                return
            if kind.endswith(_FINISHED):
                self._finish(kind[: -len(_FINISHED)], decision, span_id)
                return
        if self.meter is not None:
            self._point_metrics(kind, decision)
        if self.tracer is None or kind in n.UNTRACED_KINDS:
            return
        timestamp = self.ns(decision.at)
        current = trace.get_current_span()
        if current.get_span_context().span_id in self.ours:
            current.add_event(kind, clean(attributes), timestamp)
            return
        span = self.tracer.start_span(n.SPAN_PREFIX + kind, attributes={
            **clean(attributes), n.ATTR_PLUGIN: decision.plugin or "core"},
            start_time=timestamp)
        span.end(end_time=timestamp)

    # --- decision spans --------------------------------------------------------------------
    def _start(self, kind: str, decision: Decision, span_id: int) -> None:
        span: Any = None
        token: Any = None
        tracer = self.tracer
        if tracer is not None:
            parent: otel_context.Context | None = None
            links: list[Link] = []
            current = trace.get_current_span()
            current_context = current.get_span_context()
            if self.submit_toplevel and current_context.span_id not in self.ours:
                parent = otel_context.Context()
                if current_context.is_valid:
                    links.append(Link(current_context))
            span = tracer.start_span(
                n.SPAN_PREFIX + kind, context=parent, kind=SpanKind.INTERNAL,
                attributes={**clean(decision.attributes),
                            n.ATTR_PLUGIN: decision.plugin or "core"},
                links=links, start_time=self.ns(decision.at))
            token = otel_context.attach(trace.set_span_in_context(span))
            self.ours.add(span.get_span_context().span_id)
        with self._lock:
            self._open[span_id] = _Open(span, token, decision.attributes, decision.at)

    def _finish(self, kind: str, decision: Decision, span_id: int) -> None:
        with self._lock:
            opened = self._open.pop(span_id, None)
        if opened is None:
            return
        attributes = decision.attributes
        span = opened.span
        if span is not None:
            try:
                span.set_attributes(clean(attributes))
                error = attributes.get(n.ERROR_TYPE)
                if error is not None:
                    span.set_status(Status(StatusCode.ERROR, str(error)))
                span.end(end_time=self.ns(decision.at))
            finally:
                self.ours.discard(span.get_span_context().span_id)
                if opened.thread == threading.get_ident():
                    otel_context.detach(opened.token)
        if self.meter is not None:
            merged = {**opened.attributes, **attributes}
            self._span_metrics(kind, merged, max(0.0, decision.at - opened.at))

    # --- metrics of known kinds ----------------------------------------------------------------
    def _span_metrics(self, kind: str, attributes: Mapping[str, Any], duration: float) -> None:
        if kind == n.KIND_FAILOVER:
            labels = {
                n.ATTR_FAILOVER_MODE: str(attributes.get(n.ATTR_FAILOVER_MODE, "unknown")),
                n.ATTR_FAILOVER_TRIGGER: str(attributes.get(n.ATTR_FAILOVER_TRIGGER,
                                                            "unknown")),
                n.ATTR_FAILOVER_OUTCOME: str(attributes.get(n.ATTR_FAILOVER_OUTCOME,
                                                            attributes.get(n.ERROR_TYPE,
                                                                           "unknown"))),
            }
            self.failovers.add(1, labels)
            self.failover_duration.record(duration, labels)
        elif kind == n.KIND_TOPOLOGY_SEARCH and attributes.get(n.ATTR_TOPOLOGY_WRITER):
            self.detection.record(duration, {n.ATTR_DETECTOR: "topology"})

    def _point_metrics(self, kind: str, decision: Decision) -> None:
        attributes = decision.attributes
        if kind.endswith(n.HOST_DOWN_SUFFIX) or kind.endswith(n.HOST_UP_SUFFIX):
            up = kind.endswith(n.HOST_UP_SUFFIX)
            detector = kind.rsplit(".", 1)[0]
            address = attributes.get(n.SERVER_ADDRESS)
            if address is not None:
                labels: dict[str, Any] = {n.SERVER_ADDRESS: str(address)}
                port = attributes.get(n.SERVER_PORT)
                if port is not None:
                    labels[n.SERVER_PORT] = int(port)
                self.host_state.set(1 if up else 0, labels)
            took = attributes.get(n.ATTR_DETECTION_TIME)
            if not up and isinstance(took, (int, float)):
                self.detection.record(float(took), {n.ATTR_DETECTOR: detector})
        elif kind == n.KIND_TOPOLOGY_REFRESHED:
            self.refreshes.add(1, {n.ATTR_TOPOLOGY_SOURCE: str(
                attributes.get(n.ATTR_TOPOLOGY_SOURCE, "refresh"))})
        elif kind == n.KIND_TOPOLOGY_CHANGED:
            before = attributes.get("resilient_db.topology.writer_before") or ""
            after = attributes.get(n.ATTR_TOPOLOGY_WRITER) or ""
            self.changes.add(1, {n.ATTR_WRITER_CHANGED: bool(before) and before != after})
        elif kind == n.KIND_READER_SELECTED:
            self.selections.add(1, {n.ATTR_STRATEGY: str(attributes.get(n.ATTR_STRATEGY, ""))})
        elif kind.endswith(n.MONITOR_RESTARTED_SUFFIX):
            self.restarts.add(1, {n.ATTR_MONITOR: kind[: -len(n.MONITOR_RESTARTED_SUFFIX)]})
        elif kind == n.KIND_DEADLINE_EXPIRED or (kind.startswith(n.WATCHDOG_PREFIX)
                                                 and "abort" in kind):
            self.aborts.add(1, {n.ATTR_PLUGIN: decision.plugin or "core"})
