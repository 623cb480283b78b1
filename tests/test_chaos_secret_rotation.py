"""The ``secret-rotation`` chaos scenario on a small budget, on real simulated clusters
(Aurora PostgreSQL and the Aurora MySQL look-alike): the application logs in with a Secrets
Manager secret (moto in server mode) and reconnects often; the secret and the database
password are rotated twice under load, with a writer failover in between. Every rotation is
bridged by one refetch-and-retry; no login is refused for good; nothing is lost."""

from __future__ import annotations

import dataclasses

import pytest

import resilient_db
from chaos.fixtures import ChaosRun, assert_passed, chaos_run
from chaos.scenario import load
from resilient_db.auth import CREDENTIALS

__all__ = ["chaos_run"]  # the fixture, imported for this module

pytestmark = [pytest.mark.real_server, pytest.mark.chaos]

#: What a refused login says (PostgreSQL, MariaDB).
_AUTH_TEXT = ("authentication failed", "Access denied")


@pytest.mark.parametrize("flavour", ["pg", "mysql"])
def test_secret_rotation_under_load(chaos_run: ChaosRun, flavour: str,
                                    sink: resilient_db.CollectingSink) -> None:
    scenario = load("secret-rotation")
    scenario = dataclasses.replace(
        scenario, duration=7.5,
        workload=dataclasses.replace(scenario.workload, threads=3))
    CREDENTIALS.clear()
    result = chaos_run(scenario, flavour=flavour)
    assert_passed(result)
    data = result.data
    assert [e["name"] for e in data["events"]].count("secret_rotated") == 2
    metrics = data["metrics"]
    assert metrics["writes_acknowledged"] > 100, result.summary()
    # The only errors are the failover's (a statement replaced, connects refused by the
    # crashed writer); never a refused login.
    for kind in metrics["errors_by_kind"]:
        assert kind.startswith("connect:") or kind.endswith("FailoverSuccessError"), kind
    for sample in metrics["error_samples"].values():
        assert not any(text in sample for text in _AUTH_TEXT), sample
    decisions = [d for d in sink.decisions if d.plugin == "aws_secrets_manager"]
    retried = [d for d in decisions if d.kind == "auth.retried"]
    failed = [d for d in decisions if d.kind == "auth.failed"]
    assert failed == []
    # Each rotation was met by a connect with the cached old password (the rotations really
    # happened under the workload) and bridged by a refetch; the secret is fetched per
    # rotation, not per connect.
    assert len(retried) >= 2, [d.attributes for d in retried]
    connects = [d for d in decisions if d.kind == "auth.credential"]
    assert len(connects) > 50
    assert 3 <= CREDENTIALS.fetches <= 1 + len(retried)
    # Not only the application's connects through the cluster endpoint: the topology
    # monitor's and failover's connections to instance endpoints log in with the secret too.
    addresses = {d.attributes["server.address"] for d in connects}
    assert len(addresses) >= 2, addresses
    print(f"{flavour}: {len(connects)} connects, {len(retried)} retried, "
          f"{CREDENTIALS.fetches} fetches, errors {metrics['errors_by_kind']}, "
          f"addresses {sorted(addresses)}")
