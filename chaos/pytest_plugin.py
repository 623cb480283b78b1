"""pytest fixtures for network faults.

Enable with ``pytest_plugins = ["chaos.pytest_plugin"]`` in ``conftest.py``.

``network_faults``: a :class:`chaos.netfault.NetworkFaults` whose faults are all removed when
the test ends, whether it passed, failed or errored.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chaos.netfault import NetworkFaults

__all__ = ["network_faults"]


@pytest.fixture
def network_faults() -> Iterator[NetworkFaults]:
    """Apply network faults in a test; every rule is removed at teardown, even on failure."""
    faults = NetworkFaults()
    try:
        yield faults
    finally:
        faults.clear()
