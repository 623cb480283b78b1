"""Long-lived owners of simulated clusters, and the client that talks to them.

A cluster's servers die with the thread that started them (``PR_SET_PDEATHSIG``, see
:mod:`simulator.local`), so a command-line ``up`` cannot simply start a :class:`Cluster` and
exit. Instead it starts a *daemon*: a background Python process, in its own session, whose
main thread owns the cluster until ``down``. Each daemon lives in a directory::

    <sim_root>/daemons/<name>/
        config.json     what ``up`` asked for (flavour, readers, timeline, ...)
        daemon.json     the daemon's pid and start time, its state (starting, ready,
                        failed, stopping), and the cluster's fixed facts once ready
        control.sock    the control socket (unix, JSON lines)
        daemon.log      the daemon's log (and the cluster's, and any traceback)

Control protocol: a client connects to ``control.sock``, sends one JSON object on one line
(``{"op": "failover", "target": null, "mode": "crash"}``) and reads one JSON line back:
``{"ok": true, "result": {...}, "events": [...]}`` or ``{"ok": false, "code": 2|1,
"error": "..."}`` (2: bad input such as an unknown instance, 1: the action failed). Every
client call has a deadline. Read-only operations (``ping``, ``status``, ``events``) are
answered at once, even during a failover; actions run one at a time on the daemon's main
thread, the thread that owns the servers.

The daemon stops the cluster (servers, ``/etc/hosts`` lines, addresses) and removes its
directory on ``down``, on SIGTERM, SIGINT or SIGHUP, and when its directory or socket
disappears. If it is SIGKILLed, its servers die with it (parent-death signal) and
:func:`sweep` — run by ``list`` and ``up`` — removes the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from simulator._addresses import ProcessIdentity, ensure_dir, file_lock, sim_root
from simulator.cluster import Cluster, ClusterError, Timeline
from simulator.events import Event

__all__ = [
    "CONFIG_FILE",
    "LOG_FILE",
    "SOCKET_FILE",
    "STATE_FILE",
    "ActionFailedError",
    "BadRequestError",
    "DaemonRecord",
    "DaemonUnreachableError",
    "UnknownClusterError",
    "call",
    "daemon_dir",
    "daemons_dir",
    "find",
    "read_record",
    "records",
    "reserve",
    "serve",
    "spawn",
    "sweep",
    "terminate",
    "timeline_from_config",
    "wait_gone",
    "wait_ready",
]

LOGGER = logging.getLogger("resilient_db.simulator.daemon")

CONFIG_FILE = "config.json"
STATE_FILE = "daemon.json"
SOCKET_FILE = "control.sock"
LOG_FILE = "daemon.log"

#: Operations answered at once from any thread; everything else runs on the main thread.
READ_ONLY_OPS = frozenset({"ping", "status", "events"})
#: Every operation the daemon understands.
OPS = READ_ONLY_OPS | frozenset({
    "failover", "read_only", "kill", "stop_instance", "start_instance", "reboot",
    "add_reader", "remove_reader", "lag", "dns_staleness", "enable_iam", "down",
})

# A directory without daemon.json is an `up` between mkdir and the daemon's first write;
# only a crash leaves one for longer.
_UNBORN_GRACE = 60.0
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_REQUEST_READ_TIMEOUT = 10.0
_MAX_LINE = 1 << 20
_WATCH_INTERVAL = 0.2


# --------------------------------------------------------------------------------------------
# Errors, as the client sees them


class BadRequestError(ValueError):
    """Bad input (exit code 2): unknown cluster, instance, operation or argument."""


class UnknownClusterError(BadRequestError):
    """No running cluster of that name."""


class ActionFailedError(RuntimeError):
    """The daemon tried and failed, or could not be reached (exit code 1)."""


class DaemonUnreachableError(ActionFailedError):
    """The daemon is alive but did not answer in time, or is still starting."""


# --------------------------------------------------------------------------------------------
# The on-disk registry of daemons


#: A separate registry of daemons (`list`, `status` and `down --all` see only its clusters):
#: the CLI tests use one of their own, so they never stop a cluster someone else started.
DAEMONS_ENV = "RESILIENT_DB_SIM_DAEMONS"


def daemons_dir() -> Path:
    """``$RESILIENT_DB_SIM_DAEMONS`` if set, else ``<sim_root>/daemons``; created if needed."""
    configured = os.environ.get(DAEMONS_ENV)
    return ensure_dir(Path(configured) if configured else sim_root() / "daemons")


def daemon_dir(name: str) -> Path:
    """Directory of the daemon owning cluster ``name`` (whether or not it exists)."""
    return daemons_dir() / name


def _daemons_lock() -> contextlib.AbstractContextManager[None]:
    return file_lock(daemons_dir() / ".lock")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


@dataclasses.dataclass(frozen=True)
class DaemonRecord:
    """What ``daemon.json`` says about one daemon. ``identity`` is ``None`` when the file is
    missing or unreadable; ``info`` holds the cluster's fixed facts once ``state`` is
    ``"ready"``."""

    name: str
    directory: Path
    identity: ProcessIdentity | None
    state: str
    flavour: str | None
    error: str | None
    started: float | None
    info: Mapping[str, Any]

    @property
    def pid(self) -> int | None:
        return None if self.identity is None else self.identity.pid

    @property
    def socket_path(self) -> Path:
        return self.directory / SOCKET_FILE

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_FILE

    def is_alive(self) -> bool:
        """True while the daemon process itself (not a recycled pid) runs."""
        return self.identity is not None and self.identity.is_alive()


def read_record(directory: Path) -> DaemonRecord | None:
    """The record in ``directory``; ``None`` if the directory is gone."""
    if not directory.is_dir():
        return None
    try:
        data = json.loads((directory / STATE_FILE).read_text())
        identity: ProcessIdentity | None = ProcessIdentity.from_json(data["daemon"])
    except (OSError, ValueError, KeyError, TypeError):
        data, identity = {}, None
    return DaemonRecord(
        name=directory.name, directory=directory, identity=identity,
        state=str(data.get("state", "unknown")), flavour=data.get("flavour"),
        error=data.get("error"), started=data.get("started"), info=data.get("info") or {},
    )


def records() -> list[DaemonRecord]:
    """Every daemon directory's record, by name (stale ones included; see :func:`sweep`)."""
    found = []
    for entry in sorted(daemons_dir().iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            record = read_record(entry)
            if record is not None:
                found.append(record)
    return found


def _is_stale(record: DaemonRecord) -> bool:
    if record.identity is not None:
        return not record.is_alive()
    try:
        age = time.time() - record.directory.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > _UNBORN_GRACE


def sweep() -> list[str]:
    """Remove what dead daemons left behind; return the names of the clusters swept.

    A daemon that was SIGKILLed leaves its directory, its servers' directories and address
    claims (the servers themselves die with it) and its ``/etc/hosts`` lines. This removes
    all of those whose owner is dead, and nothing of live ones.
    """
    from simulator.local import sweep_stale
    from simulator.names import HostsFile

    swept = []
    with _daemons_lock():
        for record in records():
            if _is_stale(record):
                shutil.rmtree(record.directory, ignore_errors=True)
                swept.append(record.name)
    if swept:
        LOGGER.info("swept stale daemon(s): %s", ", ".join(swept))
    sweep_stale()
    HostsFile().sweep()
    return swept


# --------------------------------------------------------------------------------------------
# Client side


def find(name: str) -> DaemonRecord:
    """The live daemon of cluster ``name``; :class:`UnknownClusterError` if there is none."""
    record = read_record(daemon_dir(name))
    if record is not None and _is_stale(record):
        sweep()
        record = None
    if record is None:
        running = [r.name for r in records() if r.is_alive()]
        known = f"running clusters: {', '.join(running)}" if running else "no cluster is running"
        raise UnknownClusterError(f"no cluster named {name!r} ({known})")
    return record


def call(name: str, op: str, *, timeout: float, **args: Any) -> dict[str, Any]:
    """Send one request to the daemon of ``name`` and return its ``result`` and ``events``.

    Raises :class:`UnknownClusterError`, :class:`BadRequestError` (the daemon refused the
    input), :class:`ActionFailedError` (the action failed) or
    :class:`DaemonUnreachableError` (no answer within ``timeout`` seconds, or the daemon is
    still starting).
    """
    record = find(name)
    if record.state != "ready":
        state = "starting" if record.state == "unknown" else record.state
        raise DaemonUnreachableError(f"cluster {name!r} is {state}, not ready "
                                f"(log: {record.log_path})")
    reply = _exchange(record.socket_path, {"op": op, **args}, timeout)
    if reply.get("ok"):
        return reply
    message = str(reply.get("error", "unknown error"))
    if reply.get("code") == 2:
        raise BadRequestError(message)
    raise ActionFailedError(message)


def _exchange(path: Path, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    line = (json.dumps(request) + "\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(line)
            data = b""
            while not data.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise DaemonUnreachableError(
                f"the daemon did not answer {request.get('op')!r} within {timeout:g} s "
                f"(log: {path.parent / LOG_FILE})") from None
        except OSError as exc:
            raise DaemonUnreachableError(f"cannot reach the daemon at {path}: {exc}") from None
    if not data.endswith(b"\n"):
        raise DaemonUnreachableError(f"the daemon closed the connection without an answer "
                                f"(log: {path.parent / LOG_FILE})")
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ActionFailedError(f"malformed answer from the daemon: {data[:200]!r}")
    return reply


def reserve(name: str) -> Path:
    """Create the daemon directory for ``name``; :class:`BadRequestError` if the name is taken."""
    directory = daemon_dir(name)
    if len(str(directory / SOCKET_FILE)) > _MAX_SOCKET_PATH:
        raise BadRequestError(f"name {name!r} is too long for a unix socket path under {directory}")
    with _daemons_lock():
        try:
            directory.mkdir(mode=0o755)
        except FileExistsError:
            record = read_record(directory)
            pid = f" (daemon pid {record.pid})" if record and record.pid else ""
            raise BadRequestError(f"a cluster named {name!r} already exists{pid}") from None
    return directory


def spawn(directory: Path, config: Mapping[str, Any]) -> subprocess.Popen[bytes]:
    """Start the daemon process for ``directory`` with ``config`` (see :func:`serve`).

    The daemon runs in its own session with no terminal; its output goes to ``daemon.log``.
    It imports this very copy of the simulator package, whatever the caller's directory.
    """
    _write_json(directory / CONFIG_FILE, config)
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root, *filter(None, [env.get("PYTHONPATH")])])
    with open(directory / LOG_FILE, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "simulator", "_daemon", str(directory)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", env=env,
            start_new_session=True, close_fds=True,
        )


def wait_ready(directory: Path, process: subprocess.Popen[bytes],
               timeout: float) -> DaemonRecord:
    """Wait until the daemon in ``directory`` is ready; raise :class:`ActionFailedError` (with the
    end of its log) if it fails, dies or is not ready within ``timeout`` seconds (it is then
    terminated)."""
    deadline = time.monotonic() + timeout
    while True:
        record = read_record(directory)
        if record is not None and record.state == "ready" and record.is_alive():
            return record
        if record is not None and record.state == "failed":
            try:
                process.wait(timeout=30)  # it is shutting down; let it finish
            except subprocess.TimeoutExpired:
                terminate(process.pid, grace=5.0)
            raise ActionFailedError(f"{record.error or 'the cluster did not start'}\n"
                               f"{_log_excerpt(directory)}")
        if process.poll() is not None:
            raise ActionFailedError(f"the daemon exited with status {process.returncode} while "
                               f"starting\n{_log_excerpt(directory)}")
        if time.monotonic() > deadline:
            terminate(process.pid, grace=30.0)
            raise ActionFailedError(f"the cluster was not ready within {timeout:g} s; stopped it\n"
                               f"{_log_excerpt(directory)}")
        time.sleep(0.05)


def _log_excerpt(directory: Path, lines: int = 30) -> str:
    try:
        text = (directory / LOG_FILE).read_text(errors="replace")
    except OSError:
        return "(no daemon log)"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- {directory / LOG_FILE} (tail) ---\n{tail}"


def terminate(pid: int, grace: float) -> bool:
    """SIGTERM ``pid``, and SIGKILL it if it still runs after ``grace`` seconds; True if it
    exited within the grace period."""
    identity = ProcessIdentity.of(pid)
    if identity is None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_gone(identity, grace):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_gone(identity, 10.0)
    return False


def wait_gone(identity: ProcessIdentity, timeout: float) -> bool:
    """Wait until ``identity`` has exited (a zombie counts as exited); True if it did."""
    deadline = time.monotonic() + timeout
    while identity.is_alive():
        if time.monotonic() > deadline:
            return False
        # Reap it if it is our child (up's own daemon); harmless otherwise.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(identity.pid, os.WNOHANG)
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------------------------
# Daemon side


class _Terminated(BaseException):
    """Raised by the signal handler while the cluster is starting, to abandon the start.

    A BaseException so that it unwinds through ``except Exception`` and reaches
    :meth:`Cluster.start`, which stops whatever was started."""


@dataclasses.dataclass
class _Job:
    request: dict[str, Any]
    connection: socket.socket


def timeline_from_config(config: Mapping[str, Any]) -> Timeline:
    """The :class:`Timeline` a daemon config asks for (missing fields keep their defaults)."""
    base = Timeline.aurora_like() if config.get("aurora_like") else Timeline()
    given = config.get("timeline") or {}
    fields = {f.name for f in dataclasses.fields(Timeline)}
    unknown = set(given) - fields
    if unknown:
        raise BadRequestError(f"unknown timeline field(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(base, **given)


class _Daemon:
    """The daemon process: owns one cluster, serves the control socket."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = directory.name
        self.config: dict[str, Any] = json.loads((directory / CONFIG_FILE).read_text())
        self.identity = ProcessIdentity.current()
        self.started = time.time()
        self.cluster: Cluster | None = None
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.stop_reason: str | None = None
        #: While True, a stop signal abandons the start (see _Terminated).
        self.starting = False
        self.listener: socket.socket | None = None
        self.directory_inode = directory.stat().st_ino

    # ---- state file

    def write_state(self, state: str, *, error: str | None = None,
                    info: Mapping[str, Any] | None = None) -> None:
        _write_json(self.directory / STATE_FILE, {
            "daemon": self.identity.to_json(), "state": state, "name": self.name,
            "flavour": self.config.get("flavour"), "started": self.started, "error": error,
            "info": dict(info or {}),
        })

    # ---- lifecycle

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        LOGGER.info("received %s", name)
        self.stop_reason = self.stop_reason or name
        if self.starting:
            self.starting = False  # raise once only
            raise _Terminated(name)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.on_signal)
        self.write_state("starting")
        try:
            code = self._start_cluster()
            if code != 0:
                return code
            self._serve()
            return 0
        finally:
            self._shutdown()

    def _start_cluster(self) -> int:
        config = self.config
        LOGGER.info("daemon %d starting cluster %s: %s", os.getpid(), self.name,
                    json.dumps(config))
        cluster: Cluster | None = None
        try:
            timeline = timeline_from_config(config)
            self.starting = True
            cluster = Cluster.start(
                config["flavour"], readers=config.get("readers"), name=self.name,
                cluster_id=config.get("cluster_id"), timeline=timeline,
                port=config.get("port"), region=config.get("region") or "us-east-1",
                proxied=bool(config.get("proxied", False)))
            self.starting = False
        except _Terminated as exc:
            # Cluster.start stopped what it had started; a signal just after it returned
            # leaves `cluster` set, and _shutdown stops it.
            self.cluster = cluster
            LOGGER.info("terminated (%s) while starting", exc)
            self.write_state("failed", error=f"terminated ({exc}) while starting")
            return 1
        except Exception as exc:
            self.starting = False
            LOGGER.exception("cluster %s did not start", self.name)
            self.write_state("failed", error=f"cluster did not start: {exc}")
            return 1
        self.cluster = cluster
        if self.stop_reason is not None:  # a signal between the start and this line
            return 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.directory / SOCKET_FILE))
        self.listener.listen(16)
        threading.Thread(target=self._accept, name="sim-daemon-accept", daemon=True).start()
        status = cluster.status()
        info = {key: status[key] for key in
                ("port", "writer_endpoint", "reader_endpoint", "host_pattern")}
        info["timeline"] = dataclasses.asdict(cluster.timeline)
        self.write_state("ready", info=info)
        LOGGER.info("cluster %s ready: %s", self.name, json.dumps(status))
        return 0

    def _serve(self) -> None:
        while self.stop_reason is None:
            try:
                job = self.jobs.get(timeout=_WATCH_INTERVAL)
            except queue.Empty:
                self._watch_directory()
                continue
            self._run_job(job)

    def _directory_is_ours(self) -> bool:
        """False once the directory was removed (or replaced by another daemon's)."""
        try:
            return self.directory.stat().st_ino == self.directory_inode
        except OSError:
            return False

    def _watch_directory(self) -> None:
        socket_there = (self.directory / SOCKET_FILE).is_socket()
        if not self._directory_is_ours() or not socket_there:
            LOGGER.warning("control socket directory %s is gone; shutting down",
                           self.directory)
            self.stop_reason = "control socket directory removed"

    def _shutdown(self) -> None:
        LOGGER.info("shutting down (%s)", self.stop_reason or "start failed")
        if self.cluster is not None and self._directory_is_ours():
            with contextlib.suppress(OSError):
                self.write_state("stopping")
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.close()
        with contextlib.suppress(OSError):
            (self.directory / SOCKET_FILE).unlink()
        while True:  # refuse what is still queued
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            self._reply(job.connection, {"ok": False, "code": 1,
                                         "error": "the cluster is shutting down"})
        if self.cluster is not None:
            try:
                self.cluster.stop()
            except Exception:
                LOGGER.exception("stopping cluster %s failed", self.name)
        if self.cluster is not None and self._directory_is_ours():
            # A failed start keeps the directory (state "failed", log) for `up` to report;
            # `up` or the next sweep removes it.
            shutil.rmtree(self.directory, ignore_errors=True)
        LOGGER.info("daemon %d exits", os.getpid())

    # ---- connections

    def _accept(self) -> None:
        listener = self.listener
        assert listener is not None
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed at shutdown
            threading.Thread(target=self._handle, args=(connection,), daemon=True,
                             name="sim-daemon-conn").start()

    def _handle(self, connection: socket.socket) -> None:
        try:
            request = self._read_request(connection)
        except (OSError, ValueError) as exc:
            self._reply(connection, {"ok": False, "code": 2, "error": f"bad request: {exc}"})
            return
        op = request.get("op")
        if op not in OPS:
            self._reply(connection, {"ok": False, "code": 2,
                                     "error": f"unknown operation {op!r}; known: "
                                              f"{', '.join(sorted(OPS))}"})
        elif op in READ_ONLY_OPS:
            self._reply(connection, self._answer(request))
        elif self.stop_reason is not None:
            self._reply(connection, {"ok": False, "code": 1,
                                     "error": "the cluster is shutting down"})
        else:
            self.jobs.put(_Job(request, connection))

    @staticmethod
    def _read_request(connection: socket.socket) -> dict[str, Any]:
        connection.settimeout(_REQUEST_READ_TIMEOUT)
        data = b""
        while not data.endswith(b"\n"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > _MAX_LINE:
                raise ValueError("request too long")
        request = json.loads(data)
        if not isinstance(request, dict):
            raise ValueError("expected a JSON object")
        return request

    @staticmethod
    def _reply(connection: socket.socket, reply: Mapping[str, Any]) -> None:
        try:
            connection.settimeout(_REQUEST_READ_TIMEOUT)
            connection.sendall((json.dumps(reply, default=str) + "\n").encode())
        except OSError:
            pass  # the client gave up; the action still happened
        finally:
            with contextlib.suppress(OSError):
                connection.close()

    def _run_job(self, job: _Job) -> None:
        self._reply(job.connection, self._answer(job.request))

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = str(request["op"])
        try:
            result, events = _HANDLERS[op](self, request)
        except BadRequestError as exc:
            return {"ok": False, "code": 2, "error": str(exc)}
        except ClusterError as exc:
            LOGGER.warning("%s failed: %s", op, exc)
            return {"ok": False, "code": 1, "error": str(exc)}
        except Exception as exc:
            LOGGER.exception("%s failed", op)
            return {"ok": False, "code": 1, "error": f"{type(exc).__name__}: {exc}"}
        LOGGER.info("%s %s -> %s", op, json.dumps(request),
                    ", ".join(f"{e.name}({e.instance or ''})" for e in events) or "no events")
        return {"ok": True, "result": result, "events": [e.to_json() for e in events]}

    # ---- helpers for the handlers

    def require_cluster(self) -> Cluster:
        if self.cluster is None:
            raise ActionFailedError("the cluster is not running")
        return self.cluster

    def instance_id(self, request: Mapping[str, Any], key: str = "instance",
                    optional: bool = False) -> str | None:
        value = request.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise BadRequestError(f"{key}: expected an instance id, got {value!r}")
        cluster = self.require_cluster()
        if value not in cluster.instances:
            raise BadRequestError(f"no instance {value!r} in cluster {self.name}; instances: "
                             f"{', '.join(cluster.instances)}")
        return value

    def status(self) -> dict[str, Any]:
        cluster = self.require_cluster()
        # Actions run on the main thread while this answers: retry a view torn by one.
        for attempt in range(3):
            try:
                status = cluster.status()
                break
            except Exception:
                if attempt == 2:
                    raise
                time.sleep(0.05)
        try:
            connect: dict[str, Any] | None = dict(cluster.connect_kwargs())
        except ClusterError:
            connect = None  # no writer right now (mid-failover)
        any_runtime = next(iter(cluster.instances.values())).runtime
        return {
            **status,
            "engine": cluster.flavour.engine,
            "description": cluster.flavour.description,
            "connect": connect,
            "superuser": {"user": any_runtime.user, "password": any_runtime.password},
            "timeline": dataclasses.asdict(cluster.timeline),
            "daemon": {"pid": self.identity.pid, "started": self.started,
                       "directory": str(self.directory),
                       "socket": str(self.directory / SOCKET_FILE),
                       "log": str(self.directory / LOG_FILE)},
        }


Handler = Callable[[_Daemon, dict[str, Any]], tuple[Any, list[Event]]]


def _seconds(request: Mapping[str, Any], key: str) -> float:
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BadRequestError(f"{key}: expected seconds >= 0, got {value!r}")
    return float(value)


def _op_ping(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
    return {"pid": daemon.identity.pid, "name": daemon.name}, []


def _op_status(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
    return daemon.status(), []


def _op_events(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
    since = request.get("since")
    if since is not None and not isinstance(since, (int, float)):
        raise BadRequestError(f"since: expected a monotonic time, got {since!r}")
    return None, daemon.require_cluster().events.events(since=since)


def _op_failover(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
    cluster = daemon.require_cluster()
    target = daemon.instance_id(request, "target", optional=True)
    mode = request.get("mode", "crash")
    if mode not in ("crash", "graceful"):
        raise BadRequestError(f"mode: expected 'crash' or 'graceful', got {mode!r}")
    if target is not None and cluster.instances[target].role != "reader":
        raise BadRequestError(f"failover target {target!r} is the {cluster.instances[target].role}"
                         f", not a reader; readers: "
                         f"{', '.join(r.id for r in cluster.readers) or 'none'}")
    return None, cluster.failover(target, mode=mode)


def _op_read_only(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
    value = request.get("read_only")
    if not isinstance(value, bool):
        raise BadRequestError(f"read_only: expected true or false, got {value!r}")
    return None, daemon.require_cluster().make_writer_read_only(value)


def _instance_op(method: Callable[[Cluster, str], list[Event]]) -> Handler:
    def handler(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
        instance = daemon.instance_id(request)
        assert instance is not None
        return None, method(daemon.require_cluster(), instance)

    return handler


def _op_add_reader(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
    instance = request.get("instance")
    if instance is not None and (not isinstance(instance, str) or not instance):
        raise BadRequestError(f"instance: expected an instance id, got {instance!r}")
    return None, daemon.require_cluster().add_reader(instance)


def _op_lag(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
    instance = daemon.instance_id(request)
    assert instance is not None
    return None, daemon.require_cluster().set_replica_lag(instance, _seconds(request, "seconds"))


def _op_dns_staleness(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
    return None, daemon.require_cluster().set_dns_staleness(_seconds(request, "seconds"))


def _op_enable_iam(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
    user = request.get("user", "iam_user")
    region = request.get("region")
    if not isinstance(user, str) or not user:
        raise BadRequestError(f"user: expected a user name, got {user!r}")
    if region is not None and (not isinstance(region, str) or not region):
        raise BadRequestError(f"region: expected a region name, got {region!r}")
    return None, daemon.require_cluster().enable_iam(user, region=region)


def _op_down(daemon: _Daemon, request: dict[str, Any]) -> tuple[Any, list[Event]]:
    cluster = daemon.require_cluster()
    since = time.monotonic()
    daemon.stop_reason = "down"
    cluster.stop()
    return None, cluster.events.events(since=since)


_HANDLERS: dict[str, Handler] = {
    "ping": _op_ping,
    "status": _op_status,
    "events": _op_events,
    "failover": _op_failover,
    "read_only": _op_read_only,
    "kill": _instance_op(Cluster.kill_instance),
    "stop_instance": _instance_op(Cluster.stop_instance),
    "start_instance": _instance_op(Cluster.start_instance),
    "reboot": _instance_op(Cluster.reboot),
    "add_reader": _op_add_reader,
    "remove_reader": _instance_op(Cluster.remove_reader),
    "lag": _op_lag,
    "dns_staleness": _op_dns_staleness,
    "enable_iam": _op_enable_iam,
    "down": _op_down,
}
assert set(_HANDLERS) == OPS


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d %(levelname)s %(name)s [%(threadName)s] %(message)s",
        "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def serve(directory: Path) -> int:
    """Run the daemon for ``directory`` (reads ``config.json``) until it is told to stop;
    return the process exit status. Called by ``python -m simulator _daemon DIR``."""
    with _logging_to(directory / LOG_FILE):
        return _Daemon(directory).run()

