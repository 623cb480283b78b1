"""Credentials from AWS Secrets Manager for a chaos run, and their rotation under load.

A scenario whose workload selects ``aws_secrets_manager`` (or that has a ``rotate_secret``
step) logs the application in with a secret instead of the cluster's user and password:

- a database user of its own (``chaos_<hex>``, random password) with the application user's
  privileges (PostgreSQL: a member of the application role; MariaDB: its grants replayed),
  created on the writer, so it replicates to every instance;
- a secret ``{"username": ..., "password": ...}`` in Secrets Manager: moto in server mode on
  loopback (a real HTTP endpoint), started here, with throwaway AWS credentials in the
  environment for the duration of the run;
- the workload's connect arguments: no user or password, ``secrets_manager_secret_id``,
  ``secrets_manager_region`` and ``secrets_manager_endpoint`` instead.

``rotate_secret`` does what a rotation does to a running application: a new password is
stored in the secret (``put_secret_value``, a new ``AWSCURRENT`` version) and set on the
database (``ALTER ROLE``/``ALTER USER`` on the writer). Open connections are unaffected; the
next physical connect with the cached old password is refused, fetches the secret again and
retries once (``docs/plugins/aws_secrets_manager.md``). The runner's own connections (table
set-up, the final read) keep using the cluster's user.

Simulated clusters only: on RDS (``chaos.rds.RdsControl``) creating users and rotating
passwords is the database owner's business, so such a scenario is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
from typing import Any

from chaos.control import ClusterControl, ControlError, EngineSql

__all__ = ["PLUGIN", "SecretAuth", "needs_secret"]

LOGGER = logging.getLogger("chaos.secrets")

PLUGIN = "aws_secrets_manager"
REGION = "us-east-1"
#: Credentials for the run's own moto server (it accepts any).
_ENV = {"AWS_ACCESS_KEY_ID": "chaos-testing", "AWS_SECRET_ACCESS_KEY": "chaos-testing"}
_ENV_CLEARED = ("AWS_SESSION_TOKEN", "AWS_PROFILE")


def needs_secret(plugins: str, actions: list[str]) -> bool:
    """Whether a run with these plugin codes and fault actions logs in with a secret."""
    return PLUGIN in [c.strip() for c in plugins.split(",")] or "rotate_secret" in actions


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SecretAuth:
    """The secret, its database user and the moto server of one run (see the module
    docstring). Create with :meth:`setup`; :meth:`close` at the end."""

    def __init__(self, control: ClusterControl, sql: EngineSql) -> None:
        cluster = getattr(control, "cluster", None)
        if cluster is None:
            raise ControlError("secret rotation needs a simulated cluster (the runner creates "
                               "a database user and changes its password)")
        self._cluster = cluster
        self._control = control
        self._engine = sql.engine
        self.user = f"chaos_{secrets.token_hex(4)}"
        self._password = secrets.token_urlsafe(18)
        self.secret_id = f"chaos/{self.user}"
        self.rotations = 0
        self._server: Any = None
        self._saved_env: dict[str, str | None] = {}
        self._werkzeug_level: int | None = None
        self.endpoint = ""
        self._client: Any = None

    @classmethod
    def setup(cls, control: ClusterControl, sql: EngineSql) -> SecretAuth:
        auth = cls(control, sql)
        try:
            auth._start_moto()
            auth._create_user()
            auth._client.create_secret(Name=auth.secret_id, SecretString=auth._document())
        except BaseException:
            auth.close()
            raise
        return auth

    # --- set-up -------------------------------------------------------------------------------

    def _start_moto(self) -> None:
        try:
            import boto3
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise ControlError(f"secret rotation needs boto3 and moto[server] ({exc}): "
                               "pip install 'resilient_db[chaos]'") from None
        for name in (*_ENV, *_ENV_CLEARED):
            self._saved_env[name] = os.environ.get(name)
        os.environ.update(_ENV)
        for name in _ENV_CLEARED:
            os.environ.pop(name, None)
        # moto's HTTP server logs every request at INFO (werkzeug): not the run's output.
        werkzeug = logging.getLogger("werkzeug")
        self._werkzeug_level = werkzeug.level
        werkzeug.setLevel(max(werkzeug.getEffectiveLevel(), logging.WARNING))
        port = _free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        self._client = boto3.session.Session().client(
            "secretsmanager", region_name=REGION, endpoint_url=self.endpoint)

    def _document(self) -> str:
        return json.dumps({"username": self.user, "password": self._password})

    def _superuser(self) -> Any:
        return self._cluster.superuser()

    def _create_user(self) -> None:
        app = str(self._cluster.credentials()["user"])
        with self._superuser() as conn:
            cur = conn.cursor()
            if self._engine == "pg":
                # A member of the application role: its tables, functions and settings.
                cur.execute(self._pg("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}", app))
            else:
                cur.execute(f"CREATE USER '{self.user}'@'%' IDENTIFIED BY %s",
                            (self._password,))
                cur.execute(f"SHOW GRANTS FOR '{app}'@'%'")
                for (grant,) in cur.fetchall():
                    statement = self._replay(str(grant), app)
                    if statement:
                        cur.execute(statement)
            cur.close()

    def _pg(self, template: str, role: str | None = None) -> Any:
        """A PostgreSQL utility statement with the user, password (and role) quoted on the
        client side (utility statements take no bind parameters)."""
        from psycopg import sql

        parts: list[Any] = [sql.Identifier(self.user), sql.Literal(self._password)]
        if role is not None:
            parts.append(sql.Identifier(role))
        return sql.SQL(template).format(*parts)

    def _replay(self, grant: str, app: str) -> str | None:
        """The application user's ``SHOW GRANTS`` line as a grant to this run's user."""
        grant = re.sub(r"\s+IDENTIFIED BY PASSWORD\s+'[^']*'", "", grant)
        target = re.compile(rf"\bTO\s+[`']{re.escape(app)}[`']@[`']%[`']")
        if not target.search(grant) or grant.startswith("GRANT USAGE ON *.*"):
            return None
        return target.sub(f"TO '{self.user}'@'%'", grant)

    # --- the workload's side ------------------------------------------------------------------

    def workload_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` without the cluster's user and password, with the secret's
        properties."""
        out = {k: v for k, v in kwargs.items() if k not in ("user", "password")}
        out.update(secrets_manager_secret_id=self.secret_id, secrets_manager_region=REGION,
                   secrets_manager_endpoint=self.endpoint)
        return out

    # --- the fault ----------------------------------------------------------------------------

    def rotate(self) -> None:
        """A new password in the secret (a new ``AWSCURRENT`` version), then on the database
        (the writer; it replicates)."""
        self._password = secrets.token_urlsafe(18)
        self._client.put_secret_value(SecretId=self.secret_id, SecretString=self._document())
        with self._superuser() as conn:
            cur = conn.cursor()
            if self._engine == "pg":
                cur.execute(self._pg("ALTER ROLE {} PASSWORD {}"))
            else:
                cur.execute(f"ALTER USER '{self.user}'@'%' IDENTIFIED BY %s",
                            (self._password,))
            cur.close()
        self.rotations += 1
        self._control.record("secret_rotated", None, secret=self.secret_id,
                             user=self.user, rotation=self.rotations)

    def close(self) -> None:
        """Stop the moto server and restore the environment (the database user stays with
        the cluster, which the run owns or the caller settles)."""
        if self._server is not None:
            try:
                self._server.stop()
            except Exception:  # best effort at the end of a run
                LOGGER.debug("stopping the moto server failed", exc_info=True)
            self._server = None
        if self._werkzeug_level is not None:
            logging.getLogger("werkzeug").setLevel(self._werkzeug_level)
            self._werkzeug_level = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}
