"""Errors of the authentication plugins."""

from __future__ import annotations

from ..errors import Error

__all__ = ["FederatedAuthError"]


class FederatedAuthError(Error):
    """Signing in through an identity provider failed: the IdP refused the user or did not
    answer, its SAML assertion is expired or does not grant the role, or STS refused it.
    The message names the identity provider, the user and the role; never a password, token,
    assertion or AWS secret."""

    __module__ = "resilient_db.auth"
