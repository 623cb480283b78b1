"""Threads and server connections that resilient_db's background work holds, however many
application connections exist (DESIGN §7: one topology monitor per cluster, one failure
monitor per host, one watchdog; 1,000 application connections to a 3-instance cluster cost at
most 4 extra server connections).

Method: a simulated 3-instance cluster (writer + 2 readers) per flavour. ``--connections``
application connections (default 200) are opened through the cluster endpoint with the given
plugins, each runs one statement, and after ``--settle`` seconds of idling the script counts

- server sessions on every instance that are not the application's own connections (PostgreSQL:
  client backends in ``pg_stat_activity`` minus the application's backend pids; MariaDB:
  sessions of the application user in the process list minus the application's connection
  ids), sampled several times, reporting the maximum;
- threads of this process whose name starts with ``resilient_db`` (and every thread, minus the
  threads that existed before the first connection).

    python benchmarks/connection_budget.py                        # failover, both flavours
    python benchmarks/connection_budget.py --plugins failover,efm --connections 500

Budget: at most 4 extra server connections (1 topology monitor + 1 probe per host) and at
most ``hosts + 2`` background threads (topology monitor, one failure monitor per host,
watchdog). Exit status 1 if the budget is exceeded.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from typing import Any

import resilient_db
from simulator.cluster import Cluster, Timeline

MAX_EXTRA_SERVER_CONNECTIONS = 4


def _own_ids(flavour: str, conns: list[Any]) -> set[int]:
    ids: set[int] = set()
    for conn in conns:
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()" if flavour == "aurora-pg"
                    else "SELECT CONNECTION_ID()")
        ids.add(int(cur.fetchone()[0]))
        cur.close()
    return ids


def _extra_sessions(cluster: Cluster, flavour: str, own: set[int]) -> dict[str, int]:
    """Sessions per instance that are not the application's own connections."""
    found: dict[str, int] = {}
    for instance in cluster.instances.values():
        if instance.role == "stopped":
            continue
        with cluster.superuser(instance.id) as conn:
            cur = conn.cursor()
            if flavour == "aurora-pg":
                cur.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = "
                            "'client backend' AND usename = %s", (cluster.credentials()["user"],))
            else:
                cur.execute("SELECT id FROM information_schema.processlist WHERE user = %s",
                            (cluster.credentials()["user"],))
            pids = {int(row[0]) for row in cur.fetchall()}
        found[instance.id] = len(pids - own) if instance.role == "writer" else len(pids)
    return found


def measure(flavour: str, plugins: str, count: int, settle: float) -> dict[str, Any]:
    import mysql.connector
    import psycopg

    pg = flavour == "aurora-pg"
    target: Any = psycopg.Connection.connect if pg else mysql.connector.connect
    extra: dict[str, Any] = {} if pg else {
        "use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"}
    before = set(threading.enumerate())
    with Cluster.start(flavour, readers=2, timeline=Timeline(dns_staleness=0.0)) as cluster:
        conns = []
        started = time.perf_counter()
        for _ in range(count):
            conn = resilient_db.connect(target, plugins=plugins, autocommit=True,
                                        **cluster.connect_kwargs(), **extra)
            cur = conn.cursor()
            cur.execute("SELECT 1")
            cur.fetchall()
            cur.close()
            conns.append(conn)
        opened = time.perf_counter() - started
        own = _own_ids(flavour, conns)
        time.sleep(settle)
        samples = []
        for _ in range(5):
            samples.append(_extra_sessions(cluster, flavour, own))
            time.sleep(0.2)
        # The simulator's own threads (its process spawner) are not resilient_db's.
        threads = [t for t in threading.enumerate()
                   if t not in before and not t.name.startswith("resilient_db-sim")]
        names = collections.Counter(t.name.rstrip("0123456789-_") for t in threads)
        for conn in conns:
            conn.close()
    resilient_db.shutdown()
    worst = max(samples, key=lambda s: sum(s.values()))
    return {
        "flavour": flavour, "plugins": plugins, "connections": count,
        "hosts": 3, "open_seconds": opened,
        "extra_server_connections": sum(worst.values()), "per_instance": worst,
        "new_threads": len(threads), "thread_names": dict(names),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugins", default="failover")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--flavours", default="aurora-pg,aurora-mysql")
    args = parser.parse_args(argv)
    ok = True
    for flavour in args.flavours.split(","):
        result = measure(flavour, args.plugins, args.connections, args.settle)
        budget_threads = result["hosts"] + 2
        within = (result["extra_server_connections"] <= MAX_EXTRA_SERVER_CONNECTIONS
                  and result["new_threads"] <= budget_threads)
        ok &= within
        print(f"{flavour:13s} plugins={result['plugins']:18s} "
              f"app connections={result['connections']:4d} "
              f"(opened in {result['open_seconds']:.1f} s)  "
              f"extra server connections={result['extra_server_connections']} "
              f"{result['per_instance']} (budget {MAX_EXTRA_SERVER_CONNECTIONS})  "
              f"background threads={result['new_threads']} {result['thread_names']} "
              f"(budget {budget_threads})  {'OK' if within else 'OVER BUDGET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
