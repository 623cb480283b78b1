"""dashboards/: the compose stack and its provisioning files are consistent, every dashboard
expression parses (promtool) and uses only documented metrics. Docker is not available here,
so the stack itself is not started; tests/test_telemetry_failover.py runs every expression
against a real Prometheus."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from resilient_db.telemetry import names as n

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "dashboards"
BOARDS = STACK / "grafana" / "dashboards"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def exprs() -> list[tuple[str, str]]:
    found = []
    for path in sorted(BOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']}", target["expr"]))
    return found


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: apt-get install prometheus "
                    "(scripts/_bootstrap.sh installs it)")
    return binary


def test_compose_file_and_every_mounted_path() -> None:
    compose = load_yaml(STACK / "docker-compose.yml")
    services = compose["services"]
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= set(services)
    mounts = 0
    for name, service in services.items():
        assert service.get("image"), f"{name} has no image"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./"), volume
            assert (STACK / source).exists(), f"{name} mounts missing {source}"
            mounts += 1
        for dependency in service.get("depends_on", []):
            assert dependency in services
    assert mounts >= 5


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    compose = load_yaml(STACK / "docker-compose.yml")
    grafana_mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = load_yaml(STACK / "grafana/provisioning/dashboards/dashboards.yaml")
    path = provider["providers"][0]["options"]["path"]
    assert grafana_mounts["./grafana/dashboards"] == path
    datasources = load_yaml(STACK / "grafana/provisioning/datasources/datasources.yaml")
    uids = {d["uid"]: d for d in datasources["datasources"]}
    assert uids["prometheus"]["type"] == "prometheus"
    assert uids["jaeger"]["type"] == "jaeger"
    for path_ in BOARDS.glob("*.json"):
        board = json.loads(path_.read_text())
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] in uids


def test_collector_pipelines_are_wired() -> None:
    config = load_yaml(STACK / "otel-collector/config.yaml")
    for pipeline in config["service"]["pipelines"].values():
        for receiver in pipeline["receivers"]:
            assert receiver in config["receivers"]
        for exporter in pipeline["exporters"]:
            assert exporter in config["exporters"]
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")


def test_prometheus_config_is_valid() -> None:
    result = subprocess.run([promtool(), "check", "config", "--syntax-only",
                             str(STACK / "prometheus/prometheus.yml")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_expression_parses(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:expr{i}",
         "expr": expr.replace("$__rate_interval", "1m").replace("$__range", "5m")}
        for i, (_, expr) in enumerate(exprs())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool(), "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check does fail on a bad expression.
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (le (oops"}]}]}))
    bad = subprocess.run([promtool(), "check", "rules", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0


_GROUPING = re.compile(r"\b(?:by|without)\s*\([^)]*\)|\{[^}]*\}")
_METRIC = re.compile(r"\b((?:db_client|resilient_db)_[a-z_]+)\b")


def test_expressions_use_only_documented_metrics() -> None:
    documented = {series for metric in n.METRICS for series in n.prometheus_names(metric)}
    doc = (ROOT / "docs" / "telemetry.md").read_text()
    used: set[str] = set()
    for where, expr in exprs():
        found = set(_METRIC.findall(_GROUPING.sub(" ", expr)))
        assert found, f"{where}: no resilient_db metric in {expr}"
        assert found <= documented, f"{where}: undocumented {found - documented}"
        used |= found
    for metric in n.METRICS:
        assert f"`{metric}`" in doc
    # Each topic of the issue has a panel.
    titles = " ".join(where.lower() for where, _ in exprs())
    for topic in ("failover", "host state", "detection", "connections", "latency"):
        assert topic in titles
    assert {"resilient_db_failovers_total", "resilient_db_host_state",
            "db_client_connection_count"} <= used


def test_dashboards_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("dashboards_generate", STACK / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render()
    assert set(rendered) == {p.name for p in BOARDS.glob("*.json")}
    for name, text in rendered.items():
        assert (BOARDS / name).read_text() == text, f"{name}: run python dashboards/generate.py"
    uids = [json.loads(text)["uid"] for text in rendered.values()]
    assert len(set(uids)) == len(uids)


def test_readme_documents_the_stack() -> None:
    readme = (STACK / "README.md").read_text()
    assert "Docker" in readme and "docker compose" in readme
    for board in BOARDS.glob("*.json"):
        assert board.name in readme
