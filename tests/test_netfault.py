"""Network fault injector (chaos.netfault) against real sockets and a real PostgreSQL server.

Every test here installs real iptables rules (root is required) in our own chain, only for
addresses claimed through the simulator, so other processes' traffic is never affected.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from chaos import netfault
from chaos._netfilter import Owner, rules_of
from chaos.netfault import Fault, NetworkFaultError, NetworkFaults
from simulator._addresses import ProcessIdentity, claim_address, release_address
from simulator.local import LocalServer

pytestmark = pytest.mark.real_server

REPO = Path(__file__).resolve().parent.parent


class EchoServer:
    """A threaded TCP echo server on its own claimed loopback address."""

    def __init__(self) -> None:
        self.owner = ProcessIdentity.current()
        self.host = claim_address(self.owner, "test_netfault echo server")
        self._listener = socket.create_server((self.host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def close(self) -> None:
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()
        release_address(self.host, self.owner)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def other_echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        received += chunk
    return received


def pg_connect(server: LocalServer, **extra: Any) -> psycopg.Connection[Any]:
    return psycopg.Connection.connect(**{**server.connect_kwargs(), "autocommit": True,
                                         **extra})


class Call:
    """Run ``fn`` in a daemon thread and remember its outcome."""

    def __init__(self, fn: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_mono: float | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_mono = time.monotonic()

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def my_rules() -> list[str]:
    return rules_of(Owner.current())


# -- blackhole ---------------------------------------------------------------------------------


def test_blackhole_hangs_in_flight_query_then_heals(pg_server: LocalServer,
                                                    network_faults: NetworkFaults) -> None:
    conn = pg_connect(pg_server)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        call = Call(lambda: conn.execute("SELECT 42 FROM pg_catalog.pg_sleep(0.5)").fetchone())
        time.sleep(0.1)  # the query is on the server; its reply will be dropped
        fault = network_faults.blackhole(pg_server.host)
        assert not call.wait(3.0), "the in-flight query finished through a blackhole"
        assert call.error is None
        # New connections time out rather than being refused.
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            pg_connect(pg_server, connect_timeout=2)
        network_faults.heal(fault)
        assert not fault.active and fault.duration is not None and fault.duration >= 3.0
        # TCP retransmits with exponential backoff: the reply arrives at the next retry.
        assert call.wait(30.0), "the query did not finish after the blackhole was healed"
        assert call.error is None and call.result == (42,)
        assert conn.execute("SELECT 2").fetchone() == (2,)
        with pg_connect(pg_server, connect_timeout=5) as fresh:
            assert fresh.execute("SELECT 3").fetchone() == (3,)
    finally:
        conn.close()


def test_blackhole_new_connect_times_out(echo: EchoServer,
                                         network_faults: NetworkFaults) -> None:
    network_faults.blackhole(echo.host, echo.port)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        echo.connect(timeout=1.0)
    assert time.monotonic() - started >= 0.9  # a timeout, not a quick refusal


def test_blackhole_is_both_directions_and_spares_others(
        echo: EchoServer, other_echo: EchoServer, network_faults: NetworkFaults) -> None:
    existing = echo.connect()
    assert round_trip(existing) == b"ping"
    network_faults.blackhole(echo.host)
    existing.settimeout(1.0)
    with pytest.raises(TimeoutError):
        round_trip(existing)
    with other_echo.connect() as other:
        assert round_trip(other) == b"ping"
    # Packets *from* the address are dropped too: a connection made from it goes nowhere.
    with socket.socket() as outbound:
        outbound.bind((echo.host, 0))
        outbound.settimeout(1.0)
        with pytest.raises(TimeoutError):
            outbound.connect((other_echo.host, other_echo.port))
    existing.close()


def test_blackhole_of_one_port_spares_other_ports(echo: EchoServer,
                                                  network_faults: NetworkFaults) -> None:
    second = socket.create_server((echo.host, 0))
    try:
        network_faults.blackhole(echo.host, echo.port)
        with socket.create_connection((echo.host, second.getsockname()[1]), timeout=5):
            pass
        with pytest.raises(TimeoutError):
            echo.connect(timeout=0.5)
    finally:
        second.close()


# -- reset and down ----------------------------------------------------------------------------


def test_reset_breaks_in_flight_query_quickly(pg_server: LocalServer,
                                              network_faults: NetworkFaults) -> None:
    conn = pg_connect(pg_server)
    try:
        call = Call(lambda: conn.execute("SELECT pg_catalog.pg_sleep(30)"))
        time.sleep(0.2)
        applied = time.monotonic()
        network_faults.reset(pg_server.host, pg_server.port)
        assert call.wait(5.0), "the in-flight query was not interrupted by the reset"
        assert isinstance(call.error, psycopg.OperationalError), call.error
        assert call.finished_mono is not None and call.finished_mono - applied < 5.0
        with pytest.raises(psycopg.OperationalError):
            pg_connect(pg_server, connect_timeout=5)
    finally:
        conn.close()


def test_reset_raw_socket(echo: EchoServer, network_faults: NetworkFaults) -> None:
    idle = echo.connect()
    waiting = echo.connect()
    assert round_trip(idle) == b"ping"
    waiting.settimeout(5.0)
    call = Call(lambda: waiting.recv(10))  # blocked in recv, sends nothing
    time.sleep(0.1)
    fault = network_faults.reset(echo.host, echo.port)
    assert call.wait(5.0)
    assert isinstance(call.error, ConnectionResetError), call.error
    with pytest.raises(ConnectionError):
        round_trip(idle)
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):  # the kernel's word for a RST answering a SYN
        echo.connect(timeout=5.0)
    assert time.monotonic() - started < 2.0
    network_faults.heal(fault)
    with echo.connect() as fresh:
        assert round_trip(fresh) == b"ping"
    idle.close()
    waiting.close()


def test_down_refuses_new_connections_keeps_existing(echo: EchoServer,
                                                     network_faults: NetworkFaults) -> None:
    existing = echo.connect()
    fault = network_faults.down(echo.host, echo.port)
    with pytest.raises(ConnectionRefusedError):
        echo.connect(timeout=5.0)
    assert round_trip(existing) == b"ping"
    network_faults.heal(fault)
    with echo.connect() as fresh:
        assert round_trip(fresh) == b"ping"
    existing.close()


def test_down_refuses_postgres(pg_server: LocalServer, network_faults: NetworkFaults) -> None:
    network_faults.down(pg_server.host)
    with pytest.raises(psycopg.OperationalError, match=r"(?i)refused"):
        pg_connect(pg_server, connect_timeout=5)


# -- cleanup -----------------------------------------------------------------------------------


def test_rules_gone_after_context_exit(echo: EchoServer) -> None:
    with NetworkFaults() as faults:
        faults.blackhole(echo.host)
        faults.reset(echo.host, echo.port)
        faults.down(echo.host, echo.port)
        assert len(faults.rules()) == 5
        assert len(faults.active) == 3
    assert my_rules() == []
    assert all(not f.active for f in faults.history)
    with echo.connect() as conn:
        assert round_trip(conn) == b"ping"


def test_heal_is_idempotent_and_checks_ownership(echo: EchoServer) -> None:
    with NetworkFaults() as first, NetworkFaults() as second:
        fault = first.blackhole(echo.host)
        with pytest.raises(NetworkFaultError, match="not applied by this"):
            second.heal(fault)
        first.heal(fault)
        first.heal(fault)
        assert first.rules() == []


def _run_child(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _owner_from_ready_line(proc: subprocess.Popen[str]) -> Owner:
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[:1] == ["ready"], line
    return Owner(int(line[1]), int(line[2]))


_CHILD_PRELUDE = """
    import sys
    from chaos._netfilter import Owner, rules_of
    from chaos.netfault import NetworkFaults
    me = Owner.current()
    def ready():
        assert len(rules_of(me)) == 2, rules_of(me)
        print("ready", me.pid, me.start_time, flush=True)
"""


def test_rules_gone_when_child_raises_inside_with(echo: EchoServer) -> None:
    proc = _run_child(_CHILD_PRELUDE + """
    with NetworkFaults() as faults:
        faults.blackhole(sys.argv[1])
        ready()
        raise RuntimeError("boom")
    """, echo.host)
    owner = _owner_from_ready_line(proc)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "RuntimeError: boom" in stderr
    assert rules_of(owner) == []


def test_rules_gone_at_exit_without_with(echo: EchoServer) -> None:
    proc = _run_child(_CHILD_PRELUDE + """
    faults = NetworkFaults()
    faults.blackhole(sys.argv[1])
    ready()
    sys.exit(3)
    """, echo.host)
    owner = _owner_from_ready_line(proc)
    proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert rules_of(owner) == []


def test_dead_owner_rules_swept(echo: EchoServer) -> None:
    proc = _run_child(_CHILD_PRELUDE + """
    import time
    faults = NetworkFaults()
    faults.blackhole(sys.argv[1])
    ready()
    time.sleep(120)
    """, echo.host)
    try:
        owner = _owner_from_ready_line(proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(rules_of(owner)) == 2  # SIGKILL: no chance to clean up
    with pytest.raises(TimeoutError):
        echo.connect(timeout=0.5)
    removed = netfault.sweep_dead_owners()
    assert len([r for r in removed if f"owner={owner.pid}:" in r]) == 2
    assert rules_of(owner) == []
    with echo.connect() as conn:
        assert round_trip(conn) == b"ping"


def test_new_network_faults_sweeps_dead_owners(echo: EchoServer) -> None:
    proc = _run_child(_CHILD_PRELUDE + """
    import os, signal
    faults = NetworkFaults()
    faults.blackhole(sys.argv[1])
    ready()
    os.kill(os.getpid(), signal.SIGKILL)
    """, echo.host)
    owner = _owner_from_ready_line(proc)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(rules_of(owner)) == 2
    with NetworkFaults():
        assert rules_of(owner) == []


def test_fixture_clears_after_failing_test(echo: EchoServer, tmp_path: Path) -> None:
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(textwrap.dedent(f"""
        import os
        from chaos._netfilter import Owner, rules_of

        def test_fails(network_faults):
            network_faults.blackhole({echo.host!r})
            me = Owner.current()
            assert len(rules_of(me)) == 2
            print("OWNER", me.pid, me.start_time)
            assert False, "deliberate failure"
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "chaos.pytest_plugin", "-p", "no:cacheprovider",
         "-s", "-q", "--rootdir", str(tmp_path), "-c", os.devnull, str(test_file)],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "deliberate failure" in result.stdout
    words = next(line for line in result.stdout.splitlines() if "OWNER" in line).split()
    owner = Owner(int(words[-2]), int(words[-1]))
    assert rules_of(owner) == []


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "port", "message"), [
    ("localhost", None, "literal IPv4"),
    ("::1", None, "literal IPv4"),
    ("0.0.0.0", None, "match nothing"),
    ("127.0.0.1", 0, "port must be"),
    ("127.0.0.1", 70000, "port must be"),
    ("127.0.0.1", True, "port must be"),
])
def test_bad_arguments_are_refused(address: str, port: Any, message: str) -> None:
    with NetworkFaults(sweep=False) as faults:
        with pytest.raises(NetworkFaultError, match=message):
            faults.blackhole(address, port)
        assert faults.rules() == []


def test_fault_record(echo: EchoServer, network_faults: NetworkFaults) -> None:
    before = time.monotonic()
    fault: Fault = network_faults.blackhole(echo.host, echo.port)
    assert fault.kind == "blackhole" and fault.toxic == "timeout" and fault.active
    assert fault.applied_mono >= before and fault.duration is None
    network_faults.heal(fault)
    data = fault.to_json()
    assert data["healed_mono"] >= data["applied_mono"]
    assert data["address"] == echo.host and data["port"] == echo.port
