"""The simulator's server image, built on this machine: no image registry is needed.

The Docker backend (:mod:`simulator.testcontainers_backend`) runs PostgreSQL 15 and MariaDB
from one local image, ``resilient-db-sim-server:<recipe hash>``, made here from Debian
packages:

1. ``debootstrap --variant=minbase`` makes a Debian root file system from the mirror of this
   machine's own apt configuration (``/etc/apt/sources.list.d/*.sources`` or
   ``/etc/apt/sources.list``; nothing is hard-coded);
2. the ``postgres`` and ``mysql`` users and groups are created in it with *this machine's*
   ids before the server packages are installed (``postgresql-15``, ``mariadb-server``), so
   that a container running as ``postgres`` owns the data directories the simulator shares
   with it by bind mount, and the host's own tools (``pg_basebackup``, ``pg_rewind``) can
   still read them;
3. ``docker import`` turns the tree into the image.

The tag is a hash of everything that shapes the image (this recipe, the mirror, the suite and
the user ids), so a changed input builds a new image and an unchanged one is reused. A
``docker save`` tarball of it is kept in the cache directory (``$RESILIENT_DB_IMAGE_CACHE``,
default ``~/.cache/resilient_db/images``) and loaded with ``docker load`` when the daemon's
storage is fresh (a new CI machine keeps its cache, a restarted daemon with a new data root).

Command line (``scripts/test`` runs ``ensure``)::

    python -m simulator.docker_images ensure     # build or load; print the image name
    python -m simulator.docker_images name       # the image name for the current inputs

Needs root (debootstrap, chroot) for a build; a load or a reuse needs only the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import hashlib
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IMAGE_REPOSITORY", "ImageRecipe", "apt_sources_of_this_machine", "ensure_image",
           "image_cache_dir",
           "image_name", "mirror_of_this_machine"]

LOGGER = logging.getLogger("resilient_db.simulator")

#: Repository name of the server image; the tag is the recipe hash.
IMAGE_REPOSITORY = "resilient-db-sim-server"
#: Server packages installed into the image (the versions the local backend runs).
SERVER_PACKAGES = ("postgresql-15", "mariadb-server")
#: Bump when the build steps change in a way the hashed inputs do not show.
_RECIPE_VERSION = "1"
#: The service accounts whose ids the image shares with this machine.
_ACCOUNTS = ("postgres", "mysql")
_BUILD_TIMEOUT = 1500.0
_DOCKER_TIMEOUT = 600.0
_SUITE_RE = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class ImageRecipe:
    """Everything the image depends on: its hash is the image tag."""

    mirror: str
    suite: str
    accounts: tuple[tuple[str, int, int], ...]  # (name, uid, gid)
    #: This machine's apt sources (file name, text), installed in the image before the
    #: server packages so that it gets the same package versions (security updates too).
    sources: tuple[tuple[str, str], ...] = ()
    packages: tuple[str, ...] = SERVER_PACKAGES

    def digest(self) -> str:
        text = "\n".join([_RECIPE_VERSION, self.mirror, self.suite, *self.packages,
                          *(f"{name}:{uid}:{gid}" for name, uid, gid in self.accounts),
                          *(f"{name}\n{body}" for name, body in self.sources)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def for_this_machine(cls) -> ImageRecipe:
        mirror, suite = mirror_of_this_machine()
        accounts = []
        for name in _ACCOUNTS:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                raise RuntimeError(f"no {name!r} user on this machine: install the server "
                                   "packages first (scripts/_bootstrap.sh does)") from None
            accounts.append((name, entry.pw_uid, entry.pw_gid))
        return cls(mirror=mirror, suite=suite, accounts=tuple(accounts),
                   sources=apt_sources_of_this_machine())


def apt_sources_of_this_machine(apt_dir: Path = Path("/etc/apt")) -> tuple[tuple[str, str], ...]:
    """``(path relative to /etc/apt, text)`` of every apt source file of this machine."""
    paths = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
             *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    return tuple((str(path.relative_to(apt_dir)), path.read_text())
                 for path in paths if path.is_file())


def mirror_of_this_machine(apt_dir: Path = Path("/etc/apt")) -> tuple[str, str]:
    """``(mirror URI, suite)`` of the first Debian main-archive entry of apt's configuration.

    Reads deb822 ``*.sources`` files first, then one-line ``sources.list`` files; security
    and ``-updates``/``-backports`` suites are skipped (debootstrap needs the release itself).
    """
    candidates: list[tuple[str, str]] = []
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    candidates.append((uri, suite))
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            # deb [option=value ...] uri suite components...
            words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                candidates.append((words[1], words[2]))
    for uri, suite in candidates:
        if _SUITE_RE.fullmatch(suite) and "security" not in uri:
            return uri.rstrip("/"), suite
    raise RuntimeError(f"no Debian release mirror in {apt_dir} (sources.list.d/*.sources or "
                       "sources.list): cannot build the simulator's server image")


def image_cache_dir() -> Path:
    """Where ``docker save`` tarballs of built images are kept between runs."""
    configured = os.environ.get("RESILIENT_DB_IMAGE_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "resilient_db" / "images"


def image_name(recipe: ImageRecipe | None = None) -> str:
    """``resilient-db-sim-server:<hash>`` for ``recipe`` (default: this machine's)."""
    recipe = recipe or ImageRecipe.for_this_machine()
    return f"{IMAGE_REPOSITORY}:{recipe.digest()}"


def _docker(*args: str, timeout: float = _DOCKER_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          check=check)


def _image_present(name: str) -> bool:
    return _docker("image", "inspect", name, check=False).returncode == 0


def ensure_image(recipe: ImageRecipe | None = None) -> str:
    """Make the server image available to the daemon; return its name.

    Reuses the daemon's copy, else loads the cached tarball, else builds (and caches) it.
    """
    recipe = recipe or ImageRecipe.for_this_machine()
    name = image_name(recipe)
    if _image_present(name):
        LOGGER.info("image %s is present", name)
        return name
    tarball = image_cache_dir() / f"{IMAGE_REPOSITORY}-{recipe.digest()}.tar"
    if tarball.is_file():
        started = time.monotonic()
        result = _docker("load", "-i", str(tarball), check=False)
        if result.returncode == 0 and _image_present(name):
            LOGGER.info("loaded %s from %s in %.1f s", name, tarball, time.monotonic() - started)
            return name
        LOGGER.warning("could not load %s (%s); rebuilding", tarball, result.stderr.strip())
    started = time.monotonic()
    _build(recipe, name)
    LOGGER.info("built %s in %.1f s", name, time.monotonic() - started)
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial")
    _docker("save", "-o", str(partial), name)
    partial.replace(tarball)
    for stale in tarball.parent.glob(f"{IMAGE_REPOSITORY}-*.tar"):
        if stale != tarball:
            stale.unlink(missing_ok=True)
    return name


def _run(argv: list[str], **kwargs: object) -> None:
    LOGGER.info("running %s", " ".join(argv[:6]))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=_BUILD_TIMEOUT,
                            check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise RuntimeError(f"{argv[0]} failed with status {result.returncode}:\n{tail}")


def _build(recipe: ImageRecipe, name: str) -> None:
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="resilient_db-image-", dir="/var/tmp") as work:
        root = Path(work) / "root"
        _run(["debootstrap", "--variant=minbase", recipe.suite, str(root), recipe.mirror])
        # The service accounts first, with this machine's ids: the packages' maintainer
        # scripts then reuse them instead of allocating their own.
        for account, uid, gid in recipe.accounts:
            _run(["chroot", str(root), "groupadd", "--system", "--gid", str(gid), account])
            _run(["chroot", str(root), "useradd", "--system", "--uid", str(uid), "--gid",
                  str(gid), "--home-dir", f"/var/lib/{_home(account)}", "--no-create-home",
                  "--shell", "/bin/bash" if account == "postgres" else "/bin/false", account])
        # No service may start inside the build chroot.
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
        if recipe.sources:
            (root / "etc/apt/sources.list").unlink(missing_ok=True)
            for relative, text in recipe.sources:
                (root / "etc/apt" / relative).write_text(text)
            _run(["chroot", str(root), "apt-get", "update", "-q"], env=env)
        _run(["chroot", str(root), "apt-get", "install", "-y", "-q",
              "--no-install-recommends", *recipe.packages], env=env)
        # The image is a runtime for the simulator's own data directories: drop the
        # packages' default clusters, apt's caches and the policy file.
        for leftover in ("var/lib/postgresql/15/main", "etc/postgresql/15/main",
                         "var/lib/mysql", "var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / leftover, ignore_errors=True)
        policy.unlink()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(root / "etc/hostname")
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."],
                               stdout=subprocess.PIPE)
        try:
            result = subprocess.run(["docker", "import", "-", name], stdin=tar.stdout,
                                    capture_output=True, text=True, timeout=_BUILD_TIMEOUT,
                                    check=False)
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
        if result.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"docker import failed: {result.stderr.strip()}")


def _home(account: str) -> str:
    return "postgresql" if account == "postgres" else "mysql"


def _check_groups() -> None:
    for name in _ACCOUNTS:
        grp.getgrgid(pwd.getpwnam(name).pw_gid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator.docker_images",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("command", choices=("ensure", "name"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command == "name":
        print(image_name())
        return 0
    _check_groups()
    print(ensure_image())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
