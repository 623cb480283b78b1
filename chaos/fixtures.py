"""pytest fixtures to run chaos scenarios in your own CI.

Enable with ``pytest_plugins = ["chaos.fixtures"]`` in your root ``conftest.py``, then::

    def test_survives_writer_crash(chaos_run):
        result = chaos_run("writer-crash", flavour="mysql")
        assert_passed(result)                       # invariants and steady state

    def test_my_scenario(chaos_run):
        result = chaos_run("tests/chaos/my-scenario.yaml")
        assert_invariants(result)                   # invariants only

``chaos_run(scenario, flavour=None, faults="local", **kwargs)`` calls
:func:`chaos.runner.run` with the reports written under the test's ``tmp_path`` (the paths
are in ``result.paths`` and in assertion messages). Network faults need root and iptables.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Protocol

import pytest

from chaos.runner import RunResult, run

__all__ = ["ChaosRun", "assert_invariants", "assert_passed", "chaos_run"]


class ChaosRun(Protocol):
    """Type of the ``chaos_run`` fixture."""

    def __call__(self, scenario: Any, *, flavour: str | None = None, faults: str = "local",
                 **kwargs: Any) -> RunResult: ...


def _explain(result: RunResult) -> str:
    where = result.paths.get("html")
    return f"{result.summary()}\n  report: {where}"


def assert_invariants(result: RunResult) -> None:
    """Fail unless every invariant held (no acknowledged write lost, none executed by a
    reader, only documented error types)."""
    failed = [c for c in result.data["invariants"] if not c["ok"]]
    assert not failed, _explain(result)


def assert_passed(result: RunResult) -> None:
    """Fail unless the verdict is ``pass`` (invariants and steady-state hypothesis)."""
    assert result.verdict == "pass", _explain(result)


@pytest.fixture
def chaos_run(tmp_path: Path) -> ChaosRun:
    """Run a chaos scenario; reports go to ``tmp_path/chaos-<n>``."""
    counter = itertools.count(1)

    def runner(scenario: Any, *, flavour: str | None = None, faults: str = "local",
               **kwargs: Any) -> RunResult:
        kwargs.setdefault("out_dir", tmp_path / f"chaos-{next(counter)}")
        return run(scenario, flavour=flavour, faults=faults, **kwargs)

    return runner
