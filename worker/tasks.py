"""Thin Celery tasks: decode the message, call plain code, map the answer to Celery."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready

from worker.celery_app import app
from worker.errors import RetryableError
from worker.jobs import TASK_FINALIZE_BATCH, TASK_PROCESS_ROW, finalize_task_id
from worker.pipeline import finalize, handle_delivery
from worker.runtime import get_deps, set_on_complete
from worker.watchdog import Watchdog


# max_retries=None on the task itself: Celery reads `retry(max_retries=None)` as "the
# default (3)", which would drop a row after its third wait. Our own limits bound the
# real retries (BGSWAP_MAX_ATTEMPTS, BGSWAP_MAX_DELIVERIES); waits are unbounded by
# design, each under the visibility timeout.
@app.task(name=TASK_PROCESS_ROW, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def process_row(self: Any, batch_id: str, index: int) -> None:
    delay = handle_delivery(batch_id, index, get_deps())
    if delay is not None:
        raise self.retry(countdown=delay)


@app.task(name=TASK_FINALIZE_BATCH, bind=True)  # type: ignore[untyped-decorator]
def finalize_batch(self: Any, batch_id: str) -> None:
    try:
        finalize(batch_id, get_deps())
    except RetryableError as err:
        raise self.retry(countdown=err.retry_after_s or 5.0, max_retries=10) from err


def enqueue_finalize(batch_id: str) -> None:
    finalize_batch.apply_async(args=(batch_id,), task_id=finalize_task_id(batch_id))


def republish(batch_id: str, index: int) -> None:
    process_row.apply_async(args=(batch_id, index))


def start_watchdog() -> Watchdog:
    deps = get_deps()
    watchdog = Watchdog(
        deps.store,
        republish,
        grace_s=deps.settings.row_grace_s,
        interval_s=deps.settings.watchdog_interval_s,
    )
    watchdog.start()
    return watchdog


@worker_ready.connect  # type: ignore[untyped-decorator]
def _watch(**_: Any) -> None:
    """Every `celery -A worker worker` process runs a watchdog (see worker/watchdog.py)."""
    start_watchdog()


set_on_complete(enqueue_finalize)
