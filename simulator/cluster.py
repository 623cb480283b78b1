"""Simulated Aurora and RDS clusters on real server processes, with a control plane.

A :class:`Cluster` owns its instances (real PostgreSQL or MariaDB servers from an instance
runtime: the local launcher by default), their names in ``/etc/hosts`` and a log of
timestamped events. The engine-neutral control plane here sequences realistic timelines
(detect, promote the most advanced replica, publish topology, move DNS after a configurable
staleness, let the old writer rejoin as a reader); the engine modules
(:mod:`simulator.pg_cluster`, :mod:`simulator.mysql_cluster`) provide the primitives and the
catalog interface of each flavour (``../shared/AURORA_INTERFACE.md``).

    with Cluster.start("aurora-pg", readers=2) as cluster:
        psycopg.connect(**cluster.connect_kwargs())          # through the cluster endpoint
        events = cluster.failover()                          # crash the writer, promote
        events = cluster.failover(target="instance-3")       # RDS FailoverDBCluster(target)

Names (``Naming``): instance ``<id>.<cluster-id>.<region>.rds.amazonaws.com``, writer
endpoint ``<name>.cluster-<cluster-id>...``, reader endpoint ``<name>.cluster-ro-<cluster-id>...``;
``cluster.host_pattern`` is ``?.<cluster-id>.<region>.rds.amazonaws.com`` for
``cluster_instance_host_pattern``. Single-instance flavours have no cluster endpoints (their
writer and reader endpoints are the instance endpoint) and the plain ones (pg, mysql) are not
RDS (domain ``sim.internal``). Every instance of a cluster listens on the same port, each on
its own loopback address.

Blue/green: ``blue.create_blue_green(green)`` then ``blue.switchover()`` (see
:meth:`Cluster.switchover`).

Proxied: ``Cluster.start(..., proxied=True)`` puts a proxy in front of every instance (its
own loopback address, the cluster's port; :mod:`simulator.toxiproxy_server`, driven through
Toxiproxy's HTTP API at ``cluster.toxiproxy.url``) and every DNS name leads to the proxies, so
all client traffic goes through them; the control plane and replication still use the
servers' own addresses. Documentation: ``docs/simulator.md``.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import dataclasses
import importlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ._addresses import ProcessIdentity, claim_address, release_address
from .events import Event, EventLog
from .names import HostsFile

if TYPE_CHECKING:
    from .iam import ClusterIam, IamCredentials
    from .local import LocalServer
    from .toxiproxy_server import ToxiproxyServer

__all__ = [
    "BACKENDS",
    "BLUE_GREEN_PHASES",
    "FIRST_INSTANCE",
    "FLAVOURS",
    "BlueGreenRow",
    "Cluster",
    "ClusterEngine",
    "ClusterError",
    "Flavour",
    "Instance",
    "Naming",
    "Timeline",
]

LOGGER = logging.getLogger("resilient_db.simulator")

Role = Literal["writer", "reader", "stopped"]


#: Id of a cluster's first instance (its first writer).
FIRST_INSTANCE = "instance-1"
#: Instance runtimes a cluster can run on (``Cluster(backend=...)``).
BACKENDS = ("local", "testcontainers")
#: DNS domain of the plain flavours (pg, mysql), which are not RDS.
_PLAIN_DOMAIN = "sim.internal"
#: Names :meth:`Cluster.enable_iam` accepts for IAM users (no quoting needed anywhere).
_IAM_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")


class ClusterError(RuntimeError):
    """Bad input to the simulator or an action that cannot be carried out."""


@dataclass(frozen=True)
class Flavour:
    """What a flavour is: engine, interface, and how many readers it allows."""

    name: str
    engine: Literal["postgresql", "mariadb"]
    interface: Literal["aurora", "multi-az", "rds", "plain"]
    min_readers: int
    max_readers: int
    default_readers: int
    description: str


FLAVOURS: dict[str, Flavour] = {
    f.name: f
    for f in (
        Flavour("aurora-pg", "postgresql", "aurora", 0, 15, 2,
                "Aurora PostgreSQL: writer + readers, synchronous streaming replication"),
        Flavour("multi-az-pg", "postgresql", "multi-az", 2, 2, 2,
                "RDS Multi-AZ DB cluster, PostgreSQL: writer + two readable standbys"),
        Flavour("multi-az-mysql", "mariadb", "multi-az", 2, 2, 2,
                "RDS Multi-AZ DB cluster, MySQL (on MariaDB): writer + two readable replicas"),
        Flavour("aurora-mysql", "mariadb", "aurora", 0, 15, 2,
                "Aurora MySQL look-alike on MariaDB (topology in aurora_sim.*, see docs)"),
        Flavour("rds-pg", "postgresql", "rds", 0, 0, 0, "RDS PostgreSQL single instance"),
        Flavour("rds-mysql", "mariadb", "rds", 0, 0, 0, "RDS MySQL single instance (MariaDB)"),
        Flavour("pg", "postgresql", "plain", 0, 0, 0, "plain PostgreSQL single instance"),
        Flavour("mysql", "mariadb", "plain", 0, 0, 0, "plain MySQL (MariaDB) single instance"),
    )
}


@dataclass(frozen=True)
class Timeline:
    """Delays of control-plane actions, in seconds. Defaults are quick (tests); use
    :meth:`aurora_like` for realistic ones."""

    #: writer failure -> promotion begins (the service noticing the failure)
    detection_delay: float = 0.5
    #: extra time the promotion itself takes
    promotion_delay: float = 0.0
    #: after promotion, the writer endpoint still resolves to the old writer this long
    dns_staleness: float = 0.0
    #: after promotion, the old writer comes back as a reader after this long (None: never)
    rejoin_delay: float | None = 1.0
    #: a reboot keeps the instance down this long
    reboot_downtime: float = 0.5
    #: each blue/green switchover phase lasts this long
    switchover_phase: float = 0.5
    #: each switchover phase reaches the green side's metadata this long after blue's (RDS
    #: updates the two environments' copies separately; a client that reads green meanwhile
    #: sees the previous phase)
    green_metadata_lag: float = 0.0

    @classmethod
    def aurora_like(cls) -> Timeline:
        """Delays in the range Aurora shows: detection ~ 10 s, DNS stale ~ 15 s."""
        return cls(detection_delay=10.0, promotion_delay=5.0, dns_staleness=15.0,
                   rejoin_delay=30.0, reboot_downtime=10.0, switchover_phase=5.0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ClusterError(f"Timeline.{f.name}: expected seconds >= 0, got {value!r}")


@dataclass(frozen=True)
class Naming:
    """DNS names of a cluster, in the shape of RDS endpoints."""

    name: str
    cluster_id: str
    region: str = "us-east-1"
    domain: str = "rds.amazonaws.com"

    @property
    def suffix(self) -> str:
        return f"{self.cluster_id}.{self.region}.{self.domain}"

    def instance(self, instance_id: str) -> str:
        return f"{instance_id}.{self.suffix}"

    @property
    def writer(self) -> str:
        return f"{self.name}.cluster-{self.suffix}"

    @property
    def reader(self) -> str:
        return f"{self.name}.cluster-ro-{self.suffix}"

    @property
    def host_pattern(self) -> str:
        return f"?.{self.suffix}"

    def custom(self, name: str) -> str:
        """The DNS name of the custom endpoint ``name``."""
        return f"{name}.cluster-custom-{self.suffix}"


def _old_naming(naming: Naming) -> Naming:
    """The names RDS gives the old blue cluster after a switchover (``<name>-old1``)."""
    return dataclasses.replace(naming, name=f"{naming.name}-old1")


def _old_instance(naming: Naming) -> Callable[[str], str]:
    return lambda instance_id: naming.instance(f"{instance_id}-old1")


@dataclass
class Instance:
    """One instance of a cluster. ``runtime`` is the instance runtime (a LocalServer for the
    local backend); ``address`` its loopback address; ``endpoint`` its DNS name."""

    id: str
    role: Role
    runtime: Any
    endpoint: str
    lag: float = 0.0
    promoted_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Age in seconds the topology reports for this instance's status row (``None``: fresh
    #: while it runs; see :meth:`Cluster.set_status_age`).
    status_age: float | None = None
    #: A proxied cluster's proxy in front of this instance: its loopback address (on the
    #: cluster's port), where the instance's names resolve (``None``: not proxied).
    proxy_address: str | None = None
    #: The AWS region of the instance (``None``: the cluster's own region; set for the
    #: instances of a Global Database's secondary region, :meth:`Cluster.add_secondary_region`).
    region: str | None = None

    @property
    def address(self) -> str:
        """Where the server listens (the control plane and replication use it)."""
        return str(self.runtime.host)

    @property
    def advertised_address(self) -> str:
        """Where the instance's DNS names lead: its proxy's address in a proxied cluster,
        else :attr:`address`."""
        return self.proxy_address or self.address

    @property
    def port(self) -> int:
        return int(self.runtime.port)


#: Blue/green switchover phases, in order, as the metadata's ``status`` column shows them.
BLUE_GREEN_PHASES = (
    "AVAILABLE",
    "SWITCHOVER_INITIATED",
    "SWITCHOVER_IN_PROGRESS",
    "SWITCHOVER_IN_POST_PROCESSING",
    "SWITCHOVER_COMPLETED",
)
_BLUE_ROLE = "BLUE_GREEN_DEPLOYMENT_SOURCE"
_GREEN_ROLE = "BLUE_GREEN_DEPLOYMENT_TARGET"


@dataclass(frozen=True)
class BlueGreenRow:
    """One row of blue/green metadata: ``(version, endpoint, port, role, status)`` as
    ``get_blue_green_fast_switchover_metadata()`` / ``mysql.rds_topology`` show it. ``role``
    is ``BLUE_GREEN_DEPLOYMENT_SOURCE`` (blue) or ``BLUE_GREEN_DEPLOYMENT_TARGET`` (green)."""

    version: str
    endpoint: str
    port: int
    role: str
    status: str


#: ``CustomEndpointType`` values (RDS has no WRITER custom endpoint).
CUSTOM_ENDPOINT_TYPES = ("READER", "ANY")


@dataclass(frozen=True)
class CustomEndpoint:
    """An Aurora custom endpoint: ``host`` (its DNS name) leads to its members, the
    ``static_members`` or, when there are none, every instance except the
    ``excluded_members``; ``endpoint_type`` ``READER`` leads to members that are readers
    only, ``ANY`` to any member."""

    name: str
    host: str
    endpoint_type: str = "ANY"
    static_members: tuple[str, ...] = ()
    excluded_members: tuple[str, ...] = ()

    def is_member(self, instance: Instance) -> bool:
        """Whether ``instance`` is one the endpoint's DNS may lead to now."""
        if instance.role not in ("writer", "reader"):
            return False
        if self.endpoint_type == "READER" and instance.role != "reader":
            return False
        if self.static_members:
            return instance.id in self.static_members
        return instance.id not in self.excluded_members

    def describe(self, cluster: str) -> dict[str, Any]:
        """The endpoint as RDS ``DescribeDBClusterEndpoints`` shows it (one element of
        ``DBClusterEndpoints``); ``cluster`` is the DB cluster identifier."""
        return {"DBClusterEndpointIdentifier": self.name, "DBClusterIdentifier": cluster,
                "Endpoint": self.host, "Status": "available", "EndpointType": "CUSTOM",
                "CustomEndpointType": self.endpoint_type,
                "StaticMembers": list(self.static_members),
                "ExcludedMembers": list(self.excluded_members)}


class ClusterEngine(abc.ABC):
    """Engine primitives a cluster flavour provides; the control plane sequences them.

    Every method acts on real servers and returns when done. ``cluster.instances`` and each
    ``Instance.role`` are maintained by :class:`Cluster`, not by the engine.
    """

    flavours: ClassVar[frozenset[str]]

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    @abc.abstractmethod
    def create_writer(self, instance_id: str) -> Any:
        """Provision and start the first writer; return its runtime."""

    @abc.abstractmethod
    def create_replica(self, instance_id: str, source: Instance) -> Any:
        """Provision a replica of ``source`` (the writer), start it replicating; return its
        runtime."""

    @abc.abstractmethod
    def install_interface(self, writer: Instance) -> None:
        """Create the flavour's catalog interface (functions, tables, users) on the writer;
        it reaches readers through replication."""

    @abc.abstractmethod
    def publish_topology(self, writer: Instance) -> None:
        """Write the current topology (``cluster.instances``) where the interface reads it.

        Called after every change of membership or role: start, failover, rejoin, reader
        added or removed, lag or status age changed, and an instance killed, stopped or
        started (a stopped instance stays in ``cluster.instances`` with role ``stopped``)."""

    @abc.abstractmethod
    def replication_position(self, instance: Instance) -> Any:
        """A comparable position of what ``instance`` has received (``None``: unknown)."""

    @abc.abstractmethod
    def promote(self, instance: Instance) -> None:
        """Make ``instance`` a writer (it was a replica)."""

    @abc.abstractmethod
    def follow(self, replica: Instance, writer: Instance) -> None:
        """Point a replica at a new writer."""

    @abc.abstractmethod
    def rejoin(self, old_writer: Instance, writer: Instance) -> None:
        """Bring a failed old writer back as a replica of ``writer`` (starting it)."""

    @abc.abstractmethod
    def set_read_only(self, instance: Instance, read_only: bool) -> None:
        """Turn a running writer read-only (or back) under open connections."""

    @abc.abstractmethod
    def set_replica_lag(self, instance: Instance, seconds: float) -> None:
        """Delay applying changes on a replica by ``seconds`` (0: no delay)."""

    def following(self, writer: Instance, readers: Sequence[Instance]) -> bool:
        """Whether every one of ``readers`` replicates from ``writer`` right now (streaming,
        or for MariaDB both replication threads running and connected to it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot tell replication state")

    def detach_replicas(self, dead: Instance,  # noqa: B027 - optional hook
                        replicas: Sequence[Instance]) -> None:
        """After the writer ``dead`` crashed, during the detection delay: let the replicas
        stop pulling from it, so that promotion and re-pointing do not wait on connections
        to a dead (possibly blackholed) server. Default: nothing."""

    def stop_writes(self, instance: Instance) -> None:  # noqa: B027 - optional hook
        """Before a graceful (targeted) failover: make sure nothing more is acknowledged by
        ``instance`` so the target can catch up. Default: nothing."""

    def publish_blue_green(self, writer: Instance, rows: Sequence[BlueGreenRow]) -> None:
        """Write blue/green metadata where the flavour's interface reads it (replacing what
        was there; no rows: no deployment). Optional hook (added with the PostgreSQL
        flavours); the default refuses."""
        raise ClusterError(
            f"flavour {self.cluster.flavour.name!r} does not support blue/green deployments")

    def end_client_sessions(self, instance: Instance) -> None:
        """End every application session on ``instance`` (not the control plane's own), as
        RDS does to both environments during a blue/green switchover. Optional hook (with
        ``publish_blue_green``); the default refuses."""
        raise ClusterError(
            f"flavour {self.cluster.flavour.name!r} does not support blue/green deployments")

    def copy_data(self, source: Instance, target: Instance) -> None:
        """Make the application database of ``target`` (a green writer) a copy of
        ``source``'s (the blue writer, read-only by then): tables of the application's schema
        with their rows, sequences and grants, replacing what ``target`` had under the same
        names. What the replication from blue to green has delivered by the end of a
        switchover's ``SWITCHOVER_IN_PROGRESS`` phase. Optional hook (with
        ``publish_blue_green``); the default refuses."""
        raise ClusterError(
            f"flavour {self.cluster.flavour.name!r} does not support blue/green deployments")

    def apply_iam(self, instance: Instance, iam: ClusterIam) -> None:
        """Make ``instance`` send its IAM users' logins to PAM service ``iam.service``
        (running or stopped: a stopped instance has it when it starts); return when a
        running instance enforces it. Optional hook (see :mod:`simulator.iam`)."""
        raise ClusterError(f"flavour {self.cluster.flavour.name!r} does not support IAM")

    def create_iam_user(self, writer: Instance, user: str, iam: ClusterIam) -> None:
        """Create database user ``user`` authenticated by PAM service ``iam.service``, on
        the writer (replication brings it to the readers). Optional hook."""
        raise ClusterError(f"flavour {self.cluster.flavour.name!r} does not support IAM")


EngineFactory = Callable[["Cluster"], ClusterEngine]
_ENGINES: dict[str, EngineFactory] = {}


def register_engine(flavours: Sequence[str], factory: EngineFactory) -> None:
    """Engine modules register the flavours they implement."""
    for name in flavours:
        _ENGINES[name] = factory


_ENGINE_MODULES = {"postgresql": "simulator.pg_cluster", "mariadb": "simulator.mysql_cluster"}


def _load_engine(flavour: Flavour) -> EngineFactory:
    """The factory of ``flavour``'s engine, importing its module on first use (each engine
    module registers itself), so that one engine's module is not needed for the other's."""
    if flavour.name not in _ENGINES:
        module = _ENGINE_MODULES[flavour.engine]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise ClusterError(
                f"flavour {flavour.name!r} needs {module}, which is not available") from exc
    try:
        return _ENGINES[flavour.name]
    except KeyError:
        raise ClusterError(
            f"flavour {flavour.name!r}: {_ENGINE_MODULES[flavour.engine]} does not "
            "implement it") from None


# Clusters of this process not stopped yet, for the exit hook (which has nowhere else to look).
# Strong references: a cluster dropped without stop() still has servers and names to remove.
_live_clusters: set[Cluster] = set()
_exit_hook_registered = False


def _stop_clusters_at_exit() -> None:
    """Stop what the program left running: servers and names. (The launcher's own exit hook
    stops servers too; whichever runs first, the other finds nothing left to do.)"""
    me = ProcessIdentity.current()
    for cluster in list(_live_clusters):
        if cluster._owner != me:
            continue  # inherited through fork: the parent owns it
        try:
            cluster.stop()
        except Exception:  # exiting: report and go on with the others
            LOGGER.exception("could not stop cluster %s at exit", cluster.name)


def _track(cluster: Cluster) -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_stop_clusters_at_exit)
        _exit_hook_registered = True
    _live_clusters.add(cluster)


class Cluster:
    """A running simulated cluster. Create with :meth:`Cluster.start`; stop with :meth:`stop`
    or a ``with`` block. Thread-safe: control-plane actions are serialised."""

    def __init__(self, flavour: str, *, readers: int | None = None, name: str | None = None,
                 cluster_id: str | None = None, timeline: Timeline | None = None,
                 port: int | None = None, region: str = "us-east-1",
                 backend: str = "local", proxied: bool = False) -> None:
        if flavour not in FLAVOURS:
            raise ClusterError(
                f"unknown flavour {flavour!r}; valid flavours: {', '.join(FLAVOURS)}")
        self.flavour = FLAVOURS[flavour]
        count = self.flavour.default_readers if readers is None else readers
        if not isinstance(count, int) or isinstance(count, bool):
            raise ClusterError(f"readers: expected a whole number, got {readers!r}")
        if not self.flavour.min_readers <= count <= self.flavour.max_readers:
            raise ClusterError(
                f"readers={count}: flavour {flavour!r} needs between "
                f"{self.flavour.min_readers} and {self.flavour.max_readers} readers")
        self.reader_count = count
        if backend not in BACKENDS:
            raise ClusterError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)} "
                               "(testcontainers needs a Docker daemon, see docs/simulator.md)")
        #: Instance runtime: "local" (child processes) or "testcontainers" (a container per
        #: server process, simulator.testcontainers_backend).
        self.backend = backend
        if not isinstance(proxied, bool):
            raise ClusterError(f"proxied: expected True or False, got {proxied!r}")
        #: Whether a proxy stands in front of every instance (:attr:`toxiproxy`): every DNS
        #: name of the cluster leads to the proxies, never straight to a server.
        self.proxied = proxied
        #: The Toxiproxy-API server of a proxied cluster (started with the cluster); one
        #: proxy per instance, named after the instance id. ``None``: not proxied.
        self.toxiproxy: ToxiproxyServer | None = None
        self.name = name or f"sim{secrets.token_hex(3)}"
        if not self.name.isalnum() or not self.name[0].isalpha():
            raise ClusterError(
                f"name {self.name!r}: expected letters and digits, starting with a letter")
        # Plain PostgreSQL/MySQL are not RDS: their names must not look like RDS names,
        # which clients (the AWS wrapper) take as proof of RDS or Aurora.
        domain = _PLAIN_DOMAIN if self.flavour.interface == "plain" else Naming.domain
        self.naming = Naming(self.name.lower(), cluster_id or f"c{secrets.token_hex(6)}",
                             region, domain)
        self.timeline = timeline or Timeline()
        self.port = port
        self.events = EventLog()
        self.instances: dict[str, Instance] = {}
        self._lock = threading.RLock()
        self._timers: list[threading.Timer] = []
        self._hosts = HostsFile()
        self._owner = ProcessIdentity.current()
        self._writer_endpoint_target: str | None = None
        self._stopped = False
        #: The green cluster of a blue/green deployment this cluster is the blue side of.
        self._green: Cluster | None = None
        #: After a switchover: the green cluster this cluster's names now resolve to.
        self._switched_to: Cluster | None = None
        #: A green cluster whose own names RDS deleted (at the end of its switchover).
        self._names_deleted = False
        #: The blue cluster whose names resolve to this (green) cluster after a switchover.
        self._renamed_by: Cluster | None = None
        #: IAM enforcement (:meth:`enable_iam`); None: IAM users do not exist.
        self.iam: ClusterIam | None = None
        #: Custom endpoints by name (:meth:`create_custom_endpoint`).
        self.custom_endpoints: dict[str, CustomEndpoint] = {}
        #: Aurora Global Database: the names of each region's cluster, the first one this
        #: cluster's own (:meth:`add_secondary_region`); one entry: not a global database.
        self.regions: dict[str, Naming] = {region: self.naming}
        self.engine = _load_engine(self.flavour)(self)

    @property
    def server_class(self) -> type[LocalServer]:
        """The class the engines create this cluster's servers with (per :attr:`backend`)."""
        if self.backend == "testcontainers":
            from .testcontainers_backend import DockerServer

            return DockerServer
        from .local import LocalServer

        return LocalServer

    # --- creation and teardown ------------------------------------------------------------
    @classmethod
    def start(cls, flavour: str, **kwargs: Any) -> Cluster:
        cluster = cls(flavour, **kwargs)
        try:
            cluster._start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self) -> None:
        self._hosts.sweep()
        _track(self)
        if self.proxied:
            from .toxiproxy_server import ToxiproxyServer

            # bind_source: the servers see the proxy's address as the client's.
            self.toxiproxy = ToxiproxyServer(bind_source=True).start()
        writer_id = FIRST_INSTANCE
        runtime = self.engine.create_writer(writer_id)
        writer = self._add(writer_id, "writer", runtime)
        self.events.record("instance_started", writer_id, role="writer")
        self.engine.install_interface(writer)
        for i in range(self.reader_count):
            self._create_reader(f"instance-{i + 2}")
        self.engine.publish_topology(writer)
        self._writer_endpoint_target = writer.id
        self._update_dns()
        self.events.record("cluster_started", None, flavour=self.flavour.name,
                           instances=list(self.instances))

    def _create_reader(self, instance_id: str, region: str | None = None) -> Instance:
        runtime = self.engine.create_replica(instance_id, self.writer)
        reader = self._add(instance_id, "reader", runtime, region)
        self.events.record("instance_started", instance_id, role="reader",
                           region=self.region_of(reader))
        return reader

    def _add(self, instance_id: str, role: Role, runtime: Any,
             region: str | None = None) -> Instance:
        if self.port is None:
            self.port = int(runtime.port)
        naming = self.regions.get(region or "", self.naming)
        instance = Instance(instance_id, role, runtime, naming.instance(instance_id),
                            region=region if region != self.naming.region else None)
        self.instances[instance_id] = instance
        if self.toxiproxy is not None:
            self._add_proxy(instance)
        if self.iam is not None:
            self.iam.write(instance)
            self.engine.apply_iam(instance, self.iam)
        return instance

    def _add_proxy(self, instance: Instance) -> None:
        """Put a proxy in front of ``instance``: on its own loopback address, the cluster's
        port, named after the instance, upstream the server (which keeps its address and
        port through failovers, so the proxy never changes)."""
        assert self.toxiproxy is not None and self.port is not None
        address = claim_address(self._owner, f"proxy of {self.name}/{instance.id}")
        instance.proxy_address = address
        self.toxiproxy.create_proxy({"name": instance.id, "listen": f"{address}:{self.port}",
                                     "upstream": f"{instance.address}:{instance.port}"})
        self.events.record("proxy_created", instance.id, listen=f"{address}:{self.port}",
                           upstream=f"{instance.address}:{instance.port}")

    def _remove_proxy(self, instance: Instance) -> None:
        address, instance.proxy_address = instance.proxy_address, None
        if self.toxiproxy is not None:
            with contextlib.suppress(Exception):
                self.toxiproxy.delete_proxy(instance.id)
        if address is not None:
            release_address(address, self._owner)

    def proxy_address(self, instance_id: str) -> str:
        """``host:port`` of the proxy in front of ``instance_id`` (a proxied cluster)."""
        instance = self.instance(instance_id)
        if instance.proxy_address is None:
            raise ClusterError(f"cluster {self.name} is not proxied (Cluster(proxied=True))")
        return f"{instance.proxy_address}:{self.port}"

    def stop(self) -> None:
        """Stop every instance and remove names, files and addresses. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            for timer in self._timers:
                timer.cancel()
            if self.toxiproxy is not None:
                with contextlib.suppress(Exception):
                    self.toxiproxy.close()
            for instance in reversed(list(self.instances.values())):
                with contextlib.suppress(Exception):
                    instance.runtime.stop()
                with contextlib.suppress(Exception):
                    self._remove_proxy(instance)
            with contextlib.suppress(Exception):
                self._hosts.remove_cluster(self.name, self._owner)
            if self.iam is not None:
                with contextlib.suppress(Exception):
                    self.iam.remove()
            _live_clusters.discard(self)
            self.events.record("cluster_stopped")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- views ------------------------------------------------------------------------------
    @property
    def writer(self) -> Instance:
        for instance in self.instances.values():
            if instance.role == "writer":
                return instance
        raise ClusterError(f"cluster {self.name} has no writer right now")

    @property
    def readers(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == "reader"]

    @property
    def host_pattern(self) -> str:
        return self.naming.host_pattern

    # --- Aurora Global Database views -------------------------------------------------------
    @property
    def is_global(self) -> bool:
        """True once a secondary region was added (:meth:`add_secondary_region`)."""
        return len(self.regions) > 1

    def region_of(self, instance: Instance) -> str:
        return instance.region or self.naming.region

    @property
    def primary_region(self) -> str:
        """The region of the writer (the Global Database's primary region); while no writer
        runs (a global failover), the region of the last writer endpoint target."""
        writer = self._running_writer()
        if writer is None and self._writer_endpoint_target in self.instances:
            writer = self.instances[self._writer_endpoint_target]
        return self.region_of(writer) if writer is not None else self.naming.region

    def in_region(self, region: str) -> list[Instance]:
        return [i for i in self.instances.values() if self.region_of(i) == region]

    @property
    def global_host_patterns(self) -> str:
        """``global_cluster_instance_host_patterns`` for this global database."""
        return ",".join(f"{region}:{naming.host_pattern}"
                        for region, naming in self.regions.items())

    @property
    def global_writer_endpoint(self) -> str:
        """The Global Database's writer endpoint (it follows the writer to its region)."""
        return f"{self.naming.name}.global-{self.naming.cluster_id}.global.{self.naming.domain}"

    def region_writer_endpoint(self, region: str) -> str:
        """The cluster endpoint of ``region``'s cluster (read-only while secondary)."""
        return self._region_naming(region).writer

    def region_reader_endpoint(self, region: str) -> str:
        return self._region_naming(region).reader

    def _region_naming(self, region: str) -> Naming:
        try:
            return self.regions[region]
        except KeyError:
            raise ClusterError(f"cluster {self.name} has no region {region!r}; regions: "
                               f"{', '.join(self.regions)}") from None

    @property
    def single_instance(self) -> bool:
        """True for the single-instance flavours (rds-pg, pg, rds-mysql, mysql)."""
        return self.flavour.max_readers == 0

    @property
    def writer_endpoint(self) -> str:
        """The cluster (writer) endpoint; a single-instance flavour has none (RDS gives a
        DB instance only its instance endpoint), so this is the instance's endpoint."""
        if self.single_instance:
            return self.naming.instance(FIRST_INSTANCE)
        return self.naming.writer

    @property
    def reader_endpoint(self) -> str:
        """The reader endpoint (the instance endpoint for a single-instance flavour)."""
        if self.single_instance:
            return self.naming.instance(FIRST_INSTANCE)
        return self.naming.reader

    def instance(self, instance_id: str) -> Instance:
        try:
            return self.instances[instance_id]
        except KeyError:
            raise ClusterError(
                f"no instance {instance_id!r} in cluster {self.name}; instances: "
                f"{', '.join(self.instances)}") from None

    def connect_kwargs(self, endpoint: str | None = None) -> dict[str, Any]:
        """Driver keyword arguments for ``endpoint`` (default: the writer endpoint). Works
        at any time, also while the cluster has no writer (during a failover)."""
        first = next(iter(self.instances.values()))  # any instance: same database, port
        kwargs = dict(first.runtime.connect_kwargs())
        kwargs["host"] = endpoint or self.writer_endpoint
        kwargs["port"] = self.port
        kwargs.update(self.credentials())
        return kwargs

    def credentials(self) -> dict[str, str]:
        """The application user (not a superuser, so read-only replicas refuse its writes)."""
        return dict(self.engine_credentials())

    def engine_credentials(self) -> dict[str, str]:
        return getattr(self.engine, "credentials", {})

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "flavour": self.flavour.name,
            "port": self.port,
            "writer_endpoint": self.writer_endpoint,
            "reader_endpoint": self.reader_endpoint,
            "host_pattern": self.host_pattern,
            "toxiproxy_url": None if self.toxiproxy is None else self.toxiproxy.url,
            "custom_endpoints": self.describe_custom_endpoints(),
            "iam": None if self.iam is None else {"users": list(self.iam.users),
                                                  "region": self.iam.region},
            "instances": [
                {"id": i.id, "role": i.role, "address": i.address, "endpoint": i.endpoint,
                 "proxy_address": i.proxy_address, "lag": i.lag,
                 "running": bool(i.runtime.is_running()), "region": self.region_of(i)}
                for i in self.instances.values()
            ],
        }

    # --- names ------------------------------------------------------------------------------
    def _entries(self, writer_name: str, reader_name: str,
                 instance_name: Callable[[str], str]) -> list[tuple[str, str]]:
        """This cluster's addresses under the given names (instance names only for a
        single-instance flavour)."""
        if self.single_instance:
            return [(instance_name(i.id), i.advertised_address)
                    for i in self.instances.values()]
        if self.is_global and instance_name == self.naming.instance:
            return self._global_entries()
        entries: list[tuple[str, str]] = []
        target = self._writer_endpoint_target
        if target is not None and target in self.instances:
            entries.append((writer_name, self.instances[target].advertised_address))
        running = [i for i in self.instances.values() if i.role != "stopped"]
        readers = self.readers or [i for i in running if i.role == "writer"]
        entries += [(reader_name, r.advertised_address) for r in readers]
        entries += [(instance_name(i.id), i.advertised_address)
                    for i in self.instances.values()]
        if instance_name == self.naming.instance:  # not carried across a blue/green rename
            for custom in self.custom_endpoints.values():
                entries += [(custom.host, i.advertised_address) for i in self.instances.values()
                            if custom.is_member(i)]
        return entries

    def _global_entries(self) -> list[tuple[str, str]]:
        """A global database's names: each region's cluster, reader and instance names over
        that region's instances, and the global writer endpoint. A region's cluster endpoint
        names its writer while it is primary (after ``dns_staleness``, the writer endpoint
        target), else one of its instances (secondary clusters are read-only)."""
        entries: list[tuple[str, str]] = []
        target = self.instances.get(self._writer_endpoint_target or "")
        for region, naming in self.regions.items():
            members = self.in_region(region)
            running = [i for i in members if i.role != "stopped"]
            if target is not None and self.region_of(target) == region:
                head: Instance | None = target
            else:
                head = running[0] if running else (members[0] if members else None)
            if head is not None:
                entries.append((naming.writer, head.advertised_address))
            readers = [i for i in running if i.role == "reader"] or running
            entries += [(naming.reader, r.advertised_address) for r in readers]
            entries += [(naming.instance(i.id), i.advertised_address) for i in members]
        if target is not None:
            entries.append((self.global_writer_endpoint, target.advertised_address))
        return entries

    def _update_dns(self) -> None:
        green = self._switched_to
        blue = self._renamed_by
        if blue is not None:
            # A green cluster after its switchover: its instances answer to the blue
            # cluster's names (published by the blue cluster); RDS deletes the green names
            # when the switchover completes.
            entries = [] if self._names_deleted else self._entries(
                self.writer_endpoint, self.reader_endpoint, self.naming.instance)
            self._hosts.set_cluster(self.name, entries, self._owner)
            if self.iam is not None:
                self.iam.sync()
            if not blue._stopped:
                blue._update_dns()
            return
        if green is None:
            entries = self._entries(self.writer_endpoint, self.reader_endpoint,
                                    self.naming.instance)
        else:
            # After a blue/green switchover the green cluster answers to this cluster's names
            # and this (old blue) cluster is renamed with the suffix "-old1", as RDS does.
            old = _old_naming(self.naming)
            entries = green._entries(self.writer_endpoint, self.reader_endpoint,
                                     self.naming.instance)
            entries += self._entries(old.writer, old.reader, _old_instance(self.naming))
        self._hosts.set_cluster(self.name, entries, self._owner)
        if self.iam is not None:
            self.iam.sync()  # roles changed: the host names each instance accepts too

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        def run() -> None:
            with self._lock:
                if not self._stopped:
                    try:
                        action()
                    except Exception:
                        LOGGER.exception("cluster %s: delayed action failed", self.name)

        if delay <= 0:
            run()
            return
        timer = threading.Timer(delay, run)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _point_writer_endpoint(self, instance_id: str) -> None:
        self._writer_endpoint_target = instance_id
        self._update_dns()
        self.events.record("dns_updated", instance_id, endpoint=self.writer_endpoint)

    def _running_writer(self) -> Instance | None:
        return next((i for i in self.instances.values() if i.role == "writer"), None)

    def _publish(self) -> bool:
        """Publish the topology if a writer runs (it is where the topology is written);
        returns whether it did."""
        writer = self._running_writer()
        if writer is None:
            return False
        self.engine.publish_topology(writer)
        self.events.record("topology_updated", writer.id, writer=writer.id)
        return True

    # --- control plane ----------------------------------------------------------------------
    def failover(self, target: str | None = None, *, mode: str = "crash",
                 rejoin: bool = True) -> list[Event]:
        """Fail the writer over.

        ``mode="crash"``: the writer's process is killed; after ``detection_delay`` the most
        advanced reader (or ``target``) is promoted. ``mode="graceful"`` (RDS
        ``FailoverDBCluster``): the writer stops cleanly first. Other readers follow the new
        writer; the writer endpoint moves after ``dns_staleness``; the old writer rejoins as a
        reader after ``rejoin_delay`` (``rejoin`` false: it stays down). Returns the events up
        to ``topology_updated``. In a global database without ``target``, only the primary
        region's readers are candidates.
        """
        if mode not in ("crash", "graceful"):
            raise ClusterError(f"mode={mode!r}: expected 'crash' or 'graceful'")
        with self._lock:
            since = time.monotonic()
            old = self.writer
            candidates = self.readers
            if target is None and self.is_global:
                # Aurora fails over within the primary cluster; a global database's other
                # regions move only with switchover_global/failover_global.
                candidates = [r for r in candidates
                              if self.region_of(r) == self.region_of(old)]
            if not candidates:
                raise ClusterError(f"cluster {self.name} has no reader to fail over to")
            if target is not None:
                chosen = self.instance(target)
                if chosen.role != "reader":
                    raise ClusterError(
                        f"failover target {target!r} is the {chosen.role}, not a reader")
            self.events.record("failover_started", old.id, mode=mode, target=target)
            if mode == "graceful":
                self.engine.stop_writes(old)
                for reader in candidates:
                    self._wait_caught_up(reader, old)
                old.runtime.stop(cleanup=False)
            else:
                old.runtime.kill()
            old.role = "stopped"
            self.events.record("writer_stopped", old.id, mode=mode)
            detecting = time.monotonic()
            if mode == "crash":
                # Housekeeping inside the detection window (it does not delay promotion
                # unless it takes longer than the window).
                self.engine.detach_replicas(old, candidates)
            time.sleep(max(0.0, self.timeline.detection_delay
                           - (time.monotonic() - detecting)))
            chosen = self.instance(target) if target else self._most_advanced(candidates)
            time.sleep(self.timeline.promotion_delay)
            self.engine.promote(chosen)
            chosen.role = "writer"
            chosen.promoted_at = time.monotonic()
            self.events.record("promoted", chosen.id, previous=old.id)
            for reader in self.readers:
                self.engine.follow(reader, chosen)
                self.events.record("replica_following", reader.id, writer=chosen.id)
            self.engine.publish_topology(chosen)
            self.events.record("topology_updated", chosen.id, writer=chosen.id)
            result = self.events.events(since=since)
            self._update_dns()  # instance and reader names; the writer name may lag
            self._later(self.timeline.dns_staleness,
                        lambda: self._point_writer_endpoint(chosen.id))
            if self.timeline.rejoin_delay is not None and rejoin:
                self._later(self.timeline.rejoin_delay, lambda: self._rejoin(old.id))
            return result

    def _most_advanced(self, candidates: Sequence[Instance]) -> Instance:
        best: Instance | None = None
        best_position: Any = None
        for reader in candidates:
            try:
                position = self.engine.replication_position(reader)
            except Exception:
                LOGGER.warning("cannot read replication position of %s", reader.id,
                               exc_info=True)
                continue
            if position is not None and (best_position is None or position > best_position):
                best, best_position = reader, position
        if best is None:
            raise ClusterError(f"cluster {self.name}: no reader reports a replication position")
        return best

    def _wait_caught_up(self, reader: Instance, writer: Instance, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        target = self.engine.replication_position(writer)
        while time.monotonic() < deadline:
            position = self.engine.replication_position(reader)
            if position is not None and target is not None and position >= target:
                return
            time.sleep(0.02)
        LOGGER.warning("%s did not catch up with %s within %.0f s", reader.id, writer.id,
                       timeout)

    def _rejoin(self, instance_id: str) -> None:
        instance = self.instances.get(instance_id)
        if instance is None or instance.role != "stopped":
            return
        writer = self.writer
        self.engine.rejoin(instance, writer)
        instance.role = "reader"
        self.engine.publish_topology(writer)
        self._update_dns()
        self.events.record("rejoined_as_reader", instance_id, writer=writer.id)
        self.events.record("topology_updated", writer.id, writer=writer.id)

    def make_writer_read_only(self, read_only: bool = True) -> list[Event]:
        """Turn the writer read-only under open connections (what a demoted writer looks
        like to pooled connections), or back."""
        with self._lock:
            since = time.monotonic()
            writer = self.writer
            self.engine.set_read_only(writer, read_only)
            self.events.record("writer_read_only", writer.id, read_only=read_only)
            return self.events.events(since=since)

    def kill_instance(self, instance_id: str) -> list[Event]:
        """SIGKILL an instance (no promotion: use :meth:`failover` for the writer)."""
        with self._lock:
            since = time.monotonic()
            instance = self.instance(instance_id)
            instance.runtime.kill()
            if instance.role != "stopped":
                instance.extra["previous_role"] = instance.role
            instance.role = "stopped"
            self.events.record("instance_killed", instance_id)
            self._publish()  # its status row stops being refreshed
            return self.events.events(since=since)

    def stop_instance(self, instance_id: str) -> list[Event]:
        with self._lock:
            since = time.monotonic()
            instance = self.instance(instance_id)
            instance.runtime.stop(cleanup=False)
            if instance.role != "stopped":
                instance.extra["previous_role"] = instance.role
            instance.role = "stopped"
            self.events.record("instance_stopped", instance_id)
            self._publish()
            return self.events.events(since=since)

    def start_instance(self, instance_id: str) -> list[Event]:
        """Start a stopped instance in the role it had (a stopped old writer that lost its
        role rejoins as a reader)."""
        with self._lock:
            since = time.monotonic()
            instance = self.instance(instance_id)
            if instance.role != "stopped":
                raise ClusterError(f"instance {instance_id!r} is running ({instance.role})")
            previous = instance.extra.pop("previous_role", "reader")
            has_writer = any(i.role == "writer" for i in self.instances.values())
            if previous == "writer" and not has_writer:
                instance.runtime.start()
                instance.role = "writer"
            else:
                self._rejoin(instance_id)
                return self.events.events(since=since)
            self.events.record("instance_started", instance_id, role=instance.role)
            self._publish()
            self._update_dns()
            return self.events.events(since=since)

    def reboot(self, instance_id: str) -> list[Event]:
        """Restart an instance in place (``RebootDBInstance`` without failover): down for
        ``reboot_downtime`` seconds, then back in the same role."""
        with self._lock:
            since = time.monotonic()
            instance = self.instance(instance_id)
            self.events.record("reboot_started", instance_id)
            instance.runtime.stop(cleanup=False)
            time.sleep(self.timeline.reboot_downtime)
            instance.runtime.start()
            self.events.record("reboot_finished", instance_id, role=instance.role)
            return self.events.events(since=since)

    def add_reader(self, instance_id: str | None = None) -> list[Event]:
        with self._lock:
            since = time.monotonic()
            if len(self.readers) + 1 > self.flavour.max_readers:
                raise ClusterError(
                    f"flavour {self.flavour.name!r} allows at most "
                    f"{self.flavour.max_readers} readers")
            if instance_id is None:
                n = len(self.instances) + 1
                while f"instance-{n}" in self.instances:
                    n += 1
                instance_id = f"instance-{n}"
            elif instance_id in self.instances:
                raise ClusterError(f"instance {instance_id!r} already exists")
            self._create_reader(instance_id)
            self.engine.publish_topology(self.writer)
            self._update_dns()
            self.events.record("reader_added", instance_id)
            self.events.record("topology_updated", self.writer.id, writer=self.writer.id)
            return self.events.events(since=since)

    def remove_reader(self, instance_id: str) -> list[Event]:
        with self._lock:
            since = time.monotonic()
            instance = self.instance(instance_id)
            if instance.role == "writer":
                raise ClusterError(f"{instance_id!r} is the writer; fail over first")
            if len(self.readers) - 1 < self.flavour.min_readers:
                raise ClusterError(
                    f"flavour {self.flavour.name!r} needs at least "
                    f"{self.flavour.min_readers} readers")
            instance.runtime.stop()
            self._remove_proxy(instance)
            del self.instances[instance_id]
            self.engine.publish_topology(self.writer)
            self._update_dns()
            self.events.record("reader_removed", instance_id)
            self.events.record("topology_updated", self.writer.id, writer=self.writer.id)
            return self.events.events(since=since)

    # --- Aurora Global Database ------------------------------------------------------------
    def add_secondary_region(self, region: str, instances: int = 1, *,
                             cluster_id: str | None = None) -> list[Event]:
        """Make this (Aurora) cluster the primary cluster of a Global Database and add a
        secondary cluster in ``region`` with ``instances`` read-only instances replicating
        from the writer (``CreateGlobalCluster`` + ``CreateDBCluster`` with
        ``GlobalClusterIdentifier``). Its names use ``region`` and their own id label."""
        if self.flavour.interface != "aurora":
            raise ClusterError(f"flavour {self.flavour.name!r}: a Global Database needs an "
                               "Aurora flavour (aurora-pg, aurora-mysql)")
        if not isinstance(instances, int) or isinstance(instances, bool) or instances < 1:
            raise ClusterError(f"instances={instances!r}: expected a whole number >= 1")
        with self._lock:
            since = time.monotonic()
            if region in self.regions:
                raise ClusterError(f"cluster {self.name} already has region {region!r}")
            self.regions[region] = dataclasses.replace(
                self.naming, cluster_id=cluster_id or f"c{secrets.token_hex(6)}", region=region)
            for _ in range(instances):
                n = len(self.instances) + 1
                while f"instance-{n}" in self.instances:
                    n += 1
                self._create_reader(f"instance-{n}", region)
            self.engine.publish_topology(self.writer)
            self._update_dns()
            self.events.record("region_added", None, region=region, instances=instances)
            self.events.record("topology_updated", self.writer.id, writer=self.writer.id)
            return self.events.events(since=since)

    def _most_advanced_in(self, region: str) -> Instance:
        candidates = [i for i in self.in_region(region) if i.role == "reader"]
        if not candidates:
            raise ClusterError(f"region {region!r} has no running reader to promote")
        return self._most_advanced(candidates)

    def switchover_global(self, region: str) -> list[Event]:
        """Planned global switchover (``SwitchoverGlobalCluster``): writes stop, every replica
        catches up, the most advanced instance of ``region`` becomes the writer, the old
        primary region becomes a secondary (its old writer rejoins as a reader after
        ``rejoin_delay``). No committed write is lost."""
        with self._lock:
            since = time.monotonic()
            self._region_naming(region)
            old_region = self.primary_region
            if region == old_region:
                raise ClusterError(f"{region!r} is already the primary region")
            self.events.record("global_switchover_started", None, source=old_region,
                               target=region)
            # Graceful: writes stop and every replica catches up before the promotion.
            chosen = self._most_advanced_in(region)
            self.failover(target=chosen.id, mode="graceful")
            self.events.record("global_switchover_completed", chosen.id, primary=region,
                               previous=old_region)
            return self.events.events(since=since)

    def failover_global(self, region: str) -> list[Event]:
        """Unplanned global failover (``FailoverGlobalCluster`` with ``AllowDataLoss``): the
        primary region is lost (every instance there killed), and after ``detection_delay``
        the most advanced instance of ``region`` is promoted. The lost region stays down until
        :meth:`restore_region`. (Replication here is synchronous, so nothing is lost; on AWS
        writes not yet replicated across regions can be.)"""
        with self._lock:
            since = time.monotonic()
            self._region_naming(region)
            lost = self.primary_region
            if region == lost:
                raise ClusterError(f"{region!r} is the primary region; name a secondary one")
            self.events.record("global_failover_started", None, lost=lost, target=region)
            for instance in self.in_region(lost):
                if instance.role == "reader":
                    instance.runtime.kill()
                    instance.role = "stopped"
                    self.events.record("instance_killed", instance.id, region=lost)
            chosen = self._most_advanced_in(region)
            self.failover(target=chosen.id, mode="crash", rejoin=False)
            self.events.record("global_failover_completed", chosen.id, primary=region,
                               lost=lost)
            return self.events.events(since=since)

    def restore_region(self, region: str) -> list[Event]:
        """A region lost in :meth:`failover_global` comes back: its instances rejoin the
        global database as readers of the current writer (a secondary cluster again)."""
        with self._lock:
            since = time.monotonic()
            self._region_naming(region)
            for instance in self.in_region(region):
                if instance.role == "stopped":
                    self._rejoin(instance.id)
            self.events.record("region_restored", None, region=region)
            return self.events.events(since=since)

    # --- custom endpoints -------------------------------------------------------------------
    def create_custom_endpoint(self, name: str, *, endpoint_type: str = "ANY",
                               static_members: Sequence[str] | None = None,
                               excluded_members: Sequence[str] | None = None) -> list[Event]:
        """Create the custom endpoint ``name`` (RDS ``CreateDBClusterEndpoint``): its DNS name
        (:attr:`CustomEndpoint.host`, ``cluster.custom_endpoints[name].host``) resolves to its
        running members, in instance order, and follows role changes as the reader endpoint
        does. Event ``custom_endpoint_created``."""
        with self._lock:
            since = time.monotonic()
            if self.single_instance:
                raise ClusterError(f"flavour {self.flavour.name!r} has no custom endpoints "
                                   "(an RDS DB instance is not a cluster)")
            if (not name or len(name) > 63 or not name[0].isalpha() or name.endswith("-")
                    or "--" in name or not name.replace("-", "").isalnum()):
                raise ClusterError(f"custom endpoint name {name!r}: expected 1-63 letters, "
                                   "digits and hyphens, starting with a letter")
            if name.lower() in self.custom_endpoints:
                raise ClusterError(f"custom endpoint {name!r} already exists")
            endpoint = self._custom(CustomEndpoint(name.lower(), self.naming.custom(
                name.lower())), endpoint_type, static_members, excluded_members)
            self.custom_endpoints[endpoint.name] = endpoint
            self._update_dns()
            self.events.record("custom_endpoint_created", None, endpoint=endpoint.host,
                               **self._custom_fields(endpoint))
            return self.events.events(since=since)

    def modify_custom_endpoint(self, name: str, *, endpoint_type: str | None = None,
                               static_members: Sequence[str] | None = None,
                               excluded_members: Sequence[str] | None = None) -> list[Event]:
        """Change a custom endpoint (RDS ``ModifyDBClusterEndpoint``): static members replace
        the excluded ones and vice versa; DNS follows at once. Event
        ``custom_endpoint_modified``."""
        with self._lock:
            since = time.monotonic()
            endpoint = self._custom(self.custom_endpoint(name), endpoint_type, static_members,
                                    excluded_members)
            self.custom_endpoints[endpoint.name] = endpoint
            self._update_dns()
            self.events.record("custom_endpoint_modified", None, endpoint=endpoint.host,
                               **self._custom_fields(endpoint))
            return self.events.events(since=since)

    def delete_custom_endpoint(self, name: str) -> list[Event]:
        """Remove a custom endpoint and its DNS name. Event ``custom_endpoint_deleted``."""
        with self._lock:
            since = time.monotonic()
            endpoint = self.custom_endpoint(name)
            del self.custom_endpoints[endpoint.name]
            self._update_dns()
            self.events.record("custom_endpoint_deleted", None, endpoint=endpoint.host)
            return self.events.events(since=since)

    def custom_endpoint(self, name: str) -> CustomEndpoint:
        try:
            return self.custom_endpoints[name.lower()]
        except KeyError:
            raise ClusterError(f"no custom endpoint {name!r} in cluster {self.name}; custom "
                               f"endpoints: {', '.join(self.custom_endpoints) or 'none'}"
                               ) from None

    def _custom(self, endpoint: CustomEndpoint, endpoint_type: str | None,
                static_members: Sequence[str] | None,
                excluded_members: Sequence[str] | None) -> CustomEndpoint:
        if static_members is not None and excluded_members is not None:
            raise ClusterError("give static_members or excluded_members, not both (RDS: "
                               "excluded members apply only when there are no static ones)")
        kind = (endpoint_type or endpoint.endpoint_type).upper()
        if kind not in CUSTOM_ENDPOINT_TYPES:
            raise ClusterError(f"endpoint_type {endpoint_type!r}: expected one of "
                               f"{', '.join(CUSTOM_ENDPOINT_TYPES)}")
        for member in (*(static_members or ()), *(excluded_members or ())):
            self.instance(member)  # raises for an unknown instance
        changes: dict[str, Any] = {"endpoint_type": kind}
        if static_members is not None:
            changes.update(static_members=tuple(static_members), excluded_members=())
        if excluded_members is not None:
            changes.update(excluded_members=tuple(excluded_members), static_members=())
        return dataclasses.replace(endpoint, **changes)

    @staticmethod
    def _custom_fields(endpoint: CustomEndpoint) -> dict[str, Any]:
        return {"endpoint_type": endpoint.endpoint_type,
                "static_members": list(endpoint.static_members),
                "excluded_members": list(endpoint.excluded_members)}

    def describe_custom_endpoints(self) -> list[dict[str, Any]]:
        """Every custom endpoint as RDS ``DescribeDBClusterEndpoints`` shows it (the DB
        cluster identifier is the cluster's name), to mirror into an RDS API stand-in."""
        return [e.describe(self.name) for e in self.custom_endpoints.values()]

    def set_replica_lag(self, instance_id: str, seconds: float) -> list[Event]:
        with self._lock:
            since = time.monotonic()
            instance = self.instance(instance_id)
            if instance.role != "reader":
                raise ClusterError(f"{instance_id!r} is not a reader")
            if seconds < 0:
                raise ClusterError(f"lag: expected seconds >= 0, got {seconds!r}")
            self.engine.set_replica_lag(instance, seconds)
            instance.lag = seconds
            self.engine.publish_topology(self.writer)
            self.events.record("replica_lag_set", instance_id, seconds=seconds)
            return self.events.events(since=since)

    def set_dns_staleness(self, seconds: float) -> list[Event]:
        """From now on the writer endpoint lags ``seconds`` behind a promotion."""
        with self._lock:
            if seconds < 0:
                raise ClusterError(f"dns staleness: expected seconds >= 0, got {seconds!r}")
            self.timeline = dataclasses.replace(self.timeline, dns_staleness=seconds)
            event = self.events.record("dns_staleness_set", None, seconds=seconds)
            return [event]

    def set_status_age(self, instance_id: str, seconds: float | None) -> list[Event]:
        """Make the topology report ``instance_id``'s status as last updated ``seconds`` ago
        (Aurora ignores reader rows older than 300 s); ``None``: fresh again (while it runs).
        The instance itself keeps running; only what the topology says about it changes."""
        with self._lock:
            since = time.monotonic()
            instance = self.instance(instance_id)
            if seconds is not None and (
                    not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                    or seconds < 0):
                raise ClusterError(f"status age: expected seconds >= 0 or None, got {seconds!r}")
            instance.status_age = None if seconds is None else float(seconds)
            if not self._publish():
                raise ClusterError(f"cluster {self.name} has no running writer to publish to")
            return self.events.events(since=since)

    # --- blue/green -----------------------------------------------------------------------------
    def create_blue_green(self, green: Cluster) -> list[Event]:
        """Make this cluster the blue side of a blue/green deployment whose green side is
        ``green`` (another running cluster of the same flavour, on the same port, e.g.
        started with ``port=blue.port``). Both clusters' metadata then show every endpoint
        of both sides with status ``AVAILABLE``. :meth:`switchover` switches over."""
        with self._lock:
            since = time.monotonic()
            if green is self:
                raise ClusterError("blue/green: the green cluster must be another cluster")
            if green._stopped or self._stopped:
                raise ClusterError("blue/green: both clusters must be running")
            if green.flavour is not self.flavour:
                raise ClusterError(
                    f"blue/green: green cluster {green.name} is {green.flavour.name}, "
                    f"blue cluster {self.name} is {self.flavour.name}; they must match")
            if green.port != self.port:
                raise ClusterError(
                    f"blue/green: green cluster {green.name} listens on port {green.port}, "
                    f"blue cluster {self.name} on {self.port}; start it with port={self.port}")
            if self._green is not None or self._switched_to is not None:
                raise ClusterError(f"cluster {self.name} is already in a blue/green deployment")
            if green._green is not None or green._renamed_by is not None:
                raise ClusterError(f"cluster {green.name} is already in a blue/green deployment")
            self._green = green
            try:
                self._publish_blue_green(BLUE_GREEN_PHASES[0], renamed=False)
            except BaseException:
                self._green = None
                raise
            self.events.record("switchover_phase", None, phase=BLUE_GREEN_PHASES[0],
                               green=green.name)
            return self.events.events(since=since)

    def switchover(self) -> list[Event]:
        """Switch a blue/green deployment over (:meth:`create_blue_green` first): the
        metadata goes through ``SWITCHOVER_INITIATED``, ``SWITCHOVER_IN_PROGRESS`` (the blue
        writer turns read-only), ``SWITCHOVER_IN_POST_PROCESSING`` (the names move: this
        cluster's endpoints now resolve to the green cluster, this one is renamed
        ``...-old1``; ``dns_updated``) and ``SWITCHOVER_COMPLETED``, each phase lasting
        ``timeline.switchover_phase`` seconds. Records a ``switchover_phase`` event per phase
        and ``switchover_finished``; returns them."""
        with self._lock:
            since = time.monotonic()
            green = self._green
            if green is None:
                raise ClusterError(
                    f"cluster {self.name} has no blue/green deployment; call "
                    "create_blue_green(green) first")
            renamed = False
            for phase in BLUE_GREEN_PHASES[1:]:
                time.sleep(self.timeline.switchover_phase)
                if phase == "SWITCHOVER_IN_PROGRESS":
                    # Published first: clients learn of the phase as it starts, then lose
                    # their sessions (RDS drops the connections of both environments).
                    self._publish_blue_green(phase, renamed=renamed)
                    self.events.record("switchover_phase", None, phase=phase, green=green.name)
                    writer = self.writer
                    self.engine.set_read_only(writer, True)
                    self.events.record("writer_read_only", writer.id, read_only=True)
                    for cluster in (self, green):
                        with cluster._lock:
                            for instance in cluster.instances.values():
                                if instance.role != "stopped":
                                    cluster.engine.end_client_sessions(instance)
                    self.events.record("sessions_ended", None, green=green.name)
                    with green._lock:
                        green.engine.copy_data(writer, green.writer)
                    self.events.record("data_copied", writer.id, target=green.writer.id)
                    continue
                if phase == "SWITCHOVER_IN_POST_PROCESSING":
                    renamed = True
                    self._switched_to = green
                    green._renamed_by = self
                    self._update_dns()
                    self.events.record("dns_updated", None, endpoint=self.writer_endpoint,
                                       cluster=green.name)
                elif phase == "SWITCHOVER_COMPLETED":
                    with green._lock:
                        green._names_deleted = True
                        green._update_dns()
                    self.events.record("dns_updated", None, endpoint=green.writer_endpoint,
                                       deleted=True)
                self._publish_blue_green(phase, renamed=renamed)
                self.events.record("switchover_phase", None, phase=phase, green=green.name)
            self._green = None
            self.events.record("switchover_finished", None, green=green.name)
            return self.events.events(since=since)

    def _blue_green_rows(self, status: str, *, renamed: bool) -> list[BlueGreenRow]:
        green = self._green
        assert green is not None
        blue_naming = _old_naming(self.naming) if renamed else self.naming
        green_naming = self.naming if renamed else green.naming
        rows: list[BlueGreenRow] = []
        for role, cluster, naming in ((_BLUE_ROLE, self, blue_naming),
                                      (_GREEN_ROLE, green, green_naming)):
            assert cluster.port is not None
            if not cluster.single_instance:
                rows.append(BlueGreenRow("1.0", naming.writer, cluster.port, role, status))
            for instance in cluster.instances.values():
                name = naming.instance(instance.id) if not (renamed and cluster is self) \
                    else _old_instance(self.naming)(instance.id)
                rows.append(BlueGreenRow("1.0", name, cluster.port, role, status))
        return rows

    def _publish_blue_green(self, status: str, *, renamed: bool) -> None:
        green = self._green
        assert green is not None
        rows = self._blue_green_rows(status, renamed=renamed)
        self.engine.publish_blue_green(self.writer, rows)
        if self.timeline.green_metadata_lag:
            time.sleep(self.timeline.green_metadata_lag)
        with green._lock:
            green.engine.publish_blue_green(green.writer, rows)

    # --- IAM -------------------------------------------------------------------------------
    def enable_iam(self, user: str = "iam_user", *, region: str | None = None,
                   credentials: Sequence[IamCredentials] | None = None) -> list[Event]:
        """Create database user ``user`` that logs in only with an RDS IAM auth token.

        Every instance (also readers added later and whichever instance a failover promotes)
        then accepts ``user`` only with a valid, unexpired token from boto3's
        ``generate_db_auth_token`` for one of its host names in its current role, the
        cluster's port, ``user`` and ``region`` (default: the cluster's region), signed with
        one of ``credentials`` (default: :data:`simulator.iam.TEST_CREDENTIALS`, the tests'
        ``testing``/``testing``). Call again to add users or trust more credentials (e.g.
        temporary ones from STS); the region cannot change. Needs root (a PAM service in
        ``/etc/pam.d``), gcc and the PAM headers. See :mod:`simulator.iam`.
        """
        from .iam import TEST_CREDENTIALS, ClusterIam, IamError

        if not isinstance(user, str) or not _IAM_USER_RE.fullmatch(user):
            raise ClusterError(f"enable_iam: user {user!r}: expected letters, digits and _ "
                               "(at most 32, starting with a letter or _)")
        with self._lock:
            since = time.monotonic()
            iam = self.iam
            if iam is None:
                try:
                    iam = ClusterIam(self, region or self.naming.region,
                                     credentials or [TEST_CREDENTIALS])
                    iam.install()
                except IamError as exc:
                    raise ClusterError(f"cluster {self.name}: {exc}") from exc
                self.iam = iam
            elif region is not None and region != iam.region:
                raise ClusterError(f"enable_iam: region {region!r}: IAM of cluster {self.name} "
                                   f"is already enabled for region {iam.region!r}")
            iam.trust(credentials or ())
            new_user = iam.add_user(user)
            iam.sync()
            # Every instance first (MariaDB: the plugin must be loaded where CREATE USER
            # ... VIA pam replicates to), then the user on the writer.
            for instance in list(self.instances.values()):
                self.engine.apply_iam(instance, iam)
            if new_user:
                self.engine.create_iam_user(self.writer, user, iam)
            self.events.record("iam_enabled", None, user=user, region=iam.region,
                               service=iam.service)
            return self.events.events(since=since)

    # --- helpers for tests and the CLI -------------------------------------------------------
    def settled(self) -> bool:
        """Every instance back in a role and every reader replicating from the writer (what a
        test or benchmark waits for between failovers: a crash before the readers follow
        again would lose what only the writer had)."""
        if any(i.role == "stopped" for i in self.instances.values()):
            return False
        return self.engine.following(self.writer, self.readers)


    @contextlib.contextmanager
    def superuser(self, instance_id: str | None = None) -> Iterator[Any]:
        """A superuser driver connection straight to an instance (default: the writer)."""
        instance = self.instance(instance_id) if instance_id else self.writer
        conn = connect_runtime(instance.runtime)
        try:
            yield conn
        finally:
            conn.close()


def connect_runtime(runtime: Any, **extra: Any) -> Any:
    """A superuser connection to an instance runtime, by address (no DNS)."""
    kwargs = {**runtime.connect_kwargs(), **extra}
    if runtime.engine == "postgresql":
        import psycopg

        return psycopg.connect(**kwargs, autocommit=True)
    import mysql.connector

    return mysql.connector.connect(**kwargs, use_pure=True, autocommit=True)
