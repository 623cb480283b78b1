"""Throwaway PostgreSQL and MariaDB servers, each on its own loopback address.

This is the instance runtime the cluster simulator builds on: it provisions a data directory
from a cached template, writes the server's configuration, runs the server binary as a child
process and tears everything down again. It knows nothing about replication or topology.

Usage::

    from simulator.local import start_postgres, start_mariadb

    with start_postgres() as srv:                 # or flavour="rds-pg"
        psycopg.connect(srv.conninfo())
    with start_mariadb(flavour="rds-mysql") as srv:
        mysql.connector.connect(**srv.connect_kwargs(), use_pure=True)

On-disk layout under the simulator root (``/dev/shm/resilient_db_sim`` if that is a roomy
tmpfs, else ``/tmp/resilient_db_sim``, see :func:`simulator._addresses.sim_root`),
world-traversable because the servers run as the unprivileged ``postgres`` / ``mysql`` users::

    templates/<key>/data      initialised data directory, copied for every server; <key> holds
                              the engine, binary version and a hash of the recipe
    templates/<key>/mariadbd-rds   (MariaDB) server binary for the rds-mysql flavour
    templates/<key>.lock      serialises building that template across processes
    servers/<host>-<port>/    one per server, owned by the server's OS user
        meta.json             owner process, server process, engine, address
        data/                 the data directory
        run/                  unix socket and pid file, outside data/ so that a base backup
                              never copies a lock file
        server.log            the server's log
        my.cnf                (MariaDB) the server's only option file
    addresses/<host>          claim on a loopback address (see simulator._addresses)

Lifetimes: a server belongs to the process that created it (its *owner*). ``stop()`` (and the
context manager) removes it; an ``atexit`` hook stops whatever the owner left running; the
server gets ``PR_SET_PDEATHSIG`` so it dies with its owner even on SIGKILL; and
:func:`sweep_stale`, run before every start, removes whatever dead owners left behind.

Only Linux is supported (``prctl``, ``/proc``).
"""

from __future__ import annotations

import abc
import atexit
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import ipaddress
import json
import logging
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from simulator._addresses import (
    ProcessIdentity,
    claim_address,
    ensure_dir,
    file_lock,
    free_port,
    port_is_free,
    registry_lock,
    release_address,
    release_address_locked,
    sim_root,
    sweep_address_claims,
    validate_host,
)

__all__ = [
    "Engine",
    "LocalServer",
    "ServerStartError",
    "SettingValue",
    "SimulatorError",
    "reset_mariadb_data",
    "start_mariadb",
    "start_postgres",
    "sweep_stale",
]

LOGGER = logging.getLogger("resilient_db.simulator")

Engine = Literal["postgresql", "mariadb"]
#: Values accepted in ``settings``; booleans become on/off.
SettingValue = str | int | float | bool

#: Seconds a server may take to accept connections before :class:`ServerStartError`. A
#: liveness bound, not a speed goal: a server starts in well under a second here, but in a
#: container on a 2-core machine with parallel test runs ``docker run`` alone took 17 s; a
#: server that exits is reported at once, so only a hung start waits this long.
DEFAULT_START_TIMEOUT = 120.0
#: Seconds a clean shutdown may take before the server is killed.
DEFAULT_STOP_TIMEOUT = 15.0
_TEMPLATE_BUILD_TIMEOUT = 300.0
_LOG_TAIL_LINES = 40
_META_VERSION = 1
# A base directory without meta.json is only ever a crash between mkdir and the first write.
_ORPHAN_DIR_GRACE = 60.0

_PR_SET_PDEATHSIG = 1
_IPC_RMID = 0
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,62}")
_OPTION_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class SimulatorError(RuntimeError):
    """Base class of the simulator's own errors (bad input raises ``ValueError``)."""


class ServerStartError(SimulatorError):
    """A server (or its template) could not be started; ``log_tail`` has the end of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail

    def __str__(self) -> str:
        if not self.log_tail:
            return self.message
        return f"{self.message}\n--- server log (tail) ---\n{self.log_tail}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.log_tail))


# --------------------------------------------------------------------------------------------
# OS accounts and child processes


@dataclasses.dataclass(frozen=True)
class _Account:
    """The OS account a server runs as; ``switch`` is False when we are not root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    switch: bool


def _server_account(user: str) -> _Account:
    """Account for ``user`` when running as root, else the current account (no switching)."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return _Account(me.pw_name, me.pw_uid, me.pw_gid, (), switch=False)
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SimulatorError(
            f"system user {user!r} does not exist; it is needed to run servers as root"
        ) from None
    groups = tuple(os.getgrouplist(user, entry.pw_gid))
    return _Account(user, entry.pw_uid, entry.pw_gid, groups, switch=True)


def _chown(path: Path, account: _Account) -> None:
    if account.switch:
        os.chown(path, account.uid, account.gid, follow_symlinks=False)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _prctl() -> Callable[..., int]:
    """libc ``prctl``, resolved in the parent so that the forked child does no dlopen."""
    function = _libc().prctl
    function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                         ctypes.c_ulong]
    function.restype = ctypes.c_int
    return function


class _ChildSetup:
    """``preexec_fn`` for server processes: drop privileges, then arm the parent-death signal.

    ``PR_SET_PDEATHSIG`` delivers SIGKILL to the server when its parent dies. Two caveats:

    * "Parent" is the *thread* that forked the child: a server forked by a worker thread
      would be killed when that thread exits, even though the process lives on. Servers are
      therefore forked by one long-lived spawner thread (:func:`_spawn`), whatever thread
      calls :meth:`LocalServer.start` (a control-plane timer, a daemon's request handler).
    * The kernel clears the setting whenever the credentials change, so it must be set
      *after* ``setuid``. If the parent already died before that point, the child exits.

    Only the server process itself is armed. PostgreSQL's own children notice the death of
    the postmaster by themselves (PostgreSQL arms them in the same way); a process group
    (``start_new_session``) lets :func:`sweep_stale` find any that linger.
    """

    def __init__(self, account: _Account, parent_pid: int) -> None:
        self._account = account
        self._parent_pid = parent_pid
        self._prctl = _prctl()

    def __call__(self) -> None:
        account = self._account
        if account.switch:
            os.setgroups(list(account.groups))
            os.setgid(account.gid)
            os.setuid(account.uid)
        if self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != self._parent_pid:
            os._exit(1)  # our parent died before the signal was armed


def _child_env(home: Path) -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C", "TZ": "UTC",
            "HOME": str(home)}


def _run_as(account: _Account, argv: list[str], *, cwd: Path, stdin_text: str | None = None,
            what: str, timeout: float = _TEMPLATE_BUILD_TIMEOUT) -> str:
    """Run a helper command (initdb, install script) as ``account``; return its output.

    Helpers are short-lived and run on the calling thread (which outlives them)."""
    LOGGER.debug("running %s", " ".join(argv))
    try:
        result = subprocess.run(
            argv, input=stdin_text, cwd=cwd, env=_child_env(cwd), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
            preexec_fn=_ChildSetup(account, os.getpid()), check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.output if isinstance(exc.output, str) else ""
        raise ServerStartError(f"{what} timed out", _tail(output)) from exc
    if result.returncode != 0:
        raise ServerStartError(f"{what} failed with exit code {result.returncode}",
                               _tail(result.stdout))
    return result.stdout


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


# One long-lived thread forks every server process, so that PR_SET_PDEATHSIG ties servers to
# the life of the process rather than to whichever thread happened to start them (see
# _ChildSetup). Created on first use, never at import. A daemon thread, not an executor:
# executor threads are joined before atexit handlers run, which would SIGKILL the servers
# before _stop_all_at_exit shuts them down cleanly.
_spawn_queue: queue.SimpleQueue[
    tuple[list[str], dict[str, Any], concurrent.futures.Future[subprocess.Popen[bytes]]]
] = queue.SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _spawner_loop() -> None:
    while True:
        argv, kwargs, future = _spawn_queue.get()
        try:
            future.set_result(subprocess.Popen(argv, **kwargs))
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)


def _spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **kwargs)``, forked by the spawner thread."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawner_loop, daemon=True,
                                        name="resilient_db-sim-spawner")
            _spawner.start()
    future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
    _spawn_queue.put((argv, kwargs, future))
    return future.result()


# --------------------------------------------------------------------------------------------
# Processes found through /proc (for leftovers whose parent is gone)


def _exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


def _group_members(pgid: int, exe: str) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid`` running the binary ``exe``.

    Matching the binary as well as the group keeps a recycled group id from pointing at an
    unrelated process.
    """
    members: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X") or int(fields[2]) != pgid:
            continue
        if _exe_of(int(entry.name)) == exe:
            members.append(int(entry.name))
    return members


_IPC_DETACH_WAIT = 5.0


def _sysv_attach_count(key: int, shmid: int) -> int | None:
    """How many processes have SysV segment (``key``, ``shmid``) attached; None if it is gone."""
    try:
        table = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except OSError:
        return None
    for row in table:
        fields = row.split()  # key shmid perms size cpid lpid nattch ...
        if fields[:2] == [str(key), str(shmid)]:
            return int(fields[6])
    return None


def _kill_group(pgid: int, exe: str, timeout: float = 10.0) -> None:
    """SIGKILL every live member of ``pgid`` running ``exe`` and wait until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        members = _group_members(pgid, exe)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise SimulatorError(f"processes {members} of group {pgid} survive SIGKILL")
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------
# Readiness probes: speak just enough of each wire protocol to know the server accepts logins


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by server")
        data += chunk
    return data


def _probe_postgres(host: str, port: int, user: str, database: str,
                    timeout: float) -> str | None:
    """Send a StartupMessage; ``None`` if the server asks for authentication, else why not.

    A backend that is still starting or recovering answers 57P03 instead. Closing the
    connection at the password prompt leaves nothing in the server log.
    """
    params = f"user\0{user}\0database\0{database}\0\0".encode()
    body = struct.pack("!i", 3 << 16) + params
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("!i", len(body) + 4) + body)
            kind = _recv_exact(sock, 1)
            if kind not in (b"R", b"E"):
                return f"unexpected reply {kind!r}"
            (length,) = struct.unpack("!i", _recv_exact(sock, 4))
            # Read the whole message: closing with unread data sends a reset, which the
            # server would log as "could not receive data from client".
            body = _recv_exact(sock, length - 4)
            sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        return str(exc)
    if kind == b"R":
        return None
    fields = {item[:1]: item[1:].decode(errors="replace") for item in body.split(b"\0") if item}
    return f"{fields.get(b'C', '?')}: {fields.get(b'M', '')}"


def _probe_mariadb(host: str, port: int, timeout: float) -> str | None:
    """Read the initial handshake; ``None`` for protocol version 10, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            header = _recv_exact(sock, 4)
            length = int.from_bytes(header[:3], "little")
            payload = _recv_exact(sock, min(length, 4096))
    except OSError as exc:
        return str(exc)
    if payload[:1] == b"\x0a":
        return None
    if payload[:1] == b"\xff":
        code = int.from_bytes(payload[1:3], "little")
        return f"error {code}: {payload[3:].decode(errors='replace')}"
    return f"unexpected handshake {payload[:8]!r}"


# --------------------------------------------------------------------------------------------
# Engines: what differs between PostgreSQL and MariaDB


def _quote_pg(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _setting_text(value: SettingValue, true: str, false: str) -> str:
    if isinstance(value, bool):
        return true if value else false
    if isinstance(value, (int, float)):
        return str(value)
    return value


class _EngineSpec(abc.ABC):
    """Engine-specific knowledge; instances are immutable singletons."""

    engine: Engine
    flavours: tuple[str, ...]
    default_port: int
    os_user: str
    user: str
    password: str
    database: str
    shutdown_signal: signal.Signals
    #: Option names the simulator manages itself, in canonical form.
    reserved: frozenset[str]

    @abc.abstractmethod
    def server_binary(self) -> Path:
        """The stock server executable."""

    @abc.abstractmethod
    def version(self) -> str:
        """Version banner of the server binary (part of the template key)."""

    @abc.abstractmethod
    def template_variant(self, flavour: str) -> str:
        """Name of the template a flavour starts from."""

    @abc.abstractmethod
    def template_recipe(self, variant: str) -> str:
        """Everything that determines a template's content (hashed into its key)."""

    @abc.abstractmethod
    def build_template(self, build_dir: Path, variant: str, account: _Account) -> None:
        """Create ``build_dir/data`` (and any other template files)."""

    @abc.abstractmethod
    def write_config(self, server: LocalServer) -> None:
        """Write the server's configuration for its address, port and settings."""

    @abc.abstractmethod
    def argv(self, server: LocalServer) -> list[str]:
        """Command line that runs the server in the foreground."""

    @abc.abstractmethod
    def probe(self, server: LocalServer, timeout: float) -> str | None:
        """``None`` if the server accepts connections, else a short reason."""

    @abc.abstractmethod
    def canonical_option(self, name: str) -> str:
        """Spelling used to compare option names."""

    @abc.abstractmethod
    def release_ipc(self, data_dir: Path) -> None:
        """Free OS resources outside ``data_dir`` left by a killed server (before removal)."""

    def check_flavour(self, flavour: object) -> str:
        if flavour not in self.flavours:
            valid = ", ".join(repr(f) for f in self.flavours)
            raise ValueError(f"flavour must be one of {valid} for {self.engine}, got {flavour!r}")
        assert isinstance(flavour, str)
        return flavour

    def template_key(self, variant: str) -> str:
        recipe = "\0".join([str(self.server_binary()), self.version(),
                            self.template_recipe(variant)])
        digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
        number = re.search(r"\d+(\.\d+)+", self.version())
        return f"{self.engine}-{number.group(0) if number else 'x'}-{variant}-{digest}"

    def ensure_template(self, variant: str, account: _Account) -> Path:
        """Path of the ready template directory for ``variant``, building it once if needed.

        Concurrent processes serialise on a per-template lock; the build happens in a private
        directory that is renamed into place, so a template that exists is complete.
        """
        templates = ensure_dir(sim_root() / "templates")
        key = self.template_key(variant)
        final = templates / key
        if final.is_dir():
            return final
        with file_lock(templates / f"{key}.lock"):
            if final.is_dir():
                return final
            for leftover in templates.glob(f".build-{key}-*"):
                shutil.rmtree(leftover, ignore_errors=True)  # a builder that died
            build = templates / f".build-{key}-{os.getpid()}"
            build.mkdir(mode=0o755)
            os.chmod(build, 0o755)
            started = time.monotonic()
            try:
                self.build_template(build, variant, account)
                os.rename(build, final)
            except BaseException:
                shutil.rmtree(build, ignore_errors=True)
                raise
            LOGGER.info("built template %s in %.2f s", key, time.monotonic() - started)
        return final


@functools.cache
def _pg_bindir() -> Path:
    configured = os.environ.get("RESILIENT_DB_PG_BINDIR")
    if configured:
        return Path(configured)

    def major(path: Path) -> float:
        with contextlib.suppress(ValueError):
            return float(path.parent.name)
        return 0.0

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                        key=lambda path: major(path.parent))
    if candidates:
        return candidates[-1].parent
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise SimulatorError("PostgreSQL binaries not found; set RESILIENT_DB_PG_BINDIR")


@functools.cache
def _version_of(binary: Path) -> str:
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                            check=True, timeout=30)
    return result.stdout.strip()


# Extensions an RDS for PostgreSQL 15 instance lists in rds.extensions (a representative subset).
_RDS_PG_EXTENSIONS = (
    "address_standardizer, address_standardizer_data_us, amcheck, aws_commons, aws_lambda, "
    "aws_s3, bloom, btree_gin, btree_gist, citext, cube, dblink, dict_int, dict_xsyn, "
    "earthdistance, fuzzystrmatch, hll, hstore, intagg, intarray, isn, lo, ltree, "
    "pg_buffercache, pg_cron, pg_partman, pg_prewarm, pg_stat_statements, pg_trgm, "
    "pgaudit, pgcrypto, pgrowlocks, pgstattuple, plpgsql, postgis, postgres_fdw, rds_tools, "
    "refint, seg, sslinfo, tablefunc, tcn, tsm_system_rows, tsm_system_time, unaccent, uuid-ossp"
)

# pg_settings leaves out placeholder (custom, unregistered) settings such as rds.extensions,
# whatever postgresql.conf says. This replacement view appends the listed ones while they are
# set, so the configuration file stays the single source of each instance's value.
_PG_RDS_SETTINGS_VIEW = """\
CREATE OR REPLACE VIEW pg_catalog.pg_settings AS
 SELECT a.* FROM pg_catalog.pg_show_all_settings() a
 UNION ALL
 SELECT p.name, pg_catalog.current_setting(p.name, true), NULL::text,
        'Customized Options'::text, p.short_desc, NULL::text, 'sighup'::text, 'string'::text,
        'configuration file'::text, NULL::text, NULL::text, NULL::text[], NULL::text,
        pg_catalog.current_setting(p.name, true), NULL::text, NULL::integer, false
   FROM (VALUES ('rds.extensions'::text, 'List of installable extensions'::text))
        AS p(name, short_desc)
  WHERE pg_catalog.current_setting(p.name, true) IS NOT NULL;

"""


# pg_hba.conf is rewritten for each server; --no-sync because templates are throwaway too.
_INITDB_OPTIONS = ("--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                   "--locale=C", "--no-sync", "--no-instructions")


class _Postgres(_EngineSpec):
    engine: Engine = "postgresql"
    flavours = ("pg", "rds-pg")
    default_port = 5432
    os_user = "postgres"
    user = "postgres"
    password = "postgres"
    database = "test"
    shutdown_signal = signal.SIGINT  # "fast" shutdown: roll back sessions, checkpoint, exit
    reserved = frozenset({
        "listen_addresses", "port", "unix_socket_directories", "data_directory",
        "config_file", "hba_file", "ident_file", "external_pid_file",
    })

    def server_binary(self) -> Path:
        return _pg_bindir() / "postgres"

    def version(self) -> str:
        return _version_of(self.server_binary())

    def template_variant(self, flavour: str) -> str:
        return "rds" if flavour == "rds-pg" else "plain"

    def template_recipe(self, variant: str) -> str:
        return "\0".join([*_INITDB_OPTIONS, self._create_database_sql(),
                           _PG_RDS_SETTINGS_VIEW if variant == "rds" else ""])

    def _create_database_sql(self) -> str:
        return f"CREATE DATABASE {self.database};\n\n"

    def canonical_option(self, name: str) -> str:
        return name.lower()

    def build_template(self, build_dir: Path, variant: str, account: _Account) -> None:
        bindir = _pg_bindir()
        data = build_dir / "data"
        data.mkdir(mode=0o700)
        _chown(data, account)
        pwfile = build_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chmod(pwfile, 0o600)
        _chown(pwfile, account)
        _run_as(account, [str(bindir / "initdb"), "-D", str(data), "-U", self.user,
                          f"--pwfile={pwfile}", *_INITDB_OPTIONS], cwd=build_dir, what="initdb")
        pwfile.unlink()
        if variant == "rds":
            # Modify template1 before creating the test database so that it inherits the view.
            for database in ("template0", "template1", "postgres"):
                self._single_user(account, data, database, _PG_RDS_SETTINGS_VIEW,
                                  system_mods=True)
        self._single_user(account, data, "postgres", self._create_database_sql())

    def _single_user(self, account: _Account, data: Path, database: str, sql: str,
                     system_mods: bool = False) -> None:
        argv = [str(self.server_binary()), "--single", "-j", "-D", str(data),
                "-c", "fsync=off"]
        if system_mods:
            argv.append("-O")  # allow_system_table_mods: needed to replace pg_settings
        output = _run_as(account, [*argv, database], cwd=data.parent, stdin_text=sql,
                         what=f"postgres --single {database}")
        # Single-user mode reports a failed statement but still exits with status 0.
        if re.search(r"\b(ERROR|FATAL|PANIC):", output):
            raise ServerStartError(f"postgres --single {database} failed", _tail(output))

    def write_config(self, server: LocalServer) -> None:
        lines = [
            "# Written by simulator.local for a throwaway test server; rewritten on create.",
            f"listen_addresses = {_quote_pg(server.host)}",
            f"port = {server.port}",
            f"unix_socket_directories = {_quote_pg(str(server.socket_dir))}",
            f"cluster_name = {_quote_pg(server.name)}",
            # Room for the 200-application-connection budget checks plus monitors and probes.
            "max_connections = 400",
            "shared_buffers = '16MB'",
            "huge_pages = off",
            # Files in data_dir/pg_dynshmem, not in /dev/shm: a killed server leaks nothing.
            "dynamic_shared_memory_type = mmap",
            "password_encryption = 'scram-sha-256'",
            # Ready for streaming replication and pg_rewind later on.
            "wal_level = replica",
            "wal_log_hints = on",
            "full_page_writes = on",
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "hot_standby = on",
            # Throwaway test servers: skipping fsync loses data only if the machine itself
            # crashes; a killed server still recovers everything from the OS page cache.
            "fsync = off",
            "log_destination = 'stderr'  # the launcher sends stderr to server.log",
            "logging_collector = off",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "log_timezone = 'UTC'",
            "timezone = 'UTC'",
            "datestyle = 'iso, mdy'",
            "lc_messages = 'C'",
        ]
        if server.flavour == "rds-pg":
            lines.append(f"rds.extensions = {_quote_pg(_RDS_PG_EXTENSIONS)}")
        if server.settings:
            lines.append("# settings passed to the launcher")
            lines.extend(f"{key} = {_quote_pg(value)}" for key, value in server.settings.items())
        hba = [
            "# TYPE  DATABASE     USER  ADDRESS       METHOD",
            *server.hba_rules,
            "local   all          all                 trust",
            "local   replication  all                 trust",
            "host    all          all   127.0.0.0/8   scram-sha-256",
            "host    replication  all   127.0.0.0/8   scram-sha-256",
        ]
        auto = ["# Do not edit this file manually!",
                "# It will be overwritten by the ALTER SYSTEM command."]
        account = server._account
        # postgresql.auto.conf is emptied too: the launcher's settings are the only source of
        # configuration (a base backup or pg_rewind copies another server's ALTER SYSTEM).
        for path, text in ((server.data_dir / "postgresql.conf", lines),
                           (server.data_dir / "pg_hba.conf", hba),
                           (server.data_dir / "postgresql.auto.conf", auto)):
            path.write_text("\n".join(text) + "\n")
            os.chmod(path, 0o600)
            _chown(path, account)

    def argv(self, server: LocalServer) -> list[str]:
        return [str(server.binary), "-D", str(server.data_dir)]

    def release_ipc(self, data_dir: Path) -> None:
        # A clean shutdown removes the postmaster's small SysV segment; after SIGKILL it stays
        # until a postmaster restarts on the same data directory. Dynamic shared memory needs
        # nothing here: "mmap" keeps it in data_dir/pg_dynshmem. Callers have killed every
        # process of the server, but the kernel detaches a killed process's memory a moment
        # after it stops being listed (sooner or later on a busy machine), so wait for the
        # attach count to drop; the segment is marked for removal either way, which frees it
        # when the last detach happens (its data directory is about to be deleted).
        try:
            lines = (data_dir / "postmaster.pid").read_text().splitlines()
            key, shmid = (int(field) for field in lines[6].split())
        except (OSError, IndexError, ValueError):
            return
        deadline = time.monotonic() + _IPC_DETACH_WAIT
        while True:
            attached = _sysv_attach_count(key, shmid)
            if attached is None:
                return  # already gone
            if attached == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if attached:
            LOGGER.warning("SysV segment %d of %s still has %d attached after %.0f s; "
                           "marking it for removal", shmid, data_dir, attached,
                           _IPC_DETACH_WAIT)
        if _libc().shmctl(shmid, _IPC_RMID, None) != 0:
            LOGGER.warning("could not remove SysV segment %d of %s", shmid, data_dir)

    def probe(self, server: LocalServer, timeout: float) -> str | None:
        # The postmaster writes its state into line 8 of postmaster.pid (as pg_ctl reads
        # it); waiting for it first spares the log a "database system is starting up" FATAL.
        try:
            lines = (server.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return "no postmaster.pid yet"
        if not lines or lines[0].strip() != str(server.own_pid):
            return "postmaster.pid is not (yet) the new server's"  # left over from a kill
        status = lines[7].strip() if len(lines) > 7 else ""
        if status not in ("ready", "standby"):
            return f"postmaster status {status or 'unknown'!r}"
        return _probe_postgres(server.host, server.port, self.user, self.database, timeout)


@functools.cache
def _mariadb_binaries() -> tuple[Path, Path]:
    """(server, install script)."""
    server = os.environ.get("RESILIENT_DB_MARIADBD")
    found = server or shutil.which("mariadbd", path="/usr/sbin:/usr/bin:/usr/local/sbin") \
        or shutil.which("mysqld", path="/usr/sbin:/usr/bin")
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if not found or not install:
        raise SimulatorError("MariaDB binaries (mariadbd, mariadb-install-db) not found")
    return Path(found), Path(install)


def _native_password_hash(password: str) -> str:
    """``mysql_native_password`` hash, as stored in ``mysql.global_priv``."""
    return "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()


# MariaDB's version_comment is compiled in (NO_CMD_LINE: no option, no SET). For the rds-mysql
# flavour the template holds a copy of mariadbd whose comment string is overwritten. The new,
# longer string spills over the adjacent "Usage:" line of --help, so the patch is applied only
# when exactly that layout is found; otherwise the flavour runs the stock binary and says so.
_RDS_VERSION_COMMENT = "Source distribution"
_USAGE_LINE = b"Usage: %s [OPTIONS]\n\0"
_RDS_BINARY = "mariadbd-rds"


def _patch_version_comment(source: Path, target: Path, old: str, new: str) -> bool:
    """Write ``source`` to ``target`` with its compiled-in version comment replaced."""
    data = source.read_bytes()
    needle = b"\0" + old.encode() + b"\0" + _USAGE_LINE
    replacement = b"\0" + new.encode() + b"\0"
    if not old or data.count(needle) != 1 or len(replacement) > len(needle):
        return False
    start = data.index(needle)
    patched = data[:start] + replacement.ljust(len(needle), b"\0") + data[start + len(needle):]
    target.write_bytes(patched)
    os.chmod(target, 0o755)
    return True


# root gets a password (below) instead of unix_socket only; the test database is made below.
_MARIADB_INSTALL_OPTIONS = ("--auth-root-authentication-method=normal", "--skip-test-db")


class _MariaDB(_EngineSpec):
    engine: Engine = "mariadb"
    flavours = ("mysql", "rds-mysql")
    default_port = 3306
    os_user = "mysql"
    user = "root"
    password = "root"
    database = "test"
    shutdown_signal = signal.SIGTERM
    reserved = frozenset({
        "datadir", "socket", "port", "bind_address", "pid_file", "log_error", "basedir", "user",
    })
    # Shared by the template and every server: InnoDB would otherwise resize the redo log.
    innodb_log_file_size = "8M"

    def server_binary(self) -> Path:
        return _mariadb_binaries()[0]

    def version(self) -> str:
        return _version_of(self.server_binary())

    def compiled_comment(self) -> str:
        """The stock version_comment, e.g. "Debian 12" (the last parenthesis of --version)."""
        found = re.search(r"\(([^()]*)\)\s*$", self.version())
        return found.group(1) if found else ""

    def template_variant(self, flavour: str) -> str:
        return "all"  # both flavours share one data directory; rds-mysql adds a binary

    def template_recipe(self, variant: str) -> str:
        return "\0".join([*_MARIADB_INSTALL_OPTIONS, self._template_cnf(Path("/")),
                           self._bootstrap_sql(), _RDS_VERSION_COMMENT])

    def _template_cnf(self, build_dir: Path) -> str:
        return (
            "[mysqld]\n"
            f"datadir={build_dir / 'data'}\n"
            f"socket={build_dir / 'mysqld.sock'}\n"
            f"innodb-log-file-size={self.innodb_log_file_size}\n"
            "innodb-buffer-pool-size=16M\n"
            "skip-name-resolve\n"
        )

    def canonical_option(self, name: str) -> str:
        return name.lower().replace("-", "_")

    def _bootstrap_sql(self) -> str:
        password = _native_password_hash(self.password)
        privileges = '"access":18446744073709551615,"plugin":"mysql_native_password"'
        # Plain table writes: GRANT and CREATE USER are refused in bootstrap mode.
        return (
            "DELETE FROM mysql.global_priv"
            " WHERE User = '' OR (User = 'root' AND Host <> 'localhost');\n"
            "DELETE FROM mysql.proxies_priv;\n"
            "REPLACE INTO mysql.global_priv VALUES ('localhost', 'root', "
            f"'{{{privileges},\"authentication_string\":\"{password}\","
            "\"auth_or\":[{},{\"plugin\":\"unix_socket\"}]}');\n"
            "REPLACE INTO mysql.global_priv VALUES ('127.%', 'root', "
            f"'{{{privileges},\"authentication_string\":\"{password}\"}}');\n"
            "INSERT INTO mysql.proxies_priv VALUES ('localhost', 'root', '', '', TRUE, '', now()),"
            " ('127.%', 'root', '', '', TRUE, '', now());\n"
            f"CREATE DATABASE IF NOT EXISTS {self.database};\n"
        )

    def build_template(self, build_dir: Path, variant: str, account: _Account) -> None:
        server, install = _mariadb_binaries()
        data = build_dir / "data"
        data.mkdir(mode=0o700)
        _chown(data, account)
        cnf = build_dir / "template.cnf"
        cnf.write_text(self._template_cnf(build_dir))
        bootstrap = build_dir / "bootstrap.sql"
        bootstrap.write_text(self._bootstrap_sql())
        for path in (cnf, bootstrap):
            os.chmod(path, 0o644)
        _run_as(account, [
            str(install), f"--defaults-file={cnf}", f"--basedir={server.parent.parent}",
            f"--datadir={data}", f"--extra-file={bootstrap}", *_MARIADB_INSTALL_OPTIONS,
        ], cwd=build_dir, what="mariadb-install-db")
        patched = build_dir / _RDS_BINARY
        if not _patch_version_comment(server, patched, self.compiled_comment(),
                                      _RDS_VERSION_COMMENT):
            LOGGER.warning("cannot patch version_comment into %s; rds-mysql servers will "
                           "report %r", server, self.compiled_comment())
            return
        # The copy must run (the root may be on a noexec mount) and carry the new comment.
        try:
            banner = _run_as(account, [str(patched), "--version"], cwd=build_dir,
                             what="patched mariadbd --version")
        except (OSError, ServerStartError) as exc:
            banner = str(exc)
        if f"({_RDS_VERSION_COMMENT})" not in banner:
            patched.unlink()
            LOGGER.warning("patched mariadbd does not work (%s); rds-mysql servers will "
                           "report %r", banner.strip(), self.compiled_comment())

    def write_config(self, server: LocalServer) -> None:
        address = int(ipaddress.IPv4Address(server.host))
        lines = [
            "# Written by simulator.local for a throwaway test server; rewritten on create.",
            "[mysqld]",
            f"basedir={self.server_binary().parent.parent}",
            f"datadir={server.data_dir}",
            f"socket={server.socket_dir / 'mysqld.sock'}",
            f"pid-file={server.socket_dir / 'mysqld.pid'}",
            f"bind-address={server.host}",
            f"port={server.port}",
            f"log-error={server.log_path}",
            # Unique per address (the low 24 bits); servers sharing an address must override it.
            f"server-id={address & 0xFFFFFF or 1}",
            "log-bin=mysql-bin",
            "relay-log=relay-bin",
            "binlog-format=ROW",
            "skip-name-resolve",
            "skip-external-locking",
            "performance-schema=OFF",
            "innodb-buffer-pool-size=16M",
            f"innodb-log-file-size={self.innodb_log_file_size}",
            "innodb-temp-data-file-path=ibtmp1:1M:autoextend",
            # Throwaway test servers: commits reach the OS at once (a killed server keeps them)
            # but are not synced; shutdown skips purge and change-buffer merges.
            "innodb-flush-log-at-trx-commit=2",
            "innodb-doublewrite=0",
            "sync-binlog=0",
            "innodb-fast-shutdown=1",
            # Probes, kills and blackholes abort many handshakes: never block a client host,
            # and keep "Aborted connection" notes out of the log.
            "max-connect-errors=4294967295",
            # Room for the 200-application-connection budget checks plus monitors and probes.
            "max-connections=400",
            "log-warnings=1",
        ]
        if server.flavour == "rds-mysql":
            lines.append(f"report-host={server.host}")
            lines.append(f"report-port={server.port}")
        if server.settings:
            lines.append("# settings passed to the launcher")
            lines.extend(key if value == "" else f"{key}={value}"
                         for key, value in server.settings.items())
        path = server.base_dir / "my.cnf"
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o644)  # mariadbd ignores a world-writable option file
        _chown(path, server._account)

    def argv(self, server: LocalServer) -> list[str]:
        # --defaults-file must come first; it makes this file the only one read.
        return [str(server.binary), f"--defaults-file={server.base_dir / 'my.cnf'}"]

    def release_ipc(self, data_dir: Path) -> None:
        pass  # mariadbd uses no shared memory outside its data directory

    def probe(self, server: LocalServer, timeout: float) -> str | None:
        return _probe_mariadb(server.host, server.port, timeout)


_ENGINES: dict[str, _EngineSpec] = {"postgresql": _Postgres(), "mariadb": _MariaDB()}


def _engine_spec(engine: object) -> _EngineSpec:
    spec = _ENGINES.get(engine) if isinstance(engine, str) else None
    if spec is None:
        valid = ", ".join(repr(name) for name in _ENGINES)
        raise ValueError(f"engine must be one of {valid}, got {engine!r}")
    return spec


# --------------------------------------------------------------------------------------------
# Input validation


def _check_port(port: object) -> int | None:
    if port is None:
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1024-65535 or None, got {port!r}")
    if port < 1024:
        raise ValueError(
            f"port must be an integer in 1024-65535 or None, got {port!r} "
            "(servers run as an unprivileged user)"
        )
    return port


def _check_name(name: object) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"name must be 1-63 characters of letters, digits and ._:@- starting with a "
            f"letter or digit, got {name!r}"
        )
    return name


def _check_settings(spec: _EngineSpec, settings: object) -> dict[str, str]:
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise ValueError(f"settings must be a mapping of option names to values, got {settings!r}")
    true, false = ("on", "off") if spec.engine == "postgresql" else ("ON", "OFF")
    checked: dict[str, str] = {}
    for key, value in settings.items():
        if not isinstance(key, str) or not _OPTION_RE.fullmatch(key):
            raise ValueError(f"settings: invalid option name {key!r}")
        if spec.canonical_option(key) in spec.reserved:
            raise ValueError(
                f"settings: {key!r} is set by the launcher itself (use the host/port "
                f"parameters); reserved: {', '.join(sorted(spec.reserved))}"
            )
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"settings: value of {key!r} must be str, int, float or bool, "
                             f"got {value!r}")
        text = _setting_text(value, true, false)
        if "\n" in text or "\r" in text or "\0" in text:
            raise ValueError(f"settings: value of {key!r} must be a single line")
        checked[key] = text
    return checked


# --------------------------------------------------------------------------------------------
# The server


def _conninfo_value(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Servers this process owns and has not removed, for the atexit hook. Module state because an
# atexit hook has nowhere else to look; it is touched only by LocalServer.
_live_servers: set[LocalServer] = set()
_atexit_registered = False


def _track(server: LocalServer) -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_stop_all_at_exit)
        _atexit_registered = True
    _live_servers.add(server)


def _stop_all_at_exit() -> None:
    me = os.getpid()
    for server in list(_live_servers):
        if server.owner.pid != me:
            continue  # inherited through fork: the parent owns it
        try:
            server.stop()
        except Exception:  # exiting: report and go on with the others
            LOGGER.exception("could not stop %s at exit", server.name)


class LocalServer:
    """One throwaway server: its address, credentials, directories and process.

    Create servers with :func:`start_postgres`, :func:`start_mariadb` or
    :meth:`LocalServer.create` (provisioned, not started); the constructor is internal.

    Attributes are fixed for the server's lifetime: ``engine`` ("postgresql" | "mariadb"),
    ``flavour``, ``name``, ``host``, ``port``, ``user``, ``password``, ``database``,
    ``base_dir``, ``data_dir``, ``socket_dir`` (unix socket and pid file), ``log_path``,
    ``binary`` (server executable), ``settings`` (extra options as written to the config) and
    ``owner`` (the process that created it).
    """

    def __init__(self, *, spec: _EngineSpec, flavour: str, name: str, host: str, port: int,
                 base_dir: Path, settings: dict[str, str], owner: ProcessIdentity,
                 address_claimed: bool, binary: Path, account: _Account) -> None:
        self._spec = spec
        self.engine: Engine = spec.engine
        self.flavour = flavour
        self.name = name
        self.host = host
        self.port = port
        self.user = spec.user
        self.password = spec.password
        self.database = spec.database
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.socket_dir = base_dir / "run"
        self.log_path = base_dir / "server.log"
        self.binary = binary
        self.settings = dict(settings)
        #: (PostgreSQL) ``pg_hba.conf`` lines placed before the default ones; set it, then
        #: :meth:`reconfigure` (and :meth:`reload`) to apply (e.g. IAM users' ``pam`` lines).
        self.hba_rules: list[str] = []
        self.owner = owner
        self._address_claimed = address_claimed
        self._account = account
        self._process: subprocess.Popen[bytes] | None = None
        self._removed = False

    # ---- creation

    @classmethod
    def create(cls, engine: Engine, flavour: str | None = None, *, host: str | None = None,
               port: int | None = None, settings: Mapping[str, SettingValue] | None = None,
               name: str | None = None,
               provision: Callable[[LocalServer], None] | None = None) -> LocalServer:
        """Provision a server (template copy, config, address) without starting it.

        ``flavour=None`` means the engine's plain flavour ("pg" / "mysql"). ``host=None``
        claims a fresh loopback address for this process; an explicit host is used as given
        and not claimed. ``port=None`` takes the engine's default port if it is free on that
        address, else any free port. ``name=None`` means ``"<flavour>-<host>-<port>"``.

        ``provision``, when given, creates ``server.data_dir`` instead of the template copy
        (e.g. a replica's base backup, with :meth:`run_tool`); the configuration is written
        afterwards as usual, so whatever the copy brought along is replaced. If it raises,
        the server is removed again.
        """
        spec = _engine_spec(engine)
        flavour = spec.check_flavour(flavour if flavour is not None else spec.flavours[0])
        checked_host = None if host is None else validate_host(host)
        checked_port = _check_port(port)
        checked_settings = _check_settings(spec, settings)
        checked_name = _check_name(name)

        sweep_stale()
        account = _server_account(spec.os_user)
        template = spec.ensure_template(spec.template_variant(flavour), account)
        binary = spec.server_binary()
        if flavour == "rds-mysql" and (template / _RDS_BINARY).exists():
            binary = template / _RDS_BINARY

        owner = ProcessIdentity.current()
        started = time.monotonic()
        if checked_host is None:
            checked_host = claim_address(owner, checked_name or f"{flavour} server")
        try:
            server = cls._reserve(spec=spec, flavour=flavour, host=checked_host,
                                  port=checked_port, settings=checked_settings,
                                  name=checked_name, owner=owner, claimed=host is None,
                                  binary=binary, account=account)
        except BaseException:
            if host is None:
                release_address(checked_host, owner)
            raise
        try:
            server._provision(template, provision)
        except BaseException:
            server._remove_files()
            raise
        _track(server)
        LOGGER.debug("provisioned %s in %.3f s", server.name, time.monotonic() - started)
        return server

    @classmethod
    def _reserve(cls, *, spec: _EngineSpec, flavour: str, host: str, port: int | None,
                 settings: dict[str, str], name: str | None, owner: ProcessIdentity,
                 claimed: bool, binary: Path, account: _Account) -> LocalServer:
        """Pick the port and create the base directory with its metadata, atomically."""
        servers = ensure_dir(sim_root() / "servers")
        with registry_lock():
            for _attempt in range(20):
                if port is not None:
                    chosen = port
                    if not port_is_free(host, chosen):
                        raise SimulatorError(f"port {chosen} on {host} is already in use")
                elif port_is_free(host, spec.default_port) and not (
                        servers / f"{host}-{spec.default_port}").exists():
                    chosen = spec.default_port
                else:
                    chosen = free_port(host)
                base_dir = servers / f"{host}-{chosen}"
                try:
                    base_dir.mkdir(mode=0o750)
                except FileExistsError:
                    if port is not None:
                        raise SimulatorError(
                            f"{host}:{chosen} is reserved by another server ({base_dir})"
                        ) from None
                    continue
                server = cls(spec=spec, flavour=flavour,
                             name=name or f"{flavour}-{host}-{chosen}", host=host, port=chosen,
                             base_dir=base_dir, settings=settings, owner=owner,
                             address_claimed=claimed, binary=binary, account=account)
                server._write_meta()
                return server
        raise SimulatorError(f"could not find a free port on {host}")

    def _provision(self, template: Path,
                   provision: Callable[[LocalServer], None] | None = None) -> None:
        account = self._account
        _chown(self.base_dir, account)
        self.socket_dir.mkdir(mode=0o755)
        _chown(self.socket_dir, account)
        self.log_path.touch(mode=0o640)
        _chown(self.log_path, account)
        if provision is not None:
            provision(self)
            if not self.data_dir.is_dir():
                raise SimulatorError(f"provisioning {self.name} created no {self.data_dir}")
        else:
            # cp keeps owners and modes and is several times faster than shutil.copytree.
            subprocess.run(["cp", "-a", "--reflink=auto", str(template / "data"),
                            str(self.data_dir)], check=True, capture_output=True, timeout=120)
        self._spec.write_config(self)

    def _write_meta(self, server: ProcessIdentity | None = None) -> None:
        meta = {
            "version": _META_VERSION,
            "name": self.name,
            "engine": self.engine,
            "flavour": self.flavour,
            "host": self.host,
            "port": self.port,
            "owner": self.owner.to_json(),
            "address_claimed": self._address_claimed,
            "server": None if server is None else {**server.to_json(),
                                                   "exe": str(self.binary.resolve())},
        }
        temporary = self.base_dir / "meta.json.tmp"
        temporary.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(temporary, self.base_dir / "meta.json")

    # ---- process control

    @property
    def pid(self) -> int | None:
        """Pid of the running server process (the postmaster for PostgreSQL), else None."""
        return self._process.pid if self.is_running() and self._process else None

    @property
    def own_pid(self) -> int | None:
        """:attr:`pid` as the server itself sees it (what it writes in its pid file): the same
        here; a container's server has its own pid namespace."""
        return self.pid

    def is_running(self) -> bool:
        """True while the server process started by :meth:`start` is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> LocalServer:
        """Start the server and wait until it accepts connections; return ``self``.

        A no-op if it is running. Works after :meth:`kill` and ``stop(cleanup=False)``; after
        a full :meth:`stop` the server is gone and this raises ``SimulatorError``. On failure
        (the process exits, or is not ready within ``timeout`` seconds) the process is killed
        and :class:`ServerStartError` carries the tail of the server log.

        Any thread may call this: the process is forked by the spawner thread and dies with
        this process (``PR_SET_PDEATHSIG``, see :class:`_ChildSetup`).
        """
        if self._removed:
            raise SimulatorError(f"{self.name} was stopped and removed; create a new server")
        if self.is_running():
            return self
        if not port_is_free(self.host, self.port):
            raise ServerStartError(f"cannot start {self.name}: {self.host}:{self.port} is in use")
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._process = _spawn(
                self._spec.argv(self), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.base_dir, env=_child_env(self.base_dir), start_new_session=True,
                # preexec_fn is unsafe only if another thread holds a lock the child needs;
                # _ChildSetup calls nothing but syscalls resolved before the fork.
                preexec_fn=_ChildSetup(self._account, os.getpid()),
            )
        process = self._process
        identity = ProcessIdentity.of(process.pid)
        if identity is not None:
            self._write_meta(identity)
        deadline = started + timeout
        delay = 0.005
        reason: str | None = "not probed yet"
        while True:
            code = process.poll()
            if code is not None:
                self._reap()
                raise ServerStartError(
                    f"{self.name} exited with status {code} while starting", self.log_tail())
            reason = self._spec.probe(self, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            if reason is None:
                break
            if time.monotonic() > deadline:
                self._kill_process()
                raise ServerStartError(
                    f"{self.name} did not accept connections within {timeout:.1f} s "
                    f"(last probe: {reason})", self.log_tail())
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        LOGGER.info("started %s (%s %s) on %s:%d in %.3f s, pid %d", self.name, self.engine,
                    self.flavour, self.host, self.port, time.monotonic() - started, process.pid)
        return self

    def kill(self) -> None:
        """SIGKILL the server (all its processes) like a crash; data and address are kept."""
        if self.is_running():
            LOGGER.info("killing %s (pid %s)", self.name, self.pid)
        self._kill_process()

    def stop(self, *, cleanup: bool = True, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Shut the server down cleanly; with ``cleanup`` also remove its files and address.

        Idempotent. A server that does not shut down within ``timeout`` seconds is killed.
        ``cleanup=False`` keeps everything so that :meth:`start` can bring it back.
        """
        process = self._process
        if process is not None and process.poll() is None:
            started = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(self._spec.shutdown_signal)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                LOGGER.warning("%s did not shut down within %.1f s; killing it", self.name,
                               timeout)
            LOGGER.debug("stopped %s in %.3f s", self.name, time.monotonic() - started)
        self._kill_process()  # reaps, and catches stragglers of an unclean shutdown
        if cleanup and not self._removed:
            self._remove_files()

    def _kill_process(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        process = self._process
        if process is None:
            return
        process.wait()
        # Children of the group (PostgreSQL backends) outlive a killed leader briefly.
        _kill_group(process.pid, str(self.binary.resolve()))
        self._process = None
        with contextlib.suppress(FileNotFoundError):
            self._write_meta()

    def _remove_files(self) -> None:
        self._spec.release_ipc(self.data_dir)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        if self._address_claimed:
            release_address(self.host, self.owner)
        self._removed = True
        _live_servers.discard(self)
        LOGGER.debug("removed %s", self.name)

    # ---- configuration and tools (used by the cluster simulator)

    def reconfigure(self, settings: Mapping[str, SettingValue] | None = None) -> None:
        """Replace the extra ``settings`` and rewrite the server's configuration files.

        Takes effect at the next start, or at once for reloadable options after
        :meth:`reload`. For PostgreSQL the rewrite also empties ``postgresql.auto.conf``:
        the launcher's settings are the single source of the configuration, whatever
        ``ALTER SYSTEM``, a base backup or ``pg_rewind`` left there.
        """
        if self._removed:
            raise SimulatorError(f"{self.name} was stopped and removed")
        self.settings = _check_settings(self._spec, settings)
        self._spec.write_config(self)

    def reload(self) -> None:
        """Ask the running server to re-read its configuration (SIGHUP; PostgreSQL only).

        Asynchronous, like ``pg_reload_conf()``: sessions apply the new values before their
        next statement."""
        if self.engine != "postgresql":
            raise SimulatorError(f"{self.name}: reload is only supported for PostgreSQL")
        process = self._process
        if process is None or process.poll() is not None:
            raise SimulatorError(f"{self.name} is not running")
        process.send_signal(signal.SIGHUP)

    def run_tool(self, argv: list[str], *, what: str | None = None,
                 timeout: float = 120.0) -> str:
        """Run a helper (``pg_basebackup``, ``pg_rewind``) as the server's OS user, in its
        base directory; return its output. ``ServerStartError`` with the output's tail when
        it fails or times out."""
        return _run_as(self._account, argv, cwd=self.base_dir, what=what or Path(argv[0]).name,
                       timeout=timeout)

    def tool_path(self, name: str) -> Path:
        """Path of a helper binary that comes with the server (``pg_rewind``)."""
        return self._spec.server_binary().parent / name

    def write_data_file(self, relative: str, text: str) -> Path:
        """Write a file in the data directory owned by the server's OS user (mode 0600),
        e.g. ``standby.signal``; return its path."""
        path = self.data_dir / relative
        if path.parent != self.data_dir:
            raise ValueError(f"{relative!r}: expected a file name inside the data directory")
        path.write_text(text)
        os.chmod(path, 0o600)
        _chown(path, self._account)
        return path

    # ---- connection parameters

    def connect_kwargs(self) -> dict[str, str | int]:
        """Keyword arguments for the driver: psycopg (``dbname``) or mysql-connector
        (``database``)."""
        database_key = "dbname" if self.engine == "postgresql" else "database"
        return {"host": self.host, "port": self.port, database_key: self.database,
                "user": self.user, "password": self.password}

    def conninfo(self) -> str:
        """``key=value`` connection string with the driver's own key names (libpq for
        PostgreSQL)."""
        return " ".join(f"{key}={_conninfo_value(str(value))}"
                        for key, value in self.connect_kwargs().items())

    def uri(self) -> str:
        """``postgresql://`` or ``mysql://`` URI with credentials and database."""
        scheme = "postgresql" if self.engine == "postgresql" else "mysql"
        quote = functools.partial(urllib.parse.quote, safe="")
        return (f"{scheme}://{quote(self.user)}:{quote(self.password)}@{self.host}:{self.port}"
                f"/{quote(self.database)}")

    # ---- diagnostics and protocol

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log ("" if there is none)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 64 * 1024))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return _tail(text, lines)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "running" if self.is_running() else "stopped"
        return (f"<LocalServer {self.name} {self.engine}/{self.flavour} {self.host}:{self.port} "
                f"{state}>")


# --------------------------------------------------------------------------------------------
# Public entry points


def start_postgres(flavour: str = "pg", host: str | None = None, port: int | None = None,
                   settings: Mapping[str, SettingValue] | None = None, name: str | None = None,
                   *, timeout: float = DEFAULT_START_TIMEOUT) -> LocalServer:
    """Start a PostgreSQL server; ``flavour`` is "pg" or "rds-pg" (shows ``rds.extensions``).

    See :meth:`LocalServer.create` for ``host``, ``port``, ``settings`` (postgresql.conf
    parameters) and ``name``, and :meth:`LocalServer.start` for ``timeout``.
    """
    return _create_and_start("postgresql", flavour, host=host, port=port, settings=settings,
                             name=name, timeout=timeout)


def start_mariadb(flavour: str = "mysql", host: str | None = None, port: int | None = None,
                  settings: Mapping[str, SettingValue] | None = None, name: str | None = None,
                  *, timeout: float = DEFAULT_START_TIMEOUT) -> LocalServer:
    """Start a MariaDB server; ``flavour`` is "mysql" or "rds-mysql" (RDS MySQL marks).

    ``settings`` are ``[mysqld]`` options (an empty value writes the bare option name); see
    :meth:`LocalServer.create` for the other parameters.
    """
    return _create_and_start("mariadb", flavour, host=host, port=port, settings=settings,
                             name=name, timeout=timeout)


def reset_mariadb_data(server: LocalServer) -> None:
    """Replace a stopped MariaDB server's data directory with a fresh copy of its template.

    Address, port, configuration and log are kept; everything in the data directory (tables,
    binary and relay logs, replication state) starts over as on a new server. The cluster
    simulator rebuilds an old writer this way when its binary log has diverged from the new
    writer's. Raises ``SimulatorError`` if the server is running, removed or not MariaDB.
    """
    if server.engine != "mariadb":
        raise SimulatorError(f"{server.name} is not a MariaDB server")
    if server._removed or server.is_running():
        state = "removed" if server._removed else "running"
        raise SimulatorError(f"cannot reset the data of {server.name}: it is {state}")
    spec = server._spec
    template = spec.ensure_template(spec.template_variant(server.flavour), server._account)
    shutil.rmtree(server.data_dir)
    subprocess.run(["cp", "-a", "--reflink=auto", str(template / "data"), str(server.data_dir)],
                   check=True, capture_output=True, timeout=120)
    LOGGER.info("reset the data directory of %s from its template", server.name)


def _create_and_start(engine: Engine, flavour: str, *, host: str | None, port: int | None,
                      settings: Mapping[str, SettingValue] | None, name: str | None,
                      timeout: float) -> LocalServer:
    server = LocalServer.create(engine, flavour, host=host, port=port, settings=settings,
                                name=name)
    try:
        return server.start(timeout)
    except BaseException:
        server.stop()
        raise


def sweep_stale() -> list[Path]:
    """Remove what dead owner processes left behind; return the server directories removed.

    For each server directory whose owner is gone: kill its remaining processes, delete the
    directory and release its address claim. Then remove address claims of dead owners.
    Servers of live owners (including other processes running right now) are not touched.
    Called automatically before every start.
    """
    root = sim_root()
    servers = root / "servers"
    removed: list[Path] = []
    if servers.is_dir():
        with registry_lock():
            for base_dir in sorted(servers.iterdir()):
                if _sweep_one(base_dir):
                    removed.append(base_dir)
    sweep_address_claims()
    if removed:
        LOGGER.info("swept %d stale server(s): %s", len(removed),
                    ", ".join(path.name for path in removed))
    return removed


def _sweep_one(base_dir: Path) -> bool:
    """Remove ``base_dir`` if its owner is dead; caller holds the registry lock."""
    try:
        meta = json.loads((base_dir / "meta.json").read_text())
        owner = ProcessIdentity.from_json(meta["owner"])
    except FileNotFoundError:
        # Directories get their metadata under the registry lock, so this one is damaged.
        with contextlib.suppress(FileNotFoundError):
            if time.time() - base_dir.stat().st_mtime < _ORPHAN_DIR_GRACE:
                return False
        shutil.rmtree(base_dir, ignore_errors=True)
        return True
    except (ValueError, KeyError, TypeError):
        LOGGER.warning("unreadable %s; removing it", base_dir / "meta.json")
        shutil.rmtree(base_dir, ignore_errors=True)
        return True
    if owner.is_alive():
        return False
    server = meta.get("server")
    if isinstance(server, dict):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            _kill_group(int(server["pid"]), str(server["exe"]))
    spec = _ENGINES.get(str(meta.get("engine")))
    if spec is not None:
        spec.release_ipc(base_dir / "data")
    shutil.rmtree(base_dir, ignore_errors=True)
    if meta.get("address_claimed") and isinstance(meta.get("host"), str):
        release_address_locked(meta["host"], owner)
    return True
