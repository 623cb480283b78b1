"""Host list provider and the shared topology monitor (DESIGN §2, §5, §6, §7).

Reading (small I/O shells over the dialect's queries; the parsing is the dialect's and
:mod:`resilient_db.hosts`'s, pure):

- :class:`Addressing`: how instance ids become addresses: ``cluster_instance_host_pattern``
  when set, else the pattern derived from an RDS endpoint name (:func:`rds.instance_host_pattern`)
  for topologies that give no endpoint (Aurora), else the endpoint each row gives (Multi-AZ).
- :func:`read_self_report`: what one instance says about itself on one connection (instance id,
  reader or not, the topology it sees) as a :class:`~resilient_db.failover_core.SelfReport`.
- :func:`confirmed_role`: whether such a report proves the instance is (still) the writer.
- :func:`server_identity`: the cluster's identity as the server reports it.

Monitoring: one :class:`TopologyMonitor` per cluster (``cluster_id``, else the identity the
server reports) shared by every connection of the process, holding at most one server
connection while all is well. After a failure (reported by a connection, or seen by the monitor
itself) it switches to a high-rate mode: every known instance is probed in parallel, each on a
short-lived connection with bounded connect and read timeouts (a blackholed instance stalls only
its own probe), until an instance confirms on its own connection that it is the writer
(:func:`~resilient_db.failover_core.elect_writer`). That writer's own topology is published with
the next topology epoch (:func:`~resilient_db.hosts.advance`) and its probe connection becomes
the monitor's connection.

Lifecycle: nothing starts at import; a monitor's thread starts when the first connection
subscribes, runs as a daemon, is supervised (a crash is logged, counted in :attr:`crashes`
and restarted with backoff), stops reading when no subscribed connection is left and ends
by itself the longest ``disposal_time`` a subscriber asked later, unless one subscribes
meanwhile (a connection unsubscribes when it is closed; subscribers are held by weak
reference, so one dropped unclosed counts too), and is stopped by
:func:`resilient_db.shutdown`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from . import _lifecycle
from ._decisions import Decision, decision_span, get_decision_sink
from ._flows import Rows, run_sync
from ._monitors import MonitorRegistry, supervise
from ._pipeline import HostSpec
from .dialects.base import DatabaseDialect, QueryDriver, Topology
from .errors import ConnectAttempt
from .failover_core import Election, SelfReport, elect_writer, probe_targets
from .hosts import (
    BadHostMemory,
    Host,
    Role,
    TopologyChange,
    TopologySnapshot,
    address_of,
    advance,
    snapshot_from_topology,
)
from .rds import HostPattern, classify, instance_host_pattern
from .selection import RoundRobinCursor

__all__ = [
    "Addressing",
    "MonitorSubscriber",
    "TopologyMonitor",
    "add_writer_listener",
    "confirmed_role",
    "known_monitor",
    "monitor_for",
    "monitors",
    "read_self_report",
    "self_report_flow",
    "server_identity",
    "server_identity_flow",
    "stop_all",
]

log = logging.getLogger("resilient_db.topology")

#: Application name of the monitor's connections (PostgreSQL shows it in pg_stat_activity).
MONITOR_APPLICATION_NAME = "resilient_db-topology"
#: A high-rate episode nobody waits for falls back to the normal rate after this many seconds
#: (the next normal refresh starts a new one if the writer is still missing).
EPISODE_LIMIT = 30.0


# --- addressing and reading --------------------------------------------------------------------


@dataclass(frozen=True)
class Addressing:
    """How instance ids become addresses.

    ``pattern``: the host pattern (``None``: none known). ``explicit``: the user set it
    (``cluster_instance_host_pattern``), so it applies even to topologies that list endpoints.
    ``default_port``: the port of instances whose pattern and row name none (the port the
    application connected to). ``regions``: an Aurora Global Database's pattern per region
    (``global_cluster_instance_host_patterns``); empty for a single-region cluster. With
    regions, a row of a region without a pattern cannot be addressed and is left out (as
    ``ignored``).
    """

    pattern: HostPattern | None
    explicit: bool
    default_port: int | None
    regions: tuple[tuple[str, HostPattern], ...] = ()

    @classmethod
    def for_host(cls, host: str, port: int | None, explicit: str | None) -> Addressing:
        """From the host the application connected to and the user's pattern, if any."""
        if explicit:
            return cls(HostPattern.parse(explicit), True, port)
        derived = instance_host_pattern(classify(host))
        return cls(HostPattern.parse(derived) if derived else None, False, port)

    def snapshot(self, topology: Topology, *, taken_at: float | None = None,
                 source: str | None = None) -> TopologySnapshot:
        """A snapshot of a parsed topology answer with every instance addressed."""
        rows = topology.rows
        if self.regions:
            known = dict(self.regions)
            lost = tuple(row for row in rows if row.region is not None and row.region not in known)
            if lost:
                _warn_once(
                    "gdb-region-" + ",".join(sorted({row.region or "" for row in lost})),
                    "the global topology lists instances in region(s) "
                    f"{', '.join(sorted({row.region or '' for row in lost}))} that "
                    "global_cluster_instance_host_patterns does not name: they cannot be "
                    "reached and are left out")
                topology = Topology(tuple(r for r in rows if r not in lost),
                                    topology.ignored + lost, topology.server_time)
            return snapshot_from_topology(topology, self.pattern, default_port=self.default_port,
                                          taken_at=taken_at, source=source,
                                          region_patterns=known)
        needs_pattern = any(row.endpoint is None for row in rows)
        pattern = self.pattern if (self.explicit or needs_pattern) else None
        if pattern is None and needs_pattern:
            _warn_once(
                "no-pattern",
                "the topology names instances by id only and no host pattern is known: set "
                "cluster_instance_host_pattern (e.g. '?.abc123.us-east-1.rds.amazonaws.com') "
                "so that failover can reach the instances directly",
            )
        return snapshot_from_topology(topology, pattern, default_port=self.default_port,
                                      taken_at=taken_at, source=source)


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def read_self_report(
    driver: QueryDriver,
    dialect: DatabaseDialect,
    conn: Any,
    host: Host,
    addressing: Addressing,
    *,
    with_topology: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> SelfReport:
    """Ask the instance behind ``conn`` who it is, whether it is a reader and (when
    ``with_topology`` and the dialect has one) which topology it sees. Internal statements
    only (schema-qualified, ``DriverDialect.query``: the application's transaction state is
    left as it was). Driver errors propagate. Runs with OpenTelemetry instrumentation
    suppressed (internal statements stay out of the application's traces)."""
    from .telemetry.context import suppress_instrumentation

    with suppress_instrumentation():
        return _read_self_report(driver, dialect, conn, host, addressing,
                                 with_topology=with_topology, clock=clock)


def _read_self_report(driver: QueryDriver, dialect: DatabaseDialect, conn: Any, host: Host,
                      addressing: Addressing, *, with_topology: bool,
                      clock: Callable[[], float]) -> SelfReport:
    return run_sync(self_report_flow(dialect, host, addressing, with_topology=with_topology,
                                     clock=clock), lambda sql: driver.query(conn, sql))


def self_report_flow(dialect: DatabaseDialect, host: Host, addressing: Addressing, *,
                     with_topology: bool = True,
                     clock: Callable[[], float] = time.monotonic,
                     ) -> Generator[str, Rows, SelfReport]:
    """:func:`read_self_report` as an I/O-free flow (:mod:`resilient_db._flows`): the same
    statements and parsing for the sync and asyncio fronts. Errors propagate."""
    instance_id = dialect.parse_instance_id((yield dialect.instance_id_query))
    is_reader = dialect.parse_is_reader((yield dialect.is_reader_query))
    snapshot: TopologySnapshot | None = None
    if with_topology and dialect.topology_query is not None:
        writer_id: str | None = None
        if dialect.writer_id_query is not None:
            writer_id = dialect.parse_writer_id((yield dialect.writer_id_query))
            if writer_id is None and is_reader is False:
                writer_id = instance_id  # Multi-AZ: no writer reported on the writer itself
        rows = yield dialect.topology_query
        parsed = dialect.parse_topology(rows, writer_id=writer_id)
        snapshot = addressing.snapshot(parsed, taken_at=clock(), source=instance_id)
    return SelfReport(host, clock(), instance_id, is_reader, snapshot)


def confirmed_role(report: SelfReport, *, has_topology: bool,
                   verified_writer: str | None = None) -> Role:
    """The role a report proves. Pure.

    ``WRITER``: the instance says it is not a reader, or it says read-only but its own topology
    still names it the writer (a writer turned read-only, e.g. a blue/green source or an
    operator's ``read_only=ON``: the application's error, not a demotion). ``READER``: it says
    it is a reader and its own topology names another writer (a demoted writer follows the new
    one), or, for dialects without topology, it says it is a reader. ``UNKNOWN`` otherwise
    (no answer; read-only with no writer named).

    ``verified_writer``: the instance id of the writer the cluster's topology monitor verified
    first-hand, if any. A read-only instance whose own view still names itself the writer is a
    READER when another instance is the verified writer (a demoted writer that rejoined as a
    reader before the new topology replicated to it).
    """
    if report.error is not None or report.is_reader is None:
        return Role.UNKNOWN
    if not report.is_reader:
        return Role.WRITER
    if not has_topology:
        return Role.READER
    named = report.topology.writer if report.topology is not None else None
    if named is None:
        return Role.UNKNOWN
    if named.instance_id != report.instance_id:
        return Role.READER
    if verified_writer is not None and verified_writer != report.instance_id:
        return Role.READER
    return Role.WRITER


#: PostgreSQL: every member of a physical replication cluster shares the system identifier.
PG_SYSTEM_IDENTIFIER = "SELECT system_identifier FROM pg_catalog.pg_control_system()"


def server_identity(driver: QueryDriver, dialect: DatabaseDialect, conn: Any,
                    report: SelfReport | None) -> str | None:
    """The cluster's identity as the server reports it (AURORA_INTERFACE.md, "Cluster
    identity"): PostgreSQL's ``system_identifier``; on MySQL a digest of the set of instance
    addresses of the topology (addresses, not bare ids: ``instance-1`` is not unique across
    clusters).
    ``None`` when the server tells nothing (no privilege, no topology)."""
    return run_sync(server_identity_flow(driver, dialect, report),
                    lambda sql: driver.query(conn, sql))


def server_identity_flow(driver: QueryDriver, dialect: DatabaseDialect,
                         report: SelfReport | None) -> Generator[str, Rows, str | None]:
    """:func:`server_identity` as an I/O-free flow (``driver`` only classifies errors)."""
    if dialect.family == "pg":
        try:
            rows = yield PG_SYSTEM_IDENTIFIER
        except Exception as exc:
            if driver.is_disconnect(exc):
                raise
            log.debug("cannot read the system identifier: %r", exc)
            return None
        if rows and rows[0] and rows[0][0] is not None:
            return f"pg-system:{rows[0][0]}"
        return None
    if report is not None and report.topology is not None and report.topology.hosts:
        members = ",".join(sorted(h.address for h in report.topology.hosts))
        return "mysql-members:" + hashlib.sha256(members.encode()).hexdigest()[:20]
    return None


# --- the monitor -------------------------------------------------------------------------------


class MonitorSubscriber(Protocol):
    """What a monitor needs from a connection that uses it (the failover plugin)."""

    refresh_interval: float
    high_refresh_interval: float
    probe_timeout: float
    #: How long the monitor outlives its last connection (``monitor_disposal_time_ms``).
    disposal_time: float

    def open_monitoring_connection(self, host: HostSpec, timeout: float) -> Any:
        """A new autocommit driver connection to ``host`` for monitoring (the subscriber's
        credentials and connect plugins), with connect and read timeouts of ``timeout``."""
        ...


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Episode:
    """One high-rate search for the writer: per-host probe threads post their latest report."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.done = threading.Event()
        self.reports: dict[str, SelfReport] = {}
        #: Address of the instance elected writer: its probe hands its connection over.
        self.winner: str | None = None
        self.probers: dict[str, threading.Thread] = {}


class TopologyMonitor:
    """The topology of one cluster, shared by every connection to it in the process.

    ``key`` identifies the cluster; ``driver`` and ``dialect`` read it; ``addressing`` turns
    instance ids into addresses. Read :attr:`snapshot`, :attr:`writer` and :attr:`epoch` any
    time (no I/O); :meth:`wait_for_writer` asks for a writer verified after a given moment.
    """

    def __init__(
        self,
        key: str,
        driver: Any,
        dialect: DatabaseDialect,
        addressing: Addressing,
        *,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = key
        self.driver = driver
        self.dialect = dialect
        self.addressing = addressing
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._subscribers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._seeds: dict[str, Host] = {}
        self._snapshot: TopologySnapshot | None = None
        self._writer: Host | None = None
        self._verified_at = float("-inf")
        self._panic = False
        self._waiters = 0
        self._bad = BadHostMemory(cooldown)
        self._episode: _Episode | None = None
        self._last_election: Election | None = None
        self._last_reports: tuple[SelfReport, ...] = ()
        self._conn: Any = None
        self._waiting = float("inf")  # the normal-rate pause in progress, seconds
        #: The longest ``disposal_time`` any subscriber asked for.
        self._disposal = 0.0
        #: When the last subscriber left (``None``: someone uses the monitor).
        self._idle_since: float | None = None
        self._reading: Any = None  # the connection a normal-rate read is using right now
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        #: Times the monitor thread crashed and was restarted (supervision metric).
        self.crashes = 0
        #: Last recorded state of each host ("address:port" -> up), for host-state decisions.
        self._up: dict[str, bool] = {}
        #: High-rate episodes run so far.
        self.episodes = 0
        #: Reader selection state shared by every connection to this cluster.
        self.round_robin = RoundRobinCursor()
        self.rng = random.Random()

    # --- what connections read -------------------------------------------------------------
    @property
    def snapshot(self) -> TopologySnapshot | None:
        """The latest topology (``None``: not read yet)."""
        return self._snapshot

    @property
    def writer(self) -> Host | None:
        """The last verified writer (``None``: none verified yet)."""
        return self._writer

    @property
    def epoch(self) -> int:
        """The topology epoch: moves on each time the writer changes."""
        snapshot = self._snapshot
        return snapshot.epoch if snapshot is not None else 0

    @property
    def verified_at(self) -> float:
        """When the current writer last confirmed its role (monotonic seconds)."""
        return self._verified_at

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def connection_open(self) -> bool:
        """Whether the monitor holds its (one) server connection now."""
        return self._conn is not None

    def bad_hosts(self) -> BadHostMemory:
        return self._bad

    def mark_down(self, host: Host | HostSpec | str) -> None:
        with self._cond:
            self._bad = self._bad.prune(self._clock()).mark_down(host, self._clock())
        self._host_state(host, False)

    def _host_state(self, host: Host | HostSpec | str, up: bool) -> None:
        """Record ``topology.host_up``/``host_down`` when a host's state changes."""
        if isinstance(host, str):
            address, port = host, None
        else:
            address, port = host.host, host.port
        if port is None:
            port = self.addressing.default_port
        key = f"{address}:{port}"
        if self._up.get(key) is up:
            return
        self._up[key] = up
        get_decision_sink().record(Decision(
            "topology.host_up" if up else "topology.host_down", "failover",
            {"server.address": address, "server.port": port,
             "resilient_db.topology.cluster": self.key}))

    def mark_up(self, host: Host | HostSpec | str) -> None:
        """Forget that ``host`` was found down (a failure monitor hears from it again)."""
        with self._cond:
            self._bad = self._bad.mark_up(host)

    def last_election(self) -> Election | None:
        return self._last_election

    def probe_attempts(self) -> tuple[ConnectAttempt, ...]:
        """The last high-rate round's verdict per instance, as connect attempts (for
        ``FailoverFailedError.attempts`` when no writer was found)."""
        attempts = []
        for report in self._last_reports:
            if report.error is not None:
                outcome, error = "probe failed", report.error
            elif report.is_reader:
                outcome, error = "probe: is a reader", None
            else:
                outcome, error = "probe: not verified as the writer", None
            attempts.append(ConnectAttempt(report.host.host, report.host.port, outcome, error))
        return tuple(attempts)

    # --- what connections do -----------------------------------------------------------------
    def subscribe(self, subscriber: MonitorSubscriber, seed: Host | None = None) -> None:
        """Register a connection using this monitor (weakly) and start the monitor thread if it
        is not running. ``seed`` is an address to probe when the topology does not name it
        (the endpoint the application connected to)."""
        with self._cond:
            self._subscribers.add(subscriber)
            self._disposal = max(self._disposal, subscriber.disposal_time)
            self._idle_since = None
            if seed is not None:
                self._seeds.setdefault(seed.address, seed)
            self._ensure_running()
            if subscriber.refresh_interval < self._waiting:
                self._cond.notify_all()  # a faster rate applies from now, not after the wait

    def unsubscribe(self, subscriber: MonitorSubscriber) -> None:
        """A connection was closed: it no longer counts as using this monitor. When none is
        left the monitor stops reading and its thread ends (closing its server connection)
        after the disposal time, unless a connection subscribes meanwhile; the closed
        connection need not be garbage-collected first."""
        with self._cond:
            self._subscribers.discard(subscriber)
            if not self._subscribers:
                self._idle_since = self._clock()
                self._cond.notify_all()  # idle from now, not after the refresh wait

    def offer(self, report: SelfReport) -> None:
        """A report read on an application connection. It seeds an empty monitor, and when it
        comes from the writer itself it verifies that writer (first-hand)."""
        election = elect_writer([report])
        with self._cond:
            if election.writer is not None and election.writer.reported_at > self._verified_at:
                self._publish(election, quiet=True)
            elif self._snapshot is None and report.topology is not None:
                self._snapshot = report.topology

    def request_refresh(self) -> None:
        """Switch to the high-rate mode now (a connection saw a failure)."""
        with self._cond:
            if not self._stopping.is_set():
                self._start_search()

    def _start_search(self) -> None:
        # Caller holds the lock. A normal-rate read in progress is most likely stuck on the
        # instance that failed (a blackholed socket blocks until its timeout): break its
        # socket (DESIGN §2) so that the search starts now.
        self._panic = True
        self._ensure_running()
        self._cond.notify_all()
        busy = self._reading
        if busy is not None:
            with contextlib.suppress(Exception):
                self.driver.abort(busy)

    def wait_for_writer(self, since: float, timeout: float | None) -> Host | None:
        """A writer that confirmed its role after ``since`` (monotonic seconds), waiting up to
        ``timeout`` seconds (``None``: no limit) while the monitor searches at the high rate.
        ``None`` when none was verified in time."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            if self._verified_at > since:
                return self._writer
            self._waiters += 1
            try:
                while not self._verified_at > since:
                    if self._stopping.is_set():
                        return None
                    if not self._panic:
                        self._start_search()
                    if deadline is None:
                        self._cond.wait(1.0)
                        continue
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)
                return self._writer
            finally:
                self._waiters -= 1

    def stop(self) -> None:
        """Stop the thread and any probes (bounded: nothing is joined)."""
        with self._cond:
            self._stopping.set()
            episode = self._episode
            if episode is not None:
                episode.done.set()
            self._cond.notify_all()

    def abandon(self) -> None:
        """In a child process after ``fork()``: the monitor's threads do not exist here and its
        connections are the parent's sessions. Look stopped and let the connections go
        without a word to the server (:meth:`DriverDialect.forget`); the lock is replaced,
        as a parent thread may have held it at fork time."""
        self._cond = threading.Condition(threading.RLock())
        self._stopping = threading.Event()
        self._stopping.set()
        self._thread = None
        self._episode = None  # its probe threads do not exist here either
        self._subscribers = weakref.WeakSet()
        for conn in (self._conn, self._reading):
            if conn is not None:
                self.driver.forget(conn)
        self._conn = self._reading = None

    # --- publishing --------------------------------------------------------------------------
    def _publish(self, election: Election, *, quiet: bool = False) -> None:
        """Make a verified writer and its own topology current (caller holds the lock)."""
        winner = election.writer
        writer = election.writer_host
        assert winner is not None and writer is not None
        topology = election.topology
        if topology is None or topology.writer is None:
            others = tuple(h for h in (topology.hosts if topology else ())
                           if h.address != writer.address and h.role is not Role.WRITER)
            topology = TopologySnapshot((writer, *others), taken_at=winner.reported_at,
                                        source=winner.instance_id)
        step = advance(self._snapshot, topology)
        self._snapshot = step.snapshot
        self._writer = step.snapshot.writer or writer
        self._verified_at = winner.reported_at
        self._panic = False
        self._bad = self._bad.mark_up(self._writer)
        sink = get_decision_sink()
        self._host_state(self._writer, True)
        if sink.enabled:
            snapshot = step.snapshot
            sink.record(Decision("topology.refreshed", "failover", {
                "resilient_db.topology.source": "refresh" if quiet else "search",
                "resilient_db.topology.cluster": self.key,
                "resilient_db.topology.epoch": step.epoch,
                "resilient_db.topology.writer": self._writer.address,
                "resilient_db.topology.readers": tuple(
                    h.address for h in snapshot.hosts if h.role is Role.READER)}))
        if step.changed:
            sink.record(step.change.to_decision())
            if step.change.writer_changed:
                log.info("cluster %s: writer is now %s (topology epoch %d)", self.key,
                         self._writer, step.epoch)
                _notify_writer_changed(self, step.change)
        if not quiet:
            sink.record(election.to_decision())
        self._cond.notify_all()

    # --- the thread --------------------------------------------------------------------------
    def _ensure_running(self) -> None:
        # Caller holds the lock.
        if self._stopping.is_set() or self._thread is not None:
            return
        thread = threading.Thread(target=self._supervise, name=f"resilient_db-topology[{self.key}]",
                                  daemon=True)
        self._thread = thread
        _lifecycle.register("topology", stop_all)
        thread.start()

    def _supervise(self) -> None:
        from .telemetry.context import suppress_for_thread

        suppress_for_thread()  # internal statements only on this thread
        supervise(self._run, self._stopping, self._crashed)
        with self._cond:
            if self._thread is threading.current_thread():
                self._thread = None

    def _crashed(self, exc: Exception, backoff: float) -> None:
        self.crashes += 1
        get_decision_sink().record(Decision(
            "topology.monitor_restarted", "failover",
            {"resilient_db.topology.cluster": self.key,
             "resilient_db.monitor.crashes": self.crashes}))
        log.warning("topology monitor %s crashed (%d so far); restarting in %.1f s",
                    self.key, self.crashes, backoff, exc_info=True)
        self._close_main()

    def _live(self) -> list[Any]:
        return list(self._subscribers)

    def _intervals(self, subscribers: Iterable[Any]) -> tuple[float, float, float]:
        """The fastest refresh rates and the shortest probe timeout any subscriber asks for."""
        subs = list(subscribers)
        return (min(s.refresh_interval for s in subs), min(s.high_refresh_interval for s in subs),
                min(s.probe_timeout for s in subs))

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                # Read under the lock: a connection subscribing now either is seen here or
                # finds no thread and starts one (never a thread that is about to end).
                subscribers = self._live()
                if not subscribers:
                    # Nobody uses this cluster: no reading. After the disposal time the
                    # thread ends (a new subscriber starts another); a subscriber arriving
                    # before wakes it (``subscribe`` notifies: no refresh wait is running).
                    now = self._clock()
                    if self._idle_since is None:
                        self._idle_since = now  # the last ones went away uncollected
                    left = self._idle_since + self._disposal - now
                    if left <= 0:
                        self._thread = None
                        self._close_main()
                        return
                    self._cond.wait(left)
                    continue
                panic = self._panic
            timeout = self._intervals(subscribers)[2]
            if panic:
                with decision_span("topology.search", "failover",
                                   {"resilient_db.topology.cluster": self.key}) as search:
                    found = self._search()
                    writer = self._writer
                    if found and writer is not None:
                        search.set(**{"resilient_db.topology.writer": writer.address,
                                      "resilient_db.topology.epoch": self.epoch})
                if not found:
                    continue
            elif not self._refresh(subscribers, timeout):
                with self._cond:
                    self._panic = True
                continue
            del subscribers  # hold no strong reference while waiting
            with self._cond:
                if not self._panic and not self._stopping.is_set():
                    # Recomputed under the lock: a subscriber asking for a faster rate while
                    # the refresh ran found nobody waiting to notify.
                    live = self._live()
                    if not live:
                        continue  # the last connection left during the refresh: idle from now
                    wait = self._intervals(live)[0]
                    del live
                    self._waiting = wait
                    self._cond.wait(wait)
                    self._waiting = float("inf")
        self._close_main()

    def _open(self, subscribers: list[Any], host: HostSpec, timeout: float) -> Any:
        if not subscribers:
            raise RuntimeError("no connection uses this monitor any more")
        return subscribers[0].open_monitoring_connection(host, timeout)

    def _close_main(self) -> None:
        with self._cond:
            conn, self._conn = self._conn, None
        if conn is not None:
            _close_quietly(self.driver, conn)

    def _refresh(self, subscribers: list[Any], timeout: float) -> bool:
        """One normal-rate read on the monitor's connection (opened to the writer when
        missing). Returns whether the writer confirmed its role."""
        with self._cond:
            conn = self._conn
            target = self._writer or (self._snapshot.writer if self._snapshot else None)
            seeds = list(self._seeds.values())
        host = target or (seeds[0] if seeds else None)
        if host is None:
            return False
        try:
            if conn is None:
                conn = self._open(subscribers, host.spec, timeout)
                with self._cond:
                    if self._conn is None:
                        self._conn = conn
                    else:  # a probe handed its connection over meanwhile
                        _close_quietly(self.driver, conn)
                        conn = self._conn
            with self._cond:
                self._reading = conn
                if self._panic:  # a search was asked for: do not start a read now
                    return False
            report = read_self_report(self.driver, self.dialect, conn, host, self.addressing,
                                      clock=self._clock)
        except Exception as exc:
            log.debug("topology refresh on %s failed: %s", host, _describe(exc))
            self._close_main()
            return False
        finally:
            with self._cond:
                self._reading = None
        election = elect_writer([report])
        if election.writer is None:
            log.debug("topology refresh: %s is not the writer any more", host)
            self._close_main()
            return False
        with self._cond:
            self._publish(election, quiet=True)
        return True

    def _search(self) -> bool:
        """The high-rate mode: probe every known instance in parallel until one confirms it
        is the writer. Returns whether one did."""
        self._close_main()  # most likely on the instance that failed
        episode = _Episode(self._clock())
        self.episodes += 1
        with self._cond:
            self._episode = episode
        log.debug("cluster %s: searching for the writer", self.key)
        try:
            while not self._stopping.is_set():
                subscribers = self._live()
                if not subscribers:
                    return False
                _, high, timeout = self._intervals(subscribers)
                del subscribers  # hold no strong reference while waiting
                with self._cond:
                    reports = list(episode.reports.values())
                    targets = probe_targets(self._snapshot, reports, self._seeds.values())
                for host in targets:
                    if host.address not in episode.probers:
                        self._start_prober(episode, host, high, timeout)
                with self._cond:
                    fresh = [r for r in episode.reports.values()
                             if r.reported_at >= episode.started]
                    election = elect_writer(fresh)
                    if fresh:
                        self._last_election = election
                        self._last_reports = tuple(fresh)
                    if election.writer is not None:
                        episode.winner = election.writer.host.address
                        self._publish(election)
                        return True
                    if (self._waiters == 0
                            and self._clock() - episode.started > EPISODE_LIMIT):
                        self._panic = False
                        return False
                    if self._stopping.is_set():
                        return False
                    self._cond.wait(high)
            return False
        finally:
            with self._cond:
                episode.done.set()
                self._episode = None

    def _start_prober(self, episode: _Episode, host: Host, interval: float,
                      timeout: float) -> None:
        thread = threading.Thread(target=self._probe, args=(episode, host, interval, timeout),
                                  name=f"resilient_db-probe[{host.address}]", daemon=True)
        episode.probers[host.address] = thread
        thread.start()

    def _probe(self, episode: _Episode, host: Host, interval: float, timeout: float) -> None:
        """One instance's probe for one episode: its own short-lived connection (handed over
        to the monitor if this instance wins), a report every ``interval`` seconds."""
        from .telemetry.context import suppress_for_thread

        suppress_for_thread()  # internal statements only on this thread
        conn: Any = None
        try:
            while not episode.done.is_set() and not self._stopping.is_set():
                try:
                    if conn is None:
                        conn = self._open(self._live(), host.spec, timeout)
                    report = read_self_report(self.driver, self.dialect, conn, host,
                                              self.addressing, clock=self._clock)
                except Exception as exc:
                    report = SelfReport(host, self._clock(), error=_describe(exc))
                    if conn is not None:
                        _close_quietly(self.driver, conn)
                        conn = None
                with self._cond:
                    if episode.done.is_set():
                        break
                    episode.reports[host.address] = report
                    self._cond.notify_all()
                self._host_state(host, report.error is None)
                episode.done.wait(interval)
        except Exception:  # a probe never takes the monitor down
            log.warning("probe of %s failed unexpectedly", host, exc_info=True)
        finally:
            if conn is not None:
                with self._cond:
                    if (episode.winner == host.address and self._conn is None
                            and not self._stopping.is_set()):
                        self._conn, conn = conn, None
                if conn is not None:
                    _close_quietly(self.driver, conn)


#: Called as ``listener(monitor, change)`` when a monitor publishes a new writer (the
#: connection tracker). Runs on the thread that verified the writer, with the monitor's lock
#: held: a listener must be quick, do no I/O and not wait for other threads.
_writer_listeners: list[Callable[[TopologyMonitor, TopologyChange], None]] = []
_listeners_lock = threading.Lock()


def add_writer_listener(listener: Callable[[TopologyMonitor, TopologyChange], None]) -> None:
    """Register ``listener`` (once) to hear of every writer change of every monitor."""
    with _listeners_lock:
        if listener not in _writer_listeners:
            _writer_listeners.append(listener)


def _notify_writer_changed(monitor: TopologyMonitor, change: TopologyChange) -> None:
    for listener in list(_writer_listeners):
        try:
            listener(monitor, change)
        except Exception:  # a listener never takes the monitor down
            log.warning("writer-change listener %r failed", listener, exc_info=True)


def _close_quietly(driver: Any, conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


# --- the registry ------------------------------------------------------------------------------

_registry: MonitorRegistry[TopologyMonitor] = MonitorRegistry(
    "topology.monitors_stopped", "resilient_db.topology.monitors")
_by_endpoint: dict[tuple[Any, ...], str] = {}  # guarded by _registry.lock


def known_monitor(endpoint: tuple[Any, ...]) -> TopologyMonitor | None:
    """The monitor already serving connections made to ``endpoint`` (a key the caller builds
    from driver, dialect, address and ``cluster_id``), if any: saves the identity queries."""
    with _registry.lock:
        key = _by_endpoint.get(endpoint)
        return _registry.get_locked(key) if key is not None else None


def monitor_for(key: str, create: Callable[[], TopologyMonitor],
                endpoint: tuple[Any, ...] | None = None) -> TopologyMonitor:
    """The monitor of cluster ``key``, created with ``create`` when there is none (or the one
    there was stopped). ``endpoint`` is remembered as leading to this cluster."""
    with _registry.lock:
        monitor = _registry.get_or_create_locked(key, create)
        if endpoint is not None:
            _by_endpoint[endpoint] = key
    return monitor


def monitors() -> list[TopologyMonitor]:
    """Every monitor of the process (tests, diagnostics)."""
    return _registry.all()


def stop_all() -> None:
    """Stop every monitor and forget them (``resilient_db.shutdown``); connections that use
    one later start a new one."""
    _registry.stop_all(also_locked=_by_endpoint.clear)


def endpoint_key(driver_code: str, dialect_code: str, host: str, port: int | None,
                 cluster_id: str | None) -> tuple[Any, ...]:
    """The key :func:`known_monitor` and :func:`monitor_for` remember endpoints under."""
    return (driver_code, dialect_code, address_of(host, port), cluster_id)


def _reset_in_child() -> None:
    global _by_endpoint, _listeners_lock
    _listeners_lock = threading.Lock()
    _registry.reset_in_child()
    _by_endpoint = {}


_lifecycle.on_fork_child(_reset_in_child)
