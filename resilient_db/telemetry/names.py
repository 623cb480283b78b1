"""Every span, event, metric and attribute name resilient_db's telemetry emits, defined once.

``docs/telemetry.md`` lists the same names; ``tests/test_telemetry_names.py`` fails when the
names emitted during a simulated failover, this module and the document disagree.

Attribute names follow the OpenTelemetry semantic conventions where one exists
(``db.system.name``, ``server.address``, ``server.port``, ``db.namespace``, ``error.type``,
``db.client.connection.pool.name``, ``db.client.connection.state``); the others are
namespaced ``resilient_db.*``.
"""

from __future__ import annotations

from typing import Final

#: Instrumentation scope of every tracer and meter.
SCOPE: Final = "resilient_db"

# --- spans ---------------------------------------------------------------------------------------
#: A decision span (``<kind>.started`` / ``<kind>.finished``) becomes the span
#: ``SPAN_PREFIX + kind``; a decision outside any span becomes a zero-length span of that name.
SPAN_PREFIX: Final = "resilient_db."
SPAN_FAILOVER: Final = "resilient_db.failover"
SPAN_FAILOVER_ATTEMPT: Final = "resilient_db.failover.attempt"
SPAN_TOPOLOGY_SEARCH: Final = "resilient_db.topology.search"
#: One physical connection attempt (initial, or one of failover's).
SPAN_CONNECT: Final = "resilient_db.connect"

# --- decision kinds with a specific meaning --------------------------------------------------
KIND_FAILOVER: Final = "failover"
KIND_FAILOVER_ATTEMPT: Final = "failover.attempt"
KIND_FAILOVER_OUTCOME: Final = "failover.outcome"
KIND_TOPOLOGY_SEARCH: Final = "topology.search"
KIND_TOPOLOGY_CHANGED: Final = "topology.changed"
KIND_TOPOLOGY_REFRESHED: Final = "topology.refreshed"
KIND_READER_SELECTED: Final = "reader.selected"
KIND_STATEMENT_TIMED: Final = "statement.timed"
#: Host state decisions: ``<detector>.host_down`` / ``<detector>.host_up`` (``topology``,
#: ``efm``, any later detector).
HOST_DOWN_SUFFIX: Final = ".host_down"
HOST_UP_SUFFIX: Final = ".host_up"
#: ``<monitor>.monitor_restarted``: a supervised monitor thread crashed and was restarted.
MONITOR_RESTARTED_SUFFIX: Final = ".monitor_restarted"
#: A statement deadline fired (resilient_db._deadline).
KIND_DEADLINE_EXPIRED: Final = "statement.deadline_expired"
#: ``watchdog.aborted`` (and any ``watchdog.*abort*``): the deadline watchdog aborted a call.
WATCHDOG_PREFIX: Final = "watchdog."
#: One response-time measurement of one instance (``fastest_response_strategy``).
KIND_RESPONSE_MEASURED: Final = "response_time.measured"
#: Decisions counted but never traced (too frequent: one per statement, per refresh or per
#: measurement).
UNTRACED_KINDS: Final = frozenset({KIND_STATEMENT_TIMED, KIND_TOPOLOGY_REFRESHED,
                                   KIND_RESPONSE_MEASURED})

# --- metrics -------------------------------------------------------------------------------------
METRIC_OPERATION_DURATION: Final = "db.client.operation.duration"
METRIC_CONNECTION_COUNT: Final = "db.client.connection.count"
METRIC_CONNECTION_CREATE_TIME: Final = "db.client.connection.create_time"
METRIC_FAILOVERS: Final = "resilient_db.failovers"
METRIC_FAILOVER_DURATION: Final = "resilient_db.failover.duration"
METRIC_HOST_STATE: Final = "resilient_db.host.state"
METRIC_DETECTION_TIME: Final = "resilient_db.detection.duration"
METRIC_TOPOLOGY_REFRESHES: Final = "resilient_db.topology.refreshes"
METRIC_TOPOLOGY_CHANGES: Final = "resilient_db.topology.changes"
METRIC_MONITOR_RESTARTS: Final = "resilient_db.monitor.restarts"
METRIC_WATCHDOG_ABORTS: Final = "resilient_db.watchdog.aborts"
METRIC_READER_SELECTIONS: Final = "resilient_db.reader.selections"
METRIC_DECISIONS: Final = "resilient_db.decisions"

#: Every metric: name -> (instrument, unit).
METRICS: Final = {
    METRIC_OPERATION_DURATION: ("histogram", "s"),
    METRIC_CONNECTION_COUNT: ("updowncounter", "{connection}"),
    METRIC_CONNECTION_CREATE_TIME: ("histogram", "s"),
    METRIC_FAILOVERS: ("counter", "{failover}"),
    METRIC_FAILOVER_DURATION: ("histogram", "s"),
    METRIC_HOST_STATE: ("gauge", "{state}"),
    METRIC_DETECTION_TIME: ("histogram", "s"),
    METRIC_TOPOLOGY_REFRESHES: ("counter", "{refresh}"),
    METRIC_TOPOLOGY_CHANGES: ("counter", "{change}"),
    METRIC_MONITOR_RESTARTS: ("counter", "{restart}"),
    METRIC_WATCHDOG_ABORTS: ("counter", "{abort}"),
    METRIC_READER_SELECTIONS: ("counter", "{selection}"),
    METRIC_DECISIONS: ("counter", "{decision}"),
}

#: Bucket boundaries (seconds) of every duration histogram: from 1 ms to a 60 s failover.
SECONDS_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                          5.0, 10.0, 30.0, 60.0)


def prometheus_names(metric: str) -> tuple[str, ...]:
    """The series names a metric has once exported to Prometheus (dots become underscores,
    the unit ``s`` adds ``_seconds``, counters end in ``_total``, histograms are
    ``_bucket``/``_count``/``_sum``)."""
    instrument, unit = METRICS[metric]
    base = metric.replace(".", "_")
    if unit == "s":
        base += "_seconds"
    if instrument == "counter":
        return (base + "_total",)
    if instrument == "histogram":
        return (base + "_bucket", base + "_count", base + "_sum")
    return (base,)


# --- attributes ----------------------------------------------------------------------------------
DB_SYSTEM_NAME: Final = "db.system.name"
DB_NAMESPACE: Final = "db.namespace"
DB_OPERATION_NAME: Final = "db.operation.name"
DB_COLLECTION_NAME: Final = "db.collection.name"
DB_QUERY_TEXT: Final = "db.query.text"
DB_RESPONSE_STATUS_CODE: Final = "db.response.status_code"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
ERROR_TYPE: Final = "error.type"
POOL_NAME: Final = "db.client.connection.pool.name"
CONNECTION_STATE: Final = "db.client.connection.state"
#: The only state a wrapper without a pool reports: the application holds the connection.
STATE_USED: Final = "used"

ATTR_PLUGIN: Final = "resilient_db.plugin"
ATTR_DECISION_KIND: Final = "resilient_db.decision.kind"
ATTR_CONNECT_INITIAL: Final = "resilient_db.connect.initial"
ATTR_FAILOVER_MODE: Final = "resilient_db.failover.mode"
ATTR_FAILOVER_TRIGGER: Final = "resilient_db.failover.trigger"
ATTR_FAILOVER_OUTCOME: Final = "resilient_db.failover.outcome"
ATTR_FAILOVER_ATTEMPTS: Final = "resilient_db.failover.attempt_count"
ATTR_ATTEMPT_RESULT: Final = "resilient_db.failover.attempt.result"
ATTR_INSTANCE_ID: Final = "resilient_db.instance.id"
ATTR_DETECTOR: Final = "resilient_db.detector"
ATTR_DETECTION_TIME: Final = "resilient_db.detection.duration"
ATTR_TOPOLOGY_SOURCE: Final = "resilient_db.topology.source"
ATTR_TOPOLOGY_EPOCH: Final = "resilient_db.topology.epoch"
ATTR_TOPOLOGY_WRITER: Final = "resilient_db.topology.writer"
ATTR_TOPOLOGY_READERS: Final = "resilient_db.topology.readers"
ATTR_WRITER_CHANGED: Final = "resilient_db.topology.writer_changed"
ATTR_MONITOR: Final = "resilient_db.monitor"
ATTR_STRATEGY: Final = "resilient_db.selection.strategy"

#: ``db.system.name`` per driver code.
DB_SYSTEMS: Final = {"psycopg": "postgresql", "mysql-connector": "mysql"}
