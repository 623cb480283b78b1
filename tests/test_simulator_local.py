"""Tests of the throwaway-server launcher (simulator.local) against real servers."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg
import pytest

from simulator import _addresses
from simulator.local import (
    Engine,
    LocalServer,
    ServerStartError,
    SimulatorError,
    start_mariadb,
    start_postgres,
    sweep_stale,
)
from simulator.pytest_plugin import LocalServerFactory

pytestmark = pytest.mark.real_server

REPO = Path(__file__).resolve().parent.parent
ENGINES: list[Engine] = ["postgresql", "mariadb"]


# --------------------------------------------------------------------------------------------
# helpers


def pg_rows(server: LocalServer, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []


def mysql_rows(server: LocalServer, sql: str) -> list[tuple[Any, ...]]:
    conn = mysql.connector.connect(**server.connect_kwargs(), use_pure=True, autocommit=True)
    try:
        cursor = conn.cursor()
        cursor.execute(sql)
        rows = cursor.fetchall() if cursor.description else []
        cursor.close()
        return [tuple(row) for row in rows]
    finally:
        conn.close()


def rows(server: LocalServer, sql: str) -> list[tuple[Any, ...]]:
    return pg_rows(server, sql) if server.engine == "postgresql" else mysql_rows(server, sql)


def server_address(server: LocalServer) -> str:
    """The address the server saw the connection arrive on."""
    if server.engine == "postgresql":
        return str(pg_rows(server, "SELECT inet_server_addr()")[0][0])
    return str(mysql_rows(server, "SELECT @@bind_address")[0][0])


def live_group_members(pgid: int) -> list[int]:
    """Non-zombie processes in process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def claimed_by(host: str, pid: int) -> bool:
    """True if ``host`` is claimed by process ``pid`` (others may claim a released address)."""
    try:
        record = json.loads(_addresses.claim_path(host).read_text())
    except FileNotFoundError:
        return False
    return bool(record["owner"]["pid"] == pid)


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def run_child(code: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def no_claims_added() -> Iterator[None]:
    """Bad input must not leave an address claim behind. Only this process's claims count:
    the registry is machine-wide, and other processes (another test worker, a developer's
    cluster) claim addresses meanwhile."""
    root = _addresses.sim_root()
    before = set(os.listdir(_addresses.ensure_dir(root / "addresses")))
    yield
    added = set(os.listdir(root / "addresses")) - before
    assert not [name for name in added if claimed_by(name, os.getpid())]


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.usefixtures("no_claims_added")
class TestBadInput:
    def test_unknown_flavour_lists_the_valid_ones(self) -> None:
        with pytest.raises(ValueError, match=r"flavour must be one of 'pg', 'rds-pg'"):
            start_postgres(flavour="aurora-pg")
        with pytest.raises(ValueError, match=r"flavour must be one of 'mysql', 'rds-mysql'"):
            start_mariadb(flavour="pg")

    @pytest.mark.parametrize("host", ["10.0.0.1", "localhost", "::1", "127.0.0.0",
                                      "127.255.255.255", "127.1", ""])
    def test_host_outside_loopback(self, host: str) -> None:
        with pytest.raises(ValueError, match=r"^host must be an IPv4 address in 127\.0\.0\.0/8"):
            start_postgres(host=host)

    @pytest.mark.parametrize("port", [0, -1, 65536, 80, True, "5432"])
    def test_port_out_of_range(self, port: Any) -> None:
        with pytest.raises(ValueError, match=r"^port must be an integer in 1024-65535"):
            start_mariadb(port=port)

    @pytest.mark.parametrize("settings", [{"port": "1"}, {"listen_addresses": "*"},
                                          {"bad name": "1"}, {"work_mem": "1\n2"},
                                          {"work_mem": None}, ["work_mem"]])
    def test_bad_settings(self, settings: Any) -> None:
        with pytest.raises(ValueError, match=r"^settings"):
            start_postgres(settings=settings)

    def test_reserved_mariadb_settings_in_either_spelling(self) -> None:
        with pytest.raises(ValueError, match=r"^settings: 'bind-address' is set by the launcher"):
            start_mariadb(settings={"bind-address": "0.0.0.0"})

    def test_bad_name_and_engine(self) -> None:
        with pytest.raises(ValueError, match=r"^name must be"):
            start_postgres(name="a/b")
        with pytest.raises(ValueError, match=r"^engine must be one of 'postgresql', 'mariadb'"):
            LocalServer.create("oracle")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the session servers of each flavour


def test_pg_server_connects_every_way(pg_server: LocalServer) -> None:
    srv = pg_server
    assert (srv.engine, srv.flavour, srv.user, srv.database) == ("postgresql", "pg", "postgres",
                                                                 "test")
    assert srv.host != "127.0.0.1"
    assert srv.host.startswith("127.")
    assert srv.port == 5432  # the default port is free on a private address
    assert srv.is_running()
    assert srv.pid is not None
    expected = (srv.user, srv.database, srv.host)
    query = "SELECT current_user, current_database(), host(inet_server_addr())"
    connections = [psycopg.connect(srv.conninfo()), psycopg.connect(srv.uri()),
                   psycopg.connect(**srv.connect_kwargs())]  # type: ignore[arg-type]
    for conn in connections:
        with conn:
            assert conn.execute(query).fetchone() == expected


def test_pg_requires_the_password(pg_server: LocalServer) -> None:
    kwargs = {**pg_server.connect_kwargs(), "password": "wrong"}
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**kwargs)  # type: ignore[arg-type]
    method = pg_rows(pg_server, "SELECT auth_method FROM pg_hba_file_rules "
                                "WHERE type = 'host' AND 'all' = ANY(database)")
    assert method == [("scram-sha-256",)]


def test_pg_listens_only_on_its_address_and_private_socket(pg_server: LocalServer) -> None:
    settings = dict(pg_rows(pg_server, "SELECT name, setting FROM pg_settings WHERE name IN "
                                       "('listen_addresses', 'unix_socket_directories')"))
    assert settings["listen_addresses"] == pg_server.host
    socket_dir = Path(settings["unix_socket_directories"])
    assert socket_dir == pg_server.socket_dir
    assert pg_server.data_dir not in socket_dir.parents
    assert (socket_dir / f".s.PGSQL.{pg_server.port}").is_socket()


def test_pg_is_configured_for_replication(pg_server: LocalServer) -> None:
    settings = dict(pg_rows(pg_server, "SELECT name, setting FROM pg_settings WHERE name IN "
                                       "('wal_level', 'wal_log_hints', 'max_wal_senders', "
                                       "'hot_standby', 'full_page_writes')"))
    assert settings["wal_level"] == "replica"
    assert settings["wal_log_hints"] == settings["hot_standby"] == "on"
    assert settings["full_page_writes"] == "on"  # pg_rewind needs it
    assert int(settings["max_wal_senders"]) >= 10


def test_pg_runs_as_postgres_from_the_data_dir(pg_server: LocalServer) -> None:
    assert pg_server.pid is not None
    if os.geteuid() == 0:
        assert Path(f"/proc/{pg_server.pid}").stat().st_uid == _uid("postgres")
        assert pg_server.base_dir.stat().st_uid == _uid("postgres")
    assert pg_server.log_path.read_text().count("ready to accept connections") >= 1


def _uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def test_plain_pg_has_no_rds_extensions(pg_server: LocalServer) -> None:
    assert pg_rows(pg_server, "SELECT 1 FROM pg_catalog.pg_settings "
                              "WHERE name = 'rds.extensions'") == []


def test_rds_pg_shows_rds_extensions(rds_pg_server: LocalServer) -> None:
    assert rds_pg_server.flavour == "rds-pg"
    found = pg_rows(rds_pg_server, "SELECT setting FROM pg_catalog.pg_settings "
                                   "WHERE name = 'rds.extensions'")
    assert len(found) == 1
    assert "rds_tools" in found[0][0]
    assert "aurora_stat_utils" not in found[0][0]
    # The replacement view keeps the rest of pg_settings, including its update rule.
    assert pg_rows(rds_pg_server, "SELECT count(*) FROM pg_settings WHERE name = 'work_mem'")[0][
        0] == 1


def test_mysql_server_connects(mysql_server: LocalServer) -> None:
    srv = mysql_server
    assert (srv.engine, srv.flavour, srv.user, srv.database) == ("mariadb", "mysql", "root",
                                                                 "test")
    assert srv.port == 3306
    assert srv.host != "127.0.0.1"
    assert srv.connect_kwargs() == {"host": srv.host, "port": srv.port, "database": "test",
                                    "user": "root", "password": "root"}
    assert srv.uri() == f"mysql://root:root@{srv.host}:3306/test"
    assert mysql_rows(srv, "SELECT DATABASE(), CURRENT_USER()") == [("test", "root@127.%")]
    with pytest.raises(mysql.connector.errors.ProgrammingError, match="Access denied"):
        mysql.connector.connect(**{**srv.connect_kwargs(), "password": "wrong"}, use_pure=True)


def test_mysql_settings_for_replication(mysql_server: LocalServer) -> None:
    srv = mysql_server
    found = mysql_rows(srv, "SELECT @@bind_address, @@server_id, @@log_bin, @@skip_name_resolve")
    _, b, c, d = (int(part) for part in srv.host.split("."))
    assert found == [(srv.host, (b << 16) | (c << 8) | d, 1, 1)]


def test_plain_mysql_has_no_rds_marks(mysql_server: LocalServer) -> None:
    variables = dict(mysql_rows(mysql_server, "SHOW VARIABLES WHERE Variable_name IN "
                                              "('version_comment', 'report_host')"))
    assert variables["version_comment"] != "Source distribution"
    assert variables["report_host"] == ""


def test_rds_mysql_has_rds_marks(rds_mysql_server: LocalServer) -> None:
    assert rds_mysql_server.flavour == "rds-mysql"
    assert mysql_rows(rds_mysql_server, "SHOW VARIABLES LIKE 'version_comment'") == [
        ("version_comment", "Source distribution")]
    assert mysql_rows(rds_mysql_server, "SHOW VARIABLES LIKE 'report_host'") == [
        ("report_host", rds_mysql_server.host)]


# --------------------------------------------------------------------------------------------
# servers of one test


def test_settings_are_applied(local_server_factory: LocalServerFactory) -> None:
    pg = local_server_factory("postgresql", settings={"work_mem": "7MB",
                                                      "application_name": "it's \\ here",
                                                      "log_connections": True})
    assert pg_rows(pg, "SHOW work_mem") == [("7MB",)]
    assert pg_rows(pg, "SHOW application_name") == [("it's \\ here",)]
    assert pg_rows(pg, "SHOW log_connections") == [("on",)]
    maria = local_server_factory("mariadb", settings={"max_connections": 77,
                                                      "innodb_stats_persistent": False,
                                                      "skip-log-bin": ""})
    assert mysql_rows(maria, "SELECT @@max_connections, @@innodb_stats_persistent, "
                             "@@log_bin") == [(77, 0, 0)]


@pytest.mark.parametrize("engine", ENGINES)
def test_kill_and_start_keep_the_data(local_server_factory: LocalServerFactory,
                                      engine: Engine) -> None:
    srv = local_server_factory(engine)
    rows(srv, "CREATE TABLE kept (id int primary key)")
    rows(srv, "INSERT INTO kept VALUES (42)")
    old_pid = srv.pid
    assert old_pid is not None
    srv.kill()
    assert not srv.is_running()
    assert srv.pid is None
    assert live_group_members(old_pid) == []
    assert srv.data_dir.is_dir()
    srv.start()
    assert srv.is_running()
    assert rows(srv, "SELECT id FROM kept") == [(42,)]
    srv.stop(cleanup=False)
    assert not srv.is_running()
    assert srv.data_dir.is_dir()
    srv.start()
    assert rows(srv, "SELECT id FROM kept") == [(42,)]


@pytest.mark.parametrize("engine", ENGINES)
def test_two_servers_share_a_port_on_different_addresses(
        local_server_factory: LocalServerFactory, engine: Engine) -> None:
    first = local_server_factory(engine)
    second = local_server_factory(engine)
    assert first.port == second.port
    assert first.host != second.host
    assert server_address(first) == first.host
    assert server_address(second) == second.host
    rows(first, "CREATE TABLE only_on_first (id int)")
    assert rows(second, "SELECT count(*) FROM information_schema.tables "
                        "WHERE table_name = 'only_on_first'") == [(0,)]


def test_explicit_host_and_port(local_server_factory: LocalServerFactory) -> None:
    # 127.0.0.1:5432 belongs to the machine's own PostgreSQL, so another port is chosen;
    # that server is never contacted.
    shared = local_server_factory("postgresql", host="127.0.0.1", name="on-shared-address")
    assert (shared.host, shared.name) == ("127.0.0.1", "on-shared-address")
    assert shared.port != 5432
    assert server_address(shared) == "127.0.0.1"
    port = _addresses.free_port("127.0.0.1")
    fixed = local_server_factory("mariadb", host="127.0.0.1", port=port)
    assert fixed.port == port
    assert mysql_rows(fixed, "SELECT @@port") == [(port,)]


def _named_dirs(name: str) -> list[Path]:
    """Server directories whose metadata names ``name`` (other tests' servers may come and
    go in the shared directory meanwhile)."""
    found = []
    for meta in (_addresses.sim_root() / "servers").glob("*/meta.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(meta.read_text()).get("name") == name:
                found.append(meta.parent)
    return found


def test_start_failure_reports_the_log_and_cleans_up() -> None:
    name = f"failing-start-{os.getpid()}"
    with pytest.raises(ServerStartError, match="shared_buffers") as caught:
        start_postgres(settings={"shared_buffers": "plenty"}, timeout=10, name=name)
    assert "exited with status" in caught.value.message
    assert "invalid value for parameter" in caught.value.log_tail
    assert _named_dirs(name) == []


def test_start_after_removal_is_refused() -> None:
    srv = start_postgres()
    srv.stop()
    with pytest.raises(SimulatorError, match="removed"):
        srv.start()


# --------------------------------------------------------------------------------------------
# cleanup


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_leaves_nothing_behind(engine: Engine) -> None:
    start = start_postgres if engine == "postgresql" else start_mariadb
    with start() as srv:
        pid, base_dir = srv.pid, srv.base_dir
        assert pid is not None
        assert base_dir.is_dir()
        assert claimed_by(srv.host, os.getpid())
    assert not srv.is_running()
    assert live_group_members(pid) == []
    assert not base_dir.exists()
    assert not claimed_by(srv.host, os.getpid())
    srv.stop()  # idempotent
    srv.kill()
    assert "removed" in repr(srv)


def sysv_segments() -> set[int]:
    return {int(row.split()[1])
            for row in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]}


def test_removing_a_killed_postgres_frees_its_shared_memory() -> None:
    srv = start_postgres()
    shmid = int((srv.data_dir / "postmaster.pid").read_text().splitlines()[6].split()[1])
    assert shmid in sysv_segments()
    assert list((srv.data_dir / "pg_dynshmem").iterdir())  # not in /dev/shm
    srv.kill()
    assert shmid in sysv_segments()  # a killed postmaster leaves it behind
    srv.stop()
    assert shmid not in sysv_segments()


def test_sweep_keeps_servers_of_live_owners(local_server_factory: LocalServerFactory) -> None:
    srv = local_server_factory("postgresql")
    assert srv.base_dir not in sweep_stale()
    assert srv.is_running()
    assert claimed_by(srv.host, os.getpid())
    assert pg_rows(srv, "SELECT 1") == [(1,)]


_CHILD_STARTS_SERVERS = """
    import json, sys, time
    from simulator.local import start_mariadb, start_postgres
    servers = [start_postgres(), start_mariadb()]
    print(json.dumps([{"pid": s.pid, "base_dir": str(s.base_dir), "host": s.host}
                      for s in servers]), flush=True)
    if sys.argv[-1] == "wait":
        time.sleep(600)
"""


def _started_by(child: subprocess.Popen[str]) -> list[dict[str, Any]]:
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, "the child process did not start its servers"
    started: list[dict[str, Any]] = json.loads(line)
    for server in started:
        server["identity"] = _addresses.ProcessIdentity.of(server["pid"])
        assert server["identity"] is not None
    return started


def test_exit_without_stop_cleans_up_at_exit() -> None:
    child = run_child(_CHILD_STARTS_SERVERS)
    started = _started_by(child)
    assert child.wait(timeout=60) == 0
    for server in started:
        assert not server["identity"].is_alive()
        assert live_group_members(server["pid"]) == []
        assert not Path(server["base_dir"]).exists()
        assert not claimed_by(server["host"], child.pid)


def test_sigkilled_owner_takes_its_servers_along_and_sweep_removes_the_rest() -> None:
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CHILD_STARTS_SERVERS),
                              "wait"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.PIPE, text=True)
    try:
        started = _started_by(child)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    for server in started:
        # PR_SET_PDEATHSIG kills the server; PostgreSQL's backends follow their postmaster.
        assert wait_for(_is_dead(server["identity"]))
        assert wait_for(_group_is_empty(server["pid"]))
    postmaster_pid = Path(started[0]["base_dir"], "data", "postmaster.pid")
    shmid = int(postmaster_pid.read_text().splitlines()[6].split()[1])
    sweep_stale()
    for server in started:
        assert not Path(server["base_dir"]).exists()
        assert not claimed_by(server["host"], child.pid)
    assert shmid not in sysv_segments()


def _is_dead(identity: _addresses.ProcessIdentity) -> Callable[[], bool]:
    return lambda: not identity.is_alive()


def _group_is_empty(pgid: int) -> Callable[[], bool]:
    return lambda: live_group_members(pgid) == []


def test_concurrent_processes_get_distinct_addresses() -> None:
    code = """
        import time
        from simulator._addresses import ProcessIdentity, claim_address
        print(claim_address(ProcessIdentity.current(), "test"), flush=True)
        time.sleep(600)  # holds its claim until the parent, having read all four, kills it
    """
    children = [run_child(code) for _ in range(4)]
    try:
        hosts = [child.stdout.readline().strip() for child in children if child.stdout]
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert len(set(hosts)) == 4
    assert all(host.startswith("127.") and host != "127.0.0.1" for host in hosts)
    _addresses.sweep_address_claims()
    for host, child in zip(hosts, children, strict=True):
        assert not claimed_by(host, child.pid)
