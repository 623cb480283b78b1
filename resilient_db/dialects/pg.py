"""PostgreSQL dialects: Aurora PostgreSQL, RDS Multi-AZ DB cluster, RDS for PostgreSQL, plain.

Recognition (``AURORA_INTERFACE.md``), most specific first:

- aurora-pg: ``pg_settings`` row ``rds.extensions`` lists ``aurora_stat_utils`` and
  ``pg_catalog.aurora_replica_status()`` exists;
- multi-az-pg: functions ``rds_tools.show_topology`` and
  ``rds_tools.multi_az_db_cluster_source_dbi_resource_id`` exist;
- rds-pg: ``rds.extensions`` lists ``rds_tools`` (and not ``aurora_stat_utils``);
- pg: any PostgreSQL server.

Every check is a catalog lookup (``pg_settings``, ``pg_proc``) that cannot fail, so detection
never aborts a transaction, not even one the application has open. Function existence is
checked in ``pg_proc`` rather than by calling the function for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from .base import (
    STALE_AFTER,
    Answer,
    DatabaseDialect,
    Family,
    Probe,
    Rows,
    Topology,
    Verdict,
    aurora_topology,
    failed,
    global_topology,
    multi_az_topology,
    shown,
    text,
)

__all__ = [
    "AuroraPgDialect",
    "GlobalAuroraPgDialect",
    "MultiAzPgDialect",
    "PgDialect",
    "RdsPgDialect",
]

# --- statements ---------------------------------------------------------------------------------

VERSION = "SELECT pg_catalog.version()"
#: One row on Aurora and RDS (the preloadable extensions, comma-separated), none elsewhere.
RDS_EXTENSIONS = "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'rds.extensions'"
#: Which of the functions the cluster dialects need exist (schema, name).
FUNCTIONS = (
    "SELECT n.nspname, p.proname FROM pg_catalog.pg_proc AS p "
    "JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace "
    "WHERE n.nspname IN ('pg_catalog', 'rds_tools') AND p.proname IN ("
    "'aurora_replica_status', 'aurora_db_instance_identifier', 'show_topology', "
    "'dbi_resource_id', 'multi_az_db_cluster_source_dbi_resource_id')"
)
IS_READER = "SELECT pg_catalog.pg_is_in_recovery()"
#: The server's own address (NULL over a Unix socket).
SERVER_ADDRESS = "SELECT pg_catalog.inet_server_addr(), pg_catalog.inet_server_port()"

#: Aurora: one row per instance, plus the server clock to judge staleness without skew.
AURORA_TOPOLOGY = (
    "SELECT server_id, session_id, cpu, replica_lag_in_msec, last_update_timestamp, "
    "pg_catalog.statement_timestamp() FROM pg_catalog.aurora_replica_status()"
)
AURORA_INSTANCE_ID = "SELECT pg_catalog.aurora_db_instance_identifier()"
#: Aurora Global Database: one row per instance of every region, with its region.
GLOBAL_TOPOLOGY = (
    "SELECT server_id, session_id, visibility_lag_in_msec, aws_region, "
    "pg_catalog.statement_timestamp() FROM pg_catalog.aurora_global_db_instance_status()"
)
GLOBAL_FUNCTION_EXISTS = (
    "SELECT p.proname FROM pg_catalog.pg_proc AS p "
    "JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace "
    "WHERE n.nspname = 'pg_catalog' AND p.proname = 'aurora_global_db_instance_status'"
)

#: The client id passed to ``show_topology`` (RDS uses it for metrics only).
CLIENT_ID = "resilient_db"
MULTI_AZ_TOPOLOGY = f"SELECT id, endpoint, port FROM rds_tools.show_topology('{CLIENT_ID}')"
MULTI_AZ_INSTANCE_ID = "SELECT dbi_resource_id FROM rds_tools.dbi_resource_id()"
MULTI_AZ_WRITER_ID = (
    "SELECT multi_az_db_cluster_source_dbi_resource_id "
    "FROM rds_tools.multi_az_db_cluster_source_dbi_resource_id()"
)

_AURORA_EXTENSION = "aurora_stat_utils"
_RDS_EXTENSION = "rds_tools"
_AURORA_FUNCTION = ("pg_catalog", "aurora_replica_status")
_MULTI_AZ_FUNCTIONS = (
    ("rds_tools", "show_topology"),
    ("rds_tools", "multi_az_db_cluster_source_dbi_resource_id"),
)


# --- pure readings of the check answers ---------------------------------------------------------


def _extensions(answer: Answer) -> tuple[frozenset[str] | None, str]:
    """The ``rds.extensions`` list (``None``: not set) and a line saying what was seen."""
    if not answer.ok:
        return None, failed("pg_settings rds.extensions", answer)
    if not answer.rows:
        return None, "pg_settings rds.extensions is not set"
    setting = text(answer.first) or ""
    names = frozenset(part.strip() for part in setting.split(",") if part.strip())
    return names, f"pg_settings rds.extensions = {shown(setting)}"


def _functions(answer: Answer) -> frozenset[tuple[str, str]]:
    return frozenset((text(row[0]) or "", text(row[1]) or "") for row in answer.rows)


def _function_names(names: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{schema}.{name}()" for schema, name in names)


# --- dialects -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PgDialect(DatabaseDialect):
    """Any PostgreSQL server: no topology; the instance id is the server's address."""

    code: ClassVar[str] = "pg"
    family: ClassVar[Family] = "pg"
    title: ClassVar[str] = "PostgreSQL"
    default_port: ClassVar[int] = 5432

    instance_id_query: str = SERVER_ADDRESS
    is_reader_query: str = IS_READER

    def probe(self) -> Probe:
        answer = yield VERSION
        if not answer.ok:
            return Verdict(True, (failed("version()", answer),))
        return Verdict(True, (f"version() = {shown(text(answer.first))}",))


@dataclass(frozen=True, kw_only=True)
class RdsPgDialect(PgDialect):
    """RDS for PostgreSQL (single instance, optionally Multi-AZ *instance*): no topology."""

    code: ClassVar[str] = "rds-pg"
    title: ClassVar[str] = "RDS for PostgreSQL"

    def probe(self) -> Probe:
        names, line = _extensions((yield RDS_EXTENSIONS))
        if names is None:
            return Verdict(False, (line,))
        if _RDS_EXTENSION not in names:
            return Verdict(False, (f"{line} (no {_RDS_EXTENSION})",))
        if _AURORA_EXTENSION in names:
            return Verdict(False, (f"{line} (has {_AURORA_EXTENSION}: Aurora, not RDS)",))
        return Verdict(True, (f"{line} (has {_RDS_EXTENSION})",))


@dataclass(frozen=True, kw_only=True)
class AuroraPgDialect(PgDialect):
    """Aurora PostgreSQL: topology from ``pg_catalog.aurora_replica_status()``."""

    code: ClassVar[str] = "aurora-pg"
    title: ClassVar[str] = "Aurora PostgreSQL"

    instance_id_query: str = AURORA_INSTANCE_ID
    topology_query: str | None = AURORA_TOPOLOGY

    def probe(self) -> Probe:
        names, line = _extensions((yield RDS_EXTENSIONS))
        if names is None:
            return Verdict(False, (line,))
        if _AURORA_EXTENSION not in names:
            return Verdict(False, (f"{line} (no {_AURORA_EXTENSION})",))
        seen = (f"{line} (has {_AURORA_EXTENSION})",)
        functions = _functions((yield FUNCTIONS))
        name = _function_names((_AURORA_FUNCTION,))
        if _AURORA_FUNCTION not in functions:
            return Verdict(False, (*seen, f"function {name} does not exist"))
        return Verdict(True, (*seen, f"function {name} exists"))

    def parse_topology(
        self,
        rows: Rows,
        *,
        writer_id: str | None = None,
        now: datetime | None = None,
        max_age: float = STALE_AFTER,
    ) -> Topology:
        return aurora_topology(rows, now, max_age)


@dataclass(frozen=True, kw_only=True)
class GlobalAuroraPgDialect(AuroraPgDialect):
    """Aurora PostgreSQL in a Global Database: the topology of every region, from
    ``pg_catalog.aurora_global_db_instance_status()``. Never detected: the ``gdb_*`` plugins
    (and ``failover`` with ``global_cluster_instance_host_patterns``) read it instead of
    ``aurora-pg``'s regional topology."""

    code: ClassVar[str] = "global-aurora-pg"
    title: ClassVar[str] = "Aurora PostgreSQL Global Database"

    topology_query: str | None = GLOBAL_TOPOLOGY

    def probe(self) -> Probe:
        verdict = yield from super().probe()
        if not verdict.matched:
            return verdict
        answer = yield GLOBAL_FUNCTION_EXISTS
        name = "pg_catalog.aurora_global_db_instance_status()"
        if not answer.rows:
            return Verdict(False, (*verdict.seen, f"function {name} does not exist"))
        return Verdict(True, (*verdict.seen, f"function {name} exists"))

    def parse_topology(
        self,
        rows: Rows,
        *,
        writer_id: str | None = None,
        now: datetime | None = None,
        max_age: float = STALE_AFTER,
    ) -> Topology:
        return global_topology(rows)


@dataclass(frozen=True, kw_only=True)
class MultiAzPgDialect(PgDialect):
    """RDS Multi-AZ DB cluster, PostgreSQL: topology from ``rds_tools.show_topology``."""

    code: ClassVar[str] = "multi-az-pg"
    title: ClassVar[str] = "an RDS Multi-AZ DB cluster (PostgreSQL)"

    instance_id_query: str = MULTI_AZ_INSTANCE_ID
    topology_query: str | None = MULTI_AZ_TOPOLOGY
    writer_id_query: str | None = MULTI_AZ_WRITER_ID

    def probe(self) -> Probe:
        functions = _functions((yield FUNCTIONS))
        missing = tuple(f for f in _MULTI_AZ_FUNCTIONS if f not in functions)
        if missing:
            verb = "does" if len(missing) == 1 else "do"
            return Verdict(False, (f"pg_proc: {_function_names(missing)} {verb} not exist",))
        return Verdict(True, (f"pg_proc: {_function_names(_MULTI_AZ_FUNCTIONS)} exist",))

    def parse_topology(
        self,
        rows: Rows,
        *,
        writer_id: str | None = None,
        now: datetime | None = None,
        max_age: float = STALE_AFTER,
    ) -> Topology:
        return multi_az_topology(rows, writer_id)
