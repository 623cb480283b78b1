"""Hosts, topology snapshots, the topology epoch and known-bad hosts: immutable values. Pure.

- :class:`Host`: one instance as failover and reader selection see it (address, id, role,
  lag, ...).
- :class:`TopologySnapshot`: the cluster at one moment, built from a dialect's
  :class:`~resilient_db.dialects.base.TopologyRow` values and a host pattern
  (:func:`snapshot_from_rows`). Named apart from ``dialects.base.Topology``, which is the
  parsed answer of one topology query; a snapshot is what the topology monitor publishes.
- :func:`advance`: the topology epoch (DESIGN §5). A connection remembers the epoch it was
  opened under; when the epoch moves on, it is recycled lazily at its next checkout.
- :class:`BadHostMemory`: hosts recently found down, remembered for a cool-down period.

Hosts are keyed by *address* (:func:`address_of`, ``host:port`` in lower case) everywhere:
failure monitors, connection counts, response times and the bad-host memory all know the
address, not always the instance id. Resolve ports before keying (``h`` and ``h:5432`` are
different keys): pass the dialect's default port where the user gave none.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from ._decisions import Decision
from ._pipeline import HostsContext, HostsHandler, HostSpec
from ._properties import Settings
from .dialects.base import Topology, TopologyRow
from .rds import HostPattern, normalize_host

__all__ = [
    "Advance",
    "Availability",
    "BadHostMemory",
    "Host",
    "Role",
    "TopologyChange",
    "TopologySnapshot",
    "address_of",
    "advance",
    "allowed_only",
    "snapshot_from_rows",
    "snapshot_from_topology",
]


class Role(enum.Enum):
    """An instance's role. ``UNKNOWN``: not (yet) checked."""

    WRITER = "writer"
    READER = "reader"
    UNKNOWN = "unknown"


class Availability(enum.Enum):
    UP = "up"
    DOWN = "down"


def address_of(host: str, port: int | None) -> str:
    """The key of an address: normalised host, ``:port`` when given (IPv6 in brackets then)."""
    name = normalize_host(host)
    if port is None:
        return name
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def _key(host: Host | HostSpec | str) -> str:
    if isinstance(host, str):
        return host.strip().lower()
    if isinstance(host, Host):
        return host.address
    return address_of(host.host, host.port)


@dataclass(frozen=True)
class Host:
    """One instance.

    ``port`` ``None``: the driver's default. ``instance_id`` ``None``: not known (a host the
    user named, not read from topology). ``weight`` (>= 0) is used by weighted selection
    strategies; 0 means "only when every candidate weighs 0". ``lag`` is the replica lag in
    seconds (``None``: not reported, e.g. the writer, or Multi-AZ). ``last_update`` is when the
    cluster last heard from the instance and ``cpu`` its CPU percentage (``None``: not
    reported). ``region`` is the AWS region of an Aurora Global Database instance (``None``:
    not reported, a single-region cluster). ``address`` is the key (:func:`address_of`).
    """

    host: str
    port: int | None = None
    _: KW_ONLY
    instance_id: str | None = None
    role: Role = Role.UNKNOWN
    availability: Availability = Availability.UP
    weight: float = 1.0
    lag: float | None = None
    last_update: datetime | None = None
    cpu: float | None = None
    region: str | None = None
    address: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("a host needs a name or address")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if not self.weight >= 0:  # also rejects NaN
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        object.__setattr__(self, "address", address_of(self.host, self.port))

    @property
    def spec(self) -> HostSpec:
        return HostSpec(self.host, self.port)

    def replace(self, **changes: Any) -> Host:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return self.address if self.instance_id is None else f"{self.instance_id}@{self.address}"


def _order(host: Host) -> tuple[int, str, str]:
    return (0 if host.role is Role.WRITER else 1, host.instance_id or "", host.address)


@dataclass(frozen=True)
class TopologySnapshot:
    """The cluster at one moment.

    ``hosts`` are kept in a canonical order (writer first, then by instance id and address),
    so equal topologies compare equal. ``epoch`` is the topology epoch (see :func:`advance`;
    0 until the monitor stamps one). ``taken_at`` is the observer's clock (monotonic seconds)
    when the topology was read (``None``: unknown). ``source`` is the instance id it was read
    from (``None``: unknown or built by hand). ``ignored`` lists instance ids the answer held
    but that were left out (stale readers, superseded writers). At most one host is a writer.
    """

    hosts: tuple[Host, ...]
    epoch: int = 0
    taken_at: float | None = None
    source: str | None = None
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        hosts = tuple(sorted(self.hosts, key=_order))
        if sum(1 for h in hosts if h.role is Role.WRITER) > 1:
            raise ValueError("a topology snapshot has at most one writer")
        if len({h.address for h in hosts}) != len(hosts):
            raise ValueError("a topology snapshot lists each address once")
        object.__setattr__(self, "hosts", hosts)

    @property
    def writer(self) -> Host | None:
        """The writer; ``None`` when this topology names none."""
        first = self.hosts[0] if self.hosts else None
        return first if first is not None and first.role is Role.WRITER else None

    @property
    def readers(self) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if h.role is not Role.WRITER)

    def by_instance(self, instance_id: str) -> Host | None:
        return next((h for h in self.hosts if h.instance_id == instance_id), None)

    def by_address(self, host: Host | HostSpec | str) -> Host | None:
        key = _key(host)
        return next((h for h in self.hosts if h.address == key), None)

    def with_epoch(self, epoch: int) -> TopologySnapshot:
        return dataclasses.replace(self, epoch=epoch)


def snapshot_from_rows(
    rows: Iterable[TopologyRow],
    pattern: HostPattern | None,
    *,
    default_port: int | None = None,
    weights: Mapping[str, float] | None = None,
    epoch: int = 0,
    taken_at: float | None = None,
    source: str | None = None,
    ignored: Iterable[str] = (),
    region_patterns: Mapping[str, HostPattern] | None = None,
) -> TopologySnapshot:
    """Build a snapshot from topology rows.

    An instance's address comes from ``pattern`` when one is given (Aurora; a user-set
    ``cluster_instance_host_pattern``), else from the row's own ``endpoint`` (Multi-AZ), else
    the instance id itself is used as the host name. The port is the pattern's, else the
    row's, else ``default_port`` (``None``: the driver's default). ``weights`` maps instance
    ids to selection weights (default 1). ``region_patterns`` (Aurora Global Database) maps a
    region to the pattern of its instances; a row of a listed region uses its region's pattern.
    """
    hosts: list[Host] = []
    for row in rows:
        port: int | None
        own = (region_patterns or {}).get(row.region or "") if row.region else None
        if own is not None:
            name, port = own.expand(row.instance_id)
        elif pattern is not None:
            name, port = pattern.expand(row.instance_id)
        else:
            name, port = row.endpoint or row.instance_id, None
        port = port if port is not None else row.port if row.port is not None else default_port
        hosts.append(Host(
            name,
            port,
            instance_id=row.instance_id,
            role=Role.WRITER if row.is_writer else Role.READER,
            weight=(weights or {}).get(row.instance_id, 1.0),
            lag=None if row.is_writer else row.lag_seconds,
            last_update=row.last_update,
            cpu=row.cpu,
            region=row.region,
        ))
    return TopologySnapshot(tuple(hosts), epoch, taken_at, source, tuple(ignored))


def snapshot_from_topology(
    topology: Topology, pattern: HostPattern | None, **kwargs: Any
) -> TopologySnapshot:
    """:func:`snapshot_from_rows` of a parsed dialect answer, its left-out rows as ``ignored``."""
    ignored = tuple(row.instance_id for row in topology.ignored)
    return snapshot_from_rows(topology.rows, pattern, ignored=ignored, **kwargs)


def allowed_only(snapshot: TopologySnapshot, hosts: HostsHandler, settings: Settings,
                 ) -> tuple[TopologySnapshot, dict[str, str]]:
    """``snapshot`` without the hosts a connection's host list (``hosts``: the pipeline's
    ``hosts`` phase, ``PluginContext.hosts``) leaves out, and why each was left out (address
    -> reason; empty when every host may serve)."""
    request = HostsContext(tuple(h.spec for h in snapshot.hosts), settings, snapshot)
    allowed = {address_of(h.host, h.port) for h in hosts(request)}
    if all(h.address in allowed for h in snapshot.hosts):
        return snapshot, {}
    kept = tuple(h for h in snapshot.hosts if h.address in allowed)
    excluded = {h.address: request.excluded.get(h.address, "left out by the host list")
                for h in snapshot.hosts if h.address not in allowed}
    return dataclasses.replace(snapshot, hosts=kept), excluded


# --- the topology epoch --------------------------------------------------------------------


@dataclass(frozen=True)
class TopologyChange:
    """What changed between two snapshots. Instances are named by instance id (address when
    the id is unknown). ``writer_before``/``writer_after`` ``None``: no writer named."""

    epoch: int
    writer_before: str | None
    writer_after: str | None
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    role_changed: tuple[str, ...] = ()
    initial: bool = False

    @property
    def writer_changed(self) -> bool:
        return not self.initial and self.writer_before != self.writer_after

    @property
    def changed(self) -> bool:
        return self.initial or self.writer_changed or bool(
            self.added or self.removed or self.role_changed
        )

    def to_decision(self) -> Decision:
        return Decision("topology.changed", "failover", {
            "resilient_db.topology.epoch": self.epoch,
            "resilient_db.topology.writer": self.writer_after or "",
            "resilient_db.topology.writer_before": self.writer_before or "",
            "resilient_db.topology.added": self.added,
            "resilient_db.topology.removed": self.removed,
            "resilient_db.topology.role_changed": self.role_changed,
        })


class Advance(NamedTuple):
    """The result of :func:`advance`: the epoch to stamp, whether anything changed, what
    changed, and the new snapshot stamped with the epoch."""

    epoch: int
    changed: bool
    change: TopologyChange
    snapshot: TopologySnapshot


def _name(host: Host) -> str:
    return host.instance_id or host.address


def advance(old: TopologySnapshot | None, new: TopologySnapshot) -> Advance:
    """Move from ``old`` to ``new``.

    The epoch increases by one exactly when the writer changes (no writer counts as a value
    of its own, so writer A → none → B moves it twice): connections opened under the old
    writer must not keep writing to a demoted instance (DESIGN §5). Readers joining, leaving,
    or changing lag do not move it; they only set ``changed``. The first snapshot (``old``
    ``None``) keeps its own epoch.
    """
    new_names = {_name(h): h.role for h in new.hosts}
    writer_after = _name(new.writer) if new.writer else None
    if old is None:
        change = TopologyChange(new.epoch, None, writer_after, tuple(sorted(new_names)),
                                initial=True)
        return Advance(new.epoch, True, change, new)
    old_names = {_name(h): h.role for h in old.hosts}
    writer_before = _name(old.writer) if old.writer else None
    epoch = old.epoch + 1 if writer_before != writer_after else old.epoch
    change = TopologyChange(
        epoch,
        writer_before,
        writer_after,
        added=tuple(sorted(new_names.keys() - old_names.keys())),
        removed=tuple(sorted(old_names.keys() - new_names.keys())),
        role_changed=tuple(sorted(
            name for name in new_names.keys() & old_names.keys()
            if new_names[name] is not old_names[name]
        )),
    )
    return Advance(epoch, change.changed, change, new.with_epoch(epoch))


# --- known-bad hosts -----------------------------------------------------------------------


@dataclass(frozen=True)
class BadHostMemory:
    """Hosts found down, each remembered until ``now + cooldown`` (seconds, injected
    monotonic clock). Immutable: every change returns a new memory, so a shell keeps one in an
    attribute and swaps it under its lock. ``cooldown`` 0 forgets a host at once.

    Hosts are keyed by address (:func:`address_of`); a string argument is taken as an address.
    """

    cooldown: float = 30.0
    until: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.cooldown >= 0:
            raise ValueError(f"cooldown must be >= 0, got {self.cooldown}")

    def mark_down(self, host: Host | HostSpec | str, now: float) -> BadHostMemory:
        key = _key(host)
        kept = tuple(entry for entry in self.until if entry[0] != key)
        return dataclasses.replace(self, until=(*kept, (key, now + self.cooldown)))

    def mark_up(self, host: Host | HostSpec | str) -> BadHostMemory:
        key = _key(host)
        return dataclasses.replace(self, until=tuple(e for e in self.until if e[0] != key))

    def remaining(self, host: Host | HostSpec | str, now: float) -> float:
        """Seconds of cool-down left; 0 when the host is not cooling."""
        key = _key(host)
        for entry_key, until in self.until:
            if entry_key == key:
                return max(0.0, until - now)
        return 0.0

    def is_cooling(self, host: Host | HostSpec | str, now: float) -> bool:
        return self.remaining(host, now) > 0

    def cooling(self, now: float) -> frozenset[str]:
        """Addresses still cooling at ``now``."""
        return frozenset(key for key, until in self.until if until > now)

    def prune(self, now: float) -> BadHostMemory:
        """Forget hosts whose cool-down is over (keeps the memory small)."""
        return dataclasses.replace(self, until=tuple(e for e in self.until if e[1] > now))
