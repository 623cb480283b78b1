"""The ``iam`` plugin against simulated clusters that enforce IAM (``Cluster.enable_iam``:
PostgreSQL ``pam`` and MariaDB's PAM plugin hand each token to a verifier that re-derives the
SigV4 signature). Tokens come from boto3's ``generate_db_auth_token`` with the tests'
credentials, as in production: valid tokens log in, an expired token and a token for another
host are refused by the server (its log says why), and failover reaches the new writer with a
token for that instance."""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import botocore.auth  # type: ignore[import-untyped]
import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import CollectingSink
from resilient_db.auth import CREDENTIALS
from resilient_db.drivers import driver_for
from resilient_db.plugins import iam
from resilient_db.plugins.iam import IamPlugin
from simulator.cluster import Cluster, Instance, Timeline

from .aws import aws_env
from .waiting import wait_until

pytestmark = pytest.mark.real_server

USER = "iam_user"
TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)


@dataclass
class Env:
    engine: str  # "pg" | "mysql"
    cluster: Cluster
    target: Callable[..., Any]
    extra: dict[str, Any]
    opened: list[Any] = field(default_factory=list)

    def connect(self, endpoint: str | None = None, **extra: Any) -> resilient_db.ConnectionProxy:
        kwargs = {k: v for k, v in self.cluster.connect_kwargs(endpoint).items()
                  if k != "password"}
        kwargs.update(user=USER, autocommit=True, connect_timeout=10, **self.extra, **extra)
        conn = resilient_db.connect(self.target, **kwargs)
        self.opened.append(conn)
        return conn

    def log_mark(self, instance: Instance) -> tuple[Instance, int]:
        return instance, instance.runtime.log_path.stat().st_size

    def logged(self, mark: tuple[Instance, int], reason: str) -> None:
        """The instance's log, since ``mark``, gives the verifier's ``reason``."""
        instance, start = mark

        def found() -> bool:
            with instance.runtime.log_path.open("rb") as f:
                f.seek(start)
                return reason.encode() in f.read()

        wait_until(f"{instance.id}'s log to say {reason!r}", found, timeout=15)


def current_user(conn: Any) -> str:
    cur = conn.cursor()
    cur.execute("SELECT current_user")
    row = cur.fetchone()
    cur.close()
    return str(row[0]).split("@")[0]


@pytest.fixture(scope="module")
def pg_iam_cluster() -> Iterator[Cluster]:
    with Cluster.start("aurora-pg", readers=1, timeline=TIMELINE) as cluster:
        cluster.enable_iam(USER)
        yield cluster


@pytest.fixture(scope="module")
def mysql_iam_cluster() -> Iterator[Cluster]:
    with Cluster.start("aurora-mysql", readers=1, timeline=TIMELINE) as cluster:
        cluster.enable_iam(USER)
        yield cluster


class Counting:
    """boto3's real token generator, counting calls; ``sign_at``: sign the next token as if
    the clock read that (an expired token)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str, str]] = []
        self.sign_at: datetime.datetime | None = None
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int, user: str, region: str) -> str:
        with self.lock:
            self.calls.append((host, port, user, region))
            sign_at, self.sign_at = self.sign_at, None
        if sign_at is None:
            return iam.boto3_token(host, port, user, region)
        original = botocore.auth.get_current_datetime
        botocore.auth.get_current_datetime = lambda: sign_at
        try:
            return iam.boto3_token(host, port, user, region)
        finally:
            botocore.auth.get_current_datetime = original

    def hosts(self) -> list[str]:
        return [call[0] for call in self.calls]


@pytest.fixture(params=["pg", "mysql"])
def env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    aws_env(monkeypatch)
    iam.forget_clients()
    CREDENTIALS.clear()
    if request.param == "pg":
        environment = Env("pg", request.getfixturevalue("pg_iam_cluster"),
                          psycopg.Connection.connect, {})
    else:
        environment = Env("mysql", request.getfixturevalue("mysql_iam_cluster"),
                          mysql.connector.connect,
                          {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"})
    cluster = environment.cluster
    wait_until("every instance in a role",
               lambda: all(i.role != "stopped" for i in cluster.instances.values()))
    wait_until("readers following the writer", cluster.settled)
    yield environment
    for conn in environment.opened:
        with contextlib.suppress(Exception):
            conn.close()
    CREDENTIALS.clear()
    iam.forget_clients()


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> Counting:
    counting = Counting()
    monkeypatch.setattr(IamPlugin, "generate", counting)
    return counting


def test_valid_token_connects_and_is_reused(env: Env, tokens: Counting,
                                            sink: CollectingSink) -> None:
    endpoint = env.cluster.writer_endpoint
    for _ in range(3):
        conn = env.connect(plugins="iam")
        assert current_user(conn) == USER
        conn.close()
    assert tokens.calls == [(endpoint, env.cluster.port, USER, env.cluster.naming.region)]
    assert [d.attributes["auth.status"] for d in sink.of_kind("auth.credential")] == [
        "fetched", "cached", "cached"]
    assert not sink.of_kind("auth.retried")


def test_expired_token_is_refused_by_the_server_then_replaced(
        env: Env, tokens: Counting, sink: CollectingSink) -> None:
    """A token the server considers expired (signed 901 s ago: as after a long-lived cache
    or clock skew) is refused for real; the plugin drops it and logs in with a new one."""
    tokens.sign_at = (datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                      - datetime.timedelta(seconds=901))
    mark = env.log_mark(env.cluster.writer)
    conn = env.connect(plugins="iam")
    assert current_user(conn) == USER
    env.logged(mark, "the token expired")
    assert len(tokens.calls) == 2
    assert [d.kind for d in sink.decisions if d.kind.startswith("auth.")] == [
        "auth.credential", "auth.retried"]


def test_token_for_another_host_is_refused_by_the_server(
        env: Env, tokens: Counting, sink: CollectingSink) -> None:
    reader = env.cluster.readers[0]
    mark = env.log_mark(env.cluster.writer)
    with pytest.raises(Exception) as info:  # the driver's own error: checked below
        env.connect(plugins="iam", iam_host=reader.endpoint)
    assert driver_for(env.target, None).is_auth_failure(info.value)
    env.logged(mark, "is not a name of this instance")
    assert tokens.hosts() == [reader.endpoint, reader.endpoint]  # the retry, then no more
    assert [d.kind for d in sink.decisions if d.kind.startswith("auth.")] == [
        "auth.credential", "auth.retried", "auth.failed"]
    token_text = str(info.value) + repr(sink.decisions)
    assert "X-Amz-Signature" not in token_text and "Action=connect" not in token_text


def test_failover_reaches_the_new_writer_with_a_token_for_it(
        env: Env, tokens: Counting, sink: CollectingSink) -> None:
    """Failover connects to the instance the topology names as the new writer, by its own
    endpoint: the token is generated for that instance and the server accepts it."""
    cluster = env.cluster
    conn = env.connect(plugins="initial_connection,aurora_connection_tracker,failover,efm,iam")
    assert current_user(conn) == USER
    old = cluster.writer
    events = cluster.failover()
    new = next(e.instance for e in events if e.name == "promoted")
    assert new is not None and new != old.id
    cur = conn.cursor()
    # Failed over at this statement (FailoverSuccessError), or before it when the
    # connection was already known lost (efm, the closed socket): either way on ``new``.
    with contextlib.suppress(resilient_db.FailoverSuccessError):
        cur.execute("SELECT 1")
        cur.fetchall()
    assert current_user(conn) == USER
    cur = conn.cursor()
    cur.execute("SELECT pg_catalog.aurora_db_instance_identifier()" if env.engine == "pg"
                else "SELECT aurora_sim.aurora_server_id()")
    assert cur.fetchone()[0] == new
    assert cluster.instance(new).endpoint in tokens.hosts()
    # Moved by failover at a statement, or by the connection tracker recycling the idle
    # connection left on the demoted writer before the statement (which one depends on when
    # the topology monitor saw the new writer): both reconnect through iam to ``new``.
    assert sink.of_kind("failover.finished") or sink.of_kind("tracker.recycled")
    assert not sink.of_kind("auth.failed")


def test_no_token_in_logs_spans_decisions_or_errors(
        env: Env, tokens: Counting, sink: CollectingSink,
        caplog: pytest.LogCaptureFixture) -> None:
    """A login and a refused login with telemetry on and DEBUG logging: the token (or any
    part of its signature) appears in none of our log records, spans, span events, decisions
    or the error."""
    from resilient_db import telemetry

    from .test_telemetry import make_otel

    otel = make_otel()
    made: list[str] = []
    real = tokens.__call__

    def keep(host: str, port: int, user: str, region: str) -> str:
        token = real(host, port, user, region)
        made.append(token)
        return token

    tokens_kept: Any = keep
    try:
        with caplog.at_level(logging.DEBUG):
            IamPlugin.generate = tokens_kept
            conn = env.connect(plugins="iam", enable_telemetry=True)
            assert current_user(conn) == USER
            conn.close()
            with pytest.raises(Exception) as info:  # the driver's own: checked below
                env.connect(plugins="iam", enable_telemetry=True,
                            iam_host=env.cluster.readers[0].endpoint)
    finally:
        telemetry.disable()
        otel.tracer_provider.shutdown()
        otel.meter_provider.shutdown()
    assert driver_for(env.target, None).is_auth_failure(info.value)
    assert len(made) == 3
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("resilient_db"))
    spans = otel.finished()
    assert spans
    exported = repr([(s.name, dict(s.attributes or {}),
                      [(e.name, dict(e.attributes or {})) for e in s.events]) for s in spans])
    assert "auth.credential" in exported and "auth.failed" in exported  # what is checked
    for text in (ours, exported, repr(sink.decisions), str(info.value), repr(info.value)):
        for token in made:
            signature = token.rsplit("X-Amz-Signature=", 1)[1]
            assert token not in text and signature not in text
        assert "X-Amz-Signature" not in text
