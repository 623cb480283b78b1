"""OpenTelemetry for resilient_db (DESIGN §9, docs/telemetry.md).

resilient_db depends on the OpenTelemetry API only; the SDK and exporters are the ``otel``
extra. Telemetry is off until a connection sets ``enable_telemetry`` or the application
calls :func:`enable` (or :func:`setup`, which also configures the SDK for demos). Off, it costs
one boolean check (``sink.enabled``) where a plugin would build a per-statement decision, and
nothing per statement otherwise. It never raises.

- :func:`enable` / :func:`disable`: install or remove the decision telemetry (process-wide:
  failover, topology and monitor decisions are shared by every connection).
- :func:`setup`: SDK providers with OTLP (HTTP or gRPC) and/or a Prometheus endpoint.
- :func:`suppress_instrumentation`: what internal statements run under.
- :mod:`resilient_db.telemetry.names`: every name emitted.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from .. import _lifecycle
from .._decisions import NullSink, get_decision_sink, set_decision_sink
from . import names
from ._sink import TelemetrySink
from .context import suppress_instrumentation

if TYPE_CHECKING:
    from .._pipeline import Plugin
    from .._properties import Settings
    from .sdk import Telemetry

__all__ = [
    "Telemetry",
    "TelemetrySink",
    "active",
    "disable",
    "enable",
    "names",
    "setup",
    "suppress_instrumentation",
]

log = logging.getLogger("resilient_db.telemetry")

_lock = threading.Lock()


def active() -> TelemetrySink | None:
    """The telemetry sink receiving decisions now, ``None`` when telemetry is off."""
    current: Any = get_decision_sink()
    inner = getattr(current, "inner", current)
    return inner if isinstance(inner, TelemetrySink) else None


def enable(*, tracer_provider: Any = None, meter_provider: Any = None, traces: bool = True,
           metrics: bool = True, submit_toplevel: bool = False) -> TelemetrySink:
    """Turn decision telemetry on, process-wide (providers ``None``: the global ones). A sink
    installed before (a test's ``CollectingSink``) keeps receiving every decision. Calling
    it again with other settings replaces the telemetry sink."""
    with _lock:
        current = active()
        if current is not None and (
                current.tracer_provider is tracer_provider
                and current.meter_provider is meter_provider
                and (current.tracer is not None) == traces
                and (current.meter is not None) == metrics
                and current.submit_toplevel == submit_toplevel):
            return current
        if current is not None:
            forward = current.forward
        else:
            installed: Any = get_decision_sink()
            inner = getattr(installed, "inner", installed)
            forward = None if isinstance(inner, NullSink) else inner
        sink = TelemetrySink(tracer_provider=tracer_provider, meter_provider=meter_provider,
                             traces=traces, metrics=metrics, submit_toplevel=submit_toplevel,
                             forward=forward)
        set_decision_sink(sink)
        log.debug("decision telemetry enabled (traces=%s, metrics=%s)", traces, metrics)
        return sink


def disable() -> None:
    """Turn decision telemetry off (the sink installed before it is restored)."""
    with _lock:
        current = active()
        if current is not None:
            set_decision_sink(current.forward)


def _reset_in_child() -> None:
    # After fork(): fresh locks (a monitor thread may have held the sink's while recording a
    # decision); the sink itself, and its providers, carry on in the child.
    global _lock
    _lock = threading.Lock()
    sink = active()
    if sink is not None:
        sink._lock = threading.Lock()


_lifecycle.on_fork_child(_reset_in_child)


def setup(**kwargs: Any) -> Telemetry:
    """Configure the OpenTelemetry SDK and turn telemetry on: see
    :func:`resilient_db.telemetry.sdk.setup` (needs the ``otel`` extra)."""
    from .sdk import setup as _setup

    return _setup(**kwargs)


def _activate(settings: Settings) -> type[Plugin]:
    """For ``resilient_db.connect`` with ``enable_telemetry``: make sure decision telemetry is
    on with this connection's providers and return the connection's telemetry plugin class."""
    from .._params import (
        METER_PROVIDER,
        TELEMETRY_METRICS_BACKEND,
        TELEMETRY_QUERY_SPANS,
        TELEMETRY_SUBMIT_TOPLEVEL,
        TELEMETRY_TRACES_BACKEND,
        TRACER_PROVIDER,
    )
    from ._plugin import QueryTelemetryPlugin, TelemetryPlugin

    tracer_provider = settings[TRACER_PROVIDER]
    meter_provider = settings[METER_PROVIDER]
    current = active()
    if current is None or (tracer_provider is not None
                           and tracer_provider is not current.tracer_provider) or (
            meter_provider is not None and meter_provider is not current.meter_provider):
        try:
            enable(tracer_provider=tracer_provider or (current and current.tracer_provider),
                   meter_provider=meter_provider or (current and current.meter_provider),
                   traces=settings[TELEMETRY_TRACES_BACKEND] != "none",
                   metrics=settings[TELEMETRY_METRICS_BACKEND] != "none",
                   submit_toplevel=bool(settings[TELEMETRY_SUBMIT_TOPLEVEL]))
        except Exception:  # telemetry never raises
            log.debug("cannot enable telemetry", exc_info=True)
    return QueryTelemetryPlugin if settings[TELEMETRY_QUERY_SPANS] else TelemetryPlugin


def __getattr__(name: str) -> Any:
    if name == "Telemetry":
        from .sdk import Telemetry

        return Telemetry
    raise AttributeError(name)
