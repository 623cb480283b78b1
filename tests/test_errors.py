"""Unit tests of the error tree (resilient_db.errors and the driver-flavoured subclasses)."""

from __future__ import annotations

import pickle

import mysql.connector
import psycopg
import pytest

import resilient_db
from resilient_db import errors
from resilient_db.drivers import get_driver

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("code", ["psycopg", "mysql-connector"])
@pytest.mark.parametrize("cls", errors.RUNTIME_ERRORS)
def test_runtime_errors_are_driver_operational_errors(code: str, cls: type[errors.Error]) -> None:
    driver = get_driver(code)
    err = driver.error(cls, "failed over to b", host="b") if cls is not errors.QueryTimeoutError \
        else driver.error(cls, "deadline", timeout=1.5)
    assert isinstance(err, cls)
    assert isinstance(err, resilient_db.Error)
    assert isinstance(err, driver.OperationalError)
    expected_driver_base = psycopg.OperationalError if code == "psycopg" \
        else mysql.connector.errors.OperationalError
    assert isinstance(err, expected_driver_base)
    assert "failed over to b" in str(err) or "deadline" in str(err)


@pytest.mark.parametrize("code", ["psycopg", "mysql-connector"])
def test_errors_pickle_with_fields(code: str) -> None:
    driver = get_driver(code)
    attempt = errors.ConnectAttempt("a", 5432, "refused", "ConnectionRefusedError()", 0.1)
    err = driver.error(errors.FailoverFailedError, "no writer", failed_host="a",
                       attempts=(attempt,), statement_sent=True)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert copy.attempts == (attempt,)  # type: ignore[attr-defined]
    assert copy.failed_host == "a"  # type: ignore[attr-defined]
    assert copy.statement_sent is True  # type: ignore[attr-defined]
    assert "no writer" in str(copy)


def test_plain_errors_pickle() -> None:
    err = errors.ConfigurationError("bad", parameter="x", value=1)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.parameter, copy.value, str(copy)) == ("x", 1, "bad")


def test_tree() -> None:
    assert issubclass(errors.ConfigurationError, ValueError)
    assert issubclass(errors.DialectMismatchError, errors.ConfigurationError)
    for cls in (errors.FailoverSuccessError, errors.TransactionResolutionUnknownError,
                errors.FailoverFailedError):
        assert issubclass(cls, errors.FailoverError)
    assert not issubclass(errors.QueryTimeoutError, errors.FailoverError)
    assert resilient_db.FailoverSuccessError.__module__ == "resilient_db"


def test_driver_generic_error_falls_back_to_plain_class() -> None:
    err = get_driver("psycopg").error(errors.ConfigurationError, "x", parameter="p")
    assert type(err) is errors.ConfigurationError
