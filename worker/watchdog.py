"""The backstop for lost messages: every live row must be seen again by a deadline.

Each row has a "due by" time in Redis (`bgswap:due`): set when it is enqueued, pushed on
at every delivery and every wait, removed when the row is terminal. A message should
always come (its own countdown, or kombu's restore of a dead worker's unacked messages
after the visibility timeout), but a worker killed at the wrong instant can lose one
between the broker handing it out and kombu recording it as unacked. So each worker
process runs this thread: every few seconds it claims the rows that are overdue
(atomically, so one watchdog takes each) and publishes their message again. A duplicate
is harmless: a terminal row is skipped, and a paid provider resumes from the row's
memory instead of paying again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from worker.state import BatchStore

log = logging.getLogger("bgswap.watchdog")


class Watchdog(threading.Thread):
    def __init__(
        self,
        store: BatchStore,
        publish: Callable[[str, int], None],
        *,
        grace_s: float,
        interval_s: float,
    ) -> None:
        super().__init__(name="bgswap-watchdog", daemon=True)
        self.store = store
        self.publish = publish
        self.grace_s = grace_s
        self.interval_s = interval_s
        self.stopping = threading.Event()

    def sweep(self) -> int:
        """Re-publish every overdue row once; returns how many."""
        rows = self.store.claim_overdue(time.time(), self.grace_s)
        for batch_id, index in rows:
            log.warning(
                "row %s:%d is overdue (its message was lost?): re-enqueued", batch_id, index
            )
            self.publish(batch_id, index)
        return len(rows)

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.sweep()
            except Exception as exc:  # a broker hiccup must not kill the watchdog
                log.warning("watchdog sweep failed: %s", type(exc).__name__)

    def stop(self) -> None:
        self.stopping.set()
