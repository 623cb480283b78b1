"""resilient_db.connect against real servers: conninfo forms, argument splitting, bad input."""

from __future__ import annotations

import socket
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import ConfigurationError, DialectMismatchError

from .conftest import Backend

pytestmark = pytest.mark.real_server


def _uri(b: Backend) -> str:
    kw = b.kwargs
    scheme = "postgresql" if b.name == "pg" else "mysql"
    db = kw.get("dbname", kw.get("database"))
    return f"{scheme}://{kw['user']}:{kw['password']}@{kw['host']}:{kw['port']}/{db}"


def _keyvalue(b: Backend) -> str:
    return " ".join(f"{k}='{v}'" for k, v in b.kwargs.items() if k != "use_pure")


def _one(conn: Any) -> Any:
    cur = conn.cursor()
    cur.execute("SELECT 1")
    row = cur.fetchone()
    cur.close()
    return row[0]


def test_connect_with_keywords(backend: Backend) -> None:
    with backend.connect(plugins="") as conn:
        assert _one(conn) == 1


def test_connect_with_keyvalue_string(backend: Backend) -> None:
    extra: dict[str, Any] = {"use_pure": True} if backend.name == "mysql" else {}
    conn = resilient_db.connect(backend.target, _keyvalue(backend), **extra)
    assert _one(conn) == 1
    conn.close()


def test_connect_with_uri(backend: Backend) -> None:
    extra: dict[str, Any] = {"use_pure": True} if backend.name == "mysql" else {}
    conn = resilient_db.connect(backend.target, _uri(backend), **extra)
    assert _one(conn) == 1
    conn.close()


def test_keywords_win_over_conninfo(backend: Backend) -> None:
    key = "dbname" if backend.name == "pg" else "database"
    extra: dict[str, Any] = {"use_pure": True} if backend.name == "mysql" else {}
    wrong = _keyvalue(backend).replace(f"{key}='{backend.kwargs[key]}'", f"{key}='nope'")
    assert "nope" in wrong
    conn = resilient_db.connect(backend.target, wrong, **{key: backend.kwargs[key]}, **extra)
    assert _one(conn) == 1
    conn.close()


def test_typed_driver_arguments_from_strings(backend: Backend) -> None:
    # Conninfo values are strings; typed driver arguments are converted for the driver.
    extra: dict[str, Any] = {"use_pure": "true"} if backend.name == "mysql" else {}
    conn = resilient_db.connect(backend.target, _uri(backend) + "?autocommit=true", **extra)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    raw = conn.resilient.raw
    if backend.name == "pg":
        assert raw.autocommit is True
        assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    else:
        assert raw.in_transaction is False
    conn.close()


def test_plugins_selection_forms(backend: Backend) -> None:
    default = backend.connect(plugins=None)
    assert default.resilient.plugins == (
        "initial_connection", "aurora_connection_tracker", "failover", "efm")
    default.close()
    assert backend.connect(plugins="").resilient.plugins == ()
    assert backend.connect(plugins=[]).resilient.plugins == ()
    conn = backend.connect(plugins="dev,execute_time")
    assert conn.resilient.plugins == ("execute_time", "dev")
    conn.close()
    conn = backend.connect(plugins=["dev", "execute_time"], auto_sort_wrapper_plugin_order=False)
    assert conn.resilient.plugins == ("dev", "execute_time")
    conn.close()
    extra: dict[str, Any] = {"use_pure": True} if backend.name == "mysql" else {}
    conn = resilient_db.connect(backend.target, _keyvalue(backend) + " plugins=connect_time",
                                **extra)
    assert conn.resilient.plugins == ("connect_time",)
    conn.close()


def test_connect_timeout_is_read_and_forwarded(backend: Backend) -> None:
    conn = backend.connect(connect_timeout="7")
    raw = conn.resilient.raw
    if backend.name == "pg":
        assert raw.info.get_parameters().get("connect_timeout") == "7" or (
            "connect_timeout=7" in raw.info.dsn
        )
    else:
        assert raw._connection_timeout == 7
    conn.close()


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conninfo", "culprit"),
    [("host", "'host'"), ("host='unterminated", "unterminated"),
     ("postgresql://h:notaport/db", "port 'notaport'")],
)
def test_malformed_conninfo(pg_backend: Backend, conninfo: str, culprit: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, conninfo)
    assert culprit in str(info.value)


def test_uri_scheme_must_match_driver(mysql_backend: Backend) -> None:
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(mysql.connector.connect, "postgresql://h/db")
    assert "postgresql://" in str(info.value)
    assert "mysql://" in str(info.value)


def test_unknown_plugin(backend: Backend) -> None:
    with pytest.raises(ConfigurationError) as info:
        backend.connect(plugins="execute_time,conect_time")
    assert "unknown plugin 'conect_time'" in str(info.value)
    assert "did you mean 'connect_time'" in str(info.value)


def test_unknown_property_suggests(backend: Backend) -> None:
    with pytest.raises(ConfigurationError) as info:
        backend.connect(wrapper_dialekt="pg")
    assert "'wrapper_dialekt'" in str(info.value)
    assert "did you mean 'wrapper_dialect'" in str(info.value)
    assert info.value.parameter == "wrapper_dialekt"


def test_driver_name_of_the_other_driver_is_rejected(pg_backend: Backend) -> None:
    # `database` is mysql-connector's name; psycopg's is `dbname`.
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, database="test")
    assert "did you mean 'dbname'" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("connect_timeout", "soon", "a number"), ("connect_timeout", -3, "duration"),
     ("auto_sort_wrapper_plugin_order", "perhaps", "boolean"),
     ("wrapper_dialect", "oracle", "one of")],
)
def test_wrong_type_or_range(backend: Backend, name: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        backend.connect(**{name: value})
    message = str(info.value)
    assert name in message
    assert repr(value) in message
    assert expected in message


def test_wrong_type_for_a_driver_argument(mysql_backend: Backend) -> None:
    with pytest.raises(ConfigurationError) as info:
        mysql_backend.connect(port="33o6")
    assert "'port'" in str(info.value)


@pytest.mark.parametrize("target", [None, "psycopg", 42, print, socket.create_connection])
def test_target_must_be_a_driver_connect_callable(target: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(target, "host=x")
    assert info.value.parameter == "target"
    assert "psycopg.Connection.connect" in str(info.value)


def test_async_target_is_rejected_clearly() -> None:
    with pytest.raises(ConfigurationError, match="asyncio"):
        resilient_db.connect(psycopg.AsyncConnection.connect, "host=x")


def test_wrapped_target_with_forced_driver(pg_backend: Backend) -> None:
    def my_connect(**kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.Connection.connect(**kwargs)

    with pytest.raises(ConfigurationError, match="wrapper_driver_dialect"):
        resilient_db.connect(my_connect, **pg_backend.kwargs)
    conn = resilient_db.connect(my_connect, wrapper_driver_dialect="psycopg", **pg_backend.kwargs)
    assert _one(conn) == 1
    conn.close()


def test_forced_driver_accepts_the_aws_value(mysql_backend: Backend) -> None:
    # The AWS wrapper calls the driver "mysql-connector-python"; a migrating application keeps
    # its setting.
    def my_connect(**kwargs: Any) -> Any:
        return mysql.connector.connect(**kwargs)

    conn = resilient_db.connect(my_connect, wrapper_driver_dialect="mysql-connector-python",
                                plugins="", **mysql_backend.kwargs)
    assert _one(conn) == 1
    assert conn.resilient.pipeline.ctx.driver.code == "mysql-connector"
    conn.close()


def test_known_aws_property_not_supported_yet() -> None:
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, "host=x", iam_region="us-east-1")
    assert "known AWS property 'iam_region' (iam), not supported yet" in str(info.value)
    assert info.value.parameter == "iam_region"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_host_surfaces_the_driver_error(backend: Backend) -> None:
    port = _closed_port()
    with pytest.raises(Exception) as info:
        backend.connect(host="127.0.0.1", port=port, connect_timeout=3)
    exc = info.value
    assert not isinstance(exc, resilient_db.Error)
    if backend.name == "pg":
        assert isinstance(exc, psycopg.OperationalError)
    else:
        assert isinstance(exc, mysql.connector.errors.Error)
        assert exc.errno == 2003  # CR_CONN_HOST_ERROR


def test_forced_dialect_the_server_does_not_match(backend: Backend) -> None:
    forced = "aurora-pg" if backend.name == "pg" else "aurora-mysql"
    with pytest.raises(DialectMismatchError) as info:
        backend.connect(wrapper_dialect=forced)
    message = str(info.value)
    assert "wrapper_dialect" in message
    assert forced in message
    assert info.value.checks


def test_forced_dialect_the_server_matches(backend: Backend) -> None:
    conn = backend.connect(wrapper_dialect=backend.name)
    assert _one(conn) == 1
    conn.close()
