"""A Toxiproxy backend for the fault API: a small client of Toxiproxy's HTTP API and a
:class:`chaos.faults.FaultBackend` on top of it.

.. warning::
   **Never run against a real Toxiproxy binary.** The client and the backend are tested
   against :mod:`simulator.toxiproxy_server`, our own server of the documented Toxiproxy 2.x
   API (routes, bodies, status codes and toxic semantics taken from Toxiproxy's README and
   source, ``tests/test_chaos_toxiproxy.py``), through which a proxied simulated cluster
   carries all its traffic; :func:`start_container` (Testcontainers' generic container) has
   never run: this machine has no Docker. Where our server and the real one differ, trust
   the real one and fix ours.

The API used (Toxiproxy 2.x, default port 8474): ``GET /version``; ``POST /proxies``
``{name, listen, upstream, enabled}`` (201); ``GET /proxies``; ``POST /proxies/{name}``
``{enabled}`` (a disabled proxy refuses and closes connections: the ``down`` toxic);
``DELETE /proxies/{name}``; ``POST /proxies/{name}/toxics`` ``{name, type, stream, toxicity,
attributes}``; ``DELETE /proxies/{name}/toxics/{toxic}`` (204); ``POST /reset`` (enable every
proxy, remove every toxic).

For faults to reach the application, the application must connect through the proxies: one
proxy per instance, listening where the instance's advertised name resolves. A proxied
simulated cluster (``Cluster(proxied=True)``; ``python -m chaos run --faults toxiproxy``
starts one) has exactly that: its names resolve to its proxies, named after the instances,
and :meth:`ToxiproxyBackend.for_cluster` drives them. For a real deployment point the
instance names at the proxies (``listen`` per instance with ``ToxiproxyBackend(listen={...})``,
``TOXIPROXY_URL``).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from chaos.faults import AppliedFault, FaultError, Toxic

__all__ = ["ToxiproxyBackend", "ToxiproxyClient", "ToxiproxyError", "start_container"]

DEFAULT_IMAGE = "ghcr.io/shopify/toxiproxy:2.9.0"
API_PORT = 8474


class ToxiproxyError(FaultError):
    """Toxiproxy answered with an error (``status``: the HTTP status, 0 if unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ToxiproxyClient:
    """Toxiproxy's HTTP API at ``url`` (e.g. ``http://127.0.0.1:8474``)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ToxiproxyError(f"toxiproxy url {url!r}: expected http://host:port")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode() or "null"
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise ToxiproxyError(f"toxiproxy {method} {path}: HTTP {exc.code}: {detail}",
                                 exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ToxiproxyError(f"toxiproxy at {self.url} unreachable: {exc}") from exc
        return json.loads(text)

    def version(self) -> str:
        answer = self._call("GET", "/version")
        return str(answer.get("version") if isinstance(answer, dict) else answer)

    def proxies(self) -> dict[str, Any]:
        return dict(self._call("GET", "/proxies"))

    def create_proxy(self, name: str, listen: str, upstream: str,
                     enabled: bool = True) -> dict[str, Any]:
        return dict(self._call("POST", "/proxies", {"name": name, "listen": listen,
                                                    "upstream": upstream,
                                                    "enabled": enabled}))

    def set_enabled(self, name: str, enabled: bool) -> dict[str, Any]:
        return dict(self._call("POST", f"/proxies/{name}", {"enabled": enabled}))

    def delete_proxy(self, name: str) -> None:
        self._call("DELETE", f"/proxies/{name}")

    def add_toxic(self, proxy: str, name: str, toxic_type: str, stream: str, toxicity: float,
                  attributes: Mapping[str, float]) -> dict[str, Any]:
        return dict(self._call("POST", f"/proxies/{proxy}/toxics", {
            "name": name, "type": toxic_type, "stream": stream, "toxicity": toxicity,
            "attributes": _integers(attributes)}))

    def toxics(self, proxy: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/proxies/{proxy}/toxics"))

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._call("DELETE", f"/proxies/{proxy}/toxics/{name}")

    def reset(self) -> None:
        self._call("POST", "/reset")


def _integers(attributes: Mapping[str, float]) -> dict[str, int]:
    """Toxiproxy's attributes are Go integers (ms, KB/s, bytes, µs): it refuses ``100.0``.
    Rounded to the nearest whole number."""
    return {name: round(value) for name, value in attributes.items()}


class ToxiproxyBackend:
    """Faults through a Toxiproxy: one proxy per instance, ``<prefix><instance>``. A proxy
    that does not exist yet is created on first use with ``listen`` (per instance id;
    default ``0.0.0.0:0``, Toxiproxy picks a port) and the instance as upstream; one that
    exists (a proxied cluster's, see :meth:`for_cluster`) is used as it is. Every toxic
    type, per stream, with toxicity."""

    name = "toxiproxy"

    def __init__(self, client: ToxiproxyClient,
                 listen: Mapping[str, str] | None = None, *, prefix: str = "chaos-") -> None:
        self.client = client
        self.listen = dict(listen or {})
        self.prefix = prefix
        self._lock = threading.Lock()
        self._proxies: dict[str, str] = {}
        self._applied: list[AppliedFault] = []
        self._names = itertools.count(1)

    @classmethod
    def from_environment(cls) -> ToxiproxyBackend:
        """``TOXIPROXY_URL`` if set, else a Toxiproxy container (Docker needed)."""
        url = os.environ.get("TOXIPROXY_URL")
        if url:
            return cls(ToxiproxyClient(url))
        return cls(ToxiproxyClient(start_container()))

    @classmethod
    def for_cluster(cls, cluster: Any) -> ToxiproxyBackend:
        """The backend of a proxied simulated cluster (``Cluster(proxied=True)``): its
        Toxiproxy API, its proxies (named after the instance ids)."""
        server = getattr(cluster, "toxiproxy", None)
        if server is None:
            raise FaultError(f"cluster {cluster.name} is not proxied: start it with "
                             "Cluster(..., proxied=True) for the toxiproxy backend")
        return cls(ToxiproxyClient(server.url), prefix="")

    def proxy_for(self, instance: str, address: str, port: int) -> str:
        """The proxy of ``instance`` (created if needed); returns its name."""
        with self._lock:
            name = self._proxies.get(instance)
            if name is None:
                name = f"{self.prefix}{instance}"
                existing = self.client.proxies()
                if name not in existing:
                    self.client.create_proxy(name, self.listen.get(instance, "0.0.0.0:0"),
                                             f"{address}:{port}")
                self._proxies[instance] = name
            return name

    def listen_address(self, instance: str) -> str:
        """Where the proxy of ``instance`` listens (after :meth:`proxy_for`)."""
        return str(self.client.proxies()[self._proxies[instance]]["listen"])

    def apply(self, instance: str, address: str, port: int, toxic: Toxic) -> AppliedFault:
        proxy = self.proxy_for(instance, address, port)
        if toxic.type == "down":
            self.client.set_enabled(proxy, False)
            handle: Any = ("down", proxy)
        else:
            names = []
            for stream in toxic.streams:
                name = f"{toxic.type}_{stream}_{next(self._names)}"
                self.client.add_toxic(proxy, name, toxic.type, stream, toxic.toxicity,
                                      toxic.attributes)
                names.append(name)
            handle = ("toxics", proxy, names)
        fault = AppliedFault(instance, address, port, toxic, handle)
        with self._lock:
            self._applied.append(fault)
        return fault

    def heal(self, fault: AppliedFault) -> None:
        with self._lock:
            if fault not in self._applied:
                return
            self._applied.remove(fault)
        if fault.handle[0] == "down":
            self.client.set_enabled(fault.handle[1], True)
            return
        for name in fault.handle[2]:
            try:
                self.client.remove_toxic(fault.handle[1], name)
            except ToxiproxyError as exc:
                if exc.status != 404:
                    raise

    def clear(self) -> None:
        with self._lock:
            applied = list(self._applied)
        for fault in applied:
            self.heal(fault)


def start_container(image: str = DEFAULT_IMAGE) -> str:  # pragma: no cover - needs Docker
    """Start Toxiproxy in a Docker container (Testcontainers' generic container, host
    network so proxies can reach instances on loopback) and return its API URL. The
    container is removed by Testcontainers' reaper when this process exits. UNVERIFIED: no
    Docker here."""
    try:
        from testcontainers.core.container import DockerContainer
    except ImportError as exc:
        raise ToxiproxyError("the toxiproxy backend needs testcontainers (pip install "
                             "'resilient_db[sim]') or TOXIPROXY_URL") from exc
    from simulator.testcontainers_backend import docker_unavailable_reason

    reason = docker_unavailable_reason()
    if reason is not None:
        raise ToxiproxyError(f"no Toxiproxy: set TOXIPROXY_URL or provide Docker ({reason})")
    container = DockerContainer(image).with_kwargs(network_mode="host")
    container.start()
    url = f"http://127.0.0.1:{API_PORT}"
    client = ToxiproxyClient(url, timeout=2.0)
    import time

    deadline = time.monotonic() + 30
    while True:
        try:
            client.version()
            return url
        except ToxiproxyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
