"""``srw``: ``conn.read_only = True`` moves the connection to ``srw_read_endpoint``, ``False``
back to ``srw_write_endpoint`` (AWS's "simple read/write splitting", endpoint-based: no
topology needed, so it also serves custom endpoints, proxies and plain primary/replica pairs).

With ``srw_verify_new_connections`` (the default) every connection it opens is asked whether
it is a reader, and an endpoint leading to the wrong role (a DNS name lagging behind a
failover) is tried again every ``srw_connect_retry_interval_ms`` until
``srw_connect_retry_timeout_ms``; then the switch fails with ``ReadWriteSplittingError``
listing every attempt and the connection stays where it was. ``srw_verify_initial_connection_type``
checks the application's own connection the same way. The switching itself (transactions,
session state, pools, failover mode, close) is :mod:`resilient_db.plugins._splitting`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .._params import (
    SRW_CONNECT_RETRY_INTERVAL,
    SRW_CONNECT_RETRY_TIMEOUT,
    SRW_READ_ENDPOINT,
    SRW_VERIFY_INITIAL_CONNECTION_TYPE,
    SRW_VERIFY_NEW_CONNECTIONS,
    SRW_WRITE_ENDPOINT,
)
from .._pipeline import ConnectContext, ConnectHandler, HostSpec, PluginContext
from .._properties import Property
from ..errors import ConfigurationError, ConnectAttempt, ReadWriteSplittingError
from ..hosts import Role
from . import _cluster_connect as cc
from ._splitting import Slot, SplittingPlugin, WrongRoleError

__all__ = ["SimpleReadWriteSplittingPlugin", "parse_endpoint"]

log = logging.getLogger("resilient_db.plugins.srw")


def parse_endpoint(value: str | None, default_port: int | None, prop: Property[Any],
                   ) -> HostSpec:
    """``host`` or ``host:port`` (``default_port``: the application connection's port)."""
    text = (value or "").strip()
    if not text:
        raise ConfigurationError(
            f"{prop.name} is required by the srw plugin: the endpoint (host or host:port) "
            "to connect to, e.g. the cluster's reader endpoint for srw_read_endpoint and its "
            "cluster endpoint for srw_write_endpoint", parameter=prop.name, value=value)
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and host and "]" not in port:
        number = int(port)
        if not 0 < number < 65536:
            raise ConfigurationError(f"{prop.name}: port {number} out of range",
                                     parameter=prop.name, value=value)
        return HostSpec(host.strip("[]"), number)
    if any(ch.isspace() for ch in text) or "/" in text or (sep and not port.isdigit()
                                                          and text.count(":") == 1):
        raise ConfigurationError(
            f"{prop.name}: expected a host name or host:port, got {value!r}",
            parameter=prop.name, value=value)
    return HostSpec(text, default_port)


class SimpleReadWriteSplittingPlugin(SplittingPlugin):
    """See the module docstring."""

    code = "srw"

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        port = ctx.host.port
        self.read_endpoint = parse_endpoint(settings[SRW_READ_ENDPOINT], port, SRW_READ_ENDPOINT)
        self.write_endpoint = parse_endpoint(settings[SRW_WRITE_ENDPOINT], port,
                                             SRW_WRITE_ENDPOINT)
        self.verify: bool = settings[SRW_VERIFY_NEW_CONNECTIONS]
        initial = settings[SRW_VERIFY_INITIAL_CONNECTION_TYPE]
        self.initial_type = None if initial is None else Role(initial)
        self.retry_timeout: float = settings[SRW_CONNECT_RETRY_TIMEOUT] or 0.0
        self.retry_interval: float = settings[SRW_CONNECT_RETRY_INTERVAL] or 1.0

    # --- connect phase ---------------------------------------------------------------------
    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        if not ctx.initial or self.initial_type is None:
            return super().connect(ctx, proceed)
        role = self.initial_type

        def attempt(_: ConnectContext) -> tuple[Any, str | None]:
            raw = proceed(ctx)
            try:
                return raw, self._check(raw, ctx, role)
            except BaseException:
                cc.close_quietly(raw)
                raise

        raw, _ = self._retrying(ctx.host, role, lambda: attempt(ctx), initial=True)
        self._args = dict(ctx.args)
        self._target = ctx.target
        self._pending = (raw, ctx.host)
        return raw

    def _check(self, raw: Any, ctx: ConnectContext, role: Role) -> str | None:
        from ..hosts import Host
        from ..topology import read_self_report

        report = read_self_report(ctx.driver, cc.dialect_for(ctx, self.ctx.extra, raw), raw,
                                  Host(ctx.host.host, cc.port_of(ctx)), cc.addressing_for(ctx),
                                  with_topology=False)
        if not cc.has_role(report, role):
            raise WrongRoleError(f"{cc.role_text(report)}, not a {role.value}")
        return report.instance_id

    def initial_role(self, host: HostSpec) -> tuple[Role, str | None]:
        failover = self.failover()
        instance = failover.instance_id if failover is not None else None
        if failover is not None and failover.role is not Role.UNKNOWN:
            return failover.role, instance
        if self.initial_type is not None:
            return self.initial_type, instance
        if _same(host, self.read_endpoint):
            return Role.READER, instance
        return Role.WRITER, instance

    # --- switching -------------------------------------------------------------------------
    def still_valid(self, slot: Slot) -> str | None:
        if self.failover() is not None and slot.epoch != self.epoch():
            return "topology"
        return None

    def open_reader(self, proxy: Any) -> Slot:
        return self._open(proxy, self.read_endpoint, Role.READER)

    def open_writer(self, proxy: Any) -> Slot:
        return self._open(proxy, self.write_endpoint, Role.WRITER)

    def _open(self, proxy: Any, endpoint: HostSpec, role: Role) -> Slot:
        check = role if self.verify else None

        def opener(ctx: ConnectContext) -> tuple[Any, str | None]:
            return self.open_verified(proxy, ctx, check)

        slot: Slot = self._retrying(endpoint, role,
                                    lambda: self.obtain(proxy, endpoint, role, opener))
        return slot

    def _retrying(self, endpoint: HostSpec, role: Role, once: Any, *,
                  initial: bool = False) -> Any:
        """``once()`` until it succeeds, within ``srw_connect_retry_timeout_ms`` (without
        verification: once)."""
        deadline = time.monotonic() + self.retry_timeout
        attempts: list[ConnectAttempt] = []
        while True:
            started = time.monotonic()
            try:
                return once()
            except ReadWriteSplittingError:
                raise  # a full pool
            except Exception as exc:
                outcome = str(exc) if isinstance(exc, WrongRoleError) else "connect failed"
                attempts.append(ConnectAttempt(endpoint.host, endpoint.port, outcome, repr(exc),
                                               time.monotonic() - started))
                log.info("srw: %s for the %s: %s", endpoint, role.value, outcome)
                left = deadline - time.monotonic()
                if not (self.verify or initial) or left <= 0:
                    self.ctx.decide("splitting.gave_up", self.code, **{
                        "server.address": endpoint.host, "server.port": endpoint.port,
                        "resilient_db.splitting.role": role.value,
                        "resilient_db.splitting.attempts": len(attempts)})
                    where = "connect" if initial else "switch"
                    raise ReadWriteSplittingError(
                        f"srw: {endpoint} did not lead to a usable {role.value} within "
                        f"{self.retry_timeout:g} s (srw_connect_retry_timeout_ms); "
                        f"{len(attempts)} attempts: "
                        + "; ".join(f"{a.outcome}" for a in attempts)
                        + ("" if initial else f"; the {where} was not made and the connection "
                           "stays where it was"),
                        reason="no_connection", host=str(endpoint),
                        attempts=tuple(attempts)) from exc
                time.sleep(min(self.retry_interval, left))


def _same(host: HostSpec, endpoint: HostSpec) -> bool:
    return host.host.lower() == endpoint.host.lower() and (
        endpoint.port is None or host.port in (None, endpoint.port))
