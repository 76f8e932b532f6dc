"""The one settings object, built once at the edge from the environment.

Names follow the user-facing contract in the README; anything bgswap adds is
``BGSWAP_*`` and listed there too.
An unknown ``BGSWAP_*`` variable is an error (a typo must not silently fall back to
a default), and secrets are ``SecretStr`` so they never print.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import UsageError
from worker.ratelimit import parse_rate

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
_MB = 1 << 20


def default_memory_budget(max_pixels: int) -> int:
    """Bytes one image may take while it is worked on, when not configured: enough for
    the pixel cap's decode (16 bytes a pixel), within an eighth of this machine's (or its
    container's) memory per core, and never under 256 MB."""
    per_core = _memory_bytes() // (8 * max(1, os.cpu_count() or 1))
    return int(min(max_pixels * 16, max(256 * _MB, per_core)))


def _memory_bytes() -> int:
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            return int(text)
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BGSWAP_", extra="ignore", frozen=True, populate_by_name=True
    )

    broker_url: str | None = None
    redis_url: str | None = None
    output: str = "bgswap-output"

    runware_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("RUNWARE_API_KEY")
    )
    fal_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("FAL_KEY"))
    runware_api_url: str = Field(
        default="https://api.runware.ai/v1", validation_alias=AliasChoices("RUNWARE_API_URL")
    )
    fal_queue_url: str = Field(
        default="https://queue.fal.run", validation_alias=AliasChoices("FAL_QUEUE_URL")
    )
    fal_rest_url: str = Field(
        default="https://rest.fal.ai", validation_alias=AliasChoices("FAL_REST_URL")
    )

    # Global limits per provider account, shared by every worker (worker/limits.py).
    runware_rate: str | None = None
    fal_rate: str | None = None
    runware_max_in_flight: int | None = Field(default=100, ge=1)
    fal_max_in_flight: int | None = Field(default=40, ge=1)

    # Runware (worker/providers/runware.py; the README explains each).
    runware_delivery: Literal["async", "sync"] = "async"
    runware_output_type: Literal["URL", "base64Data", "dataURI"] = "URL"
    runware_ttl_s: int | None = Field(default=None, ge=60)
    runware_check_content: bool = False
    runware_webhook_url: str | None = None
    runware_direct_upload: bool = False
    runware_timeout_s: float = Field(default=1200.0, gt=0)
    runware_request_timeout_s: float = Field(default=30.0, gt=0)
    runware_poll_initial_s: float = Field(default=1.0, gt=0)
    runware_poll_max_s: float = Field(default=10.0, gt=0)

    # fal (worker/providers/fal.py; the README explains each).
    fal_timeout_s: float = Field(default=1200.0, gt=0)
    fal_http_timeout_s: float = Field(default=30.0, gt=0)
    # How long a submit waits for its answer: fal_client's 120 s. A slow queue answers
    # late; giving up sooner would turn a paid request into an unknown outcome.
    fal_submit_timeout_s: float = Field(default=120.0, gt=0)
    fal_poll_initial_s: float = Field(default=1.0, gt=0)
    fal_poll_max_s: float = Field(default=10.0, gt=0)
    fal_start_timeout_s: int | None = Field(default=None, gt=0)
    fal_queue_priority: Literal["normal", "low"] | None = None
    fal_resubmit_unknown: bool = False

    s3_endpoint_url: str | None = None
    # The embedded default's durable state (its Redis data); unset: the XDG state home.
    state_dir: Path | None = None
    allow_private_urls: bool = False
    # Where a manifest may read and write besides its own folder and --output: local
    # folders (os.pathsep-separated), s3://bucket/prefix destinations (comma-separated).
    local_roots: str | None = None
    output_prefixes: str | None = None
    # The largest manifest field (and line) the reader takes; a bigger one is a row error.
    max_field_bytes: int = Field(default=1 << 20, ge=1024)

    # Source downloads: a cap so one bad URL cannot fill a worker's memory.
    max_source_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    fetch_connect_timeout_s: float = Field(default=10.0, gt=0)
    fetch_read_timeout_s: float = Field(default=30.0, gt=0)
    fetch_total_timeout_s: float = Field(default=60.0, gt=0)
    max_redirects: int = Field(default=5, ge=0)
    # Pillow refuses images above this many pixels (decompression bombs).
    max_image_pixels: int = Field(default=64_000_000, gt=0)
    # Memory one image may take while it is decoded and worked on; unset: derived from
    # the pixel cap and this machine's memory per core (worker/imaging.py).
    max_image_memory_mb: int | None = Field(default=None, ge=16)

    upload_timeout_s: float = Field(default=60.0, gt=0)
    presign_expires_s: int = Field(default=900, ge=60, le=604_800)

    max_attempts: int = Field(default=5, ge=1)
    max_deliveries: int = Field(default=10, ge=1)
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_cap_s: float = Field(default=60.0, gt=0)

    # Step threads per worker process (worker/engine.py). A thread is busy for one step
    # (a submit, a poll, a download and upload: a few network round trips), never for a
    # provider's whole wait, so a few threads keep hundreds of requests in flight. The
    # local provider's steps are computation: they run one per core, on threads of their
    # own (engine.py), whatever this is.
    worker_concurrency: int = Field(default=8, ge=1)
    # Rows one worker process holds at most (running, waiting on their provider, or
    # waiting for a rate token or slot). It takes more only while a step thread is idle.
    worker_max_rows: int = Field(default=1000, ge=1)
    # A held row's lease: a worker process that dies (its heartbeat stops) has its rows
    # taken over by another process's watchdog within this plus the watchdog interval.
    row_lease_s: float = Field(default=60.0, ge=3)
    visibility_timeout_s: int = Field(default=150, ge=10)
    # `bgswap serve`: bearer tokens as `scope:sha256hex` entries (comma-separated; the
    # tokens themselves are never stored), and the limits of one request.
    api_tokens: str | None = None
    api_max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    api_max_rows: int = Field(default=10_000, ge=1)
    api_rate: str | None = "20/s"

    # Schedules (worker/schedules.py, producer/scheduler.py): the schedule file that
    # `celery -A worker beat` fires, how often beat sends its tick, and the largest
    # manifest a schedule downloads (https / s3 sources, into a temp file).
    schedules: Path | None = None
    schedule_tick_s: float = Field(default=15.0, ge=1)
    max_manifest_bytes: int = Field(default=256 * _MB, gt=0)
    # Webhooks in (producer/hooks.py) and completion callbacks out (worker/callbacks.py).
    shopify_webhook_secret: SecretStr | None = None
    shopify_mapping: str | None = None  # a TOML file's path, or inline JSON
    hook_secret: SecretStr | None = None
    callback_secret: SecretStr | None = None
    callback_timeout_s: float = Field(default=10.0, gt=0, le=30)
    callback_retry_base_s: float = Field(default=10.0, gt=0)
    callback_retry_cap_s: float = Field(default=3600.0, gt=0)
    callback_deadline_s: float = Field(default=86_400.0, gt=0)
    # Completion webhooks from the providers (worker/completions.py): where `bgswap serve`
    # is reachable from the internet, and the secret its per-row URLs are signed with.
    # Both set: every paid row asks its provider to call back when it is done.
    public_url: str | None = None
    provider_webhook_secret: SecretStr | None = None

    # Operations (deploy/README.md): Prometheus metrics on this port (workers and the
    # API, each process's own listener; unset: none), the address it binds, and the
    # log format (``text`` for a terminal, ``json`` for one object a line).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    log_format: Literal["text", "json"] = "text"

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL, not {value!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must have no query, fragment or credentials")
        return value.rstrip("/")

    @property
    def completion_webhooks(self) -> bool:
        """Do paid rows ask their provider for a completion webhook?"""
        return self.public_url is not None and self.provider_webhook_secret is not None

    @field_validator("output_prefixes")
    @classmethod
    def _prefixes(cls, value: str | None) -> str | None:
        for prefix in (value or "").split(","):
            if prefix.strip() and not re.fullmatch(
                r"s3://[A-Za-z0-9][A-Za-z0-9._-]*(/.*)?", prefix.strip()
            ):
                raise ValueError(f"{prefix.strip()!r} is not an s3://bucket/prefix")
        return value

    @property
    def image_memory_budget(self) -> int:
        """Bytes one image may take (BGSWAP_MAX_IMAGE_MEMORY_MB, or the derived default)."""
        if self.max_image_memory_mb is not None:
            return self.max_image_memory_mb << 20
        return default_memory_budget(self.max_image_pixels)

    @property
    def local_root_list(self) -> list[Path]:
        return [Path(p).expanduser() for p in (self.local_roots or "").split(os.pathsep) if p]

    @property
    def output_prefix_list(self) -> list[str]:
        return [p.strip().rstrip("/") for p in (self.output_prefixes or "").split(",") if p.strip()]

    @field_validator("api_tokens")
    @classmethod
    def _tokens(cls, value: str | None) -> str | None:
        for entry in (value or "").split(","):
            if entry.strip() and not re.fullmatch(r"(read|write):[0-9a-fA-F]{64}", entry.strip()):
                raise ValueError(
                    "expected scope:sha256hex entries, the scope read or write and the "
                    "sha256 of the token in 64 hex digits, separated by commas"
                )
        return value

    @property
    def api_token_list(self) -> list[tuple[str, str]]:
        """(scope, sha256 hex in lower case) of every configured API token."""
        entries = [e.strip() for e in (self.api_tokens or "").split(",") if e.strip()]
        return [(scope, digest.lower()) for scope, _, digest in (e.partition(":") for e in entries)]

    @field_validator("runware_rate", "fal_rate", "api_rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value:
            parse_rate(value)  # ValueError names the accepted forms
        return value or None

    @property
    def row_grace_s(self) -> float:
        """How long a queued row may go unseen, with the broker's queue empty, before the
        watchdog re-enqueues it: after the broker's own restore of unacked messages (held
        by a dead worker) had its turn."""
        return self.visibility_timeout_s + 15.0

    @property
    def shutdown_wait_s(self) -> float:
        """How long a warm shutdown lets the steps under way finish before it hands their
        rows back: the slowest single request a step makes (a fal submit waits for its
        answer up to BGSWAP_FAL_SUBMIT_TIMEOUT_S, 120 s), plus slack. Cutting a paid
        submit short would leave its row's outcome unknown (deploy/README.md sizes
        Kubernetes' terminationGracePeriodSeconds from this)."""
        slowest = max(
            self.fal_submit_timeout_s,
            self.runware_request_timeout_s,
            min(self.runware_timeout_s, 60.0),  # a sync Runware submit waits up to 60 s
            self.upload_timeout_s,
            self.fetch_total_timeout_s,
        )
        return slowest + 10.0

    @property
    def watchdog_interval_s(self) -> float:
        return min(10.0, self.row_lease_s / 3)

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or DEFAULT_BROKER_URL

    @property
    def effective_redis_url(self) -> str:
        """Batch state lives in Redis: BGSWAP_REDIS_URL, else the broker when it is Redis."""
        if self.redis_url:
            return self.redis_url
        broker = self.effective_broker_url
        scheme = urlsplit(broker).scheme
        if scheme in ("redis", "rediss"):
            return broker
        if scheme == "redis+socket":
            return "unix://" + broker.removeprefix("redis+socket://")
        raise UsageError(
            f"BGSWAP_REDIS_URL is required when the broker is not Redis ({scheme}://...)"
        )


_KNOWN = {f"BGSWAP_{name.upper()}" for name in Settings.model_fields}


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus overrides; unknown BGSWAP_* is an error."""
    unknown = sorted(k for k in os.environ if k.startswith("BGSWAP_") and k not in _KNOWN)
    if unknown:
        raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise UsageError(describe_setting_error(exc.errors()[0])) from None


def env_variable(field: str) -> str:
    """The environment variable a settings field is read from."""
    info = Settings.model_fields.get(field)
    if info is None:  # pydantic names an aliased field by its alias
        return field.upper()
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"BGSWAP_{field.upper()}"


def describe_setting_error(error: Mapping[str, Any]) -> str:
    """One line naming the variable, the value given and what it should be."""
    loc = error.get("loc") or ()
    field = str(loc[0]) if loc else "?"
    variable = env_variable(field)
    value = error.get("input")
    if "KEY" in variable or "SECRET" in variable or not isinstance(value, str | int | float):
        shown = ""  # a key never reaches a message; a missing or composite value says nothing
    else:
        shown = f"={str(value)[:100]!r}"
    reason = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"bad setting {variable}{shown}: {reason[:1].lower()}{reason[1:]}"


@cache
def get_settings() -> Settings:
    return load_settings()
