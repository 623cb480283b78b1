"""Aurora Global Database decisions (DESIGN §3). Pure: no I/O, no threads, no database.

An Aurora Global Database is one writer (the primary region's cluster) and read-only clusters
in secondary regions replicating from it; a global switchover or failover moves the writer to
another region. An application deployed in one region, its *home region*, may want different
behaviour depending on whether the primary region is home (*active home*) or elsewhere
(*inactive home*): follow the writer while it is local, and fall back to a local reader once it
moved away, say. The ``gdb_failover`` and ``gdb_rw`` plugins ask this module:

- which home region applies: :func:`home_region` (property, else the endpoint's region);
- which failover mode applies now: :func:`decide_mode` (a :class:`HomeDecision`);
- which instances to try, in which order: :func:`plan_global` (a regional filter over
  :func:`~resilient_db.failover_core.plan_attempts`);
- which instances read/write splitting may use: :func:`splitting_readers`,
  :func:`writer_refusal`.

Instances carry their region (:attr:`~resilient_db.hosts.Host.region`) from the global
topology (``aurora_global_db_instance_status``); each region's instances are addressed with
that region's pattern (:func:`parse_region_patterns`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ._decisions import Decision
from .errors import ConfigurationError
from .failover_core import FailoverMode, FailoverPlan, plan_attempts
from .hosts import BadHostMemory, Host, TopologySnapshot
from .rds import EndpointKind, HostPattern, classify
from .selection import SelectionContext, Strategy

__all__ = [
    "GlobalFailoverMode",
    "HomeDecision",
    "decide_mode",
    "default_global_mode",
    "home_region",
    "parse_region_patterns",
    "plan_global",
    "splitting_readers",
    "writer_refusal",
]


class GlobalFailoverMode(enum.Enum):
    """Which instances ``gdb_failover`` connects to (AWS's ``active_home_failover_mode`` /
    ``inactive_home_failover_mode`` values). "Home" readers are readers in the home region;
    "out of home" readers are readers in any other region; the writer may be in any region."""

    STRICT_WRITER = "strict-writer"  # the (new) writer, wherever it is
    STRICT_HOME_READER = "strict-home-reader"  # a home reader, else nothing
    STRICT_OUT_OF_HOME_READER = "strict-out-of-home-reader"  # an out-of-home reader only
    STRICT_ANY_READER = "strict-any-reader"  # a reader of any region only
    HOME_READER_OR_WRITER = "home-reader-or-writer"  # a home reader, else the writer
    OUT_OF_HOME_READER_OR_WRITER = "out-of-home-reader-or-writer"  # idem, out of home
    ANY_READER_OR_WRITER = "any-reader-or-writer"  # any reader, else the writer

    @classmethod
    def parse(cls, text: str, parameter: str) -> GlobalFailoverMode:
        """A mode from its name (case-insensitive, ``_`` or ``-``); ``ConfigurationError``
        naming ``parameter`` and listing the valid values otherwise."""
        key = text.strip().lower().replace("_", "-")
        for mode in cls:
            if mode.value == key:
                return mode
        raise ConfigurationError(
            f"{parameter}: unknown mode {text!r}; expected one of "
            f"{', '.join(m.value for m in cls)}",
            parameter=parameter,
            value=text,
        )

    @property
    def base(self) -> FailoverMode:
        """The regional failover mode the filtered topology is planned with."""
        if self is GlobalFailoverMode.STRICT_WRITER:
            return FailoverMode.STRICT_WRITER
        if self.value.startswith("strict-"):
            return FailoverMode.STRICT_READER
        return FailoverMode.READER_OR_WRITER


#: Property values, in the order the docs list them.
GLOBAL_FAILOVER_MODES = tuple(m.value for m in GlobalFailoverMode)


def default_global_mode(kind: EndpointKind) -> GlobalFailoverMode:
    """The mode when none is configured (as the AWS wrapper): a cluster (writer) endpoint or
    the global writer endpoint follows the writer; any other name prefers a home reader."""
    if kind in (EndpointKind.CLUSTER_WRITER, EndpointKind.GLOBAL_WRITER):
        return GlobalFailoverMode.STRICT_WRITER
    return GlobalFailoverMode.HOME_READER_OR_WRITER


def home_region(configured: str | None, host: str, parameter: str) -> str:
    """The home region: ``configured`` when set, else the region of the RDS endpoint ``host``.
    ``ConfigurationError`` naming ``parameter`` when neither gives one (an IP address, a
    custom domain, the global writer endpoint)."""
    if configured is not None and configured.strip():
        return configured.strip().lower()
    endpoint = classify(host)
    if endpoint.region:
        return endpoint.region
    raise ConfigurationError(
        f"{parameter} is required: the host {host!r} names no AWS region (an IP address, a "
        "custom domain or the global writer endpoint); set it to the region the application "
        "runs in, e.g. 'us-east-1'",
        parameter=parameter,
        value=configured,
    )


def parse_region_patterns(text: str) -> tuple[tuple[str, HostPattern], ...]:
    """Parse ``global_cluster_instance_host_patterns``: comma-separated ``region:pattern`` or
    ``region:pattern:port`` entries, one per region. ``ValueError`` saying what is wrong."""
    entries: list[tuple[str, HostPattern]] = []
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        region, sep, pattern = item.partition(":")
        region = region.strip().lower()
        if not sep or not region or "?" in region or "." in region:
            raise ValueError(
                f"entry {item!r}: expected 'region:host-pattern' (e.g. "
                "'us-east-1:?.abc123.us-east-1.rds.amazonaws.com')")
        if any(region == known for known, _ in entries):
            raise ValueError(f"region {region!r} is listed twice")
        entries.append((region, HostPattern.parse(pattern)))
    if not entries:
        raise ValueError("expected at least one 'region:host-pattern' entry")
    return tuple(entries)


@dataclass(frozen=True)
class HomeDecision:
    """Which mode applies now. ``primary`` is the region of the writer the topology names
    (``None``: no writer known, then the home is taken as active); ``active``: the primary
    region is the home region."""

    home: str
    primary: str | None
    active: bool
    mode: GlobalFailoverMode
    plugin: str = "gdb_failover"

    def to_decision(self) -> Decision:
        return Decision(f"{self.plugin}.mode", self.plugin, {
            "resilient_db.gdb.home_region": self.home,
            "resilient_db.gdb.primary_region": self.primary or "",
            "resilient_db.gdb.home_active": self.active,
            "resilient_db.failover.mode": self.mode.value,
        })


def decide_mode(home: str, topology: TopologySnapshot | None,
                active_mode: GlobalFailoverMode,
                inactive_mode: GlobalFailoverMode) -> HomeDecision:
    """The active-home mode while the topology's writer is in ``home`` (or no writer is
    known), the inactive-home mode otherwise."""
    writer = topology.writer if topology is not None else None
    primary = writer.region if writer is not None else None
    active = primary is None or primary == home
    return HomeDecision(home, primary, active, active_mode if active else inactive_mode)


def _regional(topology: TopologySnapshot, readers: Sequence[Host],
              with_writer: bool) -> TopologySnapshot:
    hosts = tuple(readers) + ((topology.writer,) if with_writer and topology.writer else ())
    return replace(topology, hosts=hosts)


def plan_global(
    mode: GlobalFailoverMode,
    topology: TopologySnapshot,
    home: str,
    bad_hosts: BadHostMemory,
    now: float,
    strategy: Strategy,
    ctx: SelectionContext,
    *,
    max_lag: float | None = None,
) -> FailoverPlan:
    """The attempts of one failover round in ``mode``: the topology narrowed to the mode's
    instances, planned with the regional mode (:attr:`GlobalFailoverMode.base`). A strict
    reader mode never falls back to the writer, even when the narrowed set has no reader
    (then the plan is empty: wait for the topology)."""
    home_readers = [h for h in topology.readers if h.region == home]
    away_readers = [h for h in topology.readers if h.region != home]
    narrowed = {
        GlobalFailoverMode.STRICT_WRITER: topology,
        GlobalFailoverMode.STRICT_HOME_READER: _regional(topology, home_readers, False),
        GlobalFailoverMode.STRICT_OUT_OF_HOME_READER: _regional(topology, away_readers, False),
        GlobalFailoverMode.STRICT_ANY_READER: _regional(topology, topology.readers, False),
        GlobalFailoverMode.HOME_READER_OR_WRITER: _regional(topology, home_readers, True),
        GlobalFailoverMode.OUT_OF_HOME_READER_OR_WRITER:
            _regional(topology, away_readers, True),
        GlobalFailoverMode.ANY_READER_OR_WRITER: topology,
    }[mode]
    if mode.base is FailoverMode.STRICT_READER and not narrowed.readers:
        return FailoverPlan(mode.base, (), topology.epoch)
    return plan_attempts(mode.base, narrowed, bad_hosts, now, strategy, ctx, max_lag=max_lag)


def splitting_readers(topology: TopologySnapshot, home: str,
                      restrict_to_home: bool) -> tuple[Host, ...]:
    """The readers ``gdb_rw`` may move a connection to: the home region's only when
    ``restrict_to_home``, else every reader, home readers first."""
    home_readers = tuple(h for h in topology.readers if h.region == home)
    if restrict_to_home:
        return home_readers
    return home_readers + tuple(h for h in topology.readers if h.region != home)


def writer_refusal(writer: Host | None, home: str, restrict_to_home: bool) -> str | None:
    """Why ``gdb_rw`` must not connect to ``writer`` (``None``: it may): with
    ``restrict_to_home`` a writer outside the home region is refused."""
    if writer is None or not restrict_to_home or writer.region in (None, home):
        return None
    return (f"the writer {writer} is in region {writer.region}, outside the home region "
            f"{home} (gdb_rw_restrict_writer_to_home_region=True)")
