"""The failover decision core (DESIGN §3). Pure: no I/O, no threads, no database.

The topology monitor and the failover plugin do the I/O and ask this module what to do:

- which mode applies: :class:`FailoverMode`, :func:`default_mode`;
- which instance is the writer, from each instance's *own* answer: :func:`elect_writer`
  (and which instances to probe: :func:`probe_targets`);
- which hosts to try, in which order: :func:`plan_attempts`;
- when to try again and when to give up: :class:`RetrySchedule`, :class:`RetryState`;
- which error the application sees: :func:`classify_outcome`;
- whether a read-only error means failover: :func:`read_only_triggers_failover`.

Clocks (monotonic seconds) and randomness are arguments. Every decision is a frozen value
with ``to_decision()`` giving the :class:`~resilient_db._decisions.Decision` that telemetry
records (``server.address``/``server.port``/``error.type`` where OpenTelemetry has a name,
``resilient_db.*`` otherwise).
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tenacity import RetryCallState, Retrying
from tenacity.wait import wait_exponential

from ._decisions import Decision
from .errors import (
    ConfigurationError,
    FailoverError,
    FailoverFailedError,
    FailoverSuccessError,
    TransactionResolutionUnknownError,
)
from .hosts import Availability, BadHostMemory, Host, Role, TopologySnapshot
from .rds import EndpointKind
from .selection import ReaderChoice, SelectionContext, Strategy, choose

__all__ = [
    "Attempt",
    "Election",
    "FailoverMode",
    "FailoverPlan",
    "Outcome",
    "ReadOnlyVerdict",
    "RetrySchedule",
    "RetryState",
    "RetryStep",
    "SelfReport",
    "classify_outcome",
    "default_mode",
    "elect_writer",
    "plan_attempts",
    "probe_targets",
    "read_only_triggers_failover",
]

_PLUGIN = "failover"


def _server(host: Host | None) -> dict[str, Any]:
    if host is None:
        return {}
    attributes: dict[str, Any] = {"server.address": host.host}
    if host.port is not None:
        attributes["server.port"] = host.port
    if host.instance_id is not None:
        attributes["resilient_db.instance.id"] = host.instance_id
    return attributes


# --- modes ---------------------------------------------------------------------------------


class FailoverMode(enum.Enum):
    """Which role failover connects to (AWS ``failover_mode`` values)."""

    STRICT_WRITER = "strict-writer"  # the (new) writer only
    STRICT_READER = "strict-reader"  # a reader; the writer only in a single-instance cluster
    READER_OR_WRITER = "reader-or-writer"  # a reader, else the writer

    @classmethod
    def parse(cls, text: str) -> FailoverMode:
        """A mode from its name (case-insensitive, ``_`` or ``-``); ``ConfigurationError``
        naming ``failover_mode`` otherwise."""
        key = text.strip().lower().replace("_", "-")
        for mode in cls:
            if mode.value == key:
                return mode
        raise ConfigurationError(
            f"failover_mode: unknown mode {text!r}; expected one of "
            f"{', '.join(m.value for m in cls)}",
            parameter="failover_mode",
            value=text,
        )


def default_mode(kind: EndpointKind) -> FailoverMode:
    """The mode when ``failover_mode`` is not set: a reader endpoint fails over like the reader
    endpoint itself would (reader, else writer); every other name follows the writer."""
    if kind is EndpointKind.CLUSTER_READER:
        return FailoverMode.READER_OR_WRITER
    return FailoverMode.STRICT_WRITER


# --- writer election -----------------------------------------------------------------------


@dataclass(frozen=True)
class SelfReport:
    """What one instance said about itself when probed.

    ``host`` is the address probed; ``reported_at`` the prober's clock when it answered.
    ``instance_id`` and ``is_reader`` are the instance's own answers to "who are you" and "are
    you a reader" (``None``: no answer). ``topology`` is the topology it reported (``None``:
    not read). ``error`` is why the probe failed (``None``: it answered).
    """

    host: Host
    reported_at: float
    instance_id: str | None = None
    is_reader: bool | None = None
    topology: TopologySnapshot | None = None
    error: str | None = None

    @property
    def who(self) -> str:
        return self.instance_id or self.host.address


def probe_targets(known: TopologySnapshot | None, reports: Iterable[SelfReport] = (),
                  extra: Iterable[Host] = ()) -> tuple[Host, ...]:
    """Every host to probe in the high-rate mode: the last known topology's, any host named
    by a topology some instance reported (readers' views are good enough to *discover* a new
    instance, never to elect one), and ``extra`` (e.g. the cluster endpoint). One per address,
    in order of first appearance."""
    seen: dict[str, Host] = {}
    sources: list[Iterable[Host]] = [known.hosts if known else (), extra]
    sources += [r.topology.hosts for r in reports if r.topology is not None]
    for source in sources:
        for host in source:
            seen.setdefault(host.address, host)
    return tuple(seen.values())


_OLDEST = datetime.min.replace(tzinfo=timezone.utc)


def _own_update(report: SelfReport) -> datetime:
    row = report.topology.by_instance(report.instance_id) if (
        report.topology is not None and report.instance_id) else None
    ts = row.last_update if row is not None else None
    if ts is None:
        return _OLDEST
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Election:
    """The verdict of :func:`elect_writer`. ``writer`` ``None``: no verified writer yet (keep
    probing). ``claimants`` are the instance ids that claimed to be the writer; ``rejected``
    lists ``(instance id or address, reason)`` for every report that did not win."""

    writer: SelfReport | None
    claimants: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()

    @property
    def writer_host(self) -> Host | None:
        """The writer, with its own instance id and the writer role. Its address is the one
        its own topology gives it (an instance address, not a cluster endpoint whose DNS may
        still flip), else the address it was probed at."""
        if self.writer is None:
            return None
        own = self.writer.topology
        listed = own.by_instance(self.writer.instance_id or "") if own is not None else None
        base = listed if listed is not None else self.writer.host
        return base.replace(instance_id=self.writer.instance_id, role=Role.WRITER)

    @property
    def topology(self) -> TopologySnapshot | None:
        """The topology the writer itself reported: first-hand, so it is the one to publish."""
        return self.writer.topology if self.writer is not None else None

    def to_decision(self) -> Decision:
        return Decision("failover.writer_election", _PLUGIN, {
            **_server(self.writer_host),
            "resilient_db.failover.writer_verified": self.writer is not None,
            "resilient_db.failover.claimants": self.claimants,
            "resilient_db.failover.rejected": tuple(f"{w}: {why}" for w, why in self.rejected),
        })


def elect_writer(reports: Iterable[SelfReport]) -> Election:
    """Decide the verified writer from each instance's own report.

    An instance is a candidate only if it answered, said it is not a reader, gave its own
    instance id, and the topology it reported (if any) does not name another writer. What a
    reader says about who the writer is is never evidence: right after a failover readers
    still show the old writer. When several instances claim the role (an old writer not yet
    demoted), the claim whose own topology row was updated most recently wins (the newest
    promotion), then the most recent report, then the smallest id (so the verdict is
    deterministic).
    """
    claims: list[SelfReport] = []
    rejected: list[tuple[str, str]] = []
    for report in reports:
        named = report.topology.writer if report.topology is not None else None
        if report.error is not None:
            rejected.append((report.who, f"probe failed: {report.error}"))
        elif report.is_reader is None:
            rejected.append((report.who, "did not say whether it is a reader"))
        elif report.is_reader:
            rejected.append((report.who, "is a reader"))
        elif not report.instance_id:
            rejected.append((report.who, "did not give its instance id"))
        elif named is not None and named.instance_id != report.instance_id:
            rejected.append((report.who, f"its own topology names {named.instance_id} writer"))
        else:
            claims.append(report)
    if not claims:
        return Election(None, (), tuple(rejected))
    claimants = tuple(sorted({c.who for c in claims}))
    # Two reports of one instance at the same moment (probed twice) tie on all of the above:
    # the one that carries more of the topology wins, then a stable text order, so the verdict
    # never depends on the order reports arrive in.
    winner = max(claims, key=lambda c: (
        _own_update(c), c.reported_at, _desc(c.who),
        len(c.topology.hosts) if c.topology is not None else -1, _desc(repr(c.topology))))
    for claim in claims:
        if claim.who != winner.who:
            rejected.append((claim.who, f"superseded by the newer claim of {winner.who}"))
    return Election(winner, claimants, tuple(rejected))


def _desc(text: str) -> tuple[int, ...]:
    # Sorts smaller strings higher, so max() prefers the smallest id on a full tie.
    return (*(-ord(ch) for ch in text), 0)


# --- failover planning ---------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One host to try. ``required`` is the role the new connection must be verified to have
    (``None``: any role). ``reason`` says why the host is in the plan: ``writer``,
    ``reader``, ``writer-last-resort``, ``cooling`` (only cooling or down hosts were left) or
    ``single-instance`` (strict_reader on a cluster without readers)."""

    host: Host
    required: Role | None
    reason: str


@dataclass(frozen=True)
class FailoverPlan:
    """The ordered attempts of one failover round. Empty: nothing to try yet (no writer known
    in writer mode, or an empty topology); wait for the monitor. ``skipped`` are addresses
    left out because they are cooling or down; ``choice`` records how the first reader was
    picked (``None`` in writer mode); ``excluded`` are addresses a plugin's host list left out
    (not allowed to serve this connection: ``custom_endpoint`` non-members)."""

    mode: FailoverMode
    attempts: tuple[Attempt, ...]
    epoch: int = 0
    skipped: tuple[str, ...] = ()
    choice: ReaderChoice | None = None
    excluded: tuple[str, ...] = ()

    def to_decision(self) -> Decision:
        first = self.attempts[0].host if self.attempts else None
        return Decision("failover.plan", _PLUGIN, {
            **_server(first),
            "resilient_db.failover.mode": self.mode.value,
            "resilient_db.topology.epoch": self.epoch,
            "resilient_db.failover.attempts": tuple(str(a.host) for a in self.attempts),
            "resilient_db.failover.reasons": tuple(a.reason for a in self.attempts),
            "resilient_db.failover.skipped": self.skipped,
            "resilient_db.failover.excluded": self.excluded,
        })


def _ordered_readers(readers: Sequence[Host], strategy: Strategy, ctx: SelectionContext,
                     max_lag: float | None) -> tuple[list[Host], ReaderChoice]:
    """First the strategy's choice (lag cap applied), then the rest: within the cap before
    over it, least lag first, then by address (deterministic fallbacks)."""
    choice = choose(strategy, readers, ctx, max_lag=max_lag)
    skipped = set(choice.skipped)
    rest = sorted(
        (h for h in readers if choice.host is None or h.address != choice.host.address),
        key=lambda h: (h.address in skipped, h.lag or 0.0, h.address),
    )
    return ([choice.host] if choice.host is not None else []) + rest, choice


def plan_attempts(
    mode: FailoverMode,
    topology: TopologySnapshot,
    bad_hosts: BadHostMemory,
    now: float,
    strategy: Strategy,
    ctx: SelectionContext,
    *,
    max_lag: float | None = None,
) -> FailoverPlan:
    """Order the hosts to try in one failover round.

    - strict_writer: the writer only. It is tried even when cooling: a verified writer's own
      report is newer than whatever marked it down.
    - strict_reader: the readers, the strategy's choice first (see :func:`_ordered_readers`);
      the writer only if the cluster has no reader at all (a single-instance cluster).
    - reader_or_writer: the readers, then the writer as the last resort.

    Cooling (``bad_hosts``) and ``DOWN`` hosts are left out unless nothing else is left; then
    they are the plan, soonest to recover first. Mark the failed host down before planning.
    """
    writer = topology.writer
    epoch = topology.epoch
    if mode is FailoverMode.STRICT_WRITER:
        attempts = (Attempt(writer, Role.WRITER, "writer"),) if writer is not None else ()
        return FailoverPlan(mode, attempts, epoch)
    readers = topology.readers
    if not readers and mode is FailoverMode.STRICT_READER:
        attempts = (Attempt(writer, None, "single-instance"),) if writer is not None else ()
        return FailoverPlan(mode, attempts, epoch)

    required = Role.READER if mode is FailoverMode.STRICT_READER else None

    def usable(host: Host) -> bool:
        return host.availability is Availability.UP and not bad_hosts.is_cooling(host, now)

    ordered, choice = _ordered_readers([h for h in readers if usable(h)], strategy, ctx,
                                       max_lag)
    plan = [Attempt(h, required, "reader") for h in ordered]
    last_resort = mode is FailoverMode.READER_OR_WRITER and writer is not None
    if last_resort and writer is not None and usable(writer):
        plan.append(Attempt(writer, None, "writer-last-resort"))
    resting = [h for h in readers if not usable(h)]
    if last_resort and writer is not None and not usable(writer):
        resting.append(writer)
    if not plan:
        resting.sort(key=lambda h: (bad_hosts.remaining(h, now), h.address))
        plan = [Attempt(h, required, "cooling") for h in resting]
        return FailoverPlan(mode, tuple(plan), epoch, (), choice)
    return FailoverPlan(mode, tuple(plan), epoch, tuple(h.address for h in resting), choice)


# --- retry schedule ------------------------------------------------------------------------


def _default_wait() -> Callable[[RetryCallState], float]:
    return wait_exponential(multiplier=0.1, max=2.0)


@dataclass(frozen=True)
class RetrySchedule:
    """How failover rounds are paced: ``wait`` is a tenacity wait strategy (anything called
    with a ``RetryCallState``; default 0.1 s doubling up to 2 s), ``timeout`` the total budget
    in seconds (``None``: no limit; 0: one round, no retry), ``jitter`` a fraction: each delay
    is scaled by a factor drawn uniformly from ``[1 - jitter, 1 + jitter]`` (0: none)."""

    timeout: float | None = 300.0
    wait: Callable[[RetryCallState], float] = field(default_factory=_default_wait)
    jitter: float = 0.0

    @classmethod
    def for_failover(cls, timeout: float | None, interval: float, jitter: float = 0.1,
                     ) -> RetrySchedule:
        """The schedule from the failover properties: exponential from 0.1 s up to
        ``interval`` (``failover_writer_reconnect_interval_sec``), within ``timeout``
        (``failover_timeout_sec``)."""
        return cls(timeout, wait_exponential(multiplier=min(0.1, interval), max=interval),
                   jitter)

    def start(self, now: float) -> RetryState:
        return RetryState(self, now)


@dataclass(frozen=True)
class RetryStep:
    """The next action: ``retry`` after sleeping ``delay`` seconds, or give up (``retry``
    false, ``delay`` 0). ``rounds`` is how many rounds were done; ``remaining`` the budget
    left in seconds (``None``: no limit)."""

    retry: bool
    delay: float
    rounds: int
    remaining: float | None

    def to_decision(self) -> Decision:
        return Decision("failover.retry" if self.retry else "failover.gave_up", _PLUGIN, {
            "resilient_db.failover.rounds": self.rounds,
            "resilient_db.failover.delay": self.delay,
            "resilient_db.failover.remaining": -1.0 if self.remaining is None else self.remaining,
        })


@dataclass(frozen=True)
class RetryState:
    """Where a failover stands, urllib3-``Retry`` style: immutable, :meth:`increment` returns
    the next state with one more ``(finished_at, outcome)`` in ``history``."""

    schedule: RetrySchedule
    started_at: float
    history: tuple[tuple[float, str], ...] = ()

    @property
    def deadline(self) -> float | None:
        """When the budget ends (``None``: never)."""
        timeout = self.schedule.timeout
        return None if timeout is None else self.started_at + timeout

    def remaining(self, now: float) -> float | None:
        deadline = self.deadline
        return None if deadline is None else max(0.0, deadline - now)

    def increment(self, now: float, outcome: str) -> RetryState:
        return dataclasses.replace(self, history=(*self.history, (now, outcome)))

    def next_step(self, now: float, rng: random.Random | None = None) -> RetryStep:
        """Retry or give up at ``now``; the delay never runs past the deadline. ``rng`` is
        needed only when the schedule has jitter."""
        rounds = len(self.history)
        remaining = self.remaining(now)
        if remaining is not None and remaining <= 0:
            return RetryStep(False, 0.0, rounds, 0.0)
        state = RetryCallState(Retrying(), None, (), {})
        state.attempt_number = max(1, rounds)
        state.start_time = self.started_at
        state.outcome_timestamp = now
        delay = max(0.0, float(self.schedule.wait(state)))
        if self.schedule.jitter:
            if rng is None:
                raise ValueError("a schedule with jitter needs an injected random.Random")
            delay *= rng.uniform(1 - self.schedule.jitter, 1 + self.schedule.jitter)
        if remaining is not None:
            delay = min(delay, remaining)
        return RetryStep(True, delay, rounds, remaining)


# --- outcomes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """Which error the application sees after a failover, and why. ``retry_safe``: the
    interrupted statement may be re-run transparently (no transaction was open, and it was
    not sent or is marked idempotent)."""

    error: type[FailoverError]
    reconnected: bool
    in_transaction: bool
    statement_sent: bool
    idempotent: bool = False

    @property
    def retry_safe(self) -> bool:
        return self.error is FailoverSuccessError and (not self.statement_sent or self.idempotent)

    def to_decision(self) -> Decision:
        return Decision("failover.outcome", _PLUGIN, {
            "error.type": self.error.__name__,
            "resilient_db.failover.reconnected": self.reconnected,
            "resilient_db.failover.in_transaction": self.in_transaction,
            "resilient_db.failover.statement_sent": self.statement_sent,
            "resilient_db.failover.retry_safe": self.retry_safe,
        })


def classify_outcome(*, in_transaction: bool, statement_sent: bool, reconnected: bool,
                     idempotent: bool = False) -> Outcome:
    """No new connection: ``FailoverFailedError``. A new connection while a transaction was
    open: ``TransactionResolutionUnknownError`` (its commit may or may not have happened).
    Otherwise ``FailoverSuccessError`` (the statement may have run if it was sent)."""
    error: type[FailoverError]
    if not reconnected:
        error = FailoverFailedError
    elif in_transaction:
        error = TransactionResolutionUnknownError
    else:
        error = FailoverSuccessError
    return Outcome(error, reconnected, in_transaction, statement_sent, idempotent)


@dataclass(frozen=True)
class ReadOnlyVerdict:
    """Whether a read-only error (PostgreSQL 25006; MySQL 1290, 1792, 1836) starts a failover."""

    failover: bool
    reason: str

    def to_decision(self) -> Decision:
        return Decision("failover.read_only_error", _PLUGIN, {
            "resilient_db.failover.triggered": self.failover,
            "resilient_db.failover.reason": self.reason,
        })


def read_only_triggers_failover(mode: FailoverMode, role: Role) -> ReadOnlyVerdict:
    """Only in writer mode, and only once a role check (or the topology) says the instance is
    no longer the writer (``role`` READER). On a confirmed writer the error is the
    application's own (``BEGIN READ ONLY``, ``--secure-file-priv``); an unknown role is not
    enough: check it first."""
    if mode is not FailoverMode.STRICT_WRITER:
        return ReadOnlyVerdict(False, f"{mode.value} accepts a read-only instance")
    if role is Role.READER:
        return ReadOnlyVerdict(True, "the instance is no longer the writer")
    if role is Role.WRITER:
        return ReadOnlyVerdict(False, "the instance is still the writer: the error is the "
                                      "application's own")
    return ReadOnlyVerdict(False, "role not confirmed; check the role before failing over")
