"""The ``aws_secrets_manager`` plugin against real servers (PostgreSQL and MariaDB, password
authentication enforced) and moto in server mode (a real Secrets Manager HTTP endpoint):
connecting with the secret, the cache, the secret's region from its ARN, configurable key
names, the rotation under load (put_secret_value and ALTER the password while threads
connect and write: one retried connect, no error, nothing lost), and clear errors (missing
secret, not JSON, key missing, access denied) that never contain the secret."""

from __future__ import annotations

import json
import logging
import pickle
import secrets
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db.auth import CREDENTIALS
from resilient_db.errors import ConfigurationError
from resilient_db.plugins import aws_secrets_manager as sm
from resilient_db.plugins.aws_secrets_manager import SecretError, region_of_arn

from .aws import aws_env, moto_server
from .conftest import Backend
from .waiting import wait_until

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@dataclass
class Aws:
    """The moto server and a Secrets Manager client on it (the test's side)."""

    url: str
    client: Any

    def secret(self, value: Any, *, name: str | None = None) -> tuple[str, str]:
        """Create a secret (a dict is stored as JSON, a str as is, bytes as SecretBinary);
        returns (name, ARN)."""
        name = name or f"db-{secrets.token_hex(4)}"
        if isinstance(value, bytes):
            made = self.client.create_secret(Name=name, SecretBinary=value)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            made = self.client.create_secret(Name=name, SecretString=text)
        return name, str(made["ARN"])

    def rotate(self, name: str, value: dict[str, str]) -> None:
        self.client.put_secret_value(SecretId=name, SecretString=json.dumps(value))

    def props(self, secret_id: str, **extra: Any) -> dict[str, Any]:
        return {"plugins": "aws_secrets_manager", "secrets_manager_secret_id": secret_id,
                "secrets_manager_region": REGION, "secrets_manager_endpoint": self.url,
                **extra}


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Aws]:
    aws_env(monkeypatch)
    sm.clear_clients()
    sm.clear_refused()
    CREDENTIALS.clear()
    yield Aws(moto_url, boto3.client("secretsmanager", region_name=REGION,
                                     endpoint_url=moto_url))
    sm.clear_clients()
    sm.clear_refused()
    CREDENTIALS.clear()


# --- database side: a login role per test, its password changed with ALTER ---------------------


@dataclass
class Db:
    backend: Backend
    users: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.backend.name

    def run(self, *statements: str) -> None:
        conn = self.backend.raw(autocommit=True)
        try:
            cur = conn.cursor()
            for statement in statements:
                cur.execute(statement)
            cur.close()
        finally:
            conn.close()

    def create_user(self) -> tuple[str, str]:
        user, password = f"sm_{secrets.token_hex(4)}", secrets.token_urlsafe(16)
        if self.name == "pg":
            self.run(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        else:
            database = self.backend.kwargs["database"]
            # Logging in with a default database needs a privilege on it.
            self.run(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'",
                     f"GRANT SELECT ON `{database}`.* TO '{user}'@'%'")
        self.users.append(user)
        return user, password

    def set_password(self, user: str, password: str) -> None:
        if self.name == "pg":
            self.run(f"ALTER ROLE {user} PASSWORD '{password}'")
        else:
            self.run(f"ALTER USER '{user}'@'%' IDENTIFIED BY '{password}'")

    def table(self, user: str) -> str:
        name = f"sm_{secrets.token_hex(4)}"
        self.run(f"CREATE TABLE {name} (id bigint primary key, thread int)",
                 f"GRANT SELECT, INSERT ON {name} TO "
                 + (user if self.name == "pg" else f"'{user}'@'%'"))
        return name

    def ids(self, table: str) -> set[int]:
        conn = self.backend.raw(autocommit=True)
        try:
            cur = conn.cursor()
            cur.execute(f"SELECT id FROM {table}")
            return {int(row[0]) for row in cur.fetchall()}
        finally:
            conn.close()

    def server_kwargs(self) -> dict[str, Any]:
        """Where the server is, without a user or password (the secret gives both)."""
        kwargs = {k: v for k, v in self.backend.kwargs.items() if k not in ("user", "password")}
        return {**kwargs, "connect_timeout": 10}

    def connect(self, aws: Aws, secret_id: str, **extra: Any) -> resilient_db.ConnectionProxy:
        return resilient_db.connect(self.backend.target,
                                    **{**self.server_kwargs(), "autocommit": True,
                                       **aws.props(secret_id), **extra})

    def current_user(self, conn: resilient_db.ConnectionProxy) -> str:
        cur = conn.cursor()
        cur.execute("SELECT current_user" if self.name == "pg" else "SELECT CURRENT_USER()")
        row = cur.fetchone()
        cur.close()
        assert row is not None
        return str(row[0]).split("@")[0]

    def drop_users(self) -> None:
        for user in self.users:
            try:
                if self.name == "pg":
                    self.run(f"DROP OWNED BY {user}", f"DROP ROLE {user}")
                else:
                    self.run(f"DROP USER '{user}'@'%'")
            except Exception:  # best effort: a test's tables keep the role alive
                logging.getLogger("tests").debug("cannot drop %s", user, exc_info=True)


@pytest.fixture
def db(backend: Backend) -> Iterator[Db]:
    found = Db(backend)
    yield found
    found.drop_users()


def kinds(sink: resilient_db.CollectingSink, kind: str) -> list[Any]:
    return [d for d in sink.decisions if d.kind == kind]


# --- configuration (no server, no AWS call) ----------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("arn", "region"), [
    ("arn:aws:secretsmanager:us-east-2:123456789012:secret:prod/db-AbCdEf", "us-east-2"),
    ("arn:aws-cn:secretsmanager:cn-north-1:123456789012:secret:db-AbCdEf", "cn-north-1"),
    ("arn:aws-us-gov:secretsmanager:us-gov-west-1:123456789012:secret:db-AbCdEf",
     "us-gov-west-1"),
    ("prod/db", None),
    ("arn:aws:rds:us-east-2:123456789012:db:prod", None),
])
def test_region_of_arn(arn: str, region: str | None) -> None:
    assert region_of_arn(arn) == region


def _connect_nowhere(**props: Any) -> None:
    """A connect whose configuration fails before any I/O (the port is closed)."""
    resilient_db.connect(psycopg.Connection.connect, host="127.0.0.1", port=9, dbname="x",
                         **{"plugins": "aws_secrets_manager", **props})


@pytest.mark.unit
def test_configuration_errors_name_the_property() -> None:
    with pytest.raises(ConfigurationError, match="needs secrets_manager_secret_id") as info:
        _connect_nowhere()
    assert info.value.parameter == "secrets_manager_secret_id"
    with pytest.raises(ConfigurationError, match="set secrets_manager_region") as info:
        _connect_nowhere(secrets_manager_secret_id="prod/db")
    assert info.value.parameter == "secrets_manager_region"
    arn = "arn:aws:secretsmanager:us-east-2:123456789012:secret:prod/db-AbCdEf"
    with pytest.raises(ConfigurationError, match="differs from the region of the secret"):
        _connect_nowhere(secrets_manager_secret_id=arn, secrets_manager_region="eu-west-1")
    with pytest.raises(ConfigurationError, match="'secrets_manager_region'"):
        _connect_nowhere(secrets_manager_secret_id="prod/db", secrets_manager_region="Ohio")
    with pytest.raises(ConfigurationError, match="'secrets_manager_endpoint'"):
        _connect_nowhere(secrets_manager_secret_id="prod/db", secrets_manager_region=REGION,
                         secrets_manager_endpoint="localhost:4566")
    with pytest.raises(ConfigurationError, match="'secrets_manager_secret_username_key'"):
        _connect_nowhere(secrets_manager_secret_id="prod/db", secrets_manager_region=REGION,
                         secrets_manager_secret_username_key=" ")


@pytest.mark.unit
def test_expiration_property() -> None:
    from resilient_db._params import SECRETS_MANAGER_EXPIRATION

    prop = SECRETS_MANAGER_EXPIRATION
    assert prop.default == 365 * 86400 and prop.default_text() == "31536000"
    assert prop.parse("500") == 500.0 and prop.parse(0) == 0.0
    # The AWS wrapper reads a negative value as a year (its default): refused, with that hint.
    with pytest.raises(ConfigurationError, match="negative value means a year, the default"):
        prop.parse(-1)
    with pytest.raises(ConfigurationError, match="secrets_manager_expiration"):
        prop.parse("soon")


# --- connecting with the secret ---------------------------------------------------------------


@pytest.mark.real_server
def test_connects_with_the_secret(db: Db, aws: Aws, sink: resilient_db.CollectingSink,
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    user, password = db.create_user()
    name, _ = aws.secret({"username": user, "password": password, "engine": db.name})
    # The secret wins over a user and password the application gave.
    conn = db.connect(aws, name, user="nobody", password="wrong")
    assert db.current_user(conn) == user
    conn.close()
    conn = db.connect(aws, name)
    assert db.current_user(conn) == user
    conn.close()
    statuses = [d.attributes["auth.status"] for d in kinds(sink, "auth.credential")]
    assert statuses == ["fetched", "cached"]  # one GetSecretValue for both connects
    first = kinds(sink, "auth.credential")[0].attributes
    assert first["auth.source"] == "aws_secrets_manager" and first["db.user"] == user
    assert CREDENTIALS.fetches == 1
    _assert_not_leaked(password, sink)
    assert "fetched secret" in caplog.text and password not in caplog.text
    plugin = conn.resilient.plugin("aws_secrets_manager")
    assert plugin is not None and password not in repr(plugin)


@pytest.mark.real_server
def test_secret_arn_gives_the_region(db: Db, aws: Aws) -> None:
    user, password = db.create_user()
    _, arn = aws.secret({"username": user, "password": password})
    assert region_of_arn(arn) == REGION
    props = aws.props(arn)
    del props["secrets_manager_region"]
    conn = resilient_db.connect(db.backend.target, **db.server_kwargs(), **props)
    assert db.current_user(conn) == user
    conn.close()


@pytest.mark.real_server
def test_custom_key_names(db: Db, aws: Aws) -> None:
    user, password = db.create_user()
    name, _ = aws.secret({"db_login": user, "db_pass": password})
    conn = db.connect(aws, name, secrets_manager_secret_username_key="db_login",
                      secrets_manager_secret_password_key="db_pass")
    assert db.current_user(conn) == user
    conn.close()
    # The default key names are not in this secret: a clear error naming the property and
    # the keys the secret has, without their values.
    with pytest.raises(SecretError) as info:
        db.connect(aws, name)
    message = str(info.value)
    assert "no key 'username'" in message and "db_login, db_pass" in message
    assert info.value.parameter == "secrets_manager_secret_username_key"
    assert isinstance(info.value, ConfigurationError)
    assert password not in message and password not in repr(info.value)
    with pytest.raises(SecretError, match="no key 'pass'") as info:
        db.connect(aws, name, secrets_manager_secret_username_key="db_login",
                   secrets_manager_secret_password_key="pass")
    assert info.value.parameter == "secrets_manager_secret_password_key"


@pytest.mark.real_server
def test_expiration_zero_fetches_on_every_connect(db: Db, aws: Aws) -> None:
    user, password = db.create_user()
    name, _ = aws.secret({"username": user, "password": password})
    for _ in range(3):
        db.connect(aws, name, secrets_manager_expiration=0).close()
    assert CREDENTIALS.fetches == 3


# --- errors that name the secret, never its content -------------------------------------------


@pytest.mark.real_server
def test_missing_secret(aws: Aws, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SecretError) as info:
        _connect_nowhere(**aws.props("no/such-secret"))
    message = str(info.value)
    assert "secret 'no/such-secret' in region us-east-1" in message
    assert "does not exist" in message and "secrets_manager_secret_id" in message
    assert info.value.parameter == "secrets_manager_secret_id"
    _assert_unchained(info.value)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is SecretError and str(copy) == message


@pytest.mark.real_server
@pytest.mark.parametrize("content", [
    "user=admin password=hunter2-in-plain-text",     # not JSON
    '["hunter2-in-a-list"]',                          # JSON, not an object
    b"hunter2-binary",                                # SecretBinary
    '{"username": "admin", "password": 12345678}',    # not a string
])
def test_unusable_secret(aws: Aws, content: str | bytes,
                         caplog: pytest.LogCaptureFixture) -> None:
    name, _ = aws.secret(content)
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    with pytest.raises(SecretError) as info:
        _connect_nowhere(**aws.props(name))
    assert f"secret {name!r}" in str(info.value)
    for text in ("hunter2", "12345678"):
        assert text not in str(info.value) and text not in repr(info.value)
        assert text not in caplog.text
    # No chained exception carries the document (a JSONDecodeError holds all of it).
    _assert_unchained(info.value)


def _assert_unchained(exc: BaseException) -> None:
    """No chained exception shows in a traceback (botocore's or json's could carry the
    response or the whole document)."""
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def _moto_auth(url: str, count: str) -> None:
    # text/plain: a form content type would leave the body to Flask's form parser.
    request = urllib.request.Request(f"{url}/moto-api/reset-auth", data=count.encode(),
                                     headers={"Content-Type": "text/plain"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.mark.real_server
def test_access_denied(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto with IAM enforced: an identity without secretsmanager:GetSecretValue is refused;
    once a policy grants it, the same identity reads the secret."""
    iam = boto3.client("iam", region_name=REGION, endpoint_url=aws.url)
    name, _ = aws.secret({"username": "a", "password": "hidden-pw"})
    user = f"reader-{secrets.token_hex(3)}"
    iam.create_user(UserName=user)

    def allow(policy: str, action: str) -> None:
        iam.put_user_policy(UserName=user, PolicyName=policy, PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]}))

    allow("describe-only", "secretsmanager:DescribeSecret")
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    sm.clear_clients()
    _moto_auth(aws.url, "0")
    try:
        with pytest.raises(SecretError) as info:
            _connect_nowhere(**aws.props(name))
        message = str(info.value)
        assert "was denied (AccessDenied" in message, message
        assert "secretsmanager:GetSecretValue" in message and "hidden-pw" not in message
        _assert_unchained(info.value)
        _moto_auth(aws.url, "inf")  # the test's own IAM client has no identity in moto
        allow("read", "secretsmanager:GetSecretValue")
        _moto_auth(aws.url, "0")
        # Now the secret is read; the closed port refuses the database connect itself.
        with pytest.raises(Exception) as other:
            _connect_nowhere(**aws.props(name))
        assert not isinstance(other.value, SecretError), other.value
        assert CREDENTIALS.peek(next(iter(CREDENTIALS._entries))) is not None
    finally:
        _moto_auth(aws.url, "inf")


# --- rotation ---------------------------------------------------------------------------------


@pytest.mark.real_server
def test_wrong_password_retries_once_then_fails(db: Db, aws: Aws,
                                                sink: resilient_db.CollectingSink) -> None:
    """A secret the server refuses: one refetch and retry, then the driver's own error; the
    refused credential is not kept, so the corrected secret is used by the next connect."""
    user, password = db.create_user()
    name, _ = aws.secret({"username": user, "password": "not-the-password"})
    # The driver's own error, untouched (mysql-connector raises 1045 as ProgrammingError).
    refused = psycopg.OperationalError if db.name == "pg" else mysql.connector.Error
    with pytest.raises(refused) as info:
        db.connect(aws, name)
    assert not isinstance(info.value, resilient_db.Error)
    assert "not-the-password" not in str(info.value)
    assert len(kinds(sink, "auth.retried")) == 1 and len(kinds(sink, "auth.failed")) == 1
    aws.rotate(name, {"username": user, "password": password})
    conn = db.connect(aws, name)
    assert db.current_user(conn) == user
    conn.close()
    assert CREDENTIALS.fetches == 3  # first, the retry's refetch, and after the fix
    _assert_not_leaked(password, sink)
    _assert_not_leaked("not-the-password", sink)


@dataclass
class Workload:
    """``threads`` application threads, each opening a connection per write (every write
    is a physical connect that needs the secret), until stopped."""

    db: Db
    aws: Aws
    secret: str
    table: str
    threads: int = 4
    acked: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(n + 1,), daemon=True)
            self.workers.append(worker)
            worker.start()

    def _run(self, thread: int) -> None:
        sequence = 0
        while not self.stop.is_set():
            sequence += 1
            write_id = thread * 1_000_000 + sequence
            try:
                conn = self.db.connect(self.aws, self.secret)
                try:
                    cur = conn.cursor()
                    cur.execute(f"INSERT INTO {self.table} (id, thread) VALUES (%s, %s)",
                                (write_id, thread))
                    cur.close()
                finally:
                    conn.close()
            except Exception as exc:
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self.stop.wait(0.05)
                continue
            with self.lock:
                self.acked.add(write_id)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def finish(self) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(60)
        assert not any(w.is_alive() for w in self.workers), "a workload thread is stuck"


@pytest.mark.real_server
def test_rotation_under_load(db: Db, aws: Aws, sink: resilient_db.CollectingSink) -> None:
    """Threads connect and write continuously; the secret is rotated (put_secret_value) and
    the password changed on the server (ALTER) while they run. The first connect with the
    cached old password is refused, refetches the secret and succeeds: the application sees
    no error, every acknowledged write is in the table."""
    user, password = db.create_user()
    table = db.table(user)
    name, _ = aws.secret({"username": user, "password": password})
    load = Workload(db, aws, name, table)
    load.start()
    try:
        wait_until("writes before the rotation", lambda: load.count() >= 20, timeout=60)
        new_password = secrets.token_urlsafe(16)
        aws.rotate(name, {"username": user, "password": new_password})
        db.set_password(user, new_password)
        rotated_at = load.count()
        wait_until("writes after the rotation", lambda: load.count() >= rotated_at + 40,
                   timeout=60)
    finally:
        load.finish()
    assert load.errors == []
    assert load.acked <= db.ids(table)  # nothing acknowledged is missing
    retried = kinds(sink, "auth.retried")
    # At least one connect met the new server password with the cached old secret (the
    # rotation really happened under the workload); each thread retries at most once.
    assert 1 <= len(retried) <= load.threads, len(retried)
    assert kinds(sink, "auth.failed") == []
    assert all(d.attributes["auth.status"] in ("refreshed", "cached", "fetched")
               for d in retried)
    # One fetch before, one (or one per thread that raced to refetch) after the rotation.
    assert 2 <= CREDENTIALS.fetches <= 1 + load.threads
    _assert_not_leaked(password, sink)
    _assert_not_leaked(new_password, sink)


def _assert_not_leaked(secret: str, sink: resilient_db.CollectingSink) -> None:
    for decision in sink.decisions:
        assert secret not in repr(decision), decision
    cached = [CREDENTIALS.peek(k) for k in list(CREDENTIALS._entries)]
    for credential in cached:
        assert secret not in repr(credential) and secret not in str(credential)



@pytest.mark.real_server
def test_rotation_window_bridged_with_the_pending_version(
        db: Db, aws: Aws, sink: resilient_db.CollectingSink) -> None:
    """AWS's rotation functions set the new password on the database while it is still the
    secret's AWSPENDING version, and make it AWSCURRENT only after testing it. In that window
    the refetched AWSCURRENT holds the refused password: the plugin uses AWSPENDING, so the
    application sees no error during the window or after the rotation finishes."""
    user, password = db.create_user()
    table = db.table(user)
    name, _ = aws.secret({"username": user, "password": password})
    old_version = next(v for v, stages in aws.client.describe_secret(SecretId=name)
                       ["VersionIdsToStages"].items() if "AWSCURRENT" in stages)
    load = Workload(db, aws, name, table)
    load.start()
    try:
        wait_until("writes before the rotation", lambda: load.count() >= 20, timeout=60)
        new_password = secrets.token_urlsafe(16)
        token = str(uuid.uuid4())
        # createSecret, then setSecret: the database expects the pending password now.
        aws.client.put_secret_value(
            SecretId=name, ClientRequestToken=token, VersionStages=["AWSPENDING"],
            SecretString=json.dumps({"username": user, "password": new_password}))
        db.set_password(user, new_password)
        in_window = load.count()
        wait_until("writes inside the rotation window", lambda: load.count() >= in_window + 40,
                   timeout=60)
        # finishSecret: the pending version becomes current.
        aws.client.update_secret_version_stage(
            SecretId=name, VersionStage="AWSCURRENT", MoveToVersionId=token,
            RemoveFromVersionId=old_version)
        finished = load.count()
        wait_until("writes after the rotation", lambda: load.count() >= finished + 20,
                   timeout=60)
    finally:
        load.finish()
    assert load.errors == []
    assert load.acked <= db.ids(table)
    assert kinds(sink, "auth.failed") == []
    assert 1 <= len(kinds(sink, "auth.retried")) <= load.threads
    assert 1 <= len(kinds(sink, "auth.pending_version")) <= load.threads
    _assert_not_leaked(password, sink)
    _assert_not_leaked(new_password, sink)
