"""Unit tests of hosts, topology snapshots, the topology epoch and the bad-host memory
(resilient_db.hosts)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_db._pipeline import HostSpec
from resilient_db.dialects.base import Topology, TopologyRow
from resilient_db.hosts import (
    Availability,
    BadHostMemory,
    Host,
    Role,
    TopologyChange,
    TopologySnapshot,
    address_of,
    advance,
    snapshot_from_rows,
    snapshot_from_topology,
)
from resilient_db.rds import HostPattern

pytestmark = pytest.mark.unit

PATTERN = HostPattern.parse("?.x1.us-east-1.rds.amazonaws.com")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def writer(iid: str, port: int = 5432) -> Host:
    return Host(f"{iid}.db", port, instance_id=iid, role=Role.WRITER)


def reader(iid: str, port: int = 5432, **kw: object) -> Host:
    return Host(f"{iid}.db", port, instance_id=iid, role=Role.READER, **kw)  # type: ignore[arg-type]


def snap(*hosts: Host, epoch: int = 0) -> TopologySnapshot:
    return TopologySnapshot(hosts, epoch)


# --- Host ---------------------------------------------------------------------------------


def test_address_of() -> None:
    assert address_of("DB.Example.COM.", 5432) == "db.example.com:5432"
    assert address_of("db", None) == "db"
    assert address_of("[2001:DB8::1]", 5432) == "[2001:db8::1]:5432"
    assert address_of("::1", None) == "::1"


def test_host_values() -> None:
    host = Host("Inst-1.DB", 5432, instance_id="inst-1", role=Role.READER, lag=0.5)
    assert host.address == "inst-1.db:5432"
    assert host.spec == HostSpec("Inst-1.DB", 5432)
    assert str(host) == "inst-1@inst-1.db:5432"
    assert str(Host("db")) == "db"
    assert host.availability is Availability.UP and host.weight == 1.0
    down = host.replace(availability=Availability.DOWN)
    assert down.address == host.address and down != host
    assert host == Host("Inst-1.DB", 5432, instance_id="inst-1", role=Role.READER, lag=0.5)
    assert len({host, host.replace()}) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"host": ""}, "name"), ({"host": "h", "port": 0}, "port"),
     ({"host": "h", "port": 65536}, "port"), ({"host": "h", "weight": -1.0}, "weight"),
     ({"host": "h", "weight": float("nan")}, "weight")],
)
def test_host_rejects(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Host(**kwargs)  # type: ignore[arg-type]


# --- snapshots ----------------------------------------------------------------------------


def test_snapshot_order_and_lookups() -> None:
    a = snap(reader("r2"), writer("w"), reader("r1"))
    b = snap(reader("r1"), reader("r2"), writer("w"))
    assert a == b
    assert [h.instance_id for h in a.hosts] == ["w", "r1", "r2"]
    assert a.writer == writer("w")
    assert [h.instance_id for h in a.readers] == ["r1", "r2"]
    assert a.by_instance("r2") == reader("r2")
    assert a.by_instance("zz") is None
    assert a.by_address("R1.DB:5432") == reader("r1")
    assert a.by_address(HostSpec("r2.db", 5432)) == reader("r2")
    assert a.by_address(reader("r1")) == reader("r1")
    assert a.with_epoch(7).epoch == 7 and a.epoch == 0
    assert snap(reader("r1")).writer is None
    assert snap().writer is None and snap().readers == ()


def test_snapshot_rejects_two_writers_and_duplicate_addresses() -> None:
    with pytest.raises(ValueError, match="one writer"):
        snap(writer("a"), writer("b"))
    with pytest.raises(ValueError, match="once"):
        snap(reader("a"), Host("A.db", 5432, instance_id="other"))


def test_snapshot_from_aurora_rows() -> None:
    rows = [
        TopologyRow("w", True, cpu=3.0, lag_seconds=0.0, last_update=T0),
        TopologyRow("r1", False, cpu=7.5, lag_seconds=0.02, last_update=T0),
    ]
    s = snapshot_from_rows(rows, PATTERN, default_port=5432, weights={"r1": 3.0}, epoch=2,
                           taken_at=10.0, source="w", ignored=["old"])
    assert s.writer == Host("w.x1.us-east-1.rds.amazonaws.com", 5432, instance_id="w",
                            role=Role.WRITER, lag=None, last_update=T0, cpu=3.0)
    r1 = s.by_instance("r1")
    assert r1 is not None
    assert (r1.role, r1.port, r1.lag, r1.weight, r1.cpu) == (Role.READER, 5432, 0.02, 3.0, 7.5)
    assert (s.epoch, s.taken_at, s.source, s.ignored) == (2, 10.0, "w", ("old",))


def test_snapshot_ports_and_hosts_precedence() -> None:
    rows = [TopologyRow("a", True, endpoint="a.ep", port=3307), TopologyRow("b", False)]
    with_pattern = snapshot_from_rows(rows, HostPattern.parse("?.tunnel:6000"),
                                      default_port=3306)
    assert [(h.host, h.port) for h in with_pattern.hosts] == [("a.tunnel", 6000),
                                                               ("b.tunnel", 6000)]
    port_less = snapshot_from_rows(rows, HostPattern.parse("?.tunnel"), default_port=3306)
    assert [(h.host, h.port) for h in port_less.hosts] == [("a.tunnel", 3307),
                                                            ("b.tunnel", 3306)]
    multi_az = snapshot_from_rows(rows, None, default_port=3306)
    assert [(h.host, h.port) for h in multi_az.hosts] == [("a.ep", 3307), ("b", 3306)]
    assert snapshot_from_rows(rows[1:], None).hosts[0].port is None


def test_snapshot_from_dialect_topology() -> None:
    stale = TopologyRow("stale", False, last_update=T0)
    topology = Topology((TopologyRow("w", True), TopologyRow("r", False)), (stale,))
    s = snapshot_from_topology(topology, PATTERN, default_port=5432, source="w")
    assert [h.instance_id for h in s.hosts] == ["w", "r"]
    assert s.ignored == ("stale",) and s.source == "w"


# --- the epoch ----------------------------------------------------------------------------


def test_first_snapshot_keeps_its_epoch() -> None:
    first = snap(writer("w"), reader("r"), epoch=3)
    result = advance(None, first)
    assert (result.epoch, result.changed, result.snapshot) == (3, True, first)
    assert result.change.initial and not result.change.writer_changed
    assert result.change.added == ("r", "w")


def test_same_topology_changes_nothing() -> None:
    old = snap(writer("w"), reader("r", lag=0.1), epoch=4)
    epoch, changed, change, new = advance(old, snap(writer("w"), reader("r", lag=9.0)))
    assert (epoch, changed, new.epoch) == (4, False, 4)
    assert change == TopologyChange(4, "w", "w")


def test_reader_joining_or_leaving_does_not_move_the_epoch() -> None:
    old = snap(writer("w"), reader("r1"), epoch=1)
    joined = advance(old, snap(writer("w"), reader("r1"), reader("r2")))
    assert (joined.epoch, joined.changed, joined.change.added) == (1, True, ("r2",))
    left = advance(old, snap(writer("w")))
    assert (left.epoch, left.changed, left.change.removed) == (1, True, ("r1",))


def test_writer_change_moves_the_epoch() -> None:
    old = snap(writer("a"), reader("b"), epoch=1)
    result = advance(old, snap(reader("a"), writer("b")))
    assert (result.epoch, result.changed, result.snapshot.epoch) == (2, True, 2)
    assert result.change.writer_changed
    assert (result.change.writer_before, result.change.writer_after) == ("a", "b")
    assert result.change.role_changed == ("a", "b")
    decision = result.change.to_decision()
    assert decision.kind == "topology.changed"
    assert decision.attributes["resilient_db.topology.epoch"] == 2
    assert decision.attributes["resilient_db.topology.writer_before"] == "a"


def test_writer_to_none_to_writer_moves_twice() -> None:
    a = snap(writer("a"), reader("b"), epoch=0)
    gap = advance(a, snap(reader("a"), reader("b")))
    back = advance(gap.snapshot, snap(reader("a"), writer("b")))
    assert (gap.epoch, back.epoch) == (1, 2)
    assert gap.change.to_decision().attributes["resilient_db.topology.writer"] == ""


ids = st.sampled_from(["a", "b", "c", "d"])


@given(st.sets(ids), st.none() | ids, st.sets(ids), st.none() | ids, st.integers(0, 100))
def test_epoch_moves_exactly_when_the_writer_changes(
    old_ids: set[str], old_writer: str | None, new_ids: set[str], new_writer: str | None,
    epoch: int,
) -> None:
    def build(members: set[str], w: str | None, e: int = 0) -> TopologySnapshot:
        members = members | ({w} if w else set())
        return snap(*(writer(i) if i == w else reader(i) for i in members), epoch=e)

    old, new = build(old_ids, old_writer, epoch), build(new_ids, new_writer)
    result = advance(old, new)
    assert result.epoch == epoch + (old_writer != new_writer)
    assert result.snapshot.epoch == result.epoch
    roles_before = {h.instance_id: h.role for h in old.hosts}
    assert result.changed == (roles_before != {h.instance_id: h.role for h in new.hosts})


# --- bad hosts ----------------------------------------------------------------------------


def test_bad_host_memory_cools_down() -> None:
    empty = BadHostMemory(cooldown=10.0)
    memory = empty.mark_down(reader("r1"), now=100.0)
    assert empty.until == ()  # immutable: the original is unchanged
    assert memory.is_cooling(reader("r1"), 100.0)
    assert memory.is_cooling("r1.db:5432", 109.9)
    assert memory.is_cooling(HostSpec("R1.DB", 5432), 105.0)
    assert memory.remaining(reader("r1"), 104.0) == pytest.approx(6.0)
    assert not memory.is_cooling(reader("r1"), 110.0)
    assert memory.remaining(reader("r1"), 200.0) == 0.0
    assert not memory.is_cooling(reader("r2"), 100.0)
    assert not memory.is_cooling(Host("r1.db"), 100.0)  # another address: no port


def test_bad_host_memory_marks_again_up_and_prunes() -> None:
    memory = BadHostMemory(5.0).mark_down("a:1", 0.0).mark_down("b:1", 3.0).mark_down("a:1", 4.0)
    assert memory.cooling(6.0) == {"a:1", "b:1"}
    assert memory.cooling(8.5) == {"a:1"}
    assert len(memory.until) == 2
    assert memory.mark_up("A:1").cooling(6.0) == {"b:1"}
    assert memory.prune(8.5).until == (("a:1", 9.0),)
    assert BadHostMemory(0.0).mark_down("a", 1.0).cooling(1.0) == frozenset()
    with pytest.raises(ValueError, match="cooldown"):
        BadHostMemory(-1.0)


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 100)), max_size=8),
       st.floats(0, 50), st.floats(0, 200))
def test_cooling_follows_the_latest_mark(marks: list[tuple[str, float]], cooldown: float,
                                         now: float) -> None:
    memory = BadHostMemory(cooldown)
    latest: dict[str, float] = {}
    for key, at in marks:
        memory = memory.mark_down(key, at)
        latest[key] = at
    for key in ("a", "b", "c"):
        expected = key in latest and now < latest[key] + cooldown
        assert memory.is_cooling(key, now) == expected
        assert (key in memory.cooling(now)) == expected
        assert memory.prune(now).is_cooling(key, now) == expected
