"""Writes the Grafana dashboards of ``dashboards/grafana/dashboards/`` (run it after changing a
panel: ``python dashboards/generate.py``; ``tests/test_telemetry_dashboards.py`` checks the
JSON files are what this script writes).

Every expression uses only metrics listed in ``docs/telemetry.md``. Panels for events that
may never happen (monitor restarts, watchdog aborts, reader selections) end in
``or vector(0)`` so that they show 0 rather than "no data".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "grafana" / "dashboards"
PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}

Panel = tuple[str, str, list[tuple[str, str]], str]  # title, type, [(expr, legend)], unit


def _panel(index: int, panel: Panel) -> dict[str, Any]:
    title, kind, targets, unit = panel
    width = 12
    return {
        "id": index + 1,
        "title": title,
        "type": kind,
        "datasource": PROMETHEUS,
        "gridPos": {"h": 8, "w": width, "x": (index % 2) * width, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"showLegend": True, "displayMode": "list",
                               "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": PROMETHEUS, "expr": expr,
             "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["resilient_db"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "5s",
        "time": {"from": "now-15m", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": [_panel(i, p) for i, p in enumerate(panels)],
    }


DASHBOARDS = {
    "resilient_db-failover.json": dashboard(
        "resilient-db-failover", "resilient_db: failover",
        "Failover timeline, outcomes and durations, topology changes.",
        [
            ("Failovers (cumulative, by outcome): each step is a failover", "timeseries",
             [("sum by (resilient_db_failover_mode, resilient_db_failover_outcome) "
               "(resilient_db_failovers_total)",
               "{{resilient_db_failover_mode}} {{resilient_db_failover_outcome}}")], "short"),
            ("Failover duration (mean by outcome)", "timeseries",
             [("sum by (resilient_db_failover_outcome) "
               "(resilient_db_failover_duration_seconds_sum) / "
               "sum by (resilient_db_failover_outcome) "
               "(resilient_db_failover_duration_seconds_count)",
               "{{resilient_db_failover_outcome}}")], "s"),
            ("Failover duration p95", "stat",
             [("histogram_quantile(0.95, sum by (le) "
               "(resilient_db_failover_duration_seconds_bucket))", "p95")], "s"),
            ("Topology changes (cumulative)", "timeseries",
             [("sum by (resilient_db_topology_writer_changed) "
               "(resilient_db_topology_changes_total)",
               "writer changed: {{resilient_db_topology_writer_changed}}")], "short"),
            ("Topology refreshes per second", "timeseries",
             [("sum by (resilient_db_topology_source) "
               "(rate(resilient_db_topology_refreshes_total[$__rate_interval]))",
               "{{resilient_db_topology_source}}")], "ops"),
            ("Decisions (cumulative, by kind)", "timeseries",
             [("sum by (resilient_db_decision_kind) (resilient_db_decisions_total)",
               "{{resilient_db_decision_kind}}")], "short"),
        ]),
    "resilient_db-hosts.json": dashboard(
        "resilient-db-hosts", "resilient_db: host health",
        "Host state as each detector last saw it, detection times, monitor restarts.",
        [
            ("Host state (1 up, 0 down)", "state-timeline",
             [("resilient_db_host_state", "{{server_address}}")], "short"),
            ("Detection time (mean by detector)", "timeseries",
             [("sum by (resilient_db_detector) (resilient_db_detection_duration_seconds_sum) "
               "/ sum by (resilient_db_detector) "
               "(resilient_db_detection_duration_seconds_count)",
               "{{resilient_db_detector}}")], "s"),
            ("Detection time p95", "stat",
             [("histogram_quantile(0.95, sum by (le, resilient_db_detector) "
               "(resilient_db_detection_duration_seconds_bucket))",
               "{{resilient_db_detector}}")], "s"),
            ("Monitor restarts and watchdog aborts (cumulative)", "timeseries",
             [("sum(resilient_db_monitor_restarts_total) or vector(0)", "monitor restarts"),
              ("sum(resilient_db_watchdog_aborts_total) or vector(0)", "watchdog aborts")],
             "short"),
        ]),
    "resilient_db-connections.json": dashboard(
        "resilient-db-connections", "resilient_db: connections and latency",
        "Open connections, connect time, statement latency and throughput.",
        [
            ("Open connections", "timeseries",
             [("sum by (db_client_connection_pool_name, db_client_connection_state) "
               "(db_client_connection_count)",
               "{{db_client_connection_pool_name}} {{db_client_connection_state}}")], "short"),
            ("Connect time (mean by server)", "timeseries",
             [("sum by (server_address) (db_client_connection_create_time_seconds_sum) / "
               "sum by (server_address) (db_client_connection_create_time_seconds_count)",
               "{{server_address}}")], "s"),
            ("Statement latency (p50, p99)", "timeseries",
             [("histogram_quantile(0.5, sum by (le) "
               "(rate(db_client_operation_duration_seconds_bucket[$__rate_interval])))", "p50"),
              ("histogram_quantile(0.99, sum by (le) "
               "(rate(db_client_operation_duration_seconds_bucket[$__rate_interval])))",
               "p99")], "s"),
            ("Statements per second (by operation and error)", "timeseries",
             [("sum by (db_operation_name, error_type) "
               "(rate(db_client_operation_duration_seconds_count[$__rate_interval]))",
               "{{db_operation_name}} {{error_type}}")], "ops"),
            ("Reader selections (cumulative, by strategy)", "timeseries",
             [("sum by (resilient_db_selection_strategy) "
               "(resilient_db_reader_selections_total) or vector(0)",
               "{{resilient_db_selection_strategy}}")], "short"),
        ]),
}


def render() -> dict[str, str]:
    return {name: json.dumps(board, indent=2) + "\n" for name, board in DASHBOARDS.items()}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)


if __name__ == "__main__":
    main()
