"""Reports of a chaos run: JSON for machines, a self-contained HTML page with the timeline as
inline SVG, a PNG of the same plot (matplotlib), a one-screen text summary, and the live
terminal progress line.

The timeline plots, per time bucket, successful writes and reads (stacked, green and blue)
and failed requests (red, below the axis); fault windows are shaded and cluster events
(``promoted``, ``dns_updated``, ``network_fault``...) are vertical lines.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

__all__ = ["TerminalProgress", "markdown_table", "render_html", "render_png", "summary",
           "write_reports"]

#: Event names drawn on the timeline (the others are listed in the table only).
PLOTTED_EVENTS = ("failover_started", "writer_stopped", "promoted", "topology_updated",
                  "dns_updated", "rejoined_as_reader", "network_fault", "instance_killed",
                  "reboot_started", "reboot_finished", "replica_lag_set", "dns_staleness_set")
_EVENT_COLOURS = {"promoted": "#7b1fa2", "writer_stopped": "#d32f2f",
                  "network_fault": "#f57c00", "dns_updated": "#0288d1",
                  "rejoined_as_reader": "#388e3c"}


def _fmt(value: Any, unit: str = "s") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f} {unit}".strip()
    return f"{value} {unit}".strip()


def summary(data: Mapping[str, Any]) -> str:
    """A few lines for the terminal."""
    m = data["metrics"]
    rec = ", ".join("none" if r["recovery"] is None else f"{r['recovery']:.3f} s"
                    for r in m["recoveries"]) or "no promotion"
    errors = ", ".join(f"{k} x{v}" for k, v in m["errors_by_type"].items()) or "none"
    lines = [
        f"scenario {data['scenario']['name']} on {data['flavour']}: {data['verdict'].upper()}",
        f"  {m['writes_acknowledged']} writes acknowledged, {m['reads_ok']} reads, "
        f"{m['failed_requests']} failed requests",
        f"  downtime (longest write gap): {m['downtime']:.3f} s; recovery after promoted: {rec}",
        f"  errors: {errors}",
    ]
    for check in [*data["invariants"], *data["hypothesis"]]:
        lines.append(f"  [{'ok' if check['ok'] else 'FAIL'}] {check['name']}: {check['detail']}")
    return "\n".join(lines)


def markdown_table(reports: list[Mapping[str, Any]]) -> str:
    """One row per report: scenario, flavour, downtime, recovery, errors, verdicts."""
    lines = ["| scenario | flavour | downtime (s) | recovery after promoted (s) | "
             "errors seen by the application | invariants | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for data in reports:
        m = data["metrics"]
        rec = ", ".join("not recovered" if r["recovery"] is None else f"{r['recovery']:.3f}"
                        for r in m["recoveries"]) or "-"
        errors = ", ".join(f"{k} x{v}" for k, v in m["errors_by_kind"].items()) or "none"
        failed = [c["name"] for c in data["invariants"] if not c["ok"]]
        invariants = "all hold" if not failed else "FAIL: " + ", ".join(failed)
        lines.append(f"| {data['scenario']['name']} | {data['flavour']} | {m['downtime']:.3f} | "
                     f"{rec} | {errors} | {invariants} | {data['verdict']} |")
    return "\n".join(lines)


# -- plot geometry shared by SVG and PNG -------------------------------------------------------


def _series(data: Mapping[str, Any]) -> tuple[float, list[int], list[int], list[int]]:
    tl = data["timeline"]
    return float(tl["bucket"]), list(tl["ok_writes"]), list(tl["ok_reads"]), list(tl["failed"])


def _plotted_events(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [e for e in data["events"] if e["name"] in PLOTTED_EVENTS
            and 0 <= e["t"] <= data["duration"] + 1]


def _event_label(event: Mapping[str, Any]) -> str:
    detail = event.get("detail") or {}
    extra = f" {detail.get('action')}" if event["name"] == "network_fault" else ""
    return f"{event['name']}{extra} {event.get('instance') or ''}".strip()


def render_svg(data: Mapping[str, Any]) -> str:
    size, ok_w, ok_r, failed = _series(data)
    width, height, left, right, top = 960, 340, 50, 20, 20
    axis_y = 230
    plot_w = width - left - right
    total = max(len(ok_w) * size, float(data["duration"]), 0.001)
    peak = max([a + b for a, b in zip(ok_w, ok_r, strict=False)] + [1])
    peak_f = max([*failed, 1])

    def x(t: float) -> float:
        return left + plot_w * max(0.0, min(t, total)) / total

    up = (axis_y - top) / peak
    down = 60 / peak_f
    bar = max(plot_w * size / total - 0.5, 0.5)
    parts = [f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="successful and failed requests over time">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>']
    for w in data["windows"]:
        x0, x1 = x(w["start"]), x(max(w["end"], w["start"] + size))
        parts.append(f'<rect class="fault" x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" '
                     f'height="{axis_y + 60 - top}" fill="#ffcc80" fill-opacity="0.35">'
                     f'<title>{html.escape(w["label"])} ({w["start"]:.2f}-{w["end"]:.2f} s)'
                     f'</title></rect>')
    for i, (w_ok, r_ok, bad) in enumerate(zip(ok_w, ok_r, failed, strict=False)):
        bx = x(i * size)
        if w_ok:
            parts.append(f'<rect class="ok-write" x="{bx:.1f}" y="{axis_y - w_ok * up:.1f}" '
                         f'width="{bar:.1f}" height="{w_ok * up:.1f}" fill="#43a047"/>')
        if r_ok:
            parts.append(f'<rect class="ok-read" x="{bx:.1f}" '
                         f'y="{axis_y - (w_ok + r_ok) * up:.1f}" width="{bar:.1f}" '
                         f'height="{r_ok * up:.1f}" fill="#64b5f6"/>')
        if bad:
            parts.append(f'<rect class="failed" x="{bx:.1f}" y="{axis_y}" width="{bar:.1f}" '
                         f'height="{bad * down:.1f}" fill="#e53935"/>')
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{width - right}" y2="{axis_y}" '
                 'stroke="#333"/>')
    step = 1 if total <= 20 else 5 if total <= 100 else 30
    t = 0
    while t <= total:
        parts.append(f'<text x="{x(t):.1f}" y="{axis_y + 78}" font-size="10" '
                     f'text-anchor="middle">{t}s</text>')
        t += step
    for n, event in enumerate(_plotted_events(data)):
        ex = x(float(event["t"]))
        colour = _EVENT_COLOURS.get(event["name"], "#757575")
        label = html.escape(_event_label(event))
        parts.append(f'<line class="event" x1="{ex:.1f}" y1="{top}" x2="{ex:.1f}" '
                     f'y2="{axis_y + 60}" stroke="{colour}" stroke-dasharray="3,2">'
                     f'<title>{event["t"]:.3f} s {label}</title></line>')
        if event["name"] in ("promoted", "writer_stopped", "dns_updated", "reboot_started"):
            parts.append(f'<text x="{ex + 2:.1f}" y="{top + 10 + (n % 5) * 11}" '
                         f'font-size="9" fill="{colour}">{label}</text>')
    parts.append(f'<text x="4" y="{top + 8}" font-size="10">{peak}/bucket</text>'
                 f'<text x="4" y="{axis_y + 58}" font-size="10" fill="#e53935">'
                 f'{peak_f} failed</text>')
    parts.append(f'<text x="{left}" y="{height - 4}" font-size="10">bucket {size:g} s · '
                 'green: writes ok · blue: reads ok · red: failed · orange: fault windows · '
                 'dashed: cluster events</text></svg>')
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1000px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:left}th{background:#f4f4f4}.ok{color:#2e7d32;font-weight:600}
.fail{color:#c62828;font-weight:600}.verdict{font-size:20px}code{font-size:12px}"""

_SCRIPT = """(function(){var svg=document.getElementById('timeline');
var n=svg?svg.querySelectorAll('rect.ok-write,rect.ok-read,rect.failed').length:0;
document.getElementById('bars').textContent=String(n);
document.body.setAttribute('data-rendered','1');})();"""


def _rows(items: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in items)


def render_html(data: Mapping[str, Any]) -> str:
    """A self-contained page (no external resources)."""
    m = data["metrics"]
    esc = html.escape
    verdict = data["verdict"]
    checks = "".join(
        f"<tr><td>{esc(c['name'])}</td><td class=\"{'ok' if c['ok'] else 'fail'}\">"
        f"{'ok' if c['ok'] else 'FAIL'}</td><td>{esc(c['detail'])}</td></tr>"
        for c in [*data["invariants"], *data["hypothesis"]])
    recoveries = "; ".join(
        f"{esc(r['instance'])} promoted at {r['promoted_at']:.2f} s: "
        + ("not recovered" if r["recovery"] is None else f"{r['recovery']:.3f} s")
        for r in m["recoveries"]) or "no promotion"
    latency = "".join(
        f"<tr><td>{phase}</td><td>{v['count']}</td><td>{_fmt(v['p50_ms'], 'ms')}</td>"
        f"<td>{_fmt(v['p99_ms'], 'ms')}</td></tr>" for phase, v in m["latency"].items())
    samples = m.get("error_samples", {})
    errors = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td><td><code>{esc(samples.get(k, ''))}"
                     f"</code></td></tr>" for k, v in m["errors_by_kind"].items()) \
        or "<tr><td>none</td><td></td><td></td></tr>"
    events = "".join(
        f"<tr><td>{e['t']:.3f}</td><td>{esc(e['name'])}</td><td>{esc(str(e.get('instance')))}"
        f"</td><td><code>{esc(json.dumps(e.get('detail') or {}))}</code></td></tr>"
        for e in data["events"])
    steps = "".join(f"<li>{esc(w['label'])}: {w['start']:.2f}-{w['end']:.2f} s</li>"
                    for w in data["windows"]) or "<li>none</li>"
    overview = _rows([
        ("scenario", esc(data["scenario"]["name"])),
        ("description", esc(data["scenario"].get("description", ""))),
        ("cluster", esc(data["cluster"])),
        ("plugins", esc(str(data.get("plugins", "")))),
        ("fault backend", esc(str(data.get("fault_backend")))),
        ("started", esc(str(data.get("started_at", "")))),
        ("duration", _fmt(data["duration"])),
        ("writes acknowledged", str(m["writes_acknowledged"])),
        ("writes unresolved (present)", f"{m['writes_unresolved']} "
                                        f"({m['unresolved_present']})"),
        ("reads ok", str(m["reads_ok"])),
        ("failed requests", str(m["failed_requests"])),
        ("downtime (longest write gap)", f"{_fmt(m['downtime'])} from {m['downtime_from']:.2f} s"),
        ("read downtime (longest read gap)", _fmt(m.get("read_downtime"))),
        ("recovery after promoted", esc(recoveries)),
        ("bars drawn", '<span id="bars">?</span>'),
    ])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>chaos: {esc(data['scenario']['name'])} on {esc(data['flavour'])}</title>
<style>{_CSS}</style></head>
<body>
<h1>{esc(data['scenario']['name'])} <small>on {esc(data['flavour'])}</small></h1>
<p class="verdict">verdict: <span id="verdict" class="{'ok' if verdict == 'pass' else 'fail'}">
{esc(verdict)}</span></p>
<h2>Timeline</h2>
{render_svg(data)}
<h2>Faults</h2><ul>{steps}</ul>
<h2>Invariants and steady state</h2>
<table><tr><th>check</th><th>result</th><th>detail</th></tr>{checks}</table>
<h2>Overview</h2><table>{overview}</table>
<h2>Latency of successful requests</h2>
<table><tr><th>phase</th><th>requests</th><th>p50</th><th>p99</th></tr>{latency}</table>
<h2>Errors by request kind and type</h2>
<table><tr><th>kind:type</th><th>count</th><th>first message</th></tr>{errors}</table>
<h2>Cluster and fault events</h2>
<table><tr><th>t (s)</th><th>event</th><th>instance</th><th>detail</th></tr>{events}</table>
<script>{_SCRIPT}</script>
</body></html>
"""


def render_png(data: Mapping[str, Any], path: Path) -> None:
    """The timeline plot as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    size, ok_w, ok_r, failed = _series(data)
    xs = [i * size for i in range(len(ok_w))]
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=100)
    try:
        for w in data["windows"]:
            ax.axvspan(w["start"], max(w["end"], w["start"] + size), color="#ffcc80", alpha=0.35)
        ax.bar(xs, ok_w, width=size, align="edge", color="#43a047", label="writes ok")
        ax.bar(xs, ok_r, width=size, align="edge", bottom=ok_w, color="#64b5f6",
               label="reads ok")
        ax.bar(xs, [-f for f in failed], width=size, align="edge", color="#e53935",
               label="failed")
        for event in _plotted_events(data):
            colour = _EVENT_COLOURS.get(event["name"], "#757575")
            ax.axvline(float(event["t"]), color=colour, linestyle="--", linewidth=0.8)
            if event["name"] in ("promoted", "writer_stopped", "reboot_started"):
                ax.annotate(_event_label(event), (float(event["t"]), 1.0),
                            xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                            va="top", ha="right", color=colour)
        ax.axhline(0, color="#333", linewidth=0.8)
        ax.set_xlim(0, max(len(xs) * size, float(data["duration"])))
        ax.set_xlabel("seconds since the workload started")
        ax.set_ylabel(f"requests per {size:g} s")
        ax.set_title(f"{data['scenario']['name']} on {data['flavour']}: {data['verdict']}")
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def write_reports(data: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.html`` and ``timeline.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html",
             "png": out_dir / "timeline.png"}
    paths["json"].write_text(json.dumps(data, indent=1, sort_keys=True) + "\n",
                             encoding="utf-8")
    paths["html"].write_text(render_html(data), encoding="utf-8")
    render_png(data, paths["png"])
    return paths


class TerminalProgress:
    """The live line while a scenario runs: a bar, counts and the latest fault step. On a
    terminal it redraws one line; otherwise it prints a line every ``every`` seconds."""

    def __init__(self, stream: TextIO | None = None, every: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every
        self._last_printed = -every

    def __call__(self, elapsed: float, total: float, ok_w: int, ok_r: int, failed: int,
                 last: str) -> None:
        done = min(1.0, elapsed / total if total else 1.0)
        bar = "#" * int(done * 20)
        line = (f"[{bar:<20}] {elapsed:5.1f}/{total:g}s  writes {ok_w}  reads {ok_r}  "
                f"failed {failed}  {last}")
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if done >= 1.0 and last == "checking":
                self.stream.write("\n")
        elif elapsed - self._last_printed >= self.every or last == "checking":
            self.stream.write(line + "\n")
            self._last_printed = elapsed
        self.stream.flush()
