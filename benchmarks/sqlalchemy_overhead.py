"""Per-query overhead of the resilient_db SQLAlchemy dialects against the stock dialects on the
raw driver, through SQLAlchemy Core, measured in the same run.

Method (benchmarks/overhead.py's, CONVENTIONS.md): ``conn.execute(text("SELECT 1"))`` plus
``fetchone()`` through a SQLAlchemy ``Connection`` in AUTOCOMMIT, straight to the server, the
variants interleaved query by query in one process (rotating which goes first), batches of
2,000 queries per variant, the median over at least 7 batches in µs per query (the clock's
own cost subtracted). Each resilient variant has a *twin*: an engine of the stock dialect
(``postgresql+psycopg`` / ``mysql+mysqlconnector``), with the same pool class and size,
whose one connection is the very driver connection under the resilient one
(``conn.resilient.raw``), so the ratio (median over
batches of resilient time / twin time) measures the dialect and resilient_db, not which
server process or CPU a connection landed on. A stock engine on a connection of its own gives
the absolute baseline.

Two shapes: ``held`` (one ``Connection`` kept checked out, the statement path alone) and
``checkout`` (``with engine.connect()`` around every statement: the pool's checkout and
checkin, the stale-connection hook, the reset on return, included).

    python benchmarks/sqlalchemy_overhead.py                  # throwaway PG and MariaDB servers
    python benchmarks/sqlalchemy_overhead.py --drivers pg --batches 15

Exit status 1 if any ratio exceeds ``--budget`` (default 1.05).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import registry

import resilient_db

#: Resilient variants: name -> ``plugins`` (``None``: resilient_db's default list).
VARIANTS: dict[str, str | None] = {
    "no plugins": "",
    "failover,efm": "failover,efm",
    "default plugins": None,
}
SHAPES = ("held", "checkout")
SELECT_ONE = sa.text("SELECT 1")


@dataclass
class Result:
    driver: str
    shape: str
    variant: str
    us_per_query: float
    ratio: float


def _register() -> None:
    """The dialects' entry points exist once the package is installed with them; a checkout
    run against an older installation registers them here."""
    from importlib import metadata

    names = {ep.name for ep in metadata.entry_points(group="sqlalchemy.dialects")}
    module = "resilient_db.integrations.sqlalchemy"
    if "postgresql.resilient_psycopg" not in names:
        registry.register("postgresql.resilient_psycopg", module, "ResilientPsycopgDialect")
    if "mysql.resilient_mysqlconnector" not in names:
        registry.register("mysql.resilient_mysqlconnector", module,
                          "ResilientMysqlConnectorDialect")


def _timer_cost(samples: int = 20000) -> float:
    total = 0.0
    for _ in range(samples):
        start = time.perf_counter()
        total += time.perf_counter() - start
    return total / samples


def _held(conn: sa.Connection) -> Callable[[], Any]:
    execute = conn.execute

    def step() -> Any:
        return execute(SELECT_ONE).fetchone()

    return step


def _checkout(engine: sa.Engine) -> Callable[[], Any]:
    connect = engine.connect

    def step() -> Any:
        with connect() as conn:
            return conn.execute(SELECT_ONE).fetchone()

    return step


def _round(steps: dict[str, Callable[[], Any]], batch_size: int,
           timer: float) -> dict[str, float]:
    keys = list(steps)
    random.shuffle(keys)
    order = [(k, steps[k]) for k in keys]
    totals = dict.fromkeys(keys, 0.0)
    n = len(order)
    perf = time.perf_counter
    for i in range(batch_size):
        for j in range(n):
            key, step = order[(i + j) % n]
            start = perf()
            step()
            totals[key] += perf() - start
    return {k: (t / batch_size - timer) * 1e6 for k, t in totals.items()}


def measure(driver: str, stock_url: sa.URL, resilient_url: sa.URL, extra: dict[str, Any],
            shape: str, batches: int, batch_size: int) -> list[Result]:
    with contextlib.ExitStack() as stack:
        def engine(url: sa.URL, **kwargs: Any) -> sa.Engine:
            made = sa.create_engine(url, isolation_level="AUTOCOMMIT", **kwargs)
            stack.callback(made.dispose)
            return made

        baseline = engine(stock_url, connect_args=extra, pool_size=1)
        steps: dict[str, Callable[[], Any]] = {}
        twins: dict[str, str] = {}
        held: list[sa.Connection] = []
        for name, plugins in VARIANTS.items():
            args = dict(extra) if plugins is None else {**extra, "plugins": plugins}
            resilient = engine(resilient_url, connect_args=args, pool_size=1)
            with resilient.connect() as first:  # opens the one pooled connection
                raw = first.connection.dbapi_connection.resilient.raw  # type: ignore[union-attr]
            # The same pool class and size as the resilient engine (QueuePool, one
            # connection): the twin differs in the dialect and resilient_db only. (A
            # StaticPool twin skips the queue's lock and condition on every checkout, ~20
            # Python calls, and made the checkout ratios ~2% worse than they are.)
            twin = engine(stock_url, creator=lambda raw=raw: raw, pool_size=1, max_overflow=0)
            twins[name] = f"{name} (stock twin)"
            if shape == "held":
                for key, eng in ((name, resilient), (twins[name], twin)):
                    conn = eng.connect()
                    held.append(conn)
                    steps[key] = _held(conn)
            else:
                steps[name] = _checkout(resilient)
                steps[twins[name]] = _checkout(twin)
        if shape == "held":
            conn = baseline.connect()
            held.append(conn)
            steps["stock dialect"] = _held(conn)
        else:
            steps["stock dialect"] = _checkout(baseline)
        timer = _timer_cost()
        _round(steps, max(10, batch_size // 4), timer)  # warm up: caches, prepared statements
        times: dict[str, list[float]] = {k: [] for k in steps}
        ratios: dict[str, list[float]] = {k: [] for k in twins}
        gc.collect()
        for _ in range(batches):
            round_times = _round(steps, batch_size, timer)
            for key, value in round_times.items():
                times[key].append(value)
            for name, twin_name in twins.items():
                ratios[name].append(round_times[name] / round_times[twin_name])
        for conn in held:
            conn.close()
        results = [Result(driver, shape, "stock dialect", statistics.median(
            times["stock dialect"]), 1.0)]
        for name in twins:
            results.append(Result(driver, shape, name, statistics.median(times[name]),
                                  statistics.median(ratios[name])))
        # Leaving the stack disposes the engines, newest first: each twin closes the shared
        # driver connection, then its resilient engine closes it again (a no-op for both
        # drivers).
        return results


@contextlib.contextmanager
def _servers(drivers: set[str]) -> Iterator[dict[str, dict[str, Any]]]:
    from simulator.local import start_mariadb, start_postgres

    with contextlib.ExitStack() as stack:
        found: dict[str, dict[str, Any]] = {}
        if "pg" in drivers:
            found["pg"] = dict(stack.enter_context(start_postgres()).connect_kwargs())
        if "mysql" in drivers:
            found["mysql"] = dict(stack.enter_context(start_mariadb()).connect_kwargs())
        yield found


def _urls(driver: str, kw: dict[str, Any]) -> tuple[sa.URL, sa.URL, dict[str, Any]]:
    stock, resilient = (("postgresql+psycopg", "postgresql+resilient_psycopg") if driver == "pg"
                        else ("mysql+mysqlconnector", "mysql+resilient_mysqlconnector"))
    database = kw.get("dbname", kw.get("database"))

    def url(scheme: str) -> sa.URL:
        return sa.URL.create(scheme, username=kw["user"], password=kw.get("password"),
                             host=kw["host"], port=int(kw["port"]), database=database)

    extra = {} if driver == "pg" else {"use_pure": True}
    return url(stock), url(resilient), extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drivers", default="pg,mysql", help="pg, mysql or pg,mysql")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="held, checkout or both")
    parser.add_argument("--batches", type=int, default=15, help="batches per variant (>= 7)")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--budget", type=float, default=1.05, help="max ratio to the twin")
    args = parser.parse_args(argv)
    if args.batches < 7:
        parser.error("--batches must be at least 7 (CONVENTIONS.md)")
    _register()
    drivers = {d.strip() for d in args.drivers.split(",")}
    shapes = [s.strip() for s in args.shapes.split(",")]
    results: list[Result] = []
    with _servers(drivers) as servers:
        for driver, kw in servers.items():
            stock, resilient, extra = _urls(driver, kw)
            name = "psycopg" if driver == "pg" else "mysql-connector (pure)"
            for shape in shapes:
                results += measure(name, stock, resilient, extra, shape, args.batches,
                                   args.batch_size)
    print(f"SQLAlchemy Core SELECT 1 + fetchone, median of {args.batches} batches of "
          f"{args.batch_size}; ratio: resilient dialect / stock dialect on the same driver "
          "connection")
    print(f"{'driver':<24} {'shape':<9} {'variant':<18} {'µs/query':>9} {'ratio':>7}")
    over = False
    for r in results:
        flag = ""
        if r.variant != "stock dialect" and r.ratio > args.budget:
            flag, over = "  over budget", True
        print(f"{r.driver:<24} {r.shape:<9} {r.variant:<18} {r.us_per_query:9.1f} "
              f"{r.ratio:7.3f}{flag}")
    resilient_db.shutdown()
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
