"""Per-call options: one documented way to set options for one call or a block of calls.

``with resilient_db.call_options(timeout=2.0, idempotent=True): cur.execute(...)`` sets options
for everything run in the block, on this thread or asyncio task (a ``ContextVar``). It never
clashes with the driver's own keyword arguments because it does not travel as one. Blocks nest;
an inner block overrides only the options it names.

- ``timeout``: statement deadline in seconds, overriding the ``socket_timeout`` property for
  these calls (``None``: inherit; ``0``: no deadline; ``inf`` and NaN are refused: ``0`` says
  "no deadline"). Enforced by the process-wide watchdog
  (docs/deadlines.md); an expired deadline raises ``QueryTimeoutError`` and never fails over.
- ``idempotent``: mark statements safe to run twice; transparent retry after failover only
  replays statements marked so (``None``: inherit; default false).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace

from .errors import ConfigurationError

__all__ = ["CallOptions", "call_options", "current_options"]


@dataclass(frozen=True)
class CallOptions:
    """Options in force for a call. ``None`` means "not set here: use the property"."""

    timeout: float | None = None
    idempotent: bool | None = None


DEFAULT = CallOptions()
_deadlines_enabled = False


def _enable_deadlines() -> None:
    # The first per-call deadline in the process puts the deadline stage into every
    # connection's chains (resilient_db._deadline); until then connections without
    # socket_timeout have no such stage and pay nothing for it.
    global _deadlines_enabled
    from ._deadline import enable_per_call

    enable_per_call()
    _deadlines_enabled = True
_current: ContextVar[CallOptions] = ContextVar("resilient_db_call_options", default=DEFAULT)


def current_options() -> CallOptions:
    """The options in force for the current thread or task."""
    return _current.get()


@contextlib.contextmanager
def call_options(
    *, timeout: float | None = None, idempotent: bool | None = None
) -> Iterator[CallOptions]:
    """Set per-call options for the calls made inside the ``with`` block."""
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ConfigurationError(
                f"call_options(timeout=...): expected seconds as a number, got {timeout!r}",
                parameter="timeout",
                value=timeout,
            )
        if not 0 <= timeout < math.inf:  # also NaN
            raise ConfigurationError(
                f"call_options(timeout=...): expected a finite number of seconds >= 0 "
                f"(0 = no deadline), got {timeout!r}",
                parameter="timeout",
                value=timeout,
            )
    if idempotent is not None and not isinstance(idempotent, bool):
        raise ConfigurationError(
            f"call_options(idempotent=...): expected True or False, got {idempotent!r}",
            parameter="idempotent",
            value=idempotent,
        )
    if timeout and not _deadlines_enabled:
        _enable_deadlines()
    outer = _current.get()
    merged = replace(
        outer,
        timeout=float(timeout) if timeout is not None else outer.timeout,
        idempotent=idempotent if idempotent is not None else outer.idempotent,
    )
    token = _current.set(merged)
    try:
        yield merged
    finally:
        _current.reset(token)
