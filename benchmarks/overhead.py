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

Exit status 1 if any ratio exceeds ``--budget`` (default 1.05), so CI or a user can gate on it;
the test suite does not run this (speed goals live in benchmarks, not timed tests).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import resilient_db

#: Wrapped variants: name -> plugins. Later plugins add rows here.
VARIANTS: dict[str, str] = {
    "resilient_db, no plugins": "",
    "resilient_db, connect_time+execute_time+dev": "connect_time,execute_time,dev",
    "resilient_db, failover": "failover",
    "resilient_db, efm": "efm",
    "resilient_db, failover,efm": "failover,efm",
    "resilient_db, no plugins, socket_timeout=30": "",
}
#: Extra connect arguments of a variant (by name).
VARIANT_ARGS: dict[str, dict[str, Any]] = {
    "resilient_db, no plugins, socket_timeout=30": {"socket_timeout": 30},
}


@dataclass
class Result:
    driver: str
    variant: str
    us_per_query: float
    ratio: float


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
    wrapped_connect: Callable[..., Any],
    batches: int,
    batch_size: int,
) -> list[Result]:
    """Each wrapped variant is compared with a raw cursor on *its own* driver connection (the
    same socket and server backend), so the ratio measures resilient_db and not which server
    process or CPU a connection happened to land on. A separate raw connection gives the
    absolute baseline shown as "raw driver"."""
    baseline = raw_connect()
    wrapped = {variant: wrapped_connect(plugins, **VARIANT_ARGS.get(variant, {}))
               for variant, plugins in VARIANTS.items()}
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
    results += [
        Result(name, variant, statistics.median(times[variant]),
               statistics.median(ratios[variant]))
        for variant in twins
    ]
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
    parser.add_argument("--budget", type=float, default=1.05, help="max ratio to raw")
    parser.add_argument("--pg-dsn", help="use this PostgreSQL server instead of starting one")
    parser.add_argument("--mysql", help="JSON connect kwargs of an existing MySQL/MariaDB")
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    args = parser.parse_args(argv)
    if args.batches < 7:
        parser.error("--batches must be at least 7 (CONVENTIONS.md)")
    drivers = {d.strip() for d in args.drivers.split(",")}
    results: list[Result] = []
    my_kwargs = json.loads(args.mysql) if args.mysql else None
    with _servers("pg" in drivers, "mysql" in drivers, args.pg_dsn, my_kwargs) as (dsn, mykw):
        if dsn is not None:
            import psycopg

            pg_dsn = dsn
            results += measure(
                "psycopg",
                lambda: psycopg.Connection.connect(pg_dsn, autocommit=True),
                lambda plugins, **extra: resilient_db.connect(
                    psycopg.Connection.connect, pg_dsn, plugins=plugins, autocommit=True,
                    **extra),
                args.batches, args.batch_size,
            )
        if mykw is not None:
            import mysql.connector

            kw = dict(mykw)
            results += measure(
                "mysql-connector (pure)",
                lambda: mysql.connector.connect(use_pure=True, autocommit=True, **kw),
                lambda plugins, **extra: resilient_db.connect(
                    mysql.connector.connect, plugins=plugins, use_pure=True, autocommit=True,
                    **kw, **extra),
                args.batches, args.batch_size,
            )
    print(f"SELECT 1 + fetchone, median of {args.batches} batches of {args.batch_size}")
    print(f"{'driver':<24} {'variant':<46} {'µs/query':>9} {'ratio':>7}")
    over = False
    for r in results:
        flag = ""
        if r.variant != "raw driver" and r.ratio > args.budget:
            flag, over = "  over budget", True
        print(f"{r.driver:<24} {r.variant:<46} {r.us_per_query:9.1f} {r.ratio:7.3f}{flag}")
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    resilient_db.shutdown()
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
