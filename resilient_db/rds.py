"""RDS and Aurora endpoint names: what a host name says about the cluster behind it. Pure.

AWS gives every endpoint a DNS name whose shape tells its kind (``AURORA_INTERFACE.md``)::

    <cluster>.cluster-<id>.<region>.rds.amazonaws.com          cluster (writer) endpoint
    <cluster>.cluster-ro-<id>.<region>.rds.amazonaws.com       reader endpoint
    <name>.cluster-custom-<id>.<region>.rds.amazonaws.com      custom endpoint
    <instance>.<id>.<region>.rds.amazonaws.com                 instance endpoint
    <proxy>.proxy-<id>.<region>.rds.amazonaws.com              RDS Proxy
    <group>.shardgrp-<id>.<region>.rds.amazonaws.com           Aurora Limitless shard group
    <global>.global-<id>.global.rds.amazonaws.com              Aurora Global Database writer

``<id>`` is one label of letters and digits that RDS assigns per account and region: every
endpoint of the account in that region shares it, so it is *not* a cluster identifier.
Partitions differ in the tail (:attr:`RdsEndpoint.suffix`):

- commercial and GovCloud (``us-gov-west-1``, ``us-gov-east-1``):
  ``<region>.rds.amazonaws.com``; GovCloud names have also been seen as
  ``rds.<region>.amazonaws.com``;
- China (``cn-north-1``, ``cn-northwest-1``): ``rds.<region>.amazonaws.com.cn`` (the region
  *after* ``rds``); older China endpoints use ``<region>.rds.amazonaws.com.cn``;
- the isolated partitions: ``rds.<region>.c2s.ic.gov`` (``aws-iso``) and
  ``rds.<region>.sc2s.sgov.gov`` (``aws-iso-b``).

Both layouts are recognised and kept: an instance pattern or writer endpoint derived from a
name uses that name's own tail, so derived names resolve in the same partition. Names are
compared case-insensitively and a trailing dot (a fully qualified name) is ignored.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ClusterIdentity",
    "EndpointKind",
    "HostPattern",
    "RdsEndpoint",
    "classify",
    "cluster_identity",
    "expand_pattern",
    "instance_host_pattern",
    "normalize_host",
    "reader_endpoint",
    "writer_endpoint",
]


class EndpointKind(enum.Enum):
    """What kind of endpoint a host name is."""

    CLUSTER_WRITER = "cluster-writer"
    CLUSTER_READER = "cluster-reader"
    CUSTOM = "custom"
    INSTANCE = "instance"
    PROXY = "proxy"
    LIMITLESS = "limitless"  # Aurora Limitless DB shard group endpoint
    GLOBAL_WRITER = "global-writer"  # Aurora Global Database writer endpoint
    IP = "ip"
    OTHER = "other"  # a custom domain, localhost, a name that is not RDS's


_KIND_BY_PREFIX = {
    "cluster-": EndpointKind.CLUSTER_WRITER,
    "cluster-ro-": EndpointKind.CLUSTER_READER,
    "cluster-custom-": EndpointKind.CUSTOM,
    "proxy-": EndpointKind.PROXY,
    "shardgrp-": EndpointKind.LIMITLESS,
    "global-": EndpointKind.GLOBAL_WRITER,
}

# An RDS identifier label, the optional endpoint-type prefix of the id label, the id, then one
# of the two tail layouts (region before or after "rds"). Applied to a normalised (lower-case)
# name with fullmatch; alternation order puts the longer prefixes first.
_RDS_NAME = re.compile(
    r"(?P<name>[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)\."
    r"(?P<prefix>cluster-ro-|cluster-custom-|cluster-|proxy-|shardgrp-|global-)?"
    r"(?P<id>[a-z0-9]+)\."
    r"(?P<suffix>"
    r"(?P<region_a>[a-z0-9-]+)\.rds\.(?P<domain_a>amazonaws\.com(?:\.cn)?)"
    r"|rds\.(?P<region_b>[a-z0-9-]+)\.(?P<domain_b>amazonaws\.com(?:\.cn)?|c2s\.ic\.gov"
    r"|sc2s\.sgov\.gov))"
)

_PARTITION_BY_DOMAIN = {
    "amazonaws.com.cn": "aws-cn",
    "c2s.ic.gov": "aws-iso",
    "sc2s.sgov.gov": "aws-iso-b",
}


def normalize_host(host: str) -> str:
    """``host`` as names are compared: stripped, lower-case, without a trailing dot or the
    brackets of an IPv6 literal."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name[:-1] if name.endswith(".") else name


@dataclass(frozen=True)
class RdsEndpoint:
    """What a host name says.

    ``host`` is the normalised name (see :func:`normalize_host`). For RDS names: ``name`` is
    the first label (cluster name for cluster/reader endpoints, the custom endpoint's, the
    instance id, the proxy's, ...); ``dns_id`` the account-and-region id label; ``region``
    the region (``None`` for a global endpoint); ``partition`` ``"aws"``, ``"aws-cn"``,
    ``"aws-us-gov"``, ``"aws-iso"`` or ``"aws-iso-b"``; ``suffix`` everything after the id
    label. All of these are ``None`` for IP addresses and other names.
    """

    host: str
    kind: EndpointKind
    name: str | None = None
    dns_id: str | None = None
    region: str | None = None
    partition: str | None = None
    suffix: str | None = None

    @property
    def is_rds(self) -> bool:
        """True for every RDS-assigned name (not for IP addresses and custom domains)."""
        return self.suffix is not None

    @property
    def is_cluster(self) -> bool:
        """A cluster-level endpoint that moves between instances (writer, reader, custom)."""
        return self.kind in (
            EndpointKind.CLUSTER_WRITER, EndpointKind.CLUSTER_READER, EndpointKind.CUSTOM
        )

    @property
    def instance_id(self) -> str | None:
        """The instance id of an instance endpoint; ``None`` for every other kind."""
        return self.name if self.kind is EndpointKind.INSTANCE else None

    @property
    def cluster_name(self) -> str | None:
        """The cluster's name, known from writer and reader endpoints only (``None``
        otherwise: a custom endpoint's first label is the endpoint's own name)."""
        if self.kind in (EndpointKind.CLUSTER_WRITER, EndpointKind.CLUSTER_READER):
            return self.name
        return None


def classify(host: str) -> RdsEndpoint:
    """Classify ``host`` (any case, optional trailing dot, IPv6 with or without brackets)."""
    name = normalize_host(host)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return RdsEndpoint(name, EndpointKind.IP)
    match = _RDS_NAME.fullmatch(name)
    if match is None:
        return RdsEndpoint(name, EndpointKind.OTHER)
    prefix = match["prefix"]
    kind = _KIND_BY_PREFIX[prefix] if prefix else EndpointKind.INSTANCE
    region = match["region_a"] or match["region_b"]
    domain = match["domain_a"] or match["domain_b"]
    if region == "global":
        if kind is not EndpointKind.GLOBAL_WRITER:
            return RdsEndpoint(name, EndpointKind.OTHER)
        partition_region = None
    else:
        partition_region = region
    partition = _PARTITION_BY_DOMAIN.get(domain)
    if partition is None:
        partition = "aws-us-gov" if region.startswith("us-gov-") else "aws"
    return RdsEndpoint(
        host=name,
        kind=kind,
        name=match["name"],
        dns_id=match["id"],
        region=partition_region,
        partition=partition,
        suffix=match["suffix"],
    )


def _endpoint(endpoint: RdsEndpoint | str) -> RdsEndpoint:
    return endpoint if isinstance(endpoint, RdsEndpoint) else classify(endpoint)


#: Kinds whose instances live under ``?.<id>.<suffix>``. Not a proxy (clients should keep
#: using the proxy, which fails over by itself), not a global endpoint (its instances are in
#: several regions) and not a Limitless shard group (its routers are not instances).
_PATTERN_KINDS = frozenset({
    EndpointKind.CLUSTER_WRITER,
    EndpointKind.CLUSTER_READER,
    EndpointKind.CUSTOM,
    EndpointKind.INSTANCE,
})


def instance_host_pattern(endpoint: RdsEndpoint | str) -> str | None:
    """The ``cluster_instance_host_pattern`` derived from an RDS name, e.g.
    ``?.abc123.us-east-1.rds.amazonaws.com`` (the name's own partition and layout).

    ``None`` when no pattern can be derived: IP addresses and custom domains (the user must set
    ``cluster_instance_host_pattern``), proxies, global and Limitless endpoints.
    """
    ep = _endpoint(endpoint)
    if ep.kind not in _PATTERN_KINDS or ep.dns_id is None or ep.suffix is None:
        return None
    return f"?.{ep.dns_id}.{ep.suffix}"


def writer_endpoint(endpoint: RdsEndpoint | str) -> str | None:
    """The cluster (writer) endpoint of the cluster named by a writer or reader endpoint;
    ``None`` for other kinds (an instance or custom endpoint does not name its cluster)."""
    ep = _endpoint(endpoint)
    if ep.cluster_name is None:
        return None
    return f"{ep.cluster_name}.cluster-{ep.dns_id}.{ep.suffix}"


def reader_endpoint(endpoint: RdsEndpoint | str) -> str | None:
    """The reader endpoint of the cluster named by a writer or reader endpoint; ``None``
    otherwise (as :func:`writer_endpoint`)."""
    ep = _endpoint(endpoint)
    if ep.cluster_name is None:
        return None
    return f"{ep.cluster_name}.cluster-ro-{ep.dns_id}.{ep.suffix}"


# --- host patterns -------------------------------------------------------------------------


@dataclass(frozen=True)
class HostPattern:
    """A parsed ``cluster_instance_host_pattern``: ``template`` contains one ``?`` where the
    instance id goes; ``port`` is the pattern's ``:port`` (``None``: the pattern names none,
    use the port of the connection)."""

    template: str
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Parse ``host-pattern`` or ``host-pattern:port``; ``ValueError`` when there is not
        exactly one ``?`` in the host part or the port is not a number in 1..65535."""
        value = text.strip()
        template, port = value, None
        if value.count(":") == 1:
            template, port_text = value.split(":")
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"host pattern {text!r}: the port must be a number 1..65535")
            port = int(port_text)
        if template.count("?") != 1 or any(ch.isspace() or ch in "/:" for ch in template):
            raise ValueError(
                f"host pattern {text!r} must be a host name containing exactly one '?' where "
                "the instance id goes, e.g. '?.abc123.us-east-1.rds.amazonaws.com'"
            )
        return cls(template, port)

    def expand(self, instance_id: str) -> tuple[str, int | None]:
        """The address of ``instance_id``: ``(host, port)``, ``port`` ``None`` when the pattern
        names none."""
        if not instance_id or "?" in instance_id:
            raise ValueError(f"not an instance id: {instance_id!r}")
        return self.template.replace("?", instance_id), self.port

    def __str__(self) -> str:
        return self.template if self.port is None else f"{self.template}:{self.port}"


def expand_pattern(pattern: str | HostPattern, instance_id: str) -> tuple[str, int | None]:
    """``(host, port)`` of ``instance_id`` under ``pattern`` (see :class:`HostPattern`)."""
    parsed = pattern if isinstance(pattern, HostPattern) else HostPattern.parse(pattern)
    return parsed.expand(instance_id)


# --- cluster identity ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterIdentity:
    """The key under which connections share one topology monitor (DESIGN §7).

    ``source`` says where it came from: ``"property"`` (the user's ``cluster_id``),
    ``"server"`` (an identity the server itself reports: PostgreSQL's
    ``system_identifier``, or the set of instance ids on MySQL), ``"endpoint"`` (the cluster's
    writer endpoint, shared by its writer and reader endpoint names) or ``"address"`` (the
    address alone: no better identity known yet).
    """

    value: str
    source: Literal["property", "endpoint", "server", "address"]


def cluster_identity(
    host: RdsEndpoint | str,
    port: int | None,
    *,
    cluster_id: str | None = None,
    server_identity: str | None = None,
) -> ClusterIdentity:
    """Decide the cluster key, best source first: the ``cluster_id`` property, the server's
    own identity (which unifies instance, custom and cluster endpoints of one cluster), the
    writer endpoint derived from a writer or reader endpoint name, then the address.
    ``port`` ``None``: the driver's default port (left out of the key)."""
    if cluster_id is not None and cluster_id.strip():
        return ClusterIdentity(cluster_id.strip(), "property")
    if server_identity:
        return ClusterIdentity(server_identity, "server")
    ep = _endpoint(host)
    tail = "" if port is None else f":{port}"
    writer = writer_endpoint(ep)
    if writer is not None:
        return ClusterIdentity(writer + tail, "endpoint")
    return ClusterIdentity(ep.host + tail, "address")
