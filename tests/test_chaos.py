"""Chaos: 300 rows through 2 Celery worker processes against a fake Runware with 1 s
generations and about 10% transient faults; one worker is SIGKILLed mid-batch and a new
one started. Every row must end `succeeded` exactly once, and the fake's own record must
show every row paid exactly once."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from batching import bgswap, clean_env, manifest_lines, png, redis_values, start_worker
from producer import runner
from servers.files import FileServer
from servers.runware import FakeRunware
from worker.state import BatchStore

KEY = "rw-chaos-SECRET"
ROWS = 300
FAULTS = [
    ("status", "imageInference", {"status": 503, "code": "noAvailableServer"}),
    ("status", "imageInference", {"status": 429, "code": "rateLimitExceeded", "retry_after": "1"}),
    ("accept_then_500", "imageInference", {}),
    ("accept_then_drop", "imageInference", {}),
    ("malformed", "imageInference", {"after_accept": True}),
    ("status", "getResponse", {"status": 503, "code": "noAvailableServer"}),
    ("status", "getResponse", {"status": 500, "code": "internalError"}),
]


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def arm_faults(fake: FakeRunware, stop: threading.Event) -> Counter[str]:
    """Arm one fault per 10 requests the fake receives, spread over the batch.

    At most one fault per task type is pending, and submit faults stop once 90% of the
    rows were accepted: near the end only a few rows still submit, and a pile of faults
    aimed at "the next submit" would all land on the last of them and exhaust its
    attempts (a test artefact, not a bgswap failure)."""
    rng = random.Random(5)
    armed: Counter[str] = Counter()
    last = 0
    while not stop.is_set():
        kind, task_type, params = rng.choice(FAULTS)
        late = task_type == "imageInference" and len(fake.paid) >= ROWS * 9 // 10
        if len(fake.requests) >= last + 10 and not fake.pending_faults(task_type) and not late:
            fake.inject(kind, task_type=task_type, **params)  # type: ignore[arg-type]
            armed[f"{task_type}:{kind}"] += 1
            last = len(fake.requests)
        stop.wait(0.01)
    return armed


@pytest.mark.slow
def test_chaos_every_row_succeeds_and_is_paid_exactly_once(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    (tmp_path / "m.csv").write_text(
        "id,image,prompt\n" + "".join(f"r{i:03d},{url},p\n" for i in range(ROWS))
    )
    with FakeRunware(KEY, processing_s=1.0) as fake:
        env = clean_env(
            RUNWARE_API_KEY=KEY, RUNWARE_API_URL=fake.url, BGSWAP_BROKER_URL=redis_url,
            BGSWAP_ALLOW_PRIVATE_URLS="1", BGSWAP_RUNWARE_POLL_INITIAL_S="0.5",
            BGSWAP_RUNWARE_POLL_MAX_S="2", BGSWAP_RETRY_BASE_S="0.2", BGSWAP_RETRY_CAP_S="2",
            BGSWAP_MAX_ATTEMPTS="8", BGSWAP_VISIBILITY_TIMEOUT_S="12",
            BGSWAP_WORKER_CONCURRENCY="8", BGSWAP_RUNWARE_REQUEST_TIMEOUT_S="5",
            BGSWAP_ROW_LEASE_S="6",
        )  # fmt: skip
        stop = threading.Event()
        armed: Counter[str] = Counter()
        chaos = threading.Thread(target=lambda: armed.update(arm_faults(fake, stop)))
        chaos.start()
        workers = [start_worker(env, tmp_path / f"w{n}.log") for n in (1, 2)]
        try:
            submit = bgswap("submit", "m.csv", "--provider", "runware", "--output", "out",
                            "--batch-id", "chaos", cwd=tmp_path, env=env, timeout=60)  # fmt: skip
            assert submit.returncode == 0, submit.stderr
            store = BatchStore.from_url(redis_url)
            deadline = time.monotonic() + 60
            while len(fake.paid) < ROWS // 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            workers[0].send_signal(signal.SIGKILL)  # mid-batch, mid-whatever it was doing
            workers[0].wait()
            workers.append(start_worker(env, tmp_path / "w3.log"))
            try:
                meta = runner.wait_for_batch(store, "chaos", lambda c, t: None, timeout_s=150)
            except TimeoutError:
                stuck = [
                    (r.index, r.state, r.attempts, store.provider_memory("chaos", r.index))
                    for r in store.records("chaos", ROWS)
                    if r.result is None
                ]
                unacked = redis_client.hlen("unacked")
                raise AssertionError(f"not done: {stuck[:5]}; unacked messages: {unacked}; "
                                     f"queue: {redis_client.llen('bgswap')}") from None  # fmt: skip
        finally:
            stop.set()
            chaos.join()
            for worker in workers[1:]:
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=30)
        paid = list(fake.paid)
        accepted_twice = [u for u in paid if fake.accept_count(u) != 1]
    lines = manifest_lines(Path(meta["manifest_url"]))
    assert len(lines) == ROWS and [x["id"] for x in lines] == [f"r{i:03d}" for i in range(ROWS)]
    failed = [(x["id"], x["attempts"], x["error"]) for x in lines if x["status"] != "succeeded"]
    assert failed == [], failed
    task_ids = [x["provider_task_id"] for x in lines]
    assert len(set(task_ids)) == ROWS  # one task per row
    assert sorted(paid) == sorted(task_ids)  # and each of them paid exactly once
    assert accepted_twice == []
    assert sum(armed.values()) >= ROWS // 10, armed  # the faults really happened
    assert KEY not in redis_values(redis_client)
