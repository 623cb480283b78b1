"""Pause an application sees during a blue/green switchover with the ``blue_green`` plugin
(issue #16): from the start of ``SWITCHOVER_IN_PROGRESS`` (the simulator's
``switchover_phase`` event) to the first acknowledged write on the green writer.

Method: per run, a fresh simulated deployment (blue and green clusters, a writer and a reader
each, every phase lasting ``--phase`` seconds), one application connection through the blue
cluster endpoint with ``plugins="bg"`` and the AWS wrapper's default intervals (except
``bg_interval_baseline_ms=1000``, so that the new deployment is noticed quickly), writing
without pause from its own thread (idempotent inserts marked with
``call_options(idempotent=True)``, as ``failover_time.py`` does). The pause includes the
``IN_PROGRESS`` phase itself (the simulator's stand-in for the time RDS takes; writes are
impossible on either side then), so the figure that belongs to the client is
measured too: from the simulator's ``SWITCHOVER_IN_POST_PROCESSING`` event (recorded just
after the metadata says so; the phase before it lasts ``--phase`` plus the simulator's own
work: ending sessions, copying data, moving names) to the same first write: noticing the
phase change (one ``bg_interval_high_ms`` poll at most) and moving the connection to green.

Invariant checked per run: every acknowledged write is on the green writer afterwards.

    python benchmarks/bluegreen_switchover.py                 # 5 runs, aurora-pg and aurora-mysql
    python benchmarks/bluegreen_switchover.py --runs 3 --flavours aurora-pg --phase 2

Exit status 1 if an invariant is missed or a write failed.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import resilient_db
from resilient_db import blue_green as bg
from simulator.cluster import Cluster, Timeline, connect_runtime

FLAVOURS = ("aurora-pg", "aurora-mysql")


@dataclass
class Workload:
    """One connection writing keys in a loop; each acknowledgement with its time and the
    address the connection was on."""

    conn: Any
    insert: str
    acks: list[tuple[int, float, str | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        plugin = self.conn.resilient.plugin("blue_green")
        key = 0
        while not self.stop.is_set():
            key += 1
            try:
                cur = self.conn.cursor()
                # Idempotent (a duplicate is ignored): a write whose session the switchover
                # ended is run again on green instead of surfacing as FailoverSuccessError.
                with resilient_db.call_options(idempotent=True):
                    cur.execute(self.insert, (key,))
                cur.close()
            except Exception as exc:  # recorded: a run with errors fails the benchmark
                self.errors.append(repr(exc))
                time.sleep(0.002)
                continue
            self.acks.append((key, time.monotonic(), plugin.address))


def one_run(flavour: str, phase: float) -> tuple[float, float, float]:
    """(pause, client share, longest gap between two acknowledgements) of one switchover,
    seconds."""
    import mysql.connector
    import psycopg

    pg = flavour.endswith("pg")
    target: Callable[..., Any] = psycopg.Connection.connect if pg else mysql.connector.connect
    extra: dict[str, Any] = {} if pg else {"use_pure": True}
    timeline = Timeline(switchover_phase=phase)
    with Cluster.start(flavour, readers=1, timeline=timeline) as blue, \
            Cluster.start(flavour, readers=1, port=blue.port, name=f"{blue.name}g") as green:
        setup = resilient_db.connect(target, **blue.connect_kwargs(), **extra, plugins="",
                                     autocommit=True)
        setup.cursor().execute("CREATE TABLE bg_bench (id BIGINT PRIMARY KEY)")
        setup.close()
        blue.create_blue_green(green)
        conn = resilient_db.connect(target, **blue.connect_kwargs(), **extra, plugins="bg",
                                    autocommit=True, bg_id=blue.name,
                                    bg_interval_baseline_ms=1000)
        monitor = next(m for m in bg.monitors() if m.bg_id == blue.name.lower())
        deadline = time.monotonic() + 30
        while monitor.status.phase is not bg.Phase.CREATED:
            if time.monotonic() > deadline:
                raise RuntimeError("the deployment was not noticed within 30 s")
            time.sleep(0.05)
        work = Workload(conn, "INSERT INTO bg_bench VALUES (%s) ON CONFLICT DO NOTHING" if pg
                        else "INSERT IGNORE INTO bg_bench VALUES (%s)")
        thread = threading.Thread(target=work.run, daemon=True)
        thread.start()
        time.sleep(0.5)
        events = blue.switchover()
        time.sleep(0.5)
        work.stop.set()
        thread.join(timeout=30)
        conn.close()
        started = next(e.mono for e in events if e.name == "switchover_phase"
                       and e.detail.get("phase") == "SWITCHOVER_IN_PROGRESS")
        post = next(e.mono for e in events if e.name == "switchover_phase"
                    and e.detail.get("phase") == "SWITCHOVER_IN_POST_PROCESSING")
        green_address = green.writer.address
        first = next(at for _, at, address in work.acks
                     if at >= started and address == green_address)
        times = [at for _, at, _ in work.acks]
        gap = max(b - a for a, b in itertools.pairwise(times))
        direct = connect_runtime(green.writer.runtime)
        try:
            cur = direct.cursor()
            cur.execute("SELECT id FROM bg_bench")
            present = {int(row[0]) for row in cur.fetchall()}
        finally:
            direct.close()
        lost = {key for key, _, _ in work.acks} - present
        if lost or work.errors:
            raise RuntimeError(f"{flavour}: {len(lost)} acknowledged writes missing on green, "
                               f"errors: {work.errors[:3]}")
        return first - started, first - post, gap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--flavours", nargs="+", default=list(FLAVOURS), choices=FLAVOURS)
    parser.add_argument("--phase", type=float, default=1.0,
                        help="length of each switchover phase in the simulator, seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    failed = False
    for flavour in args.flavours:
        pauses: list[float] = []
        shares: list[float] = []
        gaps: list[float] = []
        for run in range(args.runs):
            try:
                pause, share, gap = one_run(flavour, args.phase)
            except RuntimeError as exc:
                print(f"{flavour} run {run + 1}: FAILED: {exc}")
                failed = True
                continue
            pauses.append(pause)
            shares.append(share)
            gaps.append(gap)
            print(f"{flavour} run {run + 1}: pause {pause * 1000:.0f} ms (after POST was "
                  f"published: {share * 1000:.0f} ms), longest gap between writes "
                  f"{gap * 1000:.0f} ms")
        if pauses:
            print(f"{flavour}: median pause {statistics.median(pauses) * 1000:.0f} ms over "
                  f"{len(pauses)} runs (max {max(pauses) * 1000:.0f} ms; IN_PROGRESS set to "
                  f"{args.phase * 1000:.0f} ms); client share (POST published -> first write "
                  f"on green): median {statistics.median(shares) * 1000:.0f} ms, max "
                  f"{max(shares) * 1000:.0f} ms; median longest gap "
                  f"{statistics.median(gaps) * 1000:.0f} ms")
        resilient_db.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
