"""A Toxiproxy 2.x look-alike in this process: its HTTP API and its TCP proxies with toxics.

The simulator puts one proxy in front of every instance of a proxied cluster
(``Cluster(..., proxied=True)``, see ``docs/simulator.md``), and the chaos suite's toxiproxy
fault backend drives it through the HTTP API, as it would drive a real Toxiproxy.

What it implements, as Toxiproxy documents and implements it (``README.md``, ``api.go``,
``toxic_collection.go``, ``toxics/*.go`` of Shopify/toxiproxy v2):

- ``GET /version`` -> ``{"version": ...}``; ``POST /reset`` (enable every proxy, remove every
  toxic) -> 204; ``GET /proxies`` -> ``{name: proxy}``; ``POST /proxies`` ``{name, listen,
  upstream, enabled}`` -> 201 with the proxy (409 ``proxy already exists``; 400 ``missing
  required field: name``/``upstream``); ``POST /populate`` ``[proxy, ...]`` -> 201
  ``{"proxies": [...]}`` (create or replace); ``GET /proxies/{p}``; ``POST``/``PATCH
  /proxies/{p}`` (update ``listen``, ``upstream``, ``enabled``) -> 200; ``DELETE
  /proxies/{p}`` -> 204; ``GET``/``POST /proxies/{p}/toxics`` (create -> 200 with the toxic;
  defaults: stream ``downstream``, toxicity 1, name ``<type>_<stream>``; 409 ``toxic already
  exists``, 400 ``invalid toxic type`` / ``stream was invalid...``); ``GET``/``POST``/``PATCH``/
  ``DELETE /proxies/{p}/toxics/{t}`` (delete -> 204; 404 ``toxic not found``). Unknown proxy:
  404 ``proxy not found``. Errors are ``{"error": message, "status": code}`` sent the way Go's
  ``http.Error`` sends them (``text/plain``, a trailing newline). A ``User-Agent`` starting
  with ``Mozilla/`` gets 403, as Toxiproxy refuses browsers.
- A proxy object is ``{name, listen, upstream, enabled, toxics}``; ``listen`` shows the bound
  address (a port 0 is replaced by the port the kernel chose). A disabled proxy does not
  listen (connections are refused) and its open connections are closed.
- Toxics (attributes are integers, as in Toxiproxy's Go structs; a fraction is a 400):
  ``latency`` (``latency``, ``jitter`` ms, counted from when the data arrived), ``bandwidth``
  (``rate`` KB/s), ``slow_close`` (``delay`` ms before the close is passed on), ``timeout``
  (data is dropped; the connection is closed after ``timeout`` ms, never when 0),
  ``reset_peer`` (on the first data after ``timeout`` ms: close with a TCP RST),
  ``limit_data`` (close once ``bytes`` passed), ``slicer`` (``average_size``,
  ``size_variation`` bytes, ``delay`` µs between slices). ``stream``: ``upstream`` (client
  to server) or ``downstream``. ``toxicity``: each connection draws once whether the toxic
  acts on it (a toxic added later draws for the open connections then).

One addition that is not in Toxiproxy: with ``bind_source=True`` (the simulator's choice)
the proxy opens its upstream connections *from* its listen address, so the server sees the
proxy's address as the client's (``pg_stat_activity.client_addr``): proof that traffic went
through the proxy. Not implemented: toxic types beyond these seven (some Toxiproxy versions
have more), ``/metrics``, the ``toxiproxy-cli``. Never compared with a real Toxiproxy binary
(none is available here).

Threads (all daemon threads, all stopped by :meth:`ToxiproxyServer.close`): the HTTP server,
one acceptor per enabled proxy, one per connection while it dials the upstream (at most the
10 s connect timeout), and per connection two per direction (a reader that stamps the arrival
time of each chunk, and a pipe that passes it through the toxics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .pump import Chunk, Link, close_listener, dial, read_chunks

__all__ = ["TOXIC_ATTRIBUTES", "VERSION", "ApiError", "Proxy", "ToxiproxyServer"]

LOGGER = logging.getLogger("resilient_db.simulator.toxiproxy")

#: What ``GET /version`` reports: the Toxiproxy API version imitated, and who answers.
VERSION = "2.12.0-resilient_db"

#: Toxic types and their attributes (Toxiproxy's JSON names; all integers, default 0).
TOXIC_ATTRIBUTES: Mapping[str, tuple[str, ...]] = {
    "latency": ("latency", "jitter"),
    "bandwidth": ("rate",),
    "slow_close": ("delay",),
    "timeout": ("timeout",),
    "reset_peer": ("timeout",),
    "limit_data": ("bytes",),
    "slicer": ("average_size", "size_variation", "delay"),
}

_CHUNK = 32 * 1024
_STREAMS = ("upstream", "downstream")


class ApiError(Exception):
    """An API error: ``message`` and HTTP ``status`` (Toxiproxy's ``ApiError``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


def _not_found() -> ApiError:
    return ApiError("proxy not found", 404)


def _bad_body(detail: str) -> ApiError:
    return ApiError(f"bad request body: {detail}", 400)


@dataclasses.dataclass
class _Toxic:
    """One toxic of a proxy, as the API shows it."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        # Go prints a whole float32 without a fraction (1, not 1.0).
        toxicity: float | int = int(self.toxicity) if self.toxicity.is_integer() \
            else self.toxicity
        return {"attributes": dict(self.attributes), "name": self.name, "type": self.type,
                "stream": self.stream, "toxicity": toxicity}


def _int_attributes(kind: str, given: Any, base: Mapping[str, int]) -> dict[str, int]:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise _bad_body("attributes: expected an object")
    result = dict(base)
    for name in TOXIC_ATTRIBUTES[kind]:
        if name not in given:
            continue
        value = given[name]
        # Go decodes into int64: a fraction or a string is refused.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad_body(f"json: cannot unmarshal {json.dumps(value)} into Go struct "
                            f"field of type int64 ({name})")
        result[name] = value
    return result


def _toxicity(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_body(f"toxicity: expected a number, got {json.dumps(value)}")
    return float(value)


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ApiError(f"address {address!r}: missing port in address", 500)
    return host.strip("[]") or "127.0.0.1", int(port)


# --------------------------------------------------------------------------------------------
# Connections


class _Applied:
    """A toxic on one direction of one connection: whether this connection drew it
    (toxicity) and its per-connection state."""

    def __init__(self, toxic: _Toxic) -> None:
        self.toxic = toxic
        self.active = random.random() < toxic.toxicity
        self.attached = time.monotonic()
        self.sent = 0  # limit_data
        self.backlog = 0.0  # bandwidth: seconds owed


class _Direction:
    """One direction of a connection: reads ``src``, passes chunks through the toxics of
    ``stream``, writes ``dst``."""

    def __init__(self, link: _Link, stream: str, src: socket.socket,
                 dst: socket.socket) -> None:
        self.link = link
        self.stream = stream
        self.src = src
        self.dst = dst
        self.chunks: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        self.toxics: list[_Applied] = []
        self.changed = threading.Event()

    def start(self) -> None:
        prefix = f"toxiproxy-{self.link.proxy.name}-{self.stream}"
        threading.Thread(target=read_chunks, args=(self.src, self.chunks.put, _CHUNK),
                         daemon=True, name=f"{prefix}-read").start()
        threading.Thread(target=self._pipe, daemon=True, name=f"{prefix}-pipe").start()

    def set_toxics(self, toxics: list[_Toxic]) -> None:
        """The proxy's toxics of this stream changed: keep the draw and state of those that
        stay (updated attributes apply), draw for new ones."""
        old = {a.toxic.name: a for a in self.toxics}
        new: list[_Applied] = []
        for toxic in toxics:
            if toxic.stream != self.stream:
                continue
            applied = old.get(toxic.name)
            if applied is None or applied.toxic.type != toxic.type:
                applied = _Applied(toxic)
            else:
                applied.toxic = toxic
            new.append(applied)
        self.toxics = new
        self.changed.set()
        self.chunks.put(None)  # wake the pipe (timers, dropped data)

    def _wait(self, seconds: float, applied: _Applied | None = None) -> bool:
        """Wait ``seconds``; False if the link closed. Returns early (True) when ``applied``
        is removed from the chain (Toxiproxy interrupts a removed toxic and passes its data
        on)."""
        deadline = time.monotonic() + seconds
        while True:
            if self.link.closed.is_set():
                return False
            if applied is not None and applied not in self.toxics:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            self.changed.clear()
            if applied is not None and applied not in self.toxics:
                return True
            self.changed.wait(min(left, 0.5))

    def _deadline(self) -> float | None:
        """When a ``timeout`` toxic closes the connection (None: never)."""
        due = [a.attached + a.toxic.attributes["timeout"] / 1000.0 for a in self.toxics
               if a.active and a.toxic.type == "timeout" and a.toxic.attributes["timeout"]]
        return min(due) if due else None

    def _pipe(self) -> None:
        try:
            while not self.link.closed.is_set():
                deadline = self._deadline()
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    chunk = self.chunks.get(timeout=wait)
                except queue.Empty:
                    chunk = None
                if deadline is not None and time.monotonic() >= deadline:
                    self.link.close()
                    return
                if chunk is None:
                    continue
                if not self._through(chunk):
                    return
        except Exception:  # a worker must not die silently
            LOGGER.exception("toxiproxy %s: %s pipe failed", self.link.proxy.name, self.stream)
            self.link.close()

    def _through(self, chunk: Chunk) -> bool:
        """Pass one chunk through the toxics in order and write what comes out; False when
        this direction is finished."""
        pieces = [chunk.data]
        for applied in list(self.toxics):
            if not applied.active:
                continue
            kind, attrs = applied.toxic.type, applied.toxic.attributes
            if kind == "timeout":
                if not chunk.data:
                    break  # end of stream: Toxiproxy closes the stub
                return True  # dropped on the floor
            if kind == "reset_peer":
                if not self._wait(attrs["timeout"] / 1000.0, applied):
                    return False
                if applied in self.toxics:  # not removed while waiting
                    self.link.close(reset=True)
                    return False
                continue
            if kind == "latency" and chunk.data:
                delay = attrs["latency"]
                if attrs["jitter"] > 0:
                    delay += random.randrange(-attrs["jitter"], attrs["jitter"])
                due = chunk.stamp + delay / 1000.0
                if not self._wait(due - time.monotonic(), applied):
                    return False
            elif kind == "bandwidth" and chunk.data and attrs["rate"] > 0:
                seconds = sum(len(p) for p in pieces) / (attrs["rate"] * 1000.0)
                if not self._wait(seconds, applied):
                    return False
            elif kind == "slow_close" and not chunk.data:
                if not self._wait(attrs["delay"] / 1000.0, applied):
                    return False
            elif kind == "limit_data" and chunk.data:
                left = max(0, attrs["bytes"] - applied.sent)
                data = b"".join(pieces)[:left]
                applied.sent += len(data)
                pieces = [data] if data else []
                if applied.sent >= attrs["bytes"]:
                    self._write(pieces, None)
                    self.link.close()
                    return False
            elif kind == "slicer" and chunk.data:
                pieces = [s for p in pieces for s in _slices(p, attrs)]
                if not self._write(pieces, attrs["delay"] / 1e6):
                    return False
                pieces = []
        if not chunk.data:
            self.link.half_close(self.dst)
            return False
        return self._write(pieces, None)

    def _write(self, pieces: list[bytes], gap: float | None) -> bool:
        for n, piece in enumerate(pieces):
            if n and gap and not self._wait(gap):
                return False
            try:
                self.dst.sendall(piece)
            except OSError:
                self.link.close()
                return False
        return True


def _slices(data: bytes, attrs: Mapping[str, int]) -> list[bytes]:
    """Toxiproxy's slicer: split in about halves (± size_variation) until each part is
    within size_variation of average_size."""
    average, variation = attrs["average_size"], attrs["size_variation"]
    if average <= 0:
        return [data]

    def cut(start: int, end: int) -> list[int]:
        if (end - start) - average <= variation:
            return [start, end]
        jitter = random.randrange(-variation, variation) if variation > 0 else 0
        mid = min(max(start + 1, start + (end - start) // 2 + jitter), end - 1)
        return cut(start, mid) + cut(mid, end)

    bounds = cut(0, len(data))
    return [data[bounds[i - 1]:bounds[i]] for i in range(1, len(bounds), 2)]


class _Link(Link):
    """One proxied connection."""

    def __init__(self, proxy: Proxy, client: socket.socket, server: socket.socket) -> None:
        super().__init__(client, server, proxy._forget)
        self.proxy = proxy
        self.directions = (_Direction(self, "upstream", client, server),
                           _Direction(self, "downstream", server, client))

    def start(self) -> None:
        for direction in self.directions:
            direction.start()

    def set_toxics(self, toxics: list[_Toxic]) -> None:
        for direction in self.directions:
            direction.set_toxics(toxics)

    def _closing(self) -> None:
        for direction in self.directions:
            direction.changed.set()
            direction.chunks.put(None)


# --------------------------------------------------------------------------------------------
# Proxies


class Proxy:
    """One proxy: ``listen`` -> ``upstream`` with its toxics. Methods are called under the
    server's lock."""

    def __init__(self, name: str, listen: str, upstream: str, *, bind_source: bool,
                 connect_timeout: float = 10.0) -> None:
        self.name = name
        self.listen = listen or "127.0.0.1:0"
        self.upstream = upstream
        self.enabled = False
        self.toxics: list[_Toxic] = []
        self.bind_source = bind_source
        self.connect_timeout = connect_timeout
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._links: set[_Link] = set()
        self._links_lock = threading.Lock()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "listen": self.listen, "upstream": self.upstream,
                "enabled": self.enabled, "toxics": [t.to_json() for t in self.toxics]}

    # --- listening -------------------------------------------------------------------------
    def start(self) -> None:
        if self.enabled:
            return
        host, port = _split(self.listen)
        try:
            listener = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise ApiError(f"listen tcp {host}:{port}: {exc.strerror or exc}", 500) from None
        bound = listener.getsockname()
        self.listen = f"{bound[0]}:{bound[1]}"
        self._listener = listener
        self.enabled = True
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True,
                                          name=f"toxiproxy-{self.name}-accept")
        self._acceptor.start()
        LOGGER.debug("proxy %s listening on %s -> %s", self.name, self.listen, self.upstream)

    def stop(self) -> None:
        """Stop listening and close every connection (a disabled proxy)."""
        self.enabled = False
        listener, self._listener = self._listener, None
        if listener is not None:
            close_listener(listener)
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None and acceptor is not threading.current_thread():
            acceptor.join(5.0)
        with self._links_lock:
            links = list(self._links)
        for link in links:
            link.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            # Dial on a thread of its own: an upstream that is slow to answer (a blackholed
            # server) must not hold up the connections behind it.
            threading.Thread(target=self._open, args=(listener, client), daemon=True,
                             name=f"toxiproxy-{self.name}-dial").start()

    def _open(self, listener: socket.socket, client: socket.socket) -> None:
        try:
            server = self._connect_upstream()
        except OSError as exc:
            LOGGER.debug("proxy %s: upstream %s unreachable: %s", self.name, self.upstream, exc)
            client.close()  # as Toxiproxy: the client's connection is closed
            return
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # dial set server's
        link = _Link(self, client, server)
        with self._links_lock:
            if self._listener is not listener:  # disabled or deleted meanwhile
                client.close()
                server.close()
                return
            self._links.add(link)
            # Under the lock that toxic changes take: no change slips in between.
            link.set_toxics(list(self.toxics))
        link.start()

    def _connect_upstream(self) -> socket.socket:
        source = _split(self.listen)[0] if self.bind_source else None
        return dial(_split(self.upstream), self.connect_timeout, source=source)

    def _forget(self, link: Link) -> None:
        with self._links_lock:
            self._links.discard(link)

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        with self._links_lock:
            return len(self._links)

    # --- toxics ----------------------------------------------------------------------------
    def _toxics_changed(self) -> None:
        with self._links_lock:
            for link in self._links:
                link.set_toxics(list(self.toxics))

    def find(self, name: str) -> _Toxic:
        for toxic in self.toxics:
            if toxic.name == name:
                return toxic
        raise ApiError("toxic not found", 404)

    def add_toxic(self, body: Any) -> _Toxic:
        if not isinstance(body, dict):
            raise _bad_body("expected a JSON object")
        stream = str(body.get("stream") or "downstream").lower()
        if stream not in _STREAMS:
            raise ApiError("stream was invalid, can be either upstream or downstream", 400)
        kind = body.get("type")
        if not isinstance(kind, str) or kind not in TOXIC_ATTRIBUTES:
            raise ApiError("invalid toxic type", 400)
        name = body.get("name") or f"{kind}_{stream}"
        if any(t.name == name for t in self.toxics):
            raise ApiError("toxic already exists", 409)
        toxicity = _toxicity(body.get("toxicity", 1.0))
        attributes = _int_attributes(kind, body.get("attributes"),
                                     dict.fromkeys(TOXIC_ATTRIBUTES[kind], 0))
        toxic = _Toxic(str(name), kind, stream, toxicity, attributes)
        self.toxics.append(toxic)
        self._toxics_changed()
        return toxic

    def update_toxic(self, name: str, body: Any) -> _Toxic:
        toxic = self.find(name)
        if not isinstance(body, dict):
            raise _bad_body("expected a JSON object")
        attributes = _int_attributes(toxic.type, body.get("attributes"), toxic.attributes)
        toxicity = _toxicity(body.get("toxicity", toxic.toxicity))
        updated = dataclasses.replace(toxic, attributes=attributes, toxicity=toxicity)
        self.toxics[self.toxics.index(toxic)] = updated
        self._toxics_changed()
        return updated

    def remove_toxic(self, name: str) -> None:
        self.toxics.remove(self.find(name))
        self._toxics_changed()

    def reset_toxics(self) -> None:
        if self.toxics:
            self.toxics.clear()
            self._toxics_changed()


# --------------------------------------------------------------------------------------------
# The server


class ToxiproxyServer:
    """Toxiproxy's HTTP API on ``host:port`` (port 0: the kernel's choice; see :attr:`url`)
    and its proxies. The methods below are the API's operations, for callers in this
    process; each raises :class:`ApiError` as the HTTP API answers. ``bind_source``: see the
    module docstring. Start with :meth:`start`, stop with :meth:`close` (or ``with``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 bind_source: bool = False) -> None:
        self.host = host
        self.port = port
        self.bind_source = bind_source
        self._proxies: dict[str, Proxy] = {}
        self._lock = threading.RLock()
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> ToxiproxyServer:
        if self._http is not None:
            return self
        http = ThreadingHTTPServer((self.host, self.port), _handler(self))
        http.daemon_threads = True
        self._http = http
        self.port = int(http.server_address[1])
        self._thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.2},
                                        daemon=True, name="toxiproxy-api")
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """The API's base URL, e.g. ``http://127.0.0.1:8474``."""
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        """Stop the API and every proxy (their connections are closed). Idempotent."""
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        with self._lock:
            proxies = list(self._proxies.values())
            self._proxies.clear()
        for proxy in proxies:
            proxy.stop()

    def __enter__(self) -> ToxiproxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- operations ------------------------------------------------------------------------
    def version(self) -> str:
        return VERSION

    def proxies(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: p.to_json() for name, p in self._proxies.items()}

    def proxy(self, name: str) -> Proxy:
        with self._lock:
            try:
                return self._proxies[name]
            except KeyError:
                raise _not_found() from None

    def create_proxy(self, body: Any) -> dict[str, Any]:
        """``POST /proxies``: ``{name, listen, upstream, enabled=true}``."""
        name, listen, upstream, enabled = _proxy_fields(body, 0)
        with self._lock:
            if name in self._proxies:
                raise ApiError("proxy already exists", 409)
            proxy = Proxy(name, listen, upstream, bind_source=self.bind_source)
            if enabled:
                proxy.start()
            self._proxies[name] = proxy
            return proxy.to_json()

    def populate(self, body: Any) -> list[dict[str, Any]]:
        """``POST /populate``: create, or replace when listen or upstream differ, each
        proxy of a list; all are validated first."""
        if not isinstance(body, list):
            raise _bad_body("expected a JSON array of proxies")
        wanted = [_proxy_fields(item, n + 1) for n, item in enumerate(body)]
        names = [w[0] for w in wanted]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ApiError(f"duplicate proxy name {json.dumps(duplicate)}", 500)
        result = []
        with self._lock:
            for name, listen, upstream, enabled in wanted:
                existing = self._proxies.get(name)
                if existing is not None and (existing.upstream == upstream
                                             and listen in ("", existing.listen)):
                    if enabled:
                        existing.start()
                    else:
                        existing.stop()
                    result.append(existing.to_json())
                    continue
                if existing is not None:
                    existing.stop()
                    del self._proxies[name]
                proxy = Proxy(name, listen, upstream, bind_source=self.bind_source)
                if enabled:
                    proxy.start()
                self._proxies[name] = proxy
                result.append(proxy.to_json())
        return result

    def update_proxy(self, name: str, body: Any) -> dict[str, Any]:
        """``POST``/``PATCH /proxies/{name}``: ``listen``, ``upstream``, ``enabled``."""
        if not isinstance(body, dict):
            raise _bad_body("expected a JSON object")
        with self._lock:
            proxy = self.proxy(name)
            listen = str(body.get("listen", proxy.listen))
            upstream = str(body.get("upstream", proxy.upstream))
            enabled = body.get("enabled", proxy.enabled)
            if not isinstance(enabled, bool):
                raise _bad_body("enabled: expected true or false")
            if listen != proxy.listen or upstream != proxy.upstream:
                proxy.stop()
                proxy.listen, proxy.upstream = listen, upstream
            if enabled:
                proxy.start()
            else:
                proxy.stop()
            return proxy.to_json()

    def delete_proxy(self, name: str) -> None:
        with self._lock:
            proxy = self.proxy(name)
            del self._proxies[name]
        proxy.stop()

    def reset(self) -> None:
        """``POST /reset``: every proxy enabled, every toxic removed."""
        with self._lock:
            for proxy in self._proxies.values():
                proxy.start()
                proxy.reset_toxics()

    def toxics(self, proxy: str) -> list[dict[str, Any]]:
        with self._lock:
            return [t.to_json() for t in self.proxy(proxy).toxics]

    def toxic(self, proxy: str, name: str) -> dict[str, Any]:
        with self._lock:
            return self.proxy(proxy).find(name).to_json()

    def add_toxic(self, proxy: str, body: Any) -> dict[str, Any]:
        with self._lock:
            return self.proxy(proxy).add_toxic(body).to_json()

    def update_toxic(self, proxy: str, name: str, body: Any) -> dict[str, Any]:
        with self._lock:
            return self.proxy(proxy).update_toxic(name, body).to_json()

    def remove_toxic(self, proxy: str, name: str) -> None:
        with self._lock:
            self.proxy(proxy).remove_toxic(name)


def _proxy_fields(body: Any, position: int) -> tuple[str, str, str, bool]:
    """(name, listen, upstream, enabled) of a proxy in a request; ``position``: its place in a
    populate list (0: not in a list)."""
    if not isinstance(body, dict):
        raise _bad_body("expected a JSON object")
    where = f" at proxy {position}" if position else ""
    name, listen, upstream = (body.get(k) or "" for k in ("name", "listen", "upstream"))
    enabled = body.get("enabled", True)
    if not all(isinstance(v, str) for v in (name, listen, upstream)):
        raise _bad_body("name, listen and upstream must be strings")
    if not isinstance(enabled, bool):
        raise _bad_body("enabled: expected true or false")
    if not name:
        raise ApiError(f"missing required field: name{where}", 400)
    if not upstream:
        raise ApiError(f"missing required field: upstream{where}", 400)
    return name, listen, upstream, enabled


# --------------------------------------------------------------------------------------------
# HTTP


_Route = Callable[["ToxiproxyServer", list[str], Any], tuple[int, Any]]


def _dispatch(server: ToxiproxyServer, method: str, parts: list[str],
              body: Any) -> tuple[int, Any]:
    """(status, JSON answer or None) of one request; raises ApiError."""
    if parts == ["version"] and method == "GET":
        return 200, {"version": server.version()}
    if parts == ["reset"] and method == "POST":
        server.reset()
        return 204, None
    if parts == ["populate"] and method == "POST":
        return 201, {"proxies": server.populate(body)}
    if parts == ["proxies"]:
        if method == "GET":
            return 200, server.proxies()
        if method == "POST":
            return 201, server.create_proxy(body)
    if len(parts) == 2 and parts[0] == "proxies":
        name = parts[1]
        if method == "GET":
            return 200, server.proxy(name).to_json()
        if method in ("POST", "PATCH"):
            return 200, server.update_proxy(name, body)
        if method == "DELETE":
            server.delete_proxy(name)
            return 204, None
    if len(parts) == 3 and parts[0] == "proxies" and parts[2] == "toxics":
        if method == "GET":
            return 200, server.toxics(parts[1])
        if method == "POST":
            return 200, server.add_toxic(parts[1], body)
    if len(parts) == 4 and parts[0] == "proxies" and parts[2] == "toxics":
        if method == "GET":
            return 200, server.toxic(parts[1], parts[3])
        if method in ("POST", "PATCH"):
            return 200, server.update_toxic(parts[1], parts[3], body)
        if method == "DELETE":
            server.remove_toxic(parts[1], parts[3])
            return 204, None
    known = (parts in (["version"], ["reset"], ["populate"], ["proxies"])
             or (len(parts) == 2 and parts[0] == "proxies")
             or (len(parts) in (3, 4) and parts[0] == "proxies" and parts[2] == "toxics"))
    raise _NoRouteError(405 if known else 404)


class _NoRouteError(Exception):
    """No route: gorilla/mux answers 404 ``404 page not found`` for an unknown path, 405 with
    no body for a known path with another method."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _handler(server: ToxiproxyServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            LOGGER.debug("api: " + format, *args)

        def _send(self, status: int, data: bytes, content_type: str | None) -> None:
            self.send_response(status)
            if content_type is not None:
                self.send_header("Content-Type", content_type)
            if status == 403 or content_type == "text/plain; charset=utf-8":
                self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.headers.get("User-Agent", "").startswith("Mozilla/"):
                self._send(403, b"User agent not allowed\n", "text/plain; charset=utf-8")
                return
            parts = [p for p in self.path.split("?", 1)[0].split("/") if p]
            try:
                body: Any = None
                if method in ("POST", "PATCH") and parts not in (["reset"],):
                    try:
                        body = json.loads(raw or b"null")
                    except ValueError as exc:
                        raise _bad_body(str(exc)) from None
                status, answer = _dispatch(server, method, parts, body)
            except ApiError as exc:
                self._send(exc.status, json.dumps(exc.to_json()).encode() + b"\n",
                           "text/plain; charset=utf-8")
                return
            except _NoRouteError as exc:
                if exc.status == 405:
                    self._send(405, b"", None)
                else:
                    self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
                return
            if answer is None:
                self._send(status, b"", None)
                return
            content_type = "application/json"
            text = json.dumps(answer)
            if parts == ["version"]:
                content_type, text = "application/json;charset=utf-8", text + "\n"
            self._send(status, text.encode(), content_type)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PATCH(self) -> None:
            self._handle("PATCH")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

    return Handler
