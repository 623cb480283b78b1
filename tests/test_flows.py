"""The I/O-free query flow runners (resilient_db._flows): the same flow over a blocking and an
awaitable query function, answers sent, errors thrown into the flow (which may handle them),
the flow closed however the run ends; and the topology flows written on them."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest

from resilient_db._flows import Rows, run_async, run_sync
from resilient_db.dialects import get_dialect
from resilient_db.failover_core import SelfReport
from resilient_db.hosts import Host
from resilient_db.topology import Addressing, self_report_flow, server_identity_flow

pytestmark = pytest.mark.unit


def _flow(log: list[str]) -> Generator[str, Rows, tuple[Any, ...]]:
    try:
        first = yield "SELECT 1"
        try:
            yield "SELECT broken"
        except ValueError as exc:
            second: Any = f"handled {exc}"
        return first[0][0], second
    finally:
        log.append("closed")


def _query(sql: str) -> Rows:
    if "broken" in sql:
        raise ValueError("no such thing")
    return [(sql,)]


def test_sync_and_async_runners_agree() -> None:
    log: list[str] = []
    assert run_sync(_flow(log), _query) == ("SELECT 1", "handled no such thing")

    async def aquery(sql: str) -> Rows:
        await asyncio.sleep(0)
        return _query(sql)

    assert asyncio.run(run_async(_flow(log), aquery)) == ("SELECT 1", "handled no such thing")
    assert log == ["closed", "closed"]


def test_an_error_the_flow_does_not_handle_propagates_and_closes_it() -> None:
    log: list[str] = []

    def flow() -> Generator[str, Rows, None]:
        try:
            yield "SELECT broken"
        finally:
            log.append("closed")

    with pytest.raises(ValueError, match="no such thing"):
        run_sync(flow(), _query)
    assert log == ["closed"]


class _Driver:
    code = "psycopg"

    def query(self, conn: Any, sql: str) -> Rows:
        raise AssertionError("flows do no I/O")

    def is_disconnect(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)


def test_self_report_flow_asks_the_dialects_questions() -> None:
    dialect = get_dialect("pg")
    addressing = Addressing(None, False, 5432)
    host = Host("db", 5432)
    answers: dict[str | None, Rows] = {dialect.instance_id_query: [("inst-1",)],
                                       dialect.is_reader_query: [(False,)]}
    asked: list[str] = []

    def query(sql: str) -> Rows:
        asked.append(sql)
        return answers.get(sql, [])

    report = run_sync(self_report_flow(dialect, host, addressing, clock=lambda: 7.0), query)
    assert isinstance(report, SelfReport)
    assert report.host == host and report.reported_at == 7.0
    assert asked[:2] == [dialect.instance_id_query, dialect.is_reader_query]


def test_server_identity_flow_reads_pg_system_identifier_and_survives_refusal() -> None:
    dialect = get_dialect("pg")
    driver = _Driver()
    assert run_sync(server_identity_flow(driver, dialect, None),
                    lambda sql: [(123,)]) == "pg-system:123"

    def refused(sql: str) -> Rows:
        raise PermissionError("no privilege")

    assert run_sync(server_identity_flow(driver, dialect, None), refused) is None

    def lost(sql: str) -> Rows:
        raise ConnectionError("gone")

    with pytest.raises(ConnectionError):  # a lost connection is not "no answer"
        run_sync(server_identity_flow(driver, dialect, None), lost)
