"""pytest fixtures that start throwaway servers with :mod:`simulator.local`.

Enable with ``pytest_plugins = ["simulator.pytest_plugin"]`` in ``conftest.py``.

Session fixtures (one server each for the whole run, stopped at the end): ``pg_server``,
``rds_pg_server``, ``mysql_server``, ``rds_mysql_server``. Tests that change server state
(kill, settings, restarts) should use ``local_server_factory`` instead, which gives each test
its own servers and stops them all afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import pytest

from simulator.local import Engine, LocalServer, SettingValue, start_mariadb, start_postgres

__all__ = ["LocalServerFactory"]


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``real_server`` marker."""
    config.addinivalue_line(
        "markers",
        "real_server: starts real local PostgreSQL/MariaDB servers (simulator.local)",
    )


class LocalServerFactory(Protocol):
    """Type of the ``local_server_factory`` fixture."""

    def __call__(self, engine: Engine, flavour: str | None = None, *, host: str | None = None,
                 port: int | None = None, settings: Mapping[str, SettingValue] | None = None,
                 name: str | None = None) -> LocalServer:
        """Start a server; ``flavour=None`` is the engine's plain flavour."""
        ...


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalServer]:
    """A plain PostgreSQL server shared by the session."""
    with start_postgres(flavour="pg") as server:
        yield server


@pytest.fixture(scope="session")
def rds_pg_server() -> Iterator[LocalServer]:
    """A PostgreSQL server that looks like RDS for PostgreSQL, shared by the session."""
    with start_postgres(flavour="rds-pg") as server:
        yield server


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[LocalServer]:
    """A plain MariaDB server shared by the session."""
    with start_mariadb(flavour="mysql") as server:
        yield server


@pytest.fixture(scope="session")
def rds_mysql_server() -> Iterator[LocalServer]:
    """A MariaDB server that looks like RDS for MySQL, shared by the session."""
    with start_mariadb(flavour="rds-mysql") as server:
        yield server


@pytest.fixture
def local_server_factory() -> Iterator[LocalServerFactory]:
    """Start servers on demand; every server started is stopped when the test ends."""
    started: list[LocalServer] = []

    def factory(engine: Engine, flavour: str | None = None, *, host: str | None = None,
                port: int | None = None, settings: Mapping[str, SettingValue] | None = None,
                name: str | None = None) -> LocalServer:
        server = LocalServer.create(engine, flavour, host=host, port=port, settings=settings,
                                    name=name)
        started.append(server)  # before start(): a server that fails to start is removed too
        return server.start()

    yield factory
    errors: list[BaseException] = []
    for server in reversed(started):
        try:
            server.stop()
        except Exception as exc:  # stop the others, then report the first failure
            errors.append(exc)
    if errors:
        raise errors[0]
