"""``federated_auth`` (ADFS) and ``okta``: identity provider -> SAML -> STS -> IAM token.

The identity provider is :mod:`tests.idp` (a local HTTPS server speaking the ADFS and Okta
sign-in conversations), STS is moto in server mode (:mod:`tests.aws`). The plugin's connect
hook runs with a terminal that records the arguments it would hand the driver (the token
comes out of the whole flow: sign-in, SAML, STS, signing); the tokens are checked field by
field and their SigV4 signature re-derived with the temporary credentials STS issued.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from typing import Any

import mysql.connector
import psycopg
import pytest
from botocore.auth import SigV4QueryAuth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

import resilient_db
from resilient_db import CollectingSink
from resilient_db._pipeline import ConnectContext, HostSpec, PluginContext
from resilient_db._properties import REGISTRY, Settings
from resilient_db.auth import CREDENTIALS, AuthPlugin
from resilient_db.auth._federated import STS_CREDENTIALS, StsCredentials
from resilient_db.auth._saml import FederatedAuthError
from resilient_db.drivers import driver_for
from resilient_db.errors import ConfigurationError
from resilient_db.plugins.federated_auth import FederatedAuthPlugin
from resilient_db.plugins.okta import OktaPlugin
from tests.aws import aws_env, moto_server
from tests.idp import ADFS_ARN, APP_ID, OKTA_ARN, ROLE_ARN, LocalIdp

USER = "alice@example.com"
PASSWORD = "Idp-pa55+word/secret"
DB_HOST = "db-1.abc123xyz.us-east-1.rds.amazonaws.com"

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def idp() -> Iterator[LocalIdp]:
    with LocalIdp({USER: PASSWORD, "bob": "bobs-password"}) as server:
        yield server


@pytest.fixture(scope="module")
def sts_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(autouse=True)
def _aws(monkeypatch: pytest.MonkeyPatch, sts_url: str, idp: LocalIdp) -> Iterator[None]:
    aws_env(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", sts_url)
    CREDENTIALS.clear()
    STS_CREDENTIALS.clear()
    idp.requests.clear()
    idp.posted.clear()
    yield
    idp.roles = None
    idp.assertion_lifetime = 300.0
    idp.session_duration = 3600
    idp.malformed = False
    idp.hang = False
    idp.delay = 0.0
    idp.require_cookie = True
    idp.foreign_action = None
    CREDENTIALS.clear()
    STS_CREDENTIALS.clear()


PLUGINS: dict[str, type[AuthPlugin]] = {"federated_auth": FederatedAuthPlugin,
                                         "okta": OktaPlugin}


def settings_for(code: str, idp: LocalIdp, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "idp_endpoint": idp.endpoint,
        "iam_role_arn": ROLE_ARN,
        "iam_idp_arn": ADFS_ARN if code == "federated_auth" else OKTA_ARN,
        "db_user": "iam_user",
        "idp_username": USER,
        "idp_password": PASSWORD,
        "ssl_secure": False,
        "http_request_connect_timeout": 10,
    }
    if code == "okta":
        values["app_id"] = APP_ID
    values.update(changes)
    return Settings({REGISTRY[name]: REGISTRY[name].parse(value)
                     for name, value in values.items() if value is not None})


class Terminal:
    """The end of the connect chain: records the arguments the driver would get."""

    def __init__(self) -> None:
        self.args: list[dict[str, Any]] = []

    def __call__(self, ctx: ConnectContext) -> object:
        self.args.append(dict(ctx.args))
        return object()


def plugin_for(code: str, settings: Settings, driver: str = "psycopg") -> AuthPlugin:
    target: Any = psycopg.Connection.connect if driver == "psycopg" else mysql.connector.connect
    ctx = PluginContext(settings, driver_for(target, None), HostSpec(DB_HOST, 5432))
    return PLUGINS[code](ctx)


def connect_ctx(plugin: AuthPlugin, host: str = DB_HOST, port: int | None = 5432,
                **args: Any) -> ConnectContext:
    target: Any = (psycopg.Connection.connect if "psycopg" in type(
        plugin.ctx.driver).__name__.lower() else mysql.connector.connect)
    return ConnectContext(HostSpec(host, port), {"host": host, **args}, plugin.ctx.settings,
                          plugin.ctx.driver, target, initial=True)


def token_fields(token: str) -> tuple[str, dict[str, str]]:
    """(host:port, query parameters) of an RDS IAM token."""
    where, _, query = token.partition("/?")
    return where, dict(urllib.parse.parse_qsl(query, keep_blank_values=True))


def signature_ok(token: str, region: str, credentials: StsCredentials) -> bool:
    """Re-derive the token's SigV4 query signature with ``credentials`` (what RDS does)."""
    where, fields = token_fields(token)
    signature = fields.pop("X-Amz-Signature")
    request = AWSRequest(method="GET", url=f"https://{where}/?" + urllib.parse.urlencode(
        fields, quote_via=urllib.parse.quote))
    auth = SigV4QueryAuth(Credentials(credentials.access_key_id,
                                      credentials.secret_access_key,
                                      credentials.session_token), "rds-db", region,
                          expires=int(fields["X-Amz-Expires"]))
    request.context["timestamp"] = fields["X-Amz-Date"]
    canonical = auth.canonical_request(request)
    expected = auth.signature(auth.string_to_sign(request, canonical), request)
    return bool(expected == signature)


def only_sts_credentials() -> StsCredentials:
    entries = list(STS_CREDENTIALS._entries.values())
    assert len(entries) == 1
    return entries[0]


# --- the whole flow ------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["federated_auth", "okta"])
def test_flow_gives_an_iam_token_signed_with_the_sts_credentials(
        code: str, idp: LocalIdp, sink: CollectingSink,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    plugin = plugin_for(code, settings_for(code, idp))
    terminal = Terminal()
    before = time.time()
    plugin.connect(connect_ctx(plugin, user="app_user"), terminal)
    args = terminal.args[0]
    assert args["user"] == "iam_user"  # db_user, not the application's user
    token = args["password"]
    where, fields = token_fields(token)
    assert where == f"{DB_HOST}:5432"
    assert fields["Action"] == "connect" and fields["DBUser"] == "iam_user"
    access_key, day, region, service, terminator = fields["X-Amz-Credential"].split("/")
    assert (region, service, terminator) == ("us-east-1", "rds-db", "aws4_request")
    credentials = only_sts_credentials()
    assert access_key == credentials.access_key_id  # signed with STS's temporary keys
    assert fields["X-Amz-Security-Token"] == credentials.session_token
    signed = dt.datetime.strptime(fields["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=dt.timezone.utc).timestamp()
    assert before - 5 <= signed <= time.time() + 5
    assert day == fields["X-Amz-Date"][:8]
    assert fields["X-Amz-Expires"] == "900"
    assert signature_ok(token, "us-east-1", credentials)
    assert not signature_ok(token.replace("DBUser=iam_user", "DBUser=iam_usex"), "us-east-1",
                            credentials)
    assert not signature_ok(token, "us-west-2", credentials)
    # STS: an hour (the SessionDuration of the assertion).
    assert 3500 < credentials.expires_at - time.time() <= 3600
    kinds = [d.kind for d in sink.decisions if d.plugin == code]
    assert kinds == ["auth.idp_signin", "auth.saml_obtained", "auth.sts_credentials",
                     "auth.credential"]
    signin, saml, sts, credential = (d.attributes for d in sink.decisions if d.plugin == code)
    assert signin["success"] is True and signin["auth.idp.user"] == USER
    assert saml["auth.saml.roles"] == 1
    assert sts["auth.status"] == "fetched" and sts["aws.iam.role_arn"] == ROLE_ARN
    assert credential["auth.status"] == "fetched" and credential["db.user"] == "iam_user"
    # No secret of the flow in a log line, a decision or a repr.
    # (botocore's own DEBUG log prints STS answers, as for any boto3 call: not ours.)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("resilient_db"))
    assertion = idp.last_saml
    secrets = (PASSWORD, token, credentials.secret_access_key, credentials.session_token,
               assertion, assertion[:40])
    shown = [ours, repr(sink.decisions), repr(credentials), repr(plugin.ctx.settings),
             repr(CREDENTIALS.peek(next(iter(CREDENTIALS._entries)))), repr(plugin)]
    assert not [secret for secret in secrets for text in shown if secret in text]


def test_mysql_gets_the_token_in_clear_text(idp: LocalIdp) -> None:
    plugin = plugin_for("federated_auth", settings_for("federated_auth", idp), "mysql")
    terminal = Terminal()
    plugin.connect(connect_ctx(plugin, port=3306, user="x"), terminal)
    args = terminal.args[0]
    assert args["auth_plugin"] == "mysql_clear_password"
    assert token_fields(args["password"])[0] == f"{DB_HOST}:3306"
    assert len(args["password"]) > 255


@pytest.mark.parametrize("code", ["federated_auth", "okta"])
def test_cached_token_and_sts_credentials_are_reused(
        code: str, idp: LocalIdp, sink: CollectingSink) -> None:
    plugin = plugin_for(code, settings_for(code, idp))
    terminal = Terminal()
    plugin.connect(connect_ctx(plugin), terminal)
    requests = sum(idp.requests.values())
    plugin.connect(connect_ctx(plugin), terminal)
    assert terminal.args[0]["password"] == terminal.args[1]["password"]
    assert sum(idp.requests.values()) == requests  # no sign-in
    # Another instance (failover, a reader): its own token, the same STS credentials.
    plugin.connect(connect_ctx(plugin, host=DB_HOST.replace("db-1", "db-2")), terminal)
    assert sum(idp.requests.values()) == requests
    assert token_fields(terminal.args[2]["password"])[0].startswith("db-2.")
    statuses = [(d.kind, d.attributes.get("auth.status")) for d in sink.decisions]
    assert statuses[-3:] == [("auth.credential", "cached"), ("auth.sts_credentials", "cached"),
                             ("auth.credential", "fetched")]
    assert STS_CREDENTIALS.sign_ins == 1


def test_concurrent_connects_sign_in_once(idp: LocalIdp) -> None:
    plugin = plugin_for("federated_auth", settings_for("federated_auth", idp))
    terminal = Terminal()
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def run(i: int) -> None:
        try:
            start.wait(10)
            plugin.connect(connect_ctx(plugin, host=f"db-{i}.abc123xyz.us-east-1.rds."
                                       "amazonaws.com"), terminal)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(terminal.args) == 8
    assert idp.requests["/adfs/ls/IdpInitiatedSignOn.aspx"] == 2  # one GET, one POST
    assert STS_CREDENTIALS.sign_ins == 1


def test_token_lifetime_never_exceeds_the_sts_credentials(idp: LocalIdp) -> None:
    idp.session_duration = 900  # STS's minimum
    plugin = plugin_for("federated_auth", settings_for("federated_auth", idp))
    plugin.connect(connect_ctx(plugin), Terminal())
    key = next(iter(CREDENTIALS._entries))
    credential = CREDENTIALS.peek(key)
    assert credential is not None and credential.expires_at is not None
    assert credential.expires_at <= only_sts_credentials().expires_at


def test_idp_credentials_default_to_the_connection_user_and_password(idp: LocalIdp) -> None:
    settings = settings_for("okta", idp, idp_username=None, idp_password=None)
    plugin = plugin_for("okta", settings)
    terminal = Terminal()
    plugin.connect(connect_ctx(plugin, user=USER, password=PASSWORD), terminal)
    assert terminal.args[0]["user"] == "iam_user"
    assert terminal.args[0]["password"] != PASSWORD


def test_tls_certificate_is_verified_by_default(
        idp: LocalIdp, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = plugin_for("federated_auth", settings_for("federated_auth", idp, ssl_secure=None))
    with pytest.raises(FederatedAuthError, match="certificate not trusted"):
        plugin.connect(connect_ctx(plugin), Terminal())
    monkeypatch.setenv("SSL_CERT_FILE", str(idp.ca_file))  # trusted: verified and accepted
    plugin = plugin_for("federated_auth", settings_for("federated_auth", idp, ssl_secure=None))
    terminal = Terminal()
    plugin.connect(connect_ctx(plugin), terminal)
    assert terminal.args[0]["user"] == "iam_user"


# --- failures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["federated_auth", "okta"])
def test_bad_password_names_the_idp_and_user_never_the_password(
        code: str, idp: LocalIdp, sink: CollectingSink,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Wrong-pa55word-XYZ"
    plugin = plugin_for(code, settings_for(code, idp, idp_password=wrong))
    with pytest.raises(FederatedAuthError) as caught:
        plugin.connect(connect_ctx(plugin), Terminal())
    message = str(caught.value)
    kind = "ADFS" if code == "federated_auth" else "Okta"
    assert f"{kind} at https://{idp.endpoint}" in message
    assert f"refused the sign-in of user {USER!r}" in message
    assert "idp_password" in message
    for secret in (wrong, PASSWORD):
        assert secret not in message
        assert secret not in repr(caught.value)
        assert secret not in caplog.text
        assert all(secret not in repr(d.attributes) for d in sink.decisions)
    assert secret not in repr(plugin.ctx.settings)
    failed = [d for d in sink.decisions if d.kind == "auth.idp_signin"]
    assert failed and failed[0].attributes["success"] is False
    assert CREDENTIALS._entries == {} and STS_CREDENTIALS.sign_ins == 1


def test_expired_saml_assertion_is_a_clear_error(idp: LocalIdp) -> None:
    idp.assertion_lifetime = -120.0
    plugin = plugin_for("federated_auth", settings_for("federated_auth", idp))
    with pytest.raises(FederatedAuthError, match=r"SAML assertion for user 'alice@example.com' "
                       r"expired at .* \(1[12]\d s ago\)"):
        plugin.connect(connect_ctx(plugin), Terminal())


def test_assertion_without_the_role_is_a_clear_error(idp: LocalIdp) -> None:
    other = "arn:aws:iam::123456789012:role/other"
    idp.roles = [(other, ADFS_ARN)]
    plugin = plugin_for("federated_auth", settings_for("federated_auth", idp))
    with pytest.raises(FederatedAuthError, match=f"does not grant role '{ROLE_ARN}'.*grants "
                       f"{other}"):
        plugin.connect(connect_ctx(plugin), Terminal())


def test_sts_refusal_is_a_clear_error(idp: LocalIdp, sink: CollectingSink) -> None:
    idp.malformed = True  # no Assertion element: moto's STS fails on it
    plugin = plugin_for("okta", settings_for("okta", idp))
    with pytest.raises(FederatedAuthError, match=r"STS AssumeRoleWithSAML \(role "
                       f"{ROLE_ARN}, provider {OKTA_ARN}\\) with the SAML assertion of user "
                       f"'{USER}' from Okta at https://{idp.endpoint}: failed"):
        plugin.connect(connect_ctx(plugin), Terminal())
    (failed,) = [d.attributes for d in sink.decisions if d.kind == "auth.sts_credentials"]
    assert failed["auth.status"] == "failed"
    assert failed["error.type"] == "FederatedAuthError"


def test_idp_that_does_not_answer_fails_within_the_timeout(idp: LocalIdp) -> None:
    idp.hang = True
    plugin = plugin_for("federated_auth", settings_for("federated_auth", idp,
                                                       http_request_connect_timeout=1))
    started = time.monotonic()
    with pytest.raises(FederatedAuthError, match=r"did not answer within 1 s "
                       r"\(http_request_connect_timeout\)"):
        plugin.connect(connect_ctx(plugin), Terminal())
    assert time.monotonic() - started < 30  # liveness: bounded, not the server's 30 s hold


@pytest.mark.parametrize(("code", "missing"), [
    ("federated_auth", "idp_endpoint"), ("federated_auth", "iam_role_arn"),
    ("federated_auth", "iam_idp_arn"), ("federated_auth", "db_user"), ("okta", "app_id")])
def test_missing_required_property_is_a_configuration_error(
        code: str, missing: str, idp: LocalIdp) -> None:
    plugin = plugin_for(code, settings_for(code, idp, **{missing: None}))
    with pytest.raises(ConfigurationError, match=missing) as caught:
        plugin.connect(connect_ctx(plugin), Terminal())
    assert caught.value.parameter == missing


def test_plain_http_idp_endpoint_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="plain http:// is refused"):
        resilient_db.connect(psycopg.Connection.connect, host=DB_HOST,
                             plugins="federated_auth", idp_endpoint="http://adfs.example.com")


def test_idp_without_password_or_user_is_a_configuration_error(idp: LocalIdp) -> None:
    plugin = plugin_for("federated_auth",
                        settings_for("federated_auth", idp, idp_password=None))
    with pytest.raises(ConfigurationError, match="idp_password") as caught:
        plugin.connect(connect_ctx(plugin), Terminal())
    assert caught.value.parameter == "idp_password"


def test_shared_properties_count_as_used_by_every_plugin_that_reads_them() -> None:
    from resilient_db import _connect

    def noted(names: dict[str, Any], enabled: set[str]) -> set[str]:
        _connect._noted_inactive.clear()
        _connect._note_inactive(
            Settings({REGISTRY[n]: REGISTRY[n].parse(v) for n, v in names.items()}), enabled)
        return set(_connect._noted_inactive)

    shared = {"idp_endpoint": "idp.example.com", "iam_region": "us-east-1", "db_user": "u"}
    assert noted(shared, {"okta"}) == set()
    assert noted(shared, {"federated_auth"}) == set()
    assert noted({**shared, "app_id": "x"}, {"federated_auth"}) == {"app_id"}
    assert noted(shared, {"iam"}) == {"idp_endpoint", "db_user"}
    _connect._noted_inactive.clear()


def test_concurrent_connects_with_a_wrong_password_try_it_once(idp: LocalIdp) -> None:
    """Waiters share the failed sign-in's error: a wrong password is posted once, not once per
    connect (a directory locks an account after a few failures)."""
    idp.delay = 1.0  # every thread is waiting before the sign-in fails
    plugin = plugin_for("okta", settings_for("okta", idp, idp_password="wrong"))
    failures: list[BaseException] = []
    start = threading.Barrier(6)

    def run(i: int) -> None:
        try:
            start.wait(10)
            plugin.connect(connect_ctx(plugin, host=f"db-{i}.abc123xyz.us-east-1.rds."
                                       "amazonaws.com"), Terminal())
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(failures) == 6
    assert all(isinstance(f, FederatedAuthError) for f in failures)
    assert idp.requests["/api/v1/authn"] == STS_CREDENTIALS.sign_ins == 1
    # A later connect tries again (the password may have been corrected meanwhile).
    idp.delay = 0.0
    with pytest.raises(FederatedAuthError):
        plugin.connect(connect_ctx(plugin), Terminal())
    assert idp.requests["/api/v1/authn"] == STS_CREDENTIALS.sign_ins == 2


def test_no_aws_credentials_needed(idp: LocalIdp, monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Any) -> None:
    """AssumeRoleWithSAML is an unsigned call and the token is signed with what it returns:
    the process needs no AWS credentials of its own."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    plugin = plugin_for("federated_auth", settings_for("federated_auth", idp))
    terminal = Terminal()
    plugin.connect(connect_ctx(plugin), terminal)
    access_key = token_fields(terminal.args[0]["password"])[1]["X-Amz-Credential"].split("/")[0]
    assert access_key == only_sts_credentials().access_key_id


def test_the_aws_wrappers_own_clients_sign_in_at_the_test_idp(idp: LocalIdp) -> None:
    """Cross-check of the test IdP's pages: the AWS Advanced Python Wrapper's ADFS and Okta
    clients (regular expressions over the HTML) get the assertion from it too. Its ADFS
    client keeps no cookies between the GET and the POST, so the cookie check is off."""
    adfs = pytest.importorskip("aws_advanced_python_wrapper.federated_plugin")
    okta = pytest.importorskip("aws_advanced_python_wrapper.okta_plugin")
    properties = pytest.importorskip("aws_advanced_python_wrapper.utils.properties")
    idp.require_cookie = False
    props = properties.Properties({
        "idp_endpoint": "localhost", "idp_port": str(idp.port), "idp_username": USER,
        "idp_password": PASSWORD, "ssl_secure": "false", "app_id": APP_ID})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # urllib3: unverified HTTPS
        assert adfs.AdfsCredentialsProviderFactory(None, props).get_saml_assertion(
            props) == idp.last_saml
        props["idp_endpoint"] = idp.endpoint  # its Okta client ignores idp_port
        assert okta.OktaCredentialsProviderFactory(None, props).get_saml_assertion(
            props) == idp.last_saml


def test_password_is_never_posted_to_another_site(idp: LocalIdp) -> None:
    idp.foreign_action = "https://collector.example.net/adfs/ls/"
    plugin = plugin_for("federated_auth", settings_for("federated_auth", idp))
    with pytest.raises(FederatedAuthError, match=r"the sign-in form posts to another site "
                       r"\(https://collector.example.net\); the password is not sent there"):
        plugin.connect(connect_ctx(plugin), Terminal())
    assert idp.posted == []
