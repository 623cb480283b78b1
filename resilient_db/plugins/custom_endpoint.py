"""``custom_endpoint``: a connection made through an Aurora custom endpoint is served only by
the endpoint's members, also after a failover (``docs/plugins/custom_endpoint.md``).

An Aurora custom endpoint (``<name>.cluster-custom-<id>.<region>.rds.amazonaws.com``) stands
for a chosen subset of a cluster's instances: its ``StaticMembers``, or every instance except
its ``ExcludedMembers`` (both empty: every instance); type ``READER`` serves readers only,
``ANY`` any member. DNS only ever leads to a member, but failover connects to instances by
their own addresses, so without this plugin it would happily land on an instance the
application deliberately kept out (an analytics reader, a smaller instance class).

What it does:

- One :class:`CustomEndpointMonitor` per custom endpoint (host name, region), shared by every
  connection of the process: a daemon thread, started by the first connection, that reads the
  endpoint with RDS ``DescribeDBClusterEndpoints`` every ``custom_endpoint_info_refresh_rate_ms``
  and publishes the members (:class:`CustomEndpointInfo`). It stops with
  ``resilient_db.shutdown()``, and by itself once no open connection has used it for
  ``custom_endpoint_idle_monitor_expiration_ms``.
- Connect phase (the application's connections only): the monitor is found or started; with
  ``wait_for_custom_endpoint_info`` (default) the connect waits until the members are known,
  at most ``wait_for_custom_endpoint_info_timeout_ms``, then raises
  :class:`CustomEndpointInfoError` naming the endpoint and the monitor's last problem.
- Host-list phase (``hosts``): of the hosts offered, only members are kept; each one left out
  is named with the reason in ``HostsContext.excluded``. ``failover`` plans from this list, so
  a failover through a custom endpoint never lands on a non-member, and fails at once, saying
  why, when the cluster has no member to go to. Other plugins that choose instances (read/write
  splitting) read the same list.

Every decision is recorded: ``custom_endpoint.info_refreshed`` (each answer, ``changed`` when
the members differ from the last), ``custom_endpoint.fetch_failed``, ``custom_endpoint.waiting``
/ ``custom_endpoint.wait_timed_out``, ``custom_endpoint.hosts_excluded``,
``custom_endpoint.monitor_expired`` and, at shutdown, ``custom_endpoint.monitors_stopped``.

Dormant (costs nothing, not even on connect) unless the host is a custom endpoint name.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import _lifecycle
from .._decisions import Decision, get_decision_sink
from .._monitors import MonitorRegistry
from .._params import (
    CUSTOM_ENDPOINT_IDLE_EXPIRATION,
    CUSTOM_ENDPOINT_INFO_REFRESH,
    CUSTOM_ENDPOINT_REGION,
    WAIT_FOR_CUSTOM_ENDPOINT_INFO,
    WAIT_FOR_CUSTOM_ENDPOINT_INFO_TIMEOUT,
)
from .._pipeline import (
    ConnectContext,
    ConnectHandler,
    ConnectionChanged,
    HostsContext,
    HostsHandler,
    HostSpec,
    Plugin,
    PluginContext,
)
from ..errors import ConfigurationError, Error
from ..hosts import Role, TopologySnapshot, address_of
from ..rds import EndpointKind, classify, normalize_host

__all__ = [
    "CustomEndpointInfo",
    "CustomEndpointInfoError",
    "CustomEndpointMonitor",
    "CustomEndpointPlugin",
    "Describe",
    "monitors",
    "stop_all",
]

log = logging.getLogger("resilient_db.plugins.custom_endpoint")

CODE = "custom_endpoint"

#: ``describe(region, endpoint_id) -> DBClusterEndpoints`` (the list RDS answers with); raises
#: :class:`FetchError` with a readable problem. Replaced by tests that count or fake calls.
Describe = Callable[[str, str], Sequence[Mapping[str, Any]]]

#: botocore's defaults are 60 s to connect and 60 s to read, with retries: these bound one
#: ``DescribeDBClusterEndpoints`` to about 10 s, so that ``stop`` is never held up for minutes.
_CONNECT_TIMEOUT = 3.0
_READ_TIMEOUT = 5.0
_MAX_ATTEMPTS = 2
#: Longest pause before a monitor whose loop crashed runs again.
_MAX_BACKOFF = 5.0


class CustomEndpointInfoError(Error):
    """The custom endpoint's members are unknown after waiting
    ``wait_for_custom_endpoint_info_timeout_ms``: no such endpoint, access denied, or the
    RDS API did not answer. ``endpoint`` is the host name, ``problem`` the monitor's last
    problem (``None``: no answer yet)."""

    def __init__(self, message: str, *, endpoint: str, problem: str | None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.problem = problem


class FetchError(Exception):
    """Internal: one ``DescribeDBClusterEndpoints`` failed; the message says why."""


# --- what an endpoint is (pure) --------------------------------------------------------------


@dataclass(frozen=True)
class CustomEndpointInfo:
    """One custom endpoint as RDS describes it. ``role_type`` is ``CustomEndpointType``
    (``"READER"``, ``"ANY"``); ``static_members``/``excluded_members`` are instance ids (both
    empty: every instance of the cluster is a member)."""

    endpoint_id: str
    cluster_id: str
    endpoint: str
    role_type: str
    static_members: frozenset[str] = frozenset()
    excluded_members: frozenset[str] = frozenset()

    @classmethod
    def from_response(cls, item: Mapping[str, Any]) -> CustomEndpointInfo:
        """From one element of ``DescribeDBClusterEndpoints``' ``DBClusterEndpoints``."""
        return cls(
            str(item.get("DBClusterEndpointIdentifier") or ""),
            str(item.get("DBClusterIdentifier") or ""),
            str(item.get("Endpoint") or ""),
            str(item.get("CustomEndpointType") or "ANY").upper(),
            frozenset(map(str, item.get("StaticMembers") or ())),
            frozenset(map(str, item.get("ExcludedMembers") or ())),
        )

    def why_not(self, instance_id: str, role: Role) -> str | None:
        """Why instance ``instance_id`` (in ``role``) may not serve a connection through this
        endpoint; ``None`` when it may."""
        if self.static_members and instance_id not in self.static_members:
            return (f"{instance_id} is not a member of custom endpoint {self.endpoint_id} "
                    f"(static members: {', '.join(sorted(self.static_members))})")
        if instance_id in self.excluded_members:
            return f"{instance_id} is excluded from custom endpoint {self.endpoint_id}"
        if self.role_type == "READER" and role is Role.WRITER:
            return (f"{instance_id} is the writer and custom endpoint {self.endpoint_id} is "
                    "of type READER")
        return None

    def attributes(self) -> dict[str, Any]:
        return {"resilient_db.custom_endpoint.id": self.endpoint_id,
                "resilient_db.custom_endpoint.cluster": self.cluster_id,
                "resilient_db.custom_endpoint.type": self.role_type,
                "resilient_db.custom_endpoint.static_members": tuple(sorted(self.static_members)),
                "resilient_db.custom_endpoint.excluded_members":
                    tuple(sorted(self.excluded_members))}


def restrict(info: CustomEndpointInfo, endpoint_host: str, hosts: Sequence[HostSpec],
             topology: TopologySnapshot | None) -> tuple[tuple[HostSpec, ...], dict[str, str]]:
    """The ``hosts`` that may serve a connection through the endpoint, and why each other was
    left out (address -> reason). Pure. An instance is known by its topology row, else by its
    instance endpoint name; a host whose instance cannot be told is left out (it might be a
    non-member). The endpoint's own name always stays: DNS leads only to members."""
    kept: list[HostSpec] = []
    excluded: dict[str, str] = {}
    own = normalize_host(endpoint_host)
    for spec in hosts:
        if normalize_host(spec.host) == own:
            kept.append(spec)
            continue
        listed = topology.by_address(spec) if topology is not None else None
        instance_id = listed.instance_id if listed is not None else None
        instance_id = instance_id or classify(spec.host).instance_id
        role = listed.role if listed is not None else Role.UNKNOWN
        reason = (f"the instance behind {spec} is unknown, so its membership of custom "
                  f"endpoint {info.endpoint_id} cannot be told") if instance_id is None else (
            info.why_not(instance_id, role))
        if reason is None:
            kept.append(spec)
        else:
            excluded[address_of(spec.host, spec.port)] = reason
    return tuple(kept), excluded


# --- reading the endpoint (boto3) -------------------------------------------------------------

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _client(region: str) -> Any:
    """One RDS client per region, shared (clients are thread-safe; creating one is not, and
    costs tens of milliseconds). The API endpoint is boto3's: ``AWS_ENDPOINT_URL_RDS`` points
    it at a VPC endpoint or an emulator."""
    client = _clients.get(region)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(region)
        if client is None:
            import boto3

            config = importlib.import_module("botocore.config").Config(
                connect_timeout=_CONNECT_TIMEOUT, read_timeout=_READ_TIMEOUT,
                retries={"max_attempts": _MAX_ATTEMPTS, "mode": "standard"})
            # A session of its own: boto3's default session is not thread-safe.
            client = boto3.session.Session().client("rds", region_name=region, config=config)
            _clients[region] = client
    return client


def boto3_describe(region: str, endpoint_id: str) -> Sequence[Mapping[str, Any]]:
    """``DescribeDBClusterEndpoints`` for the custom endpoint ``endpoint_id`` in ``region``."""
    errors = importlib.import_module("botocore.exceptions")
    try:
        response = _client(region).describe_db_cluster_endpoints(
            DBClusterEndpointIdentifier=endpoint_id,
            Filters=[{"Name": "db-cluster-endpoint-type", "Values": ["custom"]}])
    except errors.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or type(exc).__name__
        message = str(error.get("Message", ""))[:200]
        hint = (": the AWS identity needs rds:DescribeDBClusterEndpoints"
                if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation")
                else "")
        raise FetchError(f"DescribeDBClusterEndpoints failed: {code}"
                         + (f" ({message})" if message else "") + hint) from None
    except errors.NoCredentialsError:
        raise FetchError("no AWS credentials found (environment, shared credentials file, "
                         "instance or container role)") from None
    except errors.BotoCoreError as exc:
        raise FetchError(f"the RDS API cannot be reached: {type(exc).__name__}: {exc}") from None
    endpoints: Sequence[Mapping[str, Any]] = response.get("DBClusterEndpoints", [])
    return endpoints


def forget_clients() -> None:
    """Drop the cached RDS clients (tests that change credentials or endpoints; after
    ``fork()``, where a client's connection pool is the parent's)."""
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()


# --- the monitor ------------------------------------------------------------------------------


class CustomEndpointMonitor:
    """The members of one custom endpoint, read every ``refresh`` seconds on a daemon thread
    and shared by every connection through it. Read :attr:`info` (``None``: not known yet)
    any time; :meth:`wait_for_info` waits for the first answer. ``idle_expiration``: seconds
    without any subscribed connection after which the thread stops by itself."""

    def __init__(self, key: tuple[str, str], endpoint_id: str, *, refresh: float,
                 idle_expiration: float, describe: Describe,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.key = key
        self.host, self.region = key
        self.endpoint_id = endpoint_id
        self.refresh = refresh
        self.idle_expiration = idle_expiration
        self._describe = describe
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._stopping = threading.Event()
        self._subscribers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._last_used = clock()
        self._thread: threading.Thread | None = None
        self._info: CustomEndpointInfo | None = None
        #: Why the last read gave no members (``None``: it did, or none was made yet).
        self.problem: str | None = None
        #: ``DescribeDBClusterEndpoints`` calls made so far, answered or not.
        self.fetches = 0
        #: Times the loop crashed and was run again (supervision metric).
        self.crashes = 0

    @property
    def info(self) -> CustomEndpointInfo | None:
        return self._info

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def subscribe(self, subscriber: object) -> None:
        """A connection uses this monitor (held weakly); starts the thread if needed."""
        with self._cond:
            self._subscribers.add(subscriber)
            self._last_used = self._clock()
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(
                    target=self._supervise, name=f"resilient_db-custom-endpoint[{self.host}]",
                    daemon=True)
                _lifecycle.register(CODE, stop_all)
                self._thread.start()

    def unsubscribe(self, subscriber: object) -> None:
        """A connection no longer uses this monitor (it was closed): the idle countdown
        starts when none is left."""
        with self._cond:
            self._subscribers.discard(subscriber)
            self._last_used = self._clock()

    def wait_for_info(self, timeout: float) -> CustomEndpointInfo | None:
        """The members, waiting up to ``timeout`` seconds for the first answer."""
        deadline = self._clock() + timeout
        with self._cond:
            while self._info is None and not self._stopping.is_set():
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._info

    def stop(self) -> None:
        """Stop the thread (bounded: nothing is joined; a call in flight ends by its own
        timeouts)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def abandon(self) -> None:
        """In a child process after ``fork()``: the thread does not exist here. Look stopped;
        the lock is replaced (a parent thread may have held it)."""
        self._cond = threading.Condition(threading.Lock())
        self._stopping = threading.Event()
        self._stopping.set()
        self._thread = None

    # --- the thread ------------------------------------------------------------------------
    def _supervise(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                self._run()
                return
            except Exception:  # the monitor never dies silently
                self.crashes += 1
                log.warning("custom endpoint monitor %s crashed (%d so far); running again in "
                            "%.1f s", self.host, self.crashes, backoff, exc_info=True)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._fetch()
            with self._cond:
                if self._expired():
                    self._stopping.set()
                    self._thread = None
                    self._cond.notify_all()
                    _forget(self)
                    get_decision_sink().record(Decision(
                        "custom_endpoint.monitor_expired", CODE,
                        {"server.address": self.host,
                         "resilient_db.custom_endpoint.idle": self.idle_expiration}))
                    log.debug("custom endpoint monitor %s: idle, stopped", self.host)
                    return
            self._stopping.wait(self.refresh)

    def _expired(self) -> bool:
        # Caller holds the lock.
        now = self._clock()
        if len(self._subscribers):
            self._last_used = now
            return False
        return now - self._last_used >= self.idle_expiration

    def _fetch(self) -> None:
        self.fetches += 1
        sink = get_decision_sink()
        try:
            endpoints = list(self._describe(self.region, self.endpoint_id))
            if len(endpoints) != 1:
                found = ", ".join(str(e.get("Endpoint", "?")) for e in endpoints) or "none"
                raise FetchError(
                    f"DescribeDBClusterEndpoints found {len(endpoints)} custom endpoints named "
                    f"{self.endpoint_id!r} in {self.region} (expected one; found: {found})")
            info = CustomEndpointInfo.from_response(endpoints[0])
        except FetchError as exc:
            problem = str(exc)
            if problem != self.problem:
                log.warning("custom endpoint %s: %s; %s", self.host, problem,
                            "keeping the members last read" if self._info is not None
                            else "its members are unknown")
            self.problem = problem
            sink.record(Decision("custom_endpoint.fetch_failed", CODE, {
                "server.address": self.host, "error.type": "FetchError",
                "resilient_db.custom_endpoint.problem": problem}))
            return
        with self._cond:
            changed = info != self._info
            self._info = info
            self.problem = None
            self._cond.notify_all()
        if changed:
            log.info("custom endpoint %s: type %s, static members [%s], excluded members [%s]",
                     self.host, info.role_type, ", ".join(sorted(info.static_members)),
                     ", ".join(sorted(info.excluded_members)))
        sink.record(Decision("custom_endpoint.info_refreshed", CODE, {
            "server.address": self.host, "resilient_db.custom_endpoint.changed": changed,
            **info.attributes()}))


# --- the registry -----------------------------------------------------------------------------

_registry: MonitorRegistry[CustomEndpointMonitor] = MonitorRegistry(
    "custom_endpoint.monitors_stopped", "resilient_db.custom_endpoint.monitors")


def _forget(monitor: CustomEndpointMonitor) -> None:
    with _registry.lock:
        _registry.discard_locked(monitor.key, monitor)


def monitors() -> list[CustomEndpointMonitor]:
    """Every custom endpoint monitor of the process (tests, diagnostics)."""
    return _registry.all()


def stop_all() -> None:
    """Stop every monitor (``resilient_db.shutdown``); connections that need one later start
    a new one."""
    _registry.stop_all()


def _after_fork() -> None:
    _registry.reset_in_child()
    forget_clients()


_lifecycle.on_fork_child(_after_fork)


# --- the plugin -------------------------------------------------------------------------------


class CustomEndpointPlugin(Plugin):
    """See the module docstring. ``info``: the members this connection last saw (kept when
    the monitor is restarted, so a failover is never unrestricted for want of a monitor)."""

    code = CODE
    #: Replaced by tests to count or fake ``DescribeDBClusterEndpoints`` calls.
    describe: ClassVar[Describe | None] = None

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        self.endpoint = classify(ctx.host.host)
        self.active = self.endpoint.kind is EndpointKind.CUSTOM
        self.refresh: float = settings[CUSTOM_ENDPOINT_INFO_REFRESH] or 30.0
        self.idle_expiration: float = settings[CUSTOM_ENDPOINT_IDLE_EXPIRATION] or 900.0
        self.wait = settings[WAIT_FOR_CUSTOM_ENDPOINT_INFO]
        self.wait_timeout: float = settings[WAIT_FOR_CUSTOM_ENDPOINT_INFO_TIMEOUT] or 5.0
        self.region = settings[CUSTOM_ENDPOINT_REGION] or self.endpoint.region
        self.info: CustomEndpointInfo | None = None
        self._monitor: CustomEndpointMonitor | None = None
        if not self.active:
            return
        if self.region is None:
            raise ConfigurationError(
                f"custom_endpoint: cannot tell the AWS region from the host {ctx.host.host!r}; "
                "set custom_endpoint_region, e.g. custom_endpoint_region='us-east-1'",
                parameter=CUSTOM_ENDPOINT_REGION.name, value=None)
        if type(self).describe is None:
            try:
                importlib.import_module("boto3")
            except ImportError:
                raise ConfigurationError(
                    "plugin 'custom_endpoint' needs boto3 to read the endpoint's members: "
                    "pip install 'resilient_db[aws]' (or boto3)",
                    parameter="plugins", value=CODE) from None

    def dormant(self) -> bool:
        return not self.active

    def monitor(self) -> CustomEndpointMonitor:
        """The endpoint's monitor, found or started, with this connection subscribed."""
        monitor = self._monitor
        if monitor is None or monitor.stopped:
            assert self.endpoint.name is not None and self.region is not None
            key = (self.endpoint.host, self.region)
            endpoint_id = self.endpoint.name
            describe = type(self).describe or boto3_describe
            refresh, idle = self.refresh, self.idle_expiration

            def create() -> CustomEndpointMonitor:
                return CustomEndpointMonitor(key, endpoint_id, refresh=refresh,
                                             idle_expiration=idle, describe=describe)

            monitor = self._monitor = _registry.get_or_create(key, create)
        monitor.subscribe(self)
        return monitor

    def _members(self, *, raise_on_timeout: bool) -> CustomEndpointInfo | None:
        """The members (the monitor's, else the last this connection saw); waited for when
        ``wait_for_custom_endpoint_info`` is on and none is known."""
        monitor = self.monitor()
        info = monitor.info or self.info
        if info is None and self.wait:
            attributes = {"server.address": self.endpoint.host,
                          "resilient_db.custom_endpoint.timeout": self.wait_timeout}
            self.ctx.decide("custom_endpoint.waiting", CODE, **attributes)
            started = time.monotonic()
            info = monitor.wait_for_info(self.wait_timeout)
            if info is None:
                problem = monitor.problem
                self.ctx.decide("custom_endpoint.wait_timed_out", CODE, **attributes,
                                **{"resilient_db.custom_endpoint.problem": problem or ""})
                message = (f"the members of custom endpoint {self.endpoint.host} are unknown "
                           f"after waiting {time.monotonic() - started:.1f} s "
                           f"(wait_for_custom_endpoint_info_timeout_ms): "
                           + (problem or "the RDS API has not answered yet"))
                if raise_on_timeout:
                    raise CustomEndpointInfoError(message, endpoint=self.endpoint.host,
                                                  problem=problem)
                log.warning("%s", message)
        if info is not None:
            self.info = info
        return info

    # --- connect phase -----------------------------------------------------------------------
    def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
        if ctx.initial and normalize_host(ctx.host.host) == self.endpoint.host:
            self._members(raise_on_timeout=True)
        return proceed(ctx)

    def on_connection_changed(self, event: ConnectionChanged) -> None:
        if event.reason == "close" and self._monitor is not None:
            self._monitor.unsubscribe(self)

    # --- host-list phase ---------------------------------------------------------------------
    def hosts(self, ctx: HostsContext, proceed: HostsHandler) -> tuple[HostSpec, ...]:
        offered = proceed(ctx)
        info = self._members(raise_on_timeout=False)
        if info is None:
            if not self.wait:
                return offered  # the user chose not to wait: unrestricted until known
            problem = self._monitor.problem if self._monitor is not None else None
            reason = (f"the members of custom endpoint {self.endpoint.host} are unknown "
                      f"({problem or 'no answer from the RDS API yet'})")
            own = [h for h in offered if normalize_host(h.host) == self.endpoint.host]
            excluded = {address_of(h.host, h.port): reason for h in offered if h not in own}
            kept: tuple[HostSpec, ...] = tuple(own)
        else:
            kept, excluded = restrict(info, self.endpoint.host, offered, ctx.topology)
        if excluded:
            ctx.excluded.update(excluded)
            self.ctx.decide("custom_endpoint.hosts_excluded", CODE, **{
                "server.address": self.endpoint.host,
                "resilient_db.custom_endpoint.allowed": tuple(str(h) for h in kept),
                "resilient_db.custom_endpoint.excluded": tuple(excluded),
                "resilient_db.custom_endpoint.reasons": tuple(excluded.values())})
        return kept
