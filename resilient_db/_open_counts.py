"""Open application connections per host address, process-wide: the input of the
``least_connections`` reader selection strategy.

Counted where it costs nothing per statement: a connection takes a seat on the instance it is
connected to when ``connect`` hands it over, moves it when failover (or the tracker) replaces
its physical connection, and gives it up when it is closed or garbage collected. It works with
any plugin list (no plugin needs to be enabled), and counts only the application's
connections: the monitors' own connections do not go through a connection proxy.

Which instance: the address the driver was actually asked to connect to, recorded by the
innermost connect step (:func:`note_opened`), so a connection made through a cluster or reader
endpoint and redirected by ``initial_connection`` counts on the instance it reached. One that
``initial_connection`` verified through the endpoint's DNS is re-noted on its instance when the
instance's address is known (topology or host pattern); otherwise (no ``initial_connection``)
it counts on the endpoint's name, which no topology host has: its instance is not known
without asking the server.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from . import _lifecycle

if TYPE_CHECKING:
    from ._pipeline import HostSpec

__all__ = ["Seat", "address_for", "note_opened", "open_counts"]

_lock = threading.Lock()
_counts: dict[str, int] = {}
#: Driver connection -> the address it was opened to (weak: a closed, dropped connection
#: leaves no entry behind).
_opened_to: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _address(host: HostSpec, default_port: int) -> str:
    from .hosts import address_of  # hosts imports the pipeline module: import lazily

    return address_of(host.host, host.port if host.port is not None else default_port)


def note_opened(raw: Any, host: HostSpec, default_port: int) -> None:
    """Remember that the driver connection ``raw`` was opened to ``host`` (innermost connect
    step; once per physical connect)."""
    # A driver object that cannot be weakly referenced counts on the proxy's host instead.
    with contextlib.suppress(TypeError):
        _opened_to[raw] = _address(host, default_port)


def address_for(raw: Any, host: HostSpec, default_port: int) -> str:
    """The address ``raw`` is connected to: where it was opened, else ``host``'s."""
    try:
        found = _opened_to.get(raw)
    except TypeError:
        found = None
    return found if found is not None else _address(host, default_port)


def open_counts() -> Mapping[str, int]:
    """A snapshot of open application connections per address (absent: none)."""
    with _lock:
        return MappingProxyType(dict(_counts))


class Seat:
    """One application connection's place in the counts: on one address until moved or
    released (released at most once; garbage collection releases it too)."""

    __slots__ = ("address",)

    def __init__(self, address: str) -> None:
        self.address: str | None = address
        with _lock:
            _counts[address] = _counts.get(address, 0) + 1

    def move(self, address: str) -> None:
        with _lock:
            old = self.address
            if old == address or old is None:
                return
            _drop(old)
            _counts[address] = _counts.get(address, 0) + 1
            self.address = address

    def release(self) -> None:
        with _lock:
            old, self.address = self.address, None
            if old is not None:
                _drop(old)

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit module globals may be gone already.
        try:  # noqa: SIM105
            self.release()
        except Exception:
            pass


def _drop(address: str) -> None:
    left = _counts.get(address, 0) - 1
    if left > 0:
        _counts[address] = left
    else:
        _counts.pop(address, None)


def _reset_in_child() -> None:
    # After fork(): the child starts with no open connections of its own (the inherited ones
    # are disarmed and drop their seats without touching these counts: ConnectionProxy
    # ._inherited) and a fresh lock (a parent thread may have held it).
    global _lock, _counts, _opened_to
    _lock = threading.Lock()
    _counts = {}
    _opened_to = weakref.WeakKeyDictionary()


_lifecycle.on_fork_child(_reset_in_child)
