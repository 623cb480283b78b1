"""MySQL dialects: Aurora MySQL, RDS Multi-AZ DB cluster, RDS for MySQL, plain MySQL/MariaDB.

Recognition (``AURORA_INTERFACE.md``), most specific first:

- aurora-mysql: ``SHOW VARIABLES LIKE 'aurora_version'`` lists the variable;
- multi-az-mysql: table ``mysql.rds_topology`` exists with an ``id`` column (blue/green
  deployments use a table of the same name with other columns), has rows, and ``report_host``
  is set;
- rds-mysql: ``version_comment`` is ``Source distribution`` and ``report_host`` is set;
- mysql: any MySQL or MariaDB server.

MySQL has no transaction-aborting errors, and ``DriverDialect.query`` rolls back a
transaction a check started implicitly, so a check statement that fails (no privilege on
``mysql.rds_topology``) simply counts as "no".

The Aurora-MySQL look-alike
---------------------------
MariaDB (the simulator's engine) can define neither ``@@aurora_server_id`` nor new
``information_schema`` tables, nor an ``aurora_version`` variable. The simulator therefore keeps
the ``replica_host_status`` columns in a table of its own and describes it explicitly::

    AuroraMysqlDialect(
        topology_source="aurora_sim.replica_host_status",
        instance_id_query="SELECT @@report_host",
        is_reader_query="SELECT @@read_only",
    )

A dialect with a non-default ``topology_source`` is a look-alike: its check is "the topology
source exists and has rows" instead of ``aurora_version``. Detection never returns a look-alike:
it is only used when configured explicitly (production defaults are untouched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    check_qualified_table,
    check_select,
    failed,
    global_topology,
    multi_az_topology,
    shown,
    text,
    variable,
)

__all__ = [
    "AuroraMysqlDialect",
    "GlobalAuroraMysqlDialect",
    "MultiAzMysqlDialect",
    "MysqlDialect",
    "RdsMysqlDialect",
]

# --- statements ---------------------------------------------------------------------------------

VERSION = "SELECT @@version, @@version_comment"
AURORA_VERSION = "SHOW VARIABLES LIKE 'aurora_version'"
VERSION_COMMENT = "SHOW VARIABLES LIKE 'version_comment'"
REPORT_HOST = "SHOW VARIABLES LIKE 'report_host'"
RDS_TOPOLOGY_COLUMNS = (
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = 'mysql' AND table_name = 'rds_topology'"
)
RDS_TOPOLOGY_HAS_ROWS = "SELECT id FROM mysql.rds_topology LIMIT 1"
READ_ONLY = "SELECT @@read_only"
INNODB_READ_ONLY = "SELECT @@innodb_read_only"
SERVER_ADDRESS = "SELECT @@hostname, @@port"
SERVER_ID = "SELECT @@server_id"

AURORA_SERVER_ID = "SELECT @@aurora_server_id"
AURORA_TOPOLOGY_SOURCE = "information_schema.replica_host_status"
GLOBAL_TOPOLOGY_SOURCE = "information_schema.aurora_global_db_instance_status"

MULTI_AZ_TOPOLOGY = "SELECT id, endpoint, port FROM mysql.rds_topology"
#: On a reader, one row whose column 39 is the writer's server id (``Source_Server_Id`` in
#: MySQL 8, ``Master_Server_Id`` in MariaDB 10.11: the same position); no row on the writer.
REPLICA_STATUS = "SHOW REPLICA STATUS"
SOURCE_SERVER_ID_COLUMN = 39

_RDS_VERSION_COMMENT = "Source distribution"


def aurora_topology_query(source: str) -> str:
    """The Aurora MySQL topology statement reading ``source`` (schema-qualified), plus the
    server clock to judge staleness without client clock skew."""
    check_qualified_table(source, "topology_source")
    return (
        "SELECT SERVER_ID, SESSION_ID, CPU, REPLICA_LAG_IN_MILLISECONDS, LAST_UPDATE_TIMESTAMP, "
        f"NOW(6) FROM {source}"
    )


def global_topology_query(source: str) -> str:
    """The Aurora Global Database topology statement reading ``source`` (schema-qualified)."""
    check_qualified_table(source, "global_topology_source")
    return (f"SELECT SERVER_ID, SESSION_ID, VISIBILITY_LAG_IN_MSEC, AWS_REGION, NOW(6) "
            f"FROM {source}")


# --- pure readings of the check answers ---------------------------------------------------------


def _report_host(answer: Answer) -> tuple[bool, str]:
    if not answer.ok:
        return False, failed("report_host", answer)
    value = variable(answer, "report_host")
    if not value:
        return False, "report_host is not set"
    return True, f"report_host = {shown(value)}"


# --- dialects -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MysqlDialect(DatabaseDialect):
    """Any MySQL or MariaDB server: no topology; the instance id is ``hostname:port``."""

    code: ClassVar[str] = "mysql"
    family: ClassVar[Family] = "mysql"
    title: ClassVar[str] = "MySQL"
    default_port: ClassVar[int] = 3306

    instance_id_query: str = SERVER_ADDRESS
    is_reader_query: str = READ_ONLY

    def probe(self) -> Probe:
        answer = yield VERSION
        if not answer.ok or not answer.rows:
            return Verdict(True, (failed("@@version", answer),))
        row = answer.rows[0]
        comment = text(row[1]) if len(row) > 1 else None
        return Verdict(True, (f"version = {shown(text(row[0]))} ({shown(comment)})",))


@dataclass(frozen=True, kw_only=True)
class RdsMysqlDialect(MysqlDialect):
    """RDS for MySQL (single instance): no topology."""

    code: ClassVar[str] = "rds-mysql"
    title: ClassVar[str] = "RDS for MySQL"

    def probe(self) -> Probe:
        answer = yield VERSION_COMMENT
        if not answer.ok:
            return Verdict(False, (failed("version_comment", answer),))
        comment = variable(answer, "version_comment")
        if comment != _RDS_VERSION_COMMENT:
            return Verdict(
                False,
                (f"version_comment = {shown(comment)} (RDS reports {_RDS_VERSION_COMMENT!r})",),
            )
        seen = (f"version_comment = {shown(comment)}",)
        matched, line = _report_host((yield REPORT_HOST))
        return Verdict(matched, (*seen, line))


@dataclass(frozen=True, kw_only=True)
class AuroraMysqlDialect(MysqlDialect):
    """Aurora MySQL: topology from ``information_schema.replica_host_status``.

    ``topology_source`` is the schema-qualified table with the ``replica_host_status`` columns;
    a different one describes a look-alike (see the module docstring). ``topology_query`` is
    derived from it.
    """

    code: ClassVar[str] = "aurora-mysql"
    title: ClassVar[str] = "Aurora MySQL"

    topology_source: str = AURORA_TOPOLOGY_SOURCE
    instance_id_query: str = AURORA_SERVER_ID
    is_reader_query: str = INNODB_READ_ONLY
    topology_query: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_select(self.instance_id_query, "instance_id_query")
        check_select(self.is_reader_query, "is_reader_query")
        object.__setattr__(self, "topology_query", aurora_topology_query(self.topology_source))

    @property
    def is_lookalike(self) -> bool:
        """Reads a topology source other than Aurora's own (the simulator's)."""
        return self.topology_source != AURORA_TOPOLOGY_SOURCE

    @property
    def description(self) -> str:
        if self.is_lookalike:
            return f"an Aurora MySQL look-alike (topology in {self.topology_source})"
        return self.title

    def probe(self) -> Probe:
        if self.is_lookalike:
            return (yield from self._probe_lookalike())
        answer = yield AURORA_VERSION
        if not answer.ok:
            return Verdict(False, (failed("aurora_version", answer),))
        version = variable(answer, "aurora_version")
        if version is None:
            return Verdict(False, ("variable aurora_version does not exist",))
        return Verdict(True, (f"aurora_version = {shown(version)}",))

    def _probe_lookalike(self) -> Probe:
        schema, table = self.topology_source.split(".")
        where = f"table_schema = '{schema}' AND table_name = '{table}'"
        answer = yield f"SELECT table_name FROM information_schema.tables WHERE {where}"
        name = f"look-alike topology source {self.topology_source}"
        if not answer.ok:
            return Verdict(False, (failed(name, answer),))
        if not answer.rows:
            return Verdict(False, (f"{name} does not exist",))
        answer = yield f"SELECT SERVER_ID FROM {self.topology_source} LIMIT 1"
        if not answer.ok:
            return Verdict(False, (failed(name, answer),))
        if not answer.rows:
            return Verdict(False, (f"{name} is empty",))
        return Verdict(True, (f"{name} has rows (aurora_version not checked: look-alike)",))

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
class GlobalAuroraMysqlDialect(AuroraMysqlDialect):
    """Aurora MySQL in a Global Database: the topology of every region, from
    ``information_schema.aurora_global_db_instance_status`` (``global_topology_source``: the
    look-alike's table in the simulator). Never detected (see ``GlobalAuroraPgDialect``)."""

    code: ClassVar[str] = "global-aurora-mysql"
    title: ClassVar[str] = "Aurora MySQL Global Database"

    global_topology_source: str = GLOBAL_TOPOLOGY_SOURCE

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "topology_query",
                           global_topology_query(self.global_topology_source))

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
class MultiAzMysqlDialect(MysqlDialect):
    """RDS Multi-AZ DB cluster, MySQL: topology from ``mysql.rds_topology``; the writer from
    ``SHOW REPLICA STATUS`` on a reader."""

    code: ClassVar[str] = "multi-az-mysql"
    title: ClassVar[str] = "an RDS Multi-AZ DB cluster (MySQL)"

    instance_id_query: str = SERVER_ID
    topology_query: str | None = MULTI_AZ_TOPOLOGY
    writer_id_query: str | None = REPLICA_STATUS

    def probe(self) -> Probe:
        answer = yield RDS_TOPOLOGY_COLUMNS
        if not answer.ok:
            return Verdict(False, (failed("mysql.rds_topology", answer),))
        columns = tuple(text(row[0]) or "" for row in answer.rows)
        if not columns:
            return Verdict(False, ("table mysql.rds_topology does not exist",))
        if "id" not in {c.lower() for c in columns}:
            listed = ", ".join(columns)
            return Verdict(
                False,
                (f"table mysql.rds_topology has columns ({listed}), no id: blue/green "
                 "metadata, not a Multi-AZ topology",),
            )
        answer = yield RDS_TOPOLOGY_HAS_ROWS
        if not answer.ok:
            return Verdict(False, (failed("reading mysql.rds_topology", answer),))
        if not answer.rows:
            return Verdict(False, ("table mysql.rds_topology is empty",))
        seen = ("table mysql.rds_topology has rows",)
        matched, line = _report_host((yield REPORT_HOST))
        return Verdict(matched, (*seen, line))

    def parse_writer_id(self, rows: Rows) -> str | None:
        """The writer's server id from a ``SHOW REPLICA STATUS`` row; ``None`` on the writer
        (no row)."""
        if not rows or len(rows[0]) <= SOURCE_SERVER_ID_COLUMN:
            return None
        value = rows[0][SOURCE_SERVER_ID_COLUMN]
        return None if value in (None, 0, "0", "") else text(value)

    def parse_topology(
        self,
        rows: Rows,
        *,
        writer_id: str | None = None,
        now: datetime | None = None,
        max_age: float = STALE_AFTER,
    ) -> Topology:
        return multi_az_topology(rows, writer_id)
