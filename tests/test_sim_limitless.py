"""The simulated Limitless shard group (``simulator.limitless``) on its own: the router list
function, router load, DNS of the shard group endpoint, kill / stop / start, and events."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import pytest

from simulator.cluster import ClusterError
from simulator.limitless import ShardGroup

pytestmark = pytest.mark.real_server

LIST = "SELECT router_endpoint, load FROM pg_catalog.aurora_limitless_router_endpoints()"


@pytest.fixture(scope="module")
def group() -> Iterator[ShardGroup]:
    with ShardGroup.start(routers=2) as started:
        yield started


def resolves(name: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return set()
    return {str(info[4][0]) for info in infos}


def test_every_router_lists_every_router_with_its_load(group: ShardGroup) -> None:
    group.set_router_load("router-2", 0.75)
    try:
        for router in group.routers.values():
            with psycopg.connect(**group.connect_kwargs(router.endpoint)) as conn:
                rows = conn.execute(LIST).fetchall()
                who = conn.execute("SELECT pg_catalog.aurora_db_instance_identifier()").fetchone()
                extensions = conn.execute("SHOW rds.extensions").fetchone()
            assert rows == [(group.router("router-1").endpoint, 0.0),
                            (group.router("router-2").endpoint, 0.75)]
            assert who == (router.id,)
            assert extensions is not None and "aurora_stat_utils" in extensions[0]
        assert group.events.last("router_load_set") is not None
    finally:
        group.set_router_load("router-2", 0.0)


def test_the_endpoint_resolves_to_the_running_routers(group: ShardGroup) -> None:
    addresses = {r.address for r in group.routers.values()}
    assert resolves(group.endpoint) == addresses
    router = group.router("router-1")
    events = group.kill_router("router-1")
    try:
        assert [e.name for e in events][:1] == ["router_killed"]
        assert resolves(group.endpoint) == addresses - {router.address}
        assert resolves(router.endpoint) == {router.address}  # its own name stays
        assert (router.endpoint, 0.0) in group.router_list()  # still listed (not delisted)
        with psycopg.connect(**group.connect_kwargs()) as conn:  # the endpoint works
            assert conn.execute(LIST).fetchall() == group.router_list()
    finally:
        group.start_router("router-1")
    assert resolves(group.endpoint) == addresses


def test_a_stopped_router_is_delisted_and_relisted_when_it_starts(group: ShardGroup) -> None:
    group.stop_router("router-2")
    try:
        assert [r for r, _ in group.router_list()] == [group.router("router-1").endpoint]
        with psycopg.connect(**group.connect_kwargs()) as conn:
            assert len(conn.execute(LIST).fetchall()) == 1
    finally:
        group.start_router("router-2")
    with psycopg.connect(**group.connect_kwargs(group.router("router-2").endpoint)) as conn:
        assert len(conn.execute(LIST).fetchall()) == 2  # written to it when it started


def test_bad_input_is_refused(group: ShardGroup) -> None:
    with pytest.raises(ClusterError):
        group.set_router_load("router-9", 0.1)
    with pytest.raises(ClusterError):
        group.set_router_load("router-1", "high")  # type: ignore[arg-type]
    with pytest.raises(ClusterError):
        ShardGroup(routers=0)
