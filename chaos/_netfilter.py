"""iptables plumbing for :mod:`chaos.netfault`: our own chains, owner-tagged rules, sweeping.

Every rule lives in a chain of ours, :data:`CHAIN`, in the ``filter`` table (jumped to from
``INPUT`` and ``OUTPUT``) or in the ``nat`` or ``mangle`` table (jumped to from ``OUTPUT``).
The built-in chains only ever receive one jump rule each, so nothing of anyone else's is
touched, flushed or reordered. Each of our rules carries a comment naming its owner process by
pid *and* kernel start time (``resilient_db_netfault owner=<pid>:<start> fault=<n>``), so
that a rule left behind by a process that died without cleaning up (SIGKILL, a crash of the
test runner) is recognised as stale and removed by :func:`sweep_dead_owners`, whichever
process runs it.

Changes to our chains happen under an exclusive ``flock`` (:func:`chain_lock`) so that
concurrent processes never race on creating or removing a chain or its jump rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

LOGGER = logging.getLogger("chaos.netfault")

#: Name of our chain, in the ``filter`` table and in the ``nat`` table.
CHAIN = "RESILIENT_DB_FAULTS"
#: First word of every rule comment of ours.
TAG = "resilient_db_netfault"

Table = Literal["filter", "nat", "mangle"]
TABLES: tuple[Table, ...] = ("filter", "nat", "mangle")
#: Built-in chains that jump to ours, per table. Locally generated traffic on loopback passes
#: OUTPUT then INPUT; ``nat`` only needs OUTPUT (DNAT of locally generated connections);
#: ``mangle`` OUTPUT queues packets to be delayed (before ``nat`` and ``filter``, so a
#: delayed packet still meets their rules).
HOOKS: dict[Table, tuple[str, ...]] = {"filter": ("INPUT", "OUTPUT"), "nat": ("OUTPUT",),
                                       "mangle": ("OUTPUT",)}

# Seconds iptables waits for the xtables lock held by another process's iptables.
_XTABLES_WAIT = "10"
_COMMENT = re.compile(rf"{TAG} owner=(\d+):(\d+) fault=(\d+)")
# What iptables says when asked to delete a rule or chain that is not there.
_MISSING = ("does a matching rule exist", "No chain/target/match by that name",
            "Bad rule", "does not exist")


class NetfilterError(RuntimeError):
    """An iptables command failed; the message holds the command and iptables' own words."""


def _start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (clock ticks since boot); ``None`` if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and ')'
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclasses.dataclass(frozen=True)
class Owner:
    """A process named by pid and start time, immune to pid reuse."""

    pid: int
    start_time: int

    @classmethod
    def current(cls) -> Owner:
        return cls(os.getpid(), _start_time(os.getpid()) or 0)

    def is_alive(self) -> bool:
        """True while this very process (not a later one reusing the pid) exists."""
        return _start_time(self.pid) == self.start_time

    def comment(self, fault_id: int) -> str:
        return f"{TAG} owner={self.pid}:{self.start_time} fault={fault_id}"


def iptables_path() -> str | None:
    """Path of the ``iptables`` binary, or ``None`` when it is not installed."""
    return shutil.which("iptables") or next(
        (p for p in ("/usr/sbin/iptables", "/sbin/iptables") if os.access(p, os.X_OK)), None)


def unavailable_reason() -> str | None:
    """Why rules cannot be installed here (not root, no iptables), or ``None`` if they can."""
    if os.geteuid() != 0:
        return "network faults need root (iptables rules); run the tests as root"
    if iptables_path() is None:
        return "network faults need the iptables command (Debian package 'iptables')"
    return None


def iptables(table: Table, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``iptables -w -t <table> <args>``; raise :class:`NetfilterError` on failure if
    ``check``."""
    binary = iptables_path()
    if binary is None:
        raise NetfilterError(unavailable_reason() or "iptables not found")
    command = [binary, "-w", _XTABLES_WAIT, "-t", table, *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetfilterError(f"{shlex.join(command)} failed (exit {result.returncode}): "
                             f"{result.stderr.strip()}")
    return result


def _lock_path() -> Path:
    base = Path("/run/lock")
    return (base if base.is_dir() else Path(tempfile.gettempdir())) / "resilient_db_netfault.lock"


@contextlib.contextmanager
def chain_lock() -> Iterator[None]:
    """Exclusive lock over our chains, across threads and processes."""
    fd = os.open(_lock_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _is_missing(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and any(text in result.stderr for text in _MISSING)


def ensure_chain(table: Table) -> None:
    """Create our chain in ``table`` and its jump rules if missing. Call under the lock."""
    if iptables(table, "-S", CHAIN, check=False).returncode != 0:
        iptables(table, "-N", CHAIN)
    for hook in HOOKS[table]:
        if iptables(table, "-C", hook, "-j", CHAIN, check=False).returncode != 0:
            # First position: an ACCEPT earlier in the hook would otherwise bypass our faults.
            iptables(table, "-I", hook, "1", "-j", CHAIN)


def rule_lines(table: Table) -> list[str]:
    """``-A`` lines of our chain in ``table`` (``[]`` when the chain does not exist)."""
    result = iptables(table, "-S", CHAIN, check=False)
    if result.returncode != 0:
        return []
    return [line for line in result.stdout.splitlines() if line.startswith("-A ")]


def remove_chain_if_empty(table: Table) -> bool:
    """Remove the jump rules and our chain from ``table`` if the chain holds no rule. Call
    under the lock. Returns True if removed (or absent)."""
    result = iptables(table, "-S", CHAIN, check=False)
    if result.returncode != 0:
        return True
    if any(line.startswith("-A ") for line in result.stdout.splitlines()):
        return False
    for hook in HOOKS[table]:
        while iptables(table, "-C", hook, "-j", CHAIN, check=False).returncode == 0:
            iptables(table, "-D", hook, "-j", CHAIN)
    deleted = iptables(table, "-X", CHAIN, check=False)
    if deleted.returncode != 0 and not _is_missing(deleted):
        raise NetfilterError(f"cannot remove chain {CHAIN} from table {table}: "
                             f"{deleted.stderr.strip()}")
    return True


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule of ours: the table and its arguments after ``-A CHAIN`` (comment included)."""

    table: Table
    spec: tuple[str, ...]

    def add(self) -> None:
        iptables(self.table, "-A", CHAIN, *self.spec)

    def delete(self) -> bool:
        """Delete the rule; False if it was already gone (someone removed it)."""
        result = iptables(self.table, "-D", CHAIN, *self.spec, check=False)
        if result.returncode == 0:
            return True
        if _is_missing(result):
            return False
        raise NetfilterError(f"cannot delete rule {shlex.join(self.spec)} from {self.table}/"
                             f"{CHAIN}: {result.stderr.strip()}")


def owner_of(line: str) -> tuple[Owner, int] | None:
    """Owner and fault id from a rule line's comment; ``None`` for a rule not tagged by us."""
    match = _COMMENT.search(line)
    if match is None:
        return None
    return Owner(int(match[1]), int(match[2])), int(match[3])


def delete_line(table: Table, line: str) -> bool:
    """Delete the rule printed as ``line`` by ``iptables -S``; False if already gone."""
    words = shlex.split(line)
    if words[:2] != ["-A", CHAIN]:
        raise ValueError(f"not a rule of chain {CHAIN}: {line!r}")
    return Rule(table, tuple(words[2:])).delete()


def sweep_dead_owners() -> list[str]:
    """Remove every rule of ours whose owner process is dead, then empty chains. Returns the
    removed rules as ``<table>: <line>``. Rules without our comment are stale by definition
    (every rule we add carries one) and are removed too."""
    with chain_lock():
        return sweep_dead_owners_locked()


def sweep_dead_owners_locked() -> list[str]:
    """:func:`sweep_dead_owners` for a caller that holds :func:`chain_lock`."""
    removed: list[str] = []
    for table in TABLES:
        for line in rule_lines(table):
            tagged = owner_of(line)
            if tagged is not None and tagged[0].is_alive():
                continue
            if delete_line(table, line):
                removed.append(f"{table}: {line}")
        remove_chain_if_empty(table)
    if removed:
        LOGGER.warning("removed %d network fault rule(s) left by dead processes: %s",
                       len(removed), "; ".join(removed))
    return removed


def rules_of(owner: Owner | None = None) -> list[str]:
    """Our rules (of one owner, or all) as ``<table>: <line>``, for tests and diagnostics."""
    found: list[str] = []
    for table in TABLES:
        for line in rule_lines(table):
            tagged = owner_of(line)
            if owner is None or (tagged is not None and tagged[0] == owner):
                found.append(f"{table}: {line}")
    return found

