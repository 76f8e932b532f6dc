"""Producer-side plumbing behind the CLI: open a manifest, submit it, wait for it."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3

from producer.batch import (
    SubmitOptions,
    SubmitReport,
    Submitter,
    new_batch_id,
    output_root,
)
from producer.manifest import (
    Format,
    RowDefaults,
    RowOutcome,
    detect_format,
    parse_set_options,
)
from producer.preflight import check_provider
from producer.publish import celery_publisher
from producer.skips import Skipper
from producer.staging import Stager, needs_staging
from worker.errors import (
    BgswapError,
    ManifestUnreadable,
    RowCanceled,
    Unreachable,
    UsageError,
    redact_url,
)
from worker.index import FingerprintIndex
from worker.jobs import TASK_FINALIZE_BATCH, finalize_task_id
from worker.providers import available, get_provider, missing_key
from worker.providers.base import Provider
from worker.settings import Settings
from worker.state import TERMINAL_STATES, BatchStore
from worker.storage import Storage

SNIFF_BYTES = 64 * 1024
log = logging.getLogger("bgswap.producer")


@dataclass(frozen=True)
class ManifestInput:
    stream: BinaryIO
    fmt: Format
    size: int | None  # bytes, when known (a file), for the progress bar
    base_dir: Path


@contextmanager
def open_manifest(path: str, explicit_format: str | None) -> Iterator[ManifestInput]:
    """Open a manifest file or ``-`` (stdin) and detect its format from name and head."""
    if path == "-":
        stream = cast(io.BufferedReader, sys.stdin.buffer)
        size, base_dir, name = None, Path.cwd(), "-"
    else:
        file = Path(path)
        if not file.is_file():
            raise ManifestUnreadable(_not_a_file(path))
        try:
            stream = file.open("rb")
        except OSError as exc:  # permissions, mostly: one line, not a traceback
            raise ManifestUnreadable(f"{path}: {exc.strerror or exc}") from None
        size, base_dir, name = file.stat().st_size, file.resolve().parent, file.name
    try:
        # peek() does not consume: the reader starts again at byte 0.
        fmt = detect_format(name, stream.peek(SNIFF_BYTES)[:SNIFF_BYTES], explicit_format)
        yield ManifestInput(stream=stream, fmt=fmt, size=size, base_dir=base_dir)
    finally:
        if path != "-":
            stream.close()


def _not_a_file(path: str) -> str:
    file = Path(path)
    if file.is_dir():
        return f"{path} is a directory: give a manifest file (.csv or .jsonl) or - for stdin"
    if file.exists():
        return f"{path} is not a regular file: give a manifest file (.csv or .jsonl) or -"
    return f"{path}: no such file"


def row_defaults(
    settings: Settings,
    *,
    provider: str,
    prompt: str | None,
    set_items: Sequence[str],
    base_dir: Path,
    root: str,
    batch_id: str,
) -> RowDefaults:
    """The defaults of every row, and where rows may read (the manifest's folder, the
    folders of files given with --set, BGSWAP_LOCAL_ROOTS) and write (``root``: the
    --output, and BGSWAP_OUTPUT_PREFIXES). A provider named for every row must be usable
    here: the command fails once rather than every row alike."""
    values = parse_set_options(set_items)
    provider = check_provider(settings, provider, "--provider")
    if "provider" in values:
        values["provider"] = check_provider(settings, values["provider"], "--set provider")
    set_files = [v for k, v in values.items() if k in ("background", "style_reference_images")]
    set_dirs = [Path(p).parent for v in set_files for p in v.split("|") if Path(p).is_absolute()]
    prefixes = [root] if root.startswith("s3://") else []
    return RowDefaults(
        prompt=prompt,
        values=values,
        provider=provider,
        available_providers=frozenset(available()),
        missing_keys={n: v for n in available() if (v := missing_key(n, settings)) is not None},
        base_dir=base_dir,
        allow_private_urls=settings.allow_private_urls,
        local_roots=(base_dir, *settings.local_root_list, *set_dirs),
        output_prefixes=(*prefixes, *settings.output_prefix_list),
        destination_root=f"{root}/{batch_id}",
        max_field_bytes=settings.max_field_bytes,
        s3_credentials=aws_credentials_available,
    )


@cache
def aws_credentials_available() -> bool:
    """Does boto3's chain find credentials here? Asked once, and only when a row names
    s3:// (the chain may ask an instance's metadata service)."""
    return boto3.session.Session().get_credentials() is not None


def probe_destinations(settings: Settings, root: str, batch_id: str) -> None:
    """Write and delete a small object where this batch will write (its folder under
    --output, and every BGSWAP_OUTPUT_PREFIXES entry): a destination that refuses fails
    the command now (exit 2), one that does not answer too (exit 3), naming it and why,
    before anything is enqueued."""
    storage = Storage(settings)
    try:
        for dest in (f"{root}/{batch_id}", *settings.output_prefix_list):
            try:
                storage.probe(dest)
            except BgswapError as exc:
                message = f"cannot write to {redact_url(dest)}: {exc.message}"
                raise (Unreachable if exc.retryable else UsageError)(message) from None
    finally:
        storage.close()


def provider_cache(settings: Settings) -> Callable[[str], Provider]:
    cache: dict[str, Provider] = {}

    def get(name: str) -> Provider:
        if name not in cache:
            cache[name] = get_provider(name, settings)
        return cache[name]

    return get


def enqueue_finalize(app: Any, batch_id: str) -> None:
    app.send_task(TASK_FINALIZE_BATCH, args=(batch_id,), task_id=finalize_task_id(batch_id))


def skipper_for(
    settings: Settings,
    root: str,
    *,
    force: bool = False,
    storage: Storage | None = None,
    providers: Callable[[str], Provider] | None = None,
) -> Skipper | None:
    """What looks rows up in the index under ``root`` (an output root); None with
    ``force``, or when nothing was ever indexed there (one listing: a first run pays no
    lookups)."""
    if force:
        return None
    index = FingerprintIndex(storage or Storage(settings), root)
    if not index.present():
        return None
    return Skipper(index, providers or provider_cache(settings), settings.max_source_bytes)


def submit_manifest(
    settings: Settings,
    app: Any,
    store: BatchStore,
    outcomes: Iterable[RowOutcome],
    *,
    defaults: RowDefaults,
    output: str,
    batch_id: str | None,
    on_row: Callable[[RowOutcome], None] | None = None,
    force: bool = False,
    source: dict[str, str] | None = None,
    resume_from: int | None = None,
    callback_url: str | None = None,
) -> SubmitReport:
    root = output_root(output)
    storage = Storage(settings)
    providers = provider_cache(settings)
    stage = Stager(storage, root, settings) if needs_staging(root) else None
    skipper = skipper_for(settings, root, force=force, storage=storage, providers=providers)
    submitter = Submitter(store, celery_publisher(app), providers, stage, skipper)
    options = SubmitOptions(
        batch_id=batch_id or new_batch_id(),
        output=root,
        defaults=defaults,
        force=force,
        source=source or {},
        resume_from=resume_from,
        callback_url=callback_url,
    )
    try:
        report = submitter.submit(outcomes, options, on_row=on_row)
    finally:
        storage.close()
    if report.complete:
        enqueue_finalize(app, report.batch_id)
    return report


def file_sha256(path: str) -> str | None:
    """The manifest's digest (None for stdin): a resumed batch must read the same file."""
    if path == "-":
        return None
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_source(path: str, fmt: Format) -> dict[str, str]:
    """What a batch records of its manifest, to read the rest of it on resume."""
    if path == "-":
        return {"manifest": "-", "format": fmt}
    return {
        "manifest": str(Path(path).resolve()),
        "manifest_sha256": file_sha256(path) or "",
        "format": fmt,
    }


def republish_queued(app: Any, store: BatchStore, batch_id: str) -> int:
    """Messages for every queued row of the batch (a resumed batch's queue was emptied;
    where one still waits, the row's adopt takes only one of the two)."""
    stamp = int(time.time())
    messages = [
        (f"{batch_id}:{index}:resume-{stamp}", batch_id, index)
        for index in store.indices_in_state(batch_id, "queued")
    ]
    celery_publisher(app)(messages)
    return len(messages)


def write_partial_manifest(settings: Settings, store: BatchStore, batch_id: str) -> str:
    """The output manifest as it stands (rows not yet terminal: ``pending``), where the
    final one will go; returns its URL."""
    from worker.pipeline import manifest_destination  # noqa: PLC0415 - worker code, lazily
    from worker.report import MANIFEST_CONTENT_TYPE, spool_manifest  # noqa: PLC0415

    meta = store.meta(batch_id)
    path = spool_manifest(store, batch_id)
    storage = Storage(settings)
    try:
        dest = manifest_destination(meta["output"], batch_id)
        return storage.put_file(dest, path, MANIFEST_CONTENT_TYPE).url
    finally:
        path.unlink(missing_ok=True)
        storage.close()


def finalize_here(settings: Settings, batch_id: str) -> None:
    """Write a complete batch's output manifest in this process (the embedded default
    with no worker running: `bgswap cancel` of an interrupted batch)."""
    from worker import runtime  # noqa: PLC0415 - worker code, lazily
    from worker.pipeline import finalize  # noqa: PLC0415

    runtime.configure(settings)
    finalize(batch_id, runtime.get_deps())


def active_memories(store: BatchStore, batch_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The provider memory of every row not yet terminal: running, or queued between two
    steps while its provider works (scans the batch: O(rows))."""
    active = set(store.indices_in_state(batch_id, "running"))
    active |= set(store.indices_in_state(batch_id, "queued"))
    for index, memory in store.provider_memories(batch_id):
        if index in active:
            yield index, memory


def provider_queue(store: BatchStore, batch_id: str) -> tuple[int, int] | None:
    """(rows waiting in a provider's queue, the deepest queue position), if any wait.
    The rows' states are scanned only when some provider memory says it waits."""
    waiting = {
        index: int(m["queue_position"])
        for index, m in store.provider_memories(batch_id)
        if m.get("state") == "IN_QUEUE" and isinstance(m.get("queue_position"), int)
    }
    if not waiting:
        return None
    active = set(store.indices_in_state(batch_id, "running"))
    active |= set(store.indices_in_state(batch_id, "queued"))
    positions = [position for index, position in waiting.items() if index in active]
    return (len(positions), max(positions)) if positions else None


def cancel_in_flight(settings: Settings, store: BatchStore, batch_id: str) -> int:
    """Cancel the in-flight provider requests of a batch, where the provider has a cancel."""
    providers = provider_cache(settings)
    canceled = 0
    for index, memory in active_memories(store, batch_id):
        job = json.loads(store.job(batch_id, index) or "{}")
        provider = providers(job.get("spec", {}).get("provider", "local"))
        cancel = getattr(provider, "cancel", None)
        try:
            canceled += bool(cancel is not None and cancel(memory))
        except BgswapError as exc:  # one failed cancel must not stop the others
            log.warning("row %d: cancel failed: %s", index, exc.code)
    return canceled


@dataclass(frozen=True)
class CancelOutcome:
    canceled: int  # queued rows now canceled
    in_flight: int  # provider requests canceled
    complete: bool  # the batch has every row terminal now: its manifest is due


def cancel_batch(
    settings: Settings,
    store: BatchStore,
    batch_id: str,
    *,
    take_back: bool = False,
    reason: str = "canceled by `bgswap cancel`",
) -> CancelOutcome:
    """Stop the rest of a batch: the batch is marked canceled (workers polling a provider
    see it and stop), in-flight provider requests are canceled where the provider can,
    queued rows end ``canceled``. ``take_back``: this process owns an embedded server no
    worker runs on, so rows an ended run held go back to queued first. The caller
    finalizes a batch that is ``complete`` (here, or through a worker)."""
    store.meta(batch_id)  # BatchNotFound for an unknown id
    store.set_meta(batch_id, canceled="1")
    if take_back:
        store.take_back(batch_id)
    in_flight = cancel_in_flight(settings, store, batch_id)
    n, complete = 0, False
    canceled = RowCanceled(reason)
    for index in list(store.indices_in_state(batch_id, "queued")):
        result = {
            "status": "canceled", "outputs": [], "cost_usd": 0.0, "error": canceled.to_dict()
        }  # fmt: skip
        verdict = store.finish(batch_id, index, "canceled", result, allowed_from=("queued",))
        n += verdict.value != "terminal"
        complete = complete or verdict.value == "complete"
    return CancelOutcome(canceled=n, in_flight=in_flight, complete=complete)


def requeue_failed(store: BatchStore, batch_id: str) -> list[int]:
    """Put the failed rows of a batch back to queued (not those rejected by validation);
    returns their indices. The caller publishes them (``publish_retries``) or runs them."""
    total = int(store.meta(batch_id).get("total", 0))  # BatchNotFound for an unknown id
    return [
        rec.index
        for rec in store.records(batch_id, total)
        if rec.state == "failed"
        and not rec.job.get("rejected")
        and store.requeue_failed(batch_id, rec.index)
    ]


def publish_retries(app: Any, batch_id: str, indices: Sequence[int]) -> None:
    """Messages for the rows ``requeue_failed`` put back."""
    stamp = int(time.time())
    messages = [(f"{batch_id}:{i}:retry-{stamp}", batch_id, i) for i in indices]
    celery_publisher(app)(messages)


def terminal_count(counts: dict[str, int]) -> int:
    return sum(counts[s] for s in TERMINAL_STATES)


def wait_for_batch(
    store: BatchStore,
    batch_id: str,
    on_progress: Callable[[dict[str, int], int], None],
    poll_s: float = 0.25,
    timeout_s: float | None = None,
) -> dict[str, str]:
    """Block until the batch's output manifest is written; returns the batch meta."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        meta = store.meta(batch_id)
        on_progress(store.counts(batch_id), int(meta.get("total", 0)))
        if meta.get("status") in ("done", "failed"):
            return meta
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} not done after {timeout_s:.0f}s")
        time.sleep(poll_s)
