"""AWS Advanced Python Wrapper property names that resilient_db does not implement yet.

A migrating application may pass any of the AWS wrapper's properties. The ones resilient_db
implements are in the property registry (``_params``) under the same name; the ones below
belong to AWS plugins or features that have not landed here. Setting one is still an error
(silently ignoring, say, ``iam_region`` would connect without IAM), but the error says
"known AWS property, not supported yet" and names its plugin instead of guessing a typo.

Collected from ``aws_advanced_python_wrapper.utils.properties.WrapperProperties`` (3.1); a test
keeps the table complete against the installed AWS wrapper. ``docs/parameters.md`` lists it
(generated).
"""

from __future__ import annotations

__all__ = ["AWS_PREFIXES", "AWS_UNSUPPORTED", "aws_unsupported"]

#: Name -> the AWS plugin (or feature) it belongs to.
AWS_UNSUPPORTED: dict[str, str] = {
    # core features of the AWS wrapper
    "profile_name": "configuration profiles",
    "transfer_session_state_on_switch": "session state transfer",
    "reset_session_state_on_close": "session state transfer",
    "rollback_on_switch": "session state transfer",
    "auxiliary_query_timeout_sec": "auxiliary queries",
    "default_host_availability_strategy": "host availability strategy",
    "host_availability_strategy_max_retries": "host availability strategy",
    "host_availability_strategy_initial_backoff_time": "host availability strategy",
    "telemetry_failover_additional_top_trace": "telemetry",
    # failover / failover_v2 and the topology monitor
    "failover_cluster_topology_refresh_rate_sec": "failover",
    "enable_connect_failover": "failover",
    "monitoring_connection_priority": "failover",
    # initial_connection
    "endpoint_substitution_role": "initial_connection",
    "inactive_cluster_writer_endpoint_substitution_role": "initial_connection",
    "verify_inactive_cluster_writer_endpoint_connection_type": "initial_connection",
    "wait_for_initial_topology_ms": "initial_connection",
    # Aurora Global Database
    "gdb_accessible_regions": "gdb_failover",
    "gdb_monitoring_connection_priority": "gdb_failover",
    "gdb_enable_global_write_forwarding": "gdb_rw",
    # authentication
    "aws_profile": "iam, aws_secrets_manager",
}

#: Prefixes under which the AWS wrapper passes driver properties to its monitoring
#: connections (``monitoring-connect_timeout``, ...).
AWS_PREFIXES: dict[str, str] = {
    "monitoring-": "properties of efm's monitoring connections",
    "topology-monitoring-": "properties of the topology monitor's connections",
    "frt-": "properties of fastest_response_strategy's measuring connections",
    "blue-green-monitoring-": "properties of the blue/green status monitor's connections",
}


def aws_unsupported(name: str) -> str | None:
    """What the AWS wrapper uses ``name`` for, when it is an AWS property resilient_db does not
    implement yet; ``None`` otherwise."""
    owner = AWS_UNSUPPORTED.get(name)
    if owner is not None:
        return owner
    for prefix, owner in AWS_PREFIXES.items():
        if name.startswith(prefix):
            return owner
    return None
