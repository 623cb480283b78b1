"""The README's demo: resilient_db on throwaway PostgreSQL and MariaDB servers.

    scripts/demo            # or: python -m simulator.demo [--engines pg,mysql]

Starts its own servers (never the machine's services), connects through resilient_db with the
shipped plugins, and shows what the foundation gives today: statements and connects timed,
a fault injected by the dev plugin reaching the application as the driver's own error type,
driver errors kept intact, and bad input rejected with a message that names the culprit.
Failover arrives with the failover issue; this demo grows with it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any

import resilient_db
from resilient_db.plugins import dev

from .local import LocalServer, start_mariadb, start_postgres


def _say(text: str) -> None:
    print(text, flush=True)


def _run(engine: str, server: LocalServer, target: Callable[..., Any],
         extra: dict[str, Any], unique_violation: type[BaseException],
         operational: type[BaseException]) -> None:
    _say(f"\n== {engine} at {server.host}:{server.port}")
    sink = resilient_db.CollectingSink()
    old_sink = resilient_db.set_decision_sink(sink)
    try:
        conn = resilient_db.connect(
            target, server.uri(), plugins="connect_time,execute_time,dev", autocommit=True,
            execute_time_slow_threshold=0.05, **extra,
        )
        _say(f"connected: {conn!r}")
        cur = conn.cursor()
        cur.execute("CREATE TABLE IF NOT EXISTS demo_items (id int primary key, name text)")
        cur.execute("DELETE FROM demo_items")
        cur.executemany("INSERT INTO demo_items VALUES (%s, %s)", [(1, "one"), (2, "two")])
        cur.execute("SELECT id, name FROM demo_items ORDER BY id")
        _say(f"rows, exactly as the driver returns them: {cur.fetchall()}")

        try:
            cur.execute("INSERT INTO demo_items VALUES (1, 'again')")
        except unique_violation as exc:
            _say(f"a duplicate key is still the driver's own {type(exc).__module__}."
                 f"{type(exc).__name__}")

        dev.raise_on_next_execute(operational("simulated network failure"), connection=conn)
        try:
            cur.execute("SELECT 1")
        except operational as exc:
            _say(f"dev plugin injected: {type(exc).__name__}: {exc}")
        cur.execute("SELECT 1")
        cur.fetchall()
        _say("the next statement runs normally (a fault fires once)")

        sleep = "SELECT pg_sleep(0.1)" if engine == "PostgreSQL" else "SELECT SLEEP(0.1)"
        cur.execute(sleep)
        cur.fetchall()
        stats = conn.resilient.plugin("execute_time").stats
        connect = conn.resilient.plugin("connect_time").stats
        _say(f"connect took {connect.last * 1000:.1f} ms; {stats.count} statements, "
             f"{stats.failures} failed, slowest {stats.slowest * 1000:.1f} ms "
             "(a WARNING was logged for it)")
        _say(f"decisions recorded for telemetry: {sorted(set(sink.kinds()))}")
        cur.execute("DROP TABLE demo_items")
        conn.close()
    finally:
        resilient_db.set_decision_sink(old_sink)
        dev.reset()

    _say("bad input is rejected with the culprit named:")
    for kwargs in ({"plugins": "exectue_time"}, {"conect_timeout": 3},
                   {"connect_timeout": "soon"}):
        try:
            resilient_db.connect(target, server.uri(), **kwargs, **extra)
        except resilient_db.ConfigurationError as exc:
            _say(f"  {kwargs} -> {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="pg,mysql", help="pg, mysql or pg,mysql")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  log %(levelname)s %(name)s: %(message)s")
    engines = {e.strip() for e in args.engines.split(",")}
    with contextlib.ExitStack() as stack:
        if "pg" in engines:
            import psycopg

            _say("starting a throwaway PostgreSQL server ...")
            pg = stack.enter_context(start_postgres())
            _run("PostgreSQL", pg, psycopg.Connection.connect, {},
                 psycopg.errors.UniqueViolation, psycopg.OperationalError)
        if "mysql" in engines:
            import mysql.connector

            _say("\nstarting a throwaway MariaDB server ...")
            my = stack.enter_context(start_mariadb())
            _run("MariaDB", my, mysql.connector.connect, {"use_pure": True},
                 mysql.connector.errors.IntegrityError, mysql.connector.errors.OperationalError)
    resilient_db.shutdown()
    _say("\nservers stopped and removed. Next: scripts/test runs the test suite.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
