"""``fastest_response_strategy``: measure each instance's response time in the background, so
that the ``fastest_response`` reader selection strategy (``failover``'s
``failover_reader_host_selector_strategy``, ``initial_connection``'s
``initial_connection_host_selector_strategy``, read/write splitting) picks the reader that
answers fastest.

What it intercepts: nothing per statement (no execute chain, no cost on the hot path). At
connect it keeps its place in the connect chain, so that the measuring connections go through
the plugins inside it (credentials plugins apply, as for ``efm``'s probes). The instances
measured are those of the cluster's topology, as ``failover`` learns it when the connection
opens (:func:`resilient_db.response_time.measure`), plus any candidate of a later selection
(:func:`resilient_db.response_time.selection_times`): a reader added since is measured from
then on. Each instance has one process-wide
:class:`~resilient_db.response_time.ResponseTimeMonitor` (one thread, one server connection),
shared by every connection that uses it: the cost is one extra server connection per instance,
however many application connections there are. A connection lets go of its monitors when it
is closed; a monitor nobody uses stops after ``monitor_disposal_time_ms``.

Unlike the AWS wrapper, a connection does not cache "the fastest host" for an interval: the
measurements themselves change only once per interval, and a cached choice would outlive what
the selection filters out meanwhile (a host marked down, cooling after a failed connect, or
over ``max_replica_lag``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from .. import response_time
from .._params import MONITOR_DISPOSAL_TIME, RESPONSE_MEASUREMENT_INTERVAL
from .._pipeline import (
    ConnectContext,
    ConnectHandler,
    ConnectionChanged,
    HostSpec,
    Plugin,
    PluginContext,
)
from ..hosts import Host
from ..response_time import ResponseTimeMonitor

__all__ = ["FastestResponseStrategyPlugin"]

log = logging.getLogger("resilient_db.plugins.fastest_response_strategy")

#: Connect arguments that would bypass the instance measured.
_ADDRESS_ARGS = ("hostaddr", "unix_socket")


class FastestResponseStrategyPlugin(Plugin):
    """See the module docstring. ``interval``: seconds between measurements; ``disposal``:
    how long a monitor nobody uses lives on."""

    code = "fastest_response_strategy"

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        self.interval: float = settings[RESPONSE_MEASUREMENT_INTERVAL] or 30.0
        disposal = settings[MONITOR_DISPOSAL_TIME]
        self.disposal: float = 60.0 if disposal is None else disposal
        self._lock = threading.Lock()
        #: The monitors this connection uses, by ``Host.address``.
        self._monitors: dict[str, ResponseTimeMonitor] = {}
        self._closed = False
        self._inner_connect: ConnectHandler | None = None
        self._args: dict[str, Any] = {}
        self._target: Any = None
        # Found by the selecting plugins of the same connection; weak: a cycle would outlive
        # `del conn`.
        ctx.extra[response_time.EXTRA_KEY] = weakref.ref(self)

    # --- connect phase -------------------------------------------------------------------------
    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        raw = proceed(ctx)
        if ctx.initial:
            self._inner_connect = proceed
            self._args = dict(ctx.args)
            self._target = ctx.target
        return raw

    def on_connection_changed(self, event: ConnectionChanged) -> None:
        if event.reason == "close":
            self._release()

    # --- what selecting plugins ask ----------------------------------------------------------
    def times(self, hosts: Iterable[Host]) -> Mapping[str, tuple[float, float]]:
        """See :meth:`resilient_db.response_time.Measurer.times`."""
        wanted = {h.address: h for h in hosts}
        using: list[ResponseTimeMonitor] = []
        for address, host in wanted.items():
            monitor = self._monitor(address, host)
            if monitor is not None:
                using.append(monitor)
        return response_time.response_times(using)

    def _monitor(self, address: str, host: Host) -> ResponseTimeMonitor | None:
        with self._lock:
            if self._closed:
                return None
            monitor = self._monitors.get(address)
        if monitor is not None and not monitor.stopped:
            return monitor
        driver = self.ctx.driver
        port = host.port if host.port is not None else driver.default_port
        key = (driver.code, host.host.lower(), port)
        measured = Host(host.host, port, instance_id=host.instance_id)

        def create() -> ResponseTimeMonitor:
            return ResponseTimeMonitor(key, measured, driver, interval=self.interval,
                                       disposal=self.disposal)

        while True:
            monitor = response_time.monitor_for(key, create)
            if monitor.attach(self, interval=self.interval, disposal=self.disposal):
                break  # else it stopped between the two calls: the next one is new
        with self._lock:
            if self._closed:
                monitor.detach(self)
                return None
            self._monitors[address] = monitor
        return monitor

    def _release(self) -> None:
        with self._lock:
            self._closed = True
            monitors, self._monitors = list(self._monitors.values()), {}
        for monitor in monitors:
            monitor.detach(self)

    # --- what a monitor asks -------------------------------------------------------------------
    def open_measuring_connection(self, host: Host, timeout: float) -> Any:
        """An autocommit connection to ``host`` through this connection's inner connect chain
        (credentials plugins apply), opened within about ``timeout`` seconds."""
        driver = self.ctx.driver
        args = dict(self._args)
        for name in _ADDRESS_ARGS:
            args.pop(name, None)
        args["host"] = host.host
        if host.port is not None:
            args["port"] = host.port
        args["autocommit"] = True
        whole = max(2, int(-(-timeout // 1)))  # both drivers take whole seconds; libpq >= 2
        if driver.code == "psycopg":
            args["connect_timeout"] = whole
            args["application_name"] = response_time.MEASURING_APPLICATION_NAME
        else:
            args.pop("connect_timeout", None)
            args["connection_timeout"] = whole
            args["use_pure"] = True  # the round trip reads the pure-Python connection's socket
            args["compress"] = False
        spec = HostSpec(host.host, host.port)
        ctx = ConnectContext(spec, args, self.ctx.settings, driver, self._target,
                             initial=False)
        connect = self._inner_connect
        if connect is None:
            return driver.connect(self._target, args, self.ctx.settings)
        return connect(ctx)

    def __repr__(self) -> str:
        return (f"<FastestResponseStrategyPlugin interval={self.interval:g} "
                f"monitors={len(self._monitors)}>")
