"""Completion callbacks end to end: the real `bgswap submit --callback-url`, a real Celery
worker subprocess, a real Redis and a real receiver that answers 500 twice per event
before it takes it. Every batch's event arrives, accepted exactly once by event_id, with a
valid signature: a done batch, a canceled one and a failed one."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import redis as redis_lib

from batching import bgswap, clean_env, png, start_worker
from servers.callbacks import CallbackReceiver
from worker.callbacks import event_id
from worker.signing import verify
from worker.state import BatchStore

SECRET = "cb-e2e-secret-51c0"


def test_submit_refuses_a_bad_callback_url(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,image\na,a.png\n")
    for url, says in [
        ("http://hooks.example.com/x", "https://"),
        ("https://127.0.0.1/x", "not a public address"),
        ("https://localhost:8443/x", "not public"),
        ("notaurl", "https://"),
    ]:
        done = bgswap("submit", "m.csv", "--callback-url", url, cwd=tmp_path, env=clean_env())
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
        assert done.stderr.startswith("error: --callback-url:")


@pytest.mark.slow
def test_done_canceled_and_failed_batches_call_back_once_each(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(png("box", 1))
    (tmp_path / "b.png").write_bytes(png("mug", 2))
    (tmp_path / "m.csv").write_text("id,image,prompt\na,a.png,on a table\nb,b.png,on a shelf\n")
    env = clean_env(
        BGSWAP_BROKER_URL=redis_url,
        BGSWAP_ALLOW_PRIVATE_URLS="1",
        BGSWAP_CALLBACK_SECRET=SECRET,
        BGSWAP_CALLBACK_RETRY_BASE_S="0.3",
    )
    store = BatchStore.from_url(redis_url)
    with CallbackReceiver(fail_first=2) as receiver:

        def submit(bid: str, *extra: str) -> None:
            done = bgswap("submit", "m.csv", "--provider", "local", "--output", "out",
                          "--batch-id", bid, "--callback-url", receiver.url, *extra,
                          cwd=tmp_path, env=env, timeout=120)  # fmt: skip
            assert done.returncode in (0, 1), done.stderr
            assert done.stdout.strip() == bid

        # Canceled before any worker runs: its finalizer waits in the queue.
        submit("cb-cancel")
        cancel = bgswap("cancel", "cb-cancel", cwd=tmp_path, env=env)
        assert cancel.returncode == 0, cancel.stderr
        assert store.meta("cb-cancel")["callback_url"] == receiver.url

        log = tmp_path / "worker.log"
        worker = start_worker(env, log)
        try:
            submit("cb-done", "--wait")
            # The output manifest cannot be written (a folder is in its place): the
            # finalizer retries, then fails the batch.
            (tmp_path / "out" / "cb-fail" / "manifest.jsonl" / "x").mkdir(parents=True)
            submit("cb-fail", "--wait")
            accepted = receiver.wait_for(3, timeout_s=90)
            time.sleep(2)  # nothing more arrives once every event was taken
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
        text = log.read_text()
        assert len(receiver.accepted) == 3, text[-3000:]

    events = {d.event["batch_id"]: d for d in accepted}
    assert {b: d.event["type"] for b, d in events.items()} == {
        "cb-cancel": "batch.canceled",
        "cb-done": "batch.completed",
        "cb-fail": "batch.failed",
    }
    for bid, delivery in events.items():
        event = delivery.event
        verify(SECRET, delivery.headers["x-bgswap-signature"], delivery.raw, now=time.time())
        assert event["event_id"] == event_id(bid, str(event["type"]))
        assert set(event) == {"event_id", "type", "batch_id", "counts", "cost_usd", "manifest_url"}
        # two refusals, then one acceptance, all of the same event
        tries = [d for d in receiver.deliveries if d.event["batch_id"] == bid]
        assert [d.status for d in tries] == [500, 500, 200]
        assert {d.event["event_id"] for d in tries} == {event["event_id"]}
        meta = store.meta(bid)
        assert meta["callback_status"] == "delivered"
        assert meta["callback_attempts"] == "3"
    assert events["cb-done"].event["counts"]["succeeded"] == 2  # type: ignore[index]
    assert events["cb-done"].event["counts"]["total"] == 2  # type: ignore[index]
    assert str(events["cb-done"].event["manifest_url"]).endswith("out/cb-done/manifest.jsonl")
    assert events["cb-cancel"].event["counts"]["canceled"] == 2  # type: ignore[index]
    assert events["cb-fail"].event["manifest_url"] is None
    assert store.meta("cb-fail")["status"] == "failed"
    # neither the secret nor any signature reaches the worker's log
    assert SECRET not in text
    for d in receiver.deliveries:
        assert d.headers["x-bgswap-signature"].split("v1=")[1] not in text
    assert json.dumps(store.meta("cb-done")).count(SECRET) == 0


@pytest.mark.slow
def test_a_callback_retry_survives_the_worker_being_killed(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(png("box", 1))
    (tmp_path / "m.csv").write_text("id,image,prompt\na,a.png,on a table\n")
    env = clean_env(
        BGSWAP_BROKER_URL=redis_url,
        BGSWAP_ALLOW_PRIVATE_URLS="1",
        BGSWAP_CALLBACK_SECRET=SECRET,
        BGSWAP_CALLBACK_RETRY_BASE_S="4",
        BGSWAP_ROW_LEASE_S="6",  # the watchdog sweeps every 2 s
    )
    store = BatchStore.from_url(redis_url)
    with CallbackReceiver(fail_first=1) as receiver:
        first = start_worker(env, tmp_path / "w1.log")
        try:
            done = bgswap("submit", "m.csv", "--provider", "local", "--output", "out",
                          "--batch-id", "cb-kill", "--callback-url", receiver.url, "--wait",
                          cwd=tmp_path, env=env, timeout=120)  # fmt: skip
            assert done.returncode == 0, done.stderr
            deadline = time.monotonic() + 30
            while not receiver.deliveries and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # its outcome recorded
        finally:
            # The retry's nudge is held by this worker: killed, it is lost with it.
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        assert [d.status for d in receiver.deliveries] == [500]
        assert store.meta("cb-kill")["callback_status"] == "retrying"
        second = start_worker(env, tmp_path / "w2.log")
        try:
            accepted = receiver.wait_for(1, timeout_s=60)
            time.sleep(1)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)
    assert len(accepted) == 1, (tmp_path / "w2.log").read_text()[-3000:]
    assert [d.status for d in receiver.deliveries] == [500, 200]
    verify(SECRET, accepted[0].headers["x-bgswap-signature"], accepted[0].raw, now=time.time())
    assert store.meta("cb-kill")["callback_status"] == "delivered"
