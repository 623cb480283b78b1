"""Per-query overhead of the asyncio front (``connect_async``) against raw
``psycopg.AsyncConnection``, measured in the same run (CONVENTIONS.md method).

``await cur.execute("SELECT 1")`` plus ``await cur.fetchone()`` on one cursor per variant,
straight to the server; raw and wrapped variants take turns query by query within a batch of
2,000; the median over batches (at least 7) in µs per query, and the median per-batch ratio to
raw.

    python benchmarks/async_overhead.py                # starts a throwaway PostgreSQL server
    python benchmarks/async_overhead.py --pg-dsn "host=... dbname=... user=..." --batches 15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

import psycopg

import resilient_db

VARIANTS: dict[str, dict[str, Any]] = {
    "connect_async, no plugins": {"plugins": ""},
    "connect_async, failover,efm": {"plugins": "failover,efm"},
    "connect_async, failover,efm + socket_timeout": {"plugins": "failover,efm",
                                                     "socket_timeout": 30},
}


async def measure(dsn: str, batches: int, size: int) -> dict[str, tuple[float, float]]:
    raw = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    wrapped = {name: await resilient_db.connect_async(psycopg.AsyncConnection.connect, dsn,
                                                      autocommit=True, **kwargs)
               for name, kwargs in VARIANTS.items()}
    cursors: dict[str, Any] = {"raw": raw.cursor()}
    cursors.update({name: conn.cursor() for name, conn in wrapped.items()})
    return await interleave(raw, wrapped, cursors, batches, size, "fetchone")


async def interleave(raw: Any, wrapped: dict[str, Any], cursors: dict[str, Any], batches: int,
                     size: int, fetch: str) -> dict[str, tuple[float, float]]:
    """The measurement loop both drivers share: ``SELECT 1`` then ``await cur.<fetch>()`` on
    every cursor, in a shuffled order each round; closes the connections; returns µs/query
    and the median per-batch ratio to ``cursors["raw"]`` for each variant."""
    times: dict[str, list[float]] = {name: [] for name in cursors}
    ratios: dict[str, list[float]] = {name: [] for name in wrapped}
    clock = time.perf_counter
    for batch in range(batches + 1):  # the first batch warms up
        gc.collect()
        totals = dict.fromkeys(cursors, 0.0)
        order = list(cursors.items())
        for _ in range(size):
            random.shuffle(order)  # no variant always first (or last) in a round
            for name, cur in order:
                start = clock()
                await cur.execute("SELECT 1")
                await getattr(cur, fetch)()
                totals[name] += clock() - start
        if batch == 0:
            continue
        for name, total in totals.items():
            times[name].append(total / size * 1e6)
        for name in wrapped:
            ratios[name].append(totals[name] / totals["raw"])
    await raw.close()
    for conn in wrapped.values():
        await conn.close()
    out = {"raw": (statistics.median(times["raw"]), 1.0)}
    out.update({name: (statistics.median(times[name]), statistics.median(ratios[name]))
                for name in wrapped})
    return out


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[str]:
    if dsn is not None:
        yield dsn
        return
    from simulator.local import start_postgres

    with start_postgres() as server:
        yield server.conninfo()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg-dsn")
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--size", type=int, default=2000)
    args = parser.parse_args()
    with _server(args.pg_dsn) as dsn:
        results = asyncio.run(measure(dsn, max(7, args.batches), args.size))
    resilient_db.shutdown()
    for name, (micros, ratio) in results.items():
        print(f"{name:48s} {micros:8.1f} µs  x{ratio:.3f}")


if __name__ == "__main__":
    main()
