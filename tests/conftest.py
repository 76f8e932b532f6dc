"""Shared fixtures: a private Redis per test session, started from the bundled binary."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import redis as redis_lib

from producer.embedded import redis_server
from servers.s3 import use_dummy_aws_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free TCP port, for the whole test session."""
    with redis_server(port=free_port(), use_socket=False) as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _clean_bgswap_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Tests set what they need; nothing leaks in from the developer's shell. Every test,
    and every process it starts (they inherit this environment), has dummy AWS
    credentials and the metadata lookup off: nothing reaches a cloud address."""
    import os

    for key in list(os.environ):
        if key.startswith("BGSWAP_") or key in ("RUNWARE_API_KEY", "FAL_KEY"):
            monkeypatch.delenv(key)
    use_dummy_aws_env(monkeypatch)
    # The embedded default's durable state: a folder of the test's own, never the
    # developer's (processes the test starts inherit it).
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
