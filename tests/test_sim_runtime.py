"""The instance-runtime interface (simulator.runtime) and the backends that implement it.

:func:`check_runtime_contract` is the contract every backend must meet, exercised against
real servers: the local launcher here always, the Docker backend wherever a Docker daemon
answers (marker ``docker``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import socket
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg
import pytest

from simulator._addresses import ProcessIdentity
from simulator.local import LocalServer, SimulatorError
from simulator.runtime import Engine, InstanceRuntime
from simulator.testcontainers_backend import (
    _OWNER_LABEL,
    CONTAINER_LABEL,
    DockerServer,
    _docker,
    bridge_addresses,
    docker_unavailable_reason,
    server_image,
    sweep_containers,
)

ENGINES: list[Engine] = ["postgresql", "mariadb"]
#: A container's first start pulls nothing here (done before the timer) but initialises a
#: data directory; a local server starts in well under a second.
START_TIMEOUT = 120.0

RuntimeFactory = Callable[[Engine], InstanceRuntime]

# Static proof that both backends implement the interface (mypy --strict checks these).
_LOCAL: type[InstanceRuntime] = LocalServer
_DOCKER: type[InstanceRuntime] = DockerServer


# --------------------------------------------------------------------------------------------
# The contract


def _connect(runtime: InstanceRuntime, **extra: Any) -> Any:
    kwargs = {**runtime.connect_kwargs(), **extra}
    if runtime.engine == "postgresql":
        return psycopg.connect(**kwargs, autocommit=True, connect_timeout=10)
    return mysql.connector.connect(**kwargs, use_pure=True, autocommit=True,
                                   connection_timeout=10)


def _query(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    cursor = conn.cursor()
    try:
        cursor.execute(sql)
        return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
    finally:
        cursor.close()


def _rows(runtime: InstanceRuntime, sql: str) -> list[tuple[Any, ...]]:
    conn = _connect(runtime)
    try:
        return _query(conn, sql)
    finally:
        conn.close()


def _refused(host: str, port: int) -> bool:
    """True if nothing accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except OSError:
        return True


def _check_connection_strings(runtime: InstanceRuntime) -> None:
    kwargs = runtime.connect_kwargs()
    database_key = "dbname" if runtime.engine == "postgresql" else "database"
    assert kwargs == {"host": runtime.host, "port": runtime.port, database_key: runtime.database,
                      "user": runtime.user, "password": runtime.password}
    # conninfo: the same pairs, with the driver's own key names.
    pairs = dict(item.split("=", 1) for item in runtime.conninfo().split())
    assert pairs == {key: str(value) for key, value in kwargs.items()}
    uri = urllib.parse.urlsplit(runtime.uri())
    assert uri.scheme == ("postgresql" if runtime.engine == "postgresql" else "mysql")
    assert (uri.hostname, uri.port, uri.username, uri.password, uri.path) == (
        runtime.host, runtime.port, runtime.user, runtime.password, f"/{runtime.database}")
    if runtime.engine == "postgresql":
        # libpq accepts both forms as they are.
        for dsn in (runtime.conninfo(), runtime.uri()):
            with psycopg.connect(dsn, connect_timeout=10) as conn:
                assert conn.execute("SELECT current_database()").fetchone() == (
                    runtime.database,)


def check_runtime_contract(factory: RuntimeFactory, engine: Engine) -> None:
    """Drive one runtime from ``factory(engine)`` (created, not started) through its whole
    lifecycle and check every member of :class:`InstanceRuntime` on the way.

    The runtime is removed at the end, also when a check fails.
    """
    runtime = factory(engine)
    try:
        _check_contract(runtime, engine)
    finally:
        runtime.stop()


def _check_contract(runtime: InstanceRuntime, engine: Engine) -> None:
    # Identity: fixed, well-typed facts.
    assert isinstance(runtime, InstanceRuntime)
    assert runtime.engine == engine
    assert isinstance(ipaddress.ip_address(runtime.host), ipaddress.IPv4Address)
    assert isinstance(runtime.port, int) and 0 < runtime.port < 65536
    for text in (runtime.user, runtime.password, runtime.database):
        assert isinstance(text, str) and text
    data_dir = runtime.data_dir
    assert data_dir is None or isinstance(data_dir, Path)
    address = (runtime.host, runtime.port)
    assert not runtime.is_running()
    assert isinstance(runtime.log_tail(), str)

    # start: ready for connections when it returns; a second start changes nothing.
    assert runtime.start(timeout=START_TIMEOUT) is runtime
    assert runtime.is_running()
    _check_connection_strings(runtime)
    conn = _connect(runtime)
    try:
        _query(conn, "CREATE TABLE contract (id int primary key)")
        _query(conn, "INSERT INTO contract VALUES (1)")
        assert runtime.start(timeout=START_TIMEOUT) is runtime
        assert _query(conn, "SELECT count(*) FROM contract") == [(1,)]  # not restarted
    finally:
        conn.close()
    assert runtime.log_tail(5).count("\n") < 5

    # kill: a crash. Connections break, nothing listens, committed data survives.
    conn = _connect(runtime)
    runtime.kill()
    assert not runtime.is_running()
    with pytest.raises((psycopg.Error, mysql.connector.Error)):
        _query(conn, "SELECT 1")
    with contextlib.suppress(Exception):
        conn.close()
    assert _refused(*address)
    runtime.kill()  # a no-op when not running
    assert isinstance(runtime.log_tail(), str)

    runtime.start(timeout=START_TIMEOUT)
    assert (runtime.host, runtime.port) == address
    assert _rows(runtime, "SELECT id FROM contract") == [(1,)]
    _rows(runtime, "INSERT INTO contract VALUES (2)")

    # stop(cleanup=False): a clean shutdown that keeps everything for the next start.
    runtime.stop(cleanup=False)
    assert not runtime.is_running()
    assert _refused(*address)
    if data_dir is not None:
        assert data_dir.is_dir()
    runtime.start(timeout=START_TIMEOUT)
    assert (runtime.host, runtime.port) == address
    assert _rows(runtime, "SELECT id FROM contract ORDER BY id") == [(1,), (2,)]

    # stop(): removed for good; idempotent; no way back.
    runtime.stop()
    assert not runtime.is_running()
    assert _refused(*address)
    if data_dir is not None:
        assert not data_dir.exists()
    runtime.stop()
    runtime.kill()
    with pytest.raises(SimulatorError):
        runtime.start(timeout=START_TIMEOUT)


# --------------------------------------------------------------------------------------------
# The interface itself


class _Partial:
    """Has the attributes but not the crash method: not a runtime."""

    engine = "postgresql"
    host = "127.0.0.1"
    port = 5432
    user = password = database = "x"
    data_dir = None

    def start(self, timeout: float = 1.0) -> _Partial:
        return self

    def stop(self, *, cleanup: bool = True, timeout: float = 1.0) -> None:
        pass

    def is_running(self) -> bool:
        return False

    def connect_kwargs(self) -> dict[str, str | int]:
        return {}

    def conninfo(self) -> str:
        return ""

    def uri(self) -> str:
        return ""

    def log_tail(self, lines: int = 1) -> str:
        return ""


@pytest.mark.unit
def test_runtime_checkable_rejects_an_incomplete_object() -> None:
    assert not isinstance(_Partial(), InstanceRuntime)


@pytest.mark.unit
def test_protocol_lists_exactly_the_members_the_cluster_uses() -> None:
    members = {name for name in vars(InstanceRuntime) if not name.startswith("_")}
    assert members == {"engine", "host", "port", "user", "password", "database", "data_dir",
                       "start", "stop", "kill", "is_running", "connect_kwargs", "conninfo",
                       "uri", "log_tail"}


# --------------------------------------------------------------------------------------------
# The local backend


@pytest.mark.real_server
@pytest.mark.parametrize("engine", ENGINES)
def test_local_server_meets_the_runtime_contract(engine: Engine) -> None:
    check_runtime_contract(LocalServer.create, engine)


@pytest.mark.real_server
def test_local_server_is_an_instance_runtime() -> None:
    server = LocalServer.create("postgresql")
    try:
        assert isinstance(server, InstanceRuntime)
        assert server.data_dir is not None and server.data_dir.is_dir()
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# The Docker backend (scripts/test starts a daemon and builds the image; skipped, with the
# reason, where no Docker daemon answers)


@pytest.fixture(scope="module")
def docker_daemon() -> Iterator[None]:
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    yield


@pytest.mark.docker
@pytest.mark.parametrize("engine", ENGINES)
def test_docker_server_meets_the_runtime_contract(docker_daemon: None, engine: Engine) -> None:
    check_runtime_contract(DockerServer.create, engine)


@pytest.mark.docker
@pytest.mark.parametrize("engine", ENGINES)
def test_docker_server_runs_as_its_own_user_on_host_networking_only(
        docker_daemon: None, engine: Engine) -> None:
    server = DockerServer.create(engine)
    try:
        server.start(timeout=START_TIMEOUT)
        container = server.container
        config = container.attrs["HostConfig"]
        assert config["NetworkMode"] == "host"
        assert bridge_addresses(container) == []
        assert container.attrs["Config"]["User"] == ("postgres" if engine == "postgresql"
                                                     else "mysql")
        assert container.labels[CONTAINER_LABEL] == server.name
        # The server process itself, seen from this machine, runs as that user.
        pid = server.pid
        assert pid is not None
        uid = int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])
        assert pwd.getpwuid(uid).pw_name == container.attrs["Config"]["User"]
        # It listens on its own loopback address only, as a local server does.
        setting = ("SHOW listen_addresses" if engine == "postgresql"
                   else "SELECT @@bind_address")
        assert _rows(server, setting) == [(server.host,)]
    finally:
        server.stop()
    assert server.container is None


@pytest.mark.docker
def test_docker_server_kill_returns_once_the_process_is_gone_and_stop_removes_every_container(
        docker_daemon: None) -> None:
    """A kill (a simulated crash) does not wait for ``docker rm`` (tens of seconds on a loaded
    machine); the exited containers are removed by the time a full stop returns."""
    server = DockerServer.create("postgresql")
    try:
        server.start(timeout=START_TIMEOUT)
        first = server.container.name
        server.kill()
        assert not server.is_running() and server.pid is None
        with pytest.raises(OSError):  # nothing listens: the process is gone
            socket.create_connection((server.host, server.port), timeout=5).close()
        server.start(timeout=START_TIMEOUT)
        assert server.container.name != first
        assert _rows(server, "SELECT 1") == [(1,)]
    finally:
        server.stop()
    left = _docker().containers.list(all=True, ignore_removed=True,
                                     filters={"label": f"{CONTAINER_LABEL}={server.name}"})
    assert [c.name for c in left] == []


@pytest.mark.docker
def test_sweep_skips_a_container_removed_while_it_lists(
        docker_daemon: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-py lists the ids, then inspects each: a container another process removes in
    between (its sweep, a background removal after a kill) must not fail the sweep, nor the
    server create that runs it (loaded CI run: NotFound from a chaos run's create)."""
    client = _docker()
    # The containers' owner is a live process of this test, so the sweeps other xdist workers
    # run before each server create leave them alone (CI: one took them first, and this
    # sweep found nothing); only this process's sweep is told that owner is gone.
    owner_process = subprocess.Popen(["sleep", "600"])
    try:
        owner = ProcessIdentity.of(owner_process.pid)
        assert owner is not None
        created = [client.containers.create(
            server_image(), ["true"], name=f"resilient_db-sweep-test-{os.getpid()}-{i}",
            labels={CONTAINER_LABEL: f"sweep-test-{i}", _OWNER_LABEL: json.dumps(owner.to_json())})
            for i in range(2)]
        vanishing, left_behind = created
        inspect = client.api.inspect_container
        looked_at: list[str] = []

        def removed_meanwhile(resource_id: Any, *args: Any, **kwargs: Any) -> Any:
            looked_at.append(resource_id)
            if resource_id == vanishing.id:
                client.api.remove_container(vanishing.id, force=True)  # for real, before the look
            return inspect(resource_id, *args, **kwargs)

        alive = ProcessIdentity.is_alive
        monkeypatch.setattr(ProcessIdentity, "is_alive",
                            lambda identity: identity != owner and alive(identity))
        monkeypatch.setattr(client.api, "inspect_container", removed_meanwhile)
        try:
            assert sweep_containers() >= 1
            monkeypatch.undo()
            assert vanishing.id in looked_at  # the race was run, not missed
            # Checked before the cleanup below, which would remove it anyway: the sweep did.
            names = {c.name for c in client.containers.list(
                all=True, ignore_removed=True, filters={"label": CONTAINER_LABEL})}
            assert left_behind.name not in names and vanishing.name not in names
        finally:
            monkeypatch.undo()
            for container in created:
                with contextlib.suppress(Exception):
                    container.remove(force=True)
    finally:
        owner_process.kill()
        owner_process.wait()


@pytest.mark.unit
@pytest.mark.parametrize(("engine", "flavour"), [("postgresql", "aurora-mysql"),
                                                 ("oracle", None)])
def test_docker_server_refuses_what_it_cannot_run(engine: Any, flavour: str | None) -> None:
    with pytest.raises(ValueError, match=r"flavour|engine"):
        DockerServer.create(engine, flavour)
