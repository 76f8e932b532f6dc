"""fal.ai: the queue API of `fal-ai/ideogram/v3/replace-background`.

Protocol: fal's queue API docs and its own client, fal_client. Submit to the queue, keep
the returned URLs (they use the owner/app form `fal-ai/ideogram/requests/{id}`, never the
endpoint path), poll the status URL, read the result at once (large results live 6
minutes), download the images at once.

Paying at most once. fal has no idempotency key, so the only protection is the
request_id, saved in the row's memory the moment the submit answer is read:

    memory has request_id ────────────────────────────────> poll (never submit again)
    memory says "submitting" but no id ──> the last attempt died or got no answer
                                           after sending: unknown -> fail the row
                                           (`provider.submit_unknown`) unless
                                           BGSWAP_FAL_RESUBMIT_UNKNOWN=1
    otherwise: uploads (free) -> save "submitting" -> POST -> save request_id -> poll

What each answer to a submit means, as fal's own client (fal_client) decides:

    2xx with its ids ──────────────────────────────────────> queued: poll
    a connect error, 429, another 4xx ─────────────────────> nothing queued: retry / fail
    no usable body but `x-fal-request-id` (a 5xx, junk) ───> it reached fal, which named
                                   the request: poll that id (owner/app URLs); fal does
                                   not know it (404) -> unknown
    502/503/504 page from the ingress (nginx, no header) ──> never reached fal: retry
    a timeout, a dropped connection, anything else ────────> unknown

The submit waits up to ``submit_timeout_s`` (120 s, fal_client's) for its answer, so a
slow queue is not mistaken for a lost one. The status, response and cancel URLs fal
names are followed only on the configured queue host: the key never goes elsewhere.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from worker import logs, metrics
from worker.errors import (
    Ambiguous,
    BgswapError,
    Codes,
    ProviderAccountError,
    ProviderRejected,
    ProviderUnavailable,
)
from worker.fetch import parse_retry_after
from worker.imaging import decode_image, encode_image
from worker.jobs import CONTENT_TYPES, EXTENSIONS, ColorPalette, Job, JobSpec, ProviderCaps
from worker.limits import Deferred
from worker.providers.base import (
    Account,
    OutputImage,
    ProviderContext,
    ProviderResult,
    ProviderSpec,
    Wait,
)
from worker.providers.common import (
    Prefetched,
    asend,
    image_info,
    reference_for_provider,
    remember,
    send,
)
from worker.providers.polling import generated, next_wait, stop_if_canceled
from worker.settings import Settings

log = logging.getLogger("bgswap.fal")

ENDPOINT = "fal-ai/ideogram/v3/replace-background"
APP = "fal-ai/ideogram"  # owner/app: the form of the request URLs
MODEL = ENDPOINT
REQUEST_ID_HEADER = "x-fal-request-id"
INGRESS_STATUSES = frozenset({502, 503, 504})
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
PRICE_PER_IMAGE = {"TURBO": 0.03, "BALANCED": 0.06, "QUALITY": 0.09}
# The pace of the status polls the engine makes for a waiting row between its steps (each
# one request): fal's own client polls a request's status every 0.1 s from its submit on
# (fal_client ``iter_events``), so a quarter second is gentle (worker/providers/timing.py).
CLOSE_POLL_S = 0.25
# Model error types (422 `detail[].type`) that keep their name in error.code.
MODEL_ERROR_TYPES = frozenset(
    {"image_too_small", "image_too_large", "image_load_error", "file_download_error"}
)
FORMATS = {"PNG": "PNG", "JPEG": "JPG", "WEBP": "WEBP"}


@dataclass(frozen=True)
class FalConfig:
    queue_url: str
    rest_url: str
    timeout_s: float = 1200.0
    http_timeout_s: float = 30.0
    submit_timeout_s: float = 120.0
    poll_initial_s: float = 1.0
    poll_max_s: float = 10.0
    start_timeout_s: int | None = None
    queue_priority: str | None = None
    resubmit_unknown: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> FalConfig:
        return cls(
            queue_url=s.fal_queue_url.rstrip("/"),
            rest_url=s.fal_rest_url.rstrip("/"),
            timeout_s=s.fal_timeout_s,
            http_timeout_s=s.fal_http_timeout_s,
            submit_timeout_s=s.fal_submit_timeout_s,
            poll_initial_s=s.fal_poll_initial_s,
            poll_max_s=s.fal_poll_max_s,
            start_timeout_s=s.fal_start_timeout_s,
            queue_priority=s.fal_queue_priority,
            resubmit_unknown=s.fal_resubmit_unknown,
        )


# -- option mapping (pure) ---------------------------------------------------------


def palette_body(palette: ColorPalette) -> dict[str, Any]:
    if palette.name is not None:
        return {"name": palette.name}
    members = []
    for member in palette.members or ():
        r, g, b = member.rgb
        entry: dict[str, Any] = {"rgb": {"r": r, "g": g, "b": b}}
        if member.weight is not None:
            entry["color_weight"] = member.weight
        members.append(entry)
    return {"members": members}


def fal_input(spec: JobSpec, *, image_url: str, image_urls: list[str] | None) -> dict[str, Any]:
    """The model input for one row (the queue takes it as the body, no envelope)."""
    body: dict[str, Any] = {
        "prompt": spec.prompt,
        "image_url": image_url,
        "num_images": spec.num_results,
    }
    if spec.rendering_speed:
        body["rendering_speed"] = spec.rendering_speed
    if spec.magic_prompt:
        body["expand_prompt"] = spec.magic_prompt != "OFF"
    if spec.style_type:
        body["style"] = spec.style_type
    if spec.style_code:
        body["style_codes"] = [spec.style_code.upper()]
    if spec.style_preset:
        body["style_preset"] = spec.style_preset
    if image_urls:
        body["image_urls"] = image_urls
    if spec.color_palette is not None:
        body["color_palette"] = palette_body(spec.color_palette)
    if spec.seed is not None:
        body["seed"] = spec.seed
    return body


def estimate_cost(spec: JobSpec) -> float:
    return PRICE_PER_IMAGE[spec.rendering_speed or "BALANCED"] * spec.num_results


def submit_headers(cfg: FalConfig) -> dict[str, str]:
    headers = {}
    if cfg.start_timeout_s is not None:
        headers["X-Fal-Request-Timeout"] = str(cfg.start_timeout_s)
    if cfg.queue_priority:
        headers["X-Fal-Queue-Priority"] = cfg.queue_priority
    return headers


# -- errors (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class FalError:
    """What an error answer says: status, the model's detail type or the infra error type."""

    status: int
    detail_type: str | None
    error_type: str | None
    message: str
    retry_after_s: float | None = None
    user_timeout: bool = False
    retryable_header: bool | None = None


def read_error(response: httpx.Response) -> FalError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    detail_type, message = None, ""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        detail_type = str(detail[0].get("type") or "") or None
        message = str(detail[0].get("msg") or "")
    elif isinstance(detail, str):
        message = detail
    headers = response.headers
    retryable = headers.get("x-fal-retryable")
    return FalError(
        status=response.status_code,
        detail_type=detail_type,
        error_type=headers.get("x-fal-error-type")
        or (body.get("error_type") if isinstance(body, dict) else None),
        message=message[:300],
        retry_after_s=parse_retry_after(headers.get("retry-after")),
        user_timeout=headers.get("x-fal-request-timeout-type") == "user",
        retryable_header=None if retryable is None else retryable.lower() == "true",
    )


def _code_for_type(detail_type: str) -> str:
    if detail_type == "content_policy_violation":
        return Codes.PROVIDER_CONTENT_POLICY
    if detail_type in MODEL_ERROR_TYPES:
        return f"provider.{detail_type}"
    return Codes.PROVIDER_INVALID_REQUEST


def classify(err: FalError) -> BgswapError:
    """Map a fal error answer onto the error tree (branching on types, never on msg)."""
    kind = err.detail_type or err.error_type or f"http{err.status}"
    text = f"fal {kind} (HTTP {err.status}): {err.message}".rstrip(": ")
    if err.status == 401:
        return ProviderAccountError(Codes.PROVIDER_AUTH, text)
    if err.status == 403:
        credit = re.search(r"balance|locked|credit", err.message, re.IGNORECASE)
        return ProviderAccountError(Codes.PROVIDER_CREDITS if credit else Codes.PROVIDER_AUTH, text)
    if err.user_timeout:
        # The start deadline we set ourselves expired: retrying would just wait again.
        return ProviderRejected(Codes.PROVIDER_REQUEST_TIMEOUT, text)
    if err.detail_type:
        return ProviderRejected(_code_for_type(err.detail_type), text)
    retryable = err.status in (408, 409, 429) or err.status >= 500
    if err.retryable_header is not None:
        retryable = err.retryable_header
    if not retryable:
        return ProviderRejected(Codes.PROVIDER_INVALID_REQUEST, text)
    code = Codes.PROVIDER_RATE_LIMITED if err.status == 429 else Codes.PROVIDER_UNAVAILABLE
    return ProviderUnavailable(code, text, retry_after_s=err.retry_after_s)


def is_ingress_page(response: httpx.Response) -> bool:
    """A 502/503/504 from the ingress in front of fal (an nginx page, no request id): the
    request never reached fal (fal_client's test, which retries these)."""
    return (
        response.status_code in INGRESS_STATUSES
        and REQUEST_ID_HEADER not in response.headers
        and "nginx" in response.text.lower()
    )


def same_origin(url: str, origin: str) -> bool:
    """``url`` has the scheme, host and port of ``origin`` (the configured queue URL)."""
    try:
        a, b = httpx.URL(url), httpx.URL(origin)
    except httpx.InvalidURL:
        return False
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port) and bool(a.host)


def request_urls(queue_url: str, request_id: str) -> dict[str, str]:
    """The owner/app URLs of a request fal named without its answer (a header only)."""
    response_url = f"{queue_url}/{APP}/requests/{request_id}"
    return {
        "request_id": request_id,
        "status_url": f"{response_url}/status",
        "response_url": response_url,
        "cancel_url": f"{response_url}/cancel",
    }


class RequestFailed(ProviderUnavailable):
    """The queued request completed with a retryable failure (a runner died...): it was
    not billed (5xx), and the next attempt submits a new request."""


# -- the provider ----------------------------------------------------------------------


class FalProvider:
    name = "fal"
    model = MODEL
    cpu_bound = False

    def __init__(self, settings: Settings, http: httpx.Client | None = None) -> None:
        self.cfg = FalConfig.from_settings(settings)
        self._key = settings.fal_key
        self.http = http or httpx.Client(timeout=self.cfg.http_timeout_s, trust_env=False)
        # The engine's gathered polls (``prefetch``): every status request that is due
        # in flight at once on one event loop, which this provider keeps with its client.
        self._prefetched: Prefetched[httpx.Response | BgswapError] = Prefetched()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_http: httpx.AsyncClient | None = None
        self._loop_lock = threading.Lock()

    def estimate_cost(self, spec: JobSpec) -> float:
        return estimate_cost(spec)

    @property
    def _auth(self) -> dict[str, str]:
        if self._key is None:
            raise ProviderAccountError(Codes.PROVIDER_AUTH, "FAL_KEY is not set on this worker")
        # The key lives only in this header; never in messages, logs or Redis.
        return {"Authorization": f"Key {self._key.get_secret_value()}"}

    def prefetch(self, watches: Sequence[str]) -> set[str]:
        """Ask for the status of every watched request (their status URLs) at once, each
        answer kept for its row's next step: fal has no request for several statuses, so
        they go out together on an event loop instead of one per step thread. Returns the
        requests plainly running (``IN_PROGRESS``: a queued one's position is its step's to
        show)."""
        auth = self._auth
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(self._statuses(watches, auth))

    async def _statuses(self, urls: Sequence[str], auth: dict[str, str]) -> set[str]:
        if self._async_http is None:  # made on the loop that uses it
            self._async_http = httpx.AsyncClient(timeout=self.cfg.http_timeout_s, trust_env=False)
        client = self._async_http
        pending: set[str] = set()

        async def status(url: str) -> None:
            try:
                response = await asend(client, "GET", url, provider="fal", kind="poll",
                                       params={"logs": "0"}, headers=auth)  # fmt: skip
            except BgswapError as err:
                self._prefetched.put(url, err)
                return
            self._prefetched.put(url, response)
            if in_progress(response):
                self._prefetched.unready(url)
                pending.add(url)

        await asyncio.gather(*(status(url) for url in urls if same_origin(url, self.cfg.queue_url)))
        return pending

    def step(self, job: Job, ctx: ProviderContext) -> ProviderResult | Wait | Deferred:
        """Submit (once) or poll (once); then the results, or how long to wait."""
        memory = ctx.memory.load()
        try:
            if "request_id" not in memory:
                deferred = self._submit(job, memory, ctx)
                if deferred is not None:
                    return deferred
            else:
                logs.bind(provider_task_id=memory["request_id"])
                stop_if_canceled(ctx, f"fal request {memory['request_id']}")
                if self._poll(memory, ctx):
                    unready = self._prefetched.unready_at(memory["status_url"])
                    generated(ctx, memory.get("accepted_at"), memory, unready)
                    if ctx.limits is not None:
                        ctx.limits.release()  # fal is done with it: the next row may go
                    return self._outputs(job, memory["request_id"], self._result(memory), ctx)
        except RequestFailed:
            ctx.memory.save({"uploads": memory.get("uploads", {})})
            raise
        return next_wait(
            memory, ctx.memory, ctx,
            initial_s=self.cfg.poll_initial_s, max_s=self.cfg.poll_max_s,
            timeout_s=self.cfg.timeout_s, what=f"fal request {memory['request_id']}",
            # With a completion webhook its call is the signal (worker/completions.py),
            # the backoff only the fallback.
            expected=None if ctx.webhook else ctx.expected, watch=memory.get("status_url"),
            close_s=None if ctx.webhook else CLOSE_POLL_S,
        )  # fmt: skip

    def cancel(self, memory: dict[str, Any]) -> bool:
        """Ask fal to cancel a row's in-flight request; True when it accepted."""
        url = memory.get("cancel_url")
        if not url or not same_origin(url, self.cfg.queue_url):
            return False
        response = send(self.http, "PUT", url, provider="fal", kind="cancel", headers=self._auth)
        return response.status_code == 202

    # submission ------------------------------------------------------------------------

    def _submit(self, job: Job, memory: dict[str, Any], ctx: ProviderContext) -> Deferred | None:
        auth = self._auth  # no key: fail (and halt) before anything else
        if memory.get("submitting") and not self.cfg.resubmit_unknown:
            raise _unknown("an earlier attempt stopped after sending its submit")
        spec = job.spec
        body = fal_input(
            spec,
            image_url=self._reference(spec.image, "image", memory, ctx),
            image_urls=[
                self._reference(ref, f"style_reference_images[{n}]", memory, ctx)
                for n, ref in enumerate(spec.style_reference_images or ())
            ]
            or None,
        )
        deferred = ctx.limits.admit() if ctx.limits is not None else None
        if deferred is not None:  # the account's rate or in-flight cap: not now
            return deferred
        # The intent, saved under this worker's hold (worker/hold.py) before anything is
        # sent: a worker that takes the row over finds it and does not submit again.
        remember(memory, ctx.memory, submitting=True)
        ctx.guard()
        timeout = httpx.Timeout(self.cfg.submit_timeout_s, connect=self.cfg.http_timeout_s)
        try:
            response = send(
                self.http, "POST", f"{self.cfg.queue_url}/{ENDPOINT}", provider="fal",
                kind="submit", json=body, headers={**auth, **submit_headers(self.cfg)},
                timeout=timeout, params={"fal_webhook": ctx.webhook} if ctx.webhook else None,
            )  # fmt: skip
        except Ambiguous as err:
            raise self._after_unknown(err, memory, ctx) from err
        except ProviderUnavailable:
            remember(memory, ctx.memory, submitting=False)  # a connect error: never sent
            raise
        if response.status_code == 429 and ctx.limits is not None:
            ctx.limits.slow_down()  # fal says too fast: every worker slows down
        ids = self._read_submit(response, memory, ctx)
        # When fal took it, for the generation-time histogram (the row may finish elsewhere).
        remember(memory, ctx.memory, submitting=False, accepted_at=time.time(), **ids)
        logs.bind(provider_task_id=ids["request_id"])
        log.info("row %s: fal request %s queued", job.job_id, ids["request_id"])
        return None

    def _read_submit(
        self, response: httpx.Response, memory: dict[str, Any], ctx: ProviderContext
    ) -> dict[str, Any]:
        status = response.status_code
        if 300 <= status < 500:
            # fal's refusal (a 429, a 422...): nothing was queued.
            remember(memory, ctx.memory, submitting=False)
            raise classify(read_error(response))
        if status < 300:
            try:
                return self._queued(response.json())
            except (ValueError, KeyError, TypeError, AttributeError):
                pass  # unreadable: as good as no answer, unless fal named the request
        named = response.headers.get(REQUEST_ID_HEADER)
        if named is not None and _REQUEST_ID.fullmatch(named):
            # fal's own server answered: the submit reached fal and may be queued. It is
            # never sent again; the request it names is polled, and only if fal does not
            # know it is the outcome unknown (_poll).
            log.warning("fal answered HTTP %d for request %s: polling it", status, named)
            return {**request_urls(self.cfg.queue_url, named), "queue_position": None,
                    "state": "IN_QUEUE", "unconfirmed": True}  # fmt: skip
        if status >= 500 and is_ingress_page(response):
            remember(memory, ctx.memory, submitting=False)  # it never reached fal
            raise ProviderUnavailable(
                Codes.PROVIDER_UNAVAILABLE,
                f"fal's ingress answered HTTP {status}",
                retry_after_s=parse_retry_after(response.headers.get("retry-after")),
            )
        why = f"HTTP {status} from a gateway" if status >= 500 else "an unreadable answer"
        raise self._after_unknown(Ambiguous(Codes.PROVIDER_BAD_RESPONSE, why), memory, ctx)

    def _queued(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The ids of an accepted submit; the URLs only on the configured queue host."""
        ids = {
            "request_id": str(answer["request_id"]),
            "status_url": str(answer["status_url"]),
            "response_url": str(answer["response_url"]),
            "cancel_url": str(answer.get("cancel_url") or ""),
        }
        for name in ("status_url", "response_url", "cancel_url"):
            if ids[name] and not same_origin(ids[name], self.cfg.queue_url):
                # Following it would send the key to another host.
                raise ProviderRejected(
                    Codes.PROVIDER_BAD_RESPONSE,
                    f"fal request {ids['request_id']}: its {name} is not on "
                    f"{self.cfg.queue_url}: refused (the key is sent nowhere else)",
                )
        return {**ids, "queue_position": answer.get("queue_position"), "state": "IN_QUEUE"}

    def _after_unknown(
        self, err: Ambiguous, memory: dict[str, Any], ctx: ProviderContext
    ) -> BgswapError:
        if self.cfg.resubmit_unknown:
            # Retried: the operator accepted the risk of paying twice.
            return ProviderUnavailable(err.code, err.message, retry_after_s=err.retry_after_s)
        return _unknown(err.message)

    def _reference(
        self, ref: str, field_name: str, memory: dict[str, Any], ctx: ProviderContext
    ) -> str:
        """Public URLs as given; local files, s3:// objects and data URIs go to fal storage."""
        return reference_for_provider(ref, field_name, memory, ctx, upload=self._upload)

    def _upload(self, data: bytes) -> str:
        fmt = image_info(data)[0] or "PNG"
        mime = Image.MIME.get(fmt, "application/octet-stream")
        initiate = f"{self.cfg.rest_url}/storage/upload/initiate?storage_type=fal-cdn-v3"
        try:
            response = send(
                self.http, "POST", initiate, provider="fal", kind="upload", headers=self._auth,
                json={"file_name": f"input.{fmt.lower()}", "content_type": mime},
            )  # fmt: skip
            if response.status_code >= 300:
                raise classify(read_error(response))
            answer = response.json()
            put = send(
                self.http, "PUT", str(answer["upload_url"]), provider="fal storage", kind="upload",
                content=data, headers={"Content-Type": mime},
            )  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderUnavailable(
                Codes.PROVIDER_BAD_RESPONSE, "fal storage answer was unreadable"
            ) from exc
        if put.status_code >= 300:
            raise ProviderUnavailable(
                Codes.PROVIDER_UNAVAILABLE,
                f"fal storage refused the upload (HTTP {put.status_code})",
            )
        return str(answer["file_url"])

    # waiting and results ---------------------------------------------------------------

    def _poll(self, memory: dict[str, Any], ctx: ProviderContext) -> bool | None:
        """True once COMPLETED; None while queued or running (or on a free-to-retry error)."""
        if ctx.limits is not None:
            ctx.limits.keep()  # still in flight: keep the slot's lease alive
        response = self._prefetched.take(memory["status_url"])
        try:
            if isinstance(response, BgswapError):
                raise copy.copy(response)  # one instance per row: each raise sets a traceback
            if response is None:
                response = send(self.http, "GET", memory["status_url"], provider="fal",
                                kind="poll", params={"logs": "0"}, headers=self._auth)  # fmt: skip
        except ProviderUnavailable as err:
            log.info("poll of %s: %s", memory["request_id"], err.code)
            return None
        answer = self._status_answer(response, memory, ctx)
        if answer is None:
            return None
        if answer.get("status") == "COMPLETED":
            return True
        position = answer.get("queue_position")
        if position != memory.get("queue_position"):
            # Shown by `bgswap status` (queue waits); saved only when it changes.
            remember(memory, ctx.memory, queue_position=position, state=answer.get("status"))
        return None

    def _status_answer(
        self, response: httpx.Response, memory: dict[str, Any], ctx: ProviderContext
    ) -> dict[str, Any] | None:
        """The status body; None when this poll told nothing (polls are free: the next one
        will); raises when the request cannot go on."""
        if response.status_code == 404:
            if memory.get("unconfirmed"):
                raise self._not_found_after_error(memory, ctx)
            raise ProviderRejected(
                Codes.PROVIDER_TASK_NOT_FOUND, f"fal does not know request {memory['request_id']}"
            )
        if response.status_code >= 300:
            error = classify(read_error(response))
            if error.retryable:
                return None
            raise error
        if memory.pop("unconfirmed", False):
            ctx.memory.save(memory)  # fal knows it: an accepted request like any other
        try:
            answer = response.json()
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None

    def _not_found_after_error(self, memory: dict[str, Any], ctx: ProviderContext) -> BgswapError:
        """fal named a request in an error answer but does not know it: maybe it was never
        queued, maybe not yet visible. The submit's outcome is unknown."""
        why = f"fal named request {memory['request_id']} in an error answer, then did not know it"
        if self.cfg.resubmit_unknown:
            # The operator accepted the risk: the next attempt submits afresh.
            ctx.memory.save({"uploads": memory.get("uploads", {})})
            return ProviderUnavailable(Codes.PROVIDER_SUBMIT_UNKNOWN, why)
        return _unknown(why)

    def _result(self, memory: dict[str, Any]) -> dict[str, Any]:
        # A read: a timeout is only retryable (worker/providers/common.py: send).
        response = send(self.http, "GET", memory["response_url"], provider="fal", kind="poll",
                        headers=self._auth)  # fmt: skip
        if response.status_code == 404:
            raise ProviderRejected(
                Codes.PROVIDER_RESULT_EXPIRED,
                f"fal request {memory['request_id']} completed but its result is gone "
                "(results of 10 KB or more expire after 6 minutes); `bgswap retry` re-submits",
            )
        if response.status_code >= 300:
            error = classify(read_error(response))
            if error.retryable:
                raise RequestFailed(Codes.PROVIDER_GENERATION_FAILED, error.message) from error
            raise error
        try:
            result = response.json()
        except ValueError as exc:
            raise ProviderUnavailable(
                Codes.PROVIDER_BAD_RESPONSE, "fal result was not JSON"
            ) from exc
        if not isinstance(result, dict) or not isinstance(result.get("images"), list):
            raise ProviderUnavailable(Codes.PROVIDER_BAD_RESPONSE, "fal result without images")
        return result

    def _outputs(
        self, job: Job, request_id: str, result: dict[str, Any], ctx: ProviderContext
    ) -> ProviderResult:
        seed = result.get("seed") if isinstance(result.get("seed"), int) else None
        outputs = [
            self._output(job.spec, image, n, seed, ctx)
            for n, image in enumerate(result["images"], start=1)
            if isinstance(image, dict) and image.get("url")
        ]
        if not outputs:
            raise ProviderUnavailable(Codes.PROVIDER_BAD_RESPONSE, "fal result without images")
        speed = job.spec.rendering_speed or "BALANCED"
        cost = round(PRICE_PER_IMAGE[speed] * len(outputs), 6)
        return ProviderResult(outputs=outputs, cost_usd=cost, provider_task_id=request_id)

    def _output(
        self, spec: JobSpec, image: dict[str, Any], n: int, seed: int | None, ctx: ProviderContext
    ) -> OutputImage:
        with metrics.timed_request("fal", "download"):
            data = ctx.fetch(str(image["url"]), f"result {n}")
        fmt, width, height = image_info(data)
        wanted = spec.output_format
        if wanted and FORMATS.get(fmt or "") != wanted:
            # fal picks its own format; the row asked for another: convert here.
            decoded = decode_image(data, ctx.max_image_pixels, ctx.image_budget)
            data = encode_image(decoded, wanted, spec.output_quality or 95)
        final = wanted or FORMATS.get(fmt or "", "PNG")
        return OutputImage(data, CONTENT_TYPES[final], EXTENSIONS[final], width, height, seed)


def in_progress(response: httpx.Response) -> bool:
    """A status answer that says only "running, not done"."""
    if response.status_code >= 300:
        return False
    try:
        answer = response.json()
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("status") == "IN_PROGRESS"


def _unknown(why: str) -> ProviderRejected:
    return ProviderRejected(
        Codes.PROVIDER_SUBMIT_UNKNOWN,
        f"fal may have accepted this row's request ({why}); it was not sent again, so that "
        "it is never paid twice: `bgswap retry BATCH` re-submits it",
    )


SPEC = ProviderSpec(
    name="fal",
    # The seed's replace-background endpoint: up to 8 images, four style types, a
    # colour palette and a seed.
    caps=ProviderCaps(
        max_results=8,
        style_types=frozenset({"AUTO", "GENERAL", "REALISTIC", "DESIGN"}),
        color_palette=True,
        seed=True,
    ),
    make=FalProvider,
    account=Account(
        key_variable="FAL_KEY",
        key=lambda settings: settings.fal_key,
        rate=lambda settings: settings.fal_rate,
        max_in_flight=lambda settings: settings.fal_max_in_flight,
    ),
    webhooks=True,
)
