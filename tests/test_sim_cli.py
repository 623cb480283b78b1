"""The command line ``python -m simulator`` (simulator/__main__.py) and its daemons
(simulator/daemon.py), run as real subprocesses against real clusters."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg
import pytest

from chaos.toxiproxy import ToxiproxyClient
from simulator import daemon
from simulator.__main__ import format_events, format_status
from simulator._addresses import ProcessIdentity, sim_root
from simulator.names import MARK, HostsFile

REPO = Path(__file__).resolve().parent.parent
#: Every CLI call in these tests must finish within this many seconds: nothing may hang.
CLI_DEADLINE = 180.0


# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def _own_daemon_registry() -> Iterator[None]:
    """This module's clusters live in a registry of their own (``down --all`` and the listing
    tests must not see, or stop, clusters of a concurrent test run or of the developer)."""
    registry = sim_root() / f"daemons-test-{os.getpid()}"
    old = os.environ.get(daemon.DAEMONS_ENV)
    os.environ[daemon.DAEMONS_ENV] = str(registry)  # read by sim()'s subprocesses too
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(daemon.DAEMONS_ENV, None)
        else:
            os.environ[daemon.DAEMONS_ENV] = old
        subprocess.run(["rm", "-rf", str(registry)], check=False, timeout=30)


def sim(*args: str, env: dict[str, str] | None = None,
        deadline: float = CLI_DEADLINE) -> subprocess.CompletedProcess[str]:
    """Run ``python -m simulator ARGS`` from the repository and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "simulator", *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=deadline,
        stdin=subprocess.DEVNULL, check=False)


def ok(*args: str) -> subprocess.CompletedProcess[str]:
    result = sim(*args)
    assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def ok_json(*args: str) -> Any:
    return json.loads(ok(*args, "--json").stdout)


def fresh_name() -> str:
    return f"cli{secrets.token_hex(4)}"


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def daemon_identity(name: str) -> ProcessIdentity:
    record = daemon.read_record(daemon.daemon_dir(name))
    assert record is not None and record.identity is not None
    return record.identity


def servers_of(owner: ProcessIdentity) -> list[tuple[Path, ProcessIdentity | None]]:
    """(server directory, server process) of every server the daemon ``owner`` created."""
    found = []
    for meta_path in (sim_root() / "servers").glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if ProcessIdentity.from_json(meta["owner"]) != owner:
            continue
        server = meta.get("server")
        identity = None if not server else ProcessIdentity(int(server["pid"]),
                                                           int(server["start_time"]))
        found.append((meta_path.parent, identity))
    return found


def hosts_lines_of(owner: ProcessIdentity) -> list[str]:
    tag = f"owner={owner.pid}:{owner.start_time}"
    return [line for line in HostsFile().path.read_text().splitlines()
            if MARK in line and tag in line]


def assert_nothing_left(name: str, owner: ProcessIdentity,
                        servers: list[tuple[Path, ProcessIdentity | None]]) -> None:
    """No daemon process, daemon directory, /etc/hosts line, server process or directory."""
    assert servers, "the cluster had no servers to check"
    assert wait_for(lambda: not owner.is_alive()), f"daemon {owner.pid} still runs"
    assert not daemon.daemon_dir(name).exists()
    assert hosts_lines_of(owner) == []
    for base_dir, process in servers:
        if process is not None:
            assert wait_for(_dead(process)), process
        assert not base_dir.exists(), base_dir
    assert servers_of(owner) == []


def _dead(process: ProcessIdentity) -> Callable[[], bool]:
    return lambda: not process.is_alive()


def server_address(engine: str, connect: dict[str, Any]) -> str:
    """Connect through the endpoint in ``connect`` and return the address that answered."""
    if engine == "postgresql":
        with psycopg.connect(**connect, connect_timeout=10) as conn:
            row = conn.execute("SELECT host(inet_server_addr())").fetchone()
            assert row is not None
            return str(row[0])
    mysql_conn = mysql.connector.connect(**connect, use_pure=True, connection_timeout=10)
    try:
        cursor = mysql_conn.cursor()
        cursor.execute("SELECT @@bind_address")
        found = cursor.fetchone()
        assert isinstance(found, tuple)
        return str(found[0])
    finally:
        mysql_conn.close()


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Cluster names a test starts; whatever is still up at the end is brought down."""
    started: list[str] = []
    yield started
    for name in started:
        if daemon.daemon_dir(name).exists():
            sim("down", name, deadline=120)


def up(names: list[str], flavour: str, *args: str) -> dict[str, Any]:
    name = fresh_name()
    names.append(name)
    status: dict[str, Any] = ok_json("up", flavour, "--name", name, *args)
    assert status["name"] == name
    return status


# --------------------------------------------------------------------------------------------
# formatting (no servers)


_EVENTS: list[dict[str, Any]] = [
    {"name": "failover_started", "instance": "instance-1", "wall": 1_700_000_000.0,
     "mono": 10.0, "detail": {"mode": "crash", "target": None}},
    {"name": "promoted", "instance": "instance-2", "wall": 1_700_000_000.512,
     "mono": 10.512, "detail": {"previous": "instance-1"}},
    {"name": "cluster_started", "instance": None, "wall": 1_700_000_001.0, "mono": 11.0,
     "detail": {"instances": ["instance-1", "instance-2"]}},
]


@pytest.mark.unit
def test_events_print_utc_time_offset_name_instance_and_details() -> None:
    lines = format_events(_EVENTS)
    assert lines[0] == ("2023-11-14T22:13:20.000Z  +0.000s  failover_started  instance-1  "
                        "mode=crash target=None")
    assert lines[1] == ("2023-11-14T22:13:20.512Z  +0.512s  promoted          instance-2  "
                        "previous=instance-1")
    assert lines[2].endswith("cluster_started   -           instances=instance-1,instance-2")
    assert format_events([]) == ["(no events)"]


@pytest.mark.unit
def test_status_text_shows_endpoints_credentials_and_instances() -> None:
    status = {
        "name": "db1", "flavour": "aurora-pg", "description": "Aurora PostgreSQL", "port": 5432,
        "writer_endpoint": "db1.cluster-c1.us-east-1.rds.amazonaws.com",
        "reader_endpoint": "db1.cluster-ro-c1.us-east-1.rds.amazonaws.com",
        "host_pattern": "?.c1.us-east-1.rds.amazonaws.com",
        "connect": {"host": "db1.cluster-c1.us-east-1.rds.amazonaws.com", "port": 5432,
                    "dbname": "test", "user": "app", "password": "app"},
        "superuser": {"user": "postgres", "password": "postgres"},
        "instances": [{"id": "instance-1", "role": "writer", "address": "127.10.0.5",
                       "endpoint": "instance-1.c1.us-east-1.rds.amazonaws.com", "lag": 0.0,
                       "running": True}],
    }
    text = "\n".join(format_status(status))
    assert "writer     db1.cluster-c1.us-east-1.rds.amazonaws.com:5432" in text
    assert "pattern    ?.c1.us-east-1.rds.amazonaws.com" in text
    assert "login      dbname=test user=app password=app" in text
    assert "instance-1  writer  127.10.0.5:5432  0    running" in text
    assert "(no writer right now)" in "\n".join(format_status({**status, "connect": None}))
    proxied = {**status, "toxiproxy_url": "http://127.0.0.1:8474",
               "instances": [{"id": "instance-1", "role": "writer", "address": "127.10.0.5",
                              "proxy_address": "127.10.0.6", "endpoint": "i1", "lag": 0.0,
                              "running": True}]}
    text = "\n".join(format_status(proxied))
    assert "toxiproxy  http://127.0.0.1:8474" in text
    assert "instance-1  writer  127.10.0.6:5432 -> 127.10.0.5:5432" in text


# --------------------------------------------------------------------------------------------
# bad input (no cluster needed)


@pytest.mark.parametrize(("args", "message"), [
    (("up", "aurora-oracle"), "unknown flavour 'aurora-oracle'; valid flavours:"),
    (("up", "multi-az-pg", "--readers", "5"), "takes 2 readers"),
    (("up", "pg", "--name", "has-dash"), "expected 1-40 letters and digits"),
    (("up", "pg", "--detection-delay", "-1"), "expected seconds >= 0"),
    (("status", "nosuchcluster"), "no cluster named 'nosuchcluster'"),
    (("failover", "nosuchcluster"), "no cluster named 'nosuchcluster'"),
    (("events", "nosuchcluster"), "no cluster named 'nosuchcluster'"),
    (("down",), "name one cluster or pass --all"),
    (("failover", "x", "--mode", "gentle"), "invalid choice: 'gentle'"),
    (("read-only", "x", "maybe"), "invalid choice: 'maybe'"),
    (("lag", "x", "instance-2", "soon"), "expected seconds"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
])
def test_bad_input_exits_2_with_a_message(args: tuple[str, ...], message: str) -> None:
    result = sim(*args)
    assert result.returncode == 2, result
    assert message in result.stderr
    if args[:2] == ("up", "aurora-oracle"):
        for flavour in ("aurora-pg", "multi-az-mysql", "rds-pg", "mysql"):
            assert f"  {flavour}" in result.stderr  # every valid flavour, one per line


# --------------------------------------------------------------------------------------------
# whole lifecycles against real clusters


@pytest.mark.real_server
@pytest.mark.parametrize(("flavour", "engine"), [("aurora-pg", "postgresql"),
                                                 ("aurora-mysql", "mariadb")])
def test_up_status_failover_events_down(names: list[str], flavour: str, engine: str) -> None:
    status = up(names, flavour, "--readers", "1")
    name = status["name"]
    assert status["flavour"] == flavour and status["engine"] == engine
    assert status["host_pattern"].startswith("?.")
    roles = {i["id"]: i["role"] for i in status["instances"]}
    assert roles == {"instance-1": "writer", "instance-2": "reader"}
    assert all(i["running"] for i in status["instances"])
    addresses = {i["id"]: i["address"] for i in status["instances"]}
    # What `up` prints is enough to connect through the writer endpoint (names in /etc/hosts).
    assert status["connect"]["host"] == status["writer_endpoint"]
    assert server_address(engine, status["connect"]) == addresses["instance-1"]

    text = ok("status", name).stdout
    assert status["writer_endpoint"] in text and "instance-2  reader" in text
    assert ok_json("status", name)["instances"] == status["instances"]
    assert name in ok("list").stdout

    events = ok_json("failover", name)["events"]
    assert [e["name"] for e in events][:3] == ["failover_started", "writer_stopped",
                                               "promoted"]
    promoted = next(e for e in events if e["name"] == "promoted")
    assert promoted["instance"] == "instance-2"
    assert all(e["wall"] > 0 and e["mono"] > 0 for e in events)
    # DNS staleness 0: the writer endpoint already names the new writer.
    assert server_address(engine, ok_json("status", name)["connect"]) == addresses["instance-2"]

    # Later events (the old writer rejoining) show up in `events`.
    def rejoined() -> bool:
        names_so_far = [e["name"] for e in ok_json("events", name)["events"]]
        return "rejoined_as_reader" in names_so_far

    assert wait_for(rejoined, timeout=90)
    history = [e["name"] for e in ok_json("events", name)["events"]]
    assert history[0] == "instance_started" and "cluster_started" in history
    assert "promoted" in history and "dns_updated" in history
    assert "rejoined_as_reader" in ok("events", name).stdout

    owner = daemon_identity(name)
    servers = servers_of(owner)
    assert len(servers) == 2
    result = ok("down", name)
    assert "cluster_stopped" in result.stdout and f"cluster {name} is down" in result.stdout
    assert_nothing_left(name, owner, servers)
    assert sim("status", name).returncode == 2


@pytest.mark.real_server
def test_up_proxied(names: list[str]) -> None:
    """``up --proxied``: the names lead to the proxy, whose Toxiproxy API the daemon serves."""
    status = up(names, "pg", "--proxied")
    [instance] = status["instances"]
    assert instance["proxy_address"] not in (None, instance["address"])
    with psycopg.connect(**status["connect"], connect_timeout=10) as conn:
        row = conn.execute("SELECT host(inet_client_addr()), host(inet_server_addr())").fetchone()
    assert row == (instance["proxy_address"], instance["address"])
    client = ToxiproxyClient(status["toxiproxy_url"])
    assert list(client.proxies()) == ["instance-1"]
    assert client.proxies()["instance-1"]["listen"] == (
        f"{instance['proxy_address']}:{status['port']}")
    assert "toxiproxy  http://" in ok("status", status["name"]).stdout
    ok("down", status["name"])


@pytest.mark.real_server
def test_single_instance_actions_print_their_events(names: list[str]) -> None:
    status = up(names, "pg", "--reboot-downtime", "0.1")
    name = status["name"]
    assert [i["id"] for i in status["instances"]] == ["instance-1"]

    def events_of(*args: str) -> list[str]:
        return [e["name"] for e in ok_json(*args)["events"]]

    assert events_of("read-only", name, "on") == ["writer_read_only"]
    assert events_of("read-only", name, "off") == ["writer_read_only"]
    assert events_of("kill", name, "instance-1")[0] == "instance_killed"
    assert ok_json("status", name)["instances"][0]["running"] is False
    assert "instance_started" in events_of("start-instance", name, "instance-1")
    assert events_of("stop-instance", name, "instance-1")[0] == "instance_stopped"
    assert "instance_started" in events_of("start-instance", name, "instance-1")
    assert events_of("reboot", name, "instance-1") == ["reboot_started", "reboot_finished"]
    assert events_of("dns-staleness", name, "2.5") == ["dns_staleness_set"]
    assert ok_json("status", name)["timeline"]["dns_staleness"] == 2.5
    assert ok_json("status", name)["instances"][0]["running"] is True

    # Text output: one timestamped line per event.
    line = ok("read-only", name, "on").stdout.strip()
    assert line.endswith("writer_read_only  instance-1  read_only=True"), line
    assert line[:4].isdigit() and "Z  +0.000s" in line

    # Refused actions exit 1 with the reason; bad instances exit 2.
    for args, code, message in (
            (("failover", name), 1, "no reader to fail over to"),
            (("add-reader", name), 1, "allows at most 0 readers"),
            (("remove-reader", name, "instance-1"), 1, "is the writer"),
            (("lag", name, "instance-1", "1"), 1, "is not a reader"),
            (("kill", name, "instance-9"), 2, "no instance 'instance-9'"),
            (("failover", name, "--target", "instance-1"), 2, "is the writer, not a reader"),
            (("up", "pg", "--name", name), 2, f"a cluster named {name!r} already exists")):
        result = sim(*args)
        assert (result.returncode, message in result.stderr) == (code, True), (args, result)

    owner = daemon_identity(name)
    servers = servers_of(owner)
    ok("down", name)
    assert_nothing_left(name, owner, servers)


@pytest.mark.real_server
def test_status_without_a_name_and_down_all(names: list[str]) -> None:
    first = up(names, "mysql")["name"]
    second = up(names, "pg")["name"]
    result = sim("status")
    assert result.returncode == 2 and "several clusters are running" in result.stderr
    listed = ok_json("list")
    assert {first, second} <= {entry["name"] for entry in listed}
    owners = {name: daemon_identity(name) for name in (first, second)}
    servers = {name: servers_of(owner) for name, owner in owners.items()}
    result = ok("down", "--all")
    for name in (first, second):
        assert f"cluster {name} is down" in result.stdout
        assert_nothing_left(name, owners[name], servers[name])


# --------------------------------------------------------------------------------------------
# daemons that end without `down`


@pytest.mark.real_server
def test_sigkilled_daemon_is_swept_by_the_next_list(names: list[str]) -> None:
    name = up(names, "pg")["name"]
    owner = daemon_identity(name)
    servers = servers_of(owner)
    assert hosts_lines_of(owner)
    os.kill(owner.pid, signal.SIGKILL)
    assert wait_for(lambda: not owner.is_alive())
    # The servers die with their owner (parent-death signal); their files stay until a sweep.
    assert daemon.daemon_dir(name).exists()
    listed = ok("list").stdout
    assert name not in listed
    assert_nothing_left(name, owner, servers)


@pytest.mark.real_server
def test_sigterm_stops_the_cluster_and_the_daemon(names: list[str]) -> None:
    name = up(names, "pg")["name"]
    owner = daemon_identity(name)
    servers = servers_of(owner)
    os.kill(owner.pid, signal.SIGTERM)
    assert_nothing_left(name, owner, servers)


@pytest.mark.real_server
def test_daemon_exits_when_its_directory_is_removed(names: list[str]) -> None:
    name = up(names, "pg")["name"]
    owner = daemon_identity(name)
    servers = servers_of(owner)
    subprocess.run(["rm", "-rf", str(daemon.daemon_dir(name))], check=True, timeout=30)
    assert_nothing_left(name, owner, servers)


@pytest.mark.real_server
def test_an_unresponsive_daemon_times_out_and_down_still_ends_it(names: list[str]) -> None:
    name = up(names, "pg")["name"]
    owner = daemon_identity(name)
    servers = servers_of(owner)
    os.kill(owner.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = sim("status", name, "--timeout", "1")
        assert result.returncode == 1
        assert "did not answer 'status' within 1 s" in result.stderr
        assert time.monotonic() - started < 30
    finally:
        os.kill(owner.pid, signal.SIGCONT)
    ok("down", name)
    assert_nothing_left(name, owner, servers)


@pytest.mark.real_server
def test_a_cluster_that_cannot_start_reports_why_and_leaves_nothing(names: list[str]) -> None:
    name = fresh_name()
    names.append(name)
    before = {line for line in HostsFile().path.read_text().splitlines() if MARK in line}
    result = sim("up", "mysql", "--name", name,
                 env={"RESILIENT_DB_MARIADBD": "/nonexistent/mariadbd"})
    assert result.returncode == 1, result
    assert "cluster did not start" in result.stderr
    assert "daemon.log (tail)" in result.stderr  # the end of the daemon's log, for diagnosis
    assert not daemon.daemon_dir(name).exists()
    after = {line for line in HostsFile().path.read_text().splitlines() if MARK in line}
    assert not {line for line in after - before if f"cluster={name}" in line}


@pytest.mark.real_server
def test_enable_iam(names: list[str]) -> None:
    import boto3

    status = up(names, "rds-pg")
    name = status["name"]
    assert status["iam"] is None
    events = ok_json("enable-iam", name, "--user", "iam_cli")["events"]
    assert [e["name"] for e in events] == ["iam_enabled"]
    status = ok_json("status", name)
    assert status["iam"] == {"users": ["iam_cli"], "region": "us-east-1"}
    assert "iam        users iam_cli log in with IAM auth tokens" in ok("status", name).stdout
    instance = status["instances"][0]
    rds = boto3.client("rds", region_name="us-east-1", aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    token = rds.generate_db_auth_token(instance["endpoint"], status["port"], "iam_cli")
    conn = psycopg.connect(host=instance["address"], port=status["port"], user="iam_cli",
                           password=token, dbname="test", connect_timeout=15)
    conn.close()
    with pytest.raises(psycopg.OperationalError, match="PAM authentication failed"):
        psycopg.connect(host=instance["address"], port=status["port"], user="iam_cli",
                        password=token[:-1] + ("0" if token[-1] != "0" else "1"),
                        dbname="test", connect_timeout=15)
    result = sim("enable-iam", name, "--user", "bad-name")
    assert (result.returncode, "user 'bad-name'" in result.stderr) == (1, True), result
    ok("down", name)
