"""Blue/green deployments: the metadata RDS publishes, the routing decisions it implies, and
the process-wide status monitor of each deployment (DESIGN §3, §6, §7).

RDS publishes a deployment's state on both sides as rows ``(version, endpoint, port, role,
status)`` (``AURORA_INTERFACE.md``): ``pg_catalog.get_blue_green_fast_switchover_metadata()``
on Aurora PostgreSQL, ``rds_tools.show_topology()`` on RDS PostgreSQL, table
``mysql.rds_topology`` on Aurora MySQL and RDS MySQL. ``role`` is
``BLUE_GREEN_DEPLOYMENT_SOURCE`` (blue) or ``BLUE_GREEN_DEPLOYMENT_TARGET`` (green); ``status``
maps to a :class:`Phase`::

    AVAILABLE                      CREATED       deployment exists, nothing moves
    SWITCHOVER_INITIATED           PREPARATION   both sides reachable; names still where they were
    SWITCHOVER_IN_PROGRESS         IN_PROGRESS   writes stop, sessions are dropped, green catches up
    SWITCHOVER_IN_POST_PROCESSING  POST          names move to green; blue's become "-old1"
    SWITCHOVER_COMPLETED           COMPLETED     done (once DNS caught up, see below)

The pure part (:func:`parse_rows`, :func:`observe`, :func:`capture`, :func:`connect_route`,
:func:`holds_statements`) decides; :class:`BlueGreenMonitor` does the I/O: one daemon thread
and one server connection per deployment (``bg_id``) in the process, reading the metadata
every ``bg_interval_*`` and publishing an immutable :class:`Status`. Connections read
``monitor.status`` (one attribute) and wait on it.

Addresses. Before the switchover the monitor resolves every host name of both sides and keeps
the answers (:class:`Deployment`). From ``PREPARATION`` on they are frozen: a connect to a blue
name goes to the blue instance's address as it was, then (``POST``) to the *green* counterpart's
address, keeping the host name for TLS and IAM, whatever a stale resolver says meanwhile.
``COMPLETED`` takes effect once every blue name resolves elsewhere than before and no green name
resolves any more (RDS deletes them); until then, or until ``bg_switchover_timeout_ms`` after
the start, ``POST`` routing continues. Without metadata (a server that has none, a deployment
deleted, a monitor that cannot connect) everything goes through DNS.

Lifecycle as the other monitors (``_monitors``): nothing at import, thread started by the first
connection, supervised (``blue_green.monitor_restarted``), disposed ``monitor_disposal_time_ms``
after its last connection, stopped by :func:`resilient_db.shutdown`, abandoned in a forked child.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from . import _lifecycle
from ._decisions import Decision, get_decision_sink
from ._monitors import MonitorRegistry, SupervisedMonitor
from .drivers.base import DriverDialect
from .rds import EndpointKind, classify, normalize_host

__all__ = [
    "Action",
    "BlueGreenMonitor",
    "Deployment",
    "Phase",
    "Route",
    "Row",
    "Side",
    "Status",
    "capture",
    "connect_route",
    "holds_statements",
    "monitor_for",
    "monitors",
    "observe",
    "parse_rows",
    "stop_all",
]

log = logging.getLogger("resilient_db.blue_green")

#: Versions of the metadata format this module knows; rows of another version are read as
#: the latest known one (the AWS wrapper does the same), with a warning.
KNOWN_VERSIONS = frozenset({"1.0"})
#: Client id passed to the PostgreSQL metadata functions (RDS logs it).
CLIENT_ID = "resilient_db"
#: Bound of the monitor's connect and of each metadata read, seconds.
MONITOR_TIMEOUT = 10.0


class Phase(enum.IntEnum):
    """Switchover phases in order (``IntEnum``: later phases compare greater)."""

    NOT_CREATED = 0
    CREATED = 1
    PREPARATION = 2
    IN_PROGRESS = 3
    POST = 4
    COMPLETED = 5


_PHASE_BY_STATUS = {
    "AVAILABLE": Phase.CREATED,
    "SWITCHOVER_INITIATED": Phase.PREPARATION,
    "SWITCHOVER_IN_PROGRESS": Phase.IN_PROGRESS,
    "SWITCHOVER_IN_POST_PROCESSING": Phase.POST,
    "SWITCHOVER_COMPLETED": Phase.COMPLETED,
}


class Side(enum.Enum):
    BLUE = "BLUE_GREEN_DEPLOYMENT_SOURCE"
    GREEN = "BLUE_GREEN_DEPLOYMENT_TARGET"


@dataclass(frozen=True)
class Row:
    """One metadata row, parsed. ``endpoint`` is normalised (lower case)."""

    version: str
    endpoint: str
    port: int
    side: Side
    phase: Phase


def parse_rows(raw: Iterable[Sequence[Any]]) -> tuple[Row, ...]:
    """Rows ``(version, endpoint, port, role, status)`` as the server returned them. Pure.
    A row with an unknown role or status is skipped (logged): a newer RDS must not stop the
    rest from being read."""
    rows: list[Row] = []
    for item in raw:
        if len(item) < 5:
            continue
        version, endpoint, port, role, status = (item[0], item[1], item[2], item[3], item[4])
        if not endpoint or role is None or status is None:
            continue
        try:
            side = Side(str(role).upper())
            phase = _PHASE_BY_STATUS[str(status).upper()]
        except (ValueError, KeyError):
            log.debug("blue/green: skipping metadata row %r (unknown role or status)", item)
            continue
        text_version = str(version)
        if text_version not in KNOWN_VERSIONS:
            log.warning("blue/green metadata version %s is unknown; read as 1.0", text_version)
        try:
            number = int(port)
        except (TypeError, ValueError):
            number = 0
        rows.append(Row(text_version, normalize_host(str(endpoint)), number, side, phase))
    return tuple(rows)


_OLD_LABEL = re.compile(r"-old1$")
_GREEN_LABEL = re.compile(r"-green-[a-z0-9]{6}$")


def is_old(host: str) -> bool:
    """A name RDS gave the former blue side after a switchover (``<name>-old1...``)."""
    return bool(_OLD_LABEL.search(host.split(".", 1)[0]))


def _first_label(host: str) -> str:
    return host.split(".", 1)[0]


def side_phase(rows: Sequence[Row], side: Side) -> Phase | None:
    """The phase one side reports: that of its cluster (writer) endpoint row, else of an
    instance row; names of the former blue side ("-old1") do not count. ``None``: the side
    has no current row."""
    current = [r for r in rows if r.side is side and not is_old(r.endpoint)]
    for row in current:
        if classify(row.endpoint).kind is EndpointKind.CLUSTER_WRITER:
            return row.phase
    return current[0].phase if current else None


def observe(rows: Sequence[Row]) -> Phase:
    """The deployment's phase from its rows: the further of the two sides (after the names
    move, only green's rows carry current names). No rows: ``NOT_CREATED``. Pure."""
    phases = [p for p in (side_phase(rows, Side.BLUE), side_phase(rows, Side.GREEN))
              if p is not None]
    return max(phases) if phases else Phase.NOT_CREATED


@dataclass(frozen=True)
class Deployment:
    """What the monitor knew before the switchover started: the host names of each side
    (every endpoint row, plus the reader endpoint of each cluster endpoint), their addresses
    then, and each blue name's green counterpart."""

    blue: frozenset[str]
    green: frozenset[str]
    addresses: Mapping[str, frozenset[str]]
    counterpart: Mapping[str, str]

    def side_of(self, host: str) -> Side | None:
        """The side a host name or address belongs to (``None``: neither)."""
        name = normalize_host(host)
        if name in self.blue:
            return Side.BLUE
        if name in self.green:
            return Side.GREEN
        for candidate, addresses in self.addresses.items():
            if name in addresses:
                return Side.BLUE if candidate in self.blue else Side.GREEN
        return None

    def address_of(self, host: str) -> str | None:
        found = sorted(self.addresses.get(normalize_host(host), ()))
        return found[0] if found else None

    def names(self) -> frozenset[str]:
        return self.blue | self.green


def _names(rows: Sequence[Row], side: Side) -> set[str]:
    names: set[str] = set()
    for row in rows:
        if row.side is not side or is_old(row.endpoint):
            continue
        names.add(row.endpoint)
        if classify(row.endpoint).kind is EndpointKind.CLUSTER_WRITER:
            names.add(row.endpoint.replace(".cluster-", ".cluster-ro-", 1))
    return names


def _counterparts(blue: set[str], green: set[str]) -> dict[str, str]:
    """Blue name -> green name: cluster endpoint to cluster endpoint, reader endpoint to
    reader endpoint, instance to the green instance of the same id (RDS names green
    instances ``<id>-green-<6 characters>``), anything else to the green cluster endpoint."""
    kinds = {name: classify(name).kind for name in green}
    green_writer = next((n for n in sorted(green) if kinds[n] is EndpointKind.CLUSTER_WRITER),
                        None)
    green_reader = next((n for n in sorted(green) if kinds[n] is EndpointKind.CLUSTER_READER),
                        None)
    instances = {_GREEN_LABEL.sub("", _first_label(n)): n for n in sorted(green)
                 if kinds[n] is EndpointKind.INSTANCE}
    result: dict[str, str] = {}
    for name in blue:
        kind = classify(name).kind
        target: str | None
        if kind is EndpointKind.CLUSTER_READER:
            target = green_reader or green_writer
        elif kind is EndpointKind.INSTANCE:
            target = instances.get(_first_label(name)) or green_writer
        else:
            target = green_writer
        if target is None and len(instances) == 1:  # single-instance deployments (RDS)
            target = next(iter(instances.values()))
        if target is not None:
            result[name] = target
    return result


def capture(rows: Sequence[Row], resolve: Callable[[str], frozenset[str]]) -> Deployment:
    """The :class:`Deployment` the rows describe, with addresses from ``resolve``. Pure
    apart from ``resolve``."""
    blue, green = _names(rows, Side.BLUE), _names(rows, Side.GREEN)
    addresses = {name: resolve(name) for name in sorted(blue | green)}
    return Deployment(frozenset(blue), frozenset(green),
                      MappingProxyType({k: v for k, v in addresses.items() if v}),
                      MappingProxyType(_counterparts(blue, green)))


@dataclass(frozen=True)
class Status:
    """What connections read: the phase reported, the deployment captured before the
    switchover (``None``: unknown), whether DNS caught up, whether the switchover timed out.
    ``routing_phase`` is the phase routing acts on."""

    phase: Phase = Phase.NOT_CREATED
    deployment: Deployment | None = None
    blue_dns_updated: bool = False
    green_dns_removed: bool = False
    timed_out: bool = False
    #: ``time.monotonic()`` when the monitor published it.
    at: float = 0.0

    @property
    def routing_phase(self) -> Phase:
        if self.timed_out:
            return Phase.COMPLETED
        if self.phase is Phase.COMPLETED and not (self.blue_dns_updated
                                                  and self.green_dns_removed):
            return Phase.POST  # names not moved yet everywhere: keep steering
        return self.phase

    @property
    def quiet(self) -> bool:
        """Nothing to do for statements: no switchover underway."""
        return self.routing_phase in (Phase.NOT_CREATED, Phase.CREATED) or (
            self.routing_phase is Phase.COMPLETED)


UNKNOWN = Status()


class Action(enum.Enum):
    DIRECT = "direct"  # through DNS, as the application asked
    SUBSTITUTE = "substitute"  # to ``Route.address``, keeping the host name
    SUSPEND = "suspend"  # wait for the phase to change
    REJECT = "reject"  # refuse: a green name that is about to disappear


@dataclass(frozen=True)
class Route:
    action: Action
    reason: str
    address: str | None = None
    side: Side | None = None
    counterpart: str | None = None


def connect_route(status: Status, host: str, *, suspend_blue: bool) -> Route:
    """Where a new connection to ``host`` goes now (the AWS wrapper's routing, phase by
    phase). Pure."""
    deployment = status.deployment
    phase = status.routing_phase
    if deployment is None or phase in (Phase.NOT_CREATED, Phase.CREATED, Phase.COMPLETED):
        return Route(Action.DIRECT, f"phase {phase.name}")
    name = normalize_host(host)
    side = deployment.side_of(name)
    if side is None:
        return Route(Action.DIRECT, "host not in the deployment")
    is_name = name in deployment.names()
    if phase is Phase.PREPARATION:
        if side is Side.BLUE and is_name:
            address = deployment.address_of(name)
            if address is not None:
                return Route(Action.SUBSTITUTE, "blue address as before the switchover",
                             address, side)
        return Route(Action.DIRECT, "phase PREPARATION", side=side)
    if phase is Phase.IN_PROGRESS:
        if side is Side.BLUE and is_name and not suspend_blue:
            address = deployment.address_of(name)
            if address is not None:
                return Route(Action.SUBSTITUTE, "blue address as before the switchover; "
                             "statements are held", address, side)
        return Route(Action.SUSPEND, "switchover in progress", side=side)
    # POST (or COMPLETED while DNS catches up)
    if side is Side.GREEN and is_name:
        if status.green_dns_removed:
            return Route(Action.DIRECT, "green names removed", side=side)
        return Route(Action.REJECT, "green host names are deleted at the end of the "
                     "switchover; connect to the blue names", side=side)
    if side is Side.BLUE and is_name:
        target = deployment.counterpart.get(name)
        address = deployment.address_of(target) if target is not None else None
        if target is not None and address is not None:
            return Route(Action.SUBSTITUTE, "blue name now served by green", address, side,
                         target)
        return Route(Action.DIRECT, "no green counterpart known: DNS", side=side)
    return Route(Action.DIRECT, "address", side=side)


def lagging(status: Status, phase: Phase, rows: Sequence[Row]) -> bool:
    """Whether ``rows``, reporting ``phase``, are a copy of the metadata that has not caught
    up rather than news. RDS updates the blue and the green copy separately, and after the
    names move the monitor reads the side they lead to; but a switchover does not go back once
    it has moved the names (``POST``), so an earlier switchover phase read after that, for the
    deployment captured before it (every current name in the rows known then), is a lagging
    copy. A new deployment (new green names), or a read of ``CREATED`` or no deployment,
    counts as news. Pure."""
    deployment = status.deployment
    if deployment is None or status.phase < Phase.POST or not (
            Phase.PREPARATION <= phase < status.phase):
        return False
    return {row.endpoint for row in rows if not is_old(row.endpoint)} <= deployment.names()


def holds_statements(status: Status, side: Side | None) -> bool:
    """Whether a statement on a connection to ``side`` waits now. Pure."""
    return side is not None and status.routing_phase is Phase.IN_PROGRESS


def resolve(host: str) -> frozenset[str]:
    """The addresses ``host`` resolves to now (empty when it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


# --- the monitor -------------------------------------------------------------------------------


class MonitorUser(Protocol):
    """What the monitor needs from a connection that uses it (the ``blue_green`` plugin)."""

    def open_monitoring_connection(self, timeout: float) -> Any:
        """A new autocommit driver connection to the host the application connected to,
        opened within about ``timeout`` seconds through the connection's inner connect chain
        (credentials plugins apply); raises the driver's error otherwise."""
        ...


@dataclass
class Intervals:
    baseline: float = 60.0
    increased: float = 1.0
    high: float = 0.1

    def for_phase(self, status: Status) -> float:
        phase = status.routing_phase
        if phase in (Phase.PREPARATION, Phase.IN_PROGRESS, Phase.POST):
            return self.high
        if phase is Phase.CREATED:
            return self.increased
        return self.baseline


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class BlueGreenMonitor(SupervisedMonitor):
    """The status monitor of one deployment (``bg_id``) for one driver, shared by every
    connection of the process that selected ``blue_green`` with that id.

    Read :attr:`status` any time; :meth:`wait_change` to wait for the next one.
    """

    _log = log

    def __init__(self, key: tuple[Any, ...], bg_id: str, driver: DriverDialect, *,
                 intervals: Intervals, switchover_timeout: float, disposal: float,
                 resolver: Callable[[str], frozenset[str]] = resolve,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bg_id = bg_id
        super().__init__(key, driver, registry=_registry, component="blue_green",
                         thread_name=f"resilient_db-blue-green[{bg_id}]",
                         label=f"blue/green monitor {bg_id}", disposal=disposal, clock=clock)
        self.intervals = intervals
        self.switchover_timeout = switchover_timeout
        self._resolve = resolver
        self._query: str | None = None
        self._poke = False
        #: The current status (replaced, never mutated).
        self.status: Status = UNKNOWN
        #: When the current switchover started (``PREPARATION`` or later first seen).
        self._switch_started: float | None = None
        #: The phase in which the monitor's connection was last opened (it reconnects once
        #: the names moved, to read from the side that now holds them).
        self._connected_in: Phase | None = None
        #: The phase of the lagging metadata copy last reported (``None``: reads caught up).
        self._lagging_seen: Phase | None = None
        #: Reads done and failed (diagnostics, tests); :attr:`crashes`: thread crashes.
        self.reads = 0
        self.failures = 0
        self._unreachable = False

    # --- what connections do -------------------------------------------------------------------
    def attach(self, user: MonitorUser, *, intervals: Intervals, switchover_timeout: float,
               disposal: float) -> bool:
        """Register a connection (held weakly); the shortest intervals and the longest
        disposal of the connections using it apply. Starts the thread. False when the
        monitor stopped meanwhile: get a new one."""

        def adopt() -> None:
            self.intervals = Intervals(min(self.intervals.baseline, intervals.baseline),
                                       min(self.intervals.increased, intervals.increased),
                                       min(self.intervals.high, intervals.high))
            self.switchover_timeout = min(self.switchover_timeout, switchover_timeout)
            self._poke = True
            self._cond.notify_all()

        return self._attach(user, disposal, adopt)

    def poke(self) -> None:
        """Read the metadata now (a connection saw an error that a switchover explains)."""
        with self._cond:
            self._poke = True
            self._cond.notify_all()

    def wait_change(self, seen: Status, timeout: float) -> Status:
        """The status once it is not ``seen`` any more, or after ``timeout`` seconds."""
        deadline = self._clock() + timeout
        with self._cond:
            while self.status is seen and not self._stopping.is_set():
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self.status

    # --- the thread ----------------------------------------------------------------------------
    def _record_restart(self, exc: Exception, backoff: float) -> None:
        self._record("blue_green.monitor_restarted", {
            "error.type": type(exc).__name__,
            "resilient_db.monitor.crashes": self.crashes,
            "resilient_db.blue_green.backoff": backoff})

    def _step(self, started: float, idle_until: float) -> None:
        self._read()
        wake = min(started + self.intervals.for_phase(self.status), idle_until)
        with self._cond:
            while not self._stopping.is_set() and not self._poke:
                left = wake - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._poke = False

    def _read(self) -> None:
        """One round: read the metadata (connecting if needed), publish the new status."""
        try:
            if self._conn is None:
                self._connect()
            raw_rows = self._fetch()
        except Exception as exc:
            self._close()
            if self._stopping.is_set():
                return
            self.failures += 1
            if not self._unreachable:
                self._unreachable = True
                log.debug("blue/green monitor %s cannot read the metadata: %s", self.bg_id,
                          _describe(exc))
                self._record("blue_green.monitor_unreachable",
                             {"resilient_db.blue_green.last_error": _describe(exc)})
            self._publish(dataclasses.replace(self.status, at=self._clock()), raw_rows=None)
            return
        self._unreachable = False
        self.reads += 1
        self._publish(self.status, raw_rows=raw_rows)

    def _publish(self, previous: Status, *, raw_rows: list[tuple[Any, ...]] | None) -> None:
        now = self._clock()
        if raw_rows is None:
            new = previous  # nothing read: keep what was known (timer below still runs)
        else:
            rows = parse_rows(raw_rows)
            phase = observe(rows)
            if lagging(previous, phase, rows):
                self._report_lagging(phase, previous.phase)
                phase = previous.phase  # keep what was known: no going back after POST
            else:
                self._lagging_seen = None
            deployment = previous.deployment
            if phase <= Phase.CREATED:
                # Before a switchover: (re)learn names and addresses; a new deployment or a
                # rolled-back switchover starts over.
                deployment = capture(rows, self._resolve) if rows else None
                self._switch_started = None
            elif self._switch_started is None:
                self._switch_started = now
            blue_updated, green_removed = previous.blue_dns_updated, previous.green_dns_removed
            if deployment is not None and phase >= Phase.POST:
                # Every blue name leads elsewhere now (or nowhere: a blue instance with no
                # green counterpart).
                blue_updated = blue_updated or all(
                    self._resolve(name).isdisjoint(deployment.addresses.get(name, frozenset()))
                    for name in deployment.blue if name in deployment.addresses)
                green_removed = green_removed or all(
                    not self._resolve(name) for name in deployment.green)
            elif phase <= Phase.CREATED:
                blue_updated = green_removed = False
            new = Status(phase, deployment, blue_updated, green_removed, False, now)
        started = self._switch_started
        timed_out = (started is not None and new.routing_phase is not Phase.COMPLETED
                     and now - started >= self.switchover_timeout)
        if timed_out or (previous.timed_out and new.phase > Phase.CREATED):
            # Sticky until the deployment is back to CREATED (or gone): a switchover that
            # outlasted bg_switchover_timeout_ms, even one whose DNS never caught up.
            new = dataclasses.replace(new, timed_out=True)
        self._set(previous, new)
        if raw_rows is not None and new.phase >= Phase.POST and (
                self._connected_in is not None and self._connected_in < Phase.POST):
            self._close()  # read from the side that holds the names now, next round

    def _set(self, previous: Status, new: Status) -> None:
        old = self.status
        with self._cond:
            self.status = new
            self._cond.notify_all()
        if (old.routing_phase, old.phase, old.timed_out) != (
                new.routing_phase, new.phase, new.timed_out):
            for user in self._live_users():
                changed = getattr(user, "status_changed", None)
                if changed is not None:
                    changed()  # its plugin joins or leaves its connection's chains
            attributes: dict[str, Any] = {
                "resilient_db.blue_green.phase": new.phase.name,
                "resilient_db.blue_green.previous_phase": old.phase.name,
                "resilient_db.blue_green.routing_phase": new.routing_phase.name,
                "resilient_db.blue_green.blue_dns_updated": new.blue_dns_updated,
                "resilient_db.blue_green.green_dns_removed": new.green_dns_removed,
                "resilient_db.blue_green.timed_out": new.timed_out,
            }
            if new.phase < old.phase and new.phase >= Phase.CREATED:
                attributes["resilient_db.blue_green.rollback"] = True
            self._record("blue_green.phase_changed", attributes)
            log.info("blue/green deployment %s: phase %s -> %s (routing as %s)", self.bg_id,
                     old.phase.name, new.phase.name, new.routing_phase.name)
            if new.timed_out and not old.timed_out:
                log.warning("blue/green deployment %s: switchover unfinished after %.0f s "
                            "(bg_switchover_timeout_ms); using DNS as is", self.bg_id,
                            self.switchover_timeout)

    def _report_lagging(self, read: Phase, kept: Phase) -> None:
        if self._lagging_seen is read:
            return  # once per run of lagging reads
        self._lagging_seen = read
        log.debug("blue/green monitor %s: metadata says %s after %s (a copy not caught up); "
                  "keeping %s", self.bg_id, read.name, kept.name, kept.name)
        self._record("blue_green.metadata_lagging", {
            "resilient_db.blue_green.phase": kept.name,
            "resilient_db.blue_green.read_phase": read.name})

    def _record(self, kind: str, attributes: dict[str, Any]) -> None:
        get_decision_sink().record(Decision(kind, "blue_green", {
            "resilient_db.blue_green.id": self.bg_id, **attributes}, time.monotonic()))

    def _connect(self) -> None:
        conn = self._some_user().open_monitoring_connection(MONITOR_TIMEOUT)
        if not self._adopt(conn):
            raise RuntimeError("stopping")
        self._query = None
        self._connected_in = self.status.phase

    def _fetch(self) -> list[tuple[Any, ...]]:
        conn = self._conn
        query = self._query
        if query is None:
            # Asked again at every read until found: a deployment created later brings its
            # metadata (MySQL's mysql.rds_topology table appears with it).
            query = metadata_query(self.driver, conn)
            if not query:
                return []  # no blue/green metadata on this server (yet)
            self._query = query
        return self.driver.query(conn, query)

    def _disposed(self) -> None:
        self._record("blue_green.monitor_disposed",
                     {"resilient_db.blue_green.disposal": self.disposal})

    def __repr__(self) -> str:
        return (f"<BlueGreenMonitor {self.bg_id} phase={self.status.phase.name} "
                f"users={self.users}>")


def metadata_query(driver: DriverDialect, conn: Any) -> str:
    """The statement that reads blue/green metadata on the server behind ``conn`` (``""``:
    the server has none). Schema-qualified (DESIGN §10)."""
    if driver.code == "psycopg":
        found = driver.query(conn, (
            "SELECT pg_catalog.to_regproc("
            "'pg_catalog.get_blue_green_fast_switchover_metadata') IS NOT NULL, "
            "pg_catalog.to_regproc('rds_tools.show_topology') IS NOT NULL"))
        aurora, rds = (bool(found[0][0]), bool(found[0][1])) if found else (False, False)
        if aurora:
            return ("SELECT version, endpoint, port, role, status FROM "
                    f"pg_catalog.get_blue_green_fast_switchover_metadata('{CLIENT_ID}')")
        if rds:
            return ("SELECT version, endpoint, port, role, status FROM "
                    f"rds_tools.show_topology('{CLIENT_ID}')")
        return ""
    found = driver.query(conn, (
        "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = 'mysql' "
        "AND TABLE_NAME = 'rds_topology' AND COLUMN_NAME IN ('role', 'status')"))
    if found and int(found[0][0]) == 2:
        return "SELECT version, endpoint, port, role, status FROM mysql.rds_topology"
    return ""


# --- the registry ---------------------------------------------------------------------------

_registry: MonitorRegistry[BlueGreenMonitor] = MonitorRegistry(
    "blue_green.monitors_stopped", "resilient_db.blue_green.monitors")


def monitor_for(key: tuple[Any, ...], create: Callable[[], BlueGreenMonitor],
                ) -> BlueGreenMonitor:
    return _registry.get_or_create(key, create)


def monitors() -> list[BlueGreenMonitor]:
    return _registry.all()


def stop_all() -> None:
    _registry.stop_all()


_lifecycle.on_fork_child(_registry.reset_in_child)

