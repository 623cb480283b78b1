"""Connect-path costs of ``federated_auth`` (ADFS) and ``okta``.

Against the test identity provider (``tests/idp.py``, local HTTPS) and moto's STS in server
mode, for each plugin, medians in one process:

1. first connect: sign-in at the IdP, SAML checks, STS ``AssumeRoleWithSAML``, token signing
   (``--rounds`` rounds, caches cleared each time); loopback IdP and STS, so this is the
   client's own work plus two local servers, not a real IdP's latency;
2. a new token from cached temporary credentials (a failover's new instance, a refresh);
3. the connect hook with a cached token around a stub terminal, minus the stub alone,
   median of ``--batches`` batches of 2,000 calls (the ``iam`` budget: 200 µs).

    PYTHONPATH=. python benchmarks/federated_auth.py

Exit status 1 when the cached-token hook exceeds 200 µs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from resilient_db.auth import CREDENTIALS
from resilient_db.auth._federated import STS_CREDENTIALS
from tests import test_federated_auth as flow
from tests.aws import moto_server
from tests.idp import LocalIdp

BUDGET = 200e-6


def stub(ctx: Any) -> None:
    return None


def measure(code: str, idp: LocalIdp, rounds: int, batches: int) -> tuple[float, float, float]:
    plugin = flow.plugin_for(code, flow.settings_for(code, idp))
    first, again = [], []
    for _ in range(rounds):
        CREDENTIALS.clear()
        STS_CREDENTIALS.clear()
        start = time.perf_counter()
        plugin.connect(flow.connect_ctx(plugin), flow.Terminal())
        first.append(time.perf_counter() - start)
        CREDENTIALS.clear()
        start = time.perf_counter()
        plugin.connect(flow.connect_ctx(plugin), flow.Terminal())
        again.append(time.perf_counter() - start)
    ctx = flow.connect_ctx(plugin)
    hook = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(2000):
            plugin.connect(ctx, stub)
        wrapped = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(2000):
            stub(ctx)
        bare = time.perf_counter() - start
        hook.append((wrapped - bare) / 2000)
    return statistics.median(first), statistics.median(again), statistics.median(hook)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=7)
    args = parser.parse_args(argv)
    worst = 0.0
    with LocalIdp({flow.USER: flow.PASSWORD}) as idp, moto_server() as url:
        os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        for code in ("federated_auth", "okta"):
            first, again, hook = measure(code, idp, args.rounds, args.batches)
            worst = max(worst, hook)
            print(f"{code:15} first connect {first * 1e3:7.1f} ms | new token, cached STS "
                  f"credentials {again * 1e3:6.2f} ms | cached-token hook {hook * 1e6:6.1f} µs")
    CREDENTIALS.clear()
    STS_CREDENTIALS.clear()
    if worst > BUDGET:
        print(f"cached-token hook {worst * 1e6:.1f} µs over the {BUDGET * 1e6:.0f} µs budget")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
