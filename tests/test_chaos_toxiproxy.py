"""The Toxiproxy backend against a small in-test HTTP server that mimics Toxiproxy's
documented API (proxies, toxics per stream, enable/disable, reset, error statuses). A real
Toxiproxy was not available here (no Docker): this checks what we send and how we read the
answers, not Toxiproxy itself."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from chaos.faults import Toxic
from chaos.toxiproxy import ToxiproxyBackend, ToxiproxyClient, ToxiproxyError

pytestmark = pytest.mark.unit


class FakeToxiproxy:
    """State of the fake server and the requests it received."""

    def __init__(self) -> None:
        self.proxies: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()


def handler(state: FakeToxiproxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length else None

        def _route(self, method: str) -> None:
            body = self._body() if method == "POST" else None
            parts = [p for p in self.path.split("/") if p]
            with state.lock:
                state.calls.append((method, self.path, body))
                self._dispatch(method, parts, body)

        def _dispatch(self, method: str, parts: list[str], body: Any) -> None:
            proxies = state.proxies
            if parts == ["version"]:
                return self._send(200, {"version": "2.9.0-fake"})
            if parts == ["reset"] and method == "POST":
                for proxy in proxies.values():
                    proxy["enabled"], proxy["toxics"] = True, []
                return self._send(204)
            if parts == ["proxies"]:
                if method == "GET":
                    return self._send(200, proxies)
                if body["name"] in proxies:
                    return self._send(409, {"error": "proxy already exists", "status": 409})
                listen = body.get("listen", "")
                if listen.endswith(":0"):
                    listen = listen[:-1] + str(20000 + len(proxies))
                proxies[body["name"]] = {"name": body["name"], "listen": listen,
                                         "upstream": body["upstream"],
                                         "enabled": body.get("enabled", True), "toxics": []}
                return self._send(201, proxies[body["name"]])
            if len(parts) >= 2 and parts[0] == "proxies":
                if parts[1] not in proxies:
                    return self._send(404, {"error": "proxy not found", "status": 404})
                proxy = proxies[parts[1]]
                if len(parts) == 2 and method == "POST":
                    proxy.update({k: v for k, v in body.items() if k == "enabled"})
                    return self._send(200, proxy)
                if len(parts) == 2 and method == "DELETE":
                    del proxies[parts[1]]
                    return self._send(204)
                if parts[2:] == ["toxics"] and method == "GET":
                    return self._send(200, proxy["toxics"])
                if parts[2:] == ["toxics"] and method == "POST":
                    if body.get("stream") not in ("upstream", "downstream"):
                        return self._send(400, {"error": "bad stream", "status": 400})
                    proxy["toxics"].append(body)
                    return self._send(200, body)
                if len(parts) == 4 and method == "DELETE":
                    before = len(proxy["toxics"])
                    proxy["toxics"] = [t for t in proxy["toxics"] if t["name"] != parts[3]]
                    return self._send(204 if len(proxy["toxics"]) < before else 404)
            return self._send(404, {"error": "not found", "status": 404})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler


@pytest.fixture
def fake() -> Iterator[tuple[FakeToxiproxy, str]]:
    state = FakeToxiproxy()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_client_speaks_the_api(fake: tuple[FakeToxiproxy, str]) -> None:
    state, url = fake
    client = ToxiproxyClient(url)
    assert client.version() == "2.9.0-fake"
    proxy = client.create_proxy("pg", "127.0.0.1:0", "127.10.0.2:5432")
    assert proxy["upstream"] == "127.10.0.2:5432" and proxy["enabled"] is True
    with pytest.raises(ToxiproxyError) as info:
        client.create_proxy("pg", "127.0.0.1:0", "127.10.0.2:5432")
    assert info.value.status == 409 and "already exists" in str(info.value)
    client.add_toxic("pg", "lat", "latency", "downstream", 0.5, {"latency": 100, "jitter": 10})
    assert client.toxics("pg") == [{"name": "lat", "type": "latency", "stream": "downstream",
                                    "toxicity": 0.5,
                                    "attributes": {"latency": 100, "jitter": 10}}]
    client.remove_toxic("pg", "lat")
    assert client.toxics("pg") == []
    assert client.set_enabled("pg", False)["enabled"] is False
    client.reset()
    assert state.proxies["pg"]["enabled"] is True
    client.delete_proxy("pg")
    assert client.proxies() == {}


def test_client_errors_are_clear() -> None:
    with pytest.raises(ToxiproxyError, match="expected http://host:port"):
        ToxiproxyClient("localhost:8474")
    with pytest.raises(ToxiproxyError, match="unreachable"):
        ToxiproxyClient("http://127.0.0.1:1", timeout=1).version()


def test_backend_applies_every_toxic_per_stream(fake: tuple[FakeToxiproxy, str]) -> None:
    state, url = fake
    backend = ToxiproxyBackend(ToxiproxyClient(url), listen={"instance-1": "127.0.0.1:25432"})
    both = backend.apply("instance-1", "127.10.0.2", 5432,
                         Toxic("latency", {"latency": 200, "jitter": 50}))
    assert state.proxies["chaos-instance-1"]["upstream"] == "127.10.0.2:5432"
    assert backend.listen_address("instance-1") == "127.0.0.1:25432"
    toxics = state.proxies["chaos-instance-1"]["toxics"]
    assert sorted(t["stream"] for t in toxics) == ["downstream", "upstream"]
    assert {t["type"] for t in toxics} == {"latency"}
    assert all(t["attributes"] == {"latency": 200, "jitter": 50} for t in toxics)
    for toxic in (Toxic("bandwidth", {"rate": 64}, "downstream"),
                  Toxic("slicer", {"average_size": 16, "delay": 10}, "upstream", 0.3),
                  Toxic("limit_data", {"bytes": 1000}, "downstream"),
                  Toxic("slow_close", {"delay": 100}, "downstream"),
                  Toxic("reset_peer", {"timeout": 50}, "upstream"),
                  Toxic("timeout", {"timeout": 1000}, "downstream")):
        backend.apply("instance-1", "127.10.0.2", 5432, toxic)
    toxics = state.proxies["chaos-instance-1"]["toxics"]
    assert len(toxics) == 8
    slicer = next(t for t in toxics if t["type"] == "slicer")
    assert slicer["toxicity"] == 0.3 and slicer["stream"] == "upstream"
    assert slicer["attributes"] == {"average_size": 16, "size_variation": 0, "delay": 10}
    backend.heal(both)
    backend.heal(both)  # idempotent
    assert len(state.proxies["chaos-instance-1"]["toxics"]) == 6
    down = backend.apply("instance-1", "127.10.0.2", 5432, Toxic("down"))
    assert state.proxies["chaos-instance-1"]["enabled"] is False
    backend.heal(down)
    assert state.proxies["chaos-instance-1"]["enabled"] is True
    backend.clear()
    assert state.proxies["chaos-instance-1"]["toxics"] == []
    creates = [c for c in state.calls if c[0] == "POST" and c[1] == "/proxies"]
    assert len(creates) == 1  # one proxy per instance, reused
