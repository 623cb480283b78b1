"""Driver dialects, one module per driver, imported only when that driver is used."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..errors import ConfigurationError
from .base import DriverDialect, TxStatus

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


def _owner_module(target: Any) -> str:
    owner = getattr(target, "__self__", None)
    if inspect.isclass(owner):
        return owner.__module__
    if inspect.isclass(target):
        return target.__module__
    return str(getattr(target, "__module__", "") or "")


def driver_for(target: Any, forced: str | None) -> DriverDialect:
    """Recognise the driver from ``target`` (its connect callable), or use ``forced``."""
    usage = (
        "pass the driver's connect callable, e.g. psycopg.Connection.connect or "
        "mysql.connector.connect"
    )
    if not callable(target):
        raise ConfigurationError(
            f"target must be a connect callable; got {target!r} ({type(target).__name__}): "
            f"{usage}",
            parameter="target",
            value=target,
        )
    if forced is not None:
        return get_driver(forced)
    module = _owner_module(target)
    owner = getattr(target, "__self__", target)
    if module.startswith("psycopg"):
        if inspect.isclass(owner) and "Async" in owner.__name__:
            raise ConfigurationError(
                f"target {owner.__name__}.connect is asyncio-based, which resilient_db does not "
                "support yet; use psycopg.Connection.connect",
                parameter="target",
                value=target,
            )
        return get_driver("psycopg")
    if module.startswith("mysql.connector"):
        if module.startswith("mysql.connector.aio"):
            raise ConfigurationError(
                "target is mysql.connector.aio, which resilient_db does not support yet; use "
                "mysql.connector.connect",
                parameter="target",
                value=target,
            )
        return get_driver("mysql-connector")
    raise ConfigurationError(
        f"target {getattr(target, '__qualname__', target)!r} (module {module or '?'}) is not a "
        f"supported driver's connect callable: {usage}. If it wraps one, set "
        "wrapper_driver_dialect='psycopg' or 'mysql-connector'",
        parameter="target",
        value=target,
    )
