"""The instance-runtime interface: what the cluster simulator needs of one database server.

A :class:`simulator.cluster.Cluster` and its engines never care *how* a server runs, only
that it can be started, stopped, crashed and reached. :class:`InstanceRuntime` spells out
exactly that surface, so that the same control plane can drive different backends:

* :class:`simulator.local.LocalServer` — a server binary run as a child process on its own
  loopback address (the default, verified by ``tests/test_sim_runtime.py``);
* :class:`simulator.testcontainers_backend.DockerServer` — the same server with its process in
  a Docker container (host networking, an image built on this machine), verified by the same
  contract wherever a Docker daemon answers (``scripts/test`` starts one).

Lifecycle every implementation follows (the contract ``tests/test_sim_runtime.py`` checks)::

    created --start()--> running --kill()------------> stopped (crash; data kept)
                         running --stop(cleanup=False)-> stopped (clean; data kept)
                         stopped --start()------------> running (same data, host and port)
                         any     --stop()-------------> removed (files and address gone)

``start()`` on a running instance and ``stop()`` on a removed one do nothing; ``start()`` on a
removed instance raises :class:`simulator.local.SimulatorError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

__all__ = ["Engine", "InstanceRuntime"]

#: The server software behind an instance (MySQL flavours run on MariaDB).
Engine = Literal["postgresql", "mariadb"]


@runtime_checkable
class InstanceRuntime(Protocol):
    """One database server the simulator can start, stop, crash and connect to.

    Attributes are read-only views, fixed for the instance's lifetime: the address, port and
    credentials survive kills and restarts, so a replica or a client configured once keeps
    working. ``user``/``password`` are the server's superuser; ``database`` exists on it.
    """

    @property
    def engine(self) -> Engine:
        """``"postgresql"`` or ``"mariadb"``."""
        ...

    @property
    def host(self) -> str:
        """Address clients connect to (a literal IP address, never a name)."""
        ...

    @property
    def port(self) -> int:
        """TCP port clients connect to."""
        ...

    @property
    def user(self) -> str:
        """Superuser name."""
        ...

    @property
    def password(self) -> str:
        """Superuser password."""
        ...

    @property
    def database(self) -> str:
        """Database that exists on a fresh instance (``test``)."""
        ...

    @property
    def data_dir(self) -> Path | None:
        """Data directory on this machine; ``None`` when the server's files are not on the
        local file system (a container, a remote host)."""
        ...

    def start(self, timeout: float = ...) -> InstanceRuntime:
        """Start the server and return ``self`` once it accepts connections.

        A no-op while running. Raises :class:`simulator.local.ServerStartError` if it is not
        ready within ``timeout`` seconds (the server is then killed) and
        :class:`simulator.local.SimulatorError` after a full :meth:`stop`.
        """
        ...

    def stop(self, *, cleanup: bool = True, timeout: float = ...) -> None:
        """Shut down cleanly (killing after ``timeout`` seconds). ``cleanup=True`` also removes
        the data and releases the address; ``cleanup=False`` keeps both for :meth:`start`.
        Idempotent."""
        ...

    def kill(self) -> None:
        """Crash the server (SIGKILL); data, address and port are kept. A no-op when stopped."""
        ...

    def is_running(self) -> bool:
        """True while the server process (or container) is alive."""
        ...

    def connect_kwargs(self) -> dict[str, str | int]:
        """Driver keyword arguments: ``host``, ``port``, ``user``, ``password`` and
        ``dbname`` (psycopg) or ``database`` (mysql-connector)."""
        ...

    def conninfo(self) -> str:
        """The same as a ``key=value`` string, with the driver's own key names."""
        ...

    def uri(self) -> str:
        """``postgresql://`` or ``mysql://`` URI with credentials and database."""
        ...

    def log_tail(self, lines: int = ...) -> str:
        """The last ``lines`` lines of the server's log (``""`` if there is none)."""
        ...
