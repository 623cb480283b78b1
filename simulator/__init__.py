"""Local database servers for tests: the building blocks of the cluster simulator."""

from simulator.local import (
    LocalServer,
    ServerStartError,
    SimulatorError,
    start_mariadb,
    start_postgres,
    sweep_stale,
)

__all__ = [
    "LocalServer",
    "ServerStartError",
    "SimulatorError",
    "start_mariadb",
    "start_postgres",
    "sweep_stale",
]
