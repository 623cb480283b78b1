"""The process-wide watchdog: heap order, disarm, races, supervision, lifecycle."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import resilient_db
from resilient_db import _lifecycle
from resilient_db.watchdog import Armed, Watchdog, get_watchdog

pytestmark = pytest.mark.unit


@pytest.fixture
def watchdog() -> Iterator[Watchdog]:
    wd = Watchdog(name="resilient_db-watchdog-test")
    yield wd
    for _, armed in list(wd._heap):  # leave no thread behind serving a test's far deadline
        wd.disarm(armed)
    wd.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_no_thread_until_the_first_arm(watchdog: Watchdog) -> None:
    assert watchdog.thread is None
    armed = watchdog.arm(time.monotonic() + 60, lambda: None)
    thread = watchdog.thread
    assert thread is not None and thread.daemon and thread.is_alive()
    watchdog.disarm(armed)


def test_fires_in_deadline_order_not_arm_order(watchdog: Watchdog) -> None:
    fired: list[int] = []
    now = time.monotonic()
    offsets = [5, 1, 4, 2, 3, 0]
    for n in offsets:
        watchdog.arm(now + 0.1 + n * 0.03, lambda n=n: fired.append(n))  # type: ignore[misc]
    assert wait_for(lambda: len(fired) == len(offsets))
    assert fired == sorted(offsets)


def test_an_earlier_deadline_wakes_a_sleeping_thread(watchdog: Watchdog) -> None:
    done = threading.Event()
    watchdog.arm(time.monotonic() + 3600, lambda: None)  # the thread now sleeps for an hour
    assert wait_for(lambda: watchdog._wake_at > time.monotonic() + 3000)
    start = time.monotonic()
    watchdog.arm(start + 0.05, done.set)
    assert done.wait(5)
    assert time.monotonic() - start < 2  # liveness: not the hour


def test_disarmed_deadline_never_fires(watchdog: Watchdog) -> None:
    fired: list[str] = []
    now = time.monotonic()
    keep = watchdog.arm(now + 0.1, lambda: fired.append("keep"))
    drop = watchdog.arm(now + 0.05, lambda: fired.append("drop"))
    watchdog.disarm(drop)
    watchdog.disarm(drop)  # twice is fine
    assert not drop.pending and not drop.fired
    assert wait_for(lambda: fired == ["keep"])
    time.sleep(0.1)
    assert fired == ["keep"]
    assert keep.fired
    watchdog.disarm(keep)  # after firing: a no-op
    assert keep.fired
    assert watchdog.pending() == 0


def test_fire_and_disarm_race_never_fires_after_disarm(watchdog: Watchdog) -> None:
    # Deadlines already due, disarmed at once: each one either fired before disarm won (then
    # armed.fired says so) or never fires at all, not even later.
    calls: dict[int, int] = {}
    lock = threading.Lock()

    def make(i: int) -> Callable[[], None]:
        def fire() -> None:
            with lock:
                calls[i] = calls.get(i, 0) + 1
        return fire

    armed: list[Armed] = []
    for i in range(3000):
        a = watchdog.arm(time.monotonic(), make(i))
        if i % 3 == 0:
            time.sleep(0)  # let the watchdog thread win some of the races
        watchdog.disarm(a)
        armed.append(a)
    assert wait_for(lambda: watchdog.pending() == 0)
    time.sleep(0.1)
    fired = {i for i, a in enumerate(armed) if a.fired}
    assert set(calls) == fired
    assert all(n == 1 for n in calls.values())
    # Both outcomes happened, otherwise this test did not exercise the race.
    assert 0 < len(fired) < len(armed), len(fired)


def test_disarm_is_cheap_and_the_heap_stays_small(watchdog: Watchdog) -> None:
    far = time.monotonic() + 3600
    for _ in range(10_000):
        watchdog.disarm(watchdog.arm(far, lambda: None))
    assert watchdog.pending() == 0
    assert len(watchdog._heap) <= 600  # compacted, not 10,000 dead entries


def test_a_raising_callback_is_logged_counted_and_the_thread_survives(
    watchdog: Watchdog, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("callback failed")

    done = threading.Event()
    with caplog.at_level(logging.WARNING, logger="resilient_db.watchdog"):
        watchdog.arm(time.monotonic(), boom)
        watchdog.arm(time.monotonic() + 0.05, done.set)
        assert done.wait(5)
    assert watchdog.fire_errors == 1
    assert watchdog.crashes == 0
    assert "callback failed" in caplog.text


class _Crash(BaseException):
    """Not an Exception: escapes the callback guard and kills the loop."""


def test_a_crashed_loop_is_restarted_with_backoff_and_counted(
    watchdog: Watchdog, caplog: pytest.LogCaptureFixture
) -> None:
    def crash() -> None:
        raise _Crash("loop killer")

    done = threading.Event()
    with caplog.at_level(logging.WARNING, logger="resilient_db.watchdog"):
        now = time.monotonic()
        watchdog.arm(now, crash)
        later = watchdog.arm(now + 0.02, done.set)  # pending across the crash
        assert done.wait(5)
    assert watchdog.crashes == 1
    assert later.fired
    assert "watchdog loop crashed" in caplog.text
    thread = watchdog.thread
    assert thread is not None and thread.is_alive()
    # Still serving after the restart.
    again = threading.Event()
    watchdog.arm(time.monotonic(), again.set)
    assert again.wait(5)


def test_stop_ends_an_idle_thread_without_joining_and_arm_restarts_it(
        watchdog: Watchdog) -> None:
    watchdog.disarm(watchdog.arm(time.monotonic() + 3600, lambda: None))
    first = watchdog.thread
    assert first is not None
    start = time.monotonic()
    watchdog.stop()
    assert time.monotonic() - start < 0.5  # never waits for the thread
    assert wait_for(lambda: not first.is_alive())
    assert watchdog.thread is None
    done = threading.Event()
    watchdog.arm(time.monotonic(), done.set)
    assert done.wait(5)
    assert watchdog.thread is not None and watchdog.thread is not first


def test_stop_never_abandons_a_pending_deadline(watchdog: Watchdog) -> None:
    # A statement blocked in another thread counts on its deadline: stop() lets the thread
    # serve what is pending, then it ends by itself.
    done = threading.Event()
    watchdog.arm(time.monotonic() + 0.3, done.set)
    thread = watchdog.thread
    assert thread is not None
    start = time.monotonic()
    watchdog.stop()
    assert time.monotonic() - start < 0.5
    assert done.wait(5)
    assert wait_for(lambda: not thread.is_alive())
    assert watchdog.thread is None


def test_a_stopped_thread_ends_when_its_last_pending_deadline_is_disarmed(
        watchdog: Watchdog) -> None:
    armed = watchdog.arm(time.monotonic() + 3600, lambda: None)
    thread = watchdog.thread
    assert thread is not None
    watchdog.stop()
    time.sleep(0.1)
    assert thread.is_alive()  # still owes that deadline
    watchdog.disarm(armed)
    assert wait_for(lambda: not thread.is_alive())
    assert watchdog.thread is None


def test_arm_while_stopping_keeps_the_thread_and_registers_it_again(watchdog: Watchdog) -> None:
    first = watchdog.arm(time.monotonic() + 3600, lambda: None)
    thread = watchdog.thread
    watchdog.stop()
    second = watchdog.arm(time.monotonic() + 3600, lambda: None)
    watchdog.disarm(first)
    time.sleep(0.1)
    assert watchdog.thread is thread and thread is not None and thread.is_alive()
    assert f"watchdog:{id(watchdog)}" in _lifecycle.running()
    watchdog.disarm(second)


def test_shutdown_stops_the_process_watchdog() -> None:
    wd = get_watchdog()
    assert get_watchdog() is wd
    wd.disarm(wd.arm(time.monotonic() + 3600, lambda: None))
    thread = wd.thread
    assert thread is not None
    assert any(name.startswith("watchdog") for name in _lifecycle.running())
    resilient_db.shutdown()
    assert wait_for(lambda: not thread.is_alive())
    assert wd.thread is None


def test_interpreter_exit_never_waits_for_the_watchdog() -> None:
    # A callback stuck forever on the watchdog thread, a deadline an hour away, no explicit
    # shutdown: the process still exits at once.
    code = textwrap.dedent("""
        import threading, time
        import resilient_db
        from resilient_db.watchdog import get_watchdog
        wd = get_watchdog()
        assert [t for t in threading.enumerate() if t is not threading.main_thread()] == []
        started = threading.Event()
        def stuck():
            started.set()
            time.sleep(3600)
        wd.arm(time.monotonic(), stuck)
        wd.arm(time.monotonic() + 3600, lambda: None)
        assert started.wait(10)
        print("exiting", flush=True)
    """)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "exiting"
    assert time.monotonic() - start < 15  # liveness bound (interpreter start-up included)


@pytest.mark.parametrize("far", [1e300, math.inf, 1.7976931348623157e308])
def test_a_deadline_too_far_to_sleep_towards_neither_crashes_nor_delays_others(
        watchdog: Watchdog, far: float) -> None:
    # Condition.wait() refuses timeouts beyond threading.TIMEOUT_MAX (OverflowError): the loop
    # must not crash-loop on such an entry, and nearer deadlines must still fire on time.
    watchdog.arm(far, lambda: None)
    time.sleep(0.1)  # the thread now sleeps towards the far deadline
    fired = threading.Event()
    start = time.monotonic()
    watchdog.arm(start + 0.2, fired.set)
    assert fired.wait(5.0)
    assert time.monotonic() - start < 5.0
    assert watchdog.crashes == 0
    assert watchdog.pending() == 1  # the far one, neither fired nor lost


def test_a_nan_deadline_is_refused_at_arm_and_leaves_the_heap_alone(watchdog: Watchdog) -> None:
    with pytest.raises(ValueError, match="deadline"):
        watchdog.arm(math.nan, lambda: None)
    assert watchdog.pending() == 0
    fired = threading.Event()
    watchdog.arm(time.monotonic() + 0.05, fired.set)
    assert fired.wait(5.0)
    assert watchdog.crashes == 0
