"""The RDS failover harness's boto3 side against moto in server mode (a real HTTP endpoint):
selectors, targeted failover, reboot with waiters, events, and the actions RDS does not have.
moto has no databases behind its clusters, so the workload itself is not run here."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from chaos.control import ControlError, writer_spans
from chaos.rds import RdsControl

from .aws import aws_env, moto_server

pytestmark = pytest.mark.unit

CLUSTER = "chaos-aurora"
_clusters = itertools.count(1)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@dataclass
class Rds:
    client: Any
    cluster: str


@pytest.fixture
def rds(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Rds:
    aws_env(monkeypatch)
    client = boto3.client("rds", region_name="us-east-1", endpoint_url=moto_url)
    # A cluster per test (moto keeps deleted clusters' automatic snapshots by name).
    cluster = f"{CLUSTER}{next(_clusters)}"
    client.create_db_cluster(DBClusterIdentifier=cluster, Engine="aurora-postgresql",
                             MasterUsername="admin", MasterUserPassword="secret-password",
                             DatabaseName="app")
    for n in (1, 2, 3):
        client.create_db_instance(DBInstanceIdentifier=f"{cluster}-{n}",
                                  DBInstanceClass="db.r6g.large", Engine="aurora-postgresql",
                                  DBClusterIdentifier=cluster)
    return Rds(client, cluster)


def control(rds: Rds) -> RdsControl:
    return RdsControl(rds.cluster, engine="pg", user="app", password="pw", database="app",
                      client=rds.client, poll=0.05, timeout=10,
                      resolve_address=lambda name: "127.0.0.1")


def test_views_and_selectors(rds: Rds) -> None:
    ctl = control(rds)
    assert ctl.writer_id() == f"{rds.cluster}-1" == ctl.first_writer()
    assert ctl.resolve("writer") == f"{rds.cluster}-1"
    assert ctl.resolve("reader") == f"{rds.cluster}-2"
    assert ctl.resolve("reader-2") == f"{rds.cluster}-3"
    with pytest.raises(ControlError, match="has 2 reader"):
        ctl.resolve("reader-3")
    with pytest.raises(ControlError, match="no instance 'nope'"):
        ctl.resolve("nope")
    kwargs = ctl.connect_kwargs()
    assert kwargs["host"] == ctl.writer_endpoint and kwargs["dbname"] == "app"
    assert ctl.address(f"{rds.cluster}-2") == ("127.0.0.1", int(kwargs["port"]))
    assert "aurora_db_instance_identifier" in ctl.sql().insert


def test_targeted_failover_records_the_promotion(rds: Rds) -> None:
    ctl = control(rds)
    ctl.failover(f"{rds.cluster}-3", "graceful")
    assert ctl.writer_id() == f"{rds.cluster}-3"
    names = [(e["name"], e["instance"]) for e in ctl.events() if e["name"] != "rds_event"]
    assert names == [("failover_started", f"{rds.cluster}-1"), ("promoted", f"{rds.cluster}-3"),
                     ("topology_updated", f"{rds.cluster}-3")]
    spans = writer_spans(ctl.first_writer(), ctl.events())
    assert [s.instance for s in spans] == [f"{rds.cluster}-1", f"{rds.cluster}-3"]
    assert ctl.final_endpoint() == rds.client.describe_db_instances(
        DBInstanceIdentifier=f"{rds.cluster}-3")["DBInstances"][0]["Endpoint"]["Address"]
    with pytest.raises(Exception, match=r"[Cc]annot find target instance"):
        ctl.failover("missing-instance", "graceful")


def test_untargeted_failover_and_reboot(rds: Rds) -> None:
    ctl = control(rds)
    ctl.failover(None, "crash")
    assert ctl.writer_id() != f"{rds.cluster}-1"
    ctl.reboot(ctl.writer_id())
    names = [e["name"] for e in ctl.events() if e["name"] != "rds_event"]
    assert names[-2:] == ["reboot_started", "reboot_finished"]
    ctl.settle(10)


def test_actions_rds_does_not_have(rds: Rds) -> None:
    ctl = control(rds)
    with pytest.raises(ControlError, match="cannot kill"):
        ctl.kill(f"{rds.cluster}-1")
    with pytest.raises(ControlError, match="replica lag"):
        ctl.set_replica_lag(f"{rds.cluster}-2", 1.0)
    with pytest.raises(ControlError, match="DNS staleness"):
        ctl.set_dns_staleness(5.0)


def test_unknown_cluster(rds: Rds) -> None:
    with pytest.raises(Exception, match="nope"):
        RdsControl("nope", engine="pg", user="u", password="p", database="d", client=rds.client)
    with pytest.raises(ControlError, match="engine 'oracle'"):
        RdsControl(rds.cluster, engine="oracle", user="u", password="p", database="d",
                   client=rds.client)
