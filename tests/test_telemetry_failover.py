"""Telemetry of a real failover on a simulated Aurora PostgreSQL cluster, checked with real
parts: the names emitted against docs/telemetry.md (SDK in-memory exporters), the span tree
as exported over OTLP/HTTP to a receiver that decodes the protobuf, and the dashboards'
PromQL against a real Prometheus server scraping resilient_db's Prometheus endpoint."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import resilient_db
from resilient_db import telemetry
from resilient_db.telemetry import names as n
from simulator.cluster import Cluster, Timeline

pytestmark = pytest.mark.real_server

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "telemetry.md"
DASHBOARDS = ROOT / "dashboards" / "grafana" / "dashboards"
TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)
SETTLE = 60.0


def wait_until(what: str, check: Callable[[], bool], timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster.start("aurora-pg", readers=2, timeline=TIMELINE) as started:
        yield started
    resilient_db.shutdown()


@pytest.fixture
def settled(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with every instance back in a role (the previous failover finished), and
    no topology monitor left from a previous test (each test sees its host states anew)."""
    wait_until("every instance back in a role",
               lambda: all(i.role != "stopped" for i in cluster.instances.values()))
    # ... and every reader following the writer again (a rejoin or a re-point may still run).
    wait_until("every reader following the writer", cluster.settled)
    resilient_db.shutdown()
    yield cluster
    telemetry.disable()


def connect(cluster: Cluster, **extra: Any) -> resilient_db.ConnectionProxy:
    return resilient_db.connect(psycopg.Connection.connect, plugins="failover",
                                enable_telemetry=True, autocommit=True, connect_timeout=5,
                                **cluster.connect_kwargs(), **extra)


def select(conn: resilient_db.ConnectionProxy, sql: str = "SELECT 1") -> None:
    cur = conn.cursor()
    cur.execute(sql)
    cur.fetchall()
    cur.close()


def fail_over(cluster: Cluster, conn: resilient_db.ConnectionProxy) -> str:
    """Crash the writer, run a statement that fails over; returns the promoted instance."""
    events = cluster.failover()
    promoted = next(str(e.instance) for e in events if e.name == "promoted")
    with pytest.raises(resilient_db.FailoverSuccessError):
        select(conn, "SELECT 'after', 2")
    select(conn)
    return promoted


# --- the documented names ---------------------------------------------------------------------


def doc_tables() -> dict[str, set[str]]:
    """First-column names of each table of docs/telemetry.md, by section heading."""
    tables: dict[str, set[str]] = {}
    section = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("| `"):
            first = line.split("|")[1]
            tables.setdefault(section, set()).update(re.findall(r"`([^`]+)`", first))
    return tables


def doc_tokens() -> set[str]:
    return set(re.findall(r"`([^`\s]+)`", DOC.read_text()))


@pytest.mark.unit
def test_doc_lists_exactly_the_metrics_of_the_names_module() -> None:
    assert doc_tables()["Metrics"] == set(n.METRICS)


@pytest.mark.unit
def test_every_decision_kind_in_the_code_is_documented() -> None:
    pattern = re.compile(r"""(?:Decision\(|decide\(|decision_span\()\s*["']([a-z_.]+)["']""")
    kinds: set[str] = set()
    for path in (ROOT / "resilient_db").rglob("*.py"):
        kinds.update(pattern.findall(path.read_text()))
    assert len(kinds) > 10
    documented = doc_tables()["Decisions (span events)"]
    spans = {k for k in documented if k.endswith(".started")}
    plain = {k for k in kinds if f"{k}.started" not in spans}
    assert plain <= documented, f"undocumented decision kinds: {sorted(plain - documented)}"


def test_names_emitted_during_a_failover_match_the_doc(settled: Cluster) -> None:
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    handle = telemetry.setup(span_exporters=[spans], metric_readers=[reader],
                             set_global=False)
    try:
        conn = connect(settled, telemetry_query_spans=True)
        # On the writer too, but failing over to a reader: a reader is selected.
        to_reader = connect(settled, failover_mode="reader_or_writer")
        tracer = handle.tracer_provider.get_tracer("app")
        select(conn)
        select(to_reader)
        with tracer.start_as_current_span("app.request"):
            fail_over(settled, conn)
        with pytest.raises(resilient_db.FailoverSuccessError):
            select(to_reader)
        conn.close()
        to_reader.close()
        wait_until("the new writer's topology read", lambda: any(
            s.name == n.SPAN_TOPOLOGY_SEARCH for s in spans.get_finished_spans()))
        handle.flush()
        finished = list(spans.get_finished_spans())
        data = reader.get_metrics_data()
    finally:
        handle.shutdown()

    tables = doc_tables()
    documented_spans = tables["Spans"]
    kinds = tables["Decisions (span events)"]
    tokens = doc_tokens()
    emitted_spans: set[str] = set()
    emitted_events: set[str] = set()
    attributes: set[str] = set()
    for span in finished:
        if span.instrumentation_scope is None or span.instrumentation_scope.name != n.SCOPE:
            continue
        span_attributes = dict(span.attributes or {})
        attributes.update(span_attributes)
        if n.DB_OPERATION_NAME in span_attributes and not span.name.startswith("resilient_db"):
            continue  # a query span, named from the statement
        emitted_spans.add(span.name)
        for event in span.events:
            emitted_events.add(event.name)
            attributes.update(event.attributes or {})
    metrics: set[str] = set()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                metrics.add(metric.name)
                for point in metric.data.data_points:
                    attributes.update(point.attributes or {})

    undocumented_spans = {s for s in emitted_spans if s not in documented_spans
                          and s.removeprefix(n.SPAN_PREFIX) not in kinds}
    assert not undocumented_spans, f"spans missing from docs/telemetry.md: {undocumented_spans}"
    assert emitted_events <= kinds, f"events missing: {emitted_events - kinds}"
    assert metrics <= tables["Metrics"], f"metrics missing: {metrics - tables['Metrics']}"
    assert attributes <= tokens, f"attributes missing: {sorted(attributes - tokens)}"
    # What a failover must produce.
    assert {n.SPAN_FAILOVER, n.SPAN_FAILOVER_ATTEMPT, n.SPAN_CONNECT,
            n.SPAN_TOPOLOGY_SEARCH} <= emitted_spans
    assert {"failover.plan", "failover.outcome", "topology.changed",
            "reader.selected"} <= emitted_events
    assert {n.METRIC_FAILOVERS, n.METRIC_FAILOVER_DURATION, n.METRIC_HOST_STATE,
            n.METRIC_DETECTION_TIME, n.METRIC_TOPOLOGY_REFRESHES, n.METRIC_TOPOLOGY_CHANGES,
            n.METRIC_CONNECTION_COUNT, n.METRIC_CONNECTION_CREATE_TIME,
            n.METRIC_OPERATION_DURATION, n.METRIC_DECISIONS,
            n.METRIC_READER_SELECTIONS} <= metrics
    # Internal statements are not traced as queries: only the application's statements are.
    queries = [s for s in finished if n.DB_QUERY_TEXT in dict(s.attributes or {})]
    assert {dict(s.attributes or {})[n.DB_QUERY_TEXT] for s in queries} <= {
        "SELECT ?", "SELECT ?, ?"}


# --- OTLP/HTTP to a protobuf-decoding receiver ---------------------------------------------------


class Receiver:
    """An OTLP/HTTP receiver: decodes every export request with opentelemetry-proto."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[Any] = []
        self.metric_requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                assert self.headers.get("Content-Type") == "application/x-protobuf"
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    with receiver.lock:
                        for resource_spans in request.resource_spans:
                            receiver.resources.append(resource_spans.resource)
                            for scope_spans in resource_spans.scope_spans:
                                receiver.spans.extend(scope_spans.spans)
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    metrics_request = metrics_service_pb2.ExportMetricsServiceRequest()
                    metrics_request.ParseFromString(body)
                    with receiver.lock:
                        receiver.metric_requests += 1
                    reply = (metrics_service_pb2.ExportMetricsServiceResponse()
                             .SerializeToString())
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def named(self, name: str) -> list[Any]:
        with self.lock:
            return [s for s in self.spans if s.name == name]


def attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        out[kv.key] = getattr(value, kind) if kind != "array_value" else tuple(
            getattr(v, v.WhichOneof("value")) for v in value.array_value.values)
    return out


def test_failover_span_tree_over_otlp_http(settled: Cluster) -> None:
    receiver = Receiver()
    handle = telemetry.setup(service_name="telemetry-test",
                             otlp_endpoint=f"http://127.0.0.1:{receiver.port}",
                             otlp_protocol="http/protobuf", set_global=False)
    try:
        conn = connect(settled)
        select(conn)
        old = settled.writer
        tracer = handle.tracer_provider.get_tracer("app")
        with tracer.start_as_current_span("app.request"):
            promoted = fail_over(settled, conn)
        conn.close()
        new = settled.instances[promoted]
        def search_exported() -> bool:
            handle.flush()
            return any(str(attrs(x).get(n.ATTR_TOPOLOGY_WRITER)).startswith(new.endpoint)
                       for x in receiver.named(n.SPAN_TOPOLOGY_SEARCH))

        wait_until("the span of the search that found the promoted writer", search_exported)
        handle.flush()
        wait_until("metrics exported", lambda: receiver.metric_requests > 0)
    finally:
        handle.shutdown()
        receiver.close()

    (app,) = receiver.named("app.request")
    (failover,) = receiver.named(n.SPAN_FAILOVER)
    (attempt,) = receiver.named(n.SPAN_FAILOVER_ATTEMPT)
    connects = receiver.named(n.SPAN_CONNECT)
    (failover_connect,) = [c for c in connects if c.parent_span_id == attempt.span_id]
    # Parents: app.request > failover > attempt > connect, one trace.
    assert failover.parent_span_id == app.span_id
    assert attempt.parent_span_id == failover.span_id
    assert {failover.trace_id, attempt.trace_id, failover_connect.trace_id} == {app.trace_id}
    # Timing order.
    assert (app.start_time_unix_nano <= failover.start_time_unix_nano
            <= attempt.start_time_unix_nano <= failover_connect.start_time_unix_nano
            <= failover_connect.end_time_unix_nano <= attempt.end_time_unix_nano
            <= failover.end_time_unix_nano <= app.end_time_unix_nano)
    # Attributes.
    f = attrs(failover)
    assert f[n.ATTR_FAILOVER_TRIGGER] == "network"
    assert f[n.ATTR_FAILOVER_MODE] == "strict-writer"
    assert f[n.ATTR_FAILOVER_OUTCOME] == "FailoverSuccessError"
    assert f[n.SERVER_ADDRESS] == new.endpoint and f[n.ATTR_INSTANCE_ID] == promoted
    assert f[n.ERROR_TYPE]  # the error that triggered it
    assert [e.name for e in failover.events][-1] == "failover.outcome"
    assert "failover.plan" in [e.name for e in failover.events]
    a = attrs(attempt)
    assert a[n.ATTR_ATTEMPT_RESULT] == "connected" and a[n.ATTR_INSTANCE_ID] == promoted
    c = attrs(failover_connect)
    assert c[n.DB_SYSTEM_NAME] == "postgresql" and c[n.ATTR_CONNECT_INITIAL] is False
    assert c[n.SERVER_ADDRESS] == new.endpoint and c[n.DB_NAMESPACE]
    # The monitor's search: its own trace, found the promoted writer and recorded the change.
    # (On a loaded machine a later refresh can time out and start another search, which
    # finds the same writer and no change: the first search to find it is the one to check.)
    searches = sorted(receiver.named(n.SPAN_TOPOLOGY_SEARCH),
                      key=lambda x: x.start_time_unix_nano)
    seen = [(attrs(x).get(n.ATTR_TOPOLOGY_WRITER), [e.name for e in x.events])
            for x in searches]
    search = next((x for x in searches
                   if str(attrs(x).get(n.ATTR_TOPOLOGY_WRITER)).startswith(new.endpoint)), None)
    assert search is not None, seen
    assert "topology.changed" in [e.name for e in search.events], seen
    downs = [attrs(x) for x in receiver.named("resilient_db.topology.host_down")]
    assert any(d[n.SERVER_ADDRESS] == old.endpoint for d in downs)
    resource = {kv.key: kv.value.string_value for kv in receiver.resources[0].attributes}
    assert resource["service.name"] == "telemetry-test"


# --- Prometheus -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """A real Prometheus server (Debian package) with a private data directory."""

    def __init__(self, workdir: Path, target_port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("the prometheus binary is missing: apt-get install prometheus "
                        "(scripts/_bootstrap.sh installs it)")
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: resilient_db\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             f"--web.console.templates={workdir}", f"--web.console.libraries={workdir}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until("Prometheus ready", self.ready, timeout=60)

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}")
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in self.query(expr)]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every panel target."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["expr"]))
    return found


def promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables as a one-off query uses them."""
    return expr.replace("$__rate_interval", "30s").replace("$__range", "5m")


def test_dashboards_against_a_real_prometheus(settled: Cluster, tmp_path: Path) -> None:
    handle = telemetry.setup(prometheus_port=0, set_global=False)
    assert handle.prometheus_port
    prometheus = Prometheus(tmp_path, handle.prometheus_port)
    try:
        conn = connect(settled, telemetry_query_spans=True)
        old = settled.writer
        writer_state = f'resilient_db_host_state{{server_address="{old.endpoint}"}}'

        def busy(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                select(conn)
                time.sleep(0.01)

        def scraped(check: Callable[[], bool], what: str) -> None:
            def step() -> bool:
                select(conn)
                return check()
            wait_until(what, step)

        busy(2.0)
        scraped(lambda: prometheus.values(writer_state) == [1.0],
                "the writer's host state scraped as up")
        before = sum(prometheus.values("sum(resilient_db_failovers_total)"))
        promoted = fail_over(settled, conn)
        busy(2.0)
        scraped(lambda: sum(prometheus.values("sum(resilient_db_failovers_total)"))
                >= before + 1, "the failover counter scraped")
        scraped(lambda: prometheus.values(writer_state) == [0.0],
                "the old writer's host state scraped as down")
        new_state = (f'resilient_db_host_state{{server_address='
                     f'"{settled.instances[promoted].endpoint}"}}')
        scraped(lambda: prometheus.values(new_state) == [1.0], "the new writer scraped as up")
        assert prometheus.values(f"changes({writer_state}[5m])")[0] >= 1
        busy(3.0)
        empty = []
        for board, title, expr in dashboard_exprs():
            values = prometheus.values(promql(expr))
            if not any(not math.isnan(v) for v in values):
                empty.append(f"{board} / {title}: {expr} -> {values}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        conn.close()
    finally:
        prometheus.stop()
        with contextlib.suppress(Exception):
            handle.shutdown()
