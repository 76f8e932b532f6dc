"""`bgswap health` and the API's /readyz against real servers: a real Redis, one that does
not answer, a broker that does not answer; heartbeats written as a worker's watchdog
writes them; the verdict's rules on their own."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
from conftest import free_port

from batching import BIN, bgswap, clean_env
from producer.health import Report, verdict
from worker import heartbeats
from worker.heartbeats import Heartbeat
from worker.state import BatchStore
from worker.watchdog import Watchdog


def report(*workers: Heartbeat, redis: str | None = None, broker: str | None = None) -> Report:
    return Report(redis, broker, 0, list(workers), fresh_s=30.0)


def test_the_verdict_needs_redis_and_the_broker_and_only_what_the_caller_asks_of_workers() -> None:
    here = Heartbeat("pod-a", 7, 5.0)
    old = Heartbeat("pod-b", 8, 31.0)
    assert verdict(report()) == []  # no worker: ready all the same (rows wait in the queue)
    assert verdict(report(), require_workers=True) == [
        "no worker wrote a heartbeat in the last 30s"
    ]
    assert verdict(report(old), require_workers=True)  # a stale heartbeat does not count
    assert verdict(report(here, old), require_workers=True) == []
    assert verdict(report(here), host="pod-a") == []
    assert verdict(report(here), host="pod-b") == [
        "no worker process on pod-b wrote a heartbeat in the last 30s"
    ]
    assert verdict(report(old), host="pod-b")
    down = verdict(report(redis="cannot reach Redis", broker="cannot reach the broker"),
                   require_workers=True, host="pod-a")  # fmt: skip
    assert down == ["cannot reach Redis", "cannot reach the broker"]  # no heartbeat noise


def test_heartbeats_are_written_read_forgotten_and_removed(redis_client: redis_lib.Redis) -> None:
    now = time.time()
    redis_client.zadd(heartbeats.KEY, {"gone-pod/1": now - heartbeats.FORGET_S - 1})
    heartbeats.beat(redis_client, now)
    (found,) = heartbeats.read(redis_client, now + 2)
    assert found.host == heartbeats.member().rpartition("/")[0]
    assert found.pid == os.getpid() and found.age_s == pytest.approx(2.0)
    heartbeats.stopped(redis_client)
    assert heartbeats.read(redis_client, now) == []
    assert heartbeats.fresh_s(10.0) == 30.0 and heartbeats.fresh_s(20.0) == 60.0


def test_the_watchdog_beats_at_start_and_after_each_sweep_but_not_after_a_failed_one(
    redis_url: str, redis_client: redis_lib.Redis
) -> None:
    beats: list[float] = []
    store = BatchStore.from_url(redis_url)
    failing = threading.Event()

    def depth() -> int:
        return 0

    watchdog = Watchdog(store, lambda b, i: None, depth, lambda b: None,
                        heartbeat=lambda: beats.append(time.monotonic()),
                        grace_s=60, interval_s=0.05)  # fmt: skip
    real_sweep = watchdog.sweep

    def sweep() -> int:
        if failing.is_set():
            raise ConnectionError("redis away")
        return real_sweep()

    watchdog.sweep = sweep  # type: ignore[method-assign]
    watchdog.start()
    try:
        deadline = time.monotonic() + 5
        while len(beats) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(beats) >= 3
        failing.set()
        time.sleep(0.1)
        stalled = len(beats)
        time.sleep(0.3)
        assert len(beats) == stalled  # a process that cannot sweep does not say it is alive
    finally:
        watchdog.stop()
        watchdog.join(5)


def test_bgswap_health_against_real_servers(
    tmp_path: Path, redis_url: str, redis_client: redis_lib.Redis
) -> None:
    env = clean_env(BGSWAP_BROKER_URL=redis_url)
    ok = bgswap("health", cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "redis: ok" in ok.stdout and "broker: ok (0 messages queued)" in ok.stdout
    no_workers = bgswap("health", "--require-workers", cwd=tmp_path, env=env)
    assert no_workers.returncode == 3
    assert no_workers.stderr.strip() == ("unhealthy: no worker wrote a heartbeat in the last 30s")
    heartbeats.beat(redis_client, time.time())  # as a worker on this host would
    here = bgswap("health", "--this-host", "--json", cwd=tmp_path, env=env)
    assert here.returncode == 0, here.stderr
    body = json.loads(here.stdout)
    assert body["status"] == "ok" and body["workers_fresh"] == 1 and body["problems"] == []
    assert body["workers"][0]["pid"] == os.getpid()


def test_bgswap_health_says_which_server_does_not_answer(tmp_path: Path, redis_url: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    no_redis = bgswap("health", cwd=tmp_path, env=clean_env(BGSWAP_BROKER_URL=dead))
    assert no_redis.returncode == 3
    assert "cannot reach Redis at redis://127.0.0.1:" in no_redis.stderr
    assert "(BGSWAP_BROKER_URL)" in no_redis.stderr
    amqp = f"amqp://guest:s3cret-pw@127.0.0.1:{free_port()}//"
    no_broker = bgswap("health", "--json", cwd=tmp_path,
                       env=clean_env(BGSWAP_BROKER_URL=amqp, BGSWAP_REDIS_URL=redis_url))  # fmt: skip
    assert no_broker.returncode == 3
    body = json.loads(no_broker.stdout)
    assert body["redis"] == "ok" and "cannot reach the broker" in body["broker"]
    assert "s3cret-pw" not in no_broker.stdout + no_broker.stderr
    unset = bgswap("health", cwd=tmp_path, env=clean_env())
    assert unset.returncode == 2 and "BGSWAP_BROKER_URL" in unset.stderr


def test_readyz_answers_503_when_the_broker_does_not(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    amqp = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    env = clean_env(BGSWAP_BROKER_URL=amqp, BGSWAP_REDIS_URL=redis_url)
    proc = subprocess.Popen([str(BIN / "bgswap"), "serve", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(f"{base}/healthz", timeout=1).status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        ready = httpx.get(f"{base}/readyz", timeout=20)
        assert ready.status_code == 503
        assert "cannot reach the broker" in ready.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
