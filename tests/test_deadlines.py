"""Client-side statement deadlines, network properties and "no hang, ever", on real servers.

- A deadline cancels a sleeping statement on the server and raises ``QueryTimeoutError``
  quickly; the connection stays usable (same server session).
- ``call_options(timeout=...)`` overrides ``socket_timeout`` both ways, and works on
  connections without ``socket_timeout`` (the stage is added when first needed).
- A server that does not answer at all (blackholed with real packet loss): the socket is
  broken after the grace, the connection is reported broken, and a process with such a
  query exits promptly, with no thread left inside driver code.
- No failover on a timeout (failover plugin on a simulated Aurora cluster).
- Keepalive properties are visible on the socket; bad values are rejected clearly;
  ``connect_timeout`` bounds a connect to a blackholed address.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from chaos.netfault import NetworkFaults, unavailable_reason
from resilient_db.drivers import get_driver
from resilient_db.watchdog import get_watchdog
from simulator.cluster import Cluster, Timeline
from simulator.local import Engine, LocalServer
from tests.conftest import Backend

pytestmark = pytest.mark.real_server

#: Liveness bounds (generous: a shared 2-core machine); speed goals live in benchmarks/.
QUICK = 5.0

SLEEP = {"pg": "SELECT pg_sleep(30)", "mysql": "SELECT SLEEP(30)"}
SESSION_ID = {"pg": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}

needs_netfilter = pytest.mark.skipif(unavailable_reason() is not None,
                                     reason=unavailable_reason() or "")


def one(conn: resilient_db.ConnectionProxy, sql: str) -> Any:
    cur = conn.cursor()
    cur.execute(sql)
    row = cur.fetchone()
    cur.close()
    return row[0]


def wait_for(predicate: Callable[[], bool], timeout: float = QUICK) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def expect_timeout(run: Callable[[], Any]) -> tuple[resilient_db.QueryTimeoutError, float]:
    start = time.monotonic()
    with pytest.raises(resilient_db.QueryTimeoutError) as info:
        run()
    return info.value, time.monotonic() - start


def cancel_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "resilient_db-cancel"]


# --- deadlines on a healthy server --------------------------------------------------------------


def test_deadline_cancels_on_the_server_and_the_connection_stays_usable(
        backend: Backend, sink: resilient_db.CollectingSink) -> None:
    conn = backend.connect(plugins="", socket_timeout=0.3, autocommit=True,
                           query_timeout_grace=5)  # margin for a loaded machine
    session = one(conn, SESSION_ID[backend.name])
    cur = conn.cursor()
    err, elapsed = expect_timeout(lambda: cur.execute(SLEEP[backend.name]))
    assert elapsed < QUICK, elapsed  # not the 30 s of the statement
    assert elapsed >= 0.3
    assert isinstance(err, backend.operational_error)  # also the driver's OperationalError
    assert err.timeout == pytest.approx(0.3)
    assert err.cancelled is True
    assert err.host == str(conn.resilient.host)
    assert "0.3 s" in str(err) and "cancelled on the server" in str(err)
    assert err.__cause__ is not None  # the driver's own error (QueryCanceled / 1317)
    decision = sink.of_kind("statement.deadline_expired")[-1]
    assert decision.attributes["resilient_db.deadline.cancelled"] is True
    assert decision.attributes["resilient_db.deadline.socket_broken"] is False
    # Same server session, still usable.
    assert one(conn, SESSION_ID[backend.name]) == session
    cur.execute("SELECT 41 + 1")
    assert cur.fetchone()[0] == 42
    assert wait_for(lambda: not cancel_threads())
    conn.close()


def test_statements_within_the_deadline_are_untouched(backend: Backend) -> None:
    conn = backend.connect(plugins="", socket_timeout=5, autocommit=True)
    assert conn.resilient.pipeline.chains.execute is not None  # the deadline stage is there
    cur = conn.cursor()
    for _ in range(200):
        cur.execute("SELECT 1")
        assert cur.fetchone()[0] == 1
    cur.execute(SLEEP[backend.name].replace("30", "0.2"))
    cur.fetchall()
    conn.close()


def test_call_options_shortens_socket_timeout(backend: Backend) -> None:
    conn = backend.connect(plugins="", socket_timeout=30, autocommit=True)
    cur = conn.cursor()
    cur.execute("SELECT 1")  # the connection's watchdog entry is now 30 s away
    cur.fetchall()
    with resilient_db.call_options(timeout=0.3):
        err, elapsed = expect_timeout(lambda: cur.execute(SLEEP[backend.name]))
    assert err.timeout == pytest.approx(0.3)
    assert elapsed < QUICK
    assert one(conn, "SELECT 1") == 1
    conn.close()


def test_call_options_zero_lifts_socket_timeout(backend: Backend) -> None:
    conn = backend.connect(plugins="", socket_timeout=0.2, autocommit=True)
    cur = conn.cursor()
    with resilient_db.call_options(timeout=0):
        cur.execute(SLEEP[backend.name].replace("30", "0.6"))  # longer than socket_timeout
        cur.fetchall()
        with resilient_db.call_options(timeout=None):  # inherits the block's 0
            cur.execute(SLEEP[backend.name].replace("30", "0.4"))
            cur.fetchall()
    # Outside the block socket_timeout applies again.
    expect_timeout(lambda: cur.execute(SLEEP[backend.name]))
    conn.close()


def test_the_deadline_follows_each_statement_on_a_busy_connection(backend: Backend) -> None:
    # One watchdog entry per connection, moved lazily: statements shorter than the deadline
    # never time out however long the stream, and a slow one after them times out on its own
    # deadline (not one inherited from an earlier statement).
    # (Margins: a 0.1 s statement would have to be delayed tenfold to hit the deadline.)
    conn = backend.connect(plugins="", socket_timeout=1.0, autocommit=True,
                           query_timeout_grace=5)
    cur = conn.cursor()
    short = SLEEP[backend.name].replace("30", "0.1")
    end = time.monotonic() + 3.0  # three deadline periods
    count = 0
    while time.monotonic() < end:
        cur.execute(short)
        cur.fetchall()
        count += 1
    assert count >= 10
    start = time.monotonic()
    err, elapsed = expect_timeout(lambda: cur.execute(SLEEP[backend.name]))
    assert 1.0 <= elapsed < QUICK, elapsed
    assert err.cancelled
    # After idling longer than the deadline (the entry lapsed), a slow statement is caught.
    time.sleep(1.5)
    expect_timeout(lambda: cur.execute(SLEEP[backend.name]))
    assert time.monotonic() - start < 2 * QUICK
    conn.close()


def test_shutdown_releases_idle_deadline_entries_and_deadlines_keep_working(
        backend: Backend) -> None:
    conn = backend.connect(plugins="", socket_timeout=30, autocommit=True,
                           query_timeout_grace=5)
    assert one(conn, "SELECT 1") == 1  # arms the connection's entry, 30 s away
    watchdog = get_watchdog()
    thread = watchdog.thread
    assert thread is not None
    resilient_db.shutdown()
    assert wait_for(lambda: not thread.is_alive())  # not 30 s: the idle entry was released
    cur = conn.cursor()
    with resilient_db.call_options(timeout=0.3):
        err, elapsed = expect_timeout(lambda: cur.execute(SLEEP[backend.name]))
    assert err.cancelled and elapsed < QUICK
    conn.close()


def test_connection_level_execute_and_commit_are_bounded_too(pg_backend: Backend) -> None:
    conn = pg_backend.connect(plugins="", socket_timeout=0.3)  # not autocommit
    with pytest.raises(resilient_db.QueryTimeoutError):
        conn.execute("SELECT pg_sleep(30)")
    # psycopg semantics after a cancelled statement in a transaction: roll back, carry on.
    conn.rollback()
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    conn.commit()
    conn.close()


def test_mysql_timeout_in_a_transaction_undoes_only_the_statement(mysql_backend: Backend) -> None:
    table = mysql_backend.table()
    conn = mysql_backend.connect(plugins="", socket_timeout=0.3)
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {table} VALUES (1, 'kept')")
    with pytest.raises(resilient_db.QueryTimeoutError):
        cur.execute(f"INSERT INTO {table} SELECT 2, 'slow' FROM (SELECT SLEEP(30)) AS s")
    assert conn.in_transaction
    cur.execute(f"SELECT id FROM {table}")
    assert cur.fetchall() == [(1,)]
    conn.rollback()
    cur.execute(f"SELECT id FROM {table}")
    assert cur.fetchall() == []
    conn.close()


def test_one_watchdog_thread_for_many_connections(backend: Backend) -> None:
    conns = [backend.connect(plugins="", socket_timeout=10, autocommit=True) for _ in range(5)]
    for conn in conns:
        assert one(conn, "SELECT 1") == 1
    watchdogs = [t for t in threading.enumerate() if t.name == "resilient_db-watchdog"]
    assert len(watchdogs) == 1 and watchdogs[0].daemon
    for conn in conns:
        conn.close()


# --- the per-call switch and the untouched hot path (fresh processes) ---------------------------


def run_child(code: str, backend: Backend, timeout: float = 60) -> tuple[str, float]:
    env = {**os.environ, "BACKEND": backend.name,
           "CONNECT": json.dumps({**backend.kwargs, "autocommit": True})}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout, env=env, check=False)
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, elapsed


_CHILD_PRELUDE = """
    import json, os, sys, threading, time
    import resilient_db
    backend = os.environ["BACKEND"]
    if backend == "pg":
        import psycopg
        target = psycopg.Connection.connect
        sleep = "SELECT pg_sleep(30)"
    else:
        import mysql.connector
        target = mysql.connector.connect
        sleep = "SELECT SLEEP(30)"
    kwargs = json.loads(os.environ["CONNECT"])
"""


def test_no_deadline_configured_leaves_the_hot_path_alone_until_call_options_asks(
        backend: Backend) -> None:
    code = _CHILD_PRELUDE + """
    conn = resilient_db.connect(target, plugins="", query_timeout_grace=5, **kwargs)
    chains = conn.resilient.pipeline.chains
    # No plugin, no socket_timeout: no chain at all, the proxy calls the driver directly.
    assert chains.execute is None and chains.commit is None, chains.execute
    assert [t.name for t in threading.enumerate()] == ["MainThread"]
    cur = conn.cursor()
    with resilient_db.call_options(timeout=0):  # 0 = no deadline: nothing changes
        cur.execute("SELECT 1"); cur.fetchall()
    assert chains.execute is None
    with resilient_db.call_options(timeout=0.3):  # the first real per-call deadline
        assert chains.execute is not None
        start = time.monotonic()
        try:
            cur.execute(sleep)
        except resilient_db.QueryTimeoutError as exc:
            assert exc.cancelled, exc
        else:
            raise AssertionError("no timeout")
        assert time.monotonic() - start < 5
    cur.execute("SELECT 1"); assert cur.fetchall()[0][0] == 1
    later = resilient_db.connect(target, plugins="", **kwargs)
    assert later.resilient.pipeline.chains.execute is not None  # per-call deadlines in use
    print("ok")
    """
    out, _ = run_child(code, backend)
    assert out.strip() == "ok"


# --- no failover on a timeout (simulated Aurora cluster, failover plugin) -----------------------


@pytest.fixture(scope="module")
def _stop_background() -> Iterator[None]:
    yield
    resilient_db.shutdown()


@pytest.fixture(scope="module", params=["aurora-pg", "aurora-mysql"])
def cluster(request: pytest.FixtureRequest, _stop_background: None) -> Iterator[Cluster]:
    timeline = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)
    with Cluster.start(request.param, readers=1, timeline=timeline) as started:
        yield started


def test_no_failover_on_a_timeout(cluster: Cluster, sink: resilient_db.CollectingSink) -> None:
    pg = cluster.flavour.name.endswith("pg")
    target = psycopg.Connection.connect if pg else mysql.connector.connect
    extra: dict[str, Any] = {} if pg else {"use_pure": True,
                                           "aurora_mysql_lookalike_schema": "aurora_sim"}
    instance_sql = ("SELECT pg_catalog.aurora_db_instance_identifier()" if pg
                    else "SELECT aurora_sim.aurora_server_id()")
    conn = resilient_db.connect(target, plugins="failover", autocommit=True, connect_timeout=5,
                                socket_timeout=0.3, query_timeout_grace=5,
                                **cluster.connect_kwargs(cluster.writer.endpoint), **extra)
    try:
        before = one(conn, instance_sql)
        raw = conn.resilient.raw
        cur = conn.cursor()
        err, elapsed = expect_timeout(lambda: cur.execute(SLEEP["pg" if pg else "mysql"]))
        assert err.cancelled and elapsed < QUICK
        assert isinstance(err, psycopg.OperationalError if pg
                          else mysql.connector.errors.OperationalError)
        assert not [k for k in sink.kinds() if k.startswith("failover.")], sink.kinds()
        assert conn.resilient.raw is raw  # same physical connection, not replaced
        assert one(conn, instance_sql) == before
        # Per-call deadline through the failover plugin too.
        with resilient_db.call_options(timeout=0.2):
            expect_timeout(lambda: cur.execute(SLEEP["pg" if pg else "mysql"]))
        assert conn.resilient.raw is raw
        assert not [k for k in sink.kinds() if k.startswith("failover.")], sink.kinds()
    finally:
        conn.close()


# --- a server that does not answer (real packet loss) -------------------------------------------


@pytest.fixture(scope="module", params=["pg", "mysql"])
def lonely(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A server of its own for blackhole tests (nothing else of the session talks to it)."""
    engine: Engine = "postgresql" if request.param == "pg" else "mariadb"
    server = LocalServer.create(engine, None).start()
    try:
        kwargs = server.connect_kwargs()
        if request.param == "pg":
            yield Backend("pg", psycopg.Connection.connect, kwargs, server,
                          psycopg.errors.UniqueViolation, psycopg.OperationalError)
        else:
            yield Backend("mysql", mysql.connector.connect, {**kwargs, "use_pure": True}, server,
                          mysql.connector.errors.IntegrityError,
                          mysql.connector.errors.OperationalError)
    finally:
        server.stop()


@needs_netfilter
def test_blackholed_server_the_deadline_breaks_the_socket(
        lonely: Backend, network_faults: NetworkFaults) -> None:
    conn = lonely.connect(plugins="", socket_timeout=0.4, query_timeout_grace=0.4,
                          autocommit=True)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    network_faults.blackhole(lonely.server.host, lonely.server.port)
    err, elapsed = expect_timeout(lambda: cur.execute("SELECT 1"))
    assert 0.8 <= elapsed < QUICK, elapsed  # deadline + grace, not the kernel's minutes
    assert err.cancelled is False
    assert "connection was broken" in str(err)
    driver = get_driver("psycopg" if lonely.name == "pg" else "mysql-connector")
    assert err.__cause__ is not None and driver.is_disconnect(err.__cause__)  # driver's own
    raw = conn.resilient.raw
    assert driver.is_closed(raw)
    if lonely.name == "pg":
        assert raw.broken
    with pytest.raises(Exception) as again:  # the driver's own, whatever it is
        cur.execute("SELECT 1")
    assert driver.is_disconnect(again.value)
    conn.close()


@needs_netfilter
def test_blackholed_server_no_failover_when_the_deadline_breaks_the_socket(
        lonely: Backend, network_faults: NetworkFaults,
        sink: resilient_db.CollectingSink) -> None:
    conn = lonely.connect(plugins="failover", socket_timeout=0.4, query_timeout_grace=0.4,
                          autocommit=True, connect_timeout=2)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    network_faults.blackhole(lonely.server.host, lonely.server.port)
    err, elapsed = expect_timeout(lambda: cur.execute("SELECT 1"))
    assert elapsed < QUICK and not err.cancelled
    assert not [k for k in sink.kinds() if k.startswith("failover.")], sink.kinds()
    network_faults.clear()
    conn.close()


@needs_netfilter
@pytest.mark.parametrize("step", ["cursor", "session"])
def test_blackholed_server_opening_a_cursor_or_setting_autocommit_is_bounded_too(
        lonely: Backend, network_faults: NetworkFaults, step: str) -> None:
    """mysql-connector's ``cursor()`` pings the server and its ``autocommit`` setter sends a
    ``SET``: on a blackholed server they are bounded by the deadline like statements
    (psycopg does no I/O there: they return at once)."""
    conn = lonely.connect(plugins="", socket_timeout=0.4, query_timeout_grace=0.4,
                          autocommit=True)
    one(conn, "SELECT 1")
    outcome: list[tuple[BaseException | None, float]] = []

    def call() -> None:
        start = time.monotonic()
        try:
            if step == "cursor":
                conn.cursor()
            else:
                conn.autocommit = True
            outcome.append((None, time.monotonic() - start))
        except BaseException as exc:
            outcome.append((exc, time.monotonic() - start))

    network_faults.blackhole(lonely.server.host, lonely.server.port)
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(QUICK)
    network_faults.clear()  # an unbounded call wakes now, and fails the asserts below
    thread.join(QUICK)
    assert outcome, "the call did not return even after the blackhole was lifted"
    error, elapsed = outcome[0]
    assert elapsed < QUICK, elapsed
    if lonely.name == "mysql":
        assert isinstance(error, resilient_db.QueryTimeoutError), error
    else:
        assert error is None
    conn.close()


@needs_netfilter
def test_keepalive_settings_detect_a_blackholed_server_without_any_deadline(
        lonely: Backend, network_faults: NetworkFaults) -> None:
    # No socket_timeout: the statement was sent and acknowledged, the client waits for the
    # answer with nothing unacknowledged, so only keepalive probes (and TCP_USER_TIMEOUT)
    # can notice that the server is gone: 1 s idle + 2 probes 1 s apart = 3 s, not 30 s.
    conn = lonely.connect(plugins="", autocommit=True, tcp_keepalive_time=1,
                          tcp_keepalive_interval=1, tcp_keepalive_probes=2)
    cur = conn.cursor()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            cur.execute(SLEEP[lonely.name])
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    time.sleep(0.3)  # the statement is on the server
    network_faults.blackhole(lonely.server.host, lonely.server.port)
    start = time.monotonic()
    worker.join(20)
    elapsed = time.monotonic() - start
    assert not worker.is_alive(), "keepalive did not end the blocked call"
    assert 2 <= elapsed < 12, elapsed
    driver = get_driver("psycopg" if lonely.name == "pg" else "mysql-connector")
    assert errors and driver.is_disconnect(errors[0]), errors
    network_faults.clear()
    conn.close()


@needs_netfilter
def test_connect_timeout_bounds_a_connect_to_a_blackholed_address(
        lonely: Backend, network_faults: NetworkFaults) -> None:
    network_faults.blackhole(lonely.server.host, lonely.server.port)
    driver = get_driver("psycopg" if lonely.name == "pg" else "mysql-connector")
    start = time.monotonic()
    with pytest.raises(Exception) as info:  # the driver's own error
        lonely.connect(plugins="", connect_timeout=2)
    elapsed = time.monotonic() - start
    assert driver.is_disconnect(info.value), repr(info.value)
    assert 1.5 <= elapsed < 8, elapsed  # psycopg waits at least 2 s; never the kernel's ~2 min


def test_connect_timeout_takes_fractional_seconds_as_text_or_number(backend: Backend) -> None:
    for value in ("2.5", 2.5):
        conn = backend.connect(plugins="", connect_timeout=value)
        assert one(conn, "SELECT 1") == 1
        conn.close()


_NO_HANG_CHILD = _CHILD_PRELUDE + """
    conn = resilient_db.connect(target, plugins="", socket_timeout=0.5, query_timeout_grace=0.5,
                                **kwargs)
    cur = conn.cursor()
    cur.execute("SELECT 1"); cur.fetchall()
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"  # the parent has blackholed the server
    try:
        cur.execute("SELECT 1")
    except resilient_db.QueryTimeoutError as exc:
        aborted = time.monotonic()
        print("aborted", aborted, exc.cancelled, flush=True)
    else:
        raise AssertionError("no timeout")
    driver_dirs = [os.path.dirname(m.__file__) for m in
                   (sys.modules.get("psycopg"), sys.modules.get("mysql.connector")) if m]

    def in_driver():
        found = []
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue
            while frame is not None:
                if any(frame.f_code.co_filename.startswith(d) for d in driver_dirs):
                    found.append(frame.f_code.co_filename)
                    break
                frame = frame.f_back
        return found

    # The cancel thread gives up after the grace too: nothing is left inside driver code
    # (polled with a liveness bound: the grace is 0.5 s, a loaded machine adds to it).
    end = time.monotonic() + 5.0
    while in_driver() and time.monotonic() < end:
        time.sleep(0.02)
    print("in_driver", in_driver(), flush=True)
    print("threads", sorted(t.name for t in threading.enumerate()
                            if t is not threading.main_thread() and not t.daemon), flush=True)
    start = time.monotonic()
    resilient_db.shutdown()
    print("shutdown", time.monotonic() - start, flush=True)
    print("exiting", time.monotonic(), flush=True)
"""


@needs_netfilter
def test_a_process_with_a_blackholed_query_exits_promptly_after_the_deadline(
        lonely: Backend, network_faults: NetworkFaults) -> None:
    env = {**os.environ, "BACKEND": lonely.name,
           "CONNECT": json.dumps({**lonely.kwargs, "autocommit": True})}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_NO_HANG_CHILD)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline()
        assert ready.strip() == "ready", ready + (proc.stderr.read() if proc.stderr else "")
        network_faults.blackhole(lonely.server.host, lonely.server.port)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    aborted = float(lines["aborted"].split()[0])
    assert lines["in_driver"] == "[]", lines
    assert lines["threads"] == "[]", lines  # nothing non-daemon left behind
    assert float(lines["shutdown"]) < 0.5
    # Promptly: seconds (the cancel thread's grace, shutdown, interpreter exit; more under
    # load), not the minutes a blackholed socket blocks for. Monotonic is system-wide on Linux.
    assert ended - aborted < 10.0, ended - aborted


# --- network properties -------------------------------------------------------------------------


def socket_of(backend: Backend, conn: resilient_db.ConnectionProxy) -> socket.socket:
    driver = get_driver("psycopg" if backend.name == "pg" else "mysql-connector")
    sock = driver.socket_of(conn.resilient.raw)
    assert sock is not None
    return sock


def test_keepalive_settings_are_on_the_socket(backend: Backend) -> None:
    conn = backend.connect(plugins="", tcp_keepalive_time=7, tcp_keepalive_interval="2.5",
                           tcp_keepalive_probes=4)
    sock = socket_of(backend, conn)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3  # rounded up
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == (7 + 3 * 4) * 1000
    finally:
        sock.close()
    assert one(conn, "SELECT 1") == 1
    conn.close()


def test_keepalive_can_be_turned_off_and_defaults_are_left_alone(backend: Backend) -> None:
    off = backend.connect(plugins="", tcp_keepalive=False)
    default = backend.connect(plugins="")
    raw_default = backend.raw()
    sock_off, sock_default = socket_of(backend, off), socket_of(backend, default)
    driver = get_driver("psycopg" if backend.name == "pg" else "mysql-connector")
    raw_sock = driver.socket_of(raw_default)
    assert raw_sock is not None
    try:
        assert sock_off.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        # Unset: exactly what the driver does on its own (libpq: on; mysql-connector: off).
        assert (sock_default.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                == raw_sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
    finally:
        for s in (sock_off, sock_default, raw_sock):
            s.close()
    for c in (off, default, raw_default):
        c.close()


def test_explicit_libpq_keepalive_arguments_win(pg_backend: Backend) -> None:
    conn = pg_backend.connect(plugins="", tcp_keepalive_time=30, keepalives_idle=11)
    sock = socket_of(pg_backend, conn)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 11
    finally:
        sock.close()
    conn.close()


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("socket_timeout", -1, "0.01 to 86400; 0: no deadline"),
    ("socket_timeout", "soon", "expected a number"),
    ("query_timeout_grace", 0, "0.01 to 86400"),
    ("tcp_keepalive", "maybe", "a boolean"),
    ("tcp_keepalive_time", 0, "from 1 to 32767"),
    ("tcp_keepalive_time", 40000, "from 1 to 32767"),
    ("tcp_keepalive_interval", "0.5", "from 1 to 32767"),
    ("tcp_keepalive_probes", 0, "from 1 to 127"),
    ("tcp_keepalive_probes", 2.5, "a whole number"),
    ("tcp_keepalive_probes", 500, "from 1 to 127"),
])
def test_bad_values_are_rejected_naming_the_property(name: str, value: object,
                                                     expected: str) -> None:
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, "host=127.0.0.1 port=1", plugins="",
                             **{name: value})
    assert info.value.parameter == name
    assert name in str(info.value) and expected in str(info.value)


def test_keepalive_off_with_keepalive_tuning_is_a_contradiction() -> None:
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.connect(mysql.connector.connect, host="127.0.0.1", port=1, plugins="",
                             tcp_keepalive=False, tcp_keepalive_time=10)
    assert info.value.parameter == "tcp_keepalive"
    assert "tcp_keepalive_time" in str(info.value)


def test_mysql_client_timeouts_count_as_disconnects_but_the_server_3024_does_not() -> None:
    # When keepalive / TCP_USER_TIMEOUT gives up on a socket, mysql-connector raises its
    # ReadTimeoutError (3024) and closes the connection: failover must see a disconnect.
    # The server's own 3024 (max_execution_time) leaves the session alive.
    driver = get_driver("mysql-connector")
    assert driver.is_disconnect(mysql.connector.errors.ReadTimeoutError(errno=3024, msg="x"))
    assert driver.is_disconnect(mysql.connector.errors.WriteTimeoutError(errno=3024, msg="x"))
    assert not driver.is_disconnect(mysql.connector.errors.DatabaseError(
        errno=3024, msg="Query execution was interrupted, maximum statement execution time "
                        "exceeded"))


# --- one psycopg connection shared by threads -------------------------------------------------
#
# psycopg 3 connections are thread-safe: statements from several threads run one after the
# other. A deadline belongs to a statement: a cancel only ever hits the statement whose
# deadline expired; a statement whose deadline expires while it waits for the connection gets
# QueryTimeoutError without touching the one running; nobody sees a raw QueryCanceled, and the
# connection survives.


def _active_on_server(observer: Any, pid: int) -> bool:
    row = observer.execute("SELECT state FROM pg_catalog.pg_stat_activity WHERE pid = %s",
                           (pid,)).fetchone()
    return row is not None and row[0] == "active"


class _Outcome:
    """What one thread's statements came to: results, or the exception and when."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.error: BaseException | None = None
        self.ended = 0.0


def _in_thread(name: str, work: Callable[[], Any], outcomes: dict[str, _Outcome],
               timeout: float | None = None) -> threading.Thread:
    outcome = outcomes[name] = _Outcome()

    def run() -> None:
        try:
            if timeout is None:
                outcome.results.append(work())
            else:
                with resilient_db.call_options(timeout=timeout):
                    outcome.results.append(work())
        except BaseException as exc:  # recorded and asserted on by the test
            outcome.error = exc
        finally:
            outcome.ended = time.monotonic()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def _no_raw_cancel(outcomes: dict[str, _Outcome]) -> None:
    for name, outcome in outcomes.items():
        assert not isinstance(outcome.error, psycopg.errors.QueryCanceled), (name, outcome.error)


def test_shared_connection_a_statement_waiting_for_the_connection_never_cancels_the_running_one(
        pg_backend: Backend, sink: resilient_db.CollectingSink) -> None:
    conn = pg_backend.connect(plugins="", socket_timeout=30, autocommit=True,
                              query_timeout_grace=5)
    pid = one(conn, "SELECT pg_backend_pid()")
    observer = pg_backend.raw(autocommit=True)
    outcomes: dict[str, _Outcome] = {}
    running = _in_thread("running", lambda: one(conn, "SELECT 7 FROM pg_sleep(3)"), outcomes)
    assert wait_for(lambda: _active_on_server(observer, pid))
    # The waiter's 0.3 s deadline expires while "running" holds the connection for 3 s.
    waiter = _in_thread("waiter", lambda: one(conn, "SELECT 1"), outcomes, timeout=0.3)
    for thread in (running, waiter):
        thread.join(30)
    _no_raw_cancel(outcomes)
    assert outcomes["running"].error is None and outcomes["running"].results == [7]
    err = outcomes["waiter"].error
    assert isinstance(err, resilient_db.QueryTimeoutError), err
    assert isinstance(err, psycopg.OperationalError)
    assert err.timeout == pytest.approx(0.3) and err.cancelled is False
    assert "waiting for the connection" in str(err)
    # Its deadline bounded its wait: it did not wait for the running statement to end.
    assert outcomes["waiter"].ended < outcomes["running"].ended
    decision = sink.of_kind("statement.deadline_expired")[-1]
    assert decision.attributes["resilient_db.deadline.cancelled"] is False
    assert decision.attributes["resilient_db.deadline.socket_broken"] is False
    assert not conn.resilient.raw.broken and not conn.closed
    assert one(conn, "SELECT pg_backend_pid()") == pid  # same session, still usable
    observer.close()
    conn.close()


def test_shared_connection_the_running_statement_times_out_on_its_own_deadline(
        pg_backend: Backend) -> None:
    conn = pg_backend.connect(plugins="", socket_timeout=1.0, autocommit=True,
                              query_timeout_grace=5)
    pid = one(conn, "SELECT pg_backend_pid()")
    observer = pg_backend.raw(autocommit=True)
    outcomes: dict[str, _Outcome] = {}
    slow = _in_thread("slow", lambda: one(conn, "SELECT pg_sleep(30)"), outcomes)
    assert wait_for(lambda: _active_on_server(observer, pid))
    # A later statement with a longer deadline must not carry the slow one past its own.
    fast = _in_thread("fast", lambda: one(conn, "SELECT 42"), outcomes, timeout=8)
    for thread in (slow, fast):
        thread.join(30)
    _no_raw_cancel(outcomes)
    err = outcomes["slow"].error
    assert isinstance(err, resilient_db.QueryTimeoutError), err
    assert err.timeout == pytest.approx(1.0) and err.cancelled is True
    assert outcomes["fast"].error is None and outcomes["fast"].results == [42]
    assert not conn.resilient.raw.broken
    assert one(conn, "SELECT pg_backend_pid()") == pid
    observer.close()
    conn.close()


@pytest.mark.parametrize("how", ["socket_timeout", "call_options"])
def test_shared_connection_four_threads_each_get_their_own_outcome(
        pg_backend: Backend, how: str) -> None:
    # Two threads run statements that exceed a 1 s deadline, two run many short ones with a
    # long deadline, all on one connection. Every slow statement gets QueryTimeoutError (the
    # server cancelled it, or its deadline passed while it waited for the connection); every
    # short one succeeds; nobody sees QueryCanceled; the connection survives.
    slow_timeout = 1.0
    if how == "socket_timeout":
        conn = pg_backend.connect(plugins="", socket_timeout=slow_timeout, autocommit=True,
                                  query_timeout_grace=5)
        slow_option, fast_option = None, 20.0
    else:
        conn = pg_backend.connect(plugins="", socket_timeout=20, autocommit=True,
                                  query_timeout_grace=5)
        slow_option, fast_option = slow_timeout, None
    pid = one(conn, "SELECT pg_backend_pid()")

    def fast_work(n: int) -> list[Any]:
        return [one(conn, f"SELECT {n} + {i}") for i in range(20)]

    outcomes: dict[str, _Outcome] = {}
    threads = [
        _in_thread("slow-1", lambda: one(conn, "SELECT pg_sleep(30)"), outcomes, slow_option),
        _in_thread("fast-1", lambda: fast_work(100), outcomes, fast_option),
        _in_thread("slow-2", lambda: one(conn, "SELECT pg_sleep(30)"), outcomes, slow_option),
        _in_thread("fast-2", lambda: fast_work(200), outcomes, fast_option),
    ]
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    _no_raw_cancel(outcomes)
    for name in ("slow-1", "slow-2"):
        err = outcomes[name].error
        assert isinstance(err, resilient_db.QueryTimeoutError), (name, err)
        assert err.timeout == pytest.approx(slow_timeout)
    assert outcomes["fast-1"].error is None, outcomes["fast-1"].error
    assert outcomes["fast-2"].error is None, outcomes["fast-2"].error
    assert outcomes["fast-1"].results == [[100 + i for i in range(20)]]
    assert outcomes["fast-2"].results == [[200 + i for i in range(20)]]
    assert not conn.resilient.raw.broken
    assert one(conn, "SELECT pg_backend_pid()") == pid
    conn.close()


def test_a_huge_deadline_neither_crashes_the_watchdog_nor_delays_other_deadlines(
        backend: Backend) -> None:
    # A fresh process, so that the far entry is the only one the watchdog sleeps towards.
    code = _CHILD_PRELUDE + """
    from resilient_db.watchdog import get_watchdog
    huge = resilient_db.connect(target, plugins="", **kwargs)
    with resilient_db.call_options(timeout=1e300):  # a far-future entry in the heap
        cur = huge.cursor(); cur.execute("SELECT 1"); cur.fetchall()
    time.sleep(0.3)  # the watchdog now sleeps towards it
    other = resilient_db.connect(target, plugins="", socket_timeout=0.3,
                                 query_timeout_grace=5, **kwargs)
    cur = other.cursor()
    start = time.monotonic()
    try:
        cur.execute(sleep)
    except resilient_db.QueryTimeoutError as exc:
        assert exc.cancelled, exc
    else:
        raise AssertionError("no timeout")
    watchdog = get_watchdog()
    print(json.dumps({"elapsed": time.monotonic() - start, "crashes": watchdog.crashes,
                      "alive": watchdog.thread is not None and watchdog.thread.is_alive()}))
    """
    out, _ = run_child(code, backend)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["crashes"] == 0, result
    assert result["alive"], result
    assert result["elapsed"] < QUICK, result


def test_the_turn_lets_one_statement_at_a_time_through_and_loses_no_wake_up() -> None:
    # The stage alone, around a driver call that checks it runs alone: eight threads, with
    # and without deadlines, some of which expire while waiting. Every call either ran alone
    # or raised QueryTimeoutError without running; none is left waiting.
    from resilient_db._deadline import DeadlineStage
    from resilient_db._params import SOCKET_TIMEOUT
    from resilient_db._pipeline import RUN_CALL, Call, HostSpec, Op, PluginContext
    from resilient_db._properties import Settings

    ctx = PluginContext(Settings({SOCKET_TIMEOUT: 30.0}), get_driver("psycopg"),
                        HostSpec("turn", 1))
    handler = DeadlineStage(ctx).wrap_execute(RUN_CALL)
    inside: list[int] = []
    overlaps: list[int] = []
    ran: list[int] = []

    def driver_call(n: int) -> int:
        inside.append(n)
        if len(inside) > 1:
            overlaps.append(n)
        time.sleep(0.002)
        inside.remove(n)
        ran.append(n)
        return n

    class Proxy:
        _raw = None
        _host = HostSpec("turn", 1)

    timeouts: list[int] = []

    def worker(k: int) -> None:
        # Threads 0-1: no deadline; 2-5: the connection's 30 s; 6-7: 1 ms, often expiring
        # while waiting for the turn.
        option = 0.0 if k < 2 else (0.001 if k >= 6 else None)
        for i in range(40):
            call = Call(Op.EXECUTE, "Cursor.execute", driver_call, (k * 1000 + i,), {},
                        Proxy())
            with resilient_db.call_options(timeout=option):
                try:
                    assert handler(call) == k * 1000 + i
                except resilient_db.QueryTimeoutError as exc:
                    assert not exc.cancelled
                    timeouts.append(k)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)  # no lost wake-up
    assert overlaps == []
    assert len(ran) + len(timeouts) == 8 * 40
    assert set(timeouts) <= {6, 7}  # only the 1 ms deadlines expire
