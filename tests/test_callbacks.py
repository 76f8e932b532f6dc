"""worker/callbacks.py against a real Redis and a real receiver (tests/servers/callbacks.py),
with a clock the test moves."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib

from servers.callbacks import CallbackReceiver
from worker import callbacks
from worker.callbacks import (
    DUE_KEY,
    Callbacks,
    CallbackUrlError,
    check_callback_url,
    due,
    event_id,
    schedule,
)
from worker.settings import Settings
from worker.signing import verify
from worker.state import BatchStore

SECRET = "cb-secret-9d2e"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(redis_url: str, redis_client: redis_lib.Redis) -> Iterator[BatchStore]:
    yield BatchStore.from_url(redis_url)


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    with CallbackReceiver() as r:
        yield r


def make_batch(store: BatchStore, bid: str, url: str | None, **meta: str) -> None:
    fields = {"total": "3", "output": "/tmp/out", "provider": "local", **meta}
    if url is not None:
        fields["callback_url"] = url
    store.create(bid, fields, time.time())
    store.redis.hset(f"bgswap:{{{bid}}}:counts", mapping={"succeeded": 2, "failed": 1})
    store.set_meta(bid, cost_usd="0.16")


def sender(
    store: BatchStore, clock: Clock, **settings: Any
) -> tuple[Callbacks, list[tuple[str, float]]]:
    nudges: list[tuple[str, float]] = []
    values: dict[str, Any] = {"allow_private_urls": True, "callback_secret": SECRET,
                              "callback_retry_base_s": 10.0, **settings}  # fmt: skip
    cb = Callbacks(Settings(**values), store, rand=lambda: 0.5, clock=clock,
                   nudge=lambda b, c: nudges.append((b, c)))  # fmt: skip
    return cb, nudges


def test_schedule_once_per_event_and_only_with_a_url(store: BatchStore) -> None:
    make_batch(store, "b1", "https://hooks.example.com/x")
    assert not schedule(store, "b1")  # not ended yet
    store.set_meta("b1", status="done", manifest_url="/tmp/out/b1/manifest.jsonl")
    assert schedule(store, "b1")
    assert not schedule(store, "b1")  # finalize again: the same event, owed once
    assert due(store, time.time() + 1) == ["b1"]
    meta = store.meta("b1")
    assert meta["callback_status"] == "retrying"
    assert meta["callback_event_id"] == event_id("b1", "batch.completed")
    make_batch(store, "b2", None, status="done")
    assert not schedule(store, "b2")
    assert due(store, time.time() + 1) == ["b1"]


def test_delivered_signed_event(store: BatchStore, receiver: CallbackReceiver) -> None:
    make_batch(store, "b1", receiver.url, status="done", manifest_url="s3://o/b1/manifest.jsonl")
    schedule(store, "b1")
    clock = Clock()
    cb, _ = sender(store, clock)
    assert cb.deliver("b1") == "delivered"
    [d] = receiver.deliveries
    verify(SECRET, d.headers["x-bgswap-signature"], d.raw, now=time.time())
    assert d.event == {
        "event_id": event_id("b1", "batch.completed"), "type": "batch.completed",
        "batch_id": "b1", "counts": {"queued": 0, "running": 0, "succeeded": 2, "failed": 1,
                                      "canceled": 0, "skipped": 0, "total": 3},
        "cost_usd": 0.16, "manifest_url": "s3://o/b1/manifest.jsonl",
    }  # fmt: skip
    meta = store.meta("b1")
    assert meta["callback_status"] == "delivered"
    assert meta["callback_attempts"] == "1"
    assert store.redis.zscore(DUE_KEY, "b1") is None
    assert cb.deliver("b1") is None  # nothing owed any more
    assert len(receiver.deliveries) == 1


def test_retries_with_backoff_then_delivers_the_same_event(store: BatchStore) -> None:
    with CallbackReceiver(fail_first=2) as receiver:
        make_batch(store, "b1", receiver.url, status="done", canceled="1")
        schedule(store, "b1")
        clock = Clock()
        cb, nudges = sender(store, clock)
        assert cb.deliver("b1") == "retrying"
        meta = store.meta("b1")
        assert float(meta["callback_next_at"]) == pytest.approx(clock.now + 7.5)  # 10 x 0.75
        assert meta["callback_error"] == "HTTP 500"
        assert nudges == [("b1", 7.5)]
        assert cb.deliver("b1") is None  # not due yet
        clock.now += 8
        assert cb.deliver("b1") == "retrying"
        assert float(store.meta("b1")["callback_next_at"]) == pytest.approx(clock.now + 15)
        clock.now += 16
        assert due(store, clock.now) == ["b1"]
        assert cb.deliver("b1") == "delivered"
        ids = {d.event["event_id"] for d in receiver.deliveries}
        assert ids == {event_id("b1", "batch.canceled")}
        assert [d.status for d in receiver.deliveries] == [500, 500, 200]
        assert receiver.deliveries[-1].event["type"] == "batch.canceled"
        assert store.meta("b1")["callback_attempts"] == "3"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(400, "refused"), (404, "refused"), (410, "refused"), (302, "refused"),
     (408, "retrying"), (429, "retrying"), (503, "retrying"), (204, "delivered")],
)  # fmt: skip
def test_status_codes(
    store: BatchStore, receiver: CallbackReceiver, status: int, outcome: str
) -> None:
    receiver.status_override = status
    make_batch(store, "b1", receiver.url, status="failed", error="boom")
    schedule(store, "b1")
    cb, _ = sender(store, Clock())
    assert cb.deliver("b1") == outcome
    assert store.meta("b1")["callback_status"] == outcome
    assert len(receiver.deliveries) == 1  # a 302 is not followed
    assert receiver.deliveries[0].event["type"] == "batch.failed"
    assert (store.redis.zscore(DUE_KEY, "b1") is not None) == (outcome == "retrying")


def test_retry_after_is_a_floor(store: BatchStore) -> None:
    class Busy(CallbackReceiver):
        def dispatch(self, call: Any, raw: bytes) -> Any:
            reply = super().dispatch(call, raw)
            reply.status, reply.headers["Retry-After"] = 429, "40"
            return reply

    with Busy() as receiver:
        make_batch(store, "b1", receiver.url, status="done")
        schedule(store, "b1")
        clock = Clock()
        cb, _ = sender(store, clock)
        assert cb.deliver("b1") == "retrying"
        assert float(store.meta("b1")["callback_next_at"]) == pytest.approx(clock.now + 40)


def test_gives_up_after_the_deadline(store: BatchStore) -> None:
    with CallbackReceiver(fail_first=100) as receiver:
        make_batch(store, "b1", receiver.url, status="done")
        schedule(store, "b1")
        clock = Clock()
        cb, _ = sender(store, clock, callback_deadline_s=60.0)
        statuses = []
        for _ in range(10):
            statuses.append(cb.deliver("b1"))
            clock.now += 100
            if statuses[-1] != "retrying":
                break
        assert statuses[-1] == "expired"
        assert store.redis.zscore(DUE_KEY, "b1") is None


def test_connection_refused_retries(store: BatchStore) -> None:
    from conftest import free_port

    make_batch(store, "b1", f"http://127.0.0.1:{free_port()}/x", status="done")
    schedule(store, "b1")
    cb, _ = sender(store, Clock())
    assert cb.deliver("b1") == "retrying"
    assert "connection failed" in store.meta("b1")["callback_error"]


def test_private_addresses_are_refused_unless_allowed(
    store: BatchStore, receiver: CallbackReceiver
) -> None:
    make_batch(store, "b1", receiver.url, status="done")
    schedule(store, "b1")
    cb, _ = sender(store, Clock(), allow_private_urls=False)
    assert cb.deliver("b1") == "refused"
    assert receiver.deliveries == []
    assert "https://" in store.meta("b1")["callback_error"]


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/x",
        "https://127.0.0.1/x",
        "https://10.1.2.3/x",
        "https://[::1]/x",
        "https://localhost/x",
        "ftp://example.com/x",
        "https://user:pw@example.com/x",
        "https:///x",
        "https://example.com:99999/x",
    ],
)
def test_check_callback_url_refuses(url: str) -> None:
    with pytest.raises(CallbackUrlError):
        check_callback_url(url, allow_private=False)


def test_check_callback_url_accepts() -> None:
    assert check_callback_url("https://hooks.example.com/bgswap", allow_private=False)
    assert check_callback_url("http://127.0.0.1:8080/x", allow_private=True)
    with pytest.raises(CallbackUrlError):
        check_callback_url("ftp://127.0.0.1/x", allow_private=True)


def test_unsigned_warns_once_and_secrets_never_reach_the_log(
    store: BatchStore, receiver: CallbackReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    callbacks._warned_unsigned.clear()
    for bid in ("u1", "u2"):
        make_batch(store, bid, receiver.url, status="done")
        schedule(store, bid)
    cb, _ = sender(store, Clock(), callback_secret=None)
    assert cb.deliver("u1") == "delivered"
    assert cb.deliver("u2") == "delivered"
    assert all("x-bgswap-signature" not in d.headers for d in receiver.deliveries)
    assert caplog.text.count("BGSWAP_CALLBACK_SECRET is not set") == 1
    make_batch(store, "s1", receiver.url, status="done")
    schedule(store, "s1")
    signed, _ = sender(store, Clock())
    assert signed.deliver("s1") == "delivered"
    signature = receiver.deliveries[-1].headers["x-bgswap-signature"]
    assert SECRET not in caplog.text
    assert signature.split("v1=")[1] not in caplog.text
    assert SECRET not in json.dumps(store.meta("s1"))


def test_a_claim_whose_worker_died_comes_due_again(store: BatchStore) -> None:
    make_batch(store, "b1", "https://hooks.example.com/x", status="done")
    clock = Clock()
    schedule(store, "b1", now=clock.now)
    cb, _ = sender(store, clock)
    assert cb.claim("b1")  # ... and the process dies before the outcome is recorded
    assert not cb.claim("b1")
    assert due(store, clock.now + 30) == []
    clock.now += callbacks.CLAIM_LEASE_S + 1
    assert due(store, clock.now) == ["b1"]
    assert cb.claim("b1")


def test_the_watchdog_sweep_enqueues_due_callbacks(store: BatchStore) -> None:
    from worker.watchdog import Watchdog

    calls: list[int] = []

    def enqueue() -> int:
        calls.append(1)
        return 2

    dog = Watchdog(store, lambda b, i: None, lambda: 0, lambda b: None, callbacks=enqueue,
                   grace_s=60, interval_s=1)  # fmt: skip
    assert dog.sweep() == 2
    assert calls == [1]
