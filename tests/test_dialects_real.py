"""Database dialects against real servers started by the simulator's launcher: detection of
pg, rds-pg, mysql and rds-mysql, forced dialects, the transaction state detection leaves, and
the parse helpers on real answers. (Aurora and Multi-AZ clusters come with the simulator; their
detection is covered by tests/test_dialects.py until then.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mysql.connector
import psycopg
import pytest
from psycopg import pq

from resilient_db import errors
from resilient_db.dialects import (
    AuroraMysqlDialect,
    cached_detect,
    clear_cache,
    detect,
    get_dialect,
    run_detection,
    verify,
)
from resilient_db.drivers import DriverDialect, get_driver
from simulator.local import LocalServer

pytestmark = pytest.mark.real_server


def pg_connect(server: LocalServer, **extra: Any) -> Any:
    return psycopg.connect(**{**server.connect_kwargs(), **extra})


def mysql_connect(server: LocalServer, **extra: Any) -> Any:
    return mysql.connector.connect(use_pure=True, **{**server.connect_kwargs(), **extra})


@pytest.fixture
def pg_driver() -> DriverDialect:
    return get_driver("psycopg")


@pytest.fixture
def mysql_driver() -> DriverDialect:
    return get_driver("mysql-connector")


@pytest.fixture
def pg_conn(pg_server: LocalServer) -> Iterator[Any]:
    conn = pg_connect(pg_server)  # not autocommit: detection must not leave a transaction
    yield conn
    conn.close()


@pytest.fixture
def rds_pg_conn(rds_pg_server: LocalServer) -> Iterator[Any]:
    conn = pg_connect(rds_pg_server)
    yield conn
    conn.close()


@pytest.fixture
def mysql_conn(mysql_server: LocalServer) -> Iterator[Any]:
    conn = mysql_connect(mysql_server)
    yield conn
    conn.close()


@pytest.fixture
def rds_mysql_conn(rds_mysql_server: LocalServer) -> Iterator[Any]:
    # On this machine kind the launcher must manage the rds-mysql look-alike; if a MariaDB
    # release changes the binary layout, fail loudly rather than skip (simulator/local.py).
    assert rds_mysql_server.binary.name == "mariadbd-rds", (
        "the launcher could not patch an RDS version_comment into MariaDB "
        f"(runs {rds_mysql_server.binary}); see _patch_version_comment in simulator/local.py")
    conn = mysql_connect(rds_mysql_server)
    yield conn
    conn.close()


# --- detection -----------------------------------------------------------------------------------


def test_detects_plain_postgres(pg_driver: DriverDialect, pg_conn: Any) -> None:
    detection = run_detection(pg_driver, pg_conn)
    assert detection.dialect.code == "pg"
    assert detection.checks[0] == "aurora-pg: pg_settings rds.extensions is not set"
    assert detection.checks[-1].startswith("pg: version() = 'PostgreSQL 15")


def test_detects_rds_postgres(pg_driver: DriverDialect, rds_pg_conn: Any) -> None:
    detection = run_detection(pg_driver, rds_pg_conn)
    assert detection.dialect is get_dialect("rds-pg")
    assert detection.checks[-1].endswith("(has rds_tools)")


def test_detects_plain_mariadb(mysql_driver: DriverDialect, mysql_conn: Any) -> None:
    detection = run_detection(mysql_driver, mysql_conn)
    assert detection.dialect.code == "mysql"
    assert "multi-az-mysql: table mysql.rds_topology does not exist" in detection.checks
    assert "MariaDB" in detection.checks[-1]


def test_detects_rds_mysql(mysql_driver: DriverDialect, rds_mysql_conn: Any,
                           rds_mysql_server: LocalServer) -> None:
    detection = run_detection(mysql_driver, rds_mysql_conn)
    assert detection.dialect.code == "rds-mysql"
    assert detection.checks[-2:] == (
        "rds-mysql: version_comment = 'Source distribution'",
        f"rds-mysql: report_host = {rds_mysql_server.host!r}",
    )


def test_detection_leaves_an_idle_pg_connection_idle(pg_driver: DriverDialect,
                                                     rds_pg_conn: Any) -> None:
    assert not rds_pg_conn.autocommit
    detect(pg_driver, rds_pg_conn)
    assert rds_pg_conn.info.transaction_status == pq.TransactionStatus.IDLE
    with pytest.raises(errors.DialectMismatchError):
        verify("multi-az-pg", pg_driver, rds_pg_conn)
    assert rds_pg_conn.info.transaction_status == pq.TransactionStatus.IDLE


def test_detection_inside_an_open_pg_transaction_does_not_abort_it(
    pg_driver: DriverDialect, pg_conn: Any
) -> None:
    pg_conn.execute("CREATE TEMPORARY TABLE dialect_tx (v int)")
    pg_conn.execute("INSERT INTO dialect_tx VALUES (1)")
    assert detect(pg_driver, pg_conn).code == "pg"
    with pytest.raises(errors.DialectMismatchError):
        verify("aurora-pg", pg_driver, pg_conn)
    assert pg_conn.info.transaction_status == pq.TransactionStatus.INTRANS
    assert pg_conn.execute("SELECT v FROM dialect_tx").fetchall() == [(1,)]
    pg_conn.rollback()


def test_detection_leaves_a_mysql_connection_outside_a_transaction(
    mysql_driver: DriverDialect, mysql_conn: Any
) -> None:
    assert not mysql_conn.autocommit
    detect(mysql_driver, mysql_conn)
    assert not mysql_conn.in_transaction


def test_cached_detection_on_real_endpoints(pg_driver: DriverDialect, pg_conn: Any,
                                            pg_server: LocalServer) -> None:
    clear_cache()
    try:
        key = ("psycopg", pg_server.host, pg_server.port)
        assert cached_detect(key, pg_driver, pg_conn).code == "pg"
        assert cached_detect(key, pg_driver, pg_conn).code == "pg"
    finally:
        clear_cache()


# --- forced dialects ------------------------------------------------------------------------------


def test_forcing_aurora_pg_on_plain_postgres_fails(pg_driver: DriverDialect,
                                                   pg_conn: Any) -> None:
    with pytest.raises(errors.DialectMismatchError) as info:
        verify("aurora-pg", pg_driver, pg_conn)
    err = info.value
    assert str(err).startswith(
        "wrapper_dialect='aurora-pg' but the server does not look like Aurora PostgreSQL: "
        "pg_settings rds.extensions is not set; detected 'pg'.")
    assert err.dialect == "aurora-pg"
    assert err.checks[0] == "aurora-pg: pg_settings rds.extensions is not set"
    assert any(line.startswith("multi-az-pg: pg_proc: ") for line in err.checks)
    assert err.checks[-1].startswith("pg: version() = ")
    assert pg_conn.info.transaction_status == pq.TransactionStatus.IDLE


def test_forcing_aurora_pg_on_rds_postgres_fails(pg_driver: DriverDialect,
                                                 rds_pg_conn: Any) -> None:
    with pytest.raises(errors.DialectMismatchError,
                       match=r"\(no aurora_stat_utils\); detected 'rds-pg'"):
        verify("aurora-pg", pg_driver, rds_pg_conn)


def test_forcing_pg_on_rds_postgres_is_a_legitimate_downgrade(pg_driver: DriverDialect,
                                                              rds_pg_conn: Any) -> None:
    assert verify("pg", pg_driver, rds_pg_conn) is get_dialect("pg")
    assert verify("rds-pg", pg_driver, rds_pg_conn) is get_dialect("rds-pg")


def test_forcing_rds_pg_on_plain_postgres_fails(pg_driver: DriverDialect, pg_conn: Any) -> None:
    with pytest.raises(errors.DialectMismatchError, match="does not look like RDS for PostgreSQL"):
        verify("rds-pg", pg_driver, pg_conn)


def test_forcing_a_mysql_dialect_on_a_psycopg_connection(pg_driver: DriverDialect,
                                                         pg_conn: Any) -> None:
    with pytest.raises(errors.DialectMismatchError,
                       match="'mysql' is a MySQL dialect but the connection uses the psycopg"):
        verify("mysql", pg_driver, pg_conn)


def test_forcing_mysql_dialects_on_mariadb(mysql_driver: DriverDialect, mysql_conn: Any) -> None:
    assert verify("mysql", mysql_driver, mysql_conn) is get_dialect("mysql")
    with pytest.raises(errors.DialectMismatchError) as info:
        verify("aurora-mysql", mysql_driver, mysql_conn)
    assert "variable aurora_version does not exist; detected 'mysql'" in str(info.value)
    with pytest.raises(errors.DialectMismatchError, match="uses the mysql-connector driver"):
        verify("pg", mysql_driver, mysql_conn)
    assert not mysql_conn.in_transaction


def test_forcing_mysql_on_rds_mysql_is_a_legitimate_downgrade(
    mysql_driver: DriverDialect, rds_mysql_conn: Any
) -> None:
    assert verify("mysql", mysql_driver, rds_mysql_conn) is get_dialect("mysql")
    with pytest.raises(errors.DialectMismatchError, match="detected 'rds-mysql'"):
        verify("multi-az-mysql", mysql_driver, rds_mysql_conn)


def test_lookalike_source_missing_on_mariadb(mysql_driver: DriverDialect,
                                            mysql_conn: Any) -> None:
    lookalike = AuroraMysqlDialect(topology_source="aurora_sim.replica_host_status",
                                   instance_id_query="SELECT @@report_host")
    with pytest.raises(errors.DialectMismatchError,
                       match=r"aurora_sim\.replica_host_status does not exist; detected 'mysql'"):
        verify(lookalike, mysql_driver, mysql_conn)


# --- the statements and parse helpers on real answers --------------------------------------------


def test_pg_instance_id_and_role(pg_driver: DriverDialect, pg_conn: Any,
                                 pg_server: LocalServer) -> None:
    dialect = detect(pg_driver, pg_conn)
    instance = dialect.parse_instance_id(pg_driver.query(pg_conn, dialect.instance_id_query))
    assert instance == f"{pg_server.host}:{pg_server.port}"
    assert dialect.parse_is_reader(pg_driver.query(pg_conn, dialect.is_reader_query)) is False
    assert pg_conn.info.transaction_status == pq.TransactionStatus.IDLE


def test_mysql_instance_id_and_role(mysql_driver: DriverDialect, mysql_conn: Any,
                                    mysql_server: LocalServer) -> None:
    dialect = detect(mysql_driver, mysql_conn)
    instance = dialect.parse_instance_id(
        mysql_driver.query(mysql_conn, dialect.instance_id_query))
    assert instance is not None
    assert instance.endswith(f":{mysql_server.port}")
    reader = dialect.parse_is_reader(mysql_driver.query(mysql_conn, dialect.is_reader_query))
    assert reader is False


def test_mariadb_replica_status_layout(mysql_driver: DriverDialect, mysql_conn: Any) -> None:
    # Multi-AZ reads the writer's id from column 39 of SHOW REPLICA STATUS; MariaDB names it
    # Master_Server_Id (MySQL 8: Source_Server_Id) at the same position.
    cur = mysql_conn.cursor()
    cur.execute(get_dialect("multi-az-mysql").writer_id_query)
    cur.fetchall()
    assert cur.column_names[39] == "Master_Server_Id"
    cur.close()
    assert get_dialect("multi-az-mysql").parse_writer_id([]) is None  # a primary: no row
