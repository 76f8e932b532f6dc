"""End to end with RabbitMQ as the Celery broker and Redis for the batch state.

The same path as tests/test_end_to_end.py's Redis-only run, with the broker swapped:
real `celery -A worker worker` subprocesses on ``BGSWAP_BROKER_URL=amqp://...``, the
state in the test's own redis-server (``BGSWAP_REDIS_URL``), `bgswap submit` from the
CLI, a strict fake provider (tests/servers/) whose own record counts what was paid,
outputs PUT to moto's S3 server through presigned URLs, and a completion callback that
is refused once (its retry is a countdown message). Then the fault RabbitMQ changes most:
one of two workers SIGKILLed mid-batch. Its unacked messages go back to the queue the
moment its connection drops (no visibility timeout, as on Redis); the rows it had adopted
come back when their leases lapse (4 s here), through the other worker's watchdog. And
with SIGTERM instead: it hands the rows it held back as it shuts down.

These tests need a RabbitMQ. They use ``amqp://guest:guest@127.0.0.1:5672//`` unless
``TEST_AMQP_URL`` names another (not a ``BGSWAP_*`` name: bgswap refuses unknown ones).
To start one:

    sudo apt install rabbitmq-server          # Debian/Ubuntu: runs on 127.0.0.1:5672
    docker run -d -p 5672:5672 rabbitmq:3     # or in a container

Without a reachable RabbitMQ they are skipped, or fail when ``CI`` is set. They use the
broker's ``bgswap`` queue (the one every bgswap worker consumes) and purge it before and
after, so leftovers of an earlier run cannot leak in: point them at a RabbitMQ (or a
vhost, ``amqp://guest:guest@host:5672/test``) that no real workers use.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.utils.nodenames import default_nodename
from kombu import Connection
from kombu.exceptions import ChannelError

from batching import REPO, bgswap, clean_env, png, start_worker
from faults import provider, run_with_fault, stop
from servers.callbacks import CallbackReceiver
from servers.files import FileServer
from servers.s3 import MotoS3, moto_s3
from worker.callbacks import event_id
from worker.celery_app import QUEUE, _own_nodename
from worker.signing import verify

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
# Every queue a bgswap worker or producer declares that could hold a message between runs
# (Celery's control and event queues are auto-deleted with their consumers).
QUEUES = (QUEUE,)
SECRET = "cb-amqp-secret-7d21"


def purge(conn: Connection) -> None:
    for name in QUEUES:
        channel = conn.channel()
        try:
            channel.queue_purge(name)
        except ChannelError:  # not declared yet: nothing to purge (the channel is closed)
            pass
        else:
            channel.close()


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """The RabbitMQ to use, its ``bgswap`` queue purged before and after the test."""
    conn = Connection(AMQP_URL, connect_timeout=3)
    try:
        conn.ensure_connection(max_retries=1)
    except Exception as exc:
        message = (
            f"no RabbitMQ at {conn.as_uri()} ({type(exc).__name__}: {exc}); start one "
            "(apt install rabbitmq-server, or docker run -p 5672:5672 rabbitmq:3) or set "
            "TEST_AMQP_URL"
        )
        conn.release()
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        purge(conn)
        yield AMQP_URL
        purge(conn)
    finally:
        conn.release()


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


def test_a_worker_without_a_node_name_gets_one_of_its_own() -> None:
    """Two workers on one host must not share ``celery@host``: on RabbitMQ the second
    would die at start, its control queue exclusive to the first."""

    class Worker:
        hostname = ""

    default, named = Worker(), Worker()
    _own_nodename(sender=default_nodename(None), instance=default)
    name, host = default.hostname.split("@")
    assert name == f"celery-{os.getpid()}" and f"celery@{host}" == default_nodename(None)
    named.hostname = "w1@box"
    _own_nodename(sender="w1@box", instance=named)  # `-n w1@box`: kept
    assert named.hostname == "w1@box"


@pytest.mark.slow
def test_the_watchdogs_queue_depth_counts_the_messages_waiting_on_rabbitmq(
    redis_client: object, redis_url: str, amqp_url: str
) -> None:
    """What the watchdog asks before it re-publishes a stalled batch's rows (a passive
    queue declare), in a process of its own so the tests' Celery app keeps its broker."""
    # A publish is not confirmed: the broker may count the last one a moment later, so
    # the depth is read until it reaches 3 (for at most 10 s).
    script = (
        "import time\n"
        "from worker.tasks import queue_depth, republish\n"
        "before = queue_depth()\n"
        "for index in range(3):\n"
        "    republish('depth1', index)\n"
        "deadline = time.monotonic() + 10\n"
        "while queue_depth() < 3 and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "print(before, queue_depth())\n"
    )
    env = clean_env(BGSWAP_BROKER_URL=amqp_url, BGSWAP_REDIS_URL=redis_url)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "3"]  # no worker consumes here: all three wait


@pytest.mark.slow
def test_a_batch_through_rabbitmq_to_s3_pays_each_row_once(
    redis_client: object, redis_url: str, amqp_url: str, tmp_path: Path, s3: MotoS3
) -> None:
    rows = 8
    bucket = s3.bucket
    with (
        FileServer() as files,
        provider("runware", rate="50/s", processing_s=0.5) as paid,
        CallbackReceiver(fail_first=1) as receiver,  # its retry: a countdown message
    ):
        seed = files.add("/seed.png", png(), "image/png")
        (tmp_path / "m.csv").write_text(
            "id,image,prompt\n" + "".join(f"r{i},{seed},p{i}\n" for i in range(rows))
        )
        env = clean_env(
            **paid.env,
            BGSWAP_BROKER_URL=amqp_url,
            BGSWAP_REDIS_URL=redis_url,
            BGSWAP_S3_ENDPOINT_URL=s3.endpoint_url,
            BGSWAP_ALLOW_PRIVATE_URLS="1",
            BGSWAP_CALLBACK_SECRET=SECRET,
            BGSWAP_CALLBACK_RETRY_BASE_S="0.3",
        )
        worker = start_worker(env, tmp_path / "worker.log")
        try:
            started = time.monotonic()
            done = bgswap("submit", "m.csv", "--provider", "runware", "--output",
                          f"s3://{bucket}/runs/", "--batch-id", "amqp1", "--wait",
                          "--callback-url", receiver.url, cwd=tmp_path, env=env,
                          timeout=90)  # fmt: skip
            took = time.monotonic() - started
            (callback,) = receiver.wait_for(1, timeout_s=30)
        finally:
            stop(worker)
        prompts = paid.accepted_prompts()
        tries = [d.status for d in receiver.deliveries]
    log = (tmp_path / "worker.log").read_text()
    assert done.returncode == 0, done.stderr + log[-3000:]
    assert done.stdout.strip() == "amqp1"
    assert re.search(r"transport: +amqp://", log), log[:2000]  # its messages came from there
    assert took < 60, took

    body = s3.client.get_object(Bucket=bucket, Key="runs/amqp1/manifest.jsonl")["Body"].read()
    lines = [json.loads(x) for x in body.decode().splitlines()]
    assert [x["id"] for x in lines] == [f"r{i}" for i in range(rows)]
    assert [x["status"] for x in lines] == ["succeeded"] * rows
    for line in lines:
        (out,) = line["outputs"]
        assert out["url"].startswith(f"s3://{bucket}/runs/amqp1/{line['id']}.")
        key = out["url"].removeprefix(f"s3://{bucket}/")
        assert s3.client.head_object(Bucket=bucket, Key=key)["ContentLength"] == out["bytes"]
    # The fake's own record: one accepted (paid) request per row, none twice.
    assert Counter(prompts) == Counter(f"p{i}" for i in range(rows))
    assert len({x["provider_task_id"] for x in lines}) == rows
    # The completion callback: refused once, sent again after its countdown, taken once.
    assert tries == [500, 200]
    verify(SECRET, callback.headers["x-bgswap-signature"], callback.raw, now=time.time())
    assert callback.event["event_id"] == event_id("amqp1", "batch.completed")
    assert callback.event["counts"]["succeeded"] == rows  # type: ignore[index]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_a_worker_stopped_mid_batch_on_rabbitmq_leaves_every_row_paid_once(
    redis_client: object, redis_url: str, amqp_url: str, tmp_path: Path, how: str
) -> None:
    """SIGKILL: its unacked messages return when its connection drops, its adopted rows
    when their leases lapse. SIGTERM: it hands its rows back, published through RabbitMQ
    as it shuts down."""
    rows = 24
    with FileServer() as files, provider("fal", rate="8/s", processing_s=2.0) as paid:
        outcome = run_with_fault(tmp_path, redis_url, paid, how, files, rows, broker_url=amqp_url)
    assert [x["id"] for x in outcome.lines] == [f"r{i}" for i in range(rows)]
    assert outcome.failed == []
    # The fake's own record: every row accepted (paid) exactly once, dead worker or not.
    assert Counter(outcome.prompts) == Counter(f"p{i}" for i in range(rows))
    assert len({x["provider_task_id"] for x in outcome.lines}) == rows
    # No result object was written twice, and the harness saw the stopped worker's rows
    # taken over (adopted again by the other worker) before the batch ended.
    assert outcome.puts == Counter(f"/out/r{i}.img" for i in range(rows))
