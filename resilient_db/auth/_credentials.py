"""Credentials and the process-wide credential cache (DESIGN §8).

A :class:`CredentialProvider` knows how to get one credential (an IAM token, a secret) for a
physical connect and how to name it (its cache key). :data:`CREDENTIALS`, the one
:class:`CredentialCache` of the process, decides *when* to ask: a cached credential is served
without I/O until ``refresh_before`` seconds before it expires; then one thread fetches a new
one while the others keep using the old one (still valid); an expired or missing credential is
fetched once per key however many threads want it at the same moment (the others wait for that
fetch). The fetch itself runs outside the cache's lock.

No secret is ever logged, put in an error message, a decision or a repr: ``Credential`` hides
``password`` from its repr, and the cache logs keys only through the provider's
``describe(key)``.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .._pipeline import ConnectContext

__all__ = [
    "CACHED",
    "CREDENTIALS",
    "FETCHED",
    "REFRESHED",
    "Credential",
    "CredentialCache",
    "CredentialProvider",
]

log = logging.getLogger("resilient_db.auth")

#: ``CredentialCache.get`` statuses: served from the cache without I/O; fetched for a key the
#: cache did not hold; fetched to replace a credential that was expiring, expired or
#: invalidated.
CACHED = "cached"
FETCHED = "fetched"
REFRESHED = "refreshed"


@dataclass(frozen=True)
class Credential:
    """What a physical connect authenticates with.

    ``user``: the database user to log in as (``None``: keep the user the application gave).
    ``password``: the secret or token; never in a repr, log, error or decision.
    ``expires_at``: ``time.time()`` wall-clock expiry (``None``: valid until invalidated).
    ``source``: the provider's plugin code (``"iam"``, ``"aws_secrets_manager"``, ...).
    ``clear_text``: MySQL must send the password as is (``mysql_clear_password``): an IAM
    token, checked by the server's PAM or IAM plugin, not a password hash.
    """

    user: str | None
    password: str = field(repr=False)
    expires_at: float | None
    source: str
    clear_text: bool = False

    def __str__(self) -> str:
        return repr(self)

    def fresh(self, now: float, margin: float) -> bool:
        """Valid for at least ``margin`` more seconds at wall-clock ``now``."""
        return self.expires_at is None or now < self.expires_at - margin

    def valid(self, now: float) -> bool:
        """Not expired at wall-clock ``now``."""
        return self.expires_at is None or now < self.expires_at


class CredentialProvider(abc.ABC):
    """How one auth plugin instance gets credentials (one provider per plugin instance;
    process-wide caching is :class:`CredentialCache`'s job).

    ``key(ctx)`` names the credential a connect needs: connects with equal keys share one
    cached credential, so a key holds everything the credential depends on, e.g. ``("iam",
    host, port, user, region)``, and starts with the plugin code so that two providers never
    share a key. ``fetch(ctx)`` does the I/O (boto3, HTTP); it runs without the cache's lock
    and at most once at a time per key. ``refresh_before``: seconds before ``expires_at``
    from which a new credential is fetched while the old one is still served.
    """

    code: ClassVar[str] = ""
    refresh_before: float = 60.0

    @abc.abstractmethod
    def key(self, ctx: ConnectContext) -> Hashable: ...

    @abc.abstractmethod
    def fetch(self, ctx: ConnectContext) -> Credential: ...

    def describe(self, key: Hashable) -> str:
        """``key`` for a log line (keys hold no secrets; override if yours could)."""
        return repr(key)


class _Flight:
    """One fetch in progress: the waiters block on ``done``."""

    __slots__ = ("credential", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.credential: Credential | None = None
        self.error: BaseException | None = None


class CredentialCache:
    """Credentials by key, process-wide. ``clock``: wall-clock seconds (``time.time``)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Hashable, Credential] = {}
        self._flights: dict[Hashable, _Flight] = {}
        self._invalidated: set[Hashable] = set()  # their next fetch is a refresh
        #: Fetches started (for tests and benchmarks).
        self.fetches = 0

    def get(self, provider: CredentialProvider, ctx: ConnectContext,
            key: Hashable | None = None) -> tuple[Credential, str]:
        """The credential for ``ctx`` and how it was obtained (:data:`CACHED`,
        :data:`FETCHED` or :data:`REFRESHED`). ``key``: ``provider.key(ctx)`` when the
        caller has it already. Raises what ``provider.fetch`` raised when there is no valid
        credential to fall back on."""
        if key is None:
            key = provider.key(ctx)
        now = self.clock()
        entry = self._entries.get(key)  # a dict read is atomic: the no-I/O path takes no lock
        if entry is not None and entry.fresh(now, provider.refresh_before):
            return entry, CACHED
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.fresh(now, provider.refresh_before):
                return entry, CACHED
            flight = self._flights.get(key)
            if flight is not None:
                if entry is not None and entry.valid(now):
                    # Early refresh in progress on another thread: the old one still works.
                    return entry, CACHED
                leader = False
            else:
                flight = self._flights[key] = _Flight()
                self.fetches += 1
                leader = True
        if not leader:
            flight.done.wait()
            if flight.credential is None:
                assert flight.error is not None
                raise flight.error
            return flight.credential, CACHED  # another thread's fetch: no I/O here
        status = REFRESHED if entry is not None or key in self._invalidated else FETCHED
        try:
            credential = provider.fetch(ctx)
        except BaseException as exc:
            with self._lock:
                self._flights.pop(key, None)
            flight.error = exc
            flight.done.set()
            if entry is not None and entry.valid(self.clock()):
                log.warning("refreshing the %s credential for %s failed (%s); using the "
                            "current one until it expires", provider.code,
                            provider.describe(key), type(exc).__name__)
                return entry, CACHED
            raise
        with self._lock:
            self._entries[key] = credential
            self._flights.pop(key, None)
            self._invalidated.discard(key)
        flight.credential = credential
        flight.done.set()
        return credential, status

    def peek(self, key: Hashable) -> Credential | None:
        """The cached credential for ``key``, if any (tests)."""
        return self._entries.get(key)

    def invalidate(self, key: Hashable, credential: Credential | None = None) -> None:
        """Forget the credential of ``key`` (the next ``get`` fetches). ``credential``: only
        if it is still this one (a credential that failed to authenticate; another thread
        may have replaced it with a good one already)."""
        with self._lock:
            current = self._entries.get(key)
            if current is not None and credential in (None, current):
                del self._entries[key]
                self._invalidated.add(key)

    def clear(self) -> None:
        """Forget every credential (tests; in a child process after ``fork()``)."""
        with self._lock:
            self._entries.clear()
            self._flights.clear()
            self._invalidated.clear()
            self.fetches = 0

    def _after_fork(self) -> None:
        # A parent thread may have held the lock or been fetching: neither exists here.
        self._lock = threading.Lock()
        self._entries = {}
        self._flights = {}
        self._invalidated = set()


#: The process's credential cache.
CREDENTIALS = CredentialCache()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=CREDENTIALS._after_fork)
