"""Driver dialects against real servers: abort, transaction status, error classification,
internal queries, and the driver internals we depend on."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import mysql.connector
import psycopg
import pytest
from psycopg.rows import dict_row

from resilient_db.drivers import TxStatus, get_driver

from .conftest import Backend

pytestmark = pytest.mark.real_server

DRIVER = {"pg": "psycopg", "mysql": "mysql-connector"}
SLEEP = {"pg": "SELECT pg_sleep(60)", "mysql": "SELECT SLEEP(60)"}


def _driver(b: Backend) -> Any:
    return get_driver(DRIVER[b.name])


def test_abort_from_another_thread_wakes_a_blocked_query(backend: Backend) -> None:
    driver = _driver(backend)
    conn = backend.raw(autocommit=True)
    timer = threading.Timer(0.5, driver.abort, args=(conn,))
    timer.start()
    start = time.monotonic()
    with pytest.raises(backend.operational_error if backend.name == "pg"
                       else mysql.connector.errors.Error) as info:
        cur = conn.cursor()
        cur.execute(SLEEP[backend.name])
        cur.fetchall()
    assert time.monotonic() - start < 20  # liveness bound: woken by abort, not the 60 s sleep
    assert driver.is_disconnect(info.value), repr(info.value)
    assert driver.is_closed(conn) or driver.transaction_status(conn) == TxStatus.UNKNOWN
    timer.join()
    conn.close()


def test_abort_on_closed_connection_is_harmless(backend: Backend) -> None:
    driver = _driver(backend)
    conn = backend.raw()
    conn.close()
    assert driver.abort(conn) is False
    assert driver.is_closed(conn)


def test_transaction_status(backend: Backend) -> None:
    driver = _driver(backend)
    table = backend.table()
    conn = backend.raw()
    assert driver.transaction_status(conn) == TxStatus.IDLE
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    assert driver.transaction_status(conn) == TxStatus.IN_TRANSACTION
    if backend.name == "pg":
        with pytest.raises(psycopg.errors.UniqueViolation):
            cur.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert driver.transaction_status(conn) == TxStatus.IN_ERROR
    conn.rollback()
    assert driver.transaction_status(conn) == TxStatus.IDLE
    conn.close()
    assert driver.transaction_status(conn) == TxStatus.UNKNOWN


def test_read_only_error_classification(backend: Backend) -> None:
    driver = _driver(backend)
    table = backend.table()
    conn = backend.raw()
    cur = conn.cursor()
    if backend.name == "pg":
        cur.execute("BEGIN READ ONLY")
    else:
        cur.execute("START TRANSACTION READ ONLY")
    with pytest.raises(Exception) as info:
        cur.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    assert driver.is_read_only_error(info.value)
    assert not driver.is_disconnect(info.value)
    conn.rollback()
    conn.close()


def test_unique_violation_is_neither_disconnect_nor_read_only(backend: Backend) -> None:
    driver = _driver(backend)
    table = backend.table()
    conn = backend.raw(autocommit=True)
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    with pytest.raises(backend.unique_violation) as info:
        cur.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    assert not driver.is_disconnect(info.value)
    assert not driver.is_read_only_error(info.value)
    conn.close()


def test_server_side_kill_is_a_disconnect(backend: Backend) -> None:
    driver = _driver(backend)
    victim = backend.raw(autocommit=True)
    killer = backend.raw(autocommit=True)
    vcur, kcur = victim.cursor(), killer.cursor()
    if backend.name == "pg":
        vcur.execute("SELECT pg_backend_pid()")
        pid = vcur.fetchone()[0]
        kcur.execute(f"SELECT pg_terminate_backend({pid})")
    else:
        vcur.execute("SELECT CONNECTION_ID()")
        pid = vcur.fetchone()[0]
        kcur.execute(f"KILL {pid}")
    time.sleep(0.2)
    with pytest.raises(Exception) as info:
        vcur.execute("SELECT 1")
        vcur.fetchall()
    assert driver.is_disconnect(info.value), repr(info.value)
    killer.close()
    victim.close()


def test_query_is_tuple_rows_and_leaves_transaction_state(backend: Backend) -> None:
    driver = _driver(backend)
    extra = {"row_factory": dict_row} if backend.name == "pg" else {}
    conn = backend.raw(**extra)
    rows = driver.query(conn, "SELECT 1, 'a'")
    assert rows == [(1, "a")]
    assert driver.transaction_status(conn) == TxStatus.IDLE  # implicit transaction undone
    # Inside the application's transaction the query must not end that transaction.
    table = backend.table()
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    driver.query(conn, "SELECT 1")
    assert driver.transaction_status(conn) == TxStatus.IN_TRANSACTION
    conn.commit()
    conn.close()


def test_apply_session_state(backend: Backend) -> None:
    driver = _driver(backend)
    conn = backend.raw()
    state: dict[str, Any] = {"autocommit": True}
    if backend.name == "pg":
        state["read_only"] = True
    else:
        state["time_zone"] = "+02:00"
    driver.apply_session_state(conn, state)
    assert conn.autocommit is True
    if backend.name == "pg":
        assert conn.read_only is True
    else:
        assert driver.query(conn, "SELECT @@session.time_zone") == [("+02:00",)]
    conn.close()


def test_mysql_private_socket_attribute_contract(mysql_backend: Backend) -> None:
    """resilient_db breaks a blocked mysql-connector call through ``_socket.sock`` (pure
    implementation). If a release renames it, this fails loudly: update
    resilient_db/drivers/mysql_connector.py."""
    conn = mysql_backend.raw()
    assert type(conn).__name__ == "MySQLConnection", "pure-Python implementation expected"
    holder = getattr(conn, "_socket", None)
    assert holder is not None, "mysql-connector no longer has MySQLConnection._socket"
    sock = getattr(holder, "sock", None)
    assert isinstance(sock, socket.socket), "MySQLConnection._socket.sock is not a socket"
    assert sock.getpeername()[1] == mysql_backend.kwargs["port"]
    dup = get_driver("mysql-connector").socket_of(conn)
    assert dup is not None
    assert dup.fileno() != sock.fileno()
    dup.close()
    conn.close()


def test_psycopg_socket_is_a_duplicate(pg_backend: Backend) -> None:
    conn = pg_backend.raw()
    sock = get_driver("psycopg").socket_of(conn)
    assert sock is not None
    assert sock.fileno() != conn.fileno()
    assert sock.getpeername()[1] == pg_backend.kwargs["port"]
    sock.close()
    assert conn.execute("SELECT 1").fetchone() == (1,)  # ours closed, theirs intact
    conn.close()


@pytest.mark.real_server
@pytest.mark.parametrize("pooled", [False, True])
def test_mysql_connect_timeout_bounds_only_the_connect(mysql_backend: Backend,
                                                       pooled: bool) -> None:
    """The connect timeout also bounds the session set-up after authentication (as read and
    write timeouts), then those are removed again: a statement longer than the connect
    timeout runs to its end, pooled connections included."""
    extra: dict[str, Any] = {"pool_name": f"p{time.monotonic_ns()}", "pool_size": 1} \
        if pooled else {}
    conn = mysql_backend.connect(connection_timeout=1, **extra)
    try:
        raw = conn.resilient.raw
        inner = getattr(raw, "_cnx", raw)
        assert (inner.read_timeout, inner.write_timeout) == (None, None)
        cur = conn.cursor()
        cur.execute("SELECT SLEEP(1.5)")
        assert cur.fetchall() == [(0,)]
    finally:
        conn.close()
