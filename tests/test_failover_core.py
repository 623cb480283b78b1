"""Unit and property tests of the failover decision core (resilient_db.failover_core)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tenacity.wait import wait_fixed, wait_incrementing

from resilient_db.errors import (
    ConfigurationError,
    FailoverFailedError,
    FailoverSuccessError,
    TransactionResolutionUnknownError,
)
from resilient_db.failover_core import (
    Attempt,
    FailoverMode,
    RetrySchedule,
    RetryState,
    SelfReport,
    classify_outcome,
    default_mode,
    elect_writer,
    plan_attempts,
    probe_targets,
    read_only_triggers_failover,
)
from resilient_db.hosts import Availability, BadHostMemory, Host, Role, TopologySnapshot
from resilient_db.rds import EndpointKind
from resilient_db.selection import HighestWeight, RoundRobinCursor, SelectionContext

pytestmark = pytest.mark.unit

SW, SR, RW = FailoverMode.STRICT_WRITER, FailoverMode.STRICT_READER, FailoverMode.READER_OR_WRITER
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def host(iid: str, role: Role = Role.READER, **kw: object) -> Host:
    return Host(f"{iid}.db", 5432, instance_id=iid, role=role, **kw)  # type: ignore[arg-type]


def topo(writer: str | None, *readers: str, epoch: int = 0,
         updated: dict[str, datetime] | None = None) -> TopologySnapshot:
    stamps = updated or {}
    hosts = [host(r, last_update=stamps.get(r)) for r in readers if r != writer]
    if writer is not None:
        hosts.append(host(writer, Role.WRITER, last_update=stamps.get(writer)))
    return TopologySnapshot(tuple(hosts), epoch)


def ctx(seed: int = 0) -> SelectionContext:
    return SelectionContext(rng=random.Random(seed), cursor=RoundRobinCursor())


# --- modes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode"),
    [("strict-writer", SW), ("STRICT_READER", SR), (" reader_or_writer ", RW),
     ("Reader-Or-Writer", RW)],
)
def test_mode_parse(text: str, mode: FailoverMode) -> None:
    assert FailoverMode.parse(text) is mode


def test_mode_parse_rejects_with_the_valid_names() -> None:
    with pytest.raises(ConfigurationError) as info:
        FailoverMode.parse("writer")
    assert info.value.parameter == "failover_mode"
    assert "strict-writer, strict-reader, reader-or-writer" in str(info.value)


@pytest.mark.parametrize("kind", list(EndpointKind))
def test_default_mode(kind: EndpointKind) -> None:
    expected = RW if kind is EndpointKind.CLUSTER_READER else SW
    assert default_mode(kind) is expected


# --- writer election ----------------------------------------------------------------------


def report(iid: str | None, is_reader: bool | None, at: float = 1.0,
           topology: TopologySnapshot | None = None, error: str | None = None,
           address: str | None = None) -> SelfReport:
    probed = Host(address or f"{iid}.db", 5432)
    return SelfReport(probed, at, iid, is_reader, topology, error)


def test_the_writer_is_verified_by_its_own_report() -> None:
    own = topo("b", "a", "c")
    election = elect_writer([
        report("a", True, topology=topo("a", "b", "c")),  # a stale reader view: ignored
        report("b", False, topology=own),
        report("c", True),
    ])
    assert election.writer is not None and election.writer.instance_id == "b"
    assert election.writer_host == Host("b.db", 5432, instance_id="b", role=Role.WRITER)
    assert election.topology == own
    assert election.claimants == ("b",)
    assert dict(election.rejected) == {"a": "is a reader", "c": "is a reader"}
    decision = election.to_decision()
    assert decision.kind == "failover.writer_election"
    assert decision.attributes["server.address"] == "b.db"
    assert decision.attributes["resilient_db.failover.writer_verified"] is True


def test_a_readers_view_alone_elects_nobody() -> None:
    election = elect_writer([report("a", True, topology=topo("b", "a"))])
    assert election.writer is None and election.writer_host is None
    assert election.topology is None
    assert election.to_decision().attributes["resilient_db.failover.writer_verified"] is False
    assert "server.address" not in election.to_decision().attributes


@pytest.mark.parametrize(
    ("bad", "reason"),
    [(report("x", None, error="timeout"), "probe failed: timeout"),
     (report("x", None), "did not say"),
     (report(None, False, address="x"), "instance id"),
     (report("x", False, topology=topo("y", "x")), "names y writer")],
)
def test_unconvincing_claims_are_rejected(bad: SelfReport, reason: str) -> None:
    election = elect_writer([bad])
    assert election.writer is None
    assert reason in election.rejected[0][1]


def test_conflicting_claims_newest_promotion_wins() -> None:
    old = report("a", False, at=9.0, topology=topo("a", "b", updated={"a": T0}))
    new = report("b", False, at=1.0,
                 topology=topo("b", "a", updated={"b": T0 + timedelta(seconds=5)}))
    election = elect_writer([old, new])
    assert election.writer is new
    assert election.claimants == ("a", "b")
    assert election.rejected == (("a", "superseded by the newer claim of b"),)


def test_conflicting_claims_tie_breaks() -> None:
    # Same (or no) own last_update: the most recent report, then the smallest id.
    assert elect_writer([report("a", False, at=1.0), report("b", False, at=2.0)]).writer == (
        report("b", False, at=2.0))
    tie = elect_writer([report("b", False), report("a", False), report("ab", False)])
    assert tie.writer == report("a", False)
    naive = topo("n", updated={"n": datetime(2030, 1, 1)})  # MySQL hands back naive times
    assert elect_writer([report("z", False, at=5.0), report("n", False, topology=naive)]
                        ).writer == report("n", False, topology=naive)


def test_one_instance_reached_by_two_addresses_is_one_claimant() -> None:
    election = elect_writer([report("a", False, address="cluster.db"), report("a", False)])
    assert election.claimants == ("a",) and election.rejected == ()


def test_writer_host_prefers_its_own_topology_address() -> None:
    via_endpoint = report("a", False, address="cluster.db", topology=topo("a", "b"))
    assert elect_writer([via_endpoint]).writer_host == host("a", Role.WRITER)
    unlisted = report("a", False, address="cluster.db")
    assert elect_writer([unlisted]).writer_host == Host("cluster.db", 5432, instance_id="a",
                                                        role=Role.WRITER)


def test_probe_targets_union_by_address() -> None:
    known = topo("a", "b")
    new_instance = topo("a", "b", "c")
    extra = Host("cluster.db", 5432)
    targets = probe_targets(known, [report("b", True, topology=new_instance),
                                    report("x", None, error="down")], [extra])
    assert [t.address for t in targets] == ["a.db:5432", "b.db:5432", "cluster.db:5432",
                                            "c.db:5432"]
    assert probe_targets(None) == ()


reports_strategy = st.lists(
    st.builds(
        report,
        st.none() | st.sampled_from(["a", "b", "c", "d"]),
        st.none() | st.booleans(),
        st.floats(0, 100),
        st.none() | st.builds(lambda w: topo(w, "a", "b", "c", "d") if w else topo(None, "a"),
                              st.none() | st.sampled_from(["a", "b", "c", "d"])),
        st.none() | st.just("refused"),
    ),
    max_size=8,
)


@given(reports_strategy)
def test_election_never_picks_an_instance_that_did_not_claim_itself(
    reports: list[SelfReport],
) -> None:
    election = elect_writer(reports)
    if election.writer is None:
        assert not any(r.error is None and r.is_reader is False and r.instance_id and (
            r.topology is None or r.topology.writer is None
            or r.topology.writer.instance_id == r.instance_id) for r in reports)
        return
    winner = election.writer
    assert winner in reports
    assert winner.error is None and winner.is_reader is False and winner.instance_id
    assert winner.topology is None or winner.topology.writer is None or (
        winner.topology.writer.instance_id == winner.instance_id)
    assert elect_writer(reversed(reports)).writer == winner  # order does not matter


# --- planning -----------------------------------------------------------------------------


def plan_ids(mode: FailoverMode, t: TopologySnapshot, bad: BadHostMemory | None = None,
             now: float = 0.0, max_lag: float | None = None) -> list[tuple[str, str]]:
    plan = plan_attempts(mode, t, bad or BadHostMemory(), now, HighestWeight(), ctx(),
                         max_lag=max_lag)
    return [(a.host.instance_id or "", a.reason) for a in plan.attempts]


def test_strict_writer_plans_the_writer_only() -> None:
    t = topo("w", "r1", "r2", epoch=3)
    plan = plan_attempts(SW, t, BadHostMemory(), 0.0, HighestWeight(), ctx())
    assert plan.attempts == (Attempt(t.hosts[0], Role.WRITER, "writer"),)
    assert plan.epoch == 3 and plan.choice is None
    cooling = BadHostMemory().mark_down(t.hosts[0], 0.0)
    assert plan_ids(SW, t, cooling) == [("w", "writer")]  # a verified writer is tried anyway
    assert plan_ids(SW, topo(None, "r1")) == []


def test_strict_reader_plans_readers_strategy_first() -> None:
    t = TopologySnapshot((host("w", Role.WRITER), host("r1", lag=0.3), host("r2", weight=5),
                          host("r3", lag=0.1)))
    plan = plan_attempts(SR, t, BadHostMemory(), 0.0, HighestWeight(), ctx())
    assert [a.host.instance_id for a in plan.attempts] == ["r2", "r3", "r1"]
    assert {a.required for a in plan.attempts} == {Role.READER}
    assert plan.choice is not None and plan.choice.strategy == "highest_weight"
    decision = plan.to_decision()
    assert decision.kind == "failover.plan"
    assert decision.attributes["server.address"] == "r2.db"
    assert decision.attributes["resilient_db.failover.mode"] == "strict-reader"
    assert decision.attributes["resilient_db.failover.attempts"] == (
        "r2@r2.db:5432", "r3@r3.db:5432", "r1@r1.db:5432")


def test_lag_cap_orders_lagging_readers_last() -> None:
    t = TopologySnapshot((host("w", Role.WRITER), host("slow", lag=30.0, weight=9),
                          host("ok", lag=0.5), host("fine", lag=0.1, weight=2)))
    assert plan_ids(SR, t, max_lag=1.0) == [("fine", "reader"), ("ok", "reader"),
                                            ("slow", "reader")]


def test_cooling_and_down_readers_are_left_out() -> None:
    t = TopologySnapshot((host("w", Role.WRITER), host("r1"),
                          host("r2", availability=Availability.DOWN), host("r3")))
    bad = BadHostMemory(10.0).mark_down(t.by_instance("r1") or "", 0.0)
    plan = plan_attempts(SR, t, bad, 5.0, HighestWeight(), ctx())
    assert [a.host.instance_id for a in plan.attempts] == ["r3"]
    assert plan.skipped == ("r1.db:5432", "r2.db:5432")
    assert sorted(plan_ids(SR, t, bad, now=10.0)) == [("r1", "reader"), ("r3", "reader")]


def test_only_cooling_hosts_left_then_soonest_to_recover_first() -> None:
    t = topo("w", "r1", "r2")
    bad = (BadHostMemory(10.0).mark_down("r1.db:5432", 0.0).mark_down("r2.db:5432", 5.0)
           .mark_down("w.db:5432", 2.0))
    assert plan_ids(SR, t, bad, now=6.0) == [("r1", "cooling"), ("r2", "cooling")]
    assert plan_ids(RW, t, bad, now=6.0) == [("r1", "cooling"), ("w", "cooling"),
                                             ("r2", "cooling")]


def test_reader_or_writer_puts_the_writer_last() -> None:
    t = topo("w", "r1")
    plan = plan_attempts(RW, t, BadHostMemory(), 0.0, HighestWeight(), ctx())
    assert [(a.host.instance_id, a.required, a.reason) for a in plan.attempts] == [
        ("r1", None, "reader"), ("w", None, "writer-last-resort")]
    assert plan_ids(RW, topo("w")) == [("w", "writer-last-resort")]
    cooling_writer = BadHostMemory().mark_down("w.db:5432", 0.0)
    assert plan_ids(RW, t, cooling_writer) == [("r1", "reader")]


def test_strict_reader_on_a_single_instance_cluster_uses_the_writer() -> None:
    assert plan_ids(SR, topo("w")) == [("w", "single-instance")]
    assert plan_ids(SR, topo(None)) == []
    assert plan_ids(SR, topo("w", "r1"), BadHostMemory().mark_down("r1.db:5432", 0.0)) == [
        ("r1", "cooling")]  # a reader exists (cooling): the writer is not the answer


members = st.sets(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=5)


@given(st.sampled_from(list(FailoverMode)), members, st.none() | st.sampled_from("abcde"),
       members, st.floats(0, 20), st.none() | st.floats(0, 5),
       st.dictionaries(st.sampled_from("abcde"), st.floats(0, 10)))
def test_plans_avoid_cooling_hosts_unless_nothing_else(
    mode: FailoverMode, readers: set[str], writer: str | None, cooling: set[str], now: float,
    max_lag: float | None, lags: dict[str, float],
) -> None:
    readers = readers - {writer} if writer else readers
    hosts = [host(r, lag=lags.get(r)) for r in readers]
    if writer:
        hosts.append(host(writer, Role.WRITER))
    t = TopologySnapshot(tuple(hosts))
    bad = BadHostMemory(30.0)
    for name in cooling:
        bad = bad.mark_down(f"{name}.db:5432", now)
    plan = plan_attempts(mode, t, bad, now, HighestWeight(), ctx(), max_lag=max_lag)
    planned = [a.host for a in plan.attempts]
    assert len({h.address for h in planned}) == len(planned)
    assert all(h in t.hosts for h in planned)
    if mode is SW:
        assert planned == ([t.writer] if t.writer else [])
        return
    if mode is SR and not t.readers:  # a single-instance cluster: its writer, cooling or not
        assert planned == ([t.writer] if t.writer else [])
        return
    allowed = list(t.readers) + ([t.writer] if mode is RW and t.writer else [])
    fresh = [h for h in allowed if not bad.is_cooling(h, now)]
    # Cooling hosts only when nothing else is left; then all of them.
    assert set(planned) == set(fresh or allowed)
    if fresh:
        assert not any(bad.is_cooling(h, now) for h in planned), "cooling host planned"


# --- retry schedule -----------------------------------------------------------------------


def test_default_schedule_backs_off_and_caps() -> None:
    state = RetrySchedule().start(now=0.0)
    delays = []
    for i in range(8):
        step = state.next_step(float(i))
        assert step.retry
        delays.append(step.delay)
        state = state.increment(float(i), "no writer yet")
    assert delays == pytest.approx([0.1, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert len(state.history) == 8 and state.history[0] == (0.0, "no writer yet")


def test_budget_bounds_delays_and_gives_up() -> None:
    state = RetrySchedule(timeout=1.0, wait=wait_fixed(0.7)).start(now=10.0)
    assert state.deadline == 11.0
    first = state.next_step(10.0)
    assert (first.retry, first.delay, first.remaining) == (True, 0.7, 1.0)
    second = state.increment(10.7, "refused").next_step(10.7)
    assert second.retry and second.delay == pytest.approx(0.3)
    done = state.next_step(11.0)
    assert (done.retry, done.delay, done.rounds, done.remaining) == (False, 0.0, 0, 0.0)
    assert done.to_decision().kind == "failover.gave_up"
    assert first.to_decision().kind == "failover.retry"


def test_no_timeout_never_gives_up() -> None:
    state = RetrySchedule(timeout=None, wait=wait_incrementing(1, 1)).start(0.0)
    step = state.increment(1e9, "x").increment(1e9, "x").next_step(1e9)
    # tenacity's attempt_number is the number of rounds done: 2 here, so 1 + 1 * (2 - 1).
    assert (step.retry, step.delay, step.remaining, state.remaining(5.0)) == (True, 2.0, None,
                                                                              None)
    assert state.deadline is None
    assert step.to_decision().attributes["resilient_db.failover.remaining"] == -1.0


def test_zero_timeout_is_one_round() -> None:
    assert not RetrySchedule(timeout=0.0).start(5.0).next_step(5.0).retry


def test_jitter_needs_an_injected_rng_and_stays_in_range() -> None:
    state = RetrySchedule(timeout=None, wait=wait_fixed(1.0), jitter=0.2).start(0.0)
    with pytest.raises(ValueError, match="random"):
        state.next_step(0.0)
    rng = random.Random(1)
    delays = [state.next_step(0.0, rng).delay for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in delays)
    assert max(delays) - min(delays) > 0.2
    again = [state.next_step(0.0, random.Random(1)).delay for _ in range(1)]
    assert again == delays[:1]


def test_schedule_from_failover_properties() -> None:
    schedule = RetrySchedule.for_failover(timeout=60.0, interval=0.5, jitter=0.0)
    state = schedule.start(0.0)
    delays = []
    for _ in range(6):
        delays.append(state.next_step(0.0).delay)
        state = state.increment(0.0, "x")
    assert delays == pytest.approx([0.1, 0.1, 0.2, 0.4, 0.5, 0.5])
    tight = RetrySchedule.for_failover(timeout=60.0, interval=0.05, jitter=0.0)
    assert tight.start(0.0).next_step(0.0).delay == pytest.approx(0.05)


@given(st.floats(0, 30), st.floats(0, 3), st.lists(st.floats(0, 2), max_size=30))
def test_retry_never_sleeps_past_the_budget(timeout: float, fixed: float,
                                            work: list[float]) -> None:
    state = RetrySchedule(timeout=timeout, wait=wait_fixed(fixed)).start(0.0)
    now = 0.0
    for spent in work:
        step = state.next_step(now)
        if not step.retry:
            assert now >= timeout
            break
        now += step.delay
        assert now <= timeout + 1e-9
        now += spent
        state = state.increment(now, "failed")


# --- outcomes and read-only errors --------------------------------------------------------


@pytest.mark.parametrize(
    ("in_tx", "sent", "reconnected", "idempotent", "error", "retry_safe"),
    [
        (False, False, True, False, FailoverSuccessError, True),
        (False, True, True, False, FailoverSuccessError, False),
        (False, True, True, True, FailoverSuccessError, True),
        (True, False, True, True, TransactionResolutionUnknownError, False),
        (True, True, True, False, TransactionResolutionUnknownError, False),
        (False, False, False, True, FailoverFailedError, False),
        (True, True, False, False, FailoverFailedError, False),
    ],
)
def test_classify_outcome(in_tx: bool, sent: bool, reconnected: bool, idempotent: bool,
                          error: type, retry_safe: bool) -> None:
    outcome = classify_outcome(in_transaction=in_tx, statement_sent=sent,
                               reconnected=reconnected, idempotent=idempotent)
    assert outcome.error is error
    assert outcome.retry_safe is retry_safe
    decision = outcome.to_decision()
    assert decision.kind == "failover.outcome"
    assert decision.attributes["error.type"] == error.__name__
    assert decision.attributes["resilient_db.failover.statement_sent"] is sent


@pytest.mark.parametrize(
    ("mode", "role", "trigger"),
    [(SW, Role.READER, True), (SW, Role.WRITER, False), (SW, Role.UNKNOWN, False),
     (SR, Role.READER, False), (RW, Role.READER, False), (RW, Role.WRITER, False)],
)
def test_read_only_error_triggers_failover_only_on_a_confirmed_demotion(
    mode: FailoverMode, role: Role, trigger: bool,
) -> None:
    verdict = read_only_triggers_failover(mode, role)
    assert verdict.failover is trigger
    decision = verdict.to_decision()
    assert decision.kind == "failover.read_only_error"
    assert decision.attributes["resilient_db.failover.triggered"] is trigger
    assert decision.attributes["resilient_db.failover.reason"] == verdict.reason


def test_retry_state_is_immutable() -> None:
    state = RetryState(RetrySchedule(), 0.0)
    later = state.increment(1.0, "x")
    assert state.history == () and later.history == ((1.0, "x"),)
