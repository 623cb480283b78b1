"""Name resolution for simulated clusters, through ``/etc/hosts``.

An unmodified client resolves simulated endpoint names with the system resolver, so the
simulator writes them into ``/etc/hosts`` (glibc re-reads the file on every lookup, and
Debian's ``/etc/host.conf`` has ``multi on``, so a name listed on several lines resolves to
all of its addresses, in file order). Every line the simulator writes is marked::

    127.10.0.5  db1.cluster-c0ffee...  # resilient_db-sim owner=1234:5678 cluster=db1

- each line names its owner process (pid and kernel start time) and cluster, so concurrent
  clusters (in one process or several) replace only their own lines;
- marked lines whose owner is dead are swept at every write (and by :func:`sweep_stale`),
  so a killed test run leaves nothing behind after the next start;
- writes happen in place (``/etc/hosts`` may be a bind mount that cannot be renamed over)
  under the simulator's registry lock.

``RESILIENT_DB_SIM_HOSTS`` points the module at another file (tests of this module only:
real resolution needs ``/etc/hosts``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._addresses import ProcessIdentity, registry_lock

__all__ = ["MARK", "HostsFile"]

LOGGER = logging.getLogger("resilient_db.simulator")

MARK = "# resilient_db-sim"
HOSTS_ENV = "RESILIENT_DB_SIM_HOSTS"


def _owner_of(line: str) -> tuple[ProcessIdentity | None, str | None]:
    owner: ProcessIdentity | None = None
    cluster: str | None = None
    for token in line.split(MARK, 1)[1].split():
        key, _, value = token.partition("=")
        if key == "owner":
            pid, _, start = value.partition(":")
            if pid.isdigit() and start.isdigit():
                owner = ProcessIdentity(pid=int(pid), start_time=int(start))
        elif key == "cluster":
            cluster = value
    return owner, cluster


class HostsFile:
    """The marked part of a hosts file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or Path(os.environ.get(HOSTS_ENV, "/etc/hosts"))

    def set_cluster(
        self, cluster: str, entries: Sequence[tuple[str, str]], owner: ProcessIdentity
    ) -> None:
        """Replace every line of ``cluster`` (owned by ``owner``) with ``entries``:
        ``(name, address)`` pairs, in the order they should resolve."""
        if any(c.isspace() or c in "#=" for c in cluster):
            raise ValueError(f"cluster name {cluster!r} may not contain spaces, '#' or '='")
        tag = f"{MARK} owner={owner.pid}:{owner.start_time} cluster={cluster}"
        new = [f"{address}\t{name}\t{tag}" for name, address in entries]
        with registry_lock():
            kept = [line for line in self._read() if not self._drop(line, cluster, owner)]
            self._write(kept + new)

    def remove_cluster(self, cluster: str, owner: ProcessIdentity) -> None:
        self.set_cluster(cluster, (), owner)

    def sweep(self) -> int:
        """Remove marked lines of dead owners; returns how many were removed."""
        with registry_lock():
            lines = self._read()
            kept = [line for line in lines if not self._dead(line)]
            if len(kept) != len(lines):
                self._write(kept)
            return len(lines) - len(kept)

    def entries(self, cluster: str | None = None) -> list[tuple[str, str]]:
        """``(name, address)`` of the marked lines (of one cluster)."""
        result = []
        for line in self._read():
            if MARK not in line:
                continue
            _, line_cluster = _owner_of(line)
            if cluster is not None and line_cluster != cluster:
                continue
            fields = line.split(MARK, 1)[0].split()
            result += [(name, fields[0]) for name in fields[1:]]
        return result

    def resolve(self, name: str) -> list[str]:
        """The addresses ``name`` resolves to through the marked lines, in order."""
        return [address for entry, address in self.entries() if entry == name]

    # --- internals ------------------------------------------------------------------------
    def _drop(self, line: str, cluster: str, owner: ProcessIdentity) -> bool:
        if MARK not in line:
            return False
        line_owner, line_cluster = _owner_of(line)
        if line_owner is None or not line_owner.is_alive():
            return True
        return line_cluster == cluster and line_owner == owner

    def _dead(self, line: str) -> bool:
        if MARK not in line:
            return False
        owner, _ = _owner_of(line)
        return owner is None or not owner.is_alive()

    def _read(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def _write(self, lines: Sequence[str]) -> None:
        text = "\n".join(lines) + "\n" if lines else ""
        # In place: /etc/hosts may be a bind mount that cannot be replaced by rename.
        with open(self.path, "r+" if self.path.exists() else "w") as handle:
            handle.seek(0)
            handle.write(text)
            handle.truncate()


def cluster_entries(
    endpoints: Mapping[str, Sequence[str]],
) -> list[tuple[str, str]]:
    """Flatten ``{name: [address, ...]}`` into ordered ``(name, address)`` pairs."""
    return [(name, address) for name, addresses in endpoints.items() for address in addresses]
