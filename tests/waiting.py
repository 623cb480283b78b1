"""Waiting on a condition in tests: bounded polling that says what it last saw.

A test that checks state another process updates asynchronously (a replica replaying the
writer's topology rows, a timer moving a DNS name, a monitor thread changing its verdict)
must wait for that state, not assume it is already there and not sleep a fixed time: both
pass on a quiet machine and fail on a loaded one. :func:`wait_for` polls until the
observation satisfies the condition or a generous bound passes; on timeout its
AssertionError names what was awaited and the last value observed (or the last error), so
a failure on a busy CI machine can be told from a slow one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["SETTLE_TIMEOUT", "wait_for", "wait_until"]

T = TypeVar("T")

#: Default bound for state that settles within a second on a quiet machine: a liveness bound
#: with room for a 2-core machine under several parallel test runs, not a speed goal.
SETTLE_TIMEOUT = 30.0

_FIRST_INTERVAL = 0.01
_MAX_INTERVAL = 0.2


def wait_for(what: str, observe: Callable[[], T], satisfied: Callable[[T], bool],
             timeout: float = SETTLE_TIMEOUT, *,
             ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``observe`` until ``satisfied`` accepts its value; return that value.

    ``ignoring``: exception types that count as "not yet" (e.g. a connection refused while a
    server restarts); any other exception propagates at once. Polls with a short backoff
    (10 ms up to 200 ms). After ``timeout`` seconds raises AssertionError with ``what`` and
    the last value observed or error ignored.
    """
    deadline = time.monotonic() + timeout
    interval = _FIRST_INTERVAL
    last: str = "nothing observed yet"
    while True:
        try:
            value = observe()
        except ignoring as exc:
            last = f"error {type(exc).__name__}: {exc}"
        else:
            if satisfied(value):
                return value
            last = f"{value!r}"
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; "
                                 f"last observed: {last}")
        time.sleep(interval)
        interval = min(interval * 2, _MAX_INTERVAL)


def wait_until(what: str, check: Callable[[], Any], timeout: float = SETTLE_TIMEOUT, *,
               ignoring: tuple[type[BaseException], ...] = ()) -> Any:
    """Call ``check`` until it returns a true value; return that value. On timeout raise
    AssertionError naming ``what`` and the last (false) value or error
    (see :func:`wait_for`)."""
    return wait_for(what, check, bool, timeout, ignoring=ignoring)
