"""Driver dialects, one module per driver, imported only when that driver is used."""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from ..errors import ConfigurationError
from .base import DriverDialect, TxStatus, describe_target

__all__ = ["DriverDialect", "TxStatus", "driver_for", "get_driver"]

_MODULES = {
    "psycopg": ("resilient_db.drivers.psycopg", "PsycopgDriver"),
    "mysql-connector": ("resilient_db.drivers.mysql_connector", "MysqlConnectorDriver"),
}
_instances: dict[str, DriverDialect] = {}


def get_driver(code: str) -> DriverDialect:
    """The (shared, stateless) driver dialect for ``code``."""
    driver = _instances.get(code)
    if driver is None:
        module_name, class_name = _MODULES[code]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            extra = "psycopg" if code == "psycopg" else "mysql"
            raise ConfigurationError(
                f"the {code} driver is not installed ({exc}); install it with "
                f"pip install 'resilient_db[{extra}]'",
                parameter="target",
            ) from exc
        driver = _instances[code] = getattr(module, class_name)()
    return driver


def _unwrap(target: Any) -> Any:
    """The callable inside ``functools.partial`` layers (the driver is recognised from it)."""
    while isinstance(target, functools.partial):
        target = target.func
    return target


def _classes(target: Any) -> tuple[type, ...]:
    """The class ``target`` belongs to (``Connection.connect``) or is, with its bases: a
    subclass of ``psycopg.Connection`` defined by the application is still psycopg."""
    owner = getattr(target, "__self__", target)
    return owner.__mro__ if inspect.isclass(owner) else ()


def _modules(target: Any) -> list[str]:
    classes = _classes(target)
    if classes:
        return [cls.__module__ for cls in classes]
    return [str(getattr(target, "__module__", "") or "")]


def _is_module(module: str, package: str) -> bool:
    """``module`` is ``package`` or inside it (``psycopg2`` is not ``psycopg``)."""
    return module == package or module.startswith(package + ".")


def driver_for(target: Any, forced: str | None) -> DriverDialect:
    """Recognise the driver from ``target`` (its connect callable), or use ``forced``."""
    usage = (
        "pass the driver's connect callable, e.g. psycopg.Connection.connect or "
        "mysql.connector.connect"
    )
    if not callable(target):
        raise ConfigurationError(
            # Not the value itself: a conninfo string passed first by mistake has a password.
            f"target must be a connect callable, not {type(target).__name__}: {usage} (it "
            "comes first: resilient_db.connect(target, conninfo, **kwargs))",
            parameter="target",
            value=describe_target(target),
        )
    inner = _unwrap(target)
    modules = _modules(inner)
    psycopg_target = any(_is_module(m, "psycopg") for m in modules)
    is_async = any(cls.__name__.startswith("Async") for cls in _classes(inner))
    if inspect.isclass(inner) and psycopg_target:
        # Calling psycopg.Connection(...) wants a PGconn, not connect arguments.
        hint = ("psycopg.Connection.connect" if is_async or not hasattr(inner, "connect")
                else f"{inner.__module__}.{inner.__qualname__}.connect")
        raise ConfigurationError(
            f"target is the class {inner.__module__}.{inner.__qualname__}, not a connect "
            f"callable: pass {hint} (the connect method, not the class)",
            parameter="target",
            value=describe_target(target),
        )
    if forced is not None:
        return get_driver(forced)
    if psycopg_target:
        if is_async:
            raise ConfigurationError(
                f"target {inner.__qualname__} is asyncio-based: use "
                "await resilient_db.connect_async(psycopg.AsyncConnection.connect, ...), or "
                "psycopg.Connection.connect with resilient_db.connect",
                parameter="target",
                value=describe_target(target),
            )
        return get_driver("psycopg")
    if any(_is_module(m, "mysql.connector") for m in modules):
        if any(_is_module(m, "mysql.connector.aio") for m in modules):
            raise ConfigurationError(
                "target is mysql.connector.aio, which is asyncio-based: use "
                "await resilient_db.connect_async(mysql.connector.aio.connect, ...), or "
                "mysql.connector.connect with resilient_db.connect",
                parameter="target",
                value=describe_target(target),
            )
        return get_driver("mysql-connector")
    module = modules[0]
    raise ConfigurationError(
        f"target {describe_target(target)} (module {module or '?'}) is not a "
        f"supported driver's connect callable: {usage}. If it wraps one, set "
        "wrapper_driver_dialect='psycopg' or 'mysql-connector'",
        parameter="target",
        value=describe_target(target),
    )
