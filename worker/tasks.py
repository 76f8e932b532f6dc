"""Thin Celery tasks: decode the message, call plain code, map the answer to Celery."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

from celery.signals import beat_init, worker_process_shutdown, worker_ready, worker_shutdown

from worker import callbacks, heartbeats, metrics, runtime
from worker.celery_app import QUEUE, app
from worker.celery_app import queue_depth as celery_queue_depth
from worker.errors import BgswapError, UsageError
from worker.jobs import (
    TASK_DELIVER_CALLBACK,
    TASK_FINALIZE_BATCH,
    TASK_PROCESS_ROW,
    TASK_PROCESS_ROWS,
    finalize_task_id,
)
from worker.limits import in_flight
from worker.pipeline import fail_batch, finalize
from worker.runtime import close_engine, get_deps, get_engine
from worker.schedules import TASK_TICK
from worker.settings import Settings
from worker.watchdog import Watchdog

# How long a delivery waits for room in this process's engine before the row goes back
# to the queue (for a process with room): far below the visibility timeout.
ADOPT_WAIT_S = 20.0
SCRAPE_TIMEOUT_S = 3.0
log = logging.getLogger("bgswap.worker")


# The message only hands the row to this process's engine (worker/engine.py), which
# steps it from there on: the message is acked at once, whatever the provider's wait.
@app.task(name=TASK_PROCESS_ROW, ignore_result=True)  # type: ignore[untyped-decorator]
def process_row(batch_id: str, index: int) -> None:
    if not get_engine().adopt(batch_id, index, ADOPT_WAIT_S):
        republish(batch_id, index)


# What the producer publishes (producer/publish.py): rows of one batch, adopted in turn.
# A delivery waits ADOPT_WAIT_S in all for room, as a one-row message did: a full process
# takes the rows as its own finish (not one per delivery, bouncing the rest between full
# workers), and gives what is left back together, for another process. A row whose
# adoption fails (Redis away) is left queued in its record, where the watchdog finds it,
# as a failed one-row message left it; the others go on.
@app.task(name=TASK_PROCESS_ROWS, ignore_result=True)  # type: ignore[untyped-decorator]
def process_rows(batch_id: str, indices: list[int]) -> None:
    engine = get_engine()
    deadline = time.monotonic() + ADOPT_WAIT_S
    for n, index in enumerate(indices):
        try:
            adopted = engine.adopt(batch_id, index, max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            log.error("row %d of %s not adopted: %s", index, batch_id, type(exc).__name__)
            continue
        if not adopted:
            republish_rows(batch_id, indices[n:])
            return


# A manifest that cannot be written after this many tries fails its batch (the storage
# retried each try a few times already): nobody waits on it for more than seconds.
FINALIZE_RETRIES = 3


@app.task(name=TASK_FINALIZE_BATCH, bind=True)  # type: ignore[untyped-decorator]
def finalize_batch(self: Any, batch_id: str) -> None:
    deps = get_deps()
    try:
        finalize(batch_id, deps)
    except BgswapError as err:
        if err.retryable and self.request.retries < FINALIZE_RETRIES:
            countdown = min(30.0, err.retry_after_s or 2.0 ** (self.request.retries + 1))
            raise self.retry(countdown=countdown, max_retries=FINALIZE_RETRIES) from err
        fail_batch(batch_id, deps, f"the output manifest could not be written: {err.message}")
    if callbacks.pending(deps.store, batch_id):  # owed now: sent at once, not at a sweep
        nudge_callback(batch_id, 0.0)


# A callback attempt: its schedule is in Redis (worker/callbacks.py), so this message is
# only a nudge; a lost one is made up by the watchdog, a duplicate finds nothing to claim.
@app.task(name=TASK_DELIVER_CALLBACK, ignore_result=True)  # type: ignore[untyped-decorator]
def deliver_callback(batch_id: str) -> None:
    sender().deliver(batch_id)


def sender() -> callbacks.Callbacks:
    deps = get_deps()
    return callbacks.process_callbacks(deps.settings, deps.store, deps.rand, nudge_callback)


def nudge_callback(batch_id: str, countdown: float) -> None:
    """Send the batch's callback attempt after ``countdown`` seconds (always below the
    visibility timeout: callbacks.NUDGE_MAX_S)."""
    deliver_callback.apply_async(args=(batch_id,), countdown=countdown or None)


def enqueue_due_callbacks() -> int:
    """The watchdog's share: an attempt for every callback that is due."""
    batches = callbacks.due(get_deps().store, time.time())
    for batch_id in batches:
        deliver_callback.apply_async(args=(batch_id,))
    return len(batches)


@app.task(name=TASK_TICK, ignore_result=True)  # type: ignore[untyped-decorator]
def tick(path: str) -> None:
    """Beat's tick: fire the schedules of the file at ``path`` that are due (README:
    "Nightly schedules"). A worker with BGSWAP_SCHEDULES set reads its own path."""
    from producer.scheduler import tick as fire_due  # noqa: PLC0415 - producer code, lazily

    deps = get_deps()
    try:
        fire_due(deps.settings, app, deps.store, str(deps.settings.schedules or path))
    except UsageError as exc:  # a bad schedule file: one line a tick, no traceback
        logging.getLogger("bgswap.scheduler").error("%s", exc)


@beat_init.connect  # type: ignore[untyped-decorator]
def _check_schedules(**_: Any) -> None:
    """Beat says at start whether the schedule file is good (a bad one: one error line)."""
    from worker.schedules import load_schedules  # noqa: PLC0415
    from worker.settings import get_settings  # noqa: PLC0415

    settings = get_settings()
    if settings.schedules is None:
        logging.getLogger("bgswap.scheduler").warning("BGSWAP_SCHEDULES is not set")
        return
    try:
        schedules = load_schedules(settings.schedules, settings.local_root_list)
    except Exception as exc:  # reported, and every tick reports it again
        logging.getLogger("bgswap.scheduler").error("%s", exc)
        return
    names = ", ".join(s.name for s in schedules) or "none"
    logging.getLogger("bgswap.scheduler").warning("schedules: %s", names)


def enqueue_finalize(batch_id: str) -> None:
    finalize_batch.apply_async(args=(batch_id,), task_id=finalize_task_id(batch_id))


def republish(batch_id: str, index: int) -> None:
    process_row.apply_async(args=(batch_id, index))


def republish_rows(batch_id: str, indices: list[int]) -> None:
    process_rows.apply_async(args=(batch_id, indices))


def queue_depth() -> int:
    """Messages waiting in the row queue (Redis or AMQP, through kombu)."""
    return celery_queue_depth()


def scrape_collector(settings: Settings, client: Any) -> metrics.ScrapeCollector:
    """What a /metrics scrape reads from the servers (worker/metrics.py): the accounts'
    in-flight figures from Redis, the row queue's depth from the broker, each within a
    few seconds (a scrape must not hang on a server that does not answer)."""
    return metrics.ScrapeCollector(
        functools.partial(in_flight, settings, client),
        lambda: [(QUEUE, float(celery_queue_depth(timeout_s=SCRAPE_TIMEOUT_S)))],
    )


def start_watchdog() -> Watchdog:
    deps = get_deps()
    watchdog = Watchdog(
        deps.store,
        republish,
        queue_depth,
        enqueue_finalize,
        callbacks=enqueue_due_callbacks,
        heartbeat=lambda: heartbeats.beat(deps.store.redis, time.time()),
        grace_s=deps.settings.row_grace_s,
        interval_s=deps.settings.watchdog_interval_s,
    )
    watchdog.start()
    return watchdog


@worker_ready.connect  # type: ignore[untyped-decorator]
def _watch(**_: Any) -> None:
    """Every `celery -A worker worker` process runs a watchdog (see worker/watchdog.py)
    and, with BGSWAP_METRICS_PORT set, serves /metrics (worker/metrics.py)."""
    start_watchdog()
    serve_metrics()


def serve_metrics() -> None:
    settings = get_deps().settings
    if settings.metrics_port is None:
        return
    collector = scrape_collector(settings, get_deps().store.redis)
    if not metrics.serve(settings.metrics_host, settings.metrics_port, collector):
        logging.getLogger("bgswap.metrics").warning(
            "port %d is taken: another process serves these metrics", settings.metrics_port
        )


@worker_shutdown.connect  # type: ignore[untyped-decorator]
@worker_process_shutdown.connect  # type: ignore[untyped-decorator]  # prefork children
def _hand_back(**_: Any) -> None:
    """Warm shutdown (SIGTERM): the rows this process holds go back to the queue."""
    close_engine()
    metrics.process_exited()
    with contextlib.suppress(Exception):  # Redis away: the heartbeat just goes stale
        heartbeats.stopped(get_deps().store.redis)


# This process's worker context: how what it runs publishes (worker/runtime.py).
runtime.start(enqueue_finalize, republish)
