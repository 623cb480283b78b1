"""mysql-connector's Django backend (``mysql.connector.django``) over resilient_db.

    DATABASES = {"default": {
        "ENGINE": "resilient_db.integrations.django.mysql",
        "HOST": "db.cluster-xyz.us-east-1.rds.amazonaws.com", "NAME": "app", "USER": "app",
        "OPTIONS": {"plugins": "failover,efm", "use_pure": True},
    }}

Django's own MySQL backend is written for mysqlclient (``MySQLdb``), a C driver resilient_db
does not wrap; mysql-connector ships a Django backend of its own, which this one extends:
its connection parameters, converter, cursor wrapper and features are kept, only the
connection is made by ``resilient_db.connect`` (``OPTIONS`` carry resilient_db's ``plugins``
and properties next to mysql-connector's arguments). The session settings the backend applies
with SQL after connecting (isolation level, ``SQL_AUTO_IS_NULL``) are applied again on every
physical connection failover opens (resilient_db's ``on_connect`` hook); ``init_command`` is a
connect argument, so the driver runs it on each new connection by itself.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import mysql.connector
from mysql.connector.django import base as stock

from resilient_db import _connect

from .. import physical_connect_hook

__all__ = ["DatabaseWrapper"]


class DatabaseWrapper(stock.DatabaseWrapper):
    """mysql-connector's Django ``DatabaseWrapper`` whose connections are resilient_db's."""

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        params = dict(conn_params)
        params.setdefault("converter_class", stock.DjangoMySQLConverter)
        hook = physical_connect_hook(self._configure_physical, params.pop("on_connect", None))
        return _connect.connect(mysql.connector.connect, **params, on_connect=hook)

    def _configure_physical(self, raw: Any) -> None:
        """A connection failover opened gets the session settings init_connection_state gave
        the first one (that one is configured by init_connection_state itself)."""
        # The base class's __getattr__ claims every unknown attribute is a bool: read ours
        # through an untyped reference.
        wrapper: Any = self
        if wrapper.connection is None:
            return
        statements = []
        if wrapper.features.is_sql_auto_is_null_enabled:
            statements.append("SET SQL_AUTO_IS_NULL = 0")
        if wrapper.isolation_level:
            statements.append(
                f"SET SESSION TRANSACTION ISOLATION LEVEL {wrapper.isolation_level.upper()}")
        if statements:
            cur = raw.cursor()
            try:
                for statement in statements:
                    cur.execute(statement)
            finally:
                cur.close()

    @cached_property
    def mysql_version(self) -> tuple[int, ...]:
        """The server's version; without an open connection, from a short-lived one made
        through resilient_db (the stock code would hand resilient_db's OPTIONS to the
        driver)."""
        wrapper: Any = self
        if wrapper.connection:
            return tuple(wrapper.connection.server_version)
        params = {**self.get_connection_params(), "plugins": ""}  # one query, no monitors
        with _connect.connect(mysql.connector.connect, **params) as conn:
            return tuple(conn.server_version)
