"""``federated_auth``: IAM database authentication through ADFS
(``docs/plugins/federated_auth.md``).

On a physical connect without a cached token the plugin signs in at ADFS (IdP-initiated
sign-on, form post) as ``idp_username``, exchanges the SAML assertion for temporary AWS
credentials (STS ``AssumeRoleWithSAML`` of ``iam_role_arn`` through ``iam_idp_arn``) and logs
in as ``db_user`` with an IAM token signed with them (``resilient_db.auth._federated``).
"""

from __future__ import annotations

from .._params import RP_IDENTIFIER
from ..auth import AuthPlugin, CredentialProvider, FederatedAuthError
from ..auth._federated import FederatedProvider
from ..auth._idp import IdpSettings, adfs_saml_assertion

__all__ = ["FederatedAuthError", "FederatedAuthPlugin"]


class FederatedAuthPlugin(AuthPlugin):
    """IAM tokens through ADFS on every physical connect."""

    code = "federated_auth"

    def provider(self) -> CredentialProvider:
        settings = self.ctx.settings
        rp = settings[RP_IDENTIFIER] or "urn:amazon:webservices"

        def sign_in(idp: IdpSettings) -> str:
            return adfs_saml_assertion(idp, rp)

        return FederatedProvider(self.code, "ADFS", settings, self.ctx.driver.default_port,
                                 sign_in, rp, self.ctx.decide)
