"""Firing schedules: what the ``bgswap.tick`` task does on a worker, every tick of beat.

Each tick reads the schedule file (worker/schedules.py), and for every schedule whose
slot is due claims that slot in Redis (SET NX ``bgswap:schedule:{name}:{fire_ts}``: two
beats, or a redelivered tick, never fire one slot twice), then submits through
producer/runner.py exactly as `bgswap submit` does. A cron schedule whose previous batch
has not finished skips the slot (``skipped-overlap``); a watch schedule lists its prefix
and takes each new manifest once (SET NX per key and ETag, or path, mtime and size).
Every firing is recorded: the schedule's status hash and a short history list.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from producer import runner
from producer.batch import check_batch_id, output_root
from producer.manifest import read_manifest
from producer.summary import batch_fields
from worker.errors import redact_url
from worker.fetch import SourceFetcher, build_s3_client
from worker.providers import default_provider
from worker.schedules import (
    Schedule,
    batch_id_for,
    due,
    is_manifest_name,
    load_schedules,
    next_run,
)
from worker.settings import Settings
from worker.state import BatchStore

log = logging.getLogger("bgswap.scheduler")
PREFIX = "bgswap:schedule"
HISTORY = 200  # firings kept per schedule
CLAIM_TTL_S = 40 * 86400  # longer than any gap between two slots of a schedule
TAKEN_TTL_S = 400 * 86400  # a watched manifest taken is remembered this long
# A batch id recorded as active whose batch does not exist after this long: its
# submission died before the batch was created; it blocks nothing.
SUBMITTING_GRACE_S = 600.0
FINISHED = ("done", "failed")  # the statuses of a batch that has ended


class ScheduleLog:
    """The schedules' records in Redis: claims, takes, status, history."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def claim(self, name: str, fire_ts: int) -> bool:
        return bool(self.redis.set(f"{PREFIX}:{name}:{fire_ts}", "1", nx=True, ex=CLAIM_TTL_S))

    def take(self, name: str, identity: str) -> bool:
        key = f"{PREFIX}:{name}:taken:{identity}"
        return bool(self.redis.set(key, "1", nx=True, ex=TAKEN_TTL_S))

    @contextmanager
    def deciding(self, name: str, wait_s: float = 10.0) -> Iterator[None]:
        """Serialize one schedule's "is its previous batch still running? then this one
        is" (two slots' ticks at once, on two workers): a short lock, held for
        milliseconds, never for the submission."""
        key, token = f"{PREFIX}:{name}:deciding", uuid.uuid4().hex
        deadline = time.monotonic() + wait_s
        while not self.redis.set(key, token, nx=True, ex=30):
            if time.monotonic() > deadline:
                raise TimeoutError(f"schedule {name}: another tick held its lock for {wait_s}s")
            time.sleep(0.02)
        try:
            yield
        finally:
            if self.redis.get(key) == token:
                self.redis.delete(key)

    def status(self, name: str) -> dict[str, str]:
        status: dict[str, str] = self.redis.hgetall(f"{PREFIX}:{name}")
        return status

    def last_fire_ts(self, name: str) -> float | None:
        value = self.redis.hget(f"{PREFIX}:{name}", "last_fire_ts")
        return float(value) if value else None

    def update(self, name: str, **fields: str) -> None:
        self.redis.hset(f"{PREFIX}:{name}", mapping=fields)

    def forget(self, name: str, *fields: str) -> None:
        self.redis.hdel(f"{PREFIX}:{name}", *fields)

    def record(self, name: str, event: str, slot: datetime, **details: str) -> None:
        """One firing's outcome: ``fired``, ``skipped-overlap`` or ``failed-to-submit``."""
        at = datetime.now(UTC).isoformat(timespec="seconds")
        entry = {"event": event, "slot": slot.isoformat(), "at": at, **details}
        fields = {"last_event": event, "last_event_at": at}
        if "batch_id" in details and event != "skipped-overlap":
            fields["last_batch"] = details["batch_id"]
        if event == "skipped-overlap":
            fields["last_skip_reason"] = details.get("reason", "")
        if event == "failed-to-submit":
            fields["last_error"] = details.get("reason", "")
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(f"{PREFIX}:{name}", mapping=fields)
        pipe.lpush(f"{PREFIX}:{name}:history", json.dumps(entry))
        pipe.ltrim(f"{PREFIX}:{name}:history", 0, HISTORY - 1)
        pipe.execute()
        log.info("schedule %s: %s %s", name, event, json.dumps(details))

    def history(self, name: str, limit: int = 20) -> list[dict[str, str]]:
        raw = self.redis.lrange(f"{PREFIX}:{name}:history", 0, limit - 1)
        return [json.loads(x) for x in raw]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


def tick(
    settings: Settings, app: Any, store: BatchStore, path: str, now: datetime | None = None
) -> list[str]:
    """Fire what is due now; returns the names of the schedules that fired a slot."""
    now = now or datetime.now(UTC)
    schedules = load_schedules(path, settings.local_root_list)
    records = ScheduleLog(store.redis)
    grace = max(60.0, 4 * settings.schedule_tick_s)
    fired: list[str] = []
    for schedule in schedules:
        slot = due(schedule, now, records.last_fire_ts(schedule.name), grace)
        if slot is None or not records.claim(schedule.name, int(slot.timestamp())):
            continue
        records.update(schedule.name, last_fire_ts=str(slot.timestamp()))
        fired.append(schedule.name)
        try:
            if schedule.kind == "watch":
                check_watch(settings, app, store, records, schedule, slot)
            else:
                fire(settings, app, store, records, schedule, slot)
        except Exception as exc:  # Redis, a lock not had: recorded; the others go on
            log.exception("schedule %s: the tick failed", schedule.name)
            records.record(schedule.name, "failed-to-submit", slot, reason=one_line(exc))
    return fired


def fire(
    settings: Settings,
    app: Any,
    store: BatchStore,
    records: ScheduleLog,
    schedule: Schedule,
    slot: datetime,
) -> None:
    """One slot of a cron (or every_seconds) schedule: a new incremental batch, unless
    the previous one is still running."""
    batch_id = batch_id_for(schedule, slot)
    with records.deciding(schedule.name):
        busy = running_batch(store, records.status(schedule.name))
        if busy is None:
            records.update(schedule.name, active_batch=batch_id, active_since=str(time.time()))
    if busy is not None:
        reason = f"previous batch {busy[0]} is still {busy[1]}"
        records.record(schedule.name, "skipped-overlap", slot, batch_id=batch_id, reason=reason)
        return
    assert schedule.manifest is not None
    try:
        submit_scheduled(settings, app, store, schedule, schedule.manifest, batch_id)
    except Exception as exc:  # any reason is recorded, the tick goes on
        records.forget(schedule.name, "active_batch", "active_since")
        reason = one_line(exc)
        records.record(schedule.name, "failed-to-submit", slot, batch_id=batch_id, reason=reason)
        return
    records.record(schedule.name, "fired", slot, batch_id=batch_id)


def running_batch(store: BatchStore, status: dict[str, str]) -> tuple[str, str] | None:
    """(batch id, its state) of the schedule's previous batch while it is not finished."""
    active = status.get("active_batch")
    if not active:
        return None
    if not store.exists(active):
        since = float(status.get("active_since") or 0)
        return (active, "submitting") if time.time() - since < SUBMITTING_GRACE_S else None
    meta = store.meta(active)
    if meta.get("status") in FINISHED:
        return None
    return active, batch_fields(store, active)["state"]


def check_watch(
    settings: Settings,
    app: Any,
    store: BatchStore,
    records: ScheduleLog,
    schedule: Schedule,
    slot: datetime,
) -> None:
    """List the watched prefix; a batch for each manifest not taken before."""
    assert schedule.watch is not None
    try:
        found = list_manifests(settings, schedule.watch)
    except Exception as exc:
        records.record(schedule.name, "failed-to-submit", slot, reason=f"listing: {one_line(exc)}")
        return
    for ref, tag in found:
        identity = f"{ref}|{tag}"
        if not records.take(schedule.name, identity):
            continue
        batch_id = batch_id_for(schedule, slot, tag=identity)
        try:
            submit_scheduled(settings, app, store, schedule, ref, batch_id)
        except Exception as exc:
            records.record(schedule.name, "failed-to-submit", slot, batch_id=batch_id,
                           manifest=redact_url(ref), reason=one_line(exc))  # fmt: skip
            continue
        records.record(schedule.name, "fired", slot, batch_id=batch_id, manifest=redact_url(ref))


def list_manifests(settings: Settings, prefix: str) -> list[tuple[str, str]]:
    """The manifests (.csv, .jsonl) directly under ``prefix``, each with what tells a new
    version from the one seen: its ETag on S3, its mtime and size in a folder."""
    if prefix.startswith("s3://"):
        bucket, _, key_prefix = prefix[5:].partition("/")
        key_prefix = key_prefix.rstrip("/") + "/" if key_prefix.strip("/") else ""
        s3 = build_s3_client(
            settings,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
        )
        found: list[tuple[str, str]] = []
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=key_prefix, Delimiter="/"
        )
        for page in pages:
            for obj in page.get("Contents", []):
                if is_manifest_name(obj["Key"]):
                    found.append((f"s3://{bucket}/{obj['Key']}", obj["ETag"].strip('"')))
        return sorted(found)
    entries: list[tuple[str, str]] = []
    with os.scandir(prefix) as listing:
        for entry in listing:
            if entry.is_file(follow_symlinks=False) and is_manifest_name(entry.name):
                st = entry.stat(follow_symlinks=False)
                entries.append((entry.path, f"{st.st_mtime_ns}:{st.st_size}"))
    return sorted(entries)


@contextmanager
def local_manifest(settings: Settings, ref: str) -> Iterator[str]:
    """A local path to read the manifest from: the path itself, or an https / s3 source
    downloaded to a temp file within BGSWAP_MAX_MANIFEST_BYTES (through the address
    guard and caps of worker/fetch.py)."""
    if not ref.startswith(("https://", "s3://")):
        yield ref
        return
    capped = settings.model_copy(update={"max_source_bytes": settings.max_manifest_bytes})
    fetcher = SourceFetcher(capped)
    try:
        data = fetcher(ref, "manifest")
    finally:
        fetcher.close()
    name = Path(urlsplit(ref).path).name or "manifest"
    with tempfile.TemporaryDirectory(prefix="bgswap-schedule-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        yield str(path)


def submit_scheduled(
    settings: Settings, app: Any, store: BatchStore, schedule: Schedule, ref: str, batch_id: str
) -> None:
    """Submit one manifest as `bgswap submit` would, as batch ``batch_id``."""
    check_batch_id(batch_id)
    root = output_root(schedule.output or settings.output)
    with local_manifest(settings, ref) as path, runner.open_manifest(path, schedule.format) as m:
        defaults = runner.row_defaults(
            settings,
            provider=schedule.provider or default_provider(settings),
            prompt=schedule.prompt,
            set_items=schedule.set_items,
            base_dir=m.base_dir,
            root=root,
            batch_id=batch_id,
        )
        runner.probe_destinations(settings, root, batch_id)
        outcomes = read_manifest(m.stream, m.fmt, defaults)
        source = runner.manifest_source(path, m.fmt)
        if path != ref:  # downloaded: the temp file is gone once submitted
            source["manifest"] = ref
        source["schedule"] = schedule.name
        if schedule.callback_url:
            source["callback_url"] = schedule.callback_url
        runner.submit_manifest(
            settings, app, store, outcomes, defaults=defaults, output=root,
            batch_id=batch_id, force=schedule.force, source=source,
        )  # fmt: skip


def describe(
    settings: Settings, store: BatchStore, path: str, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Each schedule with its next run and its last batch (``bgswap schedules``)."""
    now = now or datetime.now(UTC)
    records = ScheduleLog(store.redis)
    rows: list[dict[str, Any]] = []
    for schedule in load_schedules(path, settings.local_root_list):
        status = records.status(schedule.name)
        last = status.get("last_batch")
        state = batch_fields(store, last)["state"] if last and store.exists(last) else None
        every = schedule.interval_s
        rows.append({
            "name": schedule.name,
            "kind": schedule.kind,
            "cron": schedule.cron,
            "every_s": every,
            "timezone": schedule.timezone,
            "source": schedule.watch or schedule.manifest,
            "next_run": next_run(schedule, now).isoformat(),
            "last_batch": last,
            "last_batch_state": state,
            "last_event": status.get("last_event"),
            "last_skip_reason": status.get("last_skip_reason"),
            "last_error": status.get("last_error"),
        })  # fmt: skip
    return rows
