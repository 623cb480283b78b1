"""``initial_connection``: a new connection through a cluster (writer) endpoint lands on the
writer, one through a reader endpoint on a reader, whatever DNS says at that moment.

What it intercepts: the connect phase, for the application's own (initial) connections only;
it is dormant (costs nothing, not even on connect) when no role is wanted (an instance endpoint,
an IP address or a custom domain with ``verify_opened_connection_type`` unset).

One connect is a series of rounds within ``open_connection_retry_timeout_ms``, paused by
``open_connection_retry_interval_ms``. Each round:

1. When a topology monitor already serves this endpoint in the process (another connection's
   ``failover`` plugin started it), the instance is chosen from its topology without asking
   DNS: the verified writer, or a reader picked with
   ``initial_connection_host_selector_strategy`` (the cluster's shared round-robin cursor and
   random generator; ``max_replica_lag`` respected), then the other readers, the writer last.
2. Otherwise (or when none of those worked) through the endpoint, as DNS resolves it now;
   when that fails too, through the cluster's other endpoint (the reader endpoint for a
   cluster endpoint and vice versa), only to learn the topology from whatever it reaches.
   Only instances the connection's host list allows are chosen (``custom_endpoint``: the
   endpoint's members).
3. Every connection is verified: the instance says who it is and whether it is a reader (two
   short internal statements). Wrong role: the topology that instance reports (read only
   then) names the instances to try next (a demoted writer follows
   the new writer, so its view names it; whatever it names is verified in turn).
4. A reader was wanted and none could be reached: the writer (first-hand verified) is used.

When the window ends without a connection of the wanted role, ``connect`` raises
``FailoverFailedError`` (also the driver's ``OperationalError``) listing every attempt,
chained from the last driver error. Configuration and dialect errors are raised at once.

Each outcome is a decision: ``initial_connection.verified`` (DNS led to the right role),
``initial_connection.redirected`` (another instance was used), ``initial_connection.
writer_fallback``, ``initial_connection.retry``, ``initial_connection.gave_up``.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from .. import response_time
from .._decisions import get_decision_sink
from .._open_counts import note_opened
from .._params import (
    INITIAL_CONNECTION_HOST_SELECTOR_STRATEGY,
    MAX_REPLICA_LAG,
    OPEN_CONNECTION_RETRY_INTERVAL,
    OPEN_CONNECTION_RETRY_TIMEOUT,
    READER_INITIAL_CONNECTION_HOST_SELECTOR_STRATEGY,
    VERIFY_OPENED_CONNECTION_TYPE,
)
from .._pipeline import ConnectContext, ConnectHandler, HostSpec, Plugin, PluginContext
from ..dialects.base import DatabaseDialect
from ..errors import ConnectAttempt, Error, FailoverFailedError
from ..hosts import Host, Role, TopologySnapshot, allowed_only
from ..rds import EndpointKind, classify
from ..rds import reader_endpoint as rds_reader_endpoint
from ..rds import writer_endpoint as rds_writer_endpoint
from ..selection import (
    ReaderChoice,
    SelectionContext,
    Strategy,
    choose,
    configured,
    selection_context,
)
from ..topology import TopologyMonitor
from . import _cluster_connect as cc

__all__ = ["InitialConnectionPlugin", "candidates", "wanted_role"]

log = logging.getLogger("resilient_db.plugins.initial_connection")

_WRITER_KINDS = frozenset({EndpointKind.CLUSTER_WRITER, EndpointKind.GLOBAL_WRITER})


def wanted_role(kind: EndpointKind, verify: str | None) -> Role | None:
    """The role a new connection must have. Pure. ``verify`` is
    ``verify_opened_connection_type`` (``None``: by endpoint kind); ``None`` result: no check."""
    if verify == "writer":
        return Role.WRITER
    if verify == "reader":
        return Role.READER
    if verify == "none":
        return None
    if kind in _WRITER_KINDS:
        return Role.WRITER
    if kind is EndpointKind.CLUSTER_READER:
        return Role.READER
    return None


def candidates(wanted: Role, snapshot: TopologySnapshot | None, strategy: Strategy,
               ctx: SelectionContext, *, max_lag: float | None = None,
               exclude: frozenset[str] = frozenset(),
               cooling: frozenset[str] = frozenset(),
               ) -> tuple[tuple[Host, ...], ReaderChoice | None]:
    """The instances to try, in order, for a connection of the ``wanted`` role, and how the
    first reader was chosen (``None`` for a writer). Pure (given ``ctx``).

    Writer: the topology's writer. Reader: the strategy's choice among the readers not
    cooling (``max_lag`` applied), then the other readers (cooling ones last, then by address),
    then the writer as the last resort. ``exclude``: addresses already tried."""
    if snapshot is None:
        return (), None
    writer = snapshot.writer
    if wanted is Role.WRITER:
        usable = writer is not None and writer.address not in exclude
        return ((writer,) if usable and writer is not None else ()), None
    readers = [h for h in snapshot.readers if h.address not in exclude]
    fresh = [h for h in readers if h.address not in cooling]
    choice = choose(strategy, fresh, ctx, max_lag=max_lag)
    first = [choice.host] if choice.host is not None else []
    rest = sorted((h for h in readers if not first or h.address != first[0].address),
                  key=lambda h: (h.address in cooling, h.address))
    ordered = first + rest
    if writer is not None and writer.address not in exclude:
        ordered.append(writer)
    return tuple(ordered), choice


class InitialConnectionPlugin(Plugin):
    """See the module docstring. ``wanted``: the role new connections must have (``None``:
    dormant); ``window``/``interval``: seconds (``window`` ``None``: no limit)."""

    code = "initial_connection"
    single_host = True  # finds the cluster's instances itself

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        prop = INITIAL_CONNECTION_HOST_SELECTOR_STRATEGY
        name = settings[prop]
        if not settings.explicit(prop) and settings[
                READER_INITIAL_CONNECTION_HOST_SELECTOR_STRATEGY] is not None:
            prop = READER_INITIAL_CONNECTION_HOST_SELECTOR_STRATEGY
            name = settings[prop]
        self.strategy, self.weights = configured(name or "random", settings,
                                                 parameter=prop.name, plugins=ctx.plugins)
        self.endpoint = classify(ctx.host.host)
        self.wanted = wanted_role(self.endpoint.kind, settings[VERIFY_OPENED_CONNECTION_TYPE])
        self.window = settings[OPEN_CONNECTION_RETRY_TIMEOUT]
        self.interval: float = settings[OPEN_CONNECTION_RETRY_INTERVAL] or 1.0
        self.max_lag = settings[MAX_REPLICA_LAG]
        #: The cluster's other endpoint (reader endpoint of a writer endpoint and vice versa):
        #: where to learn the topology when the endpoint itself leads nowhere.
        self.sibling: str | None = None
        if self.endpoint.kind is EndpointKind.CLUSTER_WRITER:
            self.sibling = rds_reader_endpoint(self.endpoint)
        elif self.endpoint.kind is EndpointKind.CLUSTER_READER:
            self.sibling = rds_writer_endpoint(self.endpoint)
        self._rng = random.Random()

    def dormant(self) -> bool:
        return self.wanted is None

    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        wanted = self.wanted
        if not ctx.initial or wanted is None:
            return proceed(ctx)
        return _Opening(self, ctx, proceed, wanted).run()


class _Opening:
    """One application connect: the rounds of the module docstring."""

    def __init__(self, plugin: InitialConnectionPlugin, ctx: ConnectContext,
                 proceed: ConnectHandler, wanted: Role) -> None:
        self.plugin = plugin
        self.ctx = ctx
        self.proceed = proceed
        self.wanted = wanted
        self.attempts: list[ConnectAttempt] = []
        self.last_error: BaseException | None = None
        self.dialect: DatabaseDialect | None = None
        self.addressing = cc.addressing_for(ctx)
        self.started = time.monotonic()
        window = plugin.window
        self.deadline = None if window is None else self.started + window
        #: The raw connection the inner plugins saw last (``failover`` keeps the last one).
        self.latest: Any = None

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> Any:
        rounds = 0
        while True:
            rounds += 1
            raw = self._round()
            if raw is not None:
                return raw
            now = time.monotonic()
            remaining = None if self.deadline is None else self.deadline - now
            if remaining is not None and remaining <= 0:
                break
            delay = self.plugin.interval if remaining is None else min(
                self.plugin.interval, remaining)
            self._decide("initial_connection.retry", **{
                "resilient_db.initial_connection.rounds": rounds,
                "resilient_db.initial_connection.delay": delay})
            time.sleep(delay)
        elapsed = time.monotonic() - self.started
        self._decide("initial_connection.gave_up", **{
            "resilient_db.initial_connection.rounds": rounds,
            "resilient_db.initial_connection.elapsed": elapsed,
            "resilient_db.initial_connection.attempts": len(self.attempts)})
        window_ms = "unlimited" if self.plugin.window is None else f"{self.plugin.window * 1000:g}"
        log.warning("no %s reached through %s within %.1f s (%d attempts)", self._role(),
                    self.ctx.host, elapsed, len(self.attempts))
        error = self.ctx.driver.error(
            FailoverFailedError,
            f"initial_connection: no {self._role()} could be reached through {self.ctx.host} "
            f"within {elapsed:.1f} s (open_connection_retry_timeout_ms={window_ms}, "
            f"{rounds} rounds); {len(self.attempts)} attempts: "
            + "; ".join(f"{a.host}:{a.port} {a.outcome}" + (f" ({a.error})" if a.error else "")
                        for a in self.attempts),
            failed_host=str(self.ctx.host), attempts=tuple(self.attempts))
        raise error from self.last_error

    def _round(self) -> Any:
        """One round; the verified connection, or ``None``."""
        monitor = cc.known_monitor(self.ctx)
        tried: set[str] = set()
        fallback: tuple[Any, HostSpec, str | None] | None = None  # a writer, if a reader fails
        queue = list(self._from_topology(monitor.snapshot if monitor else None, monitor, tried))
        names = [self.ctx.host]
        if self.plugin.sibling is not None:
            names.append(HostSpec(self.plugin.sibling, self.ctx.host.port))
        by_names = tuple(names)
        attempted = False
        while True:
            if attempted and self.deadline is not None and time.monotonic() >= self.deadline:
                break  # the window is over: no new attempt (a fallback writer still counts)
            if queue:
                host = queue.pop(0)
                spec = host.spec
                if host.address in tried:
                    continue
                tried.add(host.address)
            elif names:
                spec = names.pop(0)
            else:
                break
            by_name = any(spec is name for name in by_names)
            via_dns = spec is self.ctx.host
            attempted = True
            raw, report = self._open(spec)
            if raw is None or report is None:
                continue
            if by_name:
                tried.add(Host(spec.host, spec.port).address)
            if cc.has_role(report, self.wanted):
                if by_name and report.instance_id is not None:
                    self._note_instance(raw, report.instance_id, monitor)
                if fallback is not None:
                    cc.close_quietly(fallback[0])
                kind = "initial_connection.verified" if via_dns else \
                    "initial_connection.redirected"
                self._landed(kind, spec, report.instance_id, via_dns)
                return raw
            outcome = cc.role_text(report)
            self.attempts.append(cc.attempt(spec, f"connected, but {outcome}", None, 0.0))
            topology = self._topology(raw, spec)  # only now: the right role needs no topology
            if by_name and topology is not None and report.instance_id is not None:
                listed = topology.by_instance(report.instance_id)
                if listed is not None:
                    tried.add(listed.address)
            if self.wanted is Role.READER and report.is_reader is False and fallback is None:
                fallback = (raw, spec, report.instance_id)
            else:
                cc.close_quietly(raw)
            if topology is not None:
                learned = self._from_topology(topology, monitor, tried)
                queue.extend(h for h in learned if h.address not in tried)
        if fallback is not None:
            return self._fall_back(*fallback)
        return None

    def _from_topology(self, snapshot: TopologySnapshot | None, monitor: TopologyMonitor | None,
                       tried: set[str]) -> tuple[Host, ...]:
        if snapshot is None:
            return ()
        known = monitor is not None and snapshot is monitor.snapshot
        # Only hosts the connection's host list allows (custom_endpoint: the members).
        snapshot, excluded = allowed_only(snapshot, self.plugin.ctx.hosts,
                                          self.plugin.ctx.settings)
        if self.wanted is Role.WRITER and monitor is not None and known:
            writer = monitor.writer  # first-hand verified by the monitor
            if writer is None or writer.address in excluded:
                return ()
            return (writer,) if writer.address not in tried else ()
        now = time.monotonic()
        rng = monitor.rng if monitor is not None else self.plugin._rng
        times = response_time.selection_times(self.plugin.ctx, self.plugin.strategy,
                                              snapshot.hosts)
        sctx = selection_context(rng=rng, now=now, cursor=cc.cursor_for(self.ctx, monitor),
                                 weights=self.plugin.weights, response_times=times)
        cooling = monitor.bad_hosts().cooling(now) if monitor is not None else frozenset()
        hosts, choice = candidates(self.wanted, snapshot, self.plugin.strategy, sctx,
                                   max_lag=self.plugin.max_lag, exclude=frozenset(tried),
                                   cooling=cooling)
        if choice is not None and choice.host is not None:
            get_decision_sink().record(choice.to_decision())
        return hosts

    def _note_instance(self, raw: Any, instance_id: str, monitor: TopologyMonitor | None,
                       ) -> None:
        """Count a connection made through an endpoint name on the instance it reached (the
        per-host counts of ``least_connections``), when that instance's address is known."""
        snapshot = monitor.snapshot if monitor is not None else None
        listed = snapshot.by_instance(instance_id) if snapshot is not None else None
        default_port = self.ctx.driver.default_port
        if listed is not None:
            note_opened(raw, listed.spec, default_port)
        elif self.addressing.pattern is not None:
            host, port = self.addressing.pattern.expand(instance_id)
            note_opened(raw, HostSpec(host, port if port is not None else
                                      self.addressing.default_port), default_port)

    def _fall_back(self, raw: Any, spec: HostSpec, instance_id: str | None) -> Any:
        """No reader: use the writer reached earlier (again, if another connection was opened
        since: the inner plugins keep the last one)."""
        if self.latest is not raw:
            cc.close_quietly(raw)
            raw, report = self._open(spec)
            if raw is None or report is None or report.is_reader is not False:
                if raw is not None:
                    cc.close_quietly(raw)
                return None
            instance_id = report.instance_id
        self._landed("initial_connection.writer_fallback", spec, instance_id,
                     spec is self.ctx.host)
        return raw

    # --- one connection --------------------------------------------------------------------
    def _remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _open(self, spec: HostSpec) -> tuple[Any, Any]:
        """Connect to ``spec`` and ask the instance who it is; ``(None, None)`` after
        recording a failed attempt."""
        start = time.monotonic()
        try:
            raw = cc.open_at(self.ctx, self.proceed, spec, self._remaining())
        except Error:
            raise  # configuration, dialect: retrying cannot help
        except Exception as exc:
            self.last_error = exc
            self.attempts.append(cc.attempt(spec, "connect failed", exc,
                                            time.monotonic() - start))
            return None, None
        self.latest = raw
        try:
            if self.dialect is None:
                self.dialect = cc.dialect_for(self.ctx, self.plugin.ctx.extra, raw)
            report = cc.report_on(self.ctx, self.dialect, raw, spec, self.addressing,
                                  with_topology=False)
        except Error:
            cc.close_quietly(raw)
            raise
        except Exception as exc:
            self.last_error = exc
            self.attempts.append(cc.attempt(spec, "role check failed", exc,
                                            time.monotonic() - start))
            cc.close_quietly(raw)
            return None, None
        return raw, report

    def _topology(self, raw: Any, spec: HostSpec) -> TopologySnapshot | None:
        """The topology the instance behind ``raw`` sees (``None``: none, or it failed)."""
        dialect = self.dialect
        if dialect is None or dialect.topology_query is None:
            return None
        try:
            report = cc.report_on(self.ctx, dialect, raw, spec, self.addressing,
                                  with_topology=True)
        except Error:
            cc.close_quietly(raw)
            raise
        except Exception as exc:
            self.last_error = exc
            log.debug("cannot read the topology on %s: %r", spec, exc)
            return None
        return report.topology

    # --- reporting ---------------------------------------------------------------------------
    def _role(self) -> str:
        return "writer" if self.wanted is Role.WRITER else "reader (or, failing that, writer)"

    def _landed(self, kind: str, spec: HostSpec, instance_id: str | None, via_dns: bool,
                ) -> None:
        elapsed = time.monotonic() - self.started
        attributes: dict[str, Any] = {
            "server.address": spec.host,
            "resilient_db.instance.id": instance_id or "",
            "resilient_db.initial_connection.endpoint": self.ctx.host.host,
            "resilient_db.initial_connection.wanted": self.wanted.value,
            "resilient_db.initial_connection.via_dns": via_dns,
            "resilient_db.initial_connection.attempts": tuple(
                f"{a.host}:{a.port} {a.outcome}" for a in self.attempts),
            "resilient_db.initial_connection.elapsed": elapsed,
        }
        if spec.port is not None:
            attributes["server.port"] = spec.port
        self._decide(kind, **attributes)
        if kind != "initial_connection.verified":
            log.info("connection through %s went to %s (instance %s) after %d failed "
                     "attempts (%s)", self.ctx.host, spec, instance_id, len(self.attempts),
                     kind.rpartition(".")[2])

    def _decide(self, kind: str, **attributes: Any) -> None:
        self.plugin.ctx.decide(kind, self.plugin.code, **attributes)
