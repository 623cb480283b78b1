"""``aurora_connection_tracker``: after the writer changes, connections still on the old writer
are moved before they can fail a write.

Needs the ``failover`` plugin on the same connection: its shared topology monitor says when the
writer changes, and its state says which instance each connection is on (without it the
tracker does nothing; a warning says so once).

How (zero cost per statement while the writer does not change):

- Every tracker is held in one process-wide weak set (a closed or collected connection simply
  drops out: nothing to unregister, nothing leaks). The tracker module listens to writer
  changes of every topology monitor (``topology.add_writer_listener``).
- When a monitor publishes a new writer, the trackers whose connection is on the old writer
  instance and opened under the previous topology epoch (``FailoverPlugin.stale``) are marked,
  and only those connections' execute chains are rebuilt to include the tracker. Nothing is
  done on the monitor's thread beyond that: no I/O, no socket touched.
- The marked connection's next statement (``execute``, ``executemany``, ``callproc``) first
  settles it, on the application's thread:

  * no transaction open: the connection is **recycled**: moved to the verified new writer
    (or, in a reader mode, a reader) through the failover plugin's own reconnect
    (:meth:`FailoverPlugin.recycle`: role verified, session state restored, ``on_connect``
    run, cursors rebound), the old physical connection aborted and closed, and the statement
    runs on the new one. The application sees no error;
  * a transaction open: the old physical connection is **aborted** (its socket shut down), so
    the statement fails as a lost connection and the failover plugin raises
    ``TransactionResolutionUnknownError`` from the new writer: the transaction's statements
    so far were on the old writer and cannot be moved silently;
  * the connection already moved (its own failover did it): nothing.

  Then the tracker leaves the chain again. Either way nothing reaches the demoted writer.

Decisions: ``tracker.marked`` (per writer change: old and new writer, connections marked),
``tracker.recycled``, ``tracker.aborted``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, cast

from .. import _lifecycle, topology
from .._decisions import Decision, get_decision_sink
from .._pipeline import Call, ConnectionChanged, Handler, Op, Plugin, PluginContext
from ..drivers.base import TxStatus
from ..hosts import TopologyChange

if TYPE_CHECKING:
    from ..topology import TopologyMonitor
    from .failover import FailoverPlugin

__all__ = ["ConnectionTrackerPlugin", "tracked"]

log = logging.getLogger("resilient_db.plugins.aurora_connection_tracker")

_lock = threading.Lock()
_trackers: weakref.WeakSet[ConnectionTrackerPlugin] = weakref.WeakSet()
_warned = False


def tracked() -> int:
    """How many connections are tracked now (diagnostics, tests)."""
    with _lock:
        return len(_trackers)


def _on_writer_changed(monitor: TopologyMonitor, change: TopologyChange) -> None:
    """Mark the connections left on the old writer (monitor thread, monitor lock held:
    quick, no I/O)."""
    old = change.writer_before
    if old is None:
        return
    with _lock:
        trackers = list(_trackers)
    marked = sum(1 for tracker in trackers if tracker._mark(old))
    get_decision_sink().record(Decision("tracker.marked", ConnectionTrackerPlugin.code, {
        "resilient_db.tracker.cluster": monitor.key,
        "resilient_db.topology.writer_before": old,
        "resilient_db.topology.writer": change.writer_after or "",
        "resilient_db.topology.epoch": change.epoch,
        "resilient_db.tracker.marked": marked,
    }))
    if marked:
        log.info("cluster %s: writer %s replaced by %s; %d connection(s) on it will be "
                 "recycled before their next statement", monitor.key, old,
                 change.writer_after, marked)


class ConnectionTrackerPlugin(Plugin):
    """See the module docstring. ``recycled``/``aborted``: how many times this connection was
    moved silently / had its old physical connection aborted."""

    code = "aurora_connection_tracker"
    single_host = True  # finds the cluster's instances itself
    intercepts = frozenset({Op.EXECUTE, Op.EXECUTEMANY, Op.CALLPROC})

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        #: The old writer's instance id while this connection waits to be settled.
        self._pending: str | None = None
        self._settling = threading.Lock()
        self.recycled = 0
        self.aborted = 0
        topology.add_writer_listener(_on_writer_changed)
        with _lock:
            _trackers.add(self)

    def dormant(self) -> bool:
        return self._pending is None

    def failover(self) -> FailoverPlugin | None:
        """The failover plugin of the same connection, if enabled."""
        ref = self.ctx.extra.get("failover")
        if not isinstance(ref, weakref.ref):
            return None
        plugin = cast("FailoverPlugin | None", ref())
        if plugin is None or plugin.dormant():
            return None
        return plugin

    def on_connection_changed(self, event: ConnectionChanged) -> None:
        global _warned
        if event.reason == "close":
            with _lock:  # closed by the application: nothing left to move
                _trackers.discard(self)
                self._pending = None
            return
        if event.reason == "connect" and self.failover() is None and not _warned:
            _warned = True
            log.warning("aurora_connection_tracker needs the failover plugin (and "
                        "enable_failover) on the same connection: it tracks nothing without it")

    # --- marking (monitor thread) ------------------------------------------------------------
    def _mark(self, old_writer: str) -> bool:
        plugin = self.failover()
        if plugin is None or plugin.instance_id != old_writer or not plugin.stale:
            return False
        with _lock:
            self._pending = old_writer
            self.ctx.rebuild()  # the tracker joins this connection's execute chains
        return True

    # --- settling (application thread) -------------------------------------------------------
    def wrap_execute(self, proceed: Handler) -> Handler:
        settle = self._settle

        def handler(call: Call) -> Any:
            return proceed(settle(call))

        return handler

    def _settle(self, call: Call) -> Call:
        """Recycle or abort the connection if it is still on the old writer; the call to run
        (re-aimed at the new physical connection after a recycle)."""
        with self._settling:
            old = self._pending
            if old is None:
                return call
            try:
                return self._settle_on(call, old)
            finally:
                with _lock:
                    self._pending = None
                    self.ctx.rebuild()  # out of the chains again

    def _settle_on(self, call: Call, old: str) -> Call:
        plugin = self.failover()
        if plugin is None or plugin.instance_id != old or not plugin.stale:
            return call  # moved already (its own failover), or nothing to move it with
        proxy = call.connection
        raw = proxy._raw
        if self._may_be_in_transaction(raw):
            self._abort(raw, old, "a transaction is open")
            return call
        if not plugin.recycle(proxy):
            self._abort(raw, old, "no instance within failover_timeout_sec")
            return call
        self.recycled += 1
        self.ctx.decide("tracker.recycled", self.code, **{
            "resilient_db.topology.writer_before": old,
            "resilient_db.instance.id": plugin.instance_id or "",
            "server.address": proxy._host.host,
        })
        log.info("connection recycled from the old writer %s to %s (instance %s)", old,
                 proxy._host, plugin.instance_id)
        again = proxy.resilient.retarget(call)
        return again if again is not None else call

    def _may_be_in_transaction(self, raw: Any) -> bool:
        """Whether a transaction may be open on ``raw``; only a known "no" allows moving the
        connection silently. mysql-connector keeps the server's flag even once it noticed the
        connection is gone (its status then says "unknown"); libpq's status is kept until the
        next I/O."""
        driver = self.ctx.driver
        if driver.code == "mysql-connector":
            flag = getattr(raw, "in_transaction", None)
            if isinstance(flag, bool):
                return flag
        return driver.transaction_status(raw) is not TxStatus.IDLE

    def _abort(self, raw: Any, old: str, why: str) -> None:
        self.ctx.driver.abort(raw)
        self.aborted += 1
        self.ctx.decide("tracker.aborted", self.code, **{
            "resilient_db.topology.writer_before": old, "resilient_db.tracker.reason": why})
        log.info("connection on the old writer %s aborted (%s): its statement fails over",
                 old, why)


def _reset_in_child() -> None:
    # After fork(): a fresh lock (the topology monitor's thread may have held it); the
    # parent's connections are not the child's to move (see _proxy).
    global _lock, _trackers
    _lock = threading.Lock()
    _trackers = weakref.WeakSet()


_lifecycle.on_fork_child(_reset_in_child)
