"""The telemetry layer: decisions to spans, events and metrics (SDK in-memory exporters), the
connection telemetry on real servers, properties, query text, suppression, and that telemetry
never raises."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import resilient_db
from resilient_db import telemetry
from resilient_db._decisions import (
    SPAN_ID,
    CollectingSink,
    Decision,
    NullSink,
    decision_span,
    get_decision_sink,
)
from resilient_db.telemetry import _sql
from resilient_db.telemetry import names as n
from resilient_db.telemetry.context import is_suppressed, suppress_instrumentation
from tests.conftest import Backend


@dataclass
class Otel:
    """SDK providers with in-memory exporters, and the telemetry sink using them."""

    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    sink: telemetry.TelemetrySink

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.finished() if s.name == name]
        assert found, f"no span {name!r} in {[s.name for s in self.finished()]}"
        return found[-1]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        points: list[Any] = []
        if data is None:
            return points
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        points.extend(m.data.data_points)
        return points


def make_otel(**kwargs: Any) -> Otel:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    sink = telemetry.enable(tracer_provider=tracer_provider, meter_provider=meter_provider,
                            **kwargs)
    return Otel(spans, reader, tracer_provider, meter_provider, sink)


@pytest.fixture
def otel() -> Iterator[Otel]:
    before = get_decision_sink()
    made = make_otel()
    try:
        yield made
    finally:
        telemetry.disable()
        made.tracer_provider.shutdown()
        made.meter_provider.shutdown()
    assert get_decision_sink() is before


def record(kind: str, plugin: str | None = "test", **attributes: Any) -> None:
    get_decision_sink().record(Decision(kind, plugin, attributes))


# --- decisions to spans and events ---------------------------------------------------------------


@pytest.mark.unit
def test_decision_span_nests_decisions_and_spans(otel: Otel) -> None:
    with decision_span("failover", "failover", {"resilient_db.failover.mode": "strict-writer",
                                                "resilient_db.failover.trigger": "network"}
                       ) as outer:
        record("failover.plan", "failover", **{"resilient_db.failover.attempts": ("a", "b")})
        with decision_span("failover.attempt", "failover", {"server.address": "a"}) as inner:
            inner.set(**{n.ATTR_ATTEMPT_RESULT: "connected"})
        outer.set(**{n.ATTR_FAILOVER_OUTCOME: "FailoverSuccessError"})
    failover = otel.span(n.SPAN_FAILOVER)
    attempt = otel.span(n.SPAN_FAILOVER_ATTEMPT)
    assert attempt.parent is not None and attempt.parent.span_id == failover.context.span_id
    assert failover.parent is None
    assert [e.name for e in failover.events] == ["failover.plan"]
    assert failover.events[0].attributes == {"resilient_db.failover.attempts": ("a", "b")}
    assert failover.attributes is not None and attempt.attributes is not None
    assert failover.attributes[n.ATTR_FAILOVER_OUTCOME] == "FailoverSuccessError"
    assert SPAN_ID not in failover.attributes
    assert attempt.attributes[n.ATTR_ATTEMPT_RESULT] == "connected"
    times = (failover.start_time, attempt.start_time, attempt.end_time, failover.end_time)
    assert None not in times and list(times) == sorted(times)  # type: ignore[type-var]
    # The span is no longer current once finished.
    assert not trace.get_current_span().get_span_context().is_valid
    (count,) = otel.points(n.METRIC_FAILOVERS)
    assert count.value == 1 and count.attributes == {
        n.ATTR_FAILOVER_MODE: "strict-writer", n.ATTR_FAILOVER_TRIGGER: "network",
        n.ATTR_FAILOVER_OUTCOME: "FailoverSuccessError"}
    (duration,) = otel.points(n.METRIC_FAILOVER_DURATION)
    assert duration.count == 1


@pytest.mark.unit
def test_exception_in_a_decision_span_sets_error(otel: Otel) -> None:
    with pytest.raises(KeyError), decision_span("efm.probe", "efm", {"server.address": "h"}):
        raise KeyError("boom")
    span = otel.span("resilient_db.efm.probe")
    assert span.attributes is not None and span.attributes[n.ERROR_TYPE] == "KeyError"
    assert span.status.status_code is StatusCode.ERROR


@pytest.mark.unit
def test_unknown_decision_outside_a_span_is_a_zero_length_span_in_the_app_trace(
        otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("request") as app:
        record("bluegreen.phase", "bg", phase="CREATED", **{"server.port": 5432})
    span = otel.span("resilient_db.bluegreen.phase")
    assert span.start_time == span.end_time
    assert span.parent is not None and span.parent.span_id == app.get_span_context().span_id
    assert span.attributes == {"phase": "CREATED", "server.port": 5432,
                               n.ATTR_PLUGIN: "bg"}
    assert not otel.span("request").events  # the application's own span gets no events
    kinds = {p.attributes[n.ATTR_DECISION_KIND] for p in otel.points(n.METRIC_DECISIONS)}
    assert kinds == {"bluegreen.phase"}


@pytest.mark.unit
def test_submit_toplevel_starts_a_new_trace_linked_to_the_app_span() -> None:
    made = make_otel(submit_toplevel=True)
    try:
        tracer = made.tracer_provider.get_tracer("app")
        with tracer.start_as_current_span("request") as app, decision_span("failover", "f"):
            pass
        failover = made.span(n.SPAN_FAILOVER)
        assert failover.parent is None
        assert [link.context.span_id for link in failover.links] == [
            app.get_span_context().span_id]
    finally:
        telemetry.disable()


@pytest.mark.unit
def test_known_kinds_feed_their_metrics(otel: Otel) -> None:
    record("topology.host_up", "failover", **{"server.address": "h1", "server.port": 5432})
    record("efm.host_down", "efm", **{"server.address": "h1", "server.port": 5432,
                                      n.ATTR_DETECTION_TIME: 1.5})
    record("topology.refreshed", "failover", **{n.ATTR_TOPOLOGY_SOURCE: "search"})
    record("topology.changed", "failover", **{"resilient_db.topology.writer": "i2",
                                              "resilient_db.topology.writer_before": "i1"})
    record("topology.monitor_restarted", "failover")
    record("efm.monitor_restarted", "efm")
    record("watchdog.aborted", "deadline")
    record("reader.selected", None, **{n.ATTR_STRATEGY: "round_robin"})
    (state,) = otel.points(n.METRIC_HOST_STATE)
    assert state.value == 0 and state.attributes == {"server.address": "h1",
                                                     "server.port": 5432}
    (detection,) = otel.points(n.METRIC_DETECTION_TIME)
    assert detection.attributes == {n.ATTR_DETECTOR: "efm"} and detection.sum == 1.5
    (refresh,) = otel.points(n.METRIC_TOPOLOGY_REFRESHES)
    assert refresh.attributes == {n.ATTR_TOPOLOGY_SOURCE: "search"}
    (change,) = otel.points(n.METRIC_TOPOLOGY_CHANGES)
    assert change.attributes == {n.ATTR_WRITER_CHANGED: True}
    assert {p.attributes[n.ATTR_MONITOR] for p in otel.points(n.METRIC_MONITOR_RESTARTS)} == {
        "topology", "efm"}
    assert [p.value for p in otel.points(n.METRIC_WATCHDOG_ABORTS)] == [1]
    assert [p.attributes for p in otel.points(n.METRIC_READER_SELECTIONS)] == [
        {n.ATTR_STRATEGY: "round_robin"}]
    names = {s.name for s in otel.finished()}
    assert "resilient_db.topology.refreshed" not in names  # counted, not traced
    assert "resilient_db.efm.host_down" in names


@pytest.mark.unit
def test_attributes_are_cleaned_not_rejected(otel: Otel) -> None:
    record("x.y", None, none=None, mixed=(1, "a"), floats=(1, 2.5), obj=object(), ok=True)
    span = otel.span("resilient_db.x.y")
    assert span.attributes is not None
    assert "none" not in span.attributes
    assert span.attributes["mixed"] == ("1", "a")
    assert span.attributes["floats"] == (1.0, 2.5)
    assert str(span.attributes["obj"]).startswith("<object")


@pytest.mark.unit
def test_collecting_sink_installed_before_still_receives_decisions() -> None:
    collecting = CollectingSink()
    old = resilient_db.set_decision_sink(collecting)
    try:
        made = make_otel()
        record("a.b")
        with decision_span("c", None):
            pass
        assert collecting.kinds() == ["a.b", "c.started", "c.finished"]
        telemetry.disable()
        assert get_decision_sink().inner is collecting  # type: ignore[attr-defined]
        assert made.finished()
    finally:
        resilient_db.set_decision_sink(old)


# --- never raises --------------------------------------------------------------------------------


class _Broken:
    """A provider whose every method fails."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"broken {name}")
        return fail


@pytest.mark.unit
def test_a_broken_provider_never_breaks_a_decision(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_db.telemetry")
    try:
        sink = telemetry.TelemetrySink(tracer_provider=_Broken(), meter_provider=_Broken())
    except Exception:
        sink = None
    # Instrument creation fails with this provider: enable() must not raise either when a
    # connection asks for it; the sink built from a provider that fails later never raises.
    assert sink is None or sink.enabled
    good = make_otel()
    try:
        good.sink.tracer = _Broken()  # type: ignore[assignment]
        good.sink.failovers = _Broken()
        record("anything")
        with decision_span("failover", "failover"):
            record("inside")
    finally:
        telemetry.disable()
    assert "telemetry failed on decision" in caplog.text


@pytest.mark.unit
def test_disabled_telemetry_is_the_null_sink() -> None:
    assert isinstance(get_decision_sink(), NullSink)
    assert telemetry.active() is None
    assert get_decision_sink().enabled is False


# --- connections on real servers ------------------------------------------------------------------


@pytest.mark.real_server
def test_connect_spans_and_connection_count(otel: Otel, backend: Backend) -> None:
    conn = backend.connect(plugins="", enable_telemetry=True,
                           tracer_provider=otel.tracer_provider,
                           meter_provider=otel.meter_provider)
    assert conn.resilient.plugins == ("telemetry",)
    span = otel.span(n.SPAN_CONNECT)
    assert span.kind is SpanKind.CLIENT
    assert span.attributes is not None
    assert span.attributes[n.DB_SYSTEM_NAME] == ("postgresql" if backend.name == "pg"
                                                 else "mysql")
    assert span.attributes[n.SERVER_ADDRESS] == backend.kwargs["host"]
    assert span.attributes[n.SERVER_PORT] == int(backend.kwargs["port"])
    assert span.attributes[n.ATTR_CONNECT_INITIAL] is True
    (count,) = otel.points(n.METRIC_CONNECTION_COUNT)
    assert count.value == 1 and count.attributes[n.CONNECTION_STATE] == "used"
    pool = count.attributes[n.POOL_NAME]
    assert pool.startswith(f"{backend.kwargs['host']}:{backend.kwargs['port']}/")
    second = backend.connect(plugins="", enable_telemetry=True)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchone()
    cur.close()
    conn.close()
    conn.close()  # twice: counted once
    assert [p.value for p in otel.points(n.METRIC_CONNECTION_COUNT)] == [1]
    del second  # dropped without close: leaves the count too
    import gc

    gc.collect()
    assert [p.value for p in otel.points(n.METRIC_CONNECTION_COUNT)] == [0]
    (create,) = otel.points(n.METRIC_CONNECTION_CREATE_TIME)
    assert create.count == 2
    assert not otel.points(n.METRIC_OPERATION_DURATION)  # no query telemetry by default
    assert all(s.name in (n.SPAN_CONNECT, "resilient_db.dialect.detected")
               for s in otel.finished())


@pytest.mark.real_server
def test_failed_connect_span_has_error_type(otel: Otel, backend: Backend) -> None:
    with pytest.raises(Exception):  # noqa: B017 - the driver's own (Operational/Interface)
        backend.connect(plugins="", enable_telemetry=True, port=1, connect_timeout=2)
    span = otel.span(n.SPAN_CONNECT)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes[n.ERROR_TYPE]
    (create,) = otel.points(n.METRIC_CONNECTION_CREATE_TIME)
    assert n.ERROR_TYPE in create.attributes
    assert not otel.points(n.METRIC_CONNECTION_COUNT)


@pytest.mark.real_server
def test_query_spans_follow_the_conventions(otel: Otel, backend: Backend) -> None:
    table = backend.table()
    conn = backend.connect(plugins="", enable_telemetry=True, telemetry_query_spans=True,
                           autocommit=True)
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {table} VALUES (1, 'secret')")
    cur.execute(f"SELECT v FROM {table} WHERE id = 1")
    assert cur.fetchone() == ("secret",)
    with pytest.raises(Exception):  # noqa: B017 - either driver's syntax error
        cur.execute("SELEC nonsense")
    conn.close()
    insert = otel.span(f"INSERT {table}")
    assert insert.kind is SpanKind.CLIENT and insert.attributes is not None
    assert insert.attributes[n.DB_QUERY_TEXT] == f"INSERT INTO {table} VALUES (?, ?)"
    assert insert.attributes[n.DB_OPERATION_NAME] == "INSERT"
    assert insert.attributes[n.DB_COLLECTION_NAME] == table
    select = otel.span(f"SELECT {table}")
    assert select.attributes is not None
    assert "secret" not in str(select.attributes[n.DB_QUERY_TEXT])
    bad = otel.span("SELEC " + str(backend.kwargs.get("dbname") or
                                   backend.kwargs.get("database")))
    assert bad.status.status_code is StatusCode.ERROR
    durations = otel.points(n.METRIC_OPERATION_DURATION)
    assert sum(p.count for p in durations) == 3
    assert any(n.ERROR_TYPE in p.attributes for p in durations)
    assert all(n.DB_QUERY_TEXT not in p.attributes for p in durations)


# --- properties ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_provider_properties_are_checked(pg_backend: Backend) -> None:
    with pytest.raises(resilient_db.ConfigurationError, match="tracer_provider"):
        pg_backend.connect(enable_telemetry=True, tracer_provider="nope")
    with pytest.raises(resilient_db.ConfigurationError, match="telemetry_traces_backend"):
        pg_backend.connect(enable_telemetry=True, telemetry_traces_backend="jaeger")


@pytest.mark.real_server
def test_aws_backend_names_and_none(pg_backend: Backend) -> None:
    conn = pg_backend.connect(plugins="", enable_telemetry="true",
                              telemetry_traces_backend="NONE", telemetry_metrics_backend="OTLP")
    try:
        sink = telemetry.active()
        assert sink is not None and sink.tracer is None and sink.meter is not None
    finally:
        conn.close()
        telemetry.disable()


@pytest.mark.real_server
def test_telemetry_off_adds_no_plugin(pg_backend: Backend) -> None:
    conn = pg_backend.connect(plugins="")
    assert conn.resilient.plugins == ()
    conn.close()
    assert telemetry.active() is None


# --- query text and suppression ----------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("sql", "text", "operation", "collection"), [
    ("SELECT * FROM users WHERE name = 'bob' AND id = 42", "SELECT * FROM users WHERE name = ? "
     "AND id = ?", "SELECT", "users"),
    ("insert into s.t (a) values ('it''s', -1.5e3)", "insert into s.t (a) values (?, ?)",
     "INSERT", "s.t"),
    ("  UPDATE  t1\n SET x = 2", "UPDATE t1 SET x = ?", "UPDATE", "t1"),
    ("DELETE FROM \"Odd\" WHERE c2 = 3", "DELETE FROM \"Odd\" WHERE c2 = ?", "DELETE",
     '"Odd"'),
    ("BEGIN", "BEGIN", "BEGIN", None),
    ("SELECT $$x$$", "SELECT ?", "SELECT", None),
])
def test_sanitize_and_describe(sql: str, text: str, operation: str,
                               collection: str | None) -> None:
    assert _sql.sanitize(sql) == text
    assert _sql.describe(sql) == (operation, collection)
    assert _sql.analyse(sql) == _sql.analyse(sql) == (operation, collection, text)
    assert len(_sql._cache) <= _sql.CACHE_SIZE


@pytest.mark.unit
def test_query_text_of_composed_and_bytes() -> None:
    from psycopg import sql

    assert _sql.query_text(b"SELECT 1") == "SELECT 1"
    assert _sql.query_text(sql.SQL("SELECT {}").format(sql.Literal(5))) == "SELECT 5"
    assert _sql.query_text(None) is None


@pytest.mark.unit
def test_suppression_is_scoped_and_per_thread() -> None:
    assert not is_suppressed()
    with suppress_instrumentation():
        assert is_suppressed()
        assert otel_context.get_value("suppress_instrumentation") is True
        seen: list[bool] = []
        thread = threading.Thread(target=lambda: seen.append(is_suppressed()))
        thread.start()
        thread.join()
        assert seen == [False]
    assert not is_suppressed()


# --- OTLP over gRPC (the set-up helper's other protocol) -------------------------------------


@pytest.mark.unit
def test_setup_exports_decision_spans_over_otlp_grpc() -> None:
    from concurrent import futures

    import grpc  # type: ignore[import-untyped]
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[Any] = []

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    received.extend(scope_spans.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        Traces(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        handle = telemetry.setup(otlp_endpoint=f"127.0.0.1:{port}", otlp_protocol="grpc",
                                 set_global=False)
        try:
            with decision_span("failover", "failover", {n.ATTR_FAILOVER_MODE: "strict-reader"}):
                record("reader.selected", None, **{n.ATTR_STRATEGY: "random"})
            handle.flush()
        finally:
            handle.shutdown()
    finally:
        server.stop(None)
    (span,) = [s for s in received if s.name == n.SPAN_FAILOVER]
    assert [e.name for e in span.events] == ["reader.selected"]
    assert {kv.key: kv.value.string_value for kv in span.attributes}[
        n.ATTR_FAILOVER_MODE] == "strict-reader"


@pytest.mark.unit
def test_setup_rejects_an_unknown_protocol() -> None:
    with pytest.raises(ValueError, match="otlp_protocol"):
        telemetry.setup(otlp_endpoint="x", otlp_protocol="thrift", set_global=False)
    assert telemetry.active() is None
