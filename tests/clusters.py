"""A simulated cluster shared by the tests of a module, restored before and after each test.

Starting a cluster costs seconds, so a module shares one; but its tests fail it over, add and
remove readers, kill servers and reconfigure them. If a test fails half-way, what it changed
must not become the next test's failure. :class:`SharedCluster` hands each test a cluster
that its module's ``settle`` function has brought back to the module's invariant (the
instances it started with, each in a role, every reader replicating from the writer), and
settles it again when the test ends. If settling fails, the cluster is stopped and the error
is reported at the teardown of the test that broke it; the next test gets a fresh cluster.

:class:`SharedClusters` keeps one such cluster per key, each started on first use. Keyed by
instance runtime (``Cluster(backend=...)``), a fixture parametrized with :data:`BACKENDS`
picks one, so that the same cluster tests run on local processes, on containers, and on
local processes behind a proxy per instance (``local-proxied``: ``Cluster(proxied=True)``,
every name leading to the proxies). The container run is marked ``docker`` and skipped, with
the reason, where no Docker daemon answers (:func:`require_backend`). :func:`cluster_options`
turns a parameter into ``Cluster.start`` keywords. Keyed by engine (``aurora-pg``,
``aurora-mysql``), a module whose tests run on both starts only the clusters its selected
tests use.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import pytest

from simulator.cluster import Cluster, ClusterError

from .waiting import wait_until

__all__ = ["BACKENDS", "Settle", "SharedCluster", "SharedClusters", "caught_up",
           "cluster_options", "require_backend", "settle_global", "settle_roles",
           "start_stopped"]

#: ``params`` of a module-scoped fixture: every instance runtime a cluster can run on, and
#: the local one proxied (the proxy does not depend on the runtime: one proxied run is
#: enough for the contract; tests/test_sim_proxied.py starts a proxied container cluster).
BACKENDS = [pytest.param("local", id="local"),
            pytest.param("testcontainers", id="testcontainers", marks=pytest.mark.docker),
            pytest.param("local-proxied", id="local-proxied")]


def cluster_options(name: str) -> dict[str, Any]:
    """``Cluster.start`` keywords of a :data:`BACKENDS` parameter (``<backend>[-proxied]``)."""
    backend, _, proxied = name.partition("-")
    return {"backend": backend, "proxied": proxied == "proxied"}


@functools.cache
def _docker_unavailable() -> str | None:
    from simulator.testcontainers_backend import docker_unavailable_reason

    return docker_unavailable_reason()


def require_backend(name: str) -> str:
    """``name``; skips the test when it is ``testcontainers`` and no Docker daemon answers."""
    if name.partition("-")[0] == "testcontainers":
        reason = _docker_unavailable()
        if reason is not None:
            pytest.skip(reason)
    return name

LOGGER = logging.getLogger("tests.clusters")

#: ``settle(cluster, instance_ids)``: bring ``cluster`` back to the instances it started with
#: (``instance_ids``), every one in a role and replicating; raise if it cannot.
Settle = Callable[[Cluster, frozenset[str]], None]


def caught_up(cluster: Cluster) -> bool:
    """Every reader has received everything the writer has (the engine's replication
    position: PostgreSQL's LSN, MariaDB's GTID sequence)."""
    engine = cluster.engine
    target = engine.replication_position(cluster.writer)
    if target is None:
        return False
    for reader in cluster.readers:
        position = engine.replication_position(reader)
        if position is None or position < target:
            return False
    return True


def start_stopped(cluster: Cluster) -> None:
    """Start every stopped instance in its role (:meth:`Cluster.start_instance`). A rejoin
    the cluster has scheduled (after a failover) may run first: an instance it brought back
    is left alone."""
    for instance in list(cluster.instances.values()):
        if instance.role == "stopped":
            try:
                cluster.start_instance(instance.id)
            except ClusterError:
                if instance.role == "stopped":
                    raise  # not the scheduled rejoin that won the race


def settle_roles(cluster: Cluster, instance_ids: frozenset[str]) -> None:
    """A ``settle`` for modules whose tests accept any writer: the instances the cluster
    started with, every one running in a role (:func:`start_stopped`), the writer writable,
    every reader following it."""
    assert set(cluster.instances) == instance_ids, (
        f"instances {sorted(cluster.instances)}, expected {sorted(instance_ids)}")
    start_stopped(cluster)
    cluster.make_writer_read_only(False)
    wait_until("readers following the writer", cluster.settled)


def settle_global(primary_region: str, writer: str) -> Settle:
    """The ``settle`` of a shared Global Database: every instance it started with running
    in a role (a region lost in a global failover restored, a killed or stopped instance
    rejoined), ``primary_region`` primary again (a global switchover back) with ``writer``
    its writer (a graceful failover to it within the region), the writer writable, and
    every reader following the writer and caught up with it."""

    def settle(cluster: Cluster, instance_ids: frozenset[str]) -> None:
        # An instance lost with its region, or killed, rejoins here.
        settle_roles(cluster, instance_ids)
        if cluster.primary_region != primary_region:
            cluster.switchover_global(primary_region)
            wait_until("readers following the writer", cluster.settled)
        if cluster.writer.id != writer:
            cluster.failover(target=writer, mode="graceful")
            wait_until("readers following the writer", cluster.settled)
        cluster.make_writer_read_only(False)
        wait_until("every reader caught up with the writer", lambda: caught_up(cluster))

    return settle


class SharedCluster(AbstractContextManager["SharedCluster"]):
    """One cluster for a module's tests (see the module docstring). Use :meth:`fixture` in
    the function-scoped fixture the tests ask for."""

    def __init__(self, start: Callable[[], Cluster], settle: Settle) -> None:
        self._start = start
        self._settle = settle
        self._cluster: Cluster | None = None
        self._instance_ids: frozenset[str] = frozenset()

    def _fresh(self) -> Cluster:
        cluster = self._start()
        self._cluster = cluster
        self._instance_ids = frozenset(cluster.instances)
        return cluster

    def _discard(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.stop()

    def acquire(self) -> Cluster:
        """The cluster, settled; a cluster that cannot be settled is replaced by a fresh one
        (what broke it was reported at the teardown of an earlier test)."""
        cluster = self._cluster or self._fresh()
        try:
            self._settle(cluster, self._instance_ids)
        except Exception:
            LOGGER.warning("cluster %s cannot be settled; starting a fresh one", cluster.name,
                           exc_info=True)
            self._discard()
            cluster = self._fresh()
            self._settle(cluster, self._instance_ids)
        return cluster

    def release(self) -> None:
        """Settle the cluster after a test; if that fails, stop it and re-raise, so that the
        error belongs to the test that left it broken and the next test starts fresh."""
        cluster = self._cluster
        if cluster is None:
            return
        try:
            self._settle(cluster, self._instance_ids)
        except BaseException:
            self._discard()
            raise

    def fixture(self) -> Iterator[Cluster]:
        """Body of a function-scoped fixture: ``yield from shared.fixture()``."""
        cluster = self.acquire()
        yield cluster
        self.release()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._discard()



class SharedClusters(AbstractContextManager["SharedClusters"]):
    """One :class:`SharedCluster` per key, each started on first use; for a module-scoped
    fixture. ``start(key)`` starts the cluster of ``key``: a :data:`BACKENDS` name (a cluster
    on that backend) or an engine (``Cluster.start(engine, ...)``)."""

    def __init__(self, start: Callable[[str], Cluster], settle: Settle) -> None:
        self._start = start
        self._settle = settle
        self._shared: dict[str, SharedCluster] = {}

    def get(self, key: str) -> SharedCluster:
        """The shared cluster of ``key`` (a ``testcontainers`` backend is skipped without
        Docker, see :func:`require_backend`)."""
        require_backend(key)
        shared = self._shared.get(key)
        if shared is None:
            shared = SharedCluster(lambda: self._start(key), self._settle)
            self._shared[key] = shared
        return shared

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for shared in self._shared.values():
            shared.__exit__(None, None, None)
