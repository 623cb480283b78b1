"""Driver dialect for ``mysql.connector.aio`` (mysql-connector-python's asyncio connections).

The blocking dialect's decisions (error classification, transaction state, session
attributes, error classes) apply as they are, its socket methods included: they reach an
asyncio connection's socket through its stream transport (``MySQLConnection._socket._writer``,
the ``asyncio.StreamWriter`` of the pure-Python asyncio implementation, and its transport's
``"socket"``), so a failure monitor shared with blocking connections breaks asyncio ones too;
``tests/test_asyncio_mysql.py`` fails loudly if a release renames them. What this dialect
adds: the asyncio connect's own argument names.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

from mysql.connector.aio import MySQLConnectionAbstract as AioConnection

from .mysql_connector import MysqlConnectorDriver

__all__ = ["MysqlConnectorAioDriver", "transport_socket"]

#: Argument spellings the blocking connect accepts and the asyncio one does not: passed under
#: the asyncio connect's own name.
_ALIASES: Mapping[str, str] = {"connect_timeout": "connection_timeout", "username": "user",
                               "passwd": "password", "db": "database"}


def transport_socket(conn: Any) -> Any | None:
    """The socket of an asyncio connection's transport (``None``: not an asyncio
    connection, or not connected); a blocking connection gives ``None`` too."""
    if not isinstance(conn, AioConnection):
        return None
    writer = getattr(getattr(conn, "_socket", None), "_writer", None)
    transport = getattr(writer, "transport", None)
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return None
    return sock


class MysqlConnectorAioDriver(MysqlConnectorDriver):
    """``mysql-connector`` for the asyncio front: same code (same database family, dialects
    and monitor keys as the blocking driver), the asyncio connect's argument names."""

    connection_types: ClassVar[tuple[type, ...]] = (
        AioConnection, *MysqlConnectorDriver.connection_types)
    example_target = "mysql.connector.aio.connect"

    def __init__(self) -> None:
        super().__init__()
        accepted = set(inspect.signature(AioConnection.__init__).parameters) - {"self", "loop"}
        # use_pure: accepted and ignored by the asyncio connect (it is pure Python).
        self._params = frozenset(accepted | set(_ALIASES) | {"use_pure"})

    @staticmethod
    def aio_args(args: Mapping[str, Any]) -> dict[str, Any]:
        """``args`` in the asyncio connect's spelling (the blocking side connections of the
        shared monitors take them as they are)."""
        out: dict[str, Any] = {}
        for name, value in args.items():
            real = _ALIASES.get(name, name)
            if real not in out or real == name:
                out[real] = value
        return out
