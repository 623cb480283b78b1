"""``iam``: IAM database authentication (``docs/plugins/iam.md``).

Every physical connect logs in with an RDS IAM auth token instead of a password: a SigV4
presigned ``connect`` request for (host, port, user, region), signed locally by botocore's
``generate_db_auth_token`` with the process's AWS credentials (boto3's default chain; no
network call). Tokens are cached per (host, port, user, region) in the process-wide credential
cache and reused for ``iam_expiration`` (RDS accepts one for 15 minutes), generated again ahead
of expiry, and replaced at once when the server refuses one (``resilient_db.auth``).

psycopg sends the token as the password (libpq answers the server's cleartext password
request; use ``sslmode`` as RDS requires). mysql-connector sends it with
``mysql_clear_password``, which the driver allows only over TLS; tokens are longer than 255
bytes, which the pure-Python driver sends as a length-encoded string (verified in
``tests/test_iam.py``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

from .. import rds
from .._params import IAM_DEFAULT_PORT, IAM_EXPIRATION, IAM_HOST, IAM_REGION
from .._pipeline import ConnectContext
from .._properties import Settings
from ..auth import AuthPlugin, Credential, CredentialProvider
from ..errors import ConfigurationError

__all__ = ["IamPlugin", "IamProvider", "TokenGenerator", "boto3_token", "region_of"]

log = logging.getLogger("resilient_db.plugins.iam")

#: ``generate(host, port, user, region) -> token``.
TokenGenerator = Callable[[str, int, str, str], str]

_clients_lock = threading.Lock()
_clients: dict[str, Any] = {}


def _rds_client(region: str) -> Any:
    """One botocore RDS client per region, shared (clients are thread-safe; creating one costs
    tens of milliseconds, which a connect must not pay)."""
    client = _clients.get(region)
    if client is None:
        with _clients_lock:
            client = _clients.get(region)
            if client is None:
                try:
                    import boto3
                except ImportError:
                    raise ConfigurationError(
                        "the iam plugin needs boto3: pip install 'resilient_db[aws]'",
                        parameter="plugins", value="iam") from None
                # A session per client: boto3's default session is not thread-safe.
                client = boto3.session.Session().client("rds", region_name=region)
                _clients[region] = client
    return client


def forget_clients() -> None:
    """Drop the cached RDS clients (tests that change AWS credentials; after ``fork()``)."""
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()


def boto3_token(host: str, port: int, user: str, region: str) -> str:
    """An RDS IAM auth token from boto3's default credential chain (local signing)."""
    from botocore.exceptions import NoCredentialsError  # type: ignore[import-untyped]

    try:
        token: str = _rds_client(region).generate_db_auth_token(
            DBHostname=host, Port=port, DBUsername=user, Region=region)
    except NoCredentialsError:
        raise ConfigurationError(
            "iam: no AWS credentials to sign the token with; give the process credentials "
            "boto3 finds (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a shared "
            "credentials file, or a container or instance role)",
            parameter="plugins", value="iam") from None
    return token


def region_of(host: str) -> str | None:
    """The AWS region an RDS endpoint name is in (commercial, GovCloud and China layouts);
    ``None`` for any other name and for global endpoints."""
    return rds.classify(host).region


class IamProvider(CredentialProvider):
    """IAM tokens for one connection's settings. ``generate``: the token function (tests and
    benchmarks count calls with their own)."""

    code: ClassVar[str] = "iam"

    def __init__(self, settings: Settings, default_port: int,
                 generate: TokenGenerator | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.host = settings[IAM_HOST]
        port = settings[IAM_DEFAULT_PORT]
        self.port = port or None  # 0: unset, as in the AWS wrapper
        self.region = settings[IAM_REGION]
        expiration = settings[IAM_EXPIRATION]
        self.expiration = 870.0 if expiration is None else expiration
        self.refresh_before = min(60.0, self.expiration * 0.1)
        self.default_port = default_port
        self.generate = boto3_token if generate is None else generate
        self.clock = clock

    def target(self, ctx: ConnectContext) -> tuple[str, int, str, str]:
        """(host, port, user, region) the token for ``ctx`` is signed for."""
        host = self.host or ctx.host.host
        if self.host is None and _is_address(host):
            raise ConfigurationError(
                f"iam: the connection's host {host!r} is an IP address, but an IAM token "
                "names the endpoint the database knows; connect by name or set iam_host",
                parameter="iam_host", value=None)
        port = self.port or ctx.host.port or self.default_port
        user = ctx.driver.user_of(ctx.args)
        if not user:
            raise ConfigurationError(
                "iam: no database user given; set user (the database user mapped to IAM, "
                "e.g. granted rds_iam on PostgreSQL or IDENTIFIED WITH AWSAuthenticationPlugin "
                "on MySQL)", parameter="user", value=None)
        region = self.region or region_of(host)
        if region is None:
            raise ConfigurationError(
                f"iam: cannot tell the AWS region from the host {host!r} (not an RDS "
                "endpoint name); set iam_region, e.g. iam_region='us-east-1'",
                parameter="iam_region", value=None)
        return host, port, user, region

    def key(self, ctx: ConnectContext) -> Hashable:
        return ("iam", *self.target(ctx))

    def fetch(self, ctx: ConnectContext) -> Credential:
        host, port, user, region = self.target(ctx)
        issued = self.clock()
        token = self.generate(host, port, user, region)
        log.debug("iam: generated a token for %s@%s:%s (%s)", user, host, port, region)
        return Credential(None, token, issued + self.expiration, self.code, clear_text=True)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class IamPlugin(AuthPlugin):
    """IAM database authentication on every physical connect."""

    code = "iam"
    #: Replaced by tests and benchmarks to count or fake token generation.
    generate: ClassVar[TokenGenerator | None] = None

    def provider(self) -> CredentialProvider:
        return IamProvider(self.ctx.settings, self.ctx.driver.default_port,
                           generate=type(self).generate)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget_clients)
