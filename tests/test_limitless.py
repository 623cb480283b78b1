"""The ``limitless`` plugin on a simulated Aurora Limitless shard group (``simulator.limitless``:
three transaction routers on real PostgreSQL servers), and the pure router choice
(``resilient_db.limitless``) at the end.

Every test starts with the three routers running, each at load 0, and no router monitor in
the process (the ``group`` fixture settles it before and after). Which router a connection is
on is asked of the server itself (``aurora_db_instance_identifier()``), not of the plugin."""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import (
    CollectingSink,
    ConfigurationError,
    FailoverFailedError,
    FailoverSuccessError,
    TransactionResolutionUnknownError,
)
from resilient_db import limitless as core
from resilient_db.limitless import Router, choose, parse_routers, weight_of
from resilient_db.plugins.limitless import LimitlessPlugin
from simulator.limitless import ShardGroup

from .waiting import wait_for, wait_until

#: A fast monitor, so that load changes are seen within the tests' polling bound.
FAST = {"limitless_transaction_router_monitor_interval_ms": 200}
WHO = "SELECT pg_catalog.aurora_db_instance_identifier()"


# --- environment ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_group() -> Iterator[ShardGroup]:
    with ShardGroup.start(routers=3) as group:
        yield group


def _settle(group: ShardGroup) -> None:
    resilient_db.shutdown()  # no monitor (nor its cached list) carried between tests
    for router in group.routers.values():
        if not router.running:
            group.start_router(router.id)
    if any(r.load != 0.0 or not r.listed for r in group.routers.values()):
        for router in group.routers.values():
            router.listed = True
        group.set_router_loads({r: 0.0 for r in group.routers})


@pytest.fixture
def group(shard_group: ShardGroup) -> Iterator[ShardGroup]:
    _settle(shard_group)
    try:
        yield shard_group
    finally:
        _settle(shard_group)


def connect(group: ShardGroup, host: str | None = None, **extra: Any) -> Any:
    kwargs = {**group.connect_kwargs(host), "plugins": "limitless", "autocommit": True, **FAST}
    kwargs.update(extra)
    return resilient_db.connect(psycopg.Connection.connect, **kwargs)


def on_router(conn: Any) -> str:
    row = conn.execute(WHO).fetchone()
    assert row is not None
    return str(row[0])


def plugin(conn: Any) -> LimitlessPlugin:
    found = conn.resilient.plugin("limitless")
    assert isinstance(found, LimitlessPlugin)
    return found


def the_monitor(group: ShardGroup, host: str | None = None) -> core.RouterMonitor:
    wanted = (host or group.endpoint).lower()
    return wait_for(f"the router monitor of {wanted}", lambda: next(
        (m for m in core.monitors() if m.host.host == wanted), None),
        lambda m: m is not None)  # type: ignore[return-value]


def weights(monitor: core.RouterMonitor) -> dict[str, int]:
    return {r.host.split(".")[0]: r.weight for r in monitor.routers or ()}


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("resilient_db-limitless[")]


# --- the router list and the choice --------------------------------------------------------------


@pytest.mark.real_server
def test_router_list_is_read_and_the_connection_goes_to_a_listed_router(
        group: ShardGroup, sink: CollectingSink) -> None:
    with connect(group) as conn:
        router = on_router(conn)
        assert router in group.routers
        chosen = plugin(conn).router
        assert chosen is not None and chosen.host == group.router(router).endpoint
        monitor = the_monitor(group)
        assert [(r.host, r.load) for r in monitor.routers or ()] == group.router_list()
        assert weights(monitor) == {"router-1": 10, "router-2": 10, "router-3": 10}
    refreshed = sink.of_kind("limitless.routers_refreshed")
    # Read on the spot by the connecting thread, or by the monitor's first read if it won.
    assert refreshed and refreshed[0].attributes["resilient_db.limitless.source"] in (
        "on_connect", "monitor")
    assert refreshed[0].attributes["resilient_db.limitless.weights"] == (10, 10, 10)
    selected = sink.of_kind("limitless.router_selected")
    assert selected[0].attributes["resilient_db.limitless.strategy"] == "weighted_random"
    assert selected[0].attributes["server.address"] == chosen.host


@pytest.mark.real_server
def test_weighted_choice_honours_load(group: ShardGroup,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # router-1 at load 0 weighs 10, the others at 0.95 weigh 1: about 10 in 12 connections.
    group.set_router_loads({"router-1": 0.0, "router-2": 0.95, "router-3": 0.95})
    monkeypatch.setattr(LimitlessPlugin, "rng", random.Random(1234))
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(36):
        with connect(group) as conn:
            counts[on_router(conn)] += 1
    assert counts["router-1"] >= 24, counts
    assert counts["router-1"] > 3 * max(counts["router-2"], counts["router-3"]), counts


@pytest.mark.real_server
def test_load_change_is_picked_up_after_a_refresh(group: ShardGroup, sink: CollectingSink,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LimitlessPlugin, "rng", random.Random(99))
    keeper = connect(group)  # keeps the monitor in use
    try:
        monitor = the_monitor(group)
        group.set_router_loads({"router-1": 0.95, "router-2": 0.0, "router-3": 0.95})
        wait_for("the monitor to see the new loads", lambda: weights(monitor),
                 lambda w: w == {"router-1": 1, "router-2": 10, "router-3": 1})
        changed = [d for d in sink.of_kind("limitless.routers_refreshed")
                   if d.attributes["resilient_db.limitless.changed"]
                   and d.attributes["resilient_db.limitless.source"] == "monitor"]
        assert changed and changed[-1].attributes["resilient_db.limitless.weights"] == (1, 10, 1)
        counts: collections.Counter[str] = collections.Counter()
        for _ in range(24):
            with connect(group) as conn:
                counts[on_router(conn)] += 1
        assert counts["router-2"] >= 16, counts
    finally:
        keeper.close()


@pytest.mark.real_server
def test_a_named_router_is_used_as_given(group: ShardGroup, sink: CollectingSink) -> None:
    with connect(group, group.router("router-3").endpoint) as conn:
        assert on_router(conn) == "router-3"
    assert sink.of_kind("limitless.router_selected")[-1].attributes[
        "resilient_db.limitless.strategy"] == "named"


# --- routers failing -----------------------------------------------------------------------------


@pytest.mark.real_server
def test_connects_go_to_the_other_routers_when_one_is_killed(
        group: ShardGroup, sink: CollectingSink) -> None:
    with connect(group):
        pass  # the router list is known
    group.kill_router("router-1")  # still listed: the plugin finds out by connecting
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(12):
        with connect(group) as conn:
            seen[on_router(conn)] += 1
    assert "router-1" not in seen and sum(seen.values()) == 12, seen
    down = sink.of_kind("limitless.host_down")
    # Marked down for one monitor interval (0.2 s), then tried again: maybe more than once.
    assert {d.attributes["server.address"] for d in down} == {group.router("router-1").endpoint}


@pytest.mark.real_server
def test_named_router_down_connects_to_another(group: ShardGroup) -> None:
    # The router list is kept per endpoint connected through: read it through router-2 first.
    with connect(group, group.router("router-2").endpoint):
        pass
    group.kill_router("router-2")
    with connect(group, group.router("router-2").endpoint) as conn:
        assert on_router(conn) in ("router-1", "router-3")


@pytest.mark.real_server
def test_a_blackholed_router_is_skipped_within_the_connect_bound(
        group: ShardGroup, network_faults: Any, sink: CollectingSink) -> None:
    router_1 = group.router("router-1")
    with connect(group, router_1.endpoint, connect_timeout=2):
        pass  # the router list is known for this endpoint
    # Real packet loss: a connect to router-1 gets no answer at all (no RST).
    network_faults.blackhole(router_1.address, group.port)
    started = time.monotonic()
    with connect(group, router_1.endpoint, connect_timeout=2) as conn:
        assert on_router(conn) in ("router-2", "router-3")
    assert time.monotonic() - started < 20  # one 2 s attempt, not the kernel's minutes
    down = sink.of_kind("limitless.host_down")
    assert down and down[0].attributes["server.address"] == router_1.endpoint


@pytest.mark.real_server
def test_router_lost_mid_connection_moves_to_another_router(
        group: ShardGroup, sink: CollectingSink) -> None:
    with connect(group, group.router("router-1").endpoint) as conn:
        assert on_router(conn) == "router-1"
        cur = conn.cursor()
        group.kill_router("router-1")
        with pytest.raises(FailoverSuccessError) as info:
            cur.execute(WHO)
        assert isinstance(info.value, psycopg.OperationalError)
        assert info.value.failed_host is not None and "router-1" in info.value.failed_host
        cur.execute(WHO)  # the cursor opened before works on the new router
        row = cur.fetchone()
        assert row is not None and row[0] in ("router-2", "router-3")
        assert plugin(conn).failovers == 1
    finished = sink.of_kind("failover.finished")
    assert finished and finished[-1].plugin == "limitless"
    assert finished[-1].attributes["resilient_db.failover.outcome"] == "FailoverSuccessError"
    outcome = sink.of_kind("failover.outcome")[-1]
    assert outcome.plugin == "limitless"


@pytest.mark.real_server
def test_router_lost_in_a_transaction_and_idempotent_retry(group: ShardGroup) -> None:
    with connect(group, group.router("router-2").endpoint, autocommit=False) as conn:
        conn.execute("SELECT 1")  # a transaction is open
        group.kill_router("router-2")
        with pytest.raises(TransactionResolutionUnknownError):
            conn.execute("SELECT 2")
        conn.rollback()
        assert on_router(conn) in ("router-1", "router-3")
    group.start_router("router-2")
    with connect(group, group.router("router-3").endpoint) as conn:
        group.kill_router("router-3")
        with resilient_db.call_options(idempotent=True):
            assert on_router(conn) in ("router-1", "router-2")  # no error: run again


@pytest.mark.real_server
def test_no_router_left_is_failover_failed(group: ShardGroup) -> None:
    with connect(group, group.router("router-1").endpoint) as conn:
        for router in group.routers:
            group.kill_router(router)
        with pytest.raises(FailoverFailedError) as info:
            conn.execute(WHO)
        assert info.value.attempts, "every router and the endpoint were tried"


@pytest.mark.real_server
def test_with_failover_selected_router_failures_are_left_to_limitless(
        group: ShardGroup, sink: CollectingSink) -> None:
    with connect(group, group.router("router-1").endpoint, plugins="limitless,failover",
                 failover_timeout_sec=5) as conn:
        assert conn.resilient.plugins == ("limitless", "failover")
        group.kill_router("router-1")
        with pytest.raises(FailoverSuccessError):
            conn.execute(WHO)
        assert on_router(conn) in ("router-2", "router-3")
    assert {d.plugin for d in sink.of_kind("failover.outcome")} == {"limitless"}


@pytest.mark.real_server
def test_workload_across_a_router_kill_loses_no_acknowledged_write(group: ShardGroup) -> None:
    table = f"lim_w_{time.monotonic_ns()}"
    group.execute_everywhere(f"CREATE TABLE {table} (id bigint PRIMARY KEY, worker int)")
    acknowledged: list[int] = []
    per_worker = collections.Counter[int]()
    failovers = collections.Counter[str]()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            # Every worker starts on router-1, the one killed.
            with connect(group, group.router("router-1").endpoint) as conn:
                n = 0
                while not stop.is_set():
                    n += 1
                    row_id = worker * 1_000_000 + n
                    try:
                        conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (row_id, worker))
                    except FailoverSuccessError:
                        failovers[f"w{worker}"] += 1  # may or may not be applied: unacknowledged
                        continue
                    with lock:
                        acknowledged.append(row_id)
                        per_worker[worker] += 1
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_until("every worker's writes acknowledged on router-1 before the kill",
                   lambda: len(per_worker) == 3 and min(per_worker.values()) >= 10)
        group.kill_router("router-1")
        before = len(acknowledged)
        wait_until("writes acknowledged after the kill", lambda: len(acknowledged) >= before + 30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert sum(failovers.values()) == 3, failovers  # each worker moved once
    group.start_router("router-1")
    stored = {row[0] for row in group.rows(f"SELECT id FROM {table}")}
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged writes lost"


# --- configuration, dialects, lifecycle ----------------------------------------------------------


@pytest.mark.real_server
def test_without_waiting_the_first_connection_uses_the_endpoint(
        group: ShardGroup, sink: CollectingSink) -> None:
    with connect(group, limitless_wait_for_transaction_router_info=False) as conn:
        assert plugin(conn).router is None
        assert on_router(conn) in group.routers
    assert sink.of_kind("limitless.using_endpoint")


@pytest.mark.real_server
def test_an_empty_router_list_uses_the_endpoint_and_no_answer_raises(
        group: ShardGroup, sink: CollectingSink) -> None:
    fast: dict[str, Any] = {"limitless_get_transaction_router_max_retries": 1,
            "limitless_get_transaction_router_retry_interval_ms": 10}
    for router in group.routers.values():
        router.listed = False
    group.set_router_loads({})  # publishes the empty list
    with connect(group, None, **fast) as conn:
        assert plugin(conn).router is None and on_router(conn) in group.routers
    assert [d.attributes["resilient_db.limitless.reason"]
            for d in sink.of_kind("limitless.using_endpoint")] == ["the router list is empty"]
    resilient_db.shutdown()
    for router_id in group.routers:
        group.kill_router(router_id)  # the endpoint resolves to nothing now
    with pytest.raises(psycopg.OperationalError):
        connect(group, None, **fast)
    assert len([d for d in sink.of_kind("limitless.fetch_failed")
                if d.attributes["resilient_db.limitless.source"] == "on_connect"]) >= 2


@pytest.mark.real_server
def test_closing_releases_the_monitor_and_shutdown_stops_it(group: ShardGroup) -> None:
    host = group.router("router-2").endpoint
    conn = connect(group, host, limitless_transaction_router_monitor_disposal_time_ms=100)
    monitor = the_monitor(group, host)
    assert monitor.running and monitor.users == 1
    conn.close()
    wait_until("the idle monitor to stop", lambda: monitor.stopped and not monitor.running)
    assert monitor not in core.monitors()
    with connect(group):
        assert monitor_threads()
        resilient_db.shutdown()
        assert not core.monitors()
    wait_until("every monitor thread to end", lambda: not monitor_threads())


@pytest.mark.real_server
def test_a_crashed_monitor_thread_is_restarted_and_reads_on(
        group: ShardGroup, sink: CollectingSink, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    keeper = connect(group)  # keeps the monitor in use
    try:
        monitor = the_monitor(group)
        wait_until("the monitor's first read", lambda: monitor.fetches >= 1)
        real = monitor.publish
        crashed = threading.Event()

        def publish_once_crashing(routers: tuple[Router, ...], source: str) -> None:
            if source == "monitor" and not crashed.is_set():
                crashed.set()
                raise RuntimeError("injected")
            real(routers, source)

        def published() -> int:
            return sum(d.attributes["resilient_db.limitless.source"] == "monitor"
                       for d in sink.of_kind("limitless.routers_refreshed"))

        monkeypatch.setattr(monitor, "publish", publish_once_crashing)
        before = published()  # the first publish from now on crashes
        with caplog.at_level("WARNING", logger="resilient_db.limitless"):
            wait_until("the crash", crashed.is_set)
            wait_until("a list published after the restart",
                       lambda: monitor.crashes == 1 and published() > before)
        restarted = sink.of_kind("limitless.monitor_restarted")
        assert [d.attributes for d in restarted] == [{
            "server.address": monitor.host.host, "error.type": "RuntimeError",
            "resilient_db.monitor.crashes": 1}]
        assert any(r.getMessage().startswith(
            f"limitless router monitor of {monitor.host} crashed (1 so far); restarting in 0.1 s")
            for r in caplog.records)
        assert monitor.connection_open and monitor.running and not monitor.stopped
        assert [t.name for t in monitor_threads()] == [f"resilient_db-limitless[{monitor.host}]"]
    finally:
        keeper.close()


@pytest.mark.real_server
def test_a_child_after_fork_starts_its_own_monitor(group: ShardGroup) -> None:
    from .test_fork import in_child

    parent = connect(group)
    inherited = the_monitor(group)
    parent_session = inherited.connection_open

    def child() -> dict[str, Any]:
        # The parent held the on-the-spot fetch lock at fork time: the child's is fresh.
        abandoned = (inherited.stopped and not inherited.connection_open
                     and inherited.fetch_lock.acquire(blocking=False))
        left = len(core.monitors())
        with connect(group) as conn:
            router = on_router(conn)
            mine = the_monitor(group)
            fresh = mine is not inherited and mine.running
        resilient_db.shutdown()
        return {"abandoned": abandoned, "left": left, "router": router, "fresh": fresh}

    with inherited.fetch_lock:
        result = in_child(child)
    assert result == {"abandoned": True, "left": 0, "router": result["router"], "fresh": True}
    assert result["router"] in group.routers
    # The parent's monitor (and its server connection) carried on untouched.
    assert inherited.running and not inherited.stopped
    assert inherited.connection_open or not parent_session
    assert on_router(parent) in group.routers
    parent.close()


@pytest.mark.unit
def test_importing_starts_no_thread() -> None:
    import subprocess
    import sys

    code = ("import threading, resilient_db, resilient_db.limitless, "
            "resilient_db.plugins.limitless, simulator.limitless; "
            "print(threading.active_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "1"


@pytest.mark.real_server
def test_a_server_without_the_router_list_is_refused(pg_server: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, **pg_server.connect_kwargs(),
                             plugins="limitless")
    assert info.value.parameter == "plugins"
    assert "aurora_limitless_router_endpoints" in str(info.value)


@pytest.mark.unit
def test_mysql_is_refused_before_any_io() -> None:
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(mysql.connector.connect, host="203.0.113.1", user="u",
                             plugins="limitless")
    assert info.value.parameter == "plugins"
    assert "Aurora PostgreSQL only" in str(info.value)


@pytest.mark.unit
@pytest.mark.parametrize(("name", "value"), [
    ("limitless_transaction_router_monitor_interval_ms", 50),
    ("limitless_transaction_router_monitor_disposal_time_ms", 0),
    ("limitless_get_transaction_router_retry_interval_ms", 5),
    ("limitless_get_transaction_router_max_retries", -1),
    ("limitless_max_retries_ms", 0),
    ("limitless_wait_for_transaction_router_info", "sometimes"),
])
def test_bad_property_values_name_the_parameter(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, host="203.0.113.1",
                             plugins="limitless", **{name: value})
    assert info.value.parameter == name


@pytest.mark.unit
def test_aws_limitless_properties_are_accepted_under_their_names() -> None:
    from resilient_db._aws_properties import aws_unsupported
    from resilient_db._properties import REGISTRY

    for name in ("limitless_transaction_router_monitor_interval_ms",
                 "limitless_transaction_router_monitor_disposal_time_ms",
                 "limitless_wait_for_transaction_router_info",
                 "limitless_get_transaction_router_retry_interval_ms",
                 "limitless_get_transaction_router_max_retries", "limitless_max_retries_ms"):
        assert name in REGISTRY and aws_unsupported(name) is None


# --- the pure part -------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("load", "weight"), [
    (0.0, 10), (0.05, 10), (0.1, 9), (0.5, 5), (0.95, 1), (0.99, 1), (1.0, 1),
    (-0.1, 1), (1.5, 1), (float("nan"), 1), (None, 1), ("x", 1), (True, 1),
])
def test_weight_of_load(load: object, weight: int) -> None:
    assert weight_of(load) == weight


@pytest.mark.unit
def test_parse_routers() -> None:
    routers = parse_routers([("a.example", 0.2), ("", 0.1), ("A.example", 0.3),
                             ("b.example", "0.5"), ("c.example", None)], 5432)
    assert [(r.host, r.load, r.weight) for r in routers] == [
        ("a.example", 0.2, 8), ("b.example", 0.5, 5), ("c.example", None, 1)]
    assert routers[0].address == "a.example:5432"


def _routers(*weights: int) -> tuple[Router, ...]:
    return tuple(Router(f"r{i}", 5432, None, w) for i, w in enumerate(weights))


@pytest.mark.unit
def test_weighted_random_is_proportional_to_weight() -> None:
    routers = _routers(10, 5, 1)
    rng = random.Random(7)
    picks = [choose(routers, "weighted_random", rng=rng).router for _ in range(16_000)]
    counts = collections.Counter(r.host for r in picks if r is not None)
    assert counts["r0"] == pytest.approx(10_000, rel=0.05)
    assert counts["r1"] == pytest.approx(5_000, rel=0.08)
    assert counts["r2"] == pytest.approx(1_000, rel=0.2)


@pytest.mark.unit
def test_highest_weight_and_avoid() -> None:
    routers = _routers(3, 9, 9, 1)
    assert choose(routers, "highest_weight").router == routers[1]  # first of equals
    choice = choose(routers, "highest_weight", avoid={routers[1].address})
    assert choice.router == routers[2] and choice.skipped == (routers[1].address,)
    none = choose(routers, "weighted_random", avoid={r.address for r in routers},
                  rng=random.Random(1))
    assert none.router is None
    decision = choice.to_decision()
    assert decision.kind == "limitless.router_selected"
    assert decision.attributes["resilient_db.limitless.weights"] == (3, 9, 1)
