"""Submitting a manifest as a batch: validate each row, record it, enqueue one job per row.

Rows stream through: a chunk is recorded in Redis and then published, so workers
start while the producer is still reading, and memory does not grow with the file.
A rejected row is recorded as terminal (`failed`, with its error) so it still gets
its line in the output manifest; so is a row whose work is already at the output
location (`skipped`, producer/skips.py), which is neither staged nor published.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from producer.manifest import RowDefaults, RowOutcome
from producer.skips import Decision, Skipper
from producer.staging import Unstageable
from producer.validation import KNOWN_COLUMNS
from worker import metrics
from worker.errors import FieldError, UsageError
from worker.fingerprint import skipped_record
from worker.jobs import Job, JobSpec, safe_id
from worker.providers.base import Provider
from worker.state import BatchStore

CHUNK = 500

Publish = Callable[[Sequence[tuple[str, str, int]]], None]
"""Publish ``(job id, batch id, row index)`` messages."""
Stage = Callable[[JobSpec, str], JobSpec]
"""Make a row's local files reachable by remote workers; returns the updated spec."""


_BATCH_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_batch_id(batch_id: str) -> str:
    """A batch id becomes a folder or key prefix and part of every job id: 1-64 of
    ``A-Z a-z 0-9 . _ -``, and not ``.`` or ``..`` (no way out of ``--output``)."""
    if not _BATCH_ID.fullmatch(batch_id) or batch_id in (".", ".."):
        raise UsageError(
            f"batch id {batch_id[:40]!r}: use 1-64 of the characters A-Z a-z 0-9 . _ - "
            "(and not . or ..)"
        )
    return batch_id


def new_batch_id(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def output_root(output: str) -> str:
    """`s3://bucket/prefix` stays; a local directory becomes absolute (workers' cwd differs)."""
    if output.startswith("s3://"):
        return output.rstrip("/")
    if "://" in output:
        raise UsageError(f"--output must be s3://bucket/prefix or a local directory: {output}")
    return str(Path(output).expanduser().resolve())


@dataclass(frozen=True)
class SubmitOptions:
    batch_id: str
    output: str  # from output_root()
    defaults: RowDefaults
    force: bool = False  # run every row, skip none (workers read it from the batch's meta)
    # Where the manifest came from (its path and sha256), so the batch can be resumed.
    source: dict[str, str] = field(default_factory=dict)
    # Continue a batch whose submission was interrupted: rows below this index are
    # recorded already (the batch exists).
    resume_from: int | None = None
    # POSTed a signed event when the batch ends (worker/callbacks.py), kept in its meta.
    callback_url: str | None = None


@dataclass
class SubmitReport:
    batch_id: str
    total: int = 0
    valid: int = 0
    rejected: int = 0
    skipped: int = 0  # valid rows whose work is already in the output location's index
    estimated_cost_usd: float = 0.0
    complete: bool = False  # every row was already terminal when sealed
    errors: list[FieldError] = field(default_factory=list)


def row_destination(spec: JobSpec, root: str, batch_id: str) -> str:
    return spec.output or f"{root}/{batch_id}/{safe_id(spec.id)}"


def rejected_record(outcome: RowOutcome, defaults: RowDefaults) -> tuple[str, dict[str, Any]]:
    """The job record and terminal result of a row that failed validation."""
    raw = outcome.raw
    record = {
        "rejected": True,
        "line": outcome.line,
        "id": outcome.row_id,
        "image": raw.get("image"),
        "prompt": raw.get("prompt") or defaults.prompt,
        "provider": raw.get("provider") or defaults.provider,
        "meta": {k: v for k, v in raw.items() if k not in KNOWN_COLUMNS},
    }
    message = "; ".join(str(e) for e in outcome.errors)
    result: dict[str, Any] = {
        "status": "failed",
        "provider": record["provider"],
        "outputs": [],
        "cost_usd": 0.0,
        "error": {"code": outcome.errors[0].code, "message": message, "retryable": False},
    }
    return json.dumps(record), result


def chunks(outcomes: Iterable[RowOutcome], size: int = CHUNK) -> Iterator[list[RowOutcome]]:
    chunk: list[RowOutcome] = []
    for outcome in outcomes:
        chunk.append(outcome)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def decisions(chunk: Sequence[RowOutcome], skipper: Skipper | None) -> list[Decision | None]:
    """The producer's skip decision for each row of a chunk (None: rejected rows, rows it
    cannot tell, or no index to look in)."""
    if skipper is None:
        return [None] * len(chunk)
    found = iter(skipper.decide([o.spec for o in chunk if o.spec is not None]))
    return [next(found) if o.spec is not None else None for o in chunk]


def estimate(
    outcomes: Iterable[RowOutcome],
    providers: Callable[[str], Provider],
    skipper: Skipper | None = None,
) -> SubmitReport:
    """Dry run: count valid/rejected/skipped rows, collect errors, sum the estimated cost
    of the rows that would run (a row found in ``skipper``'s index costs nothing)."""
    report = SubmitReport(batch_id="")
    for chunk in chunks(outcomes):
        for outcome, decision in zip(chunk, decisions(chunk, skipper), strict=True):
            report.total += 1
            if outcome.spec is None:
                report.rejected += 1
                report.errors.extend(outcome.errors)
                continue
            report.valid += 1
            if decision is not None and decision.entry is not None:
                report.skipped += 1
            else:
                provider = providers(outcome.spec.provider)
                report.estimated_cost_usd += provider.estimate_cost(outcome.spec)
    return report


def _job(outcome: RowOutcome, spec: JobSpec, options: SubmitOptions, fp: str | None) -> Job:
    bid = options.batch_id
    dest = row_destination(spec, options.output, bid)
    return Job(batch_id=bid, index=outcome.index, line=outcome.line, spec=spec, dest=dest,
               fingerprint=fp)  # fmt: skip


class Submitter:
    def __init__(
        self,
        store: BatchStore,
        publish: Publish,
        providers: Callable[[str], Provider],
        stage: Stage | None = None,
        skipper: Skipper | None = None,
    ) -> None:
        self.store = store
        self.publish = publish
        self.providers = providers
        self.stage = stage
        self.skipper = skipper

    def submit(
        self,
        outcomes: Iterable[RowOutcome],
        options: SubmitOptions,
        on_row: Callable[[RowOutcome], None] | None = None,
    ) -> SubmitReport:
        """Record and enqueue every row of ``outcomes`` (from ``read_manifest``)."""
        bid = check_batch_id(options.batch_id)
        if options.resume_from is None:
            self._create(bid, options)
        skip = options.resume_from or 0
        report = SubmitReport(batch_id=bid)

        def reported(rows: Iterable[RowOutcome]) -> Iterator[RowOutcome]:
            for outcome in rows:
                if outcome.index < skip:
                    report.total += 1  # recorded before the interruption
                    continue
                if on_row is not None:
                    on_row(outcome)
                yield outcome

        skipper = None if options.force else self.skipper
        for chunk in chunks(reported(outcomes)):
            self._flush(chunk, options, report, skipper)
        report.complete = self.store.seal(bid, report.total)
        return report

    def _create(self, bid: str, options: SubmitOptions) -> None:
        meta = {
            **options.source,
            "provider": options.defaults.provider,
            "output": options.output,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "options": json.dumps(
                {"prompt": options.defaults.prompt, "set": dict(options.defaults.values)}
            ),
        }
        if options.force:
            meta["force"] = "1"
        if options.callback_url:
            meta["callback_url"] = options.callback_url
        if not self.store.create(bid, meta, datetime.now(UTC).timestamp()):
            raise UsageError(f"batch {bid} already exists: choose another --batch-id")

    def _flush(
        self,
        chunk: list[RowOutcome],
        options: SubmitOptions,
        report: SubmitReport,
        skipper: Skipper | None,
    ) -> None:
        bid = options.batch_id
        rows: list[tuple[int, str, str, str | None]] = []
        messages: list[tuple[str, str, int]] = []
        for outcome, decision in zip(chunk, decisions(chunk, skipper), strict=True):
            report.total += 1
            if decision is not None and decision.entry is not None and outcome.spec is not None:
                # Its work is done already: terminal now, nothing staged, published or paid.
                report.valid += 1
                report.skipped += 1
                rows.append(self._skipped(outcome, outcome.spec, decision, options))
                continue
            staged = self._staged(outcome, bid)
            if staged.spec is None:
                report.rejected += 1
                report.errors.extend(staged.errors)
                job_json, result = rejected_record(staged, options.defaults)
                rows.append((staged.index, job_json, "failed", json.dumps(result)))
                continue
            spec = staged.spec
            job = _job(staged, spec, options, decision.fingerprint if decision else None)
            report.valid += 1
            report.estimated_cost_usd += self.providers(spec.provider).estimate_cost(spec)
            rows.append((staged.index, job.model_dump_json(), "queued", None))
            messages.append((job.job_id, bid, staged.index))
        if rows:
            # Record before publishing: a worker must always find its job record.
            self.store.add_rows(bid, rows)
            for *_, done in rows:
                if done is not None:  # terminal here: skipped, or refused at the door
                    metrics.row_finished(json.loads(done))
        if messages:
            self.publish(messages)

    def _skipped(
        self, outcome: RowOutcome, spec: JobSpec, decision: Decision, options: SubmitOptions
    ) -> tuple[int, str, str, str]:
        assert decision.entry is not None
        job = _job(outcome, spec, options, decision.fingerprint)
        model = self.providers(spec.provider).model
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        result = skipped_record(decision.entry, spec, decision.fingerprint, model, now)
        return (outcome.index, job.model_dump_json(), "skipped", json.dumps(result))

    def _staged(self, outcome: RowOutcome, batch_id: str) -> RowOutcome:
        """The row with its local files staged, or refused for a file that cannot be."""
        if outcome.spec is None or self.stage is None:
            return outcome
        try:
            return replace(outcome, spec=self.stage(outcome.spec, batch_id))
        except Unstageable as exc:
            error = FieldError(outcome.line, exc.column, exc.error.code, exc.error.message)
            return replace(outcome, spec=None, errors=(error,))
