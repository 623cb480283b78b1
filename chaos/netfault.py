"""Network fault injection on this machine: real packet loss, resets and refusals per address.

Faults use Toxiproxy's vocabulary where it has a word for them (see :attr:`Fault.toxic`) so the
chaos suite can offer one API over a real Toxiproxy and this local backend::

    with NetworkFaults() as faults:
        fault = faults.blackhole("127.10.0.5")        # every packet to/from it is dropped
        ...                                           # in-flight queries hang, connects time out
        faults.heal(fault)                            # or leave it to the end of the block

Kernel rules (``iptables``, so root is required) give real packet loss: keepalives, TCP user
timeouts and connect timeouts behave as on a real network. Every rule lives in our own chain
and is tagged with the owning process (see :mod:`chaos._netfilter`); rules are removed when the
``with`` block ends, by :meth:`NetworkFaults.clear`, at interpreter exit, and, for a process
that was killed before it could clean up, by the sweep that every new :class:`NetworkFaults`
runs first. docs/faults.md has the details and the limits.

This module is test tooling: it does not import :mod:`resilient_db`.
"""

from __future__ import annotations

import atexit
import dataclasses
import ipaddress
import itertools
import logging
import math
import os
import shutil
import subprocess
import threading
import time
import weakref
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Protocol

from chaos._netfilter import (
    CHAIN,
    TABLES,
    NetfilterError,
    Owner,
    Rule,
    chain_lock,
    ensure_chain,
    remove_chain_if_empty,
    rules_of,
    sweep_dead_owners,
    unavailable_reason,
)

__all__ = [
    "CHAIN",
    "Fault",
    "FaultKind",
    "NetworkFaultError",
    "NetworkFaults",
    "heal_injected",
    "inject",
    "leftover_rules",
    "sweep_dead_owners",
    "unavailable_reason",
]

LOGGER = logging.getLogger("chaos.netfault")

FaultKind = Literal["blackhole", "reset", "down"]

#: Toxiproxy's name for each kind of fault (``down`` is a disabled proxy there, not a toxic).
TOXIC_NAMES: Mapping[str, str] = MappingProxyType(
    {"blackhole": "timeout", "reset": "reset_peer", "down": "down", "latency": "latency"})

_EMPTY: Mapping[str, Any] = MappingProxyType({})
# Fault ids are unique within a process, so that a rule comment names exactly one fault.
_fault_ids = itertools.count(1)


class NetworkFaultError(RuntimeError):
    """A fault cannot be applied or removed (not root, no iptables, bad argument, iptables
    refused a rule)."""


@dataclasses.dataclass(eq=False)
class Fault:
    """One applied fault. ``port=None`` means every port of ``address`` (every protocol for a
    blackhole). Times are ``time.time()`` (``*_at``) and ``time.monotonic()`` (``*_mono``);
    ``healed_*`` stay ``None`` while the fault is active. ``instance`` is the simulated
    instance id when the fault was applied through :func:`inject`."""

    id: int
    kind: str
    address: str
    port: int | None
    applied_at: float
    applied_mono: float
    params: Mapping[str, Any] = dataclasses.field(default_factory=lambda: _EMPTY)
    healed_at: float | None = None
    healed_mono: float | None = None
    instance: str | None = None

    @property
    def toxic(self) -> str:
        """Toxiproxy's name for this kind of fault (``timeout`` for a blackhole)."""
        return TOXIC_NAMES[self.kind]

    @property
    def active(self) -> bool:
        return self.healed_mono is None

    @property
    def duration(self) -> float | None:
        """Seconds from applied to healed; ``None`` while active."""
        return None if self.healed_mono is None else self.healed_mono - self.applied_mono

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "toxic": self.toxic, "address": self.address,
                "port": self.port, "params": dict(self.params), "instance": self.instance,
                "applied_at": self.applied_at, "applied_mono": self.applied_mono,
                "healed_at": self.healed_at, "healed_mono": self.healed_mono}


def _check_address(address: object) -> str:
    if not isinstance(address, str):
        raise NetworkFaultError(f"address must be an IPv4 address string, got {address!r}")
    try:
        parsed = ipaddress.IPv4Address(address)
    except ipaddress.AddressValueError:
        raise NetworkFaultError(
            f"address must be a literal IPv4 address (e.g. an instance's 127.x.y.z), got "
            f"{address!r}; resolve host names first") from None
    if parsed.is_unspecified:
        raise NetworkFaultError("address 0.0.0.0 would match nothing; give the instance address")
    return str(parsed)


def _check_port(port: object, *, required: bool = False) -> int | None:
    if port is None and not required:
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise NetworkFaultError(f"port must be an int in 1..65535"
                                f"{'' if required else ' or None'}, got {port!r}")
    return port


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise NetworkFaultError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _to(address: str, port: int | None) -> list[str]:
    """Match packets sent to ``address`` (and ``port``)."""
    return ["-p", "tcp", "-d", address, "--dport", str(port)] if port else ["-d", address]


def _from(address: str, port: int | None) -> list[str]:
    """Match packets sent from ``address`` (and ``port``)."""
    return ["-p", "tcp", "-s", address, "--sport", str(port)] if port else ["-s", address]


def _tcp(match: list[str]) -> list[str]:
    return match if "-p" in match else ["-p", "tcp", *match]


# A RST we send must not be caught by our own reject rules (on loopback it passes OUTPUT too),
# so reject rules match only packets without the RST flag.
_NOT_RST = ["--tcp-flags", "RST", "NONE"]
_REJECT = ["-j", "REJECT", "--reject-with", "tcp-reset"]


def _kill_connections(address: str, port: int | None) -> None:
    """Abort the established TCP sockets whose local end is ``address`` (``port``): on
    loopback these are the server's ends, and aborting them sends the clients a RST now,
    even to a client that is only waiting for a reply (a REJECT rule alone would answer
    only a client that sends)."""
    ss = shutil.which("ss")
    if ss is None:
        LOGGER.warning("ss (iproute2) not found: connections to %s reset only when the client "
                       "next sends", address)
        return
    command = [ss, "-K", "-t", "-n", "state", "established", "state", "close-wait",
               "src", address]
    if port:
        command += ["sport", "=", f":{port}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        LOGGER.warning("ss -K failed (%s): connections to %s reset only when the client next "
                       "sends", result.stderr.strip(), address)


_live: weakref.WeakSet[NetworkFaults] = weakref.WeakSet()
_atexit_registered = False
_registry_lock = threading.Lock()


def _clear_all_at_exit() -> None:
    for faults in list(_live):
        try:
            faults.clear()
        except Exception:  # exiting: report and go on with the others
            LOGGER.exception("could not remove network faults at exit")


def _track(faults: NetworkFaults) -> None:
    global _atexit_registered
    with _registry_lock:
        _live.add(faults)
        if not _atexit_registered:
            atexit.register(_clear_all_at_exit)
            _atexit_registered = True


class NetworkFaults:
    """Creates faults and removes every rule it created when the ``with`` block ends, on
    :meth:`clear`, or at interpreter exit.

    Creating one sweeps the rules of processes that died without cleaning up (``sweep=False``
    skips that). Raises :class:`NetworkFaultError` when not root or iptables is missing.
    Thread-safe. A forked child never removes its parent's rules.
    """

    def __init__(self, *, sweep: bool = True) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise NetworkFaultError(reason)
        self._owner = Owner.current()
        self._lock = threading.RLock()
        self._active: dict[int, Fault] = {}
        self._rules: dict[int, list[Rule]] = {}
        self._tables: set[str] = set()
        #: Every fault this object applied, in order, healed or not.
        self.history: list[Fault] = []
        if sweep:
            sweep_dead_owners()
        _track(self)

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> NetworkFaults:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.clear()

    # -- faults ----------------------------------------------------------------------------

    def blackhole(self, address: str, port: int | None = None) -> Fault:
        """Drop every packet to and from ``address`` (only TCP ``port`` on it, if given), in
        both directions: established connections hang without a RST, new connects time out.
        Toxiproxy's ``timeout`` toxic with no timeout."""
        address, port = _check_address(address), _check_port(port)
        comment = self._comment_placeholder()
        specs = [[*_to(address, port), *comment, "-j", "DROP"],
                 [*_from(address, port), *comment, "-j", "DROP"]]
        return self._apply("blackhole", address, port, specs)

    def reset(self, address: str, port: int | None = None) -> Fault:
        """Answer every TCP segment to or from ``address`` (``port``) with a RST: established
        connections fail with ``ECONNRESET`` right away (their server ends are aborted too, so
        a client waiting for a reply is told), new connects fail immediately (a RST answering
        a SYN reads as "connection refused"). Toxiproxy's ``reset_peer`` with no timeout."""
        address, port = _check_address(address), _check_port(port)
        comment = self._comment_placeholder()
        specs = [[*_tcp(_to(address, port)), *_NOT_RST, *comment, *_REJECT],
                 [*_tcp(_from(address, port)), *_NOT_RST, *comment, *_REJECT]]
        fault = self._apply("reset", address, port, specs)
        _kill_connections(address, port)
        return fault

    def down(self, address: str, port: int | None = None) -> Fault:
        """Refuse new TCP connections to ``address`` (``port``) as if nothing listened there;
        established connections keep working. Toxiproxy's disabled proxy, except that
        Toxiproxy also closes existing connections (add :meth:`reset` for that)."""
        address, port = _check_address(address), _check_port(port)
        comment = self._comment_placeholder()
        specs = [[*_tcp(_to(address, port)), "--syn", *comment, *_REJECT]]
        return self._apply("down", address, port, specs)

    def heal(self, fault: Fault) -> None:
        """Remove ``fault``. Healing a healed fault does nothing; a fault of another
        :class:`NetworkFaults` is an error."""
        with self._lock:
            if fault.id not in self._active:
                if fault in self.history:
                    return
                raise NetworkFaultError(f"fault {fault.id} ({fault.kind} {fault.address}) was "
                                        f"not applied by this NetworkFaults object")
            self._remove(fault)

    def clear(self) -> None:
        """Remove every fault this object applied and our chains if they are left empty.
        Idempotent. Errors are collected: every fault is attempted before one is raised."""
        if os.getpid() != self._owner.pid:
            return  # a forked child: the rules belong to the parent
        errors: list[Exception] = []
        with self._lock:
            for fault in list(self._active.values()):
                try:
                    self._remove(fault)
                except Exception as exc:
                    errors.append(exc)
            if self._tables:
                with chain_lock():
                    for table in TABLES:
                        if table in self._tables:
                            try:
                                remove_chain_if_empty(table)
                            except NetfilterError as exc:
                                errors.append(exc)
                self._tables.clear()
        if errors:
            raise NetworkFaultError(f"{len(errors)} error(s) while removing network faults; "
                                    f"first: {errors[0]}") from errors[0]

    @property
    def active(self) -> list[Fault]:
        """Faults applied and not yet healed, oldest first."""
        with self._lock:
            return list(self._active.values())

    def rules(self) -> list[str]:
        """Rules of this process currently installed, as ``<table>: <iptables -S line>``."""
        return rules_of(self._owner)

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _comment_placeholder() -> list[str]:
        return ["-m", "comment", "--comment", "{comment}"]

    def _apply(self, kind: str, address: str, port: int | None, specs: list[list[str]],
               table: Literal["filter", "nat"] = "filter",
               params: Mapping[str, Any] | None = None) -> Fault:
        fault_id = next(_fault_ids)
        comment = self._owner.comment(fault_id)
        rules = [Rule(table, tuple(comment if arg == "{comment}" else arg for arg in spec))
                 for spec in specs]
        with self._lock:
            added: list[Rule] = []
            try:
                with chain_lock():
                    ensure_chain(table)
                    self._tables.add(table)
                    for rule in rules:
                        rule.add()
                        added.append(rule)
            except NetfilterError as exc:
                for rule in added:
                    rule.delete()
                raise NetworkFaultError(f"cannot apply {kind} to {address}: {exc}") from exc
            fault = Fault(fault_id, kind, address, port, time.time(), time.monotonic(),
                          MappingProxyType(dict(params or {})))
            self._active[fault_id] = fault
            self._rules[fault_id] = rules
            self.history.append(fault)
        LOGGER.info("network fault %d applied: %s %s%s", fault_id, kind, address,
                    f":{port}" if port else "")
        return fault

    def _remove(self, fault: Fault) -> None:
        """Delete ``fault``'s rules (caller holds ``self._lock``)."""
        errors: list[Exception] = []
        for rule in self._rules.get(fault.id, []):
            try:
                rule.delete()
            except NetfilterError as exc:
                errors.append(exc)
        self._rules.pop(fault.id, None)
        self._active.pop(fault.id, None)
        fault.healed_at, fault.healed_mono = time.time(), time.monotonic()
        LOGGER.info("network fault %d healed: %s %s", fault.id, fault.kind, fault.address)
        if errors:
            raise NetworkFaultError(f"could not remove every rule of fault {fault.id}: "
                                    f"{errors[0]}") from errors[0]


def leftover_rules() -> list[str]:
    """Every rule in our chains, whoever owns it, as ``<table>: <iptables -S line>``."""
    return rules_of(None)


# -- simulated clusters ----------------------------------------------------------------------


class _Instance(Protocol):
    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...


class _Events(Protocol):
    def record(self, name: str, instance: str | None = None, **detail: Any) -> Any: ...


class ClusterLike(Protocol):
    """What :func:`inject` needs of a cluster (:class:`simulator.cluster.Cluster` fits)."""

    @property
    def events(self) -> _Events: ...

    def instance(self, instance_id: str) -> _Instance: ...


def inject(cluster: ClusterLike, instance_id: str, kind: FaultKind, *, faults: NetworkFaults,
           port: int | None = None) -> Fault:
    """Apply ``kind`` to a simulated instance's address (every port unless ``port`` is given)
    and record a ``network_fault`` event (``action="applied"``) in the cluster's log."""
    address = cluster.instance(instance_id).address
    if kind == "blackhole":
        fault = faults.blackhole(address, port)
    elif kind == "reset":
        fault = faults.reset(address, port)
    elif kind == "down":
        fault = faults.down(address, port)
    else:
        raise NetworkFaultError(f"kind must be one of blackhole, reset, down; got {kind!r}")
    fault.instance = instance_id
    cluster.events.record("network_fault", instance_id, action="applied", kind=fault.kind,
                          toxic=fault.toxic, address=fault.address, port=fault.port,
                          fault_id=fault.id, **dict(fault.params))
    return fault


def heal_injected(cluster: ClusterLike, fault: Fault, *, faults: NetworkFaults) -> None:
    """Heal a fault applied by :func:`inject` and record ``network_fault`` with
    ``action="healed"``."""
    faults.heal(fault)
    cluster.events.record("network_fault", fault.instance, action="healed", kind=fault.kind,
                          toxic=fault.toxic, address=fault.address, port=fault.port,
                          fault_id=fault.id)
