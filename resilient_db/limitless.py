"""Aurora PostgreSQL Limitless Database: the transaction routers of a DB shard group, their load,
which router a connection goes to, and the process-wide router monitor (DESIGN §3, §6, §7).

A Limitless shard group is reached through its shard group endpoint, which DNS resolves to one
of its transaction routers without regard to their load. The routers and their load (0 to 1)
are listed by ``pg_catalog.aurora_limitless_router_endpoints()`` on any router.

Pure part: :func:`parse_routers` turns the rows into :class:`Router` values with a selection
weight (:func:`weight_of`: ``10 - floor(10 * load)``, so a router at load 0.05 weighs 10 and
one at 0.95 weighs 1; a load outside 0..1 weighs 1, as in the AWS wrappers), and
:func:`choose` picks a router: at random in proportion to weight (``weighted_random``, a new
connection) or the heaviest (``highest_weight``, a retry after a router failed), leaving out
routers marked down. Each choice is a :class:`RouterChoice` value the telemetry layer records.

I/O part: one :class:`RouterMonitor` per shard group endpoint (driver, host, port), shared by
every connection of the process that selected the ``limitless`` plugin, with one daemon thread
and one server connection: every ``interval`` it reads the router list (bounded by
:data:`QUERY_TIMEOUT`) and publishes it. It remembers routers marked down after a failed
connect, each for one interval (then it is tried again). Lifecycle as the other monitors
(``_monitors.SupervisedMonitor``): nothing at import; the thread starts with the first
connection; it is supervised (a crash is logged, counted, recorded as
``limitless.monitor_restarted`` and restarted with backoff); it ends ``disposal`` seconds after
its last connection went away and at ``resilient_db.shutdown()``; after ``fork()`` the child
abandons the inherited monitors.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import _lifecycle
from ._decisions import Decision, get_decision_sink
from ._monitors import MonitorRegistry, SupervisedMonitor
from ._pipeline import HostSpec
from .drivers.base import DriverDialect
from .watchdog import abort_after

__all__ = [
    "MAX_WEIGHT",
    "MONITOR_APPLICATION_NAME",
    "QUERY_TIMEOUT",
    "ROUTER_QUERY",
    "Router",
    "RouterChoice",
    "RouterMonitor",
    "RouterUser",
    "choose",
    "monitor_for",
    "monitors",
    "parse_routers",
    "read_routers",
    "stop_all",
    "weight_of",
]

log = logging.getLogger("resilient_db.limitless")

PLUGIN = "limitless"
#: The router list, schema-qualified (DESIGN §10).
ROUTER_QUERY = ("SELECT router_endpoint, load "
                "FROM pg_catalog.aurora_limitless_router_endpoints()")
#: Application name of the monitor's connection (PostgreSQL shows it in pg_stat_activity).
MONITOR_APPLICATION_NAME = "resilient_db-limitless"
#: Bound of one read of the router list (and of connecting for it), seconds.
QUERY_TIMEOUT = 5.0
#: Weight of a router with no load at all.
MAX_WEIGHT = 10


# --- the pure part ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Router:
    """One transaction router: where to connect (``host``, ``port``; ``None``: the shard
    group endpoint's port), the ``load`` the list reported (``None``: not a number) and the
    selection ``weight`` it gives (1 to :data:`MAX_WEIGHT`)."""

    host: str
    port: int | None
    load: float | None
    weight: int

    @property
    def address(self) -> str:
        """``host:port`` in lower case: how routers are told apart."""
        return f"{self.host.lower()}:{self.port}"

    @property
    def spec(self) -> HostSpec:
        return HostSpec(self.host, self.port)

    def __str__(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


def weight_of(load: object) -> int:
    """The selection weight of a router reporting ``load``: ``10 - floor(10 * load)`` for a
    load from 0 to 1 (at least 1: a router at full load is still a candidate), 1 for anything
    else (a negative, too large or missing load says nothing trustworthy)."""
    if isinstance(load, bool) or not isinstance(load, (int, float)) or not math.isfinite(load):
        return 1
    weight = MAX_WEIGHT - math.floor(float(load) * MAX_WEIGHT)
    return weight if 1 <= weight <= MAX_WEIGHT else 1


def _load(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]  # Decimal, str from a text column
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def parse_routers(rows: Iterable[Sequence[Any]], port: int | None) -> tuple[Router, ...]:
    """Routers from the rows of :data:`ROUTER_QUERY` (``(router_endpoint, load)``), each on
    ``port`` (the shard group endpoint's: every router listens on it). Rows without an
    endpoint are left out; a duplicate endpoint counts once."""
    routers: list[Router] = []
    seen: set[str] = set()
    for row in rows:
        endpoint = str(row[0] or "").strip() if len(row) > 0 else ""
        if not endpoint:
            continue
        load = _load(row[1]) if len(row) > 1 else None
        router = Router(endpoint, port, load, weight_of(load))
        if router.address not in seen:
            seen.add(router.address)
            routers.append(router)
    return tuple(routers)


@dataclass(frozen=True)
class RouterChoice:
    """Which router a connection goes to, and why. ``strategy``: ``weighted_random`` (a new
    connection), ``highest_weight`` (after a router failed) or ``named`` (the host given is a
    router); ``router`` ``None``: every router is marked down or tried already."""

    router: Router | None
    strategy: str
    candidates: tuple[Router, ...]
    skipped: tuple[str, ...] = ()

    def to_decision(self) -> Decision:
        router = self.router
        return Decision("limitless.router_selected", PLUGIN, {
            "server.address": router.host if router else None,
            "server.port": router.port if router else None,
            "resilient_db.limitless.strategy": self.strategy,
            "resilient_db.limitless.load": router.load if router else None,
            "resilient_db.limitless.weight": router.weight if router else None,
            "resilient_db.limitless.candidates": tuple(str(r) for r in self.candidates),
            "resilient_db.limitless.weights": tuple(r.weight for r in self.candidates),
            "resilient_db.limitless.skipped": self.skipped,
        })


def choose(routers: Sequence[Router], strategy: str, *, avoid: Collection[str] = (),
           rng: random.Random | None = None) -> RouterChoice:
    """Pick a router not in ``avoid`` (addresses: marked down or tried already).

    ``weighted_random``: at random in proportion to weight (``rng``, injected so that tests
    seed it); ``highest_weight``: the heaviest, the first listed among equals."""
    candidates = tuple(r for r in routers if r.address not in avoid)
    skipped = tuple(r.address for r in routers if r.address in avoid)
    if not candidates:
        return RouterChoice(None, strategy, candidates, skipped)
    if strategy == "highest_weight":
        best = max(candidates, key=lambda r: r.weight)  # max keeps the first of equals
        return RouterChoice(best, strategy, candidates, skipped)
    if strategy != "weighted_random":
        raise ValueError(f"unknown router strategy {strategy!r}")
    pick = (rng or random).uniform(0, sum(r.weight for r in candidates))
    for router in candidates:
        pick -= router.weight
        if pick < 0:
            return RouterChoice(router, strategy, candidates, skipped)
    return RouterChoice(candidates[-1], strategy, candidates, skipped)


# --- reading the list -----------------------------------------------------------------------------


def read_routers(driver: DriverDialect, conn: Any, port: int | None,
                 timeout: float = QUERY_TIMEOUT) -> tuple[Router, ...]:
    """The router list read on ``conn`` within ``timeout`` seconds (the connection's socket is
    broken when it runs out: the driver's network error goes up); the driver's error when the
    function does not exist (not a Limitless shard group)."""
    with abort_after(timeout, lambda: driver.abort(conn)):
        rows = driver.query(conn, ROUTER_QUERY)
    return parse_routers(rows, port)


class RouterUser(Protocol):
    """What a monitor needs from a connection that uses it (the ``limitless`` plugin)."""

    def open_router_list_connection(self, host: HostSpec, timeout: float) -> Any:
        """A new autocommit driver connection to the shard group endpoint ``host``, opened
        within about ``timeout`` seconds through the connection's inner connect chain
        (credentials plugins apply); raises the driver's error otherwise."""
        ...


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RouterMonitor(SupervisedMonitor):
    """The router list of one shard group endpoint (``host``), read every ``interval`` seconds
    on a daemon thread and shared by every connection through that endpoint.

    Read :attr:`routers` (``None``: not known yet), :attr:`fetched_at`, :attr:`problem`,
    :attr:`fetches`, :attr:`crashes` any time; :meth:`down` gives the routers marked down.
    """

    _log = log

    def __init__(self, key: tuple[Any, ...], host: HostSpec, driver: DriverDialect, *,
                 interval: float, disposal: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        super().__init__(key, driver, registry=_registry, component=PLUGIN,
                         thread_name=f"resilient_db-limitless[{host}]",
                         label=f"limitless router monitor of {host}",
                         disposal=disposal, clock=clock)
        self.interval = interval
        self._down: dict[str, float] = {}
        #: Serialises reads of the list made on the spot by connecting threads.
        self.fetch_lock = threading.Lock()
        #: The last router list read (``None``: none yet) and when (``time.monotonic()``).
        self.routers: tuple[Router, ...] | None = None
        self.fetched_at: float | None = None
        #: Why the last read failed (``None``: it did not, or none was made yet).
        self.problem: str | None = None
        #: Reads made by the thread, answered or not.
        self.fetches = 0

    # --- what connections read and do ---------------------------------------------------------
    def attach(self, user: RouterUser, *, interval: float, disposal: float) -> bool:
        """Register a connection using this monitor (held weakly); the shortest interval and
        the longest disposal time of the connections using it apply. Starts the thread if it
        is not running. False when the monitor stopped meanwhile: get a new one."""

        def adopt() -> None:
            if interval < self.interval:
                self.interval = interval
                self._cond.notify_all()  # the pause in progress was based on the old interval

        return self._attach(user, disposal, adopt)

    def publish(self, routers: tuple[Router, ...], source: str) -> None:
        """Install a router list (read by the thread, or on the spot by a connecting thread:
        ``source`` ``"monitor"`` / ``"on_connect"``) and record it."""
        with self._cond:
            changed = routers != self.routers
            self.routers = routers
            self.fetched_at = self._clock()
            self.problem = None
        if changed:
            log.info("limitless %s: routers %s", self.host,
                     ", ".join(f"{r} (load {r.load}, weight {r.weight})" for r in routers)
                     or "none")
        get_decision_sink().record(Decision("limitless.routers_refreshed", PLUGIN, {
            "server.address": self.host.host, "server.port": self.host.port,
            "resilient_db.limitless.source": source,
            "resilient_db.limitless.changed": changed,
            "resilient_db.limitless.routers": tuple(str(r) for r in routers),
            "resilient_db.limitless.loads": tuple(
                -1.0 if r.load is None else r.load for r in routers),
            "resilient_db.limitless.weights": tuple(r.weight for r in routers)}))

    def failed(self, exc: BaseException, source: str) -> None:
        """A read of the list failed; the last list is kept."""
        problem = _describe(exc)
        if problem != self.problem:
            log.warning("limitless %s: cannot read the router list (%s); %s", self.host,
                        problem, "keeping the last one" if self.routers else
                        "no router list yet")
        self.problem = problem
        get_decision_sink().record(Decision("limitless.fetch_failed", PLUGIN, {
            "server.address": self.host.host, "server.port": self.host.port,
            "error.type": type(exc).__name__, "resilient_db.limitless.source": source,
            "resilient_db.limitless.problem": problem}))

    def mark_down(self, router: Router, exc: BaseException | None) -> None:
        """``router`` failed (a connect, or a connection to it broke): left out of choices
        for one interval."""
        with self._cond:
            fresh = router.address not in self._down
            self._down[router.address] = self._clock() + self.interval
        if fresh:
            get_decision_sink().record(Decision("limitless.host_down", PLUGIN, {
                "server.address": router.host, "server.port": router.port,
                "error.type": type(exc).__name__ if exc is not None else None,
                "resilient_db.limitless.until": self.interval}))

    def mark_up(self, router: Router) -> None:
        with self._cond:
            was = self._down.pop(router.address, None)
        if was is not None:
            get_decision_sink().record(Decision("limitless.host_up", PLUGIN, {
                "server.address": router.host, "server.port": router.port}))

    def down(self) -> frozenset[str]:
        """Addresses of the routers marked down now."""
        now = self._clock()
        with self._cond:
            for address in [a for a, until in self._down.items() if until <= now]:
                del self._down[address]
            return frozenset(self._down)

    def abandon(self) -> None:
        """In a child process after ``fork()`` (see :meth:`SupervisedMonitor.abandon`); the
        on-the-spot fetch lock is replaced too (a parent thread may have held it)."""
        self.fetch_lock = threading.Lock()
        super().abandon()

    # --- the thread ----------------------------------------------------------------------------
    def _record_restart(self, exc: Exception, backoff: float) -> None:
        get_decision_sink().record(Decision("limitless.monitor_restarted", PLUGIN, {
            "server.address": self.host.host, "error.type": type(exc).__name__,
            "resilient_db.monitor.crashes": self.crashes}))

    def _step(self, started: float, idle_until: float) -> None:
        self._fetch()
        # The interval read anew: attach() may have shortened it meanwhile.
        self._pause_until(lambda: min(started + self.interval, idle_until))

    def _fetch(self) -> None:
        self.fetches += 1
        try:
            conn = self._conn if self._conn is not None else self._connect()
            routers = read_routers(self.driver, conn, self.host.port)
        except Exception as exc:
            self._close()
            if not self._stopping.is_set():
                self.failed(exc, "monitor")
            return
        self.publish(routers, "monitor")

    def _connect(self) -> Any:
        conn = self._some_user().open_router_list_connection(self.host, QUERY_TIMEOUT)
        if not self._adopt(conn):
            raise RuntimeError("stopping")
        return conn

    def _disposed(self) -> None:
        log.debug("limitless router monitor of %s disposed after %.0f s without users",
                  self.host, self.disposal)
        get_decision_sink().record(Decision("limitless.monitor_disposed", PLUGIN, {
            "server.address": self.host.host, "resilient_db.limitless.disposal": self.disposal}))

    def __repr__(self) -> str:
        count = None if self.routers is None else len(self.routers)
        return (f"<RouterMonitor {self.host} interval={self.interval:g} routers={count} "
                f"users={self.users}>")


# --- the registry ---------------------------------------------------------------------------------

_registry: MonitorRegistry[RouterMonitor] = MonitorRegistry(
    "limitless.monitors_stopped", "resilient_db.limitless.monitors")


def monitor_for(key: tuple[Any, ...], create: Callable[[], RouterMonitor]) -> RouterMonitor:
    """The monitor of shard group endpoint ``key``, created with ``create`` when there is none
    (or the one there was stopped or disposed)."""
    return _registry.get_or_create(key, create)


def monitors() -> list[RouterMonitor]:
    """Every live router monitor of the process (tests, diagnostics)."""
    return _registry.all()


def stop_all() -> None:
    """Stop every monitor and forget them (``resilient_db.shutdown``); connections that need
    one later start a new one."""
    _registry.stop_all()


_lifecycle.on_fork_child(_registry.reset_in_child)
