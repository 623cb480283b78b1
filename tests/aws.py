"""AWS APIs for the tests: moto in server mode (a real HTTP endpoint on loopback).

moto stands in only for what cannot exist on this machine (the AWS control plane: RDS, STS,
Secrets Manager, IAM); the databases behind it are the simulator's real servers. Every client
made here talks to the server over HTTP, exactly as boto3 talks to AWS, so retries, signing
and (de)serialisation are exercised for real.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from moto.server import ThreadedMotoServer

__all__ = ["TEST_CREDENTIALS", "aws_env", "moto_server"]

#: The credentials every test client signs with (moto accepts any; the simulator's IAM
#: verifier re-derives signatures with these).
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    """Start a moto server on a free loopback port; yields its endpoint URL."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point boto3's default credential chain at :data:`TEST_CREDENTIALS` for one test
    (never at a developer's real profile)."""
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
