"""Credential-provider benchmarks for the ``iam`` plugin (issue #12's "Done when").

1. Token generation under a connect storm: ``--rate`` connects per second (default 200) for
   ``--seconds`` (default 10) through ``plugins="iam"`` to a real PostgreSQL server, from
   ``--threads`` threads (paced: each connect has its slot in time). Every token is generated
   by boto3's real ``generate_db_auth_token`` (local SigV4 signing with test credentials) and
   counted per (host, user). The server is a throwaway one with a password user, so the
   login itself uses the server's password (the counted token is signed and discarded): the
   point is how often tokens are *generated*, not the server's IAM check (tests/test_iam_real.py
   covers that). Run once with the default ``iam_expiration`` (870 s: expect one token) and
   once with ``--short-expiration`` (default 2 s: expect at most one token per refresh
   window, ``expiration - refresh_before``, plus the first).
2. Connect overhead with a cached token: the ``iam`` plugin's connect hook around a stub
   terminal (returns at once, no I/O) against the stub alone, interleaved, median of
   ``--batches`` batches of 2,000 calls, in µs. Budget: 200 µs (0.2 ms).

    PYTHONPATH=. python benchmarks/auth.py          # from the repository root
    PYTHONPATH=. python benchmarks/auth.py --rate 100 --seconds 5 --threads 4

Exit status 1 when a limit is exceeded.
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import sys
import threading
import time
from typing import Any

import psycopg

import resilient_db
from resilient_db._pipeline import ConnectContext, HostSpec, PluginContext
from resilient_db._properties import Settings, lookup
from resilient_db.auth import CREDENTIALS
from resilient_db.drivers import driver_for
from resilient_db.plugins import iam
from resilient_db.plugins.iam import IamPlugin

NAME = "bench.cluster-abc123.us-east-1.rds.amazonaws.com"
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


class CountingTokens:
    """boto3's real generator, counted per (host, user); returns ``login`` for the server."""

    def __init__(self, login: str) -> None:
        self.login = login
        self.count: collections.Counter[tuple[str, str]] = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int, user: str, region: str) -> str:
        token = iam.boto3_token(host, port, user, region)
        assert token.startswith(f"{host}:{port}/?Action=connect")
        with self.lock:
            self.count[(host, user)] += 1
        return self.login


def storm(kwargs: dict[str, Any], rate: float, seconds: float, threads: int,
          expiration: float) -> dict[str, Any]:
    tokens = CountingTokens(str(kwargs["password"]))
    IamPlugin.generate = tokens
    CREDENTIALS.clear()
    args = {k: v for k, v in kwargs.items() if k != "password"}
    total = int(rate * seconds)
    slots = iter(range(total))
    slots_lock = threading.Lock()
    errors: list[BaseException] = []
    lateness: list[float] = []
    start = time.monotonic() + 0.2

    def worker() -> None:
        while True:
            with slots_lock:
                slot = next(slots, None)
            if slot is None:
                return
            due = start + slot / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                lateness.append(-delay)
            try:
                resilient_db.connect(psycopg.Connection.connect, plugins="iam",
                                     iam_host=NAME, iam_expiration=expiration, **args).close()
            except BaseException as exc:
                errors.append(exc)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - start
    refresh_before = min(60.0, expiration * 0.1)
    window = expiration - refresh_before
    allowed = 1 + math.floor(elapsed / window)
    worst = max(tokens.count.values(), default=0)
    return {"connects": total - len(errors), "errors": len(errors),
            "first_error": repr(errors[0]) if errors else None,
            "seconds": round(elapsed, 2), "achieved_rate": round(total / elapsed, 1),
            "late_slots": len(lateness), "iam_expiration": expiration,
            "refresh_window": round(window, 2), "tokens_per_host_user": dict(
                (f"{h}/{u}", n) for (h, u), n in tokens.count.items()),
            "allowed_per_host_user": allowed, "ok": worst <= allowed and not errors}


def hook_overhead(batches: int, per_batch: int = 2000) -> dict[str, Any]:
    """µs per connect: the iam plugin's hook around a stub terminal vs the stub alone, with
    the token cached."""
    IamPlugin.generate = lambda host, port, user, region: "cached-token"
    CREDENTIALS.clear()
    target: Any = psycopg.Connection.connect
    driver = driver_for(target, None)
    prop = lookup("iam_region")
    assert prop is not None
    settings = Settings({prop: "us-east-1"})
    host = HostSpec(NAME, 5432)
    plugin = IamPlugin(PluginContext(settings, driver, host))
    ctx = ConnectContext(host, {"host": NAME, "port": 5432, "user": "app", "dbname": "app"},
                         settings, driver, target)
    sentinel = object()

    def stub(_: ConnectContext) -> Any:
        return sentinel

    assert plugin.connect(ctx, stub) is sentinel  # generates and caches the token
    clock = time.perf_counter
    hook = plugin.connect
    bare, wrapped = [], []
    for _ in range(batches):
        t0 = clock()
        for _ in range(per_batch):
            stub(ctx)
        t1 = clock()
        for _ in range(per_batch):
            hook(ctx, stub)
        t2 = clock()
        bare.append((t1 - t0) / per_batch * 1e6)
        wrapped.append((t2 - t1) / per_batch * 1e6)
    overhead = [w - b for w, b in zip(wrapped, bare, strict=True)]
    median = statistics.median(overhead)
    return {"stub_us": round(statistics.median(bare), 3),
            "iam_hook_us": round(statistics.median(wrapped), 3),
            "overhead_us": round(median, 2), "budget_us": 200.0, "ok": median <= 200.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--short-expiration", type=float, default=2.0)
    parser.add_argument("--batches", type=int, default=9)
    options = parser.parse_args(argv)

    import os

    for key, value in TEST_CREDENTIALS.items():
        os.environ[key] = value
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(key, None)
    from simulator.local import start_postgres

    ok = True
    print("connect overhead of iam with a cached token (stub terminal):")
    result = hook_overhead(options.batches)
    print(f"  {result}")
    ok &= result["ok"]
    with start_postgres() as server:
        kwargs = dict(server.connect_kwargs())
        for expiration in (870.0, options.short_expiration):
            print(f"{options.rate:g} connects/s for {options.seconds:g} s through iam, "
                  f"iam_expiration={expiration:g}:")
            result = storm(kwargs, options.rate, options.seconds, options.threads, expiration)
            print(f"  {result}")
            ok &= result["ok"]
    resilient_db.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
