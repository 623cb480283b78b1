"""Per-query overhead of resilient_db against the raw driver, measured in the same run.

Method (CONVENTIONS.md): ``SELECT 1`` plus ``fetchone`` on one cursor per variant, straight to
the server (no proxy), raw and wrapped variants interleaved in one process: within a batch the
variants take turns query by query, so all of them see the same moments of a noisy machine.
Each batch is 2,000 queries per variant; the median over batches (at least 7) is reported in µs
per query (the cost of reading the clock is measured and subtracted). The ratio of a wrapped
variant is the median over batches of (wrapped time / raw time on the *same* driver connection),
which also cancels which server process or CPU a connection landed on.

    python benchmarks/overhead.py                 # starts throwaway PG and MariaDB servers
    python benchmarks/overhead.py --drivers pg --batches 15
    python benchmarks/overhead.py --pg-dsn "host=... dbname=... user=..."   # existing server

``--runs N`` (default 3) repeats the whole measurement N times, each run with fresh
connections (so fresh server backends): a run's ratios still depend on where its connections
landed, so the reported ratio is the median over runs of each run's median, and the spread
over runs is printed beside it.

Exit status 1 if any ratio exceeds ``--budget`` (default 1.05), or a variant's own budget,
so CI or a user can gate on it; the test suite does not run this (speed goals live in
benchmarks, not timed tests).

Telemetry variants: "telemetry disabled" (``enable_telemetry=false``) is also compared with
the same plugins without it (budget 1.02); each variant with telemetry on is measured in a
pass of its own, after the others, because decision telemetry is process-wide (SDK providers
with a discarding span exporter and an in-memory metric reader); query spans are reported
only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import resilient_db


@dataclass(frozen=True)
class Variant:
    """A wrapped variant: ``plugins``, more connect ``kwargs``; ``compare_to``: another
    variant its ratio is also reported over (ratio of the two ratios to their raw twins);
    ``budget``: its own limit (``None``: ``--budget``; ``math.inf``: reported only);
    ``telemetry``: measured in the second pass, with decision telemetry on."""

    plugins: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    compare_to: str | None = None
    budget: float | None = None
    telemetry: bool = False


FAILOVER = "resilient_db, failover"

#: Wrapped variants: name -> plugins (or a Variant). Later plugins add rows here.
VARIANTS: dict[str, str | Variant] = {
    "resilient_db, no plugins": "",
    "resilient_db, connect_time+execute_time+dev": "connect_time,execute_time,dev",
    FAILOVER: "failover",
    "resilient_db, failover, telemetry disabled": Variant(
        "failover", {"enable_telemetry": False}, compare_to=FAILOVER, budget=1.02),
    "resilient_db, failover + decision telemetry": Variant(
        "failover", {"enable_telemetry": True}, telemetry=True),
    "resilient_db, failover + telemetry query spans": Variant(
        "failover", {"enable_telemetry": True, "telemetry_query_spans": True},
        telemetry=True, budget=math.inf),
    "resilient_db, efm": "efm",
    "resilient_db, failover,efm": "failover,efm",
    "resilient_db, failover,efm + decision telemetry": Variant(
        "failover,efm", {"enable_telemetry": True}, telemetry=True),
    "resilient_db, no plugins, socket_timeout=30": Variant("", {"socket_timeout": 30}),
    # blue_green outside a switchover: one attribute read and an identity test per statement
    # (its monitor finds no metadata on a plain server and reads every 60 s).
    "resilient_db, bg,failover,efm": Variant(
        "bg,failover,efm", compare_to="resilient_db, failover,efm"),
}


def _variant(spec: str | Variant) -> Variant:
    return spec if isinstance(spec, Variant) else Variant(spec)


@dataclass
class Result:
    driver: str
    variant: str
    us_per_query: float
    ratio: float
    compared_to: str | None = None
    ratio_to_compared: float | None = None
    budget: float | None = None
    run_ratios: list[float] = field(default_factory=list)


def combine_runs(runs: list[list[Result]]) -> list[Result]:
    """One result per (driver, variant): the median over runs of each run's medians, with the
    runs' own ratios kept in ``run_ratios`` (their spread is the method's noise)."""
    combined: list[Result] = []
    for first, *others in zip(*runs, strict=True):
        group = [first, *others]
        if any((r.driver, r.variant) != (first.driver, first.variant) for r in group):
            raise RuntimeError("runs measured different variants")
        compared = [r.ratio_to_compared for r in group if r.ratio_to_compared is not None]
        combined.append(Result(
            first.driver, first.variant,
            statistics.median(r.us_per_query for r in group),
            statistics.median(r.ratio for r in group),
            first.compared_to,
            statistics.median(compared) if compared else None,
            first.budget,
            [r.ratio for r in group]))
    return combined


def _timer_cost(samples: int = 20000) -> float:
    """Seconds one perf_counter() pair costs, subtracted from every timed query."""
    total = 0.0
    for _ in range(samples):
        start = time.perf_counter()
        total += time.perf_counter() - start
    return total / samples


def _round(cursors: dict[str, Any], batch_size: int, timer: float) -> dict[str, float]:
    """One batch of ``batch_size`` queries per cursor, the cursors interleaved query by query
    (rotating which goes first), so every variant sees the same moments of the machine.
    Returns µs per query for each cursor."""
    keys = list(cursors)
    random.shuffle(keys)
    steps = [(k, cursors[k].execute, cursors[k].fetchone) for k in keys]
    totals = dict.fromkeys(keys, 0.0)
    n = len(steps)
    perf = time.perf_counter
    for i in range(batch_size):
        for j in range(n):
            key, execute, fetchone = steps[(i + j) % n]
            start = perf()
            execute("SELECT 1")
            fetchone()
            totals[key] += perf() - start
    return {k: (t / batch_size - timer) * 1e6 for k, t in totals.items()}


def measure(
    name: str,
    raw_connect: Callable[[], Any],
    wrapped_connect: Callable[[str, dict[str, Any]], Any],
    batches: int,
    batch_size: int,
    variants: dict[str, Variant],
    extra: dict[str, Any] | None = None,
) -> list[Result]:
    """Each wrapped variant is compared with a raw cursor on *its own* driver connection (the
    same socket and server backend), so the ratio measures resilient_db and not which server
    process or CPU a connection happened to land on. A separate raw connection gives the
    absolute baseline shown as "raw driver"."""
    baseline = raw_connect()
    wrapped = {name_: wrapped_connect(v.plugins, {**v.kwargs, **(extra or {})})
               for name_, v in variants.items()}
    cursors: dict[str, Any] = {"raw driver": baseline.cursor()}
    twins: dict[str, str] = {}
    for variant, conn in wrapped.items():
        cursors[variant] = conn.cursor()
        twins[variant] = f"{variant} (raw twin)"
        cursors[twins[variant]] = conn.resilient.raw.cursor()
    timer = _timer_cost()
    _round(cursors, max(10, batch_size // 4), timer)  # warm up (psycopg prepares after 5)
    times: dict[str, list[float]] = {k: [] for k in cursors}
    ratios: dict[str, list[float]] = {k: [] for k in twins}
    gc.collect()
    for _ in range(batches):
        round_times = _round(cursors, batch_size, timer)
        for k, t in round_times.items():
            times[k].append(t)
        for variant, twin in twins.items():
            ratios[variant].append(round_times[variant] / round_times[twin])
    for cur in cursors.values():
        cur.close()
    baseline.close()
    for conn in wrapped.values():
        conn.close()
    results = [Result(name, "raw driver", statistics.median(times["raw driver"]), 1.0)]
    for variant in twins:
        spec = variants[variant]
        other = spec.compare_to if spec.compare_to in ratios else None
        results.append(Result(
            name, variant, statistics.median(times[variant]),
            statistics.median(ratios[variant]), other,
            None if other is None else statistics.median(
                a / b for a, b in zip(ratios[variant], ratios[other], strict=True)),
            spec.budget))
    return results


def _telemetry_providers() -> dict[str, Any]:
    """SDK providers for the telemetry pass: spans go through a batch processor to an
    exporter that discards them, metrics are aggregated in memory."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
    return {"tracer_provider": tracer_provider,
            "meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()])}


def measure_all(
    name: str,
    raw_connect: Callable[[], Any],
    wrapped_connect: Callable[[str, dict[str, Any]], Any],
    batches: int,
    batch_size: int,
) -> list[Result]:
    """The variants without telemetry, then (decision telemetry being process-wide) each
    variant with it in a pass of its own."""
    from resilient_db import telemetry

    specs = {k: _variant(v) for k, v in VARIANTS.items()}
    plain = {k: v for k, v in specs.items() if not v.telemetry}
    traced = {k: v for k, v in specs.items() if v.telemetry}
    results = measure(name, raw_connect, wrapped_connect, batches, batch_size, plain)
    for variant, spec in traced.items():  # each alone: query spans' garbage and export
        try:                              # thread would disturb the others
            results += [r for r in measure(name, raw_connect, wrapped_connect, batches,
                                           batch_size, {variant: spec},
                                           _telemetry_providers())
                        if r.variant != "raw driver"]
        finally:
            telemetry.disable()
    return results


@contextlib.contextmanager
def _servers(
    want_pg: bool, want_my: bool, pg_dsn: str | None, my_kwargs: dict[str, Any] | None
) -> Iterator[tuple[str | None, dict[str, Any] | None]]:
    with contextlib.ExitStack() as stack:
        if want_pg and pg_dsn is None:
            from simulator.local import start_postgres

            pg_dsn = stack.enter_context(start_postgres()).conninfo()
        if want_my and my_kwargs is None:
            from simulator.local import start_mariadb

            my_kwargs = stack.enter_context(start_mariadb()).connect_kwargs()
        yield (pg_dsn if want_pg else None), (my_kwargs if want_my else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drivers", default="pg,mysql", help="pg, mysql or pg,mysql")
    parser.add_argument("--batches", type=int, default=15, help="batches per variant (>= 7)")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3,
                        help="repeat the measurement with fresh connections; median of runs")
    parser.add_argument("--budget", type=float, default=1.05, help="max ratio to raw")
    parser.add_argument("--pg-dsn", help="use this PostgreSQL server instead of starting one")
    parser.add_argument("--mysql", help="JSON connect kwargs of an existing MySQL/MariaDB")
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    args = parser.parse_args(argv)
    if args.batches < 7:
        parser.error("--batches must be at least 7 (CONVENTIONS.md)")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    drivers = {d.strip() for d in args.drivers.split(",")}
    runs: list[list[Result]] = [[] for _ in range(args.runs)]
    my_kwargs = json.loads(args.mysql) if args.mysql else None
    with _servers("pg" in drivers, "mysql" in drivers, args.pg_dsn, my_kwargs) as (dsn, mykw):
        if dsn is not None:
            import psycopg

            pg_dsn = dsn
            for run in runs:
                run.extend(measure_all(
                    "psycopg",
                    lambda: psycopg.Connection.connect(pg_dsn, autocommit=True),
                    lambda plugins, extra: resilient_db.connect(
                        psycopg.Connection.connect, pg_dsn, plugins=plugins, autocommit=True,
                        **extra),
                    args.batches, args.batch_size,
                ))
        if mykw is not None:
            import mysql.connector

            kw = dict(mykw)
            for run in runs:
                run.extend(measure_all(
                    "mysql-connector (pure)",
                    lambda: mysql.connector.connect(use_pure=True, autocommit=True, **kw),
                    lambda plugins, extra: resilient_db.connect(
                        mysql.connector.connect, plugins=plugins, use_pure=True,
                        autocommit=True, **kw, **extra),
                    args.batches, args.batch_size,
                ))
    results = combine_runs(runs)
    print(f"SELECT 1 + fetchone, median of {args.batches} batches of {args.batch_size}, "
          f"median of {args.runs} run(s) with fresh connections")
    print(f"{'driver':<24} {'variant':<48} {'µs/query':>9} {'ratio':>7} {'runs':>13}")
    over = False
    for r in results:
        flag = ""
        if r.compared_to is not None and r.ratio_to_compared is not None:
            flag = f"  ({r.ratio_to_compared:.3f} over {r.compared_to!r})"
            if (r.budget is not None and r.ratio_to_compared > r.budget) or (
                    r.ratio > args.budget):
                flag, over = flag + "  over budget", True
        elif r.variant != "raw driver" and r.ratio > (
                args.budget if r.budget is None else r.budget):
            flag, over = "  over budget", True
        elif r.budget == math.inf:
            flag = "  (reported only)"
        spread = (f"{min(r.run_ratios):.3f}-{max(r.run_ratios):.3f}"
                  if len(r.run_ratios) > 1 and r.variant != "raw driver" else "")
        print(f"{r.driver:<24} {r.variant:<48} {r.us_per_query:9.1f} {r.ratio:7.3f} "
              f"{spread:>13}{flag}")
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    resilient_db.shutdown()
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
