"""Background work's lifetime (DESIGN §6).

Nothing starts at import. Components that start background work (topology monitors, failure
monitors, the watchdog) register a stop callable here when they first start;
:func:`shutdown` stops them all, in reverse order of registration, and runs at interpreter exit
without delaying it (every registered stop must be bounded).

``fork()``: the child inherits the parent's objects but none of its threads, and every socket
it inherits is shared with the parent (closing a libpq connection sends Terminate, a
mysql-connector close sends COM_QUIT and shuts the socket down: either ends the *parent's*
session). So, in the child (``os.register_at_fork(after_in_child=...)``), each component that
keeps process-wide state resets it through the callable it registered with
:func:`on_fork_child`: registries start empty with fresh locks (a lock held by a parent thread
at fork time would stay held forever), inherited monitors are abandoned without a word to the
server (:meth:`DriverDialect.forget`), and the next use starts fresh monitors and a fresh
watchdog lazily. The parent's stop callables are dropped, never run: a child's
:func:`shutdown` (or exit) stops only what the child started.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("resilient_db.lifecycle")

_lock = threading.Lock()
_stoppers: dict[str, Callable[[], None]] = {}
_atexit_registered = False
_child_resets: list[Callable[[], None]] = []


def on_fork_child(reset: Callable[[], None]) -> None:
    """Run ``reset`` in the child after every ``fork()`` (registered at import by modules with
    process-wide state; in registration order). ``reset`` must not do I/O on inherited
    connections nor take a lock inherited from the parent."""
    _child_resets.append(reset)


def _after_fork_in_child() -> None:
    global _lock, _stoppers
    _lock = threading.Lock()
    _stoppers = {}  # the parent's: stopping them would close the parent's sessions
    for reset in _child_resets:
        try:
            reset()
        except Exception:  # a failed reset must not break the application's child
            log.warning("resetting %r after fork() failed", reset, exc_info=True)


# Registering is neither a thread nor a socket: allowed at import (DESIGN §6). Platforms
# without fork() (Windows) have no register_at_fork.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def register(name: str, stop: Callable[[], None]) -> None:
    """Register ``stop`` (bounded, idempotent) under ``name``; a second registration of the
    same name replaces the first."""
    global _atexit_registered
    with _lock:
        _stoppers[name] = stop
        if not _atexit_registered:
            atexit.register(shutdown)
            _atexit_registered = True


def unregister(name: str) -> None:
    with _lock:
        _stoppers.pop(name, None)


def running() -> list[str]:
    """Names of the components with background work registered now."""
    with _lock:
        return list(_stoppers)


def shutdown() -> None:
    """Stop every piece of background work resilient_db started. Safe to call repeatedly;
    later use of resilient_db starts what it needs again."""
    with _lock:
        items = list(_stoppers.items())
        _stoppers.clear()
    for name, stop in reversed(items):
        try:
            stop()
        except Exception:
            log.warning("stopping %s failed", name, exc_info=True)
