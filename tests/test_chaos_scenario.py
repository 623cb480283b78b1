"""Chaos scenarios, the fault vocabulary and the analysis, without servers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from chaos.analysis import Window, analyse, percentile
from chaos.control import WriterSpan, writer_spans
from chaos.faults import FaultError, LocalFaultBackend, Toxic, UnsupportedToxicError
from chaos.scenario import Scenario, ScenarioError, from_dict, library, load
from chaos.workload import Request

pytestmark = pytest.mark.unit

LIBRARY = ("default", "writer-crash", "targeted-failover", "writer-blackhole", "reader-blackhole",
           "latency-spike", "reset-storm", "flapping-network", "reboot", "replica-lag",
           "dns-staleness", "secret-rotation")


def test_library_has_every_shipped_scenario() -> None:
    found = library()
    assert set(LIBRARY) <= set(found)
    for scenario in found.values():
        assert scenario.description
        assert scenario.faults
        for flavour in ("pg", "mysql"):
            assert scenario.with_flavour(flavour).cluster.flavour in ("aurora-pg",
                                                                      "aurora-mysql")


def test_default_is_aurora_pg_writer_failover() -> None:
    default = load("default")
    assert default.cluster.flavour == "aurora-pg"
    assert [s.action for s in default.faults] == ["failover"]
    assert default.workload.threads >= 2


def test_load_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nduration: 3\nfaults:\n  - {at: 1, action: toxic, "
                    "toxic: {type: latency, attributes: {latency: 100}, stream: upstream}, "
                    "duration: 1}\n")
    scenario = load(path)
    assert scenario.name == "mine"
    toxic = scenario.faults[0].toxic
    assert toxic is not None and toxic.attributes == {"latency": 100, "jitter": 0}
    assert toxic.streams == ("upstream",)


@pytest.mark.parametrize(("data", "message"), [
    ({}, "name: missing"),
    ({"name": "x", "bogus": 1}, "unknown field(s) bogus"),
    ({"name": "x", "cluster": {"flavour": "oracle"}}, "cluster.flavour 'oracle'"),
    ({"name": "x", "workload": {"threads": 0}}, "workload.threads: expected a whole number >= 1"),
    ({"name": "x", "workload": {"write_ratio": 2}}, "workload.write_ratio"),
    ({"name": "x", "faults": [{"at": 1, "action": "explode"}]}, "faults[0].action 'explode'"),
    ({"name": "x", "faults": [{"at": 1, "action": "toxic"}]}, "faults[0].toxic: missing"),
    ({"name": "x", "faults": [{"at": 1, "action": "toxic", "toxic": {"type": "latency",
                                                                   "attributes": {"ms": 1}}}]},
     "unknown attribute 'ms'"),
    ({"name": "x", "duration": 5, "faults": [{"at": 6, "action": "failover"}]},
     "not before the end of the run"),
    ({"name": "x", "faults": [{"at": 1, "action": "toxic", "toxic": "timeout", "repeat": 3}]},
     "repeat needs duration and every"),
    ({"name": "x", "invariants": ["no_bugs"]}, "invariants: unknown 'no_bugs'"),
    ({"name": "x", "faults": [{"at": 1, "action": "rotate_secret"}]},
     "rotate_secret needs the application to log in with the secret"),
    ({"name": "x", "workload": {"reconnect_every": -1}}, "workload.reconnect_every"),
])
def test_bad_scenarios_name_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        from_dict(data)
    assert message in str(info.value)


def test_unknown_scenario_lists_the_library() -> None:
    with pytest.raises(ScenarioError, match="writer-crash"):
        load("no-such-scenario")
    with pytest.raises(ScenarioError, match="--flavour 'oracle'"):
        load("default").with_flavour("oracle")


def test_toxic_vocabulary() -> None:
    toxic = Toxic("slicer", {"average_size": 64}, "downstream", 0.5)
    assert toxic.attributes["size_variation"] == 0
    assert toxic.describe() == "slicer(average_size=64) downstream toxicity=0.5"
    with pytest.raises(FaultError, match="toxic type 'drop'"):
        Toxic("drop")
    with pytest.raises(FaultError, match="toxicity 0"):
        Toxic("latency", toxicity=0)
    with pytest.raises(FaultError, match="stream 'sideways'"):
        Toxic("latency", stream="sideways")


class _NoLatencyInjector:
    """An injector with the netfault API minus latency (the local backend's capability check
    must not touch iptables)."""

    def blackhole(self, address: str, port: int | None = None) -> Any:
        raise AssertionError("not called")


@pytest.mark.parametrize(("toxic", "reason"), [
    (Toxic("bandwidth", {"rate": 10}), "no bandwidth support"),
    (Toxic("slicer", {"average_size": 10}), "slicer: the local backend (iptables) cannot"),
    (Toxic("slow_close"), "slow_close"),
    (Toxic("limit_data", {"bytes": 10}), "limit_data"),
    (Toxic("timeout", stream="upstream"), "upstream stream only"),
    (Toxic("reset_peer", stream="downstream"), "downstream stream only"),
    (Toxic("timeout", {"timeout": 500}), "timeout=500 ms"),
    (Toxic("reset_peer", toxicity=0.5), "toxicity 0.5"),
    (Toxic("latency", {"latency": 100}), "no latency support"),
])
def test_local_backend_refuses_what_it_cannot_do(toxic: Toxic, reason: str) -> None:
    backend = LocalFaultBackend(_NoLatencyInjector())
    found = backend.supports(toxic)
    assert found is not None and reason in found and "toxiproxy" in found
    with pytest.raises(UnsupportedToxicError, match="toxiproxy"):
        backend.apply("instance-1", "127.0.0.1", 5432, toxic)
    for ok in (Toxic("timeout"), Toxic("reset_peer"), Toxic("down")):
        assert backend.supports(ok) is None


class _ProxyInjector(_NoLatencyInjector):
    def blackhole(self, address: str, port: int | None = None, *,
                  stream: str = "both") -> Any:
        return ("blackhole", address, stream)

    def latency(self, address: str, port: int, delay: float, jitter: float = 0.0, *,
                stream: str = "downstream") -> Any:
        return ("latency", address, port, delay, jitter, stream)

    def bandwidth(self, address: str, port: int, rate: float, *,
                  stream: str = "downstream") -> Any:
        return ("bandwidth", address, port, rate, stream)


def test_local_backend_maps_proxy_toxics_to_the_injector() -> None:
    backend = LocalFaultBackend(_ProxyInjector())
    fault = backend.apply("instance-1", "127.0.0.9", 5432,
                          Toxic("latency", {"latency": 200, "jitter": 50}, "upstream"))
    assert fault.handle == ("latency", "127.0.0.9", 5432, 0.2, 0.05, "upstream")
    fault = backend.apply("instance-1", "127.0.0.9", 5432, Toxic("bandwidth", {"rate": 64}))
    assert fault.handle == ("bandwidth", "127.0.0.9", 5432, 64000.0, "both")
    fault = backend.apply("instance-1", "127.0.0.9", 5432, Toxic("timeout", stream="upstream"))
    assert fault.handle == ("blackhole", "127.0.0.9", "upstream")
    assert backend.supports(Toxic("bandwidth")) == "bandwidth with rate=0: give a rate in " \
                                                   "KB/s > 0"


def test_optional_plugins() -> None:
    from chaos.runner import effective_plugins

    assert effective_plugins("failover, no_such_plugin?") == "failover"
    assert effective_plugins("failover,failover_v2?") == "failover,failover_v2"
    assert effective_plugins("") == ""


def test_percentile() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0


def test_writer_spans_start_at_failover_started() -> None:
    events: list[dict[str, Any]] = [
        {"name": "failover_started", "mono": 10.0, "instance": "instance-1"},
        {"name": "promoted", "mono": 11.0, "instance": "instance-3"}]
    assert writer_spans("instance-1", events) == [
        WriterSpan("instance-1", -math.inf, 11.0), WriterSpan("instance-3", 10.0, math.inf)]


def _analyse(requests: list[Request], acked: dict[int, float], rows: dict[int, str],
             **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        requests=requests, acked=acked, unresolved=set(), rows=rows,
        spans=[WriterSpan("instance-1", -math.inf, 5.0), WriterSpan("instance-2", 4.5, math.inf)],
        events=[{"name": "promoted", "mono": 5.0, "instance": "instance-2"}],
        windows=[Window("failover", 4.0, 5.0)], t0=0.0, t_end=10.0,
        invariants=("no_lost_writes", "no_reader_writes", "documented_errors"),
        allowed_errors=(), success_ratio=0.9, window=2.0, max_downtime=None, max_recovery=1.0)
    kwargs.update(overrides)
    return analyse(**kwargs)


def _writes() -> tuple[list[Request], dict[int, float], dict[int, str]]:
    requests, acked, rows = [], {}, {}
    for n in range(1, 100):
        t = n * 0.1
        requests.append(Request(1, "write", t - 0.01, t, None, True, (n,)))
        acked[n] = t
        rows[n] = "instance-1" if t <= 5.0 else "instance-2"
    return requests, acked, rows


def test_analysis_passes_a_clean_run() -> None:
    requests, acked, rows = _writes()
    result = _analyse(requests, acked, rows)
    assert all(c["ok"] for c in result["invariants"]), result["invariants"]
    assert all(c["ok"] for c in result["hypothesis"]), result["hypothesis"]
    assert result["metrics"]["recoveries"][0]["recovery"] == pytest.approx(0.1, abs=1e-6)
    assert result["metrics"]["downtime"] == pytest.approx(0.1, abs=1e-6)
    assert sum(result["timeline"]["ok_writes"]) == 99


def test_analysis_catches_a_lost_write_a_reader_write_and_an_undocumented_error() -> None:
    requests, acked, rows = _writes()
    del rows[10]  # acknowledged, not on the final writer
    rows[20] = "instance-3"  # executed by an instance that was never the writer
    rows[80] = "instance-1"  # executed by the old writer after its successor's promotion
    requests.append(Request(1, "write", 6.0, 6.1, "ProgrammingError", False, (500,)))
    result = _analyse(requests, acked, rows)
    checks = {c["name"]: c for c in result["invariants"]}
    assert not checks["no_lost_writes"]["ok"] and "[10]" in checks["no_lost_writes"]["detail"]
    assert not checks["no_reader_writes"]["ok"]
    assert "20@instance-3" in checks["no_reader_writes"]["detail"]
    assert "80@instance-1" in checks["no_reader_writes"]["detail"]
    assert not checks["documented_errors"]["ok"]
    allowed = _analyse(requests, acked, rows, allowed_errors=("ProgrammingError",))
    assert {c["name"]: c["ok"] for c in allowed["invariants"]}["documented_errors"]


def test_analysis_measures_downtime_and_missing_recovery() -> None:
    requests, acked, _ = _writes()
    keep = [r for r in requests if not 3.0 < r.end < 7.0]
    acked = {i: t for i, t in acked.items() if not 3.0 < t < 7.0}
    result = _analyse(keep, acked, {i: "instance-1" for i in acked})
    assert result["metrics"]["downtime"] == pytest.approx(4.0, abs=1e-6)
    assert result["metrics"]["recoveries"][0]["recovery"] is None
    assert {c["name"]: c["ok"] for c in result["hypothesis"]}["max_recovery"] is False


def test_scenario_round_trips_to_json() -> None:
    scenario = load("reset-storm")
    again = from_dict(scenario.to_json())
    assert isinstance(again, Scenario) and again == scenario
