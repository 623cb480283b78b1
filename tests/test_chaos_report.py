"""Chaos reports: JSON, the self-contained HTML rendered by headless Chromium (no JavaScript
errors, the timeline present and drawn), the PNG, the terminal progress, and
``python -m chaos report``. The report data comes from the analysis of a synthetic run, so no
server is needed."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import chaos
from chaos.__main__ import main
from chaos.analysis import Window, analyse
from chaos.control import WriterSpan
from chaos.report import TerminalProgress, render_html, summary, write_reports
from chaos.scenario import load
from chaos.workload import Request

pytestmark = pytest.mark.unit

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def report_data() -> dict[str, Any]:
    requests, acked, rows = [], {}, {}
    for n in range(1, 200):
        t = n * 0.05
        if 4.0 < t < 5.0:
            requests.append(Request(1, "write", t - 0.01, t, "FailoverSuccessError", True, (n,),
                                    message="resilient_db.FailoverSuccessError: replaced"))
            continue
        requests.append(Request(1, "write", t - 0.01, t, None, True, (n,)))
        requests.append(Request(2, "read", t - 0.01, t, None, True))
        acked[n] = t
        rows[n] = "instance-1" if t < 5.0 else "instance-3"
    events = [{"name": "failover_started", "instance": "instance-1", "mono": 4.0, "wall": 0.0,
               "detail": {"mode": "crash"}},
              {"name": "writer_stopped", "instance": "instance-1", "mono": 4.0, "wall": 0.0,
               "detail": {}},
              {"name": "promoted", "instance": "instance-3", "mono": 4.9, "wall": 0.0,
               "detail": {"previous": "instance-1"}},
              {"name": "network_fault", "instance": "instance-2", "mono": 6.0, "wall": 0.0,
               "detail": {"action": "applied", "toxic": "timeout"}}]
    result = analyse(
        requests=requests, acked=acked, unresolved=set(), rows=rows,
        spans=[WriterSpan("instance-1", -math.inf, 4.9), WriterSpan("instance-3", 4.0, math.inf)],
        events=events, windows=[Window("failover (crash)", 4.0, 4.9)], t0=0.0, t_end=10.0,
        invariants=("no_lost_writes", "no_reader_writes", "documented_errors"),
        allowed_errors=(), success_ratio=0.9, window=2.0, max_downtime=None, max_recovery=5.0)
    return {"format": "resilient_db.chaos/1", "scenario": load("writer-crash").to_json(),
            "engine": "pg", "flavour": "aurora-pg", "cluster": "simulated aurora-pg (test)",
            "table": "chaos_x", "duration": 10.0, "verdict": "pass",
            "windows": [{"label": "failover (crash)", "start": 4.0, "end": 4.9}],
            "events": [{**e, "t": e["mono"]} for e in events], "writer_history": [],
            "fault_backend": "none", "started_at": "2026-01-01T00:00:00+00:00", **result}


def chromium(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM after scripts ran, and the console errors, of ``page`` in headless Chromium."""
    assert CHROMIUM is not None
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines()
               if ":CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    return proc.stdout, console


def test_summary_and_html_are_self_contained() -> None:
    data = report_data()
    text = summary(data)
    assert "writer-crash on aurora-pg: PASS" in text
    assert "recovery after promoted: 0.100 s" in text
    page = render_html(data)
    assert 'id="timeline"' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert "FailoverSuccessError" in page and "promoted" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/_bootstrap.sh "
                                             "installs it)")
def test_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    paths = write_reports(report_data(), tmp_path / "report")
    dom, console = chromium(paths["html"], tmp_path)
    assert console == []
    assert 'data-rendered="1"' in dom  # the page's script ran to the end
    assert '<svg id="timeline"' in dom
    bars = dom.split('<span id="bars">', 1)[1].split("<", 1)[0]
    assert int(bars) > 100  # the script counted the bars of the timeline
    assert dom.count('class="event"') >= 3


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_chromium_check_sees_javascript_errors(tmp_path: Path) -> None:
    """The console check above can fail: a page whose script throws is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>null.boom()</script></body></html>")
    _, console = chromium(page, tmp_path)
    assert any("Uncaught TypeError" in line for line in console)


def test_png_and_json(tmp_path: Path) -> None:
    paths = write_reports(report_data(), tmp_path)
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    again = json.loads(paths["json"].read_text())
    assert again["metrics"]["errors_by_type"] == {"FailoverSuccessError": 19}


def test_report_command_rerenders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_reports(report_data(), tmp_path / "a")
    os.remove(paths["html"])
    os.remove(paths["png"])
    assert main(["report", str(paths["json"])]) == 0
    assert paths["html"].exists() and paths["png"].exists()
    assert "report:" in capsys.readouterr().out
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    assert main(["report", str(bogus)]) == 2
    assert "not a chaos report" in capsys.readouterr().err


def test_table_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_reports(report_data(), tmp_path)
    assert main(["table", str(paths["json"]), str(paths["json"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("| scenario | flavour | downtime")
    assert out[2].startswith("| writer-crash | aurora-pg | 1.000 | 0.100 | "
                             "write:FailoverSuccessError x19 | all hold | pass |")


def test_list_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "writer-crash" in out and "dns-staleness" in out
    assert main(["list", "--names"]) == 0
    names = capsys.readouterr().out.split()
    shipped = sorted(p.stem for p in (Path(chaos.__file__).parent / "scenarios").glob("*.yaml"))
    assert names[0] == "default" and sorted(names) == shipped and len(shipped) >= 16
    assert {"secret-rotation", "bluegreen-switchover", "split-writer-failover"} <= set(names)


def test_run_command_rejects_bad_input(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no-such-scenario"]) == 2
    assert "unknown scenario" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nfaults:\n  - {at: 1, action: toxic, toxic: {type: slicer, "
                   "attributes: {average_size: 10}}, duration: 1}\n")
    assert main(["run", str(bad), "-q"]) == 2
    assert "slicer: the local backend" in capsys.readouterr().err
    assert main(["run", "writer-crash", "--rds-cluster", "my-aurora"]) == 2
    assert "--rds-cluster needs --flavour pg" in capsys.readouterr().err
    assert main(["run", "writer-crash", "--rds-cluster", "my-aurora", "--flavour", "pg"]) == 2
    assert "CHAOS_DB_PASSWORD" in capsys.readouterr().err

@pytest.mark.docker
@pytest.mark.parametrize("flavour", ["aurora-pg", "aurora-mysql"])
def test_default_scenario_passes_on_containers(flavour: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m chaos run default --simulator testcontainers``: the cluster's servers run
    in containers (simulator.testcontainers_backend) and the scenario's invariants hold."""
    from simulator.testcontainers_backend import docker_unavailable_reason

    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    code = main(["run", "default", "--simulator", "testcontainers", "--flavour", flavour,
                 "-q", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["verdict"] == "pass"
    assert all(check["ok"] for check in data["invariants"])


def test_terminal_progress_without_a_tty() -> None:
    stream = io.StringIO()
    progress = TerminalProgress(stream, every=1.0)
    progress(0.0, 8.0, 1, 0, 0, "")
    progress(0.5, 8.0, 10, 2, 0, "")  # within the interval: not printed
    progress(2.0, 8.0, 40, 9, 1, "2.0s failover (crash)")
    progress(8.0, 8.0, 160, 30, 1, "checking")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert "failover (crash)" in lines[1] and "[####################]" in lines[2]
