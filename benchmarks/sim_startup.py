"""Start-up and failover times of the simulator's Aurora PostgreSQL cluster.

Goals (the simulator issue): a 3-instance ``aurora-pg`` cluster, and a 3-instance
``multi-az-mysql`` one, is up in at most 10 s (median of 5 starts each) and a failover
completes in at most 2 s plus its configured delays (median of 5).

- start: ``Cluster.start("aurora-pg", readers=2)`` until it returns (writer from the template
  with its own system identifier, two ``pg_basebackup`` readers streaming synchronously, the
  catalog interface, the topology and the names in ``/etc/hosts``), then ``stop()``.
- failover: ``cluster.failover()`` (crash: the writer is killed, the most advanced reader
  promoted, the other reader follows, the topology is published, the writer endpoint moves)
  from the call until it returns, minus the configured ``detection_delay`` and
  ``promotion_delay``. Also shown, as CONVENTIONS.md measures recovery: from the ``promoted``
  event to the first commit a client gets through the writer endpoint. The old writer rejoins
  between runs (not timed).

    python benchmarks/sim_startup.py                  # 5 starts, 5 failovers
    python benchmarks/sim_startup.py --runs 7 --json

Exit status 1 if a median misses its goal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

import psycopg

from simulator.cluster import Cluster, Timeline

START_GOAL = 10.0
FAILOVER_GOAL = 2.0
#: Delays of the failover runs (seconds), subtracted from what is measured.
TIMELINE = Timeline(detection_delay=0.5, promotion_delay=0.0, dns_staleness=0.0,
                    rejoin_delay=0.2)


def measure_starts(runs: int, flavour: str = "aurora-pg") -> list[float]:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        cluster = Cluster.start(flavour, readers=2)
        times.append(time.monotonic() - started)
        cluster.stop()
    return times


def _first_commit_after(cluster: Cluster, since: float, done: threading.Event,
                        result: list[float]) -> None:
    """Commit through the writer endpoint until one succeeds after ``since`` is passed."""
    while not done.is_set():
        try:
            with psycopg.connect(**cluster.connect_kwargs(), autocommit=True,
                                 connect_timeout=2) as conn:
                while not done.is_set():
                    conn.execute("INSERT INTO bench_writes VALUES (default)")
                    now = time.monotonic()
                    if now > since and conn.execute(
                            "SELECT NOT pg_catalog.pg_is_in_recovery()").fetchone() == (True,):
                        promoted = cluster.events.last("promoted")
                        if promoted is not None and promoted.mono > since:
                            result.append(now - promoted.mono)
                            return
        except psycopg.Error:
            time.sleep(0.005)


def measure_failovers(runs: int) -> tuple[list[float], list[float]]:
    delays = TIMELINE.detection_delay + TIMELINE.promotion_delay
    failovers: list[float] = []
    recoveries: list[float] = []
    with Cluster.start("aurora-pg", readers=2, timeline=TIMELINE) as cluster:
        with psycopg.connect(**cluster.connect_kwargs(), autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_writes (id serial PRIMARY KEY)")
        for _ in range(runs):
            done = threading.Event()
            recovered: list[float] = []
            started = time.monotonic()
            client = threading.Thread(target=_first_commit_after,
                                      args=(cluster, started, done, recovered), daemon=True)
            client.start()
            cluster.failover()
            failovers.append(time.monotonic() - started - delays)
            client.join(30)
            done.set()
            recoveries.extend(recovered)
            cluster.events.wait_for("rejoined_as_reader", since=started, timeout=30)
    return failovers, recoveries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="starts and failovers (default 5)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    starts = measure_starts(args.runs)
    mysql_starts = measure_starts(args.runs, "multi-az-mysql")
    failovers, recoveries = measure_failovers(args.runs)
    result: dict[str, Any] = {
        "start_median_s": statistics.median(starts),
        "start_s": starts,
        "start_multi_az_mysql_median_s": statistics.median(mysql_starts),
        "start_multi_az_mysql_s": mysql_starts,
        "failover_median_s": statistics.median(failovers),
        "failover_s": failovers,
        "failover_delays_s": TIMELINE.detection_delay + TIMELINE.promotion_delay,
        "promoted_to_first_commit_median_s": statistics.median(recoveries)
        if recoveries else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"3-instance aurora-pg start: median {result['start_median_s']:.2f} s of "
              f"{args.runs} ({', '.join(f'{t:.2f}' for t in starts)}); goal <= {START_GOAL} s")
        print(f"3-instance multi-az-mysql start: median "
              f"{result['start_multi_az_mysql_median_s']:.2f} s of {args.runs} "
              f"({', '.join(f'{t:.2f}' for t in mysql_starts)}); goal <= {START_GOAL} s")
        print(f"failover beyond its delays ({result['failover_delays_s']:.1f} s): median "
              f"{result['failover_median_s']:.2f} s of {args.runs} "
              f"({', '.join(f'{t:.2f}' for t in failovers)}); goal <= {FAILOVER_GOAL} s")
        if recoveries:
            print(f"promoted -> first commit through the writer endpoint: median "
                  f"{statistics.median(recoveries) * 1000:.0f} ms")
    ok = (result["start_median_s"] <= START_GOAL
          and result["start_multi_az_mysql_median_s"] <= START_GOAL
          and result["failover_median_s"] <= FAILOVER_GOAL)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
