"""Schedules (pure policy): the schedule file, its validation, and when each one fires.

The file is TOML (``BGSWAP_SCHEDULES``), one ``[[schedule]]`` table per schedule. A
schedule is a cron expression (5 fields, in its own IANA time zone, DST-correct through
cronsim), a short interval (``every_seconds``: for tests and short intervals), or a
watched prefix (``watch`` with ``every_minutes`` or ``every_seconds``). Nothing here
touches Redis or the network: ``producer/scheduler.py`` does the firing.
"""

from __future__ import annotations

import hashlib
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker.errors import UsageError

TASK_TICK = "bgswap.tick"  # the beat entry and task that fire the schedules
Kind = Literal["cron", "every", "watch"]
MANIFEST_SUFFIXES = (".csv", ".jsonl")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$"


class Schedule(BaseModel):
    """One schedule of the file (README: "Nightly schedules")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    cron: str | None = None
    every_seconds: int | None = Field(default=None, ge=1)
    watch: str | None = None
    every_minutes: int | None = Field(default=None, ge=1)
    timezone: str = "UTC"
    manifest: str | None = None
    format: Literal["csv", "jsonl"] | None = None
    output: str | None = None
    provider: str | None = None
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    prompt: str | None = None
    callback_url: str | None = None
    force: bool = False

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            if len(value.split()) != 5:
                raise ValueError(f"{value!r} is not a 5-field cron expression")
            try:
                CronSim(value, datetime.now(UTC))
            except CronSimError as exc:
                raise ValueError(f"{value!r} is not a cron expression: {exc}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (Europe/Berlin, UTC)") from None
        return value

    @field_validator("manifest", "watch")
    @classmethod
    def _source(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        context = info.context or {}
        return check_source(
            value,
            base_dir=context.get("base_dir", Path.cwd()),
            roots=context.get("roots", ()),
            folder=info.field_name == "watch",
        )

    @field_validator("output")
    @classmethod
    def _output(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or "://" in value:
            return value  # s3://, or refused by the submission like --output
        base_dir = (info.context or {}).get("base_dir", Path.cwd())
        return str((base_dir / Path(value).expanduser()).resolve())

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _trigger(self) -> Schedule:
        if self.watch is not None:
            if self.manifest is not None or self.cron is not None:
                raise ValueError("a watch schedule has no manifest or cron")
            if (self.every_minutes is None) == (self.every_seconds is None):
                raise ValueError("a watch schedule needs one of every_minutes, every_seconds")
            return self
        if self.every_minutes is not None:
            raise ValueError("every_minutes is for watch schedules (use cron)")
        if (self.cron is None) == (self.every_seconds is None):
            raise ValueError("give one of cron, every_seconds (or watch)")
        if self.manifest is None:
            raise ValueError("manifest is required")
        return self

    @property
    def kind(self) -> Kind:
        if self.watch is not None:
            return "watch"
        return "cron" if self.cron is not None else "every"

    @property
    def interval_s(self) -> int | None:
        """The fixed interval of an ``every_*`` schedule (None for cron)."""
        if self.every_seconds is not None:
            return self.every_seconds
        return None if self.every_minutes is None else self.every_minutes * 60

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def set_items(self) -> list[str]:
        """``options`` as ``--set NAME=VALUE`` items."""
        return [f"{k}={_text(v)}" for k, v in self.options.items()]


def _text(value: str | int | float | bool) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_source(value: str, *, base_dir: Path, roots: Any, folder: bool) -> str:
    """An ``s3://bucket/key`` (a prefix for a watch), an https URL (not for a watch), or
    a local path under one of ``roots`` (BGSWAP_LOCAL_ROOTS), made absolute."""
    if value.startswith("s3://"):
        bucket, _, key = value[5:].partition("/")
        if not bucket or (not key and not folder):
            raise ValueError(f"{value!r} is not an s3://bucket/key")
        return value
    if value.startswith("https://") and not folder:
        return value
    if "://" in value:
        allowed = "an s3:// prefix or a local folder" if folder else "s3://, https:// or a path"
        raise ValueError(f"{value!r}: not {allowed}")
    path = (base_dir / Path(value).expanduser()).resolve()
    resolved = [Path(r).resolve() for r in roots]
    if not any(path == r or path.is_relative_to(r) for r in resolved):
        shown = ":".join(str(r) for r in resolved) or "unset"
        raise ValueError(f"{path} is not under BGSWAP_LOCAL_ROOTS ({shown})")
    return str(path)


def parse_schedules(text: str, *, base_dir: Path, roots: Any, where: str) -> list[Schedule]:
    """The schedules of a file's text; UsageError naming the schedule and the field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where}: not TOML: {exc}") from None
    unknown = sorted(set(data) - {"schedule"})
    if unknown:
        raise UsageError(f"{where}: unknown table {unknown[0]!r} (schedules are [[schedule]])")
    tables = data.get("schedule", [])
    if not isinstance(tables, list):
        raise UsageError(f"{where}: schedules are [[schedule]] tables")
    schedules: list[Schedule] = []
    for n, table in enumerate(tables, 1):
        label = repr(table.get("name")) if isinstance(table.get("name"), str) else f"#{n}"
        try:
            schedule = Schedule.model_validate(
                table, context={"base_dir": base_dir, "roots": tuple(roots)}
            )
        except ValidationError as exc:
            raise UsageError(f"{where}: schedule {label}, {_describe(exc)}") from None
        if any(s.name == schedule.name for s in schedules):
            raise UsageError(f"{where}: schedule {label}: the name is used twice")
        schedules.append(schedule)
    return schedules


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = [str(p) for p in error.get("loc", ())]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if not loc:
        return message
    if error.get("type") == "extra_forbidden":
        return f"field {loc[0]!r}: unknown field"
    return f"field {loc[0]!r}: {message}"


def load_schedules(path: str | Path, roots: Any) -> list[Schedule]:
    """Read and validate the schedule file; relative paths are from its folder."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path} (BGSWAP_SCHEDULES): {exc.strerror or exc}") from None
    return parse_schedules(text, base_dir=file.resolve().parent, roots=roots, where=str(path))


# --- when: every time is an aware datetime; slots are compared as UTC timestamps -------


def last_slot(schedule: Schedule, now: datetime) -> datetime:
    """The latest fire time at or before ``now``."""
    interval = schedule.interval_s
    if interval is not None:
        ts = int(now.timestamp()) // interval * interval
        return datetime.fromtimestamp(ts, UTC)
    assert schedule.cron is not None
    # cronsim's reverse iteration is strictly before its start: start just after now.
    start = now.astimezone(schedule.zone).replace(microsecond=0) + timedelta(seconds=1)
    moment: datetime = next(CronSim(schedule.cron, start, reverse=True))
    return moment.astimezone(UTC)


def next_run(schedule: Schedule, now: datetime) -> datetime:
    """The first fire time after ``now``, in the schedule's time zone."""
    interval = schedule.interval_s
    if interval is not None:
        ts = (int(now.timestamp()) // interval + 1) * interval
        return datetime.fromtimestamp(ts, schedule.zone)
    assert schedule.cron is not None
    start = now.astimezone(schedule.zone).replace(microsecond=0)
    moment: datetime = next(CronSim(schedule.cron, start))
    return moment.astimezone(schedule.zone)


def due(
    schedule: Schedule, now: datetime, last_fire_ts: float | None, grace_s: float
) -> datetime | None:
    """The slot to fire now, if any: the latest one at or before ``now`` that was not
    fired yet. After a downtime only that one fires (never a backlog); a schedule never
    fired before fires a slot only within ``grace_s`` of it (a nightly schedule added at
    noon waits for the night)."""
    slot = last_slot(schedule, now)
    if last_fire_ts is not None:
        return slot if slot.timestamp() > last_fire_ts else None
    return slot if (now - slot).total_seconds() <= grace_s else None


def batch_id_for(schedule: Schedule, slot: datetime, tag: str | None = None) -> str:
    """``{name}-{YYYYmmdd-HHMM}`` in the schedule's zone (seconds too when it fires more
    often than once a minute; a watched manifest's short hash after it)."""
    local = slot.astimezone(schedule.zone)
    interval = schedule.interval_s
    stamp = local.strftime("%Y%m%d-%H%M%S" if interval and interval % 60 else "%Y%m%d-%H%M")
    suffix = f"-{hashlib.sha256(tag.encode()).hexdigest()[:8]}" if tag else ""
    return f"{schedule.name}-{stamp}{suffix}"


def is_manifest_name(key: str) -> bool:
    return key.lower().endswith(MANIFEST_SUFFIXES)
