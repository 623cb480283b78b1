"""Verdicts and measurements from what the workload observed (pure: no I/O).

Invariants (DESIGN §12: the verdict comes from what the application observed, not from the
absence of exceptions):

- ``no_lost_writes``: every acknowledged write id is on the final writer;
- ``no_reader_writes``: the instance that executed each acknowledged write (recorded in its
  row by the server) was the writer at some moment between the write's first send and its
  acknowledgement;
- ``documented_errors``: every error the application saw is of a documented type
  (``docs/errors.md``) or listed in the scenario's ``allowed_errors``.

Measurements: downtime (longest gap between successful writes), time to recover after each
``promoted`` event (to the first acknowledged write executed by the new writer), errors by
type, latency p50/p99 before, during and after the faults, and a timeline of successes and
failures in buckets for the plot.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chaos.control import WriterSpan
from chaos.workload import Request, attempt_windows

__all__ = ["Check", "Window", "analyse", "percentile"]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class Window:
    """A fault's effect on the timeline (relative seconds), for phases and the plot."""

    label: str
    start: float
    end: float


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by nearest rank; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _latency(requests: Iterable[Request]) -> dict[str, Any]:
    durations = [(r.end - r.start) * 1000 for r in requests if r.error is None
                 and r.kind != "connect"]
    p50, p99 = percentile(durations, 0.5), percentile(durations, 0.99)
    return {"count": len(durations), "p50_ms": None if p50 is None else round(p50, 3),
            "p99_ms": None if p99 is None else round(p99, 3)}


def _ratio(requests: Sequence[Request]) -> tuple[float | None, int]:
    counted = [r for r in requests if r.kind != "connect"]
    if not counted:
        return None, 0
    return sum(1 for r in counted if r.error is None) / len(counted), len(counted)


def analyse(*, requests: Sequence[Request], acked: Mapping[int, float],
            unresolved: Iterable[int], rows: Mapping[int, str], spans: Sequence[WriterSpan],
            events: Sequence[Mapping[str, Any]], windows: Sequence[Window], t0: float,
            t_end: float, invariants: Sequence[str], allowed_errors: Sequence[str],
            success_ratio: float, window: float, max_downtime: float | None,
            max_recovery: float | None, bucket: float | None = None) -> dict[str, Any]:
    """Everything the report shows, with times relative to ``t0`` (monotonic start of the
    workload)."""
    def rel(mono: float) -> float:
        return round(mono - t0, 4)

    checks: list[Check] = []
    unresolved_set = set(unresolved)
    # -- invariants -------------------------------------------------------------------------
    lost = sorted(i for i in acked if i not in rows)
    if "no_lost_writes" in invariants:
        checks.append(Check("no_lost_writes", not lost,
                            f"{len(acked)} acknowledged writes, {len(lost)} missing on the "
                            f"final writer" + (f": ids {lost[:10]}" if lost else "")))
    first_send = attempt_windows(list(requests))
    bad: list[str] = []
    for write_id, ack in acked.items():
        inst = rows.get(write_id)
        if inst is None:
            continue
        sent = first_send.get(write_id, ack)
        if not any(s.instance == inst and s.start <= ack and s.end >= sent for s in spans):
            bad.append(f"{write_id}@{inst}")
    if "no_reader_writes" in invariants:
        checks.append(Check("no_reader_writes", not bad,
                            f"{len(bad)} acknowledged writes executed by an instance that was "
                            "not the writer" + (f": {bad[:10]}" if bad else "")))
    undocumented = Counter(r.error for r in requests
                           if r.error is not None and not r.documented
                           and r.error not in allowed_errors)
    if "documented_errors" in invariants:
        checks.append(Check("documented_errors", not undocumented,
                            "every error the application saw is documented" if not undocumented
                            else "undocumented errors: " + ", ".join(
                                f"{k} x{v}" for k, v in sorted(undocumented.items()))))
    # -- measurements -----------------------------------------------------------------------
    writes_ok = sorted(r.end for r in requests if r.kind == "write" and r.error is None)
    points = [t0, *writes_ok, t_end]
    gaps = [(b - a, a) for a, b in itertools.pairwise(points)]
    downtime, downtime_at = max(gaps) if gaps else (t_end - t0, t0)
    reads_ok = sorted(r.end for r in requests if r.kind == "read" and r.error is None)
    read_points = [t0, *reads_ok, t_end]
    read_downtime = max((b - a for a, b in itertools.pairwise(read_points)),
                        default=0.0) if reads_ok else None
    recoveries: list[dict[str, Any]] = []
    executed_on = {i: rows[i] for i in acked if i in rows}
    acks_sorted = sorted((ack, i) for i, ack in acked.items())
    for event in events:
        if event["name"] != "promoted":
            continue
        mono, inst = float(event["mono"]), str(event["instance"])
        first = next((ack for ack, i in acks_sorted if ack >= mono
                      and executed_on.get(i) == inst), None)
        recoveries.append({"instance": inst, "promoted_at": rel(mono),
                           "recovery": None if first is None else round(first - mono, 4)})
    errors = Counter(r.error for r in requests if r.error is not None)
    errors_by_kind = Counter(f"{r.kind}:{r.error}" for r in requests if r.error is not None)
    samples: dict[str, str] = {}
    for r in requests:
        if r.error is not None and r.message:
            samples.setdefault(f"{r.kind}:{r.error}", r.message)
    fault_start = min((w.start for w in windows), default=None)
    fault_end = max((w.end for w in windows), default=None)
    before = [r for r in requests if fault_start is None or r.start - t0 < fault_start]
    during = [r for r in requests if fault_start is not None and fault_end is not None
              and fault_start <= r.start - t0 <= fault_end]
    after = [r for r in requests if fault_end is not None and r.start - t0 > fault_end]
    # -- steady-state hypothesis ------------------------------------------------------------
    hypothesis: list[Check] = []
    ratio_before, n_before = _ratio(before)
    hypothesis.append(Check(
        "steady_before", ratio_before is not None and ratio_before >= success_ratio,
        f"{'n/a' if ratio_before is None else f'{ratio_before:.3f}'} of {n_before} requests "
        f"succeeded before the first fault (needs >= {success_ratio:g})"))
    tail = [r for r in requests if r.start >= t_end - window]
    ratio_tail, n_tail = _ratio(tail)
    tail_writes = sum(1 for r in tail if r.kind == "write" and r.error is None)
    hypothesis.append(Check(
        "steady_after", ratio_tail is not None and ratio_tail >= success_ratio
        and tail_writes > 0,
        f"{'n/a' if ratio_tail is None else f'{ratio_tail:.3f}'} of {n_tail} requests "
        f"({tail_writes} writes) succeeded in the last {window:g} s (needs >= "
        f"{success_ratio:g} and a write)"))
    if max_downtime is not None:
        hypothesis.append(Check("max_downtime", downtime <= max_downtime,
                                f"longest write gap {downtime:.3f} s (bound {max_downtime:g} s)"))
    if max_recovery is not None:
        worst = [r["recovery"] for r in recoveries]
        ok = all(r is not None and r <= max_recovery for r in worst)
        shown = ", ".join("none" if r is None else f"{r:.3f} s" for r in worst) or "no promotion"
        hypothesis.append(Check("max_recovery", ok,
                                f"promoted -> first write on the new writer: {shown} "
                                f"(bound {max_recovery:g} s)"))
    # -- timeline buckets -------------------------------------------------------------------
    span = max(t_end - t0, 0.001)
    size = bucket or max(0.05, round(span / 150, 2))
    count = math.ceil(span / size)
    ok_w, ok_r, failed = [0] * count, [0] * count, [0] * count
    for r in requests:
        index = min(count - 1, max(0, int((r.end - t0) / size)))
        if r.error is not None:
            failed[index] += 1
        elif r.kind == "write":
            ok_w[index] += 1
        elif r.kind == "read":
            ok_r[index] += 1
    failures = [{"t": rel(r.end), "kind": r.kind, "error": r.error, "thread": r.thread}
                for r in requests if r.error is not None][:500]
    return {
        "invariants": [c.to_json() for c in checks],
        "hypothesis": [c.to_json() for c in hypothesis],
        "metrics": {
            "requests": sum(1 for r in requests if r.kind != "connect"),
            "writes_acknowledged": len(acked),
            "writes_unresolved": len(unresolved_set),
            "unresolved_present": sum(1 for i in unresolved_set if i in rows),
            "reads_ok": sum(1 for r in requests if r.kind == "read" and r.error is None),
            # Successful reads whose executing instance is known (split reads name it) and
            # was the writer then: read/write splitting left them on the writer.
            "reads_on_writer": sum(
                1 for r in requests
                if r.kind == "read" and r.error is None and r.instance is not None and any(
                    s.instance == r.instance and s.start <= r.end and s.end >= r.start
                    for s in spans)),
            "failed_requests": sum(errors.values()),
            "downtime": round(downtime, 4),
            "downtime_from": rel(downtime_at),
            "read_downtime": None if read_downtime is None else round(read_downtime, 4),
            "recoveries": recoveries,
            "errors_by_type": dict(sorted(errors.items())),
            "errors_by_kind": dict(sorted(errors_by_kind.items())),
            "error_samples": dict(sorted(samples.items())),
            "latency": {"before": _latency(before), "during": _latency(during),
                        "after": _latency(after)},
            "fault_window": None if fault_start is None else [fault_start, fault_end],
        },
        "timeline": {"bucket": size, "ok_writes": ok_w, "ok_reads": ok_r, "failed": failed,
                     "failures": failures},
    }
