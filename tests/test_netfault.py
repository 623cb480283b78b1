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

import mysql.connector
import psycopg
import pytest

from chaos import _nfqueue, netfault
from chaos._netfilter import (
    Owner,
    Rule,
    chain_lock,
    ensure_chain,
    rules_of,
    sweep_dead_owners_locked,
)
from chaos.netfault import Fault, NetworkFaultError, NetworkFaults, Stream
from simulator._addresses import ProcessIdentity, claim_address, release_address
from simulator.cluster import Cluster, Instance
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
        self.received = 0  # bytes received over all connections
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                self.received += len(data)
                conn.sendall(data)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone won't
        self._listener.close()
        for conn in self._conns:
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


def test_blackhole_hangs_mysql_query_then_heals(mysql_server: LocalServer,
                                                network_faults: NetworkFaults) -> None:
    conn = mysql.connector.connect(**mysql_server.connect_kwargs(), use_pure=True,
                                   autocommit=True)
    try:
        cur = conn.cursor()

        def query() -> Any:
            cur.execute("SELECT SLEEP(0.5), 42")
            return cur.fetchone()

        call = Call(query)
        time.sleep(0.1)
        fault = network_faults.blackhole(mysql_server.host, mysql_server.port)
        assert not call.wait(3.0), "the in-flight query finished through a blackhole"
        with pytest.raises(mysql.connector.Error, match=r"(?i)timed out"):
            mysql.connector.connect(**mysql_server.connect_kwargs(), use_pure=True,
                                    connection_timeout=2)
        network_faults.heal(fault)
        assert call.wait(30.0), "the query did not finish after the blackhole was healed"
        assert call.error is None and call.result == (0, 42)
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


@pytest.mark.parametrize("stream", ["upstream", "downstream"])
def test_blackhole_one_stream(echo: EchoServer, network_faults: NetworkFaults,
                              stream: Stream) -> None:
    conn = echo.connect()
    assert round_trip(conn) == b"ping"
    received = echo.received
    fault = network_faults.blackhole(echo.host, echo.port, stream=stream)
    assert fault.params == {"stream": stream} and len(network_faults.rules()) == 1
    conn.settimeout(1.0)
    with pytest.raises(TimeoutError):
        round_trip(conn)
    # Downstream: the request reached the server, the reply was lost. Upstream: nothing came.
    assert echo.received == (received + 4 if stream == "downstream" else received)
    network_faults.heal(fault)
    conn.settimeout(30.0)
    assert conn.recv(10) == b"ping"  # the retransmitted request (or reply) gets through
    conn.close()


def test_packet_loss_slows_but_does_not_break(echo: EchoServer,
                                              network_faults: NetworkFaults) -> None:
    fault = network_faults.packet_loss(echo.host, echo.port, probability=0.3)
    assert fault.toxic == "packet_loss" and fault.params["probability"] == 0.3
    with echo.connect(timeout=60) as conn:
        times = [timed_round_trip(conn, b"p" * 10) for _ in range(10)]
    # ~20 data segments each lost with p=0.3: some retransmission (>= 200 ms RTO) is certain
    # but for 0.7**20 (0.08%).
    assert max(times) >= 0.15, times
    network_faults.heal(fault)
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(NetworkFaultError, match="probability must be"):
            network_faults.packet_loss(echo.host, probability=bad)  # type: ignore[arg-type]


def test_packet_loss_rate(echo: EchoServer, network_faults: NetworkFaults) -> None:
    """Datagrams to the address (every protocol, no port) are lost at the set rate, once:
    a loopback packet passes two hooks and must be counted in one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        receiver.bind((echo.host, 0))
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        network_faults.packet_loss(echo.host, probability=0.3, stream="upstream")
        for _ in range(1000):
            with contextlib.suppress(PermissionError):  # dropped in OUTPUT: EPERM to sender
                sender.sendto(b"d", receiver.getsockname())
        receiver.settimeout(0.5)
        received = 0
        with contextlib.suppress(TimeoutError):
            while True:
                receiver.recv(16)
                received += 1
    assert 600 <= received <= 800, received  # binomial(1000, 0.7): sd 14.5


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


# -- latency and bandwidth ---------------------------------------------------------------------


def timed_round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    started = time.monotonic()
    assert round_trip(sock, payload) == payload
    return time.monotonic() - started


def eventually(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def proxy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("netfault-proxy")]


def test_latency_delays_new_connections_and_heals(echo: EchoServer,
                                                  network_faults: NetworkFaults) -> None:
    before = echo.connect()
    fault = network_faults.latency(echo.host, echo.port, delay=1.0)
    assert fault.toxic == "latency" and fault.params["delay"] == 1.0
    delayed = echo.connect()
    assert eventually(lambda: network_faults.proxied_connections == 1)
    assert 1.0 <= timed_round_trip(delayed) < 10.0
    assert 1.0 <= timed_round_trip(delayed, b"x" * 200_000) < 10.0
    # Connections established before the fault stay direct.
    assert timed_round_trip(before) < 1.0
    network_faults.heal(fault)
    # The proxied connection survives the heal, without delay; new ones go direct.
    assert timed_round_trip(delayed) < 1.0
    with echo.connect() as fresh:
        assert timed_round_trip(fresh) < 1.0
    assert network_faults.proxied_connections == 1
    delayed.close()
    before.close()


def test_latency_streams(echo: EchoServer, network_faults: NetworkFaults) -> None:
    fault = network_faults.latency(echo.host, echo.port, delay=0.4, stream="upstream")
    with echo.connect() as conn:
        assert 0.4 <= timed_round_trip(conn) < 10.0
    network_faults.heal(fault)
    network_faults.latency(echo.host, echo.port, delay=0.4, stream="both")
    with echo.connect() as conn:
        assert 0.8 <= timed_round_trip(conn) < 10.0


def test_latency_jitter(echo: EchoServer, network_faults: NetworkFaults) -> None:
    network_faults.latency(echo.host, echo.port, delay=0.3, jitter=0.2)
    with echo.connect() as conn:
        times = [timed_round_trip(conn) for _ in range(6)]
    assert all(0.1 <= t < 10.0 for t in times), times
    assert max(times) - min(times) > 0.01, times  # six equal draws from ±0.2 s: impossible


def test_latency_on_postgres(pg_server: LocalServer, network_faults: NetworkFaults) -> None:
    with pg_connect(pg_server) as direct:
        started = time.monotonic()
        direct.execute("SELECT 1").fetchone()
        direct_time = time.monotonic() - started
        fault = network_faults.latency(pg_server.host, pg_server.port, delay=1.0)
        with pg_connect(pg_server, connect_timeout=60) as slow:
            started = time.monotonic()
            assert slow.execute("SELECT 1").fetchone() == (1,)
            assert 1.0 <= time.monotonic() - started < 10.0
            # The server sees the proxy's connection as an ordinary client.
            assert slow.execute("SELECT pg_catalog.inet_server_addr()::text").fetchone() \
                == (f"{pg_server.host}/32",)
            network_faults.heal(fault)
            started = time.monotonic()
            slow.execute("SELECT 1").fetchone()
            assert time.monotonic() - started < 1.0
        started = time.monotonic()
        direct.execute("SELECT 1").fetchone()
        assert time.monotonic() - started < 1.0
    assert direct_time < 1.0


def test_bandwidth_limits_throughput(echo: EchoServer, network_faults: NetworkFaults) -> None:
    fault = network_faults.bandwidth(echo.host, echo.port, bytes_per_second=100_000)
    assert fault.toxic == "bandwidth"
    with echo.connect(timeout=30) as conn:
        # 200 kB at 100 kB/s: the first chunk (up to 64 kB) goes at once, the rest is paced.
        assert 1.0 <= timed_round_trip(conn, b"y" * 200_000) < 30.0


def test_one_proxy_per_address_and_port(echo: EchoServer,
                                        network_faults: NetworkFaults) -> None:
    fault = network_faults.latency(echo.host, echo.port, delay=0.1)
    with pytest.raises(NetworkFaultError, match="heal it first"):
        network_faults.bandwidth(echo.host, echo.port, 1000)
    network_faults.heal(fault)
    network_faults.bandwidth(echo.host, echo.port, 1_000_000)


def test_latency_cleanup_closes_proxies(echo: EchoServer) -> None:
    with NetworkFaults() as faults:
        faults.latency(echo.host, echo.port, delay=1.0)
        assert any(rule.startswith("nat: ") for rule in faults.rules())
        conn = echo.connect()
        assert timed_round_trip(conn) >= 1.0
        assert proxy_threads()
    assert my_rules() == []
    assert eventually(lambda: proxy_threads() == []), proxy_threads()
    # The proxied connection was cut; new connections go straight to the server.
    conn.settimeout(5)
    with pytest.raises(ConnectionError):
        round_trip(conn)
    conn.close()
    with echo.connect() as fresh:
        assert timed_round_trip(fresh) < 1.0


def packet_delay_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "netfault-packet-delay"]


def test_packet_delay_hits_existing_connections(echo: EchoServer,
                                                network_faults: NetworkFaults) -> None:
    existing = echo.connect()
    assert timed_round_trip(existing) < 1.0
    fault = network_faults.packet_delay(echo.host, echo.port, delay=1.0)
    assert fault.toxic == "latency" and fault.params["stream"] == "downstream"
    assert any(rule.startswith("mangle: ") for rule in network_faults.rules())
    assert 1.0 <= timed_round_trip(existing) < 10.0
    with echo.connect(timeout=30) as fresh:
        # Liveness, not speed: the delay is served by a user-space queue thread, and on a
        # loaded machine a fresh connection's retransmission back-off stacks on it (24.7 s
        # seen with three suites and two CPU hogs on two cores); the socket timeout is 30 s.
        assert 1.0 <= timed_round_trip(fresh) < 30.0
    network_faults.heal(fault)
    assert timed_round_trip(existing) < 1.0
    assert eventually(lambda: packet_delay_threads() == [])
    both = network_faults.packet_delay(echo.host, echo.port, delay=0.3, jitter=0.1,
                                       stream="both")
    assert 0.4 <= timed_round_trip(existing) < 10.0  # 2 x (0.3 +- 0.1)
    network_faults.heal(both)
    existing.close()


def test_packet_delay_on_postgres(pg_server: LocalServer,
                                  network_faults: NetworkFaults) -> None:
    with pg_connect(pg_server) as conn:
        fault = network_faults.packet_delay(pg_server.host, delay=1.0)
        started = time.monotonic()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert 1.0 <= time.monotonic() - started < 10.0
        network_faults.heal(fault)
        started = time.monotonic()
        conn.execute("SELECT 1").fetchone()
        assert time.monotonic() - started < 1.0


def test_delayed_packets_still_meet_filter_rules(echo: EchoServer,
                                                 network_faults: NetworkFaults) -> None:
    conn = echo.connect()
    network_faults.packet_delay(echo.host, echo.port, delay=0.1, stream="both")
    network_faults.blackhole(echo.host, echo.port)
    conn.settimeout(1.0)
    with pytest.raises(TimeoutError):
        round_trip(conn)
    conn.close()


def test_packet_delay_fails_open_when_owner_dies(echo: EchoServer) -> None:
    """--queue-bypass: with its listener gone, a left-over queue rule lets packets pass
    undelayed; it is not a blackhole until someone sweeps."""
    proc = _run_child("""
    import sys, os, signal
    from chaos._netfilter import Owner, rules_of
    from chaos.netfault import NetworkFaults
    faults = NetworkFaults()
    faults.packet_delay(sys.argv[1], delay=2.0)
    me = Owner.current()
    print("ready", me.pid, me.start_time, flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)
    """, echo.host)
    owner = _owner_from_ready_line(proc)
    with echo.connect(timeout=30) as conn, chain_lock():
        assert timed_round_trip(conn) >= 2.0  # the child delays packets
        _go(proc)
        proc.communicate(timeout=60)
        assert len(rules_of(owner)) == 1  # left behind, not swept (we hold the lock)
        assert timed_round_trip(conn) < 1.0
        with echo.connect() as fresh:
            assert timed_round_trip(fresh) < 1.0
        sweep_dead_owners_locked()
    assert rules_of(owner) == []


def test_packet_delay_avoids_queues_named_by_rules(echo: EchoServer,
                                                   network_faults: NetworkFaults,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A queue number still named by a rule (left by a dead process, say) is not taken: its
    packets would be delayed by us."""
    named = 40000 + os.getpid() % 1000  # outside the usual range; per process
    stale = Rule("mangle", ("-p", "tcp", "-d", "0.0.0.0/32", "-m", "comment", "--comment",
                            Owner.current().comment(0), "-j", "NFQUEUE",
                            "--queue-num", str(named), "--queue-bypass"))
    with chain_lock():
        ensure_chain("mangle")
        stale.add()
    try:
        # A range arranged so that `named` is the number this process would try first.
        first = os.getpid() % 20
        monkeypatch.setattr(_nfqueue, "QUEUE_RANGE", range(named - first, named - first + 20))
        network_faults.packet_delay(echo.host, echo.port, delay=0.1)
        queues = [r for r in network_faults.rules() if "NFQUEUE" in r and echo.host in r]
        assert len(queues) == 1 and "--queue-num 4" in queues[0], queues
        assert f"--queue-num {named} " not in queues[0], queues
    finally:
        stale.delete()


def test_intercept_then_latency_hits_existing_connections(
        echo: EchoServer, network_faults: NetworkFaults) -> None:
    direct = echo.connect()
    network_faults.intercept(echo.host, echo.port)
    network_faults.intercept(echo.host, echo.port)  # idempotent
    conn = echo.connect()
    assert eventually(lambda: network_faults.proxied_connections == 1)
    assert timed_round_trip(conn) < 1.0
    fault = network_faults.latency(echo.host, echo.port, delay=1.0)
    assert 1.0 <= timed_round_trip(conn) < 10.0  # opened before the fault, still delayed
    assert timed_round_trip(direct) < 1.0  # opened before intercept(): never proxied
    network_faults.heal(fault)
    assert timed_round_trip(conn) < 1.0
    network_faults.bandwidth(echo.host, echo.port, bytes_per_second=100_000)
    assert 1.0 <= timed_round_trip(conn, b"z" * 200_000) < 30.0
    network_faults.release(echo.host, echo.port)
    assert not network_faults.active
    conn.settimeout(5)
    with pytest.raises(ConnectionError):
        round_trip(conn)
    conn.close()
    with echo.connect() as fresh:
        assert timed_round_trip(fresh) < 1.0
    assert network_faults.proxied_connections == 0
    assert [r for r in network_faults.rules() if "DNAT" in r and echo.host in r] == []
    direct.close()


def test_port_faults_hit_intercepted_connections(echo: EchoServer,
                                                 network_faults: NetworkFaults) -> None:
    """A connection redirected to a proxy carries the proxy's port; a fault on the
    instance's port must still reach it."""
    network_faults.intercept(echo.host, echo.port)
    conn = echo.connect()
    assert round_trip(conn) == b"ping"
    hole = network_faults.blackhole(echo.host, echo.port)
    assert len(network_faults.rules()) >= 4  # instance port and proxy port, both ways
    conn.settimeout(1.0)
    with pytest.raises(TimeoutError):
        round_trip(conn)
    network_faults.heal(hole)
    conn.settimeout(30.0)
    assert conn.recv(10) == b"ping"
    down = network_faults.down(echo.host, echo.port)
    with pytest.raises(ConnectionRefusedError):
        echo.connect()
    network_faults.heal(down)
    conn.settimeout(5.0)
    call = Call(lambda: conn.recv(10))
    time.sleep(0.1)
    network_faults.reset(echo.host, echo.port)
    assert call.wait(5.0)
    assert isinstance(call.error, ConnectionResetError), call.error
    conn.close()


def test_intercept_cleared_with_the_rest(echo: EchoServer) -> None:
    with NetworkFaults() as faults:
        faults.intercept(echo.host, echo.port)
        faults.latency(echo.host, echo.port, delay=0.2)
        conn = echo.connect()
        assert timed_round_trip(conn) >= 0.2
    assert my_rules() == []
    assert eventually(lambda: proxy_threads() == []), proxy_threads()
    conn.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"delay": -1}, "delay must be"),
    ({"delay": float("nan")}, "delay must be"),
    ({"delay": 0.1, "jitter": -0.1}, "jitter must be"),
    ({"delay": 0.1, "stream": "sideways"}, "stream must be"),
])
def test_bad_latency_arguments(echo: EchoServer, kwargs: dict[str, Any], message: str) -> None:
    with NetworkFaults(sweep=False) as faults:
        with pytest.raises(NetworkFaultError, match=message):
            faults.latency(echo.host, echo.port, **kwargs)
        with pytest.raises(NetworkFaultError, match="port must be"):
            faults.latency(echo.host, None, 0.1)  # type: ignore[arg-type]
        assert faults.rules() == []
        assert faults.proxied_connections == 0


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


# Other processes (other test runs on this machine) may sweep dead owners' rules at any time;
# holding chain_lock() keeps them from doing so while a test looks at a child's rules, so
# that "the rules are gone" proves the child removed them itself.


def _run_child(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _assert_child_removed_its_rules(proc: subprocess.Popen[str], owner: Owner) -> None:
    """Let the child finish while no one else can sweep; its rules must vanish, by its own
    hand, before or as it exits."""
    with chain_lock():
        _go(proc)
        assert eventually(lambda: rules_of(owner) == [] or proc.poll() is not None, 60)
        assert rules_of(owner) == [], "the child left its rules behind"


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
        sys.stdin.readline()  # "go"
"""


def test_rules_gone_when_child_raises_inside_with(echo: EchoServer) -> None:
    proc = _run_child(_CHILD_PRELUDE + """
    with NetworkFaults() as faults:
        faults.blackhole(sys.argv[1])
        ready()
        raise RuntimeError("boom")
    """, echo.host)
    owner = _owner_from_ready_line(proc)
    _assert_child_removed_its_rules(proc, owner)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "RuntimeError: boom" in stderr


def test_rules_gone_at_exit_without_with(echo: EchoServer) -> None:
    proc = _run_child(_CHILD_PRELUDE + """
    import gc
    NetworkFaults().blackhole(sys.argv[1])  # no reference kept, no clear()
    gc.collect()
    ready()
    sys.exit(3)
    """, echo.host)
    owner = _owner_from_ready_line(proc)
    _assert_child_removed_its_rules(proc, owner)
    proc.communicate(timeout=60)
    assert proc.returncode == 3


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
        with chain_lock():
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            assert len(rules_of(owner)) == 2  # SIGKILL: no chance to clean up
            with pytest.raises(TimeoutError):
                echo.connect(timeout=0.5)
            removed = sweep_dead_owners_locked()
    finally:
        if proc.poll() is None:
            proc.kill()
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
    with chain_lock():
        _go(proc)
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

        def test_fixture_cleared():
            # Same live process: only the fixture's teardown can have removed them.
            assert rules_of(Owner.current()) == []
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "chaos.pytest_plugin", "-p", "no:cacheprovider",
         "-s", "-q", "--rootdir", str(tmp_path), "-c", os.devnull, str(test_file)],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "deliberate failure" in result.stdout
    assert "1 failed, 1 passed" in result.stdout, result.stdout
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


# -- simulated clusters ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Cluster]:
    with Cluster.start("aurora-pg", readers=1) as cluster:
        yield cluster


def test_inject_into_cluster_records_events(pg_cluster: Cluster,
                                            network_faults: NetworkFaults) -> None:
    reader = pg_cluster.readers[0]
    writer = pg_cluster.writer
    kwargs = pg_cluster.connect_kwargs()

    def connect(instance: Instance, timeout: int = 5) -> psycopg.Connection[Any]:
        return psycopg.Connection.connect(**{**kwargs, "host": instance.address,
                                             "connect_timeout": timeout, "autocommit": True})

    since = time.monotonic()
    fault = netfault.inject(pg_cluster, reader.id, "blackhole", faults=network_faults)
    assert fault.instance == reader.id and fault.address == reader.address
    event = pg_cluster.events.wait_for("network_fault", since=since, timeout=1)
    assert event.instance == reader.id
    assert event.detail["action"] == "applied" and event.detail["kind"] == "blackhole"
    assert event.detail["toxic"] == "timeout" and event.detail["fault_id"] == fault.id
    assert abs(event.mono - fault.applied_mono) < 1.0
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        connect(reader, timeout=2)
    with connect(writer) as conn:  # the other instance is unaffected
        assert conn.execute("SELECT 1").fetchone() == (1,)
    netfault.heal_injected(pg_cluster, fault, faults=network_faults)
    healed = pg_cluster.events.events("network_fault", since=since)[-1]
    assert healed.detail["action"] == "healed" and healed.mono >= event.mono
    with connect(reader) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    # Latency defaults to the instance's port.
    slow = netfault.inject(pg_cluster, writer.id, "latency", faults=network_faults, delay=0.3)
    assert slow.port == writer.port and slow.params["delay"] == 0.3
    assert pg_cluster.events.last("network_fault") is not None
    with connect(writer, timeout=30) as conn:
        started = time.monotonic()
        conn.execute("SELECT 1").fetchone()
        assert time.monotonic() - started >= 0.3
    with pytest.raises(NetworkFaultError, match="takes no parameters"):
        netfault.inject(pg_cluster, writer.id, "down", faults=network_faults, delay=1)
    with pytest.raises(NetworkFaultError, match="kind must be"):
        netfault.inject(pg_cluster, writer.id, "slicer", faults=network_faults)  # type: ignore[arg-type]


def test_cli_lists_and_sweeps(echo: EchoServer, network_faults: NetworkFaults,
                              capsys: pytest.CaptureFixture[str]) -> None:
    network_faults.blackhole(echo.host)
    assert netfault.main(["list"]) == 0
    listed = capsys.readouterr().out
    mine = [line for line in listed.splitlines() if f"owner={os.getpid()}:" in line]
    assert len(mine) == 2 and all("alive" in line and echo.host in line for line in mine)
    assert netfault.main(["sweep"]) == 0
    assert "removed" in capsys.readouterr().out
    assert len(network_faults.rules()) == 2  # a live owner's rules are left alone
