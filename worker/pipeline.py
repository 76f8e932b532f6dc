"""The plain, typed core of a job: everything a Celery task does, without Celery.

A row's life in a worker process (worker/engine.py runs it):

    begin (Redis: queued -> running, attempts + 1, a lease for this process and the
           row's new epoch, its fencing token: worker/hold.py; a terminal row, or one
           another live process holds, is skipped)
      -> advance, as often as needed: process_item: provider.step(job): a submit or a poll
           -> done: check the hold, upload every output (presigned PUT)
              -> finish (Redis: running -> succeeded | failed, once, if the epoch is
                 still the row's; the lease ends)
                 -> finalize when it was the last row
           -> Later(wait | retry | admission): step again after that long

``handle_delivery`` is the same, one step per delivery through the queue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import redis

from worker import callbacks, completions, metrics
from worker.errors import (
    BgswapError,
    Codes,
    PermanentError,
    ProviderAccountError,
    RowCanceled,
)
from worker.hold import Hold, HoldLost, Stale
from worker.incremental import Incremental
from worker.jobs import Job, JobSpec
from worker.limits import Deferred, ProviderLimits, RowLimits
from worker.policy import retry_delay
from worker.providers import get_provider
from worker.providers.base import Fetcher, Provider, ProviderContext, ProviderResult, Wait
from worker.providers.timing import GenerationTimes
from worker.report import MANIFEST_CONTENT_TYPE, MANIFEST_NAME, spool_manifest
from worker.settings import Settings
from worker.state import BatchStore, FinishVerdict, SaveVerdict, StartVerdict
from worker.storage import Storage, output_destination

log = logging.getLogger("bgswap.worker")

MAX_RETRY_AFTER_S = 600.0


def utcnow_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Deps:
    """Resources scoped to one worker process (one HTTP client, one S3 client, ...)."""

    settings: Settings
    store: BatchStore
    fetch: Fetcher
    storage: Storage
    on_batch_complete: Callable[[str], None]
    rand: Callable[[], float]
    now: Callable[[], str] = utcnow_iso
    clock: Callable[[], float] = time.monotonic  # for holds and the engine's timers
    # This process's name on the rows it holds (state.py: leases).
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The rows held by this process's engine (worker/engine.py sets it); None: no engine.
    local: LocalRows | None = None
    flags: BatchFlags = field(init=False)
    image_budget: int = field(init=False)
    incremental: Incremental = field(init=False)
    timings: GenerationTimes = field(init=False)

    def __post_init__(self) -> None:
        self.flags = BatchFlags(self.store)
        self.incremental = Incremental(self.store, self.storage)
        self.timings = GenerationTimes(self.store.redis)
        self.image_budget = self.settings.image_memory_budget  # reads /sys once

    # A provider's global limits (worker/limits.py), None for free providers.
    limits: Callable[[str], ProviderLimits | None] = lambda name: None
    _providers: dict[str, Provider] = field(default_factory=dict)

    def provider(self, name: str) -> Provider:
        if name not in self._providers:
            self._providers[name] = get_provider(name, self.settings)
        return self._providers[name]


class RowMemory:
    """The provider's memory of one row, in Redis (see worker/providers/base.py: Memory),
    written only under this process's hold.

    Every save names the hold's epoch and the text it is based on (what this process last
    loaded or saved): Redis refuses it once the row changed hands, or when the stored
    memory is not what this process saw, and ``Stale`` ends the step. So a decision made
    on an out-of-date copy -- a task id to submit under, "nothing submitted yet" -- never
    reaches Redis, let alone the provider: a paid request goes out only after its intent
    was saved this way. The hold's clock is checked first (``Unsure``: re-check).

    With a ``cache`` (the engine's: a row it holds is its alone, under a lease) a load after
    the first is served from this process; the save above is what proves it still right."""

    def __init__(self, store: BatchStore, hold: Hold, cache: LocalRows | None = None) -> None:
        self.store = store
        self.hold = hold
        self.cache = cache
        self._key = (hold.batch_id, hold.index)
        self._raw: str | None = None  # the stored text this process last saw

    def _seen(self) -> str:
        if self._raw is None:
            cached = self.cache.memory.get(self._key) if self.cache is not None else None
            if cached is None:
                cached = self.store.raw_provider_memory(*self._key)
                if self.cache is not None:
                    self.cache.memory[self._key] = cached
            self._raw = cached
        return self._raw

    def load(self) -> dict[str, Any]:
        raw = self._seen()
        loaded: dict[str, Any] = json.loads(raw) if raw else {}
        return loaded

    def save(self, memory: dict[str, Any]) -> None:
        hold = self.hold
        hold.guard()
        raw = json.dumps(memory)
        sent_at = hold.clock()
        try:
            verdict = self.store.save_provider_memory(
                *self._key, raw, epoch=hold.epoch, based_on=self._seen(), lease_s=hold.lease_s
            )
        except redis.RedisError:
            # Saved or not, nobody knows (a timeout may have run late): read it afresh.
            self._raw = None
            if self.cache is not None:
                self.cache.drop(self._key)
            raise
        if verdict is not SaveVerdict.SAVED:
            if self.cache is not None:
                self.cache.drop(self._key)
            raise Stale(f"row {self._key[0]}:{self._key[1]}: memory not saved ({verdict})")
        hold.renewed(sent_at)  # the save pushed the lease on
        self._raw = raw
        if self.cache is not None:
            self.cache.memory[self._key] = raw


@dataclass
class LocalRows:
    """What a process knows of the rows its engine holds, so as not to ask Redis again:
    under a lease a held row is this process's alone. Filled when a row is taken (the
    adopt script returns it all), dropped when the row is let go. ``memory`` is the
    provider's memory as stored ('' for none)."""

    memory: dict[tuple[str, int], str] = field(default_factory=dict)
    started_at: dict[tuple[str, int], str] = field(default_factory=dict)

    def untouched(self, key: tuple[str, int]) -> bool:
        """Nothing of the row is at its provider yet (no memory at all)."""
        return self.memory.get(key) in ("", "{}")

    def drop(self, key: tuple[str, int]) -> None:
        self.memory.pop(key, None)
        self.started_at.pop(key, None)

    def clear(self) -> None:
        self.memory.clear()
        self.started_at.clear()


@dataclass
class BatchFlags:
    """A batch's halts and cancel flag, read from Redis at most every ``ttl_s`` per
    process: checked at every step, they change about never, and a second's delay in
    noticing a cancel or another process's halt costs nothing (each provider also stops
    at its account's circuit, and this process's own halts count at once)."""

    store: BatchStore
    ttl_s: float = 1.0
    _seen: dict[str, tuple[float, dict[str, str], bool]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _get(self, batch_id: str, fresh: bool = False) -> tuple[dict[str, str], bool]:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(batch_id)
        if fresh or seen is None or now - seen[0] > self.ttl_s:
            seen = (now, self.store.halts(batch_id), self.store.is_canceled(batch_id))
            with self._lock:
                self._seen[batch_id] = seen
        return seen[1], seen[2]

    def halted(self, batch_id: str, provider: str) -> str | None:
        return self._get(batch_id)[0].get(provider)

    def canceled(self, batch_id: str, *, fresh: bool = False) -> bool:
        return self._get(batch_id, fresh)[1]

    def halt(self, batch_id: str, provider: str, reason: str) -> None:
        self.store.halt(batch_id, provider, reason)
        with self._lock:
            self._seen.pop(batch_id, None)


def process_item(job: Job, deps: Deps, hold: Hold) -> dict[str, Any] | Wait | Deferred:
    """One step of the provider; when it is done, store every output and return the
    row's success record, else how long the row should wait. A row whose work is in the
    output location's index already returns its ``skipped`` record instead."""
    provider = deps.provider(job.spec.provider)
    memory = RowMemory(deps.store, hold, deps.local)
    before = deps.incremental.before_step(
        job, provider.model, lambda: not memory.load(), deps.fetch,
        now=deps.now(), keep=not provider.cpu_bound,
    )  # fmt: skip
    if before.skipped is not None:
        return before.skipped
    halted = deps.flags.halted(job.batch_id, provider.name)
    if halted is not None:
        # One clear failure per row, and not one more paid request.
        raise PermanentError(Codes.PROVIDER_HALTED, f"{provider.name} stopped: {halted}")
    limits = deps.limits(provider.name)
    ctx = ProviderContext(
        fetch=before.fetch,
        max_image_pixels=deps.settings.max_image_pixels,
        image_budget=deps.image_budget,
        memory=memory,
        storage=deps.storage,
        canceled=lambda: deps.flags.canceled(job.batch_id),
        limits=RowLimits(limits, job.job_id) if limits else None,
        guard=hold.guard,
        expected=deps.timings.expected(provider.name, job.spec.rendering_speed),
        generated=lambda seen, estimate: _generated(deps, provider.name, job.spec, seen, estimate),
        webhook=completions.webhook_url(deps.settings, provider.name, job.batch_id, job.index),
    )
    try:
        outcome = provider.step(job, ctx)
    except ProviderAccountError as err:
        deps.flags.halt(job.batch_id, provider.name, err.message)
        if limits is not None and err.code != Codes.PROVIDER_HALTED:
            limits.trip(err.message)  # every batch on this account stops too
        raise
    if isinstance(outcome, Wait | Deferred):
        return outcome
    hold.guard()
    sent_at = hold.clock()
    if not deps.store.renew(job.batch_id, job.index, hold.epoch, hold.lease_s):
        # Another process has the row now: its results are that process's to write.
        raise Stale(f"row {job.job_id}: taken over before its results were stored")
    hold.renewed(sent_at)
    fp = deps.incremental.fingerprint_of(job, before)
    record = {
        "status": "succeeded",
        "provider": provider.name,
        "model": provider.model,
        "prompt": job.spec.prompt,
        "outputs": store_outputs(job, outcome, deps.storage, hold.guard),
        "cost_usd": outcome.cost_usd,
        "provider_task_id": outcome.provider_task_id,
        "error": None,
        "fingerprint": fp,
    }
    # Before the terminal record: the index is complete once the batch is done.
    deps.incremental.record(job, record, fp)
    return record


def _generated(deps: Deps, provider: str, spec: JobSpec, seen: float, estimate: float) -> None:
    metrics.generation_took(provider, seen)
    try:
        deps.timings.record(provider, spec.rendering_speed, estimate)
    except Exception as exc:  # only the poll schedule's learning misses one
        log.warning("generation time not recorded: %s", type(exc).__name__)


def store_outputs(
    job: Job, result: ProviderResult, storage: Storage, guard: Callable[[], None]
) -> list[dict[str, Any]]:
    """Upload each result; ``guard`` runs right before each upload (worker/hold.py)."""
    count = len(result.outputs)
    stored = []
    for n, image in enumerate(result.outputs, start=1):
        obj = image.stored
        if obj is None:
            dest = output_destination(job.dest, image.extension, n, count)
            guard()
            obj = storage.put(dest, image.data, image.content_type)
        stored.append(
            {
                "url": obj.url,
                "key": obj.key,
                "content_type": obj.content_type,
                "bytes": obj.bytes,
                # unknown when the provider uploaded the result itself
                "sha256": hashlib.sha256(image.data).hexdigest() if image.data else None,
                "width": image.width,
                "height": image.height,
                "seed": image.seed,
                "nsfw": image.nsfw,
            }
        )
    return stored


@dataclass(frozen=True)
class Later:
    """The row is not done: step it again in ``seconds``.

    ``wait``: the provider is working (not an attempt); ``retry``: a retryable error (the
    next step is a new attempt); ``admission``: no rate token or in-flight slot yet for
    the row's provider (nothing was tried, not an attempt)."""

    seconds: float
    kind: Literal["wait", "retry", "admission"]
    watch: str | None = None  # a wait's: what its next step polls (providers/base.py: Wait)
    then_s: float | None = None  # a wait's: the pace of the gathered polls after the next


@dataclass(frozen=True)
class Begun:
    """A row this process took: its job, which attempt this is, and the hold."""

    job: Job
    attempt: int
    hold: Hold


def begin(batch_id: str, index: int, deps: Deps) -> Begun | None:
    """Take the row for this process (a lease in Redis and the row's new epoch), or None
    when there is nothing to do (terminal, held by another live process, or failed here
    for coming back too often)."""
    store = deps.store
    lease_s = deps.settings.row_lease_s
    sent_at = deps.clock()
    started = store.adopt(batch_id, index, deps.now(), deps.token, lease_s)
    if started.verdict is StartVerdict.ALREADY_TERMINAL:
        log.info("row %s:%d already terminal, delivery ignored", batch_id, index)
        return None
    if started.verdict is StartVerdict.HELD:
        log.info("row %s:%d is held by another worker, delivery ignored", batch_id, index)
        return None
    if started.job is None:
        raise LookupError(f"{batch_id} row {index} has no job record")
    job = Job.model_validate_json(started.job)
    hold = Hold(batch_id, index, started.epoch, lease_s, sent_at, deps.clock)
    if deps.local is not None:
        key = (batch_id, index)
        deps.local.memory[key] = started.memory
        if started.started_at:
            deps.local.started_at[key] = started.started_at
    if started.attempts > deps.settings.max_deliveries:
        err = PermanentError(
            Codes.JOB_TOO_MANY_DELIVERIES,
            f"delivered {started.attempts} times without finishing (worker crashes?)",
        )
        _finish(job, deps, _failure(job, err), hold)
        return None
    return Begun(job, started.attempts, hold)


def advance(job: Job, deps: Deps, attempt: int, hold: Hold) -> Later | None:
    """One step of a held row: its terminal state is recorded (None), or it goes on later.

    Raises ``HoldLost`` (worker/hold.py) when this process may not act on the row, and
    Redis's errors: a Redis that did not answer is no fault of the row's."""
    try:
        record = process_item(job, deps, hold)
    except (HoldLost, redis.RedisError):
        raise  # not the row's doing: the engine steps it again (worker/engine.py)
    except RowCanceled as err:
        _finish(job, deps, {**_failure(job, err), "status": "canceled"}, hold)
        return None
    except BgswapError as err:
        return _on_error(job, deps, err, attempt, hold)
    except Exception as exc:  # a bug must fail its row, not loop or kill the batch
        log.error("row %s internal error: %s", job.job_id, type(exc).__name__)
        log.debug("internal error detail", exc_info=True)
        internal = PermanentError(Codes.JOB_INTERNAL, f"internal error ({type(exc).__name__})")
        _finish(job, deps, _failure(job, internal), hold)
        return None
    if isinstance(record, Wait):
        return Later(record.seconds, "wait", record.watch, record.then_s)
    if isinstance(record, Deferred):
        return admission(record, deps.rand)
    _finish(job, deps, record, hold)
    return None


def handle_delivery(batch_id: str, index: int, deps: Deps) -> float | None:
    """One delivery through the queue: take the row, one step, and give it back to the
    queue when it is not done. Returns the countdown of its next delivery, or None.

    Workers do not run rows this way (worker/engine.py holds a row between its steps);
    this single-step form drives rows one step at a time in tests and tools."""
    begun = begin(batch_id, index, deps)
    if begun is None:
        return None
    try:
        later = advance(begun.job, deps, begun.attempt, begun.hold)
    except HoldLost:
        return None  # another process has the row, or its lease lapses: its message comes back
    if later is None:
        return None
    deps.store.release(batch_id, index, begun.hold.epoch)
    if later.kind != "retry":
        deps.store.uncount_attempt(batch_id, index)
    return min(later.seconds, deps.settings.visibility_timeout_s / 2)


def admission(deferred: Deferred, rand: Callable[[], float]) -> Later:
    """Waiting for a rate token or a slot is not an attempt: nothing was tried. A token's
    time is exact (a late probe wastes it); a slot's is a guess: spread the herd."""
    wait = deferred.wait_s or 1.0
    if not deferred.exact:
        wait *= 1.0 + 0.2 * rand()
    return Later(wait, "admission")


def _on_error(job: Job, deps: Deps, err: BgswapError, attempt: int, hold: Hold) -> Later | None:
    s = deps.settings
    delay = retry_delay(
        err,
        attempt,
        max_attempts=s.max_attempts,
        base_s=s.retry_base_s,
        cap_s=s.retry_cap_s,
        # A held row may wait out a long Retry-After: the engine keeps it, no message does.
        max_countdown_s=max(s.retry_cap_s, MAX_RETRY_AFTER_S),
        rand=deps.rand,
    )
    if delay is not None:
        log.warning("row %s: %s; retry %d in %.1fs", job.job_id, err.code, attempt, delay)
        return Later(delay, "retry")
    if deps.flags.canceled(job.batch_id, fresh=True):
        # The provider failed it because `bgswap cancel` canceled its request (fal answers
        # a canceled request with an error): the row was canceled, not failed.
        _finish(job, deps, {**_failure(job, RowCanceled()), "status": "canceled"}, hold)
        return None
    if err.retryable:
        err = PermanentError(
            Codes.JOB_RETRIES_EXHAUSTED, f"gave up after {attempt} attempts: {err.message}"
        )
    _finish(job, deps, _failure(job, err), hold)
    return None


def _failure(job: Job, err: BgswapError) -> dict[str, Any]:
    return {
        "status": "failed",
        "provider": job.spec.provider,
        "prompt": job.spec.prompt,
        "outputs": [],
        "cost_usd": 0.0,
        "error": err.to_dict(),
    }


def _finish(job: Job, deps: Deps, record: dict[str, Any], hold: Hold) -> None:
    """Record the row's terminal state as its holder (``Stale`` if it is not any more),
    enqueue the finalizer if this completed the batch, and free its in-flight slot.

    Once the state is recorded, nothing may undo the step: a row stepped again would find
    itself terminal and could never enqueue the finalizer. So the two duties after it only
    log when they fail: the slot's lease runs out by itself, and the watchdog enqueues the
    finalizer of a batch left finalizing (worker/watchdog.py)."""
    key = (job.batch_id, job.index)
    known = deps.local.started_at.get(key) if deps.local is not None else None
    record["started_at"] = known or deps.store.started_at(job.batch_id, job.index)
    record["finished_at"] = deps.now()
    verdict = deps.store.finish(
        job.batch_id, job.index, record["status"], record,
        cost_usd=record.get("cost_usd", 0.0), epoch=hold.epoch,
    )  # fmt: skip
    if deps.local is not None:
        deps.local.drop(key)
    if verdict is FinishVerdict.STALE:
        raise Stale(f"row {job.job_id}: taken over before its {record['status']} was recorded")
    error = record.get("error")
    metrics.row_finished(record)
    log.info("row %s %s%s", job.job_id, record["status"], f" ({error['code']})" if error else "")
    if verdict is FinishVerdict.BATCH_COMPLETE:
        try:
            deps.on_batch_complete(job.batch_id)
        except Exception as exc:  # the broker away: the watchdog enqueues it later
            log.warning("batch %s: finalizer not enqueued (%s)", job.batch_id, type(exc).__name__)
    limits = deps.limits(job.spec.provider)
    if limits is not None:
        try:
            limits.release(job.job_id)  # terminal: its in-flight slot is free
        except Exception as exc:  # its lease frees it soon enough
            log.warning("row %s: slot not released (%s)", job.job_id, type(exc).__name__)


def manifest_destination(output_root: str, batch_id: str) -> str:
    return f"{output_root.rstrip('/')}/{batch_id}/{MANIFEST_NAME}"


def fail_batch(batch_id: str, deps: Deps, reason: str) -> None:
    """The batch cannot end well (its output manifest cannot be written): it ends
    ``failed`` with the reason, so that nobody waits for it for ever."""
    deps.store.set_meta(batch_id, status="failed", error=reason, finished_at=deps.now())
    deps.store.retire(batch_id)
    log.error("batch %s failed: %s", batch_id, reason)
    callbacks.owe(deps.store, batch_id)  # its callback_url, if any: worker/callbacks.py


def finalize(batch_id: str, deps: Deps) -> str | None:
    """Write the batch's output manifest (idempotent); returns where it went."""
    meta = deps.store.meta(batch_id)
    if meta.get("status") not in ("finalizing", "done"):
        return None
    path = spool_manifest(deps.store, batch_id)
    try:
        obj = deps.storage.put_file(
            manifest_destination(meta["output"], batch_id), path, MANIFEST_CONTENT_TYPE
        )
    finally:
        path.unlink(missing_ok=True)
    deps.store.set_meta(batch_id, status="done", manifest_url=obj.url, finished_at=deps.now())
    deps.store.retire(batch_id)
    log.info("batch %s done: manifest at %s", batch_id, obj.url)
    callbacks.owe(deps.store, batch_id)  # completed or canceled: worker/callbacks.py
    return obj.url
