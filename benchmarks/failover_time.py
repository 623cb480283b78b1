"""Time from the simulator's ``promoted`` event to the application's first successful write on
the new writer, with the failover plugin and stale cluster DNS (issue #4).

Method (CONVENTIONS.md, "Timing"): one application connection, opened through the cluster
endpoint with ``plugins="failover"``, writes without pause from its own thread (an idempotent
insert per key, marked with ``call_options(idempotent=True)`` so an interrupted insert is run
again on the new connection; any other error is retried after 2 ms). Each run fails the
writer over (a crash: ``Cluster.failover()``, or a targeted graceful failover:
``failover(target=<a reader>, mode="graceful")``) and measures from ``promoted`` to the first
acknowledged insert on the new writer. The cluster endpoint stays stale for the whole
benchmark (``dns_staleness`` longer than the runs), so DNS never helps.

Invariants checked at the end, from the rows on the final writer: every acknowledged insert is
there (no acknowledged write lost) and each was written by the instance that was the writer
when it was acknowledged (none accepted by a reader; every row records the instance id that
executed it).

    python benchmarks/failover_time.py                       # 10 runs, aurora-pg and aurora-mysql
    python benchmarks/failover_time.py --runs 3 --flavours aurora-pg --scenarios crash

Goal (issue #4): median <= 0.2 s and max <= 0.5 s per scenario. Exit status 1 if a goal or an
invariant is missed.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import resilient_db
from simulator.cluster import Cluster, Timeline

GOAL_MEDIAN = 0.2
GOAL_MAX = 0.5
DNS_STALENESS = 3600.0
SCENARIOS = ("crash", "targeted")


@dataclass(frozen=True)
class Flavour:
    name: str
    connect: Callable[..., Any]
    extra: dict[str, Any]
    instance_sql: str
    upsert: str
    create: str


def _flavours() -> dict[str, Flavour]:
    import mysql.connector
    import psycopg

    return {
        "aurora-pg": Flavour(
            "aurora-pg", psycopg.Connection.connect, {},
            "pg_catalog.aurora_db_instance_identifier()",
            "INSERT INTO failover_time VALUES (%s, pg_catalog.aurora_db_instance_identifier()) "
            "ON CONFLICT DO NOTHING",
            "CREATE TABLE failover_time (id bigint PRIMARY KEY, inst text NOT NULL)"),
        "aurora-mysql": Flavour(
            "aurora-mysql", mysql.connector.connect,
            {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"},
            "aurora_sim.aurora_server_id()",
            "INSERT IGNORE INTO failover_time VALUES (%s, aurora_sim.aurora_server_id())",
            "CREATE TABLE failover_time (id bigint PRIMARY KEY, inst varchar(64) NOT NULL)"),
    }


@dataclass
class Writer:
    """The application: writes from its own thread, records every acknowledgement."""

    conn: Any
    flavour: Flavour
    acks: list[tuple[float, int, str]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="app-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        cur = self.conn.cursor()
        state = self.conn.resilient.plugin("failover")
        key = 0
        while not self.stop.is_set():
            key += 1
            while not self.stop.is_set():
                try:
                    with resilient_db.call_options(idempotent=True):
                        cur.execute(self.flavour.upsert, (key,))
                    self.acks.append((time.monotonic(), key, str(state.instance_id)))
                    break
                except Exception as exc:  # the application retries whatever failed
                    name = type(exc).__name__
                    self.errors[name] = self.errors.get(name, 0) + 1
                    time.sleep(0.002)

    def first_ack_on(self, instance: str, after: float) -> float | None:
        for mono, _, inst in self.acks[bisect.bisect_left(self.acks, (after, 0, "")):]:
            if inst == instance:
                return mono
        return None


@dataclass
class Result:
    flavour: str
    scenario: str
    times: list[float]
    stale_dns: int
    lost: int
    on_reader: int
    errors: dict[str, int]


def _settle(cluster: Cluster, flavour: str) -> None:
    deadline = time.monotonic() + 60
    while not cluster.settled():  # every instance back, readers following the writer
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not settle (instances back, readers following)")
        time.sleep(0.05)
    time.sleep(0.3)  # let the application write on the settled cluster for a moment


def _writers_between(history: list[tuple[float, str]], start: float, end: float) -> set[str]:
    """Every instance that was the writer at some moment in ``[start, end]``: an insert
    acknowledged at ``end`` was sent after the previous acknowledgement (``start``), and may
    have run on the writer of any moment in between (an interrupted insert that had committed
    is acknowledged by its idempotent re-run on the next writer)."""
    first = max(bisect.bisect_right(history, (start, "\uffff")) - 1, 0)
    last = max(bisect.bisect_right(history, (end, "\uffff")) - 1, 0)
    return {instance for _, instance in history[first:last + 1]}


def run_flavour(flavour: Flavour, runs: int, scenarios: list[str]) -> list[Result]:
    timeline = Timeline(detection_delay=0.2, dns_staleness=DNS_STALENESS, rejoin_delay=0.5)
    with Cluster.start(flavour.name, readers=2, timeline=timeline) as cluster:
        kwargs = {**cluster.connect_kwargs(), **flavour.extra, "autocommit": True}
        setup = resilient_db.connect(flavour.connect, plugins="", **kwargs)
        setup.cursor().execute(flavour.create)
        setup.close()
        conn = resilient_db.connect(flavour.connect, plugins="failover", **kwargs)
        app = Writer(conn, flavour)
        history: list[tuple[float, str]] = [(0.0, cluster.writer.id)]
        app.start()
        results = []
        try:
            for scenario in scenarios:
                times: list[float] = []
                stale = 0
                errors_before = dict(app.errors)
                for _ in range(runs):
                    _settle(cluster, flavour.name)
                    if scenario == "crash":
                        events = cluster.failover()
                    else:
                        events = cluster.failover(target=cluster.readers[-1].id,
                                                  mode="graceful")
                    promo = next(e for e in events if e.name == "promoted")
                    history.append((promo.mono, str(promo.instance)))
                    deadline = time.monotonic() + 30
                    first = None
                    while first is None and time.monotonic() < deadline:
                        first = app.first_ack_on(str(promo.instance), promo.mono)
                        time.sleep(0.005)
                    if first is None:
                        raise RuntimeError(f"no write on {promo.instance} within 30 s")
                    times.append(first - promo.mono)
                    moved = [e for e in cluster.events.events(since=promo.mono)
                             if e.name == "dns_updated" and e.mono <= first]
                    new_address = cluster.instance(str(promo.instance)).address
                    if not moved and socket.gethostbyname(cluster.writer_endpoint) != new_address:
                        stale += 1
                errors = {k: v - errors_before.get(k, 0) for k, v in app.errors.items()
                          if v - errors_before.get(k, 0)}
                results.append(Result(flavour.name, scenario, times, stale, 0, 0, errors))
        finally:
            app.stop.set()
            if app.thread is not None:
                app.thread.join(30)
            conn.close()
        # Invariants, from the final writer's rows.
        check = resilient_db.connect(flavour.connect, plugins="", **{
            **kwargs, "host": cluster.writer.endpoint})
        cur = check.cursor()
        cur.execute("SELECT id, inst FROM failover_time")
        rows = {int(r[0]): str(r[1]) for r in cur.fetchall()}
        check.close()
        lost = sum(1 for _, key, _ in app.acks if key not in rows)
        on_reader = 0
        previous = 0.0
        for mono, key, _ in app.acks:
            if key in rows and rows[key] not in _writers_between(history, previous, mono):
                on_reader += 1
            previous = mono
        for result in results:
            result.lost, result.on_reader = lost, on_reader
        print(f"{flavour.name}: {len(app.acks)} acknowledged inserts, {lost} lost, "
              f"{on_reader} written by an instance that was not the writer", file=sys.stderr)
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--flavours", default="aurora-pg,aurora-mysql")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("-v", "--verbose", action="store_true", help="log failovers (INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(relativeCreated)7.0f %(name)s %(message)s")
    logging.getLogger("resilient_db.simulator").setLevel(logging.WARNING)
    flavours = _flavours()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for scenario in scenarios:
        if scenario not in SCENARIOS:
            parser.error(f"unknown scenario {scenario!r}; expected {', '.join(SCENARIOS)}")
    results: list[Result] = []
    for name in [f.strip() for f in args.flavours.split(",") if f.strip()]:
        if name not in flavours:
            parser.error(f"unknown flavour {name!r}; expected {', '.join(flavours)}")
        results += run_flavour(flavours[name], args.runs, scenarios)
    resilient_db.shutdown()
    print(f"promoted -> first write on the new writer, {args.runs} runs each "
          f"(goal: median <= {GOAL_MEDIAN} s, max <= {GOAL_MAX} s)")
    print(f"{'flavour':<14} {'scenario':<10} {'median s':>9} {'max s':>7} {'min s':>7} "
          f"{'stale DNS':>10} {'lost':>5} {'reader':>7}  app errors seen")
    print("(stale DNS: runs in which the cluster endpoint had not moved and did not resolve to "
          "the new writer at the first write; after the first failover it stays on the first "
          "writer, which is sometimes the new one again)")
    ok = True
    for r in results:
        median, worst = statistics.median(r.times), max(r.times)
        met = median <= GOAL_MEDIAN and worst <= GOAL_MAX and not r.lost and not r.on_reader
        ok = ok and met
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(r.errors.items())) or "-"
        print(f"{r.flavour:<14} {r.scenario:<10} {median:9.3f} {worst:7.3f} {min(r.times):7.3f} "
              f"{r.stale_dns:>4}/{len(r.times):<5} {r.lost:>5} {r.on_reader:>7}  {errors}"
              + ("" if met else "  MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
