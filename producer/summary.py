"""What a batch looks like from outside: counts, cost, rate, ETA, failures by code.

Plain data (dicts that are also the ``--json`` output), computed from the batch's
records in Redis; the CLI only renders them. ``status`` and the end of ``run`` both
use these, so a script sees the same fields whichever it reads.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from producer.runner import provider_queue, terminal_count
from worker.state import BatchStore

CHUNK = 500
FINISHED = ("done", "canceled", "failed")


def batch_state(meta: dict[str, str]) -> str:
    """The state users see: queued | running | finalizing | done | canceled | failed, and
    interrupted (the embedded default's run ended before the batch did)."""
    status = meta.get("status", "")
    if status == "done":
        return "canceled" if meta.get("canceled") else "done"
    if status == "failed":
        return "failed"
    if meta.get("interrupted_at"):
        return "interrupted"
    if status == "finalizing":
        return "finalizing"
    return "queued" if status == "submitting" else "running"


def failures_by_code(store: BatchStore, batch_id: str) -> dict[str, int]:
    """How many failed rows each error code has (rows rejected by validation included),
    most frequent first. Scans the batch's states and reads only the failed rows."""
    counts: Counter[str] = Counter()
    failed = store.indices_in_state(batch_id, "failed")
    while chunk := list(islice(failed, CHUNK)):
        for result in store.results(batch_id, chunk):
            error = (result or {}).get("error") or {}
            counts[str(error.get("code") or "unknown")] += 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def status_fields(
    batch_id: str,
    meta: dict[str, str],
    counts: dict[str, int],
    errors_by_code: dict[str, int],
    now: datetime,
) -> dict[str, Any]:
    """The status of a batch as one JSON-ready object (``bgswap status --json``).

    The rate is over the batch's life so far (until it finished, for a finished one);
    the ETA is what is left at that rate, None when finished or nothing is done yet.
    """
    total = int(meta.get("total", 0) or 0)
    done = terminal_count(counts)
    state = batch_state(meta)
    created, finished = _when(meta.get("created_at")), _when(meta.get("finished_at"))
    elapsed = ((finished or now) - created).total_seconds() if created else 0.0
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 and state not in FINISHED else None
    return {
        "batch_id": batch_id,
        "state": state,
        "counts": {**counts, "total": total},
        "cost_usd": round(float(meta.get("cost_usd", 0) or 0), 6),
        "created_at": meta.get("created_at"),
        "finished_at": meta.get("finished_at"),
        "rate_rows_per_s": round(rate, 3),
        "eta_s": None if eta is None else round(max(0.0, eta), 1),
        "errors_by_code": errors_by_code,
        "manifest_url": meta.get("manifest_url"),
        "error": meta.get("error"),
    }


def batch_fields(store: BatchStore, batch_id: str) -> dict[str, Any]:
    """One line of ``bgswap batches --json``: the status fields, without the provider
    queue (that scans every active row)."""
    meta, counts = store.meta(batch_id), store.counts(batch_id)
    codes = failures_by_code(store, batch_id) if counts["failed"] else {}
    fields = status_fields(batch_id, meta, counts, codes, datetime.now(UTC))
    if not fields["counts"]["total"]:  # still being submitted: the rows so far
        fields["counts"]["total"] = store.recorded(batch_id)
    return fields


class StatusReader:
    """Reads a batch's status again and again (``status --watch``) without rescanning
    its failures when no row failed since the last read."""

    def __init__(self, store: BatchStore, batch_id: str) -> None:
        self.store = store
        self.batch_id = batch_id
        self._failed = -1
        self._codes: dict[str, int] = {}

    def read(self, now: datetime | None = None) -> dict[str, Any]:
        meta = self.store.meta(self.batch_id)  # BatchNotFound for an unknown id
        counts = self.store.counts(self.batch_id)
        if counts["failed"] != self._failed:
            # No failed row: nothing to scan (a status read of a big batch stays cheap).
            self._codes = failures_by_code(self.store, self.batch_id) if counts["failed"] else {}
            self._failed = counts["failed"]
        fields = status_fields(self.batch_id, meta, counts, self._codes, now or datetime.now(UTC))
        active = counts["running"] + counts["queued"]
        queue = provider_queue(self.store, self.batch_id) if active else None
        fields["provider_queue"] = (
            None if queue is None else {"waiting": queue[0], "deepest_position": queue[1]}
        )
        return fields

    def follow(
        self, interval_s: float, sleep: Callable[[float], None] = time.sleep
    ) -> Iterator[dict[str, Any]]:
        """A status every ``interval_s`` until the batch is finished (the last one too)."""
        while True:
            fields = self.read()
            yield fields
            if fields["state"] in FINISHED:
                return
            sleep(interval_s)


def final_summary(store: BatchStore, batch_id: str, meta: dict[str, str]) -> dict[str, Any]:
    """The end of a run as one JSON-ready object: the status fields, where the outputs
    and the output manifest are, and the providers stopped for the batch."""
    fields = StatusReader(store, batch_id).read()
    output = meta.get("output", "").rstrip("/")
    fields["outputs"] = f"{output}/{batch_id}/" if output else None
    fields["halted_providers"] = store.halts(batch_id)
    return fields
