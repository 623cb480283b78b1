"""``read_write_splitting``: ``conn.read_only = True`` moves the connection to a reader of the
cluster, ``False`` back to the writer (AWS's plugin of the same name, topology-based).

The instances come from the cluster's topology monitor, shared with the ``failover`` plugin of
the same connection (required: it knows the writer it verified and the readers with their lag,
and it keeps the connection alive on a reader). The reader is chosen with
``reader_host_selector_strategy`` (the library's strategies, ``max_replica_lag`` applied first,
hosts failover saw fail recently left out while others remain); a reader that cannot be
reached is marked down and the next choice is tried; with no reader reachable the connection
stays on the writer, read-only there. The switching itself (transactions, session state,
pools, failover mode, close) is :mod:`resilient_db.plugins._splitting`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import response_time
from .._decisions import get_decision_sink
from .._params import MAX_REPLICA_LAG, READER_HOST_SELECTOR_STRATEGY
from .._pipeline import ConnectContext, ConnectHandler, HostSpec, PluginContext
from ..errors import ConfigurationError, ConnectAttempt, ReadWriteSplittingError
from ..hosts import Availability, Host, Role, TopologySnapshot, allowed_only
from ..selection import choose, configured, selection_context
from ._splitting import Slot, SplittingPlugin, WrongRoleError

__all__ = ["ReadWriteSplittingPlugin"]

log = logging.getLogger("resilient_db.plugins.read_write_splitting")


class ReadWriteSplittingPlugin(SplittingPlugin):
    """See the module docstring."""

    code = "read_write_splitting"
    single_host = True  # finds the cluster's instances itself (through failover's monitor)

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        self.strategy, self.weights = configured(
            settings[READER_HOST_SELECTOR_STRATEGY] or "random", settings,
            parameter=READER_HOST_SELECTOR_STRATEGY.name, plugins=ctx.plugins)
        self.max_lag: float | None = settings[MAX_REPLICA_LAG]

    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        if ctx.initial and self.failover() is None:
            raise ConfigurationError(
                "read_write_splitting needs the failover plugin, enabled, on the same "
                "connection (its topology monitor knows the writer and the readers): e.g. "
                "plugins=\"read_write_splitting,failover\" (and not enable_failover=False); "
                "to split between two endpoints without a topology use srw",
                parameter="plugins", value="read_write_splitting")
        return super().connect(ctx, proceed)

    def _monitor(self) -> Any:
        failover = self.failover()
        if failover is None:
            raise ReadWriteSplittingError("the failover plugin was disabled: no topology",
                                          reason="no_connection")
        return failover.monitor()

    def still_valid(self, slot: Slot) -> str | None:
        if slot.epoch != self.epoch():
            return "topology"  # the writer changed since it was opened
        snapshot = self._monitor().snapshot
        if slot.role is Role.READER and snapshot is not None and slot.instance_id:
            listed = snapshot.by_instance(slot.instance_id)
            if listed is None:
                return "removed"
            if listed.role is Role.WRITER:
                return "promoted"
        return None

    def open_reader(self, proxy: Any) -> Slot | None:
        monitor = self._monitor()
        snapshot = monitor.snapshot
        if snapshot is not None:
            # Only the readers the host list allows (custom_endpoint: the endpoint's members).
            snapshot, _ = allowed_only(snapshot, self.ctx.hosts, self.ctx.settings)
        readers = self.reader_candidates(snapshot) if snapshot is not None else []
        if not readers:
            self._stayed(proxy, "no_reader", ())
            return None
        now = time.monotonic()
        bad = monitor.bad_hosts()
        usable = [h for h in readers
                  if h.availability is Availability.UP and not bad.is_cooling(h, now)]
        remaining = usable or readers  # every reader down or cooling: try them anyway
        attempts: list[ConnectAttempt] = []
        sink = get_decision_sink()
        while remaining:
            sctx = selection_context(
                rng=monitor.rng, cursor=monitor.round_robin, weights=self.weights,
                now=time.monotonic(),
                response_times=response_time.selection_times(self.ctx, self.strategy,
                                                             remaining))
            choice = choose(self.strategy, remaining, sctx, max_lag=self.max_lag)
            host = choice.host
            if host is None:
                break
            sink.record(choice.to_decision())
            started = time.monotonic()
            try:
                slot = self._open(proxy, host, Role.READER)
            except ReadWriteSplittingError:
                raise  # a full pool: not the reader's fault
            except Exception as exc:
                attempts.append(ConnectAttempt(host.host, host.port, _outcome(exc),
                                               repr(exc), time.monotonic() - started))
                log.info("reader %s not usable for read/write splitting: %r", host, exc)
                if not isinstance(exc, WrongRoleError):
                    monitor.mark_down(host)
                remaining = [h for h in remaining if h.address != host.address]
                continue
            return slot
        self._stayed(proxy, "readers_unreachable", attempts)
        return None

    def reader_candidates(self, snapshot: TopologySnapshot) -> list[Host]:
        """The readers a connection may move to (``gdb_rw``: those of the home region)."""
        return list(snapshot.readers)

    def writer_refusal(self, writer: Host) -> str | None:
        """Why the connection must not move to ``writer`` (``None``: it may; ``gdb_rw``: a
        writer outside the home region)."""
        return None

    def open_writer(self, proxy: Any) -> Slot:
        monitor = self._monitor()
        writer: Host | None = monitor.writer
        if writer is None:
            snapshot = monitor.snapshot
            writer = snapshot.writer if snapshot is not None else None
        if writer is None:
            monitor.request_refresh()
            writer = monitor.wait_for_writer(time.monotonic(), self.connect_bound())
        attempts: list[ConnectAttempt] = []
        for last in (False, True):
            if writer is None:
                raise ReadWriteSplittingError(
                    "cannot switch to the writer: the cluster has no known writer now "
                    "(failover in progress?); the connection stays on the reader",
                    reason="no_connection", attempts=tuple(attempts))
            refusal = self.writer_refusal(writer)
            if refusal is not None:
                raise ReadWriteSplittingError(
                    f"cannot switch to the writer: {refusal}; the connection stays where it is",
                    reason="writer_out_of_home", host=str(writer.spec))
            started = time.monotonic()
            try:
                return self._open(proxy, writer, Role.WRITER)
            except ReadWriteSplittingError:
                raise
            except Exception as exc:
                attempts.append(ConnectAttempt(writer.host, writer.port, _outcome(exc),
                                               repr(exc), time.monotonic() - started))
                if last or not isinstance(exc, WrongRoleError):
                    raise ReadWriteSplittingError(
                        f"cannot switch to the writer {writer}: {exc!r}; the connection stays "
                        "on the reader", reason="no_connection", host=str(writer.spec),
                        attempts=tuple(attempts)) from exc
                # The known writer is a reader now (a switchover the monitor has yet to
                # see): once, wait for the writer the monitor verifies from now on.
                log.info("the known writer %s is a reader now; looking for the writer", writer)
                monitor.request_refresh()
                writer = monitor.wait_for_writer(time.monotonic(), self.connect_bound())
        raise AssertionError("unreachable")

    def _open(self, proxy: Any, host: Host, role: Role) -> Slot:
        spec = HostSpec(host.host, host.port)

        def opener(ctx: ConnectContext) -> tuple[Any, str | None]:
            return self.open_verified(proxy, ctx, role, host.instance_id)

        slot = self.obtain(proxy, spec, role, opener)
        if slot.instance_id is None:
            slot.instance_id = host.instance_id
        return slot

    def _stayed(self, proxy: Any, reason: str, attempts: tuple[ConnectAttempt, ...] | list[
            ConnectAttempt]) -> None:
        host = proxy._host
        log.warning("read_only set but no reader %s: the connection stays on %s",
                    "in the topology" if reason == "no_reader" else "could be reached", host)
        self.ctx.decide("splitting.stayed", self.code, **{
            "server.address": host.host, "resilient_db.splitting.reason": reason,
            "resilient_db.splitting.attempts": len(attempts)})


def _outcome(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, WrongRoleError) else "connect failed"
