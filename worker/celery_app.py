"""The Celery app. `celery -A worker worker` needs no options: everything is set here."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, setup_logging
from celery.utils.nodenames import default_nodename, nodename, nodesplit
from kombu.exceptions import ChannelError

from worker import logs
from worker.settings import Settings, get_settings

app = Celery("bgswap", include=["worker.tasks"])
QUEUE = "bgswap"

# httpx logs every request line at INFO, presigned query strings (signatures) included:
# no secret may reach the logs, so these libraries only speak up for warnings.
logs.quiet_libraries()


@celeryd_init.connect  # type: ignore[untyped-decorator]
def _early_logging(**_: Any) -> None:
    """Before the worker's own start-up checks, whose warnings must be in the format too."""
    logs.configure(get_settings().log_format, logging.WARNING)


@setup_logging.connect  # type: ignore[untyped-decorator]
def _logging(loglevel: int | str | None = None, **_: Any) -> None:
    """`celery -A worker worker|beat` log through bgswap's formatter (BGSWAP_LOG_FORMAT),
    secrets redacted, instead of Celery's own: Celery configures nothing when this is
    connected."""
    logs.configure(get_settings().log_format, loglevel or logging.INFO)


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
        task_default_queue=QUEUE,
        # Visibility timeout: how long an unacked message may be held before Redis
        # hands it to another worker. A row's message is held only until the worker's
        # engine adopts the row (worker/tasks.py: at most 20 s waiting for room), never
        # for the provider's wait, and no row message carries a countdown. So 150 s
        # exceeds any healthy hold by far, and a message orphaned by a SIGKILLed worker
        # comes back within 150 s + the 10 s sweep (rows it had adopted come back
        # sooner, when their lease lapses: worker/engine.py).
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
        # A delivery only adopts its row into the engine (worker/engine.py has the step
        # threads, BGSWAP_WORKER_CONCURRENCY of them): two threads take messages while
        # one waits for room.
        worker_pool="threads",
        worker_concurrency=2,
        worker_hijack_root_logger=False,
    )
    apply_beat_config(settings)


def queue_depth(celery: Any = None, timeout_s: float | None = None) -> int:
    """Messages waiting in the row queue (Redis or AMQP, through kombu), on ``celery``'s
    broker (this app's by default). With ``timeout_s``, a broker that does not answer
    fails within about that long, once, instead of being retried (health checks)."""
    opts = {} if timeout_s is None else {"connect_timeout": timeout_s}
    with (celery or app).connection_for_read(**opts) as conn:
        if timeout_s is not None:
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
        try:
            declared = conn.default_channel.queue_declare(queue=QUEUE, passive=True)
        except ChannelError:  # on Redis an empty queue does not exist: nothing waits
            return 0
        return int(declared.message_count)


def apply_beat_config(settings: Settings) -> None:
    """`celery -A worker beat` sends one entry, ``bgswap.tick``, every
    BGSWAP_SCHEDULE_TICK_S; a worker's tick task fires what BGSWAP_SCHEDULES says is due
    (producer/scheduler.py). Beat keeps no schedule file of its own (the in-memory
    scheduler): which slot fired is in Redis, claimed once however many beats run."""
    if settings.schedules is None:
        app.conf.beat_schedule = {}
        return
    from worker.schedules import TASK_TICK  # noqa: PLC0415

    app.conf.update(
        beat_scheduler="celery.beat:Scheduler",
        beat_schedule={
            TASK_TICK: {
                "task": TASK_TICK,
                "schedule": settings.schedule_tick_s,
                "args": (str(settings.schedules.expanduser().resolve()),),
                # A tick nobody took in time is dropped: the next one decides afresh.
                "options": {"expires": settings.schedule_tick_s},
            }
        },
    )


@celeryd_init.connect  # type: ignore[untyped-decorator]
def _own_nodename(sender: str, instance: Any, **_: Any) -> None:
    """A worker started without ``-n`` gets a node name of its own, ``celery-PID@host``:
    with Celery's default, ``celery@host``, every worker on one host shares a name, and on
    RabbitMQ the second one dies at start (its control queue, ``celery@host.celery.pidbox``,
    is exclusive to the first: RESOURCE_LOCKED). On Redis it was only a warning."""
    if sender == default_nodename(None):
        name, host = nodesplit(sender)
        instance.hostname = nodename(f"{name}-{os.getpid()}", host)


apply_config(get_settings())
