"""Parsing connection information: libpq key/value strings and postgresql:// / mysql:// URIs.

Pure functions. The result is a flat ``dict[str, str]`` in the target driver's own key names
(``dbname`` for psycopg, ``database`` for mysql-connector); splitting it into driver arguments
and resilient_db properties happens in :mod:`resilient_db._connect`.
"""

from __future__ import annotations

import difflib
import re
from urllib.parse import parse_qsl, unquote

from .errors import ConfigurationError

PG_SCHEMES = ("postgresql", "postgres")
MYSQL_SCHEMES = ("mysql",)

#: What errors show instead of a secret.
REDACTED = "***"
#: Parts of a key name that mark its value as secret (password, passwd, pwd, sslpassword,
#: auth tokens, ...).
_SECRET_PARTS = ("pass", "pwd", "secret", "token", "credential", "private", "apikey",
                 "api_key", "auth")
# Misspellings of the above are secret too: a mistyped password key is still a password.
_SECRET_WORDS = ("password", "passwd", "secret", "token")


def looks_secret(key: str) -> bool:
    """Whether the value of a parameter named ``key`` (perhaps misspelled) may be a secret."""
    low = key.strip().lower().replace("-", "_")
    if low in ("pw", "pin") or any(part in low for part in _SECRET_PARTS):
        return True
    return bool(difflib.get_close_matches(low, _SECRET_WORDS, n=1, cutoff=0.7))


# key = value pairs, values quoted or not; a bare word (no '=') is matched too, so that the
# words of an unquoted password with a space in it are caught after its key.
_PAIR = re.compile(
    r"""(?P<key>[^\s=]+)
        (?:(?P<eq>\s*=\s*)
           (?P<value>'(?:[^'\\]|\\.)*'?    # quoted, perhaps unterminated
                    |(?:\\.|\S)*))?         # bare
    """,
    re.VERBOSE,
)


def redact(conninfo: str) -> str:
    """``conninfo`` (a key/value string or a URI, well formed or not) with every secret value
    replaced by ``***``, for error messages and logs."""
    if uri_scheme(conninfo) is not None:
        return _redact(conninfo)
    out: list[str] = []
    pos = 0
    hiding = False  # after a secret key's value: bare words may be the rest of it
    for match in _PAIR.finditer(conninfo):
        out.append(conninfo[pos:match.start()])
        pos = match.end()
        key = match.group("key")
        if match.group("eq") is None:
            out.append(REDACTED if hiding else key)
            continue
        hiding = looks_secret(key)
        value = REDACTED if hiding else match.group("value")
        out.append(f"{key}{match.group('eq')}{value}")
    out.append(conninfo[pos:])
    return "".join(out)


def parse(conninfo: str, *, database_key: str) -> dict[str, str]:
    """Parse ``conninfo`` (key/value string or URI) into a dict.

    ``database_key`` is the driver's name for the database (``dbname`` or ``database``), used
    for the path part of a URI. An empty string gives an empty dict.
    """
    if not isinstance(conninfo, str):
        raise ConfigurationError(
            f"conninfo must be a string (key=value pairs or a URI), not "
            f"{type(conninfo).__name__}; pass connection parameters as keyword arguments "
            "instead",
            parameter="conninfo",
            # Not the object itself: a dict or bytes conninfo may hold a password.
            value=f"<{type(conninfo).__name__}>",
        )
    stripped = conninfo.strip()
    if "://" in stripped.split(" ", 1)[0]:
        return parse_uri(stripped, database_key=database_key)
    return parse_keyvalue(stripped)


def parse_keyvalue(conninfo: str) -> dict[str, str]:
    """Parse libpq's ``key=value key2='quoted \\' value'`` syntax."""
    result: dict[str, str] = {}
    i, n = 0, len(conninfo)
    previous = ""  # the key before, to keep the rest of an unquoted secret out of errors
    while True:
        while i < n and conninfo[i].isspace():
            i += 1
        if i >= n:
            return result
        start = i
        while i < n and conninfo[i] != "=" and not conninfo[i].isspace():
            i += 1
        key = conninfo[start:i]
        while i < n and conninfo[i].isspace():
            i += 1
        if i >= n or conninfo[i] != "=":
            if previous and looks_secret(previous):
                raise ConfigurationError(
                    f"malformed conninfo: the text at position {start}, after the value of "
                    f"{previous!r}, is not followed by '='; quote a value that contains "
                    f"spaces: {previous}='...'",
                    parameter="conninfo",
                    value=redact(conninfo),
                )
            raise ConfigurationError(
                f"malformed conninfo: {key!r} at position {start} is not followed by '='; "
                "expected space-separated key=value pairs such as 'host=db dbname=app'",
                parameter="conninfo",
                value=redact(conninfo),
            )
        if not key:
            raise ConfigurationError(
                f"malformed conninfo: '=' without a key at position {start}",
                parameter="conninfo",
                value=redact(conninfo),
            )
        i += 1
        while i < n and conninfo[i].isspace():
            i += 1
        value_chars: list[str] = []
        if i < n and conninfo[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ConfigurationError(
                        f"malformed conninfo: unterminated quoted value for {key!r}",
                        parameter=key,
                        value=redact(conninfo),
                    )
                ch = conninfo[i]
                if ch == "\\" and i + 1 < n:
                    value_chars.append(conninfo[i + 1])
                    i += 2
                elif ch == "'":
                    i += 1
                    break
                else:
                    value_chars.append(ch)
                    i += 1
        else:
            while i < n and not conninfo[i].isspace():
                if conninfo[i] == "\\" and i + 1 < n:
                    value_chars.append(conninfo[i + 1])
                    i += 2
                else:
                    value_chars.append(conninfo[i])
                    i += 1
        result[key] = "".join(value_chars)
        previous = key


def parse_uri(uri: str, *, database_key: str) -> dict[str, str]:
    """Parse ``scheme://user:password@host1:port1,host2:port2/dbname?key=value``."""
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if scheme not in PG_SCHEMES + MYSQL_SCHEMES:
        raise ConfigurationError(
            f"malformed conninfo: unsupported URI scheme {scheme!r}; use postgresql:// or "
            "mysql://",
            parameter="conninfo",
            value=_redact(uri),
        )
    result: dict[str, str] = {}
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, has_password, password = userinfo.partition(":")
        if user:
            result["user"] = unquote(user)
        if has_password:
            result["password"] = unquote(password)
    elif "@" in uri.partition("://")[2] and ":" in netloc:
        # An unencoded '/' or '?' in the password ends the authority early, so the password
        # would be read as a port and shown in the error: name the cause instead.
        try:
            for item in netloc.split(","):
                _split_host_port(item, uri)
        except ConfigurationError:
            raise ConfigurationError(
                "malformed conninfo: the URI's authority (user:password@host:port) ends at a "
                "'/' or '?' before its '@'; percent-encode those characters in the password "
                "(%2F for '/', %3F for '?', %40 for '@')",
                parameter="conninfo",
                value=_redact(uri),
            ) from None
    hosts: list[str] = []
    ports: list[str] = []
    for item in netloc.split(",") if netloc else []:
        host, port = _split_host_port(item, uri)
        hosts.append(host)
        ports.append(port)
    if any(hosts):
        result["host"] = ",".join(hosts)
    if any(ports):
        result["port"] = ",".join(ports)
    if path:
        result[database_key] = unquote(path)
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if not key:
            raise ConfigurationError(
                "malformed conninfo: empty parameter name in the URI query string",
                parameter="conninfo",
                value=_redact(uri),
            )
        result[key] = value
    return result


def uri_scheme(conninfo: str) -> str | None:
    """The URI scheme of ``conninfo`` (lower case), or ``None`` for a key/value string."""
    head = conninfo.strip().split(" ", 1)[0]
    return head.partition("://")[0].lower() if "://" in head else None


def _split_host_port(item: str, uri: str) -> tuple[str, str]:
    if item.startswith("["):
        end = item.find("]")
        if end < 0:
            raise ConfigurationError(
                f"malformed conninfo: unterminated '[' in host {item!r}",
                parameter="host",
                value=_redact(uri),
            )
        host, after = item[1:end], item[end + 1 :]
        port = after[1:] if after.startswith(":") else ""
        if after and not after.startswith(":"):
            raise ConfigurationError(
                f"malformed conninfo: unexpected {after!r} after IPv6 address",
                parameter="host",
                value=_redact(uri),
            )
    else:
        host, _, port = item.partition(":")
    host = unquote(host)
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigurationError(
            f"malformed conninfo: port {port!r} of host {host!r} is not a number between 1 "
            "and 65535",
            parameter="port",
            value=port,
        )
    return host, port


def _hide_password(userinfo: str) -> str:
    user, has_password, _ = userinfo.partition(":")
    return f"{user}:{REDACTED}" if has_password else user


def _redact(uri: str) -> str:
    """The URI with any password (user info or a secret query parameter) replaced, for error
    messages."""
    scheme, sep, rest = uri.partition("://")
    authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    if "@" in authority:
        userinfo, _, after = authority.rpartition("@")
        rest = _hide_password(userinfo) + "@" + after + rest[len(authority):]
    elif "@" in rest and not authority.rpartition(":")[2].isdigit():
        # No '@' before the first '/' or '?', yet one later and no numeric port: a password
        # with an unencoded '/' or '?'. Hide up to the last '@' (at worst, more than needed).
        userinfo, _, after = rest.rpartition("@")
        rest = _hide_password(userinfo) + "@" + after
    rest, qmark, query = rest.partition("?")
    pairs = []
    for pair in query.split("&") if query else []:
        key, eq, _ = pair.partition("=")
        pairs.append(f"{key}={REDACTED}" if eq and looks_secret(unquote(key)) else pair)
    return f"{scheme}{sep}{rest}{qmark}{'&'.join(pairs)}"
