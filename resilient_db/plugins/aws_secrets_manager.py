"""``aws_secrets_manager``: database credentials from an AWS Secrets Manager secret.

Every physical connect (initial, failover, monitors, pool growth) logs in with the user name
and password of a JSON secret (``{"username": ..., "password": ...}``; the key names are
configurable). The secret is fetched with boto3 ``get_secret_value`` and cached process-wide
(``resilient_db.auth.CREDENTIALS``) per secret id, region, endpoint and key names for
``secrets_manager_expiration`` seconds, so connects make no AWS call while the answer is
known. When the server refuses the login (the secret was rotated) the secret is fetched
again and the connect retried once (``resilient_db.auth.AuthPlugin``).

The secret's content never reaches a log line, an error message, a decision or a repr:
errors name the secret id, the region and the key *names* only.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from .._params import (
    SECRETS_MANAGER_ENDPOINT,
    SECRETS_MANAGER_EXPIRATION,
    SECRETS_MANAGER_REGION,
    SECRETS_MANAGER_SECRET_ID,
    SECRETS_MANAGER_SECRET_PASSWORD_KEY,
    SECRETS_MANAGER_SECRET_USERNAME_KEY,
)
from .._pipeline import ConnectContext, ConnectHandler
from .._properties import Settings
from ..auth._credentials import Credential, CredentialProvider
from ..auth._plugin import AuthPlugin
from ..errors import ConfigurationError

__all__ = ["AwsSecretsManagerPlugin", "SecretError", "SecretsManagerProvider", "region_of_arn"]

log = logging.getLogger("resilient_db.plugins.aws_secrets_manager")

CODE = "aws_secrets_manager"

#: ``arn:<partition>:secretsmanager:<region>:<account>:secret:<name>``; partitions ``aws``,
#: ``aws-cn``, ``aws-us-gov``, ``aws-iso``, ...
_ARN = re.compile(r"arn:aws[a-z-]*:secretsmanager:(?P<region>[a-z0-9-]+):[^:]*:secret:.+")

#: botocore's own defaults are 60 s to connect and 60 s to read, with retries: minutes on the
#: connect path of a database client. These bound one ``get_secret_value`` to about 10 s.
_CONNECT_TIMEOUT = 3.0
_READ_TIMEOUT = 5.0
_MAX_ATTEMPTS = 2

#: Error codes of a refused identity (Secrets Manager's, STS's and signing errors).
_DENIED = frozenset({"AccessDeniedException", "AccessDenied", "UnrecognizedClientException",
                     "InvalidSignatureException", "ExpiredTokenException",
                     "InvalidClientTokenId"})

#: Early refresh: at most this long before the cached secret expires, one connect fetches it
#: again while the others keep using the cached one.
_REFRESH_BEFORE = 30.0


def region_of_arn(secret_id: str) -> str | None:
    """The region named in a secret ARN; ``None`` when ``secret_id`` is a plain name."""
    match = _ARN.fullmatch(secret_id.strip())
    return match.group("region") if match else None


class SecretError(ConfigurationError):
    """The secret cannot be read or used: missing, access denied, not JSON, a key missing.

    A ``ConfigurationError`` (the fix is a property, the secret or an IAM policy); the
    message names the secret id, region and key names, never the secret's content."""


# --- boto3 clients: one per (region, endpoint), shared by the process -------------------------

_clients: dict[tuple[str, str | None], Any] = {}
_clients_lock = threading.Lock()


def _client(region: str, endpoint: str | None) -> Any:
    """A Secrets Manager client (boto3 clients are thread-safe; creating one is not, and
    costs tens of milliseconds, hence one per region and endpoint)."""
    key = (region, endpoint)
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            try:
                import boto3

                # Through importlib: botocore ships no type information (Any either way).
                config_module = importlib.import_module("botocore.config")
            except ImportError:
                raise ConfigurationError(
                    "plugin 'aws_secrets_manager' needs boto3: pip install "
                    "'resilient_db[aws]' (or boto3)", parameter="plugins",
                    value=CODE) from None
            config = config_module.Config(
                connect_timeout=_CONNECT_TIMEOUT, read_timeout=_READ_TIMEOUT,
                retries={"max_attempts": _MAX_ATTEMPTS, "mode": "standard"})
            # A session of its own: boto3's default session is not thread-safe.
            session = boto3.session.Session()
            client = session.client("secretsmanager", region_name=region,
                                    endpoint_url=endpoint, config=config)
            _clients[key] = client
    return client


def clear_clients() -> None:
    """Forget the cached boto3 clients (tests that change credentials or endpoints)."""
    with _clients_lock:
        _clients.clear()


def _after_fork() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()  # a client's connection pool is the parent's
    _REFUSED.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


# --- passwords the server refused (to bridge a rotation with AWSPENDING) ----------------------


class _Refused:
    """Digests of passwords a server refused, per cache key (never the passwords), with when
    each was refused. A password that logs in again is forgotten, but only by a login that
    started after the refusal: a login that began before the password changed on the server
    (and got in with it) says nothing about the password now. Process-wide, bounded."""

    _KEEP = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[Hashable, dict[bytes, float]] = {}

    @staticmethod
    def _digest(password: str) -> bytes:
        return hashlib.sha256(password.encode()).digest()

    def add(self, key: Hashable, password: str) -> None:
        digest = self._digest(password)
        with self._lock:
            digests = self._by_key.setdefault(key, {})
            digests.pop(digest, None)
            digests[digest] = time.monotonic()
            while len(digests) > self._KEEP:
                del digests[next(iter(digests))]

    def discard(self, key: Hashable, password: str, started: float) -> None:
        """``password`` logged in, in a login that began at ``started`` (monotonic)."""
        if key not in self._by_key:  # the common case, without the lock
            return
        digest = self._digest(password)
        with self._lock:
            digests = self._by_key.get(key)
            if digests and digests.get(digest, math.inf) < started:
                del digests[digest]

    def has(self, key: Hashable, password: str) -> bool:
        digests = self._by_key.get(key)
        return bool(digests) and self._digest(password) in (digests or ())

    def clear(self) -> None:
        with self._lock:
            self._by_key.clear()

    def after_fork(self) -> None:
        self._lock = threading.Lock()


_REFUSED = _Refused()

#: How long an ``AWSPENDING`` version is used before ``AWSCURRENT`` is read again.
_PENDING_EXPIRATION = 60.0


def clear_refused() -> None:
    """Forget refused passwords (tests)."""
    _REFUSED.clear()


# --- the provider -----------------------------------------------------------------------------


class SecretsManagerProvider(CredentialProvider):
    """User and password from one secret, as configured by the connection's settings."""

    code = CODE

    def __init__(self, settings: Settings,
                 decide: Callable[..., object] | None = None) -> None:
        self._decide = decide
        secret_id = settings[SECRETS_MANAGER_SECRET_ID]
        if not secret_id:
            raise ConfigurationError(
                "plugin 'aws_secrets_manager' needs secrets_manager_secret_id: the name or "
                "ARN of the secret that holds the database user and password",
                parameter=SECRETS_MANAGER_SECRET_ID.name, value=secret_id)
        self.secret_id = secret_id.strip()
        arn_region = region_of_arn(self.secret_id)
        region = settings[SECRETS_MANAGER_REGION]
        if region is None:
            if arn_region is None:
                raise ConfigurationError(
                    f"plugin 'aws_secrets_manager': secrets_manager_secret_id "
                    f"{self.secret_id!r} is a name, not an ARN, so the region is unknown: set "
                    "secrets_manager_region (e.g. 'us-east-2') or give the secret's ARN",
                    parameter=SECRETS_MANAGER_REGION.name, value=None)
            region = arn_region
        elif arn_region is not None and arn_region != region.strip():
            raise ConfigurationError(
                f"secrets_manager_region {region!r} differs from the region of the secret "
                f"ARN ({arn_region!r}): leave secrets_manager_region out (the ARN's region is "
                "used) or correct it",
                parameter=SECRETS_MANAGER_REGION.name, value=region)
        self.region = region.strip()
        endpoint = settings[SECRETS_MANAGER_ENDPOINT]
        self.endpoint = endpoint.strip() if endpoint else None
        self.username_key = str(settings[SECRETS_MANAGER_SECRET_USERNAME_KEY])
        self.password_key = str(settings[SECRETS_MANAGER_SECRET_PASSWORD_KEY])
        self.expiration = float(settings[SECRETS_MANAGER_EXPIRATION])
        self.refresh_before = min(_REFRESH_BEFORE, self.expiration / 10)
        self._key: Hashable = (CODE, self.secret_id, self.region, self.endpoint,
                               self.username_key, self.password_key)

    def key(self, ctx: ConnectContext) -> Hashable:
        # One secret serves every host of the cluster: the key does not name the host.
        return self._key

    def describe(self, key: Hashable) -> str:
        return f"secret {self.secret_id!r} in {self.region}"

    def where(self) -> str:
        """The secret, for messages: id, region and (when set) endpoint."""
        text = f"secret {self.secret_id!r} in region {self.region}"
        return f"{text} at {self.endpoint}" if self.endpoint else text

    def fetch(self, ctx: ConnectContext) -> Credential:
        started = time.time()
        credential = self.parse(self._get_secret_value())
        log.debug("fetched %s in %.1f ms", self.where(), (time.time() - started) * 1000)
        if _REFUSED.has(self._key, credential.password):
            pending = self._pending(ctx)
            if pending is not None:
                return pending
        return credential

    def _pending(self, ctx: ConnectContext) -> Credential | None:
        """The ``AWSPENDING`` version, when the server refused ``AWSCURRENT``'s password: a
        rotation in progress has set the new password on the database and not yet made it
        current (AWS's rotation functions: set, test, then finish; seconds to a minute).
        ``None`` when there is no usable pending version (then the current one is used and
        its refusal reaches the application)."""
        try:
            pending = self.parse(self._get_secret_value("AWSPENDING"))
        except SecretError as exc:
            log.debug("no usable AWSPENDING version of the %s: %s", self.where(),
                      type(exc).__name__)
            return None
        if _REFUSED.has(self._key, pending.password):
            return None
        log.info("the server refused the current version of the %s; using its AWSPENDING "
                 "version (a rotation in progress) for %g s", self.where(),
                 _PENDING_EXPIRATION)
        if self._decide is not None:
            self._decide("auth.pending_version", CODE, **{
                "auth.source": CODE, "server.address": ctx.host.host,
                "server.port": ctx.host.port, "db.user": pending.user})
        # Short-lived: once the rotation finishes, AWSCURRENT is this version; if it is
        # abandoned instead, AWSCURRENT is right again.
        expires_at = min(pending.expires_at or math.inf, time.time() + _PENDING_EXPIRATION)
        return Credential(pending.user, pending.password, expires_at, CODE)

    def _get_secret_value(self, stage: str | None = None) -> Any:
        boto_errors = importlib.import_module("botocore.exceptions")
        client = _client(self.region, self.endpoint)
        request = {"SecretId": self.secret_id}
        if stage is not None:
            request["VersionStage"] = stage
        try:
            return client.get_secret_value(**request)
        except boto_errors.ClientError as exc:
            raise self._client_error(exc) from None
        except boto_errors.NoCredentialsError:
            raise SecretError(
                f"cannot read the {self.where()}: no AWS credentials found (environment, "
                "shared credentials file, instance or container role)",
                parameter=SECRETS_MANAGER_SECRET_ID.name, value=self.secret_id) from None
        except boto_errors.EndpointConnectionError as exc:
            raise SecretError(
                f"cannot read the {self.where()}: the Secrets Manager endpoint cannot be "
                f"reached ({exc}); check secrets_manager_endpoint and secrets_manager_region",
                parameter=SECRETS_MANAGER_ENDPOINT.name, value=self.endpoint) from None
        except boto_errors.BotoCoreError as exc:
            raise SecretError(
                f"cannot read the {self.where()}: {type(exc).__name__}: {exc}",
                parameter=SECRETS_MANAGER_SECRET_ID.name, value=self.secret_id) from None

    def _client_error(self, exc: Any) -> SecretError:
        response = exc.response
        error = response.get("Error", {})
        code = str(error.get("Code", "")) or type(exc).__name__
        message = str(error.get("Message", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if message.lstrip().startswith("<"):
            # An XML error body on this JSON API (some emulators, proxies): botocore cannot
            # parse it and reports the HTTP status as the code.
            found = re.search(r"<Code>([^<]{1,100})</Code>", message)
            code = found.group(1) if found else code
            found = re.search(r"<Message>([^<]{1,300})</Message>", message)
            message = found.group(1) if found else ""
        message = message[:200]
        where = self.where()
        if code == "ResourceNotFoundException":
            text = (f"{where} does not exist (or has no current version): check "
                    "secrets_manager_secret_id and secrets_manager_region")
        elif code in _DENIED or status == 403:
            text = (f"access to the {where} was denied ({code}): the AWS identity needs "
                    "secretsmanager:GetSecretValue on it (and kms:Decrypt for a "
                    "customer-managed key)")
        elif code == "DecryptionFailure":
            text = (f"the {where} cannot be decrypted ({code}): the AWS identity needs "
                    "kms:Decrypt on the secret's KMS key")
        else:
            text = f"cannot read the {where}: {code}"
        if message:
            text += f" (AWS: {message})"
        return SecretError(text, parameter=SECRETS_MANAGER_SECRET_ID.name,
                           value=self.secret_id)

    def parse(self, response: Any) -> Credential:
        """The credential in a ``get_secret_value`` response. Errors name keys, never
        values (``from None``: a ``JSONDecodeError`` carries the whole document)."""
        where = self.where()
        text = response.get("SecretString")
        if text is None:
            raise SecretError(
                f"the {where} holds binary data (SecretBinary), not a JSON object with "
                f"{self.username_key!r} and {self.password_key!r}",
                parameter=SECRETS_MANAGER_SECRET_ID.name, value=self.secret_id)
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise SecretError(
                f"the {where} is not a JSON object (expected "
                f'{{"{self.username_key}": ..., "{self.password_key}": ...}})',
                parameter=SECRETS_MANAGER_SECRET_ID.name, value=self.secret_id)
        values: list[str] = []
        for prop, name in ((SECRETS_MANAGER_SECRET_USERNAME_KEY, self.username_key),
                           (SECRETS_MANAGER_SECRET_PASSWORD_KEY, self.password_key)):
            value = data.get(name)
            if value is None:
                keys = ", ".join(sorted(map(str, data))) or "none"
                raise SecretError(
                    f"the {where} has no key {name!r} (its keys: {keys}); set {prop.name} "
                    "to the key that holds the "
                    f"{'user name' if prop is SECRETS_MANAGER_SECRET_USERNAME_KEY else 'password'}",
                    parameter=prop.name, value=name)
            if not isinstance(value, str) or not value:
                raise SecretError(
                    f"the {where}: the value of key {name!r} is not a non-empty string",
                    parameter=prop.name, value=name)
            values.append(value)
        user, password = values
        expires_at = time.time() + self.expiration
        return Credential(user, password, expires_at, CODE)


# --- the plugin -------------------------------------------------------------------------------


class AwsSecretsManagerPlugin(AuthPlugin):
    """Logs every physical connect in with the user and password of the configured secret.

    Besides the base class's refetch-and-retry, it notes which passwords the server refused
    (digests), so that the refetch can tell a rotation in progress (``AWSCURRENT`` still
    holds the refused password) and use the ``AWSPENDING`` version instead."""

    code = CODE

    def provider(self) -> CredentialProvider:
        return SecretsManagerProvider(self.ctx.settings, self.ctx.decide)

    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        provider = self._the_provider()
        key = provider.key(ctx)

        def noting(applied: ConnectContext) -> Any:
            password = applied.args.get("password")
            started = time.monotonic()
            try:
                conn = proceed(applied)
            except Exception as exc:
                if isinstance(password, str) and ctx.driver.is_auth_failure(exc):
                    _REFUSED.add(key, password)
                raise
            if isinstance(password, str):
                _REFUSED.discard(key, password, started)
            return conn

        return super().connect(ctx, noting)
