"""Background monitors' common parts.

:class:`MonitorRegistry`: the process-wide registry behind each kind of background monitor
(one topology monitor per cluster, one failure monitor per host): one live monitor per key,
replaced when it stopped, all stopped at once by ``resilient_db.shutdown()``.

:class:`SupervisedMonitor`: the skeleton of the per-key monitors that keep one thread and one
server connection (``efm_monitor.HostMonitor``, ``response_time.ResponseTimeMonitor``,
``blue_green.BlueGreenMonitor``, ``limitless.RouterMonitor``): weakly held users, a supervised
daemon thread restarted with backoff, disposal after the last user, a stop that aborts the
connection to wake the thread, and the ``fork()`` reset. Each subclass supplies one step of
its work.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from . import _lifecycle
from ._decisions import Decision, get_decision_sink

if TYPE_CHECKING:
    from .drivers.base import DriverDialect

__all__ = ["FIRST_RESTART_BACKOFF", "MAX_RESTART_BACKOFF", "MIN_WAIT", "Monitor",
           "MonitorRegistry", "SupervisedMonitor", "supervise"]


class Monitor(Protocol):
    @property
    def stopped(self) -> bool: ...

    def stop(self) -> None: ...

    def abandon(self) -> None:
        """In a child process after ``fork()``: look stopped and let go of every connection
        without sending anything (they are the parent's sessions)."""


M = TypeVar("M", bound=Monitor)


class MonitorRegistry(Generic[M]):
    """Monitors by key. ``lock`` guards the registry; hold it to combine a lookup with state of
    your own (it is a plain lock: never call back into the registry while holding it)."""

    def __init__(self, stopped_kind: str, count_attribute: str) -> None:
        self.lock = threading.Lock()
        self._monitors: dict[Hashable, M] = {}
        self._stopped_kind = stopped_kind  # the decision recorded by stop_all
        self._count_attribute = count_attribute

    def get_locked(self, key: Hashable) -> M | None:
        """The live monitor of ``key`` (caller holds ``lock``)."""
        monitor = self._monitors.get(key)
        return monitor if monitor is not None and not monitor.stopped else None

    def get_or_create_locked(self, key: Hashable, create: Callable[[], M]) -> M:
        """The monitor of ``key``, created when there is none or it stopped (caller holds
        ``lock``)."""
        monitor = self.get_locked(key)
        if monitor is None:
            monitor = self._monitors[key] = create()
        return monitor

    def get_or_create(self, key: Hashable, create: Callable[[], M]) -> M:
        with self.lock:
            return self.get_or_create_locked(key, create)

    def discard_locked(self, key: Hashable, monitor: M) -> None:
        """Forget ``monitor`` if it is still the one registered for ``key`` (caller holds
        ``lock``)."""
        if self._monitors.get(key) is monitor:
            del self._monitors[key]

    def all(self) -> list[M]:
        with self.lock:
            return list(self._monitors.values())

    def stop_all(self, also_locked: Callable[[], None] | None = None) -> None:
        """Stop every monitor and forget them; ``also_locked`` runs under ``lock`` (to clear
        state kept beside the registry). Connections that need a monitor later start one."""
        with self.lock:
            stopping = list(self._monitors.values())
            self._monitors.clear()
            if also_locked is not None:
                also_locked()
        for monitor in stopping:
            monitor.stop()
        if stopping:
            get_decision_sink().record(Decision(self._stopped_kind, None,
                                                {self._count_attribute: len(stopping)}))

    def reset_in_child(self) -> None:
        """In a child process after ``fork()``: start empty with a fresh lock (a parent thread
        may have held the old one at fork time) and abandon the inherited monitors (their
        threads do not exist here; stopping them would close the parent's sessions). The
        child's next connection starts a monitor of its own."""
        inherited = list(self._monitors.values())
        self.lock = threading.Lock()
        self._monitors = {}
        for monitor in inherited:
            monitor.abandon()


#: First pause before a crashed monitor thread is restarted (doubled at each crash in a row).
FIRST_RESTART_BACKOFF = 0.1
#: Longest pause before a crashed monitor thread is restarted.
MAX_RESTART_BACKOFF = 5.0
#: Shortest wait of a pause (:meth:`SupervisedMonitor._pause_until`).
MIN_WAIT = 0.01

_INF = float("inf")


def supervise(run: Callable[[], None], stopping: threading.Event,
              crashed: Callable[[Exception, float], None]) -> None:
    """Run ``run`` until it returns or ``stopping`` is set: an exception escaping it is
    handed to ``crashed(exc, backoff)`` (count, log, record, close what it held) and ``run``
    starts again after ``backoff`` seconds (:data:`FIRST_RESTART_BACKOFF`, doubled per crash
    in a row up to :data:`MAX_RESTART_BACKOFF`; the wait ends early on ``stopping``). The
    supervision loop of every background monitor thread."""
    backoff = FIRST_RESTART_BACKOFF
    while not stopping.is_set():
        try:
            run()
            return
        except Exception as exc:
            crashed(exc, backoff)
            stopping.wait(backoff)
            backoff = min(backoff * 2, MAX_RESTART_BACKOFF)


class SupervisedMonitor:
    """The skeleton of a per-key background monitor (one failure monitor per host, one
    response-time monitor per instance, one blue/green status monitor per deployment, one
    router monitor per Limitless shard group endpoint): the users it serves, one daemon
    thread, one server connection, supervision, disposal, stop, and the ``fork()`` reset. A
    subclass adds its settings and one step of its work.

    What the base does:

    - **Users.** Connections using the monitor are held weakly (a connection that goes away
      by garbage collection leaves without a word). :meth:`_attach` registers one and starts
      the thread; :meth:`detach` forgets one.
    - **The thread** (named ``thread_name``, a daemon) starts with the first user and runs
      :meth:`_supervise`: :meth:`_run` under supervision. An exception escaping ``_run`` is
      logged at WARNING, counted in :attr:`crashes`, reported through
      :meth:`_record_restart`, the connection is closed and ``_run`` starts again after a
      backoff (:data:`FIRST_RESTART_BACKOFF`, doubled per crash up to
      :data:`MAX_RESTART_BACKOFF`). ``_run`` returning ends the thread. The first start
      registers ``registry.stop_all`` with :mod:`._lifecycle` under ``component``, so that
      :func:`resilient_db.shutdown` stops the monitor.
    - **The loop** (:meth:`_run`): while not stopped, call :meth:`_step` with the current
      time; once nobody has used the monitor for ``disposal`` seconds it disposes of itself
      (:meth:`_dispose`: forgotten by the registry, stopped, connection closed,
      :meth:`_disposed` called) unless a user arrived meanwhile.
    - **The connection** (``_conn``, one driver connection or ``None``): the step opens it
      and hands it to :meth:`_adopt` (which refuses it once the monitor stopped);
      :meth:`_close` aborts and closes it. :meth:`stop` aborts it (``DriverDialect.abort``:
      its socket is shut down) so that a thread blocked on it wakes with the driver's error;
      it joins nothing and returns at once.
    - **fork()**: :meth:`abandon` (run in the child by :meth:`MonitorRegistry.reset_in_child`)
      marks the monitor stopped with fresh locks and lets the connection go without a word
      to the server (``DriverDialect.forget``).

    What a subclass provides (``efm_monitor``, ``response_time``, ``blue_green`` and
    ``limitless`` are the worked examples):

    - A module-level ``MonitorRegistry`` and, at import,
      ``_lifecycle.on_fork_child(registry.reset_in_child)``. ``__init__`` calls
      ``super().__init__`` with ``key`` (the key it is registered under in that registry:
      disposal forgets it by that key), the registry, the lifecycle ``component`` name, the
      ``thread_name`` and a ``label`` (the subject of the crash warning, e.g. ``"failure
      monitor of 10.0.0.5:5432"``). Class attributes: ``_log`` (its module's logger) and
      ``_suppress_instrumentation`` (whether the thread runs with OpenTelemetry
      instrumentation suppressed; true unless the subclass says otherwise).
    - ``attach(user, *, <its settings>) -> bool``: typed for its own user Protocol and
      settings, it calls :meth:`_attach` with a function that merges the settings (run under
      ``_cond``; notify ``_cond`` when the pause in progress depends on them) and returns
      its result. The registry's lookup and ``attach`` are two calls: a caller that gets
      False looks up again (the monitor was disposed of or shut down in between).
    - :meth:`_step` ``(now, idle_until)``: one round of work and the pause after it. It must
      return promptly once ``_stopping`` is set: block only on ``_cond`` (``stop()`` notifies
      it) or on ``_conn`` (``stop()`` aborts it), and never pause past ``idle_until`` (when
      the monitor may be disposed of; ``inf`` while it has users); :meth:`_pause_until`
      is that pause for a step that waits for a time or the stop. To connect:
      ``self._some_user().open_...(...)`` (through that user's connect chain), then
      :meth:`_adopt`. On an error from the connection: :meth:`_close`, then return at once
      if ``_stopping`` is set (``stop()`` broke it) or handle the failure (host
      unreachable: record it, retry next round). An exception that escapes is a crash.
    - :meth:`_record_restart` (the decision recorded for a crash); optionally
      :meth:`_drop_connection_state` (state that belongs to the connection, cleared with
      ``_conn``), :meth:`_disposed` (log or record the disposal) and :meth:`_released` (tell
      the users ``stop()`` let go). A monitor whose loop has another shape may override
      :meth:`_run`, keeping its rules: return once ``_stopping`` is set, dispose of itself
      through :meth:`_dispose`.

    Locking: ``_cond`` guards ``_users`` (a WeakSet: copy it under the lock before
    iterating, :meth:`_live_users`), ``_conn`` and the stop flag. :meth:`_dispose` takes
    ``registry.lock`` then ``_cond``; never take the registry's lock while holding
    ``_cond``. Only the monitor's thread opens or closes ``_conn``; other threads only abort
    it (``stop()``).
    """

    #: The module's logger (the crash warning goes there).
    _log: ClassVar[logging.Logger] = logging.getLogger("resilient_db.monitors")
    #: Whether the thread runs with OpenTelemetry instrumentation suppressed (its statements
    #: are internal).
    _suppress_instrumentation: ClassVar[bool] = True

    def __init__(self, key: Hashable, driver: DriverDialect, *,
                 registry: MonitorRegistry[Any], component: str, thread_name: str, label: str,
                 disposal: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.key = key
        self.driver = driver
        self.disposal = disposal
        self._registry = registry
        self._component = component
        self._thread_name = thread_name
        self._label = label
        self._clock = clock
        self._users: weakref.WeakSet[Any] = weakref.WeakSet()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        #: Times the monitor thread crashed and was restarted (supervision metric).
        self.crashes = 0

    # --- what connections read and do ---------------------------------------------------------
    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def users(self) -> int:
        return len(self._users)

    @property
    def connection_open(self) -> bool:
        return self._conn is not None

    def _attach(self, user: Any, disposal: float,
                adopt: Callable[[], None] | None = None) -> bool:
        """Register ``user`` (held weakly), keep the longest ``disposal``, run ``adopt``
        (the subclass merges its settings; under ``_cond``, notify it if the pause in
        progress depends on them) and start the thread if it is not running. False when the
        monitor stopped meanwhile (disposed, shut down): the caller gets a new one."""
        with self._cond:
            if self._stopping.is_set():
                return False
            self._users.add(user)
            self.disposal = max(self.disposal, disposal)
            if adopt is not None:
                adopt()
            self._ensure_running()
        return True

    def detach(self, user: Any) -> None:
        with self._cond:
            self._users.discard(user)

    def stop(self) -> None:
        """Stop the thread (bounded: nothing is joined; work in progress on the connection is
        broken by aborting it, which wakes the thread). Users are let go (:meth:`_released`)."""
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()
            conn = self._conn
            users = list(self._users)
            self._users = weakref.WeakSet()
        if conn is not None:
            self.driver.abort(conn)  # wakes a thread waiting on the connection's socket
        self._released(users)

    def abandon(self) -> None:
        """In a child process after ``fork()``: this monitor's thread does not exist here and
        its connection is the parent's session. Look stopped and let the connection go
        without a word to the server (:meth:`DriverDialect.forget`); the locks are replaced,
        as a parent thread may have held them at fork time."""
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._stopping.set()
        self._thread = None
        conn, self._conn = self._conn, None
        self._drop_connection_state()
        self._users = weakref.WeakSet()
        if conn is not None:
            self.driver.forget(conn)

    # --- what subclasses provide --------------------------------------------------------------
    def _step(self, now: float, idle_until: float) -> None:
        """One round of work started at ``now`` and the pause after it (see the class
        docstring)."""
        raise NotImplementedError

    def _record_restart(self, exc: Exception, backoff: float) -> None:
        """Record the decision for a crash of the thread (restarting in ``backoff`` s)."""
        raise NotImplementedError

    def _drop_connection_state(self) -> None:
        """Clear state that belongs to the connection being let go (under ``_cond``)."""

    def _disposed(self) -> None:
        """The monitor disposed of itself for want of users (its connection is closed)."""

    def _released(self, users: list[Any]) -> None:
        """``stop()`` let these users go."""

    # --- the thread ----------------------------------------------------------------------------
    def _live_users(self) -> list[Any]:
        with self._cond:  # a WeakSet must not change while it is iterated
            return list(self._users)

    def _some_user(self) -> Any:
        """A user to open the monitor's connection through (its connect chain: credentials
        plugins apply). Raises RuntimeError when none is left (a failed connect, for the step to
        handle). Do not keep it: users are held weakly."""
        users = self._live_users()
        if not users:
            raise RuntimeError("no connection uses this monitor")
        return users[0]

    def _pause_until(self, wake: Callable[[], float]) -> None:
        """Wait until ``wake()`` (a time of ``clock``, read anew at each wake-up: ``attach()``
        may have moved it and notified ``_cond``) or until the monitor is stopped."""
        with self._cond:
            while not self._stopping.is_set():
                left = wake() - self._clock()
                if left <= 0:
                    break
                self._cond.wait(max(MIN_WAIT, left))

    def _ensure_running(self) -> None:
        # Caller holds the lock.
        if self._stopping.is_set() or (self._thread is not None and self._thread.is_alive()):
            return
        thread = threading.Thread(target=self._supervise, name=self._thread_name, daemon=True)
        self._thread = thread
        _lifecycle.register(self._component, self._registry.stop_all)
        thread.start()

    def _supervise(self) -> None:
        if self._suppress_instrumentation:
            from .telemetry.context import suppress_for_thread  # not at import: OpenTelemetry

            suppress_for_thread()  # internal statements: no instrumentation spans
        supervise(self._run, self._stopping, self._crashed)
        self._close()

    def _crashed(self, exc: Exception, backoff: float) -> None:
        self.crashes += 1
        self._log.warning("%s crashed (%d so far); restarting in %.1f s", self._label,
                          self.crashes, backoff, exc_info=True)
        self._record_restart(exc, backoff)
        self._close()

    def _run(self) -> None:
        idle_since: float | None = None
        while not self._stopping.is_set():
            now = self._clock()
            if self._users:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= self.disposal and self._dispose():
                return
            self._step(now, _INF if idle_since is None else idle_since + self.disposal)

    def _adopt(self, conn: Any) -> bool:
        """Keep ``conn`` as the monitor's connection; when the monitor stopped meanwhile,
        close it and return False."""
        with self._cond:
            if not self._stopping.is_set():
                self._conn = conn
                return True
        with contextlib.suppress(Exception):
            conn.close()
        return False

    def _close(self) -> None:
        with self._cond:
            conn, self._conn = self._conn, None
            self._drop_connection_state()
        if conn is not None:
            self.driver.abort(conn)
            with contextlib.suppress(Exception):
                conn.close()

    def _dispose(self) -> bool:
        """Stop for want of users, unless one arrived meanwhile (checked under the locks that
        the registry lookup and :meth:`_attach` take). Returns whether it stopped."""
        with self._registry.lock, self._cond:
            if self._users:
                return False
            self._registry.discard_locked(self.key, self)
            self._stopping.set()
        self._close()
        self._disposed()
        return True
