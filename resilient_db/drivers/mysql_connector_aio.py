"""Driver dialect for ``mysql.connector.aio`` (mysql-connector-python's asyncio connections).

The blocking dialect's decisions (error classification, transaction state, session
attributes, error classes) apply as they are; only the socket differs: an asyncio connection
holds a stream transport, not a socket object. The private attributes used:
``MySQLConnection._socket._writer`` (the ``asyncio.StreamWriter`` of the pure-Python asyncio
implementation) and its transport's ``"socket"``; ``tests/test_asyncio_mysql.py`` fails loudly
if a release renames them.

Every socket method also accepts a blocking connection (the shared failure and topology
monitors open blocking side connections through ``mysql.connector.connect`` with this same
dialect object).
"""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Mapping
from typing import Any, ClassVar

from mysql.connector.aio import MySQLConnectionAbstract as AioConnection

from .base import NetworkOptions, set_socket_options
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
    and monitor keys as the blocking driver), socket access through the stream transport."""

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

    def socket_of(self, conn: Any) -> socket.socket | None:
        if not isinstance(conn, AioConnection):
            return super().socket_of(conn)
        sock = transport_socket(conn)
        if sock is None:
            return None
        # A plain socket object on a duplicate descriptor (the caller may close it; shutting
        # it down ends the connection itself: the event loop then reads end-of-file). Safe
        # from another thread (the failure monitor's), unlike the transport's own methods.
        return socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))

    def fileno(self, conn: Any) -> int | None:
        if not isinstance(conn, AioConnection):
            return super().fileno(conn)
        sock = transport_socket(conn)
        return None if sock is None else int(sock.fileno())

    def is_closed(self, conn: Any) -> bool:
        if not isinstance(conn, AioConnection):
            return super().is_closed(conn)
        sock = transport_socket(conn)
        if sock is None:
            return True
        # The driver keeps no "broken" flag (is_socket_connected() stays true after a lost
        # connection): end-of-file pending, seen with a non-blocking peek, means closed.
        raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            raw.detach()  # the descriptor stays the transport's

    def configure_socket(self, conn: Any, options: NetworkOptions) -> None:
        if not isinstance(conn, AioConnection):
            super().configure_socket(conn, options)
            return
        sock = self.socket_of(conn)
        if sock is not None:
            try:
                set_socket_options(sock, options)  # options of the socket, not the descriptor
            finally:
                sock.close()
