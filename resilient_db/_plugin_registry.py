"""Plugin selection: codes, AWS aliases, the canonical order and third-party entry points.

Built-in plugins are found by code without importing any plugin module until it is selected
(the core never imports every plugin). Third-party plugins register a ``Plugin`` subclass in
the entry-point group ``resilient_db.plugins``; the entry point's name is the code.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ._pipeline import Plugin
from .errors import ConfigurationError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

log = logging.getLogger("resilient_db.plugins")

ENTRY_POINT_GROUP = "resilient_db.plugins"

#: Built-in plugins: code -> "module:Class". Only those that exist in this release.
BUILTIN: dict[str, str] = {
    "connect_time": "resilient_db.plugins.connect_time:ConnectTimePlugin",
    "execute_time": "resilient_db.plugins.execute_time:ExecuteTimePlugin",
    "dev": "resilient_db.plugins.dev:DevPlugin",
    "failover": "resilient_db.plugins.failover:FailoverPlugin",
    "aurora_connection_tracker":
        "resilient_db.plugins.aurora_connection_tracker:ConnectionTrackerPlugin",
    "initial_connection": "resilient_db.plugins.initial_connection:InitialConnectionPlugin",
    "stale_dns": "resilient_db.plugins.stale_dns:StaleDnsPlugin",
    "efm": "resilient_db.plugins.efm:EfmPlugin",
    "aws_secrets_manager":
        "resilient_db.plugins.aws_secrets_manager:AwsSecretsManagerPlugin",
    "iam": "resilient_db.plugins.iam:IamPlugin",
    "federated_auth": "resilient_db.plugins.federated_auth:FederatedAuthPlugin",
    "okta": "resilient_db.plugins.okta:OktaPlugin",
    "fastest_response_strategy":
        "resilient_db.plugins.fastest_response_strategy:FastestResponseStrategyPlugin",
    "custom_endpoint": "resilient_db.plugins.custom_endpoint:CustomEndpointPlugin",
    "read_write_splitting":
        "resilient_db.plugins.read_write_splitting:ReadWriteSplittingPlugin",
    "srw": "resilient_db.plugins.srw:SimpleReadWriteSplittingPlugin",
    "blue_green": "resilient_db.plugins.blue_green:BlueGreenPlugin",
    "limitless": "resilient_db.plugins.limitless:LimitlessPlugin",
    "gdb_failover": "resilient_db.plugins.gdb_failover:GdbFailoverPlugin",
    "gdb_rw": "resilient_db.plugins.gdb_rw:GdbReadWriteSplittingPlugin",
}

#: AWS Advanced Python Wrapper plugin codes (its ``PluginManager.PLUGIN_FACTORIES``) with no
#: resilient_db plugin yet, and what each does: selecting one gives a clear "known AWS plugin,
#: not available in this release" error, not a typo suggestion. Empty: every plugin code of
#: AWS Advanced Python Wrapper 3.1 is available (``tests/test_pipeline.py`` checks this).
PLANNED: dict[str, str] = {}

#: AWS Advanced Python Wrapper codes accepted as aliases (documented in docs/plugins.md). AWS's
#: ``srw`` is *not* an alias of ``read_write_splitting``: it is a separate plugin that splits
#: by endpoint, not by topology.
ALIASES: dict[str, str] = {
    "failover_v2": "failover",
    "host_monitoring": "efm",
    "host_monitoring_v2": "efm",
    "bg": "blue_green",
}

#: The canonical order, outermost first. Each position has a reason:
CANONICAL_ORDER: tuple[str, ...] = (
    # Timing sees what the application sees: the whole call, failover and retries included.
    "execute_time",
    "connect_time",
    # Endpoint-level routing decides *which* cluster members are eligible before anything
    # connects.
    "custom_endpoint",
    # Initial connection verifies the role behind a cluster/reader endpoint on first connect.
    "initial_connection",
    # The tracker must see every connection failover or splitting opens, so it wraps them.
    "aurora_connection_tracker",
    # Stale DNS corrects a stale cluster endpoint before failover relies on the address.
    "stale_dns",
    # Blue/green reroutes at switchover; it must run before failover reacts to the
    # switchover's expected disconnects.
    "blue_green",
    # Splitting chooses reader vs writer; failover then keeps that choice alive. The three
    # splitting plugins exclude one another (gdb_rw is read_write_splitting with a home region).
    "read_write_splitting",
    "srw",
    "gdb_rw",
    "fastest_response_strategy",
    # Limitless chooses the transaction router of every physical connection by load (a
    # routing decision, like splitting's) and moves a connection whose router failed to
    # another router: outside failover, which leaves router failures to it, and outside efm
    # and the credentials plugins, so that each router connection is monitored and gets its
    # credentials.
    "limitless",
    # Failover reacts to errors raised by everything inside it, including EFM aborts.
    # gdb_failover is failover with home-region modes: the same place (the two exclude one
    # another).
    "failover",
    "gdb_failover",
    # EFM is inside failover: its abort surfaces as a network error that failover handles.
    "efm",
    # Credentials are innermost among the real plugins: every physical connect (initial,
    # pool growth, reconnect, failover) gets fresh or cached credentials.
    "iam",
    "aws_secrets_manager",
    "federated_auth",
    "okta",
    # Dev is innermost: an injected fault looks like a driver error to every other plugin.
    "dev",
)

#: Used when ``plugins`` is omitted. The AWS Advanced Python Wrapper 3.x's default is
#: ``initial_connection,aurora_connection_tracker,failover_v2,host_monitoring_v2`` (without
#: ``host_monitoring_v2`` for mysql-connector, which it cannot monitor); ours is the same set,
#: for both drivers (efm monitors MySQL too). ``initial_connection`` earns its place: through a
#: cluster or reader endpoint whose DNS is stale after a failover, a new connection would land
#: on the demoted writer and fail its first write; it costs one role check (two short
#: statements) per connect through such an endpoint and nothing elsewhere (dormant). On a
#: server without topology (plain PostgreSQL/MySQL) failover reconnects to the same endpoint
#: and efm still detects a dead host.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "initial_connection", "aurora_connection_tracker", "failover", "efm")

_entry_points: dict[str, EntryPoint] | None = None


def _third_party() -> dict[str, EntryPoint]:
    global _entry_points
    if _entry_points is None:
        from importlib import metadata  # not at import: it costs milliseconds

        _entry_points = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return _entry_points


def refresh_entry_points() -> None:
    """Forget the cached entry points (after installing a plugin at run time; tests)."""
    global _entry_points
    _entry_points = None


PluginSpec = str | type[Plugin]


def parse_codes(spec: str | Iterable[PluginSpec] | None) -> list[PluginSpec]:
    """Split a ``plugins`` value ("a,b", or a sequence of codes and ``Plugin`` subclasses)
    into items. ``None``: the default list."""
    if spec is None:
        return list(DEFAULT_PLUGINS)
    items: list[PluginSpec]
    if isinstance(spec, str):
        items = list(spec.split(","))
    elif isinstance(spec, (Mapping, bytes, bytearray)):
        # A mapping would read {"failover": False} as "enable failover"; bytes as integers.
        raise ConfigurationError(
            f"plugins must be a comma-separated string or a list of codes, not "
            f"{type(spec).__name__}: e.g. plugins=\"failover,efm\" or [\"failover\", \"efm\"]",
            parameter="plugins",
            value=spec,
        )
    else:
        try:
            items = list(spec)
        except TypeError:
            raise ConfigurationError(
                f"plugins must be a comma-separated string or a list of codes, not "
                f"{type(spec).__name__}",
                parameter="plugins",
                value=spec,
            ) from None
    codes: list[PluginSpec] = []
    for item in items:
        if isinstance(item, type) and issubclass(item, Plugin):
            if not item.code:
                raise ConfigurationError(
                    f"plugins: {item.__qualname__} has no code; set the class attribute "
                    "`code`",
                    parameter="plugins",
                    value=item,
                )
            if item not in codes:
                codes.append(item)
            continue
        if not isinstance(item, str):
            raise ConfigurationError(
                f"plugins: every item must be a plugin code (string) or a Plugin subclass, "
                f"got {item!r}",
                parameter="plugins",
                value=spec,
            )
        code = item.strip()
        if code and code not in codes:
            codes.append(code)
    return codes


def resolve(codes: Iterable[PluginSpec], *, auto_sort: bool = True) -> list[type[Plugin]]:
    """Plugin classes for ``codes`` (aliases mapped; classes taken as they are), in canonical
    order unless ``auto_sort`` is false (then the given order is kept)."""
    classes: list[type[Plugin]] = []
    for item in codes:
        cls = item if isinstance(item, type) else _load(ALIASES.get(item, item), item)
        if cls not in classes:
            classes.append(cls)
    if auto_sort:
        position = {code: i for i, code in enumerate(CANONICAL_ORDER)}
        # Third-party plugins without a place go just before "dev", keeping their relative
        # order (a stable sort).
        default_slot = position["dev"] - 0.5
        classes.sort(key=lambda cls: position.get(cls.code, default_slot))
    return classes


def _load(code: str, typed: str) -> type[Plugin]:
    """The plugin class of ``code`` (``typed``: what the user wrote, before alias mapping)."""
    target = BUILTIN.get(code)
    if target is not None:
        module_name, class_name = target.split(":")
        cls: type[Plugin] = getattr(importlib.import_module(module_name), class_name)
        return cls
    entry = _third_party().get(code)
    if entry is not None:
        loaded = entry.load()
        if not (isinstance(loaded, type) and issubclass(loaded, Plugin)):
            raise ConfigurationError(
                f"plugin {code!r}: entry point {entry.value!r} is not a resilient_db Plugin "
                "subclass",
                parameter="plugins",
                value=code,
            )
        if not loaded.code:
            loaded.code = code
        return loaded
    if code in PLANNED:
        raise ConfigurationError(
            f"plugin {typed!r}: known AWS plugin ({PLANNED[code]}), not available in this "
            f"release of resilient_db; available: {', '.join(sorted(available()))}",
            parameter="plugins",
            value=code,
        )
    candidates = sorted(set(available()) | set(PLANNED) | set(ALIASES))
    close = difflib.get_close_matches(code, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigurationError(
        f"unknown plugin {code!r}{hint} Available: {', '.join(sorted(available()))} "
        f"(third-party plugins register in the entry-point group {ENTRY_POINT_GROUP!r})",
        parameter="plugins",
        value=code,
    )


def available() -> list[str]:
    """Codes that can be selected now: built-ins and installed third-party plugins."""
    return sorted(set(BUILTIN) | set(_third_party()))
