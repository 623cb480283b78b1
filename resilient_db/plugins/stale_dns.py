"""``stale_dns``: a new connection through the cluster (writer) endpoint goes to the verified
writer even while the endpoint's DNS still names the old one (it commonly lags 15-60 s behind
a failover).

What it intercepts: the connect phase, for the application's own connections made through a
cluster writer endpoint (dormant, and free, for every other kind of host name).

- A topology monitor already serves this endpoint in the process (another connection's
  ``failover`` plugin started it) and knows a writer verified first-hand: the endpoint is
  resolved (``getaddrinfo``, no connection) and compared with the writer's instance address.
  Same address: the connection goes through the endpoint, no extra query. Different: it goes
  to the writer's own address instead (no connection to the old writer is ever opened), and the
  instance is checked to be the writer; should it not be, the endpoint is used after all.
- No monitor yet: the connection goes through the endpoint and the instance is asked whether it
  is a reader (one internal statement pair). A reader whose own topology names another writer
  means DNS is stale: the connection goes to that writer, checked in turn. When the writer
  cannot be reached, the connection to the endpoint is kept (with the ``failover`` plugin, a
  write there fails over once the role check confirms the instance is a reader).

Decisions: ``stale_dns.redirected`` (attributes: the endpoint, the address it resolved to,
the writer used and how staleness was found), ``stale_dns.unresolved`` (stale, but the writer
could not be used).
"""

from __future__ import annotations

import logging
from typing import Any

from .._pipeline import ConnectContext, ConnectHandler, HostSpec, Plugin, PluginContext
from ..errors import Error
from ..hosts import Host
from ..rds import EndpointKind, classify
from . import _cluster_connect as cc

__all__ = ["StaleDnsPlugin", "is_stale"]

log = logging.getLogger("resilient_db.plugins.stale_dns")


def is_stale(endpoint_addresses: frozenset[str], writer_addresses: frozenset[str]) -> bool:
    """Whether the endpoint resolves elsewhere than the verified writer. Pure. Unknown (an
    empty set on either side: a name that does not resolve) is not stale: go through DNS."""
    return bool(endpoint_addresses) and bool(writer_addresses) and endpoint_addresses.isdisjoint(
        writer_addresses)


class StaleDnsPlugin(Plugin):
    """See the module docstring. ``redirected``: how many connections of this plugin instance
    went to the writer instead of where DNS pointed (0 or 1: one plugin per connection)."""

    code = "stale_dns"
    single_host = True  # finds the cluster's instances itself

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        self.endpoint = classify(ctx.host.host)
        self.redirected = 0

    def dormant(self) -> bool:
        return self.endpoint.kind is not EndpointKind.CLUSTER_WRITER

    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        if not ctx.initial or classify(ctx.host.host).kind is not EndpointKind.CLUSTER_WRITER:
            return proceed(ctx)
        monitor = cc.known_monitor(ctx)
        writer = monitor.writer if monitor is not None else None
        if writer is None:
            return self._check_after_connecting(ctx, proceed)
        resolved = cc.addresses(ctx.host.host)
        if not is_stale(resolved, cc.addresses(writer.host)):
            return proceed(ctx)
        raw = self._to_writer(ctx, proceed, writer, resolved, "resolves elsewhere than the "
                              "writer the topology monitor verified")
        return raw if raw is not None else self._check_after_connecting(ctx, proceed)

    def _check_after_connecting(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        raw = proceed(ctx)
        try:
            dialect = cc.dialect_for(ctx, self.ctx.extra, raw)
            if dialect.topology_query is None:
                return raw  # no topology to find another writer in
            report = cc.report_on(ctx, dialect, raw, ctx.host, cc.addressing_for(ctx),
                                  with_topology=True)
        except Error:
            cc.close_quietly(raw)
            raise
        except Exception as exc:
            if ctx.driver.is_disconnect(exc):
                cc.close_quietly(raw)
                raise
            log.debug("stale_dns: role check failed on %s: %r", ctx.host, exc)
            return raw
        if report.is_reader is not True:
            return raw
        named = report.topology.writer if report.topology is not None else None
        if named is None or named.instance_id == report.instance_id:
            return raw  # a reader that names no other writer: nothing better to go to
        resolved = cc.addresses(ctx.host.host)
        new = self._to_writer(ctx, proceed, named, resolved,
                              f"reached instance {report.instance_id}, a reader")
        if new is None:
            return raw
        cc.close_quietly(raw)
        return new

    def _to_writer(self, ctx: ConnectContext, proceed: ConnectHandler, writer: Host,
                   resolved: frozenset[str], why: str) -> Any:
        """A verified connection to ``writer``'s own address, or ``None``."""
        spec = HostSpec(writer.host, writer.port)
        attributes: dict[str, Any] = {
            "server.address": writer.host,
            "resilient_db.instance.id": writer.instance_id or "",
            "resilient_db.stale_dns.endpoint": ctx.host.host,
            "resilient_db.stale_dns.resolved": tuple(sorted(resolved)),
            "resilient_db.stale_dns.reason": why,
        }
        try:
            raw = cc.open_at(ctx, proceed, spec, None)
        except Error:
            raise
        except Exception as exc:
            self._unresolved(attributes, f"connect failed: {exc!r}")
            return None
        try:
            dialect = cc.dialect_for(ctx, self.ctx.extra, raw)
            report = cc.report_on(ctx, dialect, raw, spec, cc.addressing_for(ctx),
                                  with_topology=False)
        except Error:
            cc.close_quietly(raw)
            raise
        except Exception as exc:
            cc.close_quietly(raw)
            self._unresolved(attributes, f"role check failed: {exc!r}")
            return None
        if report.is_reader is not False:
            cc.close_quietly(raw)
            self._unresolved(attributes, cc.role_text(report))
            return None
        self.redirected += 1
        self.ctx.decide("stale_dns.redirected", self.code, **attributes)
        log.info("%s %s; connecting to the writer %s instead", ctx.host.host, why, writer)
        return raw

    def _unresolved(self, attributes: dict[str, Any], problem: str) -> None:
        self.ctx.decide("stale_dns.unresolved", self.code,
                        **{**attributes, "resilient_db.stale_dns.problem": problem})
        log.info("%s looks stale (%s) but the writer %s cannot be used: %s",
                 attributes["resilient_db.stale_dns.endpoint"],
                 attributes["resilient_db.stale_dns.reason"], attributes["server.address"],
                 problem)
