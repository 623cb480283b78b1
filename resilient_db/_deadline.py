"""Client-side statement deadlines: ``socket_timeout`` and ``call_options(timeout=...)``.

psycopg and mysql-connector have no client-side statement deadline; a blackholed server blocks
a call for minutes. Deadlines here are enforced by the process-wide watchdog
(:mod:`resilient_db.watchdog`): no thread per statement (DESIGN §2), and not even a heap
operation per statement (each connection keeps one lazily re-armed watchdog entry, see
``DeadlineStage._run``). When a statement's deadline has passed, on the watchdog thread:

1. the statement is cancelled on the server, on a short-lived daemon thread of its own (the
   cancel does network I/O): psycopg's ``Connection.cancel_safe``; MySQL ``KILL QUERY <id>``
   over a side connection (``DriverDialect.cancel``);
2. if the call has still not returned ``query_timeout_grace`` later, the connection's socket is
   broken (``DriverDialect.abort``: ``shutdown(SHUT_RDWR)``), which wakes the blocked thread
   with the driver's own error.

The application thread then raises ``QueryTimeoutError`` (also the driver's
``OperationalError``), chained from the driver's error. It never fails over: a missed deadline
is not a dead host. After a server-side cancel the connection stays usable; after a broken
socket it is closed and reported broken. A disconnect the deadline did not cause (the failure
monitor broke the socket, the server went away) is re-raised untouched, for failover.

A deadline belongs to a statement. Threads may share a psycopg connection (psycopg runs
their statements one after the other), so every statement through the stage first takes its
connection's turn (an atomic token, free when unshared; see ``DeadlineStage._shared``): the
statement the watchdog finds overdue is then always the one the server is running, and a
deadline that expires while its statement waits for the turn raises ``QueryTimeoutError``
without sending anything or touching the statement running.

The stage is innermost in a connection's chains (after every plugin, so each retry of a
statement gets its own deadline) and exists only where a deadline can apply: connections with
``socket_timeout`` set, and every connection once ``call_options(timeout=...)`` has been used
in the process (:func:`enable_per_call`). Elsewhere the hot path is exactly what it was.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from . import _lifecycle, _options
from ._params import QUERY_TIMEOUT_GRACE, SOCKET_TIMEOUT
from ._pipeline import (
    CREDENTIALS_HOOK,
    RUN_CALL,
    Call,
    Handler,
    HostSpec,
    Op,
    Plugin,
    PluginContext,
)
from .errors import QueryTimeoutError
from .watchdog import Armed, get_watchdog

__all__ = ["DEADLINE_OPS", "DeadlineStage", "enable_per_call"]

log = logging.getLogger("resilient_db.deadline")

#: The ops a statement deadline bounds: everything that sends a statement and waits for its
#: answer, and what mysql-connector makes a round trip of (``cursor()`` pings the server, a
#: session attribute is a ``SET``; psycopg does no I/O there). Not FETCH (psycopg's
#: client-side cursors fetch from memory; keeping fetches out of the chain keeps them free) or
#: CLOSE.
DEADLINE_OPS: frozenset[Op] = frozenset(
    {Op.EXECUTE, Op.EXECUTEMANY, Op.CALLPROC, Op.COPY, Op.COMMIT, Op.ROLLBACK,
     Op.TRANSACTION, Op.PIPELINE, Op.CURSOR, Op.SESSION}
)

_lock = threading.Lock()
_per_call = False  # call_options(timeout=...) has been used in this process
_waiting: weakref.WeakSet[DeadlineStage] = weakref.WeakSet()  # dormant stages


def enable_per_call() -> None:
    """Put the deadline stage in every connection's chains, now and from now on (called the
    first time ``call_options(timeout=...)`` asks for a deadline). One-way: afterwards every
    statement pays for one ``ContextVar`` read (a few tens of ns)."""
    global _per_call
    with _lock:
        if _per_call:
            return
        _per_call = True
        stages = list(_waiting)
        _waiting.clear()
    for stage in stages:
        stage.ctx.rebuild()


def per_call_enabled() -> bool:
    return _per_call


def reset_per_call() -> None:
    """For tests: forget that per-call deadlines were used, so connections opened from now on
    get the stage only if ``socket_timeout`` is set (open connections keep what they have)."""
    global _per_call
    with _lock:
        _per_call = False
    _options._deadlines_enabled = False


class DeadlineStage(Plugin):
    """The statement-deadline stage of one connection (not a user-selectable plugin)."""

    code = "deadline"
    intercepts = DEADLINE_OPS

    def __init__(self, ctx: PluginContext, target: Any = None,
                 connect_args: Mapping[str, Any] | None = None) -> None:
        super().__init__(ctx)
        self.timeout: float | None = ctx.settings[SOCKET_TIMEOUT] or None  # 0: no deadline
        grace = ctx.settings[QUERY_TIMEOUT_GRACE]
        self.grace = 1.0 if grace is None else grace
        # For MySQL's side connection that sends KILL QUERY (same credentials; the host and
        # port are taken from the connection the statement runs on). The mapping is the one
        # the connect chain used, so changes plugins made to it (a password) are seen.
        self.target = target
        self.connect_args = connect_args if connect_args is not None else {}
        # The statement in flight (see _run): its number, call object, timeout and
        # deadline (inf: none in flight); the connection's watchdog entry and when it fires;
        # the expiry of the statement the watchdog last found overdue.
        self.seq = 0
        self.call: Call | None = None
        self.statement_timeout = 0.0
        self.deadline = _INF
        self.entry: _Entry | None = None
        self.entry_at = _INF
        self.flight: _Flight | None = None
        # The connection's turn, held by the statement in flight through this stage so that
        # the fields above always describe the statement the server is running, even when
        # threads share the connection (see _shared). A one-token list: list.pop() and
        # list.append() are atomic, and cost far less than Lock.acquire(False) on the
        # unshared path (CPython parses acquire's arguments on every call). ``waiters``
        # counts threads queued in _take_turn; ``turn_cond`` is where they sleep.
        self.free: list[bool] = [True]
        self.waiters = 0
        self.turn_cond = threading.Condition(threading.Lock())
        if self.timeout is None:
            with _lock:
                if not _per_call:
                    _waiting.add(self)

    def dormant(self) -> bool:
        return self.timeout is None and not _per_call

    def wrap_execute(self, proceed: Handler) -> Handler:
        default = self.timeout
        current = _options._current.get
        run = self._run
        self._watchdog = get_watchdog()  # the object only: its thread starts on the first arm
        stage = self
        monotonic = time.monotonic
        arm = self._arm
        timed_out = self._timed_out
        shared = self._shared
        take = self.free.pop
        give = self.free.append
        pass_turn = self._pass_turn

        if proceed is RUN_CALL:  # always the case: the stage is innermost
            # _run, inlined and calling the driver itself: this is the per-statement path.
            def handler(call: Call) -> Any:
                timeout = current().timeout
                if timeout is None:
                    timeout = default
                try:
                    take()
                except IndexError:
                    return shared(call, timeout, proceed)  # another thread's statement runs
                try:
                    kwargs = call.kwargs
                    if not timeout:
                        return call.fn(*call.args, **kwargs) if kwargs else call.fn(*call.args)
                    seq = stage.seq + 1
                    stage.seq = seq
                    stage.call = call
                    stage.statement_timeout = timeout
                    deadline = monotonic() + timeout
                    stage.deadline = deadline
                    if deadline < stage.entry_at:
                        arm(deadline)
                    try:
                        result = (call.fn(*call.args, **kwargs) if kwargs
                                  else call.fn(*call.args))
                    except BaseException as exc:
                        stage.deadline = _INF
                        flight = stage.flight
                        if flight is not None and flight.seq == seq:
                            timed_out(flight, call, exc)
                        raise
                    stage.deadline = _INF
                    flight = stage.flight
                    if flight is not None and flight.seq == seq:
                        timed_out(flight, call, None)
                    return result
                finally:
                    give(True)
                    if stage.waiters:
                        pass_turn()
        else:
            def handler(call: Call) -> Any:
                timeout = current().timeout
                if timeout is None:
                    timeout = default
                try:
                    take()
                except IndexError:
                    return shared(call, timeout, proceed)
                try:
                    if not timeout:
                        return proceed(call)
                    return run(call, timeout, monotonic() + timeout, proceed)
                finally:
                    give(True)
                    if stage.waiters:
                        pass_turn()

        return handler

    # --- per statement (application thread) -------------------------------------------------
    #
    # No lock, no heap entry and no allocation per statement: the statement's deadline is
    # published in ``deadline`` and the connection keeps at most one watchdog entry
    # (``entry_at``). The entry is re-armed lazily: when it fires before the statement in
    # flight is due, it moves to that statement's deadline; when the connection is idle it
    # lapses and the next statement arms a new one. A busy connection costs the watchdog one
    # wake-up per deadline period, not two heap operations per statement.
    #
    # Publication order makes this safe without a lock (CPython's GIL makes these attribute
    # reads and writes sequentially consistent): a statement writes ``deadline`` before it
    # reads ``entry_at``, and the watchdog clears ``entry_at`` before it reads ``deadline``;
    # a finished statement clears ``deadline`` before it reads ``flight``, and the watchdog
    # publishes ``flight`` before it reads ``deadline`` again. Each side sees the other.
    #
    # All of this describes one statement per connection, the one holding the turn (the
    # token in ``free``): a statement (with a deadline or without) holds it from before it
    # publishes its deadline until its timeout, if any, has settled (the cancel landed).
    # Threads sharing a connection (psycopg serialises them on its own lock) therefore queue
    # for the turn instead, outside the driver: see _shared.

    def _run(self, call: Call, timeout: float, deadline: float, proceed: Handler) -> Any:
        """Run ``call`` with its deadline; the caller holds ``turn``."""
        seq = self.seq + 1
        self.seq = seq
        self.call = call
        self.statement_timeout = timeout
        self.deadline = deadline
        if deadline < self.entry_at:
            self._arm(deadline)  # first statement, after idling, or a shorter deadline
        try:
            result = proceed(call)
        except BaseException as exc:
            self.deadline = _INF
            flight = self.flight
            if flight is not None and flight.seq == seq:
                self._timed_out(flight, call, exc)
            raise
        self.deadline = _INF
        flight = self.flight
        if flight is not None and flight.seq == seq:
            self._timed_out(flight, call, None)
        return result

    def _shared(self, call: Call, timeout: float | None, proceed: Handler) -> Any:
        """Another statement of this connection is in flight: threads share the connection.

        Wait for it to finish before publishing this statement's deadline, so that the
        watchdog only ever cancels the statement the server is running, and only because of
        that statement's own deadline. The wait counts against this statement's deadline:
        if it expires while waiting, QueryTimeoutError is raised here, nothing was sent and
        the statement running is left alone. This is the only path with a blocking lock;
        an unshared connection never takes it.
        """
        deadline = time.monotonic() + timeout if timeout else _INF
        if not self._take_turn(deadline):
            assert timeout
            raise self._waited_out(call, timeout)
        try:
            if not timeout:
                return proceed(call)
            if time.monotonic() >= deadline:
                raise self._waited_out(call, timeout)
            return self._run(call, timeout, deadline, proceed)
        finally:
            self.free.append(True)
            if self.waiters:
                self._pass_turn()

    def _take_turn(self, deadline: float) -> bool:
        """Wait for the turn until ``deadline`` (``inf``: no limit). Returns whether it got it.

        No wake-up is lost: a waiter counts itself in ``waiters`` and tries the token again
        under ``turn_cond`` before each wait, and whoever gives the token back reads
        ``waiters`` after doing so and then notifies under ``turn_cond``."""
        free = self.free
        cond = self.turn_cond
        with cond:
            self.waiters += 1
            try:
                while True:
                    try:
                        free.pop()
                        return True
                    except IndexError:
                        pass
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    # Condition.wait refuses timeouts beyond TIMEOUT_MAX (OverflowError).
                    cond.wait(min(remaining, _MAX_TURN_WAIT))
            finally:
                self.waiters -= 1

    def _pass_turn(self) -> None:
        with self.turn_cond:
            self.turn_cond.notify()

    def _waited_out(self, call: Call, timeout: float) -> QueryTimeoutError:
        log.debug("statement deadline of %g s expired on %s while waiting for another "
                  "thread's statement on the same connection", timeout, self.ctx.host)
        return _timeout_error(
            self, call.connection, timeout,
            "it expired while waiting for the connection, held by another thread's "
            "statement; nothing was sent and that statement was left alone; the connection "
            "is usable", cancelled=False, broken=False)

    @staticmethod
    def _timed_out(flight: _Flight, call: Call, exc: BaseException | None) -> None:
        """The watchdog found this statement overdue. Raises ``QueryTimeoutError`` unless it
        turns out not to be a timeout (then the caller returns or re-raises as usual)."""
        if not flight.settle(exc):
            return
        if exc is None:
            # MySQL sends a result's header before its rows: an interrupted SELECT "returns"
            # and the interruption (1317) is what the rows would have been.
            raise flight.error(call.connection) from flight.discard_pending(call)
        if isinstance(exc, Exception):  # KeyboardInterrupt and the like stay what they are
            raise flight.error(call.connection) from exc

    def _arm(self, deadline: float) -> None:
        with _flight_lock:
            if deadline < self.entry_at:
                self._arm_locked(deadline)

    def _arm_locked(self, deadline: float) -> None:
        old = self.entry
        entry = _Entry(self)
        self.entry = entry
        self.entry_at = deadline
        _armed_stages.add(self)
        _lifecycle.register("deadlines", _release_idle)
        entry.armed = self._watchdog.arm(deadline, entry.fire)
        if old is not None and old.armed is not None:
            self._watchdog.disarm(old.armed)

    def _release_locked(self) -> None:
        """Drop the watchdog entry of an idle connection (no statement in flight)."""
        entry = self.entry
        if entry is None or self.deadline != _INF:
            return
        self.entry = None
        self.entry_at = _INF
        if entry.armed is not None:
            self._watchdog.disarm(entry.armed)

    # --- the watchdog thread -----------------------------------------------------------------
    def _tick(self, entry: _Entry) -> None:
        with _flight_lock:
            if self.entry is not entry:
                return  # replaced by an earlier entry
            self.entry = None
            self.entry_at = _INF
            deadline = self.deadline
            if deadline == _INF:
                return  # idle: the next statement arms again
            if deadline > time.monotonic():
                self._arm_locked(deadline)  # a later statement is in flight: follow it
                return
            seq = self.seq
            call = self.call
            assert call is not None
            flight = _Flight(self, call.connection._raw, self.statement_timeout, seq)
            self.flight = flight
            if self.deadline == _INF or self.seq != seq:
                return  # it returned meanwhile: nothing to cancel (flight.expired is false)
            flight.expired = True
            flight.cancel_done = threading.Event()
            flight.grace_armed = self._watchdog.arm(time.monotonic() + self.grace,
                                                    flight.break_socket)
        # Outside the lock (starting a thread waits for it to run). The cancel does network
        # I/O, so it gets a short-lived thread of its own, off the watchdog thread.
        threading.Thread(target=flight._cancel, name="resilient_db-cancel", daemon=True).start()


_INF = math.inf
#: Longest single sleep of a thread waiting for its connection's turn (it waits again after).
_MAX_TURN_WAIT = 3600.0
# Stages that armed a watchdog entry (weakly): resilient_db.shutdown() releases the entries of
# idle connections so that the watchdog thread can end; entries of statements in flight stay
# (the watchdog serves them first, then ends).
_armed_stages: weakref.WeakSet[DeadlineStage] = weakref.WeakSet()


def _release_idle() -> None:
    with _flight_lock:
        for stage in list(_armed_stages):
            stage._release_locked()


class _Entry:
    """The one watchdog entry of a connection's deadline stage (see ``DeadlineStage._run``)."""

    __slots__ = ("armed", "stage")

    def __init__(self, stage: DeadlineStage) -> None:
        self.stage = stage
        self.armed: Armed | None = None

    def fire(self) -> None:
        self.stage._tick(self)


# Orders "the call returned" against "the deadline expired" and "break the socket", so that
# a late cancel or break never hits a connection's next statement. Shared by every
# connection: taken when a connection arms its entry (first statement, after idling) and
# when an entry fires, never on the per-statement path.
_flight_lock = threading.Lock()


class _Flight:
    """A statement whose deadline expired: what the watchdog, the cancel thread and the
    application thread share."""

    done = False
    expired = False
    cancelled = False
    broken = False
    cancel_done: threading.Event | None = None
    grace_armed: Armed | None = None

    def __init__(self, stage: DeadlineStage, raw: Any, timeout: float, seq: int) -> None:
        self.stage = stage
        self.raw = raw
        self.timeout = timeout
        self.seq = seq

    # --- watchdog thread --------------------------------------------------------------------
    def break_socket(self) -> None:
        with _flight_lock:
            if self.done or self.broken:
                return
            self.broken = self.stage.ctx.driver.abort(self.raw)
        log.info("statement deadline: no answer %.3g s after the cancel; broke the connection "
                 "to %s", self.stage.grace, self.stage.ctx.host)

    # --- cancel thread ----------------------------------------------------------------------
    def _cancel(self) -> None:
        stage = self.stage
        try:
            self.cancelled = stage.ctx.driver.cancel(self.raw, _side_target(stage),
                                                     stage.connect_args, stage.grace)
        except Exception as exc:
            log.info("server-side cancel on %s failed: %r", stage.ctx.host, exc)
        finally:
            done = self.cancel_done
            if done is not None:
                done.set()

    # --- application thread -----------------------------------------------------------------
    def settle(self, exc: BaseException | None) -> bool:
        """The call returned (``exc`` ``None``) or raised ``exc`` after the deadline fired.
        Returns whether that is a timeout; ``False`` leaves ``exc`` to go up untouched (a
        disconnect this deadline did not cause, so failover sees it)."""
        with _flight_lock:
            self.done = True
            grace_armed = self.grace_armed
            if self.stage.flight is self:
                self.stage.flight = None  # let go of the driver connection
        if grace_armed is not None:
            get_watchdog().disarm(grace_armed)
        if not self.expired:
            return False  # the watchdog saw the call already done: nothing was sent
        driver = self.stage.ctx.driver
        if not self.broken:
            # Let the cancel land before the connection's next statement can start (a late
            # cancel would hit that one). Bounded: a cancel stuck connecting to an
            # unreachable host gives up after the grace, and then the connection is broken
            # rather than left with a cancel in flight.
            done = self.cancel_done
            if done is not None and not done.wait(self.stage.grace):
                self.broken = driver.abort(self.raw)
        # A disconnect we did not cause (failure monitor, the server went away) is for failover.
        return exc is None or self.broken or not driver.is_disconnect(exc)

    def discard_pending(self, call: Call) -> Exception | None:
        """Read and drop what an interrupted statement that returned normally left unread
        (MySQL), bounded by the grace: on timeout the socket is broken. Returns the driver's
        error met on the way (MySQL's "query execution was interrupted"), if any."""
        if self.broken:
            return None
        stage = self.stage
        driver = stage.ctx.driver
        raw = self.raw
        watchdog = get_watchdog()
        armed = watchdog.arm(time.monotonic() + stage.grace, lambda: driver.abort(raw))
        error: Exception | None = None
        try:
            driver.discard_pending(raw, call)
        except Exception as exc:
            error = exc
        finally:
            watchdog.disarm(armed)
        if armed.fired:
            self.broken = True
        return error

    def error(self, proxy: Any) -> QueryTimeoutError:
        stage = self.stage
        if self.broken:
            outcome = ("the server did not end it within query_timeout_grace="
                       f"{stage.grace:g} s, so the connection was broken (it is closed now)")
        elif self.cancelled:
            outcome = "it was cancelled on the server; the connection is usable"
        else:
            outcome = "the cancel could not be confirmed; the connection is usable"
        return _timeout_error(stage, proxy, self.timeout, outcome,
                              cancelled=self.cancelled and not self.broken, broken=self.broken)


def _timeout_error(stage: DeadlineStage, proxy: Any, timeout: float, outcome: str, *,
                   cancelled: bool, broken: bool) -> QueryTimeoutError:
    """Report the expiry (a decision) and build the error the application thread raises."""
    host = str(proxy._host)
    stage.ctx.decide("statement.deadline_expired", None, **{
        "resilient_db.deadline.timeout": timeout,
        "resilient_db.deadline.cancelled": cancelled,
        "resilient_db.deadline.socket_broken": broken,
        "server.address": host,
    })
    err = stage.ctx.driver.error(
        QueryTimeoutError, f"statement deadline of {timeout:g} s expired on {host}: {outcome}",
        timeout=timeout, cancelled=cancelled, host=host)
    assert isinstance(err, QueryTimeoutError)
    return err


def _reset_in_child() -> None:
    # After fork(): fresh locks (a parent thread may have held them); the parent's stages
    # belong to connections the child must not use (see _proxy), so they are forgotten.
    global _lock, _flight_lock, _waiting, _armed_stages
    _lock = threading.Lock()
    _flight_lock = threading.Lock()
    _waiting = weakref.WeakSet()
    _armed_stages = weakref.WeakSet()


_lifecycle.on_fork_child(_reset_in_child)


def _side_target(stage: DeadlineStage) -> Any:
    """The connect callable for a side connection (KILL QUERY): the connection's own, through
    its credentials hook when an auth plugin set one (an IAM token cached when the connection
    was opened may have expired since; the hook gives a current one for the side
    connection's host)."""
    target = stage.target
    hook = stage.ctx.extra.get(CREDENTIALS_HOOK)
    if target is None or hook is None:
        return target

    def connect(**args: Any) -> Any:
        port = args.get("port")
        host = HostSpec(str(args.get("host") or "localhost"),
                        port if isinstance(port, int) else None)
        return target(**hook(host, args))

    return connect
