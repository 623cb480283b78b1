"""``federated_auth`` and ``okta`` against clusters that enforce IAM (``Cluster.enable_iam``).

The whole flow for real: the local identity provider (``tests/idp.py``) signs the user in,
moto's STS issues temporary credentials for the SAML assertion, the plugin signs an IAM token
with them, and a simulated instance (PostgreSQL through PAM, MariaDB through its PAM plugin
with ``mysql_clear_password``) verifies it. The simulator trusts only the credentials it is
told to: until it trusts those STS issued, the server refuses the token (and the plugin's one
retry with a fresh token is refused too); once it does, the connect succeeds as ``db_user``,
and failover reaches the new writer with a token for that instance signed with the same
temporary credentials (no new sign-in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import CollectingSink
from resilient_db.auth import CREDENTIALS
from resilient_db.auth._federated import STS_CREDENTIALS
from simulator.cluster import Cluster, Timeline
from simulator.iam import TEST_CREDENTIALS, IamCredentials
from tests.aws import aws_env, moto_server
from tests.idp import ADFS_ARN, APP_ID, OKTA_ARN, ROLE_ARN, LocalIdp
from tests.waiting import wait_until

pytestmark = pytest.mark.real_server

IDP_USER = "alice@example.com"
IDP_PASSWORD = "Idp-pa55+word/secret"
DB_USER = "iam_user"
TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)


@pytest.fixture(scope="module")
def idp() -> Iterator[LocalIdp]:
    with LocalIdp({IDP_USER: IDP_PASSWORD}) as server:
        yield server


@pytest.fixture(scope="module")
def sts_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="module", params=["aurora-pg", "aurora-mysql"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Cluster.start(request.param, readers=1, timeline=TIMELINE) as started:
        started.enable_iam(DB_USER, credentials=[TEST_CREDENTIALS])
        if started.flavour.engine != "postgresql":
            # The look-alike topology, for failover's monitor (enable_iam grants the
            # database and SLAVE MONITOR only).
            with started.superuser() as conn:
                cur = conn.cursor()
                cur.execute(f"GRANT SELECT, EXECUTE ON aurora_sim.* TO '{DB_USER}'@'%'")
                cur.close()
        try:
            yield started
        finally:
            resilient_db.shutdown()  # monitors first, then the servers they watch


@pytest.fixture(autouse=True)
def _aws(monkeypatch: pytest.MonkeyPatch, sts_url: str) -> Iterator[None]:
    aws_env(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", sts_url)
    CREDENTIALS.clear()
    STS_CREDENTIALS.clear()
    yield
    CREDENTIALS.clear()
    STS_CREDENTIALS.clear()


def connect(cluster: Cluster, idp: LocalIdp, code: str, **extra: Any) -> Any:
    kwargs = cluster.connect_kwargs()
    kwargs.pop("user", None)
    kwargs.pop("password", None)
    plugin: dict[str, Any] = (
        {"iam_idp_arn": ADFS_ARN} if code == "federated_auth"
        else {"iam_idp_arn": OKTA_ARN, "app_id": APP_ID})
    if cluster.flavour.engine == "postgresql":
        target: Any = psycopg.Connection.connect
        kwargs["connect_timeout"] = 15
    else:
        target = mysql.connector.connect
        kwargs["use_pure"] = True
        kwargs["connection_timeout"] = 15
        kwargs["aurora_mysql_lookalike_schema"] = "aurora_sim"
    extra.setdefault("plugins", code)
    return resilient_db.connect(
        target, idp_endpoint=idp.endpoint, ssl_secure=False, idp_username=IDP_USER,
        idp_password=IDP_PASSWORD, iam_role_arn=ROLE_ARN, db_user=DB_USER, autocommit=True,
        **plugin, **kwargs, **extra)


def trust_issued(cluster: Cluster) -> None:
    """Make the cluster trust the temporary credentials STS issued to this process."""
    cluster.enable_iam(DB_USER, credentials=[
        IamCredentials(c.access_key_id, c.secret_access_key, c.session_token)
        for c in STS_CREDENTIALS._entries.values()])


def current_user(conn: Any) -> str:
    cur = conn.cursor()
    try:
        cur.execute("SELECT current_user")
        row = cur.fetchone()
    finally:
        cur.close()
    return str(row[0]).split("@")[0]


@pytest.mark.parametrize("code", ["federated_auth", "okta"])
def test_token_from_the_identity_provider_logs_in(
        cluster: Cluster, idp: LocalIdp, code: str, sink: CollectingSink) -> None:
    # Not trusted yet: the server refuses the token signed with STS's credentials, and the
    # plugin's single retry with a fresh token (same credentials) is refused as well.
    with pytest.raises((psycopg.OperationalError, mysql.connector.Error)) as refused:
        connect(cluster, idp, code)
    assert IDP_PASSWORD not in str(refused.value)
    kinds = [d.kind for d in sink.decisions if d.plugin == code]
    assert kinds == ["auth.idp_signin", "auth.saml_obtained", "auth.sts_credentials",
                     "auth.credential", "auth.sts_credentials", "auth.retried", "auth.failed"]
    (issued,) = STS_CREDENTIALS._entries.values()
    assert issued.access_key_id.startswith("ASIA")  # temporary credentials from STS

    trust_issued(cluster)
    conn = connect(cluster, idp, code)
    try:
        assert current_user(conn) == DB_USER
    finally:
        conn.close()
    assert STS_CREDENTIALS.sign_ins == 1  # the second connect signed with cached credentials
    assert idp.requests  # the IdP really was asked


def test_failover_reaches_the_new_writer_without_a_new_sign_in(
        cluster: Cluster, idp: LocalIdp, sink: CollectingSink) -> None:
    wait_until("every instance in a role",
               lambda: all(i.role != "stopped" for i in cluster.instances.values()))
    wait_until("readers following the writer", cluster.settled)
    with pytest.raises((psycopg.OperationalError, mysql.connector.Error)):
        connect(cluster, idp, "federated_auth")  # signs in; STS's keys not trusted yet
    trust_issued(cluster)
    conn = connect(cluster, idp, "federated_auth", plugins="failover,efm,federated_auth")
    try:
        assert current_user(conn) == DB_USER
        requests = sum(idp.requests.values())
        old = cluster.writer
        events = cluster.failover()
        new = next(e.instance for e in events if e.name == "promoted")
        assert new is not None and new != old.id
        cur = conn.cursor()
        # Failed over at this statement, or before it when the loss was already known.
        with contextlib.suppress(resilient_db.FailoverSuccessError):
            cur.execute("SELECT 1")
            cur.fetchall()
        cur = conn.cursor()
        cur.execute("SELECT pg_catalog.aurora_db_instance_identifier()"
                    if cluster.flavour.engine == "postgresql"
                    else "SELECT aurora_sim.aurora_server_id()")
        assert cur.fetchone()[0] == new
        assert current_user(conn) == DB_USER
    finally:
        conn.close()
    assert sum(idp.requests.values()) == requests and STS_CREDENTIALS.sign_ins == 1
    new_endpoint = cluster.instance(new).endpoint
    tokens_for_new = [d for d in sink.of_kind("auth.credential")
                      if d.attributes["server.address"] == new_endpoint]
    assert tokens_for_new and tokens_for_new[0].attributes["auth.status"] == "fetched"
    assert sink.of_kind("failover.finished")
    assert not [d for d in sink.of_kind("auth.failed") if d.at > events[0].mono]
