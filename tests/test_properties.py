"""Unit tests of the typed property registry (resilient_db._properties, _params)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from resilient_db import ConfigurationError, _docs, _params
from resilient_db._aws_properties import AWS_UNSUPPORTED
from resilient_db._properties import REGISTRY, Settings, duration, parse_bool, unknown_name_error

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(True, True), ("true", True), ("ON", True), (" yes ", True), (1, True), ("0", False),
     ("off", False), (False, False)],
)
def test_bool_coercion(raw: object, expected: bool) -> None:
    assert _params.AUTO_SORT_PLUGINS.parse(raw) is expected


@pytest.mark.parametrize("raw", ["maybe", 2, 1.5, None, [True]])
def test_bool_rejects_with_property_name(raw: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        _params.AUTO_SORT_PLUGINS.parse(raw)
    assert info.value.parameter == "auto_sort_wrapper_plugin_order"
    assert "auto_sort_wrapper_plugin_order" in str(info.value)
    assert repr(raw) in str(info.value)


def test_parse_bool_returns_none_for_non_booleans() -> None:
    assert parse_bool("nope") is None
    assert parse_bool(3) is None


def test_duration_seconds_and_strings() -> None:
    prop = _params.CONNECT_TIMEOUT
    assert prop.parse(5) == 5.0
    assert prop.parse("2.5") == 2.5
    assert prop.parse(None) is None
    assert prop.parse("") is None


def test_duration_in_milliseconds_is_stored_in_seconds() -> None:
    prop = duration("test_only_interval_ms", 1.5, "test", unit="ms")
    try:
        assert prop.parse(250) == pytest.approx(0.25)
        assert prop.parse("1000") == pytest.approx(1.0)
        assert prop.default_text() == "1500"
    finally:
        del REGISTRY["test_only_interval_ms"]


@pytest.mark.parametrize("raw", [-1, "-0.5", "soon", math.nan, math.inf, True, [1]])
def test_duration_rejects_bad_values(raw: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        _params.CONNECT_TIMEOUT.parse(raw)
    assert "connect_timeout" in str(info.value)


def test_duration_allow_zero_false() -> None:
    with pytest.raises(ConfigurationError, match="more than 0"):
        _params.EXECUTE_TIME_SLOW_THRESHOLD.parse(0)


def test_choice_normalises_case_and_underscores() -> None:
    assert _params.WRAPPER_DIALECT.parse("AURORA_PG") == "aurora-pg"
    assert _params.WRAPPER_DRIVER_DIALECT.parse("mysql_connector") == "mysql-connector"


def test_driver_dialect_accepts_aws_values() -> None:
    prop = _params.WRAPPER_DRIVER_DIALECT
    assert prop.parse("mysql-connector-python") == "mysql-connector"
    assert prop.parse("mysql_connector_python") == "mysql-connector"
    assert prop.parse("mysql-connector") == "mysql-connector"
    assert prop.parse("psycopg") == "psycopg"
    with pytest.raises(ConfigurationError, match="wrapper_driver_dialect"):
        prop.parse("generic")


def test_weight_pairs_parse_like_the_aws_wrapper() -> None:
    prop = _params.WEIGHTED_RANDOM_HOST_WEIGHT_PAIRS
    assert prop.parse("Instance-1:3, instance-2.abc.rds.amazonaws.com:1,") == (
        ("instance-1", 3), ("instance-2.abc.rds.amazonaws.com", 1))
    assert prop.parse({"instance-1": 2}) == (("instance-1", 2),)
    assert prop.parse("") == ()
    for bad in ("instance-1", "instance-1:0", "instance-1:x", "instance-1:1.5", ":3",
                "a:1,A:2", "a b:1"):
        with pytest.raises(ConfigurationError, match="weighted_random_host_weight_pairs") as info:
            prop.parse(bad)
        assert "'<host>:<weight>'" in str(info.value)
    with pytest.raises(ConfigurationError, match="round_robin_default_weight"):
        _params.ROUND_ROBIN_DEFAULT_WEIGHT.parse(0)


def test_choice_suggests_close_match() -> None:
    with pytest.raises(ConfigurationError) as info:
        _params.WRAPPER_DIALECT.parse("aurora-pq")
    message = str(info.value)
    assert "wrapper_dialect" in message
    assert "did you mean 'aurora-pg'" in message


@pytest.mark.parametrize(
    "pattern", ["no-question-mark.example.com", "??.x.com", "?.x.com:abc", "? .x.com"]
)
def test_host_pattern_validation(pattern: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        _params.CLUSTER_INSTANCE_HOST_PATTERN.parse(pattern)
    assert "cluster_instance_host_pattern" in str(info.value)


def test_host_pattern_accepts_port() -> None:
    value = "?.abc.us-east-1.rds.amazonaws.com:5432"
    assert _params.CLUSTER_INSTANCE_HOST_PATTERN.parse(value) == value


def test_text_rejects_non_string() -> None:
    with pytest.raises(ConfigurationError, match="a string, not int"):
        _params.CLUSTER_ID.parse(42)


def test_settings_default_and_explicit() -> None:
    settings = Settings({_params.CONNECT_TIMEOUT: 3.0})
    assert settings[_params.CONNECT_TIMEOUT] == 3.0
    assert settings[_params.AUTO_SORT_PLUGINS] is True
    assert settings.explicit(_params.CONNECT_TIMEOUT)
    assert not settings.explicit(_params.AUTO_SORT_PLUGINS)


@pytest.mark.parametrize(("name", "owner"), [
    ("gdb_enable_global_write_forwarding", "gdb_rw"),
    ("blue-green-monitoring-connect_timeout",
     "properties of the blue/green status monitor's connections"),
    ("aws_profile", "iam, aws_secrets_manager"),
    ("monitoring-connect_timeout", "properties of efm's monitoring connections"),
])
def test_known_aws_property_is_not_called_unknown(name: str, owner: str) -> None:
    err = unknown_name_error(name, "x", ["dbname", "host"], "psycopg")
    assert f"known AWS property {name!r} ({owner}" in str(err)
    assert "not supported yet" in str(err)
    assert "unknown" not in str(err) and "did you mean" not in str(err)
    assert err.parameter == name


def test_aws_property_table_is_complete_and_disjoint_from_ours() -> None:
    aws = pytest.importorskip("aws_advanced_python_wrapper.utils.properties")
    names = {p.name for p in vars(aws.WrapperProperties).values()
             if isinstance(p, aws.WrapperProperty)}
    # Not ours to declare: the plugin list and the driver's own connect parameters.
    handled_elsewhere = {"plugins", "user", "password", "database"}
    missing = names - set(REGISTRY) - set(AWS_UNSUPPORTED) - handled_elsewhere
    assert not missing, f"AWS properties neither implemented nor listed: {sorted(missing)}"
    assert not set(AWS_UNSUPPORTED) & set(REGISTRY)
    assert not set(AWS_UNSUPPORTED) - names, "listed but not an AWS property"


def test_unknown_name_suggests_our_or_driver_name() -> None:
    err = unknown_name_error("conect_timeout", 1, ["dbname", "host"], "psycopg")
    assert err.parameter == "conect_timeout"
    assert "did you mean 'connect_timeout'" in str(err)
    err = unknown_name_error("dbnme", "x", ["dbname", "host"], "psycopg")
    assert "did you mean 'dbname'" in str(err)


def test_no_internal_name_carries_a_unit_except_aws_names() -> None:
    for prop in REGISTRY.values():
        if prop.name.endswith(("_ms", "_sec")):
            assert prop.aws_name, f"{prop.name}: unit suffixes are only for AWS-compatible names"
        if prop.unit is not None:
            assert prop.type_name.startswith("duration")


def test_every_property_is_documented_and_docs_are_current() -> None:
    text = _docs.render()
    for name in REGISTRY:
        assert f"`{name}`" in text
    for path, expected in _docs.expected_files().items():
        assert path.read_text() == expected, f"{path} is stale: run python -m resilient_db._docs"


def test_plugin_page_table_is_regenerated_between_markers() -> None:
    page = "# x\n<!-- parameters:start -->\nSTALE-TABLE\n<!-- parameters:end -->\ntail\n"
    out = _docs.render_plugin_page("execute_time", page)
    assert "STALE-TABLE" not in out
    assert "`execute_time_slow_threshold`" in out
    assert out.endswith("<!-- parameters:end -->\ntail\n")
    with pytest.raises(ValueError, match="markers"):
        _docs.render_plugin_page("dev", "# no markers")


# --- bounds (issue #11 item 5) ---------------------------------------------------------------

_NUMERIC = [p for p in REGISTRY.values() if p.type_name.startswith(("duration", "int"))]


@pytest.mark.parametrize("prop", _NUMERIC, ids=lambda p: p.name)
@pytest.mark.parametrize("raw", [1e300, 10**400, "1e400", math.nan, math.inf, -math.inf, True,
                                 False, -1, "abc", [5]])
def test_every_numeric_property_rejects_hostile_values(prop: Any, raw: object) -> None:
    # 1e300 used to reach the watchdog (OverflowError in its loop); 10**400 raised a raw
    # OverflowError from float().
    with pytest.raises(ConfigurationError) as info:
        prop.parse(raw)
    err = info.value
    assert err.parameter == prop.name
    assert prop.name in str(err)
    assert prop.range_text and prop.range_text in str(err)
    assert f"leave {prop.name} out" in str(err)
    assert len(str(err)) < 400


@pytest.mark.parametrize("prop", _NUMERIC, ids=lambda p: p.name)
def test_every_numeric_property_has_a_finite_documented_range(prop: Any) -> None:
    assert prop.range_text
    assert f"| {prop.range_text} |" in _docs.render()
    # The documented default is within the range.
    if prop.default is not None:
        factor = 1000 if prop.unit == "ms" else 1
        assert prop.parse(prop.default * factor) == pytest.approx(prop.default)


@pytest.mark.parametrize(
    ("prop", "too_small"),
    [(_params.TOPOLOGY_REFRESH, 1e-6), (_params.TOPOLOGY_REFRESH, 49),
     (_params.TOPOLOGY_HIGH_REFRESH, 1), (_params.FAILURE_DETECTION_INTERVAL, 1),
     (_params.FAILURE_DETECTION_INTERVAL, 99), (_params.OPEN_CONNECTION_RETRY_INTERVAL, 1),
     (_params.FAILOVER_WRITER_RECONNECT_INTERVAL, 0.001), (_params.MONITOR_DISPOSAL_TIME, 0),
     (_params.SOCKET_TIMEOUT, 0.001), (_params.FAILURE_DETECTION_COUNT, 0)],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_minimums_that_protect_the_server(prop: Any, too_small: float) -> None:
    with pytest.raises(ConfigurationError, match=f"property '{prop.name}'"):
        prop.parse(too_small)


def test_bounds_are_inclusive_and_in_the_users_unit() -> None:
    assert _params.TOPOLOGY_REFRESH.parse(50) == pytest.approx(0.05)
    assert _params.TOPOLOGY_REFRESH.parse(86_400_000) == pytest.approx(86_400.0)
    assert _params.FAILURE_DETECTION_INTERVAL.parse("100") == pytest.approx(0.1)
    assert _params.FAILOVER_TIMEOUT.parse(86_400) == 86_400.0
    with pytest.raises(ConfigurationError):
        _params.FAILOVER_TIMEOUT.parse(86_401)
    assert _params.FAILURE_DETECTION_COUNT.parse("1000") == 1000
    with pytest.raises(ConfigurationError):
        _params.FAILURE_DETECTION_COUNT.parse(1001)


def test_zero_keeps_its_documented_meaning() -> None:
    assert _params.SOCKET_TIMEOUT.parse(0) == 0.0  # no deadline
    assert _params.SOCKET_TIMEOUT.parse("0") == 0.0
    assert _params.CONNECT_TIMEOUT.parse(0) == 0.0  # libpq: wait forever
    assert _params.FAILURE_DETECTION_TIME.parse(0) == 0.0  # probe at once
    assert _params.FAILOVER_HOST_COOLDOWN.parse(0) == 0.0  # no cooldown


@pytest.mark.parametrize(
    "prop", [_params.FAILOVER_TIMEOUT, _params.TOPOLOGY_REFRESH, _params.FAILURE_DETECTION_COUNT,
             _params.QUERY_TIMEOUT_GRACE, _params.FAILURE_DETECTION_INTERVAL],
    ids=lambda p: p.name,
)
@pytest.mark.parametrize("raw", [None, "", "  "])
def test_none_or_empty_is_not_a_silent_no_limit(prop: Any, raw: object) -> None:
    # failover_timeout_sec="" or None used to mean "fail over forever".
    with pytest.raises(ConfigurationError) as info:
        prop.parse(raw)
    assert f"leave {prop.name} out for the default, {prop.default_text()}" in str(info.value)


@pytest.mark.parametrize("prop", [_params.SOCKET_TIMEOUT, _params.CONNECT_TIMEOUT,
                                  _params.MAX_REPLICA_LAG, _params.TCP_KEEPALIVE_PROBES],
                         ids=lambda p: p.name)
def test_none_or_empty_is_unset_where_unset_is_the_default(prop: Any) -> None:
    assert prop.parse(None) is None
    assert prop.parse("") is None


def test_secret_property_value_is_redacted_in_errors() -> None:
    prop = duration("test_only_secret", None, "test", secret=True)
    try:
        with pytest.raises(ConfigurationError) as info:
            prop.parse("hunter2-secret")
        err = info.value
        for text in (str(err), repr(err), repr(err.args), repr(err.value)):
            assert "hunter2" not in text
    finally:
        del REGISTRY["test_only_secret"]


@pytest.mark.parametrize("name", ["pasword", "passwrod", "pwsd", "sslpasword", "hots"])
def test_unknown_name_error_never_keeps_the_value(name: str) -> None:
    # A misspelled password key is unknown to both us and the driver; its value is the
    # password.
    err = unknown_name_error(name, "hunter2xyz", ["password", "host"], "psycopg")
    for text in (str(err), repr(err), repr(err.args), repr(err.value)):
        assert "hunter2xyz" not in text
    assert err.parameter == name
