"""Signing in at an identity provider to get a SAML assertion: ADFS and Okta.

Both flows are plain HTTPS conversations done with the standard library (``urllib``), one
cookie jar per sign-in, every request bounded (``http_request_connect_timeout``):

- ADFS (IdP-initiated sign-on): GET ``/adfs/ls/IdpInitiatedSignOn.aspx?loginToRp=<rp>``, a
  page with a sign-in form; fill its user name and password fields, keep its other inputs
  (hidden ones, ``AuthMethod``), POST it to the form's action; the answer is a page with a
  hidden ``SAMLResponse`` input (the one a browser would auto-post to AWS).
- Okta: POST ``/api/v1/authn`` with the user name and password as JSON; a ``SUCCESS``
  answer carries a one-time ``sessionToken``; GET the Amazon Web Services app's SAML URL
  ``/app/amazon_aws/<app_id>/sso/saml?onetimetoken=<token>``: a page with the
  ``SAMLResponse`` input.

Errors name the identity provider, the URL path and the user, never the password, the session
token or the assertion (all three are bearer secrets). Error pages of the IdP are not echoed
(they can quote what was posted), except the short error text ADFS shows on its form
(``errorText``) and Okta's ``errorSummary``.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from typing import Any

from ._errors import FederatedAuthError

__all__ = ["IdpSettings", "adfs_saml_assertion", "okta_saml_assertion"]

#: Larger IdP answers are refused: a sign-in page is a few tens of kilobytes, a SAML response
#: a few kilobytes; an endless body must not fill memory.
MAX_RESPONSE_BYTES = 2 * 1024 * 1024
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class IdpSettings:
    """Where and as whom to sign in. ``port`` ``None``: the scheme's default (443)."""

    kind: str  # "ADFS" or "Okta", for messages
    host: str
    port: int | None
    username: str
    password: str = field(repr=False)
    timeout: float
    verify: bool

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"https://{host}" + ("" if self.port is None else f":{self.port}")

    def where(self, path: str) -> str:
        """The IdP and path for messages (no query string: it may hold a one-time token)."""
        return f"{self.kind} at {self.origin}{path.split('?', 1)[0]}"


def split_endpoint(endpoint: str) -> tuple[str, int | None]:
    """``idp_endpoint`` as (host, port from the endpoint or ``None``); an ``https://`` prefix
    and a trailing slash are dropped (the property's validator refused anything else)."""
    text = endpoint.strip().removeprefix("https://").rstrip("/")
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port.isdigit() else None
    if text.count(":") == 1:
        host, port = text.split(":")
        if port.isdigit():
            return host, int(port)
    return text, None


# --- HTTP ------------------------------------------------------------------------------------

class _NoCrossOriginRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects only within the IdP's origin: a sign-in conversation that wanders off
    to another host is not one this code understands (and must not carry cookies there)."""

    def __init__(self, origin: str) -> None:
        self._origin = origin

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        if _origin_of(newurl) != self._origin:
            raise FederatedAuthError(
                f"the identity provider at {self._origin} redirected to another site "
                f"({_origin_of(newurl)}); check idp_endpoint")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _origin_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = parts.port
    return f"{parts.scheme}://{host}" + ("" if port in (None, 443) else f":{port}")


def _ssl_context(verify: bool) -> ssl.SSLContext:
    if verify:
        return ssl.create_default_context()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _Session:
    """One sign-in conversation: a cookie jar, TLS settings and the request bound."""

    def __init__(self, idp: IdpSettings) -> None:
        self.idp = idp
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=_ssl_context(idp.verify)),
            urllib.request.HTTPCookieProcessor(CookieJar()),
            _NoCrossOriginRedirect(_origin_of(idp.origin)),
        )

    def request(self, path_or_url: str, *, data: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, str, str]:
        """(status, body, final URL). HTTP error statuses are returned, not raised; network
        failures, timeouts and TLS failures raise :class:`FederatedAuthError`."""
        idp = self.idp
        url = path_or_url if "://" in path_or_url else idp.origin + path_or_url
        path = urllib.parse.urlsplit(url).path
        request = urllib.request.Request(url, data=data, headers=headers or {},
                                         method="POST" if data is not None else "GET")
        request.add_header("User-Agent", "resilient_db")
        deadline = time.monotonic() + idp.timeout
        try:
            try:
                response = self._opener.open(request, timeout=idp.timeout)
            except urllib.error.HTTPError as exc:
                response = exc  # an HTTPError is a response too (status, headers, body)
            with response:
                body = _read_bounded(response, deadline, idp, path)
                status = int(response.status or 0)
                final = response.geturl() or url
        except FederatedAuthError:
            raise
        except TimeoutError as exc:
            raise FederatedAuthError(
                f"{idp.where(path)} did not answer within {idp.timeout:g} s "
                "(http_request_connect_timeout)") from exc
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise FederatedAuthError(
                    f"{idp.where(path)} did not answer within {idp.timeout:g} s "
                    "(http_request_connect_timeout)") from exc
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise FederatedAuthError(
                    f"{idp.where(path)}: TLS certificate not trusted ({reason.verify_message}); "
                    "install the IdP's CA in the system store or SSL_CERT_FILE (ssl_secure=false "
                    "turns verification off, for tests only)") from exc
            raise FederatedAuthError(f"{idp.where(path)} unreachable: {reason}") from exc
        except (OSError, ValueError) as exc:  # reset connections, bad status lines, ...
            raise FederatedAuthError(
                f"{idp.where(path)}: request failed ({type(exc).__name__}: {exc})") from exc
        return status, body, final


def _read_bounded(response: Any, deadline: float, idp: IdpSettings, path: str) -> str:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = response.read(_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise FederatedAuthError(
                f"{idp.where(path)}: answer larger than {MAX_RESPONSE_BYTES} bytes; refused")
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise FederatedAuthError(
                f"{idp.where(path)} did not finish its answer within {idp.timeout:g} s "
                "(http_request_connect_timeout)")
    charset = response.headers.get_content_charset() if response.headers else None
    return b"".join(chunks).decode(charset or "utf-8", errors="replace")


# --- HTML ------------------------------------------------------------------------------------

@dataclass
class _Form:
    action: str | None
    method: str
    inputs: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, value)


class _Page(HTMLParser):
    """The forms and inputs of a page (inputs outside any form go to a form of their own),
    plus the text of the element ``id="errorText"`` (where ADFS puts its sign-in error)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_Form] = []
        self._loose = _Form(None, "get")
        self._current: _Form | None = None
        self.error_text = ""
        self._in_error = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k.lower(): (v or "") for k, v in attrs}
        if tag == "form":
            self._current = _Form(values.get("action"), values.get("method", "get").lower())
            self.forms.append(self._current)
        elif tag == "input":
            name = values.get("name", "")
            if name:
                form = self._current or self._loose
                form.inputs.append((name, values.get("type", "text").lower(),
                                    values.get("value", "")))
        if self._in_error:
            self._in_error += 1
        elif values.get("id") == "errorText":
            self._in_error = 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        in_error = self._in_error
        self.handle_starttag(tag, attrs)
        self._in_error = in_error  # a void element opens nothing

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None
        if self._in_error:
            self._in_error -= 1

    def handle_data(self, data: str) -> None:
        if self._in_error:
            self.error_text += data

    def all_forms(self) -> list[_Form]:
        return [*self.forms, self._loose]


def _parse(body: str) -> _Page:
    page = _Page()
    page.feed(body)
    page.close()
    return page


def _saml_response(page: _Page) -> str | None:
    for form in page.all_forms():
        for name, _, value in form.inputs:
            if name == "SAMLResponse" and value.strip():
                return value.strip()
    return None


def _error_text(page: _Page) -> str:
    text = " ".join(page.error_text.split())
    return f": the IdP says {text[:200]!r}" if text else ""


# --- ADFS ------------------------------------------------------------------------------------

def adfs_saml_assertion(idp: IdpSettings, relying_party: str) -> str:
    """Sign in at ADFS (IdP-initiated sign-on for ``relying_party``) and return the base64
    SAML response. Raises :class:`FederatedAuthError`."""
    session = _Session(idp)
    page_path = ("/adfs/ls/IdpInitiatedSignOn.aspx?loginToRp="
                 + urllib.parse.quote(relying_party, safe=""))
    status, body, page_url = session.request(page_path)
    if status // 100 != 2:
        raise FederatedAuthError(
            f"{idp.where(page_path)} answered HTTP {status} to the sign-on page request; check "
            "idp_endpoint, idp_port and rp_identifier")
    page = _parse(body)
    form = next((f for f in page.all_forms()
                 if any("password" in name.lower() for name, _, _ in f.inputs)), None)
    if form is None:
        saml = _saml_response(page)
        if saml is not None:  # already signed in (integrated authentication)
            return saml
        raise FederatedAuthError(
            f"{idp.where(page_path)}: the sign-on page has no sign-in form with a password "
            f"field (rp_identifier {relying_party!r}); is this an ADFS IdP-initiated sign-on "
            "page?")
    fields: dict[str, str] = {}
    for name, _, value in form.inputs:
        low = name.lower()
        if "username" in low:
            fields[name] = idp.username
        elif "password" in low:
            fields[name] = idp.password
        elif "authmethod" in low:
            if value:
                fields[name] = value
        else:
            fields[name] = value
    action = urllib.parse.urljoin(page_url, form.action or "")
    if _origin_of(action) != _origin_of(idp.origin):
        raise FederatedAuthError(
            f"{idp.where(page_path)}: the sign-in form posts to another site "
            f"({_origin_of(action)}); the password is not sent there")
    action_path = urllib.parse.urlsplit(action).path
    status, body, _ = session.request(
        action, data=urllib.parse.urlencode(fields).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    if status // 100 != 2:
        raise FederatedAuthError(
            f"{idp.where(action_path)} answered HTTP {status} to the sign-in of user "
            f"{idp.username!r}")
    answer = _parse(body)
    saml = _saml_response(answer)
    if saml is None:
        raise FederatedAuthError(
            f"{idp.where(action_path)} refused the sign-in of user {idp.username!r} (no SAML "
            f"response in its answer){_error_text(answer)}; check idp_username and "
            "idp_password")
    return saml


# --- Okta ------------------------------------------------------------------------------------

OKTA_APP = "amazon_aws"


def okta_saml_assertion(idp: IdpSettings, app_id: str) -> str:
    """Sign in at Okta (authn API, then the AWS app's SAML URL with the one-time token) and
    return the base64 SAML response. Raises :class:`FederatedAuthError`."""
    session = _Session(idp)
    authn = "/api/v1/authn"
    status, body, _ = session.request(
        authn, data=json.dumps({"username": idp.username, "password": idp.password}).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"})
    answer = _json(body)
    if status // 100 != 2:
        summary = answer.get("errorSummary") if isinstance(answer, dict) else None
        said = f": the IdP says {str(summary)[:200]!r}" if summary else ""
        verdict = "refused the sign-in of" if status in (400, 401, 403) else (
            f"answered HTTP {status} to the sign-in of")
        raise FederatedAuthError(
            f"{idp.where(authn)} {verdict} user {idp.username!r} (HTTP {status}){said}; check "
            "idp_username and idp_password")
    if not isinstance(answer, dict):
        raise FederatedAuthError(f"{idp.where(authn)}: the answer is not a JSON object")
    state = answer.get("status")
    token = answer.get("sessionToken")
    if state != "SUCCESS" or not isinstance(token, str) or not token:
        raise FederatedAuthError(
            f"{idp.where(authn)}: the sign-in of user {idp.username!r} ended in state "
            f"{state!r}, not SUCCESS (multi-factor authentication, password expiry and "
            "account lockout need a browser sign-in; this plugin cannot complete them)")
    app_path = (f"/app/{OKTA_APP}/{urllib.parse.quote(app_id, safe='')}/sso/saml")
    status, body, _ = session.request(
        app_path + "?" + urllib.parse.urlencode({"onetimetoken": token}))
    if status // 100 != 2:
        raise FederatedAuthError(
            f"{idp.where(app_path)} answered HTTP {status} to the SAML request of user "
            f"{idp.username!r}; check app_id ({app_id!r}) and that the user is assigned the "
            "app")
    saml = _saml_response(_parse(body))
    if saml is None:
        raise FederatedAuthError(
            f"{idp.where(app_path)} returned no SAML response for user {idp.username!r}; "
            f"check app_id ({app_id!r}) and that the user is assigned the app")
    return saml


def _json(body: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
