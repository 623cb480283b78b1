"""``okta``: IAM database authentication through Okta (``docs/plugins/okta.md``).

On a physical connect without a cached token the plugin signs in at Okta (``/api/v1/authn``)
as ``idp_username``, opens the Amazon Web Services app ``app_id`` with the one-time session
token to get its SAML assertion, exchanges it for temporary AWS credentials (STS
``AssumeRoleWithSAML``) and logs in as ``db_user`` with an IAM token signed with them
(``resilient_db.auth._federated``).
"""

from __future__ import annotations

from .._params import APP_ID
from ..auth import AuthPlugin, CredentialProvider, FederatedAuthError
from ..auth._federated import FederatedProvider
from ..auth._idp import IdpSettings, okta_saml_assertion
from ..errors import ConfigurationError

__all__ = ["FederatedAuthError", "OktaPlugin"]


class OktaPlugin(AuthPlugin):
    """IAM tokens through Okta on every physical connect."""

    code = "okta"

    def provider(self) -> CredentialProvider:
        settings = self.ctx.settings
        app_id = settings[APP_ID]
        if not app_id:
            raise ConfigurationError(
                "plugin 'okta' needs app_id, the ID of the Amazon Web Services app in Okta "
                "(the <app_id> of /app/amazon_aws/<app_id>/sso/saml)",
                parameter="app_id", value=None)

        def sign_in(idp: IdpSettings) -> str:
            return okta_saml_assertion(idp, app_id)

        return FederatedProvider(self.code, "Okta", settings, self.ctx.driver.default_port,
                                 sign_in, app_id, self.ctx.decide, okta_port=True)
