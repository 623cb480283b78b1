"""The Toxiproxy backend (chaos.toxiproxy) against simulator.toxiproxy_server, our server of
Toxiproxy 2.x's documented HTTP API (its shapes and status codes are pinned by
tests/test_sim_toxiproxy_server.py), and a chaos scenario through it on a proxied simulated
cluster. A real Toxiproxy binary was not available here: this checks what we send and how
we read the answers against a faithful stand-in, not Toxiproxy itself."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.faults import FaultError, Toxic
from chaos.fixtures import ChaosRun, assert_passed, chaos_run
from chaos.toxiproxy import ToxiproxyBackend, ToxiproxyClient, ToxiproxyError
from simulator.toxiproxy_server import VERSION, ToxiproxyServer

__all__ = ["chaos_run"]  # the fixture, imported for this module


class Recorder(ToxiproxyServer):
    """The server, remembering the operations it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object]] = []

    def create_proxy(self, body: object) -> dict[str, object]:
        self.calls.append(("create_proxy", body))
        return super().create_proxy(body)


@pytest.fixture
def server() -> Iterator[Recorder]:
    running = Recorder()
    running.start()
    try:
        yield running
    finally:
        running.close()


@pytest.mark.unit
def test_client_speaks_the_api(server: Recorder) -> None:
    client = ToxiproxyClient(server.url)
    assert client.version() == VERSION
    proxy = client.create_proxy("pg", "127.0.0.1:0", "127.10.0.2:5432")
    assert proxy["upstream"] == "127.10.0.2:5432" and proxy["enabled"] is True
    with pytest.raises(ToxiproxyError) as info:
        client.create_proxy("pg", "127.0.0.1:0", "127.10.0.2:5432")
    assert info.value.status == 409 and "proxy already exists" in str(info.value)
    client.add_toxic("pg", "lat", "latency", "downstream", 0.5, {"latency": 100, "jitter": 10})
    assert client.toxics("pg") == [{"attributes": {"latency": 100, "jitter": 10},
                                    "name": "lat", "type": "latency", "stream": "downstream",
                                    "toxicity": 0.5}]
    # Toxiproxy's attributes are Go integers: a whole float is sent as an integer.
    client.add_toxic("pg", "close", "slow_close", "upstream", 1.0, {"delay": 100.0})
    assert client.toxics("pg")[1]["attributes"] == {"delay": 100}
    client.remove_toxic("pg", "lat")
    with pytest.raises(ToxiproxyError) as info:
        client.remove_toxic("pg", "lat")
    assert info.value.status == 404 and "toxic not found" in str(info.value)
    assert client.set_enabled("pg", False)["enabled"] is False
    client.reset()
    assert server.proxies()["pg"]["enabled"] is True and server.toxics("pg") == []
    client.delete_proxy("pg")
    assert client.proxies() == {}
    with pytest.raises(ToxiproxyError) as info:
        client.delete_proxy("pg")
    assert info.value.status == 404 and "proxy not found" in str(info.value)


@pytest.mark.unit
def test_client_errors_are_clear() -> None:
    with pytest.raises(ToxiproxyError, match="expected http://host:port"):
        ToxiproxyClient("localhost:8474")
    with pytest.raises(ToxiproxyError, match="unreachable"):
        ToxiproxyClient("http://127.0.0.1:1", timeout=1).version()


@pytest.mark.unit
def test_backend_applies_every_toxic_per_stream(server: Recorder) -> None:
    backend = ToxiproxyBackend(ToxiproxyClient(server.url),
                               listen={"instance-1": "127.0.0.1:0"})
    both = backend.apply("instance-1", "127.10.0.2", 5432,
                         Toxic("latency", {"latency": 200, "jitter": 50}))
    proxy = server.proxies()["chaos-instance-1"]
    assert proxy["upstream"] == "127.10.0.2:5432"
    assert backend.listen_address("instance-1") == proxy["listen"]
    assert proxy["listen"].startswith("127.0.0.1:") and not proxy["listen"].endswith(":0")
    toxics = proxy["toxics"]
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
    toxics = server.toxics("chaos-instance-1")
    assert len(toxics) == 8
    slicer = next(t for t in toxics if t["type"] == "slicer")
    assert slicer["toxicity"] == 0.3 and slicer["stream"] == "upstream"
    assert slicer["attributes"] == {"average_size": 16, "size_variation": 0, "delay": 10}
    backend.heal(both)
    backend.heal(both)  # idempotent
    assert len(server.toxics("chaos-instance-1")) == 6
    down = backend.apply("instance-1", "127.10.0.2", 5432, Toxic("down"))
    assert server.proxies()["chaos-instance-1"]["enabled"] is False
    backend.heal(down)
    assert server.proxies()["chaos-instance-1"]["enabled"] is True
    backend.clear()
    assert server.toxics("chaos-instance-1") == []
    assert [c[0] for c in server.calls] == ["create_proxy"]  # one per instance, reused


@pytest.mark.unit
def test_backend_of_a_proxied_cluster_uses_its_proxies(server: Recorder) -> None:
    server.create_proxy({"name": "instance-2", "listen": "127.0.0.1:0",
                         "upstream": "127.10.0.3:5432"})
    cluster = types.SimpleNamespace(name="db1", toxiproxy=server)
    backend = ToxiproxyBackend.for_cluster(cluster)
    fault = backend.apply("instance-2", "127.10.0.3", 5432, Toxic("timeout", stream="upstream"))
    assert server.toxics("instance-2")[0]["type"] == "timeout"
    assert len(server.calls) == 1  # nothing created: the cluster's own proxy
    backend.heal(fault)
    assert server.toxics("instance-2") == []
    with pytest.raises(FaultError, match="not proxied"):
        ToxiproxyBackend.for_cluster(types.SimpleNamespace(name="db2", toxiproxy=None))


@pytest.mark.real_server
@pytest.mark.chaos
def test_writer_blackhole_through_the_proxies(chaos_run: ChaosRun, tmp_path: Path) -> None:
    """``--faults toxiproxy`` on the simulator: a proxied cluster; the scenario's ``timeout``
    toxic on the writer's proxy (no iptables involved) stalls the writes through it, EFM
    declares the writer dead, and the application resumes once the toxic is removed."""
    result = chaos_run("writer-blackhole", flavour="pg", faults="toxiproxy")
    assert_passed(result)
    assert result.data["fault_backend"] == "toxiproxy"
    # The toxic acts on the proxies only: writes stall only because they go through them.
    metrics = result.data["metrics"]
    assert 2.5 <= metrics["downtime"] <= 30, result.summary()
    assert metrics["recoveries"] == []  # no promotion: the writer stayed the writer
    assert [e["detail"]["action"] for e in result.data["events"]
            if e["name"] == "network_fault"] == ["applied", "healed"]
