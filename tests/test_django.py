"""The Django backends (resilient_db.integrations.django): Django's own test runner runs the tiny
app in tests/django_app against simulated Aurora PostgreSQL and Aurora MySQL clusters through
``ENGINE = "resilient_db.integrations.django.<engine>"``, including a writer failover under
load with nothing lost (the app's test signals when it is under load, this test fails the
writer over and hands it the promoted instance)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import resilient_db
from simulator.cluster import Cluster, Timeline

from .waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)
#: Liveness bound of the whole Django run (set-up, four tests, a failover).
RUN_BOUND = 600.0


def _wrapper(engine: str, options: dict[str, Any]) -> Any:
    """A backend's DatabaseWrapper, not connected (Django configured minimally, once)."""
    from django.conf import settings
    from django.db.utils import ConnectionHandler, load_backend

    if not settings.configured:
        settings.configure(USE_TZ=True)
    handler = ConnectionHandler({"default": {
        "ENGINE": f"resilient_db.integrations.django.{engine}", "NAME": "app",
        "OPTIONS": options}})
    settings_dict = handler.settings["default"]
    return load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, "default")


@pytest.mark.unit
def test_postgresql_backend_refuses_djangos_pool_and_keeps_psycopg_errors() -> None:
    import psycopg
    from django.core.exceptions import ImproperlyConfigured

    wrapper = _wrapper("postgresql", {"pool": True})
    with pytest.raises(ImproperlyConfigured, match="resilient_db"):
        _ = wrapper.pool
    assert _wrapper("postgresql", {}).pool is None
    # Django classifies errors by the DBAPI module's classes: still psycopg's.
    assert wrapper.Database.OperationalError is psycopg.OperationalError
    assert wrapper.Database.IntegrityError is psycopg.IntegrityError


@pytest.mark.unit
def test_resilient_db_options_reach_resilient_db() -> None:
    """OPTIONS go to resilient_db.connect, which rejects a misspelled property before any
    server I/O, naming it."""
    wrapper = _wrapper("postgresql", {"failover_timeout_secs": 5})
    with pytest.raises(resilient_db.ConfigurationError) as info:
        wrapper.get_new_connection(wrapper.get_connection_params())
    assert info.value.parameter == "failover_timeout_secs"


def _settings(engine: str, cluster: Cluster) -> tuple[dict[str, Any], str]:
    kw = cluster.connect_kwargs()
    options: dict[str, Any] = {"connect_timeout": 5}  # resilient_db's default plugin list
    if engine == "mysql":
        options.update(use_pure=True, aurora_mysql_lookalike_schema="aurora_sim")
        instance_sql = "SELECT aurora_sim.aurora_server_id()"
    else:
        instance_sql = "SELECT pg_catalog.aurora_db_instance_identifier()"
    return {
        "engine": f"resilient_db.integrations.django.{'postgresql' if engine == 'pg' else engine}",
        "host": kw["host"], "port": str(kw["port"]),
        "name": kw.get("dbname", kw.get("database")), "user": kw["user"],
        "password": kw["password"], "options": options,
    }, instance_sql


@pytest.mark.real_server
@pytest.mark.parametrize("engine", ["pg", "mysql"])
def test_django_test_runner_with_writer_failover(engine: str, tmp_path: Path) -> None:
    flavour = "aurora-pg" if engine == "pg" else "aurora-mysql"
    with Cluster.start(flavour, readers=1, timeline=TIMELINE) as cluster:
        database, instance_sql = _settings(engine, cluster)
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.django_app.settings",
               "RESILIENT_DJANGO_DB": json.dumps(database),
               "RESILIENT_DJANGO_SIGNALS": str(tmp_path),
               "RESILIENT_DJANGO_INSTANCE_SQL": instance_sql,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        log = tmp_path / "django.log"
        old = cluster.writer.id
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "django", "test", "tests.django_app", "--keepdb",
                 "--noinput", "-v", "2"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_until("the Django app under load (or its run ended)",
                           lambda: (tmp_path / "ready").exists() or proc.poll() is not None,
                           timeout=RUN_BOUND)
                promoted = ""
                if proc.poll() is None:
                    events = cluster.failover()
                    promoted = str(next(e.instance for e in events if e.name == "promoted"))
                    (tmp_path / "failed_over").write_text(promoted)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=RUN_BOUND)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=30)
        output = log.read_text()
        assert proc.returncode == 0, output[-6000:]
        assert "Ran 4 tests" in output and "\nOK" in output, output[-6000:]
        result = json.loads((tmp_path / "result.json").read_text())
        assert promoted and promoted != old
        assert result["instance"] == promoted == cluster.writer.id
        assert result["acknowledged"] > 0 and not result["lost"], result
