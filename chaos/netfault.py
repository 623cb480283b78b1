"""Network faults on this machine: packet loss and delay, resets, refusals, slow links.

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

import argparse
import atexit
import dataclasses
import ipaddress
import itertools
import logging
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Protocol

from chaos._netfilter import (
    CHAIN,
    TABLES,
    NetfilterError,
    Owner,
    Rule,
    Table,
    chain_lock,
    ensure_chain,
    owner_of,
    remove_chain_if_empty,
    rule_lines,
    rules_of,
    sweep_dead_owners,
    unavailable_reason,
)
from chaos._nfqueue import PacketDelayer
from chaos._toxic_proxy import UPSTREAM_MARK, Stream, ToxicProxy, Toxics

__all__ = [
    "CHAIN",
    "TOXIC_NAMES",
    "ClusterLike",
    "Fault",
    "FaultKind",
    "NetworkFaultError",
    "NetworkFaults",
    "Stream",
    "heal_injected",
    "inject",
    "leftover_rules",
    "sweep_dead_owners",
    "unavailable_reason",
]

LOGGER = logging.getLogger("chaos.netfault")

FaultKind = Literal["blackhole", "reset", "down", "latency", "bandwidth", "packet_loss",
                    "packet_delay"]

#: Toxiproxy's name for each kind of fault (``down`` is a disabled proxy there, not a toxic).
TOXIC_NAMES: Mapping[str, str] = MappingProxyType(
    {"blackhole": "timeout", "reset": "reset_peer", "down": "down", "latency": "latency",
     "bandwidth": "bandwidth", "packet_loss": "packet_loss", "packet_delay": "latency"})

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
    states = ("established", "syn-recv", "fin-wait-1", "fin-wait-2", "close-wait")
    command = [ss, "-K", "-t", "-n", *(word for state in states for word in ("state", state)),
               "src", address]
    if port:
        command += ["sport", "=", f":{port}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        LOGGER.warning("ss -K failed (%s): connections to %s reset only when the client next "
                       "sends", result.stderr.strip(), address)


# Objects with something installed, held strongly: an object dropped without clear() must
# still be cleared at exit (its owner is alive until then, so no sweep would remove its rules).
_live: set[NetworkFaults] = set()
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


@dataclasses.dataclass(frozen=True)
class _Intercept:
    proxy: ToxicProxy
    rule: Rule


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
        # The proxy of each active latency/bandwidth fault.
        self._proxies: dict[int, ToxicProxy] = {}
        self._owned_proxies: list[ToxicProxy] = []  # started for one fault each
        self._intercepts: dict[tuple[str, int], _Intercept] = {}
        self._anchor: Rule | None = None
        self._delayers: dict[int, PacketDelayer] = {}  # of active packet_delay faults
        #: Every fault this object applied, in order, healed or not.
        self.history: list[Fault] = []
        if sweep:
            sweep_dead_owners()

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> NetworkFaults:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.clear()

    # -- faults ----------------------------------------------------------------------------

    def blackhole(self, address: str, port: int | None = None, *,
                  stream: Stream = "both") -> Fault:
        """Drop every packet to and from ``address`` (only TCP ``port`` on it, if given):
        established connections hang without a RST, new connects time out. Toxiproxy's
        ``timeout`` toxic with no timeout. ``stream="upstream"`` drops only packets to the
        address, ``"downstream"`` only packets from it (requests arrive, replies do not)."""
        address, port = _check_address(address), _check_port(port)
        specs = self._drop_specs(address, port, stream, [])
        return self._apply("blackhole", address, port, specs,
                           params={} if stream == "both" else {"stream": stream})

    def packet_loss(self, address: str, port: int | None = None, *, probability: float,
                    stream: Stream = "both") -> Fault:
        """Drop each packet to or from ``address`` (``port``) independently with
        ``probability`` (0 < p <= 1; 1 is a blackhole): TCP retransmits, so connections slow
        down and stall now and then rather than fail. No Toxiproxy equivalent (its toxics work
        on connections, not packets)."""
        address, port = _check_address(address), _check_port(port)
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) \
                or not 0 < probability <= 1:
            raise NetworkFaultError(f"probability must be a number in (0, 1], got "
                                    f"{probability!r}")
        # A loopback packet passes OUTPUT and then INPUT (incoming interface lo): count it
        # once, where it leaves, or the loss would compound to 1 - (1 - p)**2.
        match = ["!", "-i", "lo",
                 "-m", "statistic", "--mode", "random", "--probability", f"{probability:.6f}"]
        specs = self._drop_specs(address, port, stream, match)
        return self._apply("packet_loss", address, port, specs,
                           params={"probability": float(probability), "stream": stream})

    def packet_delay(self, address: str, port: int | None = None, *, delay: float,
                     jitter: float = 0.0, stream: Stream = "downstream") -> Fault:
        """Hold every packet to or from ``address`` (TCP ``port`` on it, if given) for
        ``delay`` ± ``jitter`` seconds in the kernel (NFQUEUE), in ``stream`` (``downstream``,
        the default: packets from the address, so a round trip takes ``delay`` longer;
        ``upstream``: packets to it; ``both``). Unlike :meth:`latency` it needs no proxy and
        slows every connection, the established ones included, as a slow network would:
        TCP sees the longer round trip (throughput drops to window / round trip).
        Toxiproxy's ``latency`` toxic, applied at the packet level."""
        address, port = _check_address(address), _check_port(port)
        delay, jitter = _check_seconds("delay", delay), _check_seconds("jitter", jitter)
        if stream not in ("upstream", "downstream", "both"):
            raise NetworkFaultError(f"stream must be 'upstream', 'downstream' or 'both', got "
                                    f"{stream!r}")
        try:
            named = {int(m) for line in rule_lines("mangle")
                     for m in re.findall(r"--queue-num (\d+)", line)}
            delayer = PacketDelayer(delay, jitter).open(avoid=named)
        except OSError as exc:
            raise NetworkFaultError(f"cannot set up packet delay (NFQUEUE): {exc}") from exc
        # mangle OUTPUT sees each loopback packet once, before nat and filter.
        target = ["-j", "NFQUEUE", "--queue-num", str(delayer.queue), "--queue-bypass"]
        comment = self._comment_placeholder()
        specs = []
        if stream in ("upstream", "both"):
            specs.append([*_to(address, port), *comment, *target])
        if stream in ("downstream", "both"):
            specs.append([*_from(address, port), *comment, *target])
        try:
            fault = self._apply("packet_delay", address, port, specs, "mangle",
                                {"delay": delay, "jitter": jitter, "stream": stream})
        except BaseException:
            delayer.close()
            raise
        with self._lock:
            self._delayers[fault.id] = delayer
        return fault

    def _drop_specs(self, address: str, port: int | None, stream: object,
                    extra: list[str]) -> list[list[str]]:
        if stream not in ("upstream", "downstream", "both"):
            raise NetworkFaultError(f"stream must be 'upstream', 'downstream' or 'both', got "
                                    f"{stream!r}")
        comment = self._comment_placeholder()
        specs = []
        for each in self._ports(address, port):
            if stream in ("upstream", "both"):
                specs.append([*_to(address, each), *extra, *comment, "-j", "DROP"])
            if stream in ("downstream", "both"):
                specs.append([*_from(address, each), *extra, *comment, "-j", "DROP"])
        return specs

    def _ports(self, address: str, port: int | None) -> list[int | None]:
        """``port`` and the ports of our proxies in front of ``address:port``: connections
        redirected to a proxy carry the proxy's port, and a fault on the instance's port
        must hit them too."""
        if port is None:
            return [None]
        with self._lock:
            proxies = {*self._owned_proxies, *(i.proxy for i in self._intercepts.values())}
        extra = sorted(proxy.listen_address[1] for proxy in proxies
                       if proxy.upstream_address == (address, port)
                       and proxy.listen_address[0] == address)
        return [port, *extra]

    def reset(self, address: str, port: int | None = None) -> Fault:
        """Answer every TCP segment to or from ``address`` (``port``) with a RST: established
        connections fail with ``ECONNRESET`` right away (their server ends are aborted too, so
        a client waiting for a reply is told), new connects fail immediately (a RST answering
        a SYN reads as "connection refused"). Toxiproxy's ``reset_peer`` with no timeout."""
        address, port = _check_address(address), _check_port(port)
        comment = self._comment_placeholder()
        ports = self._ports(address, port)
        specs = [spec for each in ports
                 for spec in ([*_tcp(_to(address, each)), *_NOT_RST, *comment, *_REJECT],
                              [*_tcp(_from(address, each)), *_NOT_RST, *comment, *_REJECT])]
        fault = self._apply("reset", address, port, specs)
        # Proxy ports first: an aborted upstream would make a proxy close its client side
        # with a FIN, which the reject rules answer towards the proxy, not the client.
        for each in reversed(ports):
            _kill_connections(address, each)
        return fault

    def down(self, address: str, port: int | None = None) -> Fault:
        """Refuse new TCP connections to ``address`` (``port``) as if nothing listened there;
        established connections keep working. Toxiproxy's disabled proxy, except that
        Toxiproxy also closes existing connections (add :meth:`reset` for that)."""
        address, port = _check_address(address), _check_port(port)
        comment = self._comment_placeholder()
        specs = [[*_tcp(_to(address, each)), "--syn", *comment, *_REJECT]
                 for each in self._ports(address, port)]
        return self._apply("down", address, port, specs)

    def latency(self, address: str, port: int, delay: float, jitter: float = 0.0, *,
                stream: Stream = "downstream") -> Fault:
        """Delay the bytes of new TCP connections to ``address:port`` by ``delay`` seconds,
        ± a uniformly random ``jitter`` per chunk (never below zero, never reordering), in
        ``stream`` (Toxiproxy's words: ``downstream`` is server to client, the default, so a
        round trip takes ``delay`` longer; ``upstream`` client to server; ``both``).

        Connections are transparently redirected (``nat`` DNAT) through a threaded proxy of
        this process; connections established before stay direct and undelayed, unless
        :meth:`intercept` put the proxy in their path when they were opened. Healing removes
        the redirect and lets connections already proxied flow undelayed.
        """
        address, checked_port = _check_address(address), _check_port(port, required=True)
        assert checked_port is not None
        delay, jitter = _check_seconds("delay", delay), _check_seconds("jitter", jitter)
        toxics = Toxics(delay=delay, jitter=jitter)
        return self._proxy_fault("latency", address, checked_port, stream, toxics,
                                 {"delay": delay, "jitter": jitter, "stream": stream})

    def bandwidth(self, address: str, port: int, bytes_per_second: float, *,
                  stream: Stream = "downstream") -> Fault:
        """Limit new TCP connections to ``address:port`` to ``bytes_per_second`` in
        ``stream`` (see :meth:`latency` for streams and how connections are redirected)."""
        address, checked_port = _check_address(address), _check_port(port, required=True)
        assert checked_port is not None
        if isinstance(bytes_per_second, bool) or not isinstance(bytes_per_second, (int, float)) \
                or not math.isfinite(bytes_per_second) or bytes_per_second <= 0:
            raise NetworkFaultError(f"bytes_per_second must be a finite number > 0, got "
                                    f"{bytes_per_second!r}")
        toxics = Toxics(rate=float(bytes_per_second))
        return self._proxy_fault("bandwidth", address, checked_port, stream, toxics,
                                 {"bytes_per_second": float(bytes_per_second),
                                  "stream": stream})

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
            for key in list(self._intercepts):
                try:
                    self.release(*key)
                except Exception as exc:
                    errors.append(exc)
            for proxy in self._owned_proxies:
                proxy.close()
            self._owned_proxies.clear()
            self._proxies.clear()
            if self._anchor is not None:
                try:
                    self._anchor.delete()
                except NetfilterError as exc:
                    errors.append(exc)
                self._anchor = None
            if self._tables:
                with chain_lock():
                    for table in TABLES:
                        if table in self._tables:
                            try:
                                remove_chain_if_empty(table)
                            except NetfilterError as exc:
                                errors.append(exc)
                self._tables.clear()
            if not errors:
                with _registry_lock:
                    _live.discard(self)
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

    def _start_proxy(self, address: str, port: int, upstream: Toxics,
                     downstream: Toxics) -> tuple[ToxicProxy, list[str]]:
        """A proxy to ``address:port`` and the spec of the rule redirecting to it."""
        try:
            proxy = ToxicProxy((address, port), address, upstream_toxics=upstream,
                               downstream_toxics=downstream)
        except OSError:  # not a local address: listen on the usual loopback one
            proxy = ToxicProxy((address, port), "127.0.0.1", upstream_toxics=upstream,
                               downstream_toxics=downstream)
        host, proxy_port = proxy.listen_address
        # Only a SYN starts a redirected connection: a connection that conntrack first sees
        # mid-stream (made before NAT was in use) must not be turned towards the proxy
        # halfway. The proxy's own upstream connections go straight through.
        spec = ["-p", "tcp", "-d", address, "--dport", str(port), "--syn",
                "-m", "mark", "!", "--mark", hex(UPSTREAM_MARK),
                *self._comment_placeholder(),
                "-j", "DNAT", "--to-destination", f"{host}:{proxy_port}"]
        return proxy, spec

    def _proxy_fault(self, kind: str, address: str, port: int, stream: object,
                     toxics: Toxics, params: Mapping[str, Any]) -> Fault:
        if stream not in ("upstream", "downstream", "both"):
            raise NetworkFaultError(f"stream must be 'upstream', 'downstream' or 'both', got "
                                    f"{stream!r}")
        upstream = toxics if stream in ("upstream", "both") else Toxics()
        downstream = toxics if stream in ("downstream", "both") else Toxics()
        with self._lock:
            for other in self._active.values():
                if other.id in self._proxies and (other.address, other.port) == (address, port):
                    raise NetworkFaultError(
                        f"{address}:{port} already has a {other.kind} fault (id {other.id}); "
                        f"heal it first (one proxy fault per address and port)")
            intercepted = self._intercepts.get((address, port))
            if intercepted is not None:
                # Toxiproxy's way: the proxy is already in the path of every connection.
                intercepted.proxy.set_toxics(upstream, downstream)
                fault = self._apply(kind, address, port, [], "nat", params)
                self._proxies[fault.id] = intercepted.proxy
                return fault
            proxy, spec = self._start_proxy(address, port, upstream, downstream)
            try:
                self._ensure_anchor()
                fault = self._apply(kind, address, port, [spec], "nat", params)
            except BaseException:
                proxy.close()
                raise
            self._proxies[fault.id] = proxy
            self._owned_proxies.append(proxy)
            return fault

    def intercept(self, address: str, port: int) -> None:
        """Put a pass-through proxy in the path of new connections to ``address:port`` now,
        so that a later :meth:`latency` or :meth:`bandwidth` on it also hits the connections
        opened in between (as with Toxiproxy, where every connection goes through the proxy
        from the start). Call it before the application connects. Removed by
        :meth:`release` or :meth:`clear`. Intercepting twice does nothing."""
        address, checked_port = _check_address(address), _check_port(port, required=True)
        assert checked_port is not None
        with self._lock:
            if (address, checked_port) in self._intercepts:
                return
            proxy, spec = self._start_proxy(address, checked_port, Toxics(), Toxics())
            rule_id = next(_fault_ids)
            rule = Rule("nat", tuple(self._owner.comment(rule_id) if arg == "{comment}"
                                     else arg for arg in spec))
            try:
                self._ensure_anchor()
                with chain_lock():
                    ensure_chain("nat")
                    self._tables.add("nat")
                    rule.add()
            except BaseException as exc:
                proxy.close()
                if isinstance(exc, NetfilterError):
                    raise NetworkFaultError(f"cannot intercept {address}:{checked_port}: "
                                            f"{exc}") from exc
                raise
            self._intercepts[(address, checked_port)] = _Intercept(proxy, rule)

    def release(self, address: str, port: int) -> None:
        """Undo :meth:`intercept`: heal its proxy faults, remove the redirect and close the
        proxy, cutting the connections that go through it. Unknown address: no-op."""
        address = _check_address(address)
        with self._lock:
            intercepted = self._intercepts.get((address, port))
            if intercepted is None:
                return
            for fault in list(self._active.values()):
                if self._proxies.get(fault.id) is intercepted.proxy:
                    self._remove(fault)
            del self._intercepts[(address, port)]
            try:
                intercepted.rule.delete()
            finally:
                intercepted.proxy.close()

    def _ensure_anchor(self) -> None:
        """Keep a DNAT rule of ours that matches nothing while our proxies live.

        Measured here (iptables-nft, kernel 6.x): when the last DNAT rule of the ``nat`` table
        is deleted, packets of connections that were redirected earlier stop being translated
        and the kernel resets them, although conntrack still holds their mapping. A healed
        latency fault must leave its proxied connections working, so an inert DNAT rule (TCP
        from and to 0.0.0.0, which never exists) stays until :meth:`clear` closes the proxies.
        """
        if self._anchor is not None:
            return
        _track(self)
        anchor = Rule("nat", ("-p", "tcp", "-s", "0.0.0.0/32", "-d", "0.0.0.0/32",
                              "-m", "comment", "--comment", self._owner.comment(next(_fault_ids)),
                              "-j", "DNAT", "--to-destination", "0.0.0.0:9"))
        try:
            with chain_lock():
                ensure_chain("nat")
                self._tables.add("nat")
                anchor.add()
        except NetfilterError as exc:
            raise NetworkFaultError(f"cannot prepare the nat table for a proxy: {exc}") from exc
        self._anchor = anchor

    @property
    def proxied_connections(self) -> int:
        """Connections currently going through this object's proxies."""
        with self._lock:
            proxies = {*self._owned_proxies, *(i.proxy for i in self._intercepts.values())}
            return sum(proxy.connections for proxy in proxies)

    def _apply(self, kind: str, address: str, port: int | None, specs: list[list[str]],
               table: Table = "filter",
               params: Mapping[str, Any] | None = None) -> Fault:
        fault_id = next(_fault_ids)
        comment = self._owner.comment(fault_id)
        rules = [Rule(table, tuple(comment if arg == "{comment}" else arg for arg in spec))
                 for spec in specs]
        with self._lock:
            _track(self)
            added: list[Rule] = []
            try:
                if rules:
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
        delayer = self._delayers.pop(fault.id, None)
        if delayer is not None:  # rules are gone: release what it holds, then unbind
            delayer.close()
        proxy = self._proxies.pop(fault.id, None)
        if proxy is not None:  # connections already proxied go on, undelayed
            proxy.neutralise()
            if proxy in self._owned_proxies:
                proxy.stop_accepting()
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
           port: int | None = None, **params: Any) -> Fault:
    """Apply ``kind`` to a simulated instance and record a ``network_fault`` event
    (``action="applied"``, with kind, toxic, address, port, fault id and ``params``) in the
    cluster's event log.

    ``blackhole`` (``stream``), ``packet_loss`` (``probability``, ``stream``),
    ``packet_delay`` (``delay``, ``jitter``, ``stream``), ``reset`` and ``down`` hit every
    port of the instance's address unless ``port`` is given; ``latency`` (``delay``,
    ``jitter``, ``stream``) and ``bandwidth`` (``bytes_per_second``, ``stream``) hit
    ``port``, by default the instance's port.
    """
    instance = cluster.instance(instance_id)
    address = instance.address
    if kind in ("reset", "down"):
        if params:
            raise NetworkFaultError(f"{kind} takes no parameters, got {sorted(params)}")
        fault = (faults.reset if kind == "reset" else faults.down)(address, port)
    elif kind == "blackhole":
        fault = faults.blackhole(address, port, **params)
    elif kind == "packet_loss":
        fault = faults.packet_loss(address, port, **params)
    elif kind == "packet_delay":
        fault = faults.packet_delay(address, port, **params)
    elif kind == "latency":
        fault = faults.latency(address, port or instance.port, **params)
    elif kind == "bandwidth":
        fault = faults.bandwidth(address, port or instance.port, **params)
    else:
        raise NetworkFaultError(f"kind must be one of blackhole, reset, down, latency, "
                                f"bandwidth, packet_loss, packet_delay; got {kind!r}")
    fault.instance = instance_id
    cluster.events.record("network_fault", instance_id, action="applied", kind=fault.kind,
                          toxic=fault.toxic, address=fault.address, port=fault.port,
                          fault_id=fault.id, params=dict(fault.params))
    return fault


def heal_injected(cluster: ClusterLike, fault: Fault, *, faults: NetworkFaults) -> None:
    """Heal a fault applied by :func:`inject` and record ``network_fault`` with
    ``action="healed"``."""
    faults.heal(fault)
    cluster.events.record("network_fault", fault.instance, action="healed", kind=fault.kind,
                          toxic=fault.toxic, address=fault.address, port=fault.port,
                          fault_id=fault.id)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chaos.netfault list|sweep``: show our rules, or remove dead owners' rules."""
    parser = argparse.ArgumentParser(prog="python -m chaos.netfault",
                                     description="Inspect and clean the network fault rules.")
    parser.add_argument("command", choices=["list", "sweep"],
                        help="list: print every rule in our chains with its owner's state; "
                             "sweep: remove the rules of dead processes")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        parser.error(reason)
    if args.command == "sweep":
        removed = sweep_dead_owners()
        print(f"removed {len(removed)} rule(s)")
        for rule in removed:
            print(f"  {rule}")
        return 0
    for rule in leftover_rules():
        tagged = owner_of(rule.partition(": ")[2])
        state = "unowned" if tagged is None else (
            f"owner pid {tagged[0].pid} {'alive' if tagged[0].is_alive() else 'DEAD'}")
        print(f"{state:<24} {rule}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
