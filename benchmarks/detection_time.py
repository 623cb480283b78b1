"""Failure detection by the ``efm`` plugin on the simulator: a blackholed writer (real packet
loss, ``chaos.netfault``) is detected within the configured bound, and with a promotion some
seconds later the application's first write on the new writer follows ``promoted`` at once
(issue #5).

Method: one application connection through the cluster endpoint with
``plugins="failover,efm"`` writes idempotent inserts without pause from its own thread (the
writer of ``benchmarks/failover_time.py``). Each run blackholes the current writer's address
(every packet to and from it dropped), so the insert in flight hangs; ``PROMOTE_AFTER``
seconds later the simulator crashes that writer and promotes a reader (``Cluster.failover()``;
its control plane reaches PostgreSQL over Unix sockets and MariaDB by TCP to the *other*
instances, so the blackhole does not stop it), then the blackhole is removed (before the old
writer rejoins as a reader). Measured per run:

- detection: from the blackhole to the monitor's ``efm.host_down`` decision, against the bound
  ``grace + interval * count`` (``failure_detection_time_ms``, ``_interval_ms``, ``_count``);
  the statement in flight started at most a few microseconds before the blackhole;
- recovery: from the simulator's ``promoted`` event to the first acknowledged insert on the
  new writer;
- hangs: a run whose application does not write on the new writer within 30 s;
- sim publish: from ``promoted`` to the simulator's ``topology_updated`` (context: the failover
  plugin accepts a writer only once its own topology names it, so recovery cannot be shorter).
  On MariaDB it was ~2 s while the old writer stayed blackholed (re-pointing the other replica
  waited for ``STOP SLAVE``, stuck on the blackholed address) until the simulator stopped the
  replicas inside the detection window (``ClusterEngine.detach_replicas``): now tens of ms.
  ``--heal-at-promotion`` lifts the blackhole just before the promotion to show the client's
  part alone.

    python benchmarks/detection_time.py                  # 10 runs, aurora-pg and aurora-mysql
    python benchmarks/detection_time.py --runs 3 --flavours aurora-pg --grace 500
    python benchmarks/detection_time.py --registration   # per-statement cost of efm alone
    python benchmarks/detection_time.py --threads 8 --rows 2 --hold 3 --promote-after 3

Variant (issue #11, the last command): eight application threads, each on its own connection,
each running two-row transactions (a new cursor, ``BEGIN``, two idempotent inserts,
``COMMIT``; a transaction interrupted by a failover is run again whole); the promotion comes
3 s after the blackhole and the old writer stays blackholed ``--hold`` seconds after it (it
rejoins 1 s after the heal). Recovery is then measured to the first transaction committed on
the new writer by any thread; "all threads" is when the last of the eight committed its first
one there (context, no goal). mysql-connector makes round trips of ``cursor()`` (a ping) and
of session attributes (a ``SET``): before issue #11 nothing bounded them on a blackholed host.

Goals (issues #5 and #11): detection <= bound + 0.3 s in every run; recovery median <= 0.2 s
and max <= 0.5 s; zero hangs. Exit status 1 if one is missed.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import logging
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from failover_time import DNS_STALENESS, Flavour, Writer, _flavours, _settle

import resilient_db
from chaos.netfault import NetworkFaults
from simulator.cluster import Cluster, Timeline

DETECTION_MARGIN = 0.3
GOAL_MEDIAN = 0.2
GOAL_MAX = 0.5
PROMOTE_AFTER = 4.0
HANG_LIMIT = 30.0


@dataclass
class Result:
    flavour: str
    bound: float
    detection: list[float]
    recovery: list[float]
    published: list[float]  # promoted -> topology_updated (the simulator's own lag)
    hangs: int
    errors: dict[str, int]
    everyone: list[float] = field(default_factory=list)  # promoted -> last thread's first write


@dataclass
class TxApp:
    """The variant's application: ``threads`` threads, each on its own connection, each
    committing ``rows``-row transactions without pause and recording every commit."""

    conns: list[Any]
    flavour: Flavour
    rows: int
    acks: list[list[tuple[float, str]]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for index, conn in enumerate(self.conns):
            self.acks.append([])
            thread = threading.Thread(target=self._run, args=(index, conn),
                                      name=f"app-tx-{index}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self, index: int, conn: Any) -> None:
        state = conn.resilient.plugin("failover")
        acks = self.acks[index]
        key = index * 10**9
        while not self.stop.is_set():
            key += self.rows
            while not self.stop.is_set():
                try:
                    # A cursor per transaction, as applications do (mysql-connector's
                    # cursor() is a round trip: it pings the server).
                    cur = conn.cursor()
                    cur.execute("BEGIN")
                    for row in range(self.rows):
                        cur.execute(self.flavour.upsert, (key + row,))
                    conn.commit()
                    cur.close()
                    acks.append((time.monotonic(), str(state.instance_id)))
                    break
                except Exception as exc:  # the application runs the transaction again
                    name = type(exc).__name__
                    with self._lock:
                        self.errors[name] = self.errors.get(name, 0) + 1
                    with contextlib.suppress(Exception):
                        conn.rollback()
                    time.sleep(0.002)

    def _firsts_on(self, instance: str, after: float) -> list[float | None]:
        firsts: list[float | None] = []
        for acks in self.acks:
            found = None
            # Sorted by time (one thread appends); a slice is a copy taken under the GIL.
            for mono, inst in acks[bisect.bisect_left(acks, (after, "")):]:
                if inst == instance:
                    found = mono
                    break
            firsts.append(found)
        return firsts

    def first_ack_on(self, instance: str, after: float) -> float | None:
        found = [m for m in self._firsts_on(instance, after) if m is not None]
        return min(found) if found else None

    def all_acked_on(self, instance: str, after: float) -> float | None:
        """When the last thread committed its first transaction on ``instance`` (``None``:
        some thread has not yet)."""
        firsts = self._firsts_on(instance, after)
        return None if any(m is None for m in firsts) else max(m for m in firsts if m)


def run_flavour(flavour: Flavour, runs: int, grace: float, interval: float,
                count: int, *, heal_first: bool = False, threads: int = 1, rows: int = 1,
                hold: float = 0.0, promote_after: float = PROMOTE_AFTER,
                plugins: str = "failover,efm") -> Result:
    """``threads``/``rows`` other than 1: the :class:`TxApp` workload; ``hold``: seconds the
    old writer stays blackholed after the promotion (0: healed as soon as it is promoted)."""
    # The old writer rejoins (MariaDB: by TCP to it) only once the blackhole is lifted.
    timeline = Timeline(detection_delay=0.2, dns_staleness=DNS_STALENESS,
                        rejoin_delay=max(0.5, hold + 1.0))
    sink = resilient_db.CollectingSink()
    resilient_db.set_decision_sink(sink)
    detection: list[float] = []
    recovery: list[float] = []
    everyone: list[float] = []
    published: list[float] = []
    hangs = 0
    with Cluster.start(flavour.name, readers=2, timeline=timeline) as cluster, \
            NetworkFaults() as faults:
        kwargs: dict[str, Any] = {**cluster.connect_kwargs(), **flavour.extra,
                                  "autocommit": True}
        setup = resilient_db.connect(flavour.connect, plugins="", **kwargs)
        setup.cursor().execute(flavour.create)
        setup.close()
        conns = [resilient_db.connect(
            flavour.connect, plugins=plugins, failure_detection_time_ms=grace * 1000,
            failure_detection_interval_ms=interval * 1000, failure_detection_count=count,
            **kwargs) for _ in range(threads)]
        app: Writer | TxApp
        if threads == 1 and rows == 1:
            app = Writer(conns[0], flavour)
        else:
            app = TxApp(conns, flavour, rows)
        app.start()
        try:
            for run in range(runs):
                _settle(cluster, flavour.name)
                writer = cluster.writer
                seen = len(sink.decisions)
                fault = faults.blackhole(writer.address)
                time.sleep(promote_after)
                if heal_first:
                    faults.heal(fault)
                events = cluster.failover()
                promo = next(e for e in events if e.name == "promoted")
                if not hold:
                    faults.heal(fault)
                topo = next(e for e in events if e.name == "topology_updated")
                published.append(topo.mono - promo.mono)
                deadline = time.monotonic() + HANG_LIMIT
                first = None
                while time.monotonic() < deadline:
                    if hold and fault.active and time.monotonic() >= promo.mono + hold:
                        faults.heal(fault)
                    if first is None:
                        first = app.first_ack_on(str(promo.instance), promo.mono)
                    if first is not None and (not isinstance(app, TxApp)
                                              or app.all_acked_on(str(promo.instance),
                                                                  promo.mono) is not None):
                        break
                    time.sleep(0.005)
                if fault.active:
                    while time.monotonic() < promo.mono + hold:
                        time.sleep(0.01)
                    faults.heal(fault)
                down = [d for d in sink.decisions[seen:] if d.kind == "efm.host_down"]
                if down:
                    detection.append(down[0].at - fault.applied_mono)
                if first is None:
                    hangs += 1
                    print(f"{flavour.name} run {run + 1}: no write on {promo.instance} within "
                          f"{HANG_LIMIT:g} s", file=sys.stderr)
                    continue
                recovery.append(first - promo.mono)
                if isinstance(app, TxApp):
                    last = app.all_acked_on(str(promo.instance), promo.mono)
                    if last is not None:
                        everyone.append(last - promo.mono)
                if not down:
                    print(f"{flavour.name} run {run + 1}: the blackhole was not detected "
                          "(the failover came first)", file=sys.stderr)
        finally:
            if isinstance(app, TxApp):
                app.join(HANG_LIMIT)
            else:
                app.stop.set()
                if app.thread is not None:
                    app.thread.join(HANG_LIMIT)
            for conn in conns:
                conn.close()
    resilient_db.set_decision_sink(None)
    return Result(flavour.name, grace + interval * count, detection, recovery, published,
                  hangs, dict(app.errors), everyone)


def registration_cost(calls: int = 1_000_000) -> tuple[float, float]:
    """Seconds per call of the innermost execute layer without and with ``efm`` around a
    driver call that does nothing: what registering a statement as in flight costs, without
    the noise of a server round trip."""
    import timeit

    from resilient_db._pipeline import RUN_CALL, Call, Op, PluginContext
    from resilient_db._properties import Settings
    from resilient_db.drivers.psycopg import PsycopgDriver
    from resilient_db.plugins.efm import EfmPlugin

    class Proxy:  # what the layer reads from the connection proxy
        def __init__(self) -> None:
            self._raw = object()
            self._host = None

    proxy = Proxy()
    plugin = EfmPlugin(PluginContext(Settings({}), PsycopgDriver(), None))  # type: ignore[arg-type]
    plugin.attached = True  # as if attached to a monitor (no thread needed for this measure)
    layer = plugin.wrap_execute(RUN_CALL)

    def driver_call(query: object, params: object) -> None:
        return None

    call = Call(Op.EXECUTE, "Cursor.execute", driver_call, ("SELECT 1", None), {}, proxy)
    bare = min(timeit.repeat(lambda: RUN_CALL(call), number=calls, repeat=7)) / calls
    with_efm = min(timeit.repeat(lambda: layer(call), number=calls, repeat=7)) / calls
    return bare, with_efm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--flavours", default="aurora-pg,aurora-mysql")
    parser.add_argument("--grace", type=float, default=1000, help="failure_detection_time_ms")
    parser.add_argument("--interval", type=float, default=500,
                        help="failure_detection_interval_ms")
    parser.add_argument("--count", type=int, default=3, help="failure_detection_count")
    parser.add_argument("--heal-at-promotion", action="store_true",
                        help="lift the blackhole just before the promotion (see the docs)")
    parser.add_argument("--threads", type=int, default=1,
                        help="application threads, one connection each (variant: 8)")
    parser.add_argument("--rows", type=int, default=1,
                        help="rows per transaction (1 with 1 thread: autocommit inserts)")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="seconds the old writer stays blackholed after the promotion")
    parser.add_argument("--plugins", default="failover,efm",
                        help="the application connections' plugins")
    parser.add_argument("--promote-after", type=float, default=PROMOTE_AFTER,
                        help="seconds from the blackhole to the crash and promotion")
    parser.add_argument("--registration", action="store_true",
                        help="only measure the per-statement cost of efm (no servers)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log decisions (INFO)")
    args = parser.parse_args(argv)
    if args.registration:
        bare, with_efm = registration_cost()
        print(f"innermost layer, no-op driver call: {bare * 1e9:.0f} ns bare, "
              f"{with_efm * 1e9:.0f} ns with efm: registration costs "
              f"{(with_efm - bare) * 1e9:.0f} ns per statement")
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(relativeCreated)7.0f %(name)s %(message)s")
    logging.getLogger("resilient_db.simulator").setLevel(logging.WARNING)
    flavours = _flavours()
    results = []
    for name in [f.strip() for f in args.flavours.split(",") if f.strip()]:
        if name not in flavours:
            parser.error(f"unknown flavour {name!r}; expected {', '.join(flavours)}")
        results.append(run_flavour(flavours[name], args.runs, args.grace / 1000,
                                   args.interval / 1000, args.count,
                                   heal_first=args.heal_at_promotion, threads=args.threads,
                                   rows=args.rows, hold=args.hold,
                                   promote_after=args.promote_after, plugins=args.plugins))
    resilient_db.shutdown()
    print(f"blackholed writer, promotion {args.promote_after:g} s later; {args.runs} runs each; "
          f"grace {args.grace:g} ms, interval {args.interval:g} ms, count {args.count}; "
          f"{args.threads} thread(s), {args.rows} row(s) per transaction; blackhole "
          + (f"held {args.hold:g} s after the promotion" if args.hold else
             "lifted at the promotion"))
    print(f"{'flavour':<14} {'bound s':>8} {'detect med':>11} {'detect max':>11} "
          f"{'promoted->write med':>20} {'max':>7} {'all threads med':>16} {'max':>7} "
          f"{'sim publish med':>16} {'hangs':>6}  app errors seen")
    ok = True
    for r in results:
        detected_ok = (len(r.detection) == args.runs
                       and max(r.detection) <= r.bound + DETECTION_MARGIN)
        recovered_ok = (bool(r.recovery) and statistics.median(r.recovery) <= GOAL_MEDIAN
                        and max(r.recovery) <= GOAL_MAX)
        met = detected_ok and recovered_ok and r.hangs == 0
        ok = ok and met
        det_med = statistics.median(r.detection) if r.detection else float("nan")
        det_max = max(r.detection) if r.detection else float("nan")
        rec_med = statistics.median(r.recovery) if r.recovery else float("nan")
        rec_max = max(r.recovery) if r.recovery else float("nan")
        pub_med = statistics.median(r.published) if r.published else float("nan")
        all_med = statistics.median(r.everyone) if r.everyone else float("nan")
        all_max = max(r.everyone) if r.everyone else float("nan")
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(r.errors.items())) or "-"
        print(f"{r.flavour:<14} {r.bound:8.3f} {det_med:11.3f} {det_max:11.3f} "
              f"{rec_med:20.3f} {rec_max:7.3f} {all_med:16.3f} {all_max:7.3f} "
              f"{pub_med:16.3f} {r.hangs:6d}  {errors}"
              + ("" if met else "  MISSED"))
    print(f"(goals: detection <= bound + {DETECTION_MARGIN} s in every run; promoted -> first "
          f"write median <= {GOAL_MEDIAN} s, max <= {GOAL_MAX} s; no hang. sim publish: "
          "promoted -> topology_updated inside the simulator's failover, which the client "
          "cannot beat: a writer is accepted only once its own topology names it; all "
          "threads: promoted -> every thread committed once on the new writer, context)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
