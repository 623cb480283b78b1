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
import sys
from pathlib import Path
from typing import Any

import mysql.connector.aio

import resilient_db

sys.path.insert(0, str(Path(__file__).resolve().parent))
from async_overhead import VARIANTS, interleave


async def measure(kwargs: dict[str, Any], batches: int,
                  size: int) -> dict[str, tuple[float, float]]:
    raw = await mysql.connector.aio.connect(**kwargs)
    wrapped: dict[str, Any] = {name: await resilient_db.connect_async(mysql.connector.aio.connect,
                                                      **kwargs, **extra)
               for name, extra in VARIANTS.items()}
    cursors: dict[str, Any] = {"raw": await raw.cursor()}
    cursors.update({name: await conn.cursor() for name, conn in wrapped.items()})
    return await interleave(raw, wrapped, cursors, batches, size, "fetchall")


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
