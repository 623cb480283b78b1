"""Cluster control: one interface (:class:`ClusterControl`) with two implementations, the
simulator (:class:`SimulatorControl`, here) and real Aurora/RDS through boto3
(:class:`chaos.rds.RdsControl`).

The runner only uses this interface: it resolves instance selectors (``writer``, ``reader``,
``reader-2``, an instance id), performs control-plane actions, learns each instance's network
address (for network faults) and reads the cluster's events, from which the writer history
(who was the writer when) is derived for the invariants.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["ClusterControl", "ControlError", "EngineSql", "SimulatorControl", "WriterSpan",
           "engine_sql", "writer_spans"]

LOGGER = logging.getLogger("chaos.control")


class ControlError(RuntimeError):
    """A control-plane action cannot be carried out on this cluster."""


@dataclass(frozen=True)
class EngineSql:
    """What the workload needs to know of an engine: the driver, its extra connect
    arguments, and the SQL (each statement records the instance that executed it)."""

    engine: str  # "pg" | "mysql"
    target: Callable[..., Any]
    extra: Mapping[str, Any]
    create: str  # {t}: table name
    insert: str  # (id, thread); idempotent
    read: str  # (id,) -> (instance id, found)

    @property
    def placeholder_table(self) -> str:
        return "{t}"


def engine_sql(engine: str, *, instance_fn: str | None = None) -> EngineSql:
    """The SQL of ``engine`` (``pg`` or ``mysql``). ``instance_fn``: the SQL function naming
    the executing instance (default: the simulator's Aurora function of that engine)."""
    if engine == "pg":
        import psycopg

        fn = instance_fn or "pg_catalog.aurora_db_instance_identifier()"
        return EngineSql(
            "pg", psycopg.Connection.connect, {},
            "CREATE TABLE {t} (id bigint PRIMARY KEY, inst text NOT NULL, thread int NOT NULL)",
            f"INSERT INTO {{t}} (id, inst, thread) VALUES (%s, {fn}, %s) ON CONFLICT DO NOTHING",
            f"SELECT {fn}, (SELECT count(*) FROM {{t}} WHERE id = %s)")
    if engine == "mysql":
        import mysql.connector

        fn = instance_fn or "aurora_sim.aurora_server_id()"
        extra: dict[str, Any] = {"use_pure": True}
        if instance_fn is None:
            extra["aurora_mysql_lookalike_schema"] = "aurora_sim"
        return EngineSql(
            "mysql", mysql.connector.connect, extra,
            "CREATE TABLE {t} (id bigint PRIMARY KEY, inst varchar(64) NOT NULL, "
            "thread int NOT NULL)",
            f"INSERT IGNORE INTO {{t}} (id, inst, thread) VALUES (%s, {fn}, %s)",
            f"SELECT {fn}, (SELECT count(*) FROM {{t}} WHERE id = %s)")
    raise ControlError(f"engine {engine!r}: expected pg or mysql")


@dataclass(frozen=True)
class WriterSpan:
    """``instance`` may have executed writes from ``start`` to ``end`` (monotonic seconds):
    from the start of the failover that promoted it (a new writer may take writes a moment
    before its ``promoted`` event is recorded) to its successor's promotion."""

    instance: str
    start: float
    end: float


def writer_spans(first_writer: str, events: Sequence[Mapping[str, Any]]) -> list[WriterSpan]:
    """Writer history from control-plane events (``failover_started``, ``promoted``)."""
    spans: list[WriterSpan] = []
    current, since = first_writer, -math.inf
    started: float | None = None
    for event in sorted(events, key=lambda e: float(e["mono"])):
        if event["name"] == "failover_started":
            started = float(event["mono"])
        elif event["name"] == "promoted" and event.get("instance"):
            mono = float(event["mono"])
            spans.append(WriterSpan(current, since, mono))
            current, since = str(event["instance"]), started if started is not None else mono
            started = None
    spans.append(WriterSpan(current, since, math.inf))
    return spans


class ClusterControl(Protocol):
    """A cluster the chaos runner can act on."""

    #: ``pg`` or ``mysql``
    engine: str
    #: a short description for reports (flavour, cluster id)
    description: str

    def sql(self) -> EngineSql: ...

    def connect_kwargs(self, endpoint: str | None = None) -> dict[str, Any]:
        """Driver arguments for the application user at ``endpoint`` (default: writer)."""
        ...

    @property
    def writer_endpoint(self) -> str: ...

    @property
    def reader_endpoint(self) -> str: ...

    def writer_id(self) -> str: ...

    def instance_ids(self) -> list[str]:
        """Every instance of the cluster."""
        ...

    def resolve(self, selector: str) -> str:
        """``writer``, ``reader`` (first reader), ``reader-N`` or an instance id -> id."""
        ...

    def address(self, instance_id: str) -> tuple[str, int]:
        """Network address of an instance, for network faults."""
        ...

    def failover(self, target: str | None, mode: str) -> None: ...

    def kill(self, instance_id: str) -> None: ...

    def reboot(self, instance_id: str) -> None: ...

    def set_replica_lag(self, instance_id: str, seconds: float) -> None: ...

    def set_dns_staleness(self, seconds: float) -> None: ...

    def record(self, name: str, instance: str | None, **detail: Any) -> None:
        """Record a fault event (``network_fault``) in the cluster's event log, if it has
        one."""
        ...

    def events(self) -> list[dict[str, Any]]:
        """Every control-plane event so far (``name``, ``instance``, ``wall``, ``mono``,
        ``detail``)."""
        ...

    def first_writer(self) -> str: ...

    def settle(self, timeout: float) -> None:
        """Wait until the cluster has a running writer and every instance is back."""
        ...

    def close(self) -> None: ...


class SimulatorControl:
    """Control of a :class:`simulator.cluster.Cluster` (started here with :meth:`start`, or
    given)."""

    def __init__(self, cluster: Any, *, owned: bool = False) -> None:
        self.cluster = cluster
        self._owned = owned
        self.engine = "pg" if cluster.flavour.engine == "postgresql" else "mysql"
        self.description = f"simulated {cluster.flavour.name} ({cluster.name})"
        self._first = str(cluster.writer.id)
        #: The green cluster of a blue/green switchover (:meth:`bluegreen_switchover`).
        self.green: Any = None

    @classmethod
    def start(cls, flavour: str, readers: int, timeline: Mapping[str, Any],
              backend: str = "local", *, proxied: bool = False) -> SimulatorControl:
        """Start a simulated cluster on instance runtime ``backend``; ``proxied``: with a
        Toxiproxy-API proxy in front of every instance (``Cluster(proxied=True)``)."""
        from simulator.cluster import Cluster, Timeline

        if backend not in ("local", "testcontainers"):
            raise ControlError(f"simulator backend {backend!r}: expected local or "
                               "testcontainers")
        if backend == "testcontainers":
            from simulator.testcontainers_backend import docker_unavailable_reason

            reason = docker_unavailable_reason()
            if reason is not None:
                raise ControlError(f"--simulator testcontainers needs a Docker daemon on this "
                                   f"machine ({reason}); use --simulator local")
        return cls(Cluster.start(flavour, readers=readers, timeline=Timeline(**timeline),
                                 backend=backend, proxied=proxied), owned=True)

    def sql(self) -> EngineSql:
        return engine_sql(self.engine)

    def connect_kwargs(self, endpoint: str | None = None) -> dict[str, Any]:
        return dict(self.cluster.connect_kwargs(endpoint))

    @property
    def writer_endpoint(self) -> str:
        return str(self.cluster.writer_endpoint)

    @property
    def reader_endpoint(self) -> str:
        return str(self.cluster.reader_endpoint)

    def writer_id(self) -> str:
        return str(self.cluster.writer.id)

    def instance_ids(self) -> list[str]:
        return [str(i) for i in self.cluster.instances]

    def first_writer(self) -> str:
        return self._first

    def resolve(self, selector: str) -> str:
        if selector == "writer":
            return self.writer_id()
        if selector == "reader" or selector.startswith("reader-"):
            readers = [i.id for i in self.cluster.readers]
            index = 1 if selector == "reader" else int(selector.split("-", 1)[1] or 0)
            if not 1 <= index <= len(readers):
                raise ControlError(f"instance {selector!r}: the cluster has {len(readers)} "
                                   "reader(s) right now")
            return str(readers[index - 1])
        found: str = self.cluster.instance(selector).id
        return found

    def address(self, instance_id: str) -> tuple[str, int]:
        instance = self.cluster.instance(instance_id)
        return instance.address, instance.port

    def failover(self, target: str | None, mode: str) -> None:
        self.cluster.failover(target, mode=mode)

    def kill(self, instance_id: str) -> None:
        self.cluster.kill_instance(instance_id)

    def reboot(self, instance_id: str) -> None:
        self.cluster.reboot(instance_id)

    def set_replica_lag(self, instance_id: str, seconds: float) -> None:
        self.cluster.set_replica_lag(instance_id, seconds)

    def set_dns_staleness(self, seconds: float) -> None:
        self.cluster.set_dns_staleness(seconds)

    def record(self, name: str, instance: str | None, **detail: Any) -> None:
        self.cluster.events.record(name, instance, **detail)

    def events(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.cluster.events.events()]

    def settle(self, timeout: float) -> None:
        """Every instance running again (killed instances are started), no replica lag."""
        deadline = time.monotonic() + timeout
        rejoin = self.cluster.timeline.rejoin_delay or 0.0
        grace = time.monotonic() + rejoin + 1.0
        while any(i.role == "stopped" for i in self.cluster.instances.values()):
            if time.monotonic() > grace:
                for instance in list(self.cluster.instances.values()):
                    if instance.role == "stopped":
                        with contextlib.suppress(Exception):
                            self.cluster.start_instance(instance.id)
            if time.monotonic() > deadline:
                raise ControlError("an instance did not come back within "
                                   f"{timeout:g} s after the run")
            time.sleep(0.05)
        for reader in self.cluster.readers:
            if reader.lag:
                self.cluster.set_replica_lag(reader.id, 0.0)

    def final_endpoint(self) -> str:
        """The current writer's instance endpoint (not the cluster endpoint, whose DNS may
        still be stale)."""
        return str(self.cluster.writer.endpoint)

    def bluegreen_switchover(self) -> None:
        """Start a green cluster of the same shape (same flavour, readers, port and timeline),
        pair it with this one and switch over (``Cluster.switchover``: the events land in
        this cluster's log). Afterwards this cluster's names lead to the green instances
        (same instance ids), so the final writer is read through them as usual."""
        from simulator.cluster import Cluster

        blue = self.cluster
        if self.green is not None:
            raise ControlError("bluegreen_switchover: one switchover per run")
        self.green = Cluster.start(blue.flavour.name, readers=len(blue.readers), port=blue.port,
                                   name=f"{blue.name}g", timeline=blue.timeline,
                                   backend=blue.backend, proxied=blue.proxied)
        blue.create_blue_green(self.green)
        blue.switchover()

    def close(self) -> None:
        if self.green is not None:
            self.green.stop()
        if self._owned:
            self.cluster.stop()
