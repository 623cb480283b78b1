"""Lifecycle: nothing at import, shutdown stops registered background work."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

import resilient_db
from resilient_db import _lifecycle

pytestmark = pytest.mark.unit


def test_import_starts_nothing_and_exits_promptly() -> None:
    code = textwrap.dedent("""
        import threading, sys
        before = set(sys.modules)
        import resilient_db
        extra = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        assert not extra, extra
        heavy = {"psycopg", "mysql.connector", "opentelemetry.sdk", "boto3", "tenacity"}
        loaded = heavy & set(sys.modules)
        assert not loaded, f"imported at import time: {loaded}"
        print("ok")
    """)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=False)
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert elapsed < 10  # a liveness bound, not a speed goal


def test_shutdown_stops_registered_work_in_reverse_order() -> None:
    stopped: list[str] = []
    _lifecycle.register("first", lambda: stopped.append("first"))
    _lifecycle.register("second", lambda: stopped.append("second"))
    assert {"first", "second"} <= set(_lifecycle.running())
    resilient_db.shutdown()
    assert stopped[-2:] == ["second", "first"]
    assert _lifecycle.running() == []
    resilient_db.shutdown()  # idempotent


def test_a_failing_stopper_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    stopped: list[str] = []

    def boom() -> None:
        raise RuntimeError("stop failed")

    _lifecycle.register("ok", lambda: stopped.append("ok"))
    _lifecycle.register("bad", boom)
    resilient_db.shutdown()
    assert stopped == ["ok"]
    assert "stopping bad failed" in caplog.text
