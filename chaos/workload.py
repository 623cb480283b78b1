"""The application under test: threads that write and read through resilient_db and record
every request.

Each write carries a unique id (``thread * 10**9 + sequence``) and an SQL function that names
the instance executing it, so that afterwards the rows on the final writer say, for every
acknowledged write, whether it is there and where it ran. A write is *acknowledged* when its
statement (autocommit, ``tx_size`` 1) or its transaction's ``COMMIT`` returned. Writes are
idempotent inserts marked ``idempotent=True`` so the failover plugin may replay them; after a
``FailoverSuccessError`` the application retries the same id; after
``TransactionResolutionUnknownError`` the transaction's ids are *unresolved* (present or not,
both are fine) and the application moves on with new ids.

How the application reacts to errors (what a careful application does):
``FailoverSuccessError`` retry; ``TransactionResolutionUnknownError`` move on;
``FailoverFailedError`` or any driver error: pause 50 ms, reconnect (connect errors are
recorded as ``connect`` requests) and go on.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import resilient_db
from chaos.control import EngineSql

__all__ = ["Request", "Workload"]

LOGGER = logging.getLogger("chaos.workload")

ID_STRIDE = 10**9


@dataclass(slots=True)
class Request:
    """One request as the application saw it. ``kind``: ``write``, ``read`` or ``connect``;
    ``start``/``end``: monotonic seconds; ``error``: the exception's class name (``None``:
    success); ``ids``: the write ids it carried; ``instance``: where the failover plugin says
    the connection was (client-side view, ``None`` if unknown)."""

    thread: int
    kind: str
    start: float
    end: float
    error: str | None = None
    documented: bool = True
    ids: tuple[int, ...] = ()
    instance: str | None = None
    #: the error's message (first 300 characters)
    message: str | None = None


def is_documented(exc: BaseException, kind: str) -> bool:
    """Whether ``exc`` is an error type the docs promise (``docs/errors.md``): resilient_db's
    own outcomes always; a driver error from connect (an unreachable host propagates
    unchanged) and a write's read-only error (see below)."""
    if isinstance(exc, resilient_db.Error):
        return True
    if kind == "connect":
        return _is_driver_operational(exc)
    # docs/errors.md, "Read-only errors": a write refused by an instance that is still the
    # writer by its own account (a planned failover's write stop before the promotion) is the
    # driver's read-only error, untouched.
    return kind == "write" and _is_read_only(exc)


_READ_ONLY_SQLSTATE = "25006"
_READ_ONLY_ERRNOS = frozenset({1290, 1792, 1836})


def _is_read_only(exc: BaseException) -> bool:
    return (getattr(exc, "sqlstate", None) == _READ_ONLY_SQLSTATE
            or getattr(exc, "errno", None) in _READ_ONLY_ERRNOS)


def _message(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"[:300]


def _is_driver_operational(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"OperationalError", "InterfaceError"})


@dataclass
class Workload:
    """``threads`` application threads against ``kwargs`` (driver arguments of the writer
    endpoint) and ``reader_kwargs`` (reads, when given)."""

    sql: EngineSql
    table: str
    kwargs: dict[str, Any]
    threads: int = 2
    write_ratio: float = 0.8
    rate: float = 50.0
    tx_size: int = 1
    plugins: str = "failover"
    reader_kwargs: dict[str, Any] | None = None
    #: close the connection and open a new one every this many operations (0: never)
    reconnect_every: int = 0
    #: reads between ``conn.read_only = True`` and ``False`` on the writer endpoint's
    #: connection (``read_write_splitting`` moves them to a reader); a read records the
    #: instance that executed it (the read statement names it)
    split_reads: bool = False
    seed: int = 7
    requests: list[Request] = field(default_factory=list)
    #: id -> acknowledgement time (monotonic) of every acknowledged write
    acked: dict[int, float] = field(default_factory=dict)
    #: ids whose transaction's outcome is unknown
    unresolved: set[int] = field(default_factory=set)
    stop_event: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _insert(self) -> str:
        return self.sql.insert.replace("{t}", self.table)

    def _read(self) -> str:
        return self.sql.read.replace("{t}", self.table)

    def start(self) -> None:
        for n in range(self.threads):
            thread = threading.Thread(target=self._run, args=(n + 1,), daemon=True,
                                      name=f"chaos-app-{n + 1}")
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 30.0) -> list[str]:
        """Stop and join; returns the names of threads still stuck in a request."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def snapshot(self) -> tuple[int, int, int]:
        """(successful writes, successful reads, failed requests) so far."""
        with self._lock:
            ok_w = sum(1 for r in self.requests if r.error is None and r.kind == "write")
            ok_r = sum(1 for r in self.requests if r.error is None and r.kind == "read")
            return ok_w, ok_r, sum(1 for r in self.requests if r.error is not None)

    # -- one application thread -----------------------------------------------------------

    def _connect(self, thread: int, kwargs: dict[str, Any], autocommit: bool) -> Any | None:
        while not self.stop_event.is_set():
            start = time.monotonic()
            try:
                conn = resilient_db.connect(self.sql.target, plugins=self.plugins,
                                            **{**kwargs, "autocommit": autocommit})
            except Exception as exc:
                self._record(Request(thread, "connect", start, time.monotonic(),
                                     type(exc).__name__, is_documented(exc, "connect"),
                                     message=_message(exc)))
                self.stop_event.wait(0.1)
                continue
            return conn
        return None

    def _where(self, conn: Any) -> str | None:
        if "failover" not in self.plugins:
            return None
        with contextlib.suppress(Exception):
            found = conn.resilient.plugin("failover").instance_id
            return None if found is None else str(found)
        return None

    def role(self, thread: int) -> str:
        """``mixed`` (reads and writes on the writer endpoint); with a reader endpoint each
        thread only ``write``s or only ``read``s there, so a stuck read never delays a write:
        threads ``1..round(threads * write_ratio)`` write (at least one of each)."""
        if self.reader_kwargs is None:
            return "mixed"
        writers = min(max(1, round(self.threads * self.write_ratio)), self.threads - 1)
        return "write" if thread <= max(writers, 1) else "read"

    def _run(self, thread: int) -> None:
        rng = random.Random(self.seed * 1000 + thread)
        role = self.role(thread)
        autocommit = self.tx_size == 1
        if role == "read":
            kwargs, autocommit = self.reader_kwargs or {}, True
        else:
            kwargs = self.kwargs
        conn = self._connect(thread, kwargs, autocommit)
        sequence = 0
        pending: list[int] = []  # ids of a write to retry (same ids)
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_at = time.monotonic()
        last_acked = 0
        operations = 0
        try:
            while not self.stop_event.is_set() and conn is not None:
                operations += 1
                if self.reconnect_every and operations % self.reconnect_every == 0 \
                        and not pending:
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = self._connect(thread, kwargs, autocommit)
                    if conn is None:
                        break
                if interval:
                    now = time.monotonic()
                    if next_at > now:
                        self.stop_event.wait(next_at - now)
                    next_at = max(next_at + interval, time.monotonic() - interval)
                write = role == "write" or (role == "mixed" and (
                    bool(pending) or rng.random() < self.write_ratio))
                if write:
                    if not pending:
                        for _ in range(self.tx_size):
                            sequence += 1
                            pending.append(thread * ID_STRIDE + sequence)
                    outcome = self._write(thread, conn, pending, autocommit)
                    if outcome == "acked":
                        last_acked = pending[-1]
                        pending = []
                    elif outcome == "unresolved":
                        with self._lock:
                            self.unresolved.update(pending)
                        pending = []
                    elif outcome == "reconnect":
                        conn = self._reconnect(thread, conn, kwargs, autocommit)
                elif not self._read_once(thread, conn, last_acked):
                    conn = self._reconnect(thread, conn, kwargs, autocommit)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _reconnect(self, thread: int, conn: Any, kwargs: dict[str, Any],
                   autocommit: bool) -> Any | None:
        with contextlib.suppress(Exception):
            conn.close()
        self.stop_event.wait(0.05)
        return self._connect(thread, kwargs, autocommit)

    def _write(self, thread: int, conn: Any, ids: list[int], autocommit: bool) -> str:
        """One attempt to write ``ids``: ``acked``, ``retry`` (same ids), ``unresolved``
        (outcome unknown: new ids next) or ``reconnect``."""
        insert = self._insert()
        start = time.monotonic()
        try:
            cur = conn.cursor()
            if autocommit:
                with resilient_db.call_options(idempotent=True):
                    cur.execute(insert, (ids[0], thread))
            else:
                for write_id in ids:
                    cur.execute(insert, (write_id, thread))
                conn.commit()
            with contextlib.suppress(Exception):
                cur.close()
        except Exception as exc:
            end = time.monotonic()
            self._record(Request(thread, "write", start, end, type(exc).__name__,
                                 is_documented(exc, "write"), tuple(ids),
                                 message=_message(exc)))
            if isinstance(exc, resilient_db.FailoverSuccessError):
                return "retry"
            if not autocommit:
                with contextlib.suppress(Exception):
                    conn.rollback()
                if isinstance(exc, resilient_db.TransactionResolutionUnknownError):
                    return "unresolved"
            elif isinstance(exc, resilient_db.TransactionResolutionUnknownError):
                return "retry"
            if isinstance(exc, resilient_db.Error) and not isinstance(
                    exc, resilient_db.FailoverFailedError):
                return "retry" if autocommit else "unresolved"
            # FailoverFailedError or a driver error: the ids may or may not have been applied.
            # Autocommit inserts are idempotent, so they are retried with the same ids;
            # a transaction's are given up (unresolved).
            if not autocommit:
                with self._lock:
                    self.unresolved.update(ids)
                ids.clear()
            return "reconnect"
        end = time.monotonic()
        where = self._where(conn)
        with self._lock:
            self.requests.append(Request(thread, "write", start, end, None, True, tuple(ids),
                                         where))
            for write_id in ids:
                self.acked[write_id] = end
        return "acked"

    def _read_once(self, thread: int, conn: Any, last_acked: int) -> bool:
        start = time.monotonic()
        try:
            if self.split_reads:
                conn.read_only = True
            try:
                cur = conn.cursor()
                cur.execute(self._read(), (last_acked,))
                rows = cur.fetchall()
                with contextlib.suppress(Exception):
                    cur.close()
            finally:
                if self.split_reads:
                    conn.read_only = False  # back to the writer for the next write
        except Exception as exc:
            self._record(Request(thread, "read", start, time.monotonic(), type(exc).__name__,
                                 is_documented(exc, "read"), message=_message(exc)))
            return isinstance(exc, resilient_db.Error) and not isinstance(
                exc, resilient_db.FailoverFailedError)
        where = str(rows[0][0]) if self.split_reads and rows else self._where(conn)
        self._record(Request(thread, "read", start, time.monotonic(), None, True, (), where))
        return True


def attempt_windows(requests: list[Request]) -> dict[int, float]:
    """Earliest send time of every write id over all its attempts."""
    first: dict[int, float] = {}
    for request in requests:
        if request.kind == "write":
            for write_id in request.ids:
                if write_id not in first or request.start < first[write_id]:
                    first[write_id] = request.start
    return first

