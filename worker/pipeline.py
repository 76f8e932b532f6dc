"""The plain, typed core of a job: everything a Celery task does, without Celery.

``handle_delivery`` is what one delivery of a row's message does:

    start (Redis: queued -> running, attempts + 1; a terminal row is skipped)
      -> process_item: provider.step(job): a submit or one poll
           -> done: upload every output (presigned PUT)
              -> finish (Redis: running -> succeeded | failed, once) -> finalize when last
           -> Wait / Deferred: back to queued (not an attempt), countdown returned

and it returns the countdown of the next delivery, or None when the row is terminal.
Each live row also carries a due-by time for the watchdog (worker/watchdog.py).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.errors import (
    BgswapError,
    Codes,
    PermanentError,
    ProviderAccountError,
    RowCanceled,
)
from worker.jobs import Job
from worker.limits import Deferred, ProviderLimits, RowLimits
from worker.policy import retry_delay
from worker.providers import get_provider
from worker.providers.base import Fetcher, Provider, ProviderContext, ProviderResult, Wait
from worker.report import MANIFEST_CONTENT_TYPE, MANIFEST_NAME, spool_manifest
from worker.settings import Settings
from worker.state import BatchStore, FinishVerdict, StartVerdict
from worker.storage import Storage, output_destination

log = logging.getLogger("bgswap.worker")


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
    # A provider's global limits (worker/limits.py), None for free providers.
    limits: Callable[[str], ProviderLimits | None] = lambda name: None
    _providers: dict[str, Provider] = field(default_factory=dict)

    def provider(self, name: str) -> Provider:
        if name not in self._providers:
            self._providers[name] = get_provider(name, self.settings)
        return self._providers[name]


@dataclass(frozen=True)
class RowMemory:
    """The provider's memory of one row, in Redis (see worker/providers/base.py: Memory)."""

    store: BatchStore
    batch_id: str
    index: int

    def load(self) -> dict[str, Any]:
        return self.store.provider_memory(self.batch_id, self.index) or {}

    def save(self, memory: dict[str, Any]) -> None:
        self.store.save_provider_memory(self.batch_id, self.index, memory)


def process_item(job: Job, deps: Deps) -> dict[str, Any] | Wait:
    """One step of the provider; when it is done, store every output and return the
    row's success record, else how long the row should wait."""
    provider = deps.provider(job.spec.provider)
    halted = deps.store.halted(job.batch_id, provider.name)
    if halted is not None:
        # One clear failure per row, and not one more paid request.
        raise PermanentError(Codes.PROVIDER_HALTED, f"{provider.name} stopped: {halted}")
    limits = deps.limits(provider.name)
    ctx = ProviderContext(
        fetch=deps.fetch,
        max_image_pixels=deps.settings.max_image_pixels,
        memory=RowMemory(deps.store, job.batch_id, job.index),
        storage=deps.storage,
        canceled=lambda: deps.store.is_canceled(job.batch_id),
        limits=RowLimits(limits, job.job_id) if limits else None,
    )
    try:
        outcome = provider.step(job, ctx)
    except ProviderAccountError as err:
        deps.store.halt(job.batch_id, provider.name, err.message)
        if limits is not None and err.code != Codes.PROVIDER_HALTED:
            limits.trip(err.message)  # every batch on this account stops too
        raise
    if isinstance(outcome, Wait):
        return outcome
    return {
        "status": "succeeded",
        "provider": provider.name,
        "model": provider.model,
        "prompt": job.spec.prompt,
        "outputs": store_outputs(job, outcome, deps.storage),
        "cost_usd": outcome.cost_usd,
        "provider_task_id": outcome.provider_task_id,
        "error": None,
    }


def store_outputs(job: Job, result: ProviderResult, storage: Storage) -> list[dict[str, Any]]:
    count = len(result.outputs)
    stored = []
    for n, image in enumerate(result.outputs, start=1):
        obj = image.stored
        if obj is None:
            dest = output_destination(job.dest, image.extension, n, count)
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


def handle_delivery(batch_id: str, index: int, deps: Deps) -> float | None:
    """Process one delivery of a row's message; returns a retry countdown or None."""
    store = deps.store
    started = store.start(batch_id, index, deps.now())
    if started.verdict is StartVerdict.ALREADY_TERMINAL:
        log.info("row %s:%d already terminal, delivery ignored", batch_id, index)
        store.forget(batch_id, index)
        return None
    grace = deps.settings.row_grace_s
    store.expect(batch_id, index, grace, time.time())  # a worker dying mid-step: the backstop
    delay = _deliver(batch_id, index, deps, started.attempts)
    if delay is not None:
        store.expect(batch_id, index, delay + grace, time.time())
    return delay


def _deliver(batch_id: str, index: int, deps: Deps, attempts: int) -> float | None:
    store = deps.store
    raw = store.job(batch_id, index)
    if raw is None:
        raise LookupError(f"{batch_id} row {index} has no job record")
    job = Job.model_validate_json(raw)
    if attempts > deps.settings.max_deliveries:
        err = PermanentError(
            Codes.JOB_TOO_MANY_DELIVERIES,
            f"delivered {attempts} times without finishing (worker crashes?)",
        )
        _finish(job, deps, _failure(job, err))
        return None
    return _run(job, deps, attempts)


def _run(job: Job, deps: Deps, attempt: int) -> float | None:
    try:
        record = process_item(job, deps)
    except RowCanceled as err:
        _finish(job, deps, {**_failure(job, err), "status": "canceled"})
        return None
    except BgswapError as err:
        return _on_error(job, deps, err, attempt)
    except Exception as exc:  # a bug must fail its row, not loop or kill the batch
        log.error("row %s internal error: %s", job.job_id, type(exc).__name__)
        log.debug("internal error detail", exc_info=True)
        internal = PermanentError(Codes.JOB_INTERNAL, f"internal error ({type(exc).__name__})")
        _finish(job, deps, _failure(job, internal))
        return None
    if isinstance(record, Wait):
        # The provider is working: the row waits in the queue, not in a thread. A wait
        # is not an attempt, and the countdown stays far below the visibility timeout.
        deps.store.defer(job.batch_id, job.index)
        return min(record.seconds, deps.settings.visibility_timeout_s / 2)
    _finish(job, deps, record)
    return None


def _on_error(job: Job, deps: Deps, err: BgswapError, attempt: int) -> float | None:
    s = deps.settings
    if isinstance(err, Deferred):
        # Waiting for a rate token or a slot is not an attempt: nothing was tried.
        deps.store.defer(job.batch_id, job.index)
        wait = (err.retry_after_s or 1.0) * (1.0 + 0.2 * deps.rand())  # spread the herd
        return min(wait, s.visibility_timeout_s / 2)
    delay = retry_delay(
        err,
        attempt,
        max_attempts=s.max_attempts,
        base_s=s.retry_base_s,
        cap_s=s.retry_cap_s,
        max_countdown_s=s.visibility_timeout_s / 2,
        rand=deps.rand,
    )
    if delay is not None:
        log.warning("row %s: %s; retry %d in %.1fs", job.job_id, err.code, attempt, delay)
        deps.store.release(job.batch_id, job.index)
        return delay
    if err.retryable:
        err = PermanentError(
            Codes.JOB_RETRIES_EXHAUSTED, f"gave up after {attempt} attempts: {err.message}"
        )
    _finish(job, deps, _failure(job, err))
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


def _finish(job: Job, deps: Deps, record: dict[str, Any]) -> None:
    limits = deps.limits(job.spec.provider)
    if limits is not None:
        limits.release(job.job_id)  # terminal: its in-flight slot is free
    record["started_at"] = deps.store.started_at(job.batch_id, job.index)
    record["finished_at"] = deps.now()
    verdict = deps.store.finish(
        job.batch_id, job.index, record["status"], record, cost_usd=record.get("cost_usd", 0.0)
    )
    deps.store.forget(job.batch_id, job.index)
    error = record.get("error")
    log.info("row %s %s%s", job.job_id, record["status"], f" ({error['code']})" if error else "")
    if verdict is FinishVerdict.BATCH_COMPLETE:
        deps.on_batch_complete(job.batch_id)


def manifest_destination(output_root: str, batch_id: str) -> str:
    return f"{output_root.rstrip('/')}/{batch_id}/{MANIFEST_NAME}"


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
    log.info("batch %s done: manifest at %s", batch_id, obj.url)
    return obj.url
