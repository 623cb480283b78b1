"""Cost of the watchdog and of the statement-deadline stage, without any I/O.

    python benchmarks/watchdog.py                  # median of 15 batches of 100,000
    python benchmarks/watchdog.py --pending 1000   # with 1,000 other deadlines armed

1. One ``arm`` + ``disarm`` pair on a watchdog: a deadline 30 s ahead (it never fires),
   ``time.monotonic()`` included. ``--pending`` keeps that many other far deadlines armed
   meanwhile (the heap cost grows as log n). This is what a per-query user of the watchdog
   (a failure monitor registering in-flight connections) pays.
2. The deadline stage around a no-op "driver call" with ``socket_timeout`` set, and with no
   deadline in force: what a statement pays on top of the pipeline. The stage does not arm
   per statement (one lazily re-armed entry per connection, see resilient_db/_deadline.py).

Wall-clock numbers in a tight loop: on the real path (with driver I/O between calls, cold
caches) they are higher; ``benchmarks/overhead.py`` measures that end to end.
"""

from __future__ import annotations

import argparse
import statistics
import time

from resilient_db._deadline import DeadlineStage
from resilient_db._params import SOCKET_TIMEOUT
from resilient_db._pipeline import RUN_CALL, Call, HostSpec, Op, PluginContext
from resilient_db._properties import Settings
from resilient_db.drivers import get_driver
from resilient_db.watchdog import Watchdog


def _noop() -> None:
    return None


def measure(batches: int, size: int, pending: int) -> list[float]:
    wd = Watchdog(name="resilient_db-watchdog-bench")
    far = time.monotonic() + 3600
    others = [wd.arm(far + i, _noop) for i in range(pending)]
    arm, disarm, monotonic = wd.arm, wd.disarm, time.monotonic
    results = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(size):
            disarm(arm(monotonic() + 30.0, _noop))
        results.append((time.perf_counter() - start) / size * 1e6)
    for armed in others:
        wd.disarm(armed)
    wd.stop()
    return results


class _Proxy:
    _raw = None
    _host = HostSpec("bench", 1)


def measure_stage(batches: int, size: int, timeout: float | None) -> list[float]:
    values = {} if timeout is None else {SOCKET_TIMEOUT: timeout}
    ctx = PluginContext(Settings(values), get_driver("psycopg"), HostSpec("bench", 1))
    handler = DeadlineStage(ctx).wrap_execute(RUN_CALL)
    call = Call(Op.EXECUTE, "Cursor.execute", _noop, (), {}, _Proxy())
    results = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(size):
            handler(call)
        results.append((time.perf_counter() - start) / size * 1e6)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=15)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--pending", type=int, default=0)
    args = parser.parse_args()
    results = measure(args.batches, args.size, args.pending)
    print(f"arm+disarm pair: median {statistics.median(results):.3f} µs "
          f"(min {min(results):.3f}, max {max(results):.3f}; {args.batches} batches of "
          f"{args.size:,}; {args.pending} other deadlines pending)")
    base = measure_stage(args.batches, args.size, None)
    timed = measure_stage(args.batches, args.size, 30.0)
    print(f"deadline stage, no deadline in force: median {statistics.median(base):.3f} µs "
          "per call (no-op driver call included)")
    print(f"deadline stage, socket_timeout=30:    median {statistics.median(timed):.3f} µs "
          "per call (no-op driver call included)")


if __name__ == "__main__":
    main()
