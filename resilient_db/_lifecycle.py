"""Background work's lifetime (DESIGN §6).

Nothing starts at import. Components that start background work (topology monitors, failure
monitors, the watchdog) register a stop callable here when they first start;
:func:`shutdown` stops them all, in reverse order of registration, and runs at interpreter exit
without delaying it (every registered stop must be bounded).
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("resilient_db.lifecycle")

_lock = threading.Lock()
_stoppers: dict[str, Callable[[], None]] = {}
_atexit_registered = False


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
