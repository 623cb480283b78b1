"""Unit tests of conninfo parsing (resilient_db._conninfo)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_db import ConfigurationError
from resilient_db._conninfo import looks_secret, parse, parse_keyvalue, redact, uri_scheme

pytestmark = pytest.mark.unit


def test_keyvalue_basic_and_spaces_around_equals() -> None:
    assert parse_keyvalue("host=db  dbname = app user=u") == {
        "host": "db", "dbname": "app", "user": "u"
    }


def test_keyvalue_quotes_and_escapes() -> None:
    got = parse_keyvalue(r"password='a b\'c' options='-c search_path=x' empty=''")
    assert got == {"password": "a b'c", "options": "-c search_path=x", "empty": ""}


def test_empty_conninfo() -> None:
    assert parse("", database_key="dbname") == {}
    assert parse("   ", database_key="dbname") == {}


@pytest.mark.parametrize(
    ("text", "culprit"),
    [("host", "'host'"), ("host=db dbname", "'dbname'"), ("password='abc", "password"),
     ("=x", "without a key")],
)
def test_malformed_keyvalue_names_the_culprit(text: str, culprit: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse(text, database_key="dbname")
    assert culprit in str(info.value)


def test_conninfo_must_be_a_string() -> None:
    with pytest.raises(ConfigurationError, match="conninfo must be a string"):
        parse(b"host=x", database_key="dbname")  # type: ignore[arg-type]


def test_pg_uri_full() -> None:
    got = parse(
        "postgresql://u%40x:p%3Ass@db1:5433,db2:5434/app%20db?sslmode=require&connect_timeout=3",
        database_key="dbname",
    )
    assert got == {
        "user": "u@x", "password": "p:ss", "host": "db1,db2", "port": "5433,5434",
        "dbname": "app db", "sslmode": "require", "connect_timeout": "3",
    }


def test_mysql_uri_uses_database_key_and_ipv6() -> None:
    got = parse("mysql://root@[::1]:3307/test", database_key="database")
    assert got == {"user": "root", "host": "::1", "port": "3307", "database": "test"}


def test_uri_without_port_or_path() -> None:
    assert parse("postgres://h", database_key="dbname") == {"host": "h"}


@pytest.mark.parametrize(
    ("uri", "culprit"),
    [("postgresql://u:secret@h:99999/d", "port '99999'"),
     ("postgresql://u:secret@h:abc/d", "port 'abc'"),
     ("redis://h/0", "unsupported URI scheme 'redis'"),
     ("postgresql://[::1/d", "unterminated '['")],
)
def test_malformed_uri(uri: str, culprit: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse(uri, database_key="dbname")
    assert culprit in str(info.value)
    assert "secret" not in str(info.value)


def test_uri_scheme() -> None:
    assert uri_scheme("MySQL://h") == "mysql"
    assert uri_scheme("host=x") is None


_keys = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
_values = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
                  max_size=20)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@given(st.dictionaries(_keys, _values, max_size=6))
def test_keyvalue_round_trip(params: dict[str, str]) -> None:
    text = " ".join(f"{k}={_quote(v)}" for k, v in params.items())
    assert parse_keyvalue(text) == params


# --- secrets stay out of errors (issue #11 item 6) -------------------------------------------

SECRET = "hunter2xyz"


def _leaks(err: ConfigurationError) -> list[str]:
    """Every place of ``err`` that shows the secret (or a part of it split at a space)."""
    places = {"str": str(err), "repr": repr(err), "args": repr(err.args),
              "value": repr(err.value), "parameter": repr(err.parameter)}
    return [name for name, text in places.items() if "hunter2" in text or "xyz" in text]


@pytest.mark.parametrize(
    "text",
    [f"host=db password={SECRET} dbname",  # malformed after the password
     f"host=db password='{SECRET}",  # unterminated quote
     f"password={SECRET[:7]} {SECRET[7:]} host=db",  # unquoted space: 'xyz' looks like a key
     f"passwd = {SECRET} =oops",
     f"sslpassword={SECRET} user",
     f"PWD={SECRET} =x",
     f"host=db password={SECRET} 'dangling",
     f"postgresql://u:{SECRET}@h:99999/d",
     f"postgresql://u@h:5432/d?password={SECRET}&=x",
     f"postgresql://u@h/d?sslpassword={SECRET}&=x",
     f"redis://u:{SECRET}@h/0?token={SECRET}",
     # unencoded '/' or '?' in the password: the authority ends early
     f"postgresql://u:{SECRET[:7]}/{SECRET[7:]}@h/d",
     f"postgresql://u:{SECRET[:7]}?{SECRET[7:]}@h/d",
     f"postgresql://u:{SECRET[:7]}/{SECRET[7:]}@h/d?application_name=a@b"],
)
def test_malformed_conninfo_never_shows_the_password(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse(text, database_key="dbname")
    assert _leaks(info.value) == []
    assert info.value.parameter is not None


def test_unencoded_slash_in_uri_password_says_how_to_fix_it() -> None:
    with pytest.raises(ConfigurationError, match="percent-encode"):
        parse(f"postgresql://u:{SECRET[:7]}/{SECRET[7:]}@h/d", database_key="dbname")


def test_malformed_after_a_password_says_how_to_fix_it() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse(f"password={SECRET[:7]} {SECRET[7:]} host=db", database_key="dbname")
    assert "after the value of 'password'" in str(info.value)
    assert "password='...'" in str(info.value)


def test_non_string_conninfo_value_is_not_kept() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse({"password": SECRET}, database_key="dbname")  # type: ignore[arg-type]
    assert _leaks(info.value) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [(f"host=db password={SECRET} dbname=app", "host=db password=*** dbname=app"),
     (f"host=db password = '{SECRET} x' port=1", "host=db password = *** port=1"),
     (f"password={SECRET[:7]} {SECRET[7:]} host=db", "password=*** *** host=db"),
     (f"pasword={SECRET} host=db", "pasword=*** host=db"),
     ("host=db sslkey=/k dbname", "host=db sslkey=/k dbname"),
     (f"postgresql://u:{SECRET}@h/d?token={SECRET}&sslmode=require",
      "postgresql://u:***@h/d?token=***&sslmode=require"),
     (f"postgresql://u:a/b@{SECRET}@h:5432/d", "postgresql://u:***@h:5432/d"),
     ("postgresql://h:5432/d?application_name=a@b", "postgresql://h:5432/d?application_name=a@b")],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("key", ["password", "PASSWORD", "passwd", "pwd", "pw", "sslpassword",
                                 "pasword", "passwrod", "pssword", "secret", "auth_token",
                                 "api_key", "aws_secret_access_key", "passfile"])
def test_looks_secret(key: str) -> None:
    assert looks_secret(key)


@pytest.mark.parametrize("key", ["host", "port", "user", "dbname", "sslmode", "sslkey",
                                 "connect_timeout", "application_name", "options"])
def test_looks_secret_not_for_ordinary_keys(key: str) -> None:
    assert not looks_secret(key)


@given(st.dictionaries(_keys, _values, max_size=6), _values.filter(lambda v: len(v) >= 4))
def test_redact_hides_any_password_in_a_valid_conninfo(params: dict[str, str], pw: str) -> None:
    params["password"] = pw
    text = " ".join(f"{k}={_quote(v)}" for k, v in params.items())
    shown = redact(text)
    assert _quote(pw) not in shown
    assert "password=***" in shown
