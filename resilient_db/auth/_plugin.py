"""``AuthPlugin``: the base of the authentication plugins (``iam``, ``aws_secrets_manager``,
``federated_auth``, ``okta``).

On every physical connect that goes through the connect chain (the application's, failover
attempts, ``initial_connection``/``stale_dns`` reroutes, the efm probes and the topology
monitor, which connect through the chain *inside* their plugin: the auth plugins are inner to
every cluster plugin in the canonical order), the plugin takes a credential from the
process-wide cache (:data:`~resilient_db.auth.CREDENTIALS`), sets it in a copy of the connect
arguments through the driver dialect and proceeds. When the server refuses the login
(``DriverDialect.is_auth_failure``) it drops that credential and tries once more with a freshly
fetched one (a rotated secret, a token the server no longer accepts).

Side connections that do not go through the chain (MySQL's ``KILL QUERY`` connection of a
statement deadline) ask the connection's credentials hook: ``PluginContext.extra[CREDENTIALS_HOOK]``
applies a current credential to their arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Hashable
from typing import Any

from .._pipeline import (
    CREDENTIALS_HOOK,
    ConnectContext,
    ConnectHandler,
    HostSpec,
    Plugin,
    PluginContext,
)
from ._credentials import CREDENTIALS, Credential, CredentialProvider

__all__ = ["AuthPlugin"]

log = logging.getLogger("resilient_db.auth")


class AuthPlugin(Plugin):
    """Base of the auth plugins: subclasses set ``code`` and implement :meth:`provider`."""

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        self._provider: CredentialProvider | None = None
        ref = weakref.ref(self)

        def hook(host: HostSpec, args: dict[str, Any]) -> dict[str, Any]:
            plugin = ref()
            if plugin is None:
                return args
            connect = ConnectContext(host, args, ctx.settings, ctx.driver,
                                     target=_no_target, initial=False)
            return plugin.credential_args(connect)[0].args

        ctx.extra[CREDENTIALS_HOOK] = hook

    def provider(self) -> CredentialProvider:
        """This plugin instance's provider (built once, on the first connect: it validates
        the plugin's properties and raises ``ConfigurationError``)."""
        raise NotImplementedError

    def _the_provider(self) -> CredentialProvider:
        provider = self._provider
        if provider is None:
            provider = self._provider = self.provider()
        return provider

    def credential_args(self, ctx: ConnectContext) -> tuple[ConnectContext, Hashable,
                                                             Credential, str]:
        """A copy of ``ctx`` whose arguments carry a current credential, with the cache key,
        the credential and how it was obtained (``cached``/``fetched``/``refreshed``)."""
        provider = self._the_provider()
        key = provider.key(ctx)
        credential, status = CREDENTIALS.get(provider, ctx, key)
        self._decide("auth.credential", ctx, credential, status=status)
        return self._apply(ctx, credential), key, credential, status

    def _apply(self, ctx: ConnectContext, credential: Credential) -> ConnectContext:
        args = dict(ctx.args)
        ctx.driver.apply_credential(args, credential.user, credential.password,
                                    credential.clear_text)
        return dataclasses.replace(ctx, args=args)

    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        applied, key, credential, _ = self.credential_args(ctx)
        try:
            return proceed(applied)
        except Exception as exc:
            if not ctx.driver.is_auth_failure(exc):
                raise
            refused = type(exc).__name__
        # Outside the except block: the retry's own error must not chain the first one.
        CREDENTIALS.invalidate(key, credential)
        provider = self._the_provider()
        fresh, status = CREDENTIALS.get(provider, ctx, key)
        self._decide("auth.retried", ctx, fresh, status=status, error=refused)
        log.info("%s: the server refused the credential for %s; retrying once with a "
                 "fresh one", self.code, ctx.host)
        try:
            return proceed(self._apply(ctx, fresh))
        except Exception as exc:
            if ctx.driver.is_auth_failure(exc):
                CREDENTIALS.invalidate(key, fresh)
                self._decide("auth.failed", ctx, fresh, error=type(exc).__name__)
            raise

    def _decide(self, kind: str, ctx: ConnectContext, credential: Credential,
                status: str | None = None, error: str | None = None) -> None:
        attributes: dict[str, Any] = {
            "auth.source": credential.source or self.code,
            "server.address": ctx.host.host,
            "server.port": ctx.host.port,
            "db.user": credential.user or ctx.driver.user_of(ctx.args),
        }
        if status is not None:
            attributes["auth.status"] = status
        if credential.expires_at is not None:
            attributes["auth.expires_at"] = credential.expires_at
        if error is not None:
            attributes["error.type"] = error
        self.ctx.decide(kind, self.code, **attributes)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} code={self.code!r}>"


def _no_target(**kwargs: Any) -> Any:
    raise RuntimeError("a credentials hook context does not connect")
