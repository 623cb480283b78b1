"""Time from the simulator's ``promoted`` event to the first acknowledged write on the new
writer during an Aurora Global Database switchover and failover, with ``gdb_failover``
(``strict-writer`` in and out of home).

Method: one simulated global database per engine (us-east-1: writer + reader; us-west-2: one
reader), one application connection through the global writer endpoint writing without pause
from its own thread (idempotent inserts marked with ``call_options(idempotent=True)``; a
read-only refusal, which a planned switchover causes while the old writer stops, is retried
after 10 ms, as an application would). Per round: a planned switchover to us-west-2, one back
to us-east-1, then an unplanned global failover to us-west-2 (us-east-1 lost). The figure is
the CONVENTIONS.md failover time: ``promoted`` to the first write acknowledged by the new
writer; the control plane's own time (start of the action to ``promoted``) is printed too.

    PYTHONPATH=. python benchmarks/gdb_failover_time.py            # both engines
    PYTHONPATH=. python benchmarks/gdb_failover_time.py --engine pg --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import mysql.connector
import psycopg

import resilient_db
from simulator.cluster import Cluster, Timeline

HOME, AWAY = "us-east-1", "us-west-2"
TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)


def _read_only(engine: str) -> Callable[[BaseException], bool]:
    if engine == "pg":
        return lambda exc: isinstance(exc, psycopg.errors.ReadOnlySqlTransaction)
    return lambda exc: getattr(exc, "errno", None) in (1290, 1792, 1836)


def one(cluster: Cluster, engine: str, action: Callable[[], list[Any]]) -> tuple[float, float]:
    """(promoted -> first write on the new writer, action start -> promoted), seconds."""
    target: Any = psycopg.Connection.connect if engine == "pg" else mysql.connector.connect
    extra: dict[str, Any] = {} if engine == "pg" else {
        "use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"}
    conn = resilient_db.connect(
        target, plugins="gdb_failover", **cluster.connect_kwargs(cluster.global_writer_endpoint),
        **extra, autocommit=True, connect_timeout=5, failover_home_region=HOME,
        global_cluster_instance_host_patterns=cluster.global_host_patterns)
    cur = conn.cursor()
    table = f"t{time.monotonic_ns()}"
    cur.execute(f"CREATE TABLE {table} (id int primary key)")
    read_only = _read_only(engine)
    insert = ("INSERT INTO {table} VALUES ({key}) ON CONFLICT DO NOTHING" if engine == "pg"
              else "INSERT IGNORE INTO {table} VALUES ({key})")
    acked: list[tuple[float, str | None]] = []
    stop = threading.Event()

    def write() -> None:
        key = 0
        while not stop.is_set():
            key += 1
            try:
                with resilient_db.call_options(idempotent=True):
                    cur.execute(insert.format(table=table, key=key))
                acked.append((time.monotonic(), conn.resilient.plugin("gdb_failover").instance_id))
            except resilient_db.FailoverSuccessError:
                continue
            except Exception as exc:
                if read_only(exc):
                    stop.wait(0.01)
                    continue
                raise

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(acked) < 20 and time.monotonic() < deadline:
            stop.wait(0.01)
        started = time.monotonic()
        events = action()
        promoted = next(e for e in events if e.name == "promoted")
        new = cluster.writer.id
        while not any(i == new for _, i in acked):
            if time.monotonic() > deadline + 60 or not thread.is_alive():
                raise RuntimeError(f"no write acknowledged by {new}")
            stop.wait(0.01)
        first = min(at for at, i in acked if i == new)
        return first - promoted.mono, promoted.mono - started
    finally:
        stop.set()
        thread.join(30)
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("pg", "mysql", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    engines = ("pg", "mysql") if args.engine == "both" else (args.engine,)
    for engine in engines:
        flavour = "aurora-pg" if engine == "pg" else "aurora-mysql"
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            with Cluster.start(flavour, readers=1, region=HOME, timeline=TIMELINE) as cluster:
                cluster.add_secondary_region(AWAY, 1)
                steps: list[tuple[str, Callable[[], list[Any]]]] = [
                    ("planned switchover", functools.partial(cluster.switchover_global, AWAY)),
                    ("planned switchover back",
                     functools.partial(cluster.switchover_global, HOME)),
                    ("unplanned failover", functools.partial(cluster.failover_global, AWAY)),
                ]
                for name, action in steps:
                    deadline = time.monotonic() + 30
                    while not cluster.settled() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    results.setdefault(name, []).append(one(cluster, engine, action))
            resilient_db.shutdown()
        for name, values in results.items():
            client = statistics.median(v[0] for v in values) * 1000
            control = statistics.median(v[1] for v in values) * 1000
            print(f"{engine:5} {name:24} promoted -> first write on the new writer "
                  f"{client:6.0f} ms (median of {len(values)}); action -> promoted "
                  f"{control:5.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
