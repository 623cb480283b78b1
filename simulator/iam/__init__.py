"""IAM database authentication, enforced by the simulator's real servers.

``cluster.enable_iam(user="iam_user")`` makes every instance of a cluster (readers added later
and instances promoted by a failover included) accept a login of ``iam_user`` only with a
valid, unexpired RDS IAM auth token (what boto3's ``generate_db_auth_token`` returns) for that
instance's host name, the cluster's port, that user and the cluster's region, signed with
credentials the simulator trusts (:data:`TEST_CREDENTIALS` unless told otherwise). The server
refuses anything else: expired, forged, wrong host, port, user or region.

How a login is checked (``docs/simulator.md`` has the whole story):

* PostgreSQL: a ``pg_hba.conf`` line ``host all <user> 127.0.0.0/8 pam pamservice=<service>``
  before the default ones; the backend asks the client for a cleartext password (the token)
  and hands it to PAM.
* MariaDB: the user is ``IDENTIFIED VIA pam USING '<service>'``; the ``auth_pam_v1`` plugin
  runs PAM inside ``mariadbd`` (as the ``mysql`` user: version 2 needs the setuid helper
  ``auth_pam_tool``, which this machine does not have) and ``pam_use_cleartext_plugin`` lets
  clients send the token with ``mysql_clear_password``.
* The PAM service ``/etc/pam.d/rdbsim-iam-<cluster>`` (one per cluster, removed when the
  cluster stops) runs ``pam_rdbsim_iam.so``, a small module compiled here from
  ``pam_rdbsim_iam.c`` (``pam_exec`` would cut the token at 512 bytes, PAM_MAX_RESP_SIZE, and
  tokens signed with session credentials are longer), which runs ``verify.py`` as the server's
  OS user in the server's data directory. The verifier reads the instance's ``iam.json``
  (next to the data directory, rewritten whenever roles change) and re-derives the signature
  with botocore.

Host names a token may name: the instance endpoint always; the cluster (writer) endpoint while
the instance is the writer; the reader endpoint while it is a reader (single-instance
flavours: the instance endpoint is all three). Not the IP address.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulator._addresses import ProcessIdentity, ensure_dir, file_lock, sim_root

if TYPE_CHECKING:
    from simulator.cluster import Cluster, Instance

__all__ = ["PAM_DIR", "TEST_CREDENTIALS", "ClusterIam", "IamCredentials", "IamError",
           "sweep_services"]

LOGGER = logging.getLogger("resilient_db.simulator")

#: Where Linux-PAM looks for service files (PostgreSQL and MariaDB call pam_start with a
#: service name only, so a private configuration directory is not an option).
PAM_DIR = Path("/etc/pam.d")
_SERVICE_PREFIX = "rdbsim-iam-"
_SOURCE_DIR = Path(__file__).resolve().parent
_MODULE_SOURCE = _SOURCE_DIR / "pam_rdbsim_iam.c"
_VERIFIER_SOURCE = _SOURCE_DIR / "verify.py"
#: Name of the per-instance settings file, in the server's base directory (the parent of its
#: data directory, so base backups and pg_rewind never copy it between instances).
CONFIG_NAME = "iam.json"


_OWNER_PREFIX = "# owner: "


def sweep_services() -> list[Path]:
    """Remove the PAM service files of clusters whose owner process is gone; return them."""
    removed: list[Path] = []
    for path in PAM_DIR.glob(f"{_SERVICE_PREFIX}*"):
        try:
            line = next((x for x in path.read_text().splitlines()
                         if x.startswith(_OWNER_PREFIX)), None)
            if line is None:
                continue
            owner = ProcessIdentity.from_json(json.loads(line[len(_OWNER_PREFIX):]))
        except (OSError, ValueError):
            continue  # not ours, or half-written: leave it
        if not owner.is_alive():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
    return removed


class IamError(RuntimeError):
    """IAM enforcement cannot be set up here (no root, no compiler, no PAM headers)."""


@dataclass(frozen=True)
class IamCredentials:
    """AWS credentials whose signatures the simulator accepts. ``session_token``: the token
    must carry it as ``X-Amz-Security-Token`` (temporary credentials, e.g. from STS);
    ``None``: long-term credentials, the token must carry none."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


#: The tests' credentials (``tests/aws.py`` ``TEST_CREDENTIALS``), trusted by default.
TEST_CREDENTIALS = IamCredentials("testing", "testing")


def _artifacts() -> tuple[Path, Path]:
    """The compiled PAM module and the verifier, built once per source version under the
    simulator root (world-readable: the servers' OS users run them)."""
    digest = hashlib.sha256()
    for path in (_MODULE_SOURCE, _VERIFIER_SOURCE):
        digest.update(path.read_bytes())
    digest.update(sys.executable.encode())
    base = ensure_dir(sim_root() / "iam")
    target = base / digest.hexdigest()[:16]
    module, verifier = target / "pam_rdbsim_iam.so", target / "verify.py"
    with file_lock(base / ".build.lock"):
        if module.exists() and verifier.exists():
            return module, verifier
        compiler = shutil.which("gcc") or shutil.which("cc")
        if compiler is None or not Path("/usr/include/security/pam_modules.h").exists():
            raise IamError("IAM enforcement compiles a PAM module: install gcc and the PAM "
                           "headers (Debian: apt-get install gcc libpam0g-dev)")
        building = ensure_dir(base / f"{target.name}.building")
        result = subprocess.run(
            [compiler, "-O2", "-Wall", "-fPIC", "-shared", "-o",
             str(building / module.name), str(_MODULE_SOURCE), "-lpam"],
            capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise IamError(f"compiling {_MODULE_SOURCE.name} failed: {result.stderr[-2000:]}")
        shutil.copyfile(_VERIFIER_SOURCE, building / verifier.name)
        for path in building.iterdir():
            os.chmod(path, 0o755 if path.suffix == ".so" else 0o644)
        os.chmod(building, 0o755)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(building, target)
    return module, verifier


def _tls_files() -> tuple[Path, Path]:
    base = ensure_dir(sim_root() / "iam")
    target = base / "tls"
    cert, key = target / "cert.pem", target / "key.pem"
    with file_lock(base / ".build.lock"):
        if cert.exists() and key.exists():
            return cert, key
        openssl = shutil.which("openssl")
        if openssl is None:
            raise IamError("IAM on MariaDB needs TLS: install openssl to make a certificate")
        building = ensure_dir(base / "tls.building")
        result = subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
             "-subj", "/CN=resilient_db simulator", "-keyout", str(building / key.name),
             "-out", str(building / cert.name)],
            capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise IamError(f"openssl could not make a certificate: {result.stderr[-2000:]}")
        # A throwaway test key: readable by the servers' OS users, which are not its owner.
        for path in building.iterdir():
            os.chmod(path, 0o644)
        os.chmod(building, 0o755)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(building, target)
    return cert, key


def _usable_by_others(path: Path) -> bool:
    """Whether an unprivileged user (the servers' OS users) can reach and read ``path`` (run
    it, for a file; list it, for a directory)."""
    try:
        target = path.resolve(strict=True)
        if not target.stat().st_mode & stat.S_IROTH:
            return False
        if (target.is_dir() or os.access(target, os.X_OK)) and not (
                target.stat().st_mode & stat.S_IXOTH):
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in target.parents)
    except OSError:
        return False


def _verifier_command(verifier: Path) -> str:
    """The verifier's command line: an interpreter the servers' OS users can run (this one
    if they can, e.g. not when it lives under /root; else the system's) and the directory to
    import botocore from."""
    try:
        import botocore  # type: ignore[import-untyped]
    except ImportError:
        raise IamError("the IAM verifier needs botocore: pip install 'resilient_db[aws]'") from None
    interpreter = next((candidate for candidate in (sys.executable, "/usr/bin/python3")
                        if _usable_by_others(Path(candidate))), None)
    if interpreter is None:
        raise IamError(f"the servers' OS users can run neither {sys.executable} nor "
                       "/usr/bin/python3, so they cannot run the IAM verifier")
    packages = Path(botocore.__file__).resolve().parent.parent
    if not _usable_by_others(packages):
        raise IamError(f"the servers' OS users cannot read {packages} (where botocore is), "
                       "so the IAM verifier cannot import it")
    return f"{interpreter} -I {verifier} --path {packages}"


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` atomically, mode 0600, owned like its directory (the server's user)."""
    owner = path.parent.stat()
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    if os.geteuid() == 0:
        os.chown(temporary, owner.st_uid, owner.st_gid)
    os.replace(temporary, path)


class ClusterIam:
    """IAM enforcement of one cluster: its PAM service, its IAM users, the credentials it
    trusts and each instance's ``iam.json``. Created by ``Cluster.enable_iam``."""

    def __init__(self, cluster: Cluster, region: str,
                 credentials: Sequence[IamCredentials]) -> None:
        if os.geteuid() != 0:
            raise IamError(f"IAM enforcement installs a PAM service in {PAM_DIR}: run as root")
        self.cluster = cluster
        self.region = region
        self.credentials: list[IamCredentials] = list(credentials)
        self.users: list[str] = []
        #: PAM service name, also the ``pamservice`` (PostgreSQL) and the ``USING`` string
        #: (MariaDB) of the IAM users.
        self.service = f"{_SERVICE_PREFIX}{cluster.name.lower()}-{cluster.naming.cluster_id}"
        self._service_file = PAM_DIR / self.service
        self._installed = False

    def install(self) -> None:
        """Write the PAM service file (idempotent), after removing those that processes
        which died without stopping their clusters left behind."""
        sweep_services()
        module, verifier = _artifacts()
        program = f"{module} {_verifier_command(verifier)}"
        owner = json.dumps(ProcessIdentity.current().to_json())
        text = ("# Written by the resilient_db simulator (simulator/iam); removed when the "
                "cluster stops.\n"
                f"{_OWNER_PREFIX}{owner}\n"
                f"auth     required  {program}\n"
                f"account  required  {module}\n")
        temporary = self._service_file.with_name(f".{self.service}.tmp")
        temporary.write_text(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, self._service_file)
        self._installed = True

    def tls_files(self) -> tuple[Path, Path]:
        """A throwaway self-signed certificate and its key (MariaDB: mysql-connector sends a
        cleartext password only over TLS), made once under the simulator root."""
        return _tls_files()

    def remove(self) -> None:
        """Remove the PAM service file (idempotent)."""
        if self._installed:
            with contextlib.suppress(FileNotFoundError):
                self._service_file.unlink()
            self._installed = False

    def add_user(self, user: str) -> bool:
        """Remember ``user`` as an IAM user; False if it already was one."""
        if user in self.users:
            return False
        self.users.append(user)
        return True

    def trust(self, credentials: Iterable[IamCredentials]) -> None:
        for item in credentials:
            if item not in self.credentials:
                self.credentials.append(item)

    def hosts(self, instance: Instance) -> list[str]:
        """The host names a token for ``instance`` may name in its current role."""
        names = [instance.endpoint]
        if instance.role == "writer":
            names.append(self.cluster.writer_endpoint)
        elif instance.role == "reader":
            names.append(self.cluster.reader_endpoint)
        return list(dict.fromkeys(names))

    def config(self, instance: Instance) -> dict[str, Any]:
        return {
            "version": 1,
            "instance": instance.id,
            "hosts": self.hosts(instance),
            "port": self.cluster.port,
            "region": self.region,
            "users": list(self.users),
            "credentials": [
                {"access_key_id": c.access_key_id, "secret_access_key": c.secret_access_key,
                 "session_token": c.session_token} for c in self.credentials],
        }

    def sync(self) -> None:
        """Rewrite every instance's ``iam.json`` from the roles it has now."""
        for instance in list(self.cluster.instances.values()):
            self.write(instance)

    def write(self, instance: Instance) -> None:
        base_dir = getattr(instance.runtime, "base_dir", None)
        if not isinstance(base_dir, Path) or not base_dir.is_dir():
            return  # not a local server (or removed): nothing here can enforce anything
        _write_private(base_dir / CONFIG_NAME, json.dumps(self.config(instance), indent=1))
