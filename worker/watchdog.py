"""The backstop for dead workers and lost messages; every worker process runs one.

Every few seconds it looks at each live batch (`bgswap:live`):

- **Lapsed leases.** A row held by a worker process carries a lease that the process's
  heartbeat pushes on (worker/engine.py). A lease that lapsed means the process died: the
  row is claimed (atomically, so one watchdog of many takes it), queued again and its
  message re-published. The new holder resumes from the provider's ids in Redis.
- **Lost messages.** A queued row's message is in the broker's queue, or held unacked by
  a worker (and restored by the broker after the visibility timeout if that worker dies).
  A worker killed at the wrong instant can still lose one between the broker handing it
  out and kombu recording it as unacked. So when a batch has queued rows while the
  broker's queue has stayed empty for longer than the restore takes (``grace_s``), its
  queued rows are re-published. A duplicate is harmless: a terminal row is skipped, and
  a row another live process holds is left to it.
- **Lost finalizers.** A batch whose last row was recorded but whose finalizer was never
  enqueued (the broker was away just then) would stay ``finalizing`` for ever: after the
  grace its finalizer is enqueued again (finalizing is idempotent).
- **Heartbeat.** After each sweep it records that this process is alive
  (worker/heartbeats.py): ``bgswap health`` and the API's /readyz read it.
- **Callbacks due.** Completion callbacks keep their next attempt in Redis
  (worker/callbacks.py): every sweep enqueues the attempts that are due, whether they
  are retries waiting out their backoff or attempts whose worker died.
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
        queue_depth: Callable[[], int],
        finalize: Callable[[str], None],
        *,
        callbacks: Callable[[], int] = lambda: 0,
        heartbeat: Callable[[], None] = lambda: None,
        grace_s: float,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="bgswap-watchdog", daemon=True)
        self.store = store
        self.publish = publish
        self.queue_depth = queue_depth
        self.finalize = finalize
        self.callbacks = callbacks
        self.heartbeat = heartbeat
        self.grace_s = grace_s
        self.interval_s = interval_s
        self.clock = clock
        self.stopping = threading.Event()

    def sweep(self) -> int:
        """Re-publish every row found lost; returns how many."""
        found = 0
        depth: int | None = None
        for batch_id in self.store.live_batches():
            for index in self.store.claim_lapsed(batch_id, reclaim_s=self.grace_s):
                log.warning("row %s:%d: its worker died; re-enqueued", batch_id, index)
                self.publish(batch_id, index)
                found += 1
            found += self._finalizing(batch_id)
            if self.store.counts(batch_id)["queued"] == 0:
                self.store.stalled_for(batch_id, None)
                continue
            depth = self.queue_depth() if depth is None else depth
            found += self._stall(batch_id, depth)
        return found + self.callbacks()

    def _finalizing(self, batch_id: str) -> int:
        """Enqueue the finalizer again for a batch left finalizing past the grace."""
        waited = self.store.finalizing_for(batch_id, self.clock())
        if waited < self.grace_s:
            return 0
        log.warning("batch %s: finalizing for %.0fs; its finalizer enqueued again",
                    batch_id, waited)  # fmt: skip
        self.store.finalizing_for(batch_id, None)
        self.finalize(batch_id)
        return 1

    def _stall(self, batch_id: str, depth: int) -> int:
        stalled = self.store.stalled_for(batch_id, self.clock() if depth == 0 else None)
        if stalled < self.grace_s:
            return 0
        self.store.stalled_for(batch_id, None)
        rows = list(self.store.indices_in_state(batch_id, "queued"))
        log.warning("batch %s: %d queued rows but no message for them: re-enqueued",
                    batch_id, len(rows))  # fmt: skip
        for index in rows:
            self.publish(batch_id, index)
        return len(rows)

    def run(self) -> None:
        self._beat()  # at once: a new worker is seen before its first sweep
        while not self.stopping.wait(self.interval_s):
            try:
                self.sweep()
            except Exception as exc:  # a broker hiccup must not kill the watchdog
                log.warning("watchdog sweep failed: %s", type(exc).__name__)
                continue  # no heartbeat either: this process cannot do its work
            self._beat()

    def _beat(self) -> None:
        try:
            self.heartbeat()
        except Exception as exc:
            log.warning("heartbeat not written: %s", type(exc).__name__)

    def stop(self) -> None:
        self.stopping.set()
