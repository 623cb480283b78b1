"""What every database dialect shares: check protocol, topology values, parse helpers.

A database dialect knows one kind of server (Aurora PostgreSQL, RDS MySQL, plain PostgreSQL,
...): how to recognise it and which internal statements read its topology, the id of the
instance a connection is on, and its role. Everything here is pure:

- A dialect's *checks* are an I/O-free generator (:data:`Probe`): it yields the SQL it wants
  answered, receives an :class:`Answer` (rows, or the error the statement raised) and returns a
  :class:`Verdict` listing, in words, what it checked and saw. :func:`drive` is the small
  shell that runs the statements through a driver dialect; tests drive probes with canned
  answers.
- Parse helpers turn the raw rows of the dialect's queries into small immutable values
  (:class:`TopologyRow`, :class:`Topology`); :func:`drop_stale` is the staleness filter, with
  the clock injected.

Every SQL constant is schema-qualified (``pg_catalog.`` functions, ``information_schema.`` /
``mysql.`` tables on MySQL, DESIGN §10): a user who can create objects on the search path
must not be able to shadow what resilient_db runs. MySQL's built-in functions (``NOW``) and
system variables (``@@read_only``) cannot be shadowed and are not qualified.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal, Protocol, TypeVar, cast

__all__ = [
    "STALE_AFTER",
    "Answer",
    "DatabaseDialect",
    "Family",
    "Probe",
    "QueryDriver",
    "Rows",
    "Topology",
    "TopologyRow",
    "Verdict",
    "drive",
    "drop_stale",
    "memoized",
]

log = logging.getLogger("resilient_db.dialects")

Family = Literal["pg", "mysql"]
#: Rows as ``DriverDialect.query`` returns them.
Rows = Sequence[tuple[Any, ...]]
T = TypeVar("T")

#: Aurora topology rows not updated for this many seconds are stale (except the writer's).
STALE_AFTER = 300.0

#: A schema-qualified table name, e.g. ``information_schema.replica_host_status``.
_QUALIFIED_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*")


# --- the check protocol ------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the server answered to one check statement: its rows, or the error it raised
    (``error`` is ``None`` on success; a failed statement counts as "no" in every check)."""

    rows: tuple[tuple[Any, ...], ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def first(self) -> Any:
        """The first column of the first row; ``None`` when there is no row (or it failed)."""
        return self.rows[0][0] if self.rows and self.rows[0] else None


@dataclass(frozen=True)
class Verdict:
    """The outcome of one dialect's checks. ``seen`` says, one line per check, what was
    checked and what the server answered (for logs and ``DialectMismatchError``)."""

    matched: bool
    seen: tuple[str, ...] = ()


#: A dialect's checks: yields SQL, is sent each statement's :class:`Answer`, returns a verdict.
Probe = Generator[str, Answer, Verdict]


class QueryDriver(Protocol):
    """What checks need from a driver dialect (:class:`~resilient_db.drivers.DriverDialect`
    provides it; tests use a small fake)."""

    @property
    def code(self) -> str: ...

    def query(self, conn: Any, sql: str) -> list[tuple[Any, ...]]: ...

    def is_disconnect(self, exc: BaseException) -> bool: ...


def ask(driver: QueryDriver, conn: Any, sql: str) -> Answer:
    """Run one check statement. A statement that fails (missing table or function, no
    privilege) is an answer too; a lost connection is not: its error propagates untouched.

    ``driver.query`` rolls back a transaction the statement started implicitly, so a failed
    check does not leave an idle PostgreSQL connection in an aborted transaction. The
    PostgreSQL checks are catalog lookups that cannot fail anyway, so even a connection already
    inside the application's transaction is never aborted by detection.
    """
    try:
        rows = driver.query(conn, sql)
    except Exception as exc:
        if driver.is_disconnect(exc):
            raise
        log.debug("check statement failed (counts as no): %s: %r", sql, exc)
        return Answer(error=_describe_error(exc))
    return Answer(rows=tuple(tuple(r) for r in rows))


def drive(flow: Generator[str, Answer, T], driver: QueryDriver, conn: Any) -> T:
    """Run an I/O-free check flow against a live connection and return its result."""
    try:
        sql = next(flow)
        while True:
            sql = flow.send(ask(driver, conn, sql))
    except StopIteration as stop:
        return cast(T, stop.value)
    finally:
        flow.close()


def memoized(
    flow: Generator[str, Answer, T], answered: dict[str, Answer]
) -> Generator[str, Answer, T]:
    """``flow``, asking only statements not in ``answered`` (which it fills): checks that share
    a statement (several PostgreSQL dialects read ``rds.extensions``) run it once."""
    try:
        sql = next(flow)
        while True:
            answer = answered.get(sql)
            if answer is None:
                answer = answered[sql] = yield sql
            sql = flow.send(answer)
    except StopIteration as stop:
        return cast(T, stop.value)


def _describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- values read from the server ----------------------------------------------------------------


@dataclass(frozen=True)
class TopologyRow:
    """One instance as the cluster reports it.

    ``cpu`` is a percentage and ``lag_seconds`` the replica lag in seconds (``None``: not
    reported, e.g. the writer's lag on Aurora or anything on Multi-AZ). ``last_update`` is when
    the cluster last heard from the instance (``None``: not reported). ``endpoint``/``port``
    are the instance's address as a Multi-AZ cluster reports it (``None`` on Aurora, where the
    address is built from the id with a host pattern). ``region`` is the AWS region an Aurora
    Global Database reports for the instance (``None``: a single-region topology).
    """

    instance_id: str
    is_writer: bool
    cpu: float | None = None
    lag_seconds: float | None = None
    last_update: datetime | None = None
    endpoint: str | None = None
    port: int | None = None
    region: str | None = None


@dataclass(frozen=True)
class Topology:
    """A parsed topology answer.

    ``rows`` are the instances to use, with at most one writer. ``ignored`` are rows left out
    (stale readers, writers superseded by a more recently updated writer) so that callers can
    report them. ``server_time`` is the server's clock when it answered (``None``: the query
    does not report it).
    """

    rows: tuple[TopologyRow, ...]
    ignored: tuple[TopologyRow, ...] = ()
    server_time: datetime | None = None

    @property
    def writer(self) -> TopologyRow | None:
        """The writer row; ``None`` when the answer names no writer (an invalid topology)."""
        return next((row for row in self.rows if row.is_writer), None)

    @property
    def readers(self) -> tuple[TopologyRow, ...]:
        return tuple(row for row in self.rows if not row.is_writer)


def _age(now: datetime, then: datetime) -> float:
    """Seconds from ``then`` to ``now``. A naive value compared with an aware one is taken to be
    in the aware one's zone (MySQL returns naive datetimes, PostgreSQL aware ones)."""
    if (now.tzinfo is None) != (then.tzinfo is None):
        if now.tzinfo is None:
            now = now.replace(tzinfo=then.tzinfo)
        else:
            then = then.replace(tzinfo=now.tzinfo)
    return (now - then).total_seconds()


def drop_stale(
    rows: Iterable[TopologyRow], now: datetime, max_age: float = STALE_AFTER
) -> tuple[tuple[TopologyRow, ...], tuple[TopologyRow, ...]]:
    """Split ``rows`` into (kept, stale): a reader whose ``last_update`` is more than
    ``max_age`` seconds before ``now`` is stale. Writer rows and rows without a
    ``last_update`` are always kept. Pure: ``now`` is injected (normally the server's clock as
    reported with the topology, so client clock skew does not matter)."""
    kept: list[TopologyRow] = []
    stale: list[TopologyRow] = []
    for row in rows:
        if row.is_writer or row.last_update is None or _age(now, row.last_update) <= max_age:
            kept.append(row)
        else:
            stale.append(row)
    return tuple(kept), tuple(stale)


def single_writer(
    rows: Iterable[TopologyRow],
) -> tuple[tuple[TopologyRow, ...], tuple[TopologyRow, ...]]:
    """Split ``rows`` into (kept, superseded): when several rows claim to be the writer (briefly
    possible during an Aurora failover), the most recently updated one is kept. A row without
    ``last_update`` is the answering instance's own row (Aurora PostgreSQL 13.9+ leaves its
    own timestamp NULL): an instance claiming the writer role for itself is the freshest
    claim there is, so it wins. Pure."""
    rows = tuple(rows)
    writers = [row for row in rows if row.is_writer]
    if len(writers) <= 1:
        return rows, ()
    own = datetime.max.replace(tzinfo=timezone.utc)

    def updated(row: TopologyRow) -> datetime:
        ts = row.last_update
        if ts is None:
            return own
        return ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)

    newest = max(writers, key=updated)
    kept = tuple(row for row in rows if not row.is_writer or row is newest)
    superseded = tuple(row for row in writers if row is not newest)
    return kept, superseded


#: Aurora's ``session_id`` of the writer row.
WRITER_SESSION_ID = "MASTER_SESSION_ID"


def aurora_topology(rows: Rows, now: datetime | None, max_age: float) -> Topology:
    """Parse Aurora topology rows ``(server_id, session_id, cpu, lag in milliseconds,
    last_update, server clock)`` (the same shape on PostgreSQL and MySQL). Stale readers are
    dropped against ``now``, or against the server clock column when ``now`` is ``None``."""
    parsed: list[TopologyRow] = []
    server_time: datetime | None = None
    for row in rows:
        instance_id = text(row[0])
        if not instance_id:
            continue
        lag_ms = number(row[3])
        parsed.append(
            TopologyRow(
                instance_id=instance_id,
                is_writer=text(row[1]) == WRITER_SESSION_ID,
                cpu=number(row[2]),
                lag_seconds=None if lag_ms is None else lag_ms / 1000.0,
                last_update=timestamp(row[4]),
            )
        )
        if server_time is None and len(row) > 5:
            server_time = timestamp(row[5])
    kept, ignored = age_filter(parsed, now if now is not None else server_time, max_age)
    return Topology(kept, ignored, server_time)


def global_topology(rows: Rows) -> Topology:
    """Parse Aurora Global Database rows ``(server_id, session_id, visibility lag in
    milliseconds, aws_region, server clock)`` (the same shape on PostgreSQL and MySQL). The
    rows carry no update timestamp, so nothing is dropped as stale; of several writer claims
    (briefly, during a global switchover) the first is kept."""
    parsed: list[TopologyRow] = []
    server_time: datetime | None = None
    for row in rows:
        instance_id = text(row[0])
        if not instance_id:
            continue
        lag_ms = number(row[2])
        parsed.append(
            TopologyRow(
                instance_id=instance_id,
                is_writer=text(row[1]) == WRITER_SESSION_ID,
                lag_seconds=None if lag_ms is None else lag_ms / 1000.0,
                region=text(row[3]) or None,
            )
        )
        if server_time is None and len(row) > 4:
            server_time = timestamp(row[4])
    kept, ignored = single_writer(parsed)
    return Topology(kept, ignored, server_time)


def multi_az_topology(rows: Rows, writer_id: str | None) -> Topology:
    """Parse Multi-AZ topology rows ``(id, endpoint, port)``; the row whose id is
    ``writer_id`` is the writer (Multi-AZ rows do not say; ``None``: no writer known)."""
    parsed: list[TopologyRow] = []
    for row in rows:
        instance_id = text(row[0])
        if not instance_id:
            continue
        port = number(row[2])
        parsed.append(
            TopologyRow(
                instance_id=instance_id,
                is_writer=instance_id == writer_id,
                endpoint=text(row[1]),
                port=None if port is None else int(port),
            )
        )
    return Topology(tuple(parsed))


def age_filter(
    rows: Iterable[TopologyRow], now: datetime | None, max_age: float
) -> tuple[tuple[TopologyRow, ...], tuple[TopologyRow, ...]]:
    """Staleness, then single-writer filtering; ``now`` ``None`` skips the staleness filter.
    Returns (kept, ignored)."""
    rows = tuple(rows)
    stale: tuple[TopologyRow, ...] = ()
    if now is not None:
        rows, stale = drop_stale(rows, now, max_age)
    rows, superseded = single_writer(rows)
    return rows, stale + superseded


# --- value conversion (shared by the parse helpers) ---------------------------------------------


def text(value: Any) -> str | None:
    """A server value as ``str`` (mysql-connector may hand back bytes); ``None`` stays."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def timestamp(value: Any) -> datetime | None:
    """A server timestamp as ``datetime`` (ISO text accepted); ``None``: absent or unreadable."""
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(text(value) or "")
    except ValueError:
        return None


def number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def truthy(value: Any) -> bool | None:
    """A boolean-ish server value (``t``, ``1``, ``ON``, ``True``); ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    word = text(value)
    return None if word is None else word.strip().lower() in {"1", "on", "true", "t", "yes"}


def variable(answer: Answer, name: str) -> str | None:
    """The value of ``name`` in a ``SHOW VARIABLES LIKE ...`` answer (``None``: not listed)."""
    for row in answer.rows:
        if len(row) >= 2 and (text(row[0]) or "").lower() == name.lower():
            return text(row[1]) or ""
    return None


def shown(value: str | None, limit: int = 80) -> str:
    """A server value quoted for a check line, shortened when long."""
    if value is None:
        return "NULL"
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    return repr(value)


def failed(sql_label: str, answer: Answer) -> str:
    return f"{sql_label} failed ({answer.error}); counts as no"


def check_qualified_table(name: str, what: str) -> None:
    if not _QUALIFIED_TABLE.fullmatch(name):
        raise ValueError(
            f"{what} must be a schema-qualified table name such as "
            f"'information_schema.replica_host_status'; got {name!r}"
        )


def check_select(sql: str, what: str) -> None:
    if not sql.lstrip().upper().startswith("SELECT ") or ";" in sql:
        raise ValueError(f"{what} must be a single SELECT statement; got {sql!r}")


# --- the dialect -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DatabaseDialect:
    """One kind of database server. Immutable; the shared instances come from
    :func:`resilient_db.dialects.get_dialect`.

    Fixed facts are class attributes; the statements are fields (with the production defaults)
    so that a look-alike server, such as the simulator's, can be described by constructing a
    dialect with other statements.

    - ``instance_id_query``: the id of the instance the connection is on, as topology rows name
      it. For dialects without topology, the server's own ``address:port`` (an alias; ``None``
      over a Unix socket).
    - ``is_reader_query``: one boolean-ish value, true on a reader.
    - ``topology_query``: the cluster's members (``None``: no topology, e.g. plain PostgreSQL).
    - ``writer_id_query``: Multi-AZ only: the writer's id as seen from a reader (no answer, or
      ``NULL``, on the writer itself).
    """

    code: ClassVar[str]
    family: ClassVar[Family]
    #: What the server is, in words: "Aurora PostgreSQL".
    title: ClassVar[str]
    default_port: ClassVar[int]

    instance_id_query: str
    is_reader_query: str
    topology_query: str | None = field(default=None)
    writer_id_query: str | None = field(default=None)

    @property
    def description(self) -> str:
        """What the server is, in words, for messages (``title`` unless configured otherwise)."""
        return self.title

    # --- checks ------------------------------------------------------------------------------
    def probe(self) -> Probe:
        """This dialect's checks (see :data:`Probe`)."""
        raise NotImplementedError

    # --- parse helpers -----------------------------------------------------------------------
    def parse_instance_id(self, rows: Rows) -> str | None:
        """The answer to ``instance_id_query``: one column is the id; two columns are an
        address and a port, joined as ``address:port``. ``None`` when the server gave none
        (an address is ``NULL`` over a Unix socket)."""
        if not rows or not rows[0] or rows[0][0] is None:
            return None
        row = rows[0]
        if len(row) >= 2:
            return f"{text(row[0])}:{text(row[1])}"
        return text(row[0])

    def parse_is_reader(self, rows: Rows) -> bool | None:
        """The answer to ``is_reader_query``; ``None`` when the server gave none."""
        if not rows or not rows[0]:
            return None
        return truthy(rows[0][0])

    def parse_writer_id(self, rows: Rows) -> str | None:
        """The answer to ``writer_id_query``. ``None`` means no writer was reported: the
        connection is on the writer itself (use ``instance_id_query``), or the dialect has no
        such query."""
        if not rows or not rows[0]:
            return None
        return text(rows[0][0])

    def parse_topology(
        self,
        rows: Rows,
        *,
        writer_id: str | None = None,
        now: datetime | None = None,
        max_age: float = STALE_AFTER,
    ) -> Topology:
        """The answer to ``topology_query``. ``writer_id`` (Multi-AZ, whose rows do not say
        who the writer is) names the writer. Stale rows are dropped against ``now`` (default:
        the server's clock from the answer, when the query reports it)."""
        raise NotImplementedError(f"dialect {self.code!r} has no topology")


