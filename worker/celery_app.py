"""The Celery app. `celery -A worker worker` needs no options: everything is set here."""

from __future__ import annotations

import logging

from celery import Celery

from worker.settings import Settings, get_settings

app = Celery("bgswap", include=["worker.tasks"])

# httpx logs every request line at INFO, presigned query strings (signatures) included:
# no secret may reach the logs, so these libraries only speak up for warnings.
for _name in ("httpx", "httpcore", "botocore", "boto3", "urllib3"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def apply_config(settings: Settings) -> None:
    app.conf.update(
        broker_url=settings.effective_broker_url,
        # At-least-once: ack after the task returns, and requeue (not ack) when the
        # process running it dies. Jobs are idempotent (a terminal row is skipped,
        # deterministic job ids), so a redelivery costs a skip, never a lost row.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Prefetch 1: a message waiting behind a long job in a worker's buffer is
        # held unacked and could outlive the visibility timeout (a duplicate).
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Progress and results live in our own Redis records, not in Celery results.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_default_queue="bgswap",
        # Visibility timeout: how long an unacked message may be held before Redis
        # hands it to another worker. Jobs are steps (a fetch, a submit, one poll, an
        # upload: each bounded by its HTTP timeouts, about a minute at worst), never the
        # provider's whole wait: a waiting row goes back to the queue with a countdown
        # of at most half this. So 150 s exceeds any healthy hold, and a message
        # orphaned by a SIGKILLed worker comes back within 150 s + the 10 s sweep.
        # kombu sweeps for expired unacked messages every interval x throttle seconds
        # (100 s by default); every 10 s bounds how late an orphan comes back.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
        visibility_timeout=settings.visibility_timeout_s,
        # Late-acked tasks would otherwise run twice per broker connection loss.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        # Jobs spend their time waiting on HTTP and in Pillow/numpy (which release
        # the GIL): threads keep several rows in flight per process cheaply.
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
    )


apply_config(get_settings())
