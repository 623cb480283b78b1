"""The pure part of blue/green support (``resilient_db.blue_green``): parsing RDS metadata,
the phase a deployment is in, names and counterparts captured before a switchover, and where
a new connection goes in each phase. No servers."""

from __future__ import annotations

from typing import Any

import pytest

from resilient_db.blue_green import (
    Action,
    Deployment,
    Phase,
    Side,
    Status,
    capture,
    connect_route,
    holds_statements,
    is_old,
    observe,
    parse_rows,
)

pytestmark = pytest.mark.unit

SUFFIX = "abc123xyz.us-east-1.rds.amazonaws.com"
BLUE_WRITER = f"app.cluster-{SUFFIX}"
GREEN_WRITER = f"app-green-x1y2z3.cluster-{SUFFIX}"
BLUE_I1 = f"db-1.{SUFFIX}"
BLUE_I2 = f"db-2.{SUFFIX}"
GREEN_I1 = f"db-1-green-a1b2c3.{SUFFIX}"
GREEN_I2 = f"db-2-green-d4e5f6.{SUFFIX}"
SOURCE, TARGET = "BLUE_GREEN_DEPLOYMENT_SOURCE", "BLUE_GREEN_DEPLOYMENT_TARGET"

ADDRESSES = {BLUE_WRITER: "10.0.0.1", BLUE_I1: "10.0.0.1", BLUE_I2: "10.0.0.2",
             BLUE_WRITER.replace(".cluster-", ".cluster-ro-"): "10.0.0.2",
             GREEN_WRITER: "10.0.1.1", GREEN_I1: "10.0.1.1", GREEN_I2: "10.0.1.2",
             GREEN_WRITER.replace(".cluster-", ".cluster-ro-"): "10.0.1.2"}


def rows(status: str, *, blue: str = SOURCE, green: str = TARGET) -> list[tuple[Any, ...]]:
    return [("1.0", name, 5432, blue, status) for name in (BLUE_WRITER, BLUE_I1, BLUE_I2)] + [
        ("1.0", name, 5432, green, status) for name in (GREEN_WRITER, GREEN_I1, GREEN_I2)]


def resolver(name: str) -> frozenset[str]:
    found = ADDRESSES.get(name)
    return frozenset({found}) if found else frozenset()


def deployment() -> Deployment:
    return capture(parse_rows(rows("AVAILABLE")), resolver)


@pytest.mark.parametrize(("status", "phase"), [
    ("AVAILABLE", Phase.CREATED),
    ("SWITCHOVER_INITIATED", Phase.PREPARATION),
    ("SWITCHOVER_IN_PROGRESS", Phase.IN_PROGRESS),
    ("switchover_in_post_processing", Phase.POST),
    ("SWITCHOVER_COMPLETED", Phase.COMPLETED),
])
def test_status_values_map_to_phases(status: str, phase: Phase) -> None:
    assert observe(parse_rows(rows(status))) is phase


def test_no_rows_is_not_created_and_unknown_rows_are_skipped() -> None:
    assert observe(()) is Phase.NOT_CREATED
    parsed = parse_rows([("1.0", BLUE_WRITER, 5432, "SOMETHING_ELSE", "AVAILABLE"),
                         ("1.0", BLUE_WRITER, 5432, SOURCE, "NEW_STATUS"),
                         ("1.0", None, 5432, SOURCE, "AVAILABLE"), ("short",),
                         ("2.0", BLUE_WRITER.upper(), "5432", SOURCE, "AVAILABLE")])
    assert len(parsed) == 1
    assert parsed[0].endpoint == BLUE_WRITER and parsed[0].port == 5432
    assert parsed[0].side is Side.BLUE


def test_old_names_do_not_count_after_the_rename() -> None:
    assert is_old(f"app-old1.cluster-{SUFFIX}") and is_old(f"db-1-old1.{SUFFIX}")
    assert not is_old(BLUE_WRITER)
    after = [("1.0", f"app-old1.cluster-{SUFFIX}", 5432, SOURCE, "SWITCHOVER_COMPLETED"),
             ("1.0", BLUE_WRITER, 5432, TARGET, "SWITCHOVER_IN_POST_PROCESSING")]
    assert observe(parse_rows(after)) is Phase.POST


def test_capture_names_addresses_and_counterparts() -> None:
    found = deployment()
    assert BLUE_WRITER.replace(".cluster-", ".cluster-ro-") in found.blue  # derived reader
    assert found.counterpart[BLUE_WRITER] == GREEN_WRITER
    assert found.counterpart[BLUE_I1] == GREEN_I1  # by instance id, green suffix removed
    assert found.counterpart[BLUE_I2] == GREEN_I2
    assert found.counterpart[BLUE_WRITER.replace(".cluster-", ".cluster-ro-")] == \
        GREEN_WRITER.replace(".cluster-", ".cluster-ro-")
    assert found.side_of("10.0.0.2") is Side.BLUE and found.side_of("10.0.1.1") is Side.GREEN
    assert found.side_of("elsewhere.example.com") is None


@pytest.mark.parametrize(("phase", "host", "action", "address"), [
    (Phase.CREATED, BLUE_WRITER, Action.DIRECT, None),
    (Phase.PREPARATION, BLUE_WRITER, Action.SUBSTITUTE, "10.0.0.1"),
    (Phase.PREPARATION, GREEN_WRITER, Action.DIRECT, None),
    (Phase.IN_PROGRESS, BLUE_I2, Action.SUBSTITUTE, "10.0.0.2"),
    (Phase.IN_PROGRESS, GREEN_WRITER, Action.SUSPEND, None),
    (Phase.IN_PROGRESS, "10.0.0.1", Action.SUSPEND, None),
    (Phase.POST, BLUE_WRITER, Action.SUBSTITUTE, "10.0.1.1"),
    (Phase.POST, BLUE_I2, Action.SUBSTITUTE, "10.0.1.2"),
    (Phase.POST, GREEN_I1, Action.REJECT, None),
    (Phase.POST, "10.0.0.1", Action.DIRECT, None),
    (Phase.POST, "other.example.com", Action.DIRECT, None),
])
def test_connect_routes(phase: Phase, host: str, action: Action, address: str | None) -> None:
    route = connect_route(Status(phase, deployment()), host, suspend_blue=False)
    assert (route.action, route.address) == (action, address), route.reason


def test_suspend_new_blue_connections_holds_blue_names_too() -> None:
    status = Status(Phase.IN_PROGRESS, deployment())
    assert connect_route(status, BLUE_WRITER, suspend_blue=True).action is Action.SUSPEND


def test_completed_acts_only_once_dns_caught_up() -> None:
    found = deployment()
    waiting = Status(Phase.COMPLETED, found, blue_dns_updated=True, green_dns_removed=False)
    assert waiting.routing_phase is Phase.POST
    assert connect_route(waiting, BLUE_WRITER, suspend_blue=False).action is Action.SUBSTITUTE
    done = Status(Phase.COMPLETED, found, blue_dns_updated=True, green_dns_removed=True)
    assert done.routing_phase is Phase.COMPLETED and done.quiet
    assert connect_route(done, BLUE_WRITER, suspend_blue=False).action is Action.DIRECT


def test_timeout_ends_routing_and_holding() -> None:
    status = Status(Phase.IN_PROGRESS, deployment(), timed_out=True)
    assert status.routing_phase is Phase.COMPLETED
    assert connect_route(status, GREEN_WRITER, suspend_blue=False).action is Action.DIRECT
    assert not holds_statements(status, Side.BLUE)
    assert holds_statements(Status(Phase.IN_PROGRESS, deployment()), Side.GREEN)
    assert not holds_statements(Status(Phase.IN_PROGRESS, deployment()), None)


def test_without_metadata_everything_goes_through_dns() -> None:
    for phase in Phase:
        route = connect_route(Status(phase, None), BLUE_WRITER, suspend_blue=True)
        assert route.action is Action.DIRECT


class FakeDriver:
    """The monitor's driver, for :meth:`BlueGreenMonitor._publish` only (no I/O)."""

    code = "psycopg"

    def abort(self, conn: Any) -> bool:
        return False


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def routing(m: Any) -> Phase:
    """The monitor's current routing phase (a call: mypy must not narrow it across
    publications)."""
    phase: Phase = m.status.routing_phase
    return phase


def monitor(clock: Clock, names: dict[str, str]) -> Any:
    from resilient_db.blue_green import BlueGreenMonitor, Intervals

    def resolve(name: str) -> frozenset[str]:
        found = names.get(name)
        return frozenset({found}) if found else frozenset()

    return BlueGreenMonitor(("psycopg", "t"), "t", FakeDriver(),  # type: ignore[arg-type]
                            intervals=Intervals(), switchover_timeout=30.0, disposal=60.0,
                            resolver=resolve, clock=clock)


def test_monitor_waits_for_dns_before_completing_and_records_phases(
        sink: Any) -> None:
    clock = Clock()
    names = dict(ADDRESSES)
    m = monitor(clock, names)
    m._publish(m.status, raw_rows=rows("AVAILABLE"))
    assert m.status.phase is Phase.CREATED and m.status.deployment is not None
    m._publish(m.status, raw_rows=rows("SWITCHOVER_IN_PROGRESS"))
    assert routing(m) is Phase.IN_PROGRESS
    # Names moved for blue, green names still resolve: COMPLETED acts as POST.
    for name in list(names):
        if name.startswith("app.") or name.startswith("db-1.") or name.startswith("db-2."):
            names[name] = names[name].replace("10.0.0.", "10.0.1.")
    m._publish(m.status, raw_rows=rows("SWITCHOVER_COMPLETED"))
    assert m.status.blue_dns_updated and not m.status.green_dns_removed
    assert routing(m) is Phase.POST
    for name in [n for n in names if "green" in n]:
        del names[name]
    m._publish(m.status, raw_rows=rows("SWITCHOVER_COMPLETED"))
    assert routing(m) is Phase.COMPLETED
    phases = [d.attributes["resilient_db.blue_green.phase"]
              for d in sink.of_kind("blue_green.phase_changed")]
    assert phases == ["CREATED", "IN_PROGRESS", "COMPLETED", "COMPLETED"]
    routed = [d.attributes["resilient_db.blue_green.routing_phase"]
              for d in sink.of_kind("blue_green.phase_changed")]
    assert routed == ["CREATED", "IN_PROGRESS", "POST", "COMPLETED"]


def test_monitor_gives_up_steering_after_the_switchover_timeout(sink: Any) -> None:
    clock = Clock()
    m = monitor(clock, dict(ADDRESSES))
    m._publish(m.status, raw_rows=rows("AVAILABLE"))
    m._publish(m.status, raw_rows=rows("SWITCHOVER_INITIATED"))
    clock.now += 29.0
    m._publish(m.status, raw_rows=rows("SWITCHOVER_IN_PROGRESS"))
    assert not m.status.timed_out and routing(m) is Phase.IN_PROGRESS
    clock.now += 2.0
    m._publish(m.status, raw_rows=rows("SWITCHOVER_IN_PROGRESS"))
    assert m.status.timed_out and routing(m) is Phase.COMPLETED
    assert not holds_statements(m.status, Side.BLUE)
    m._publish(m.status, raw_rows=None)  # a failed read keeps what was known
    assert m.status.timed_out
    m._publish(m.status, raw_rows=rows("AVAILABLE"))  # rolled back / new deployment
    assert not m.status.timed_out and m.status.phase is Phase.CREATED
    assert sink.of_kind("blue_green.phase_changed")[-1].attributes[
        "resilient_db.blue_green.rollback"] is True


def test_a_lagging_copy_of_the_metadata_does_not_turn_the_switchover_back(sink: Any) -> None:
    """RDS updates the two sides' metadata separately; after the names move the monitor
    reads green, whose copy may still say IN_PROGRESS. Taken as news, blue names went back to
    blue's old addresses (loaded CI run: the blue reader endpoint reached the old blue
    reader during POST)."""
    clock = Clock()
    m = monitor(clock, dict(ADDRESSES))
    for status in ("AVAILABLE", "SWITCHOVER_INITIATED", "SWITCHOVER_IN_PROGRESS",
                   "SWITCHOVER_IN_POST_PROCESSING"):
        m._publish(m.status, raw_rows=rows(status))
    assert routing(m) is Phase.POST
    reader = BLUE_WRITER.replace(".cluster-", ".cluster-ro-")
    for _ in range(3):  # the other copy, read again and again until it catches up
        m._publish(m.status, raw_rows=rows("SWITCHOVER_IN_PROGRESS"))
        assert m.status.phase is Phase.POST and routing(m) is Phase.POST
        route = connect_route(m.status, reader, suspend_blue=False)
        assert (route.action, route.address) == (Action.SUBSTITUTE, "10.0.1.2")
    lagging = sink.of_kind("blue_green.metadata_lagging")
    assert len(lagging) == 1  # once per run of lagging reads
    assert lagging[0].attributes["resilient_db.blue_green.read_phase"] == "IN_PROGRESS"
    assert lagging[0].attributes["resilient_db.blue_green.phase"] == "POST"
    assert "rollback" not in str(sink.of_kind("blue_green.phase_changed")[-1].attributes)
    m._publish(m.status, raw_rows=rows("SWITCHOVER_COMPLETED"))
    assert m.status.phase is Phase.COMPLETED
    m._publish(m.status, raw_rows=rows("SWITCHOVER_IN_POST_PROCESSING"))  # lagging, too
    assert m.status.phase is Phase.COMPLETED
    assert len(sink.of_kind("blue_green.metadata_lagging")) == 2


@pytest.mark.parametrize(("before", "read", "news"), [
    ("SWITCHOVER_IN_PROGRESS", "SWITCHOVER_INITIATED", True),  # before POST: a rollback
    ("SWITCHOVER_IN_POST_PROCESSING", "AVAILABLE", True),  # CREATED: always news
    ("SWITCHOVER_COMPLETED", "SWITCHOVER_IN_PROGRESS", False),
])
def test_what_counts_as_a_lagging_copy(before: str, read: str, news: bool) -> None:
    m = monitor(Clock(), dict(ADDRESSES))
    m._publish(m.status, raw_rows=rows("AVAILABLE"))
    m._publish(m.status, raw_rows=rows(before))
    m._publish(m.status, raw_rows=rows(read))
    assert (m.status.phase is parse_rows(rows(read))[0].phase) is news


def test_a_new_deployment_after_a_switchover_is_news() -> None:
    """After a completed switchover, a new deployment's rows (new green names) in any phase
    are read as they are, even one first seen mid-switchover."""
    m = monitor(Clock(), dict(ADDRESSES))
    for status in ("AVAILABLE", "SWITCHOVER_COMPLETED"):
        m._publish(m.status, raw_rows=rows(status))
    newer = [(v, n.replace("green-", "green2-"), p, r, s)
             for v, n, p, r, s in rows("SWITCHOVER_INITIATED")]
    m._publish(m.status, raw_rows=newer)
    assert m.status.phase is Phase.PREPARATION
