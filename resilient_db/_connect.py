"""``resilient_db.connect``: parse, split, select plugins, build the pipeline, connect."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _conninfo, _lifecycle
from ._deadline import DeadlineStage
from ._params import (
    AURORA_MYSQL_LOOKALIKE_SCHEMA,
    AUTO_SORT_PLUGINS,
    CONNECT_TIMEOUT,
    ENABLE_TELEMETRY,
    WRAPPER_DIALECT,
    WRAPPER_DRIVER_DIALECT,
    readers_of,
)
from ._pipeline import (
    ConnectContext,
    ConnectionChanged,
    HostSpec,
    Pipeline,
    Plugin,
    PluginContext,
)
from ._plugin_registry import parse_codes, resolve
from ._properties import Property, Settings, lookup, unknown_name_error
from ._proxy import ConnectionProxy
from .drivers import driver_for
from .errors import ConfigurationError
from .watchdog import abort_after

if TYPE_CHECKING:
    from .drivers.base import DriverDialect

log = logging.getLogger("resilient_db.connect")

_UNSET: Any = object()
_noted_lock = threading.Lock()
_noted_inactive: set[str] = set()


def connect(
    target: Callable[..., Any],
    conninfo: str = "",
    *,
    plugins: str | Iterable[str | type[Plugin]] | None = _UNSET,
    **kwargs: Any,
) -> ConnectionProxy:
    """Open a connection through the driver's ``target`` connect callable, with plugins.

    ``target``: ``psycopg.Connection.connect`` or ``mysql.connector.connect``.
    ``conninfo``: a libpq-style ``key=value`` string or a ``postgresql://`` / ``mysql://``
    URI, in the driver's own key names; keyword arguments are merged over it (keywords win).
    Names in resilient_db's property registry are ours, names the driver accepts are the
    driver's (a few, like ``connect_timeout``, are both), anything else is an error.
    ``plugins``: comma-separated codes, or a list of codes and ``Plugin`` subclasses;
    omitted: the documented default list; ``""`` or ``[]``: none. Codes may also be given
    inside ``conninfo``.

    Returns a PEP 249 connection proxy. Driver exceptions (an unreachable host included)
    propagate unchanged.
    """
    return open_proxy(target, conninfo, plugins, kwargs)


def open_proxy(target: Callable[..., Any], conninfo: str, plugins: Any,
               kwargs: dict[str, Any],
               proxy_class: type[ConnectionProxy] | None = None) -> ConnectionProxy:
    """:func:`connect`'s body. ``proxy_class``: a subclass of the driver's connection proxy
    class to build instead of it (integrations whose framework checks or sets attributes a
    plain proxy does not have, e.g. psycopg_pool); ``None``: the driver's own."""
    forced_driver = None
    if "wrapper_driver_dialect" in kwargs:
        forced_driver = WRAPPER_DRIVER_DIALECT.parse(kwargs["wrapper_driver_dialect"])
    driver = driver_for(target, forced_driver)
    if proxy_class is not None and not issubclass(proxy_class, driver.connection_proxy):
        raise ConfigurationError(
            f"{proxy_class.__name__} is not a {driver.code} connection proxy class (a subclass "
            f"of {driver.connection_proxy.__name__}): it cannot wrap a {driver.code} connection",
            parameter="connection_class", value=proxy_class.__name__)

    prepared = prepare(driver, conninfo, plugins, kwargs)
    settings, driver_args = prepared.settings, prepared.driver_args
    classes = list(prepared.classes)
    host = prepared.host
    if settings[ENABLE_TELEMETRY]:  # outermost: its connect span covers every other plugin
        from .telemetry import _activate

        classes = [_activate(settings), *classes]

    ctx = PluginContext(settings, driver, host, plugins=frozenset(cls.code for cls in classes))
    # The statement-deadline stage: innermost, and dormant (absent from every chain) unless a
    # deadline can apply to this connection (socket_timeout set, or per-call timeouts in use).
    deadline = DeadlineStage(ctx, target, driver_args)
    pipeline = Pipeline([cls(ctx) for cls in classes], ctx, (deadline,))
    raw = pipeline.connect(ConnectContext(host, driver_args, settings, driver, target))

    forced_dialect: Any = settings[WRAPPER_DIALECT]
    lookalike = settings[AURORA_MYSQL_LOOKALIKE_SCHEMA]
    if lookalike is not None:
        from .dialects import aurora_mysql_lookalike

        if forced_dialect not in (None, "aurora-mysql"):
            raw.close()
            raise ConfigurationError(
                f"aurora_mysql_lookalike_schema is set, so the dialect is aurora-mysql; it "
                f"conflicts with wrapper_dialect={forced_dialect!r}",
                parameter="wrapper_dialect", value=forced_dialect)
        forced_dialect = aurora_mysql_lookalike(lookalike)
    if forced_dialect is not None:
        from .dialects import verify

        try:
            # Part of connecting, so bounded like the connect (connect_timeout): neither driver
            # bounds a read, and a server that stops answering after the handshake must not
            # hang connect() (its socket is broken: the driver's network error goes up).
            with abort_after(settings[CONNECT_TIMEOUT] or None, lambda: driver.abort(raw)):
                ctx.extra["dialect"] = verify(forced_dialect, driver, raw)
        except BaseException:
            raw.close()
            raise

    proxy = (proxy_class or driver.connection_proxy)(raw, driver, pipeline, host)
    pipeline.notify_connection_changed(ConnectionChanged(None, host, "connect"))
    return proxy


@dataclass(frozen=True)
class Prepared:
    """A connect call's input, validated and split (shared by ``connect`` and
    ``connect_async``): resilient_db's settings, the plugin classes in order, the driver's
    connect arguments (they hold the password: never logged) and the first host."""

    settings: Settings
    classes: tuple[type[Plugin], ...]
    driver_args: dict[str, Any] = field(repr=False)
    host: HostSpec


def prepare(driver: DriverDialect, conninfo: str, plugins: Any, kwargs: Mapping[str, Any],
            *, default: str | None = None) -> Prepared:
    """Parse ``conninfo`` and ``kwargs``, resolve ``plugins`` (``_UNSET`` and none named in
    ``conninfo``: ``default``, else the documented default list) and split the names
    between resilient_db and the driver. ``ConfigurationError`` before any I/O."""
    scheme = _conninfo.uri_scheme(conninfo) if isinstance(conninfo, str) else None
    if scheme is not None and scheme not in driver.uri_schemes:
        raise ConfigurationError(
            f"conninfo is a {scheme}:// URI but target is the {driver.code} driver, which takes "
            f"{' or '.join(s + '://' for s in driver.uri_schemes)} URIs",
            parameter="conninfo",
            value=scheme,
        )
    params: dict[str, Any] = dict(_conninfo.parse(conninfo, database_key=driver.database_key))
    params.update(kwargs)
    in_conninfo = params.pop("plugins", None)  # a conninfo string may name plugins too
    spec = in_conninfo if plugins is _UNSET else plugins
    if spec is None and plugins is _UNSET and default is not None:
        spec = default

    auto_sort = AUTO_SORT_PLUGINS.parse(params.get(AUTO_SORT_PLUGINS.name, True))
    classes = resolve(parse_codes(spec), auto_sort=auto_sort)
    extra: dict[str, Property[Any]] = {p.name: p for cls in classes for p in cls.properties}

    values: dict[Property[Any], Any] = {}
    driver_args: dict[str, Any] = {}
    accepted = driver.param_names()
    for name, value in params.items():
        prop = lookup(name, extra)
        if prop is not None:
            values[prop] = prop.parse(value)
            if prop.driver_param and name in accepted and value is not None:
                driver_args[name] = driver.coerce_arg(name, value)
        elif name in accepted:
            driver_args[name] = driver.coerce_arg(name, value)
        else:
            raise unknown_name_error(name, value, accepted, driver.code, extra, driver.renames)
    settings = Settings(values)
    _note_inactive(settings, {cls.code for cls in classes})

    hosts = driver.hosts_of(driver_args)
    _check_multi_host(hosts, classes, driver_args)
    return Prepared(settings, tuple(classes), driver_args, hosts[0])


def _check_multi_host(hosts: tuple[HostSpec, ...], classes: Iterable[type[Plugin]],
                      args: Mapping[str, Any]) -> None:
    """A libpq host list (``host=a,b``) is the driver's to try in order; with a cluster plugin
    it would hide which instance the connection reached, so it is refused, with the fix."""
    if len(hosts) < 2:
        return
    clashing = [cls.code for cls in classes if cls.single_host]
    if clashing:
        raise ConfigurationError(
            f"host {args.get('host')!r} lists {len(hosts)} hosts, but the plugins "
            f"{', '.join(clashing)} find the cluster's instances themselves and need the one "
            "address you connect through: give one host (the cluster endpoint, or any "
            "instance), or leave those plugins out (e.g. plugins=\"\") to let libpq try the "
            "hosts in order",
            parameter="host", value=args.get("host"))


def _note_inactive(settings: Settings, enabled: set[str]) -> None:
    """Log once (DEBUG) each property set for a built-in plugin that is not enabled."""
    for prop, _ in settings.items():
        if prop.plugin is None or not enabled.isdisjoint(readers_of(prop)):
            continue
        with _noted_lock:
            if prop.name in _noted_inactive:
                continue
            _noted_inactive.add(prop.name)
        log.debug("property %s has no effect: plugin %r is not enabled", prop.name, prop.plugin)


def _reset_in_child() -> None:
    global _noted_lock
    _noted_lock = threading.Lock()  # another thread may have held it at fork()


_lifecycle.on_fork_child(_reset_in_child)
