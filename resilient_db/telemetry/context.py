"""Run resilient_db's internal statements with OpenTelemetry instrumentation suppressed.

``opentelemetry-instrumentation-psycopg`` (and the other instrumentations) skip their spans
while the context carries the suppress-instrumentation key, so the topology monitor's reads,
probes and role checks never show up in the application's traces.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context as otel_context

try:
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as _KEY
except ImportError:  # pragma: no cover - very old API versions
    _KEY = "suppress_instrumentation"

#: Older instrumentations read the plain string key.
_PLAIN_KEY = "suppress_instrumentation"


def suppressed_context() -> otel_context.Context:
    """The current context with instrumentation suppressed."""
    ctx = otel_context.set_value(_KEY, True)
    return otel_context.set_value(_PLAIN_KEY, True, ctx)


@contextmanager
def suppress_instrumentation() -> Iterator[None]:
    """Within the block, instrumentations create no spans (for internal statements)."""
    token = otel_context.attach(suppressed_context())
    try:
        yield
    finally:
        otel_context.detach(token)


def suppress_for_thread() -> None:
    """Suppress instrumentation for the rest of the calling thread (monitor threads)."""
    otel_context.attach(suppressed_context())


def is_suppressed() -> bool:
    return bool(otel_context.get_value(_KEY) or otel_context.get_value(_PLAIN_KEY))
