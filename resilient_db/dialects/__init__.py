"""Database dialects: which kind of server a connection is on, and the SQL to ask it things.

::

    dialect = detect(driver, conn)              # most specific first, then cached per endpoint
    dialect = verify("aurora-pg", driver, conn)  # wrapper_dialect: check, or DialectMismatchError
    dialect.topology_query / instance_id_query / is_reader_query / writer_id_query
    dialect.parse_topology(rows) -> Topology    # pure; stale rows dropped

Detection and verification are I/O-free flows (:func:`detection_flow`,
:func:`verification_flow`) driven against a connection by a small shell; each records, in
words, what it checked and what the server answered.

Forcing a less specific dialect of the right family is a legitimate downgrade (``pg`` on RDS
or Aurora PostgreSQL, ``rds-pg`` on a Multi-AZ cluster: the server is still that); forcing a
more specific one the server does not match (``aurora-pg`` on plain PostgreSQL) is an error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias

from .. import _lifecycle
from .._decisions import Decision, get_decision_sink
from ..errors import ConfigurationError, DialectMismatchError
from .base import (
    STALE_AFTER,
    Answer,
    DatabaseDialect,
    Family,
    Probe,
    QueryDriver,
    Topology,
    TopologyRow,
    Verdict,
    drive,
    drop_stale,
    memoized,
)
from .mysql import (
    AuroraMysqlDialect,
    GlobalAuroraMysqlDialect,
    MultiAzMysqlDialect,
    MysqlDialect,
    RdsMysqlDialect,
)
from .pg import (
    AuroraPgDialect,
    GlobalAuroraPgDialect,
    MultiAzPgDialect,
    PgDialect,
    RdsPgDialect,
)

__all__ = [
    "DETECTION_ORDER",
    "STALE_AFTER",
    "Answer",
    "AuroraMysqlDialect",
    "AuroraPgDialect",
    "DatabaseDialect",
    "Detection",
    "EndpointKey",
    "Family",
    "GlobalAuroraMysqlDialect",
    "GlobalAuroraPgDialect",
    "MultiAzMysqlDialect",
    "MultiAzPgDialect",
    "MysqlDialect",
    "PgDialect",
    "Probe",
    "QueryDriver",
    "RdsMysqlDialect",
    "RdsPgDialect",
    "Topology",
    "TopologyRow",
    "Verdict",
    "Verification",
    "aurora_mysql_lookalike",
    "cached_detect",
    "clear_cache",
    "detect",
    "detection_flow",
    "drop_stale",
    "family_of",
    "get_dialect",
    "global_variant",
    "known",
    "mismatch_error",
    "remember",
    "run_detection",
    "verification_flow",
    "verify",
]

log = logging.getLogger("resilient_db.dialects")

_DIALECTS: Mapping[str, DatabaseDialect] = MappingProxyType(
    {
        d.code: d
        for d in (
            AuroraPgDialect(),
            AuroraMysqlDialect(),
            RdsPgDialect(),
            RdsMysqlDialect(),
            MultiAzPgDialect(),
            MultiAzMysqlDialect(),
            PgDialect(),
            MysqlDialect(),
        )
    }
)

#: Detection order per family: most specific first; the last one matches any server.
DETECTION_ORDER: Mapping[Family, tuple[str, ...]] = MappingProxyType(
    {
        "pg": ("aurora-pg", "multi-az-pg", "rds-pg", "pg"),
        "mysql": ("aurora-mysql", "multi-az-mysql", "rds-mysql", "mysql"),
    }
)

_DRIVER_FAMILIES: Mapping[str, Family] = MappingProxyType(
    {"psycopg": "pg", "mysql-connector": "mysql"}
)
_FAMILY_NAMES: Mapping[Family, str] = MappingProxyType({"pg": "PostgreSQL", "mysql": "MySQL"})


def get_dialect(code: str) -> DatabaseDialect:
    """The shared production dialect for ``code`` (one of ``_params.DIALECT_CODES``)."""
    try:
        return _DIALECTS[code]
    except KeyError:
        raise ConfigurationError(
            f"unknown database dialect {code!r}; expected one of {', '.join(_DIALECTS)}",
            parameter="wrapper_dialect",
            value=code,
        ) from None


def family_of(driver: QueryDriver) -> Family:
    """The database family a driver dialect talks to."""
    try:
        return _DRIVER_FAMILIES[driver.code]
    except KeyError:
        raise ConfigurationError(
            f"driver {driver.code!r} has no database family; expected one of "
            f"{', '.join(_DRIVER_FAMILIES)}",
            parameter="wrapper_driver_dialect",
            value=driver.code,
        ) from None


# --- pure flows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """What detection found. ``checks`` lists every check made, prefixed by the dialect it
    belongs to (``"aurora-pg: pg_settings rds.extensions is not set"``)."""

    dialect: DatabaseDialect
    checks: tuple[str, ...]


@dataclass(frozen=True)
class Verification:
    """The outcome of checking a forced dialect. ``detected`` is ``None`` when it matched
    (detection is only run to explain a mismatch)."""

    dialect: DatabaseDialect
    verdict: Verdict
    detected: Detection | None = None

    @property
    def matched(self) -> bool:
        return self.verdict.matched


def detection_flow(
    family: Family, answered: dict[str, Answer] | None = None
) -> Generator[str, Answer, Detection]:
    """Try the family's dialects most specific first; the first whose checks pass wins.
    ``answered`` carries answers already known (shared statements run once)."""
    memo = {} if answered is None else answered
    checks: list[str] = []
    order = DETECTION_ORDER[family]
    for code in order:
        dialect = _DIALECTS[code]
        verdict = yield from memoized(dialect.probe(), memo)
        checks.extend(f"{code}: {line}" for line in verdict.seen)
        if verdict.matched:
            return Detection(dialect, tuple(checks))
    # The generic dialect matches any server of its family; kept for safety.
    return Detection(_DIALECTS[order[-1]], tuple(checks))


def verification_flow(
    dialect: DatabaseDialect, family: Family
) -> Generator[str, Answer, Verification]:
    """Run ``dialect``'s checks; on a mismatch also detect what the server is instead."""
    memo: dict[str, Answer] = {}
    verdict = yield from memoized(dialect.probe(), memo)
    if verdict.matched:
        return Verification(dialect, verdict)
    detected = yield from detection_flow(family, memo)
    return Verification(dialect, verdict, detected)


def mismatch_error(verification: Verification) -> DialectMismatchError:
    """The error for a forced dialect the server does not match, naming ``wrapper_dialect``,
    the forced code, what was checked and seen, and what was detected instead."""
    forced = verification.dialect
    seen = "; ".join(verification.verdict.seen) or "no check passed"
    detected = verification.detected
    message = (
        f"wrapper_dialect={forced.code!r} but the server does not look like {forced.description}: "
        f"{seen}"
    )
    checks = tuple(f"{forced.code}: {line}" for line in verification.verdict.seen)
    if detected is not None:
        message += f"; detected {detected.dialect.code!r}"
        checks += tuple(line for line in detected.checks if line not in checks)
    instead = "" if detected is None else f" (or set it to {detected.dialect.code!r})"
    message += (
        f". Remove wrapper_dialect{instead} or point at {_article(forced.description)} endpoint"
    )
    return DialectMismatchError(message, dialect=forced.code, checks=checks)


def _article(title: str) -> str:
    if title.startswith(("a ", "an ")):
        return title
    # "an RDS ...": the article follows the sound ("ar-dee-ess"), not the letter.
    return ("an " if title[:1] in "AEIOU" or title.startswith("RDS") else "a ") + title


def _family_mismatch(forced: DatabaseDialect, driver: QueryDriver, family: Family) -> str:
    same_family = ", ".join(c for c in DETECTION_ORDER[family])
    return (
        f"wrapper_dialect={forced.code!r} is a {_FAMILY_NAMES[forced.family]} dialect but the "
        f"connection uses the {driver.code} driver ({_FAMILY_NAMES[family]}); use one of "
        f"{same_family}, or remove wrapper_dialect"
    )


# --- I/O shells ---------------------------------------------------------------------------------


def run_detection(driver: QueryDriver, conn: Any) -> Detection:
    """Detect the dialect of the server behind ``conn`` (a raw driver connection), with the
    checks made. Leaves the connection's transaction state as it was."""
    detection = drive(detection_flow(family_of(driver)), driver, conn)
    log.debug("detected dialect %s: %s", detection.dialect.code, "; ".join(detection.checks))
    return detection


def detect(driver: QueryDriver, conn: Any) -> DatabaseDialect:
    """The dialect of the server behind ``conn`` (most specific first)."""
    return run_detection(driver, conn).dialect


def verify(dialect: str | DatabaseDialect, driver: QueryDriver, conn: Any) -> DatabaseDialect:
    """Check a forced dialect (``wrapper_dialect``, or an explicit look-alike dialect) against
    the server; return it when the server matches.

    Raises :class:`~resilient_db.errors.DialectMismatchError` when the dialect is of the other
    family than the driver, or when its checks fail (the error lists them and what was
    detected instead).
    """
    forced = get_dialect(dialect) if isinstance(dialect, str) else dialect
    family = family_of(driver)
    if forced.family != family:
        raise DialectMismatchError(
            _family_mismatch(forced, driver, family),
            dialect=forced.code,
            checks=(f"driver {driver.code} talks to {_FAMILY_NAMES[family]}",),
        )
    verification = drive(verification_flow(forced, family), driver, conn)
    if not verification.matched:
        raise mismatch_error(verification)
    log.debug("wrapper_dialect %s verified: %s", forced.code, "; ".join(verification.verdict.seen))
    return forced


# --- process-wide cache -------------------------------------------------------------------------

#: (driver code, host, port) of an endpoint.
EndpointKey: TypeAlias = tuple[str, str, int | None]

_cache_lock = threading.Lock()
_known: dict[tuple[EndpointKey, DatabaseDialect | None], DatabaseDialect] = {}
_in_flight: dict[tuple[EndpointKey, DatabaseDialect | None], threading.Lock] = {}


def cached_detect(
    key: EndpointKey,
    driver: QueryDriver,
    conn: Any,
    *,
    forced: str | DatabaseDialect | None = None,
) -> DatabaseDialect:
    """:func:`detect` (or :func:`verify` when ``forced`` is given) once per endpoint.

    ``key`` is ``(driver code, host, port)``. Thread-safe: concurrent first connections to one
    endpoint wait for a single detection; other endpoints are not held up. A detection that
    raises is not cached.
    """
    wanted = get_dialect(forced) if isinstance(forced, str) else forced
    slot = (key, wanted)
    with _cache_lock:
        known = _known.get(slot)
        if known is not None:
            return known
        gate = _in_flight.setdefault(slot, threading.Lock())
    with gate:
        with _cache_lock:
            known = _known.get(slot)
        if known is not None:
            return known
        try:
            if wanted is None:
                detection = run_detection(driver, conn)
                dialect, checks = detection.dialect, detection.checks
            else:
                dialect, checks = verify(wanted, driver, conn), ()
            with _cache_lock:
                _known[slot] = dialect
        finally:
            with _cache_lock:
                _in_flight.pop(slot, None)
    get_decision_sink().record(
        Decision(
            "dialect.detected",
            None,
            {
                "server.address": key[1],
                "server.port": key[2],
                "resilient_db.dialect": dialect.code,
                "resilient_db.dialect.forced": wanted is not None,
                "resilient_db.dialect.checks": checks,
            },
        )
    )
    return dialect


def known(key: EndpointKey) -> DatabaseDialect | None:
    """The dialect detected for the endpoint ``key`` (no forced dialect), if known."""
    with _cache_lock:
        return _known.get((key, None))


def remember(key: EndpointKey, detection: Detection) -> DatabaseDialect:
    """Cache a detection made by a front that runs :func:`detection_flow` itself
    (``connect_async``); recorded as the same decision as :func:`cached_detect`'s."""
    with _cache_lock:
        _known[(key, None)] = detection.dialect
    get_decision_sink().record(Decision("dialect.detected", None, {
        "server.address": key[1], "server.port": key[2],
        "resilient_db.dialect": detection.dialect.code,
        "resilient_db.dialect.forced": False,
        "resilient_db.dialect.checks": detection.checks}))
    return detection.dialect


def clear_cache(key: EndpointKey | None = None) -> None:
    """Forget detected dialects: of one endpoint, or all (``None``)."""
    with _cache_lock:
        if key is None:
            _known.clear()
        else:
            for slot in [s for s in _known if s[0] == key]:
                del _known[slot]



def aurora_mysql_lookalike(schema: str) -> AuroraMysqlDialect:
    """The aurora-mysql dialect reading the simulator's MariaDB look-alike in ``schema``
    (property ``aurora_mysql_lookalike_schema``): topology in ``<schema>.replica_host_status``,
    instance id from ``<schema>.aurora_server_id()``, readers by ``@@read_only``."""
    return AuroraMysqlDialect(
        topology_source=f"{schema}.replica_host_status",
        instance_id_query=f"SELECT {schema}.aurora_server_id()",
        is_reader_query="SELECT @@read_only",
    )


def global_variant(dialect: DatabaseDialect) -> DatabaseDialect | None:
    """The Aurora Global Database dialect of an Aurora dialect (same instance and role
    statements; the topology of every region): ``None`` for a server that is not Aurora. A
    look-alike's global topology is the table ``aurora_global_db_instance_status`` in the
    look-alike's schema."""
    if isinstance(dialect, (GlobalAuroraPgDialect, GlobalAuroraMysqlDialect)):
        return dialect
    if isinstance(dialect, AuroraPgDialect):
        return GlobalAuroraPgDialect(instance_id_query=dialect.instance_id_query,
                                     is_reader_query=dialect.is_reader_query)
    if isinstance(dialect, AuroraMysqlDialect):
        source = None
        if dialect.is_lookalike:
            schema = dialect.topology_source.split(".")[0]
            source = f"{schema}.aurora_global_db_instance_status"
        return GlobalAuroraMysqlDialect(
            topology_source=dialect.topology_source,
            instance_id_query=dialect.instance_id_query,
            is_reader_query=dialect.is_reader_query,
            **({"global_topology_source": source} if source else {}))
    return None


def _reset_in_child() -> None:
    # After fork(): fresh locks (a parent thread may have held them); what was detected stays.
    global _cache_lock, _in_flight
    _cache_lock = threading.Lock()
    _in_flight = {}


_lifecycle.on_fork_child(_reset_in_child)
