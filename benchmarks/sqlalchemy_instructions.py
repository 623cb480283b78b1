"""Client-side CPU instructions per statement through SQLAlchemy Core, the stock dialect vs the
resilient_db dialect (deterministic; the companion of benchmarks/sqlalchemy_overhead.py).

``conn.execute(text("SELECT 1")).fetchone()`` in AUTOCOMMIT, run N and 3N times in a fresh
interpreter per variant under ``valgrind --tool=callgrind``; the difference per statement is
reported (start-up, SQLAlchemy's statement compilation and psycopg's preparation cancel out).
Only the main thread is counted (benchmarks/instructions.py: monitor threads work in
proportion to wall time, not statements), so the kernel, the network and the server are not
in it: an instruction ratio overstates the wall-clock ratio.

Two shapes, as in sqlalchemy_overhead.py: ``held`` (one ``Connection`` kept checked out) and
``checkout`` (``with engine.connect()`` around every statement: pool checkout and checkin, the
checkout hook, the reset on return).

    python benchmarks/sqlalchemy_instructions.py [--drivers pg,mysql] [--queries 500]
    python benchmarks/sqlalchemy_instructions.py --drivers pg --variants failover,efm

Needs valgrind (Debian package ``valgrind``).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from instructions import main_thread_instructions, per_query, server

#: Variants: name -> ``plugins`` (``"-"``: the stock dialect; ``"default"``: resilient_db's
#: default list).
VARIANTS: dict[str, str] = {
    "stock dialect": "-",
    "no plugins": "",
    "failover,efm": "failover,efm",
    "default plugins": "default",
}
SHAPES = ("held", "checkout")

_CHILD = r"""
import json, os, sys
driver, shape, plugins, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kw = json.loads(os.environ["RDB_KW"])
import sqlalchemy as sa
from sqlalchemy.dialects import registry
module = "resilient_db.integrations.sqlalchemy"
registry.register("postgresql.resilient_psycopg", module, "ResilientPsycopgDialect")
registry.register("mysql.resilient_mysqlconnector", module, "ResilientMysqlConnectorDialect")
if driver == "pg":
    stock, resilient, extra = "postgresql+psycopg", "postgresql+resilient_psycopg", {}
else:
    stock, resilient = "mysql+mysqlconnector", "mysql+resilient_mysqlconnector"
    extra = {"use_pure": True}
if plugins == "-":
    scheme = stock
else:
    scheme = resilient
    if plugins != "default":
        extra["plugins"] = plugins
url = sa.URL.create(scheme, username=kw["user"], password=kw.get("password"), host=kw["host"],
                    port=int(kw["port"]), database=kw.get("dbname", kw.get("database")))
engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_size=1, connect_args=extra)
select_one = sa.text("SELECT 1")
if shape == "held":
    with engine.connect() as conn:
        execute = conn.execute
        for _ in range(n):
            execute(select_one).fetchone()
else:
    connect = engine.connect
    for _ in range(n):
        with connect() as conn:
            conn.execute(select_one).fetchone()
engine.dispose()
"""


def count(driver: str, shape: str, plugins: str, n: int, kw: dict[str, Any]) -> int:
    """Main-thread instructions of one child running ``n`` statements."""
    return main_thread_instructions(_CHILD, [driver, shape, plugins, str(n)],
                                    {"RDB_KW": json.dumps(kw)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drivers", default="pg,mysql", help="pg, mysql or pg,mysql")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="held, checkout or both")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "stock dialect"),
                        help="resilient variants, comma-separated (the stock dialect is "
                             "always measured)")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=2, help="callgrind runs in parallel")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    wanted = _split_variants(args.variants)
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    variants = ["stock dialect", *(v for v in wanted if v != "stock dialect")]
    shapes = [s.strip() for s in args.shapes.split(",")]
    n = args.queries
    print(f"client instructions per SQLAlchemy Core SELECT 1 + fetchone (callgrind, {n} vs "
          f"{3 * n} statements); ratio: to the stock dialect, same shape")
    print(f"{'driver':<8} {'shape':<9} {'variant':<18} {'instr/query':>12} {'ratio':>7}")
    for driver in (d.strip() for d in args.drivers.split(",")):
        with server(driver) as kw, ThreadPoolExecutor(args.jobs) as pool:
            for shape in shapes:
                futures = {v: pool.submit(per_query, functools.partial(
                    count, driver, shape, VARIANTS[v], kw=kw), n) for v in variants}
                base = futures["stock dialect"].result()
                for variant in variants:
                    per = futures[variant].result()
                    print(f"{driver:<8} {shape:<9} {variant:<18} {per:12.0f} {per / base:7.3f}",
                          flush=True)
    return 0


def _split_variants(text: str) -> list[str]:
    """Comma-separated variant names, where a known name may itself contain commas."""
    found: list[str] = []
    rest = text.strip()
    while rest:
        for name in sorted(VARIANTS, key=len, reverse=True):
            if rest == name or rest.startswith(name + ","):
                found.append(name)
                rest = rest[len(name) + 1:].strip()
                break
        else:
            head, _, rest = rest.partition(",")
            found.append(head.strip())
            rest = rest.strip()
    return found


if __name__ == "__main__":
    sys.exit(main())
