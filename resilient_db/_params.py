"""Every property of resilient_db and its built-in plugins, declared once.

The declarations live in one module (not in each plugin) so that a property of a built-in
plugin is accepted whether or not that plugin is enabled (CONVENTIONS.md) without the core
importing every plugin, and so that ``docs/parameters.md`` is generated from one place.
Group order here is the order of the generated docs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._properties import (
    REGISTRY,
    Property,
    _number,
    _register,
    boolean,
    choice,
    duration,
    integer,
    parse_bool,
    text,
)

DIALECT_CODES = (
    "aurora-pg",
    "aurora-mysql",
    "rds-pg",
    "rds-mysql",
    "multi-az-pg",
    "multi-az-mysql",
    "pg",
    "mysql",
)
DRIVER_CODES = ("psycopg", "mysql-connector")
#: The AWS Advanced Python Wrapper's ``wrapper_driver_dialect`` values (its
#: ``DriverDialectCodes``) that name one of ours. Its third value, ``generic``, has no
#: equivalent: resilient_db needs to know the driver.
AWS_DRIVER_CODES = {"mysql-connector-python": "mysql-connector"}


def _host_pattern_problem(value: str) -> str | None:
    if "?" not in value:
        return (
            "a host name with '?' where the instance id goes, e.g. "
            "'?.abc123.us-east-1.rds.amazonaws.com'"
        )
    host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    if host.count("?") != 1 or any(ch.isspace() for ch in host) or "/" in host:
        return "a host name containing exactly one '?' and no spaces or slashes"
    if value.count(":") == 1 and not value.rsplit(":", 1)[1].isdigit():
        return "'host-pattern' or 'host-pattern:port' with a numeric port"
    return None


# --- core ------------------------------------------------------------------------------------

AUTO_SORT_PLUGINS = boolean(
    "auto_sort_wrapper_plugin_order",
    True,
    "Arrange the selected plugins in the documented canonical order. When false, the order "
    "given in `plugins` is kept.",
    aws_name=True,
)
WRAPPER_DIALECT = choice(
    "wrapper_dialect",
    None,
    DIALECT_CODES,
    "Force the database dialect instead of detecting it from the server. The server is still "
    "checked once: a forced dialect it does not match raises `DialectMismatchError` listing "
    "what was checked. The AWS values `global-aurora-pg` and `global-aurora-mysql` are taken "
    "as `aurora-pg` and `aurora-mysql` (the Global Database topology is read by `gdb_failover`,"
    " `gdb_rw`, or `failover` with `global_cluster_instance_host_patterns`).",
    aliases={"global-aurora-pg": "aurora-pg", "global-aurora-mysql": "aurora-mysql"},
    aws_name=True,
)
WRAPPER_DRIVER_DIALECT = choice(
    "wrapper_driver_dialect",
    None,
    DRIVER_CODES,
    "Force the driver dialect instead of recognising it from `target` (for a wrapped or "
    "renamed connect callable). The AWS wrapper's value `mysql-connector-python` is accepted "
    "for `mysql-connector`.",
    aliases=AWS_DRIVER_CODES,
    aws_name=True,
)
CLUSTER_INSTANCE_HOST_PATTERN = text(
    "cluster_instance_host_pattern",
    None,
    "How to build an instance's address from its id: `?` is replaced by the instance id, an "
    "optional `:port` follows. Needed when connecting by IP address or custom domain; derived "
    "from RDS endpoint names otherwise.",
    validate=_host_pattern_problem,
    aws_name=True,
)
CLUSTER_ID = text(
    "cluster_id",
    None,
    "Identifier of the cluster, shared by every connection to it (topology cache key). "
    "Derived from the server itself when not set.",
    validate=lambda v: None if v.strip() else "a non-empty string",
    aws_name=True,
)
CONNECT_TIMEOUT = duration(
    "connect_timeout",
    None,
    "Bound on establishing one physical connection. Read by resilient_db and also forwarded "
    "to the driver unchanged (libpq `connect_timeout`, mysql-connector `connect_timeout`). "
    "Unset: the driver's own default.",
    unit="s",
    zero="no limit (libpq's meaning; given to mysql-connector as None)",
    minimum=0.5,
    driver_param=True,
    aws_name=True,
)

def _schema_problem(value: str) -> str | None:
    if not value.replace("_", "").isalnum() or value[0].isdigit():
        return "a schema name (letters, digits and underscores)"
    return None


AURORA_MYSQL_LOOKALIKE_SCHEMA = text(
    "aurora_mysql_lookalike_schema",
    None,
    "Simulator only. MariaDB cannot define `@@aurora_server_id` or new `information_schema` "
    "tables, so the simulator's Aurora MySQL look-alike exposes the same columns in this "
    "schema: `<schema>.replica_host_status` (topology) and `<schema>.aurora_server_id()` "
    "(instance id; readers are told by `@@read_only`). Setting it makes the connection use "
    "the aurora-mysql dialect on that source (verified at connect). Never set it against a "
    "real Aurora cluster.",
    validate=_schema_problem,
)

# --- reader selection weights (resilient_db/selection.py; failover and initial_connection) ----


def _to_weight_pairs(prop: Property[tuple[tuple[str, int], ...]], value: object,
                     ) -> tuple[tuple[str, int], ...]:
    """``'<host>:<weight>,...'`` (or a mapping of host to weight) as ``((host, weight), ...)``;
    weights are whole numbers >= 1, as in the AWS wrapper."""
    expected = ("comma-separated '<host>:<weight>' pairs with a host name or instance id and "
                "a whole-number weight >= 1, e.g. 'instance-1:3,instance-2:1'")
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, str):
        items = []
        for part in value.split(","):
            if not part.strip():
                continue
            host, sep, weight = part.strip().rpartition(":")
            if not sep:
                raise prop.fail(value, f"{expected} ({part.strip()!r} has no ':')")
            items.append((host.strip(), weight.strip()))
    else:
        raise prop.fail(value, expected)
    pairs: dict[str, int] = {}
    for host, weight in items:
        if not host or any(ch.isspace() or ch in "/?#:" for ch in host):
            raise prop.fail(value, f"{expected} (bad host {host!r})")
        try:
            number = int(str(weight))
        except ValueError:
            number = 0
        if number < 1 or isinstance(weight, bool):
            raise prop.fail(value, f"{expected} (bad weight {weight!r} for {host!r})")
        if host.lower() in pairs:
            raise prop.fail(value, f"{expected} ({host!r} is listed twice)")
        pairs[host.lower()] = number
    return tuple(pairs.items())


def _weight_pairs(name: str, description: str) -> Property[tuple[tuple[str, int], ...]]:
    return _register(Property(name, "host:weight list", (), description, _to_weight_pairs,
                              aws_name=True))


ROUND_ROBIN_HOST_WEIGHT_PAIRS = _weight_pairs(
    "round_robin_host_weight_pairs",
    "Weights of the `round_robin` reader selection strategy: `<host>:<weight>` pairs "
    "(comma-separated; a host by host name or instance id; whole-number weights >= 1). A "
    "host of weight w gets w consecutive turns.",
)
ROUND_ROBIN_DEFAULT_WEIGHT = integer(
    "round_robin_default_weight",
    1,
    "`round_robin` weight of every host `round_robin_host_weight_pairs` does not name.",
    minimum=1,
    aws_name=True,
)
WEIGHTED_RANDOM_HOST_WEIGHT_PAIRS = _weight_pairs(
    "weighted_random_host_weight_pairs",
    "Weights of the `weighted_random` strategy (chosen at random in proportion to weight) and "
    "of `highest_weight` (the heaviest host; AWS's `highest_weight` has no weight property "
    "of its own): `<host>:<weight>` pairs as for `round_robin_host_weight_pairs`. Both "
    "strategies refuse to run without it, since equal weights would make them random.",
)
WEIGHTED_RANDOM_DEFAULT_WEIGHT = integer(
    "weighted_random_default_weight",
    1,
    "`weighted_random`/`highest_weight` weight of every host "
    "`weighted_random_host_weight_pairs` does not name.",
    minimum=1,
    aws_name=True,
)

# --- execute_time plugin ---------------------------------------------------------------------

EXECUTE_TIME_SLOW_THRESHOLD = duration(
    "execute_time_slow_threshold",
    None,
    "Log statements slower than this many seconds at WARNING (logger "
    "`resilient_db.plugins.execute_time`). Unset: only DEBUG logging of every statement.",
    plugin="execute_time",
    allow_zero=False,
)

# --- connect_time plugin ---------------------------------------------------------------------

CONNECT_TIME_SLOW_THRESHOLD = duration(
    "connect_time_slow_threshold",
    None,
    "Log physical connects slower than this many seconds at WARNING (logger "
    "`resilient_db.plugins.connect_time`). Unset: only DEBUG logging of every connect.",
    plugin="connect_time",
    allow_zero=False,
)

# --- failover plugin and topology monitoring -------------------------------------------------

FAILOVER_MODES = ("strict_writer", "strict_reader", "reader_or_writer")
#: Reader selection strategies (``resilient_db.selection.STRATEGY_NAMES``; a test keeps the two
#: in step without importing the selection module here).
READER_STRATEGIES = (
    "random",
    "round_robin",
    "least_connections",
    "highest_weight",
    "weighted_random",
    "fastest_response",
)

ENABLE_FAILOVER = boolean(
    "enable_failover",
    True,
    "Turn the `failover` plugin on or off without changing `plugins` (false: the plugin is "
    "left out of every chain and costs nothing).",
    plugin="failover",
    aws_name=True,
)
FAILOVER_MODE = choice(
    "failover_mode",
    None,
    FAILOVER_MODES,
    "Which role failover connects to: the new writer only, a reader (the writer only in a "
    "cluster without readers), or a reader else the writer. Unset: `reader_or_writer` when "
    "connecting through a reader endpoint, `strict_writer` otherwise (cluster endpoint, "
    "instance endpoint, IP address or custom domain).",
    plugin="failover",
    aws_name=True,
)
FAILOVER_TIMEOUT = duration(
    "failover_timeout_sec",
    300.0,
    "Budget of one failover: no usable connection within it raises `FailoverFailedError` "
    "listing every attempt.",
    unit="s",
    plugin="failover",
    minimum=0.1,
    aws_name=True,
)
FAILOVER_READER_CONNECT_TIMEOUT = duration(
    "failover_reader_connect_timeout_sec",
    30.0,
    "Connect timeout of each connection failover opens (to a reader or to the new writer), "
    "capped by what is left of `failover_timeout_sec`.",
    unit="s",
    plugin="failover",
    minimum=0.1,
    aws_name=True,
)
FAILOVER_WRITER_RECONNECT_INTERVAL = duration(
    "failover_writer_reconnect_interval_sec",
    2.0,
    "Longest pause between failover rounds after a failed attempt (pauses start at 0.1 s "
    "and double up to this; the minimum keeps failover from hammering an instance that is "
    "restarting).",
    unit="s",
    plugin="failover",
    minimum=0.1,
    aws_name=True,
)
FAILOVER_READER_HOST_SELECTOR_STRATEGY = choice(
    "failover_reader_host_selector_strategy",
    "random",
    READER_STRATEGIES,
    "How failover in a reader mode picks the reader to try first (docs/plugins.md, reader "
    "selection strategies: the weighted ones need `weighted_random_host_weight_pairs`; "
    "`fastest_response` needs the `fastest_response_strategy` plugin).",
    plugin="failover",
    aws_name=True,
)
FAILOVER_HOST_COOLDOWN = duration(
    "failover_host_cooldown",
    30.0,
    "How long a host that failed (connection lost, connect refused) is tried last by reader "
    "failover. The writer verified by the topology monitor is always tried.",
    plugin="failover",
)
MAX_REPLICA_LAG = duration(
    "max_replica_lag",
    None,
    "Readers lagging more than this many seconds are tried only when no reader is within "
    "the cap (then the least lagged first). Unset: no cap.",
    plugin="failover",
)
TOPOLOGY_REFRESH = duration(
    "topology_refresh_ms",
    30.0,
    "How often the cluster's topology monitor re-reads the topology while all is well (one "
    "monitor and one server connection per cluster, shared by every connection of the "
    "process; the fastest rate any open connection asks for applies). The minimum keeps "
    "the monitor from loading the server with topology queries.",
    unit="ms",
    plugin="failover",
    minimum=50,
    aws_name=True,
)
TOPOLOGY_HIGH_REFRESH = duration(
    "cluster_topology_high_refresh_rate_ms",
    0.1,
    "How often each instance is probed while the monitor looks for a verified writer (after "
    "a failure, until the new writer confirms its role on its own connection). The minimum "
    "keeps the search from loading the instances.",
    unit="ms",
    plugin="failover",
    minimum=50,
    aws_name=True,
)
TOPOLOGY_PROBE_TIMEOUT = duration(
    "topology_probe_timeout",
    2.0,
    "Connect and read timeout of the topology monitor's connections, so that an unreachable "
    "(blackholed) instance cannot stall the search for the writer: instances are probed in "
    "parallel and a probe gives up after this long (PostgreSQL rounds connect timeouts up to "
    "whole seconds, at least 2).",
    plugin="failover",
    minimum=0.1,
)


def _to_callable(prop: Property[Any], value: object) -> Any:
    if value is None or callable(value):
        return value
    raise prop.fail(value, "a callable taking the driver connection (pass it as a keyword "
                           "argument of resilient_db.connect, not in a conninfo string)")


ON_CONNECT: Property[Callable[[Any], None] | None] = _register(Property(
    "on_connect",
    "callable",
    None,
    "Called as `on_connect(driver_connection)` on every new physical connection the "
    "application will use: the initial one and each one failover opens (after autocommit, "
    "read only and isolation level are restored), before it is handed over. Use it for "
    "session setup (`SET search_path`, time zone, ...). Not called for the topology "
    "monitor's own connections. An exception raised by the hook fails that connection.",
    _to_callable,
    plugin="failover",
))

# --- initial_connection plugin ---------------------------------------------------------------

OPENED_CONNECTION_TYPES = ("writer", "reader", "none")

INITIAL_CONNECTION_HOST_SELECTOR_STRATEGY = choice(
    "initial_connection_host_selector_strategy",
    "random",
    READER_STRATEGIES,
    "How `initial_connection` picks the reader to connect to when a reader is wanted (reader "
    "endpoint) and the cluster's topology is known, or when the instance DNS gave is not a "
    "reader (docs/plugins.md, reader selection strategies).",
    plugin="initial_connection",
    aws_name=True,
)
READER_INITIAL_CONNECTION_HOST_SELECTOR_STRATEGY = choice(
    "reader_initial_connection_host_selector_strategy",
    None,
    READER_STRATEGIES,
    "Older AWS name of `initial_connection_host_selector_strategy`, used only when that one is "
    "not set.",
    plugin="initial_connection",
    aws_name=True,
)
VERIFY_OPENED_CONNECTION_TYPE = choice(
    "verify_opened_connection_type",
    None,
    OPENED_CONNECTION_TYPES,
    "The role the instance behind a new connection must have: `writer`, `reader` (the writer "
    "only when no reader can be reached) or `none` (no check). Unset: `writer` through a "
    "cluster (writer) endpoint, `reader` through a reader endpoint, `none` otherwise.",
    plugin="initial_connection",
    aws_name=True,
)
OPEN_CONNECTION_RETRY_TIMEOUT = duration(
    "open_connection_retry_timeout_ms",
    30.0,
    "Window within which `initial_connection` keeps trying to open a connection of the "
    "wanted role; when it ends without one, `connect` raises `FailoverFailedError` listing "
    "every attempt. Each connect attempt's timeout is capped by what is left of the window. "
    "0: the first attempt only, no retries.",
    unit="ms",
    plugin="initial_connection",
    aws_name=True,
)
OPEN_CONNECTION_RETRY_INTERVAL = duration(
    "open_connection_retry_interval_ms",
    1.0,
    "Pause between two rounds of `initial_connection` attempts (capped by what is left of "
    "`open_connection_retry_timeout_ms`). The minimum keeps the retries from hammering the "
    "instances.",
    unit="ms",
    plugin="initial_connection",
    minimum=50,
    aws_name=True,
)

# --- read/write splitting: read_write_splitting and srw (resilient_db/plugins/_splitting.py) --

READER_HOST_SELECTOR_STRATEGY = choice(
    "reader_host_selector_strategy",
    "random",
    READER_STRATEGIES,
    "How `read_write_splitting` picks the reader a connection moves to when `read_only` is "
    "set (docs/plugins.md, reader selection strategies; readers over `max_replica_lag` only "
    "when none is within it).",
    plugin="read_write_splitting",
    aws_name=True,
)
SRW_READ_ENDPOINT = text(
    "srw_read_endpoint",
    None,
    "`srw`: the endpoint (`host` or `host:port`) a connection moves to when `read_only` is "
    "set, usually the cluster's reader endpoint. Required by `srw`.",
    plugin="srw",
    aws_name=True,
)
SRW_WRITE_ENDPOINT = text(
    "srw_write_endpoint",
    None,
    "`srw`: the endpoint (`host` or `host:port`) a connection moves back to when `read_only` "
    "is cleared, usually the cluster (writer) endpoint. Required by `srw`.",
    plugin="srw",
    aws_name=True,
)
SRW_VERIFY_NEW_CONNECTIONS = boolean(
    "srw_verify_new_connections",
    True,
    "`srw`: check the role of every connection it opens (the instance says whether it is a "
    "reader: one short internal statement) and retry within `srw_connect_retry_timeout_ms` "
    "until the endpoint leads to the right role (a DNS name lagging behind a failover).",
    plugin="srw",
    aws_name=True,
)
SRW_VERIFY_INITIAL_CONNECTION_TYPE = choice(
    "srw_verify_initial_connection_type",
    None,
    ("writer", "reader"),
    "`srw`: the role the application's first connection must have (checked and retried like "
    "the connections `srw` opens). Unset: not checked.",
    plugin="srw",
    aws_name=True,
)
SRW_CONNECT_RETRY_TIMEOUT = duration(
    "srw_connect_retry_timeout_ms",
    60.0,
    "`srw`: how long to keep trying an endpoint until it leads to an instance of the wanted "
    "role; then the switch fails with `ReadWriteSplittingError` listing every attempt.",
    unit="ms",
    plugin="srw",
    aws_name=True,
)
SRW_CONNECT_RETRY_INTERVAL = duration(
    "srw_connect_retry_interval_ms",
    1.0,
    "`srw`: pause between two attempts (capped by what is left of "
    "`srw_connect_retry_timeout_ms`).",
    unit="ms",
    plugin="srw",
    aws_name=True,
)
SPLITTING_POOL = boolean(
    "splitting_pool",
    False,
    "Take the reader and writer connections that read/write splitting opens from internal "
    "pools, one per instance (or endpoint) and identity (host, port, user, database, "
    "credentials), shared by the process, instead of opening and closing them per "
    "connection. A connection goes back to its pool, reset, when the application connection "
    "is closed.",
    plugin="read_write_splitting",
)
SPLITTING_POOL_MAX_SIZE = integer(
    "splitting_pool_max_size",
    10,
    "Most connections an internal pool holds, in use and idle together. A switch that needs "
    "one more waits up to `splitting_pool_timeout` for one to come back.",
    minimum=1,
    maximum=10_000,
    plugin="read_write_splitting",
)
SPLITTING_POOL_IDLE_TIMEOUT = duration(
    "splitting_pool_idle_timeout",
    300.0,
    "An idle pooled connection unused for longer is closed (when the pool is next used: no "
    "thread). 0: idle connections are never closed for age.",
    zero="never",
    minimum=0.001,
    plugin="read_write_splitting",
)
SPLITTING_POOL_TIMEOUT = duration(
    "splitting_pool_timeout",
    5.0,
    "How long a switch waits for a connection to come back to a full pool before failing "
    "with `ReadWriteSplittingError` (reason `pool_exhausted`). 0: do not wait.",
    plugin="read_write_splitting",
)

# --- Aurora Global Database: gdb_failover and gdb_rw (resilient_db/global_db.py) --------------

#: ``resilient_db.global_db.GlobalFailoverMode`` values (a test keeps the two in step).
GLOBAL_FAILOVER_MODES = (
    "strict-writer",
    "strict-home-reader",
    "strict-out-of-home-reader",
    "strict-any-reader",
    "home-reader-or-writer",
    "out-of-home-reader-or-writer",
    "any-reader-or-writer",
)


def _region_patterns_problem(value: str) -> str | None:
    from .global_db import parse_region_patterns  # not at import: the registry stays light

    try:
        parse_region_patterns(value)
    except ValueError as exc:
        return f"comma-separated 'region:host-pattern' entries ({exc})"
    return None


def _region_problem(value: str) -> str | None:
    parts = value.split("-")
    if len(parts) < 3 or not all(p.isascii() and p.isalnum() and p == p.lower() for p in parts):
        return "an AWS region name such as 'us-east-1', 'us-gov-west-1' or 'cn-north-1'"
    return None


GLOBAL_CLUSTER_INSTANCE_HOST_PATTERNS = text(
    "global_cluster_instance_host_patterns",
    None,
    "Aurora Global Database: the instance host pattern of each region, comma-separated "
    "`region:pattern` entries (`?` is replaced by the instance id, an optional `:port` "
    "follows), e.g. `us-east-1:?.abc.us-east-1.rds.amazonaws.com,us-west-2:?.def.us-west-2."
    "rds.amazonaws.com`. Set, the failover topology is the global one (every region); "
    "instances of a region not listed cannot be reached. Unset: the pattern of the region "
    "connected to only.",
    validate=_region_patterns_problem,
    plugin="gdb_failover",
    aws_name=True,
)
FAILOVER_HOME_REGION = text(
    "failover_home_region",
    None,
    "`gdb_failover`: the home region (where the application runs), e.g. `us-west-2`. Unset: "
    "the region of the endpoint connected to; required when the endpoint names none (IP "
    "address, custom domain, global writer endpoint).",
    validate=_region_problem,
    plugin="gdb_failover",
    aws_name=True,
)
ACTIVE_HOME_FAILOVER_MODE = choice(
    "active_home_failover_mode",
    None,
    GLOBAL_FAILOVER_MODES,
    "`gdb_failover`: where failover connects while the Global Database's primary region is "
    "the home region (docs/plugins/gdb_failover.md). Unset: `strict-writer` through a cluster "
    "or global writer endpoint, `home-reader-or-writer` otherwise.",
    plugin="gdb_failover",
    aws_name=True,
)
INACTIVE_HOME_FAILOVER_MODE = choice(
    "inactive_home_failover_mode",
    None,
    GLOBAL_FAILOVER_MODES,
    "`gdb_failover`: where failover connects while the primary region is another region. "
    "Unset: as `active_home_failover_mode`'s default.",
    plugin="gdb_failover",
    aws_name=True,
)
GDB_RW_HOME_REGION = text(
    "gdb_rw_home_region",
    None,
    "`gdb_rw`: the home region. Unset: the region of the endpoint connected to; required "
    "when the endpoint names none.",
    validate=_region_problem,
    plugin="gdb_rw",
    aws_name=True,
)
GDB_RW_RESTRICT_WRITER = boolean(
    "gdb_rw_restrict_writer_to_home_region",
    True,
    "`gdb_rw`: refuse to switch to (or stay on) a writer outside the home region: "
    "`read_only = False` raises `ReadWriteSplittingError` while the primary region is "
    "elsewhere.",
    plugin="gdb_rw",
    aws_name=True,
)
GDB_RW_RESTRICT_READER = boolean(
    "gdb_rw_restrict_reader_to_home_region",
    True,
    "`gdb_rw`: move to readers of the home region only (none: the connection stays where "
    "it is). False: home readers first, then readers of other regions.",
    plugin="gdb_rw",
    aws_name=True,
)

# --- telemetry (resilient_db.telemetry; docs/telemetry.md) -----------------------------------

ENABLE_TELEMETRY = boolean(
    "enable_telemetry",
    False,
    "Emit OpenTelemetry traces and metrics (docs/telemetry.md): a span per connect attempt, "
    "connection metrics for this connection, and, process-wide from then on, spans, events "
    "and metrics for every plugin decision (failover, host state, topology, reader choice). "
    "Uses `tracer_provider`/`meter_provider` when given, else the global providers; needs "
    "only the OpenTelemetry API (install the SDK and exporters with the `otel` extra).",
    aws_name=True,
)
TELEMETRY_TRACES_BACKEND = choice(
    "telemetry_traces_backend",
    "otlp",
    ("otlp", "xray", "none"),
    "Where traces go when `enable_telemetry` is true: `otlp` (and `xray`, accepted for "
    "compatibility) send them to the OpenTelemetry tracer provider, whose exporters decide "
    "the destination (OTLP, or X-Ray through a collector); `none` turns traces off.",
    aws_name=True,
)
TELEMETRY_METRICS_BACKEND = choice(
    "telemetry_metrics_backend",
    "otlp",
    ("otlp", "none"),
    "Where metrics go when `enable_telemetry` is true: `otlp` sends them to the OpenTelemetry "
    "meter provider (whose readers export over OTLP or serve Prometheus); `none` turns "
    "metrics off.",
    aws_name=True,
)
TELEMETRY_SUBMIT_TOPLEVEL = boolean(
    "telemetry_submit_toplevel",
    False,
    "Start resilient_db's decision spans (failover, topology search) as traces of their own, "
    "linked to the application's current span, instead of nesting them in it.",
    aws_name=True,
)
TELEMETRY_QUERY_SPANS = boolean(
    "telemetry_query_spans",
    False,
    "With `enable_telemetry`: a CLIENT span per statement (named from the operation and "
    "table, sanitized `db.query.text`) and the `db.client.operation.duration` metric. Off by "
    "default: it costs a span per statement; leave it off when "
    "`opentelemetry-instrumentation-psycopg` already traces statements.",
)


def _to_provider(method: str) -> Callable[[Property[Any], object], Any]:
    def convert(prop: Property[Any], value: object) -> Any:
        if value is None or callable(getattr(value, method, None)):
            return value
        raise prop.fail(value, f"an OpenTelemetry provider with a {method}() method (pass it "
                               "as a keyword argument of resilient_db.connect, not in a "
                               "conninfo string)")
    return convert


TRACER_PROVIDER: Property[Any] = _register(Property(
    "tracer_provider",
    "TracerProvider",
    None,
    "The OpenTelemetry tracer provider telemetry uses (keyword argument only). Unset: the "
    "global one (`opentelemetry.trace.set_tracer_provider`). Decision telemetry is "
    "process-wide: the last connection that enables telemetry with explicit providers sets "
    "them for every decision.",
    _to_provider("get_tracer"),
))
METER_PROVIDER: Property[Any] = _register(Property(
    "meter_provider",
    "MeterProvider",
    None,
    "The OpenTelemetry meter provider telemetry uses (keyword argument only). Unset: the "
    "global one (`opentelemetry.metrics.set_meter_provider`).",
    _to_provider("get_meter"),
))

# --- deadlines and network (resilient_db/_deadline.py, resilient_db/drivers/) ---------------

SOCKET_TIMEOUT = duration(
    "socket_timeout",
    None,
    "Client-side deadline of each statement (execute, executemany, callproc, commit, "
    "rollback, entering `transaction()`/`pipeline()`/`copy()`; not fetches). When it "
    "expires the statement is cancelled on the server (psycopg: the connection's cancel; "
    "MySQL: `KILL QUERY` over a short side connection) and, if it has not returned "
    "`query_timeout_grace` later, the connection's socket is broken; the call raises "
    "`QueryTimeoutError` and never fails over. `resilient_db.call_options(timeout=...)` "
    "overrides it per call. Unset or 0: no deadline. A deadline under the minimum would "
    "cancel nearly every statement (on MySQL, a side connection each). See "
    "docs/deadlines.md.",
    unit="s",
    minimum=0.01,
    zero="no deadline",
    aws_name=True,
)
QUERY_TIMEOUT_GRACE = duration(
    "query_timeout_grace",
    1.0,
    "After a statement deadline expires, how long the server-side cancel may take to end "
    "the statement before the connection's socket is broken (the connection is then "
    "unusable: closed and reported broken).",
    minimum=0.01,
)


def _to_optional_bool(prop: Property[bool | None], value: object) -> bool | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    result = parse_bool(value)
    if result is None:
        raise prop.fail(value, "a boolean (true/false, 1/0, yes/no, on/off)")
    return result


TCP_KEEPALIVE: Property[bool | None] = _register(Property(
    "tcp_keepalive",
    "bool",
    None,
    "Turn TCP keepalive on or off on every connection (libpq `keepalives`; `SO_KEEPALIVE` "
    "on mysql-connector's socket). Unset: the driver's default (libpq: on; mysql-connector: "
    "off), unless one of the `tcp_keepalive_*` properties is set, which turns it on.",
    _to_optional_bool,
    aws_name=True,
))

#: Linux accepts 1..32767 seconds for TCP_KEEPIDLE/TCP_KEEPINTVL.
_KEEPALIVE_MAX_SECONDS = 32767


def _keepalive_seconds(name: str, description: str) -> Property[float | None]:
    def convert(prop: Property[float | None], value: object) -> float | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        number = _number(prop, value, integer=False)
        if not 1 <= number <= _KEEPALIVE_MAX_SECONDS:
            raise prop.fail(value, f"a duration in s from 1 to {_KEEPALIVE_MAX_SECONDS} "
                                   "(the kernel counts keepalive time in whole seconds)")
        return number

    return _register(Property(name, "duration (s)", None, description, convert, unit="s",
                              aws_name=True, range_text=f"1 to {_KEEPALIVE_MAX_SECONDS}"))


TCP_KEEPALIVE_TIME = _keepalive_seconds(
    "tcp_keepalive_time",
    "Idle time before the first keepalive probe (libpq `keepalives_idle`; `TCP_KEEPIDLE`). "
    "Rounded up to whole seconds. Unset: the OS default (Linux: 7200 s).",
)
TCP_KEEPALIVE_INTERVAL = _keepalive_seconds(
    "tcp_keepalive_interval",
    "Time between unanswered keepalive probes (libpq `keepalives_interval`; "
    "`TCP_KEEPINTVL`). Rounded up to whole seconds. Unset: the OS default (Linux: 75 s).",
)
TCP_KEEPALIVE_PROBES = integer(
    "tcp_keepalive_probes",
    None,
    "Unanswered probes before the connection is declared dead (libpq `keepalives_count`; "
    "`TCP_KEEPCNT`). When time, interval and probes are all set, `tcp_user_timeout` is set "
    "to time + interval * probes as well (libpq `tcp_user_timeout`; `TCP_USER_TIMEOUT`), so "
    "that unacknowledged data in flight to a dead host gives up in the same bound. Unset: "
    "the OS default (Linux: 9).",
    minimum=1,
    maximum=127,
    aws_name=True,
)

# --- efm plugin (enhanced failure monitoring) -------------------------------------------------

FAILURE_DETECTION_ENABLED = boolean(
    "failure_detection_enabled",
    True,
    "Turn the `efm` plugin on or off without changing `plugins` (false: the plugin is left out "
    "of every chain and costs nothing).",
    plugin="efm",
    aws_name=True,
)
FAILURE_DETECTION_TIME = duration(
    "failure_detection_time_ms",
    30.0,
    "Grace period: how long a statement runs before its host is probed. Statements shorter "
    "than this never cause a probe.",
    unit="ms",
    plugin="efm",
    aws_name=True,
)
FAILURE_DETECTION_INTERVAL = duration(
    "failure_detection_interval_ms",
    5.0,
    "Time between probes of a host while one of its statements has outlived the grace "
    "period; a probe unanswered for this long counts as one failure. A host monitor shared "
    "by connections with different values uses the shortest. The minimum keeps probes from "
    "loading the server.",
    unit="ms",
    plugin="efm",
    minimum=100,
    aws_name=True,
)
FAILURE_DETECTION_COUNT = integer(
    "failure_detection_count",
    3,
    "Consecutive failed probes after which the host is declared dead: its in-flight "
    "statements are aborted and it is marked down. A host monitor shared by connections with "
    "different values uses the smallest.",
    minimum=1,
    maximum=1000,
    plugin="efm",
    aws_name=True,
)
MONITOR_DISPOSAL_TIME = duration(
    "monitor_disposal_time_ms",
    60.0,
    "A monitor with no open connection using it stops (thread and server connection) "
    "after this long: `efm`'s failure monitors, `fastest_response_strategy`'s "
    "response-time monitors, `blue_green`'s status monitors and `failover`'s topology "
    "monitor (which stops reading meanwhile). The minimum keeps a monitor from being torn "
    "down and reopened (a new connection) between two statements, or two connections "
    "opened one after another.",
    unit="ms",
    plugin="efm",
    minimum=100,
    aws_name=True,
)

# --- fastest_response_strategy plugin (resilient_db/plugins/fastest_response_strategy.py) ------

RESPONSE_MEASUREMENT_INTERVAL = duration(
    "response_measurement_interval_ms",
    30.0,
    "Time between two measurements of an instance's response time (the median of 5 "
    "round trips on the instance's shared measuring connection). A measurement older than "
    "three intervals is ignored. A monitor shared by connections with different values uses "
    "the shortest. The minimum keeps measuring from loading the servers.",
    unit="ms",
    plugin="fastest_response_strategy",
    minimum=100,
    aws_name=True,
)

# --- iam plugin (IAM database authentication; resilient_db/plugins/iam.py) ---------------------


# --- blue_green ------------------------------------------------------------------------------

BG_ID = text(
    "bg_id",
    "1",
    "Identifier of the blue/green deployment (case-insensitive). Connections with the same "
    "value share one status monitor; give each deployment the application uses its own.",
    validate=lambda v: None if v.strip() else "a non-empty string",
    plugin="blue_green",
    aws_name=True,
)
BG_CONNECT_TIMEOUT = duration(
    "bg_connect_timeout_ms",
    30.0,
    "Longest a new connection or a statement is held back while the switchover is in its "
    "`IN_PROGRESS` phase; then `SwitchoverError`.",
    unit="ms",
    allow_zero=False,
    plugin="blue_green",
    aws_name=True,
)
BG_SWITCHOVER_TIMEOUT = duration(
    "bg_switchover_timeout_ms",
    180.0,
    "A switchover still unfinished this long after its start (`PREPARATION`) is treated as "
    "completed: no more holding back or address substitution, DNS is used as is.",
    unit="ms",
    allow_zero=False,
    plugin="blue_green",
    aws_name=True,
)
BG_INTERVAL_BASELINE = duration(
    "bg_interval_baseline_ms",
    60.0,
    "Time between two reads of the blue/green metadata while no deployment exists or after "
    "a switchover completed.",
    unit="ms",
    minimum=10,
    plugin="blue_green",
    aws_name=True,
)
BG_INTERVAL_INCREASED = duration(
    "bg_interval_increased_ms",
    1.0,
    "Time between two reads of the blue/green metadata while a deployment exists and no "
    "switchover runs (how late a starting switchover can be noticed).",
    unit="ms",
    minimum=10,
    plugin="blue_green",
    aws_name=True,
)
BG_INTERVAL_HIGH = duration(
    "bg_interval_high_ms",
    0.1,
    "Time between two reads of the blue/green metadata during a switchover (how late the "
    "end of `IN_PROGRESS` can be noticed: part of the pause the application sees).",
    unit="ms",
    minimum=10,
    plugin="blue_green",
    aws_name=True,
)
BG_SUSPEND_NEW_BLUE_CONNECTIONS = boolean(
    "bg_suspend_new_blue_connections",
    False,
    "During `IN_PROGRESS`, hold back new connections to blue host names too (false: they go "
    "to the blue instance's address resolved before the switchover, and their statements "
    "are held back instead).",
    plugin="blue_green",
    aws_name=True,
)


def _iam_host_problem(value: str) -> str | None:
    if not value.strip() or any(ch.isspace() or ch in "/:," for ch in value):
        return ("one host name (no port, scheme, path or list), e.g. "
                "'db.cluster-abc.us-east-1.rds.amazonaws.com'")
    return None


IAM_HOST = text(
    "iam_host",
    None,
    "The host name the IAM token is generated for. Unset: the host of each physical "
    "connection (the instance failover or a monitor connects to gets a token for its own "
    "name). Set it when you connect through a name the database does not know (a tunnel, "
    "a local alias): every token then names this host.",
    validate=_iam_host_problem,
    plugin="iam",
    aws_name=True,
)
IAM_DEFAULT_PORT = integer(
    "iam_default_port",
    None,
    "The port the IAM token is generated for. Unset or 0: the port of the connection, else "
    "the driver's default (5432, 3306).",
    minimum=0,
    maximum=65535,
    plugin="iam",
    aws_name=True,
)
IAM_REGION = text(
    "iam_region",
    None,
    "The AWS region the IAM token is signed for. Unset: taken from the RDS endpoint name "
    "(`<region>.rds.amazonaws.com`, China's `rds.<region>.amazonaws.com.cn` and "
    "`<region>.rds.amazonaws.com.cn`, GovCloud's `us-gov-*`); required for any other host.",
    validate=_region_problem,
    plugin="iam",
    aws_name=True,
)
IAM_EXPIRATION = duration(
    "iam_expiration",
    870.0,
    "How long a generated IAM token is reused for the same host, port, user and region. "
    "RDS accepts a token for 15 minutes (900 s) after it is signed; a new one is generated "
    "ahead of time (from 10% of this before it, at most 60 s), and a token the server refuses "
    "is replaced at once.",
    unit="s",
    minimum=1,
    maximum=900,
    plugin="iam",
    aws_name=True,
)

# --- custom_endpoint plugin (resilient_db/plugins/custom_endpoint.py) --------------------------

CUSTOM_ENDPOINT_INFO_REFRESH = duration(
    "custom_endpoint_info_refresh_rate_ms",
    30.0,
    "How often the custom endpoint's monitor reads its members again (RDS "
    "`DescribeDBClusterEndpoints`; one monitor per custom endpoint, shared by every "
    "connection of the process; the first connection's rate applies). The minimum keeps the "
    "monitor within the RDS API's request limits.",
    unit="ms",
    minimum=100,
    plugin="custom_endpoint",
    aws_name=True,
)
CUSTOM_ENDPOINT_IDLE_EXPIRATION = duration(
    "custom_endpoint_idle_monitor_expiration_ms",
    900.0,
    "A custom endpoint monitor that no open connection uses stops (thread and RDS client "
    "calls) after this long; a later connection starts a new one.",
    unit="ms",
    minimum=100,
    plugin="custom_endpoint",
    aws_name=True,
)
WAIT_FOR_CUSTOM_ENDPOINT_INFO = boolean(
    "wait_for_custom_endpoint_info",
    True,
    "Whether a connection through a custom endpoint waits for the endpoint's members to be "
    "known before connecting (bounded by `wait_for_custom_endpoint_info_timeout_ms`), and "
    "failover waits for them before choosing a host. False: until the first answer, "
    "connections and failovers are not restricted to the members.",
    plugin="custom_endpoint",
    aws_name=True,
)
WAIT_FOR_CUSTOM_ENDPOINT_INFO_TIMEOUT = duration(
    "wait_for_custom_endpoint_info_timeout_ms",
    5.0,
    "Longest wait for the custom endpoint's members; when it ends without them, `connect` "
    "raises `CustomEndpointInfoError` naming the endpoint and the last problem (no such "
    "endpoint, access denied, API unreachable).",
    unit="ms",
    minimum=100,
    plugin="custom_endpoint",
    aws_name=True,
)
CUSTOM_ENDPOINT_REGION = text(
    "custom_endpoint_region",
    None,
    "AWS region of the custom endpoint's cluster (the AWS JDBC wrapper's "
    "`customEndpointRegion`). Unset: the region in the endpoint's name "
    "(`<name>.cluster-custom-<id>.<region>.rds.amazonaws.com`). The RDS API endpoint is "
    "boto3's (set `AWS_ENDPOINT_URL_RDS` for a VPC endpoint or an emulator).",
    validate=_region_problem,
    plugin="custom_endpoint",
)

# --- limitless plugin (resilient_db/plugins/limitless.py) ------------------------------------

LIMITLESS_MONITOR_INTERVAL = duration(
    "limitless_transaction_router_monitor_interval_ms",
    7.5,
    "How often the shard group's router monitor reads the transaction routers and their load "
    "again (`aurora_limitless_router_endpoints()`; one monitor and one server connection per "
    "shard group endpoint, shared by every connection of the process; the shortest interval "
    "of the connections using it applies). A router marked down after a failed connect is "
    "tried again after one interval. The minimum keeps the monitor's query from becoming a "
    "load of its own.",
    unit="ms",
    minimum=100,
    plugin="limitless",
    aws_name=True,
)
LIMITLESS_MONITOR_DISPOSAL_TIME = duration(
    "limitless_transaction_router_monitor_disposal_time_ms",
    600.0,
    "A router monitor that no open connection uses stops (thread and server connection) "
    "after this long; a later connection starts a new one. `resilient_db.shutdown()` stops "
    "it at once.",
    unit="ms",
    minimum=100,
    plugin="limitless",
    aws_name=True,
)
LIMITLESS_WAIT_FOR_ROUTER_INFO = boolean(
    "limitless_wait_for_transaction_router_info",
    True,
    "When no router list is known yet (the first connection to a shard group in the "
    "process): true reads it on the spot, through the shard group endpoint, before choosing "
    "a router (retried as `limitless_get_transaction_router_max_retries` says); false "
    "connects through the shard group endpoint as given (Route 53 picks the router) while "
    "the monitor reads the list for later connections.",
    plugin="limitless",
    aws_name=True,
)
LIMITLESS_GET_ROUTER_RETRY_INTERVAL = duration(
    "limitless_get_transaction_router_retry_interval_ms",
    0.3,
    "Pause between two attempts to read the router list on the spot.",
    unit="ms",
    minimum=10,
    maximum=60_000,
    plugin="limitless",
    aws_name=True,
)
LIMITLESS_GET_ROUTER_MAX_RETRIES = integer(
    "limitless_get_transaction_router_max_retries",
    5,
    "Attempts to read the router list on the spot after the first one fails or finds no "
    "router; then `connect` raises the last error.",
    minimum=0,
    maximum=100,
    plugin="limitless",
    aws_name=True,
)
LIMITLESS_CONNECT_MAX_RETRIES = integer(
    "limitless_max_retries_ms",
    5,
    "A count, not milliseconds (the AWS Python wrapper's name; its JDBC wrapper calls it "
    "`limitlessConnectMaxRetries`): routers tried after the chosen one fails to connect, at "
    "connect and when a connection's router fails (each time the least loaded router not "
    "marked down). The AWS Python wrapper's default is 7500; ours is the JDBC wrapper's 5.",
    minimum=1,
    maximum=10_000,
    plugin="limitless",
    aws_name=True,
)

# --- aws_secrets_manager plugin (resilient_db/plugins/aws_secrets_manager.py) -----------------

#: A region name as AWS spells them: ``us-east-1``, ``us-gov-west-1``, ``cn-north-1``,
#: ``eu-central-2``, ``ap-southeast-3``, ``il-central-1``.
_SECRET_REGION_SHAPE = "an AWS region name such as 'us-east-2' (lowercase, ending in a number)"
#: ``secrets_manager_expiration``'s default, as in the AWS wrapper.
SECRET_EXPIRATION_ONE_YEAR = 365 * 86_400.0
_SECRET_EXPIRATION_MAX = 10 * SECRET_EXPIRATION_ONE_YEAR


def _secret_region_problem(value: str) -> str | None:
    import re

    if re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d{1,2}", value.strip()) is None:
        return _SECRET_REGION_SHAPE
    return None


def _endpoint_problem(value: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "a URL such as 'https://secretsmanager.us-east-2.amazonaws.com' (bad port)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ("a URL with a scheme and a host, such as "
                "'https://secretsmanager.us-east-2.amazonaws.com' or 'http://localhost:4566'")
    return None


def _json_key_problem(value: str) -> str | None:
    return None if value.strip() else "the name of a key of the secret's JSON object"


def _secret_expiration(name: str, description: str) -> Property[float]:
    from ._properties import _blank, _fmt

    range_text = f"0 to {_fmt(_SECRET_EXPIRATION_MAX)}"
    expected = f"a duration in seconds, {range_text}"

    def convert(prop: Property[float], value: object) -> float:
        if _blank(value):
            raise prop.fail(value, expected)
        number = _number(prop, value, integer=False)
        if number < 0:
            # The AWS wrapper reads a negative value as "one year", its default: a magic
            # number is refused here, with the way to get the same thing.
            raise prop.fail(value, f"{expected} (the AWS wrapper's negative value means a "
                                   "year, the default)")
        if number > _SECRET_EXPIRATION_MAX:
            raise prop.fail(value, expected)
        return number

    # The default as an int so that the docs show 31536000, not 3.1536e+07.
    default = int(SECRET_EXPIRATION_ONE_YEAR)
    return _register(Property(name, "duration (s)", default, description,
                              convert, unit="s", plugin="aws_secrets_manager", aws_name=True,
                              range_text=range_text))


SECRETS_MANAGER_SECRET_ID = text(
    "secrets_manager_secret_id",
    None,
    "The secret holding the database credentials: its name or its ARN "
    "(`arn:aws:secretsmanager:<region>:<account>:secret:<name>-<6 characters>`). Required "
    "when `aws_secrets_manager` is selected.",
    validate=lambda v: None if v.strip() else "a secret name or ARN",
    plugin="aws_secrets_manager",
    aws_name=True,
)
SECRETS_MANAGER_REGION = text(
    "secrets_manager_region",
    None,
    "Region of the secret. Unset: the region in the secret's ARN; with a secret name "
    "instead of an ARN it is required.",
    validate=_secret_region_problem,
    plugin="aws_secrets_manager",
    aws_name=True,
)
SECRETS_MANAGER_ENDPOINT = text(
    "secrets_manager_endpoint",
    None,
    "Endpoint URL of the Secrets Manager API (a VPC endpoint, a local emulator), e.g. "
    "`https://vpce-0123.secretsmanager.us-east-2.vpce.amazonaws.com`. Unset: the region's "
    "public endpoint.",
    validate=_endpoint_problem,
    plugin="aws_secrets_manager",
    aws_name=True,
)
SECRETS_MANAGER_SECRET_USERNAME_KEY = text(
    "secrets_manager_secret_username_key",
    "username",
    "Key of the secret's JSON object that holds the database user name.",
    validate=_json_key_problem,
    plugin="aws_secrets_manager",
    aws_name=True,
)
SECRETS_MANAGER_SECRET_PASSWORD_KEY = text(
    "secrets_manager_secret_password_key",
    "password",
    "Key of the secret's JSON object that holds the database password.",
    validate=_json_key_problem,
    plugin="aws_secrets_manager",
    aws_name=True,
)
SECRETS_MANAGER_EXPIRATION = _secret_expiration(
    "secrets_manager_expiration",
    "How long a fetched secret is reused for new connections (process-wide, per secret id, "
    "region and endpoint) before it is fetched again. A rotated secret is picked up earlier "
    "anyway: an authentication failure fetches it again and retries once. 0: fetch on every "
    "physical connect.",
)

# --- federated_auth (ADFS) and okta plugins (resilient_db/auth/_federated.py) ----------------
# Both sign in at an identity provider, exchange its SAML assertion for temporary AWS
# credentials (STS AssumeRoleWithSAML) and sign an IAM database token with them. Properties
# used by both plugins are declared once, under federated_auth; docs/plugins/okta.md lists them
# too.


def _idp_endpoint_problem(value: str) -> str | None:
    host = value.strip().removeprefix("https://").rstrip("/")
    if value.strip().lower().startswith("http://"):
        return ("an HTTPS host: the IdP password is sent to it, so plain http:// is refused "
                "(write the host name, e.g. 'adfs.example.com')")
    if not host or any(ch.isspace() for ch in host) or "/" in host or "?" in host:
        return "the IdP's host name (optionally host:port), e.g. 'adfs.example.com'"
    return None


IDP_ENDPOINT = text(
    "idp_endpoint",
    None,
    "Host name of the identity provider (ADFS server or Okta org, e.g. `adfs.example.com`, "
    "`example.okta.com`), optionally with `:port` (which wins over `idp_port`); an "
    "`https://` prefix is accepted, `http://` is refused. Required by `federated_auth` and "
    "`okta`. Always reached over HTTPS.",
    validate=_idp_endpoint_problem,
    plugin="federated_auth",
    aws_name=True,
)
IDP_PORT = integer(
    "idp_port",
    443,
    "HTTPS port of the identity provider. `okta` uses it only when set (otherwise the port "
    "in `idp_endpoint`, or 443), as the AWS wrapper's Okta plugin ignores it.",
    minimum=1,
    maximum=65535,
    plugin="federated_auth",
    aws_name=True,
)
RP_IDENTIFIER = text(
    "rp_identifier",
    "urn:amazon:webservices",
    "ADFS relying party identifier: the `loginToRp` of the IdP-initiated sign-on page "
    "(`/adfs/ls/IdpInitiatedSignOn.aspx?loginToRp=...`).",
    plugin="federated_auth",
    aws_name=True,
)
IDP_NAME = choice(
    "idp_name",
    "adfs",
    ("adfs",),
    "Identity provider implementation of `federated_auth`; only ADFS (`okta` is a plugin of "
    "its own).",
    plugin="federated_auth",
    aws_name=True,
)
IAM_ROLE_ARN = text(
    "iam_role_arn",
    None,
    "ARN of the IAM role to assume with the SAML assertion (`arn:aws:iam::<account>:role/"
    "<name>`); the assertion must grant it. Required.",
    plugin="federated_auth",
    aws_name=True,
)
IAM_IDP_ARN = text(
    "iam_idp_arn",
    None,
    "ARN of the IAM SAML identity provider (`arn:aws:iam::<account>:saml-provider/<name>`): "
    "the `PrincipalArn` of AssumeRoleWithSAML. Required.",
    plugin="federated_auth",
    aws_name=True,
)
IDP_USERNAME = text(
    "idp_username",
    None,
    "User name to sign in at the identity provider (ADFS: usually `user@domain` or "
    "`DOMAIN\\user`). Unset: the connection's `user`.",
    plugin="federated_auth",
    aws_name=True,
)
IDP_PASSWORD = text(
    "idp_password",
    None,
    "Password for `idp_username` at the identity provider; never logged or shown. Unset: the "
    "connection's `password`.",
    plugin="federated_auth",
    aws_name=True,
    secret=True,
)
DB_USER = text(
    "db_user",
    None,
    "Database user the IAM token is generated for and that the connection logs in as "
    "(an IAM-enabled user on the instance). Required.",
    plugin="federated_auth",
    aws_name=True,
)
IAM_TOKEN_EXPIRATION = duration(
    "iam_token_expiration",
    870.0,
    "How long an IAM token obtained through the identity provider is reused, in seconds (RDS "
    "accepts a token for 15 minutes; the default leaves 30 s of margin). Never beyond the "
    "expiry of the STS credentials that signed it.",
    minimum=1,
    maximum=900,
    plugin="federated_auth",
    aws_name=True,
)
HTTP_REQUEST_CONNECT_TIMEOUT = duration(
    "http_request_connect_timeout",
    60.0,
    "Bound on each HTTP request to the identity provider, in seconds: the TCP/TLS connect and "
    "each read wait at most this long, and a response still arriving after this long is "
    "abandoned (so one request takes at most twice this). Also the connect and read timeout "
    "of the STS call.",
    allow_zero=False,
    maximum=3600,
    plugin="federated_auth",
    aws_name=True,
)
SSL_SECURE = boolean(
    "ssl_secure",
    True,
    "Verify the identity provider's TLS certificate and host name (against the system's "
    "trusted CAs, or `SSL_CERT_FILE`). False sends the IdP password to whoever answers: "
    "for tests only.",
    plugin="federated_auth",
    aws_name=True,
)
APP_ID = text(
    "app_id",
    None,
    "Okta: ID of the Amazon Web Services application in Okta (the `<app_id>` of "
    "`/app/amazon_aws/<app_id>/sso/saml`). Required by `okta`.",
    plugin="okta",
    aws_name=True,
)

#: Properties read by plugins besides the one that owns them (``Property.plugin``): the
#: federated plugins sign their tokens with the ``iam`` plugin's target rules, and ``okta``
#: reads the identity-provider properties declared under ``federated_auth``. Each plugin's
#: docs page lists them, and setting one counts as used when any reader is enabled.
SHARED_WITH: dict[str, tuple[str, ...]] = {
    "monitor_disposal_time_ms": ("fastest_response_strategy", "blue_green", "failover"),
    **{name: ("srw",)
       for name in ("splitting_pool", "splitting_pool_max_size", "splitting_pool_idle_timeout",
                    "splitting_pool_timeout")},
    **{name: ("read_write_splitting",)
       for name in ("max_replica_lag", "round_robin_host_weight_pairs",
                    "round_robin_default_weight", "weighted_random_host_weight_pairs",
                    "weighted_random_default_weight")},
    **{name: ("federated_auth", "okta")
       for name in ("iam_host", "iam_default_port", "iam_region")},
    **{name: ("okta",)
       for name in ("idp_endpoint", "idp_port", "iam_role_arn", "iam_idp_arn", "idp_username",
                    "idp_password", "db_user", "iam_token_expiration",
                    "http_request_connect_timeout", "ssl_secure")},
}

# gdb_failover is failover with home-region modes, gdb_rw is read_write_splitting with a home
# region: each reads its base plugin's properties; failover and gdb_rw read the global patterns.
for _prop in list(REGISTRY.values()):
    for _base, _derived in (("failover", "gdb_failover"), ("read_write_splitting", "gdb_rw")):
        if _base in (_prop.plugin, *SHARED_WITH.get(_prop.name, ())):
            SHARED_WITH[_prop.name] = (*SHARED_WITH.get(_prop.name, ()), _derived)
SHARED_WITH["global_cluster_instance_host_patterns"] = ("failover", "gdb_rw")


def readers_of(prop: Property[Any]) -> tuple[str | None, ...]:
    """The plugins that read ``prop``: its owner first (``None``: the core)."""
    return (prop.plugin, *SHARED_WITH.get(prop.name, ()))
