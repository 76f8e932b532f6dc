"""Publishing row messages: one Celery message per chunk of rows, through ``send_task``.

A message per row cost ~0.5-1.1 ms of routing, signals and serializing in ``send_task``,
a minute or more for 100,000 rows, plus five Redis commands a row on the broker. A
message names its batch and up to ``CHUNK_ROWS`` row indices instead
(``bgswap.process_rows``, worker/tasks.py): the worker adopts each row into its engine,
and gives back, as one message, the rows it has no room for. Everything goes through
Celery's public API, so any broker, configuration and publish signal receiver works.

A batch must still spread over the workers taking messages, as one-row messages did: a
call's rows of one batch go out in at least ``SPREAD`` messages (a batch of 40 rows, 5 a
message), at most CHUNK_ROWS a message (small beside an engine's room,
BGSWAP_WORKER_MAX_ROWS, 1,000), and a worker keeps only the rows it has room for at once
(worker/tasks.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Any

from producer.batch import Publish
from worker.jobs import TASK_PROCESS_ROWS

Message = tuple[str, str, int]  # (message id, batch id, row index)

CHUNK_ROWS = 100
SPREAD = 8


def rows_per_message(rows: int) -> int:
    """How many of ``rows`` rows of one batch a message carries."""
    return max(1, min(CHUNK_ROWS, rows // SPREAD))


def chunks(messages: Sequence[Message]) -> list[tuple[str, str, list[int]]]:
    """(task id, batch id, indices) per message to send: consecutive rows of one batch,
    ``rows_per_message`` each. The task id is the first row's, with how many follow."""
    out: list[tuple[str, str, list[int]]] = []
    for batch_id, group in groupby(messages, key=lambda m: m[1]):
        rows = list(group)
        size = rows_per_message(len(rows))
        for lo in range(0, len(rows), size):
            part = rows[lo : lo + size]
            task_id = part[0][0] if len(part) == 1 else f"{part[0][0]}+{len(part) - 1}"
            out.append((task_id, batch_id, [index for _, _, index in part]))
    return out


def celery_publisher(app: Any) -> Publish:
    """Any broker: one ``send_task`` per chunk of rows, one producer per call."""

    def publish(messages: Sequence[Message]) -> None:
        if not messages:
            return
        # One producer (one connection, one channel) for all the chunks of a call.
        with app.producer_or_acquire() as producer:
            for task_id, batch_id, indices in chunks(messages):
                app.send_task(
                    TASK_PROCESS_ROWS, args=(batch_id, indices), task_id=task_id, producer=producer
                )

    return publish
