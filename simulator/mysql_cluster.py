"""The MariaDB engine of the cluster simulator: RDS Multi-AZ MySQL, the Aurora MySQL look-alike,
RDS for MySQL and plain MySQL (``../shared/AURORA_INTERFACE.md``; ``docs/simulator.md``,
"MariaDB flavours", says what differs from the real services).

Flavours (see :data:`simulator.cluster.FLAVOURS`):

- ``multi-az-mysql``: writer + two readers; ``mysql.rds_topology (id, endpoint, port)`` on the
  writer (replicated), ``@@server_id`` equal to the instance's topology ``id``,
  ``SHOW REPLICA STATUS`` on readers naming the writer's server id, ``report_host`` set and
  ``version_comment`` 'Source distribution' (the launcher's patched binary).
- ``aurora-mysql``: writer + 0-15 readers; ``aurora_sim.replica_host_status`` (a view with
  the five columns of Aurora's that clients read) and ``aurora_sim.aurora_server_id()`` stand in for
  ``information_schema.replica_host_status`` and ``@@aurora_server_id``, which MariaDB cannot
  define. Read it with ``aurora_mysql_lookalike_schema="aurora_sim"``.
- ``rds-mysql`` / ``mysql``: a single instance (no readers).

Replication is real: GTID replication (``MASTER_USE_GTID=slave_pos``, ``gtid_strict_mode``,
``log_slave_updates`` so that every instance's binary log holds the whole history) made
semi-synchronous with ``rpl_semi_sync_master_wait_point=AFTER_SYNC``: a commit is acknowledged
only once a reader has it in its relay log, and promotion picks the reader that received the
most (and applies everything it received first), so no acknowledged commit is lost. A replica
is provisioned from the same template as the writer and replicates the writer's binary log
from its very beginning. Readers run with ``read_only=ON``; applications connect as the
unprivileged user in :attr:`MysqlClusterEngine.credentials`, whose writes a reader refuses with
error 1290 (MariaDB lets SUPER / READ_ONLY ADMIN users write on a read-only server; the
superuser is kept for the control plane).

Options that depend on an instance's role (``read_only``, ``init_rpl_role``) are part of the
server's launcher settings (:meth:`LocalServer.reconfigure`), so that a restart (reboot, a
crashed instance started again) comes back in its current role; an old writer restarts with
``init-rpl-role=SLAVE``, which makes crash recovery roll back the transactions it wrote to its
binary log but never got acknowledged (MariaDB >= 10.11.9).

Blue/green (``aurora-mysql``, ``rds-mysql``): ``mysql.rds_topology (version, endpoint, port,
role, status)``, the table RDS uses for blue/green metadata on MySQL (a Multi-AZ cluster uses
the same name for its topology, so it has no blue/green here).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .cluster import (
    BlueGreenRow,
    Cluster,
    ClusterEngine,
    ClusterError,
    Instance,
    register_engine,
)
from .local import LocalServer, ServerStartError, SettingValue, reset_mariadb_data

if TYPE_CHECKING:
    from .iam import ClusterIam

__all__ = ["LOOKALIKE_SCHEMA", "MysqlClusterEngine", "gtid_seq"]

LOGGER = logging.getLogger("resilient_db.simulator")

#: Schema of the Aurora MySQL look-alike (the value for ``aurora_mysql_lookalike_schema``).
LOOKALIKE_SCHEMA = "aurora_sim"
#: Aurora's ``SESSION_ID`` of the writer row.
WRITER_SESSION_ID = "MASTER_SESSION_ID"

_FLAVOURS = ("aurora-mysql", "multi-az-mysql", "mysql", "rds-mysql")
# Seconds the control plane waits for a replica to connect, drain or catch up.
_CATCH_UP_TIMEOUT = 30.0
_POLL = 0.01
#: The PAM plugin of IAM users: version 1 runs PAM inside mariadbd as the mysql user (version 2
#: needs the setuid helper auth_pam_tool, which Debian's package may not install).
_PAM_PLUGIN = "auth_pam_v1"
#: Seconds an IAM user created on the writer may take to reach every reader.
_IAM_USER_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------------
# Small helpers


def gtid_seq(position: str | None, domain: int = 0) -> int:
    """The highest sequence number of ``domain`` in a GTID position such as ``0-11-42``
    (comma-separated lists allowed); 0 for an empty position."""
    best = 0
    for item in (position or "").split(","):
        parts = item.strip().split("-")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and int(parts[0]) == domain:
            best = max(best, int(parts[2]))
    return best


class _Sql:
    """A superuser connection to one server, autocommit, with a few conveniences."""

    def __init__(self, conn: Any, name: str) -> None:
        self.conn = conn
        self.name = name

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        cursor = self.conn.cursor()
        try:
            cursor.execute(sql, tuple(params))
            if cursor.with_rows:
                cursor.fetchall()
        finally:
            cursor.close()

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.conn.cursor(dictionary=True)
        try:
            cursor.execute(sql, tuple(params))
            return list(cursor.fetchall()) if cursor.with_rows else []
        finally:
            cursor.close()

    def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = self.conn.cursor()
        try:
            cursor.execute(sql, tuple(params))
            row = cursor.fetchone()
            cursor.fetchall()
            return None if row is None else row[0]
        finally:
            cursor.close()

    def replica_status(self) -> dict[str, Any] | None:
        """``SHOW REPLICA STATUS`` as a dict; ``None`` when no replication is configured."""
        found = self.rows("SHOW REPLICA STATUS")
        return found[0] if found else None

    def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Run ``statements`` in one transaction (readers never see a half-written table)."""
        self.run("START TRANSACTION")
        try:
            for sql, params in statements:
                self.run(sql, params)
            self.run("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                self.run("ROLLBACK")
            raise


# --------------------------------------------------------------------------------------------
# The engine


class MysqlClusterEngine(ClusterEngine):
    """Engine primitives of the MariaDB flavours (see the module docstring)."""

    flavours: ClassVar[frozenset[str]] = frozenset(_FLAVOURS)

    #: Seconds a commit waits for a reader's acknowledgement before the writer falls back to
    #: asynchronous replication. Large on purpose: while a reader is connected the cluster
    #: never silently stops being durable (a writer whose readers are all unreachable stalls
    #: instead). With no reader connected at all, commits do not wait
    #: (``rpl_semi_sync_master_wait_no_slave=OFF``).
    semi_sync_timeout: ClassVar[float] = 3600.0

    #: The application user: DML and DDL on database ``test``, ``SLAVE MONITOR`` (to read
    #: ``SHOW REPLICA STATUS``), read access to the topology; no SUPER, READ_ONLY ADMIN or
    #: BINLOG ADMIN, so a read-only server refuses its writes (error 1290).
    app_user: ClassVar[str] = "app"
    app_password: ClassVar[str] = "app"
    repl_user: ClassVar[str] = "repl"
    repl_password: ClassVar[str] = "repl"

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster)
        self.interface = cluster.flavour.interface
        #: Read by :meth:`Cluster.connect_kwargs`: applications connect as this user.
        self.credentials = {"user": self.app_user, "password": self.app_password}
        self._lock = threading.RLock()
        self._server_ids: dict[str, int] = {}
        self._session_ids: dict[str, str] = {}
        # Aurora look-alike: the role an instance last reported, and when a stopped instance
        # was first seen stopped (its row keeps that LAST_UPDATE_TIMESTAMP).
        self._reported_role: dict[str, str] = {}
        self._down_since: dict[str, float] = {}
        self._writer_id: str | None = None
        # Deposed writer -> sequence number the new writer had when promoted: anything the old
        # writer has beyond it was never acknowledged and must not come back.
        self._fork_points: dict[str, int] = {}
        # Configured replica lag (MASTER_DELAY) per instance; promotion clears it (RESET SLAVE
        # ALL forgets it), whatever Instance.lag still says.
        self._delays: dict[str, float] = {}

    # --- servers ----------------------------------------------------------------------------
    def _settings(self, instance_id: str, *, replica: bool,
                  read_only: bool) -> dict[str, SettingValue]:
        """The launcher settings of an instance in a role (the whole set: they replace the
        previous ones)."""
        settings: dict[str, SettingValue] = {
            "server_id": self._server_ids[instance_id],
            "gtid_domain_id": 0,
            "gtid_strict_mode": "ON",
            "log_slave_updates": "ON",
            "rpl_semi_sync_master_enabled": "ON",
            "rpl_semi_sync_slave_enabled": "ON",
            "rpl_semi_sync_master_wait_point": "AFTER_SYNC",
            "rpl_semi_sync_master_wait_no_slave": "OFF",
            "rpl_semi_sync_master_timeout": int(self.semi_sync_timeout * 1000),
            # Stored functions of the look-alike are created while binary logging is on.
            "log_bin_trust_function_creators": "ON",
            "read_only": "ON" if read_only else "OFF",
        }
        if self.cluster.iam is not None:
            settings.update(self._iam_settings(self.cluster.iam))
        if replica:
            # Crash recovery of a server that comes back as a replica rolls back what it wrote
            # to its binary log without an acknowledgement (MariaDB >= 10.11.9, MDEV-33465).
            settings["init_rpl_role"] = "SLAVE"
        if self.interface != "plain":
            # RDS sets report_host; the dialects recognise RDS by it.
            settings["report_host"] = self.cluster.naming.instance(instance_id)
        return settings

    def _configure(self, instance: Instance, *, replica: bool, read_only: bool) -> None:
        """Make the next start of ``instance`` come up in this role."""
        self._server(instance).reconfigure(
            self._settings(instance.id, replica=replica, read_only=read_only))

    def _new_server_id(self) -> int:
        # RDS server ids are large numbers; any distinct values in 1..2^32-1 replicate.
        taken = set(self._server_ids.values())
        while True:
            candidate = 1_000_000_000 + secrets.randbelow(1_000_000_000)
            if candidate not in taken:
                return candidate

    def server_id(self, instance_id: str) -> int:
        """``@@server_id`` of an instance (its ``id`` in ``mysql.rds_topology``)."""
        try:
            return self._server_ids[instance_id]
        except KeyError:
            raise ClusterError(f"no instance {instance_id!r}") from None

    def _create_server(self, instance_id: str, *, replica: bool) -> LocalServer:
        self._server_ids[instance_id] = self._new_server_id()
        self._session_ids[instance_id] = str(uuid.uuid4())
        launcher_flavour = "mysql" if self.interface == "plain" else "rds-mysql"
        try:
            server = self.cluster.server_class.create(
                "mariadb", launcher_flavour, port=self.cluster.port,
                settings=self._settings(instance_id, replica=replica, read_only=replica),
                name=f"{self.cluster.name}-{instance_id}"[:63])
        except BaseException:
            self._forget(instance_id)
            raise
        try:
            server.start()
        except BaseException:
            self._forget(instance_id)
            server.stop()
            raise
        return server

    @contextlib.contextmanager
    def _sql(self, server: LocalServer, timeout: float = 10.0) -> Iterator[_Sql]:
        import mysql.connector

        conn = mysql.connector.connect(**server.connect_kwargs(), use_pure=True,
                                       autocommit=True, connection_timeout=timeout)
        try:
            yield _Sql(conn, server.name)
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _server(self, instance: Instance) -> LocalServer:
        runtime = instance.runtime
        if not isinstance(runtime, LocalServer):
            raise ClusterError(f"{instance.id}: the MariaDB engine needs a LocalServer runtime, "
                               f"got {type(runtime).__name__}")
        return runtime

    # --- ClusterEngine: creation ----------------------------------------------------------
    def create_writer(self, instance_id: str) -> Any:
        server = self._create_server(instance_id, replica=False)
        self._writer_id = instance_id
        return server

    def create_replica(self, instance_id: str, source: Instance) -> Any:
        server = self._create_server(instance_id, replica=True)
        try:
            if self.interface == "aurora":
                # The id must answer aurora_server_id() on the new reader before it is listed.
                with self._sql(self._server(source)) as sql:
                    sql.run(f"REPLACE INTO {LOOKALIKE_SCHEMA}.instance_ids VALUES (%s, %s)",
                            (self._server_ids[instance_id], instance_id))
            with self._sql(server) as sql:
                self._point_at(sql, source, delay=0)
                sql.run("START SLAVE")
            self._await_joined(server, source, applied=True)
        except BaseException:
            self._forget(instance_id)
            server.stop()
            raise
        return server

    def install_interface(self, writer: Instance) -> None:
        app = f"'{self.app_user}'@'%'"
        statements = [
            f"CREATE USER '{self.repl_user}'@'127.%' IDENTIFIED BY '{self.repl_password}'",
            f"GRANT REPLICATION SLAVE ON *.* TO '{self.repl_user}'@'127.%'",
            f"CREATE USER {app} IDENTIFIED BY '{self.app_password}'",
            f"GRANT ALL PRIVILEGES ON `{self._server(writer).database}`.* TO {app}",
            # SHOW REPLICA STATUS (Multi-AZ: the writer's id, seen from a reader).
            f"GRANT SLAVE MONITOR ON *.* TO {app}",
        ]
        if self.interface == "multi-az":
            statements += [
                "CREATE TABLE mysql.rds_topology (id BIGINT UNSIGNED NOT NULL PRIMARY KEY, "
                "endpoint VARCHAR(255) NOT NULL, port INT UNSIGNED NOT NULL) ENGINE=InnoDB",
                f"GRANT SELECT ON mysql.rds_topology TO {app}",
            ]
        elif self.interface == "aurora":
            schema = LOOKALIKE_SCHEMA
            statements += [
                f"CREATE DATABASE {schema}",
                # @@server_id -> instance id, for aurora_server_id() on every instance.
                f"CREATE TABLE {schema}.instance_ids (server_num INT UNSIGNED NOT NULL "
                "PRIMARY KEY, SERVER_ID VARCHAR(100) NOT NULL) ENGINE=InnoDB",
                f"CREATE FUNCTION {schema}.aurora_server_id() RETURNS VARCHAR(100) "
                "NOT DETERMINISTIC READS SQL DATA SQL SECURITY DEFINER "
                f"RETURN (SELECT SERVER_ID FROM {schema}.instance_ids "
                "WHERE server_num = @@server_id)",
                # One row per instance as the control plane last saw it; FROZEN_AT NULL means
                # "reporting now", else the time of its last report (stopped or made stale).
                f"CREATE TABLE {schema}.instance_status (SERVER_ID VARCHAR(100) NOT NULL "
                "PRIMARY KEY, SESSION_ID VARCHAR(100) NOT NULL, CPU DOUBLE NOT NULL, "
                "REPLICA_LAG_IN_MILLISECONDS DOUBLE NOT NULL, FROZEN_AT DATETIME(6) NULL, "
                "AWS_REGION VARCHAR(64) NOT NULL DEFAULT '') ENGINE=InnoDB",
                # A Global Database lists the instances of the region connected to.
                f"CREATE SQL SECURITY DEFINER VIEW {schema}.replica_host_status AS "
                "SELECT t.SERVER_ID, t.SESSION_ID, t.CPU, t.REPLICA_LAG_IN_MILLISECONDS, "
                "COALESCE(t.FROZEN_AT, NOW(6)) AS LAST_UPDATE_TIMESTAMP "
                f"FROM {schema}.instance_status AS t WHERE t.AWS_REGION = COALESCE(("
                f"SELECT s.AWS_REGION FROM {schema}.instance_status AS s "
                f"WHERE s.SERVER_ID = {schema}.aurora_server_id()), t.AWS_REGION)",
                # Aurora Global Database: every instance of every region.
                # (a writer that stopped reporting is not listed as the writer: the regional
                # view's transient double writer claim has timestamps, this one has none)
                f"CREATE SQL SECURITY DEFINER VIEW {schema}.aurora_global_db_instance_status AS "
                "SELECT SERVER_ID, IF(SESSION_ID = 'MASTER_SESSION_ID' AND FROZEN_AT IS NOT "
                "NULL, CONCAT('stopped-', SERVER_ID), SESSION_ID) AS SESSION_ID, AWS_REGION, "
                "IF(SESSION_ID = 'MASTER_SESSION_ID', NULL, REPLICA_LAG_IN_MILLISECONDS) "
                "AS VISIBILITY_LAG_IN_MSEC, 0 AS DURABLE_LSN, 0 AS HIGHEST_LSN_RCVD, "
                "0 AS OLDEST_READ_VIEW_TRX_ID, 0 AS OLDEST_READ_VIEW_LSN "
                f"FROM {schema}.instance_status",
                f"CREATE SQL SECURITY DEFINER VIEW {schema}.aurora_global_db_status AS "
                "SELECT AWS_REGION, 0 AS HIGHEST_LSN_WRITTEN, "
                "IF(MAX(SESSION_ID = 'MASTER_SESSION_ID'), -1, "
                "MAX(REPLICA_LAG_IN_MILLISECONDS)) AS DURABILITY_LAG_IN_MILLISECONDS, "
                "IF(MAX(SESSION_ID = 'MASTER_SESSION_ID'), -1, "
                "MAX(REPLICA_LAG_IN_MILLISECONDS)) AS RPO_LAG_IN_MILLISECONDS, "
                "NOW(6) AS LAST_LAG_CALCULATION_TIME, 0 AS OLDEST_READ_VIEW_TRX_ID "
                f"FROM {schema}.instance_status GROUP BY AWS_REGION",
                f"GRANT SELECT, EXECUTE ON {schema}.* TO {app}",
            ]
        with self._sql(self._server(writer)) as sql:
            for statement in statements:
                sql.run(statement)
            if self.interface == "aurora":
                sql.run(f"INSERT INTO {LOOKALIKE_SCHEMA}.instance_ids VALUES (%s, %s)",
                        (self._server_ids[writer.id], writer.id))

    # --- ClusterEngine: topology ----------------------------------------------------------
    def publish_topology(self, writer: Instance) -> None:
        with self._lock:
            for gone in set(self._server_ids) - set(self.cluster.instances):
                self._forget(gone)
            if self.interface == "multi-az":
                self._publish_multi_az(writer)
            elif self.interface == "aurora":
                self._publish_aurora(writer)

    def _publish_multi_az(self, writer: Instance) -> None:
        # Multi-AZ membership is fixed: every instance is listed, whatever its state.
        statements: list[tuple[str, Sequence[Any]]] = [("DELETE FROM mysql.rds_topology", ())]
        statements += [("INSERT INTO mysql.rds_topology (id, endpoint, port) VALUES (%s, %s, %s)",
                        (self._server_ids[i.id], i.endpoint, i.port))
                       for i in self.cluster.instances.values()]
        with self._sql(self._server(writer)) as sql:
            sql.transaction(statements)

    def _publish_aurora(self, writer: Instance) -> None:
        now = time.time()
        schema = LOOKALIKE_SCHEMA
        statements: list[tuple[str, Sequence[Any]]] = [
            (f"DELETE FROM {schema}.instance_status", ()),
            (f"DELETE FROM {schema}.instance_ids", ()),
        ]
        for instance in self.cluster.instances.values():
            if instance.role == "stopped":
                # A stopped instance's row stays as it last reported, then goes stale.
                frozen: float | None = self._down_since.setdefault(instance.id, now)
                role = self._reported_role.get(instance.id, "reader")
            else:
                self._down_since.pop(instance.id, None)
                frozen = None
                role = self._reported_role[instance.id] = instance.role
            if instance.status_age is not None:  # Cluster.set_status_age
                frozen = now - instance.status_age
            session = WRITER_SESSION_ID if role == "writer" else self._session_ids[instance.id]
            lag_ms = 0.0 if role == "writer" else self._delays.get(instance.id, 0.0) * 1000.0
            statements.append((
                f"INSERT INTO {schema}.instance_status VALUES "
                "(%s, %s, %s, %s, IF(%s IS NULL, NULL, FROM_UNIXTIME(%s)), %s)",
                (instance.id, session, _cpu(instance.id), lag_ms, frozen, frozen,
                 self.cluster.region_of(instance))))
            statements.append((f"INSERT INTO {schema}.instance_ids VALUES (%s, %s)",
                               (self._server_ids[instance.id], instance.id)))
        with self._sql(self._server(writer)) as sql:
            sql.transaction(statements)

    def publish_blue_green(self, writer: Instance, rows: Sequence[BlueGreenRow]) -> None:
        """Blue/green metadata in ``mysql.rds_topology (version, endpoint, port, role,
        status)``, as RDS keeps it on MySQL (``aurora-mysql`` and ``rds-mysql``)."""
        if self.interface not in ("aurora", "rds"):
            # Multi-AZ: mysql.rds_topology is the cluster topology (id, endpoint, port).
            super().publish_blue_green(writer, rows)
        statements: list[tuple[str, Sequence[Any]]] = [("DELETE FROM mysql.rds_topology", ())]
        statements += [("INSERT INTO mysql.rds_topology (version, endpoint, port, role, status) "
                        "VALUES (%s, %s, %s, %s, %s)",
                        (row.version, row.endpoint, row.port, row.role, row.status))
                       for row in rows]
        with self._sql(self._server(writer)) as sql:
            sql.run("CREATE TABLE IF NOT EXISTS mysql.rds_topology (version VARCHAR(20) NOT NULL, "
                    "endpoint VARCHAR(255) NOT NULL, port INT UNSIGNED NOT NULL, "
                    "role VARCHAR(64) NOT NULL, status VARCHAR(64) NOT NULL) ENGINE=InnoDB")
            for user in (self.app_user, *(self.cluster.iam.users if self.cluster.iam else ())):
                sql.run(f"GRANT SELECT ON mysql.rds_topology TO '{user}'@'%'")
            sql.transaction(statements)

    def _forget(self, instance_id: str) -> None:
        tables: tuple[dict[str, Any], ...] = (
            self._server_ids, self._session_ids, self._reported_role, self._down_since,
            self._fork_points, self._delays)
        for table in tables:
            table.pop(instance_id, None)

    # --- ClusterEngine: replication -------------------------------------------------------
    def replication_position(self, instance: Instance) -> Any:
        """The GTID sequence number (domain 0) of the last transaction the instance has
        *received*: what it wrote to its binary log, applied, or holds in its relay log."""
        server = self._server(instance)
        if not server.is_running():
            return None
        with self._sql(server, timeout=5.0) as sql:
            binlog, applied = (sql.rows("SELECT @@gtid_binlog_pos AS b, @@gtid_slave_pos AS s")
                               [0].values())
            status = sql.replica_status()
        received = status["Gtid_IO_Pos"] if status else ""
        return max(gtid_seq(binlog), gtid_seq(applied), gtid_seq(received))

    def _point_at(self, sql: _Sql, source: Instance, delay: float) -> None:
        """Configure (not start) replication from ``source``, from where this server is."""
        # gtid_current_pos is the binary log position for a server that wrote its own
        # transactions last (an old writer), else the replication position.
        sql.run("SET GLOBAL gtid_slave_pos = @@gtid_current_pos")
        sql.run("CHANGE MASTER TO MASTER_HOST = %s, MASTER_PORT = %s, MASTER_USER = %s, "
                "MASTER_PASSWORD = %s, MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1, "
                "MASTER_DELAY = %s",
                (source.address, source.port, self.repl_user, self.repl_password,
                 math.ceil(delay)))

    def _drain(self, sql: _Sql) -> None:
        """Stop replicating and apply everything already received, at once (also what a
        ``MASTER_DELAY`` holds back). Leaves the replication threads stopped."""
        sql.run("STOP SLAVE")
        status = sql.replica_status()
        if status is None:
            return
        received = status["Gtid_IO_Pos"] or ""
        if gtid_seq(received) <= gtid_seq(sql.value("SELECT @@gtid_slave_pos")):
            return
        # Naming the relay log position keeps the relay log (a bare CHANGE MASTER deletes it,
        # and the writer that sent it may be gone); starting only the SQL thread applies it.
        sql.run("CHANGE MASTER TO MASTER_DELAY = 0, RELAY_LOG_FILE = %s, RELAY_LOG_POS = %s",
                (status["Relay_Log_File"], status["Relay_Log_Pos"]))
        LOGGER.info("%s: applying its relay log up to %s before it is promoted", sql.name,
                    received)
        sql.run("START SLAVE SQL_THREAD")
        try:
            done = sql.value("SELECT MASTER_GTID_WAIT(%s, %s)", (received, _CATCH_UP_TIMEOUT))
        finally:
            sql.run("STOP SLAVE SQL_THREAD")
        if done != 0:
            status = sql.replica_status() or {}
            raise ClusterError(f"{sql.name} could not apply its relay log up to {received} "
                               f"within {_CATCH_UP_TIMEOUT:g} s: {status.get('Last_SQL_Error')}")

    def _catch_up(self, target: Instance, source: Instance) -> None:
        """Copy to ``target`` what the more advanced reader ``source`` received (a targeted
        failover to a reader that is behind must not lose acknowledged commits)."""
        with self._sql(self._server(source)) as sql:
            self._drain(sql)
            wanted = sql.value("SELECT @@gtid_binlog_pos")
        with self._sql(self._server(target)) as sql:
            self._point_at(sql, source, delay=0)
            sql.run("START SLAVE")
            try:
                done = sql.value("SELECT MASTER_GTID_WAIT(%s, %s)", (wanted, _CATCH_UP_TIMEOUT))
            finally:
                sql.run("STOP SLAVE")
        if done != 0:
            raise ClusterError(f"{target.id} could not catch up with {source.id} ({wanted})")
        LOGGER.info("%s caught up with the more advanced reader %s before its promotion",
                    target.id, source.id)

    def promote(self, instance: Instance) -> None:
        with self._lock:
            server = self._server(instance)
            with self._sql(server) as sql:
                self._drain(sql)
            position = self.replication_position(instance)
            ahead = [(self.replication_position(r), r) for r in self.cluster.readers
                     if r is not instance and r.runtime.is_running()]
            best = max(ahead, key=lambda pair: pair[0] or 0, default=None)
            if best is not None and (best[0] or 0) > (position or 0):
                self._catch_up(instance, best[1])
            self._configure(instance, replica=False, read_only=False)
            with self._sql(server) as sql:
                sql.run("STOP SLAVE")
                sql.run("RESET SLAVE ALL")
                sql.run("SET GLOBAL read_only = OFF")
                fork = gtid_seq(sql.value("SELECT @@gtid_binlog_pos"))
            self._delays.pop(instance.id, None)
            deposed = self._writer_id
            if deposed is not None and deposed != instance.id:
                self._fork_points[deposed] = fork
            self._writer_id = instance.id

    def following(self, writer: Instance, readers: Sequence[Instance]) -> bool:
        # Connected (IO thread) too: with no reader connected MariaDB commits without waiting
        # for one (semi-sync falls back), and a crash would lose those commits.
        writer_id = self.server_id(writer.id)
        status = self.status()
        return all(status[r.id].get("replica", {}).get("Master_Server_Id") == writer_id
                   and status[r.id]["replica"]["Slave_SQL_Running"] == "Yes"
                   and status[r.id]["replica"]["Slave_IO_Running"] == "Yes"
                   for r in readers)

    def detach_replicas(self, dead: Instance, replicas: Sequence[Instance]) -> None:
        """``STOP SLAVE`` on every running replica, in parallel. MariaDB's STOP SLAVE waits
        in 2 s rounds for an IO thread that is stuck connecting to a blackholed master; doing
        it here, inside the detection window and on all replicas at once, keeps that wait out
        of promotion and re-pointing (what they read, the received relay log, is kept)."""
        def stop(replica: Instance) -> None:
            server = self._server(replica)
            if not server.is_running():
                return
            try:
                with self._sql(server) as sql:
                    sql.run("STOP SLAVE")
            except Exception as exc:  # promotion and follow stop it again anyway
                LOGGER.info("%s: STOP SLAVE before promotion failed: %s", replica.id, exc)

        threads = [threading.Thread(target=stop, args=(r,), daemon=True,
                                    name=f"resilient_db-sim-detach-{r.id}") for r in replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30.0)

    def follow(self, replica: Instance, writer: Instance) -> None:
        server = self._server(replica)
        if not server.is_running():
            return  # configured when it is started again (rejoin)
        with self._sql(server) as sql:
            sql.run("STOP SLAVE")
            self._point_at(sql, writer, delay=self._delays.get(replica.id, 0.0))
            sql.run("START SLAVE")
        self._await_connected(server, writer)

    def _await_connected(self, server: LocalServer, writer: Instance,
                         timeout: float = 5.0) -> None:
        """Wait until the replica's I/O thread is connected to ``writer``, so that
        ``SHOW REPLICA STATUS`` names the new writer when the topology is published."""
        wanted = self._server_ids.get(writer.id)
        deadline = time.monotonic() + timeout
        with self._sql(server) as sql:
            while True:
                status = sql.replica_status() or {}
                if (status.get("Slave_IO_Running") == "Yes"
                        and status.get("Master_Server_Id") == wanted):
                    return
                if status.get("Last_IO_Errno") or time.monotonic() > deadline:
                    LOGGER.warning("%s is not connected to %s yet: %s", server.name, writer.id,
                                   status.get("Last_IO_Error") or status.get("Slave_IO_State"))
                    return
                time.sleep(_POLL)

    def _await_joined(self, server: LocalServer, writer: Instance, *, applied: bool,
                      timeout: float = _CATCH_UP_TIMEOUT) -> str | None:
        """Wait until ``server`` has received (``applied``: applied) what ``writer`` had
        when this began. Returns the replication error that stopped it, else ``None``."""
        with self._sql(self._server(writer)) as sql:
            target = gtid_seq(sql.value("SELECT @@gtid_binlog_pos"))
        deadline = time.monotonic() + timeout
        with self._sql(server) as sql:
            while True:
                status = sql.replica_status() or {}
                for kind in ("IO", "SQL"):
                    if status.get(f"Last_{kind}_Errno"):
                        return f"{status[f'Last_{kind}_Errno']}: {status[f'Last_{kind}_Error']}"
                done = gtid_seq(sql.value("SELECT @@gtid_slave_pos"))
                if not applied:
                    done = max(done, gtid_seq(status.get("Gtid_IO_Pos")))
                running = (status.get("Slave_IO_Running"), status.get("Slave_SQL_Running"))
                if running == ("Yes", "Yes") and done >= target:
                    return None
                if time.monotonic() > deadline:
                    raise ClusterError(f"{server.name} did not catch up with {writer.id} "
                                       f"(seq {target}) within {timeout:g} s")
                time.sleep(_POLL)

    def rejoin(self, old_writer: Instance, writer: Instance) -> None:
        with self._lock:
            server = self._server(old_writer)
            self._configure(old_writer, replica=True, read_only=True)
            if server.is_running():
                with self._sql(server) as sql:
                    sql.run("SET GLOBAL read_only = ON")
            else:
                try:
                    server.start()
                except ServerStartError:
                    # Crash recovery failed (an instance SIGKILLed mid-write, e.g. a region
                    # lost in a global failover): as RDS does for a re-added secondary
                    # cluster, start from fresh storage and replicate everything again.
                    LOGGER.warning("%s did not recover from its crash; rebuilding it",
                                   old_writer.id, exc_info=True)
                    reset_mariadb_data(server)
                    server.start()
                    self._fork_points.pop(old_writer.id, None)
            self._session_ids[old_writer.id] = str(uuid.uuid4())  # a new session
            fork = self._fork_points.pop(old_writer.id, None)
            if fork is not None:
                with self._sql(server) as sql:
                    has = gtid_seq(sql.value("SELECT @@gtid_binlog_pos"))
                if has > fork:
                    LOGGER.warning("%s has transactions up to seq %d beyond the new writer's "
                                   "%d; rebuilding it", old_writer.id, has, fork)
                    self._rebuild(server)
            error = self._replicate(server, writer)
            if error is not None:
                LOGGER.warning("%s cannot replicate from %s (%s); rebuilding it",
                               old_writer.id, writer.id, error)
                self._rebuild(server)
                error = self._replicate(server, writer)
                if error is not None:
                    raise ClusterError(f"{old_writer.id} cannot replicate from {writer.id} "
                                       f"even after a rebuild: {error}")

    def _replicate(self, server: LocalServer, writer: Instance) -> str | None:
        instance = next(i for i in self.cluster.instances.values() if i.runtime is server)
        with self._sql(server) as sql:
            sql.run("STOP SLAVE")
            self._point_at(sql, writer, delay=self._delays.get(instance.id, 0.0))
            sql.run("START SLAVE")
        return self._await_joined(server, writer, applied=False)

    def _rebuild(self, server: LocalServer) -> None:
        """A fresh copy of the template that will replicate everything again."""
        server.stop(cleanup=False)
        reset_mariadb_data(server)
        server.start()

    # --- IAM (simulator.iam) ---------------------------------------------------------------
    @staticmethod
    def _iam_settings(iam: ClusterIam) -> dict[str, str]:
        """Server options of an IAM-enabled cluster: the PAM plugin, clients sending the token
        with mysql_clear_password (pam_use_cleartext_plugin) and TLS, without which
        mysql-connector refuses to send a cleartext password (and RDS refuses IAM logins)."""
        cert, key = iam.tls_files()
        return {"plugin_load_add": _PAM_PLUGIN, "loose_pam_use_cleartext_plugin": "ON",
                "ssl_cert": str(cert), "ssl_key": str(key)}

    def apply_iam(self, instance: Instance, iam: ClusterIam) -> None:
        server = self._server(instance)
        wanted = {**server.settings, **self._iam_settings(iam)}
        if wanted == server.settings:
            return  # created with them (a reader added after enable_iam)
        server.reconfigure(wanted)
        if server.is_running():
            # The plugin's options and TLS are read at startup only: restart in place, as RDS
            # reboots an instance to apply static parameters. Readers resume replicating on
            # their own; they reconnect to a restarted writer within MASTER_CONNECT_RETRY.
            LOGGER.info("%s: restarting to enable IAM (PAM plugin, TLS)", instance.id)
            server.stop(cleanup=False)
            server.start()
            with self._sql(server) as sql:
                if sql.value("SELECT @@have_ssl") != "YES":
                    raise ClusterError(f"{instance.id}: TLS did not come up for IAM logins; "
                                       f"see {server.log_path}")

    def create_iam_user(self, writer: Instance, user: str, iam: ClusterIam) -> None:
        account = f"'{user}'@'%'"
        with self._sql(self._server(writer)) as sql:
            sql.run(f"CREATE USER {account} IDENTIFIED VIA pam USING '{iam.service}'")
            # The application user's privileges (database, SLAVE MONITOR, the topology).
            app = f"`{self.app_user}`@`%`"
            for row in sql.rows(f"SHOW GRANTS FOR '{self.app_user}'@'%'"):
                grant = re.sub(r" IDENTIFIED BY PASSWORD '[^']*'", "", next(iter(row.values())))
                sql.run(grant.replace(f" TO {app}", f" TO {account}"))
        deadline = time.monotonic() + _IAM_USER_TIMEOUT
        for reader in self.cluster.readers:
            with self._sql(self._server(reader)) as sql:
                while not sql.value("SELECT COUNT(*) FROM mysql.global_priv WHERE User = %s",
                                    (user,)):
                    if time.monotonic() > deadline:
                        raise ClusterError(f"IAM user {user} did not reach {reader.id} within "
                                           f"{_IAM_USER_TIMEOUT:g} s")
                    time.sleep(_POLL)

    # --- ClusterEngine: knobs -------------------------------------------------------------
    def set_read_only(self, instance: Instance, read_only: bool) -> None:
        server = self._server(instance)
        self._configure(instance, replica=False, read_only=read_only)  # survives a reboot
        with self._sql(server) as sql:
            # read_only waits for running transactions; do not hang behind an idle one.
            sql.run("SET SESSION lock_wait_timeout = 10")
            sql.run(f"SET GLOBAL read_only = {'ON' if read_only else 'OFF'}")

    def set_replica_lag(self, instance: Instance, seconds: float) -> None:
        """``MASTER_DELAY`` (whole seconds, rounded up): the reader receives (and acknowledges)
        at once but applies each transaction ``seconds`` after the writer committed it."""
        with self._sql(self._server(instance)) as sql:
            sql.run("STOP SLAVE")
            sql.run("CHANGE MASTER TO MASTER_DELAY = %s", (math.ceil(seconds),))
            sql.run("START SLAVE")
        if seconds:
            self._delays[instance.id] = seconds
        else:
            self._delays.pop(instance.id, None)

    def stop_writes(self, instance: Instance) -> None:
        with self._sql(self._server(instance)) as sql:
            sql.run("SET SESSION lock_wait_timeout = 10")
            sql.run("SET GLOBAL read_only = ON")

    # --- blue/green ---------------------------------------------------------------------------
    def end_client_sessions(self, instance: Instance) -> None:
        server = self._server(instance)
        if not server.is_running():
            return
        users = (self.app_user, *(self.cluster.iam.users if self.cluster.iam else ()))
        with self._sql(server) as sql:
            rows = sql.rows("SELECT ID, USER FROM information_schema.PROCESSLIST "
                            "WHERE ID <> CONNECTION_ID()")
            for row in rows:
                if row["USER"] in users:
                    with contextlib.suppress(Exception):  # it may have ended meanwhile
                        sql.run(f"KILL CONNECTION {int(row['ID'])}")

    def copy_data(self, source: Instance, target: Instance) -> None:
        """``mariadb-dump`` of the application database (tables with their rows and
        ``AUTO_INCREMENT``; ``DROP TABLE IF EXISTS`` first) from ``source``, replayed on
        ``target`` by the ``mariadb`` client."""
        import shutil
        import subprocess

        src, dst = self._server(source), self._server(target)
        dump_tool = shutil.which("mariadb-dump") or shutil.which("mysqldump")
        client = shutil.which("mariadb") or shutil.which("mysql")
        if dump_tool is None or client is None:
            raise ClusterError("blue/green data copy needs mariadb-dump and mariadb")

        def command(tool: str, server: LocalServer) -> list[str]:
            kwargs = server.connect_kwargs()
            return [tool, "-h", str(kwargs["host"]), "-P", str(kwargs["port"]),
                    "-u", str(kwargs["user"]), f"-p{kwargs['password']}"]

        database = str(src.connect_kwargs()["database"])
        dump = subprocess.run(
            [*command(dump_tool, src), "--single-transaction", "--add-drop-table",
             "--skip-triggers", database],
            capture_output=True, check=False, timeout=60)
        if dump.returncode != 0:
            raise ClusterError(f"mariadb-dump of {source.id} failed: "
                               f"{dump.stderr.decode(errors='replace').strip()}")
        load = subprocess.run([*command(client, dst), database], input=dump.stdout,
                              capture_output=True, check=False, timeout=60)
        if load.returncode != 0:
            raise ClusterError(f"loading {source.id}'s data into {target.id} failed: "
                               f"{load.stderr.decode(errors='replace').strip()}")

    # --- views for tests and tools ----------------------------------------------------------
    def status(self) -> Mapping[str, Any]:
        """Engine facts per instance: server id and, for a running reader, its replication
        state (``SHOW REPLICA STATUS`` essentials)."""
        result: dict[str, Any] = {}
        for instance in self.cluster.instances.values():
            entry: dict[str, Any] = {"server_id": self._server_ids.get(instance.id)}
            server = self._server(instance)
            if server.is_running():
                with self._sql(server, timeout=5.0) as sql:
                    replica = sql.replica_status()
                    entry["gtid_current_pos"] = sql.value("SELECT @@gtid_current_pos")
                    entry["read_only"] = bool(sql.value("SELECT @@read_only"))
                if replica:
                    entry["replica"] = {key: replica.get(key) for key in (
                        "Master_Host", "Master_Server_Id", "Slave_IO_Running",
                        "Slave_SQL_Running", "SQL_Delay", "Seconds_Behind_Master",
                        "Gtid_IO_Pos", "Last_IO_Error", "Last_SQL_Error")}
            result[instance.id] = entry
        return result


def _cpu(instance_id: str) -> float:
    """A plausible, stable CPU percentage for an instance's status row."""
    return 1.0 + hashlib.sha256(instance_id.encode()).digest()[0] / 32.0


register_engine(_FLAVOURS, MysqlClusterEngine)
