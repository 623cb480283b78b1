"""The fast CI subset of the chaos suite, on real simulated clusters (PostgreSQL and MySQL):
writer crash and writer blackhole through the runner and the pytest fixture, the README's
default scenario through ``python -m chaos run``, and a non-zero exit on an invariant
violation. The whole library runs in tests/test_chaos_library.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.__main__ import main
from chaos.fixtures import ChaosRun, assert_invariants, assert_passed, chaos_run
from chaos.netfault import unavailable_reason

__all__ = ["chaos_run"]  # the fixture, imported for this module

pytestmark = [pytest.mark.real_server, pytest.mark.chaos]

ROOT = Path(__file__).resolve().parent.parent
needs_netfault = pytest.mark.skipif(unavailable_reason() is not None,
                                    reason=f"network faults: {unavailable_reason()}")


# Found by this suite (fixed): mysql-connector's cursor() checks the connection, and
# ConnectionProxy.cursor() used to call it outside the pipeline, so after a crash the next
# cursor() raised the driver's "MySQL Connection not available" and never failed over.
@pytest.mark.parametrize("flavour", ["pg", "mysql"])
def test_writer_crash(chaos_run: ChaosRun, flavour: str) -> None:
    result = chaos_run("writer-crash", flavour=flavour)
    assert_invariants(result)
    metrics = result.data["metrics"]
    # The crash was real: a promotion happened and the application wrote on the new writer.
    [recovery] = metrics["recoveries"]
    assert recovery["recovery"] is not None, result.summary()
    assert recovery["instance"] != "instance-1"
    assert metrics["writes_acknowledged"] > 100
    assert result.data["writer_history"][-1]["instance"] == recovery["instance"]
    assert_passed(result)


@needs_netfault
@pytest.mark.parametrize("flavour", ["pg", "mysql"])
def test_writer_blackhole(chaos_run: ChaosRun, flavour: str) -> None:
    result = chaos_run("writer-blackhole", flavour=flavour)
    assert_passed(result)
    metrics = result.data["metrics"]
    # The blackhole was real: writes stalled about as long as it lasted (3 s), then resumed.
    assert 2.5 <= metrics["downtime"] <= 30, result.summary()
    assert [e["detail"]["action"] for e in result.data["events"]
            if e["name"] == "network_fault"] == ["applied", "healed"]
    assert metrics["recoveries"] == []


def test_default_command(tmp_path: Path) -> None:
    """The README's main command: prints the summary and where the reports are."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "chaos", "run", "default", "--out",
                           str(tmp_path / "default")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "scenario default on aurora-pg: PASS" in proc.stdout
    report = tmp_path / "default" / "report.html"
    assert f"report: {report}" in proc.stdout
    assert (tmp_path / "default" / "timeline.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "default" / "report.json").read_text())
    assert data["verdict"] == "pass" and data["metrics"]["recoveries"][0]["recovery"] is not None


def test_invariant_violation_exits_non_zero(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Without the failover plugin a writer crash reaches the application as the driver's
    raw errors, which the documented-errors invariant rejects: exit status 1."""
    scenario = tmp_path / "no-failover.yaml"
    scenario.write_text(
        "name: no-failover\n"
        "cluster: {flavour: aurora-pg, readers: 1, timeline: {detection_delay: 0.3, "
        "rejoin_delay: 0.5}}\n"
        "workload: {threads: 2, rate: 50, plugins: ''}\n"
        "duration: 5\n"
        "faults: [{at: 1.5, action: failover}]\n")
    code = main(["run", str(scenario), "-q", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "INVARIANT_VIOLATED" in out and "[FAIL] documented_errors" in out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["verdict"] == "invariant_violated"
    # ... and nothing was lost: the simulator is durable, only the error types are wrong.
    assert {c["name"]: c["ok"] for c in data["invariants"]}["no_lost_writes"]
