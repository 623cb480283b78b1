"""The simulator's IAM token verifier, run by the PAM module ``pam_rdbsim_iam`` for each login.

Standalone on purpose (it starts for every IAM login, as the server's OS user): the standard
library and botocore only, never the simulator package. Usage, as the PAM module runs it::

    python -I verify.py [--path DIR] USER < token   # exit 0: accept; anything else: refuse

(``--path``: the directory botocore is imported from, the simulator's site-packages: the
interpreter may be the system's, since the server's OS user cannot always run the one the
simulator runs on.)

The working directory is the server's data directory (the PAM module runs inside the server
process); the instance's IAM settings are in ``../iam.json`` (written by
:mod:`simulator.iam`): the host names the token may name, the port, the region, the IAM users
and the credentials tokens must be signed with. The token is what boto3's
``generate_db_auth_token`` returns: a SigV4 presigned ``https://HOST:PORT/?Action=connect&
DBUser=USER&X-Amz-...`` URL without its scheme. The verifier re-derives the signature with
botocore's ``SigV4QueryAuth`` at the token's own ``X-Amz-Date`` and compares in constant time,
and checks the validity window, host, port, user, region and service. A refusal prints one
line (the reason, never the token) to stderr, which is the server's log.
"""

from __future__ import annotations

import hmac
import json
import os
import sys
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlsplit

#: The longest validity RDS accepts in a token (15 minutes).
MAX_EXPIRES = 900
#: Clock skew tolerated for an X-Amz-Date in the future.
MAX_SKEW = 300.0
_TIMESTAMP = "%Y%m%dT%H%M%SZ"
_AUTH_PARAMS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                "X-Amz-SignedHeaders", "X-Amz-Signature")


class RefusedError(Exception):
    """The token is not valid for this login; the message says why (never the token)."""


def _signature(credential: dict[str, Any], host: str, port: int, user: str, region: str,
               timestamp: str, expires: int) -> str:
    """The signature a token for these values would carry, derived by botocore."""
    from botocore.auth import SigV4QueryAuth  # type: ignore[import-untyped]
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
    from botocore.credentials import Credentials  # type: ignore[import-untyped]

    credentials = Credentials(credential["access_key_id"], credential["secret_access_key"],
                              credential.get("session_token"))
    request = AWSRequest(method="GET", url=f"https://{host}:{port}/",
                         data={"Action": "connect", "DBUser": user})
    auth = SigV4QueryAuth(credentials, "rds-db", region, expires=expires)
    # SigV4Auth.add_auth with the token's timestamp instead of the current time.
    request.context["timestamp"] = timestamp
    auth._modify_request_before_signing(request)
    canonical = auth.canonical_request(request)
    return str(auth.signature(auth.string_to_sign(request, canonical), request))


def _credential(config: dict[str, Any], key: str) -> dict[str, Any]:
    """The trusted credentials with access key id ``key``."""
    found: dict[str, Any] | None = None
    for credential in config["credentials"]:
        # Every entry is compared, so the time taken does not depend on which one matches.
        if hmac.compare_digest(str(credential["access_key_id"]).encode(), key.encode()):
            found = credential
    if found is None:
        raise RefusedError("signed with an access key the simulator does not trust")
    return found


def check(token: str, user: str, config: dict[str, Any], now: datetime) -> None:
    """Raise :class:`RefusedError` unless ``token`` lets ``user`` log in to this instance now."""
    if "://" in token:
        raise RefusedError("the token must not carry a URL scheme")
    parts = urlsplit(f"https://{token}")
    try:
        host, port = parts.hostname or "", parts.port
    except ValueError:
        raise RefusedError("the token's port is not a number") from None
    pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    params = dict(pairs)
    if len(params) != len(pairs):
        raise RefusedError("a parameter occurs twice")
    key = params.get("X-Amz-Credential", "").split("/")[0]
    credential = _credential(config, key)
    expected = {"Action", "DBUser", *_AUTH_PARAMS}
    if credential.get("session_token") is not None:
        expected.add("X-Amz-Security-Token")
    if set(params) != expected or parts.path != "/" or parts.fragment or parts.username:
        raise RefusedError(f"unexpected token shape (parameters {sorted(params)})")
    if params["Action"] != "connect":
        raise RefusedError("Action is not connect")
    if params["DBUser"] != user or user not in config["users"]:
        raise RefusedError(f"the token is for user {params['DBUser']!r}, not {user!r} (or "
                           f"{user!r} is not an IAM user of this instance)")
    if host not in config["hosts"]:
        raise RefusedError(f"host {host!r} is not a name of this instance in its current role "
                           f"(accepted: {', '.join(config['hosts'])})")
    if port != config["port"]:
        raise RefusedError(f"port {port} is not this instance's port {config['port']}")
    if params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        raise RefusedError("algorithm is not AWS4-HMAC-SHA256")
    if params["X-Amz-SignedHeaders"] != "host":
        raise RefusedError("signed headers are not 'host'")
    scope = params["X-Amz-Credential"].split("/")
    if len(scope) != 5 or scope[3:] != ["rds-db", "aws4_request"]:
        raise RefusedError("the credential scope is not <key>/<date>/<region>/rds-db/aws4_request")
    day, region = scope[1:3]
    session_token = credential.get("session_token")
    if session_token is not None and not hmac.compare_digest(
            params["X-Amz-Security-Token"].encode(), str(session_token).encode()):
        raise RefusedError("X-Amz-Security-Token is not the session token of the access key")
    if region != config["region"]:
        raise RefusedError(f"region {region!r} is not this instance's region {config['region']!r}")
    timestamp = params["X-Amz-Date"]
    try:
        signed_at = datetime.strptime(timestamp, _TIMESTAMP).replace(tzinfo=timezone.utc)
        expires = int(params["X-Amz-Expires"])
    except ValueError:
        raise RefusedError("X-Amz-Date or X-Amz-Expires is malformed") from None
    if day != timestamp[:8]:
        raise RefusedError("the credential scope's date is not the X-Amz-Date's")
    if not 0 < expires <= MAX_EXPIRES:
        raise RefusedError(f"X-Amz-Expires={expires} is outside 1..{MAX_EXPIRES}")
    if signed_at - now > timedelta(seconds=MAX_SKEW):
        raise RefusedError("X-Amz-Date is in the future")
    if now > signed_at + timedelta(seconds=expires):
        expired = signed_at + timedelta(seconds=expires)
        raise RefusedError(f"the token expired at {expired:%H:%M:%S} UTC")
    wanted = _signature(credential, host, config["port"], user, region, timestamp, expires)
    if not hmac.compare_digest(wanted.encode(), params["X-Amz-Signature"].encode()):
        raise RefusedError("the signature does not match")


def main(argv: list[str]) -> int:
    args = argv[1:]
    if len(args) == 3 and args[0] == "--path":
        sys.path.insert(0, args.pop(1))  # where botocore is (the simulator's environment)
        args.pop(0)
    if len(args) != 1:
        print("usage: verify.py [--path DIR] USER < token", file=sys.stderr)
        return 2
    user = args[0]
    try:
        with open(os.path.join(os.getcwd(), os.pardir, "iam.json"), encoding="utf-8") as f:
            config = json.load(f)
        token = sys.stdin.read(65536).strip()
        check(token, user, config, datetime.now(timezone.utc))
    except RefusedError as exc:
        print(f"rdbsim-iam: refused IAM login of {user!r}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # any failure refuses the login
        print(f"rdbsim-iam: refused IAM login of {user!r}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
