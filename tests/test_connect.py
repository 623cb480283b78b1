"""resilient_db.connect against real servers: conninfo forms, argument splitting, bad input."""

from __future__ import annotations

import functools
import logging
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


@pytest.mark.parametrize("zero", [0, "0", 0.0])
def test_connect_timeout_zero_means_no_limit(backend: Backend, zero: Any) -> None:
    # libpq's meaning; mysql-connector turned 0 into a non-blocking socket (EINPROGRESS).
    conn = backend.connect(connect_timeout=zero)
    assert _one(conn) == 1
    if backend.name == "mysql":
        assert conn.resilient.raw._connection_timeout is None
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
        resilient_db.connect(psycopg.Connection.connect, "host=x",
                             gdb_accessible_regions="us-east-1")
    assert ("known AWS property 'gdb_accessible_regions' (gdb_failover), not supported yet"
            in str(info.value))
    assert info.value.parameter == "gdb_accessible_regions"


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


# --- hostile input (issue #11 items 5 and 6) --------------------------------------------------

def _recording(calls: list[dict[str, Any]], real: Any) -> Any:
    """A wrapping target that records each physical connect (to prove there was none)."""
    def target(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)
    return target


@pytest.mark.parametrize(
    ("name", "value"),
    [("topology_refresh_ms", 1e-6), ("failure_detection_interval_ms", 1),
     ("socket_timeout", 1e300), ("failover_timeout_sec", 10**400), ("failover_timeout_sec", ""),
     ("failover_timeout_sec", None), ("failure_detection_count", -1),
     ("cluster_topology_high_refresh_rate_ms", 0.5), ("monitor_disposal_time_ms", 0)],
)
def test_hostile_property_values_are_rejected_before_any_server_io(
        backend: Backend, name: str, value: Any) -> None:
    # topology_refresh_ms=1e-6 used to run 5,000 topology transactions in 3 s on the server;
    # socket_timeout=1e300 crash-looped the watchdog.
    calls: list[dict[str, Any]] = []
    driver = "psycopg" if backend.name == "pg" else "mysql-connector"
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(_recording(calls, backend.target), plugins=None,
                             wrapper_driver_dialect=driver, **backend.kwargs, **{name: value})
    assert info.value.parameter == name
    assert name in str(info.value)
    assert calls == []


def test_smallest_documented_rates_are_accepted(backend: Backend) -> None:
    conn = backend.connect(plugins=None, topology_refresh_ms=50,
                           cluster_topology_high_refresh_rate_ms=50,
                           failure_detection_interval_ms=100, socket_timeout=0)
    assert _one(conn) == 1
    conn.close()


@pytest.mark.parametrize("port", ["abc", 0, 70000, -1, "5432x", True, 5432.5, "0x10"])
def test_bad_port_is_a_configuration_error(backend: Backend, port: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        backend.connect(port=port)
    assert info.value.parameter == "port"
    assert "1 to 65535" in str(info.value) or "whole number" in str(info.value)


def test_libpq_host_list_is_tried_in_order_without_cluster_plugins(pg_backend: Backend) -> None:
    # host=a,b port=p1,p2 is libpq's own syntax (our URI parser makes it from
    # postgresql://a:p1,b:p2/db): it used to raise a raw ValueError.
    kw = pg_backend.kwargs
    dead = _closed_port()
    hosts = {"host": f"{kw['host']},{kw['host']}", "port": f"{dead},{kw['port']}"}
    conn = resilient_db.connect(pg_backend.target, plugins="", **{**kw, **hosts})
    assert _one(conn) == 1
    assert conn.resilient.raw.info.port == int(kw["port"])
    conn.close()
    uri = (f"postgresql://{kw['user']}:{kw['password']}@{kw['host']}:{dead},"
           f"{kw['host']}:{kw['port']}/{kw['dbname']}")
    conn = resilient_db.connect(pg_backend.target, uri, plugins="execute_time")
    assert _one(conn) == 1
    conn.close()


def test_host_list_with_cluster_plugins_is_refused_with_the_fix(pg_backend: Backend) -> None:
    kw = pg_backend.kwargs
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(pg_backend.target, f"host=a,b port={kw['port']},{kw['port']}",
                             **{k: v for k, v in kw.items() if k not in ("host", "port")})
    err = info.value
    assert err.parameter == "host"
    assert "failover" in str(err) and "plugins" in str(err) and "one host" in str(err)


@pytest.mark.parametrize(("host", "port"), [("a,b,c", "1,2"), ("a", "1,2")])
def test_host_and_port_lists_must_match(pg_backend: Backend, host: str, port: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(pg_backend.target, plugins="", host=host, port=port)
    assert info.value.parameter == "port"
    assert "one per host" in str(info.value)


def test_mysql_takes_one_host(mysql_backend: Backend) -> None:
    with pytest.raises(ConfigurationError) as info:
        mysql_backend.connect(host="a,b")
    assert info.value.parameter == "host"
    assert "one host" in str(info.value)


@pytest.mark.parametrize("target", [psycopg.Connection, psycopg.Cursor])
def test_class_as_target_suggests_its_connect_method(target: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(target, "host=x")
    assert info.value.parameter == "target"
    assert "psycopg.Connection.connect" in str(info.value)


def test_application_subclass_of_psycopg_connection_is_recognised(pg_backend: Backend) -> None:
    class AppConnection(psycopg.Connection[Any]):
        pass

    conn = resilient_db.connect(AppConnection.connect, plugins="", **pg_backend.kwargs)
    assert isinstance(conn.resilient.raw, AppConnection)
    conn.close()


def test_partial_target_is_recognised_and_its_password_never_shown(pg_backend: Backend) -> None:
    kw = pg_backend.kwargs
    target = functools.partial(psycopg.Connection.connect, password=kw["password"])
    conn = resilient_db.connect(target, plugins="",
                                **{k: v for k, v in kw.items() if k != "password"})
    assert _one(conn) == 1
    conn.close()
    secret = functools.partial(print, password="hunter2xyz")
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(secret, "host=x")
    err = info.value
    for text in (str(err), repr(err), repr(err.args), repr(err.value)):
        assert "hunter2xyz" not in text


def test_psycopg2_is_not_taken_for_psycopg() -> None:
    def connect(**kwargs: Any) -> Any:
        raise AssertionError("must not be called")

    connect.__module__ = "psycopg2"
    with pytest.raises(ConfigurationError, match="not a supported driver"):
        resilient_db.connect(connect, "host=x")


@pytest.mark.parametrize("result", [None, "a string", object()])
def test_target_must_return_a_driver_connection(backend: Backend, result: Any) -> None:
    driver = "psycopg" if backend.name == "pg" else "mysql-connector"

    def returns_junk(**kwargs: Any) -> Any:
        return result

    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(returns_junk, plugins="", wrapper_driver_dialect=driver,
                             **backend.kwargs)
    err = info.value
    assert err.parameter == "target"
    assert "returns_junk" in str(err)
    assert ("psycopg.Connection.connect" if backend.name == "pg"
            else "mysql.connector.connect") in str(err)


def test_target_result_is_checked_with_the_default_plugins(pg_backend: Backend) -> None:
    # With the default plugins (failover, efm): the first connect is the one to check.
    def returns_none(**kwargs: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"returned builtins\.NoneType"):
        resilient_db.connect(returns_none, plugins=None, wrapper_driver_dialect="psycopg",
                             **pg_backend.kwargs)


@pytest.mark.parametrize("misspelled", ["pasword", "passwrod", "pwsd", "Password1"])
def test_misspelled_password_key_is_redacted(
        backend: Backend, misspelled: str, caplog: pytest.LogCaptureFixture) -> None:
    kw = {k: v for k, v in backend.kwargs.items() if k != "password"}
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    for conninfo, extra in ((f"{misspelled}=hunter2xyz", {}),
                            ("", {misspelled: "hunter2xyz"})):
        with pytest.raises(ConfigurationError) as info:
            resilient_db.connect(backend.target, conninfo, **kw, **extra)
        err = info.value
        assert err.parameter == misspelled
        for text in (str(err), repr(err), repr(err.args), repr(err.value)):
            assert "hunter2xyz" not in text
    assert all("hunter2xyz" not in r.getMessage() for r in caplog.records)


def test_malformed_conninfo_with_password_is_redacted(
        pg_backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    for conninfo in ("host=db password=hunter2xyz dbname", "password=hunter2 xyz host=db",
                     "host=db password='hunter2xyz"):
        with pytest.raises(ConfigurationError) as info:
            resilient_db.connect(pg_backend.target, conninfo)
        err = info.value
        for text in (str(err), repr(err), repr(err.args), repr(err.value)):
            assert "hunter2" not in text and "xyz" not in text
    assert all("hunter2" not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("plugins", "culprit"),
    [(42, "int"), ([None], "None"), ({"failover": True}, None), (b"failover", None),
     ("failover,nope", "nope")],
)
def test_wrong_plugins_values(pg_backend: Backend, plugins: Any, culprit: str | None) -> None:
    with pytest.raises(ConfigurationError) as info:
        pg_backend.connect(plugins=plugins)
    assert info.value.parameter == "plugins"
    if culprit:
        assert culprit in str(info.value)
