"""The RDS failover harness: :class:`RdsControl` runs chaos scenarios against a real Aurora or
RDS Multi-AZ DB cluster through boto3, with the same runner, workload, invariants and reports
as the simulator.

    python -m chaos run writer-crash --rds-cluster my-aurora --region eu-west-1 \\
        --db-user app --db-password ... --db-name app --flavour pg

Control-plane actions map to the RDS API: ``failover`` -> ``FailoverDBCluster`` (with
``TargetDBInstanceIdentifier`` for a targeted failover; RDS has no "crash" mode, so ``mode``
is ignored), ``reboot`` -> ``RebootDBInstance``; each waits (polling
``DescribeDBClusters``/``DescribeDBInstances``, and boto3's ``db_instance_available`` /
``db_cluster_available`` waiters) until the change is visible. ``kill``, ``replica_lag`` and
``dns_staleness`` do not exist on RDS and raise :class:`chaos.control.ControlError`. Network
toxics work with the local backend (iptables on the machine running the workload, against
the instance's resolved address: real packet loss between this client and the instance).

Events: the harness records ``failover_started``, ``promoted`` (when ``DescribeDBClusters``
first shows the new writer), ``reboot_started``/``reboot_finished`` and the fault events,
and adds the cluster's and instances' RDS events (``DescribeEvents``) with their message
under the name ``rds_event``.

Tested here against moto in server mode (``tests/test_chaos_rds.py``): the API calls,
waiters and event mapping. Never run against a real AWS account from this machine (no
credentials): the timings of a real failover are not verified here.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from chaos.control import ControlError, EngineSql, engine_sql

__all__ = ["RdsControl"]

LOGGER = logging.getLogger("chaos.rds")

#: SQL naming the executing instance on real Aurora, per engine.
AURORA_INSTANCE_FN = {"pg": "pg_catalog.aurora_db_instance_identifier()",
                      "mysql": "@@aurora_server_id"}


class RdsControl:
    """Control of a real Aurora/RDS DB cluster through boto3. ``client``: a boto3 RDS client
    (default: one for ``region``, with ``endpoint_url`` if given, e.g. a moto server)."""

    def __init__(self, cluster_id: str, *, engine: str, user: str, password: str,
                 database: str, region: str | None = None, endpoint_url: str | None = None,
                 client: Any = None, poll: float = 5.0, timeout: float = 1800.0,
                 resolve_address: Callable[[str], str] = socket.gethostbyname) -> None:
        if engine not in ("pg", "mysql"):
            raise ControlError(f"engine {engine!r}: expected pg or mysql")
        if client is None:
            import boto3

            client = boto3.client("rds", region_name=region, endpoint_url=endpoint_url)
        self.client = client
        self.cluster_id = cluster_id
        self.engine = engine
        self.user, self.password, self.database = user, password, database
        self.poll, self.timeout = poll, timeout
        self._resolve_address = resolve_address
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._started_wall = time.time()
        cluster = self._cluster()
        self.description = f"RDS {cluster.get('Engine', '?')} cluster {cluster_id}"
        self._first = self.writer_id()

    # -- API views ---------------------------------------------------------------------------

    def _cluster(self) -> dict[str, Any]:
        found = self.client.describe_db_clusters(DBClusterIdentifier=self.cluster_id)
        clusters = found.get("DBClusters", [])
        if not clusters:
            raise ControlError(f"RDS cluster {self.cluster_id!r} not found")
        return dict(clusters[0])

    def _members(self) -> list[dict[str, Any]]:
        return sorted(self._cluster().get("DBClusterMembers", []),
                      key=lambda m: str(m["DBInstanceIdentifier"]))

    def _instance(self, instance_id: str) -> dict[str, Any]:
        found = self.client.describe_db_instances(DBInstanceIdentifier=instance_id)
        return dict(found["DBInstances"][0])

    def sql(self) -> EngineSql:
        return engine_sql(self.engine, instance_fn=AURORA_INSTANCE_FN[self.engine])

    def connect_kwargs(self, endpoint: str | None = None) -> dict[str, Any]:
        cluster = self._cluster()
        key = "dbname" if self.engine == "pg" else "database"
        return {"host": endpoint or cluster["Endpoint"], "port": int(cluster["Port"]),
                "user": self.user, "password": self.password, key: self.database}

    @property
    def writer_endpoint(self) -> str:
        return str(self._cluster()["Endpoint"])

    @property
    def reader_endpoint(self) -> str:
        return str(self._cluster().get("ReaderEndpoint") or self._cluster()["Endpoint"])

    def writer_id(self) -> str:
        for member in self._members():
            if member.get("IsClusterWriter"):
                return str(member["DBInstanceIdentifier"])
        raise ControlError(f"RDS cluster {self.cluster_id} has no writer right now")

    def first_writer(self) -> str:
        return self._first

    def instance_ids(self) -> list[str]:
        return [str(m["DBInstanceIdentifier"]) for m in self._members()]

    def resolve(self, selector: str) -> str:
        members = self._members()
        if selector == "writer":
            return self.writer_id()
        readers = [str(m["DBInstanceIdentifier"]) for m in members
                   if not m.get("IsClusterWriter")]
        if selector == "reader" or selector.startswith("reader-"):
            index = 1 if selector == "reader" else int(selector.split("-", 1)[1] or 0)
            if not 1 <= index <= len(readers):
                raise ControlError(f"instance {selector!r}: cluster {self.cluster_id} has "
                                   f"{len(readers)} reader(s)")
            return readers[index - 1]
        ids = [str(m["DBInstanceIdentifier"]) for m in members]
        if selector not in ids:
            raise ControlError(f"no instance {selector!r} in cluster {self.cluster_id}; "
                               f"instances: {', '.join(ids)}")
        return selector

    def address(self, instance_id: str) -> tuple[str, int]:
        endpoint = self._instance(instance_id)["Endpoint"]
        return self._resolve_address(str(endpoint["Address"])), int(endpoint["Port"])

    def final_endpoint(self) -> str:
        return str(self._instance(self.writer_id())["Endpoint"]["Address"])

    # -- actions ------------------------------------------------------------------------------

    def record(self, name: str, instance: str | None, **detail: Any) -> None:
        with self._lock:
            self._events.append({"name": name, "instance": instance, "wall": time.time(),
                                 "mono": time.monotonic(), "detail": detail})

    def _wait(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout
        while not check():
            if time.monotonic() > deadline:
                raise ControlError(f"RDS cluster {self.cluster_id}: {what} not seen within "
                                   f"{self.timeout:g} s")
            time.sleep(self.poll)

    def _waiter(self, name: str, **kwargs: Any) -> None:
        if name in self.client.waiter_names:
            delay = max(1, int(self.poll))
            self.client.get_waiter(name).wait(
                **kwargs, WaiterConfig={"Delay": delay,
                                        "MaxAttempts": max(1, int(self.timeout / delay))})

    def failover(self, target: str | None, mode: str) -> None:
        old = self.writer_id()
        kwargs: dict[str, Any] = {"DBClusterIdentifier": self.cluster_id}
        if target is not None:
            kwargs["TargetDBInstanceIdentifier"] = target
        self.record("failover_started", old, mode="rds", target=target)
        self.client.failover_db_cluster(**kwargs)
        self._wait("a new writer", lambda: self.writer_id() != old)
        self.record("promoted", self.writer_id(), previous=old)
        self._waiter("db_cluster_available", DBClusterIdentifier=self.cluster_id)
        self.record("topology_updated", self.writer_id(), writer=self.writer_id())

    def reboot(self, instance_id: str) -> None:
        self.record("reboot_started", instance_id)
        self.client.reboot_db_instance(DBInstanceIdentifier=instance_id)
        self._waiter("db_instance_available", DBInstanceIdentifier=instance_id)
        self.record("reboot_finished", instance_id)

    def kill(self, instance_id: str) -> None:
        raise ControlError("RDS cannot kill an instance's process: use a failover (crash "
                           "scenarios map to FailoverDBCluster) or a reboot")

    def set_replica_lag(self, instance_id: str, seconds: float) -> None:
        raise ControlError("replica lag cannot be injected on RDS; run replica-lag on the "
                           "simulator")

    def set_dns_staleness(self, seconds: float) -> None:
        raise ControlError("DNS staleness cannot be set on RDS (it is what RDS does anyway); "
                           "run dns-staleness on the simulator")

    def settle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout

        def available() -> bool:
            if str(self._cluster().get("Status")) != "available":
                return False
            return all(str(self._instance(str(m["DBInstanceIdentifier"]))
                           .get("DBInstanceStatus")) == "available" for m in self._members())

        while not available():
            if time.monotonic() > deadline:
                raise ControlError(f"RDS cluster {self.cluster_id} not available within "
                                   f"{timeout:g} s")
            time.sleep(self.poll)

    def rds_events(self) -> list[dict[str, Any]]:
        """The cluster's and its instances' RDS events since this object was created, as
        ``rds_event`` entries placed on the monotonic clock by their timestamps."""
        start = datetime.datetime.fromtimestamp(self._started_wall, datetime.timezone.utc)
        now_wall, now_mono = time.time(), time.monotonic()
        found: list[dict[str, Any]] = []
        sources = [("db-cluster", self.cluster_id)] + [
            ("db-instance", str(m["DBInstanceIdentifier"])) for m in self._members()]
        for source_type, source in sources:
            answer = self.client.describe_events(SourceType=source_type,
                                                 SourceIdentifier=source, StartTime=start)
            for event in answer.get("Events", []):
                date = event.get("Date")
                wall = date.timestamp() if isinstance(date, datetime.datetime) else now_wall
                found.append({"name": "rds_event", "instance": source, "wall": wall,
                              "mono": now_mono - (now_wall - wall),
                              "detail": {"message": event.get("Message", ""),
                                         "categories": event.get("EventCategories", []),
                                         "source_type": source_type}})
        return found

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            own = list(self._events)
        try:
            extra = self.rds_events()
        except Exception as exc:  # events are informative; the harness's own suffice
            LOGGER.warning("DescribeEvents failed: %s", exc)
            extra = []
        return sorted(own + extra, key=lambda e: float(e["mono"]))

    def close(self) -> None:
        """Nothing to stop: the cluster is the user's."""
