"""The simulator's on-disk registry: its root directory, locks, owners and loopback addresses.

Every simulated instance gets its own loopback address (``127.x.y.z``, never ``127.0.0.1``) so
that several servers can listen on the same port, and so that faults can later be applied per
instance address. Addresses are handed out across concurrently running processes through a
*claim*: a small JSON file ``<root>/addresses/<address>`` naming the owner process, created
under an exclusive ``flock`` on ``<root>/.lock``. A claim whose owner is dead is stale and is
removed by :func:`sweep_address_claims`.

An owner is identified by its pid *and* its kernel start time, so a recycled pid never keeps a
stale claim alive. A zombie counts as dead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import ipaddress
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("resilient_db.simulator")

#: Environment variable that overrides the simulator root directory.
ROOT_ENV = "RESILIENT_DB_SIM_ROOT"

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")

# Allocation starts well above 127.0.x.x (127.0.0.1 is the system's, Debian maps the host
# name to 127.0.1.1) and skips host parts 0 and 255 to keep addresses unsurprising to read.
_FIRST_ALLOCATED = int(ipaddress.IPv4Address("127.10.0.1"))
_LAST_ALLOCATED = int(ipaddress.IPv4Address("127.254.255.254"))

# /proc/net/tcp state code of a listening socket.
_TCP_LISTEN = "0A"


_SHM = Path("/dev/shm")
# Enough for a template of each engine plus a few dozen servers (40-50 MB each).
_SHM_MIN_FREE = 2 * 1024**3


def _is_roomy_tmpfs(path: Path) -> bool:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
        stats = os.statvfs(path)
    except OSError:
        return False
    is_tmpfs = any(line.split()[1:3] == [str(path), "tmpfs"] for line in mounts)
    return is_tmpfs and stats.f_bavail * stats.f_frsize >= _SHM_MIN_FREE


@functools.cache
def _default_root(uid: int) -> Path:
    name = "resilient_db_sim" if uid == 0 else f"resilient_db_sim-{uid}"
    in_memory = _SHM / name
    # Once chosen, the tmpfs root stays chosen: concurrent processes must agree on one root.
    if in_memory.is_dir() or _is_roomy_tmpfs(_SHM):
        return in_memory
    return Path("/tmp") / name


def sim_root() -> Path:
    """Return the simulator root directory, creating it if needed.

    ``$RESILIENT_DB_SIM_ROOT`` if set; else ``/dev/shm/resilient_db_sim`` when ``/dev/shm``
    is a tmpfs with room to spare, since creating the thousand files of a PostgreSQL data
    directory can take over a second on a disk; else ``/tmp/resilient_db_sim``. Non-root
    users get a ``-<uid>`` suffix. The directory must be traversable by the unprivileged
    server users, which is why pytest's private temporary directories are not used. A
    pre-existing root owned by someone else is refused rather than trusted.
    """
    configured = os.environ.get(ROOT_ENV)
    uid = os.geteuid()
    root = Path(configured) if configured else _default_root(uid)
    try:
        root.mkdir(mode=0o755)
        os.chmod(root, 0o755)  # the umask must not hide it from the server users
    except FileExistsError:
        owner = root.stat().st_uid
        if owner != uid:
            raise PermissionError(
                f"simulator root {root} belongs to uid {owner}, not to us (uid {uid}); "
                f"remove it or set {ROOT_ENV}"
            ) from None
    return root


def ensure_dir(path: Path, mode: int = 0o755) -> Path:
    """Create ``path`` (one level) with ``mode`` if it does not exist; return it."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
        os.chmod(path, mode)
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    ``flock`` locks belong to the open file description, so two threads of one process that
    each enter this block exclude each other just as two processes do.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def registry_lock() -> contextlib.AbstractContextManager[None]:
    """Lock guarding address claims and the creation and sweeping of server directories."""
    return file_lock(sim_root() / ".lock")


def process_start_time(pid: int) -> int | None:
    """Kernel start time (clock ticks since boot) of ``pid``; ``None`` if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start_time = fields[0], fields[19]
    if state in ("Z", "X"):
        return None
    return int(start_time)


@dataclasses.dataclass(frozen=True)
class ProcessIdentity:
    """A process named by pid and start time, immune to pid reuse."""

    pid: int
    start_time: int

    @classmethod
    def current(cls) -> ProcessIdentity:
        """Identity of the calling process."""
        return cls.of(os.getpid()) or cls(os.getpid(), 0)

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """Identity of a live ``pid``, or ``None`` when it is gone or a zombie."""
        start_time = process_start_time(pid)
        return None if start_time is None else cls(pid, start_time)

    def is_alive(self) -> bool:
        """True while this very process (not a later one reusing the pid) exists."""
        return process_start_time(self.pid) == self.start_time

    def to_json(self) -> dict[str, int]:
        """JSON-serialisable form."""
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: Any) -> ProcessIdentity:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on malformed data."""
        try:
            return cls(int(data["pid"]), int(data["start_time"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed process identity {data!r}") from exc


def validate_host(host: object) -> str:
    """Return ``host`` normalised if it is an IPv4 address in 127.0.0.0/8, else raise.

    Raises ``ValueError`` naming the ``host`` parameter. Host names (``localhost``) are refused:
    each instance is told apart by its literal address.
    """
    if not isinstance(host, str):
        raise ValueError(f"host must be an IPv4 address in 127.0.0.0/8, got {host!r}")
    try:
        address = ipaddress.IPv4Address(host)
    except ipaddress.AddressValueError:
        raise ValueError(
            f"host must be an IPv4 address in 127.0.0.0/8, got {host!r}"
        ) from None
    if address not in LOOPBACK or address in (LOOPBACK.network_address, LOOPBACK.broadcast_address):
        raise ValueError(f"host must be an IPv4 address in 127.0.0.0/8, got {host!r}")
    return str(address)


def listening_addresses() -> set[str]:
    """IPv4 addresses that have at least one listening TCP socket on this machine."""
    found: set[str] = set()
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[3] == _TCP_LISTEN:
            address_hex = fields[1].split(":")[0]
            # The kernel prints the raw 32-bit value in host byte order.
            found.add(socket.inet_ntoa(struct.pack("=I", int(address_hex, 16))))
    return found


def port_is_free(host: str, port: int) -> bool:
    """True if nothing listens on ``host:port`` (``SO_REUSEADDR`` ignores TIME_WAIT leftovers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port(host: str) -> int:
    """A port on ``host`` that is free right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _claims_dir() -> Path:
    return ensure_dir(sim_root() / "addresses")


def claim_path(host: str) -> Path:
    """Path of the claim file for ``host`` (whether or not it exists)."""
    return _claims_dir() / host


def _candidates(start: int) -> Iterator[int]:
    """Every allocatable address once, beginning at ``start`` and wrapping around."""
    span = _LAST_ALLOCATED - _FIRST_ALLOCATED + 1
    for offset in range(span):
        value = _FIRST_ALLOCATED + (start - _FIRST_ALLOCATED + offset) % span
        if value & 0xFF not in (0, 255):
            yield value


def claim_address(owner: ProcessIdentity, purpose: str) -> str:
    """Claim and return a free loopback address for ``owner``.

    Free means: no claim file (stale claims are swept first) and no listening socket on it.
    Addresses are handed out round-robin from a cursor shared by all processes, so a released
    address is not reused soon: a client still retrying an old server's address must not
    reach the next test's server. ``purpose`` is recorded in the claim for humans.
    """
    with registry_lock():
        _sweep_claims_locked()
        taken = {entry.name for entry in _claims_dir().iterdir()} | listening_addresses()
        cursor = sim_root() / ".next-address"
        try:
            start = int(ipaddress.IPv4Address(cursor.read_text().strip()))
        except (OSError, ValueError):
            start = _FIRST_ALLOCATED
        for value in _candidates(start):
            host = str(ipaddress.IPv4Address(value))
            if host in taken:
                continue
            record = {"owner": owner.to_json(), "purpose": purpose}
            fd = os.open(claim_path(host), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            following = value + 1 if value < _LAST_ALLOCATED else _FIRST_ALLOCATED
            cursor.write_text(str(ipaddress.IPv4Address(following)) + "\n")
            LOGGER.debug("claimed address %s for %s (pid %d)", host, purpose, owner.pid)
            return host
    raise RuntimeError("no free loopback address left in 127.10.0.1-127.254.255.254")


def release_address(host: str, owner: ProcessIdentity) -> None:
    """Remove ``owner``'s claim on ``host``; a claim held by someone else is left alone."""
    with registry_lock():
        release_address_locked(host, owner)


def release_address_locked(host: str, owner: ProcessIdentity) -> None:
    """:func:`release_address` for a caller that already holds :func:`registry_lock`."""
    path = claim_path(host)
    if _claim_owner(path) == owner:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            LOGGER.debug("released address %s", host)


def claim_is_held(host: str) -> bool:
    """True while a claim file for ``host`` exists (stale or not)."""
    return claim_path(host).exists()


def _claim_owner(path: Path) -> ProcessIdentity | None:
    try:
        return ProcessIdentity.from_json(json.loads(path.read_text())["owner"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        # Claims are written in one go under the lock, so this is damage, not a race.
        return ProcessIdentity(pid=0, start_time=0)


def sweep_address_claims() -> list[str]:
    """Remove claims whose owner process is dead; return the addresses freed."""
    with registry_lock():
        return _sweep_claims_locked()


def _sweep_claims_locked() -> list[str]:
    freed: list[str] = []
    for path in _claims_dir().iterdir():
        owner = _claim_owner(path)
        if owner is not None and not owner.is_alive():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            freed.append(path.name)
    if freed:
        LOGGER.info("swept stale address claims: %s", ", ".join(sorted(freed)))
    return freed
