"""A small threaded TCP proxy that delays and throttles the bytes it forwards.

:mod:`chaos.netfault` puts one in front of an instance with a ``nat`` rule that redirects new
connections to ``address:port`` to the proxy's own port; the proxy's upstream sockets carry
:data:`UPSTREAM_MARK` (``SO_MARK``) and the rule skips marked packets, so the proxy reaches the
real server. Directions use Toxiproxy's words: *upstream* is client to server, *downstream*
server to client.

Threads: one accepting thread per proxy, and two per direction of each connection (a reader
that timestamps chunks as they arrive, so that delays do not pile up behind each other, and a
writer that releases them when due). All are daemon threads, and :meth:`ToxicProxy.close`
stops them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Literal

from simulator.pump import Chunk, Link, close_listener, dial, read_chunks

LOGGER = logging.getLogger("chaos.netfault")

#: ``SO_MARK`` of the proxy's upstream connections; the redirect rule skips marked packets.
UPSTREAM_MARK = 0x52444246

Stream = Literal["upstream", "downstream", "both"]

_CHUNK = 65536


@dataclasses.dataclass
class Toxics:
    """What one direction suffers: ``delay`` ± ``jitter`` seconds per chunk and a ``rate``
    limit in bytes per second (``None``: unlimited). Mutable: healing sets it to no-op."""

    delay: float = 0.0
    jitter: float = 0.0
    rate: float | None = None

    def next_delay(self) -> float:
        if self.jitter:
            return max(0.0, self.delay + random.uniform(-self.jitter, self.jitter))
        return self.delay


def _due_stamps(toxics: Toxics) -> Callable[[], float]:
    """A reader's ``stamp``: when a chunk read now is due (its delay drawn at arrival)."""
    last_due = 0.0

    def stamp() -> float:
        nonlocal last_due
        # Never reorder: a chunk is due no earlier than the one before it.
        last_due = max(last_due, time.monotonic() + toxics.next_delay())
        return last_due
    return stamp


class _Link(Link):
    """One proxied connection: the client's socket and ours to the server."""

    def __init__(self, proxy: ToxicProxy, client: socket.socket, server: socket.socket) -> None:
        super().__init__(client, server, proxy._forget)
        for src, dst, toxics in ((client, server, proxy.upstream),
                                 (server, client, proxy.downstream)):
            chunks: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
            threading.Thread(target=read_chunks,
                             args=(src, chunks.put, _CHUNK, _due_stamps(toxics)), daemon=True,
                             name="netfault-proxy-read").start()
            threading.Thread(target=self._write, args=(dst, chunks, toxics), daemon=True,
                             name="netfault-proxy-write").start()

    def _write(self, dst: socket.socket, chunks: queue.SimpleQueue[Chunk],
               toxics: Toxics) -> None:
        while not self.closed.is_set():
            chunk = chunks.get()
            wait = chunk.stamp - time.monotonic()  # the stamp is when it is due
            if wait > 0 and self.closed.wait(wait):
                return
            if not chunk.data:
                self.half_close(dst)
                return
            try:
                dst.sendall(chunk.data)
            except OSError:
                self.close()
                return
            if toxics.rate and self.closed.wait(len(chunk.data) / toxics.rate):
                return


class ToxicProxy:
    """Accepts on ``listen_host`` (a free port) and forwards to ``upstream`` with toxics."""

    def __init__(self, upstream: tuple[str, int], listen_host: str, *,
                 upstream_toxics: Toxics, downstream_toxics: Toxics,
                 connect_timeout: float = 10.0) -> None:
        self.upstream_address = upstream
        self.upstream = upstream_toxics
        self.downstream = downstream_toxics
        self.connect_timeout = connect_timeout
        self._listener = socket.create_server((listen_host, 0))
        self.listen_address: tuple[str, int] = self._listener.getsockname()[:2]
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._accepting = threading.Thread(target=self._accept, daemon=True,
                                           name="netfault-proxy-accept")
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            try:
                server = self._connect_upstream()
            except OSError as exc:
                # As the client would see it without the proxy: the connection dies.
                LOGGER.debug("proxy to %s:%d cannot connect upstream: %s",
                             *self.upstream_address, exc)
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))  # close with a RST
                client.close()
                continue
            with self._lock:
                if self._closing:
                    client.close()
                    server.close()
                    return
                self._links.add(_Link(self, client, server))

    def _connect_upstream(self) -> socket.socket:
        return dial(self.upstream_address, self.connect_timeout, mark=UPSTREAM_MARK)

    def _forget(self, link: Link) -> None:
        with self._lock:
            self._links.discard(link)

    @property
    def connections(self) -> int:
        """Connections currently proxied."""
        with self._lock:
            return len(self._links)

    def stop_accepting(self) -> None:
        """Close the listener; proxied connections go on."""
        close_listener(self._listener)

    def set_toxics(self, upstream: Toxics, downstream: Toxics) -> None:
        """Apply new toxics to every connection, existing and future."""
        for mine, new in ((self.upstream, upstream), (self.downstream, downstream)):
            mine.delay, mine.jitter, mine.rate = new.delay, new.jitter, new.rate

    def neutralise(self) -> None:
        """Forward without delay or rate limit from now on (chunks already queued keep their
        due time)."""
        for toxics in (self.upstream, self.downstream):
            toxics.delay, toxics.jitter, toxics.rate = 0.0, 0.0, None

    def close(self) -> None:
        """Stop accepting and cut every proxied connection."""
        with self._lock:
            self._closing = True
            links = list(self._links)
        self.stop_accepting()
        for link in links:
            link.close()
        self._accepting.join(timeout=5.0)
