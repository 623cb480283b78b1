"""Every property of resilient_db and its built-in plugins, declared once.

The declarations live in one module (not in each plugin) so that a property of a built-in
plugin is accepted whether or not that plugin is enabled (CONVENTIONS.md) without the core
importing every plugin, and so that ``docs/parameters.md`` is generated from one place.
Group order here is the order of the generated docs.
"""

from __future__ import annotations

from ._properties import boolean, choice, duration, text

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
    "what was checked.",
    aws_name=True,
)
WRAPPER_DRIVER_DIALECT = choice(
    "wrapper_driver_dialect",
    None,
    DRIVER_CODES,
    "Force the driver dialect instead of recognising it from `target` (for a wrapped or "
    "renamed connect callable).",
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
