"""`bgswap serve`: the HTTP API over the same code as the CLI (FastAPI, JSON).

Every ``/v1/batches`` call needs ``Authorization: Bearer <token>``; the server knows only
the sha256 of each token (``BGSWAP_API_TOKENS``), compared in constant time. A batch is
made the way ``bgswap submit`` makes one: rows given inline become JSON Lines read by
``read_manifest``, so every rule of a manifest applies as it is.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import math
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer import health, preflight, runner
from producer.batch import check_batch_id, estimate, new_batch_id, output_root
from producer.hooks import completions_router, hooks_router
from producer.infra import INFRA_ERRORS
from producer.manifest import RowDefaults, RowOutcome, detect_format, read_manifest
from producer.summary import StatusReader, batch_fields
from producer.validation import is_private_host
from worker import metrics
from worker.errors import (
    BgswapError,
    Codes,
    FieldError,
    ManifestUnreadable,
    Unreachable,
    UsageError,
)
from worker.fetch import SourceFetcher
from worker.netguard import is_public_address
from worker.providers import default_provider
from worker.ratelimit import parse_rate
from worker.ratelimit.backends.redis import RedisRateLimiter
from worker.report import FIELDS, csv_cells
from worker.report import manifest_lines as report_lines
from worker.settings import Settings
from worker.state import BatchNotFound, BatchStore

IDEMPOTENCY_TTL_S = 24 * 3600
log = logging.getLogger("bgswap.api")
IDEMPOTENCY_WAIT_S = 10.0
FORMATS = {"text/csv": "csv", "application/x-ndjson": "jsonl", "application/jsonl": "jsonl"}


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


OptionValue = str | int | float | bool


class BatchFields(BaseModel):
    """What a batch is made with, besides its rows (a JSON body, or query parameters)."""

    model_config = ConfigDict(extra="forbid")

    output: str | None = Field(None, description="s3://bucket/prefix or a local directory")
    provider: str | None = Field(None, description="runware | fal | local")
    prompt: str | None = Field(None, description="default prompt template")
    options: dict[str, OptionValue] = Field(
        default_factory=dict, description="a default for any option column (as --set)"
    )
    callback_url: str | None = None
    batch_id: str | None = None
    strict: bool = False
    force: bool = False


class BatchRequest(BatchFields):
    rows: list[dict[str, Any]] | None = Field(None, description="manifest rows")
    manifest_url: str | None = Field(None, description="https:// or s3:// manifest")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route may give, for the OpenAPI schema."""
    return {status: {"model": ErrorBody, "description": _REASONS[status]} for status in statuses}


_REASONS = {
    400: "bad request (an unreadable manifest, an unknown cursor)",
    401: "no token, or an unknown one",
    403: "the token lacks the scope (write)",
    404: "no such batch",
    409: "the batch id is taken, or the Idempotency-Key was used with another request",
    413: "the body or its rows are over the limit",
    415: "a content type other than JSON, CSV or JSON Lines",
    422: "invalid request or manifest (strict)",
    429: "the token's request rate is spent (Retry-After)",
    503: "Redis does not answer",
}
READ_ERRORS = _errors(401, 403, 404, 422, 429, 503)
WRITE_ERRORS = _errors(400, 401, 403, 404, 409, 413, 415, 422, 429, 503)


@dataclass(frozen=True)
class Caller:
    token: str  # the sha256 hex of the caller's token
    scope: str


@dataclass
class Api:
    """What the routes share: settings, the store, the Celery app, the rate limiter."""

    settings: Settings
    store: BatchStore
    celery_app: Any
    base_dir: Path  # rows' relative paths resolve here (an empty folder without roots)
    limiter: RedisRateLimiter | None = None
    limiter_client: aioredis.Redis | None = None

    @property
    def redis(self) -> Any:
        return self.store.redis


# -- auth and limits ---------------------------------------------------------------------


def authenticate(settings: Settings, header: str | None, scope: str) -> Caller:
    """401 without a known token, 403 without the scope (write implies read). Every
    configured digest is compared, in constant time, whichever matches."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "auth.missing", "send Authorization: Bearer <token>")
    digest = hashlib.sha256(token.strip().encode()).hexdigest()
    found: str | None = None
    for granted, known in settings.api_token_list:
        if hmac.compare_digest(digest, known) and found != "write":
            found = granted  # listed twice: write wins
    if found is None:
        raise ApiError(401, "auth.invalid", "unknown token")
    if scope == "write" and found != "write":
        raise ApiError(403, "auth.scope", "this token may only read: writing needs a write token")
    return Caller(token=digest, scope=found)


def _api(request: Request) -> Api:
    api: Api = request.app.state.api
    return api


async def _limit(api: Api, caller: Caller) -> None:
    rate = api.settings.api_rate
    if not rate:
        return
    if api.limiter is None:  # made on the server's loop: redis.asyncio binds to it
        api.limiter_client = aioredis.Redis.from_url(
            api.settings.effective_redis_url, socket_timeout=5, socket_connect_timeout=5
        )
        api.limiter = RedisRateLimiter(api.limiter_client)
    try:
        limit = parse_rate(rate)  # a period's worth at once, then the steady rate
        wait = await api.limiter.acquire(f"api:{caller.token}", limit, limit.count)
    except (OSError, aioredis.RedisError) as exc:
        raise Unreachable(f"cannot reach Redis: {type(exc).__name__}") from None
    if wait > 0:
        raise ApiError(
            429, "rate.limited", f"too many requests: try again in {wait:.2f} s",
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )  # fmt: skip


def scoped(scope: str) -> Callable[[Request], Awaitable[Caller]]:
    async def dependency(request: Request) -> Caller:
        api = _api(request)
        caller = authenticate(api.settings, request.headers.get("authorization"), scope)
        await _limit(api, caller)
        return caller

    return dependency


Reader = Annotated[Caller, Depends(scoped("read"))]
Writer = Annotated[Caller, Depends(scoped("write"))]


async def read_body(request: Request, cap: int) -> bytes:
    """The body, refused (413) as soon as it passes ``cap``: never read whole first."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, "request.too_large", f"the body is over {cap} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise ApiError(413, "request.too_large", f"the body is over {cap} bytes")
    return bytes(body)


# -- making a batch ----------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    fields: BatchFields
    data: bytes  # the manifest
    fmt: Literal["csv", "jsonl"]


def parse_submission(api: Api, request: Request, body: bytes) -> Submission:
    """The batch's fields and its manifest from a JSON body, or from a raw CSV / JSON
    Lines body with the fields as query parameters."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    cap = api.settings.api_max_rows
    if ctype in FORMATS:
        fmt: Literal["csv", "jsonl"] = "csv" if FORMATS[ctype] == "csv" else "jsonl"
        fields = _query_fields(request)
        lines = sum(1 for line in body.splitlines() if line.strip()) - (fmt == "csv")
        if lines > cap:
            raise ApiError(413, "request.too_many_rows", f"{lines} rows: at most {cap}")
        return Submission(fields, body, fmt)
    if ctype != "application/json":
        raise ApiError(415 if ctype else 400, "request.content_type",
                       "send application/json, text/csv or application/x-ndjson")  # fmt: skip
    return json_submission(api, body)


def json_submission(api: Api, body: bytes) -> Submission:
    """A JSON body of ``POST /v1/batches`` (also what the inbound hooks hand on)."""
    cap = api.settings.api_max_rows
    try:
        req = BatchRequest.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise ApiError(422, "request.invalid", _first_error(exc)) from None
    if (req.rows is None) == (req.manifest_url is None):
        raise ApiError(422, "request.invalid", "give either rows or manifest_url")
    fields = BatchFields(**req.model_dump(exclude={"rows", "manifest_url"}))
    if req.rows is not None:
        if len(req.rows) > cap:
            raise ApiError(413, "request.too_many_rows", f"{len(req.rows)} rows: at most {cap}")
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in req.rows)
        return Submission(fields, text.encode(), "jsonl")
    assert req.manifest_url is not None
    data = fetch_manifest(api.settings, req.manifest_url)
    name = Path(urlsplit(req.manifest_url).path).name
    return Submission(fields, data, detect_format(name, data[: runner.SNIFF_BYTES], None))


def _query_fields(request: Request) -> BatchFields:
    params = request.query_params
    known = set(BatchFields.model_fields)
    unknown = [k for k in params if k not in known and not k.startswith("options.")]
    if unknown:
        raise ApiError(422, "request.invalid", f"unknown query parameter {unknown[0]!r}")
    values: dict[str, Any] = {k: v for k, v in params.items() if k in known and k != "options"}
    options = {k[8:]: v for k, v in params.items() if k.startswith("options.")}
    if "options" in params:
        try:
            options.update(json.loads(params["options"]))
        except (ValueError, TypeError):
            raise ApiError(422, "request.invalid", "options: a JSON object") from None
    try:
        return BatchFields(**values, options=options)
    except ValidationError as exc:
        raise ApiError(422, "request.invalid", _first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ())) or "body"
    return f"{where}: {error.get('msg', 'invalid')}"


def fetch_manifest(settings: Settings, url: str) -> bytes:
    """A manifest from https:// (http:// only with private URLs allowed) or s3://, within
    the body cap and through the address guard."""
    scheme = urlsplit(url).scheme
    if scheme not in ("https", "s3") and not (scheme == "http" and settings.allow_private_urls):
        raise ApiError(422, "request.manifest_url", "manifest_url must be https:// or s3://")
    capped = settings.model_copy(update={"max_source_bytes": settings.api_max_body_bytes})
    fetcher = SourceFetcher(capped)
    try:
        return fetcher(url, "manifest_url")
    except BgswapError as exc:
        status = 413 if exc.code == Codes.SOURCE_TOO_LARGE else 422
        raise ApiError(status, "request.manifest_url", exc.message) from None
    finally:
        fetcher.close()


def check_callback_url(settings: Settings, url: str) -> str:
    """https (http only with BGSWAP_ALLOW_PRIVATE_URLS), and no loopback, private or
    link-local address, by name or once resolved, unless private URLs are allowed."""
    parts = urlsplit(url)
    allow = settings.allow_private_urls
    if parts.scheme != "https" and not (parts.scheme == "http" and allow):
        raise ApiError(422, "request.callback_url", "callback_url must be an https:// URL")
    host = parts.hostname
    if not host:
        raise ApiError(422, "request.callback_url", "callback_url has no host")
    if allow:
        return url
    if is_private_host(host):
        raise ApiError(422, "request.callback_url", f"{host} is a local or private address")
    try:
        infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ApiError(422, "request.callback_url", f"{host} does not resolve") from None
    import ipaddress  # noqa: PLC0415 - only here

    for info in infos:
        if not is_public_address(ipaddress.ip_address(str(info[4][0]).partition("%")[0])):
            raise ApiError(422, "request.callback_url", f"{host} resolves to a private address")
    return url


def confined_output(settings: Settings, output: str | None) -> str:
    """The batch's output root: BGSWAP_OUTPUT, or a folder inside it or inside one of
    BGSWAP_OUTPUT_PREFIXES. A client never names another place on the server's disks or
    buckets (a relative path would be the server's own folder)."""
    default = output_root(settings.output)
    if not output:
        return default
    root = output_root(output)
    for allowed in (default, *settings.output_prefix_list):
        if root == allowed or root.startswith(allowed.rstrip("/") + "/"):
            return root
    raise ApiError(
        422, "request.output",
        "output must be BGSWAP_OUTPUT or inside it or a BGSWAP_OUTPUT_PREFIXES entry",
    )  # fmt: skip


def api_defaults(api: Api, fields: BatchFields, root: str, batch_id: str) -> RowDefaults:
    """The CLI's row defaults, but reading only under BGSWAP_LOCAL_ROOTS: never the
    server's folder, nor the folder of a file named in ``options``."""
    settings = api.settings
    roots = tuple(settings.local_root_list)
    base_dir = roots[0] if roots else api.base_dir  # relative paths: in the first root
    set_items = [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                 for k, v in fields.options.items()]  # fmt: skip
    defaults = runner.row_defaults(
        settings,
        provider=fields.provider or default_provider(settings),
        prompt=fields.prompt,
        set_items=set_items,
        base_dir=base_dir,
        root=root,
        batch_id=batch_id,
    )
    return replace(defaults, local_roots=roots or (api.base_dir,))


def _row_errors(errors: Iterable[FieldError]) -> list[dict[str, Any]]:
    return [
        {"line": e.line, "column": e.column, "code": e.code, "message": e.reason} for e in errors
    ]


def submit(api: Api, sub: Submission) -> dict[str, Any]:
    """Make the batch (the same steps as `bgswap submit`); the 201 answer."""
    settings, store, fields = api.settings, api.store, sub.fields
    batch_id = check_batch_id(fields.batch_id) if fields.batch_id else new_batch_id()
    if store.exists(batch_id):
        raise ApiError(409, "batch.exists", f"batch {batch_id} already exists")
    root = confined_output(settings, fields.output)
    source = {"format": sub.fmt, "origin": "api"}
    if fields.callback_url:
        source["callback_url"] = check_callback_url(settings, fields.callback_url)
    defaults = api_defaults(api, fields, root, batch_id)
    if fields.strict:
        _refuse_if_strict(api, sub, defaults)
    runner.probe_destinations(settings, root, batch_id)
    outcomes = read_manifest(io.BytesIO(sub.data), sub.fmt, defaults)
    try:
        report = runner.submit_manifest(
            settings, api.celery_app, store, outcomes, defaults=defaults, output=root,
            batch_id=batch_id, force=fields.force, source=source,
        )  # fmt: skip
    except UsageError as exc:  # another request took the id since it was checked
        if str(exc).startswith(f"batch {batch_id} already exists"):
            raise ApiError(409, "batch.exists", f"batch {batch_id} already exists") from None
        raise
    view = batch_fields(store, batch_id)
    return {
        "batch_id": batch_id,
        "state": view["state"],
        "counts": view["counts"],
        "rejected": _row_errors(report.errors),
        "estimated_cost_usd": round(report.estimated_cost_usd, 6),
        "skipped": report.skipped,
    }


def _refuse_if_strict(api: Api, sub: Submission, defaults: RowDefaults) -> None:
    warnings: list[str] = []

    def noted(outcomes: Iterator[RowOutcome]) -> Iterator[RowOutcome]:
        for outcome in outcomes:
            warnings.extend(outcome.warnings)
            yield outcome

    outcomes = read_manifest(io.BytesIO(sub.data), sub.fmt, defaults)
    report = estimate(noted(outcomes), runner.provider_cache(api.settings))
    refusal = preflight.strict_refusal(report.rejected, report.total, warnings)
    if refusal:
        raise StrictRefusal(f"{refusal}; nothing enqueued", _row_errors(report.errors), warnings)


class StrictRefusal(Exception):
    def __init__(self, message: str, errors: list[dict[str, Any]], warnings: list[str]) -> None:
        super().__init__(message)
        self.message, self.errors, self.warnings = message, errors, warnings


# -- idempotency -------------------------------------------------------------------------


def _idem_key(caller: Caller, key: str) -> str:
    return f"bgswap:api:idem:{caller.token}:{hashlib.sha256(key.encode()).hexdigest()}"


def _body_digest(request: Request, body: bytes) -> str:
    digest = hashlib.sha256(request.headers.get("content-type", "").encode() + b"\n")
    digest.update(str(request.url.query).encode() + b"\n")
    digest.update(body)
    return digest.hexdigest()


def idempotent(
    api: Api, key: str, digest: str, make: Callable[[], dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    """The same key and body: the first answer again (200); another body: 409. The key
    is taken with SET NX; a concurrent duplicate waits for the winner's answer."""
    deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
    while True:
        pending = json.dumps({"body": digest, "answer": None})
        if api.redis.set(key, pending, nx=True, ex=IDEMPOTENCY_TTL_S):
            try:
                answer = make()
            except BaseException:
                api.redis.delete(key)  # nothing was made: the same request may come again
                raise
            api.redis.set(key, json.dumps({"body": digest, "answer": answer}), keepttl=True)
            return 201, answer
        raw = api.redis.get(key)
        if raw is not None:
            held = json.loads(raw)
            if held["body"] != digest:
                raise ApiError(409, "idempotency.mismatch",
                               "this Idempotency-Key was used with another request")  # fmt: skip
            if held["answer"] is not None:
                return 200, held["answer"]
        if time.monotonic() > deadline:
            message = "a request with this Idempotency-Key is still being handled"
            raise ApiError(409, "idempotency.in_progress", message)
        time.sleep(0.05)


# -- the app -----------------------------------------------------------------------------


def _batch_schema() -> dict[str, Any]:
    schema = BatchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    text = {"schema": {"type": "string"}}
    query = [
        {"name": name, "in": "query", "required": False, "schema": {"type": kind},
         "description": f"with a CSV or JSON Lines body: {what}"}
        for name, kind, what in (
            ("batch_id", "string", "the batch id"),
            ("output", "string", "where results go"),
            ("provider", "string", "runware | fal | local"),
            ("prompt", "string", "the default prompt template"),
            ("callback_url", "string", "https URL kept in the batch meta"),
            ("strict", "boolean", "refuse the whole manifest on a bad row"),
            ("force", "boolean", "skip no row"),
            ("options", "string", "a JSON object of option defaults (or options.NAME=VALUE)"),
        )
    ]  # fmt: skip
    key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "maxLength": 255},
        "description": "the same key and body: the first answer again (24 h, per token)",
    }
    return {
        "parameters": [key, *query],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "text/csv": text,
                "application/x-ndjson": text,
            },
        },
    }


def create_app(settings: Settings) -> FastAPI:
    """The API over the Redis and broker of ``settings`` (workers run elsewhere)."""
    import worker.tasks  # noqa: F401, PLC0415 - registers the task names
    from worker.celery_app import app as celery_app  # noqa: PLC0415

    celery_app.conf.broker_url = settings.effective_broker_url
    empty = Path(tempfile.mkdtemp(prefix="bgswap-api-"))  # no local file is ever here
    api = Api(settings, BatchStore.from_url(settings.effective_redis_url), celery_app, empty)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if api.limiter_client is not None:
            await api.limiter_client.aclose()
        api.store.redis.close()

    app = FastAPI(title="bgswap", version="1", lifespan=lifespan)
    app.add_middleware(RequestMetrics)
    app.state.api = api
    _handlers(app)
    app.include_router(router)
    if settings.hook_secret or settings.shopify_webhook_secret:  # else no such routes (404)
        app.include_router(hooks_router(settings, hook_submit(api), client=api.redis))
    if settings.provider_webhook_secret is not None:
        app.include_router(completions_router(settings, api.redis))
    return app


class RequestMetrics:
    """Counts each request by method, route template and status (worker/metrics.py). The
    template, never the path: a path is the caller's to choose, and each distinct label
    value is a new series in Prometheus. Paths that match no route count as one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics.api_request(scope["method"], template, status[0], time.monotonic() - started)


# A namespace for the hooks' idempotency keys, not a credential.
HOOK_CALLER = Caller(token="hooks", scope="write")  # noqa: S106


def hook_submit(api: Api) -> Callable[[dict[str, Any], str], tuple[int, dict[str, Any]]]:
    """How a verified inbound hook makes its batch: its body as a ``POST /v1/batches``
    JSON body, made once per idempotency key (the hook's signature stands for a token;
    errors propagate to the app's handlers, in the one error shape)."""

    def make(body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
        raw = json.dumps(body, sort_keys=True, ensure_ascii=False).encode()
        sub = json_submission(api, raw)
        digest = hashlib.sha256(raw).hexdigest()
        return idempotent(api, _idem_key(HOOK_CALLER, key), digest, lambda: submit(api, sub))

    return make


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.code, exc.message, exc.headers)


async def _strict(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StrictRefusal)
    body = {"error": {"code": "manifest.strict", "message": exc.message},
            "rejected": exc.errors, "warnings": exc.warnings}  # fmt: skip
    return JSONResponse(body, status_code=422)


async def _invalid(request: Request, exc: Exception) -> Response:
    """FastAPI's own validation errors (query, path), in the one error shape."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())) or "request"
    return _error(422, "request.invalid", f"{where}: {first.get('msg', 'invalid')}")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
    return _error(exc.status_code, f"request.{code}", str(exc.detail))


async def _internal(request: Request, exc: Exception) -> Response:
    if isinstance(exc, INFRA_ERRORS):
        return _error(503, "infra.unreachable", f"cannot reach the broker or Redis: "
                      f"{type(exc).__name__}")  # fmt: skip
    log.exception("%s %s failed", request.method, request.url.path)
    return _error(500, "internal", "internal error (see the server's log)")


def _simple(
    status: int, code: str, text: Callable[[Exception], str]
) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handler(request: Request, exc: Exception) -> Response:
        return _error(status, code, text(exc))

    return handler


_SIMPLE: tuple[tuple[type[Exception], int, str, Callable[[Exception], str]], ...] = (
    (BatchNotFound, 404, "batch.not_found", lambda e: f"no batch {e}"),
    (UsageError, 422, "request.invalid", str),
    (ManifestUnreadable, 400, "manifest.unreadable", str),
    (Unreachable, 503, "infra.unreachable", str),
    (
        redis.RedisError,
        503,
        "infra.unreachable",
        lambda e: f"cannot reach Redis: {type(e).__name__}",
    ),
)


def _handlers(app: FastAPI) -> None:
    """Every error answers ``{"error": {"code", "message"}}`` with its status."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StrictRefusal, _strict)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for kind, status, code, text in _SIMPLE:
        app.add_exception_handler(kind, _simple(status, code, text))
    app.add_exception_handler(Exception, _internal)


def _known(batch_id: str) -> str:
    try:
        return check_batch_id(batch_id)
    except UsageError:
        raise BatchNotFound(batch_id[:64]) from None


router = APIRouter()
ApiDep = Annotated[Api, Depends(_api)]


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses=_errors(503))
def readyz(api: ApiDep) -> Response:
    """Ready when Redis and the broker answer (producer/health.py); the workers' heartbeats
    are reported, not required: rows wait in the queue for workers still starting."""
    report = health.gather(api.settings, api.celery_app)
    problems = health.verdict(report)
    if problems:
        return _error(503, "infra.unreachable", "; ".join(problems))
    return JSONResponse(report.to_dict(problems) | {"status": "ready"})


@router.post(
    "/v1/batches",
    status_code=201,
    openapi_extra=_batch_schema(),
    responses={200: {"description": "the answer to an earlier request with this "
                     "Idempotency-Key"}, **WRITE_ERRORS},
)  # fmt: skip
async def create_batch(request: Request, caller: Writer, api: ApiDep) -> Response:
    body = await read_body(request, api.settings.api_max_body_bytes)
    sub = await run_in_threadpool(parse_submission, api, request, body)
    key = request.headers.get("idempotency-key")
    if not key:
        answer = await run_in_threadpool(submit, api, sub)
        return JSONResponse(answer, status_code=201)
    if len(key) > 255:
        raise ApiError(422, "request.invalid", "Idempotency-Key: at most 255 characters")
    status, answer = await run_in_threadpool(
        idempotent, api, _idem_key(caller, key), _body_digest(request, body),
        lambda: submit(api, sub),
    )  # fmt: skip
    return JSONResponse(answer, status_code=status)


@router.get("/v1/batches", responses=_errors(400, 401, 403, 422, 429, 503))
def list_batches(
    caller: Reader,
    api: ApiDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    start = 0
    if cursor:
        rank = api.redis.zrevrank("bgswap:batches", cursor)
        if rank is None:
            raise ApiError(400, "request.cursor", "unknown cursor")
        start = int(rank) + 1
    ids: list[str] = api.redis.zrevrange("bgswap:batches", start, start + limit)
    page = ids[:limit]
    return {
        "batches": [batch_fields(api.store, b) for b in page],
        "next_cursor": page[-1] if len(ids) > limit else None,
    }


@router.get("/v1/batches/{batch_id}", responses=READ_ERRORS)
def get_batch(batch_id: str, caller: Reader, api: ApiDep) -> dict[str, Any]:
    return StatusReader(api.store, _known(batch_id)).read()


@router.get(
    "/v1/batches/{batch_id}/results",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/x-ndjson": {}, "text/csv": {}},
              "description": "the output manifest (Accept: text/csv for CSV)"},
        **READ_ERRORS,
    },
)  # fmt: skip
def results(batch_id: str, request: Request, caller: Reader, api: ApiDep) -> Response:
    batch_id = _known(batch_id)
    api.store.meta(batch_id)  # 404 before the stream starts
    if "text/csv" in request.headers.get("accept", ""):
        return StreamingResponse(_csv(api.store, batch_id), media_type="text/csv")
    return StreamingResponse(_jsonl(api.store, batch_id), media_type="application/x-ndjson")


@router.post("/v1/batches/{batch_id}/cancel", responses=WRITE_ERRORS)
def cancel(batch_id: str, caller: Writer, api: ApiDep) -> dict[str, Any]:
    batch_id = _known(batch_id)
    reason = "canceled by POST /v1/batches/{id}/cancel"
    outcome = runner.cancel_batch(api.settings, api.store, batch_id, reason=reason)
    if outcome.complete:
        runner.enqueue_finalize(api.celery_app, batch_id)
    return {
        **StatusReader(api.store, batch_id).read(),
        "canceled_rows": outcome.canceled,
        "canceled_in_flight": outcome.in_flight,
    }


@router.post("/v1/batches/{batch_id}/retry", responses=WRITE_ERRORS)
def retry(batch_id: str, caller: Writer, api: ApiDep) -> dict[str, Any]:
    batch_id = _known(batch_id)
    indices = runner.requeue_failed(api.store, batch_id)
    runner.publish_retries(api.celery_app, batch_id, indices)
    return {**StatusReader(api.store, batch_id).read(), "requeued_rows": len(indices)}


def _jsonl(store: BatchStore, batch_id: str) -> Iterator[str]:
    for line in report_lines(store, batch_id):
        yield json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"


def _csv(store: BatchStore, batch_id: str) -> Iterator[str]:
    """The output manifest as `bgswap results --format csv` writes it, 200 rows a chunk."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    for n, line in enumerate(report_lines(store, batch_id), 1):
        writer.writerow(csv_cells(line))
        if n % 200 == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()
