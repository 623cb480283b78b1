"""Process-wide open connection counts per host (resilient_db._open_counts), the input of the
least_connections strategy: the seat bookkeeping, and real connections taking, moving and
giving up their seats."""

from __future__ import annotations

import gc
from typing import Any

import psycopg
import pytest

import resilient_db
from resilient_db._open_counts import Seat, address_for, note_opened, open_counts
from resilient_db._pipeline import HostSpec

from .conftest import Backend


class _Raw:
    """A stand-in driver connection (only its identity matters here)."""


@pytest.mark.unit
def test_seats_count_take_move_release_once() -> None:
    a, b = "counts-a.test:5432", "counts-b.test:5432"
    first, second = Seat(a), Seat(a)
    assert open_counts()[a] == 2
    second.move(b)
    assert (open_counts()[a], open_counts()[b]) == (1, 1)
    second.release()
    second.release()  # idempotent
    second.move(a)  # a released seat stays released
    assert open_counts()[a] == 1 and b not in open_counts()
    del first
    gc.collect()
    assert a not in open_counts()


@pytest.mark.unit
def test_address_is_where_the_driver_connection_was_opened() -> None:
    raw, other = _Raw(), _Raw()
    note_opened(raw, HostSpec("Instance-1.Test"), 5432)
    endpoint = HostSpec("reader.test", 6000)
    assert address_for(raw, endpoint, 5432) == "instance-1.test:5432"
    assert address_for(other, endpoint, 5432) == "reader.test:6000"  # unknown: the proxy's host


@pytest.mark.real_server
def test_connections_are_counted_until_closed_or_dropped(pg_backend: Backend) -> None:
    kwargs: dict[str, Any] = dict(pg_backend.kwargs)
    address = f"{kwargs['host']}:{kwargs['port']}".lower()
    before = open_counts().get(address, 0)
    first = resilient_db.connect(psycopg.Connection.connect, plugins="", **kwargs)
    with resilient_db.connect(psycopg.Connection.connect, plugins="failover", **kwargs):
        assert open_counts().get(address, 0) == before + 2
    assert open_counts().get(address, 0) == before + 1  # the with block closed it
    first.close()
    assert open_counts().get(address, 0) == before
    dropped = resilient_db.connect(psycopg.Connection.connect, plugins="", **kwargs)
    assert open_counts().get(address, 0) == before + 1
    del dropped
    gc.collect()
    assert open_counts().get(address, 0) == before
