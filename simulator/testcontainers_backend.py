"""An instance runtime on Docker: the official ``postgres`` and ``mariadb`` images.

.. warning::
   **UNVERIFIED.** This module was written against the Testcontainers 4.x and docker-py 7.x
   APIs on a machine with no Docker daemon, so it has never started a container. Its contract
   test (``tests/test_sim_runtime.py``, marker ``docker``) runs wherever a Docker daemon
   answers and is skipped, with the reason, everywhere else. Trust it once that test has
   passed on a machine with Docker.

:class:`DockerServer` implements :class:`simulator.runtime.InstanceRuntime` with the same
credentials as :class:`simulator.local.LocalServer` (PostgreSQL ``postgres``/``postgres``,
MariaDB ``root``/``root``, database ``test`` on both), so a test written against one runs
against the other::

    from simulator.testcontainers_backend import DockerServer

    server = DockerServer.create("postgresql").start()
    psycopg.connect(server.conninfo())
    server.kill(); server.start()          # crash and restart: same data, address and port
    server.stop()                          # remove the container and its volumes

How it maps the lifecycle onto Docker:

* the first :meth:`DockerServer.start` creates the container through Testcontainers'
  ``DockerClient`` (pulling the image if needed; labelled with the Testcontainers session so
  that its Ryuk reaper removes the container if this process dies, the counterpart of the
  local backend's parent-death signal) and starts it; later starts restart the same
  container, so its data survives;
* :meth:`~DockerServer.kill` is ``docker kill`` (SIGKILL), ``stop(cleanup=False)`` is
  ``docker stop`` (the image's stop signal, then SIGKILL after ``timeout``), ``stop()`` is
  ``docker rm -f -v``;
* like a local server, each container is published on its *own* loopback address claimed
  from the simulator's registry (``127.x.y.z:5432`` / ``:3306``), so the host and port stay
  the same across restarts and faults can be applied per address. This assumes the Docker
  daemon runs on this machine with its default userland proxy; a remote daemon
  (``DOCKER_HOST=tcp://...``) is not supported.

Limits: only the plain flavours (``pg``, ``mysql``); ``data_dir`` is ``None`` (the data lives
in the container's volume), so engines that copy data directories (base backups by file
copy) cannot use this backend; and containers reach each other only through the Docker
network, not through the loopback addresses, so replication between two ``DockerServer``
instances needs an address the containers can see (not provided here).

Testcontainers and docker-py are imported lazily: importing this module costs nothing and
works without them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulator._addresses import ProcessIdentity, claim_address, release_address
from simulator.local import (
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    LocalServer,
    ServerStartError,
    SettingValue,
    SimulatorError,
    _probe_mariadb,
    _probe_postgres,
)
from simulator.runtime import Engine

__all__ = ["IMAGES", "DockerServer", "docker_unavailable_reason"]

LOGGER = logging.getLogger("resilient_db.simulator")

#: Image per engine: the official images of the versions the local backend runs.
IMAGES: dict[Engine, str] = {"postgresql": "postgres:15", "mariadb": "mariadb:10.11"}

_FLAVOURS: dict[Engine, str] = {"postgresql": "pg", "mariadb": "mysql"}
_CONTAINER_PORT: dict[Engine, int] = {"postgresql": 5432, "mariadb": 3306}
_LOG_TAIL_LINES = 40
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_OPTION_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# Seconds a daemon ping may take before Docker counts as unavailable.
_PING_TIMEOUT = 5


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


def _setting_text(value: SettingValue, engine: Engine) -> str:
    if isinstance(value, bool):
        on, off = ("on", "off") if engine == "postgresql" else ("ON", "OFF")
        return on if value else off
    return str(value)


def _command(engine: Engine, settings: Mapping[str, str]) -> list[str] | None:
    """Container command passing ``settings`` on the server's command line."""
    if not settings:
        return None  # the image's own CMD
    if engine == "postgresql":
        args = ["postgres"]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args
    # The mariadb image's entrypoint runs mariadbd when the first argument is an option.
    return [f"--{key}" if value == "" else f"--{key}={value}" for key, value in settings.items()]


class DockerServer:
    """One database server in a Docker container. UNVERIFIED (see the module docstring).

    Create with :meth:`create` (nothing happens on Docker until :meth:`start`). Attributes
    mirror :class:`simulator.local.LocalServer`: ``engine``, ``flavour``, ``name``, ``host``
    (the claimed loopback address), ``port`` (the engine's default port), ``user``,
    ``password``, ``database``, ``image``, ``settings``; ``data_dir`` is ``None``.
    """

    def __init__(self, *, engine: Engine, flavour: str, name: str, host: str, port: int,
                 image: str, settings: dict[str, str], owner: ProcessIdentity) -> None:
        self.engine: Engine = engine
        self.flavour = flavour
        self.name = name
        self.host = host
        self.port = port
        self.image = image
        self.settings = dict(settings)
        self.owner = owner
        if engine == "postgresql":
            self.user, self.password = "postgres", "postgres"
        else:
            self.user, self.password = "root", "root"
        self.database = "test"
        self.data_dir: Path | None = None  # the data lives in the container
        self._container: Any = None  # docker.models.containers.Container once created
        self._removed = False

    @classmethod
    def create(cls, engine: Engine, flavour: str | None = None, *, image: str | None = None,
               settings: Mapping[str, SettingValue] | None = None,
               name: str | None = None) -> DockerServer:
        """Claim a loopback address for a server that :meth:`start` will run in a container.

        ``flavour=None`` is the engine's plain flavour, the only one supported. ``image=None``
        is :data:`IMAGES` for the engine. ``settings`` are server options
        (``postgresql.conf`` parameters, ``mysqld`` options), passed on the command line.
        ``name`` (default ``<flavour>-<address>``) also names the container.
        """
        if engine not in IMAGES:
            raise ValueError(f"engine must be one of {', '.join(map(repr, IMAGES))}, "
                             f"got {engine!r}")
        plain = _FLAVOURS[engine]
        if flavour not in (None, plain):
            raise ValueError(f"DockerServer supports only the plain flavour {plain!r} for "
                             f"{engine}, got {flavour!r}")
        if name is not None and not _NAME_RE.fullmatch(name):
            raise ValueError(f"name must be letters, digits and _.- (at most 63), got {name!r}")
        checked: dict[str, str] = {}
        for key, value in (settings or {}).items():
            if not _OPTION_RE.fullmatch(key):
                raise ValueError(f"settings: invalid option name {key!r}")
            text = _setting_text(value, engine)
            if any(c in text for c in "\r\n\0"):
                raise ValueError(f"settings: value of {key!r} must be a single line")
            checked[key] = text
        owner = ProcessIdentity.current()
        host = claim_address(owner, name or f"{plain} container")
        server = cls(engine=engine, flavour=plain, name=name or f"{plain}-{host}", host=host,
                     port=_CONTAINER_PORT[engine], image=image or IMAGES[engine],
                     settings=checked, owner=owner)
        _live_servers.add(server)
        _register_atexit()
        return server

    # ---- process control

    def is_running(self) -> bool:
        """True while the container is running (whether or not the server is ready yet)."""
        container = self._container
        if container is None or self._removed:
            return False
        try:
            container.reload()
        except Exception:  # gone (docker.errors.NotFound) or Docker unreachable
            return False
        return bool(container.status == "running")

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> DockerServer:
        """Create or restart the container and wait until the server accepts connections.

        A no-op if running. ``timeout`` counts from the container start; pulling the image
        the first time is not included. On failure the container is killed (and kept, for
        :meth:`log_tail`) and :class:`ServerStartError` carries the end of its log.
        """
        if self._removed:
            raise SimulatorError(f"{self.name} was stopped and removed; create a new server")
        if self.is_running():
            return self
        started = time.monotonic()
        if self._container is None:
            self._container = self._create_container()
        self._container.start()
        deadline = time.monotonic() + timeout
        delay = 0.05
        reason: str | None = "not probed yet"
        while True:
            if not self.is_running():
                raise ServerStartError(
                    f"container of {self.name} exited while starting "
                    f"({self._container.status})", self.log_tail())
            reason = self._probe(max(0.1, min(2.0, deadline - time.monotonic())))
            if reason is None:
                break
            if time.monotonic() > deadline:
                self.kill()
                raise ServerStartError(
                    f"{self.name} did not accept connections within {timeout:.1f} s "
                    f"(last probe: {reason})", self.log_tail())
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        LOGGER.info("started %s (%s in %s) on %s:%d in %.3f s", self.name, self.engine,
                    self.image, self.host, self.port, time.monotonic() - started)
        return self

    def _probe(self, timeout: float) -> str | None:
        # Through the published port, as a client would come in. During the images' first
        # start a temporary server runs without TCP, so "ready" here means the real one.
        if self.engine == "postgresql":
            return _probe_postgres(self.host, self.port, self.user, self.database, timeout)
        return _probe_mariadb(self.host, self.port, timeout)

    def _create_container(self) -> Any:
        from testcontainers.core.config import testcontainers_config
        from testcontainers.core.container import Reaper
        from testcontainers.core.docker_client import DockerClient

        if not testcontainers_config.ryuk_disabled:
            Reaper.get_instance()  # removes this session's containers if we die
        if self.engine == "postgresql":
            env = {"POSTGRES_USER": self.user, "POSTGRES_PASSWORD": self.password,
                   "POSTGRES_DB": self.database}
        else:
            env = {"MARIADB_ROOT_PASSWORD": self.password, "MARIADB_DATABASE": self.database}
        client = DockerClient()
        return client.create(
            testcontainers_config.hub_image_name_prefix + self.image,
            command=_command(self.engine, self.settings),
            environment=env,
            # Bound to this server's own loopback address, on the engine's own port: the
            # same host:port for the container's whole life, restarts included.
            ports={f"{_CONTAINER_PORT[self.engine]}/tcp": (self.host, self.port)},
            labels={"resilient_db.simulator": self.name},
            name=f"resilient_db-{self.name.replace(':', '-')}-{self.owner.pid}",
            detach=True,
        )

    def kill(self) -> None:
        """``docker kill`` (SIGKILL) like a crash; the container, data and address are kept."""
        if self.is_running():
            LOGGER.info("killing %s", self.name)
            with contextlib.suppress(Exception):  # it may exit on its own meanwhile
                self._container.kill()
        self._wait_exited(10.0)

    def stop(self, *, cleanup: bool = True, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """``docker stop`` (then SIGKILL after ``timeout`` seconds); with ``cleanup`` also
        remove the container, its volumes and the address claim. Idempotent."""
        if self._removed:
            return
        container = self._container
        if container is not None and self.is_running():
            with contextlib.suppress(Exception):
                container.stop(timeout=max(1, round(timeout)))
            self._wait_exited(timeout + 5.0)
        if cleanup:
            if container is not None:
                with contextlib.suppress(Exception):  # already gone is fine
                    container.remove(force=True, v=True)
            release_address(self.host, self.owner)
            self._removed = True
            _live_servers.discard(self)

    def _wait_exited(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                raise SimulatorError(f"container of {self.name} is still running after "
                                     f"{timeout:.0f} s")
            time.sleep(0.05)

    # ---- connection parameters (the same as LocalServer's)

    def connect_kwargs(self) -> dict[str, str | int]:
        """Keyword arguments for psycopg (``dbname``) or mysql-connector (``database``)."""
        database_key = "dbname" if self.engine == "postgresql" else "database"
        return {"host": self.host, "port": self.port, database_key: self.database,
                "user": self.user, "password": self.password}

    # Same formats as the local runtime: they only read connect_kwargs() and the credentials.
    conninfo = LocalServer.conninfo
    uri = LocalServer.uri

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the container's output ("" if there is none)."""
        if self._container is None or self._removed:
            return ""
        try:
            data = self._container.logs(tail=lines)
        except Exception:
            return ""
        return bytes(data).decode(errors="replace").rstrip("\n")

    def __enter__(self) -> DockerServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "running" if self.is_running() else "stopped"
        return f"<DockerServer {self.name} {self.image} {self.host}:{self.port} {state}>"


# Containers this process created and has not removed, for the atexit hook (Ryuk covers a
# process that dies without running it).
_live_servers: set[DockerServer] = set()


@functools.cache
def _register_atexit() -> None:
    atexit.register(_stop_all_at_exit)


def _stop_all_at_exit() -> None:
    for server in list(_live_servers):
        try:
            server.stop(timeout=5.0)
        except Exception:  # exiting: report and go on with the others
            LOGGER.exception("could not remove %s at exit", server.name)
