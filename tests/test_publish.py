"""Publishing (producer/publish.py): one Celery message per chunk of a batch's rows, sent
with `send_task`, which a real Celery worker runs -- over TCP and a unix socket; a worker
without room gives the rest of a chunk back in one message."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from celery.signals import before_task_publish, task_prerun

import worker.tasks
from examples.make_examples import product_shot
from producer import runner
from producer.batch import SubmitOptions, Submitter, output_root
from producer.embedded import broker_url_for, inprocess_worker, redis_server
from producer.manifest import RowDefaults, read_manifest
from producer.publish import CHUNK_ROWS, Message, celery_publisher, chunks, rows_per_message
from worker import runtime
from worker.celery_app import app, apply_config
from worker.jobs import TASK_PROCESS_ROWS, safe_id
from worker.settings import Settings
from worker.state import BatchStore

QUEUE = "bgswap"


def reset_broker_pools() -> None:
    """Forget connections to the previous broker: the app caches its pools on first use."""
    app.close()
    app.amqp._producer_pool = None


@contextmanager
def celery_on(broker_url: str, redis_url: str) -> Iterator[Settings]:
    """The shared app configured for this broker, put back as it was afterwards."""
    previous = app.conf.broker_url
    settings = Settings(broker_url=broker_url, redis_url=redis_url)
    apply_config(settings)
    runtime.configure(settings)
    reset_broker_pools()
    try:
        yield settings
    finally:
        app.conf.broker_url = previous
        reset_broker_pools()


@pytest.fixture(params=["tcp", "unix-socket"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> Iterator[tuple[str, str]]:
    """(broker URL, redis URL): the session's TCP Redis (flushed), or a private one on a
    unix socket, which kombu spells ``redis+socket://``."""
    if request.param == "tcp":
        request.getfixturevalue("redis_client")  # flushes the database
        yield redis_url, redis_url
    else:
        with redis_server() as url:
            assert broker_url_for(url).startswith("redis+socket://")
            yield broker_url_for(url), url


@pytest.fixture
def celery(broker: tuple[str, str]) -> Iterator[Settings]:
    with celery_on(*broker) as settings:
        yield settings


def pop_all(client: redis_lib.Redis, key: str = QUEUE) -> list[bytes]:
    """The list's messages in the order workers would take them (BRPOP: the tail first)."""
    out: list[bytes] = []
    while (raw := client.rpop(key)) is not None:
        out.append(raw)  # type: ignore[arg-type]
    return out


def test_a_worker_runs_each_published_row_once(celery: Settings, tmp_path: Path) -> None:
    for n, kind in enumerate(["box", "bottle", "mug", "ring"]):
        product_shot(kind, (64, 48), (240, 240, 240), n).save(tmp_path / f"{kind}.png")
    (tmp_path / "m.csv").write_text(
        "id,image,prompt,output_format\n"
        "a/1,box.png,p,PNG\nb 2,bottle.png,p {id},JPG\nc,mug.png,p,WEBP\n"
        "d,ring.png,p,GIF\n"  # rejected: recorded failed, never published
        "e,ring.png,p,\n"
    )
    store = BatchStore.from_url(celery.effective_redis_url)
    defaults = RowDefaults(base_dir=tmp_path)
    published: list[Message] = []
    bulk = celery_publisher(app)

    def publish(messages: Any) -> None:
        published.extend(messages)
        bulk(messages)

    ran: list[tuple[str, Any]] = []

    def on_prerun(sender: Any = None, task_id: str = "", args: Any = (), **_: Any) -> None:
        if sender is not None and sender.name == TASK_PROCESS_ROWS:
            ran.append((task_id, list(args)))

    submitter = Submitter(store, publish, runner.provider_cache(celery))
    options = SubmitOptions(
        batch_id="bulk1", output=output_root(str(tmp_path / "out")), defaults=defaults
    )
    task_prerun.connect(on_prerun, weak=False)
    try:
        with inprocess_worker(app), (tmp_path / "m.csv").open("rb") as fh:
            report = submitter.submit(read_manifest(fh, "csv", defaults), options)
            meta = runner.wait_for_batch(store, "bulk1", lambda c, t: None, timeout_s=60)
    finally:
        task_prerun.disconnect(on_prerun)
    assert (report.valid, report.rejected) == (4, 1)
    lines = [json.loads(x) for x in Path(meta["manifest_url"]).read_text().splitlines()]
    assert [(x["id"], x["status"]) for x in lines] == [
        ("a/1", "succeeded"),
        ("b 2", "succeeded"),
        ("c", "succeeded"),
        ("d", "failed"),
        ("e", "succeeded"),
    ]
    job_ids = [f"bulk1:{safe_id(i)}" for i in ("a/1", "b 2", "c", "e")]
    assert [m[0] for m in published] == job_ids
    # A batch this small goes out a row a message (it spreads over the workers), each
    # under its row's deterministic id, each run once.
    assert sorted(ran) == sorted(
        (job_id, ["bulk1", [index]]) for job_id, index in zip(job_ids, [0, 1, 2, 4], strict=True)
    )


def test_a_batch_goes_out_in_chunks_that_still_spread_over_the_workers() -> None:
    assert [rows_per_message(n) for n in (1, 12, 40, 500, 100_000)] == [1, 1, 5, 62, CHUNK_ROWS]
    rows = [(f"a:{i}", "a", i) for i in range(205)]
    rows += [("b:0", "b", 0), ("a:x", "a", 900)]
    sent = chunks(rows)
    assert [(task_id, batch) for task_id, batch, _ in sent] == [
        *((f"a:{25 * k}+24", "a") for k in range(8)),
        ("a:200+4", "a"),
        ("b:0", "b"),  # one row: its own id
        ("a:x", "a"),
    ]
    assert [i for _, _, indices in sent for i in indices] == [m[2] for m in rows]
    assert len(chunks([(f"c:{i}", "c", i) for i in range(12)])) == 12  # 1 a message


def test_a_chunk_is_one_celery_message_on_the_broker(celery: Settings) -> None:
    client = redis_lib.Redis.from_url(celery.effective_redis_url)
    seen: list[str] = []

    def on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append((headers or {})["id"])

    # A batch id with a quote, a backslash and non-ASCII: JSON escaping is Celery's own.
    rows = [(f"b'\\é:row-{i}", "b'\\é", i) for i in range(16)]  # 2 a message
    before_task_publish.connect(on_publish, weak=False)
    try:
        celery_publisher(app)(rows)
    finally:
        before_task_publish.disconnect(on_publish)
    # publish signal receivers see every message
    assert seen == [f"b'\\é:row-{i}+1" for i in range(0, 16, 2)]
    first, *rest = pop_all(client)
    message = json.loads(first)
    assert message["headers"]["task"] == TASK_PROCESS_ROWS
    assert message["headers"]["id"] == "b'\\é:row-0+1"
    body = json.loads(base64.b64decode(message["body"]))
    assert body[0] == ["b'\\é", [0, 1]]
    assert len(rest) == 7


def run_one_chunk(broker: tuple[str, str], tmp_path: Path, rows: int) -> list[list[int]]:
    """``rows`` rows of the local provider sent as one message to a worker with room for
    one row at a time; every row must succeed. The indices of each delivery."""
    for n in range(rows):
        product_shot("box", (900, 700), (240, 240, 240), n).save(tmp_path / f"{n}.png")
    (tmp_path / "m.csv").write_text(
        "id,image,prompt\n" + "".join(f"r{n},{n}.png,p\n" for n in range(rows))
    )
    delivered: list[list[int]] = []

    def on_prerun(sender: Any = None, args: Any = (), **_: Any) -> None:
        if sender is not None and sender.name == TASK_PROCESS_ROWS:
            delivered.append(list(args[1]))

    with celery_on(*broker) as shared:
        settings = shared.model_copy(update={"worker_max_rows": 1})
        runtime.configure(settings)
        store = BatchStore.from_url(settings.effective_redis_url)
        defaults = RowDefaults(base_dir=tmp_path)
        # Recorded, not published: the rows go out below as one message.
        submitter = Submitter(store, lambda _: None, runner.provider_cache(settings))
        options = SubmitOptions(
            batch_id="room1", output=output_root(str(tmp_path / "out")), defaults=defaults
        )
        task_prerun.connect(on_prerun, weak=False)
        try:
            with inprocess_worker(app), (tmp_path / "m.csv").open("rb") as fh:
                submitter.submit(read_manifest(fh, "csv", defaults), options)
                worker.tasks.republish_rows("room1", list(range(rows)))
                meta = runner.wait_for_batch(store, "room1", lambda c, t: None, timeout_s=60)
        finally:
            task_prerun.disconnect(on_prerun)
    lines = [json.loads(x) for x in Path(meta["manifest_url"]).read_text().splitlines()]
    assert [(x["id"], x["status"]) for x in lines] == [(f"r{n}", "succeeded") for n in range(rows)]
    return delivered


def test_a_full_worker_takes_a_chunks_rows_as_its_own_finish(
    broker: tuple[str, str], tmp_path: Path
) -> None:
    # Room for one row, and 20 s to wait for room in all: the rows are adopted as the row
    # before each finishes, in the one delivery; none bounces back to the queue.
    assert run_one_chunk(broker, tmp_path, 3) == [[0, 1, 2]]


def test_a_worker_without_room_gives_the_rest_of_a_chunk_back_together(
    broker: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No time to wait for room: a delivery keeps what it has room for and gives the rest
    # back, in one message, until each row had its turn.
    monkeypatch.setattr(worker.tasks, "ADOPT_WAIT_S", 0.0)
    delivered = run_one_chunk(broker, tmp_path, 3)
    assert delivered[0] == [0, 1, 2] and len(delivered) >= 2
    for before, after in itertools.pairwise(delivered):
        assert before[-len(after) :] == after  # what was given back: the rest, in order
