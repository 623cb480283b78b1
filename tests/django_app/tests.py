"""Run by Django's test runner (``python -m django test tests.django_app``), started by
tests/test_django.py, which owns the simulated cluster: this process signals through files in
``RESILIENT_DJANGO_SIGNALS`` when it is under load (``ready``) and the parent fails the writer
over and answers with the promoted instance (``failed_over``)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psycopg
from django.db import IntegrityError, OperationalError, connection, connections, transaction
from django.test import TransactionTestCase

import resilient_db

from .models import Item

SIGNALS = Path(os.environ["RESILIENT_DJANGO_SIGNALS"])
INSTANCE_SQL = os.environ["RESILIENT_DJANGO_INSTANCE_SQL"]
#: Liveness bounds, generous for a loaded machine (waits are polled, never slept through).
BOUND = 120.0


def wait_for(what: str, check: object) -> None:
    assert callable(check)
    deadline = time.monotonic() + BOUND
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {BOUND:g} s waiting for {what}")
        time.sleep(0.05)


def retryable(error: OperationalError) -> bool:
    """Django wraps the driver's error; resilient_db's outcome is its cause."""
    return isinstance(error.__cause__, (resilient_db.FailoverSuccessError,
                                        resilient_db.TransactionResolutionUnknownError))


def create_with_retry(key: int, worker: int, attempts: int = 5) -> None:
    """What an application does after a failover: the atomic block rolled back; run it again.
    A retry that meets its own row (the unknown outcome was a commit) is done."""
    for attempt in range(attempts):
        try:
            with transaction.atomic():
                Item.objects.create(id=key, worker=worker, note=f"w{worker}")
            return
        except IntegrityError:
            if attempt == 0:
                raise
            return
        except OperationalError as error:
            if not retryable(error) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


class BackendTests(TransactionTestCase):  # type: ignore[misc]  # Django is untyped
    def test_connection_is_resilient_db(self) -> None:
        connection.ensure_connection()
        assert isinstance(connection.connection, resilient_db.ConnectionProxy)
        assert "failover" in connection.connection.resilient.plugins

    def test_integrity_error_keeps_its_identity(self) -> None:
        Item.objects.create(id=1, worker=0, note="a")
        with self.assertRaises(IntegrityError) as info, transaction.atomic():
            Item.objects.create(id=1, worker=0, note="b")
        cause = info.exception.__cause__
        if connection.vendor == "postgresql":
            assert isinstance(cause, psycopg.errors.UniqueViolation)
        else:
            import mysql.connector

            assert isinstance(cause, mysql.connector.errors.IntegrityError)
        assert Item.objects.count() == 1

    def test_iterator_through_a_named_cursor(self) -> None:
        """PostgreSQL: QuerySet.iterator() opens a named (server-side) cursor, through the
        connection proxy, with Django's client-side-binding class."""
        Item.objects.bulk_create([Item(id=k, worker=0, note="i") for k in range(5)])
        with transaction.atomic():
            ids = [item.id for item in Item.objects.filter(id__gte=1).order_by("id")
                   .iterator(chunk_size=2)]
            if connection.vendor == "postgresql":
                raw = connection.connection.resilient.raw
                assert raw.server_cursor_factory.__name__ == "ServerSideCursor"
        assert ids == [1, 2, 3, 4]


class FailoverTests(TransactionTestCase):  # type: ignore[misc]
    def test_writer_failover_under_load_loses_nothing(self) -> None:
        workers, per_worker = 4, 2000
        acknowledged: list[set[int]] = [set() for _ in range(workers)]
        errors: list[BaseException] = []
        failed_over = threading.Event()

        def work(worker: int) -> None:
            try:
                for seq in range(per_worker):
                    key = worker * 100_000 + seq
                    create_with_retry(key, worker)
                    acknowledged[worker].add(key)
                    if failed_over.is_set() and len(acknowledged[worker]) > marks[worker] + 20:
                        return
            except BaseException as error:
                errors.append(error)
            finally:
                connections.close_all()  # this thread's connection

        marks = [per_worker] * workers
        threads = [threading.Thread(target=work, args=(w,), daemon=True)
                   for w in range(workers)]
        for thread in threads:
            thread.start()
        wait_for("every worker committed a few rows",
                 lambda: all(len(a) >= 5 for a in acknowledged) or bool(errors))
        assert not errors, errors
        (SIGNALS / "ready").write_text("under load")
        wait_for("the parent's failover", lambda: (SIGNALS / "failed_over").exists()
                 or bool(errors))
        promoted = (SIGNALS / "failed_over").read_text().strip()
        marks[:] = [len(a) for a in acknowledged]
        failed_over.set()
        for thread in threads:
            thread.join(BOUND)
        assert not any(t.is_alive() for t in threads), "a worker is stuck"
        assert not errors, errors
        wanted = set().union(*acknowledged)
        assert all(len(a) > m for a, m in zip(acknowledged, marks, strict=True))
        with connection.cursor() as cursor:  # the main thread's connection fails over too
            for _ in range(3):
                try:
                    cursor.execute(INSTANCE_SQL)
                    break
                except OperationalError as error:
                    assert retryable(error), error
            instance = str(cursor.fetchone()[0])
        stored = set(Item.objects.values_list("id", flat=True))
        (SIGNALS / "result.json").write_text(json.dumps({
            "acknowledged": len(wanted), "stored": len(stored), "instance": instance,
            "lost": sorted(wanted - stored)[:10]}))
        assert instance == promoted, (instance, promoted)
        assert wanted <= stored, f"lost {sorted(wanted - stored)[:10]}"
