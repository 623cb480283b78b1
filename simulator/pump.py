"""The byte pump under this project's TCP proxies: :mod:`simulator.toxiproxy_server` (the
Toxiproxy look-alike) and :mod:`chaos._toxic_proxy` (the chaos suite's netfault proxy).

A proxied connection is a :class:`Link` between the client's socket and the proxy's own to
the server (opened with :func:`dial`). Each direction has a reader thread
(:func:`read_chunks`: it stamps every chunk as it arrives, so that delays do not pile up
behind each other) and a writer thread of the proxy's own that releases the chunks through
its toxics, then passes the end of stream on (:meth:`Link.half_close`). The link closes when
both directions have ended, or at once on :meth:`Link.close` (a toxic, a failed write, the
proxy closing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Callable

__all__ = ["Chunk", "Link", "close_listener", "dial", "read_chunks"]


@dataclasses.dataclass
class Chunk:
    """What a reader read: ``data`` (``b""``: end of stream) and ``stamp``, when it arrived
    (or, by the reader's ``stamp`` function, when it is due)."""

    stamp: float
    data: bytes


def read_chunks(src: socket.socket, put: Callable[[Chunk], object], size: int,
                stamp: Callable[[], float] = time.monotonic) -> None:
    """Read ``src`` until its end of stream or an error and ``put`` each chunk (at most
    ``size`` bytes) stamped with ``stamp()`` (called after the read); the last chunk put is
    the end of stream (``b""``)."""
    while True:
        try:
            data = src.recv(size)
        except OSError:
            data = b""
        put(Chunk(stamp(), data))
        if not data:
            return


def dial(address: tuple[str, int], timeout: float, *, source: str | None = None,
         mark: int | None = None) -> socket.socket:
    """A TCP connection to ``address`` (``TCP_NODELAY``, blocking once connected) within
    ``timeout`` seconds; from ``source`` (an address, any port; ``None``: the kernel's
    choice) and with ``SO_MARK`` ``mark`` (``None``: unmarked). Raises ``OSError``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if source is not None:
            sock.bind((source, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
    except OSError:
        sock.close()
        raise
    return sock


def close_listener(listener: socket.socket) -> None:
    """Close a listening socket and wake the thread blocked in its ``accept`` (a close alone
    does not)."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()


class Link:
    """One proxied connection: ``client`` and ``server`` sockets, two directions. ``forget``
    is called once, when the link closes (the proxy drops it from its set)."""

    def __init__(self, client: socket.socket, server: socket.socket,
                 forget: Callable[[Link], object]) -> None:
        self.client = client
        self.server = server
        self.closed = threading.Event()
        self._forget = forget
        self._lock = threading.Lock()
        self._open = 2

    def half_close(self, dst: socket.socket) -> None:
        """A direction's end of stream: pass it on to ``dst``; the second closes the link."""
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            self._open -= 1
            done = self._open == 0
        if done:
            self.close()

    def _closing(self) -> None:
        """Called once by :meth:`close` before the sockets close (wake the writers)."""

    def close(self, *, reset: bool = False) -> None:
        """Close both sockets (``reset``: with a TCP RST). Idempotent."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        self._closing()
        for sock in (self.client, self.server):
            if reset:
                # Linger 0: the close sends a RST. SHUT_RD (which sends nothing) wakes the
                # reader blocked in recv, whose hold on the socket would delay the close.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._forget(self)
