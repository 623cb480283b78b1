"""Unit tests of the interceptor pipeline and plugin selection (no server)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resilient_db import (
    Call,
    ConfigurationError,
    ConnectContext,
    ConnectionChanged,
    HostsContext,
    HostSpec,
    Op,
    Plugin,
    PluginContext,
)
from resilient_db import _plugin_registry as registry
from resilient_db._pipeline import ConnectHandler, Handler, HostsHandler, Pipeline
from resilient_db._properties import Settings

pytestmark = pytest.mark.unit


class FakeDriver:
    """Just enough driver for the connect terminal."""

    default_port = 5432

    def connect(self, target: Any, args: dict[str, Any], settings: Any = None) -> Any:
        return target(**args)


def _ctx() -> PluginContext:
    return PluginContext(Settings({}), FakeDriver(), HostSpec("h", 1))  # type: ignore[arg-type]


def _recording(name: str, log: list[str], ops: frozenset[Op]) -> type[Plugin]:
    class Recording(Plugin):
        code = name
        intercepts = ops

        def execute(self, call: Call, proceed: Handler) -> Any:
            log.append(f"{name}>")
            try:
                return proceed(call)
            finally:
                log.append(f"<{name}")

        def connect(self, ctx: ConnectContext, proceed: ConnectHandler) -> Any:
            log.append(f"connect {name}")
            return proceed(ctx)

        def hosts(self, ctx: HostsContext, proceed: HostsHandler) -> tuple[HostSpec, ...]:
            return (*proceed(ctx), HostSpec(name))

        def on_connection_changed(self, event: ConnectionChanged) -> None:
            log.append(f"changed {name} {event.reason}")

    return Recording


def _call(op: Op, fn: Any = lambda: "result") -> Call:
    return Call(op, "Test.method", fn, (), {}, None)


def test_chain_order_outermost_first_and_result_passes_through() -> None:
    log: list[str] = []
    ctx = _ctx()
    a = _recording("a", log, frozenset({Op.EXECUTE}))(ctx)
    b = _recording("b", log, frozenset({Op.EXECUTE}))(ctx)
    pipeline = Pipeline([a, b], ctx)
    chain = pipeline.chains.execute
    assert chain is not None
    assert chain(_call(Op.EXECUTE)) == "result"
    assert log == ["a>", "b>", "<b", "<a"]


def test_unsubscribed_op_has_no_chain() -> None:
    ctx = _ctx()
    plugin = _recording("a", [], frozenset({Op.EXECUTE}))(ctx)
    chains = Pipeline([plugin], ctx).chains
    assert chains.fetch is None
    assert chains.commit is None
    assert chains.execute is not None


def test_ops_with_the_same_plugins_share_one_chain() -> None:
    ctx = _ctx()
    plugin = _recording("a", [], frozenset({Op.EXECUTE, Op.COMMIT}))(ctx)
    chains = Pipeline([plugin], ctx).chains
    assert chains.execute is chains.commit


def test_intercepts_without_execute_override_builds_nothing() -> None:
    class Lazy(Plugin):
        code = "lazy"
        intercepts = frozenset({Op.EXECUTE})

    ctx = _ctx()
    assert Pipeline([Lazy(ctx)], ctx).chains.execute is None


def test_plugin_may_replace_the_call_target() -> None:
    class Redirect(Plugin):
        code = "redirect"
        intercepts = frozenset({Op.EXECUTE})

        def execute(self, call: Call, proceed: Handler) -> Any:
            return proceed(call.replace(fn=lambda: "redirected"))

    ctx = _ctx()
    chain = Pipeline([Redirect(ctx)], ctx).chains.execute
    assert chain is not None
    assert chain(_call(Op.EXECUTE)) == "redirected"


def test_connect_hosts_and_notification_phases() -> None:
    log: list[str] = []
    ctx = _ctx()
    plugins = [_recording(n, log, frozenset())(ctx) for n in ("a", "b")]
    pipeline = Pipeline(plugins, ctx)
    raw = pipeline.connect(
        ConnectContext(HostSpec("h"), {"x": 1}, ctx.settings, ctx.driver, lambda x: ("raw", x))
    )
    assert raw == ("raw", 1)
    assert log == ["connect a", "connect b"]
    hosts = pipeline.hosts(HostsContext((HostSpec("h"),), ctx.settings))
    assert [h.host for h in hosts] == ["h", "b", "a"]
    pipeline.notify_connection_changed(ConnectionChanged(None, HostSpec("h"), "connect"))
    assert log[-2:] == ["changed a connect", "changed b connect"]


def test_no_plugins_no_chains() -> None:
    ctx = _ctx()
    pipeline = Pipeline([], ctx)
    assert all(pipeline.chains.for_op(op) is None for op in Op)
    assert pipeline.listeners == ()


# --- plugin selection --------------------------------------------------------------------


def test_parse_codes_forms() -> None:
    assert registry.parse_codes(None) == list(registry.DEFAULT_PLUGINS)
    assert registry.parse_codes("") == []
    assert registry.parse_codes([]) == []
    assert registry.parse_codes(" dev , execute_time,dev") == ["dev", "execute_time"]
    assert registry.parse_codes(("dev",)) == ["dev"]


def test_parse_codes_rejects_wrong_types() -> None:
    with pytest.raises(ConfigurationError, match="plugins"):
        registry.parse_codes(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="must be a plugin code"):
        registry.parse_codes(["dev", 3])  # type: ignore[list-item]


def test_canonical_order_and_user_order() -> None:
    sorted_codes = [c.code for c in registry.resolve(["dev", "connect_time", "execute_time"])]
    assert sorted_codes == ["execute_time", "connect_time", "dev"]
    kept = [c.code for c in registry.resolve(["dev", "connect_time"], auto_sort=False)]
    assert kept == ["dev", "connect_time"]


def test_canonical_order_covers_every_builtin_and_alias_target() -> None:
    for code in [*registry.BUILTIN, *registry.PLANNED, *registry.ALIASES.values()]:
        assert code in registry.CANONICAL_ORDER, code


def test_unknown_plugin_suggests() -> None:
    with pytest.raises(ConfigurationError) as info:
        registry.resolve(["exectue_time"])
    assert "unknown plugin 'exectue_time'" in str(info.value)
    assert "did you mean 'execute_time'" in str(info.value)
    assert info.value.parameter == "plugins"


def test_planned_aws_plugin_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every AWS 3.1 plugin code is available today (PLANNED is empty); a code a later AWS
    # release adds goes to PLANNED first, and must then be this error, not a typo hint.
    code = "future_aws_plugin"
    monkeypatch.setitem(registry.PLANNED, code, "a plugin of a later AWS release")
    with pytest.raises(ConfigurationError) as info:
        registry.resolve([code])
    message = str(info.value)
    assert f"plugin {code!r}: known AWS plugin" in message
    assert "not available in this release" in message
    assert info.value.parameter == "plugins"


def test_srw_is_not_read_write_splitting() -> None:
    # AWS's srw splits by the endpoints the user names, read_write_splitting by topology:
    # two plugins, so srw must not stand in for the other.
    assert "srw" not in registry.ALIASES
    srw, = registry.resolve(["srw"])
    rws, = registry.resolve(["read_write_splitting"])
    assert (srw.code, rws.code) == ("srw", "read_write_splitting") and srw is not rws


def test_every_aws_plugin_code_is_known() -> None:
    aws = pytest.importorskip("aws_advanced_python_wrapper.plugin_service")
    for code in aws.PluginManager.PLUGIN_FACTORIES:
        assert code in registry.BUILTIN or code in registry.ALIASES or code in registry.PLANNED, \
            code


def test_default_plugins_are_the_aws_default_set() -> None:
    properties = pytest.importorskip("aws_advanced_python_wrapper.utils.properties")
    aws = properties.WrapperProperties.DEFAULT_PLUGINS.split(",")
    assert [registry.ALIASES.get(c, c) for c in aws] == list(registry.DEFAULT_PLUGINS)


@pytest.fixture
def third_party_plugin(tmp_path: Path) -> Iterator[str]:
    """A real installed distribution (dist-info on sys.path) exposing an entry point."""
    pkg = tmp_path / "rdb_thirdparty_demo.py"
    pkg.write_text(textwrap.dedent('''
        from resilient_db import Plugin, Op
        class AuditPlugin(Plugin):
            intercepts = frozenset({Op.EXECUTE})
            def execute(self, call, proceed):
                return ("audited", proceed(call))
        class NotAPlugin:
            pass
    '''))
    dist = tmp_path / "rdb_thirdparty_demo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rdb-thirdparty-demo\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[resilient_db.plugins]\naudit = rdb_thirdparty_demo:AuditPlugin\n"
        "broken = rdb_thirdparty_demo:NotAPlugin\n"
    )
    sys.path.insert(0, str(tmp_path))
    registry.refresh_entry_points()
    try:
        yield "audit"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("rdb_thirdparty_demo", None)
        registry.refresh_entry_points()


def test_third_party_plugin_via_entry_point(third_party_plugin: str) -> None:
    [cls] = registry.resolve([third_party_plugin])
    assert cls.code == "audit"
    assert "audit" in registry.available()
    ordered = [c.code for c in registry.resolve(["dev", "audit", "execute_time"])]
    assert ordered == ["execute_time", "audit", "dev"]
    ctx = _ctx()
    chain = Pipeline([cls(ctx)], ctx).chains.execute
    assert chain is not None
    assert chain(_call(Op.EXECUTE)) == ("audited", "result")


def test_entry_point_that_is_not_a_plugin(third_party_plugin: str) -> None:
    with pytest.raises(ConfigurationError, match="not a resilient_db Plugin subclass"):
        registry.resolve(["broken"])


def test_connect_context_repr_never_shows_the_password() -> None:
    # Plugins log and chain what they see; the driver arguments and a partial target carry
    # the password.
    import functools

    from resilient_db._pipeline import ConnectContext, HostSpec
    from resilient_db.drivers import get_driver

    target = functools.partial(print, password="hunter2xyz")
    ctx = ConnectContext(HostSpec("db", 5432), {"host": "db", "password": "hunter2xyz"},
                         Settings({}), get_driver("psycopg"), target)
    assert "hunter2xyz" not in repr(ctx)
    assert "db" in repr(ctx)
