"""``execute_time``: how long each statement takes, as the application sees it.

Intercepts statement-sending calls (execute, executemany, callproc, copy), commit, rollback and
transaction blocks; fetches are not intercepted (they stay on the direct path). Each call is
logged at DEBUG on ``resilient_db.plugins.execute_time``, at WARNING when slower than
``execute_time_slow_threshold``, and reported as a ``statement.timed`` decision when the
decision sink is enabled. Totals: ``conn.pipeline.plugin("execute_time").stats``.
"""

from __future__ import annotations

import logging
import math
from time import perf_counter
from typing import Any

from .. import _decisions
from .._decisions import Decision
from .._params import EXECUTE_TIME_SLOW_THRESHOLD
from .._pipeline import RUN_CALL, STATEMENT_OPS, Call, Handler, Op, Plugin, PluginContext
from .connect_time import TimingStats

log = logging.getLogger("resilient_db.plugins.execute_time")


class ExecuteTimePlugin(Plugin):
    code = "execute_time"
    intercepts = STATEMENT_OPS | {Op.COMMIT, Op.ROLLBACK, Op.TRANSACTION}

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        self.stats = TimingStats()
        threshold = ctx.settings[EXECUTE_TIME_SLOW_THRESHOLD]
        self._slow = math.inf if threshold is None else threshold
        # Read once per connection: a logger level change applies to connections opened after.
        self._debug = log.isEnabledFor(logging.DEBUG)

    def _warn(self, call: Call, elapsed: float) -> None:
        log.warning("%s took %.1f ms (threshold %.1f ms)", call.method, elapsed * 1000,
                    self._slow * 1000)

    def wrap_execute(self, proceed: Handler) -> Handler:
        # Hot path: one closure (no method frame), a few float operations; logging and
        # decisions only when wanted.
        stats = self.stats
        slow = self._slow
        debug = self._debug
        warn = self._warn
        code = self.code

        innermost = proceed is RUN_CALL

        def timed(call: Call) -> Any:
            start = perf_counter()
            ok = False
            try:
                if innermost:  # call the driver here: one Python frame less per statement
                    kwargs = call.kwargs
                    result = call.fn(*call.args, **kwargs) if kwargs else call.fn(*call.args)
                else:
                    result = proceed(call)
                ok = True
                return result
            finally:
                elapsed = perf_counter() - start
                stats.count += 1
                stats.total += elapsed
                stats.last = elapsed
                if not ok:
                    stats.failures += 1
                stats.slowest = max(stats.slowest, elapsed)
                if elapsed > slow:
                    warn(call, elapsed)
                if debug:
                    log.debug("%s took %.3f ms", call.method, elapsed * 1000)
                sink = _decisions._sink
                if sink.enabled:
                    sink.record(Decision("statement.timed", code,
                                         {"db.operation.name": call.method,
                                          "duration": elapsed, "success": ok}))

        return timed
