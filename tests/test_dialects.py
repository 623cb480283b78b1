"""Database dialects without a server: detection paths, verification errors, parsing, staleness,
schema qualification of every internal statement, and the per-endpoint cache.

Servers are described as canned answers to the exact statements the dialects send; a small
typed fake driver serves them.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from resilient_db import errors
from resilient_db._decisions import CollectingSink, set_decision_sink
from resilient_db.dialects import (
    DETECTION_ORDER,
    STALE_AFTER,
    Answer,
    AuroraMysqlDialect,
    AuroraPgDialect,
    DatabaseDialect,
    MultiAzMysqlDialect,
    MultiAzPgDialect,
    PgDialect,
    TopologyRow,
    Verdict,
    base,
    cached_detect,
    clear_cache,
    detect,
    detection_flow,
    drop_stale,
    get_dialect,
    mysql,
    pg,
    run_detection,
    verification_flow,
    verify,
)

pytestmark = pytest.mark.unit

Canned = Mapping[str, "Sequence[tuple[Any, ...]] | Exception"]


class FakeQueryError(Exception):
    """A statement the server refused (missing table, no privilege)."""


class FakeDisconnectError(Exception):
    """The connection was lost."""


class FakeDriver:
    """Answers the statements it knows from canned rows; any other statement fails like a
    missing table would, and is recorded in ``unexpected``."""

    def __init__(self, code: str, answers: Canned, *, delay: float = 0.0) -> None:
        self._code = code
        self.answers = dict(answers)
        self.asked: list[str] = []
        self.unexpected: list[str] = []
        self.delay = delay
        self._lock = threading.Lock()

    @property
    def code(self) -> str:
        return self._code

    def query(self, conn: Any, sql: str) -> list[tuple[Any, ...]]:
        with self._lock:
            self.asked.append(sql)
        if self.delay:
            time.sleep(self.delay)
        if sql not in self.answers:
            self.unexpected.append(sql)
            raise FakeQueryError(f"relation for {sql!r} does not exist")
        answer = self.answers[sql]
        if isinstance(answer, Exception):
            raise answer
        return [tuple(row) for row in answer]

    def is_disconnect(self, exc: BaseException) -> bool:
        return isinstance(exc, FakeDisconnectError)


CONN = object()  # the fakes never look at the connection

# --- canned servers ------------------------------------------------------------------------------

PG_VERSION = [("PostgreSQL 15.20 on x86_64-pc-linux-gnu",)]
AURORA_FUNCS = [("pg_catalog", "aurora_replica_status"),
                ("pg_catalog", "aurora_db_instance_identifier")]
MULTI_AZ_FUNCS = [("rds_tools", "show_topology"), ("rds_tools", "dbi_resource_id"),
                  ("rds_tools", "multi_az_db_cluster_source_dbi_resource_id")]


def pg_server(
    extensions: str | None = None, functions: Sequence[tuple[str, str]] = ()
) -> FakeDriver:
    return FakeDriver("psycopg", {
        pg.VERSION: PG_VERSION,
        pg.RDS_EXTENSIONS: [] if extensions is None else [(extensions,)],
        pg.FUNCTIONS: list(functions),
    })


def plain_pg() -> FakeDriver:
    return pg_server()


def rds_pg() -> FakeDriver:
    return pg_server("rds_tools,plpgsql")


def aurora_pg() -> FakeDriver:
    return pg_server("aurora_stat_utils,rds_tools,plpgsql", AURORA_FUNCS)


def multi_az_pg() -> FakeDriver:
    return pg_server("rds_tools,plpgsql", MULTI_AZ_FUNCS)


def mysql_server(
    *,
    aurora_version: str | None = None,
    version_comment: str = "Debian 12",
    report_host: str = "",
    rds_topology_columns: Sequence[str] = (),
    rds_topology_rows: Sequence[tuple[Any, ...]] | Exception = (),
) -> FakeDriver:
    answers: dict[str, Sequence[tuple[Any, ...]] | Exception] = {
        mysql.VERSION: [("10.11.19-MariaDB", version_comment)],
        mysql.AURORA_VERSION: [] if aurora_version is None else [
            ("aurora_version", aurora_version)],
        mysql.VERSION_COMMENT: [("version_comment", version_comment)],
        mysql.REPORT_HOST: [("report_host", report_host)],
        mysql.RDS_TOPOLOGY_COLUMNS: [(c,) for c in rds_topology_columns],
    }
    if rds_topology_columns:
        answers[mysql.RDS_TOPOLOGY_HAS_ROWS] = (
            rds_topology_rows if isinstance(rds_topology_rows, Exception)
            else list(rds_topology_rows)
        )
    return FakeDriver("mysql-connector", answers)


def rds_mysql() -> FakeDriver:
    return mysql_server(version_comment="Source distribution", report_host="10.0.0.5")


def multi_az_mysql() -> FakeDriver:
    return mysql_server(version_comment="Source distribution", report_host="10.0.0.5",
                        rds_topology_columns=("id", "endpoint", "port"),
                        rds_topology_rows=[(1,)])


# --- detection -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("server", "expected"), [
    (plain_pg, "pg"),
    (rds_pg, "rds-pg"),
    (aurora_pg, "aurora-pg"),
    (multi_az_pg, "multi-az-pg"),
    (mysql_server, "mysql"),
    (rds_mysql, "rds-mysql"),
    (lambda: mysql_server(aurora_version="3.05.2"), "aurora-mysql"),
    (multi_az_mysql, "multi-az-mysql"),
])
def test_detect_each_dialect(server: Any, expected: str) -> None:
    fake: FakeDriver = server()
    dialect = detect(fake, CONN)
    assert dialect.code == expected
    assert dialect is get_dialect(expected)


@pytest.mark.parametrize("server", [plain_pg, rds_pg, aurora_pg, multi_az_pg])
def test_pg_checks_are_catalog_lookups_that_never_fail(server: Any) -> None:
    # A failing statement would abort a transaction the application has open.
    fake: FakeDriver = server()
    detect(fake, CONN)
    assert fake.unexpected == []
    assert set(fake.asked) <= {pg.VERSION, pg.RDS_EXTENSIONS, pg.FUNCTIONS}


def test_shared_statements_are_asked_once() -> None:
    fake = plain_pg()
    detection = run_detection(fake, CONN)
    # aurora-pg and rds-pg both read rds.extensions
    assert fake.asked.count(pg.RDS_EXTENSIONS) == 1
    assert fake.asked == [pg.RDS_EXTENSIONS, pg.FUNCTIONS, pg.VERSION]
    assert detection.checks == (
        "aurora-pg: pg_settings rds.extensions is not set",
        "multi-az-pg: pg_proc: rds_tools.show_topology(), "
        "rds_tools.multi_az_db_cluster_source_dbi_resource_id() do not exist",
        "rds-pg: pg_settings rds.extensions is not set",
        "pg: version() = 'PostgreSQL 15.20 on x86_64-pc-linux-gnu'",
    )


def test_check_lines_say_what_was_seen() -> None:
    detection = run_detection(rds_pg(), CONN)
    assert detection.checks[0] == (
        "aurora-pg: pg_settings rds.extensions = 'rds_tools,plpgsql' (no aurora_stat_utils)")
    assert detection.checks[-1] == (
        "rds-pg: pg_settings rds.extensions = 'rds_tools,plpgsql' (has rds_tools)")


def test_aurora_extension_without_topology_function_is_not_aurora() -> None:
    fake = pg_server("aurora_stat_utils,rds_tools")
    detection = run_detection(fake, CONN)
    assert detection.dialect.code == "pg"  # and not rds-pg: the extensions say Aurora
    assert "aurora-pg: function pg_catalog.aurora_replica_status() does not exist" in (
        detection.checks)
    assert any("Aurora, not RDS" in line for line in detection.checks)


def test_multi_az_pg_needs_both_functions() -> None:
    fake = pg_server("rds_tools", [("rds_tools", "show_topology")])
    detection = run_detection(fake, CONN)
    assert detection.dialect.code == "rds-pg"
    assert ("multi-az-pg: pg_proc: rds_tools.multi_az_db_cluster_source_dbi_resource_id() "
            "does not exist") in detection.checks


def test_rds_mysql_needs_report_host() -> None:
    fake = mysql_server(version_comment="Source distribution", report_host="")
    detection = run_detection(fake, CONN)
    assert detection.dialect.code == "mysql"
    assert "rds-mysql: report_host is not set" in detection.checks


def test_blue_green_rds_topology_is_not_multi_az() -> None:
    fake = mysql_server(version_comment="Source distribution", report_host="10.0.0.5",
                        rds_topology_columns=("version", "endpoint", "port", "role", "status"),
                        rds_topology_rows=[(1,)])
    detection = run_detection(fake, CONN)
    assert detection.dialect.code == "rds-mysql"
    assert any("no id: blue/green" in line for line in detection.checks)
    assert mysql.RDS_TOPOLOGY_HAS_ROWS not in fake.asked


def test_empty_rds_topology_is_not_multi_az() -> None:
    fake = mysql_server(version_comment="Source distribution", report_host="h",
                        rds_topology_columns=("id", "endpoint", "port"), rds_topology_rows=[])
    assert detect(fake, CONN).code == "rds-mysql"


def test_failed_check_statement_counts_as_no() -> None:
    denied = FakeQueryError("SELECT command denied to user for table 'rds_topology'")
    fake = mysql_server(version_comment="Source distribution", report_host="h",
                        rds_topology_columns=("id", "endpoint", "port"), rds_topology_rows=denied)
    detection = run_detection(fake, CONN)
    assert detection.dialect.code == "rds-mysql"
    assert any("failed (FakeQueryError: SELECT command denied" in line and "counts as no" in line
               for line in detection.checks)


def test_lost_connection_during_detection_propagates_untouched() -> None:
    lost = FakeDisconnectError("server closed the connection unexpectedly")
    fake = FakeDriver("psycopg", {pg.RDS_EXTENSIONS: lost})
    with pytest.raises(FakeDisconnectError) as info:
        detect(fake, CONN)
    assert info.value is lost


def test_detection_is_an_io_free_flow() -> None:
    flow = detection_flow("pg")
    assert next(flow) == pg.RDS_EXTENSIONS
    assert flow.send(Answer(rows=(("aurora_stat_utils",),))) == pg.FUNCTIONS
    with pytest.raises(StopIteration) as stop:
        flow.send(Answer(rows=(("pg_catalog", "aurora_replica_status"),)))
    assert stop.value.value.dialect.code == "aurora-pg"


def test_probe_of_one_dialect_with_canned_answers() -> None:
    probe = AuroraPgDialect().probe()
    assert next(probe) == pg.RDS_EXTENSIONS
    with pytest.raises(StopIteration) as stop:
        probe.send(Answer(rows=()))
    assert stop.value.value == Verdict(False, ("pg_settings rds.extensions is not set",))


def test_unknown_driver_family() -> None:
    with pytest.raises(errors.ConfigurationError, match="no database family"):
        detect(FakeDriver("odbc", {}), CONN)


# --- verification (wrapper_dialect) ---------------------------------------------------------------


def test_forcing_aurora_pg_on_plain_pg_names_the_culprit() -> None:
    with pytest.raises(errors.DialectMismatchError) as info:
        verify("aurora-pg", plain_pg(), CONN)
    err = info.value
    assert str(err) == (
        "wrapper_dialect='aurora-pg' but the server does not look like Aurora PostgreSQL: "
        "pg_settings rds.extensions is not set; detected 'pg'. Remove wrapper_dialect (or set "
        "it to 'pg') or point at an Aurora PostgreSQL endpoint"
    )
    assert err.dialect == "aurora-pg"
    assert err.parameter == "wrapper_dialect"
    assert isinstance(err, errors.ConfigurationError)
    assert isinstance(err, ValueError)
    assert err.checks[0] == "aurora-pg: pg_settings rds.extensions is not set"
    assert "pg: version() = 'PostgreSQL 15.20 on x86_64-pc-linux-gnu'" in err.checks
    assert len(err.checks) == len(set(err.checks))


def test_forcing_aurora_pg_on_rds_pg_says_what_it_saw() -> None:
    with pytest.raises(errors.DialectMismatchError) as info:
        verify("aurora-pg", rds_pg(), CONN)
    message = str(info.value)
    assert "pg_settings rds.extensions = 'rds_tools,plpgsql' (no aurora_stat_utils)" in message
    assert "detected 'rds-pg'" in message


def test_forcing_multi_az_mysql_on_mysql() -> None:
    with pytest.raises(errors.DialectMismatchError) as info:
        verify("multi-az-mysql", mysql_server(), CONN)
    message = str(info.value)
    assert message.startswith(
        "wrapper_dialect='multi-az-mysql' but the server does not look like an RDS Multi-AZ "
        "DB cluster (MySQL): table mysql.rds_topology does not exist; detected 'mysql'")
    assert message.endswith("point at an RDS Multi-AZ DB cluster (MySQL) endpoint")


@pytest.mark.parametrize(("forced", "server"), [
    ("pg", rds_pg),
    ("pg", aurora_pg),
    ("pg", multi_az_pg),
    ("rds-pg", multi_az_pg),
    ("pg", plain_pg),
    ("aurora-pg", aurora_pg),
    ("multi-az-pg", multi_az_pg),
    ("mysql", rds_mysql),
    ("mysql", multi_az_mysql),
    ("rds-mysql", multi_az_mysql),
    ("multi-az-mysql", multi_az_mysql),
])
def test_forcing_a_matching_or_less_specific_dialect_is_accepted(forced: str, server: Any) -> None:
    fake: FakeDriver = server()
    assert verify(forced, fake, CONN) is get_dialect(forced)


def test_forcing_rds_pg_on_plain_pg_reads_well() -> None:
    with pytest.raises(errors.DialectMismatchError) as info:
        verify("rds-pg", plain_pg(), CONN)
    assert str(info.value).endswith(
        "Remove wrapper_dialect (or set it to 'pg') or point at an RDS for PostgreSQL endpoint")


def test_forcing_rds_pg_on_aurora_is_refused() -> None:
    with pytest.raises(errors.DialectMismatchError, match=r"Aurora, not RDS.*detected 'aurora-pg'"):
        verify("rds-pg", aurora_pg(), CONN)


def test_verification_stops_at_the_forced_checks_when_they_pass() -> None:
    fake = aurora_pg()
    verify("aurora-pg", fake, CONN)
    assert fake.asked == [pg.RDS_EXTENSIONS, pg.FUNCTIONS]


def test_family_mismatch_is_refused_without_asking_the_server() -> None:
    fake = plain_pg()
    with pytest.raises(errors.DialectMismatchError) as info:
        verify("aurora-mysql", fake, CONN)
    assert str(info.value) == (
        "wrapper_dialect='aurora-mysql' is a MySQL dialect but the connection uses the psycopg "
        "driver (PostgreSQL); use one of aurora-pg, multi-az-pg, rds-pg, pg, or remove "
        "wrapper_dialect"
    )
    assert info.value.dialect == "aurora-mysql"
    assert fake.asked == []


def test_verification_flow_is_io_free() -> None:
    flow = verification_flow(get_dialect("rds-mysql"), "mysql")
    assert next(flow) == mysql.VERSION_COMMENT
    sql = flow.send(Answer(rows=(("version_comment", "Debian 12"),)))
    assert sql == mysql.AURORA_VERSION  # now detecting what it is instead
    answers = {
        mysql.AURORA_VERSION: Answer(),
        mysql.RDS_TOPOLOGY_COLUMNS: Answer(),
        mysql.VERSION: Answer(rows=(("10.11", "Debian 12"),)),
    }
    with pytest.raises(StopIteration) as stop:
        while True:
            sql = flow.send(answers[sql])
    outcome = stop.value.value
    assert not outcome.matched
    assert outcome.detected.dialect.code == "mysql"
    # version_comment was answered once, for both the forced check and detection
    assert mysql.VERSION_COMMENT not in answers


def test_unknown_dialect_code() -> None:
    with pytest.raises(errors.ConfigurationError, match="unknown database dialect 'aurora'"):
        get_dialect("aurora")


def test_every_registered_code_is_a_known_property_value() -> None:
    from resilient_db._params import DIALECT_CODES

    assert sorted(DETECTION_ORDER["pg"] + DETECTION_ORDER["mysql"]) == sorted(DIALECT_CODES)
    for code in DIALECT_CODES:
        dialect = get_dialect(code)
        assert dialect.code == code
        assert dialect.family == ("pg" if code.endswith("pg") else "mysql")
        assert dialect.default_port == (5432 if dialect.family == "pg" else 3306)


# --- the Aurora-MySQL look-alike ------------------------------------------------------------------

LOOKALIKE_SOURCE = "aurora_sim.replica_host_status"
LOOKALIKE_EXISTS = ("SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = 'aurora_sim' AND table_name = 'replica_host_status'")
LOOKALIKE_ROWS = "SELECT SERVER_ID FROM aurora_sim.replica_host_status LIMIT 1"


def lookalike() -> AuroraMysqlDialect:
    return AuroraMysqlDialect(topology_source=LOOKALIKE_SOURCE,
                              instance_id_query="SELECT @@report_host",
                              is_reader_query="SELECT @@read_only")


def test_lookalike_reads_its_own_source() -> None:
    dialect = lookalike()
    assert dialect.is_lookalike
    assert dialect.code == "aurora-mysql"
    assert dialect.topology_query is not None
    assert dialect.topology_query.endswith("FROM aurora_sim.replica_host_status")
    assert dialect.instance_id_query == "SELECT @@report_host"
    production = get_dialect("aurora-mysql")
    assert isinstance(production, AuroraMysqlDialect)
    assert not production.is_lookalike
    assert production.topology_query == (
        "SELECT SERVER_ID, SESSION_ID, CPU, REPLICA_LAG_IN_MILLISECONDS, LAST_UPDATE_TIMESTAMP, "
        "NOW(6) FROM information_schema.replica_host_status")
    assert production.instance_id_query == "SELECT @@aurora_server_id"
    assert production.is_reader_query == "SELECT @@innodb_read_only"


def test_lookalike_is_verified_by_its_source_not_aurora_version() -> None:
    fake = mysql_server()
    fake.answers[LOOKALIKE_EXISTS] = [("replica_host_status",)]
    fake.answers[LOOKALIKE_ROWS] = [("instance-1",)]
    dialect = lookalike()
    assert verify(dialect, fake, CONN) is dialect
    assert mysql.AURORA_VERSION not in fake.asked
    # ... and detection never picks it: it is configured, not detected
    assert detect(fake, CONN).code == "mysql"


def test_lookalike_without_its_source_is_refused() -> None:
    fake = mysql_server()
    fake.answers[LOOKALIKE_EXISTS] = []
    with pytest.raises(errors.DialectMismatchError) as info:
        verify(lookalike(), fake, CONN)
    assert str(info.value).startswith(
        "wrapper_dialect='aurora-mysql' but the server does not look like an Aurora MySQL "
        "look-alike (topology in aurora_sim.replica_host_status): look-alike topology source "
        "aurora_sim.replica_host_status does not exist; detected 'mysql'")
    assert fake.unexpected == []


@pytest.mark.parametrize("source", [
    "replica_host_status", "a.b.c", "x.y; DROP TABLE t", "x.`y`", ""])
def test_lookalike_source_must_be_a_qualified_table(source: str) -> None:
    with pytest.raises(ValueError, match="schema-qualified table name"):
        AuroraMysqlDialect(topology_source=source)


@pytest.mark.parametrize("query", ["DROP TABLE t", "SELECT 1; DROP TABLE t", ""])
def test_lookalike_instance_query_must_be_one_select(query: str) -> None:
    with pytest.raises(ValueError, match="single SELECT"):
        AuroraMysqlDialect(topology_source=LOOKALIKE_SOURCE, instance_id_query=query)


# --- parsing --------------------------------------------------------------------------------------

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def ago(seconds: float, now: datetime = NOW) -> datetime:
    return now - timedelta(seconds=seconds)


def aurora_row(instance: str, writer: bool, lag_ms: Any, updated: datetime | None,
               now: datetime = NOW) -> tuple[Any, ...]:
    session = "MASTER_SESSION_ID" if writer else f"session-{instance}"
    return (instance, session, Decimal("12.5"), lag_ms, updated, now)


def test_aurora_topology_rows() -> None:
    rows = [aurora_row("w", True, None, ago(1)), aurora_row("r1", False, 250, ago(2))]
    topology = get_dialect("aurora-pg").parse_topology(rows)
    assert topology.server_time == NOW
    assert topology.writer == TopologyRow("w", True, 12.5, None, ago(1))
    assert topology.readers == (TopologyRow("r1", False, 12.5, 0.25, ago(2)),)
    assert topology.ignored == ()
    assert isinstance(topology.readers[0].cpu, float)


def test_aurora_topology_drops_stale_readers_but_never_the_writer() -> None:
    rows = [
        aurora_row("w", True, None, ago(3600)),
        aurora_row("fresh", False, 10, ago(299)),
        aurora_row("stale", False, 10, ago(301)),
        aurora_row("unknown", False, 10, None),
    ]
    topology = get_dialect("aurora-pg").parse_topology(rows)
    assert [r.instance_id for r in topology.rows] == ["w", "fresh", "unknown"]
    assert [r.instance_id for r in topology.ignored] == ["stale"]


def test_aurora_topology_uses_injected_now_over_server_clock() -> None:
    rows = [aurora_row("w", True, None, ago(0)), aurora_row("r", False, 1, ago(10))]
    later = NOW + timedelta(seconds=400)
    topology = get_dialect("aurora-mysql").parse_topology(rows, now=later)
    assert [r.instance_id for r in topology.rows] == ["w"]
    kept = get_dialect("aurora-mysql").parse_topology(rows, now=later, max_age=1000)
    assert len(kept.rows) == 2


def test_aurora_topology_with_naive_mysql_datetimes() -> None:
    naive_now = NOW.replace(tzinfo=None)
    rows = [
        ("w", "MASTER_SESSION_ID", 1.0, 0, ago(1, naive_now), naive_now),
        (b"r", b"abc", 2.0, 1500, ago(400, naive_now), naive_now),
    ]
    topology = get_dialect("aurora-mysql").parse_topology(rows)
    assert [r.instance_id for r in topology.rows] == ["w"]
    assert topology.ignored[0].instance_id == "r"
    assert topology.ignored[0].lag_seconds == 1.5


def test_two_writer_rows_keep_the_most_recently_updated() -> None:
    rows = [aurora_row("old", True, None, ago(20)), aurora_row("new", True, None, ago(1)),
            aurora_row("r", False, 5, ago(1))]
    topology = get_dialect("aurora-pg").parse_topology(rows)
    assert topology.writer is not None
    assert topology.writer.instance_id == "new"
    assert [r.instance_id for r in topology.rows] == ["new", "r"]
    assert [r.instance_id for r in topology.ignored] == ["old"]


def test_topology_without_writer() -> None:
    topology = get_dialect("aurora-pg").parse_topology([aurora_row("r", False, 5, ago(1))])
    assert topology.writer is None


def test_drop_stale_is_pure_with_injected_now() -> None:
    rows = [TopologyRow("a", False, last_update=ago(STALE_AFTER)),
            TopologyRow("b", False, last_update=ago(STALE_AFTER + 0.001)),
            TopologyRow("c", True, last_update=ago(10_000)),
            TopologyRow("d", False)]
    kept, stale = drop_stale(rows, NOW)
    assert [r.instance_id for r in kept] == ["a", "c", "d"]
    assert [r.instance_id for r in stale] == ["b"]
    kept, stale = drop_stale(rows, NOW, max_age=5)
    assert [r.instance_id for r in stale] == ["a", "b"]
    assert drop_stale(rows, NOW - timedelta(days=1)) == (tuple(rows), ())


def test_multi_az_topology_marks_the_writer_by_id() -> None:
    rows = [("db-AAA", "inst-1.abc.us-east-1.rds.amazonaws.com", 5432),
            ("db-BBB", "inst-2.abc.us-east-1.rds.amazonaws.com", Decimal(5432))]
    topology = get_dialect("multi-az-pg").parse_topology(rows, writer_id="db-BBB")
    assert topology.writer == TopologyRow(
        "db-BBB", True, endpoint="inst-2.abc.us-east-1.rds.amazonaws.com", port=5432)
    assert topology.readers[0].instance_id == "db-AAA"
    assert topology.readers[0].lag_seconds is None
    unknown = get_dialect("multi-az-mysql").parse_topology([(1, "h1", 3306), (2, "h2", 3306)])
    assert unknown.writer is None
    mysql_ids = get_dialect("multi-az-mysql").parse_topology(
        [(1, "h1", 3306), (2, b"h2", "3306"), (None, "h3", 3306)], writer_id="2")
    assert mysql_ids.writer == TopologyRow("2", True, endpoint="h2", port=3306)
    assert len(mysql_ids.rows) == 2


def test_dialects_without_topology_say_so() -> None:
    with pytest.raises(NotImplementedError, match="'pg' has no topology"):
        get_dialect("pg").parse_topology([])


def test_multi_az_writer_id() -> None:
    pg_dialect = get_dialect("multi-az-pg")
    assert pg_dialect.parse_writer_id([("db-AAA",)]) == "db-AAA"
    assert pg_dialect.parse_writer_id([(None,)]) is None  # on the writer
    assert pg_dialect.parse_writer_id([]) is None
    my = get_dialect("multi-az-mysql")
    status = tuple(["x"] * 39 + [1234567] + ["y"] * 20)  # SHOW REPLICA STATUS, column 39
    assert my.parse_writer_id([status]) == "1234567"
    assert my.parse_writer_id([]) is None  # the writer has no replica status
    assert my.parse_writer_id([tuple(["x"] * 39 + [0])]) is None
    assert get_dialect("aurora-pg").writer_id_query is None


def test_instance_id_parsing() -> None:
    assert get_dialect("aurora-pg").parse_instance_id([("instance-1",)]) == "instance-1"
    assert get_dialect("aurora-mysql").parse_instance_id([(b"instance-2",)]) == "instance-2"
    assert get_dialect("multi-az-mysql").parse_instance_id([(1234,)]) == "1234"
    assert get_dialect("pg").parse_instance_id([("10.0.0.1", 5432)]) == "10.0.0.1:5432"
    assert get_dialect("rds-pg").parse_instance_id([(None, None)]) is None  # Unix socket
    assert get_dialect("mysql").parse_instance_id([("db1", 3306)]) == "db1:3306"
    assert get_dialect("pg").parse_instance_id([]) is None


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), (1, True), (0, False), ("ON", True), ("OFF", False),
    (b"1", True), ("t", True), (None, None),
])
def test_is_reader_parsing(value: Any, expected: bool | None) -> None:
    assert get_dialect("aurora-mysql").parse_is_reader([(value,)]) is expected
    assert get_dialect("pg").parse_is_reader([]) is None


def test_dialects_are_immutable() -> None:
    dialect = get_dialect("aurora-pg")
    with pytest.raises(AttributeError):
        dialect.topology_query = "SELECT 1"  # type: ignore[misc]
    assert AuroraPgDialect() == dialect
    assert hash(AuroraPgDialect()) == hash(dialect)


# --- every internal statement is schema-qualified (DESIGN §10) -----------------------------------

_STRING = re.compile(r"'(?:[^']|'')*'")
_TABLE = re.compile(r"\b(?:FROM|JOIN)\s+([A-Za-z_][\w$]*(?:\.[A-Za-z_][\w$]*)?)(\s*\()?", re.I)
_CALL = re.compile(r"(?<![\w.@$])([A-Za-z_]\w*)\s*\(")
# Constructs that take parentheses but are grammar, not functions a user could shadow.
_SQL_GRAMMAR = frozenset({"in", "values", "exists", "coalesce", "nullif", "cast", "extract"})
# MySQL resolves these names to its built-ins before any stored function: not shadowable.
_MYSQL_BUILTINS = frozenset({"now"})


def unqualified(sql: str, family: str) -> list[str]:
    """Names in ``sql`` that the search path / current database could resolve."""
    body = _STRING.sub("''", sql)
    problems = [f"table {m.group(1)}" for m in _TABLE.finditer(body) if "." not in m.group(1)]
    for m in _CALL.finditer(body):
        name = m.group(1).lower()
        if name in _SQL_GRAMMAR or (family == "mysql" and name in _MYSQL_BUILTINS):
            continue
        problems.append(f"function {m.group(1)}()")
    return problems


@pytest.mark.parametrize(("sql", "family", "expected"), [
    ("SELECT pg_is_in_recovery()", "pg", ["function pg_is_in_recovery()"]),
    ("SELECT setting FROM pg_settings", "pg", ["table pg_settings"]),
    ("SELECT 1 FROM a.b JOIN c ON true", "pg", ["table c"]),
    ("SELECT id FROM aurora_replica_status()", "pg",
     ["table aurora_replica_status", "function aurora_replica_status()"]),
    ("SELECT NOW() FROM rds_topology", "mysql", ["table rds_topology"]),
    ("SELECT NOW()", "pg", ["function NOW()"]),
    ("SELECT 'f()' FROM x.y WHERE a IN ('b')", "pg", []),
])
def test_the_qualification_scanner_catches_offenders(
    sql: str, family: str, expected: list[str]
) -> None:
    assert unqualified(sql, family) == expected


class _YesToEverything:
    """Answers any statement with a row that makes every check step pass."""

    def answer(self, sql: str) -> Answer:
        if "pg_proc" in sql:
            return Answer(rows=tuple(AURORA_FUNCS + MULTI_AZ_FUNCS))
        if "rds.extensions" in sql:
            return Answer(rows=(("aurora_stat_utils,rds_tools",),))
        if "information_schema.columns" in sql:
            return Answer(rows=(("id",), ("endpoint",), ("port",)))
        if sql.startswith("SHOW VARIABLES LIKE '"):
            name = sql.split("'")[1]
            value = "Source distribution" if name == "version_comment" else "yes"
            return Answer(rows=((name, value),))
        return Answer(rows=(("x", "y"),))


def _statements_of(dialect: DatabaseDialect) -> Iterator[str]:
    for field_name in ("instance_id_query", "is_reader_query", "topology_query",
                       "writer_id_query"):
        sql = getattr(dialect, field_name)
        if sql is not None:
            yield sql
    for responder in (_YesToEverything().answer, lambda _: Answer(error="no")):
        probe = dialect.probe()
        try:
            sql = next(probe)
            while True:
                yield sql
                sql = probe.send(responder(sql))
        except StopIteration:
            pass


def _all_statements() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    dialects = [get_dialect(c) for order in DETECTION_ORDER.values() for c in order]
    for dialect in [*dialects, lookalike()]:
        found.extend((dialect.family, sql) for sql in _statements_of(dialect))
    for module, family in ((pg, "pg"), (mysql, "mysql")):
        for name, value in vars(module).items():
            if name.isupper() and isinstance(value, str) and value.startswith(("SELECT", "SHOW")):
                found.append((family, value))
    return sorted(set(found))


def test_every_internal_statement_is_schema_qualified() -> None:
    statements = _all_statements()
    assert len(statements) > 25  # the collection itself works
    offenders = {sql: unqualified(sql, family) for family, sql in statements}
    assert {sql: p for sql, p in offenders.items() if p} == {}


def test_pg_functions_live_in_pg_catalog_or_rds_tools() -> None:
    for family, sql in _all_statements():
        if family != "pg":
            continue
        for schema in re.findall(r"\b(\w+)\.\w+\s*\(", _STRING.sub("''", sql)):
            assert schema in {"pg_catalog", "rds_tools"}, sql


# --- the per-endpoint cache -----------------------------------------------------------------------


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def sink() -> Iterator[CollectingSink]:
    collecting = CollectingSink()
    old = set_decision_sink(collecting)
    yield collecting
    set_decision_sink(old)


@pytest.mark.usefixtures("fresh_cache")
def test_cache_detects_once_per_endpoint(sink: CollectingSink) -> None:
    fake = rds_pg()
    key = ("psycopg", "db.example", 5432)
    assert cached_detect(key, fake, CONN).code == "rds-pg"
    asked = len(fake.asked)
    assert cached_detect(key, fake, CONN).code == "rds-pg"
    assert len(fake.asked) == asked
    other = plain_pg()
    assert cached_detect(("psycopg", "db.example", 5433), other, CONN).code == "pg"
    decisions = sink.of_kind("dialect.detected")
    assert [d.attributes["resilient_db.dialect"] for d in decisions] == ["rds-pg", "pg"]
    assert decisions[0].attributes["server.address"] == "db.example"
    assert decisions[0].attributes["resilient_db.dialect.checks"][-1].startswith("rds-pg: ")


@pytest.mark.usefixtures("fresh_cache")
def test_cache_is_shared_by_concurrent_first_connections() -> None:
    fake = aurora_pg()
    fake.delay = 0.05
    key = ("psycopg", "cluster.example", 5432)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        cached_detect(key, fake, CONN).code)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["aurora-pg"] * 8
    assert fake.asked == [pg.RDS_EXTENSIONS, pg.FUNCTIONS]  # one detection


@pytest.mark.usefixtures("fresh_cache")
def test_cache_does_not_keep_failures_and_can_be_cleared() -> None:
    key = ("psycopg", "h", 5432)
    broken = FakeDriver("psycopg", {pg.RDS_EXTENSIONS: FakeDisconnectError("gone")})
    with pytest.raises(FakeDisconnectError):
        cached_detect(key, broken, CONN)
    assert cached_detect(key, plain_pg(), CONN).code == "pg"
    clear_cache(key)
    assert cached_detect(key, rds_pg(), CONN).code == "rds-pg"
    clear_cache(("psycopg", "elsewhere", 1))
    assert cached_detect(key, plain_pg(), CONN).code == "rds-pg"


@pytest.mark.usefixtures("fresh_cache")
def test_cache_with_forced_dialect_verifies_once() -> None:
    key = ("mysql-connector", "h", 3306)
    fake = rds_mysql()
    assert cached_detect(key, fake, CONN, forced="mysql").code == "mysql"
    assert cached_detect(key, fake, CONN, forced="mysql").code == "mysql"
    assert fake.asked == [mysql.VERSION]
    assert cached_detect(key, fake, CONN).code == "rds-mysql"  # detection is cached apart
    with pytest.raises(errors.DialectMismatchError):
        cached_detect(key, fake, CONN, forced="aurora-mysql")


def test_shared_helpers() -> None:
    assert base.text(bytearray(b"abc")) == "abc"
    assert base.number("x") is None
    assert base.timestamp("2025-01-01T00:00:00") == datetime(2025, 1, 1)
    assert base.timestamp("garbage") is None
    assert base.shown("x" * 100).endswith("...'")
    assert isinstance(PgDialect(), DatabaseDialect)
    assert isinstance(MultiAzPgDialect(), PgDialect)
    assert isinstance(MultiAzMysqlDialect(), mysql.MysqlDialect)


def test_single_writer_prefers_the_answering_instances_own_claim() -> None:
    # Aurora PostgreSQL 13.9+ reports NULL last_update_timestamp for the instance you are
    # connected to; during a failover the new writer's own (NULL) row must beat the old
    # writer's stale one.
    from resilient_db.dialects.base import TopologyRow, single_writer

    old = TopologyRow("instance-1", True, last_update=datetime.now(timezone.utc))
    mine = TopologyRow("instance-2", True, last_update=None)
    reader = TopologyRow("instance-3", False, last_update=datetime.now(timezone.utc))
    kept, superseded = single_writer([old, mine, reader])
    assert kept == (mine, reader)
    assert superseded == (old,)
