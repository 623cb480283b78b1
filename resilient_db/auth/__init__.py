"""Credential providers for the authentication plugins (``docs/plugins/auth.md``).

The shared model: a :class:`CredentialProvider` per plugin instance fetches credentials; the
process-wide :data:`CREDENTIALS` cache serves them per key with early refresh and one
in-flight fetch per key; :class:`AuthPlugin` applies them on every physical connect and
retries once with a fresh credential when the server refuses one. Importing this package
imports no AWS library.
"""

from ._credentials import (
    CACHED,
    CREDENTIALS,
    FETCHED,
    REFRESHED,
    Credential,
    CredentialCache,
    CredentialProvider,
)
from ._errors import FederatedAuthError
from ._plugin import AuthPlugin

__all__ = [
    "CACHED",
    "CREDENTIALS",
    "FETCHED",
    "REFRESHED",
    "AuthPlugin",
    "Credential",
    "CredentialCache",
    "CredentialProvider",
    "FederatedAuthError",
]
