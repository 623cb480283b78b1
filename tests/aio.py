"""What the asyncio tests share (``test_asyncio``: psycopg, ``test_asyncio_mysql``:
mysql.connector.aio): a bounded ``asyncio.run``, an awaitable condition wait, cancellation
after a number of loop turns and the schedule of such points, and small accessors."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from resilient_db.plugins.failover import FailoverPlugin

T = TypeVar("T")

#: Nothing hangs: a test's coroutine gets this many seconds at most.
TEST_BOUND = 120.0


def run(coro: Awaitable[T]) -> T:
    """``asyncio.run`` of ``coro``, bounded by :data:`TEST_BOUND`."""
    return asyncio.run(bounded(coro))


async def bounded(coro: Awaitable[T]) -> T:
    return await asyncio.wait_for(coro, TEST_BOUND)


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Await ``condition`` (polled every 20 ms, the loop keeps running meanwhile); after
    ``timeout`` seconds fail the test."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def cancel_after(steps: int, coro: Awaitable[T], delay: float = 0.0) -> Awaitable[T | None]:
    """Run ``coro`` and cancel it after ``steps`` turns of the event loop, then ``delay``
    seconds more (``None`` if it was cancelled, its result if it finished first)."""
    async def runner() -> T | None:
        task = asyncio.ensure_future(coro)
        for _ in range(steps):
            if task.done():
                break
            await asyncio.sleep(0)
        if delay and not task.done():
            await asyncio.wait({task}, timeout=delay)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await task
        return None
    return runner()


def cancellation_points() -> Iterator[tuple[int, float]]:
    """Cancellation points for :func:`cancel_after`: each of the first ten loop turns, then
    growing delays (endless: the caller stops when an operation finishes uncancelled)."""
    for steps in range(10):
        yield steps, 0.0
    delay = 0.0005
    while True:
        yield 10, delay
        delay *= 1.3


def promoted(events: list[Any]) -> str:
    """The instance a simulator failover promoted."""
    return str(next(e.instance for e in events if e.name == "promoted"))


def failover_plugin(conn: Any) -> FailoverPlugin:
    found = conn.resilient.plugin("failover")
    assert isinstance(found, FailoverPlugin)
    return found
