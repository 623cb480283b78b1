"""A local identity provider for the federated-auth tests: ADFS and Okta sign-in over HTTPS.

One threaded ``http.server`` on loopback, TLS with a certificate made for the run (its CA file
is :attr:`LocalIdp.ca_file`, to trust it with ``SSL_CERT_FILE``), serving the two sign-in
conversations as the real services do:

- ADFS, IdP-initiated sign-on: ``GET /adfs/ls/IdpInitiatedSignOn.aspx?loginToRp=<rp>`` gives
  the sign-in page (a form with ``UserName``, ``Password``, a hidden ``AuthMethod``, a
  ``client-request-id`` in its action, and a session cookie); POSTing it back with the right
  password (and the cookie, unless :attr:`require_cookie` is off) gives the auto-post page
  with a hidden ``SAMLResponse``; a wrong password gives the sign-in page again with ADFS's
  ``errorText``.
- Okta: ``POST /api/v1/authn`` (JSON user name and password) answers ``SUCCESS`` with a
  one-time ``sessionToken`` (or 401 ``E0000004 Authentication failed``);
  ``GET /app/amazon_aws/<app_id>/sso/saml?onetimetoken=<token>`` answers the app form with
  the hidden ``SAMLResponse`` (one input per line, ``+`` and ``=`` as character references,
  as Okta writes it); a used or unknown token gets the Okta sign-in page (no
  ``SAMLResponse``).

The SAML response is the XML AWS expects (``samlp:Response`` / ``saml:Assertion`` with the
``Role``, ``RoleSessionName`` and ``SessionDuration`` attributes, ``NotOnOrAfter`` limits),
unsigned: moto's STS does not check signatures. Knobs: :attr:`assertion_lifetime` (negative:
an already expired assertion), :attr:`roles`, :attr:`malformed` (an assertion without its
``Assertion`` element: STS refuses it), :attr:`hang` (hold every request until stopped, to
test timeouts), :attr:`delay` (a slow IdP). :attr:`requests` counts requests by path. The
AWS Advanced Python Wrapper's own ADFS and Okta clients sign in at it too (a cross-check in
``tests/test_federated_auth.py``).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import secrets
import ssl
import tempfile
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

ACCOUNT = "123456789012"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/db-access"
ADFS_ARN = f"arn:aws:iam::{ACCOUNT}:saml-provider/adfs"
OKTA_ARN = f"arn:aws:iam::{ACCOUNT}:saml-provider/okta"
RP = "urn:amazon:webservices"
APP_ID = "0oa1b2c3d4EXAMPLE"

_ADFS_PATH = "/adfs/ls/IdpInitiatedSignOn.aspx"
_COOKIE = "MSISSamlRequest"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed CA certificate for localhost / 127.0.0.1 (cert file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "resilient_db test IdP")])
    now = dt.datetime.now(dt.timezone.utc)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "idp-cert.pem", directory / "idp-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_file, key_file


def _xs(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class LocalIdp:
    """The identity provider (a context manager). ``users``: user name -> password."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = dict(users)
        #: (role, provider) pairs granted; ``None``: the one role with the flow's provider
        #: (moto's STS reads a single Role value: more would make it fail).
        self.roles: list[tuple[str, str]] | None = None
        self.assertion_lifetime = 300.0
        self.session_duration = 3600
        self.malformed = False
        self.hang = False
        self.delay = 0.0  # seconds every answer waits (a slow IdP)
        #: ADFS: refuse a sign-in POST without the session cookie of the sign-in page (a
        #: client must keep cookies, as a browser does). The AWS wrapper's ADFS client keeps
        #: none: its cross-check turns this off.
        self.require_cookie = True
        #: ADFS: the sign-in form posts to another site (a client must not send it the
        #: password).
        self.foreign_action: str | None = None
        self.requests: Counter[str] = Counter()
        self.posted: list[str] = []  # raw request bodies (to check what a client sent)
        self.last_saml = ""  # the last SAML response handed out
        self._tokens: dict[str, str] = {}  # Okta session token -> user
        self._cookies: set[str] = set()
        self._stopping = threading.Event()
        self._dir = tempfile.TemporaryDirectory(prefix="idp-")
        self.ca_file, key_file = make_certificate(Path(self._dir.name))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca_file, key_file)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        # The handshake runs in the request's thread (not in the accept loop).
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self.port = int(self._server.server_address[1])
        self.endpoint = f"localhost:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True,
                                        name="test-idp")

    def __enter__(self) -> LocalIdp:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self._dir.cleanup()

    # --- the SAML response -------------------------------------------------------------------

    def saml_response(self, user: str, provider: str) -> str:
        now = dt.datetime.now(dt.timezone.utc)
        granted = self.roles if self.roles is not None else [(ROLE_ARN, provider)]
        limit = _xs(now + dt.timedelta(seconds=self.assertion_lifetime))
        roles = "".join(
            f"<saml:AttributeValue>{html.escape(arn)},{html.escape(principal)}"
            "</saml:AttributeValue>" for arn, principal in granted)
        issuer = f"<saml:Issuer>https://localhost:{self.port}/adfs/services/trust</saml:Issuer>"
        assertion = "" if self.malformed else (
            f'<saml:Assertion ID="_{secrets.token_hex(16)}" IssueInstant="{_xs(now)}" '
            f'Version="2.0">{issuer}'
            "<saml:Subject>"
            '<saml:NameID Format="urn:oasis:names:tc:SAML:2.0:nameid-format:persistent">'
            f"{html.escape(user)}</saml:NameID>"
            '<saml:SubjectConfirmation Method="urn:oasis:names:tc:SAML:2.0:cm:bearer">'
            f'<saml:SubjectConfirmationData NotOnOrAfter="{limit}" '
            'Recipient="https://signin.aws.amazon.com/saml"/>'
            "</saml:SubjectConfirmation></saml:Subject>"
            f'<saml:Conditions NotBefore="{_xs(now - dt.timedelta(minutes=5))}" '
            f'NotOnOrAfter="{limit}"><saml:AudienceRestriction>'
            "<saml:Audience>urn:amazon:webservices</saml:Audience>"
            "</saml:AudienceRestriction></saml:Conditions>"
            "<saml:AttributeStatement>"
            '<saml:Attribute Name="https://aws.amazon.com/SAML/Attributes/Role">'
            f"{roles}</saml:Attribute>"
            '<saml:Attribute Name="https://aws.amazon.com/SAML/Attributes/RoleSessionName">'
            f"<saml:AttributeValue>{html.escape(user)}</saml:AttributeValue></saml:Attribute>"
            '<saml:Attribute Name="https://aws.amazon.com/SAML/Attributes/SessionDuration">'
            f"<saml:AttributeValue>{self.session_duration}</saml:AttributeValue>"
            "</saml:Attribute>"
            "</saml:AttributeStatement>"
            f'<saml:AuthnStatement AuthnInstant="{_xs(now)}" '
            f'SessionIndex="_{secrets.token_hex(8)}"><saml:AuthnContext>'
            "<saml:AuthnContextClassRef>"
            "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
            "</saml:AuthnContextClassRef></saml:AuthnContext></saml:AuthnStatement>"
            "</saml:Assertion>")
        xml = (
            '<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
            'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" '
            f'ID="_{secrets.token_hex(16)}" Version="2.0" IssueInstant="{_xs(now)}" '
            'Destination="https://signin.aws.amazon.com/saml" '
            'Consent="urn:oasis:names:tc:SAML:2.0:consent:unspecified">'
            f"{issuer}"
            "<samlp:Status><samlp:StatusCode "
            'Value="urn:oasis:names:tc:SAML:2.0:status:Success"/></samlp:Status>'
            f"{assertion}</samlp:Response>")
        self.last_saml = base64.b64encode(xml.encode()).decode()
        return self.last_saml

    # --- pages -------------------------------------------------------------------------------

    def adfs_page(self, rp: str, error: str = "") -> str:
        action = (f"{_ADFS_PATH}?loginToRp={urllib.parse.quote(rp, safe='')}"
                  f"&amp;client-request-id={secrets.token_hex(8)}")
        if self.foreign_action is not None:
            action = self.foreign_action
        return (
            "<!DOCTYPE html><html lang=\"en-US\"><head><title>Sign In</title></head><body>"
            '<div id="loginArea"><div id="loginMessage" class="groupMargin">Sign in with your '
            "organizational account</div>"
            f'<form method="post" id="loginForm" autocomplete="off" novalidate="novalidate" '
            f'onKeyPress="if (event &amp;&amp; event.keyCode == 13) Login.submitLoginRequest();"'
            f' action="{action}">'
            '<div id="error" class="fieldMargin error smallText">'
            f'<span id="errorText" for="">{html.escape(error)}</span></div>'
            '<div id="formsAuthenticationArea"><div id="userNameArea">'
            '<label id="userNameInputLabel" for="userNameInput" class="hidden">User Account'
            "</label>"
            '<input id="userNameInput" name="UserName" type="email" value="" tabindex="1" '
            'class="text fullWidth" spellcheck="false" placeholder="someone@example.com" '
            'autocomplete="off"/></div>'
            '<div id="passwordArea"><input id="passwordInput" name="Password" '
            'type="password" tabindex="2" class="text fullWidth" placeholder="Password" '
            'autocomplete="off"/></div>'
            '<div id="kmsiArea" style="display:none"><input type="checkbox" name="Kmsi" '
            'id="kmsiInput" value="true" tabindex="3"/></div>'
            '<div id="submissionArea" class="submitMargin"><span id="submitButton" '
            'class="submit" tabindex="4">Sign in</span></div></div>'
            '<input id="optionForms" type="hidden" name="AuthMethod" '
            'value="FormsAuthentication"/></form></div></body></html>')

    @staticmethod
    def auto_post_page(saml: str, okta: bool = False) -> str:
        if okta:
            # Okta's app page: one input per line, name before type and value, the value
            # with '+' and '=' as character references.
            value = saml.replace("+", "&#x2b;").replace("=", "&#x3d;")
            return (
                "<!DOCTYPE html>\n<html lang=\"en\">\n<head><title>Amazon Web Services</title>"
                "</head>\n<body>\n"
                '<form id="appForm" action="https&#x3a;&#x2f;&#x2f;signin.aws.amazon.com&#x2f;'
                'saml" method="POST">\n'
                f'    <input name="SAMLResponse" type="hidden" value="{value}"/>\n'
                '    <input name="RelayState" type="hidden" value=""/>\n'
                "</form>\n<script>document.getElementById('appForm').submit();</script>\n"
                "</body>\n</html>\n")
        return (
            "<html><head><title>Working...</title></head><body>"
            '<form method="POST" name="hiddenform" '
            'action="https://signin.aws.amazon.com:443/saml">'
            f'<input type="hidden" name="SAMLResponse" value="{html.escape(saml)}" />'
            '<input type="hidden" name="RelayState" value="" />'
            "<noscript><p>Script is disabled. Click Submit to continue.</p>"
            '<input type="submit" value="Submit" /></noscript></form>'
            "<script language=\"javascript\">window.setTimeout("
            "'document.forms[0].submit()', 0);</script></body></html>")


def _handler_for(idp: LocalIdp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "Microsoft-HTTPAPI/2.0"
        timeout = 30

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def _send(self, status: int, body: str, content_type: str = "text/html",
                  headers: dict[str, str] | None = None) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", f"{content_type}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _begin(self) -> urllib.parse.SplitResult:
            url = urllib.parse.urlsplit(self.path)
            idp.requests[url.path] += 1
            if idp.hang:
                idp._stopping.wait(30)
            elif idp.delay:
                idp._stopping.wait(idp.delay)
            return url

        def _body(self) -> str:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode()
            idp.posted.append(body)
            return body

        def do_GET(self) -> None:
            url = self._begin()
            query = urllib.parse.parse_qs(url.query)
            if url.path == _ADFS_PATH:
                rp = query.get("loginToRp", [""])[0]
                if rp != RP:
                    self._send(400, "<html><body>MSIS7012: unknown relying party</body></html>")
                    return
                cookie = secrets.token_hex(16)
                idp._cookies.add(cookie)
                self._send(200, idp.adfs_page(rp), headers={
                    "Set-Cookie": f"{_COOKIE}={cookie}; path=/adfs; HttpOnly; Secure"})
                return
            parts = url.path.split("/")
            if len(parts) == 6 and parts[1:3] == ["app", "amazon_aws"] and parts[4:] == [
                    "sso", "saml"]:
                if parts[3] != APP_ID:
                    self._send(404, "<html><body>Not found</body></html>")
                    return
                token = query.get("onetimetoken", [""])[0]
                if token not in idp._tokens:
                    self._send(200, "<html><body><form id=\"form19\" action=\"/login\">"
                               "<input name=\"username\"/><input name=\"password\" "
                               "type=\"password\"/></form></body></html>")
                    return
                user = idp._tokens.pop(token)
                self._send(200, idp.auto_post_page(idp.saml_response(user, OKTA_ARN), okta=True))
                return
            self._send(404, "<html><body>Not found</body></html>")

        def do_POST(self) -> None:
            url = self._begin()
            body = self._body()
            if url.path == _ADFS_PATH:
                query = urllib.parse.parse_qs(url.query)
                rp = query.get("loginToRp", [""])[0]
                if "client-request-id" not in query or rp != RP:
                    self._send(400, "<html><body>bad request</body></html>")
                    return
                cookies = dict(
                    c.strip().split("=", 1) for c in (self.headers.get("Cookie") or "").split(";")
                    if "=" in c)
                if idp.require_cookie and cookies.get(_COOKIE) not in idp._cookies:
                    self._send(200, idp.adfs_page(rp, "Your session has expired."))
                    return
                form = urllib.parse.parse_qs(body)
                user = form.get("UserName", [""])[0]
                password = form.get("Password", [""])[0]
                if form.get("AuthMethod") != ["FormsAuthentication"] or not user or (
                        idp.users.get(user) != password):
                    self._send(200, idp.adfs_page(
                        rp, "Incorrect user ID or password. Type the correct user ID and "
                        "password, and try again."))
                    return
                self._send(200, idp.auto_post_page(idp.saml_response(user, ADFS_ARN)))
                return
            if url.path == "/api/v1/authn":
                try:
                    request = json.loads(body)
                except ValueError:
                    request = {}
                user = request.get("username")
                if not user or idp.users.get(user) != request.get("password"):
                    self._send(401, json.dumps({
                        "errorCode": "E0000004", "errorSummary": "Authentication failed",
                        "errorLink": "E0000004", "errorId": "oae" + secrets.token_hex(8),
                        "errorCauses": []}), "application/json")
                    return
                token = secrets.token_urlsafe(24)
                idp._tokens[token] = user
                expires = _xs(dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5))
                self._send(200, json.dumps({
                    "expiresAt": expires, "status": "SUCCESS", "sessionToken": token,
                    "_embedded": {"user": {"id": "00u" + secrets.token_hex(6),
                                           "profile": {"login": user}}}}),
                           "application/json")
                return
            self._send(404, "<html><body>Not found</body></html>")

    return Handler
