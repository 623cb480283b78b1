"""The process-wide watchdog: one daemon thread and a deadline heap (DESIGN §2).

A blocked driver call cannot be interrupted from its own thread; the way to stop it is to act
on its connection from another thread (cancel the statement on the server, or break the
socket with ``shutdown(SHUT_RDWR)``). The watchdog is that other thread, shared by the whole
process: statement deadlines (``socket_timeout``) and failure monitors arm a deadline with a
``fire`` callable; if the deadline passes before it is disarmed, ``fire()`` runs on the
watchdog thread.

- ``arm`` and ``disarm`` are on the per-statement path: one lock, one ``heappush`` (O(log n)),
  and a wake-up of the thread only when the new deadline is earlier than the one it sleeps
  towards. ``disarm`` is O(1): the entry is marked and dropped lazily (when it reaches the top
  of the heap, or when marked entries outnumber live ones and the heap is rebuilt).
- ``fire()`` must be quick (hand slow work such as a server-side cancel to a thread of its
  own). Its exceptions are logged and counted (``fire_errors``) and never stop the thread.
- Once ``disarm`` returns, ``fire`` will not *start*; it may already have started (then
  ``armed.fired`` is true), so a caller that must not overlap with it synchronises in its own
  ``fire``.
- Lifecycle (DESIGN §6): no thread at import or when the watchdog object is created; the
  daemon thread starts on the first ``arm``; a crash of the loop is counted (``crashes``) and the
  loop restarts after a backoff; :func:`resilient_db.shutdown` stops the thread without joining
  it (interpreter exit never waits for it). Deadlines still pending at shutdown are served
  first (never abandoned: a statement blocked in another thread relies on its deadline), then
  the thread ends.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

from . import _lifecycle

__all__ = ["Armed", "Watchdog", "abort_after", "get_watchdog"]

log = logging.getLogger("resilient_db.watchdog")

#: First and longest pause before a crashed watchdog loop is restarted.
RESTART_BACKOFF = 0.05
MAX_RESTART_BACKOFF = 2.0
#: Rebuild the heap when more than this many disarmed entries are waiting in it and they are
#: at least half of it (keeps the heap O(live deadlines); amortised O(1) per disarm).
_COMPACT_MIN = 256
#: Longest single sleep of the thread. ``Condition.wait`` refuses timeouts beyond
#: ``threading.TIMEOUT_MAX`` (OverflowError); a far-future deadline (``socket_timeout=1e300``,
#: ``inf``) is slept towards in steps of this length instead (a wake-up per hour is free).
_MAX_SLEEP = 3600.0

_PENDING = 0
_FIRING = 1
_FIRED = 2
_DISARMED = 3


class Armed:
    """One armed deadline, returned by :meth:`Watchdog.arm`; pass it to
    :meth:`Watchdog.disarm`. ``deadline`` is on the ``time.monotonic()`` clock."""

    __slots__ = ("_state", "deadline", "fire")

    def __init__(self, deadline: float, fire: Callable[[], object]) -> None:
        self.deadline = deadline
        self.fire: Callable[[], object] | None = fire
        self._state = _PENDING

    @property
    def fired(self) -> bool:
        """``fire()`` has started (it may still be running) or has finished."""
        return self._state in (_FIRING, _FIRED)

    @property
    def pending(self) -> bool:
        """Neither fired nor disarmed yet."""
        return self._state == _PENDING

    def __lt__(self, other: Armed) -> bool:
        # Heap entries are (deadline, armed): only equal deadlines get here; any stable order.
        return id(self) < id(other)

    def __repr__(self) -> str:
        state = ("pending", "firing", "fired", "disarmed")[self._state]
        return f"<Armed {state} deadline={self.deadline:.3f}>"


class Watchdog:
    """A deadline heap served by one lazily started, supervised daemon thread.

    Counters (read them for metrics and tests): ``fired`` (callbacks run), ``fire_errors``
    (callbacks that raised), ``crashes`` (times the loop itself died and was restarted).
    """

    def __init__(self, name: str = "resilient_db-watchdog") -> None:
        self.name = name
        # ``with self._lock`` on the hot path: entering the Condition itself costs a Python
        # frame more.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[tuple[float, Armed]] = []
        self._disarmed = 0  # disarmed entries still in the heap
        # The deadline the thread sleeps towards; -inf while it is not sleeping (it looks at
        # the heap again before it sleeps), +inf while it sleeps with nothing to wait for.
        self._wake_at = -math.inf
        self._thread: threading.Thread | None = None
        self._generation = 0  # a thread runs while its generation is current
        self._stop_event = threading.Event()  # set by stop(): cuts a restart backoff short
        # stop() was called while deadlines were pending: serve them, then end the thread.
        self._draining = False
        self.fired = 0
        self.fire_errors = 0
        self.crashes = 0

    # --- the per-statement path -------------------------------------------------------------
    def arm(self, deadline: float, fire: Callable[[], object]) -> Armed:
        """Run ``fire()`` on the watchdog thread at ``deadline`` (``time.monotonic()`` clock)
        unless :meth:`disarm` is called first. A deadline already past fires at once; one
        too far to reach (``math.inf``) never fires. NaN raises ``ValueError`` here, in the
        caller: it compares false with everything and would break the heap order."""
        if math.isnan(deadline):
            raise ValueError(f"watchdog deadline must be a number, got {deadline!r}")
        armed = Armed(deadline, fire)
        with self._lock:
            heapq.heappush(self._heap, (deadline, armed))
            if deadline < self._wake_at:
                self._cond.notify()
            if self._thread is None:
                self._start()
            elif self._draining:  # in use again after a shutdown: keep the thread
                self._draining = False
                self._register()
        return armed

    def disarm(self, armed: Armed) -> None:
        """Cancel ``armed``. A no-op if it has fired (or is firing) or was disarmed already."""
        with self._lock:
            if armed._state != _PENDING:
                return
            armed._state = _DISARMED
            armed.fire = None
            self._disarmed += 1
            if self._draining and self._disarmed == len(self._heap):
                self._cond.notify()  # the last pending deadline is gone: let the thread end
            elif self._disarmed > _COMPACT_MIN and self._disarmed * 2 > len(self._heap):
                self._compact()

    # --- introspection ----------------------------------------------------------------------
    def pending(self) -> int:
        """Deadlines armed and neither fired nor disarmed."""
        with self._cond:
            return len(self._heap) - self._disarmed

    @property
    def thread(self) -> threading.Thread | None:
        """The watchdog thread, if one is running."""
        return self._thread

    # --- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the thread; bounded: it is told to end, never joined.

        With no deadline pending the thread ends at once. Pending deadlines are never
        abandoned (a statement blocked in another thread would then hang): the thread serves
        them and ends when none is left (fired or disarmed). Either way it is a daemon thread
        and never delays interpreter exit. A later :meth:`arm` starts (or keeps) a thread."""
        with self._cond:
            if self._thread is None:
                return
            if len(self._heap) > self._disarmed:
                self._draining = True
                self._cond.notify_all()
                return
            self._end()

    def _end(self) -> None:
        # Caller holds the lock.
        self._generation += 1
        self._thread = None
        self._draining = False
        self._wake_at = -math.inf
        self._stop_event.set()
        self._cond.notify_all()

    def _start(self) -> None:
        # Caller holds the lock.
        self._stop_event = threading.Event()
        thread = threading.Thread(target=self._supervise, args=(self._generation,),
                                  name=self.name, daemon=True)
        self._thread = thread
        self._register()
        thread.start()

    def _register(self) -> None:
        _lifecycle.register(f"watchdog:{id(self)}", self.stop)

    def _compact(self) -> None:
        # Caller holds the lock.
        self._heap = [entry for entry in self._heap if entry[1]._state == _PENDING]
        heapq.heapify(self._heap)
        self._disarmed = 0

    # --- the thread -------------------------------------------------------------------------
    def _supervise(self, generation: int) -> None:
        backoff = RESTART_BACKOFF
        stop_event = self._stop_event
        while self._generation == generation:
            try:
                self._run(generation)
                return
            except BaseException:  # a dead watchdog would hang every deadline
                with self._cond:
                    if self._generation == generation:
                        self._wake_at = -math.inf
                self.crashes += 1
                log.warning("watchdog loop crashed (%d so far); restarting in %.2f s",
                            self.crashes, backoff, exc_info=True)
                stop_event.wait(backoff)
                backoff = min(backoff * 2, MAX_RESTART_BACKOFF)

    def _run(self, generation: int) -> None:
        cond = self._cond
        heap = self._heap
        monotonic = time.monotonic
        while True:
            with cond:
                while True:
                    if self._generation != generation:
                        return
                    heap = self._heap  # _compact() may have replaced the list
                    while heap and heap[0][1]._state != _PENDING:
                        heapq.heappop(heap)
                        self._disarmed -= 1
                    if self._draining and len(heap) == self._disarmed:
                        self._end()  # stopped, and nothing pending any more
                        return
                    now = monotonic()
                    if heap and heap[0][0] <= now:
                        armed = heapq.heappop(heap)[1]
                        armed._state = _FIRING
                        fire = armed.fire
                        armed.fire = None
                        self._wake_at = -math.inf
                        break
                    if heap:
                        self._wake_at = heap[0][0]
                        cond.wait(min(heap[0][0] - now, _MAX_SLEEP))
                    else:
                        self._wake_at = math.inf
                        cond.wait()
                    if self._generation != generation:
                        return  # a newer thread owns _wake_at now
                    self._wake_at = -math.inf
            self.fired += 1
            try:
                if fire is not None:
                    fire()
            except Exception:
                self.fire_errors += 1
                log.warning("watchdog callback %r raised (%d so far)", fire, self.fire_errors,
                            exc_info=True)
            finally:
                armed._state = _FIRED


_instance: Watchdog | None = None
_instance_lock = threading.Lock()


def get_watchdog() -> Watchdog:
    """The process-wide watchdog (created on first use; its thread starts on the first arm)."""
    watchdog = _instance
    if watchdog is None:
        watchdog = _create()
    return watchdog


def _create() -> Watchdog:
    global _instance
    with _instance_lock:
        if _instance is None:
            _instance = Watchdog()
        return _instance


@contextlib.contextmanager
def abort_after(timeout: float | None, abort: Callable[[], object]) -> Iterator[Armed | None]:
    """Run the block with ``abort()`` (a connection's ``DriverDialect.abort``: its socket is
    shut down) armed ``timeout`` seconds from now and disarmed when the block ends: internal
    reads on an instance that stopped answering (a blackholed host sends no RST, and neither
    driver bounds a read by default) then end with the driver's network error instead of
    blocking until the network heals. Yields the entry (``armed.fired``: the socket was
    broken); ``None`` and nothing armed when ``timeout`` is ``None``."""
    if timeout is None:
        yield None
        return
    watchdog = get_watchdog()
    armed = watchdog.arm(time.monotonic() + timeout, abort)
    try:
        yield armed
    finally:
        watchdog.disarm(armed)


def _reset_in_child() -> None:
    # After fork() the parent's watchdog has a thread object but no thread (its deadlines
    # would never fire) and a lock a parent thread may have held: the child gets a new one,
    # started by its first deadline. Inherited deadlines belong to the parent's statements.
    global _instance, _instance_lock
    _instance_lock = threading.Lock()
    _instance = None


_lifecycle.on_fork_child(_reset_in_child)
