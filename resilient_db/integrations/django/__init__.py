"""Django database backends over resilient_db (docs/integrations/django.md):
``ENGINE = "resilient_db.integrations.django.postgresql"`` (Django's own PostgreSQL backend,
psycopg 3) and ``"resilient_db.integrations.django.mysql"`` (mysql-connector's Django backend,
``mysql.connector.django``). resilient_db's ``plugins`` and properties go in ``OPTIONS``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["physical_connect_hook"]


def physical_connect_hook(configure: Callable[[Any], None],
                          user_hook: Callable[[Any], None] | None) -> Callable[[Any], None]:
    """The ``on_connect`` given to resilient_db: the backend's per-connection set-up (what
    Django does once on the connection it opened, with SQL or driver attributes that a new
    physical connection would not have), then the user's own ``OPTIONS["on_connect"]``."""

    def on_connect(raw: Any) -> None:
        configure(raw)
        if user_hook is not None:
            user_hook(raw)

    return on_connect
