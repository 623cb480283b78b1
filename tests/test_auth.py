"""The credential-provider core (resilient_db.auth): cache, early refresh, one in-flight fetch,
invalidation, retry once on an authentication failure, no secret in reprs, logs or decisions.

Unit tests use a typed fake provider and a fake connect terminal; the retry and side
connection tests run against the real servers with a password user."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Iterator
from typing import Any, ClassVar

import pytest

import resilient_db
from resilient_db import CollectingSink
from resilient_db._pipeline import (
    CREDENTIALS_HOOK,
    ConnectContext,
    HostSpec,
    PluginContext,
)
from resilient_db._properties import Settings
from resilient_db.auth import (
    CACHED,
    CREDENTIALS,
    FETCHED,
    REFRESHED,
    AuthPlugin,
    Credential,
    CredentialCache,
    CredentialProvider,
)
from resilient_db.drivers import driver_for
from tests.conftest import Backend

SECRET = "s3cr3t-token-value"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeProvider(CredentialProvider):
    """Hands out ``passwords`` in turn (the last one forever), each valid for ``ttl``."""

    code: ClassVar[str] = "fake"

    def __init__(self, clock: Clock, ttl: float | None = 900.0,
                 passwords: tuple[str, ...] = (SECRET,), user: str | None = None,
                 delay: float = 0.0, fail: BaseException | None = None) -> None:
        self.clock = clock
        self.ttl = ttl
        self.passwords = passwords
        self.user = user
        self.delay = delay
        self.fail = fail
        self.refresh_before = 60.0
        self.calls = 0
        self.lock = threading.Lock()

    def key(self, ctx: ConnectContext) -> Hashable:
        return ("fake", ctx.host.host, ctx.host.port, ctx.driver.user_of(ctx.args))

    def fetch(self, ctx: ConnectContext) -> Credential:
        with self.lock:
            self.calls += 1
            index = min(self.calls, len(self.passwords)) - 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        expires = None if self.ttl is None else self.clock() + self.ttl
        return Credential(self.user, self.passwords[index], expires, "fake")


def _ctx(host: str = "db.example", port: int | None = 5432, user: str = "app",
         driver: str = "psycopg") -> ConnectContext:
    import mysql.connector
    import psycopg

    target: Any = psycopg.Connection.connect if driver == "psycopg" else mysql.connector.connect
    return ConnectContext(HostSpec(host, port), {"host": host, "user": user}, Settings({}),
                          driver_for(target, None), target, initial=True)


# --- the cache ---------------------------------------------------------------------------------

def test_cache_hit_does_no_io() -> None:
    clock = Clock()
    cache = CredentialCache(clock)
    provider = FakeProvider(clock)
    first, status = cache.get(provider, _ctx())
    assert status == FETCHED and first.password == SECRET
    for _ in range(5):
        again, status = cache.get(provider, _ctx())
        assert again is first and status == CACHED
    assert provider.calls == 1 and cache.fetches == 1


def test_keys_separate_hosts_ports_and_users() -> None:
    clock = Clock()
    cache = CredentialCache(clock)
    provider = FakeProvider(clock)
    for ctx in (_ctx(), _ctx(host="other"), _ctx(port=5433), _ctx(user="bob"), _ctx()):
        cache.get(provider, ctx)
    assert provider.calls == 4


def test_early_refresh_before_expiry_and_old_credential_served_meanwhile() -> None:
    clock = Clock()
    cache = CredentialCache(clock)
    provider = FakeProvider(clock, ttl=900.0, passwords=("one", "two"))
    first, _ = cache.get(provider, _ctx())
    clock.now += 900.0 - 61.0  # just outside the refresh window
    assert cache.get(provider, _ctx()) == (first, CACHED)
    clock.now += 2.0  # inside it: refreshed although still valid
    second, status = cache.get(provider, _ctx())
    assert (second.password, status) == ("two", REFRESHED)
    assert provider.calls == 2


def test_refresh_failure_keeps_a_still_valid_credential(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    cache = CredentialCache(clock)
    provider = FakeProvider(clock, ttl=900.0)
    first, _ = cache.get(provider, _ctx())
    provider.fail = ConnectionError("endpoint unreachable")
    clock.now += 880.0
    with caplog.at_level(logging.WARNING, logger="resilient_db.auth"):
        assert cache.get(provider, _ctx()) == (first, CACHED)
    assert "refreshing the fake credential" in caplog.text
    assert SECRET not in caplog.text
    clock.now += 30.0  # expired now: the error goes up
    with pytest.raises(ConnectionError):
        cache.get(provider, _ctx())


def test_expired_credential_is_refetched() -> None:
    clock = Clock()
    cache = CredentialCache(clock)
    provider = FakeProvider(clock, ttl=10.0, passwords=("one", "two"))
    provider.refresh_before = 0.0
    cache.get(provider, _ctx())
    clock.now += 10.0
    assert cache.get(provider, _ctx())[0].password == "two"


def test_no_expiry_means_until_invalidated() -> None:
    clock = Clock()
    cache = CredentialCache(clock)
    provider = FakeProvider(clock, ttl=None, passwords=("one", "two"))
    key = provider.key(_ctx())
    cache.get(provider, _ctx())
    clock.now += 10 * 365 * 86400.0
    assert cache.get(provider, _ctx())[1] == CACHED
    cache.invalidate(key)
    assert cache.get(provider, _ctx())[0].password == "two"


def test_invalidate_only_the_credential_that_failed() -> None:
    clock = Clock()
    cache = CredentialCache(clock)
    provider = FakeProvider(clock, passwords=("one", "two", "three"))
    key = provider.key(_ctx())
    old, _ = cache.get(provider, _ctx())
    cache.invalidate(key, old)
    new, _ = cache.get(provider, _ctx())
    cache.invalidate(key, old)  # a late thread reporting the old one: the new one stays
    assert cache.peek(key) is new


def test_one_fetch_in_flight_per_key_under_20_threads() -> None:
    clock = Clock()
    cache = CredentialCache(clock)
    provider = FakeProvider(clock, delay=0.2)
    barrier = threading.Barrier(20)
    results: list[tuple[Credential, str]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=30)
            results.append(cache.get(provider, _ctx()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(results) == 20
    assert provider.calls == 1
    assert len({id(cred) for cred, _ in results}) == 1
    assert sorted(status for _, status in results).count(FETCHED) == 1


def test_waiters_get_the_fetch_error_when_nothing_is_valid() -> None:
    clock = Clock()
    cache = CredentialCache(clock)
    provider = FakeProvider(clock, delay=0.2, fail=PermissionError("denied"))
    barrier = threading.Barrier(5)
    raised: list[BaseException] = []

    def worker() -> None:
        barrier.wait(timeout=30)
        try:
            cache.get(provider, _ctx())
        except BaseException as exc:
            raised.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(raised) == 5 and all(isinstance(e, PermissionError) for e in raised)
    assert provider.calls <= 5  # never a stuck flight: a later get fetches again
    provider.fail = None
    assert cache.get(provider, _ctx())[0].password == SECRET


def test_no_secret_in_repr_or_str() -> None:
    credential = Credential("app", SECRET, 1.0, "fake")
    assert SECRET not in repr(credential)
    assert SECRET not in str(credential)
    assert SECRET not in f"{credential}"
    ctx = _ctx()
    ctx.args["password"] = SECRET
    assert SECRET not in repr(ctx)


# --- the plugin, with a fake terminal -----------------------------------------------------------

class FakeAuthPlugin(AuthPlugin):
    code = "fake_auth"
    made: ClassVar[FakeProvider | None] = None

    def provider(self) -> CredentialProvider:
        assert FakeAuthPlugin.made is not None
        return FakeAuthPlugin.made


@pytest.fixture
def fake_auth() -> Iterator[type[FakeAuthPlugin]]:
    CREDENTIALS.clear()
    yield FakeAuthPlugin
    FakeAuthPlugin.made = None
    CREDENTIALS.clear()


def _plugin(ctx: ConnectContext) -> FakeAuthPlugin:
    return FakeAuthPlugin(PluginContext(ctx.settings, ctx.driver, ctx.host))


def _auth_error() -> Exception:
    import psycopg

    return psycopg.OperationalError(
        'connection failed: FATAL:  password authentication failed for user "app"')


def test_plugin_applies_credential_to_a_copy(fake_auth: type[FakeAuthPlugin],
                                             sink: CollectingSink) -> None:
    fake_auth.made = FakeProvider(Clock(time.time()), user="iamuser")
    ctx = _ctx()
    seen: list[dict[str, Any]] = []
    _plugin(ctx).connect(ctx, lambda c: seen.append(dict(c.args)))
    assert seen == [{"host": "db.example", "user": "iamuser", "password": SECRET}]
    assert "password" not in ctx.args  # the outer plugins' arguments are untouched
    kinds = [(d.kind, d.attributes["auth.status"]) for d in sink.decisions]
    assert kinds == [("auth.credential", FETCHED)]
    attrs = sink.decisions[0].attributes
    assert attrs["db.user"] == "iamuser" and attrs["server.address"] == "db.example"
    assert SECRET not in repr(sink.decisions)


def test_plugin_retries_once_with_a_fresh_credential(fake_auth: type[FakeAuthPlugin],
                                                     sink: CollectingSink) -> None:
    fake_auth.made = FakeProvider(Clock(time.time()), passwords=("stale", "fresh"))
    ctx = _ctx()
    tried: list[str] = []

    def terminal(c: ConnectContext) -> str:
        tried.append(c.args["password"])
        if c.args["password"] == "stale":
            raise _auth_error()
        return "connection"

    assert _plugin(ctx).connect(ctx, terminal) == "connection"
    assert tried == ["stale", "fresh"]
    assert [d.kind for d in sink.decisions] == ["auth.credential", "auth.retried"]
    assert sink.decisions[1].attributes["auth.status"] == REFRESHED


def test_plugin_gives_up_after_one_retry(fake_auth: type[FakeAuthPlugin],
                                         sink: CollectingSink) -> None:
    import psycopg

    fake_auth.made = FakeProvider(Clock(time.time()), passwords=("bad1", "bad2", "bad3"))
    ctx = _ctx()
    tried: list[str] = []

    def terminal(c: ConnectContext) -> Any:
        tried.append(c.args["password"])
        raise _auth_error()

    with pytest.raises(psycopg.OperationalError) as info:
        _plugin(ctx).connect(ctx, terminal)
    assert tried == ["bad1", "bad2"]
    assert info.value.__context__ is None  # the driver's own error, not chained to the first
    assert [d.kind for d in sink.decisions] == ["auth.credential", "auth.retried",
                                                "auth.failed"]
    assert fake_auth.made.key(ctx) not in CREDENTIALS._entries


def test_plugin_does_not_retry_other_errors(fake_auth: type[FakeAuthPlugin]) -> None:
    import psycopg

    fake_auth.made = FakeProvider(Clock(time.time()))
    ctx = _ctx()
    calls = 0

    def terminal(c: ConnectContext) -> Any:
        nonlocal calls
        calls += 1
        raise psycopg.OperationalError("connection refused")

    with pytest.raises(psycopg.OperationalError):
        _plugin(ctx).connect(ctx, terminal)
    assert calls == 1
    assert CREDENTIALS.peek(fake_auth.made.key(ctx)) is not None  # not invalidated


def test_credentials_hook_gives_side_connections_a_current_credential(
        fake_auth: type[FakeAuthPlugin]) -> None:
    fake_auth.made = FakeProvider(Clock(time.time()), user="iamuser")
    ctx = _ctx(driver="mysql")
    plugin = _plugin(ctx)
    hook = plugin.ctx.extra[CREDENTIALS_HOOK]
    args = hook(HostSpec("side.example", 3306), {"host": "side.example", "port": 3306,
                                                 "user": "app"})
    assert args["password"] == SECRET and args["user"] == "iamuser"
    assert CREDENTIALS.peek(("fake", "side.example", 3306, "app")) is not None


# --- driver dialects -----------------------------------------------------------------------------

def test_is_auth_failure() -> None:
    import mysql.connector
    import psycopg

    pg = driver_for(psycopg.Connection.connect, None)
    my = driver_for(mysql.connector.connect, None)
    assert pg.is_auth_failure(_auth_error())
    assert pg.is_auth_failure(psycopg.OperationalError(
        'connection failed: FATAL:  PAM authentication failed for user "iam"'))
    assert not pg.is_auth_failure(psycopg.OperationalError("connection refused"))
    assert not pg.is_auth_failure(ValueError("authentication failed for user"))
    denied = mysql.connector.errors.ProgrammingError(
        msg="Access denied for user 'app'@'localhost' (using password: YES)", errno=1045)
    assert my.is_auth_failure(denied)
    assert not my.is_auth_failure(mysql.connector.errors.OperationalError(msg="x", errno=2013))
    assert not pg.is_auth_failure(denied) and not my.is_auth_failure(_auth_error())


def test_mysql_apply_credential_clear_text() -> None:
    import mysql.connector

    my = driver_for(mysql.connector.connect, None)
    args: dict[str, Any] = {"username": "app", "passwd": "old"}
    my.apply_credential(args, "iamuser", SECRET, clear_text=True)
    assert args == {"user": "iamuser", "password": SECRET, "auth_plugin": "mysql_clear_password"}


# --- real servers --------------------------------------------------------------------------------

class ServerPasswordPlugin(AuthPlugin):
    """Gives the server's password, after ``wrong`` wrong ones."""

    code = "server_password"
    password = ""
    wrong = 0
    fetched: ClassVar[list[str]] = []

    def provider(self) -> CredentialProvider:
        plugin = type(self)

        class Provider(CredentialProvider):
            code: ClassVar[str] = "server_password"

            def key(self, ctx: ConnectContext) -> Hashable:
                return ("server_password", ctx.host.host, ctx.host.port)

            def fetch(self, ctx: ConnectContext) -> Credential:
                if plugin.wrong > 0:
                    plugin.wrong -= 1
                    value = "wrong-password"
                else:
                    value = plugin.password
                plugin.fetched.append(value)
                return Credential(None, value, None, "server_password")

        return Provider()


@pytest.fixture
def server_password(backend: Backend) -> Iterator[type[ServerPasswordPlugin]]:
    CREDENTIALS.clear()
    ServerPasswordPlugin.password = backend.server.password
    ServerPasswordPlugin.wrong = 0
    ServerPasswordPlugin.fetched = []
    yield ServerPasswordPlugin
    CREDENTIALS.clear()


def test_real_server_refusal_is_retried_with_a_fresh_credential(
        backend: Backend, server_password: type[ServerPasswordPlugin],
        sink: CollectingSink) -> None:
    server_password.wrong = 1
    kwargs = {k: v for k, v in backend.kwargs.items() if k != "password"}
    conn = resilient_db.connect(backend.target, plugins=[server_password], **kwargs)
    try:
        cur = conn.cursor()
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    finally:
        conn.close()
    assert server_password.fetched == ["wrong-password", backend.server.password]
    assert [d.kind for d in sink.decisions if d.kind.startswith("auth.")] == [
        "auth.credential", "auth.retried"]


def test_real_server_two_refusals_raise_the_driver_error(
        backend: Backend, server_password: type[ServerPasswordPlugin],
        sink: CollectingSink) -> None:
    server_password.wrong = 2
    kwargs = {k: v for k, v in backend.kwargs.items() if k != "password"}
    with pytest.raises(Exception) as info:  # the driver's own: checked below
        resilient_db.connect(backend.target, plugins=[server_password], **kwargs)
    driver = driver_for(backend.target, None)
    assert driver.is_auth_failure(info.value)
    assert "wrong-password" not in str(info.value)
    assert [d.kind for d in sink.decisions if d.kind.startswith("auth.")] == [
        "auth.credential", "auth.retried", "auth.failed"]
