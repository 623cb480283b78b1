"""``read_write_splitting`` and ``srw`` on simulated clusters (Aurora PostgreSQL and the Aurora
MySQL look-alike on MariaDB), and the internal pools behind them (``resilient_db._pools``).

Every switch is checked with the server's own word: the instance id the dialect's query
returns, the backend's session id (``pg_backend_pid()`` / ``CONNECTION_ID()``) for pool reuse,
and a write the server refuses on a reader. The clusters are shared with the module's tests
through ``tests/test_cluster_plugins``'s fixtures (settled before and after each test)."""

# The shared fixtures are imported by name (pytest finds them in this module's namespace); a
# test's parameter of the same name is what ruff reads as a redefinition.
# ruff: noqa: F811

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import _pools
from resilient_db._params import SRW_READ_ENDPOINT
from resilient_db._plugin_registry import BUILTIN, PLANNED
from resilient_db.hosts import Role
from resilient_db.plugins._splitting import SplittingPlugin
from resilient_db.plugins.failover import FailoverPlugin
from resilient_db.plugins.srw import parse_endpoint

from .clusters import SharedCluster
from .test_cluster_plugins import (  # noqa: F401 - fixtures used by name
    Env,
    env,
    mysql_cluster,
    pg_cluster,
    promoted,
)
from .waiting import wait_until

RWS = "read_write_splitting,failover"


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    """Each test starts with fresh monitors (no host left cooling by an earlier test) and no
    internal pool (a pool's limits are its first user's), and ends with none."""
    resilient_db.shutdown()
    yield
    resilient_db.shutdown()


def splitter(conn: resilient_db.ConnectionProxy) -> SplittingPlugin:
    found = conn.resilient.plugin("read_write_splitting") or conn.resilient.plugin("srw")
    assert isinstance(found, SplittingPlugin)
    return found


def failover_of(conn: resilient_db.ConnectionProxy) -> FailoverPlugin:
    found = conn.resilient.plugin("failover")
    assert isinstance(found, FailoverPlugin)
    return found


def session_id(env: Env, conn: resilient_db.ConnectionProxy) -> int:
    """The server's id of the session the connection uses now."""
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()" if env.name == "pg" else "SELECT CONNECTION_ID()")
    row = cur.fetchone()
    cur.close()
    assert row is not None
    return int(row[0])


def readers(env: Env) -> set[str]:
    return {i.id for i in env.cluster.readers}


def write_refused(env: Env, conn: resilient_db.ConnectionProxy, table: str) -> bool:
    cur = conn.cursor()
    try:
        cur.execute(env.upsert.format(t=table), (999,))
    except Exception as exc:
        assert env.read_only_error(exc), exc
        return True
    return False


def begin(env: Env, conn: resilient_db.ConnectionProxy) -> None:
    """Open a transaction (autocommit off): psycopg begins one with the first statement;
    MariaDB only once a transactional table is touched, so say it."""
    if env.name == "mysql":
        conn.start_transaction()
        return
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()


# --- switching ------------------------------------------------------------------------------


@pytest.mark.real_server
def test_switch_to_a_reader_and_back(env: Env, sink: resilient_db.CollectingSink) -> None:
    table = env.table()
    writer = env.cluster.writer.id
    conn = env.connect(plugins=RWS)
    assert env.instance(conn) == writer
    conn.read_only = True
    reader = env.instance(conn)
    assert reader in readers(env)
    assert conn.read_only
    assert write_refused(env, conn, table)  # the server itself refuses it
    assert failover_of(conn).role is Role.READER and failover_of(conn).instance_id == reader
    conn.read_only = False
    assert env.instance(conn) == writer
    assert not conn.read_only
    cur = conn.cursor()
    cur.execute(env.upsert.format(t=table), (1,))
    assert env.rows(table) == {1: writer}
    assert failover_of(conn).role is Role.WRITER
    # The second round trip reuses both connections: no new server session.
    reader_session = splitter(conn).reader
    assert reader_session is not None
    conn.read_only = True
    assert splitter(conn).current is reader_session and env.instance(conn) == reader
    conn.read_only = False
    switched = sink.of_kind("splitting.switched")
    assert [d.attributes["resilient_db.splitting.role"] for d in switched] == [
        "reader", "writer", "reader", "writer"]
    assert [d.attributes["resilient_db.splitting.source"] for d in switched] == [
        "new", "cached", "cached", "cached"]
    assert switched[0].attributes["resilient_db.instance.id"] == reader
    chosen = sink.of_kind("reader.selected")
    assert len(chosen) == 1 and chosen[0].attributes["resilient_db.instance.id"] == reader
    assert chosen[0].attributes["resilient_db.selection.strategy"] == "random"


@pytest.mark.real_server
def test_with_the_default_plugins(env: Env) -> None:
    # initial_connection, the tracker and efm see the connection move and keep working.
    conn = env.connect(env.cluster.writer_endpoint,
                       plugins="initial_connection,aurora_connection_tracker,"
                               "read_write_splitting,failover,efm")
    efm = conn.resilient.plugin("efm")
    for _ in range(2):
        conn.read_only = True
        assert env.instance(conn) in readers(env)
        # efm followed: it monitors the instance the statements now go to.
        assert efm.monitor is not None and efm._host == conn.resilient.host
        conn.read_only = False
        assert env.instance(conn) == env.cluster.writer.id
        assert efm.monitor is not None and efm._host == conn.resilient.host
    conn.close()


@pytest.mark.real_server
def test_set_read_only_method_and_none(env: Env) -> None:
    conn = env.connect(plugins=RWS)
    if env.name == "pg":
        conn.set_read_only(True)
    else:
        conn.read_only = 1
    assert env.instance(conn) in readers(env)
    if env.name == "pg":
        conn.set_read_only(None)  # psycopg's "server default": the writer
    else:
        conn.read_only = None
    assert env.instance(conn) == env.cluster.writer.id


@pytest.mark.real_server
def test_no_switch_inside_a_transaction(env: Env, sink: resilient_db.CollectingSink) -> None:
    writer = env.cluster.writer.id
    conn = env.connect(plugins=RWS, autocommit=False)
    begin(env, conn)
    with pytest.raises(resilient_db.ReadWriteSplittingError) as raised:
        conn.read_only = True
    assert raised.value.reason == "in_transaction"
    assert not conn.read_only and conn.resilient.session_state.get("read_only") is None
    conn.rollback()
    assert env.instance(conn) == writer  # stayed, and usable
    conn.rollback()
    conn.read_only = True
    reader = env.instance(conn)
    assert reader in readers(env)
    conn.rollback()
    begin(env, conn)
    with pytest.raises(resilient_db.ReadWriteSplittingError):
        conn.read_only = False
    assert env.instance(conn) == reader
    conn.rollback()
    conn.read_only = False
    assert env.instance(conn) == writer
    refused = sink.of_kind("splitting.refused")
    assert [d.attributes["resilient_db.splitting.role"] for d in refused] == [
        "reader", "writer"]
    assert {d.attributes["resilient_db.splitting.reason"] for d in refused} == {
        "in_transaction"}


@pytest.mark.real_server
def test_session_state_is_carried(env: Env) -> None:
    conn = env.connect(plugins=RWS)
    if env.name == "pg":
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.autocommit = False
        query = "SHOW transaction_isolation"
        expected = "repeatable read"
    else:
        conn.time_zone = "+03:00"
        conn.autocommit = False
        query = "SELECT @@session.time_zone"
        expected = "+03:00"
    conn.read_only = True
    cur = conn.cursor()
    cur.execute(query)
    row = cur.fetchone()
    assert row is not None and str(row[0]) == expected
    assert not conn.autocommit
    assert env.instance(conn) in readers(env)
    conn.rollback()
    conn.autocommit = True  # set on the reader: carried back to the writer
    conn.read_only = False
    assert conn.autocommit
    assert env.instance(conn) == env.cluster.writer.id
    if env.name == "pg":  # psycopg sends the level with the BEGINs it issues
        assert conn.isolation_level == psycopg.IsolationLevel.REPEATABLE_READ
        conn.autocommit = False
    cur = conn.cursor()
    cur.execute(query)
    row = cur.fetchone()
    assert row is not None and str(row[0]) == expected


@pytest.mark.real_server
def test_round_robin_and_highest_weight_are_honoured(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    first, second = sorted(readers(env))
    chosen = []
    for _ in range(4):
        conn = env.connect(plugins=RWS, reader_host_selector_strategy="round_robin")
        conn.read_only = True
        chosen.append(env.instance(conn))
        conn.close()
    # The cluster's shared cursor: consecutive switches alternate between the two readers.
    assert chosen[0] != chosen[1] and chosen[0] == chosen[2] and chosen[1] == chosen[3]
    assert set(chosen) == {first, second}
    heavy = []
    for _ in range(3):
        conn = env.connect(plugins=RWS, reader_host_selector_strategy="highest_weight",
                           weighted_random_host_weight_pairs=f"{second}:5,{first}:1")
        conn.read_only = True
        heavy.append(env.instance(conn))
        conn.close()
    assert heavy == [second] * 3
    strategies = [d.attributes["resilient_db.selection.strategy"]
                  for d in sink.of_kind("reader.selected")]
    assert strategies == ["round_robin"] * 4 + ["highest_weight"] * 3


@pytest.mark.real_server
def test_least_connections_and_the_lag_cap_are_honoured(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    first = env.connect(plugins=RWS, topology_refresh_ms=100)
    first.read_only = True
    busy = env.instance(first)
    # least_connections reads the process-wide counts: the reader `first` sits on is busier.
    for _ in range(2):
        other = env.connect(plugins=RWS, reader_host_selector_strategy="least_connections")
        other.read_only = True
        assert env.instance(other) == (readers(env) - {busy}).pop()
        other.close()
    monitor = failover_of(first).monitor()
    cluster.set_replica_lag(busy, 30.0)
    try:
        def lag_seen() -> bool:
            snapshot = monitor.snapshot
            listed = snapshot.by_instance(busy) if snapshot is not None else None
            return listed is not None and listed.lag is not None and listed.lag > 5

        wait_until("the monitor seeing the replica lag", lag_seen)
        for _ in range(3):
            capped = env.connect(plugins=RWS, max_replica_lag=5)  # random among the rest
            capped.read_only = True
            assert env.instance(capped) != busy
            capped.close()
        skipped = [d.attributes["resilient_db.selection.skipped_for_lag"]
                   for d in sink.of_kind("reader.selected")][-3:]
        assert all(len(s) == 1 and busy in s[0] for s in skipped), skipped
    finally:
        cluster.set_replica_lag(busy, 0.0)


@pytest.mark.real_server
def test_no_reader_reachable_stays_on_the_writer(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    table = env.table()
    down = sorted(readers(env))
    conn = env.connect(plugins=RWS, connect_timeout=2)
    for instance in down:
        cluster.kill_instance(instance)
    try:
        conn.read_only = True  # no reader answers: stays on the writer, read-only there
        assert env.instance(conn) == cluster.writer.id
        assert conn.read_only
        assert write_refused(env, conn, table)  # read_only holds on the writer too
        stayed = sink.of_kind("splitting.stayed")
        assert stayed and stayed[-1].attributes["resilient_db.splitting.reason"] == (
            "readers_unreachable")
        assert stayed[-1].attributes["resilient_db.splitting.attempts"] == 2
        conn.read_only = False
        cur = conn.cursor()
        cur.execute(env.upsert.format(t=table), (1,))
    finally:
        for instance in down:
            cluster.start_instance(instance)


# --- failover -------------------------------------------------------------------------------


@pytest.mark.real_server
def test_reader_killed_during_reads_fails_over_to_another_reader(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    conn = env.connect(plugins=RWS)
    conn.read_only = True
    reader = env.instance(conn)
    other = (readers(env) - {reader}).pop()
    cur = conn.cursor()  # before: mysql-connector's cursor() would notice (and fail over)
    cluster.kill_instance(reader)
    try:
        with pytest.raises(resilient_db.FailoverSuccessError):
            cur.execute("SELECT 1")
        assert env.instance(conn) == other  # another reader, not the writer
        assert failover_of(conn).role is Role.READER
        plans = sink.of_kind("failover.plan")
        assert plans[-1].attributes["resilient_db.failover.mode"] == "reader-or-writer"
        assert conn.read_only
        conn.read_only = False  # back to the writer it kept
        assert env.instance(conn) == cluster.writer.id
        assert failover_of(conn).mode.value == "strict-writer"
    finally:
        cluster.start_instance(reader)


@pytest.mark.real_server
def test_writer_failover_while_on_a_reader(env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    table = env.table()
    old = cluster.writer.id
    conn = env.connect(plugins=RWS, topology_refresh_ms=100)
    monitor = failover_of(conn).monitor()
    conn.read_only = True
    assert env.instance(conn) in readers(env)
    epoch = monitor.epoch
    new = promoted(cluster.failover())
    wait_until("the monitor publishing the new writer",
               lambda: monitor.epoch > epoch and monitor.writer is not None
               and monitor.writer.instance_id == new)
    # The cached writer connection is the demoted writer's: dropped, the new writer used.
    try:
        conn.read_only = False
    except resilient_db.FailoverError:
        conn.read_only = False  # the reader it was on was the one promoted and restarted
    assert env.instance(conn) == new != old
    cur = conn.cursor()
    cur.execute(env.upsert.format(t=table), (1,))
    assert env.rows(table) == {1: new}
    dropped = sink.of_kind("splitting.dropped")
    # Dropped for the writer change, or because the crash closed it (mysql-connector's socket
    # shows it at once): either way never used again.
    assert any(d.attributes["resilient_db.splitting.reason"] in ("topology", "closed")
               and d.attributes["resilient_db.instance.id"] == old for d in dropped)


# --- pools ------------------------------------------------------------------------------------


def _pooled(env: Env, **extra: Any) -> resilient_db.ConnectionProxy:
    return env.connect(plugins=RWS, splitting_pool=True, reader_host_selector_strategy=(
        "highest_weight"), weighted_random_host_weight_pairs=f"{sorted(readers(env))[0]}:9",
        **extra)


@pytest.mark.real_server
def test_pool_reuses_a_reader_session_reset(env: Env, sink: resilient_db.CollectingSink,
                                             ) -> None:
    first = _pooled(env)
    first.read_only = True
    reader_session = session_id(env, first)
    cur = first.cursor()
    cur.execute("SET @leak = 42" if env.name == "mysql" else "SET application_name = 'leak'")
    first.close()
    pool = next(iter(_pools.pools()))
    assert pool.idle == 1 and pool.size == 1
    second = _pooled(env)
    writer_session = session_id(env, second)
    second.read_only = True
    assert session_id(env, second) == reader_session  # the same server session
    cur = second.cursor()
    cur.execute("SELECT @leak" if env.name == "mysql" else "SHOW application_name")
    row = cur.fetchone()
    assert row is not None and row[0] in (None, "")  # reset: nothing of the first user's
    second.read_only = False
    assert session_id(env, second) == writer_session
    kinds = [d.kind for d in sink.decisions if d.kind.startswith("pool.")]
    assert kinds == ["pool.miss", "pool.hit"]
    hit = sink.of_kind("splitting.switched")[-2]
    assert hit.attributes["resilient_db.splitting.source"] == "pool"


@pytest.mark.real_server
def test_pool_evicted_on_writer_change(env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    first = _pooled(env, topology_refresh_ms=100)
    # An open connection of the application keeps the cluster's monitor reading while the
    # pooled reader session sits idle (a monitor stops reading with its last open
    # connection).
    keeper = _pooled(env, topology_refresh_ms=100)
    monitor = failover_of(first).monitor()
    assert failover_of(keeper).monitor() is monitor
    first.read_only = True
    reader_session = session_id(env, first)
    first.close()
    epoch = monitor.epoch
    promoted(cluster.failover())
    wait_until("the monitor publishing the new writer", lambda: monitor.epoch > epoch)
    wait_until("readers following the writer", cluster.settled)
    second = _pooled(env)
    second.read_only = True
    assert env.instance(second) in readers(env)
    assert session_id(env, second) != reader_session
    evicted = sink.of_kind("pool.evicted")
    assert evicted and evicted[0].attributes["resilient_db.pool.reason"] == "topology"


@pytest.mark.real_server
def test_pool_evicted_by_failover(env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    conn = _pooled(env)
    conn.read_only = True
    reader = env.instance(conn)
    pool = next(iter(_pools.pools()))
    cur = conn.cursor()
    cluster.kill_instance(reader)
    try:
        with pytest.raises(resilient_db.FailoverSuccessError):
            cur.execute("SELECT 1")
        # The failed reader's pooled connection is gone from its pool (not kept, not counted).
        assert pool.size == 0
        reasons = {d.attributes["resilient_db.pool.reason"] for d in sink.of_kind(
            "pool.evicted")}
        assert "failover" in reasons
        conn.close()
        assert pool.size == 0 and pool.idle == 0
    finally:
        cluster.start_instance(reader)


@pytest.mark.real_server
def test_pool_limit_and_idle_timeout(env: Env, sink: resilient_db.CollectingSink) -> None:
    limits = {"splitting_pool_max_size": 1, "splitting_pool_timeout": 0,
              "splitting_pool_idle_timeout": 0.3}
    first = _pooled(env, **limits)
    first.read_only = True
    held = session_id(env, first)
    second = _pooled(env, **limits)
    with pytest.raises(resilient_db.ReadWriteSplittingError) as raised:
        second.read_only = True
    assert raised.value.reason == "pool_exhausted"
    assert env.instance(second) == env.cluster.writer.id  # stayed, usable
    assert sink.of_kind("pool.exhausted")
    first.close()
    second.read_only = True
    assert session_id(env, second) == held
    second.close()
    pool = next(iter(_pools.pools()))
    returned = time.monotonic()
    wait_until("the idle timeout passing", lambda: time.monotonic() - returned > 0.4)
    third = _pooled(env, **limits)
    third.read_only = True
    assert session_id(env, third) != held
    assert any(d.attributes["resilient_db.pool.reason"] == "idle"
               for d in sink.of_kind("pool.evicted"))
    assert pool.size == 1


@pytest.mark.real_server
def test_close_releases_everything(env: Env) -> None:
    conn = env.connect(plugins=RWS)
    conn.read_only = True
    conn.read_only = False
    plugin = splitter(conn)
    held = [s.raw for s in (plugin.writer, plugin.reader, plugin.current) if s is not None]
    assert len({id(r) for r in held}) == 2
    conn.close()
    driver = conn.resilient.pipeline.ctx.driver
    assert all(driver.is_closed(r) for r in held)
    with pytest.raises(env.operational_error):  # the driver's own "closed" error
        conn.cursor().execute("SELECT 1")
    # Pooled and closed on a reader: the reader goes back to its pool, the proxy closes its
    # own (the original) connection: no pooled session is left under a closed proxy.
    pooled = _pooled(env)
    original = pooled.resilient.raw
    pooled.read_only = True
    reader_raw = pooled.resilient.raw
    pooled.close()
    pool = next(iter(_pools.pools()))
    assert pool.idle == 1 and pool.size == 1
    assert pooled.resilient.raw is original
    assert driver.is_closed(original) and not driver.is_closed(reader_raw)


# --- srw ----------------------------------------------------------------------------------------


def _srw(env: Env, **extra: Any) -> resilient_db.ConnectionProxy:
    cluster = env.cluster
    return env.connect(cluster.writer_endpoint, plugins="srw,failover",
                       srw_read_endpoint=cluster.reader_endpoint,
                       srw_write_endpoint=cluster.writer_endpoint, **extra)


@pytest.mark.real_server
def test_srw_switches_between_the_endpoints(env: Env, sink: resilient_db.CollectingSink) -> None:
    table = env.table()
    writer = env.cluster.writer.id
    conn = _srw(env)
    conn.read_only = True
    assert env.instance(conn) in readers(env)
    assert conn.resilient.host.host == env.cluster.reader_endpoint
    assert write_refused(env, conn, table)
    conn.read_only = False
    assert env.instance(conn) == writer
    cur = conn.cursor()
    cur.execute(env.upsert.format(t=table), (1,))
    switched = sink.of_kind("splitting.switched")
    assert [(d.plugin, d.attributes["resilient_db.splitting.role"]) for d in switched] == [
        ("srw", "reader"), ("srw", "writer")]


@pytest.mark.real_server
def test_srw_verifies_and_gives_up_on_the_wrong_role(
        env: Env, sink: resilient_db.CollectingSink) -> None:
    cluster = env.cluster
    writer = cluster.writer
    # A "read endpoint" that leads to the writer: verified, retried, refused.
    conn = env.connect(cluster.writer_endpoint, plugins="srw", srw_read_endpoint=writer.endpoint,
                       srw_write_endpoint=cluster.writer_endpoint,
                       srw_connect_retry_timeout_ms=600, srw_connect_retry_interval_ms=200)
    with pytest.raises(resilient_db.ReadWriteSplittingError) as raised:
        conn.read_only = True
    assert raised.value.reason == "no_connection"
    assert len(raised.value.attempts) >= 2
    assert all("is the writer" in a.outcome for a in raised.value.attempts)
    assert env.instance(conn) == writer.id and not conn.read_only
    assert sink.of_kind("splitting.gave_up")
    # Without verification the endpoint is taken at its word.
    trusting = env.connect(cluster.writer_endpoint, plugins="srw",
                           srw_read_endpoint=writer.endpoint,
                           srw_write_endpoint=cluster.writer_endpoint,
                           srw_verify_new_connections=False)
    trusting.read_only = True
    assert env.instance(trusting) == writer.id


@pytest.mark.real_server
def test_srw_verifies_the_initial_connection(env: Env) -> None:
    cluster = env.cluster
    with pytest.raises(resilient_db.ReadWriteSplittingError) as raised:
        env.connect(cluster.writer_endpoint, plugins="srw",
                    srw_read_endpoint=cluster.reader_endpoint,
                    srw_write_endpoint=cluster.writer_endpoint,
                    srw_verify_initial_connection_type="reader",
                    srw_connect_retry_timeout_ms=300, srw_connect_retry_interval_ms=100)
    assert raised.value.attempts
    conn = env.connect(cluster.reader_endpoint, plugins="srw",
                       srw_read_endpoint=cluster.reader_endpoint,
                       srw_write_endpoint=cluster.writer_endpoint,
                       srw_verify_initial_connection_type="reader")
    assert env.instance(conn) in readers(env)
    conn.read_only = True  # already on a reader: no switch
    assert splitter(conn).switches == 0
    conn.read_only = False
    assert env.instance(conn) == cluster.writer.id


@pytest.mark.real_server
def test_srw_pooled(env: Env, sink: resilient_db.CollectingSink) -> None:
    first = _srw(env, splitting_pool=True)
    first.read_only = True
    held = session_id(env, first)
    first.close()
    second = _srw(env, splitting_pool=True)
    second.read_only = True
    assert session_id(env, second) == held
    assert [d.kind for d in sink.decisions if d.kind.startswith("pool.")] == [
        "pool.miss", "pool.hit"]


# --- mysql-connector's read_only ----------------------------------------------------------------


@pytest.mark.real_server
def test_mysql_read_only_without_splitting_is_enforced_by_the_server(
        mysql_cluster: SharedCluster) -> None:
    cluster = mysql_cluster.acquire()
    kwargs = {**cluster.connect_kwargs(cluster.writer.endpoint), "use_pure": True,
              "autocommit": True}
    conn = resilient_db.connect(mysql.connector.connect, plugins="", **kwargs)
    try:
        cur = conn.cursor()
        cur.execute("CREATE TABLE IF NOT EXISTS ro_check (id int primary key)")
        assert conn.read_only is False
        conn.read_only = True
        assert conn.read_only is True
        with pytest.raises(mysql.connector.Error) as raised:
            cur.execute("INSERT INTO ro_check VALUES (1)")
        assert raised.value.errno == 1792  # "Cannot execute statement in a READ ONLY transaction"
        conn.read_only = False
        cur.execute("INSERT IGNORE INTO ro_check VALUES (1)")
    finally:
        conn.close()


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "parameter"), [
    ({"reader_host_selector_strategy": "fastest"}, "reader_host_selector_strategy"),
    ({"reader_host_selector_strategy": "weighted_random"}, "reader_host_selector_strategy"),
    ({"splitting_pool_max_size": 0}, "splitting_pool_max_size"),
    ({"splitting_pool_idle_timeout": -1}, "splitting_pool_idle_timeout"),
    ({"splitting_pool": "maybe"}, "splitting_pool"),
])
def test_bad_values_are_configuration_errors(extra: dict[str, Any], parameter: str) -> None:
    with pytest.raises(resilient_db.ConfigurationError) as raised:
        resilient_db.connect(psycopg.Connection.connect, host="127.0.0.1", port=1,
                             plugins=RWS, **extra)
    assert raised.value.parameter == parameter


@pytest.mark.parametrize(("extra", "parameter"), [
    ({"srw_write_endpoint": "w.example"}, "srw_read_endpoint"),
    ({"srw_read_endpoint": "r.example"}, "srw_write_endpoint"),
    ({"srw_read_endpoint": "r.example:99999", "srw_write_endpoint": "w"}, "srw_read_endpoint"),
    ({"srw_read_endpoint": "r w", "srw_write_endpoint": "w"}, "srw_read_endpoint"),
    ({"srw_read_endpoint": "r", "srw_write_endpoint": "w",
      "srw_verify_initial_connection_type": "primary"}, "srw_verify_initial_connection_type"),
    ({"srw_read_endpoint": "r", "srw_write_endpoint": "w",
      "srw_connect_retry_timeout_ms": -5}, "srw_connect_retry_timeout_ms"),
])
def test_bad_srw_values_are_configuration_errors(extra: dict[str, Any], parameter: str) -> None:
    with pytest.raises(resilient_db.ConfigurationError) as raised:
        resilient_db.connect(mysql.connector.connect, host="127.0.0.1", port=1, plugins="srw",
                             use_pure=True, **extra)
    assert raised.value.parameter == parameter


def test_read_write_splitting_needs_failover() -> None:
    for extra in ({"plugins": "read_write_splitting"},
                  {"plugins": RWS, "enable_failover": False}):
        with pytest.raises(resilient_db.ConfigurationError, match="needs the failover plugin"):
            resilient_db.connect(psycopg.Connection.connect, host="127.0.0.1", port=1,
                                 **extra)


def test_plugins_are_built_in_and_no_longer_planned() -> None:
    assert {"read_write_splitting", "srw"} <= set(BUILTIN)
    assert not {"read_write_splitting", "srw"} & set(PLANNED)


def test_parse_endpoint() -> None:
    assert parse_endpoint("r.example", 5432, SRW_READ_ENDPOINT) == resilient_db.HostSpec(
        "r.example", 5432)
    assert parse_endpoint(" r.example:6000 ", None, SRW_READ_ENDPOINT) == (
        resilient_db.HostSpec("r.example", 6000))
    assert parse_endpoint("[::1]:6000", None, SRW_READ_ENDPOINT) == resilient_db.HostSpec(
        "::1", 6000)


# --- fork -------------------------------------------------------------------------------------


@pytest.mark.real_server
def test_a_child_never_touches_the_held_or_pooled_sessions(env: Env) -> None:
    from .test_fork import in_child

    pooled = _pooled(env)
    pooled.read_only = True
    pooled_reader = session_id(env, pooled)
    pooled.close()  # its reader is idle in the pool
    idle_raw = next(iter(_pools.pools()))._idle[0].raw
    conn = env.connect(plugins=RWS)
    writer_session = session_id(env, conn)
    conn.read_only = True  # the writer connection is held, not in use
    held = splitter(conn).writer
    assert held is not None

    def child() -> dict[str, Any]:
        plugin = splitter(conn)
        state = {"held": plugin.writer is not None, "pools": len(_pools.pools())}
        # Closing what it inherited sends nothing: the descriptors point at /dev/null.
        held.raw.close()
        idle_raw.close()
        conn.close()
        return state

    assert in_child(child) == {"held": False, "pools": 0}
    conn.read_only = False
    assert session_id(env, conn) == writer_session  # the parent's sessions live on
    again = _pooled(env)
    again.read_only = True
    assert session_id(env, again) == pooled_reader
