"""The ``iam`` plugin: properties, region from the endpoint (commercial, China, GovCloud), token
format from boto3's local signing, caching per (host, port, user, region), and real servers.

Real-server tests here log in as a *password* user with a stand-in token generator (the token
*is* the password), so what they check is the plugin's plumbing: who gets which credential,
when it is generated again, what monitors and side connections use, how MySQL sends a long
clear-text credential. ``tests/test_iam_real.py`` runs against servers that verify real IAM
tokens."""

from __future__ import annotations

import contextlib
import datetime
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import CollectingSink
from resilient_db._pipeline import ConnectContext, HostSpec
from resilient_db._properties import Settings, lookup
from resilient_db.auth import CREDENTIALS
from resilient_db.drivers import driver_for
from resilient_db.errors import ConfigurationError
from resilient_db.plugins import iam
from resilient_db.plugins.iam import IamPlugin, IamProvider, region_of
from simulator.local import LocalServer
from tests.aws import aws_env
from tests.conftest import Backend

from .waiting import wait_until


@pytest.mark.parametrize(("host", "region"), [
    ("db.cluster-abc123.us-east-1.rds.amazonaws.com", "us-east-1"),
    ("db.cluster-ro-abc123.eu-west-3.rds.amazonaws.com", "eu-west-3"),
    ("inst-1.abc123.ap-southeast-2.rds.amazonaws.com.", "ap-southeast-2"),
    ("inst-1.abc123.rds.cn-north-1.amazonaws.com.cn", "cn-north-1"),
    ("inst-1.abc123.cn-northwest-1.rds.amazonaws.com.cn", "cn-northwest-1"),
    ("db.cluster-abc123.us-gov-west-1.rds.amazonaws.com", "us-gov-west-1"),
    ("db.cluster-abc123.rds.us-gov-east-1.amazonaws.com", "us-gov-east-1"),
    ("px.proxy-abc123.us-east-2.rds.amazonaws.com", "us-east-2"),
    ("localhost", None),
    ("db.example.com", None),
    ("g.global-abc123.global.rds.amazonaws.com", None),
])
def test_region_from_the_endpoint(host: str, region: str | None) -> None:
    assert region_of(host) == region


def _settings(**values: Any) -> Settings:
    parsed = {}
    for name, value in values.items():
        prop = lookup(name)
        assert prop is not None, name
        parsed[prop] = prop.parse(value)
    return Settings(parsed)


def _ctx(host: str = "inst-1.abc123.us-west-2.rds.amazonaws.com", port: int | None = None,
         user: str | None = "iam_user", target: Any = psycopg.Connection.connect,
         **settings: Any) -> ConnectContext:
    args: dict[str, Any] = {"host": host}
    if user is not None:
        args["user"] = user
    return ConnectContext(HostSpec(host, port), args, _settings(**settings),
                          driver_for(target, None), target)


def _provider(ctx: ConnectContext, calls: list[tuple[str, int, str, str]] | None = None
              ) -> IamProvider:
    def generate(host: str, port: int, user: str, region: str) -> str:
        if calls is not None:
            calls.append((host, port, user, region))
        return f"token-for-{host}"
    return IamProvider(ctx.settings, ctx.driver.default_port, generate=generate)


def test_token_target_defaults_and_overrides() -> None:
    ctx = _ctx()
    assert _provider(ctx).target(ctx) == (
        "inst-1.abc123.us-west-2.rds.amazonaws.com", 5432, "iam_user", "us-west-2")
    ctx = _ctx(port=6000, target=mysql.connector.connect)
    assert _provider(ctx).target(ctx)[1] == 6000
    ctx = _ctx(target=mysql.connector.connect)
    assert _provider(ctx).target(ctx)[1] == 3306
    ctx = _ctx(port=6000, iam_host="db.cluster-x.eu-central-1.rds.amazonaws.com",
               iam_default_port=5555, iam_region="us-east-2")
    assert _provider(ctx).target(ctx) == (
        "db.cluster-x.eu-central-1.rds.amazonaws.com", 5555, "iam_user", "us-east-2")
    ctx = _ctx(port=6000, iam_default_port=0)  # 0: unset, as in the AWS wrapper
    assert _provider(ctx).target(ctx)[1] == 6000
    ctx = _ctx(host="localhost", iam_region="us-east-1")
    assert _provider(ctx).target(ctx)[3] == "us-east-1"


@pytest.mark.parametrize(("kwargs", "parameter"), [
    ({"host": "db.example.com"}, "iam_region"),
    ({"host": "10.1.2.3", "iam_region": "us-east-1"}, "iam_host"),
    ({"user": None}, "user"),
])
def test_what_cannot_be_signed_is_a_configuration_error(kwargs: dict[str, Any],
                                                        parameter: str) -> None:
    ctx = _ctx(**kwargs)
    with pytest.raises(ConfigurationError) as info:
        _provider(ctx).target(ctx)
    assert info.value.parameter == parameter
    assert parameter in str(info.value)


@pytest.mark.parametrize(("name", "value"), [
    ("iam_region", "useast1"), ("iam_region", "US-EAST-1"), ("iam_host", "h:5432"),
    ("iam_host", "https://h"), ("iam_expiration", 901), ("iam_expiration", 0),
    ("iam_default_port", 70000), ("iam_default_port", -1),
])
def test_bad_properties_are_refused(name: str, value: Any) -> None:
    prop = lookup(name)
    assert prop is not None
    with pytest.raises(ConfigurationError) as info:
        prop.parse(value)
    assert info.value.parameter == name


def test_expiration_and_early_refresh() -> None:
    ctx = _ctx()
    assert _provider(ctx).expiration == 870.0 and _provider(ctx).refresh_before == 60.0
    ctx = _ctx(iam_expiration=10)
    assert _provider(ctx).expiration == 10.0 and _provider(ctx).refresh_before == 1.0


def test_credential_is_a_clear_text_token_keyed_per_host_port_user_region() -> None:
    ctx = _ctx(port=5432)
    provider = _provider(ctx)
    credential = provider.fetch(ctx)
    assert credential.clear_text and credential.user is None and credential.source == "iam"
    assert provider.key(ctx) == ("iam", "inst-1.abc123.us-west-2.rds.amazonaws.com", 5432,
                                 "iam_user", "us-west-2")
    assert "token-for" not in repr(credential)


def test_boto3_token_is_a_presigned_connect_request(monkeypatch: pytest.MonkeyPatch) -> None:
    aws_env(monkeypatch)
    iam.forget_clients()
    host = "inst-1.abc123.rds.cn-north-1.amazonaws.com.cn"
    token = iam.boto3_token(host, 3306, "iam_user", "cn-north-1")
    assert token.startswith(f"{host}:3306/?")
    query = urllib.parse.parse_qs(token.split("?", 1)[1])
    assert query["Action"] == ["connect"] and query["DBUser"] == ["iam_user"]
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["900"]
    assert query["X-Amz-Credential"][0].endswith("/cn-north-1/rds-db/aws4_request")
    assert len(token) > 255  # what MySQL must send length-encoded
    iam.forget_clients()


def test_mysql_sends_a_long_clear_text_token_length_encoded() -> None:
    """mysql-connector's pure-Python handshake response with mysql_clear_password and a
    1,500-byte token: the auth response is a length-encoded string (not the one-byte length
    of old clients that caps it at 255), followed intact by the database name."""
    from mysql.connector import constants, utils
    from mysql.connector.protocol import MySQLProtocol

    token = "h.example:3306/?Action=connect&" + "x" * 1470
    handshake: Any = {"capabilities": constants.ClientFlag.get_default()
                      | constants.ClientFlag.PLUGIN_AUTH_LENENC_CLIENT_DATA,
                      "auth_data": b"a" * 20, "auth_plugin": "mysql_clear_password"}
    flags = constants.ClientFlag.get_default() | constants.ClientFlag.CONNECT_WITH_DB
    assert flags & constants.ClientFlag.PLUGIN_AUTH_LENENC_CLIENT_DATA
    packet, _ = MySQLProtocol.make_auth(handshake, "iam_user", token, "appdb", 45, flags,
                                        auth_plugin="mysql_clear_password", ssl_enabled=True)
    rest = bytes(packet)[32:]  # flags, max packet, charset, 23 filler bytes
    user, rest = rest.split(b"\x00", 1)
    assert user == b"iam_user"
    rest, length = utils.read_lc_int(rest)
    assert length == len(token) + 1  # the token and its terminating NUL
    assert rest[:length] == token.encode() + b"\x00"
    assert rest[length:].startswith(b"appdb\x00")


# --- real servers: a password user, the generator returns the current password ------------------

class PasswordTokens:
    """A stand-in token generator: returns the server password of the moment, counting calls
    per (host, port, user, region)."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.calls: list[tuple[str, int, str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int, user: str, region: str) -> str:
        with self.lock:
            self.calls.append((host, port, user, region))
            return self.password


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> Iterator[PasswordTokens]:
    CREDENTIALS.clear()
    generator = PasswordTokens("")
    monkeypatch.setattr(IamPlugin, "generate", generator)
    yield generator
    CREDENTIALS.clear()


def _tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for a test server (readable by its user)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "resilient-db-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    directory.chmod(0o755)
    cert_path.chmod(0o644)
    key_path.chmod(0o644)
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_mysql_server() -> Iterator[LocalServer]:
    """A MariaDB server with TLS (mysql-connector sends mysql_clear_password only over TLS).
    The certificate lives outside pytest's private temporary directory: the server runs as
    its own user."""
    directory = Path(tempfile.mkdtemp(prefix="resilient_db_tls_"))
    try:
        cert, key = _tls_files(directory)
        server = LocalServer.create("mariadb", "mysql", settings={
            "ssl_cert": str(cert), "ssl_key": str(key)})
        try:
            server.start()
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


LONG_PASSWORD = "L" * 1200


def _mysql_user(server: LocalServer, user: str, password: str) -> None:
    conn = mysql.connector.connect(**server.connect_kwargs(), use_pure=True, autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute(f"CREATE OR REPLACE USER '{user}'@'%' IDENTIFIED BY '{password}'")
        cur.execute(f"GRANT ALL ON *.* TO '{user}'@'%'")
        cur.close()
    finally:
        conn.close()


#: Local servers are reached by address; a token names a host (iam_host stands in for one).
NAME = "db.cluster-abc123.us-east-1.rds.amazonaws.com"


def _kwargs(server: LocalServer, user: str | None = None) -> dict[str, Any]:
    kwargs = {k: v for k, v in server.connect_kwargs().items() if k != "password"}
    kwargs["iam_host"] = NAME
    if user is not None:
        kwargs["user"] = user
    return kwargs


def test_mysql_long_clear_text_token_over_tls(tls_mysql_server: LocalServer,
                                              tokens: PasswordTokens) -> None:
    _mysql_user(tls_mysql_server, "longpw", LONG_PASSWORD)
    tokens.password = LONG_PASSWORD
    conn = resilient_db.connect(mysql.connector.connect, plugins="iam", use_pure=True,
                                **_kwargs(tls_mysql_server, "longpw"))
    try:
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone()[0].startswith("longpw@")
        cur.execute("SHOW STATUS LIKE 'Ssl_cipher'")
        assert cur.fetchone()[1]  # the token went over TLS
    finally:
        conn.close()
    assert len(tokens.calls) == 1


def test_mysql_clear_text_without_tls_is_the_driver_error(mysql_backend: Backend,
                                                          tokens: PasswordTokens) -> None:
    tokens.password = mysql_backend.server.password
    with pytest.raises(mysql.connector.Error, match=r"insecure channels|requires SSL"):
        resilient_db.connect(mysql.connector.connect, plugins="iam", use_pure=True,
                             **_kwargs(mysql_backend.server))


def test_tokens_are_cached_per_host_and_regenerated_after_expiry(
        pg_backend: Backend, tokens: PasswordTokens, sink: CollectingSink) -> None:
    tokens.password = pg_backend.server.password
    kwargs = _kwargs(pg_backend.server)
    for _ in range(3):
        resilient_db.connect(psycopg.Connection.connect, plugins="iam", iam_expiration=1,
                             **kwargs).close()
    assert len(tokens.calls) == 1
    assert [d.attributes["auth.status"] for d in sink.of_kind("auth.credential")] == [
        "fetched", "cached", "cached"]
    port = int(kwargs["port"])
    assert tokens.calls[0] == (NAME, port, kwargs["user"], "us-east-1")
    cached = CREDENTIALS.peek(("iam", NAME, port, kwargs["user"], "us-east-1"))
    assert cached is not None and cached.expires_at is not None
    expires = cached.expires_at
    wait_until("the token expired", lambda: time.time() > expires, timeout=10)
    resilient_db.connect(psycopg.Connection.connect, plugins="iam", iam_expiration=1,
                         **kwargs).close()
    assert len(tokens.calls) == 2
    assert sink.of_kind("auth.credential")[-1].attributes["auth.status"] == "refreshed"


# --- monitors and side connections get a current token ---------------------------------------

_users = iter(range(10**6))


@dataclass
class Rotating:
    """A database user whose password (= its "token") the test rotates."""

    engine: str  # "pg" | "mysql"
    server: LocalServer
    user: str
    target: Any
    extra: dict[str, Any]

    def admin(self, sql: str) -> list[tuple[Any, ...]]:
        kwargs: dict[str, Any] = dict(self.server.connect_kwargs())
        if self.engine == "pg":
            conn: Any = psycopg.connect(**kwargs, autocommit=True)
        else:
            conn = mysql.connector.connect(**kwargs, use_pure=True, autocommit=True)
        try:
            cur = conn.cursor()
            cur.execute(sql)
            rows = list(cur.fetchall()) if cur.description else []
            cur.close()
            return rows
        finally:
            conn.close()

    def set_password(self, password: str) -> None:
        if self.engine == "pg":
            self.admin(f"ALTER ROLE {self.user} PASSWORD '{password}'")
        else:
            self.admin(f"ALTER USER '{self.user}'@'%' IDENTIFIED BY '{password}'")

    def kill_sessions(self, keep: int | None = None) -> None:
        """End this user's sessions (the probe's), except the one with id ``keep``."""
        if self.engine == "pg":
            self.admin(f"SELECT pg_catalog.pg_terminate_backend(pid) FROM "
                       f"pg_catalog.pg_stat_activity WHERE usename = '{self.user}' AND "
                       f"pid <> {keep or 0}")
        else:
            for (session,) in self.admin(
                    f"SELECT id FROM information_schema.processlist WHERE user = "
                    f"'{self.user}' AND id <> {keep or 0}"):
                with contextlib.suppress(mysql.connector.Error):
                    self.admin(f"KILL {int(session)}")

    def sessions(self) -> int:
        sql = (f"SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE usename = '{self.user}'"
               if self.engine == "pg" else
               f"SELECT count(*) FROM information_schema.processlist WHERE user = '{self.user}'")
        return int(self.admin(sql)[0][0])

    def connect(self, **extra: Any) -> resilient_db.ConnectionProxy:
        kwargs = {**_kwargs(self.server, self.user), **self.extra, **extra}
        return resilient_db.connect(self.target, **kwargs)


@pytest.fixture(params=["pg", "mysql"])
def rotating(request: pytest.FixtureRequest) -> Iterator[Rotating]:
    user = f"rot{next(_users)}_{int(time.time())}"
    if request.param == "pg":
        server: LocalServer = request.getfixturevalue("pg_backend").server
        env = Rotating("pg", server, user, psycopg.Connection.connect, {})
        env.admin(f"CREATE ROLE {user} LOGIN PASSWORD 'p1'")
    else:
        server = request.getfixturevalue("tls_mysql_server")
        env = Rotating("mysql", server, user, mysql.connector.connect, {"use_pure": True})
        env.admin(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'p1'")
        env.admin(f"GRANT ALL ON *.* TO '{user}'@'%'")
    yield env
    resilient_db.shutdown()  # efm monitors of this user's connections
    env.kill_sessions()


def _session_id(env: Rotating, conn: resilient_db.ConnectionProxy) -> int:
    cur = conn.cursor()
    cur.execute("SELECT pg_catalog.pg_backend_pid()" if env.engine == "pg"
                else "SELECT CONNECTION_ID()")
    row = cur.fetchone()
    cur.close()
    return int(row[0])


def _expire_and_rotate(env: Rotating, tokens: PasswordTokens) -> None:
    """The password changes (the old "token" is refused from now on) and the cached token
    expires."""
    env.set_password("p2")
    tokens.password = "p2"
    key = ("iam", NAME, env.server.port, env.user, "us-east-1")
    cached = CREDENTIALS.peek(key)
    assert cached is not None and cached.expires_at is not None
    expires = cached.expires_at
    wait_until("the cached token expired", lambda: time.time() > expires, timeout=10)


def test_efm_probe_after_token_expiry_authenticates(rotating: Rotating, tokens: PasswordTokens,
                                                    sink: CollectingSink) -> None:
    """The efm monitor's probe connection is opened again after the application's token
    expired and the old one stopped working: it gets a new token through the connection's
    chain and authenticates; the host is not declared dead."""
    env = rotating
    resilient_db.shutdown()  # no monitor (and probe connection) left from another test
    tokens.password = "p1"
    conn = env.connect(plugins="efm,iam", iam_expiration=1, failure_detection_time_ms=100,
                       failure_detection_interval_ms=200, failure_detection_count=10,
                       autocommit=True)
    try:
        app_session = _session_id(env, conn)
        wait_until("the probe connection is open", lambda: env.sessions() >= 2)
        _expire_and_rotate(env, tokens)
        env.kill_sessions(keep=app_session)  # the probe's session: it must reconnect
        cur = conn.cursor()
        cur.execute("SELECT pg_catalog.pg_sleep(3)" if env.engine == "pg" else "SELECT SLEEP(3)")
        cur.fetchall()
        assert env.sessions() >= 2  # the probe reconnected, as the new password's user
    finally:
        conn.close()
    assert not sink.of_kind("efm.host_down")
    assert not sink.of_kind("auth.retried")  # not a refusal: expiry gave a new token
    statuses = [d.attributes["auth.status"] for d in sink.of_kind("auth.credential")]
    assert "refreshed" in statuses
    assert tokens.calls.count((NAME, env.server.port, env.user, "us-east-1")) >= 2


def test_kill_query_side_connection_after_token_expiry_authenticates(
        tls_mysql_server: LocalServer, tokens: PasswordTokens, sink: CollectingSink) -> None:
    """MySQL cancels an expired statement with KILL QUERY on a side connection: it gets a
    current token (the one the application's connection used has expired and no longer
    works), so the statement is cancelled on the server."""
    user = f"kq{next(_users)}_{int(time.time())}"
    env = Rotating("mysql", tls_mysql_server, user, mysql.connector.connect, {"use_pure": True})
    env.admin(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'p1'")
    env.admin(f"GRANT ALL ON *.* TO '{user}'@'%'")
    tokens.password = "p1"
    conn = env.connect(plugins="iam", iam_expiration=1, autocommit=True)
    try:
        _expire_and_rotate(env, tokens)
        cur = conn.cursor()
        with resilient_db.call_options(timeout=0.5), pytest.raises(
                resilient_db.QueryTimeoutError) as info:
            cur.execute("SELECT SLEEP(30)")
            cur.fetchall()
        assert info.value.cancelled is True
    finally:
        conn.close()
        env.kill_sessions()
    expired = sink.of_kind("statement.deadline_expired")
    assert expired and expired[-1].attributes["resilient_db.deadline.cancelled"] is True
    assert tokens.calls.count((NAME, tls_mysql_server.port, user, "us-east-1")) == 2


def test_no_aws_credentials_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    iam.forget_clients()
    try:
        with pytest.raises(ConfigurationError, match="no AWS credentials"):
            iam.boto3_token(NAME, 5432, "iam_user", "us-east-1")
    finally:
        iam.forget_clients()


def test_the_cache_starts_empty_in_a_forked_child() -> None:
    import os

    clock_provider = _provider(_ctx())
    CREDENTIALS.clear()
    ctx = _ctx()
    CREDENTIALS.get(clock_provider, ctx)
    assert CREDENTIALS.peek(clock_provider.key(ctx)) is not None
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when its cache is empty
        os._exit(0 if CREDENTIALS.peek(clock_provider.key(ctx)) is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert CREDENTIALS.peek(clock_provider.key(ctx)) is not None  # the parent's stays
    CREDENTIALS.clear()
