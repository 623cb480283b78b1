"""A small SDK set-up for demos, tests and the chaos suite (needs the ``otel`` extra).

Applications with their own OpenTelemetry set-up do not need this: pass their providers
(``tracer_provider=``, ``meter_provider=``) or install them globally and set
``enable_telemetry``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _lifecycle
from . import disable, enable
from ._sink import TelemetrySink

log = logging.getLogger("resilient_db.telemetry")

OTLP_PROTOCOLS = ("http/protobuf", "grpc")
_LIFECYCLE_NAME = "telemetry.prometheus"


@dataclass
class Telemetry:
    """What :func:`setup` built. ``prometheus_port``: where the Prometheus endpoint listens
    (``None``: none). :meth:`shutdown` flushes and stops everything it started."""

    tracer_provider: Any
    meter_provider: Any
    sink: TelemetrySink
    prometheus_port: int | None = None
    _servers: list[Any] = field(default_factory=list)

    def flush(self, timeout_millis: int = 10_000) -> None:
        """Export what is buffered now (spans and metrics)."""
        self.tracer_provider.force_flush(timeout_millis)
        self.meter_provider.force_flush(timeout_millis)

    def stop_endpoint(self) -> None:
        """Stop the Prometheus endpoint (bounded; also run by ``resilient_db.shutdown``)."""
        _lifecycle.unregister(_LIFECYCLE_NAME)
        for server in self._servers:
            try:
                server.shutdown()
                server.server_close()
            except Exception:
                log.debug("cannot stop the Prometheus endpoint", exc_info=True)
        self._servers.clear()

    def shutdown(self) -> None:
        """Telemetry off, the endpoint stopped, the providers flushed and shut down (the
        providers' exporters bound how long that takes)."""
        disable()
        self.stop_endpoint()
        for provider in (self.tracer_provider, self.meter_provider):
            try:
                provider.shutdown()
            except Exception:
                log.debug("cannot shut %r down", provider, exc_info=True)


def setup(
    *,
    service_name: str = "resilient_db",
    otlp_endpoint: str | None = None,
    otlp_protocol: str = "http/protobuf",
    prometheus_port: int | None = None,
    prometheus_address: str = "127.0.0.1",
    span_exporters: Sequence[Any] = (),
    metric_readers: Sequence[Any] = (),
    export_interval: float = 5.0,
    set_global: bool = True,
    submit_toplevel: bool = False,
) -> Telemetry:
    """SDK tracer and meter providers, exporters, and decision telemetry turned on.

    ``otlp_endpoint``: an OTLP collector (``http://host:4318`` for ``http/protobuf``,
    ``host:4317`` for ``grpc``): spans (batched) and metrics (every ``export_interval``
    seconds) go there. ``prometheus_port``: serve ``/metrics`` on that port (0: a free
    port, see ``Telemetry.prometheus_port``). ``span_exporters``/``metric_readers``: more
    (in-memory ones in tests; span exporters are given a simple, unbatched processor).
    ``set_global``: install the providers as OpenTelemetry's global ones (only the first
    global install of a process takes effect, an OpenTelemetry rule)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if otlp_protocol not in OTLP_PROTOCOLS:
        raise ValueError(f"otlp_protocol {otlp_protocol!r}: expected one of "
                         f"{', '.join(OTLP_PROTOCOLS)}")
    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    readers = list(metric_readers)
    servers: list[Any] = []
    port: int | None = None
    if otlp_endpoint is not None:
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        span_exporter, metric_exporter = _otlp(otlp_endpoint, otlp_protocol)
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        readers.append(PeriodicExportingMetricReader(
            metric_exporter, export_interval_millis=export_interval * 1000))
    if prometheus_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        readers.append(PrometheusMetricReader())
        server, _thread = start_http_server(prometheus_port, addr=prometheus_address)
        servers.append(server)
        port = int(server.server_address[1])
    for exporter in span_exporters:
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if set_global:
        from opentelemetry import metrics, trace

        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    sink = enable(tracer_provider=tracer_provider, meter_provider=meter_provider,
                  submit_toplevel=submit_toplevel)
    handle = Telemetry(tracer_provider, meter_provider, sink, port, servers)
    if servers:
        _lifecycle.register(_LIFECYCLE_NAME, handle.stop_endpoint)
    return handle


def _otlp(endpoint: str, protocol: str) -> tuple[Any, Any]:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        insecure = not endpoint.startswith("https://")
        return (GrpcSpanExporter(endpoint=endpoint, insecure=insecure),
                GrpcMetricExporter(endpoint=endpoint, insecure=insecure))
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    base = endpoint.rstrip("/")
    return (OTLPSpanExporter(endpoint=f"{base}/v1/traces"),
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics"))
