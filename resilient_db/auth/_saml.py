"""What the federated plugins read from a SAML response before handing it to STS.

An identity provider's SAML response (base64 XML, ``samlp:Response`` around a
``saml:Assertion``) is a bearer credential: it is never logged or shown. Before calling STS the
plugins read two things from it, so that the two most common failures get a clear error
instead of STS's terse refusal:

- its validity: the earliest ``NotOnOrAfter`` of the assertion's ``Conditions`` and
  ``SubjectConfirmationData`` (an expired assertion: a slow sign-in, a wrong clock);
- the roles it grants: the ``https://aws.amazon.com/SAML/Attributes/Role`` values, each
  ``role ARN,provider ARN`` (either order); the configured pair must be one of them.

The reading is lenient: what cannot be read (an encrypted assertion, a missing element) is not
checked here, and STS decides.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ._errors import FederatedAuthError

__all__ = ["FederatedAuthError", "SamlAssertion", "read_assertion"]

_PROTOCOL = "urn:oasis:names:tc:SAML:2.0:protocol"
_ASSERTION = "urn:oasis:names:tc:SAML:2.0:assertion"
ROLE_ATTRIBUTE = "https://aws.amazon.com/SAML/Attributes/Role"


@dataclass(frozen=True)
class SamlAssertion:
    """A SAML response and what was read from it. ``not_on_or_after``: wall-clock expiry
    (``None``: none readable); ``roles``: the (role, provider) pairs granted (empty: none
    readable)."""

    encoded: str = field(repr=False)
    not_on_or_after: float | None
    roles: tuple[frozenset[str], ...]


def _timestamp(text: str) -> float | None:
    """An ``xs:dateTime`` (``2026-12-04T18:30:00Z``, fractions and offsets allowed) as epoch
    seconds; ``None`` when unreadable. Python 3.10's ``fromisoformat`` takes no ``Z``."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    if "." in value:  # fractions of any length: fromisoformat wants 3 or 6 digits
        head, _, rest = value.partition(".")
        digits = "".join(ch for ch in rest if ch.isdigit())
        zone = rest[len(digits):]
        value = f"{head}.{(digits + '000000')[:6]}{zone}"
    try:
        moment = _dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:  # SAML times are UTC
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


def read_assertion(encoded: str, where: str) -> SamlAssertion:
    """Decode and read a SAML response (``where``: the IdP, for the error). Raises
    :class:`FederatedAuthError` when it is not base64 XML at all."""
    try:
        raw = base64.b64decode(encoded.strip(), validate=False)
        root = ET.fromstring(raw)
    except (binascii.Error, ValueError, ET.ParseError) as exc:
        raise FederatedAuthError(
            f"{where}: the SAML response is not base64-encoded XML ({type(exc).__name__})"
        ) from None
    expiries: list[float] = []
    roles: list[frozenset[str]] = []
    for assertion in root.iter(f"{{{_ASSERTION}}}Assertion"):
        for tag in ("Conditions", "SubjectConfirmationData"):
            for element in assertion.iter(f"{{{_ASSERTION}}}{tag}"):
                limit = element.get("NotOnOrAfter")
                stamp = None if limit is None else _timestamp(limit)
                if stamp is not None:
                    expiries.append(stamp)
        for attribute in assertion.iter(f"{{{_ASSERTION}}}Attribute"):
            if attribute.get("Name") != ROLE_ATTRIBUTE:
                continue
            for value in attribute.iter(f"{{{_ASSERTION}}}AttributeValue"):
                parts = frozenset(p.strip() for p in (value.text or "").split(",") if p.strip())
                if parts:
                    roles.append(parts)
    return SamlAssertion(encoded.strip(), min(expiries) if expiries else None, tuple(roles))


def check_assertion(assertion: SamlAssertion, *, now: float, role_arn: str, idp_arn: str,
                    where: str, user: str) -> None:
    """Refuse an expired assertion or one that does not grant (``role_arn``, ``idp_arn``)."""
    limit = assertion.not_on_or_after
    if limit is not None and now >= limit:
        moment = _dt.datetime.fromtimestamp(limit, _dt.timezone.utc).isoformat()
        raise FederatedAuthError(
            f"{where}: the SAML assertion for user {user!r} expired at {moment} "
            f"({now - limit:.0f} s ago) before it could be exchanged at STS; check the clocks "
            "of this machine and the IdP, and the IdP's assertion lifetime")
    if assertion.roles and frozenset({role_arn, idp_arn}) not in assertion.roles:
        granted = sorted(
            arn for pair in assertion.roles for arn in pair if ":role/" in arn)
        raise FederatedAuthError(
            f"{where}: the SAML assertion for user {user!r} does not grant role {role_arn!r} "
            f"with provider {idp_arn!r} (iam_role_arn, iam_idp_arn); it grants "
            f"{', '.join(granted) or 'no role'}")
