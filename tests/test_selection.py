"""Unit and property tests of reader selection strategies (resilient_db.selection)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_db._properties import REGISTRY, Settings
from resilient_db.errors import ConfigurationError
from resilient_db.hosts import Host, Role
from resilient_db.selection import (
    STRATEGY_NAMES,
    FastestResponse,
    HighestWeight,
    LeastConnections,
    Random,
    ReaderChoice,
    RoundRobin,
    RoundRobinCursor,
    SelectionContext,
    Strategy,
    WeightedRandom,
    choose,
    configured,
    strategy_from_name,
    within_lag,
)

pytestmark = pytest.mark.unit


def r(name: str, *, weight: float = 1.0, lag: float | None = None) -> Host:
    return Host(f"{name}.db", 5432, instance_id=name, role=Role.READER, weight=weight, lag=lag)


A, B, C = r("a"), r("b"), r("c")
ALL: tuple[Strategy, ...] = (Random(), RoundRobin(), LeastConnections(), HighestWeight(),
                             WeightedRandom(), FastestResponse())


def ctx(seed: int = 0, **kw: object) -> SelectionContext:
    kw.setdefault("cursor", RoundRobinCursor())
    return SelectionContext(rng=random.Random(seed), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
def test_no_candidates_no_host(strategy: Strategy) -> None:
    assert strategy.select([], ctx()) is None


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
def test_one_candidate_is_chosen(strategy: Strategy) -> None:
    assert strategy.select([B], ctx()) is B


def test_random_is_reproducible_with_a_seed() -> None:
    picks = [Random().select([A, B, C], ctx(7)) for _ in range(3)]
    again = [Random().select([A, B, C], ctx(7)) for _ in range(3)]
    assert picks == again
    seen = Counter(Random().select([A, B, C], ctx(i)) for i in range(60))
    assert set(seen) == {A, B, C}


def test_round_robin_cycles_in_address_order() -> None:
    c = ctx()
    assert [RoundRobin().select([C, A, B], c) for _ in range(5)] == [A, B, C, A, B]
    assert c.cursor is not None and c.cursor.last == B.address


def test_round_robin_follows_membership_changes() -> None:
    c = ctx()
    assert RoundRobin().select([A, B, C], c) is A
    assert RoundRobin().select([B, C], c) is B  # a left: continue after it
    assert RoundRobin().select([A, C], c) is C  # b (the last) left: the next after it
    assert RoundRobin().select([A, B], c) is A  # wrap round


def test_round_robin_weights_give_consecutive_turns() -> None:
    c = ctx()
    heavy = r("b", weight=3.0)
    picks = [RoundRobin().select([A, heavy, r("c", weight=0.2)], c) for _ in range(6)]
    assert [p.instance_id for p in picks if p] == ["a", "b", "b", "b", "c", "a"]


def test_round_robin_needs_a_cursor() -> None:
    with pytest.raises(ValueError, match="cursor"):
        RoundRobin().select([A], SelectionContext())


def test_least_connections() -> None:
    c = ctx(connections={A.address: 5, B.address: 1, C.address: 3})
    assert LeastConnections().select([A, B, C], c) is B
    ties = {LeastConnections().select([A, B, C], ctx(i, connections={A.address: 2}))
            for i in range(30)}
    assert ties == {B, C}  # hosts without a count have 0 connections; ties go at random


def test_highest_weight() -> None:
    assert HighestWeight().select([A, r("b", weight=5), r("c", weight=2)], ctx()) == r(
        "b", weight=5)
    ties = {HighestWeight().select([A, B], ctx(i)) for i in range(30)}
    assert ties == {A, B}


def test_weighted_random_all_zero_is_uniform() -> None:
    zeros = [r(n, weight=0) for n in "abc"]
    seen = Counter(WeightedRandom().select(zeros, ctx(i)) for i in range(90))
    assert set(seen) == set(zeros)
    only = WeightedRandom().select([r("a", weight=0), r("b", weight=1)], ctx(3))
    assert only == r("b", weight=1)


def test_fastest_response_ignores_stale_and_missing_measurements() -> None:
    times = {A.address: (0.010, 95.0), B.address: (0.002, 10.0), C.address: (0.020, 99.0)}
    c = ctx(now=100.0, response_times=times)
    assert FastestResponse(max_age=60).select([A, B, C], c) is A  # b's measurement is stale
    assert FastestResponse(max_age=600).select([A, B, C], c) is B
    unmeasured = {FastestResponse().select([A, B], ctx(i, now=0.0)) for i in range(30)}
    assert unmeasured == {A, B}


@pytest.mark.parametrize("name", [n for n in STRATEGY_NAMES if n != "fastest_response"])
def test_strategy_from_name(name: str) -> None:
    assert strategy_from_name(name).name == name
    assert strategy_from_name(f" {name.upper().replace('_', '-')} ").name == name


def test_strategy_from_name_names_the_valid_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        strategy_from_name("fastest", parameter="failover_reader_host_selector_strategy")
    assert info.value.parameter == "failover_reader_host_selector_strategy"
    assert info.value.value == "fastest"
    for name in ("random", "round_robin", "least_connections", "highest_weight",
                 "weighted_random", "fastest_response"):
        assert name in str(info.value)


def test_fastest_response_is_refused_without_its_plugin() -> None:
    # Without measured response times it would pick at random: refused, naming the fix.
    with pytest.raises(ConfigurationError) as info:
        strategy_from_name("fastest_response", parameter="failover_reader_host_selector_strategy")
    assert info.value.parameter == "failover_reader_host_selector_strategy"
    assert "add fastest_response_strategy to plugins" in str(info.value)
    assert strategy_from_name("fastest_response", measured=True).name == "fastest_response"


def test_configured_fastest_response_needs_the_plugin_and_follows_the_interval() -> None:
    with pytest.raises(ConfigurationError, match="add fastest_response_strategy to plugins"):
        configured("fastest_response", settings(), parameter="p", plugins=("failover",))
    strategy, weights = configured("fastest_response", settings(), parameter="p",
                                   plugins=("failover", "fastest_response_strategy"))
    assert strategy == FastestResponse(max_age=90.0) and weights is None  # 3 x 30 s default
    strategy, _ = configured("fastest_response",
                             settings(response_measurement_interval_ms=200), parameter="p",
                             plugins=("fastest_response_strategy",))
    assert isinstance(strategy, FastestResponse)
    assert strategy.max_age == pytest.approx(0.6)


def test_fastest_response_ranks_unmeasured_hosts_last() -> None:
    times = {B.address: (0.050, 99.0)}
    assert {FastestResponse().select([A, B, C], ctx(i, now=100.0, response_times=times))
            for i in range(20)} == {B}


def test_choice_records_the_measured_response_time() -> None:
    times = {A.address: (0.010, 99.0), B.address: (0.002, 99.5)}
    choice = choose(FastestResponse(), [A, B, C], ctx(now=100.0, response_times=times))
    assert choice.host is B and choice.response_time == 0.002 and choice.measured == 2
    attributes = choice.to_decision().attributes
    assert attributes["resilient_db.selection.response_time"] == 0.002
    assert attributes["resilient_db.selection.measured"] == 2
    # Nothing measured: random, and the decision says so (no response time, 0 measured).
    blind = choose(FastestResponse(), [A, B], ctx(now=100.0)).to_decision().attributes
    assert blind["resilient_db.selection.measured"] == 0
    assert "resilient_db.selection.response_time" not in blind
    # Other strategies carry neither attribute.
    other = choose(Random(), [A, B], ctx(now=100.0, response_times=times))
    assert other.response_time is None and other.measured is None
    assert "resilient_db.selection.measured" not in other.to_decision().attributes


# --- configured strategies: weights from the AWS properties --------------------------------


def settings(**values: object) -> Settings:
    return Settings({REGISTRY[k]: REGISTRY[k].parse(v) for k, v in values.items()})


@pytest.mark.parametrize("name", ["weighted_random", "highest_weight"])
def test_weighted_strategies_refuse_to_run_without_weights(name: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        configured(name, settings(), parameter="failover_reader_host_selector_strategy")
    assert info.value.parameter == "failover_reader_host_selector_strategy"
    assert "weighted_random_host_weight_pairs" in str(info.value)
    assert "plain random" in str(info.value)


def test_highest_weight_reads_the_weight_pairs() -> None:
    # By host name, or by instance id; hosts not named weigh the default.
    for pairs in ("b.db:5,c.db:2", "B:5,c:2"):
        strategy, weights = configured(
            "highest_weight", settings(weighted_random_host_weight_pairs=pairs),
            parameter="p")
        picks = {strategy.select([A, B, C], ctx(seed, weights=weights)) for seed in range(20)}
        assert picks == {B}
    strategy, weights = configured(
        "highest_weight", settings(weighted_random_host_weight_pairs="a:2",
                                   weighted_random_default_weight=3), parameter="p")
    picks = {strategy.select([A, B, C], ctx(seed, weights=weights)) for seed in range(30)}
    assert picks == {B, C}


def test_weighted_random_follows_the_weight_pairs() -> None:
    strategy, weights = configured(
        "weighted_random", settings(weighted_random_host_weight_pairs="a.db:1,b.db:3"),
        parameter="p")
    rng = random.Random(7)
    counts = Counter(strategy.select([A, B, C], SelectionContext(rng=rng, weights=weights))
                     for _ in range(5000))
    # a:1, b:3, c: default 1 -> 20%, 60%, 20%.
    assert counts[B] / 5000 == pytest.approx(0.6, abs=0.05)
    assert counts[A] / 5000 == pytest.approx(0.2, abs=0.05)


def test_round_robin_reads_its_weight_pairs() -> None:
    strategy, weights = configured(
        "round_robin", settings(round_robin_host_weight_pairs="b.db:3"), parameter="p")
    c = SelectionContext(cursor=RoundRobinCursor(), weights=weights)
    picks = [strategy.select([A, B, C], c) for _ in range(6)]
    assert picks == [A, B, B, B, C, A]


def test_least_connections_uses_the_counts_it_is_given() -> None:
    strategy, _ = configured("least_connections", settings(), parameter="p")
    counts = {A.address: 4, B.address: 1, C.address: 2}
    assert {strategy.select([A, B, C], ctx(seed, connections=counts))
            for seed in range(20)} == {B}


# --- replica lag --------------------------------------------------------------------------


def test_within_lag() -> None:
    fresh, slow, unknown = r("a", lag=0.5), r("b", lag=20.0), r("c")
    assert within_lag([fresh, slow, unknown], None) == ((fresh, slow, unknown), ())
    assert within_lag([fresh, slow, unknown], 1.0) == ((fresh, unknown), (slow,))
    assert within_lag([], 1.0) == ((), ())
    # Nobody within the cap: the least lagged (every one sharing the lowest lag) stay eligible.
    x, y, z = r("x", lag=5.0), r("y", lag=3.0), r("z", lag=3.0)
    assert within_lag([x, y, z], 1.0) == ((y, z), (x,))


def test_choose_records_the_choice() -> None:
    fresh, slow = r("a", lag=0.5), r("b", lag=20.0)
    choice = choose(HighestWeight(), [fresh, slow], ctx(), max_lag=1.0)
    assert choice == ReaderChoice(fresh, "highest_weight", 2, (slow.address,), False)
    decision = choice.to_decision()
    assert decision.kind == "reader.selected"
    assert decision.attributes["server.address"] == "a.db"
    assert decision.attributes["server.port"] == 5432
    assert decision.attributes["resilient_db.instance.id"] == "a"
    assert decision.attributes["resilient_db.selection.skipped_for_lag"] == ("b.db:5432",)
    over = choose(Random(), [slow], ctx(), max_lag=1.0)
    assert over.host is slow and over.over_cap
    empty = choose(Random(), [], ctx())
    assert empty.host is None
    assert "server.address" not in empty.to_decision().attributes
    no_port = choose(Random(), [Host("h")], ctx()).to_decision()
    assert "server.port" not in no_port.attributes
    assert "resilient_db.instance.id" not in no_port.attributes


# --- property tests -----------------------------------------------------------------------

lags = st.none() | st.floats(0, 100, allow_nan=False)
weights = st.floats(0, 10, allow_nan=False)
candidate_lists = st.lists(
    st.builds(lambda n, w, lag: r(f"h{n}", weight=w, lag=lag), st.integers(0, 30), weights, lags),
    max_size=8, unique_by=lambda h: h.address,
)


@given(st.sampled_from(ALL), candidate_lists, st.none() | st.floats(0, 50), st.integers(),
       st.dictionaries(st.sampled_from([f"h{n}.db:5432" for n in range(31)]),
                       st.integers(0, 50)))
def test_choice_is_a_candidate_within_the_cap_when_one_is(
    strategy: Strategy, candidates: list[Host], max_lag: float | None, seed: int,
    connections: dict[str, int],
) -> None:
    choice = choose(strategy, candidates, ctx(seed, connections=connections), max_lag=max_lag)
    if not candidates:
        assert choice.host is None
        return
    assert choice.host in candidates
    assert choice.host is not None
    under = [h for h in candidates if h.lag is None or max_lag is None or h.lag <= max_lag]
    if under:
        assert choice.host in under
        assert not choice.over_cap
    else:
        assert choice.host.lag == min(h.lag for h in candidates if h.lag is not None)


@given(candidate_lists.filter(bool))
def test_round_robin_visits_every_candidate(candidates: list[Host]) -> None:
    hosts = [h.replace(weight=1.0) for h in candidates]
    c = ctx()
    picks = [RoundRobin().select(hosts, c) for _ in range(len(hosts))]
    assert set(picks) == set(hosts)


@given(st.lists(st.integers(1, 8), min_size=2, max_size=4), st.integers(0, 2**32))
def test_weighted_random_follows_weights(ws: list[int], seed: int) -> None:
    hosts = [r(f"h{i}", weight=w) for i, w in enumerate(ws)]
    c = ctx(seed)
    draws = 3000
    seen = Counter(WeightedRandom().select(hosts, c) for _ in range(draws))
    total = sum(ws)
    for host, w in zip(hosts, ws, strict=True):
        expected = draws * w / total
        # Generous: more than 5 standard deviations away would be a real bias.
        assert abs(seen[host] - expected) < 5 * (expected * (1 - w / total)) ** 0.5 + 5


def _over_cap_hosts(candidates: Sequence[Host], max_lag: float) -> set[Host]:
    return {h for h in candidates if h.lag is not None and h.lag > max_lag}


@given(candidate_lists, st.floats(0, 50))
def test_within_lag_partitions_the_candidates(candidates: list[Host], max_lag: float) -> None:
    eligible, skipped = within_lag(candidates, max_lag)
    assert sorted(eligible + skipped, key=lambda h: h.address) == sorted(
        candidates, key=lambda h: h.address)
    assert bool(eligible) == bool(candidates)
    if set(candidates) - _over_cap_hosts(candidates, max_lag):
        assert not set(eligible) & _over_cap_hosts(candidates, max_lag)
