"""The simulator enforces IAM database authentication (simulator/iam, Cluster.enable_iam).

Real servers refuse or accept real tokens: boto3's ``generate_db_auth_token`` signs them
(locally: no AWS call), PostgreSQL's ``pam`` method and MariaDB's PAM plugin hand them to the
verifier, and each refusal is checked twice: the driver gets the server's authentication
error, and the server's log names the reason the verifier gave (so a test cannot pass because
the login failed for some unrelated reason).
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import subprocess
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.auth  # type: ignore[import-untyped]
import mysql.connector
import psycopg
import pytest

from simulator._addresses import ProcessIdentity
from simulator.cluster import Cluster, ClusterError, Instance
from simulator.iam import PAM_DIR, IamCredentials, sweep_services, verify

from .aws import TEST_CREDENTIALS
from .waiting import wait_until

pytestmark = pytest.mark.real_server

USER = "iam_user"
OTHER = "iam_other"
REGION = "us-east-1"
#: Temporary credentials (as STS issues): their tokens carry X-Amz-Security-Token and are
#: longer than PAM_MAX_RESP_SIZE (512), which pam_exec would truncate.
SESSION = IamCredentials("ASIASIMULATORTEST", "session-secret", "FwoGZXIvYXdz" + "Q" * 900)


def token(host: str, port: int | None, user: str = USER, *, region: str = REGION,
          credentials: IamCredentials | None = None) -> str:
    assert port is not None
    creds = credentials or IamCredentials(TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                          TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    client = boto3.client("rds", region_name=region, aws_access_key_id=creds.access_key_id,
                          aws_secret_access_key=creds.secret_access_key,
                          aws_session_token=creds.session_token)
    return str(client.generate_db_auth_token(host, port, user, Region=region))


def login(cluster: Cluster, instance: Instance, password: str, user: str = USER) -> Any:
    """Log in to ``instance`` by address (the token names the host; DNS plays no part)."""
    if cluster.flavour.engine == "postgresql":
        return psycopg.connect(host=instance.address, port=cluster.port, user=user,
                               password=password, dbname="test", connect_timeout=15)
    return mysql.connector.connect(host=instance.address, port=cluster.port, user=user,
                                   password=password, database="test", use_pure=True,
                                   auth_plugin="mysql_clear_password", connection_timeout=15)


def current_user(conn: Any) -> str:
    cur = conn.cursor()
    try:
        cur.execute("SELECT current_user")
        row = cur.fetchone()
    finally:
        cur.close()
    return str(row[0]).split("@")[0]


def accepted(cluster: Cluster, instance: Instance, password: str, user: str = USER) -> None:
    conn = login(cluster, instance, password, user)
    try:
        assert current_user(conn) == user
    finally:
        conn.close()


def refused(cluster: Cluster, instance: Instance, password: str, reason: str,
            user: str = USER) -> None:
    """The server refuses the login, and its log says the verifier refused it for
    ``reason``."""
    log = instance.runtime.log_path
    start = log.stat().st_size
    if cluster.flavour.engine == "postgresql":
        with pytest.raises(psycopg.OperationalError, match="PAM authentication failed"):
            login(cluster, instance, password, user).close()
    else:
        with pytest.raises(mysql.connector.Error) as info:
            login(cluster, instance, password, user).close()
        assert getattr(info.value, "errno", None) == 1045, info.value

    def logged() -> bool:
        with log.open("rb") as f:
            f.seek(start)
            return reason.encode() in f.read()

    wait_until(f"{instance.id}'s log to give the reason {reason!r}", logged, timeout=15)


@pytest.fixture(scope="module", params=["aurora-pg", "aurora-mysql"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Cluster.start(request.param, readers=1) as started:
        events = started.enable_iam(USER)
        assert [e.name for e in events][-1] == "iam_enabled"
        started.enable_iam(OTHER)
        started.enable_iam(USER, credentials=[SESSION])
        yield started
    assert not (PAM_DIR / f"rdbsim-iam-{started.name}-{started.naming.cluster_id}").exists()


def test_token_for_the_instance_endpoint_logs_in(cluster: Cluster) -> None:
    for instance in cluster.instances.values():
        accepted(cluster, instance, token(instance.endpoint, cluster.port))


def test_role_endpoints(cluster: Cluster) -> None:
    writer, reader = cluster.writer, cluster.readers[0]
    accepted(cluster, writer, token(cluster.writer_endpoint, cluster.port))
    accepted(cluster, reader, token(cluster.reader_endpoint, cluster.port))
    refused(cluster, reader, token(cluster.writer_endpoint, cluster.port),
            "is not a name of this instance")
    refused(cluster, writer, token(cluster.reader_endpoint, cluster.port),
            "is not a name of this instance")


def test_wrong_host_refused(cluster: Cluster) -> None:
    writer, reader = cluster.writer, cluster.readers[0]
    # Another instance's endpoint, and the right instance's IP address instead of its name.
    refused(cluster, writer, token(reader.endpoint, cluster.port),
            "is not a name of this instance")
    refused(cluster, writer, token(writer.address, cluster.port),
            "is not a name of this instance")


def test_expired_token_refused(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    signed_at = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) \
        - datetime.timedelta(seconds=901)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: signed_at)
    old = token(cluster.writer.endpoint, cluster.port)
    monkeypatch.undo()
    refused(cluster, cluster.writer, old, "the token expired")


def test_forged_signature_refused(cluster: Cluster) -> None:
    good = token(cluster.writer.endpoint, cluster.port)
    last = good[-1]
    forged = good[:-1] + ("0" if last != "0" else "1")
    refused(cluster, cluster.writer, forged, "the signature does not match")
    # Signed with the right access key id but another secret.
    wrong_secret = token(cluster.writer.endpoint, cluster.port,
                         credentials=IamCredentials("testing", "not-the-secret"))
    refused(cluster, cluster.writer, wrong_secret, "the signature does not match")
    untrusted = token(cluster.writer.endpoint, cluster.port,
                      credentials=IamCredentials("AKIAUNKNOWN", "testing"))
    refused(cluster, cluster.writer, untrusted, "does not trust")


def test_wrong_port_user_and_region_refused(cluster: Cluster) -> None:
    assert cluster.port is not None
    endpoint = cluster.writer.endpoint
    refused(cluster, cluster.writer, token(endpoint, cluster.port + 1),
            f"port {cluster.port + 1} is not this instance's port")
    refused(cluster, cluster.writer, token(endpoint, cluster.port, USER), "the token is for user",
            user=OTHER)
    refused(cluster, cluster.writer, token(endpoint, cluster.port, region="eu-west-1"),
            "region 'eu-west-1' is not this instance's region")
    accepted(cluster, cluster.writer, token(endpoint, cluster.port, OTHER), user=OTHER)


def test_session_credentials_long_token(cluster: Cluster) -> None:
    long_token = token(cluster.writer.endpoint, cluster.port, credentials=SESSION)
    assert len(long_token) > 1000  # beyond PAM_MAX_RESP_SIZE and mysql's 255-byte prefix
    accepted(cluster, cluster.writer, long_token)
    other_session = IamCredentials(SESSION.access_key_id, SESSION.secret_access_key,
                                   "another-session-token")
    refused(cluster, cluster.writer,
            token(cluster.writer.endpoint, cluster.port, credentials=other_session),
            "X-Amz-Security-Token is not the session token")


def test_password_user_unaffected_and_token_never_logged(cluster: Cluster) -> None:
    kwargs = cluster.connect_kwargs()
    kwargs["host"] = cluster.writer.address
    if cluster.flavour.engine == "postgresql":
        conn: Any = psycopg.connect(**kwargs, connect_timeout=15)
    else:
        conn = mysql.connector.connect(**kwargs, use_pure=True, connection_timeout=15)
    try:
        assert current_user(conn) == kwargs["user"]
    finally:
        conn.close()
    good = token(cluster.writer.endpoint, cluster.port)
    refused(cluster, cluster.readers[0], good, "is not a name of this instance")
    signature = good.rsplit("X-Amz-Signature=", 1)[1]
    for instance in cluster.instances.values():
        assert signature not in instance.runtime.log_path.read_text(errors="replace")


def test_iam_user_has_the_application_users_privileges(cluster: Cluster) -> None:
    # The topology the cluster plugins read, and a table of its own in the test database.
    topology = ("SELECT count(*) FROM aurora_replica_status()"
                if cluster.flavour.engine == "postgresql"
                else "SELECT count(*) FROM aurora_sim.replica_host_status")
    conn = login(cluster, cluster.writer, token(cluster.writer.endpoint, cluster.port))
    try:
        cur = conn.cursor()
        cur.execute(topology)
        assert cur.fetchone()[0] == len(cluster.instances)
        cur.execute("CREATE TABLE iam_owned (id int)")
        cur.execute("DROP TABLE iam_owned")
        cur.close()
        conn.commit()
    finally:
        conn.close()


def test_pam_service_is_readable_and_names_no_secret(cluster: Cluster) -> None:
    assert cluster.iam is not None
    text = (PAM_DIR / cluster.iam.service).read_text()
    assert "pam_rdbsim_iam.so" in text
    assert SESSION.secret_access_key not in text
    assert os.stat(PAM_DIR / cluster.iam.service).st_mode & 0o777 == 0o644
    assert "secret" not in repr(SESSION) and "Q" * 10 not in repr(SESSION)
    # Each instance's settings (trusted secrets included) are private to the server's OS
    # user, the one the verifier runs as (inside the server process, through PAM).
    os_user = "postgres" if cluster.flavour.engine == "postgresql" else "mysql"
    for instance in cluster.instances.values():
        config = instance.runtime.base_dir / "iam.json"
        info = os.stat(config)
        assert info.st_mode & 0o777 == 0o600
        assert pwd.getpwuid(info.st_uid).pw_name == os_user
        assert json.loads(config.read_text())["instance"] == instance.id


def test_reader_added_later_enforces(cluster: Cluster) -> None:
    events = cluster.add_reader()
    added = cluster.instance(next(e.instance for e in events if e.name == "reader_added") or "")
    try:
        accepted(cluster, added, token(added.endpoint, cluster.port))
        accepted(cluster, added, token(cluster.reader_endpoint, cluster.port))
        refused(cluster, added, token(cluster.writer_endpoint, cluster.port),
                "is not a name of this instance")
    finally:
        cluster.remove_reader(added.id)


def test_after_failover_the_new_writer_enforces(cluster: Cluster) -> None:
    old, new = cluster.writer, cluster.readers[0]
    cluster.failover()
    assert cluster.writer is new
    accepted(cluster, new, token(cluster.writer_endpoint, cluster.port))
    refused(cluster, new, token(cluster.reader_endpoint, cluster.port),
            "is not a name of this instance")
    # The old writer rejoins as a reader: the names it answers to change with its role.
    wait_until(f"{old.id} to rejoin as a reader", lambda: old.role == "reader", timeout=120)
    accepted(cluster, old, token(cluster.reader_endpoint, cluster.port))
    refused(cluster, old, token(cluster.writer_endpoint, cluster.port),
            "is not a name of this instance")


def test_enable_iam_refuses_bad_input(cluster: Cluster) -> None:
    with pytest.raises(ClusterError, match="user 'bad-name'"):
        cluster.enable_iam("bad-name")
    with pytest.raises(ClusterError, match="region 'eu-west-1'"):
        cluster.enable_iam(USER, region="eu-west-1")


# --- the verifier alone (no server) ----------------------------------------------------------
_HOST = "instance-1.c0.us-east-1.rds.amazonaws.com"
_CONFIG = {"users": [USER], "hosts": [_HOST], "port": 5432, "region": REGION,
           "credentials": [{"access_key_id": "testing", "secret_access_key": "testing",
                            "session_token": None}]}


@pytest.mark.unit
@pytest.mark.parametrize(("mangle", "reason"), [
    (lambda t: "https://" + t, "scheme"),
    (lambda t: t.replace("X-Amz-Expires=900", "X-Amz-Expires=3600"), "outside 1..900"),
    (lambda t: t + "&Action=connect", "occurs twice"),
    (lambda t: t + "&Extra=1", "unexpected token shape"),
    (lambda t: t.replace("Action=connect", "Action=other"), "Action is not connect"),
    (lambda t: t.replace("/?", "/x?"), "unexpected token shape"),
    (lambda t: t.replace("%2Frds-db%2F", "%2Fs3%2F"), "credential scope"),
])
def test_verifier_refuses_malformed_tokens(mangle: Any, reason: str) -> None:
    good = token(_HOST, 5432)
    now = datetime.datetime.now(datetime.timezone.utc)
    verify.check(good, USER, _CONFIG, now)
    bad = mangle(good)
    assert bad != good
    with pytest.raises(verify.RefusedError, match=reason):
        verify.check(bad, USER, _CONFIG, now)


@pytest.mark.unit
def test_verifier_window() -> None:
    good = token(_HOST, 5432)
    now = datetime.datetime.now(datetime.timezone.utc)
    verify.check(good, USER, _CONFIG, now + datetime.timedelta(seconds=890))
    with pytest.raises(verify.RefusedError, match="expired"):
        verify.check(good, USER, _CONFIG, now + datetime.timedelta(seconds=910))
    with pytest.raises(verify.RefusedError, match="future"):
        verify.check(good, USER, _CONFIG, now - datetime.timedelta(seconds=600))


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() != 0, reason="writes to /etc/pam.d")
def test_sweep_removes_services_of_dead_owners(monkeypatch: pytest.MonkeyPatch) -> None:
    # The "dead" owner is a live process of this test, and only this process's sweep is told
    # it is gone: another xdist worker's sweep (each IAM cluster start runs one) must not take
    # the file first, or this sweep would find nothing to remove.
    owner_process = subprocess.Popen(["sleep", "600"])
    paths = {name: PAM_DIR / f"rdbsim-iam-sweeptest{name}-{os.getpid()}"
             for name in ("dead", "alive", "foreign")}
    try:
        dead = ProcessIdentity.of(owner_process.pid)
        assert dead is not None
        alive = ProcessIdentity.is_alive
        monkeypatch.setattr(ProcessIdentity, "is_alive",
                            lambda identity: identity != dead and alive(identity))
        paths["dead"].write_text(f"# owner: {json.dumps(dead.to_json())}\n")
        paths["alive"].write_text(
            f"# owner: {json.dumps(ProcessIdentity.current().to_json())}\n")
        paths["foreign"].write_text("auth required pam_deny.so\n")
        removed = sweep_services()
        assert paths["dead"] in removed and not paths["dead"].exists()
        assert paths["alive"].exists() and paths["foreign"].exists()
    finally:
        owner_process.kill()
        owner_process.wait()
        for path in paths.values():
            path.unlink(missing_ok=True)


@pytest.mark.parametrize("flavour", ["rds-pg", "rds-mysql"])
def test_single_instance_flavours(flavour: str) -> None:
    # No cluster endpoints: the writer and reader endpoints are the instance endpoint.
    with Cluster.start(flavour) as single:
        single.enable_iam(USER)
        instance = single.writer
        assert single.writer_endpoint == instance.endpoint
        accepted(single, instance, token(instance.endpoint, single.port))
        refused(single, instance, token(f"other.{instance.endpoint}", single.port),
                "is not a name of this instance")
