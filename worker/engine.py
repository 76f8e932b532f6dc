"""The worker process's engine: it holds the rows it works on between their steps.

A provider request waits seconds to minutes. A Celery message is the wrong place to wait
(a countdown past the visibility timeout duplicates it; every step through the queue
costs a publish, a delivery and an ack), and so is a thread. So a delivery of
``process_row`` only *adopts* its row (``begin``: a lease in Redis, worker/state.py) and
is acked; from then on this process steps the row itself:

    adopt -> step (a pool thread: submit, poll, download + upload) -> Later(seconds)
          -> a timer here (no thread, no message) -> step ... -> terminal (lease ends)

- **Room.** A process takes a new row only while a step thread is idle (network steps:
  ``worker_concurrency`` threads; computing steps, the local provider's: one per core)
  and it holds fewer than ``worker_max_rows``; ``adopt`` waits a little for room, then
  gives the row back to the queue, so the broker spreads work over every process.
- **Leases and fencing.** A heartbeat thread pushes this process's leases on. If the
  process dies, its leases lapse and another process's watchdog re-enqueues the rows; the
  provider's ids are in Redis, so they resume polling, not paying. A process that was
  only frozen or cut off from Redis meanwhile must not act on those rows when it comes
  back: each row's hold carries the epoch it was taken at (worker/hold.py), every write
  that matters is refused once the row moved on (``Stale``: the row is dropped here), and
  a row whose lease went unrenewed for half its length is re-checked with Redis before
  its next step (``Unsure``).
- **Admission.** A row that finds no rate token or in-flight slot (``Later(admission)``)
  waits in its provider's gate, first in first out: one probe at a time while the limit
  says no, all of them while it says yes, and at once when a row of this process frees
  a slot. Hundreds of waiting rows thus cost one Redis call per wait, not one each.
- **Polls.** A row waiting on a provider that can poll many at once (``Prefetching``) is
  polled with every other row of that provider that is due, in as few requests as it
  takes, off the step threads. An answer that says only "not yet" gives the row no step:
  the engine polls it again at the pace its last step set (``Wait.then_s``), and steps it
  only for news, or after ``STEP_EVERY_S`` (no thread, no Redis write per poll).
- **Shutdown** (SIGTERM, warm): steps under way finish, then every held row is handed
  back: its lease released, its message published again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from worker import completions, logs, metrics
from worker.hold import Hold, Stale, Unsure
from worker.jobs import Job
from worker.pipeline import Deps, Later, LocalRows, advance, begin
from worker.providers.base import Prefetching

log = logging.getLogger("bgswap.engine")

Key = tuple[str, int]
TRANSIENT_WAIT_S = 5.0  # a step that failed outside the row (Redis unreachable): try again
HEARTBEAT_RETRY_S = 1.0
GATHER_AHEAD_S = 0.05
# The longest a waiting row goes without a step while gathered polls say "not yet": its
# step keeps its in-flight slot's lease (worker/limits.py: LEASE_S) and checks its deadline.
STEP_EVERY_S = 10.0


@dataclass
class Held:
    job: Job
    attempt: int
    hold: Hold
    cpu: bool = False  # its provider computes here (worker.providers.base: cpu_bound)
    retry: bool = False  # the next step is a new attempt
    lost: bool = False  # another process took the row over: drop it
    probe: bool = False  # this step is its gate's probe for admission
    # What its next step polls, when its provider can poll for several rows at once
    # (worker/providers/base.py: Prefetching): the engine gathers those polls.
    watch: str | None = None
    then_s: float | None = None  # the pace of its gathered polls while they say "not yet"
    stepped_at: float = 0.0  # when its last step ended (the engine's clock)
    # The sequence number of its one live timer (-1: none): a timer moved earlier (a
    # completion webhook: ``wake``) leaves the old entry in the heap, which then does nothing.
    timer: int = -1


@dataclass
class Gate:
    """Rows of one provider waiting for admission (a rate token or an in-flight slot)."""

    waiting: deque[tuple[Key, Held]] = field(default_factory=deque)
    not_before: float = 0.0  # after a refusal: when the limiter said to look again
    probing: int = 0
    # Rows that may try now: one per slot this process freed and one more per admission
    # (a yes suggests room for the next), none after a refusal until ``not_before``.
    credits: int = 0


class Engine:
    def __init__(
        self,
        deps: Deps,
        republish: Callable[[str, int], None],
        *,
        threads: int,
        max_rows: int,
    ) -> None:
        self.deps = deps
        self.republish = republish
        self.threads = threads
        self.max_rows = max_rows
        self.clock = deps.clock
        if deps.local is None:
            deps.local = LocalRows()  # the rows held here are this process's alone
        # Network steps on `threads` threads; computing steps (the local provider) on one
        # thread per core, apart: more at once only slow each other down, and every
        # thread that decodes images keeps its own malloc arena (measured on 2 cores: 8
        # threads, 69 s and 385 MB for 1,000 rows; 2 threads, 61 s and 199 MB).
        self.cpu_slots = max(1, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bgswap-step")
        self._cpu_pool = ThreadPoolExecutor(self.cpu_slots, thread_name_prefix="bgswap-cpu")
        self._cv = threading.Condition()
        self._held: dict[Key, Held] = {}
        self._busy = 0  # network steps given to the pool and not returned
        self._cpu_busy = 0  # computing steps given to the CPU pool and not returned
        self._adopting = 0  # deliveries taking a row from Redis right now
        # Every pending event (a timer, a place in a line, a step) names the Held it is for:
        # a row let go and taken again is a new Held, and the old one's events do nothing.
        self._timers: list[tuple[float, int, Key, Held]] = []
        self._seq = itertools.count()
        self._gates: dict[str, Gate] = {}
        # Rows whose wait is over and whose poll is gathered with the others that are due,
        # per provider, by one thread each (``_gather``): no step thread waits for a poll.
        self._due: dict[str, list[tuple[Key, Held]]] = defaultdict(list)
        self._gatherers: dict[str, threading.Thread] = {}
        self._closing = False
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._schedule, name="bgswap-scheduler", daemon=True),
            threading.Thread(target=self._heartbeat, name="bgswap-heartbeat", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._listener = (
            completions.Listener(deps.store.redis, self.wake).start()
            if deps.settings.completion_webhooks
            else None
        )

    # -- taking rows --------------------------------------------------------------------

    def adopt(self, batch_id: str, index: int, wait_s: float) -> bool:
        """Take a delivered row if there is room within ``wait_s``; False: there was none
        (the caller gives the row back to the queue)."""
        key = (batch_id, index)
        if self._still_holds(key):
            return True  # a duplicate message of a row this process holds
        with self._cv:
            deadline = self.clock() + wait_s
            while not self._closing and not self._has_room():
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._cv.wait(left)
            if self._closing:
                return False
            self._adopting += 1  # the room is ours while `begin` talks to Redis
        held = None
        try:
            begun = begin(batch_id, index, self.deps)
            if begun is not None:
                cpu = self.deps.provider(begun.job.spec.provider).cpu_bound
                held = Held(begun.job, begun.attempt, begun.hold, cpu=cpu)
        finally:
            with self._cv:
                self._adopting -= 1
                if held is not None:
                    self._take(key, held)
                self._cv.notify_all()
        return True

    def _still_holds(self, key: Key) -> bool:
        """Does this process hold the row? A new message for a row it holds means somebody
        re-published it, maybe a watchdog that took it over while this process was not
        heard from: Redis says. A row lost that way is let go here, to be taken afresh."""
        with self._cv:
            held = self._held.get(key)
        if held is None:
            return False
        if not held.lost:
            try:
                self._recheck(key, held)
                return True
            except Stale:
                held.lost = True
            except Exception:  # Redis away: a duplicate, as far as this process can tell
                return True
        with self._cv:
            if self._held.get(key) is held:
                self._let_go(key)
        return False

    def _let_go(self, key: Key) -> None:
        self._held.pop(key, None)
        metrics.rows_held(len(self._held))
        if self.deps.local is not None:
            self.deps.local.drop(key)

    def _take(self, key: Key, held: Held) -> None:
        self._held[key] = held
        metrics.rows_held(len(self._held))
        gate = self._gates.get(held.job.spec.provider)
        local = self.deps.local
        fresh = local is not None and local.untouched(key)
        if gate is not None and gate.waiting and fresh:
            # Rows are already waiting for admission and this one has nothing at the
            # provider yet: it joins the end of the line instead of asking the limiter
            # only to be refused. (A resumed row goes straight on: it polls a request
            # that already holds a slot, and must not wait behind rows that need one.)
            gate.waiting.append((key, held))
        else:
            self._dispatch(key, held)

    def _has_room(self) -> bool:
        return (
            len(self._held) < self.max_rows
            and self._busy + self._adopting < self.threads
            and self._cpu_busy + self._adopting < self.cpu_slots
        )

    def held(self) -> int:
        with self._cv:
            return len(self._held)

    def waiting(self, provider: str) -> int:
        """Rows in ``provider``'s admission line."""
        with self._cv:
            gate = self._gates.get(provider)
            return len(gate.waiting) if gate is not None else 0

    # -- stepping -----------------------------------------------------------------------

    def _step(self, key: Key, held: Held) -> None:
        later: Later | None = None
        if not held.lost:
            later = self._run_step(key, held)
        with self._cv:
            if held.cpu:
                self._cpu_busy -= 1
            else:
                self._busy -= 1
            self._stepped(key, held, later)
            self._cv.notify_all()

    def _run_step(self, key: Key, held: Held) -> Later | None:
        """One step of a held row, on a step thread; None: the row is done with here."""
        try:
            if not held.hold.fresh():
                self._recheck(key, held)
            if held.retry:
                held.attempt = self.deps.store.count_attempt(*key)
                held.retry = False
            with logs.row_context(held.job.batch_id, held.job.spec.id, held.job.spec.provider):
                return advance(held.job, self.deps, held.attempt, held.hold)
        except Stale as lost:
            log.warning("dropped row %s:%d: %s", *key, lost)
            held.lost = True
        except Unsure:
            return self._after_unsure(key, held)
        except Exception as exc:  # Redis away, say: the row did nothing wrong
            log.warning("row %s:%d step failed: %s; again in %gs",
                        *key, exc, TRANSIENT_WAIT_S)  # fmt: skip
            return Later(TRANSIENT_WAIT_S, "wait")
        return None

    def _after_unsure(self, key: Key, held: Held) -> Later | None:
        """The step stopped short because the lease may be lapsing: re-check now."""
        try:
            self._recheck(key, held)
        except Stale as lost:
            log.warning("dropped row %s:%d: %s", *key, lost)
            held.lost = True
            return None
        except Exception as exc:
            log.warning("row %s:%d: cannot re-check its lease (%s); again in %gs",
                        *key, type(exc).__name__, TRANSIENT_WAIT_S)  # fmt: skip
            return Later(TRANSIENT_WAIT_S, "wait")
        return Later(0.0, "wait")

    def _recheck(self, key: Key, held: Held) -> None:
        """Ask Redis whether this process still holds the row, renewing its lease if so;
        ``Stale`` if not."""
        sent_at = self.clock()
        beat = self.deps.store.heartbeat(
            key[0], [key[1]], self.deps.token, self.deps.settings.row_lease_s
        )
        if key[1] not in beat.renewed:
            raise Stale("its lease lapsed and another worker took it over")
        held.hold.renewed(sent_at)

    def _stepped(self, key: Key, held: Held, later: Later | None) -> None:
        gate = self._gates.get(held.job.spec.provider)
        probed = held.probe
        if probed and gate is not None:
            held.probe = False
            gate.probing = max(0, gate.probing - 1)
        if self._held.get(key) is not held:
            return  # let go meanwhile (a shutdown, or a row taken afresh)
        if later is not None and later.kind == "admission":
            gate = self._gate(held.job.spec.provider)
            if probed:
                gate.waiting.appendleft((key, held))  # it keeps its place at the head
            else:
                gate.waiting.append((key, held))
            gate.credits = 0
            gate.not_before = max(gate.not_before, self.clock() + later.seconds)
            return
        if gate is not None and probed:
            # Admitted (the limit said yes, so there may be room for the next one too): the
            # line moves. (A slot this process frees moves it too: ``_slot_freed``.)
            self._credit(gate)
        if held.lost or later is None:
            self._let_go(key)
            return
        held.retry = later.kind == "retry"
        held.watch = later.watch
        held.then_s = later.then_s
        held.stepped_at = self.clock()
        due = self.clock() + later.seconds
        self._set_timer(key, held, due)

    def _gate(self, provider: str) -> Gate:
        gate = self._gates.get(provider)
        if gate is None:
            gate = self._gates[provider] = Gate()
            limits = self.deps.limits(provider)
            if limits is not None:
                # Slots are freed inside steps (as soon as the provider is done with a row,
                # before its results are stored: worker/limits.py), so the limits tell us.
                limits.on_free = self._slot_freed
        return gate

    def _slot_freed(self, provider: str) -> None:
        with self._cv:
            gate = self._gates.get(provider)
            if gate is not None and gate.waiting:
                self._credit(gate)
                self._cv.notify_all()

    @staticmethod
    def _credit(gate: Gate) -> None:
        # By as many rows as wait at most: credits do not pile up for an empty line.
        gate.credits = min(gate.credits + 1, len(gate.waiting))
        gate.not_before = 0.0

    def _dispatch(self, key: Key, held: Held) -> None:
        if held.cpu:
            self._cpu_busy += 1
            self._cpu_pool.submit(self._step, key, held)
        else:
            self._busy += 1
            self._pool.submit(self._step, key, held)

    def _schedule(self) -> None:
        """Fire timers and move admission lines; never blocks on I/O."""
        with self._cv:
            while not self._closing:
                now = self.clock()
                # Admissions first: a slot that came free is taken again at once, so the
                # account stays full instead of refilling in waves behind the polls.
                for gate in self._gates.values():
                    self._move(gate, now)
                self._fire_timers(now)
                self._cv.wait(self._next_event(now))

    def _set_timer(self, key: Key, held: Held, due: float) -> None:
        held.timer = next(self._seq)
        heapq.heappush(self._timers, (due, held.timer, key, held))

    def wake(self, batch_id: str, index: int) -> None:
        """The row's provider says it is done (a completion webhook, worker/completions.py):
        a row of this process waiting on its provider is polled now, not at its timer."""
        with self._cv:
            held = self._held.get((batch_id, index))
            if held is not None and held.timer >= 0 and held.watch is not None:
                self._set_timer((batch_id, index), held, self.clock())
                self._cv.notify_all()

    def _fire_timers(self, now: float) -> None:
        # Polls due within GATHER_AHEAD_S go with one due now: a little early costs
        # nothing (an unfinished task is polled again), a request of its own would.
        while self._timers and self._timers[0][0] <= now + GATHER_AHEAD_S:
            due, seq, key, held = self._timers[0]
            if self._held.get(key) is not held or held.timer != seq:
                heapq.heappop(self._timers)  # let go, or its timer was moved
            elif held.watch is not None and self._gathers(held.job.spec.provider):
                heapq.heappop(self._timers)  # its poll goes with the others: no thread yet
                held.timer = -1
                self._due[held.job.spec.provider].append((key, held))
                self._cv.notify_all()
            elif due > now:
                return
            elif self._busy < self.threads:
                heapq.heappop(self._timers)
                held.timer = -1
                self._dispatch(key, held)
            else:
                return

    def _gathers(self, name: str) -> bool:
        """Does ``name``'s provider poll for several rows at once? Its thread starts then."""
        if name not in self._gatherers:
            if not isinstance(self.deps.provider(name), Prefetching):
                return False
            thread = threading.Thread(
                target=self._gather, args=(name,), name=f"bgswap-poll-{name}", daemon=True
            )
            self._gatherers[name] = thread
            thread.start()
        return True

    def _gather(self, name: str) -> None:
        """Poll every row of ``name`` that is due, in as few requests as the provider
        takes, then give each its step (which reads its answer). While one round is out,
        the rows falling due gather for the next: polls wait for no timer of their own."""
        provider = self.deps.provider(name)
        assert isinstance(provider, Prefetching)
        while True:
            with self._cv:
                while not self._closing and not self._due[name]:
                    self._cv.wait()
                if self._closing:
                    return
                due = [(key, held) for key, held in self._due[name] if self._held.get(key) is held]
                self._due[name] = []
            sent = self.clock()
            try:
                pending = provider.prefetch([h.watch for _, h in due if h.watch is not None])
            except Exception as exc:  # each row's step polls for itself instead
                log.warning("%s: gathered poll failed: %s", name, type(exc).__name__)
                pending = set()
            quiet = self._quiet(due, pending)
            with self._cv:
                now = self.clock()
                for key, held in due:
                    if self._held.get(key) is not held:
                        continue
                    then_s = quiet.get(key)
                    if then_s is not None:
                        # Polled again, with no step, ``then_s`` after this poll went out
                        # (not after its answer came: the pace is the provider's, not ours).
                        self._set_timer(key, held, max(now, sent + then_s))
                    else:
                        held.watch = None
                        self._set_timer(key, held, now)
                self._cv.notify_all()

    def _quiet(self, due: list[tuple[Key, Held]], pending: Collection[str]) -> dict[Key, float]:
        """The rows a gathered poll found plainly unfinished that need no step to hear it
        (a step would only count the poll and set the next), with the pace of their next
        poll: each stepped less than ``STEP_EVERY_S`` ago (its slot's lease kept, its
        deadline checked), still surely this process's, and its batch neither canceled nor
        halted. Read outside the lock: the flags may ask Redis."""
        now = self.clock()
        quiet: dict[Key, float] = {}
        for key, held in due:
            if held.watch not in pending or held.then_s is None:
                continue
            if held.lost or not held.hold.fresh():
                continue  # its step drops it, or asks Redis first
            if now - held.stepped_at >= STEP_EVERY_S:
                continue
            if self._flagged(key[0], held.job.spec.provider):
                continue
            quiet[key] = held.then_s
        return quiet

    def _flagged(self, batch_id: str, provider: str) -> bool:
        """Canceled or halted (or Redis cannot say): the row's step decides."""
        flags = self.deps.flags
        try:
            return flags.canceled(batch_id) or flags.halted(batch_id, provider) is not None
        except Exception as exc:
            log.debug("batch flags unread: %s", type(exc).__name__)
            return True

    def _move(self, gate: Gate, now: float) -> None:
        if not gate.waiting or now < gate.not_before:
            return
        if gate.credits == 0 and gate.probing == 0:
            gate.credits = 1  # the wait is over (or slots came free elsewhere): ask again
        while gate.waiting and gate.credits > 0 and self._busy < self.threads:
            key, held = gate.waiting.popleft()
            if self._held.get(key) is held:
                held.probe = True
                gate.probing += 1
                gate.credits -= 1
                self._dispatch(key, held)

    def _next_event(self, now: float) -> float:
        times = [self._timers[0][0]] if self._timers else []
        times += [g.not_before for g in self._gates.values() if g.waiting]
        return max(0.001, min(times, default=now + 1.0) - now)

    # -- leases -------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        interval = self.deps.settings.row_lease_s / 4
        wait = interval
        while not self._stopped.wait(wait):
            try:
                self.beat()
                wait = interval
            except Exception as exc:  # Redis away: leases last a while, try again soon
                log.warning("heartbeat failed: %s", type(exc).__name__)
                # Soon, not in a quarter lease: a hold not renewed for half a lease is
                # re-checked row by row before its next step (worker/hold.py).
                wait = min(interval, HEARTBEAT_RETRY_S)

    def beat(self) -> int:
        """Push this process's leases on; returns how many rows it lost to others."""
        with self._cv:
            per_batch: dict[str, dict[int, Held]] = defaultdict(dict)
            for (batch_id, index), held in self._held.items():
                per_batch[batch_id][index] = held
        lost = 0
        for batch_id, rows in per_batch.items():
            sent_at = self.clock()
            beat = self.deps.store.heartbeat(
                batch_id, list(rows), self.deps.token, self.deps.settings.row_lease_s
            )
            for index, held in rows.items():
                if index in beat.renewed:
                    held.hold.renewed(sent_at)
                    continue
                # Taken over (this process was presumed dead), or made terminal by
                # another holder meanwhile: either way not this process's to step.
                held.lost = True
                if index in beat.lost:
                    log.warning("row %s:%d was taken over by another worker", batch_id, index)
                    lost += 1
        return lost

    # -- shutdown -----------------------------------------------------------------------

    def close(self, timeout_s: float = 60.0) -> int:
        """Stop taking and stepping rows, let steps under way finish, and hand every held
        row back to the queue; returns how many were handed back."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._busy or self._cpu_busy) and time.monotonic() < deadline:
                self._cv.wait(0.1)
            keys = [(k, h.hold.epoch) for k, h in self._held.items() if not h.lost]
            self._held.clear()
            metrics.rows_held(0)
            if self.deps.local is not None:
                self.deps.local.clear()
        self._stopped.set()
        if self._listener is not None:
            self._listener.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)
        handed = 0
        for (batch_id, index), epoch in keys:
            if self.deps.store.release(batch_id, index, epoch):
                self.republish(batch_id, index)
                handed += 1
        if handed:
            log.warning("handed %d held rows back to the queue", handed)
        return handed
