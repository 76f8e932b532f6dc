"""A worker's warm shutdown (SIGTERM) and a Redis restart, with real worker processes, a real
redis-server and the strict fake Runware: no row is lost, none is paid twice."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from batching import bgswap, clean_env, manifest_lines, png, start_worker
from bench.common import free_port
from faults import wait_until
from producer import runner
from producer.embedded import find_redis_server
from servers.files import FileServer
from servers.runware import FakeRunware
from worker.state import BatchStore

KEY = "rw-shutdown-key"
ROWS = 4
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def write_manifest(tmp_path: Path, files: FileServer) -> None:
    url = files.add("/s.png", png(), "image/png")
    (tmp_path / "m.csv").write_text(
        "id,image,prompt\n" + "".join(f"r{i},{url},p\n" for i in range(ROWS))
    )


def runware_env(fake: FakeRunware, broker: str) -> dict[str, str]:
    return clean_env(
        RUNWARE_API_KEY=KEY, RUNWARE_API_URL=fake.url, BGSWAP_BROKER_URL=broker,
        BGSWAP_ALLOW_PRIVATE_URLS="1", BGSWAP_RUNWARE_POLL_INITIAL_S="0.3",
        BGSWAP_RUNWARE_POLL_MAX_S="0.5", BGSWAP_RETRY_BASE_S="0.2",
    )  # fmt: skip


def assert_paid_once(fake: FakeRunware, lines: list[dict[str, object]]) -> None:
    assert [x["status"] for x in lines] == ["succeeded"] * ROWS, [x["error"] for x in lines]
    task_ids = sorted(str(x["provider_task_id"]) for x in lines)
    assert task_ids == sorted(fake.paid)  # each row's task, and each paid exactly once
    assert all(fake.accept_count(u) == 1 for u in fake.paid)


@pytest.mark.slow
def test_sigterm_hands_held_rows_back_and_another_worker_resumes_them(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    write_manifest(tmp_path, files)
    with FakeRunware(KEY, processing_s=4.0) as fake:
        env = runware_env(fake, redis_url)  # the default lease (60 s): only a hand-back is fast
        first = start_worker(env, tmp_path / "w1.log")
        submit = bgswap("submit", "m.csv", "--provider", "runware", "--output", "out",
                        "--batch-id", "term", cwd=tmp_path, env=env, timeout=60)  # fmt: skip
        assert submit.returncode == 0, submit.stderr
        wait_until(lambda: len(fake.paid) == ROWS, 30, "every row accepted")
        first.send_signal(signal.SIGTERM)  # every row is held, waiting on its generation
        assert first.wait(timeout=30) == 0
        store = BatchStore.from_url(redis_url)
        # Handed back: queued again, their messages in the queue, their leases ended.
        assert store.counts("term")["queued"] == ROWS
        assert redis_client.llen("bgswap") == ROWS
        assert store.claim_lapsed("term", reclaim_s=60) == []
        second = start_worker(env, tmp_path / "w2.log")
        try:
            meta = runner.wait_for_batch(store, "term", lambda c, t: None, timeout_s=30)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)
        lines = manifest_lines(Path(meta["manifest_url"]))
        assert_paid_once(fake, lines)
        # resumed by polling the saved task: a hand-back is no attempt of the provider
        assert len(fake.tasks("imageInference")) == ROWS
    log = (tmp_path / "w1.log").read_text()
    assert f"handed {ROWS} held rows back to the queue" in log, log[-2000:]


def redis_with_deploy_config(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """redis-server with deploy/redis.conf (AOF on, noeviction), data in ``workdir``."""
    return subprocess.Popen(
        [find_redis_server(), str(REPO / "deploy/redis.conf"), "--port", str(port),
         "--bind", "127.0.0.1", "--dir", str(workdir), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def ping(url: str) -> bool:
    client = redis_lib.Redis.from_url(url, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis_lib.RedisError:
        return False
    finally:
        client.close()


@pytest.mark.slow
def test_a_redis_restart_with_aof_loses_no_row_and_pays_none_twice(
    tmp_path: Path, files: FileServer
) -> None:
    write_manifest(tmp_path, files)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with tempfile.TemporaryDirectory(prefix="bgswap-aof-") as data, \
            FakeRunware(KEY, processing_s=3.0) as fake:  # fmt: skip
        server = redis_with_deploy_config(Path(data), port)
        wait_until(lambda: ping(url), 20, "redis-server")
        env = {**runware_env(fake, url), "BGSWAP_ROW_LEASE_S": "20"}
        worker = start_worker(env, tmp_path / "w.log")
        try:
            submit = bgswap("submit", "m.csv", "--provider", "runware", "--output", "out",
                            "--batch-id", "aof", cwd=tmp_path, env=env, timeout=60)  # fmt: skip
            assert submit.returncode == 0, submit.stderr
            wait_until(lambda: len(fake.paid) == ROWS, 30, "every row accepted")
            server.send_signal(signal.SIGTERM)  # a restart: Redis writes its AOF and exits
            assert server.wait(timeout=30) == 0
            assert (Path(data) / "appendonly.aof").exists() or any(Path(data).glob("**/*.aof"))
            time.sleep(1.0)  # the worker meets a dead Redis mid-wait
            server = redis_with_deploy_config(Path(data), port)
            wait_until(lambda: ping(url), 20, "redis-server after the restart")
            store = BatchStore.from_url(url)
            assert store.counts("aof")["running"] + store.counts("aof")["succeeded"] == ROWS
            meta = runner.wait_for_batch(store, "aof", lambda c, t: None, timeout_s=90)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
            server.terminate()
            server.wait(timeout=30)
        assert_paid_once(fake, manifest_lines(Path(meta["manifest_url"])))
