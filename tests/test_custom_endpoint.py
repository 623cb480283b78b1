"""The ``custom_endpoint`` plugin on simulated clusters (Aurora PostgreSQL with psycopg, the
Aurora MySQL look-alike with mysql-connector), with the custom endpoints' members served by
the RDS API stand-in on a moto server (``tests/aws.py``: ``DescribeDBClusterEndpoints`` and
friends). Each failover test is set up so that the host failover would choose without the
plugin is a non-member; the pure parts have unit tests at the end."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import ConfigurationError, FailoverFailedError, HostsContext, HostSpec
from resilient_db._aws_properties import AWS_UNSUPPORTED
from resilient_db._plugin_registry import BUILTIN, PLANNED, resolve
from resilient_db.hosts import Host, Role, TopologySnapshot
from resilient_db.plugins import custom_endpoint
from resilient_db.plugins.custom_endpoint import (
    CustomEndpointInfo,
    CustomEndpointInfoError,
    CustomEndpointPlugin,
    restrict,
)
from resilient_db.plugins.failover import FailoverPlugin
from simulator.cluster import Cluster, Timeline

from .aws import TEST_CREDENTIALS, ClusterEndpoints, cluster_endpoints, mirror_cluster, moto_server
from .clusters import SharedCluster, settle_roles
from .waiting import wait_until

TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)
#: Fast refreshes, so that membership and topology changes are seen within the tests' polling
#: bound (a topology read right after a failover may not list the old writer yet).
FAST = {"custom_endpoint_info_refresh_rate_ms": 200, "topology_refresh_ms": 200}
_names = itertools.count(1)


# --- environment: a moto server with the custom endpoint API, two simulated clusters -----------


@dataclass
class Aws:
    url: str
    store: ClusterEndpoints
    rds: Any


@pytest.fixture(scope="module")
def aws() -> Iterator[Aws]:
    with moto_server() as url, cluster_endpoints() as store, pytest.MonkeyPatch.context() as mp:
        for key, value in TEST_CREDENTIALS.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                    "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_ENDPOINT_URL_RDS", url)
        custom_endpoint.forget_clients()
        rds = boto3.session.Session().client("rds", region_name="us-east-1")
        try:
            yield Aws(url, store, rds)
        finally:
            resilient_db.shutdown()
            custom_endpoint.forget_clients()


def _start(flavour: str, aws: Aws) -> Cluster:
    cluster = Cluster.start(flavour, readers=2, timeline=TIMELINE)
    try:
        mirror_cluster(aws.rds, cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def pg_cluster(aws: Aws) -> Iterator[SharedCluster]:
    with SharedCluster(lambda: _start("aurora-pg", aws), settle_roles) as shared:
        yield shared


@pytest.fixture(scope="module")
def mysql_cluster(aws: Aws) -> Iterator[SharedCluster]:
    with SharedCluster(lambda: _start("aurora-mysql", aws), settle_roles) as shared:
        yield shared


@dataclass
class Env:
    """One simulated cluster, its RDS API stand-in and how the application talks to it."""

    name: str
    cluster: Cluster
    aws: Aws
    target: Callable[..., Any]
    extra: dict[str, Any]
    instance_sql: str
    opened: list[Any] = field(default_factory=list)

    def create_endpoint(self, **members: Any) -> str:
        """A new custom endpoint in the simulator (DNS) and the API stand-in; its host."""
        name = f"ce{next(_names)}"
        self.cluster.create_custom_endpoint(name, **members)
        described = self.cluster.custom_endpoint(name).describe(self.cluster.name)
        self._api("create_db_cluster_endpoint", name, described)
        return self.cluster.custom_endpoint(name).host

    def modify_endpoint(self, host: str, **members: Any) -> None:
        name = host.split(".", 1)[0]
        self.cluster.modify_custom_endpoint(name, **members)
        self._api("modify_db_cluster_endpoint", name,
                  self.cluster.custom_endpoint(name).describe(self.cluster.name))

    def _api(self, action: str, name: str, described: dict[str, Any]) -> None:
        members = ({"StaticMembers": described["StaticMembers"]} if described["StaticMembers"]
                   else {"ExcludedMembers": described["ExcludedMembers"]})
        kwargs: dict[str, Any] = {"DBClusterEndpointIdentifier": name,
                                  "EndpointType": described["CustomEndpointType"], **members}
        if action == "create_db_cluster_endpoint":
            kwargs["DBClusterIdentifier"] = self.cluster.name
        getattr(self.aws.rds, action)(**kwargs)

    def connect(self, host: str, *, plugins: str = "custom_endpoint,failover",
                **extra: Any) -> resilient_db.ConnectionProxy:
        kwargs = {**self.cluster.connect_kwargs(host), **self.extra, "autocommit": True,
                  "connect_timeout": 5, **FAST, **extra}
        conn = resilient_db.connect(self.target, plugins=plugins, **kwargs)
        self.opened.append(conn)
        return conn

    def instance(self, conn: resilient_db.ConnectionProxy) -> str:
        cur = conn.cursor()
        cur.execute(self.instance_sql)
        row = cur.fetchone()
        cur.close()
        return str(row[0])


def close_connections(env: Env) -> None:
    for conn in env.opened:
        with contextlib.suppress(Exception):
            conn.close()
    env.opened.clear()


@pytest.fixture(params=["pg", "mysql"])
def env(request: pytest.FixtureRequest, aws: Aws) -> Iterator[Env]:
    shared: SharedCluster = request.getfixturevalue(f"{request.param}_cluster")
    cluster = shared.acquire()
    if request.param == "pg":
        environment = Env("pg", cluster, aws,
                          psycopg.Connection.connect, {},
                          "SELECT pg_catalog.aurora_db_instance_identifier()")
    else:
        environment = Env("mysql", cluster, aws,
                          mysql.connector.connect,
                          {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"},
                          "SELECT aurora_sim.aurora_server_id()")
    yield environment
    close_connections(environment)
    shared.release()


def plugin_of(conn: resilient_db.ConnectionProxy) -> CustomEndpointPlugin:
    found = conn.resilient.plugin("custom_endpoint")
    assert isinstance(found, CustomEndpointPlugin)
    return found


def failover_of(conn: resilient_db.ConnectionProxy) -> FailoverPlugin:
    found = conn.resilient.plugin("failover")
    assert isinstance(found, FailoverPlugin)
    return found


def run(conn: resilient_db.ConnectionProxy, env: Env) -> str:
    """The instance a statement runs on, failing over (once) if the connection was lost."""
    try:
        return env.instance(conn)
    except resilient_db.FailoverSuccessError:
        return env.instance(conn)


# --- failover stays within the members --------------------------------------------------------


@pytest.mark.real_server
def test_failover_lands_only_on_a_member(env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    old = cluster.writer.id
    promoted, outsider = (r.id for r in cluster.readers)
    # Members: the writer, later the reader that will be promoted. The other reader weighs
    # the most, so reader_or_writer failover would pick it first without the plugin.
    host = env.create_endpoint(static_members=[old])
    conn = env.connect(host, failover_mode="reader_or_writer",
                       failover_reader_host_selector_strategy="highest_weight",
                       weighted_random_host_weight_pairs=f"{outsider}:100,{promoted}:1")
    assert env.instance(conn) == old  # DNS leads to the one member
    env.modify_endpoint(host, static_members=[old, promoted])
    plugin = plugin_of(conn)
    wait_until("the new member seen by the monitor",
               lambda: plugin.monitor().info is not None
               and promoted in plugin.monitor().info.static_members)  # type: ignore[union-attr]
    wait_until("the topology monitor knows every instance",
               lambda: len((failover_of(conn).monitor().snapshot or TopologySnapshot(())).hosts)
               == 3)

    cluster.failover(target=promoted)
    landed = run(conn, env)

    assert landed == promoted
    assert landed != outsider
    plans = [d for d in sink.decisions if d.kind == "failover.plan"]
    assert plans, sink.kinds()
    outsider_address = cluster.instance(outsider).endpoint
    assert any(outsider_address in " ".join(p.attributes["resilient_db.failover.excluded"])
               for p in plans), "the outsider was a candidate and was left out"
    assert all(outsider_address not in " ".join(p.attributes["resilient_db.failover.attempts"])
               for p in plans)
    excluded = [d for d in sink.decisions if d.kind == "custom_endpoint.hosts_excluded"]
    assert excluded and any("is not a member of custom endpoint" in " ".join(
        d.attributes["resilient_db.custom_endpoint.reasons"]) for d in excluded)


@pytest.mark.real_server
def test_writer_failover_to_a_non_member_fails_clearly(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    old = cluster.writer.id
    promoted = cluster.readers[0].id
    host = env.create_endpoint(static_members=[old])
    conn = env.connect(host, failover_timeout_sec=60)  # strict_writer (the default)
    assert env.instance(conn) == old

    cluster.failover(target=promoted)
    with pytest.raises(FailoverFailedError) as info:
        env.instance(conn)

    message = str(info.value)
    assert "not allowed" in message and f"{promoted} is not a member of custom endpoint" in (
        message), message
    assert all(a.outcome.startswith("not allowed") for a in info.value.attempts)
    assert [a.host for a in info.value.attempts] == [cluster.instance(promoted).endpoint]
    assert "failover.outcome" in sink.kinds()


@pytest.mark.real_server
def test_initial_connection_chooses_only_members(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    member, outsider = (r.id for r in env.cluster.readers)
    host = env.create_endpoint(endpoint_type="READER", static_members=[member])
    # The outsider weighs the most: initial_connection would choose it from the topology.
    options = {"plugins": "custom_endpoint,initial_connection,failover",
               "verify_opened_connection_type": "reader",
               "initial_connection_host_selector_strategy": "highest_weight",
               "weighted_random_host_weight_pairs": f"{outsider}:100,{member}:1"}
    first = env.connect(host, **options)
    assert env.instance(first) == member  # through DNS: the one member
    wait_until("the topology listing every instance",
               lambda: len((failover_of(first).monitor().snapshot or TopologySnapshot(())).hosts)
               == 3)

    second = env.connect(host, **options)  # chosen from the known topology

    assert env.instance(second) == member
    landed = [d for d in sink.decisions if d.kind == "initial_connection.redirected"]
    assert landed and landed[-1].attributes["resilient_db.instance.id"] == member, sink.kinds()
    assert env.cluster.instance(outsider).endpoint in " ".join(
        [d for d in sink.decisions if d.kind == "custom_endpoint.hosts_excluded"][-1]
        .attributes["resilient_db.custom_endpoint.excluded"])


# --- the monitor: refresh, waiting, sharing, lifetime ------------------------------------------


@pytest.mark.real_server
def test_membership_change_is_picked_up_by_the_refresh(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    first, second = (r.id for r in cluster.readers)
    host = env.create_endpoint(endpoint_type="READER", static_members=[first])
    conn = env.connect(host)
    assert env.instance(conn) == first
    monitor = plugin_of(conn).monitor()
    assert monitor.info is not None and monitor.info.static_members == {first}
    wait_until("the topology listing every instance",
               lambda: len((failover_of(conn).monitor().snapshot or TopologySnapshot(())).hosts)
               == 3)
    snapshot = failover_of(conn).monitor().snapshot
    assert snapshot is not None

    def allowed() -> set[str]:
        offered = tuple(h.spec for h in snapshot.hosts)
        return {h.host for h in conn.resilient.pipeline.hosts(
            HostsContext(offered, plugin_of(conn).ctx.settings, snapshot))}

    assert allowed() == {cluster.instance(first).endpoint}
    env.modify_endpoint(host, static_members=[first, second])

    wait_until("the refresh seeing the second member",
               lambda: monitor.info is not None and second in monitor.info.static_members)
    assert allowed() == {cluster.instance(first).endpoint, cluster.instance(second).endpoint}
    refreshed = [d for d in sink.decisions if d.kind == "custom_endpoint.info_refreshed"
                 and d.attributes["server.address"] == host]
    assert [d.attributes["resilient_db.custom_endpoint.changed"] for d in refreshed].count(
        True) == 2, "the first answer and the change"
    assert refreshed[-1].attributes["resilient_db.custom_endpoint.static_members"] == tuple(
        sorted((first, second)))


@pytest.mark.real_server
def test_waiting_for_an_endpoint_that_does_not_exist_times_out(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    host = env.cluster.naming.custom("nosuchendpoint")
    started = time.monotonic()
    with pytest.raises(CustomEndpointInfoError) as info:
        env.connect(host, wait_for_custom_endpoint_info_timeout_ms=500)
    assert time.monotonic() - started < 30, "bounded"
    assert info.value.endpoint == host
    assert "found 0 custom endpoints named 'nosuchendpoint'" in str(info.value)
    assert "wait_for_custom_endpoint_info_timeout_ms" in str(info.value)
    kinds = sink.kinds()
    assert "custom_endpoint.waiting" in kinds and "custom_endpoint.wait_timed_out" in kinds
    assert "custom_endpoint.fetch_failed" in kinds


@pytest.mark.real_server
def test_connections_share_one_monitor_and_one_describe_stream(env: Env) -> None:
    resilient_db.shutdown()  # no other endpoint's monitor polling the stand-in
    host = env.create_endpoint(excluded_members=[env.cluster.readers[0].id])
    name = host.split(".", 1)[0]
    first = env.connect(host)
    second = env.connect(host)
    monitor = plugin_of(first).monitor()
    assert plugin_of(second).monitor() is monitor
    assert [m for m in custom_endpoint.monitors() if m.host == host] == [monitor]
    before_fetches, before_calls = monitor.fetches, env.aws.store.described[name]
    wait_until("three more refreshes", lambda: monitor.fetches >= before_fetches + 3)
    fetches = monitor.fetches
    calls = env.aws.store.described[name]
    # One stream: the stand-in saw exactly the monitor's calls (give or take the one that may
    # be in flight while reading the two counters).
    assert fetches - before_fetches - 1 <= calls - before_calls <= fetches - before_fetches + 1


@pytest.mark.real_server
def test_shutdown_stops_the_monitor_thread(env: Env) -> None:
    host = env.create_endpoint(excluded_members=[])
    conn = env.connect(host)
    monitor = plugin_of(conn).monitor()
    assert monitor.running
    resilient_db.shutdown()
    wait_until("the monitor thread ended", lambda: not monitor.running)
    assert monitor not in custom_endpoint.monitors()
    # The connection keeps working and gets a new monitor when it needs one.
    assert env.instance(conn)
    assert plugin_of(conn).monitor() is not monitor


@pytest.mark.real_server
def test_idle_monitor_expires(env: Env, sink: resilient_db.CollectingSink) -> None:
    host = env.create_endpoint(excluded_members=[])
    conn = env.connect(host, custom_endpoint_idle_monitor_expiration_ms=300)
    monitor = plugin_of(conn).monitor()
    before = monitor.fetches
    # Four refreshes take longer than the expiration: the open connection keeps it running.
    wait_until("four refreshes", lambda: monitor.fetches >= before + 4)
    assert monitor.running
    conn.close()
    wait_until("the idle monitor stopped", lambda: not monitor.running)
    assert monitor not in custom_endpoint.monitors()
    assert "custom_endpoint.monitor_expired" in sink.kinds()


@pytest.mark.real_server
def test_dormant_on_other_endpoints(env: Env) -> None:
    resilient_db.shutdown()
    conn = env.connect(env.cluster.writer_endpoint)
    assert plugin_of(conn).dormant()
    assert env.instance(conn)
    assert custom_endpoint.monitors() == []


# --- the simulator's custom endpoints ----------------------------------------------------------


def _resolve(name: str) -> list[str]:
    import socket

    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({str(info[4][0]) for info in infos})


@pytest.mark.real_server
def test_simulator_custom_endpoint_names_follow_members_and_roles(env: Env) -> None:
    cluster = env.cluster
    writer, (first, second) = cluster.writer, cluster.readers
    name = f"sim{next(_names)}"
    events = cluster.create_custom_endpoint(name, endpoint_type="READER",
                                            static_members=[writer.id, first.id])
    assert [e.name for e in events] == ["custom_endpoint_created"]
    host = cluster.custom_endpoint(name).host
    assert host == f"{name}.cluster-custom-{cluster.naming.suffix}"
    assert _resolve(host) == [first.address]  # READER: not the writer member
    cluster.modify_custom_endpoint(name, endpoint_type="ANY")
    assert _resolve(host) == sorted([writer.address, first.address])
    cluster.modify_custom_endpoint(name, excluded_members=[first.id])
    assert _resolve(host) == sorted([writer.address, second.address])
    assert cluster.custom_endpoint(name).static_members == ()
    described = {e["DBClusterEndpointIdentifier"]: e for e in cluster.describe_custom_endpoints()}
    assert described[name]["ExcludedMembers"] == [first.id]
    assert described[name]["CustomEndpointType"] == "ANY"
    cluster.kill_instance(second.id)
    cluster.start_instance(second.id)  # rejoins as a reader: the name follows
    assert _resolve(host) == sorted([writer.address, second.address])
    cluster.delete_custom_endpoint(name)
    assert _resolve(host) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "1bad"}, "starting with a letter"),
    ({"name": "bad--name"}, "hyphens"),
    ({"name": "ok", "endpoint_type": "WRITER"}, "expected one of READER, ANY"),
    ({"name": "ok", "static_members": ["instance-9"]}, "no instance 'instance-9'"),
    ({"name": "ok", "static_members": ["instance-1"], "excluded_members": ["instance-2"]},
     "not both"),
])
@pytest.mark.real_server
def test_simulator_refuses_bad_custom_endpoints(pg_cluster: SharedCluster,
                                                kwargs: dict[str, Any], message: str) -> None:
    from simulator.cluster import ClusterError

    cluster = pg_cluster.acquire()
    with pytest.raises(ClusterError, match=message):
        cluster.create_custom_endpoint(**kwargs)
    assert "ok" not in cluster.custom_endpoints


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [
    ("custom_endpoint_info_refresh_rate_ms", "fast"),
    ("custom_endpoint_info_refresh_rate_ms", 10),
    ("custom_endpoint_idle_monitor_expiration_ms", -1),
    ("wait_for_custom_endpoint_info", "maybe"),
    ("wait_for_custom_endpoint_info_timeout_ms", 0),
    ("custom_endpoint_region", "Mars"),
])
def test_bad_values_name_the_property(name: str, value: object) -> None:
    settings: dict[str, Any] = {name: value}
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect,
                             host="x.cluster-custom-abc.us-east-1.rds.amazonaws.com",
                             plugins="custom_endpoint", **settings)
    assert info.value.parameter == name
    assert name in str(info.value)


def test_registered_built_in_and_no_longer_unsupported() -> None:
    assert "custom_endpoint" in BUILTIN and "custom_endpoint" not in PLANNED
    assert [cls.code for cls in resolve(["failover", "custom_endpoint", "initial_connection"])
            ] == ["custom_endpoint", "initial_connection", "failover"]
    for name in ("custom_endpoint_info_refresh_rate_ms",
                 "custom_endpoint_idle_monitor_expiration_ms", "wait_for_custom_endpoint_info",
                 "wait_for_custom_endpoint_info_timeout_ms"):
        assert name not in AWS_UNSUPPORTED


# --- pure parts -------------------------------------------------------------------------------

SUFFIX = "abc123.us-east-1.rds.amazonaws.com"
ENDPOINT = f"analytics.cluster-custom-{SUFFIX}"


def _topology() -> TopologySnapshot:
    return TopologySnapshot((
        Host(f"instance-1.{SUFFIX}", 5432, instance_id="instance-1", role=Role.WRITER),
        Host(f"instance-2.{SUFFIX}", 5432, instance_id="instance-2", role=Role.READER),
        Host(f"instance-3.{SUFFIX}", 5432, instance_id="instance-3", role=Role.READER),
    ))


def _info(role_type: str = "ANY", static: tuple[str, ...] = (),
          excluded: tuple[str, ...] = ()) -> CustomEndpointInfo:
    return CustomEndpointInfo.from_response({
        "DBClusterEndpointIdentifier": "analytics", "DBClusterIdentifier": "db",
        "Endpoint": ENDPOINT, "CustomEndpointType": role_type,
        "StaticMembers": list(static), "ExcludedMembers": list(excluded)})


def _allowed(info: CustomEndpointInfo, hosts: tuple[HostSpec, ...] | None = None,
             topology: TopologySnapshot | None = None) -> tuple[list[str], dict[str, str]]:
    snapshot = _topology()
    offered = hosts if hosts is not None else tuple(h.spec for h in snapshot.hosts)
    kept, excluded = restrict(info, ENDPOINT, offered, topology or snapshot)
    return [h.host.split(".")[0] for h in kept], excluded


def test_static_members_are_the_only_members() -> None:
    kept, excluded = _allowed(_info(static=("instance-1", "instance-3")))
    assert kept == ["instance-1", "instance-3"]
    assert list(excluded) == [f"instance-2.{SUFFIX}:5432"]
    assert "not a member" in excluded[f"instance-2.{SUFFIX}:5432"]


def test_excluded_members_are_left_out_and_the_rest_stay() -> None:
    kept, excluded = _allowed(_info(excluded=("instance-2",)))
    assert kept == ["instance-1", "instance-3"]
    assert "excluded from custom endpoint analytics" in excluded[f"instance-2.{SUFFIX}:5432"]


def test_no_members_listed_means_every_instance() -> None:
    assert _allowed(_info())[0] == ["instance-1", "instance-2", "instance-3"]


def test_reader_endpoint_type_leaves_the_writer_out() -> None:
    kept, excluded = _allowed(_info("READER", static=("instance-1", "instance-2")))
    assert kept == ["instance-2"]
    assert "of type READER" in excluded[f"instance-1.{SUFFIX}:5432"]


def test_hosts_without_topology_are_told_by_their_instance_endpoint_name() -> None:
    offered = (HostSpec(f"instance-2.{SUFFIX}"), HostSpec(f"instance-3.{SUFFIX}"),
               HostSpec("10.0.0.7"), HostSpec(ENDPOINT))
    kept, excluded = restrict(_info(static=("instance-2",)), ENDPOINT, offered, None)
    assert [h.host for h in kept] == [f"instance-2.{SUFFIX}", ENDPOINT]
    assert "cannot be told" in excluded["10.0.0.7"]
    assert "not a member" in excluded[f"instance-3.{SUFFIX}"]


def test_info_equality_tells_a_change() -> None:
    assert _info(static=("a", "b")) == _info(static=("b", "a"))
    assert _info(static=("a",)) != _info(static=("a", "b"))
    assert _info().role_type == "ANY" and _info("reader").role_type == "READER"


class _Describe:
    """A stand-in for ``DescribeDBClusterEndpoints``: answers from a list it is given."""

    def __init__(self, answers: list[list[dict[str, Any]]]) -> None:
        self.answers = answers
        self.calls = 0

    def __call__(self, region: str, endpoint_id: str) -> list[dict[str, Any]]:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


def test_monitor_keeps_the_last_members_when_an_answer_is_bad(
        sink: resilient_db.CollectingSink) -> None:
    good = {"DBClusterEndpointIdentifier": "analytics", "CustomEndpointType": "ANY",
            "StaticMembers": ["instance-2"]}
    describe = _Describe([[good], []])
    monitor = custom_endpoint.CustomEndpointMonitor(
        (ENDPOINT, "us-east-1"), "analytics", refresh=0.1, idle_expiration=60.0,
        describe=describe)
    monitor._fetch()
    assert monitor.info is not None and monitor.info.static_members == {"instance-2"}
    monitor._fetch()
    assert monitor.info.static_members == {"instance-2"}
    assert monitor.problem is not None and "found 0 custom endpoints" in monitor.problem
    assert sink.kinds() == ["custom_endpoint.info_refreshed", "custom_endpoint.fetch_failed"]


def _plugin(monkeypatch: pytest.MonkeyPatch, answers: list[list[dict[str, Any]]],
            **settings: Any) -> CustomEndpointPlugin:
    from resilient_db._pipeline import PluginContext
    from resilient_db._properties import REGISTRY, Settings

    monkeypatch.setattr(CustomEndpointPlugin, "describe", _Describe(answers))
    values = {REGISTRY[name]: REGISTRY[name].parse(value) for name, value in settings.items()}
    return CustomEndpointPlugin(PluginContext(Settings(values), None,  # type: ignore[arg-type]
                                              HostSpec(ENDPOINT, 5432)))


def _offered() -> HostsContext:
    snapshot = _topology()
    return HostsContext(tuple(h.spec for h in snapshot.hosts), None,  # type: ignore[arg-type]
                        snapshot)


def test_unknown_members_keep_failover_away_from_every_instance(
        monkeypatch: pytest.MonkeyPatch, sink: resilient_db.CollectingSink) -> None:
    plugin = _plugin(monkeypatch, [[]], wait_for_custom_endpoint_info_timeout_ms=200)
    try:
        monitor = plugin.monitor()
        wait_until("the first (empty) answer", lambda: monitor.problem is not None)
        request = _offered()
        assert plugin.hosts(request, lambda r: r.initial) == ()
        assert len(request.excluded) == 3
        assert all("found 0 custom endpoints" in why for why in request.excluded.values())
        assert "custom_endpoint.wait_timed_out" in sink.kinds()
    finally:
        resilient_db.shutdown()


def test_not_waiting_leaves_the_list_unrestricted_until_the_members_are_known(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = _plugin(monkeypatch, [[]], wait_for_custom_endpoint_info=False)
    try:
        request = _offered()
        assert plugin.hosts(request, lambda r: r.initial) == request.initial
        assert request.excluded == {}
    finally:
        resilient_db.shutdown()


def test_allowed_only_applies_the_host_list_to_a_snapshot() -> None:
    from resilient_db.hosts import allowed_only

    def members(request: HostsContext) -> tuple[HostSpec, ...]:
        kept, excluded = restrict(_info(static=("instance-2",)), ENDPOINT, request.initial,
                                  request.topology)
        request.excluded.update(excluded)
        return kept

    snapshot, excluded = allowed_only(_topology(), members, None)  # type: ignore[arg-type]
    assert [h.instance_id for h in snapshot.hosts] == ["instance-2"]
    assert set(excluded) == {f"instance-1.{SUFFIX}:5432", f"instance-3.{SUFFIX}:5432"}
    everyone, none = allowed_only(_topology(), lambda request: request.initial,
                                  None)  # type: ignore[arg-type]
    assert everyone == _topology() and none == {}
