"""A simulated Aurora PostgreSQL Limitless Database DB shard group: transaction routers on real
PostgreSQL servers, with the router list function and a control plane (``docs/simulator.md``,
"Limitless shard group").

An Aurora Limitless shard group is reached through its shard group endpoint
(``<name>.shardgrp-<id>.<region>.rds.amazonaws.com``), which Route 53 resolves to one of its
*transaction routers*; every router accepts any transaction, and
``pg_catalog.aurora_limitless_router_endpoints()`` lists the routers as
``(router_endpoint, load)`` with ``load`` between 0 and 1 (``AURORA_INTERFACE.md``).

Here each router is a PostgreSQL server of its own (one loopback address each, one shared
port), reachable under its own name (``<router-id>.<shard-group-id>.<region>.rds.amazonaws.com``)
and under the shard group endpoint, which resolves to every running router in router order.
The routers share no data: a real shard group keeps the data on shards behind the routers;
here what a router acknowledged lives on that router (its data survives a kill and a
restart, as a crash of a real router loses nothing on the shards). A test that checks that
no acknowledged write was lost reads the union of the routers once they run again
(:meth:`ShardGroup.rows`).

Interface on every router (created by the superuser in ``pg_catalog``, in the databases
``test`` and ``postgres``): ``aurora_limitless_router_endpoints()`` reading the table
``rds_sim.limitless_routers`` that the control plane writes on every running router (and on a
router when it starts again), ``aurora_db_instance_identifier()`` (the router id),
``aurora_version()``, and ``rds.extensions`` listing ``aurora_stat_utils``. There is no
``aurora_replica_status()``: routers are not instances of a replication topology, so the
``aurora-pg`` dialect does not match a router (resilient_db sees plain PostgreSQL).

    with ShardGroup.start(routers=3) as group:
        psycopg.connect(**group.connect_kwargs())        # the shard group endpoint
        group.set_router_load("router-2", 0.9)            # what the router list reports
        group.kill_router("router-1")                     # SIGKILL; still listed
        group.start_router("router-1")

Every control-plane action records a timestamped event (``router_started``,
``router_killed``, ``router_stopped``, ``router_load_set``, ``router_list_updated``,
``dns_updated``) and returns the events it recorded.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import psycopg

from ._addresses import ProcessIdentity
from .cluster import ClusterError, Naming
from .events import Event, EventLog
from .local import LocalServer
from .names import HostsFile
from .pg_cluster import (
    APP_PASSWORD,
    APP_USER,
    AURORA_EXTENSIONS,
    AURORA_IDENTITY_FUNCTIONS,
    END_CLIENT_SESSIONS,
    INSTANCE_ID_SETTING,
    INTERFACE_DATABASES,
    install_interface,
    launch,
    superuser_connection,
)

__all__ = ["Router", "ShardGroup"]

LOGGER = logging.getLogger("resilient_db.simulator")


_INTERFACE = """\
CREATE SCHEMA rds_sim;
REVOKE ALL ON SCHEMA rds_sim FROM PUBLIC;
COMMENT ON SCHEMA rds_sim IS 'resilient_db simulator: router list written by the control plane';
CREATE TABLE rds_sim.limitless_routers (
    ord integer PRIMARY KEY,
    router_endpoint text NOT NULL,
    load real NOT NULL
);
SET allow_system_table_mods = on;
CREATE FUNCTION pg_catalog.aurora_limitless_router_endpoints(
    OUT router_endpoint text, OUT load real)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
  SELECT r.router_endpoint, r.load FROM rds_sim.limitless_routers AS r ORDER BY r.ord
$$;
""" + AURORA_IDENTITY_FUNCTIONS + """\
RESET allow_system_table_mods;
"""


@dataclass
class Router:
    """One transaction router: ``runtime`` its server, ``endpoint`` its DNS name, ``load``
    what the router list reports for it, ``listed`` whether the list shows it at all."""

    id: str
    runtime: LocalServer
    endpoint: str
    load: float = 0.0
    listed: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return str(self.runtime.host)

    @property
    def port(self) -> int:
        return int(self.runtime.port)

    @property
    def running(self) -> bool:
        return bool(self.runtime.is_running())


class ShardGroup:
    """A running simulated Limitless shard group. Create with :meth:`start`; stop with
    :meth:`stop` or a ``with`` block. Control-plane actions are serialised."""

    def __init__(self, *, routers: int = 3, name: str | None = None,
                 shard_group_id: str | None = None, region: str = "us-east-1",
                 port: int | None = None) -> None:
        if not isinstance(routers, int) or isinstance(routers, bool) or not 1 <= routers <= 16:
            raise ClusterError(f"routers={routers!r}: expected a whole number from 1 to 16")
        self.router_count = routers
        self.name = name or f"lim{secrets.token_hex(3)}"
        if not self.name.isalnum() or not self.name[0].isalpha():
            raise ClusterError(
                f"name {self.name!r}: expected letters and digits, starting with a letter")
        self.naming = Naming(self.name.lower(), shard_group_id or f"c{secrets.token_hex(6)}",
                             region)
        self.port = port
        self.events = EventLog()
        self.routers: dict[str, Router] = {}
        self._lock = threading.RLock()
        self._hosts = HostsFile()
        self._owner = ProcessIdentity.current()
        self._stopped = False

    # --- creation and teardown ------------------------------------------------------------
    @classmethod
    def start(cls, **kwargs: Any) -> ShardGroup:
        group = cls(**kwargs)
        try:
            group._start()
        except BaseException:
            group.stop()
            raise
        return group

    def _start(self) -> None:
        self._hosts.sweep()
        for n in range(1, self.router_count + 1):
            self._create_router(f"router-{n}")
        self._publish()
        self._update_dns()
        self.events.record("shard_group_started", None, routers=list(self.routers))

    def _create_router(self, router_id: str) -> Router:
        settings = {INSTANCE_ID_SETTING: router_id, "rds.extensions": AURORA_EXTENSIONS,
                    "log_min_messages": "warning"}
        server = launch(LocalServer, "rds-pg", port=self.port, settings=settings,
                        name=f"{self.name}-{router_id}",
                        setup=lambda started: install_interface(started, _INTERFACE))
        if self.port is None:
            self.port = server.port
        router = Router(router_id, server, self.naming.instance(router_id))
        self.routers[router_id] = router
        self.events.record("router_started", router_id, address=router.address)
        return router

    def stop(self) -> None:
        """Stop every router and remove the names. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            for router in reversed(list(self.routers.values())):
                with contextlib.suppress(Exception):
                    router.runtime.stop()
            with contextlib.suppress(Exception):
                self._hosts.remove_cluster(self.name, self._owner)
            self.events.record("shard_group_stopped")

    def __enter__(self) -> ShardGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- views ------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The shard group endpoint (``<name>.shardgrp-<id>.<region>.rds.amazonaws.com``)."""
        return f"{self.naming.name}.shardgrp-{self.naming.suffix}"

    def router(self, router_id: str) -> Router:
        try:
            return self.routers[router_id]
        except KeyError:
            raise ClusterError(f"no router {router_id!r} in shard group {self.name}; routers: "
                               f"{', '.join(self.routers)}") from None

    def router_by_endpoint(self, endpoint: str) -> Router:
        for router in self.routers.values():
            if router.endpoint == endpoint.lower():
                return router
        raise ClusterError(f"no router with endpoint {endpoint!r} in shard group {self.name}")

    def connect_kwargs(self, endpoint: str | None = None) -> dict[str, Any]:
        """psycopg keyword arguments for ``endpoint`` (default: the shard group endpoint) as
        the application user (``app``, not a superuser)."""
        first = next(iter(self.routers.values()))
        kwargs: dict[str, Any] = dict(first.runtime.connect_kwargs())
        kwargs["host"] = endpoint or self.endpoint
        kwargs["port"] = self.port
        kwargs.update({"user": APP_USER, "password": APP_PASSWORD})
        return kwargs

    def router_list(self) -> list[tuple[str, float]]:
        """What ``aurora_limitless_router_endpoints()`` reports now."""
        return [(r.endpoint, r.load) for r in self.routers.values() if r.listed]

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.endpoint, "port": self.port,
                "routers": [{"id": r.id, "endpoint": r.endpoint, "address": r.address,
                             "load": r.load, "listed": r.listed, "running": r.running}
                            for r in self.routers.values()]}

    # --- control plane ----------------------------------------------------------------------
    def set_router_load(self, router_id: str, load: float) -> list[Event]:
        """Make the router list report ``load`` for the router (any float: a real router
        reports 0 to 1; other values test a client's handling of nonsense)."""
        if not isinstance(load, (int, float)) or isinstance(load, bool):
            raise ClusterError(f"load={load!r}: expected a number")
        with self._lock:
            since = time.monotonic()
            router = self.router(router_id)
            router.load = float(load)
            self.events.record("router_load_set", router_id, load=router.load)
            self._publish()
            return self.events.events(since=since)

    def set_router_loads(self, loads: dict[str, float]) -> list[Event]:
        """:meth:`set_router_load` for several routers, published at once."""
        with self._lock:
            since = time.monotonic()
            for router_id, load in loads.items():
                self.router(router_id).load = float(load)
                self.events.record("router_load_set", router_id, load=float(load))
            self._publish()
            return self.events.events(since=since)

    def kill_router(self, router_id: str, *, delist: bool = False) -> list[Event]:
        """SIGKILL a router (a crash). The shard group endpoint stops resolving to it at once;
        the router list keeps showing it (as before the service notices) unless ``delist``."""
        with self._lock:
            since = time.monotonic()
            router = self.router(router_id)
            router.runtime.kill()
            self.events.record("router_killed", router_id)
            if delist:
                router.listed = False
            self._publish()
            self._update_dns()
            return self.events.events(since=since)

    def stop_router(self, router_id: str, *, delist: bool = True) -> list[Event]:
        """Shut a router down cleanly (sessions ended); delisted unless ``delist`` is false."""
        with self._lock:
            since = time.monotonic()
            router = self.router(router_id)
            router.runtime.stop(cleanup=False)
            self.events.record("router_stopped", router_id)
            if delist:
                router.listed = False
            self._publish()
            self._update_dns()
            return self.events.events(since=since)

    def start_router(self, router_id: str) -> list[Event]:
        """Start a killed or stopped router again (listed again, the current list written to
        it, back behind the shard group endpoint)."""
        with self._lock:
            since = time.monotonic()
            router = self.router(router_id)
            router.runtime.start()
            router.listed = True
            self.events.record("router_started", router_id, address=router.address)
            self._publish()
            self._update_dns()
            return self.events.events(since=since)

    def end_sessions(self, router_id: str) -> list[Event]:
        """End every application session on a router (it stays up)."""
        with self._lock:
            since = time.monotonic()
            with self._connect(self.router(router_id)) as conn:
                conn.execute(END_CLIENT_SESSIONS)
            self.events.record("router_sessions_ended", router_id)
            return self.events.events(since=since)

    # --- data -------------------------------------------------------------------------------
    def execute_everywhere(self, statement: str) -> None:
        """Run ``statement`` as the application user on every running router (e.g. create the
        table a test writes to: the routers share no catalog)."""
        for router in self.routers.values():
            if not router.running:
                continue
            server = router.runtime
            with psycopg.connect(host=server.host, port=server.port, dbname=server.database,
                                 user=APP_USER, password=APP_PASSWORD, autocommit=True,
                                 connect_timeout=5) as conn:
                conn.execute(statement.encode())

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        """The rows ``query`` returns on every running router, concatenated (the shard group's
        data: see the module docstring)."""
        result: list[tuple[Any, ...]] = []
        for router in self.routers.values():
            if router.running:
                with self._connect(router) as conn:
                    result.extend(conn.execute(query.encode()).fetchall())
        return result

    # --- internals --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self, router: Router, dbname: str = "test",
                 timeout: float = 5.0) -> Iterator[psycopg.Connection[Any]]:
        with superuser_connection(router.runtime, dbname, timeout) as conn:
            yield conn

    def _publish(self) -> None:
        """Write the router list to every running router."""
        rows = [(n, endpoint, load) for n, (endpoint, load) in enumerate(self.router_list())]
        for router in self.routers.values():
            if not router.running:
                continue
            for dbname in INTERFACE_DATABASES:
                with self._connect(router, dbname) as conn, conn.transaction():
                    conn.execute("DELETE FROM rds_sim.limitless_routers")
                    with conn.cursor() as cur:
                        cur.executemany("INSERT INTO rds_sim.limitless_routers (ord, "
                                        "router_endpoint, load) VALUES (%s, %s, %s)", rows)
        self.events.record("router_list_updated", None, routers=[r[1] for r in rows],
                           loads=[r[2] for r in rows])

    def _update_dns(self) -> None:
        running = [r for r in self.routers.values() if r.running]
        entries = [(self.endpoint, r.address) for r in running]
        entries += [(r.endpoint, r.address) for r in self.routers.values()]
        self._hosts.set_cluster(self.name, entries, self._owner)
        self.events.record("dns_updated", None, endpoint=self.endpoint,
                           addresses=[r.address for r in running])

    def __repr__(self) -> str:
        return f"<ShardGroup {self.name} routers={list(self.routers)} stopped={self._stopped}>"
