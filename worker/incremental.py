"""Incremental runs on the worker's side (worker/fingerprint.py says what a fingerprint is).

Before a row's first provider step -- only while nothing of it is at its provider yet, so
never after a payment -- the worker fingerprints what the producer could not (a URL or
``s3://`` source, whose bytes only the worker fetches) and looks the fingerprint up in the
output location's index: a hit finishes the row ``skipped``. The bytes it fetched for that
are kept for the provider's step, so a miss costs no second download.

After a row succeeded and its outputs were uploaded, the worker writes its index entry. A
failure to write only logs: the row is done and paid, and must not run again for that.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.fingerprint import (
    by_content,
    fingerprint,
    index_entry,
    indexable,
    references,
    skipped_record,
    staged_prefix,
)
from worker.index import FingerprintIndex
from worker.jobs import Job
from worker.providers.base import Fetcher
from worker.state import BatchStore
from worker.storage import Storage

log = logging.getLogger("bgswap.worker")

MAX_BATCHES_KEPT = 256


@dataclass(frozen=True)
class BatchIndex:
    """What a batch's rows need to know of its index: where it is, and ``--force``."""

    index: FingerprintIndex
    root: str
    force: bool


class KeptFetcher:
    """The worker's fetcher, keeping what it read for the rest of one step."""

    def __init__(self, fetch: Fetcher) -> None:
        self._fetch = fetch
        self._kept: dict[str, bytes] = {}

    def __call__(self, ref: str, field: str) -> bytes:
        data = self._kept.get(ref)
        if data is None:
            data = self._kept[ref] = self._fetch(ref, field)
        return data


@dataclass(frozen=True)
class Before:
    """What the step before the provider found: the fetcher the provider should use, the
    row's fingerprint when known, and the row's ``skipped`` record on a hit."""

    fetch: Fetcher
    fingerprint: str | None = None
    skipped: dict[str, Any] | None = None


class Incremental:
    """One per worker process (shares its storage and Redis clients)."""

    def __init__(self, store: BatchStore, storage: Storage) -> None:
        self.store = store
        self.storage = storage
        self._batches: dict[str, BatchIndex] = {}
        self._lock = threading.Lock()

    def batch(self, batch_id: str) -> BatchIndex:
        """Read once per batch and process: a batch's output and --force never change."""
        with self._lock:
            known = self._batches.get(batch_id)
        if known is None:
            meta = self.store.meta(batch_id)
            root = meta["output"]
            known = BatchIndex(FingerprintIndex(self.storage, root), root, meta.get("force") == "1")
            with self._lock:
                if len(self._batches) >= MAX_BATCHES_KEPT:
                    self._batches.clear()
                self._batches[batch_id] = known
        return known

    def before_step(
        self,
        job: Job,
        model: str,
        untouched: Callable[[], bool],
        fetch: Fetcher,
        *,
        now: str,
        keep: bool,
    ) -> Before:
        """``untouched``: nothing of the row is at its provider yet. ``keep``: the row may
        finish in a later step (a paid provider), so a fingerprint found now is saved."""
        if job.fingerprint is not None or not indexable(job.spec) or not untouched():
            return Before(fetch, job.fingerprint)
        batch = self.batch(job.batch_id)
        kept = KeptFetcher(fetch)
        fp = self._fingerprint(job, model, kept, staged_prefix(batch.root, job.batch_id))
        if not batch.force:
            entry = batch.index.lookup(fp)
            if entry is not None:
                return Before(kept, fp, skipped_record(entry, job.spec, fp, model, now))
        if keep:
            self.store.save_fingerprint(job.batch_id, job.index, fp)
        return Before(kept, fp)

    @staticmethod
    def _fingerprint(job: Job, model: str, fetch: Fetcher, staged: str) -> str:
        spec = job.spec
        source = hashlib.sha256(fetch(spec.image, "image")).hexdigest()
        extra = {
            ref: hashlib.sha256(fetch(ref, field)).hexdigest()
            for field, ref in references(spec)
            if by_content(ref, staged)
        }
        return fingerprint(spec, source, model, extra)

    def fingerprint_of(self, job: Job, before: Before) -> str | None:
        """The fingerprint of a row that just succeeded (None: not to be indexed)."""
        if not indexable(job.spec):
            return None
        return before.fingerprint or self.store.fingerprint(job.batch_id, job.index)

    def record(self, job: Job, record: dict[str, Any], fp: str | None) -> None:
        """Index a row that succeeded; a failure only logs (the row is done and paid)."""
        if fp is None:
            return
        try:
            batch = self.batch(job.batch_id)
            batch.index.record(fp, index_entry(fp, job.spec, record, job.batch_id))
        except Exception as exc:
            log.warning("row %s: not indexed (%s)", job.job_id, getattr(exc, "code", repr(exc)))
