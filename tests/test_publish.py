"""Bulk publishing (producer/publish.py): messages pushed a chunk at a time are the ones
`send_task` would push, and a real Celery worker runs them -- over TCP and a unix socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from celery import Celery
from celery.signals import before_task_publish, task_prerun

import worker.tasks  # noqa: F401 - registers the tasks
from examples.make_examples import product_shot
from producer import runner
from producer.batch import SubmitOptions, Submitter, output_root
from producer.embedded import broker_url_for, inprocess_worker, redis_server
from producer.manifest import RowDefaults, read_manifest
from producer.publish import Message, bulk_publisher, capture, make_template
from worker import runtime
from worker.celery_app import app, apply_config
from worker.jobs import TASK_PROCESS_ROW, safe_id
from worker.settings import Settings
from worker.state import BatchStore

QUEUE = "bgswap"
# kombu's Redis list for a priority step other than 0: queue + sep + step.
PRIORITY_3_LIST = QUEUE + "\x06\x16" + "3"


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


def without_delivery_tag(raw: bytes) -> tuple[bytes, str]:
    """The message bytes with the delivery tag (a fresh uuid per publish) blanked."""
    tag = json.loads(raw)["properties"]["delivery_tag"]
    return raw.replace(tag.encode(), b"TAG"), tag


def test_a_worker_runs_bulk_published_rows_under_their_job_ids(
    celery: Settings, tmp_path: Path
) -> None:
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
    bulk = bulk_publisher(app)

    def publish(messages: Any) -> None:
        published.extend(messages)
        bulk(messages)

    ran: list[str] = []

    def on_prerun(sender: Any = None, task_id: str = "", **_: Any) -> None:
        if sender is not None and sender.name == TASK_PROCESS_ROW:
            ran.append(task_id)

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
    assert sorted(ran) == sorted(job_ids)  # each row ran once, under its deterministic id


def other_app(broker_url: str, **conf: Any) -> Celery:
    """A second Celery app on the same queue, for configurations bgswap does not use."""
    other = Celery("other", set_as_current=False)
    other.conf.update(
        broker_url=broker_url, task_default_queue=QUEUE, task_serializer="json", **conf
    )
    return other


@pytest.mark.parametrize("priority", [None, 3])
def test_a_bulk_message_is_the_message_send_task_pushes(
    celery: Settings, broker: tuple[str, str], priority: int | None
) -> None:
    client = redis_lib.Redis.from_url(celery.effective_redis_url)
    routes = {TASK_PROCESS_ROW: {"priority": priority}}
    sender = app if priority is None else other_app(broker[0], task_routes=routes)
    # A batch id with a quote, a backslash and non-ASCII: JSON and argsrepr escaping.
    rows = [("b'\\é:row-1", "b'\\é", 1), ("b'\\é:row-2", "b'\\é", 20_000)]
    bulk_publisher(sender)(rows)
    for job_id, batch_id, index in rows:
        sender.send_task(TASK_PROCESS_ROW, args=(batch_id, index), task_id=job_id)
    # Priority 0 is kombu's plain queue name; another step gets its own list.
    key = QUEUE if priority is None else PRIORITY_3_LIST
    assert client.llen(key) == 4 and client.keys("bgswap*") == [key.encode()]
    first, second, sent_first, sent_second = pop_all(client, key)
    for bulk, sent in ((first, sent_first), (second, sent_second)):
        (bulk_bytes, bulk_tag), (sent_bytes, sent_tag) = map(without_delivery_tag, (bulk, sent))
        assert bulk_bytes == sent_bytes  # byte for byte, but for the delivery tag
        assert bulk_tag != sent_tag and len(bulk_tag) == len(sent_tag) == 36
    message = json.loads(second)
    assert message["headers"]["id"] == message["headers"]["root_id"] == "b'\\é:row-2"
    assert message["headers"]["argsrepr"] == "('b\\'\\é', 20000)"
    assert message["properties"]["delivery_info"] == {"exchange": "", "routing_key": QUEUE}
    assert message["properties"]["priority"] == (priority or 0)


def test_a_compressed_body_is_not_spliced_but_sent_by_send_task(
    celery: Settings, broker: tuple[str, str]
) -> None:
    client = redis_lib.Redis.from_url(celery.effective_redis_url)
    bulk_publisher(other_app(broker[0], task_compression="zlib"))([("z:1", "z", 1)])
    (raw,) = pop_all(client)
    message = json.loads(raw)
    assert message["headers"]["compression"] == "application/x-gzip"
    assert message["headers"]["id"] == "z:1"


def test_the_template_is_refused_when_its_copy_of_the_probe_differs(celery: Settings) -> None:
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        queue, message = capture(app, channel)
        assert make_template(app, channel, queue, message) is not None
        message["headers"]["argsrepr"] += " "  # anything the copy would not reproduce
        assert make_template(app, channel, queue, message) is None
    # the probe never reaches the queue
    assert redis_lib.Redis.from_url(celery.effective_redis_url).llen(QUEUE) == 0


def test_publish_signal_receivers_get_one_send_task_per_row(celery: Settings) -> None:
    seen: list[str] = []

    def on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append((headers or {})["id"])

    before_task_publish.connect(on_publish, weak=False)
    try:
        bulk_publisher(app)([("s:1", "s", 1), ("s:2", "s", 2)])
    finally:
        before_task_publish.disconnect(on_publish)
    assert seen == ["s:1", "s:2"]  # and never the probe
    assert redis_lib.Redis.from_url(celery.effective_redis_url).llen(QUEUE) == 2


def test_a_broker_other_than_redis_publishes_with_send_task() -> None:
    other = Celery("other", broker="amqp://guest@127.0.0.1:1//")
    publish = bulk_publisher(other)  # does not connect
    assert publish.__qualname__ == "celery_publisher.<locals>.publish"
