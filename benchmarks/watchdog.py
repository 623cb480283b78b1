"""Cost of one watchdog arm + disarm pair (the per-statement price of a deadline).

    python benchmarks/watchdog.py                  # median of 15 batches of 100,000 pairs
    python benchmarks/watchdog.py --pending 1000   # with 1,000 other deadlines armed

Each pair arms a deadline 30 s ahead (so it never fires) and disarms it, as the deadline stage
does around every statement; ``time.monotonic()`` is included, as on the real path. Prints
µs per pair; ``--pending`` keeps that many other far deadlines armed meanwhile (the heap cost
grows as log n).
"""

from __future__ import annotations

import argparse
import statistics
import time

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


if __name__ == "__main__":
    main()
