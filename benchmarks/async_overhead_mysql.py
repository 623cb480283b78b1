"""Per-query overhead of the asyncio front (``connect_async``) over ``mysql.connector.aio``
against a raw ``mysql.connector.aio`` connection, measured in the same run (CONVENTIONS.md
method; the twin of ``async_overhead.py``).

``await cur.execute("SELECT 1")`` plus ``await cur.fetchall()`` on one cursor per variant,
straight to the server; raw and wrapped variants take turns query by query within a batch;
the median over batches (at least 7) in µs per query, and the median per-batch ratio to raw.

    python benchmarks/async_overhead_mysql.py           # starts a throwaway MariaDB server
    python benchmarks/async_overhead_mysql.py --batches 9 --size 1000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import time
from typing import Any

import mysql.connector.aio

import resilient_db

VARIANTS: dict[str, dict[str, Any]] = {
    "connect_async, no plugins": {"plugins": ""},
    "connect_async, failover,efm": {"plugins": "failover,efm"},
    "connect_async, failover,efm + socket_timeout": {"plugins": "failover,efm",
                                                     "socket_timeout": 30},
}


async def measure(kwargs: dict[str, Any], batches: int,
                  size: int) -> dict[str, tuple[float, float]]:
    raw = await mysql.connector.aio.connect(**kwargs)
    wrapped: dict[str, Any] = {name: await resilient_db.connect_async(mysql.connector.aio.connect,
                                                      **kwargs, **extra)
               for name, extra in VARIANTS.items()}
    cursors: dict[str, Any] = {"raw": await raw.cursor()}
    cursors.update({name: await conn.cursor() for name, conn in wrapped.items()})
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
                await cur.fetchall()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--size", type=int, default=2000)
    args = parser.parse_args()
    from simulator.local import start_mariadb

    with start_mariadb() as server:
        # ssl_disabled: mysql.connector.aio fails on a server without TLS otherwise.
        kwargs = {**server.connect_kwargs(), "autocommit": True, "ssl_disabled": True}
        results = asyncio.run(measure(kwargs, max(7, args.batches), args.size))
    resilient_db.shutdown()
    for name, (micros, ratio) in results.items():
        print(f"{name:48s} {micros:8.1f} µs  x{ratio:.3f}")


if __name__ == "__main__":
    main()
