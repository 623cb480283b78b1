"""Unit tests of RDS endpoint names (resilient_db.rds): classification, host patterns, related
endpoints and the cluster identity, with property tests over generated names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_db.rds import (
    ClusterIdentity,
    EndpointKind,
    HostPattern,
    RdsEndpoint,
    classify,
    cluster_identity,
    expand_pattern,
    instance_host_pattern,
    normalize_host,
    reader_endpoint,
    writer_endpoint,
)

pytestmark = pytest.mark.unit

K = EndpointKind


@pytest.mark.parametrize(
    ("host", "kind", "name", "dns_id", "region", "partition"),
    [
        ("mydb.cluster-abc123.us-east-1.rds.amazonaws.com", K.CLUSTER_WRITER, "mydb", "abc123",
         "us-east-1", "aws"),
        ("mydb.cluster-ro-abc123.us-east-2.rds.amazonaws.com", K.CLUSTER_READER, "mydb",
         "abc123", "us-east-2", "aws"),
        ("analytics.cluster-custom-abc123.eu-west-1.rds.amazonaws.com", K.CUSTOM, "analytics",
         "abc123", "eu-west-1", "aws"),
        ("db-instance-1.abc123.ap-south-1.rds.amazonaws.com", K.INSTANCE, "db-instance-1",
         "abc123", "ap-south-1", "aws"),
        ("myproxy.proxy-abc123.us-west-2.rds.amazonaws.com", K.PROXY, "myproxy", "abc123",
         "us-west-2", "aws"),
        ("group.shardgrp-abc123.us-east-1.rds.amazonaws.com", K.LIMITLESS, "group", "abc123",
         "us-east-1", "aws"),
        ("gdb.global-abc123.global.rds.amazonaws.com", K.GLOBAL_WRITER, "gdb", "abc123", None,
         "aws"),
        # China: region after "rds" (current) and before it (older endpoints).
        ("mydb.cluster-abc123.rds.cn-north-1.amazonaws.com.cn", K.CLUSTER_WRITER, "mydb",
         "abc123", "cn-north-1", "aws-cn"),
        ("mydb.cluster-ro-abc123.rds.cn-northwest-1.amazonaws.com.cn", K.CLUSTER_READER, "mydb",
         "abc123", "cn-northwest-1", "aws-cn"),
        ("inst.abc123.cn-north-1.rds.amazonaws.com.cn", K.INSTANCE, "inst", "abc123",
         "cn-north-1", "aws-cn"),
        # GovCloud, in both layouts, and the isolated partitions.
        ("mydb.cluster-abc123.us-gov-west-1.rds.amazonaws.com", K.CLUSTER_WRITER, "mydb",
         "abc123", "us-gov-west-1", "aws-us-gov"),
        ("inst.abc123.rds.us-gov-east-1.amazonaws.com", K.INSTANCE, "inst", "abc123",
         "us-gov-east-1", "aws-us-gov"),
        ("inst.abc123.rds.us-iso-east-1.c2s.ic.gov", K.INSTANCE, "inst", "abc123",
         "us-iso-east-1", "aws-iso"),
        ("mydb.cluster-abc123.rds.us-isob-east-1.sc2s.sgov.gov", K.CLUSTER_WRITER, "mydb",
         "abc123", "us-isob-east-1", "aws-iso-b"),
    ],
)
def test_classify_rds_names(host: str, kind: EndpointKind, name: str, dns_id: str,
                            region: str | None, partition: str) -> None:
    ep = classify(host)
    assert (ep.kind, ep.name, ep.dns_id, ep.region, ep.partition) == (
        kind, name, dns_id, region, partition)
    assert ep.is_rds
    assert ep.host == host


def test_classify_ignores_case_and_trailing_dot() -> None:
    upper = classify("  MyDB.Cluster-RO-ABC123.US-EAST-1.RDS.AMAZONAWS.COM.  ")
    assert upper == classify("mydb.cluster-ro-abc123.us-east-1.rds.amazonaws.com")
    assert upper.kind is K.CLUSTER_READER


@pytest.mark.parametrize(
    ("host", "normalised"),
    [("10.0.0.1", "10.0.0.1"), ("::1", "::1"), ("[2001:DB8::1]", "2001:db8::1"),
     ("fe80::1%eth0", "fe80::1%eth0"), ("255.255.255.255", "255.255.255.255")],
)
def test_classify_ip_literals(host: str, normalised: str) -> None:
    ep = classify(host)
    assert ep == RdsEndpoint(normalised, K.IP)
    assert not ep.is_rds and instance_host_pattern(ep) is None


@pytest.mark.parametrize(
    "host",
    ["localhost", "db.example.com", "999.1.1.1", "", "mydb.cluster-abc.us-east-1.example.com",
     "a.b.abc123.us-east-1.rds.amazonaws.com",  # a dotted "name" is not an RDS identifier
     "x.cluster-abc.global.rds.amazonaws.com",  # only global- names live under "global"
     "mydb.cluster-abc_1.us-east-1.rds.amazonaws.com"],
)
def test_classify_other_names(host: str) -> None:
    ep = classify(host)
    assert ep.kind is K.OTHER
    assert ep.name is ep.dns_id is ep.region is ep.partition is ep.suffix is None


def test_normalize_host() -> None:
    assert normalize_host(" Db.Example.COM. ") == "db.example.com"
    assert normalize_host("[::1]") == "::1"


def test_properties_of_kinds() -> None:
    writer = classify("c.cluster-x1.us-east-1.rds.amazonaws.com")
    custom = classify("e.cluster-custom-x1.us-east-1.rds.amazonaws.com")
    inst = classify("i.x1.us-east-1.rds.amazonaws.com")
    assert writer.is_cluster and custom.is_cluster and not inst.is_cluster
    assert (writer.cluster_name, writer.instance_id) == ("c", None)
    assert (custom.cluster_name, custom.instance_id) == (None, None)
    assert (inst.cluster_name, inst.instance_id) == (None, "i")


@pytest.mark.parametrize(
    ("host", "pattern"),
    [
        ("c.cluster-x1.us-east-1.rds.amazonaws.com", "?.x1.us-east-1.rds.amazonaws.com"),
        ("c.cluster-ro-x1.us-east-1.rds.amazonaws.com", "?.x1.us-east-1.rds.amazonaws.com"),
        ("e.cluster-custom-x1.us-east-1.rds.amazonaws.com", "?.x1.us-east-1.rds.amazonaws.com"),
        ("i.x1.us-east-1.rds.amazonaws.com", "?.x1.us-east-1.rds.amazonaws.com"),
        ("c.cluster-x1.rds.cn-north-1.amazonaws.com.cn", "?.x1.rds.cn-north-1.amazonaws.com.cn"),
        ("c.cluster-x1.cn-north-1.rds.amazonaws.com.cn", "?.x1.cn-north-1.rds.amazonaws.com.cn"),
        ("c.cluster-x1.us-gov-west-1.rds.amazonaws.com", "?.x1.us-gov-west-1.rds.amazonaws.com"),
        ("p.proxy-x1.us-east-1.rds.amazonaws.com", None),
        ("g.global-x1.global.rds.amazonaws.com", None),
        ("s.shardgrp-x1.us-east-1.rds.amazonaws.com", None),
        ("10.1.2.3", None),
        ("db.example.com", None),
    ],
)
def test_instance_host_pattern(host: str, pattern: str | None) -> None:
    assert instance_host_pattern(host) == pattern
    assert instance_host_pattern(classify(host)) == pattern


def test_writer_and_reader_endpoints_of_one_cluster() -> None:
    w = "mydb.cluster-x1.rds.cn-north-1.amazonaws.com.cn"
    r = "mydb.cluster-ro-x1.rds.cn-north-1.amazonaws.com.cn"
    assert writer_endpoint(r) == writer_endpoint(w) == w
    assert reader_endpoint(w) == reader_endpoint(r) == r
    for other in ("e.cluster-custom-x1.us-east-1.rds.amazonaws.com",
                  "i.x1.us-east-1.rds.amazonaws.com", "10.0.0.1", "db.example.com"):
        assert writer_endpoint(other) is None
        assert reader_endpoint(other) is None


# --- host patterns --------------------------------------------------------------------------


def test_host_pattern_parse_and_expand() -> None:
    plain = HostPattern.parse("?.x1.us-east-1.rds.amazonaws.com")
    assert plain == HostPattern("?.x1.us-east-1.rds.amazonaws.com", None)
    assert plain.expand("db-1") == ("db-1.x1.us-east-1.rds.amazonaws.com", None)
    with_port = HostPattern.parse(" ?.internal:6543 ")
    assert with_port.expand("db-2") == ("db-2.internal", 6543)
    assert str(with_port) == "?.internal:6543"
    assert str(plain) == "?.x1.us-east-1.rds.amazonaws.com"
    assert expand_pattern("any.?.example.com:9999", "i") == ("any.i.example.com", 9999)
    assert expand_pattern(plain, "i") == ("i.x1.us-east-1.rds.amazonaws.com", None)


@pytest.mark.parametrize(
    "text",
    ["db.example.com", "?.?.example.com", "?.example.com:port", "?.example.com:0",
     "?.example.com:70000", "? .example.com", "?/x", "a:b:c?"],
)
def test_host_pattern_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="host pattern"):
        HostPattern.parse(text)


@pytest.mark.parametrize("instance_id", ["", "a?b"])
def test_expand_rejects_bad_ids(instance_id: str) -> None:
    with pytest.raises(ValueError, match="instance id"):
        expand_pattern("?.example.com", instance_id)


# --- cluster identity -----------------------------------------------------------------------


def test_cluster_identity_sources_in_order() -> None:
    reader = "mydb.cluster-ro-x1.us-east-1.rds.amazonaws.com"
    writer = "mydb.cluster-x1.us-east-1.rds.amazonaws.com"
    assert cluster_identity(reader, 5432, cluster_id=" prod ", server_identity="sys-1") == (
        ClusterIdentity("prod", "property"))
    assert cluster_identity(reader, 5432, cluster_id="  ", server_identity="sys-1") == (
        ClusterIdentity("sys-1", "server"))
    assert cluster_identity(reader, 5432) == cluster_identity(writer, 5432) == ClusterIdentity(
        writer + ":5432", "endpoint")
    assert cluster_identity(writer, None).value == writer
    assert cluster_identity("i.x1.us-east-1.rds.amazonaws.com", 3306) == ClusterIdentity(
        "i.x1.us-east-1.rds.amazonaws.com:3306", "address")
    assert cluster_identity("DB.Example.com.", None) == ClusterIdentity("db.example.com",
                                                                        "address")


# --- property tests -------------------------------------------------------------------------

identifiers = st.from_regex(r"[a-z][a-z0-9]{0,10}(-[a-z0-9]{1,6}){0,3}", fullmatch=True)
dns_ids = st.from_regex(r"[a-z0-9]{6,12}", fullmatch=True)
# (tail template, region, partition) across partitions and both layouts.
tails = st.sampled_from([
    ("{r}.rds.amazonaws.com", "us-east-1", "aws"),
    ("{r}.rds.amazonaws.com", "eu-central-2", "aws"),
    ("{r}.rds.amazonaws.com", "ap-southeast-4", "aws"),
    ("{r}.rds.amazonaws.com", "us-gov-west-1", "aws-us-gov"),
    ("rds.{r}.amazonaws.com", "us-gov-east-1", "aws-us-gov"),
    ("rds.{r}.amazonaws.com.cn", "cn-north-1", "aws-cn"),
    ("rds.{r}.amazonaws.com.cn", "cn-northwest-1", "aws-cn"),
    ("{r}.rds.amazonaws.com.cn", "cn-north-1", "aws-cn"),
    ("rds.{r}.c2s.ic.gov", "us-iso-east-1", "aws-iso"),
    ("rds.{r}.sc2s.sgov.gov", "us-isob-east-1", "aws-iso-b"),
])
prefixes = st.sampled_from([
    ("cluster-", K.CLUSTER_WRITER), ("cluster-ro-", K.CLUSTER_READER),
    ("cluster-custom-", K.CUSTOM), ("", K.INSTANCE),
])


@given(identifiers, prefixes, dns_ids, tails, identifiers)
def test_classify_round_trips_with_expand_pattern(
    name: str, prefix: tuple[str, EndpointKind], dns_id: str, tail: tuple[str, str, str],
    instance_id: str,
) -> None:
    template, region, partition = tail
    host = f"{name}.{prefix[0]}{dns_id}.{template.format(r=region)}"
    ep = classify(host)
    assert (ep.kind, ep.name, ep.dns_id, ep.region, ep.partition) == (
        prefix[1], name, dns_id, region, partition)
    pattern = instance_host_pattern(ep)
    assert pattern is not None
    expanded, port = expand_pattern(pattern, instance_id)
    assert port is None
    inst = classify(expanded)
    assert (inst.kind, inst.instance_id, inst.dns_id, inst.region, inst.partition) == (
        K.INSTANCE, instance_id, dns_id, region, partition)
    assert instance_host_pattern(inst) == pattern


@given(identifiers, dns_ids, tails)
def test_writer_reader_round_trip_any_case(name: str, dns_id: str, tail: tuple[str, str, str],
                                           ) -> None:
    template, region, _ = tail
    writer = f"{name}.cluster-{dns_id}.{template.format(r=region)}"
    reader = reader_endpoint(writer)
    assert reader is not None
    assert classify(reader).kind is K.CLUSTER_READER
    assert writer_endpoint(reader) == writer
    shouted = "".join(ch.upper() if i % 2 else ch for i, ch in enumerate(writer)) + "."
    assert classify(shouted) == classify(writer)


@given(st.ip_addresses())
def test_every_ip_literal_is_ip(address: object) -> None:
    assert classify(str(address)).kind is K.IP
    assert classify(f"[{address}]").kind is K.IP
