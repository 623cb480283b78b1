"""The per-connection part of telemetry: a span per physical connect attempt, the connection
metrics, and (``telemetry_query_spans``) a CLIENT span per statement.

It is put outermost in the chain of every connection that sets ``enable_telemetry`` (it is
not a plugin users list). Without ``telemetry_query_spans`` it intercepts only ``close``, so
statements cost nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._pipeline import (
    STATEMENT_OPS,
    Call,
    ConnectContext,
    ConnectHandler,
    Handler,
    Op,
    Plugin,
    PluginContext,
)
from . import _sql
from . import names as n
from ._sink import TelemetrySink

log = logging.getLogger("resilient_db.telemetry")

_CLOSE_METHODS = frozenset({"Connection.close", "Connection.__exit__"})


def _database(args: dict[str, Any]) -> str | None:
    value = args.get("dbname") or args.get("database")
    return str(value) if value else None


class TelemetryPlugin(Plugin):
    """Connect spans and connection metrics for one connection (see the module docstring).

    ``pool.name`` of the connection metrics is ``server.address:server.port/db.namespace``
    of the endpoint the application connected to (a wrapper has no pool: this names the
    group of connections made the same way); every open connection is in state ``used``.
    """

    code = "telemetry"
    intercepts = frozenset({Op.CLOSE})

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        from . import active

        sink = active()
        #: The sink this connection reports to (the one active when it was opened).
        self.sink: TelemetrySink = sink if sink is not None else TelemetrySink(
            traces=False, metrics=False)
        host = ctx.host
        port = host.port if host.port is not None else ctx.driver.default_port
        self.system = n.DB_SYSTEMS.get(ctx.driver.code, ctx.driver.code)
        self.namespace: str | None = None
        self.pool = f"{host.host}:{port}"
        self._counted = False
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # --- connection counting -----------------------------------------------------------------
    def _pool_labels(self) -> dict[str, Any]:
        return {n.POOL_NAME: self.pool, n.CONNECTION_STATE: n.STATE_USED}

    def _opened(self) -> None:
        sink = self.sink
        if sink.meter is None:
            return
        with self._lock:
            if self._counted:
                return
            self._counted = True
        labels = self._pool_labels()
        sink.connection_count.add(1, labels)
        # A connection dropped without close() still leaves the count.
        self._finalizer = weakref.finalize(self, _uncount, sink, labels)

    def _closed(self) -> None:
        with self._lock:
            if not self._counted:
                return
            self._counted = False
        finalizer = self._finalizer
        if finalizer is not None:
            finalizer()

    # --- connect phase -------------------------------------------------------------------------
    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        sink = self.sink
        if ctx.initial and self.namespace is None:
            self.namespace = _database(ctx.args)
            if self.namespace:
                self.pool = f"{self.pool}/{self.namespace}"
        attributes: dict[str, Any] = {
            n.DB_SYSTEM_NAME: self.system,
            n.SERVER_ADDRESS: ctx.host.host,
            n.ATTR_CONNECT_INITIAL: ctx.initial,
        }
        port = ctx.host.port if ctx.host.port is not None else ctx.driver.default_port
        if port is not None:
            attributes[n.SERVER_PORT] = port
        if self.namespace:
            attributes[n.DB_NAMESPACE] = self.namespace
        span: Any = None
        tracer = sink.tracer
        started = time.monotonic()
        error: str | None = None
        try:
            if tracer is not None:
                try:
                    span = tracer.start_span(n.SPAN_CONNECT, kind=SpanKind.CLIENT,
                                             attributes=attributes)
                except Exception:
                    log.debug("cannot start a connect span", exc_info=True)
                    span = None
            if span is None:
                raw = proceed(ctx)
            else:
                with trace.use_span(span, end_on_exit=False, record_exception=False,
                                    set_status_on_exception=False):
                    raw = proceed(ctx)
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            elapsed = time.monotonic() - started
            _finish(sink, span, error, elapsed, self.pool, ctx.host.host)
        if ctx.initial:
            self._opened()
        return raw

    # --- execute phase -------------------------------------------------------------------------
    def execute(self, call: Call, proceed: Handler) -> Any:
        if call.method in _CLOSE_METHODS:
            try:
                return proceed(call)
            finally:
                self._closed()
        return proceed(call)


def _finish(sink: TelemetrySink, span: Any, error: str | None, elapsed: float, pool: str,
            address: str) -> None:
    try:
        if span is not None:
            if error is not None:
                span.set_attribute(n.ERROR_TYPE, error)
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()
        if sink.meter is not None:
            labels: dict[str, Any] = {n.POOL_NAME: pool, n.SERVER_ADDRESS: address}
            if error is not None:
                labels[n.ERROR_TYPE] = error
            sink.create_time.record(elapsed, labels)
    except Exception:  # telemetry never raises
        log.debug("connect telemetry failed", exc_info=True)


def _uncount(sink: TelemetrySink, labels: dict[str, Any]) -> None:
    try:
        sink.connection_count.add(-1, labels)
    except Exception:
        log.debug("connection count failed", exc_info=True)


class QueryTelemetryPlugin(TelemetryPlugin):
    """:class:`TelemetryPlugin` plus a CLIENT span and ``db.client.operation.duration`` per
    statement (``telemetry_query_spans``)."""

    intercepts = frozenset({Op.CLOSE}) | STATEMENT_OPS

    def wrap_execute(self, proceed: Handler) -> Handler:
        plugin = self
        run = proceed
        statement_ops = STATEMENT_OPS

        def handler(call: Call) -> Any:
            if call.op not in statement_ops:
                return plugin.execute(call, run)
            return plugin._statement(call, run)

        return handler

    def _statement(self, call: Call, proceed: Handler) -> Any:
        sink = self.sink
        try:
            attributes, name = self._describe(call)
            tracer = sink.tracer
            span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes) if (
                tracer is not None) else None
        except Exception:
            log.debug("statement telemetry failed", exc_info=True)
            return proceed(call)
        started = time.perf_counter()
        error: str | None = None
        try:
            if span is None:
                return proceed(call)
            with trace.use_span(span, end_on_exit=False, record_exception=False,
                                set_status_on_exception=False):
                return proceed(call)
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            elapsed = time.perf_counter() - started
            try:
                if span is not None:
                    if error is not None:
                        span.set_attribute(n.ERROR_TYPE, error)
                        span.set_status(Status(StatusCode.ERROR, error))
                    span.end()
                if sink.meter is not None:
                    labels = {k: v for k, v in attributes.items() if k != n.DB_QUERY_TEXT}
                    if error is not None:
                        labels[n.ERROR_TYPE] = error
                    sink.operation_duration.record(elapsed, labels)
            except Exception:
                log.debug("statement telemetry failed", exc_info=True)

    def _describe(self, call: Call) -> tuple[dict[str, Any], str]:
        host = call.connection._host
        attributes: dict[str, Any] = {n.DB_SYSTEM_NAME: self.system,
                                      n.SERVER_ADDRESS: host.host}
        port = host.port if host.port is not None else self.ctx.driver.default_port
        if port is not None:
            attributes[n.SERVER_PORT] = port
        if self.namespace:
            attributes[n.DB_NAMESPACE] = self.namespace
        operation: str | None = None
        collection: str | None = None
        if call.op is Op.CALLPROC:
            operation = "CALL"
            if call.args and isinstance(call.args[0], str):
                collection = call.args[0]
        elif call.args:
            text = _sql.query_text(call.args[0])
            if text is not None:
                operation, collection, attributes[n.DB_QUERY_TEXT] = _sql.analyse(text)
        if call.op is Op.EXECUTEMANY and operation is not None:
            operation = f"BATCH {operation}"
        if operation is not None:
            attributes[n.DB_OPERATION_NAME] = operation
        if collection is not None:
            attributes[n.DB_COLLECTION_NAME] = collection
        target = collection or self.namespace
        if operation is not None:
            name = f"{operation} {target}" if target else operation
        else:
            name = target or self.system
        return attributes, name
