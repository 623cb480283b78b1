"""Runners for I/O-free query flows (psycopg's ``generators.py`` pattern, DESIGN §3).

A flow is a generator that yields one SQL statement at a time and is sent that statement's
rows (or thrown the exception it raised: the flow may catch it); its return value is the
result. The same flow runs over a blocking driver connection (:func:`run_sync`) or an asyncio
one (:func:`run_async`), so the sync and async fronts share every decision about what to ask
and what the answers mean, and differ only in how a statement is awaited.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

__all__ = ["QueryFlow", "Rows", "run_async", "run_sync"]

T = TypeVar("T")
A = TypeVar("A")  # what a statement answers: rows, or a dialect check's Answer
Rows = list[tuple[Any, ...]]
#: Yields SQL, is sent its rows (or thrown its error), returns ``T``.
QueryFlow = Generator[str, Rows, T]


def run_sync(flow: Generator[str, A, T], query: Callable[[str], A]) -> T:
    """Run ``flow``, each statement through the blocking ``query(sql) -> rows``."""
    try:
        sql = next(flow)
        while True:
            try:
                rows = query(sql)
            except Exception as exc:
                sql = flow.throw(exc)
            else:
                sql = flow.send(rows)
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        flow.close()


async def run_async(flow: Generator[str, A, T], query: Callable[[str], Awaitable[A]]) -> T:
    """Run ``flow``, each statement through the awaitable ``query(sql) -> rows``."""
    try:
        sql = next(flow)
        while True:
            try:
                rows = await query(sql)
            except Exception as exc:
                sql = flow.throw(exc)
            else:
                sql = flow.send(rows)
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        flow.close()
