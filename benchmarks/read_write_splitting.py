"""Cost of a read-only switch with ``read_write_splitting``, against the raw driver, measured in
the same run on a simulated Aurora cluster (both engines).

What is timed, per variant (median µs over batches, interleaved so every variant sees the same
moments of a noisy machine; CONVENTIONS.md, "benchmark method"):

- ``raw round trip``: the raw driver's ``SELECT 1`` + ``fetchone`` on a connection to the
  writer: the price of one statement, the baseline the others are read against;
- ``switch, cached``: ``conn.read_only = True`` then ``False`` on a connection that switched
  before (reader and writer connections both held): the steady state of an application that
  switches back and forth;
- ``first switch, unpooled``: the same pair on a connection that has not switched yet
  (opening the reader connection, its role check and the session state included): what the
  AWS wrapper measures as +11.9 ms;
- ``first switch, pooled`` (``splitting_pool=True``): the same, the reader connection taken
  from the internal pool a closed connection gave back (AWS: +3.3 ms; budget here 0.5 ms).
- ``close, pooled`` / ``close, unpooled``: closing a connection that switched (the pooled
  one resets its reader connection and gives it back; the unpooled one closes two sessions).

The connections of the "first switch" variants are opened untimed before each sample.
Each switch goes straight to the instances (no proxy).

    python benchmarks/read_write_splitting.py                      # aurora-pg and aurora-mysql
    python benchmarks/read_write_splitting.py --flavours aurora-pg --batches 9

Exit status 1 if the pooled first switch exceeds ``--budget`` ms (default 0.5).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import resilient_db
from simulator.cluster import Cluster

PLUGINS = "read_write_splitting,failover"


def _target(flavour: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    if flavour.endswith("pg"):
        import psycopg

        return psycopg.Connection.connect, {}
    import mysql.connector

    return mysql.connector.connect, {"use_pure": True,
                                     "aurora_mysql_lookalike_schema": "aurora_sim"}


def measure(flavour: str, batches: int, cached_size: int, first_size: int,
            ) -> dict[str, float]:
    """Median µs per operation of each variant."""
    with Cluster.start(flavour, readers=1) as cluster:
        target, extra = _target(flavour)
        kwargs = {**cluster.connect_kwargs(cluster.writer_endpoint), **extra,
                  "autocommit": True}

        def wrapped(**more: Any) -> Any:
            return resilient_db.connect(target, plugins=PLUGINS, **kwargs, **more)

        raw_kwargs = {k: v for k, v in kwargs.items() if k != "aurora_mysql_lookalike_schema"}
        raw = target(**{**raw_kwargs, "host": cluster.writer.endpoint})
        raw_cur = raw.cursor()
        steady = wrapped()
        steady.read_only = True  # both connections held from here on
        steady.read_only = False
        # Warm the pool: one reader connection to take.
        warm = wrapped(splitting_pool=True)
        warm.read_only = True
        warm.close()

        samples: dict[str, list[float]] = {name: [] for name in (
            "raw round trip", "switch, cached", "first switch, unpooled",
            "first switch, pooled", "close, unpooled", "close, pooled")}
        clock = time.perf_counter
        gc.disable()
        try:
            for _ in range(batches):
                raw_t = cached_t = 0.0
                for _ in range(cached_size):
                    t0 = clock()
                    raw_cur.execute("SELECT 1")
                    raw_cur.fetchone()
                    t1 = clock()
                    steady.read_only = True
                    steady.read_only = False
                    t2 = clock()
                    raw_t += t1 - t0
                    cached_t += t2 - t1
                samples["raw round trip"].append(raw_t / cached_size)
                samples["switch, cached"].append(cached_t / cached_size)
                times = {name: 0.0 for name in ("first switch, unpooled", "first switch, pooled",
                                                "close, unpooled", "close, pooled")}
                for _ in range(first_size):
                    for pooled in (False, True):
                        conn = wrapped(splitting_pool=pooled)
                        t0 = clock()
                        conn.read_only = True
                        conn.read_only = False
                        t1 = clock()
                        conn.close()
                        t2 = clock()
                        label = "pooled" if pooled else "unpooled"
                        times[f"first switch, {label}"] += t1 - t0
                        times[f"close, {label}"] += t2 - t1
                    gc.collect()
                for name, total in times.items():
                    samples[name].append(total / first_size)
        finally:
            gc.enable()
            steady.close()
            raw.close()
            resilient_db.shutdown()
        return {name: statistics.median(values) * 1e6 for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavours", default="aurora-pg,aurora-mysql")
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--cached-size", type=int, default=2000,
                        help="switch pairs per batch on a connection that switched before")
    parser.add_argument("--first-size", type=int, default=30,
                        help="first switches per batch (each on a new connection)")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="ms allowed for the pooled first switch")
    args = parser.parse_args(argv)
    failed = False
    for flavour in args.flavours.split(","):
        result = measure(flavour, args.batches, args.cached_size, args.first_size)
        base = result["raw round trip"]
        print(f"\n{flavour}: median of {args.batches} batches (read_only True then False)")
        print(f"{'variant':<26}{'µs':>10}{'x raw round trip':>20}")
        for name, value in result.items():
            print(f"{name:<26}{value:>10.1f}{value / base:>20.2f}")
        pooled_ms = result["first switch, pooled"] / 1000
        if pooled_ms > args.budget:
            print(f"pooled first switch {pooled_ms:.3f} ms over the {args.budget} ms budget")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
