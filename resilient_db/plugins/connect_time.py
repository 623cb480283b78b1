"""``connect_time``: how long each physical connect takes.

Every physical connect (initial, reconnect, failover) is timed. Each is logged at DEBUG on
``resilient_db.plugins.connect_time``, at WARNING when slower than
``connect_time_slow_threshold``, and reported as a ``connect.timed`` decision. The plugin
instance keeps totals: ``conn.pipeline.plugin("connect_time").stats``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from .._params import CONNECT_TIME_SLOW_THRESHOLD
from .._pipeline import ConnectContext, ConnectHandler, Plugin, PluginContext

log = logging.getLogger("resilient_db.plugins.connect_time")


@dataclass(slots=True)
class TimingStats:
    """Totals for one connection's plugin instance. Durations in seconds."""

    count: int = 0
    failures: int = 0
    total: float = 0.0
    last: float | None = None
    slowest: float = 0.0

    def add(self, elapsed: float, ok: bool) -> None:
        self.count += 1
        self.failures += not ok
        self.total += elapsed
        self.last = elapsed
        self.slowest = max(self.slowest, elapsed)


class ConnectTimePlugin(Plugin):
    code = "connect_time"

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        self.stats = TimingStats()
        threshold = ctx.settings[CONNECT_TIME_SLOW_THRESHOLD]
        self._slow = math.inf if threshold is None else threshold

    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        start = perf_counter()
        ok = False
        try:
            conn = proceed(ctx)
            ok = True
            return conn
        finally:
            elapsed = perf_counter() - start
            self.stats.add(elapsed, ok)
            level = logging.WARNING if elapsed > self._slow else logging.DEBUG
            if log.isEnabledFor(level):
                log.log(level, "connect to %s %s in %.1f ms", ctx.host,
                        "succeeded" if ok else "failed", elapsed * 1000)
            self.ctx.decide(
                "connect.timed", self.code,
                **{"server.address": ctx.host.host, "server.port": ctx.host.port,
                   "duration": elapsed, "success": ok, "initial": ctx.initial},
            )
