"""Federated IAM authentication: identity provider -> SAML -> STS -> IAM database token.

The two federated plugins (``federated_auth`` for ADFS, ``okta``) share everything but the
sign-in conversation (``_idp``). On a physical connect whose token is not cached
(:data:`~resilient_db.auth.CREDENTIALS`, per host, port, database user, region and identity):

1. temporary AWS credentials for (IdP, IdP user, role, SAML provider, region) are taken from
   the process-wide STS cache while they stay valid for more than ``STS_MARGIN`` seconds;
   otherwise, under a per-identity lock (one sign-in at a time, the others wait for it):
2. the plugin signs in at the identity provider and gets a SAML response (``_idp``);
3. checks it (``_saml``: not expired, grants the role) and exchanges it at STS
   (``AssumeRoleWithSAML``, boto3) for temporary credentials;
4. signs an IAM database token with them (the ``iam`` plugin's token generation), used as the
   password (MySQL: ``mysql_clear_password``). The token is reused for
   ``iam_token_expiration`` seconds, never beyond the credentials' own expiry (a token signed
   with expired session credentials is refused).

Decisions: ``auth.idp_signin``, ``auth.saml_obtained``, ``auth.sts_credentials`` (with
``auth.status`` ``cached`` or ``fetched``), besides the ``auth.credential`` of every connect.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import _params as params
from ..errors import ConfigurationError
from ..plugins.iam import IamProvider
from ._credentials import Credential
from ._errors import FederatedAuthError
from ._idp import IdpSettings, split_endpoint
from ._saml import check_assertion, read_assertion

if TYPE_CHECKING:
    from .._pipeline import ConnectContext
    from .._properties import Settings

__all__ = ["STS_CREDENTIALS", "FederatedProvider", "StsCredentials"]

log = logging.getLogger("resilient_db.auth.federated")

#: Temporary credentials with less than this many seconds left are not used to sign a new
#: token: the sign-in is done again (a token signed with credentials that expire is refused
#: once they have).
STS_MARGIN = 120.0

Decide = Callable[..., Any]
#: ``sign_in(idp)`` -> base64 SAML response (``_idp.adfs_saml_assertion`` or okta's).
SignIn = Callable[[IdpSettings], str]


@dataclass(frozen=True)
class StsCredentials:
    """Temporary AWS credentials from AssumeRoleWithSAML. ``expires_at``: wall clock."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expires_at: float


class StsCache:
    """Temporary credentials per federated identity, process-wide; one sign-in in flight per
    identity: the others wait for it and take its result, or its error (a wrong password
    tried once, not once per waiting connect: directories lock accounts after a few)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Hashable, StsCredentials] = {}
        self._key_locks: dict[Hashable, threading.Lock] = {}
        #: Per key: sign-ins attempted, and the error of the last one (``None``: it worked).
        self._attempts: dict[Hashable, tuple[int, BaseException | None]] = {}
        #: Sign-ins done (tests).
        self.sign_ins = 0

    def _fresh(self, key: Hashable) -> StsCredentials | None:
        entry = self._entries.get(key)
        if entry is not None and self.clock() < entry.expires_at - STS_MARGIN:
            return entry
        return None

    def get(self, key: Hashable, fetch: Callable[[], StsCredentials]) -> tuple[
            StsCredentials, str]:
        """The credentials of ``key`` and ``"cached"`` or ``"fetched"``."""
        entry = self._fresh(key)
        if entry is not None:
            return entry, "cached"
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
            seen = self._attempts.get(key, (0, None))[0]
        with key_lock:
            entry = self._fresh(key)  # another thread signed in while this one waited
            if entry is not None:
                return entry, "cached"
            count, error = self._attempts.get(key, (0, None))
            if count != seen and error is not None:
                raise error  # the sign-in this thread waited for failed: not again
            with self._lock:
                self.sign_ins += 1
            try:
                fresh = fetch()
            except BaseException as exc:
                self._attempts[key] = (count + 1, exc)
                raise
            self._attempts[key] = (count + 1, None)
            self._entries[key] = fresh
            return fresh, "fetched"

    def invalidate(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything (tests; the child after ``fork()``)."""
        self._lock = threading.Lock()
        self._entries = {}
        self._key_locks = {}
        self._attempts = {}
        self.sign_ins = 0


#: The process's temporary credentials.
STS_CREDENTIALS = StsCache()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=STS_CREDENTIALS.clear)


def _required(settings: Settings, prop: Any, plugin: str, example: str) -> str:
    value = settings[prop]
    if not value:
        raise ConfigurationError(
            f"plugin {plugin!r} needs {prop.name} (e.g. {prop.name}={example!r})",
            parameter=prop.name, value=None)
    return str(value)


class FederatedProvider(IamProvider):
    """IAM tokens signed with temporary credentials obtained through an identity provider.

    The token's target (host from ``iam_host`` or the connection, port from
    ``iam_default_port``, the connection or the driver's default, region from ``iam_region``
    or the RDS endpoint name) is the ``iam`` plugin's; the database user is ``db_user``.
    ``kind``: ``"ADFS"`` or ``"Okta"`` (messages); ``target_id``: the relying party (ADFS) or
    app id (Okta), part of the identity; ``okta_port``: Okta's port rule (``idp_port`` only
    when set explicitly)."""

    def __init__(self, code: str, kind: str, settings: Settings, default_port: int,
                 sign_in: SignIn, target_id: str, decide: Decide, *,
                 okta_port: bool = False) -> None:
        super().__init__(settings, default_port)
        self.code = code  # type: ignore[misc]  # a ClassVar in IamProvider; ours per plugin
        self.kind = kind
        self.settings = settings
        self._sign_in = sign_in
        self.target_id = target_id
        self._decide = decide
        self.endpoint = _required(settings, params.IDP_ENDPOINT, code, "adfs.example.com")
        self.role_arn = _required(settings, params.IAM_ROLE_ARN, code,
                                  "arn:aws:iam::123456789012:role/db-access")
        self.idp_arn = _required(settings, params.IAM_IDP_ARN, code,
                                 "arn:aws:iam::123456789012:saml-provider/adfs")
        self.db_user = _required(settings, params.DB_USER, code, "db_iam_user")
        host, port = split_endpoint(self.endpoint)
        if port is None and (settings.explicit(params.IDP_PORT) or not okta_port):
            port = settings[params.IDP_PORT]
        self.idp_host, self.idp_port = host, port
        timeout = settings[params.HTTP_REQUEST_CONNECT_TIMEOUT]
        self.timeout = 60.0 if timeout is None else timeout
        self.verify = settings[params.SSL_SECURE]
        # Memos of the per-connect work (a provider serves one connection's settings).
        self._targets: dict[tuple[str, int | None], tuple[str, int, str, str]] = {}
        self._identities: dict[tuple[str, str, str], tuple[Hashable, ...]] = {}
        lifetime = settings[params.IAM_TOKEN_EXPIRATION]
        self.expiration = 870.0 if lifetime is None else lifetime
        self.refresh_before = min(60.0, self.expiration * 0.1)

    # --- the identity ---------------------------------------------------------------------

    def _idp(self, ctx: ConnectContext) -> IdpSettings:
        username = self.settings[params.IDP_USERNAME] or ctx.driver.user_of(ctx.args)
        password = self.settings[params.IDP_PASSWORD]
        if password is None:
            given = ctx.args.get("password")
            password = given if isinstance(given, str) and given else None
        if not username or password is None:
            missing = "idp_username" if not username else "idp_password"
            fallback = "user" if not username else "password"
            raise ConfigurationError(
                f"plugin {self.code!r} needs {missing} (or the connection's {fallback}) to "
                f"sign in at {self.kind}", parameter=missing, value=None)
        return IdpSettings(self.kind, self.idp_host, self.idp_port, username, password,
                           self.timeout, self.verify)

    def _identity(self, idp: IdpSettings, region: str) -> tuple[Hashable, ...]:
        memo = (idp.username, idp.password, region)
        identity = self._identities.get(memo)
        if identity is None:
            # The password's digest keeps two callers with different IdP passwords from
            # sharing credentials one of them could not get; ``describe`` never shows it.
            digest = hashlib.sha256(idp.password.encode()).hexdigest()[:16]
            identity = (self.code, idp.origin, self.target_id, idp.username, self.role_arn,
                        self.idp_arn, region, digest)
            self._identities[memo] = identity
        return identity

    def target(self, ctx: ConnectContext) -> tuple[str, int, str, str]:
        """(host, port, ``db_user``, region) the token is signed for. Depends only on the
        connection's host and port (the rest is settings): computed once per instance."""
        memo = (ctx.host.host, ctx.host.port)
        target = self._targets.get(memo)
        if target is None:
            args = dict(ctx.args)
            args["user"] = self.db_user  # the iam rules want a user: ours is db_user
            host, port, _, region = super().target(dataclasses.replace(ctx, args=args))
            target = self._targets[memo] = (host, port, self.db_user, region)
        return target

    def key(self, ctx: ConnectContext) -> Hashable:
        host, port, user, region = self.target(ctx)
        return (self.code, host, port, user, region, self._identity(self._idp(ctx), region))

    def describe(self, key: Hashable) -> str:
        if isinstance(key, tuple) and len(key) == 6 and isinstance(key[5], tuple):
            code, host, port, user, region, identity = key
            return f"{code} {user}@{host}:{port} ({region}) via {identity[1]} as {identity[3]!r}"
        return "(federated key)"

    # --- the flow -------------------------------------------------------------------------

    def fetch(self, ctx: ConnectContext) -> Credential:
        host, port, user, region = self.target(ctx)
        idp = self._idp(ctx)
        credentials, status = STS_CREDENTIALS.get(
            self._identity(idp, region), lambda: self._sign_in_and_assume(idp, region))
        if status == "cached":
            self._decide("auth.sts_credentials", self.code, **{
                "auth.source": self.code, "auth.status": status,
                "aws.iam.role_arn": self.role_arn,
                "auth.sts.expires_at": credentials.expires_at})
        issued = self.clock()
        token = signed_token(host, port, user, region, credentials)
        log.debug("%s: generated a token for %s@%s:%s (%s)", self.code, user, host, port,
                  region)
        # A token signed with session credentials is refused once they have expired.
        expires_at = min(issued + self.expiration, credentials.expires_at)
        return Credential(user, token, expires_at, self.code, clear_text=True)

    def _sign_in_and_assume(self, idp: IdpSettings, region: str) -> StsCredentials:
        started = time.monotonic()
        where = f"{self.kind} at {idp.origin}"
        base = {"auth.source": self.code, "auth.idp": idp.origin, "auth.idp.user": idp.username}
        try:
            encoded = self._sign_in(idp)
        except FederatedAuthError as exc:
            self._decide("auth.idp_signin", self.code, **base, success=False,
                         duration=time.monotonic() - started, **{"error.type": type(exc).__name__})
            raise
        self._decide("auth.idp_signin", self.code, **base, success=True,
                     duration=time.monotonic() - started)
        assertion = read_assertion(encoded, where)
        self._decide("auth.saml_obtained", self.code, **base, **{
            "auth.saml.expires_at": assertion.not_on_or_after,
            "auth.saml.roles": len(assertion.roles)})
        try:
            check_assertion(assertion, now=self.clock(), role_arn=self.role_arn,
                            idp_arn=self.idp_arn, where=where, user=idp.username)
            credentials = assume_role_with_saml(
                assertion.encoded, role_arn=self.role_arn, idp_arn=self.idp_arn,
                region=region, timeout=self.timeout, where=where, user=idp.username)
        except FederatedAuthError as exc:
            self._decide("auth.sts_credentials", self.code, **{
                "auth.source": self.code, "auth.status": "failed",
                "aws.iam.role_arn": self.role_arn, "error.type": type(exc).__name__})
            raise
        self._decide("auth.sts_credentials", self.code, **{
            "auth.source": self.code, "auth.status": "fetched",
            "aws.iam.role_arn": self.role_arn, "auth.sts.expires_at": credentials.expires_at})
        log.info("%s: signed in at %s as %r; temporary credentials for %s until %s UTC",
                 self.code, idp.origin, idp.username, self.role_arn,
                 time.strftime("%H:%M:%S", time.gmtime(credentials.expires_at)))
        return credentials


# --- STS -------------------------------------------------------------------------------------

def assume_role_with_saml(assertion: str, *, role_arn: str, idp_arn: str, region: str,
                          timeout: float, where: str, user: str) -> StsCredentials:
    """Exchange a SAML response for temporary credentials (boto3; the endpoint comes from
    boto3's configuration: ``AWS_ENDPOINT_URL_STS``, the region's STS endpoint)."""
    try:
        import boto3
        from botocore.config import Config  # type: ignore[import-untyped]
        from botocore.exceptions import (  # type: ignore[import-untyped]
            BotoCoreError,
            ClientError,
        )
        from botocore.parsers import ResponseParserError  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ConfigurationError(
            "the federated plugins need boto3: pip install 'resilient_db[aws]'",
            parameter="plugins", value=None) from exc
    config = Config(connect_timeout=timeout, read_timeout=timeout,
                    retries={"mode": "standard", "max_attempts": 2})
    doing = (f"STS AssumeRoleWithSAML (role {role_arn}, provider {idp_arn}) with the SAML "
             f"assertion of user {user!r} from {where}")
    try:
        # AssumeRoleWithSAML is not signed: no AWS credentials are needed to call it.
        client = boto3.session.Session().client("sts", region_name=region, config=config)
        answer = client.assume_role_with_saml(
            RoleArn=role_arn, PrincipalArn=idp_arn, SAMLAssertion=assertion)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "?")
        message = str(error.get("Message", ""))[:300]
        hint = ("the assertion expired: sign-in and exchange must happen within its lifetime"
                if code == "ExpiredTokenException" else
                "check iam_role_arn, iam_idp_arn and the role's trust policy")
        raise FederatedAuthError(
            f"{doing}: refused ({code}: {message}); {hint}") from None
    except (BotoCoreError, ResponseParserError) as exc:
        # An unreadable answer (an HTTP 5xx page) or no answer: the message of a parser
        # error quotes the body; the type is enough.
        raise FederatedAuthError(
            f"{doing}: failed ({type(exc).__name__}); is STS reachable and healthy?"
        ) from None
    raw = answer.get("Credentials") or {}
    try:
        expiration = raw["Expiration"]
        expires_at = (expiration.timestamp() if hasattr(expiration, "timestamp")
                      else float(expiration))
        return StsCredentials(raw["AccessKeyId"], raw["SecretAccessKey"],
                              raw["SessionToken"], expires_at)
    except (KeyError, TypeError, ValueError):
        raise FederatedAuthError(f"{doing}: the answer holds no credentials") from None


# --- the token ----------------------------------------------------------------------------

_signers_lock = threading.Lock()
#: (access key id, region) -> an RDS client holding those temporary credentials. Creating a
#: client costs tens of milliseconds; a failover's new instance must not pay it. Only the
#: newest credentials' clients are kept.
_signers: dict[tuple[str, str], Any] = {}


def signed_token(host: str, port: int, user: str, region: str,
                 credentials: StsCredentials) -> str:
    """An RDS IAM auth token signed with ``credentials`` (local signing, as the ``iam``
    plugin's, with the temporary credentials instead of the default chain: the token carries
    their session token)."""
    key = (credentials.access_key_id, region)
    client = _signers.get(key)
    if client is None:
        import boto3

        with _signers_lock:
            client = _signers.get(key)
            if client is None:
                session = boto3.session.Session(
                    aws_access_key_id=credentials.access_key_id,
                    aws_secret_access_key=credentials.secret_access_key,
                    aws_session_token=credentials.session_token, region_name=region)
                client = session.client("rds")
                if len(_signers) >= 16:  # old credentials: expired or about to
                    _signers.clear()
                _signers[key] = client
    token: str = client.generate_db_auth_token(
        DBHostname=host, Port=port, DBUsername=user, Region=region)
    return token


def _forget_signers() -> None:
    global _signers_lock
    _signers_lock = threading.Lock()
    _signers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_signers)
