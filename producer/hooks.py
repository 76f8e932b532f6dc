"""Inbound webhooks: a FastAPI router that turns signed deliveries into batches.

    POST /v1/hooks/shopify   Shopify's products/create and products/update: the HMAC
                             (X-Shopify-Hmac-Sha256, BGSWAP_SHOPIFY_WEBHOOK_SECRET) over the
                             raw body, one batch per delivery (X-Shopify-Webhook-Id,
                             remembered 24 h), rows from BGSWAP_SHOPIFY_MAPPING.
    POST /v1/hooks/generic   any sender: X-Bgswap-Signature (BGSWAP_HOOK_SECRET), within
                             300 s of our clock, each signature once; the body is a
                             POST /v1/batches body.
    POST /v1/hooks/completions/{provider}/{batch_id}/{index}?token=
                             a provider's completion webhook for one row (its token:
                             BGSWAP_PROVIDER_WEBHOOK_SECRET): the workers poll the row now.

The router only verifies and translates: ``submit(body, idempotency_key)`` is the API's
own batch creation, returning ``(status_code, json)``, passed in by whoever mounts it.
Errors are ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from producer.shopify import TOPICS, MappingError, PayloadError, batch_body, load_mapping
from worker import completions
from worker.settings import Settings
from worker.signing import HEADER, TOLERANCE_S, SignatureError, verify, verify_shopify

log = logging.getLogger("bgswap.hooks")

Submit = Callable[[dict[str, Any], str], tuple[int, Any]]

DEDUP_S = 24 * 3600  # Shopify retries a delivery for up to 48 h, mostly within hours
PENDING_S = 120  # a delivery being handled; one that died frees its id after this
_PENDING = "-"


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _batch_id(payload: Any) -> str | None:
    if isinstance(payload, dict):
        value = payload.get("batch_id")
        return str(value) if value is not None else None
    return None


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


class Answer(Exception):
    """Ends a handler early with this response."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


class Hooks:
    """The handlers, with their settings, Redis and the API's submit."""

    def __init__(
        self,
        settings: Settings,
        submit: Submit,
        client: redis.Redis,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.submit = submit
        self.redis = client
        self.clock = clock

    def shopify(self, raw: bytes, headers: dict[str, str]) -> JSONResponse:
        try:
            return self._shopify(raw, headers)
        except Answer as answer:
            return answer.response

    def _shopify(self, raw: bytes, headers: dict[str, str]) -> JSONResponse:
        secret = self.settings.shopify_webhook_secret
        if secret is None:
            raise Answer(
                error(503, "hook.not_configured", "BGSWAP_SHOPIFY_WEBHOOK_SECRET is not set")
            )
        try:
            verify_shopify(secret.get_secret_value(), raw, headers.get("x-shopify-hmac-sha256"))
        except SignatureError as exc:
            raise Answer(error(401, "hook.bad_signature", exc.message)) from None
        topic = headers.get("x-shopify-topic", "")
        if topic not in TOPICS:
            raise Answer(JSONResponse({"ignored": True, "reason": f"topic {topic or '(none)'}"}))
        webhook_id = headers.get("x-shopify-webhook-id", "").strip()
        if not webhook_id or len(webhook_id) > 200:
            raise Answer(error(400, "hook.bad_request", "missing X-Shopify-Webhook-Id"))
        body = self._shopify_body(raw)
        if not body["rows"]:
            raise Answer(JSONResponse({"ignored": True, "reason": "no https images"}))
        return self._once(f"bgswap:hook:shopify:{webhook_id}", body, f"shopify-{webhook_id}")

    def _shopify_body(self, raw: bytes) -> dict[str, Any]:
        payload = _json_object(raw)
        if payload is None:
            raise Answer(error(400, "hook.bad_request", "the body is not a JSON object"))
        try:
            return batch_body(payload, load_mapping(self.settings.shopify_mapping))
        except MappingError as exc:
            log.error("shopify hook: %s", exc)
            raise Answer(error(503, "hook.not_configured", str(exc))) from None
        except PayloadError as exc:
            raise Answer(error(400, "hook.bad_request", str(exc))) from None

    def _once(self, key: str, body: dict[str, Any], idempotency_key: str) -> JSONResponse:
        """Submit once per ``key``: a repeat answers 200 with the first batch id."""
        if not self.redis.set(key, _PENDING, nx=True, ex=PENDING_S):
            first = self.redis.get(key)
            if first is None or first == _PENDING:
                return error(409, "hook.in_progress", "this delivery is being handled; retry")
            return JSONResponse({"batch_id": first, "duplicate": True})
        try:
            status, answer = self.submit(body, idempotency_key)
        except Exception:
            self.redis.delete(key)  # the sender's retry may try again
            raise
        batch = _batch_id(answer)
        if 200 <= status < 300 and batch is not None:
            self.redis.set(key, batch, ex=DEDUP_S)
        else:
            self.redis.delete(key)
        return JSONResponse(answer, status_code=status)

    def generic(self, raw: bytes, headers: dict[str, str]) -> JSONResponse:
        secret = self.settings.hook_secret
        if secret is None:
            return error(503, "hook.not_configured", "BGSWAP_HOOK_SECRET is not set")
        try:
            t = verify(secret.get_secret_value(), headers.get(HEADER.lower()), raw, self.clock())
        except SignatureError as exc:
            return error(401, "hook.bad_signature", exc.message)
        body = _json_object(raw)
        if body is None:
            return error(400, "hook.bad_request", "the body is not a JSON object")
        # The same (t, body) is the same signature: seen within the window, a replay. The
        # key outlives every moment at which that t is still accepted.
        seen = hashlib.sha256(f"{t}.".encode() + raw).hexdigest()
        if not self.redis.set(f"bgswap:hook:seen:{seen}", "1", nx=True, ex=2 * TOLERANCE_S + 5):
            return error(401, "hook.replayed", "this signature was already used")
        key = headers.get("idempotency-key") or f"hook-{seen[:32]}"
        status, answer = self.submit(body, key)
        return JSONResponse(answer, status_code=status)


# What a hook may answer besides its batch (``{"error": {"code", "message"}}``), for the
# OpenAPI schema.
HOOK_ERRORS: dict[int | str, dict[str, Any]] = {
    201: {"description": "the delivery's batch was made"},
    400: {"description": "a body or header that is not a delivery"},
    401: {"description": "a bad, stale or replayed signature"},
    409: {"description": "the same delivery is being handled; retry"},
    413: {"description": "the batch's rows over the limit"},
    422: {"description": "the batch refused (as POST /v1/batches)"},
    503: {"description": "the hook's secret or mapping is not configured"},
}


def hooks_router(
    settings: Settings,
    submit: Submit,
    client: redis.Redis | None = None,
    clock: Callable[[], float] = time.time,
) -> APIRouter:
    """``POST /v1/hooks/shopify`` and ``POST /v1/hooks/generic``, over ``submit``."""
    if client is None:
        client = redis.Redis.from_url(settings.effective_redis_url, decode_responses=True)
    hooks = Hooks(settings, submit, client, clock)
    router = APIRouter()

    @router.post("/v1/hooks/shopify", responses=HOOK_ERRORS)
    async def shopify(request: Request) -> JSONResponse:
        raw = await request.body()
        return await run_in_threadpool(hooks.shopify, raw, dict(request.headers))

    @router.post("/v1/hooks/generic", responses=HOOK_ERRORS)
    async def generic(request: Request) -> JSONResponse:
        raw = await request.body()
        return await run_in_threadpool(hooks.generic, raw, dict(request.headers))

    return router


def completions_router(settings: Settings, client: redis.Redis) -> APIRouter:
    """``POST /v1/hooks/completions/{provider}/{batch_id}/{index}?token=``: a provider's
    completion webhook (worker/completions.py). A good token publishes the row to the
    workers, which poll it at once; the body is never read (the poll asks the provider)."""
    assert settings.provider_webhook_secret is not None
    secret = settings.provider_webhook_secret.get_secret_value()
    router = APIRouter()

    @router.post(
        "/v1/hooks/completions/{provider}/{batch_id}/{index}",
        responses={
            401: {"description": "no such row's token"},
            404: {"description": "no such provider"},
        },
    )
    async def completion(provider: str, batch_id: str, index: int, token: str = "") -> JSONResponse:
        if provider not in completions.PROVIDERS:
            return error(404, "not_found", f"no completion webhooks for {provider!r}")
        if not token or not completions.verify(secret, provider, batch_id, index, token):
            return error(401, "unauthorized", "bad token for this row")
        try:
            await run_in_threadpool(completions.announce, client, batch_id, index)
        except redis.RedisError:
            # The provider calls again later; the row's own polls find it meanwhile.
            return error(503, "unavailable", "Redis is not answering")
        return JSONResponse({"ok": True})

    return router
