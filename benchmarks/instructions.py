"""Client-side CPU instructions per query, raw driver vs resilient_db (deterministic).

Wall-clock ratios on a small shared VM move by several percent between runs; instruction
counts from ``valgrind --tool=callgrind`` do not. This runs ``SELECT 1`` + ``fetchone`` N and 3N
times in a fresh interpreter per variant under callgrind and reports the difference per query
(start-up cancels out). It counts only the client process's main thread (monitor threads
do work in proportion to wall time, not queries): server time, the kernel and the
network are not in it, so an instruction ratio overstates the wall-clock ratio.

    python benchmarks/instructions.py [--drivers pg,mysql] [--queries 1000]

Needs valgrind (Debian package ``valgrind``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

VARIANTS = {
    "raw driver": None,
    "resilient_db, no plugins": "",
    "resilient_db, connect_time+execute_time+dev": "connect_time,execute_time,dev",
    "resilient_db, failover,efm": "failover,efm",
    "resilient_db, failover,efm + decision telemetry": "failover,efm+telemetry",
    "resilient_db, bg,failover,efm": "bg,failover,efm",
}

_CHILD = r"""
import json, os, sys
driver, plugins, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kw = json.loads(os.environ["RDB_KW"])
if driver == "pg":
    import psycopg
    target = psycopg.Connection.connect
else:
    import mysql.connector
    target = mysql.connector.connect
    kw["use_pure"] = True
extra = {}
if plugins.endswith("+telemetry"):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    plugins = plugins.removesuffix("+telemetry")
    extra = {"enable_telemetry": True, "tracer_provider": TracerProvider(),
             "meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()])}
if plugins == "-":
    conn = target(autocommit=True, **kw)
else:
    import resilient_db
    conn = resilient_db.connect(target, plugins=plugins, autocommit=True, **kw, **extra)
cur = conn.cursor()
for _ in range(n):
    cur.execute("SELECT 1")
    cur.fetchone()
"""


def _count(driver: str, plugins: str | None, n: int, kw: dict[str, Any]) -> int:
    """Instructions of the main thread only: failover's topology monitor and efm's host
    monitor run on threads of their own, whose work depends on wall time (callgrind slows
    the process ~50x), not on the number of queries."""
    return main_thread_instructions(
        _CHILD, [driver, "-" if plugins is None else plugins, str(n)], {"RDB_KW": json.dumps(kw)})


def main_thread_instructions(script: str, args: Sequence[str], env: Mapping[str, str]) -> int:
    """Instructions run by the main thread of ``python -c script *args`` under callgrind
    (``env`` added to the environment, hash randomisation off so that runs repeat)."""
    full_env = dict(os.environ, **env, PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--separate-threads=yes",
             f"--callgrind-out-file={tmp}/cg.out", sys.executable, "-c", script, *args],
            env=full_env, capture_output=True, text=True, check=False, timeout=1200,
        )
        main = sorted(pathlib.Path(tmp).glob("cg.out*-01"))
        text = main[0].read_text() if main else ""
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"callgrind gave no count:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def per_query(count: Callable[[int], int], n: int) -> float:
    """Instructions per query: ``count(queries)`` run for ``n`` and ``3 * n`` queries, the
    difference divided by ``2 * n`` (start-up and warm-up cancel out)."""
    return (count(3 * n) - count(n)) / (2 * n)


@contextlib.contextmanager
def server(driver: str) -> Iterator[dict[str, Any]]:
    from simulator.local import start_mariadb, start_postgres

    with (start_postgres() if driver == "pg" else start_mariadb()) as srv:
        yield dict(srv.connect_kwargs())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drivers", default="pg,mysql")
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    n = args.queries
    print(f"client instructions per SELECT 1 + fetchone (callgrind, {n} vs {3 * n} queries)")
    print(f"{'driver':<10} {'variant':<46} {'instr/query':>12} {'ratio':>7}")
    for driver in (d.strip() for d in args.drivers.split(",")):
        with server(driver) as kw:
            base = None
            for variant, plugins in VARIANTS.items():
                per = per_query(functools.partial(_count, driver, plugins, kw=kw), n)
                base = base or per
                print(f"{driver:<10} {variant:<46} {per:12.0f} {per / base:7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
