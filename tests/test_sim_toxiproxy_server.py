"""simulator.toxiproxy_server: Toxiproxy 2.x's HTTP API (routes, bodies, status codes, as
Toxiproxy's README and api.go define them) and what each toxic does to real TCP traffic
through a proxy in front of a small echo server."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from simulator.toxiproxy_server import VERSION, ToxiproxyServer

from .waiting import wait_until

pytestmark = pytest.mark.unit


class Echo:
    """A TCP server on 127.0.0.1 that sends back what it receives, and closes when the
    client half-closes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._thread.join(5)


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.close()


@pytest.fixture
def toxiproxy() -> Iterator[ToxiproxyServer]:
    with ToxiproxyServer() as server:
        yield server


def request(server: ToxiproxyServer, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def api(server: ToxiproxyServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, data = request(server, method, path, body)
    return status, json.loads(data) if data else None


def proxy(server: ToxiproxyServer, echo: Echo, name: str = "echo") -> tuple[str, int]:
    created = server.create_proxy({"name": name, "listen": "127.0.0.1:0",
                                   "upstream": echo.address})
    host, port = created["listen"].rsplit(":", 1)
    return host, int(port)


def roundtrip(address: tuple[str, int], data: bytes = b"ping", timeout: float = 10) -> float:
    """Seconds for ``data`` to come back through a new connection."""
    with socket.create_connection(address, timeout=timeout) as sock:
        started = time.monotonic()
        sock.sendall(data)
        assert recv_exactly(sock, len(data)) == data
        return time.monotonic() - started


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------------------------
# the API


def test_api_routes_bodies_and_status_codes(toxiproxy: ToxiproxyServer, echo: Echo) -> None:
    status, headers, data = request(toxiproxy, "GET", "/version")
    assert status == 200 and json.loads(data) == {"version": VERSION}
    assert headers["Content-Type"].startswith("application/json")

    status, created = api(toxiproxy, "POST", "/proxies",
                          {"name": "pg", "listen": "127.0.0.1:0", "upstream": echo.address})
    assert status == 201
    assert list(created) == ["name", "listen", "upstream", "enabled", "toxics"]
    assert created["enabled"] is True and created["toxics"] == []
    assert not created["listen"].endswith(":0")  # the port the kernel chose
    assert api(toxiproxy, "POST", "/proxies",
               {"name": "pg", "listen": "127.0.0.1:0", "upstream": echo.address}) == (
        409, {"error": "proxy already exists", "status": 409})
    assert api(toxiproxy, "POST", "/proxies", {"listen": "127.0.0.1:0", "upstream": "x:1"}) == (
        400, {"error": "missing required field: name", "status": 400})
    assert api(toxiproxy, "POST", "/proxies", {"name": "x"}) == (
        400, {"error": "missing required field: upstream", "status": 400})
    status, headers, data = request(toxiproxy, "GET", "/proxies/nope")
    assert (status, json.loads(data)) == (404, {"error": "proxy not found", "status": 404})
    assert headers["Content-Type"] == "text/plain; charset=utf-8"  # Go's http.Error
    assert api(toxiproxy, "GET", "/proxies") == (200, {"pg": created})
    assert api(toxiproxy, "GET", "/proxies/pg") == (200, created)

    # Toxics: defaults (stream downstream, toxicity 1, name <type>_<stream>), 200 on create.
    status, toxic = api(toxiproxy, "POST", "/proxies/pg/toxics",
                        {"type": "latency", "attributes": {"latency": 100}})
    assert status == 200
    assert toxic == {"attributes": {"latency": 100, "jitter": 0}, "name": "latency_downstream",
                     "type": "latency", "stream": "downstream", "toxicity": 1}
    assert api(toxiproxy, "POST", "/proxies/pg/toxics", {"type": "latency"}) == (
        409, {"error": "toxic already exists", "status": 409})
    assert api(toxiproxy, "POST", "/proxies/pg/toxics", {"type": "nope"}) == (
        400, {"error": "invalid toxic type", "status": 400})
    assert api(toxiproxy, "POST", "/proxies/pg/toxics", {"type": "timeout", "stream": "sideways"}) \
        == (400, {"error": "stream was invalid, can be either upstream or downstream",
                  "status": 400})
    status, error = api(toxiproxy, "POST", "/proxies/pg/toxics",
                        {"type": "bandwidth", "attributes": {"rate": 1.5}})
    assert status == 400 and error["error"].startswith("bad request body")  # Go: an int64
    status, up = api(toxiproxy, "POST", "/proxies/pg/toxics",
                     {"name": "cut", "type": "timeout", "stream": "upstream", "toxicity": 0.5})
    assert status == 200 and up["toxicity"] == 0.5 and up["attributes"] == {"timeout": 0}
    assert api(toxiproxy, "GET", "/proxies/pg/toxics") == (200, [toxic, up])
    assert api(toxiproxy, "GET", "/proxies/pg/toxics/cut") == (200, up)
    status, updated = api(toxiproxy, "POST", "/proxies/pg/toxics/latency_downstream",
                          {"attributes": {"jitter": 5}})
    assert status == 200 and updated["attributes"] == {"latency": 100, "jitter": 5}
    assert api(toxiproxy, "PATCH", "/proxies/pg/toxics/cut", {"toxicity": 1})[1]["toxicity"] == 1
    assert request(toxiproxy, "DELETE", "/proxies/pg/toxics/cut")[::2] == (204, b"")
    assert api(toxiproxy, "DELETE", "/proxies/pg/toxics/cut") == (
        404, {"error": "toxic not found", "status": 404})
    assert api(toxiproxy, "GET", "/proxies/pg/toxics/cut")[0] == 404

    # Disable, reset (enables and removes every toxic), populate, delete.
    status, disabled = api(toxiproxy, "POST", "/proxies/pg", {"enabled": False})
    assert status == 200 and disabled["enabled"] is False
    assert request(toxiproxy, "POST", "/reset")[::2] == (204, b"")
    assert api(toxiproxy, "GET", "/proxies/pg")[1] == {**created, "toxics": []}
    status, populated = api(toxiproxy, "POST", "/populate", [
        {"name": "pg", "listen": created["listen"], "upstream": echo.address},
        {"name": "other", "listen": "127.0.0.1:0", "upstream": echo.address,
         "enabled": False}])
    assert status == 201 and [p["name"] for p in populated["proxies"]] == ["pg", "other"]
    assert populated["proxies"][1]["enabled"] is False
    assert api(toxiproxy, "POST", "/populate", [{"name": "x"}]) == (
        400, {"error": "missing required field: upstream at proxy 1", "status": 400})
    assert request(toxiproxy, "DELETE", "/proxies/other")[::2] == (204, b"")
    assert api(toxiproxy, "DELETE", "/proxies/other")[0] == 404
    assert sorted(api(toxiproxy, "GET", "/proxies")[1]) == ["pg"]

    assert request(toxiproxy, "GET", "/proxies",
                   headers={"User-Agent": "Mozilla/5.0"})[0] == 403  # browsers refused
    assert request(toxiproxy, "GET", "/nothing-here")[0] == 404
    assert request(toxiproxy, "DELETE", "/version")[::2] == (405, b"")  # known path
    status, _, data = request(toxiproxy, "POST", "/proxies", None)
    assert status == 400 and b"bad request body" in data


# --------------------------------------------------------------------------------------------
# the toxics, on real connections


def test_proxy_forwards_and_latency_delays_data(toxiproxy: ToxiproxyServer, echo: Echo) -> None:
    address = proxy(toxiproxy, echo)
    assert roundtrip(address) < 1.0
    with socket.create_connection(address, timeout=10) as already_open:
        toxiproxy.add_toxic("echo", {"type": "latency", "attributes": {"latency": 300}})
        started = time.monotonic()
        already_open.sendall(b"x")
        assert recv_exactly(already_open, 1) == b"x"
        assert time.monotonic() - started >= 0.28  # an open connection gets it too
    assert 0.28 <= roundtrip(address) < 5.0
    toxiproxy.remove_toxic("echo", "latency_downstream")
    assert roundtrip(address) < 1.0


def test_toxicity_zero_spares_every_connection(toxiproxy: ToxiproxyServer, echo: Echo) -> None:
    address = proxy(toxiproxy, echo)
    toxiproxy.add_toxic("echo", {"type": "latency", "toxicity": 0.0,
                                 "attributes": {"latency": 2000}})
    assert roundtrip(address) < 1.0


def test_timeout_zero_drops_data_until_removed(toxiproxy: ToxiproxyServer, echo: Echo) -> None:
    address = proxy(toxiproxy, echo)
    toxiproxy.add_toxic("echo", {"type": "timeout", "stream": "upstream"})
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"lost")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(10)  # a blackhole: no answer, and no close either
        toxiproxy.remove_toxic("echo", "timeout_upstream")
        sock.settimeout(10)
        sock.sendall(b"kept")
        assert recv_exactly(sock, 4) == b"kept"


def test_timeout_closes_the_connection_after_its_time(toxiproxy: ToxiproxyServer,
                                                      echo: Echo) -> None:
    address = proxy(toxiproxy, echo)
    toxiproxy.add_toxic("echo", {"type": "timeout", "attributes": {"timeout": 300}})
    with socket.create_connection(address, timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"x")
        assert sock.recv(10) == b""
        assert 0.25 <= time.monotonic() - started < 5.0


def test_disabled_proxy_closes_and_refuses(toxiproxy: ToxiproxyServer, echo: Echo) -> None:
    address = proxy(toxiproxy, echo)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"  # the connection is through the proxy
        toxiproxy.update_proxy("echo", {"enabled": False})
        assert sock.recv(10) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=10).close()
    toxiproxy.update_proxy("echo", {"enabled": True})
    assert roundtrip(address) < 1.0


def test_reset_peer_resets_the_connection(toxiproxy: ToxiproxyServer, echo: Echo) -> None:
    address = proxy(toxiproxy, echo)
    toxiproxy.add_toxic("echo", {"type": "reset_peer", "stream": "upstream"})
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            sock.recv(10)


def test_limit_data_closes_after_the_limit(toxiproxy: ToxiproxyServer, echo: Echo) -> None:
    address = proxy(toxiproxy, echo)
    toxiproxy.add_toxic("echo", {"type": "limit_data", "attributes": {"bytes": 10}})
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"a" * 30)
        assert recv_exactly(sock, 30) == b"a" * 10  # then the end of the stream


def test_bandwidth_slices_and_slow_close(toxiproxy: ToxiproxyServer, echo: Echo) -> None:
    address = proxy(toxiproxy, echo)
    toxiproxy.add_toxic("echo", {"type": "bandwidth", "attributes": {"rate": 10}})  # 10 KB/s
    assert 0.4 <= roundtrip(address, b"b" * 5000) < 10.0
    toxiproxy.reset()
    toxiproxy.add_toxic("echo", {"type": "slicer", "stream": "upstream", "attributes": {
        "average_size": 8, "size_variation": 3, "delay": 2000}})
    payload = bytes(range(256)) * 2
    assert roundtrip(address, payload) >= 0.02  # >= 32 slices, 2 ms apart, all in order
    toxiproxy.reset()
    toxiproxy.add_toxic("echo", {"type": "slow_close", "attributes": {"delay": 300}})
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        started = time.monotonic()
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
        assert time.monotonic() - started >= 0.28


def test_close_stops_every_thread_and_socket(echo: Echo) -> None:
    server = ToxiproxyServer().start()
    address = proxy(server, echo)
    server.add_toxic("echo", {"type": "latency", "attributes": {"latency": 10}})
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    server.close()
    server.close()  # idempotent
    assert sock.recv(10) == b""
    sock.close()
    wait_until("the proxy threads to stop", lambda: not any(
        t.name.startswith("toxiproxy-") for t in threading.enumerate()))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=10).close()
