"""One fault API in Toxiproxy's vocabulary, with two backends.

A :class:`Toxic` says what happens to the traffic of one instance: ``down`` (the proxy is
disabled: nothing gets through), ``timeout`` (a blackhole: data is dropped; with
``timeout > 0`` Toxiproxy closes the connection after that many ms), ``latency`` (``latency``
and ``jitter`` ms), ``bandwidth`` (``rate`` KB/s), ``reset_peer`` (TCP RST after ``timeout``
ms), ``slow_close`` (``delay`` ms), ``slicer`` (``average_size``, ``size_variation`` bytes,
``delay`` µs) and ``limit_data`` (close after ``bytes``). Each applies to one direction
(``stream``: ``downstream`` = server to client, ``upstream`` = client to server) or ``both``,
and to a fraction ``toxicity`` (0..1] of the connections.

Backends (:class:`FaultBackend`):

- :class:`LocalFaultBackend`: this machine, no Docker, built on :mod:`chaos.netfault`
  (iptables rules per instance address, as root). It does what the kernel rules do and the
  injector offers: ``down``, ``timeout`` (``timeout=0``; per stream: iptables ``DROP`` of
  the packets to or from the instance), ``reset_peer`` (``timeout=0``, both directions), and
  ``latency`` and ``bandwidth`` per stream (through the injector's in-process proxy), all at
  toxicity 1.
  Anything else raises :class:`UnsupportedToxicError` naming the toxic and the way out.
- :class:`chaos.toxiproxy.ToxiproxyBackend`: a real Toxiproxy through its HTTP API (every
  toxic, per direction, with toxicity).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, Protocol

__all__ = [
    "DEFAULT_ATTRIBUTES",
    "STREAMS",
    "TOXIC_TYPES",
    "AppliedFault",
    "FaultBackend",
    "FaultError",
    "LocalFaultBackend",
    "Toxic",
    "UnsupportedToxicError",
]

Stream = Literal["downstream", "upstream", "both"]
STREAMS: tuple[str, ...] = ("downstream", "upstream", "both")

#: Every toxic type with its attributes and their defaults (Toxiproxy's names and units).
DEFAULT_ATTRIBUTES: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "down": MappingProxyType({}),
    "timeout": MappingProxyType({"timeout": 0}),
    "latency": MappingProxyType({"latency": 0, "jitter": 0}),
    "bandwidth": MappingProxyType({"rate": 0}),
    "reset_peer": MappingProxyType({"timeout": 0}),
    "slow_close": MappingProxyType({"delay": 0}),
    "slicer": MappingProxyType({"average_size": 0, "size_variation": 0, "delay": 0}),
    "limit_data": MappingProxyType({"bytes": 0}),
})
TOXIC_TYPES: tuple[str, ...] = tuple(DEFAULT_ATTRIBUTES)


class FaultError(RuntimeError):
    """A fault is malformed or a backend could not apply or remove it."""


class UnsupportedToxicError(FaultError):
    """The backend cannot produce this toxic (the message says which backend can)."""


@dataclasses.dataclass(frozen=True)
class Toxic:
    """What to do to an instance's traffic. ``attributes`` holds the type's attributes
    (missing ones take :data:`DEFAULT_ATTRIBUTES`); ``toxicity`` is the fraction of
    connections affected (1.0: all)."""

    type: str
    attributes: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    stream: str = "both"
    toxicity: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in DEFAULT_ATTRIBUTES:
            raise FaultError(f"toxic type {self.type!r}: expected one of {', '.join(TOXIC_TYPES)}")
        if self.stream not in STREAMS:
            raise FaultError(f"toxic stream {self.stream!r}: expected one of {', '.join(STREAMS)}")
        if isinstance(self.toxicity, bool) or not isinstance(self.toxicity, (int, float)) \
                or not 0 < self.toxicity <= 1:
            raise FaultError(f"toxicity {self.toxicity!r}: expected a number in (0, 1]")
        known = DEFAULT_ATTRIBUTES[self.type]
        merged = dict(known)
        for name, value in dict(self.attributes).items():
            if name not in known:
                allowed = ", ".join(known) or "none"
                raise FaultError(f"toxic {self.type}: unknown attribute {name!r} "
                                 f"(attributes: {allowed})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise FaultError(f"toxic {self.type}: attribute {name}={value!r}: expected a "
                                 "number >= 0")
            merged[name] = value
        object.__setattr__(self, "attributes", MappingProxyType(merged))

    @property
    def streams(self) -> tuple[str, ...]:
        """The Toxiproxy streams this toxic is applied to."""
        return ("downstream", "upstream") if self.stream == "both" else (self.stream,)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "attributes": dict(self.attributes), "stream": self.stream,
                "toxicity": self.toxicity}

    def describe(self) -> str:
        attrs = ", ".join(f"{k}={v:g}" for k, v in self.attributes.items() if v)
        extra = "" if self.toxicity == 1 else f" toxicity={self.toxicity:g}"
        return f"{self.type}({attrs}) {self.stream}{extra}".replace("() ", " ")


@dataclasses.dataclass
class AppliedFault:
    """A toxic applied to one instance by a backend; ``handle`` is the backend's own."""

    instance: str
    address: str
    port: int
    toxic: Toxic
    handle: Any


class FaultBackend(Protocol):
    """Applies and heals toxics on instances (addressed by ``address``, ``port``)."""

    name: str

    def apply(self, instance: str, address: str, port: int, toxic: Toxic) -> AppliedFault:
        """Apply ``toxic`` to the traffic of ``address:port`` now."""
        ...

    def heal(self, fault: AppliedFault) -> None:
        """Remove one applied fault (idempotent)."""
        ...

    def clear(self) -> None:
        """Remove every fault this backend applied."""
        ...


class LocalFaultBackend:
    """Faults on this machine through :class:`chaos.netfault.NetworkFaults` (root and
    iptables). ``faults``: an injector to use (default: a new one, cleared by
    :meth:`clear`)."""

    name = "local"

    def __init__(self, faults: Any | None = None) -> None:
        if faults is None:
            from chaos.netfault import NetworkFaults

            faults = NetworkFaults()
        self._faults: Any = faults
        self._lock = threading.Lock()

    #: Toxics served by the injector's in-process proxy (connections must be intercepted
    #: before the application connects for them to hit existing connections).
    PROXY_TOXICS = ("latency", "bandwidth")

    def supports(self, toxic: Toxic) -> str | None:
        """``None`` if this backend can apply ``toxic``, else why not."""
        way_out = "use the toxiproxy backend (--faults toxiproxy) for it"
        if toxic.toxicity != 1:
            return f"toxicity {toxic.toxicity:g}: the local backend affects every connection " \
                   f"(toxicity 1); {way_out}"
        if toxic.type in self.PROXY_TOXICS:
            if not hasattr(self._faults, toxic.type):
                return (f"{toxic.type}: this machine's network fault injector (chaos.netfault) "
                        f"has no {toxic.type} support; {way_out}")
            if toxic.type == "bandwidth" and not toxic.attributes["rate"]:
                return "bandwidth with rate=0: give a rate in KB/s > 0"
            return None
        if toxic.stream != "both" and not (toxic.type == "timeout"
                                           and self._has_stream("blackhole")):
            return f"{toxic.type} on the {toxic.stream} stream only: the local backend " \
                   f"acts on both directions (stream: both); {way_out}"
        if toxic.type in ("timeout", "reset_peer"):
            if toxic.attributes["timeout"]:
                return f"{toxic.type} with timeout={toxic.attributes['timeout']:g} ms: the " \
                       f"local backend acts at once (timeout: 0); {way_out}"
            return None
        if toxic.type == "down":
            return None
        return f"{toxic.type}: the local backend (iptables) cannot shape traffic this way; " \
               f"{way_out}"

    def _has_stream(self, method: str) -> bool:
        """Whether the injector's ``method`` takes a ``stream`` (newer injectors do)."""
        import inspect

        found = getattr(self._faults, method, None)
        try:
            return found is not None and "stream" in inspect.signature(found).parameters
        except (TypeError, ValueError):
            return False

    def prepare(self, address: str, port: int) -> None:
        """Put the injector's pass-through proxy in front of ``address:port`` before the
        application connects, so that a later latency or bandwidth toxic also hits the
        connections already open (Toxiproxy's model: every connection goes through it)."""
        intercept = getattr(self._faults, "intercept", None)
        if intercept is not None:
            intercept(address, port)

    def apply(self, instance: str, address: str, port: int, toxic: Toxic) -> AppliedFault:
        reason = self.supports(toxic)
        if reason is not None:
            raise UnsupportedToxicError(reason)
        with self._lock:
            attrs = toxic.attributes
            if toxic.type == "timeout" and toxic.stream != "both":
                handle = self._faults.blackhole(address, stream=toxic.stream)
            elif toxic.type == "timeout":
                handle = self._faults.blackhole(address)
            elif toxic.type == "reset_peer":
                handle = self._faults.reset(address, port)
            elif toxic.type == "down":
                # Toxiproxy's disabled proxy refuses new connections and closes the open ones.
                handle = [self._faults.down(address, port), self._faults.reset(address, port)]
            elif toxic.type == "latency":
                handle = self._faults.latency(address, port, attrs["latency"] / 1000.0,
                                              attrs["jitter"] / 1000.0, stream=toxic.stream)
            else:  # bandwidth: Toxiproxy's rate is in KB/s
                handle = self._faults.bandwidth(address, port, attrs["rate"] * 1000.0,
                                                stream=toxic.stream)
        return AppliedFault(instance, address, port, toxic, handle)

    def heal(self, fault: AppliedFault) -> None:
        with self._lock:
            handles = fault.handle if isinstance(fault.handle, list) else [fault.handle]
            for handle in handles:
                self._faults.heal(handle)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
