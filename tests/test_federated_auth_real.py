"""``federated_auth`` and ``okta`` against servers that enforce IAM (``Cluster.enable_iam``).

The whole flow for real: the local identity provider (``tests/idp.py``) signs the user in,
moto's STS issues temporary credentials for the SAML assertion, the plugin signs an IAM token
with them, and a simulated instance (PostgreSQL through PAM, MariaDB through its PAM plugin
with ``mysql_clear_password``) verifies it. The simulator trusts only the credentials it is
told to: until it trusts those STS issued, the server refuses the token (and the plugin's one
retry with a fresh token is refused too); once it does, the connect succeeds as ``db_user``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import CollectingSink
from resilient_db.auth import CREDENTIALS
from resilient_db.auth._federated import STS_CREDENTIALS
from simulator.cluster import Cluster
from simulator.iam import TEST_CREDENTIALS, IamCredentials
from tests.aws import aws_env, moto_server
from tests.idp import ADFS_ARN, APP_ID, OKTA_ARN, ROLE_ARN, LocalIdp

pytestmark = pytest.mark.real_server

IDP_USER = "alice@example.com"
IDP_PASSWORD = "Idp-pa55+word/secret"
DB_USER = "iam_user"


@pytest.fixture(scope="module")
def idp() -> Iterator[LocalIdp]:
    with LocalIdp({IDP_USER: IDP_PASSWORD}) as server:
        yield server


@pytest.fixture(scope="module")
def sts_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="module", params=["rds-pg", "rds-mysql"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Cluster.start(request.param) as started:
        started.enable_iam(DB_USER, credentials=[TEST_CREDENTIALS])
        yield started


@pytest.fixture(autouse=True)
def _aws(monkeypatch: pytest.MonkeyPatch, sts_url: str) -> Iterator[None]:
    aws_env(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", sts_url)
    CREDENTIALS.clear()
    STS_CREDENTIALS.clear()
    yield
    CREDENTIALS.clear()
    STS_CREDENTIALS.clear()


def connect(cluster: Cluster, idp: LocalIdp, code: str) -> Any:
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
    return resilient_db.connect(
        target, plugins=code, idp_endpoint=idp.endpoint, ssl_secure=False,
        idp_username=IDP_USER, idp_password=IDP_PASSWORD, iam_role_arn=ROLE_ARN,
        db_user=DB_USER, **plugin, **kwargs)


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

    cluster.enable_iam(DB_USER, credentials=[IamCredentials(
        issued.access_key_id, issued.secret_access_key, issued.session_token)])
    conn = connect(cluster, idp, code)
    try:
        assert current_user(conn) == DB_USER
    finally:
        conn.close()
    assert STS_CREDENTIALS.sign_ins == 1  # the second connect signed with cached credentials
    assert idp.requests  # the IdP really was asked
