"""``gdb_failover``: failover for an Aurora Global Database, with a home region.

The ``failover`` plugin (same triggers, outcomes, session restore, telemetry) reading the
*global* topology (``aurora_global_db_instance_status``: every instance of every region, with
its region; each region's instances addressed with ``global_cluster_instance_host_patterns``),
and choosing where to reconnect by two modes instead of ``failover_mode``:

- ``active_home_failover_mode`` while the Global Database's primary region (the region of
  the writer the topology names) is the home region (``failover_home_region``, else the
  region of the endpoint connected to);
- ``inactive_home_failover_mode`` while the primary region is elsewhere (after a global
  switchover or failover).

The mode is decided again at every failover round, from the latest topology (a
``gdb_failover.mode`` decision), so a failover that starts while the topology still names the
old writer changes mode as soon as the monitor sees the new one. Modes and their instances:
:class:`~resilient_db.global_db.GlobalFailoverMode`; plans: :func:`~resilient_db.global_db.
plan_global`. ``strict-writer`` waits for a writer the topology monitor verified on its own
connection, in whichever region it now is.

A connection that ``gdb_rw`` moved to a reader fails over as ``home-reader-or-writer`` (a home
reader, else the writer), whatever the configured modes.
"""

from __future__ import annotations

import dataclasses
import time

from .. import response_time
from .._decisions import get_decision_sink
from .._params import ACTIVE_HOME_FAILOVER_MODE, FAILOVER_HOME_REGION, INACTIVE_HOME_FAILOVER_MODE
from .._pipeline import PluginContext
from ..errors import ConfigurationError, ConnectAttempt
from ..failover_core import FailoverMode, FailoverPlan
from ..global_db import (
    GlobalFailoverMode,
    HomeDecision,
    decide_mode,
    default_global_mode,
    home_region,
    plan_global,
)
from ..hosts import Role, TopologySnapshot
from ..selection import selection_context
from ..topology import TopologyMonitor
from .failover import FailoverPlugin, _NoConnectionError

__all__ = ["GdbFailoverPlugin"]


class GdbFailoverPlugin(FailoverPlugin):
    """See the module docstring. ``home``: the home region; ``active_mode`` /
    ``inactive_mode``: the configured (or default) modes; ``last_decision``: the mode the
    last failover round used (``None`` before the first)."""

    code = "gdb_failover"

    def __init__(self, ctx: PluginContext) -> None:
        if "failover" in ctx.plugins:
            raise ConfigurationError(
                "plugins: gdb_failover and failover (or failover_v2) cannot serve the same "
                "connection; gdb_failover is failover with home-region modes: keep one",
                parameter="plugins", value=",".join(sorted(ctx.plugins)))
        super().__init__(ctx)
        settings = ctx.settings
        self.home = home_region(settings[FAILOVER_HOME_REGION], ctx.host.host,
                                FAILOVER_HOME_REGION.name)
        default = default_global_mode(self.endpoint.kind)
        active = settings[ACTIVE_HOME_FAILOVER_MODE]
        inactive = settings[INACTIVE_HOME_FAILOVER_MODE]
        self.active_mode = (GlobalFailoverMode.parse(active, ACTIVE_HOME_FAILOVER_MODE.name)
                            if active else default)
        self.inactive_mode = (
            GlobalFailoverMode.parse(inactive, INACTIVE_HOME_FAILOVER_MODE.name)
            if inactive else default)
        self.mode = self.active_mode.base
        self.last_decision: HomeDecision | None = None
        self._on_split_reader = False

    def follow(self, *, instance_id: str | None, role: Role, mode: FailoverMode) -> None:
        with self._lock:
            self._on_split_reader = role is Role.READER
            super().follow(instance_id=instance_id, role=role, mode=mode)

    def decide(self, snapshot: TopologySnapshot | None, *, record: bool = True
               ) -> HomeDecision:
        """The mode that applies with ``snapshot`` (recorded as a decision unless ``record``
        is false)."""
        if self._on_split_reader:
            decision = decide_mode(self.home, snapshot, GlobalFailoverMode.HOME_READER_OR_WRITER,
                                   GlobalFailoverMode.HOME_READER_OR_WRITER)
        else:
            decision = decide_mode(self.home, snapshot, self.active_mode, self.inactive_mode)
        if record:
            self.last_decision = decision
            get_decision_sink().record(decision.to_decision())
        return decision

    def _plan(self, monitor: TopologyMonitor, since: float,
              remaining: float | None) -> FailoverPlan | None:
        decision = self.decide(monitor.snapshot, record=False)
        if decision.mode is GlobalFailoverMode.STRICT_WRITER:
            self.mode = FailoverMode.STRICT_WRITER
            plan = super()._plan(monitor, since, remaining)
            # The wait found the writer verified now: decide again with its region (a global
            # switchover makes the home inactive, whose mode may not follow the writer).
            basis = monitor.snapshot
            if plan is not None and plan.attempts:
                found = plan.attempts[0].host
                listed = basis.by_address(found) if basis is not None else None
                basis = TopologySnapshot(((listed or found).replace(role=Role.WRITER),))
            decision = self.decide(basis)
            if plan is None or decision.mode is GlobalFailoverMode.STRICT_WRITER:
                return plan
        else:
            self.decide(monitor.snapshot)
        self.mode = decision.mode.base
        snapshot = monitor.snapshot
        if snapshot is None or not snapshot.hosts:
            monitor.request_refresh()
            if monitor.wait_for_writer(since, remaining) is None:
                return None
            snapshot = monitor.snapshot or TopologySnapshot(())
        now = time.monotonic()
        allowed, excluded = self._allowed(snapshot)
        ctx = selection_context(rng=monitor.rng, now=now, cursor=monitor.round_robin,
                                weights=self.weights)
        ctx = dataclasses.replace(ctx, response_times=response_time.selection_times(
            self.ctx, self.strategy, allowed.hosts))
        plan = plan_global(decision.mode, allowed, self.home, monitor.bad_hosts(), now,
                           self.strategy, ctx, max_lag=self.max_lag)
        if excluded and not plan.attempts:
            raise _NoConnectionError([
                ConnectAttempt(h.host, h.port, f"not allowed: {excluded[h.address]}")
                for h in snapshot.hosts if h.address in excluded])
        if not plan.attempts:
            monitor.request_refresh()  # nothing of the mode's instances yet: look again
        return dataclasses.replace(plan, excluded=tuple(excluded))

    def _wanted(self) -> str:
        decision = self.last_decision
        mode = decision.mode if decision is not None else self.active_mode
        return f"instance for {mode.value} (home region {self.home})"

    def __repr__(self) -> str:
        return (f"<GdbFailoverPlugin home={self.home} active={self.active_mode.value} "
                f"inactive={self.inactive_mode.value} instance={self.instance_id} "
                f"role={self.role.value}>")
