"""An instance runtime on Docker: each server process runs in its own container.

:class:`DockerServer` is a :class:`simulator.local.LocalServer` whose server process runs in
a container of the simulator's server image (:mod:`simulator.docker_images`, PostgreSQL 15
and MariaDB built on this machine from Debian packages: no registry is needed) instead of as
a child process. Everything else is shared with the local backend, so every flavour and
every cluster primitive works unchanged (``aurora-pg``, ``aurora-mysql``, ``rds-*``, base
backups, ``pg_rewind``, replication, faults)::

    from simulator.testcontainers_backend import DockerServer

    server = DockerServer.create("postgresql").start()
    psycopg.connect(server.conninfo())
    server.kill(); server.start()          # crash and restart: same data, address and port
    server.stop()                          # remove the container, the files and the address

    Cluster.start("aurora-pg", backend="testcontainers")   # a whole cluster in containers

How a container is run (through Testcontainers' ``DockerClient``, i.e. docker-py):

* **host networking only** (``network_mode=host``): the server binds its own loopback
  address (``127.x.y.z``) exactly as a local one does, so addresses, ports, DNS names and
  network faults are the same on both backends, replicas reach their writer by address, and
  no traffic goes to a bridge address. :func:`bridge_addresses` lets a test check that;
* the container runs as the engine's own user (``postgres`` / ``mysql``), whose ids the image
  shares with this machine; the server's directory (data, configuration, socket, log) is a
  bind mount at the same path, so the control plane's file operations (template copies,
  ``standby.signal``, ``pg_basebackup``, ``pg_rewind`` run on the host) see what the server
  sees; the host IPC namespace keeps shared-memory cleanup the same as for a local server;
* every :meth:`~DockerServer.start` runs a fresh container (the data lives in the bind
  mount); :meth:`~DockerServer.kill` is ``docker kill`` (SIGKILL), ``stop`` sends the
  engine's shutdown signal, waits, then kills; both return once the server process is gone.
  The exited container is removed in the background: on a loaded machine ``docker rm``
  takes tens of seconds (the process died in a tenth of a second), which would turn a
  simulated crash into a long stall of the control plane (a failover's promotion, a
  rejoin's restart). A full :meth:`~DockerServer.stop` waits for those removals;
* containers carry the label ``resilient_db.simulator`` (and their owner process): they are
  removed by :meth:`~DockerServer.stop`, by an ``atexit`` hook, by :func:`sweep_containers`
  (before every create: containers of dead owners) and by ``scripts/test`` at exit.
  Testcontainers' Ryuk reaper is not used (its image comes from a registry).

Limits: the Docker daemon must run on this machine (bind mounts, host networking); IAM
enforcement (a PAM module built on the host) is not available inside containers.

Testcontainers and docker-py are imported lazily: importing this module costs nothing and
works without them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from simulator._addresses import ProcessIdentity, port_is_free, sim_root
from simulator.local import (
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    LocalServer,
    ServerStartError,
    SettingValue,
    SimulatorError,
    _engine_spec,
)
from simulator.runtime import Engine

__all__ = ["CONTAINER_LABEL", "DockerServer", "bridge_addresses", "docker_unavailable_reason",
           "server_image", "sweep_containers"]

LOGGER = logging.getLogger("resilient_db.simulator")

#: Label on every container the simulator runs (its value is the server's name).
CONTAINER_LABEL = "resilient_db.simulator"
_OWNER_LABEL = "resilient_db.owner"
# Seconds a daemon ping may take before Docker counts as unavailable.
_PING_TIMEOUT = 5
_CONTAINER_EXIT_TIMEOUT = 20.0
# Seconds a full stop waits for the background removal of each exited container (docker rm
# of a container whose process is gone: slow only on a loaded machine).
_CONTAINER_REMOVE_TIMEOUT = 120.0


def docker_unavailable_reason() -> str | None:
    """``None`` if a Docker daemon answers a ping, else why not (for a test's skip reason)."""
    try:
        from testcontainers.core.docker_client import DockerClient
    except ImportError as exc:
        return f"testcontainers is not installed ({exc})"
    try:
        client = DockerClient(timeout=_PING_TIMEOUT)
        try:
            client.client.ping()
        finally:
            client.client.close()
    except Exception as exc:  # any failure to reach the daemon means "no Docker here"
        return f"no Docker daemon answers: {type(exc).__name__}: {exc}"
    return None


_client_lock = threading.Lock()
_client: Any = None


def _docker() -> Any:
    """One docker-py client for the process (Testcontainers' configuration: DOCKER_HOST...)."""
    global _client
    with _client_lock:
        if _client is None:
            from testcontainers.core.docker_client import DockerClient

            _client = DockerClient().client
        return _client


@functools.cache
def server_image() -> str:
    """The server image: ``$RESILIENT_DB_SIM_IMAGE`` (set by ``scripts/test``), else the one
    for this machine's recipe, built or loaded on first use."""
    configured = os.environ.get("RESILIENT_DB_SIM_IMAGE")
    if configured:
        return configured
    from simulator.docker_images import ensure_image

    return ensure_image()


def sweep_containers() -> int:
    """Remove the simulator's containers whose owner process is gone; return how many."""
    removed = 0
    # ``ignore_removed``: docker-py lists the ids, then inspects each one; a container removed
    # in between (another process's sweep, a background removal after a kill) is skipped
    # instead of failing the sweep, and with it the server create that called it.
    for container in _docker().containers.list(all=True, filters={"label": CONTAINER_LABEL},
                                               ignore_removed=True):
        try:
            owner = ProcessIdentity.from_json(json.loads(container.labels[_OWNER_LABEL]))
        except (KeyError, ValueError, TypeError):
            owner = None
        if owner is not None and owner.is_alive():
            continue
        with contextlib.suppress(Exception):  # removed meanwhile by someone else
            container.remove(force=True, v=True)
            removed += 1
    if removed:
        LOGGER.info("swept %d stale simulator container(s)", removed)
    return removed


def bridge_addresses(container: Any) -> list[str]:
    """The IP addresses Docker gave ``container`` on any network (none with host networking)."""
    container.reload()
    settings = container.attrs.get("NetworkSettings") or {}
    found = [settings.get("IPAddress") or ""]
    found += [(network or {}).get("IPAddress") or ""
              for network in (settings.get("Networks") or {}).values()]
    return [address for address in found if address]


class DockerServer(LocalServer):
    """A :class:`~simulator.local.LocalServer` whose process runs in a Docker container.

    Create with :meth:`create` (provisioned, not started), exactly like a local server; the
    extra attributes are ``image`` and ``container`` (the docker-py container of the current
    run, ``None`` when stopped).
    """

    image: str = ""
    container: Any = None
    _runs = 0
    _removals: list[threading.Thread] | None = None

    @classmethod
    def create(cls, engine: Engine, flavour: str | None = None, *, host: str | None = None,
               port: int | None = None, settings: Mapping[str, SettingValue] | None = None,
               name: str | None = None,
               provision: Callable[[LocalServer], None] | None = None) -> DockerServer:
        """As :meth:`LocalServer.create`; also makes sure the server image is available and
        removes containers that dead processes left behind."""
        spec = _engine_spec(engine)  # bad input fails before Docker is asked anything
        spec.check_flavour(flavour if flavour is not None else spec.flavours[0])
        image = server_image()
        sweep_containers()
        server = cast(DockerServer, super().create(
            engine, flavour, host=host, port=port, settings=settings, name=name,
            provision=provision))
        server.image = image
        return server

    # ---- process control

    @property
    def pid(self) -> int | None:
        """Pid (on this machine) of the server process in the container, else None."""
        container = self.container
        if container is None or not self.is_running():
            return None
        return int(container.attrs["State"]["Pid"]) or None

    @property
    def own_pid(self) -> int | None:
        """The server's pid in its container (what it writes in ``postmaster.pid``): the
        innermost ``NSpid`` of :attr:`pid`."""
        pid = self.pid
        if pid is None:
            return None
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        return pid

    def is_running(self) -> bool:
        """True while the current container runs."""
        container = self.container
        if container is None:
            return False
        try:
            container.reload()
        except Exception:  # gone (docker.errors.NotFound) or Docker unreachable
            return False
        return bool(container.status in ("created", "running"))

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> DockerServer:
        """Run the server in a new container and wait until it accepts connections.

        The same contract as :meth:`LocalServer.start`; ``timeout`` counts from the
        container's creation."""
        if self._removed:
            raise SimulatorError(f"{self.name} was stopped and removed; create a new server")
        if self.is_running():
            return self
        self._remove_container()
        if not port_is_free(self.host, self.port):
            raise ServerStartError(f"cannot start {self.name}: {self.host}:{self.port} is in use")
        started = time.monotonic()
        self.container = self._run_container()
        deadline = started + timeout
        delay = 0.01
        while True:
            if not self.is_running():
                code = self.container.attrs["State"].get("ExitCode")
                self._remove_container()
                raise ServerStartError(
                    f"container of {self.name} exited with status {code} while starting",
                    self.log_tail())
            reason = self._spec.probe(self, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            if reason is None:
                break
            if time.monotonic() > deadline:
                self._remove_container()
                raise ServerStartError(
                    f"{self.name} did not accept connections within {timeout:.1f} s "
                    f"(last probe: {reason})", self.log_tail())
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        LOGGER.info("started %s (%s %s) in container %s on %s:%d in %.3f s", self.name,
                    self.engine, self.flavour, self.container.name, self.host, self.port,
                    time.monotonic() - started)
        return self

    def _run_container(self) -> Any:
        root = str(sim_root())
        self._runs += 1
        argv = self._spec.argv(self)
        # The server's output goes to its log file, as a local server's does.
        command = ["/bin/sh", "-c", 'exec "$@" >>"$RESILIENT_DB_LOG" 2>&1', "server", *argv]
        environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C",
                       "TZ": "UTC", "HOME": str(self.base_dir),
                       "RESILIENT_DB_LOG": str(self.log_path)}
        return _docker().containers.run(
            self.image, command, detach=True,
            name=f"resilient_db-{self.host}-{self.port}-{self.owner.pid}-{self._runs}",
            user=self._account.name if self._account.switch else
            f"{self._account.uid}:{self._account.gid}",
            network_mode="host", ipc_mode="host", working_dir=str(self.base_dir),
            environment=environment, volumes={root: {"bind": root, "mode": "rw"}},
            labels={CONTAINER_LABEL: self.name,
                    _OWNER_LABEL: json.dumps(self.owner.to_json())},
            stop_signal=self._spec.shutdown_signal.name)

    def kill(self) -> None:
        """``docker kill`` (SIGKILL) like a crash; data, address and port are kept."""
        if self.is_running():
            LOGGER.info("killing %s (container %s)", self.name, self.container.name)
        self._remove_container()

    def stop(self, *, cleanup: bool = True, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """The engine's shutdown signal, then SIGKILL after ``timeout`` seconds; the container
        is removed; with ``cleanup`` also the files and the address (as for a local server),
        after every removal of this server's exited containers finished."""
        container = self.container
        if container is not None and self.is_running():
            with contextlib.suppress(Exception):  # it may exit on its own meanwhile
                container.kill(signal=self._spec.shutdown_signal.name)
            try:
                container.wait(timeout=timeout)
            except Exception:  # requests' timeout: not down in time
                LOGGER.warning("%s did not shut down within %.1f s; killing it", self.name,
                               timeout)
        self._remove_container()
        if cleanup and not self._removed:
            self._join_removals()
            self._remove_files()

    def _kill_process(self) -> None:
        self._remove_container()

    def _remove_container(self) -> None:
        """SIGKILL the current container and wait until its process is gone (its address is
        free then: host networking); remove the exited container in the background."""
        container = self.container
        if container is None:
            return
        with contextlib.suppress(Exception):  # already exited or gone is fine
            container.kill()
        deadline = time.monotonic() + _CONTAINER_EXIT_TIMEOUT
        while True:
            try:
                container.reload()
            except Exception:  # docker.errors.NotFound: gone already
                break
            if container.status not in ("created", "running", "restarting"):
                break
            if time.monotonic() > deadline:
                raise SimulatorError(f"container {container.name} of {self.name} still runs "
                                     f"{_CONTAINER_EXIT_TIMEOUT:.0f} s after SIGKILL")
            time.sleep(0.05)
        self.container = None
        self._remove_later(container)

    def _remove_later(self, container: Any) -> None:
        def remove() -> None:
            try:
                container.remove(force=True, v=True)
            except Exception as exc:  # gone already; else sweep_containers gets it later
                LOGGER.debug("removing container %s: %s", container.name, exc)

        thread = threading.Thread(target=remove, name=f"rm-{container.name}", daemon=True)
        thread.start()
        if self._removals is None:
            self._removals = []
        self._removals = [t for t in self._removals if t.is_alive()] + [thread]

    def _join_removals(self) -> None:
        """Wait for the background removals (bounded: a container left behind is removed by
        :func:`sweep_containers` once this process is gone)."""
        for thread in self._removals or ():
            thread.join(_CONTAINER_REMOVE_TIMEOUT)
            if thread.is_alive():
                LOGGER.warning("%s: container removal (%s) still running after %.0f s",
                               self.name, thread.name, _CONTAINER_REMOVE_TIMEOUT)
        self._removals = None

    def reload(self) -> None:
        """SIGHUP to the server in the container (PostgreSQL only), like ``pg_reload_conf()``."""
        if self.engine != "postgresql":
            raise SimulatorError(f"{self.name}: reload is only supported for PostgreSQL")
        if not self.is_running():
            raise SimulatorError(f"{self.name} is not running")
        self.container.kill(signal=signal.SIGHUP.name)

    def __repr__(self) -> str:
        state = "removed" if self._removed else "running" if self.is_running() else "stopped"
        return (f"<DockerServer {self.name} {self.image} {self.host}:{self.port} {state}>")
