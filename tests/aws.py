"""AWS APIs for the tests: moto in server mode (a real HTTP endpoint on loopback).

moto stands in only for what cannot exist on this machine (the AWS control plane: RDS, STS,
Secrets Manager, IAM); the databases behind it are the simulator's real servers. Every client
made here talks to the server over HTTP, exactly as boto3 talks to AWS, so retries, signing
and (de)serialisation are exercised for real.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

__all__ = ["TEST_CREDENTIALS", "ClusterEndpoints", "aws_env", "cluster_endpoints", "mirror_cluster",
           "moto_server"]

#: The credentials every test client signs with (moto accepts any; the simulator's IAM
#: verifier re-derives signatures with these).
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    """Start a moto server on a free loopback port; yields its endpoint URL."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point boto3's default credential chain at :data:`TEST_CREDENTIALS` for one test
    (never at a developer's real profile)."""
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)


# --- Aurora custom endpoints in moto ---------------------------------------------------------


class ClusterEndpoints:
    """The RDS custom endpoint API (``CreateDBClusterEndpoint``, ``ModifyDBClusterEndpoint``,
    ``DeleteDBClusterEndpoint``, ``DescribeDBClusterEndpoints``) on the in-process moto server,
    which has none (moto 5.2 models DB clusters but not their custom endpoints). Installed by
    :func:`cluster_endpoints`; the answers are serialised by moto from botocore's own model,
    so clients see the real wire format. ``calls`` counts requests per action (the tests
    count ``DescribeDBClusterEndpoints`` calls); endpoints belong to a DB cluster created in
    moto first (``create_db_cluster``), as in RDS."""

    ACTIONS = ("create_db_cluster_endpoint", "modify_db_cluster_endpoint",
               "delete_db_cluster_endpoint", "describe_db_cluster_endpoints")

    def __init__(self) -> None:
        self.endpoints: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()
        #: ``DescribeDBClusterEndpoints`` calls per endpoint identifier asked for.
        self.described: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle(self, response: Any, action: str) -> Any:
        from moto.core.responses import ActionResult
        from moto.rds.exceptions import DBClusterNotFoundError, RDSClientError

        params = response.params
        scope = (response.current_account, response.region)
        with self._lock:
            self.calls[action] += 1
            if action == "describe_db_cluster_endpoints":
                wanted = params.get("db_cluster_endpoint_identifier")
                self.described[str(wanted).lower()] += 1
                cluster = params.get("db_cluster_identifier")
                types = {v.lower() for f in params.get("filters", []) or []
                         if f["name"] == "db-cluster-endpoint-type" for v in f["values"]}
                found = [dict(e) for (account, region, name), e in self.endpoints.items()
                         if (account, region) == scope
                         and (wanted is None or name == wanted.lower())
                         and (cluster is None or e["DBClusterIdentifier"] == cluster)
                         and (not types or "custom" in types)]
                return ActionResult({"DBClusterEndpoints": found})
            name = str(params.get("db_cluster_endpoint_identifier", "")).lower()
            key = (*scope, name)
            if action == "create_db_cluster_endpoint":
                cluster = params["db_cluster_identifier"]
                if cluster not in response.backend.clusters:
                    raise DBClusterNotFoundError(cluster)
                if key in self.endpoints:
                    raise RDSClientError("DBClusterEndpointAlreadyExistsFault",
                                         f"DBClusterEndpoint {name} already exists.")
                self.endpoints[key] = {
                    "DBClusterEndpointIdentifier": name, "DBClusterIdentifier": cluster,
                    "Endpoint": f"{name}.cluster-custom-moto.{response.region}.rds.amazonaws.com",
                    "Status": "available", "EndpointType": "CUSTOM",
                    "CustomEndpointType": params["endpoint_type"],
                    "StaticMembers": list(params.get("static_members") or []),
                    "ExcludedMembers": list(params.get("excluded_members") or [])}
                return ActionResult(dict(self.endpoints[key]))
            endpoint = self.endpoints.get(key)
            if endpoint is None:
                raise RDSClientError("DBClusterEndpointNotFoundFault",
                                     f"DBClusterEndpoint {name} not found.")
            if action == "delete_db_cluster_endpoint":
                del self.endpoints[key]
                return ActionResult(dict(endpoint))
            if params.get("endpoint_type"):
                endpoint["CustomEndpointType"] = params["endpoint_type"]
            if params.get("static_members") is not None:
                endpoint["StaticMembers"] = list(params["static_members"])
                endpoint["ExcludedMembers"] = []
            if params.get("excluded_members") is not None:
                endpoint["ExcludedMembers"] = list(params["excluded_members"])
                endpoint["StaticMembers"] = []
            return ActionResult(dict(endpoint))


@contextmanager
def cluster_endpoints() -> Iterator[ClusterEndpoints]:
    """Install :class:`ClusterEndpoints` on moto's RDS responses for the block (the moto
    server of :func:`moto_server` runs in this process)."""
    from moto.rds.responses import RDSResponse

    store = ClusterEndpoints()
    for action in ClusterEndpoints.ACTIONS:
        def method(self: Any, action: str = action) -> Any:
            return store.handle(self, action)
        setattr(RDSResponse, action, method)
    try:
        yield store
    finally:
        for action in ClusterEndpoints.ACTIONS:
            delattr(RDSResponse, action)


def mirror_cluster(rds: Any, cluster: Any) -> None:
    """Create the simulated ``cluster`` (a ``simulator.cluster.Cluster``) in the RDS API
    stand-in: a DB cluster named like it, with its custom endpoints. (Not its instances: the
    simulator names every cluster's instances ``instance-N``, and RDS instance identifiers
    are unique per region.)"""
    engine = "aurora-postgresql" if cluster.flavour.engine == "postgresql" else "aurora-mysql"
    rds.create_db_cluster(DBClusterIdentifier=cluster.name, Engine=engine,
                          MasterUsername="admin", MasterUserPassword="password123")
    for endpoint in cluster.describe_custom_endpoints():
        members = ({"StaticMembers": endpoint["StaticMembers"]} if endpoint["StaticMembers"]
                   else {"ExcludedMembers": endpoint["ExcludedMembers"]})
        rds.create_db_cluster_endpoint(
            DBClusterIdentifier=cluster.name,
            DBClusterEndpointIdentifier=endpoint["DBClusterEndpointIdentifier"],
            EndpointType=endpoint["CustomEndpointType"], **members)
