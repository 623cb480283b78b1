"""Django's PostgreSQL backend (psycopg 3) over resilient_db.

    DATABASES = {"default": {
        "ENGINE": "resilient_db.integrations.django.postgresql",
        "HOST": "db.cluster-xyz.us-east-1.rds.amazonaws.com", "NAME": "app", "USER": "app",
        "OPTIONS": {"plugins": "failover,efm", "failover_timeout_sec": 60},
    }}

Django passes ``OPTIONS`` to the driver's connect; here it reaches ``resilient_db.connect``,
which takes resilient_db's properties (``plugins`` included) and hands the rest to psycopg.
What differs from the stock backend, and why:

- ``Database.connect`` is resilient_db's: Django's own connect code (isolation level, cursor
  classes, the time-zone adapters passed as ``context``) runs unchanged, and the driver
  arguments it builds are what failover reconnects with.
- What Django sets up *after* connecting (the session time zone and ``assume_role``, with SQL;
  the client-side-binding class for named cursors) is done again on every physical connection
  failover opens, through resilient_db's ``on_connect`` hook: a connection moved to a new
  writer keeps the session Django configured.
- Named (server-side) cursors are opened through the connection (``cursor(name, ...)``, so
  through the pipeline) with the cursor class set on each physical connection, instead of
  instantiating Django's cursor class on the connection object.
- Django's psycopg pool (``OPTIONS["pool"]``) is refused: its connections would not be made by
  resilient_db. Use Django's persistent connections (``CONN_MAX_AGE``) instead.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql import base as stock

from resilient_db import _connect

from .. import physical_connect_hook

__all__ = ["DatabaseWrapper"]


class ResilientPsycopg:
    """psycopg as the backend sees it (``DatabaseWrapper.Database``): the module itself for
    every name (``Error``, ``OperationalError``, ``__version__``, ... so Django classifies
    errors by psycopg's classes as before), except ``connect``."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def connect(self, conninfo: str = "", **kwargs: Any) -> Any:
        return _connect.connect(psycopg.Connection.connect, conninfo, **kwargs)


class DatabaseWrapper(stock.DatabaseWrapper):  # type: ignore[misc]  # Django is untyped
    """Django's PostgreSQL ``DatabaseWrapper`` whose connections are resilient_db's."""

    Database = ResilientPsycopg(psycopg)

    @property
    def pool(self) -> None:
        if self.settings_dict["OPTIONS"].get("pool"):
            raise ImproperlyConfigured(
                "OPTIONS['pool'] (Django's psycopg pool) cannot be used with "
                "resilient_db.integrations.django.postgresql: its connections would bypass "
                "resilient_db. Remove it; use CONN_MAX_AGE for persistent connections")

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        params = dict(conn_params)
        hook = physical_connect_hook(self._configure_physical, params.pop("on_connect", None))
        conn = super().get_new_connection({**params, "on_connect": hook})
        if conn.resilient.plugin("failover") is None:  # nothing called the hook
            self._configure_physical(conn.resilient.raw)
        return conn

    def _configure_physical(self, raw: Any) -> None:
        """Set up one physical connection as Django sets up the connection it opened:
        the named-cursor class, the session time zone and role (committed, like Django)."""
        if self.settings_dict["OPTIONS"].get("server_side_binding") is not True:
            raw.server_cursor_factory = stock.ServerSideCursor
        if self.connection is None:
            return  # the first one: init_connection_state() configures it next
        if self._configure_connection(raw) and not raw.autocommit:
            raw.commit()

    def create_cursor(self, name: str | None = None) -> Any:
        if not name:
            return super().create_cursor(name)
        # Through the connection (and so the pipeline); the class is the physical
        # connection's server_cursor_factory (see _configure_physical).
        cursor = self.connection.cursor(name, scrollable=False,
                                        withhold=self.connection.autocommit)
        tzloader = self.connection.adapters.get_loader(stock.TIMESTAMPTZ_OID,
                                                       stock.Format.TEXT)
        if self.timezone != tzloader.timezone:
            stock.register_tzloader(self.timezone, cursor)
        return cursor
