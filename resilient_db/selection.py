"""Reader selection strategies, shared by failover and (later) read/write splitting.

Each strategy is a small frozen object with one method, ``select(candidates, ctx)``, that
returns one of ``candidates`` or ``None`` when there are none. Everything that varies between
calls is injected through one :class:`SelectionContext`: the random generator, the
round-robin cursor, open-connection counts, measured response times and the clock. So
strategies are pure given their context, and tests seed the generator.

The names are the AWS Advanced Python Wrapper's (``reader_host_selector_strategy``):
``random``, ``round_robin``, ``least_connections``, ``highest_weight``, ``weighted_random``,
``fastest_response``. :func:`strategy_from_name` turns a name into a strategy, and
:func:`configured` a name and the connection's settings into a strategy and its weights.
No strategy silently degrades to random: ``least_connections`` reads the process-wide open
connection counts (``resilient_db._open_counts``), the weighted strategies read the AWS
``*_host_weight_pairs`` properties (and refuse to run without them where equal weights would
make them random), and ``fastest_response`` reads the response times that the
``fastest_response_strategy`` plugin measures (``resilient_db.response_time``); without that
plugin selected it is refused with a ``ConfigurationError`` that names the fix.

Replica lag is handled once, outside the strategies, by :func:`within_lag` (and
:func:`choose`, which records the choice as a decision value).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Protocol

from ._decisions import Decision
from ._open_counts import open_counts
from ._params import (
    RESPONSE_MEASUREMENT_INTERVAL,
    ROUND_ROBIN_DEFAULT_WEIGHT,
    ROUND_ROBIN_HOST_WEIGHT_PAIRS,
    WEIGHTED_RANDOM_DEFAULT_WEIGHT,
    WEIGHTED_RANDOM_HOST_WEIGHT_PAIRS,
)
from ._properties import Settings
from .errors import ConfigurationError
from .hosts import Host

__all__ = [
    "MEASURING_PLUGIN",
    "STRATEGY_NAMES",
    "FastestResponse",
    "HighestWeight",
    "HostWeights",
    "LeastConnections",
    "Random",
    "ReaderChoice",
    "RoundRobin",
    "RoundRobinCursor",
    "SelectionContext",
    "Strategy",
    "WeightedRandom",
    "choose",
    "configured",
    "selection_context",
    "strategy_from_name",
    "within_lag",
]

#: The plugin that measures what ``fastest_response`` reads.
MEASURING_PLUGIN = "fastest_response_strategy"

_NO_COUNTS: Mapping[str, int] = MappingProxyType({})
_NO_TIMES: Mapping[str, tuple[float, float]] = MappingProxyType({})


class RoundRobinCursor:
    """Where a round robin stands: the last address chosen and how many turns it has had.
    Shared by every selection for one cluster (so it is mutable, and thread-safe)."""

    __slots__ = ("_last", "_lock", "_turns")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: str | None = None
        self._turns = 0

    def advance(self, candidates: Sequence[Host],
                weight: Callable[[Host], float] = lambda h: h.weight) -> Host:
        """The next host in address order after the last one chosen (wrapping round); a host
        of weight ``w`` (``weight(host)``) gets ``max(1, int(w))`` consecutive turns. Hosts
        that joined or left since the last call are simply in or out of the cycle."""
        ring = sorted(candidates, key=lambda h: h.address)
        with self._lock:
            current = next((h for h in ring if h.address == self._last), None)
            if current is not None and self._turns < max(1, int(weight(current))):
                self._turns += 1
                return current
            last = self._last
            chosen = ring[0] if last is None else next(
                (h for h in ring if h.address > last), ring[0]
            )
            self._last, self._turns = chosen.address, 1
            return chosen

    @property
    def last(self) -> str | None:
        """The address chosen last (``None``: nothing chosen yet)."""
        return self._last


@dataclass(frozen=True)
class HostWeights:
    """Selection weights from a ``<host>:<weight>`` list (the AWS wrapper's
    ``round_robin_host_weight_pairs`` / ``weighted_random_host_weight_pairs``). A pair names a
    host by its host name or by its instance id (case-insensitive); every host no pair names
    weighs ``default``."""

    pairs: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    default: int = 1

    @classmethod
    def of_pairs(cls, pairs: Sequence[tuple[str, int]], default: int) -> HostWeights:
        return cls(MappingProxyType({name.lower(): w for name, w in pairs}), default)

    def weight(self, host: Host) -> float:
        found = self.pairs.get(host.host.lower())
        if found is None and host.instance_id is not None:
            found = self.pairs.get(host.instance_id.lower())
        return float(self.default if found is None else found)


@dataclass(frozen=True)
class SelectionContext:
    """What a strategy may look at besides the candidates.

    ``rng``: the random generator (seed it in tests). ``now``: the injected clock (monotonic
    seconds). ``cursor``: the round-robin state (``None``: round robin is not in use).
    ``connections``: open application connections per address, process-wide (absent: 0).
    ``response_times``: per address, ``(seconds, measured_at)`` from the fastest-response
    monitor (absent: not measured). ``weights``: the configured weights (``None``: each
    host's own ``Host.weight``).
    """

    rng: random.Random = field(default_factory=random.Random)
    now: float = 0.0
    cursor: RoundRobinCursor | None = None
    connections: Mapping[str, int] = field(default_factory=lambda: _NO_COUNTS)
    response_times: Mapping[str, tuple[float, float]] = field(default_factory=lambda: _NO_TIMES)
    weights: HostWeights | None = None

    def weight(self, host: Host) -> float:
        """``host``'s selection weight."""
        return host.weight if self.weights is None else self.weights.weight(host)


class Strategy(Protocol):
    """A reader selection strategy."""

    name: ClassVar[str]

    def select(self, candidates: Sequence[Host], ctx: SelectionContext) -> Host | None:
        """One of ``candidates``; ``None`` only when ``candidates`` is empty."""
        ...


def _pick(ties: Sequence[Host], ctx: SelectionContext) -> Host:
    # Ties are broken at random so that equal hosts share the load.
    return ties[0] if len(ties) == 1 else ctx.rng.choice(list(ties))


def _best(candidates: Sequence[Host], score: Callable[[Host], float], ctx: SelectionContext,
          ) -> Host | None:
    """The candidate with the lowest score (ties at random)."""
    if not candidates:
        return None
    low = min(score(h) for h in candidates)
    return _pick([h for h in candidates if score(h) == low], ctx)


@dataclass(frozen=True)
class Random:
    """Uniformly at random."""

    name: ClassVar[str] = "random"

    def select(self, candidates: Sequence[Host], ctx: SelectionContext) -> Host | None:
        return ctx.rng.choice(list(candidates)) if candidates else None


@dataclass(frozen=True)
class RoundRobin:
    """In turn, in address order, through ``ctx.cursor`` (required); weights give
    consecutive turns (see :meth:`RoundRobinCursor.advance`)."""

    name: ClassVar[str] = "round_robin"

    def select(self, candidates: Sequence[Host], ctx: SelectionContext) -> Host | None:
        if not candidates:
            return None
        if ctx.cursor is None:
            raise ValueError("round_robin needs a RoundRobinCursor in SelectionContext.cursor")
        return ctx.cursor.advance(candidates, ctx.weight)


@dataclass(frozen=True)
class LeastConnections:
    """The host with the fewest open connections (``ctx.connections``)."""

    name: ClassVar[str] = "least_connections"

    def select(self, candidates: Sequence[Host], ctx: SelectionContext) -> Host | None:
        return _best(candidates, lambda h: ctx.connections.get(h.address, 0), ctx)


@dataclass(frozen=True)
class HighestWeight:
    """The host with the highest weight (``ctx.weight``; ties at random)."""

    name: ClassVar[str] = "highest_weight"

    def select(self, candidates: Sequence[Host], ctx: SelectionContext) -> Host | None:
        return _best(candidates, lambda h: -ctx.weight(h), ctx)


@dataclass(frozen=True)
class WeightedRandom:
    """At random, in proportion to weight; uniformly when every weight is 0."""

    name: ClassVar[str] = "weighted_random"

    def select(self, candidates: Sequence[Host], ctx: SelectionContext) -> Host | None:
        if not candidates:
            return None
        weights = [ctx.weight(h) for h in candidates]
        if sum(weights) <= 0:
            return ctx.rng.choice(list(candidates))
        return ctx.rng.choices(list(candidates), weights=weights)[0]


@dataclass(frozen=True)
class FastestResponse:
    """The host with the lowest measured response time. Measurements older than
    ``max_age`` seconds (at ``ctx.now``) are ignored; a host without a usable measurement
    comes after every measured one; when no host has one, the choice is random."""

    max_age: float = 90.0
    name: ClassVar[str] = "fastest_response"

    def usable(self, candidates: Sequence[Host], ctx: SelectionContext) -> dict[str, float]:
        """``address -> seconds`` of the candidates with a measurement younger than
        ``max_age``."""
        usable: dict[str, float] = {}
        for host in candidates:
            measured = ctx.response_times.get(host.address)
            if measured is not None and ctx.now - measured[1] <= self.max_age:
                usable[host.address] = measured[0]
        return usable

    def select(self, candidates: Sequence[Host], ctx: SelectionContext) -> Host | None:
        usable = self.usable(candidates, ctx)
        return _best(candidates, lambda h: usable.get(h.address, float("inf")), ctx)


_STRATEGIES: dict[str, Callable[[], Strategy]] = {
    cls.name: cls
    for cls in (Random, RoundRobin, LeastConnections, HighestWeight, WeightedRandom,
                FastestResponse)
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_STRATEGIES)


def strategy_from_name(name: str, *, parameter: str = "reader_host_selector_strategy",
                       measured: bool = False) -> Strategy:
    """The strategy called ``name`` (case-insensitive, ``-`` or ``_``); a
    ``ConfigurationError`` naming ``parameter`` and the valid names otherwise.

    ``measured``: whether response times are measured for this connection (the
    ``fastest_response_strategy`` plugin is selected); ``fastest_response`` is refused
    without it, since with no measurements it would be random in disguise."""
    key = name.strip().lower().replace("-", "_")
    if key == FastestResponse.name and not measured:
        raise ConfigurationError(
            f"{parameter}: strategy 'fastest_response' reads response times that the "
            f"{MEASURING_PLUGIN} plugin measures, and that plugin is not selected: add "
            f"{MEASURING_PLUGIN} to plugins (e.g. plugins=\"failover,efm,{MEASURING_PLUGIN}\"; "
            "it costs one extra server connection per instance), or use another strategy",
            parameter=parameter,
            value=name,
        )
    factory = _STRATEGIES.get(key)
    if factory is None:
        raise ConfigurationError(
            f"{parameter}: unknown strategy {name!r}; expected one of "
            f"{', '.join(STRATEGY_NAMES)}",
            parameter=parameter,
            value=name,
        )
    return factory()


#: Strategies whose weights come from ``weighted_random_host_weight_pairs``: without the pairs
#: every host weighs the same and the choice would be random in disguise. (AWS's own
#: highest_weight reads a host weight its topology sets to one value for every instance; it
#: has no weight property of its own, so it shares weighted_random's.)
_NEEDS_PAIRS = frozenset({WeightedRandom.name, HighestWeight.name})


def configured(name: str, settings: Settings, *, parameter: str,
               plugins: Collection[str] = ()) -> tuple[Strategy, HostWeights | None]:
    """The strategy ``name`` and the weights it reads from ``settings``; a
    ``ConfigurationError`` naming ``parameter`` for an unknown name, for ``fastest_response``
    without its plugin in ``plugins`` (the codes selected for the connection,
    ``PluginContext.plugins``) and for a weighted strategy without weights.

    ``round_robin``: ``round_robin_host_weight_pairs`` / ``round_robin_default_weight``
    (consecutive turns). ``weighted_random`` and ``highest_weight``:
    ``weighted_random_host_weight_pairs`` / ``weighted_random_default_weight``.
    ``fastest_response``: measurements older than three ``response_measurement_interval_ms``
    are ignored (a working monitor publishes one per interval, each bounded by the
    interval)."""
    strategy = strategy_from_name(name, parameter=parameter,
                                  measured=MEASURING_PLUGIN in plugins)
    if strategy.name == FastestResponse.name:
        interval: float = settings[RESPONSE_MEASUREMENT_INTERVAL] or 30.0
        return FastestResponse(max_age=3 * interval), None
    if strategy.name == RoundRobin.name:
        rr_pairs: tuple[tuple[str, int], ...] = settings[ROUND_ROBIN_HOST_WEIGHT_PAIRS]
        return strategy, HostWeights.of_pairs(rr_pairs, settings[ROUND_ROBIN_DEFAULT_WEIGHT] or 1)
    if strategy.name in _NEEDS_PAIRS:
        pairs: tuple[tuple[str, int], ...] = settings[WEIGHTED_RANDOM_HOST_WEIGHT_PAIRS]
        if not pairs:
            pairs_name = WEIGHTED_RANDOM_HOST_WEIGHT_PAIRS.name
            raise ConfigurationError(
                f"{parameter}: strategy {strategy.name!r} needs weights: set {pairs_name} "
                "('<host>:<weight>,...', e.g. 'instance-1:3,instance-2:1'); without them "
                "every reader weighs the same and the choice would be plain random (use "
                "'random' for that)",
                parameter=parameter,
                value=name,
            )
        return strategy, HostWeights.of_pairs(pairs, settings[WEIGHTED_RANDOM_DEFAULT_WEIGHT] or 1)
    return strategy, None


# --- replica lag and the recorded choice -------------------------------------------------


def within_lag(candidates: Sequence[Host], max_lag: float | None,
               ) -> tuple[tuple[Host, ...], tuple[Host, ...]]:
    """Split ``candidates`` into (eligible, skipped) by the replica lag cap ``max_lag``
    (seconds; ``None``: no cap).

    A host whose lag is unknown (``None``) counts as within the cap: Aurora does not report the
    writer's lag and Multi-AZ reports none, and excluding them would exclude everything.
    When *no* host is within the cap, the least-lagged hosts are eligible (all hosts sharing
    the lowest lag) rather than none: a slightly stale reader beats failing the
    connection, and choosing the least stale keeps the cap's intent.
    """
    if max_lag is None or not candidates:
        return tuple(candidates), ()
    under = tuple(h for h in candidates if h.lag is None or h.lag <= max_lag)
    if not under:
        low = min(h.lag for h in candidates if h.lag is not None)
        under = tuple(h for h in candidates if h.lag == low)
    eligible = {h.address for h in under}
    return under, tuple(h for h in candidates if h.address not in eligible)


@dataclass(frozen=True)
class ReaderChoice:
    """One reader selection, for telemetry. ``host`` ``None``: no candidate. ``skipped`` are
    the addresses left out for lag; ``over_cap`` says every candidate was over the cap and the
    least-lagged was taken anyway. ``response_time``: with ``fastest_response``, the chosen
    host's measured response time in seconds (``None``: not measured, or another
    strategy); ``measured``: how many candidates had a usable measurement."""

    host: Host | None
    strategy: str
    candidates: int
    skipped: tuple[str, ...] = ()
    over_cap: bool = False
    response_time: float | None = None
    measured: int | None = None

    def to_decision(self) -> Decision:
        attributes: dict[str, object] = {
            "resilient_db.selection.strategy": self.strategy,
            "resilient_db.selection.candidates": self.candidates,
            "resilient_db.selection.skipped_for_lag": self.skipped,
            "resilient_db.selection.over_lag_cap": self.over_cap,
        }
        if self.measured is not None:
            attributes["resilient_db.selection.measured"] = self.measured
            if self.response_time is not None:
                attributes["resilient_db.selection.response_time"] = self.response_time
        if self.host is not None:
            attributes["server.address"] = self.host.host
            if self.host.port is not None:
                attributes["server.port"] = self.host.port
            if self.host.instance_id is not None:
                attributes["resilient_db.instance.id"] = self.host.instance_id
        return Decision("reader.selected", None, MappingProxyType(attributes))


def choose(strategy: Strategy, candidates: Sequence[Host], ctx: SelectionContext, *,
           max_lag: float | None = None) -> ReaderChoice:
    """Apply the lag cap (:func:`within_lag`), then ``strategy``."""
    eligible, skipped = within_lag(candidates, max_lag)
    over_cap = bool(eligible) and max_lag is not None and all(
        h.lag is not None and h.lag > max_lag for h in eligible
    )
    host = strategy.select(eligible, ctx)
    response_time: float | None = None
    measured: int | None = None
    if isinstance(strategy, FastestResponse):
        usable = strategy.usable(eligible, ctx)
        measured = len(usable)
        if host is not None:
            response_time = usable.get(host.address)
    return ReaderChoice(
        host,
        strategy.name,
        len(candidates),
        tuple(h.address for h in skipped),
        over_cap,
        response_time,
        measured,
    )


def selection_context(*, rng: random.Random, cursor: RoundRobinCursor | None,
                      weights: HostWeights | None, now: float,
                      response_times: Mapping[str, tuple[float, float]] = _NO_TIMES,
                      ) -> SelectionContext:
    """The context of one reader choice made by the library (failover, initial_connection,
    read_write_splitting): the one place that gathers the process-wide inputs (open
    connection counts; the response times ``response_time.selection_times`` measured, which
    the caller passes), so every strategy sees the same ones wherever it is used."""
    return SelectionContext(rng=rng, now=now, cursor=cursor, connections=open_counts(),
                            response_times=response_times, weights=weights)
