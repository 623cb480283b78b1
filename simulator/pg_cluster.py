"""PostgreSQL flavours of the cluster simulator: aurora-pg, multi-az-pg, rds-pg and pg.

:class:`PgClusterEngine` implements :class:`~simulator.cluster.ClusterEngine` on real
PostgreSQL servers from :mod:`simulator.local` (``../docs/simulator.md``, "PostgreSQL
flavours"):

- **Replication.** The writer starts from the launcher's template with a fresh system
  identifier (every simulated cluster is its own database system, as ``pg_control_system()``
  shows); readers are ``pg_basebackup`` copies of the writer that stream from it
  (``primary_conninfo`` with ``application_name=<instance id>``,
  ``recovery_target_timeline=latest``). With readers the writer commits synchronously
  (``synchronous_standby_names = 'ANY 1 (<readers>)'``, ``synchronous_commit = on``), so a
  commit is acknowledged only once a reader has it: a failover to the most advanced reader
  loses no acknowledged commit.
- **Failover.** :meth:`~PgClusterEngine.promote` first lets the target catch up from any
  reader that received more (cascading replication), then ``pg_promote()``; the other readers
  follow the new writer (new ``primary_conninfo``, reload); the old writer rejoins with
  ``pg_rewind`` and ``standby.signal``.
- **Configuration.** Each instance's settings (identity, role, lag, read-only) are the
  launcher's ``settings`` of its server, rewritten into ``postgresql.conf`` and reloaded
  (``postgresql.auto.conf`` is emptied), so a base backup or ``pg_rewind``, which copy another
  server's configuration, never leave an instance with a foreign identity.
- **Interface** (``AURORA_INTERFACE.md``): created on the writer by the superuser (functions in
  ``pg_catalog`` with ``allow_system_table_mods``), in the databases ``test`` and ``postgres``;
  topology and blue/green metadata live in tables of the internal schema ``rds_sim`` that the
  control plane writes on the writer and streaming replication carries to the readers.
  Instance identity is the per-instance setting ``rds_sim.instance_id`` (and
  ``rds_sim.dbi_resource_id``).
- **Users.** Clients use the non-superuser ``app`` (password ``app``), owner of the database
  ``test`` (``credentials``); the control plane uses the superuser over the Unix socket.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import hashlib
import logging
import os
import secrets
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from .cluster import BlueGreenRow, Cluster, ClusterEngine, ClusterError, Instance, register_engine
from .local import LocalServer, SimulatorError

if TYPE_CHECKING:
    from .iam import ClusterIam

__all__ = [
    "APP_PASSWORD",
    "APP_USER",
    "AURORA_EXTENSIONS",
    "AURORA_IDENTITY_FUNCTIONS",
    "END_CLIENT_SESSIONS",
    "INSTANCE_ID_SETTING",
    "INTERFACE_DATABASES",
    "RESOURCE_ID_SETTING",
    "PgClusterEngine",
    "install_interface",
    "launch",
    "resource_id",
    "superuser_connection",
]

LOGGER = logging.getLogger("resilient_db.simulator")

#: The application user every PostgreSQL flavour creates (not a superuser).
APP_USER = "app"
APP_PASSWORD = "app"
#: Per-instance custom settings: the instance id and the RDS resource id.
INSTANCE_ID_SETTING = "rds_sim.instance_id"
RESOURCE_ID_SETTING = "rds_sim.dbi_resource_id"
#: Databases that get the interface (and the topology tables).
INTERFACE_DATABASES = ("test", "postgres")

#: ``rds.extensions`` of an Aurora PostgreSQL 15 instance (a representative subset; what
#: matters to clients is ``aurora_stat_utils``; Aurora also lists ``rds_tools``).
AURORA_EXTENSIONS = (
    "address_standardizer, address_standardizer_data_us, amcheck, apg_plan_mgmt, "
    "aurora_stat_utils, aws_commons, aws_lambda, aws_ml, aws_s3, bloom, btree_gin, btree_gist, "
    "citext, cube, dblink, dict_int, dict_xsyn, earthdistance, fuzzystrmatch, hll, hstore, "
    "intagg, intarray, isn, lo, ltree, pg_buffercache, pg_cron, pg_partman, pg_prewarm, "
    "pg_stat_statements, pg_trgm, pgaudit, pgcrypto, pgrowlocks, pgstattuple, plpgsql, "
    "postgis, postgres_fdw, rds_tools, refint, seg, sslinfo, tablefunc, tcn, tsm_system_rows, "
    "tsm_system_time, unaccent, uuid-ossp"
)

_SUPERUSER = "postgres"
_SUPERUSER_PASSWORD = "postgres"
_WRITER_SESSION_ID = "MASTER_SESSION_ID"
# Seconds to wait for a reload, a replica to catch up or to stream (a liveness bound: about a
# second on a quiet machine, much more for a standby that starts in a container under load).
_SETTLE_TIMEOUT = 30.0
_PROMOTE_TIMEOUT = 30

# Settings every instance gets. Short retry intervals make readers follow a new writer within
# a few hundred milliseconds; wal_keep_size keeps WAL for readers created or rewound later.
_COMMON_SETTINGS: Mapping[str, str] = {
    "wal_keep_size": "64MB",
    "wal_retrieve_retry_interval": "100ms",
    "wal_receiver_timeout": "10s",
    "wal_sender_timeout": "10s",
    "wal_receiver_status_interval": "1s",
    "synchronous_commit": "on",
    "log_min_messages": "warning",
}


def resource_id(cluster_id: str, instance_id: str) -> str:
    """The RDS resource id (``db-`` and 26 upper-case letters and digits) the simulator
    gives an instance; stable for a cluster id and instance id."""
    digest = hashlib.sha256(f"{cluster_id}/{instance_id}".encode()).digest()
    return "db-" + base64.b32encode(digest).decode()[:26]


# --------------------------------------------------------------------------------------------
# The catalog interface

#: ``aurora_db_instance_identifier()`` (the instance id setting) and ``aurora_version()``, as
#: an Aurora PostgreSQL instance and a Limitless router have them (created in ``pg_catalog``:
#: between ``SET`` and ``RESET allow_system_table_mods``).
AURORA_IDENTITY_FUNCTIONS = f"""\
CREATE FUNCTION pg_catalog.aurora_db_instance_identifier() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT current_setting('{INSTANCE_ID_SETTING}')
$$;
CREATE FUNCTION pg_catalog.aurora_version() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT split_part(current_setting('server_version'), ' ', 1) || '.1'
$$;
"""

#: Ends every application session (not the simulator's own, ``resilient_db-sim``).
END_CLIENT_SESSIONS = (
    "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid() "
    "AND application_name <> 'resilient_db-sim'")

_INTERNAL_SCHEMA = """\
CREATE SCHEMA rds_sim;
REVOKE ALL ON SCHEMA rds_sim FROM PUBLIC;
COMMENT ON SCHEMA rds_sim IS 'resilient_db simulator: topology written by the control plane';
CREATE TABLE rds_sim.replica_status (
    server_id text PRIMARY KEY,
    session_id text NOT NULL,
    resource_id text NOT NULL,
    endpoint text NOT NULL,
    port integer NOT NULL,
    is_writer boolean NOT NULL,
    cpu real NOT NULL,
    replica_lag_in_msec real,
    -- NULL: the instance reports in (a fresh timestamp); else its last report
    frozen_at timestamptz,
    ord integer NOT NULL,
    -- the instance's AWS region (Aurora Global Database; one value in a regional cluster)
    aws_region text NOT NULL DEFAULT ''
);
CREATE TABLE rds_sim.blue_green (
    ord integer PRIMARY KEY,
    id text,
    version text NOT NULL,
    endpoint text NOT NULL,
    port integer NOT NULL,
    role text NOT NULL,
    status text NOT NULL
);
"""

# Aurora PostgreSQL: aurora_replica_status() with the documented columns. LSNs are this
# instance's own; last_update_timestamp is NULL for the instance you are connected to (Aurora
# PostgreSQL >= 13.9), now() for the others while they report, else their last report.
_AURORA_FUNCTIONS = f"""\
SET allow_system_table_mods = on;
CREATE FUNCTION pg_catalog.aurora_replica_status(
    OUT server_id text, OUT session_id text, OUT durable_lsn bigint,
    OUT highest_lsn_rcvd bigint, OUT current_read_lsn bigint,
    OUT cur_replay_latency_in_usec bigint, OUT active_txns integer, OUT is_current boolean,
    OUT last_transport_error integer, OUT last_error_timestamp timestamp with time zone,
    OUT last_update_timestamp timestamp with time zone, OUT feedback_xmin bigint,
    OUT feedback_epoch integer, OUT replica_lag_in_msec real,
    OUT log_stream_speed_in_kib_per_second real, OUT log_buffer_sequence_number bigint,
    OUT oldest_read_view_trx_id bigint, OUT oldest_read_view_lsn bigint,
    OUT pending_read_ios integer, OUT read_ios bigint, OUT iops integer, OUT cpu real)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
  SELECT s.server_id, s.session_id, l.lsn,
         CASE WHEN s.is_writer THEN NULL ELSE l.lsn END, l.lsn,
         CASE WHEN s.is_writer THEN NULL
              ELSE (COALESCE(s.replica_lag_in_msec, 0) * 1000)::bigint END,
         0, false, 0, NULL::timestamptz,
         CASE WHEN s.server_id = current_setting('{INSTANCE_ID_SETTING}', true) THEN NULL
              ELSE COALESCE(s.frozen_at, now() - interval '20 milliseconds') END,
         CASE WHEN s.is_writer THEN NULL ELSE 0::bigint END,
         CASE WHEN s.is_writer THEN NULL ELSE 0 END,
         CASE WHEN s.is_writer THEN NULL ELSE s.replica_lag_in_msec END,
         CASE WHEN s.is_writer THEN NULL ELSE 64.0::real END,
         l.lsn, 0::bigint, l.lsn, 0, 0::bigint, 0, s.cpu
    FROM rds_sim.replica_status AS s,
         (SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                       ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::bigint AS lsn) AS l
   -- A Global Database lists the instances of the region connected to (its own cluster).
   WHERE s.aws_region = COALESCE((SELECT m.aws_region FROM rds_sim.replica_status AS m
                                   WHERE m.server_id = current_setting('{INSTANCE_ID_SETTING}',
                                                                       true)), s.aws_region)
   ORDER BY s.ord
$$;
-- Aurora Global Database: every instance of every region. session_id is MASTER_SESSION_ID
-- for the global writer; visibility_lag_in_msec is NULL for the writer.
CREATE FUNCTION pg_catalog.aurora_global_db_instance_status(
    OUT server_id text, OUT session_id text, OUT aws_region text, OUT durable_lsn bigint,
    OUT highest_lsn_rcvd bigint, OUT feedback_epoch integer, OUT feedback_xmin bigint,
    OUT oldest_read_view_lsn bigint, OUT visibility_lag_in_msec real)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
  SELECT s.server_id, s.session_id, s.aws_region, l.lsn,
         CASE WHEN s.is_writer THEN NULL ELSE l.lsn END,
         CASE WHEN s.is_writer THEN NULL ELSE 0 END,
         CASE WHEN s.is_writer THEN NULL ELSE 0::bigint END, l.lsn,
         CASE WHEN s.is_writer THEN NULL ELSE COALESCE(s.replica_lag_in_msec, 0) END
    FROM rds_sim.replica_status AS s,
         (SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                       ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::bigint AS lsn) AS l
   ORDER BY s.ord
$$;
-- One row per region; the primary region's lags are -1 (as Aurora reports them).
CREATE FUNCTION pg_catalog.aurora_global_db_status(
    OUT aws_region text, OUT highest_lsn_written bigint, OUT durability_lag_in_msec bigint,
    OUT rpo_lag_in_msec bigint, OUT last_lag_calculation_time timestamp with time zone,
    OUT feedback_epoch integer, OUT feedback_xmin bigint)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
  SELECT r.aws_region, l.lsn,
         CASE WHEN r.primary_region THEN -1 ELSE r.lag END,
         CASE WHEN r.primary_region THEN -1 ELSE r.lag END,
         now(), 0, 0::bigint
    FROM (SELECT s.aws_region, bool_or(s.is_writer) AS primary_region,
                 max(COALESCE(s.replica_lag_in_msec, 0))::bigint AS lag, min(s.ord) AS ord
            FROM rds_sim.replica_status AS s GROUP BY s.aws_region) AS r,
         (SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                       ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::bigint AS lsn) AS l
   ORDER BY r.ord
$$;
""" + AURORA_IDENTITY_FUNCTIONS + """\
CREATE FUNCTION pg_catalog.get_blue_green_fast_switchover_metadata(
    client_id text, OUT version text, OUT endpoint text, OUT port integer, OUT role text,
    OUT status text)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
  SELECT b.version, b.endpoint, b.port, b.role, b.status FROM rds_sim.blue_green AS b
   ORDER BY b.ord
$$;
RESET allow_system_table_mods;
"""

# RDS (single instance and Multi-AZ DB cluster): schema rds_tools. show_topology returns the
# union of the two shapes clients read: (id, endpoint, port) of each Multi-AZ instance, and
# (version, endpoint, port, role, status) of the RDS blue/green metadata.
_RDS_TOOLS = f"""\
CREATE SCHEMA rds_tools;
GRANT USAGE ON SCHEMA rds_tools TO PUBLIC;
CREATE FUNCTION rds_tools.dbi_resource_id() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT current_setting('{RESOURCE_ID_SETTING}')
$$;
"""

_MULTI_AZ_FUNCTIONS = """\
CREATE FUNCTION rds_tools.show_topology(
    client_id text DEFAULT NULL, OUT id text, OUT endpoint text, OUT port integer,
    OUT role text, OUT status text, OUT version text)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
  SELECT s.resource_id, s.endpoint, s.port, NULL::text, NULL::text, NULL::text
    FROM rds_sim.replica_status AS s ORDER BY s.ord
$$;
CREATE FUNCTION rds_tools.multi_az_db_cluster_source_dbi_resource_id() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT s.resource_id FROM rds_sim.replica_status AS s WHERE s.is_writer
$$;
"""

_RDS_FUNCTIONS = """\
CREATE FUNCTION rds_tools.show_topology(
    client_id text DEFAULT NULL, OUT id text, OUT endpoint text, OUT port integer,
    OUT role text, OUT status text, OUT version text)
RETURNS SETOF record LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
  SELECT b.id, b.endpoint, b.port, b.role, b.status, b.version
    FROM rds_sim.blue_green AS b ORDER BY b.ord
$$;
"""


def _interface_sql(interface: str) -> str:
    """DDL of a flavour's interface (run as superuser in each interface database)."""
    if interface == "aurora":
        return _INTERNAL_SCHEMA + _AURORA_FUNCTIONS
    if interface == "multi-az":
        return _INTERNAL_SCHEMA + _RDS_TOOLS + _MULTI_AZ_FUNCTIONS
    if interface == "rds":
        return _INTERNAL_SCHEMA + _RDS_TOOLS + _RDS_FUNCTIONS
    return ""


# --------------------------------------------------------------------------------------------
# A fresh system identifier for each cluster
#
# Every server made from the launcher's template shares the template's system identifier;
# a cluster's writer gets its own before its first start, so that each simulated cluster is
# its own database system (physical replicas share the id, as on Aurora and RDS). The id sits
# in pg_control (first 8 bytes, followed eventually by a CRC-32C of the struct) and in the
# long page header that starts every WAL segment (xlp_sysid at offset 24).

_XLP_LONG_HEADER = 0x0002
_CRC32C_TABLE: list[int] = []


def _crc32c(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """Running CRC-32C (Castagnoli) state; the checksum is ``state ^ 0xFFFFFFFF``."""
    if not _CRC32C_TABLE:
        for byte in range(256):
            value = byte
            for _ in range(8):
                value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
            _CRC32C_TABLE.append(value)
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def _control_crc_offset(control: bytes) -> int:
    """Offset of the CRC in pg_control: the first 4-byte boundary whose 4 bytes are the
    CRC-32C of everything before them."""
    crc = 0xFFFFFFFF
    for offset in range(0, 1024, 4):
        if offset >= 16:
            (stored,) = struct.unpack_from("<I", control, offset)
            if stored == crc ^ 0xFFFFFFFF:
                return offset
        crc = _crc32c(control[offset:offset + 4], crc)
    raise SimulatorError("pg_control: checksum not found; unknown layout")


def new_system_identifier() -> int:
    """A system identifier in PostgreSQL's own style (seconds in the high 32 bits)."""
    return (int(time.time()) << 32) | secrets.randbits(32)


def set_system_identifier(data_dir: Path, identifier: int) -> None:
    """Give the (stopped) cluster in ``data_dir`` the system identifier ``identifier``."""
    control_path = data_dir / "global" / "pg_control"
    control = bytearray(control_path.read_bytes())
    (old,) = struct.unpack_from("<Q", control, 0)
    crc_offset = _control_crc_offset(bytes(control))
    struct.pack_into("<Q", control, 0, identifier)
    crc = _crc32c(bytes(control[:crc_offset])) ^ 0xFFFFFFFF
    struct.pack_into("<I", control, crc_offset, crc)
    for segment in (data_dir / "pg_wal").iterdir():
        if len(segment.name) != 24 or not segment.is_file():
            continue
        with open(segment, "r+b") as wal:
            header = wal.read(32)
            if len(header) < 32:
                continue
            (info,) = struct.unpack_from("<H", header, 2)
            (sysid,) = struct.unpack_from("<Q", header, 24)
            if info & _XLP_LONG_HEADER and sysid == old:
                wal.seek(24)
                wal.write(struct.pack("<Q", identifier))
    with open(control_path, "r+b") as handle:  # in place: keeps owner and mode
        handle.write(control)


# --------------------------------------------------------------------------------------------
# The engine


@dataclass
class _State:
    """What an instance's configuration says besides its identity."""

    upstream: str | None = None  # the instance it streams from; None: it is a writer
    read_only: bool = False
    lag: float = 0.0
    sync_readers: tuple[str, ...] = ()
    session_id: str = ""
    stopped_at: datetime.datetime | None = None


# --------------------------------------------------------------------------------------------
# Launching a server (cluster instances and Limitless routers)


def launch(server_class: type[LocalServer], flavour: str, *, port: int | None,
           settings: Mapping[str, str], name: str,
           provision: Callable[[LocalServer], None] | None = None,
           prepare: Callable[[LocalServer], None] | None = None,
           setup: Callable[[LocalServer], None] | None = None) -> LocalServer:
    """A PostgreSQL server of ``flavour`` (see :meth:`LocalServer.create` for ``port``,
    ``settings``, ``name``, ``provision``), started: ``prepare(server)`` before the start and
    ``setup(server)`` after it (``None``: nothing); stopped again if any step fails."""
    server = server_class.create("postgresql", flavour, port=port, settings=settings,
                                 name=name, provision=provision)
    try:
        if prepare is not None:
            prepare(server)
        server.start()
        if setup is not None:
            setup(server)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def superuser_connection(server: LocalServer, dbname: str = "test",
                         timeout: float = 5.0) -> Iterator[psycopg.Connection[Any]]:
    """A superuser connection to ``server`` over its Unix socket (no DNS, no password),
    autocommit, closed on leaving the block."""
    conn = psycopg.connect(host=str(server.socket_dir), port=server.port, user=_SUPERUSER,
                           dbname=dbname, autocommit=True,
                           connect_timeout=max(1, round(timeout)),
                           application_name="resilient_db-sim")
    try:
        yield conn
    finally:
        conn.close()


def install_interface(server: LocalServer, ddl: str) -> None:
    """The application user (``APP_USER``, owner of the server's database) and ``ddl`` (the
    flavour's interface; ``""``: none) in each of :data:`INTERFACE_DATABASES`, as superuser
    with ``synchronous_commit = local`` (no standby acknowledges yet)."""
    with superuser_connection(server, "postgres") as conn:
        conn.execute("SET synchronous_commit = local")
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(APP_USER), sql.Literal(APP_PASSWORD)))
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(server.database), sql.Identifier(APP_USER)))
    if not ddl:
        return
    for dbname in INTERFACE_DATABASES:
        with superuser_connection(server, dbname) as conn:
            conn.execute("SET synchronous_commit = local")
            with conn.transaction():
                conn.execute(ddl.encode())


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lsn_query() -> str:
    return ("SELECT (CASE WHEN pg_catalog.pg_is_in_recovery() THEN "
            "GREATEST(pg_catalog.pg_last_wal_receive_lsn(), pg_catalog.pg_last_wal_replay_lsn())"
            " ELSE pg_catalog.pg_current_wal_flush_lsn() END - '0/0'::pg_catalog.pg_lsn)::bigint")


class PgClusterEngine(ClusterEngine):
    """Cluster primitives on PostgreSQL servers (see the module docstring)."""

    flavours = frozenset({"aurora-pg", "multi-az-pg", "rds-pg", "pg"})

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster)
        self.interface = cluster.flavour.interface
        #: The application user's credentials (``Cluster.connect_kwargs`` uses them).
        self.credentials = {"user": APP_USER, "password": APP_PASSWORD}
        self._states: dict[str, _State] = {}
        self._system_identifier = new_system_identifier()

    # ---- configuration ---------------------------------------------------------------------
    @property
    def _launcher_flavour(self) -> str:
        # The "rds" template replaces pg_settings to show rds.extensions.
        return "pg" if self.interface == "plain" else "rds-pg"

    def resource_id(self, instance_id: str) -> str:
        return resource_id(self.cluster.naming.cluster_id, instance_id)

    def _state(self, instance_id: str) -> _State:
        state = self._states.get(instance_id)
        if state is None:
            state = self._states[instance_id] = _State(session_id=str(uuid.uuid4()))
        return state

    def _settings(self, instance_id: str) -> dict[str, str]:
        state = self._state(instance_id)
        settings = dict(_COMMON_SETTINGS)
        settings[INSTANCE_ID_SETTING] = instance_id
        settings[RESOURCE_ID_SETTING] = self.resource_id(instance_id)
        if self.interface == "aurora":
            settings["rds.extensions"] = AURORA_EXTENSIONS
        if state.upstream is None:
            names = ", ".join(_quote_ident(r) for r in state.sync_readers)
            settings["synchronous_standby_names"] = f"ANY 1 ({names})" if names else ""
            settings["default_transaction_read_only"] = "on" if state.read_only else "off"
        else:
            upstream = self.cluster.instance(state.upstream).runtime
            settings["primary_conninfo"] = (
                f"host={upstream.host} port={upstream.port} user={_SUPERUSER} "
                f"password={_SUPERUSER_PASSWORD} application_name={instance_id} "
                "connect_timeout=2")
            settings["recovery_target_timeline"] = "latest"
            settings["recovery_min_apply_delay"] = f"{round(state.lag * 1000)}ms"
        return settings

    def _apply(self, instance: Instance, *, reload: bool = True) -> None:
        """Rewrite ``instance``'s configuration from its state (and reload it if it runs)."""
        server: LocalServer = instance.runtime
        server.reconfigure(self._settings(instance.id))
        if reload and server.is_running():
            server.reload()

    # ---- connections -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self, instance: Instance, dbname: str = "test",
                 timeout: float = 5.0) -> Iterator[psycopg.Connection[Any]]:
        """A superuser connection over the instance's Unix socket (no DNS, no password)."""
        with superuser_connection(instance.runtime, dbname, timeout) as conn:
            yield conn

    def _query_one(self, instance: Instance, query: str) -> Any:
        with self._connect(instance) as conn:
            row = conn.execute(query).fetchone()
        return None if row is None else row[0]

    def _wait_for(self, what: str, check: Any, timeout: float = _SETTLE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                if check():
                    return
            except psycopg.Error as exc:
                LOGGER.debug("waiting for %s: %s", what, exc)
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster {self.cluster.name}: {what} within {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    # ---- creation --------------------------------------------------------------------------
    def create_writer(self, instance_id: str) -> Any:
        self._state(instance_id)

        def prepare(server: LocalServer) -> None:
            set_system_identifier(server.data_dir, self._system_identifier)

        return launch(self.cluster.server_class, self._launcher_flavour, port=self.cluster.port,
                      settings=self._settings(instance_id),
                      name=f"{self.cluster.name}-{instance_id}", prepare=prepare)

    def create_replica(self, instance_id: str, source: Instance) -> Any:
        state = self._state(instance_id)
        state.upstream = source.id
        source_server: LocalServer = source.runtime

        def base_backup(server: LocalServer) -> None:
            server.run_tool([
                str(server.tool_path("pg_basebackup")), "-D", str(server.data_dir),
                "-h", str(source_server.socket_dir), "-p", str(source_server.port),
                "-U", _SUPERUSER, "-w", "-X", "stream", "-c", "fast", "--no-sync",
            ], what=f"pg_basebackup of {source.id}")

        def prepare(server: LocalServer) -> None:
            server.write_data_file("standby.signal", "")

        return launch(self.cluster.server_class, self._launcher_flavour, port=self.cluster.port,
                      settings=self._settings(instance_id),
                      name=f"{self.cluster.name}-{instance_id}", provision=base_backup,
                      prepare=prepare)

    def install_interface(self, writer: Instance) -> None:
        install_interface(writer.runtime, _interface_sql(self.interface))

    # ---- topology --------------------------------------------------------------------------
    def following(self, writer: Instance, readers: Sequence[Instance]) -> bool:
        with self._connect(writer) as conn:
            names = {row[0] for row in conn.execute(
                "SELECT application_name FROM pg_catalog.pg_stat_replication "
                "WHERE state = 'streaming'")}
        return names == {r.id for r in readers}

    def publish_topology(self, writer: Instance) -> None:
        self._sync_standbys(writer)
        if self.interface not in ("aurora", "multi-az"):
            return
        now = datetime.datetime.now(datetime.timezone.utc)
        rows = []
        for ordinal, instance in enumerate(self.cluster.instances.values()):
            state = self._state(instance.id)
            running = instance.role != "stopped"
            if running:
                state.stopped_at = None
            elif state.stopped_at is None:
                state.stopped_at = now
            frozen = state.stopped_at
            if instance.status_age is not None:
                frozen = now - datetime.timedelta(seconds=instance.status_age)
            is_writer = instance is writer
            rows.append((
                instance.id, _WRITER_SESSION_ID if is_writer else state.session_id,
                self.resource_id(instance.id), instance.endpoint, instance.port, is_writer,
                _cpu(instance.id), None if is_writer else instance.lag * 1000.0, frozen,
                ordinal, self.cluster.region_of(instance),
            ))
        for dbname in INTERFACE_DATABASES:
            with self._writable(writer, dbname) as conn, conn.transaction():
                conn.execute("DELETE FROM rds_sim.replica_status")
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO rds_sim.replica_status (server_id, session_id, "
                        "resource_id, endpoint, port, is_writer, cpu, replica_lag_in_msec, "
                        "frozen_at, ord, aws_region) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        rows)

    @contextlib.contextmanager
    def _writable(self, writer: Instance, dbname: str) -> Iterator[psycopg.Connection[Any]]:
        """A control-plane session on the writer that writes even when the writer is
        read-only, and does not wait for a reader to confirm (none may be running)."""
        with self._connect(writer, dbname) as conn:
            conn.execute("SET synchronous_commit = local")
            conn.execute("SET default_transaction_read_only = off")
            yield conn

    def _sync_standbys(self, writer: Instance) -> None:
        """Make the writer wait for any one of the running readers (none: commit locally)."""
        state = self._state(writer.id)
        wanted = tuple(r.id for r in self.cluster.readers)
        if state.sync_readers != wanted:
            state.sync_readers = wanted
            self._apply(writer)

    def publish_blue_green(self, writer: Instance, rows: Sequence[BlueGreenRow]) -> None:
        if self.interface not in ("aurora", "rds"):
            super().publish_blue_green(writer, rows)
        ids = {i.endpoint: self.resource_id(i.id) for i in self.cluster.instances.values()}
        values = [(n, ids.get(r.endpoint), r.version, r.endpoint, r.port, r.role, r.status)
                  for n, r in enumerate(rows)]
        for dbname in INTERFACE_DATABASES:
            with self._writable(writer, dbname) as conn, conn.transaction():
                conn.execute("DELETE FROM rds_sim.blue_green")
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO rds_sim.blue_green (ord, id, version, endpoint, port, "
                        "role, status) VALUES (%s, %s, %s, %s, %s, %s, %s)", values)

    def replication_position(self, instance: Instance) -> Any:
        if not instance.runtime.is_running():
            return None
        value = self._query_one(instance, _lsn_query())
        return None if value is None else int(value)

    # ---- failover --------------------------------------------------------------------------
    def promote(self, instance: Instance) -> None:
        self._catch_up_from_peers(instance)
        state = self._state(instance.id)
        state.upstream = None
        state.read_only = False
        state.sync_readers = tuple(r.id for r in self.cluster.readers if r is not instance)
        # The writer configuration (synchronous standbys) is in force before the first write.
        self._apply(instance)
        with self._connect(instance) as conn:
            row = conn.execute("SELECT pg_catalog.pg_promote(true, %s)",
                               (_PROMOTE_TIMEOUT,)).fetchone()
        if not row or not row[0]:
            raise ClusterError(f"{instance.id} did not finish promotion within "
                               f"{_PROMOTE_TIMEOUT} s")

    def _catch_up_from_peers(self, instance: Instance) -> None:
        """If another reader received more than ``instance``, stream the difference from it
        (cascading replication) before promotion: Aurora's shared storage loses nothing, so
        neither may a failover to a chosen target."""
        position = self.replication_position(instance) or 0
        best: tuple[int, Instance] | None = None
        for peer in self.cluster.readers:
            if peer is instance:
                continue
            try:
                peer_position = self.replication_position(peer)
            except psycopg.Error:
                continue
            if peer_position is not None and peer_position > (best[0] if best else position):
                best = (peer_position, peer)
        if best is None:
            return
        target, peer = best
        LOGGER.info("%s catches up from %s before promotion", instance.id, peer.id)
        state = self._state(instance.id)
        previous = state.upstream
        state.upstream = peer.id
        self._apply(instance)
        self._wait_for(f"{instance.id} to catch up with {peer.id}",
                       lambda: (self.replication_position(instance) or 0) >= target)
        state.upstream = previous

    def follow(self, replica: Instance, writer: Instance) -> None:
        state = self._state(replica.id)
        state.upstream = writer.id
        self._apply(replica)
        try:
            self._wait_streaming(replica, writer, timeout=5.0)
        except ClusterError:
            # It received WAL the new writer never got (promotion catches the target up, so
            # only if the reader that had more died meanwhile): rewind it like an old writer.
            LOGGER.warning("%s cannot follow %s; rewinding it", replica.id, writer.id)
            replica.runtime.stop(cleanup=False)
            self._rewind(replica, writer)
            self._start_standby(replica)
            self._wait_streaming(replica, writer)

    def _wait_streaming(self, replica: Instance, writer: Instance,
                        timeout: float = _SETTLE_TIMEOUT) -> None:
        address = writer.address

        def streaming() -> bool:
            row = None
            with self._connect(replica) as conn:
                row = conn.execute(
                    "SELECT status, sender_host FROM pg_catalog.pg_stat_wal_receiver").fetchone()
            return row is not None and row[0] == "streaming" and row[1] == address

        self._wait_for(f"{replica.id} to stream from {writer.id}", streaming, timeout)

    def rejoin(self, old_writer: Instance, writer: Instance) -> None:
        """Bring a stopped instance back as a reader of ``writer``.

        A former writer is rewound first (``pg_rewind``: its last WAL may never have reached
        the new writer). A former reader just starts again as a standby: running
        ``pg_rewind`` on a crashed standby would first finish its crash recovery in
        single-user mode, which writes a checkpoint of its own on the writer's timeline that
        ``pg_rewind`` cannot see as a divergence. Only if the reader then cannot stream (it
        had received WAL the new writer never got) is it stopped cleanly and rewound.
        """
        server: LocalServer = old_writer.runtime
        if server.is_running():
            server.stop(cleanup=False)
        state = self._state(old_writer.id)
        was_writer = state.upstream is None
        if was_writer:
            self._rewind(old_writer, writer)
        state.upstream = writer.id
        state.read_only = False
        state.lag = old_writer.lag
        state.sync_readers = ()
        state.session_id = str(uuid.uuid4())
        self._start_standby(old_writer)
        try:
            self._wait_streaming(old_writer, writer, timeout=3.0 if not was_writer else
                                 _SETTLE_TIMEOUT)
        except ClusterError:
            if was_writer:
                raise
            LOGGER.info("%s cannot stream from %s; rewinding it", old_writer.id, writer.id)
            server.stop(cleanup=False)
            self._rewind(old_writer, writer)
            self._start_standby(old_writer)
            self._wait_streaming(old_writer, writer)

    def _rewind(self, instance: Instance, writer: Instance) -> None:
        """``pg_rewind`` the stopped ``instance`` to ``writer``'s history."""
        server: LocalServer = instance.runtime
        # pg_rewind finishes the crash recovery of a killed server in single-user mode,
        # which refuses to run with a standby.signal (written again when it starts).
        for signal_file in ("standby.signal", "recovery.signal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(server.data_dir / signal_file)
        # A freshly promoted writer's pg_control names its new timeline only after the
        # end-of-recovery checkpoint, which promotion requests without waiting for it;
        # pg_rewind reads the timeline there and would find "no rewind required".
        with self._connect(writer) as conn:
            conn.execute("CHECKPOINT")
        source: LocalServer = writer.runtime
        output = server.run_tool([
            str(server.tool_path("pg_rewind")), "--target-pgdata", str(server.data_dir),
            "--source-server",
            f"host={source.socket_dir} port={source.port} user={_SUPERUSER} dbname=postgres",
            "--no-sync",
        ], what=f"pg_rewind of {instance.id} from {writer.id}")
        LOGGER.debug("pg_rewind %s: %s", instance.id, output.strip().splitlines()[-1:])

    def _start_standby(self, instance: Instance) -> None:
        server: LocalServer = instance.runtime
        self._apply(instance, reload=False)  # also replaces what pg_rewind copied
        server.write_data_file("standby.signal", "")
        server.start()

    # ---- writer and replica behaviour ------------------------------------------------------
    def set_read_only(self, instance: Instance, read_only: bool) -> None:
        state = self._state(instance.id)
        state.read_only = read_only
        self._apply(instance)
        wanted = "on" if read_only else "off"
        self._wait_for(
            f"{instance.id} to turn default_transaction_read_only {wanted}",
            lambda: self._query_one(instance, "SHOW default_transaction_read_only") == wanted)

    def set_replica_lag(self, instance: Instance, seconds: float) -> None:
        state = self._state(instance.id)
        state.lag = seconds
        self._apply(instance)
        wanted = f"{round(seconds * 1000)}ms"

        def applied() -> bool:
            value = self._query_one(instance, "SELECT setting FROM pg_catalog.pg_settings "
                                              "WHERE name = 'recovery_min_apply_delay'")
            return f"{value}ms" == wanted

        self._wait_for(f"{instance.id} to apply recovery_min_apply_delay {wanted}", applied)

    def stop_writes(self, instance: Instance) -> None:
        """Turn the writer read-only and end the client sessions, as RDS does before a
        planned failover; nothing more is acknowledged after this returns."""
        self.set_read_only(instance, True)
        with self._connect(instance) as conn:
            conn.execute(
                "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid()")

    # ---- blue/green -------------------------------------------------------------------------
    def end_client_sessions(self, instance: Instance) -> None:
        if not instance.runtime.is_running():
            return
        with self._connect(instance) as conn:
            conn.execute(END_CLIENT_SESSIONS)

    def copy_data(self, source: Instance, target: Instance) -> None:
        """``pg_dump`` of the application database's ``public`` tables and sequences (with
        their owners, grants and rows; ``--clean``) from ``source``, replayed on ``target``
        by ``psql`` as the superuser over the Unix sockets."""
        import subprocess

        from .local import _pg_bindir

        src: LocalServer = source.runtime
        dst: LocalServer = target.runtime
        with self._connect(source, src.database) as conn:
            found = conn.execute("SELECT count(*) FROM pg_catalog.pg_class AS c JOIN "
                                 "pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace "
                                 "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'S', 'p')"
                                 ).fetchone()
        if not found or not found[0]:
            return  # nothing to copy (pg_dump -t refuses a pattern that matches nothing)
        bindir = _pg_bindir()
        dump = subprocess.run(
            [str(bindir / "pg_dump"), "-h", str(src.socket_dir), "-p", str(src.port),
             "-U", _SUPERUSER, "-d", src.database, "-t", "public.*", "--clean",
             "--if-exists"],
            capture_output=True, check=False, timeout=60)
        if dump.returncode != 0:
            raise ClusterError(f"pg_dump of {source.id} failed: "
                               f"{dump.stderr.decode(errors='replace').strip()}")
        env = {**os.environ, "PGOPTIONS": "-c synchronous_commit=local "
                                           "-c default_transaction_read_only=off"}
        load = subprocess.run(
            [str(bindir / "psql"), "-h", str(dst.socket_dir), "-p", str(dst.port),
             "-U", _SUPERUSER, "-d", dst.database, "-q", "-v", "ON_ERROR_STOP=1",
             "--single-transaction"],
            input=dump.stdout, capture_output=True, check=False, timeout=60, env=env)
        if load.returncode != 0:
            raise ClusterError(f"loading {source.id}'s data into {target.id} failed: "
                               f"{load.stderr.decode(errors='replace').strip()}")

    # ---- IAM (simulator.iam) ---------------------------------------------------------------
    def apply_iam(self, instance: Instance, iam: ClusterIam) -> None:
        server: LocalServer = instance.runtime
        server.hba_rules = [f'host    all          "{user}"  127.0.0.0/8   pam '
                            f"pamservice={iam.service}" for user in iam.users]
        self._apply(instance)
        if not server.is_running() or not iam.users:
            return
        # pg_hba.conf is re-read when the postmaster handles SIGHUP, asynchronously: wait
        # until a login of an IAM user goes to PAM (refused: the password is not a token).
        def uses_pam() -> bool:
            try:
                psycopg.connect(host=server.host, port=server.port, dbname=server.database,
                                user=iam.users[-1], password="-", connect_timeout=5).close()
            except psycopg.OperationalError as exc:
                return "PAM authentication failed" in str(exc)
            raise ClusterError(f"{instance.id}: IAM user {iam.users[-1]} logged in without "
                               "a token")

        self._wait_for(f"{instance.id} to send IAM logins to PAM", uses_pam)

    def create_iam_user(self, writer: Instance, user: str, iam: ClusterIam) -> None:
        with self._connect(writer, "postgres") as conn:
            # RDS's role for IAM users (GRANT rds_iam TO user); here the hba lines decide.
            conn.execute("DO $$ BEGIN CREATE ROLE rds_iam NOLOGIN; "
                         "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE rds_iam, {}").format(
                sql.Identifier(user), sql.Identifier(APP_USER)))
        exists = f"SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname = '{user}'"
        for reader in self.cluster.readers:  # synchronous commit waits for one of them
            self._wait_for(f"IAM user {user} to reach {reader.id}",
                           functools.partial(self._role_exists, reader, exists))

    def _role_exists(self, instance: Instance, query: str) -> bool:
        return bool(self._query_one(instance, query) == 1)


def _cpu(instance_id: str) -> float:
    """A plausible, stable CPU percentage for an instance's status row."""
    return 1.0 + hashlib.sha256(instance_id.encode()).digest()[0] / 32.0


register_engine(sorted(PgClusterEngine.flavours), PgClusterEngine)
