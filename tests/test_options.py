"""Unit tests of per-call options (resilient_db._options)."""

from __future__ import annotations

import threading

import pytest

import resilient_db
from resilient_db import CallOptions, ConfigurationError, call_options, current_options

pytestmark = pytest.mark.unit


def test_default_is_unset() -> None:
    assert current_options() == CallOptions(timeout=None, idempotent=None)


def test_nested_blocks_override_only_what_they_name() -> None:
    with call_options(timeout=2, idempotent=True) as outer:
        assert outer == CallOptions(2.0, True)
        with call_options(timeout=0.5):
            assert current_options() == CallOptions(0.5, True)
        assert current_options() == CallOptions(2.0, True)
    assert current_options() == CallOptions()


def test_options_are_per_thread() -> None:
    seen: list[CallOptions] = []
    with call_options(timeout=1):
        thread = threading.Thread(target=lambda: seen.append(current_options()))
        thread.start()
        thread.join()
    assert seen == [CallOptions()]


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [({"timeout": -1}, "timeout"), ({"timeout": "5"}, "timeout"), ({"timeout": True}, "timeout"),
     ({"timeout": float("inf")}, "timeout"), ({"timeout": float("nan")}, "timeout"),
     ({"timeout": -float("inf")}, "timeout"), ({"idempotent": "yes"}, "idempotent")],
)
def test_bad_options(kwargs: dict[str, object], culprit: str) -> None:
    with pytest.raises(ConfigurationError) as info, resilient_db.call_options(**kwargs):  # type: ignore[arg-type]
        pass
    assert info.value.parameter == culprit
    assert culprit in str(info.value)


def test_a_huge_but_finite_timeout_is_accepted() -> None:
    # Effectively no deadline; the watchdog copes with any finite deadline (test_watchdog.py).
    with resilient_db.call_options(timeout=1e300) as options:
        assert options.timeout == 1e300
