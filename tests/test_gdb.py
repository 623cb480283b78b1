"""The Aurora Global Database decisions (resilient_db.global_db), the global topology dialects
and addressing, and the configuration of gdb_failover / gdb_rw. No server (the end-to-end
tests on the simulator are in test_gdb_real.py)."""

from __future__ import annotations

import random
import socket
from typing import Any

import psycopg
import pytest

import resilient_db
from resilient_db import _params
from resilient_db.dialects import aurora_mysql_lookalike, get_dialect, global_variant
from resilient_db.dialects.base import Topology, TopologyRow, global_topology
from resilient_db.errors import ConfigurationError
from resilient_db.failover_core import FailoverMode
from resilient_db.global_db import (
    GlobalFailoverMode,
    decide_mode,
    default_global_mode,
    home_region,
    parse_region_patterns,
    plan_global,
    splitting_readers,
    writer_refusal,
)
from resilient_db.hosts import BadHostMemory, Host, Role, TopologySnapshot
from resilient_db.rds import EndpointKind
from resilient_db.selection import selection_context, strategy_from_name
from resilient_db.topology import Addressing

EAST, WEST = "us-east-1", "us-west-2"
W = Host("w.e", 5432, instance_id="w", role=Role.WRITER, region=EAST)
RE = Host("re.e", 5432, instance_id="re", role=Role.READER, region=EAST)
RW1 = Host("rw1.w", 5432, instance_id="rw1", role=Role.READER, region=WEST)
RW2 = Host("rw2.w", 5432, instance_id="rw2", role=Role.READER, region=WEST)
TOPOLOGY = TopologySnapshot((W, RE, RW1, RW2))


def plan(mode: GlobalFailoverMode, home: str, topology: TopologySnapshot = TOPOLOGY,
         bad: BadHostMemory | None = None) -> list[tuple[str, Role | None]]:
    ctx = selection_context(rng=random.Random(1), now=0.0, cursor=None, weights=None)
    result = plan_global(mode, topology, home, bad or BadHostMemory(), 0.0,
                         strategy_from_name("random"), ctx)
    return [(a.host.instance_id or "", a.required) for a in result.attempts]


# --- modes ------------------------------------------------------------------------------------


def test_mode_values_match_the_property() -> None:
    assert tuple(m.value for m in GlobalFailoverMode) == _params.GLOBAL_FAILOVER_MODES
    assert _params.ACTIVE_HOME_FAILOVER_MODE.choices == _params.GLOBAL_FAILOVER_MODES


@pytest.mark.parametrize("text", ["strict-writer", "STRICT_WRITER", " strict_writer "])
def test_mode_parse_accepts_aws_spellings(text: str) -> None:
    assert GlobalFailoverMode.parse(text, "x") is GlobalFailoverMode.STRICT_WRITER


def test_unknown_mode_names_the_parameter_and_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        GlobalFailoverMode.parse("strict-reader", "inactive_home_failover_mode")
    assert info.value.parameter == "inactive_home_failover_mode"
    message = str(info.value)
    assert all(mode.value in message for mode in GlobalFailoverMode)


@pytest.mark.parametrize(("kind", "mode"), [
    (EndpointKind.CLUSTER_WRITER, GlobalFailoverMode.STRICT_WRITER),
    (EndpointKind.GLOBAL_WRITER, GlobalFailoverMode.STRICT_WRITER),
    (EndpointKind.CLUSTER_READER, GlobalFailoverMode.HOME_READER_OR_WRITER),
    (EndpointKind.INSTANCE, GlobalFailoverMode.HOME_READER_OR_WRITER),
    (EndpointKind.IP, GlobalFailoverMode.HOME_READER_OR_WRITER),
])
def test_default_mode_by_endpoint(kind: EndpointKind, mode: GlobalFailoverMode) -> None:
    assert default_global_mode(kind) is mode


# --- home region and patterns -----------------------------------------------------------------


def test_home_region_from_the_property_or_the_endpoint() -> None:
    assert home_region(None, "db.cluster-abc.us-west-2.rds.amazonaws.com", "p") == WEST
    assert home_region("EU-West-1", "db.cluster-abc.us-west-2.rds.amazonaws.com",
                       "p") == "eu-west-1"


@pytest.mark.parametrize("host", ["10.0.0.5", "db.example.com",
                                  "app.global-abc123.global.rds.amazonaws.com"])
def test_home_region_is_required_when_the_endpoint_names_none(host: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        home_region(None, host, "failover_home_region")
    assert info.value.parameter == "failover_home_region"
    assert "required" in str(info.value)


def test_region_patterns() -> None:
    parsed = parse_region_patterns(
        "us-east-1:?.a.us-east-1.rds.amazonaws.com, us-west-2:?.b.us-west-2.rds.amazonaws.com:6543")
    assert [(r, str(p)) for r, p in parsed] == [
        (EAST, "?.a.us-east-1.rds.amazonaws.com"), (WEST, "?.b.us-west-2.rds.amazonaws.com:6543")]


@pytest.mark.parametrize("text", ["", "?.a.rds.amazonaws.com", "us-east-1:a.example.com",
                                  "us-east-1:?.a,us-east-1:?.b", "us-east-1:?.a:notaport"])
def test_bad_region_patterns(text: str) -> None:
    with pytest.raises(ValueError):
        parse_region_patterns(text)


def test_bad_region_patterns_property_names_the_parameter() -> None:
    with pytest.raises(ConfigurationError) as info:
        resilient_db.connect(psycopg.Connection.connect, "host=x",
                             global_cluster_instance_host_patterns="?.a.rds.amazonaws.com")
    assert info.value.parameter == "global_cluster_instance_host_patterns"


# --- deciding the mode ------------------------------------------------------------------------


def test_active_home_while_the_writer_is_home() -> None:
    decision = decide_mode(EAST, TOPOLOGY, GlobalFailoverMode.STRICT_WRITER,
                           GlobalFailoverMode.STRICT_HOME_READER)
    assert (decision.active, decision.primary, decision.mode) == (
        True, EAST, GlobalFailoverMode.STRICT_WRITER)
    attributes = decision.to_decision().attributes
    assert attributes["resilient_db.gdb.home_active"] is True
    assert attributes["resilient_db.failover.mode"] == "strict-writer"


def test_inactive_home_while_the_writer_is_elsewhere() -> None:
    decision = decide_mode(WEST, TOPOLOGY, GlobalFailoverMode.STRICT_WRITER,
                           GlobalFailoverMode.STRICT_HOME_READER)
    assert (decision.active, decision.primary, decision.mode) == (
        False, EAST, GlobalFailoverMode.STRICT_HOME_READER)


def test_no_writer_known_counts_as_active() -> None:
    decision = decide_mode(WEST, TopologySnapshot((RE, RW1)), GlobalFailoverMode.STRICT_WRITER,
                           GlobalFailoverMode.STRICT_ANY_READER)
    assert decision.active and decision.primary is None


# --- planning ---------------------------------------------------------------------------------


def test_strict_writer_tries_the_writer_in_any_region() -> None:
    assert plan(GlobalFailoverMode.STRICT_WRITER, WEST) == [("w", Role.WRITER)]


def test_strict_home_reader() -> None:
    assert plan(GlobalFailoverMode.STRICT_HOME_READER, EAST) == [("re", Role.READER)]
    assert sorted(plan(GlobalFailoverMode.STRICT_HOME_READER, WEST)) == [
        ("rw1", Role.READER), ("rw2", Role.READER)]


def test_strict_out_of_home_reader() -> None:
    assert sorted(plan(GlobalFailoverMode.STRICT_OUT_OF_HOME_READER, EAST)) == [
        ("rw1", Role.READER), ("rw2", Role.READER)]
    assert plan(GlobalFailoverMode.STRICT_OUT_OF_HOME_READER, WEST) == [("re", Role.READER)]


def test_strict_any_reader_never_the_writer() -> None:
    assert sorted(plan(GlobalFailoverMode.STRICT_ANY_READER, EAST)) == [
        ("re", Role.READER), ("rw1", Role.READER), ("rw2", Role.READER)]


def test_strict_reader_modes_without_such_a_reader_wait_instead_of_taking_the_writer() -> None:
    only_writer_home = TopologySnapshot((W, RW1))
    assert plan(GlobalFailoverMode.STRICT_HOME_READER, EAST, only_writer_home) == []
    assert plan(GlobalFailoverMode.STRICT_ANY_READER, EAST, TopologySnapshot((W,))) == []


def test_reader_or_writer_modes_end_with_the_writer() -> None:
    assert plan(GlobalFailoverMode.HOME_READER_OR_WRITER, EAST) == [("re", None), ("w", None)]
    home_west = plan(GlobalFailoverMode.HOME_READER_OR_WRITER, WEST)
    assert sorted(home_west[:2]) == [("rw1", None), ("rw2", None)] and home_west[2] == ("w", None)
    assert plan(GlobalFailoverMode.OUT_OF_HOME_READER_OR_WRITER, WEST) == [
        ("re", None), ("w", None)]
    every = plan(GlobalFailoverMode.ANY_READER_OR_WRITER, EAST)
    assert len(every) == 4 and every[-1] == ("w", None)


def test_home_reader_or_writer_without_home_readers_takes_the_writer() -> None:
    assert plan(GlobalFailoverMode.HOME_READER_OR_WRITER, WEST, TopologySnapshot((W, RE))) == [
        ("w", None)]


def test_a_cooling_home_reader_is_tried_after_the_others() -> None:
    bad = BadHostMemory(cooldown=30.0).mark_down(RW1, 0.0)
    assert plan(GlobalFailoverMode.STRICT_HOME_READER, WEST, bad=bad)[0] == ("rw2", Role.READER)


def test_base_modes() -> None:
    assert GlobalFailoverMode.STRICT_WRITER.base is FailoverMode.STRICT_WRITER
    assert GlobalFailoverMode.STRICT_HOME_READER.base is FailoverMode.STRICT_READER
    assert GlobalFailoverMode.ANY_READER_OR_WRITER.base is FailoverMode.READER_OR_WRITER


# --- gdb_rw -----------------------------------------------------------------------------------


def test_splitting_readers() -> None:
    assert splitting_readers(TOPOLOGY, EAST, True) == (RE,)
    assert splitting_readers(TOPOLOGY, WEST, True) == (RW1, RW2)
    assert splitting_readers(TOPOLOGY, WEST, False) == (RW1, RW2, RE)


def test_writer_refusal() -> None:
    assert writer_refusal(W, EAST, True) is None
    assert writer_refusal(W, WEST, False) is None
    refusal = writer_refusal(W, WEST, True)
    assert refusal is not None and EAST in refusal and WEST in refusal


# --- global topology --------------------------------------------------------------------------


def test_global_topology_rows_carry_their_region() -> None:
    parsed = global_topology([
        ("i1", "MASTER_SESSION_ID", None, EAST, None),
        ("i2", "abc", 12.5, EAST, None),
        ("i3", "def", 800.0, WEST, None),
    ])
    assert [(r.instance_id, r.is_writer, r.region, r.lag_seconds) for r in parsed.rows] == [
        ("i1", True, EAST, None), ("i2", False, EAST, 0.0125), ("i3", False, WEST, 0.8)]


def test_global_variants() -> None:
    pg = global_variant(get_dialect("aurora-pg"))
    assert pg is not None and pg.code == "global-aurora-pg"
    assert "aurora_global_db_instance_status()" in (pg.topology_query or "")
    mysql = global_variant(get_dialect("aurora-mysql"))
    assert mysql is not None and "information_schema.aurora_global_db_instance_status" in (
        mysql.topology_query or "")
    lookalike = global_variant(aurora_mysql_lookalike("aurora_sim"))
    assert lookalike is not None
    assert "aurora_sim.aurora_global_db_instance_status" in (lookalike.topology_query or "")
    assert lookalike.instance_id_query == "SELECT aurora_sim.aurora_server_id()"
    assert global_variant(get_dialect("multi-az-pg")) is None


def test_addressing_uses_each_regions_pattern_and_leaves_unknown_regions_out() -> None:
    regions = parse_region_patterns("us-east-1:?.a.us-east-1.rds.amazonaws.com,"
                                    "us-west-2:?.b.us-west-2.rds.amazonaws.com")
    addressing = Addressing(None, False, 5432, regions)
    topology = Topology((
        TopologyRow("i1", True, region=EAST), TopologyRow("i2", False, region=WEST),
        TopologyRow("i3", False, region="eu-west-1")))
    snapshot = addressing.snapshot(topology)
    assert [(h.instance_id, h.host, h.region) for h in snapshot.hosts] == [
        ("i1", "i1.a.us-east-1.rds.amazonaws.com", EAST),
        ("i2", "i2.b.us-west-2.rds.amazonaws.com", WEST)]
    assert snapshot.ignored == ("i3",)


# --- plugin configuration ---------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connect(**kwargs: Any) -> Any:
    return resilient_db.connect(psycopg.Connection.connect, host="127.0.0.1",
                                port=_closed_port(), user="u", connect_timeout=1, **kwargs)


def test_unknown_mode_property_lists_the_valid_values() -> None:
    with pytest.raises(ConfigurationError) as info:
        _connect(plugins="gdb_failover", failover_home_region=EAST,
                 active_home_failover_mode="strict-reader")
    assert info.value.parameter == "active_home_failover_mode"
    assert all(mode.value in str(info.value) for mode in GlobalFailoverMode)


def test_gdb_failover_needs_a_home_region_on_an_ip_address() -> None:
    with pytest.raises(ConfigurationError) as info:
        _connect(plugins="gdb_failover")
    assert info.value.parameter == "failover_home_region"


def test_gdb_rw_needs_a_home_region_on_an_ip_address() -> None:
    with pytest.raises(ConfigurationError) as info:
        _connect(plugins="gdb_rw,gdb_failover", failover_home_region=EAST)
    assert info.value.parameter == "gdb_rw_home_region"


@pytest.mark.parametrize("plugins", ["gdb_failover,failover", "gdb_failover,failover_v2",
                                     "gdb_rw,read_write_splitting,failover",
                                     "gdb_rw,srw,failover"])
def test_exclusive_plugins(plugins: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        _connect(plugins=plugins, failover_home_region=EAST, gdb_rw_home_region=EAST,
                 srw_read_endpoint="a", srw_write_endpoint="b")
    assert info.value.parameter == "plugins"
    assert "cannot serve the same connection" in str(info.value)


def test_region_property_is_validated() -> None:
    with pytest.raises(ConfigurationError) as info:
        _connect(plugins="gdb_failover", failover_home_region="us east")
    assert info.value.parameter == "failover_home_region"


def test_canonical_order_puts_gdb_plugins_where_their_bases_are() -> None:
    from resilient_db._plugin_registry import resolve

    order = [cls.code for cls in resolve(["efm", "gdb_failover", "iam", "gdb_rw"])]
    assert order == ["gdb_rw", "gdb_failover", "efm", "iam"]
