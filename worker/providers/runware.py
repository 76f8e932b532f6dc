"""Runware: `imageInference` with model `ideogram:4@5` (Ideogram 3.0 Replace Background).

Protocol: Runware's REST API docs and its own SDK. One POST endpoint takes a JSON array of tasks
with `Authorization: Bearer KEY`; answers carry `data` and/or `errors`.

How a row is paid for at most once (the taskUUID is the idempotency key):

    load memory ─ task_uuid? ──no──> new uuid4, SAVE, submit ──ack──────────> poll
                       │                         │ conflictTaskUUID ─────────> poll
                       │                         │ 5xx / drop / timeout / junk:
                       │                         └─ getResponse knows it? yes > poll
                       │                                                  no > retry later
                       └─yes─ accepted? ─yes────────────────────────────────> poll
                                  └─no── getResponse knows it? ─yes───────> poll
                                                 └─no── submit again (same uuid)

A re-submitted taskUUID that Runware already accepted is refused with
`conflictTaskUUID` and not billed, so re-submitting the same uuid is always safe.
Polling `getResponse` is free. Auth and credit errors raise ProviderAccountError:
the pipeline stops Runware for the rest of the batch.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
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
from worker.fetch import parse_retry_after, reference_scheme
from worker.jobs import CONTENT_TYPES, EXTENSIONS, STYLE_TYPES, Job, JobSpec, ProviderCaps
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
    Rule,
    SharedRequests,
    classify_by_rules,
    image_info,
    reference_for_provider,
    send,
)
from worker.providers.polling import generated, next_wait, stop_if_canceled
from worker.settings import Settings
from worker.storage import StoredObject, output_destination

log = logging.getLogger("bgswap.runware")

MODEL = "ideogram:4@5"
# getResponse tasks per shared poll request: the rows of one process that are due at once
# (Runware takes an array of tasks per request and answers each on its own).
POLL_BATCH = 100
SUBMIT_BATCH = 20  # imageInference tasks per shared submit request
# The pace of the polls the engine makes for a waiting row between its steps: a round is
# one getResponse for every row of the process that is due, however many, so the rounds
# come about back to back (worker/providers/timing.py).
CLOSE_POLL_S = 0.1
SPEEDS = {"TURBO": "TURBO", "BALANCED": "DEFAULT", "QUALITY": "QUALITY"}
# USD per image for the estimate; the real cost comes back with includeCost. The seed
# page shows 0.06 (default speed) and 0.09 (QUALITY); TURBO's 0.03 is fal's price.
PRICE_PER_IMAGE = {"TURBO": 0.03, "DEFAULT": 0.06, "QUALITY": 0.09}

# Runware's error codes are many and not stable ("not yet standardised across models"), so
# they are sorted into kinds by pattern, the way Runware's own SDK does it
# (runware.errors.derive_code); the sets name the codes no pattern catches.
AUTH_CODES = frozenset({
    "unauthorized", "forbidden", "permissionDenied", "insufficientPermissions",
    "authenticationFailed", "authFailed", "invalidAuthentication", "invalidCredentials",
    "missingAuthentication", "tokenExpired", "tokenInvalid", "tokenMissing", "tokenRevoked",
    "accountSuspended", "accountDisabled", "organizationSuspended", "organizationDisabled",
    "workspaceSuspended", "workspaceDisabled",
})  # fmt: skip
SAFETY_CODES = frozenset({
    "contentPolicyViolation", "providerContentPolicyViolation", "sensitiveContentDetected",
    "unsafeContentDetected", "nsfwContentDetected", "promptBlocked", "imageBlocked",
    "moderationFailed", "invalidProviderContent",
})  # fmt: skip
SERVER_CODES = frozenset({
    "internalServerError", "serviceUnavailable", "serverUnavailable", "standardError",
    "unknownError", "undefinedError", "defaultError", "unrecognizedResponse",
})  # fmt: skip
# A generation that failed on Runware's side: a new task may well succeed.
GENERATION_CODES = frozenset({
    "taskFailed", "processingFailed", "downloadFailed", "uploadFailed", "modelNotReady",
    "inferenceError", "noAvailableServer", "modelUnavailable", "modelDisabled",
    "mediaStorageFileCouldNotBeMoved",
})  # fmt: skip
NOT_FOUND_CODES = frozenset({"taskFailedOrNotFound", "taskCancelled"})
_VALIDATION_PREFIXES = ("invalid", "missing", "conflict", "duplicate", "unsupported", "value",
                        "array", "max")  # fmt: skip
_VALIDATION_CODES = frozenset({
    "unknownParameter", "incompatibleParameters", "mismatchProviderSettingsProvider",
    "unknownProviderSettingsProvider", "validationFailed",
})  # fmt: skip


class Kind(StrEnum):
    """What a Runware error code is about."""

    QUOTA = "quota"  # the account cannot pay: halt
    AUTH = "auth"  # the key is refused: halt
    RATE = "rate"  # too fast: retry later (the request, not the task)
    SAFETY = "safety"  # content policy: permanent
    TRANSIENT = "transient"  # a timeout, Runware's or a provider's trouble: retry
    NOT_FOUND = "not_found"  # no such task (or it is gone): permanent
    VALIDATION = "validation"  # the request is wrong: permanent
    UNKNOWN = "unknown"  # a code bgswap does not know: permanent, unless the status says


# (test on the code and its lower-case form, kind): first match wins, in the SDK's order.
KIND_RULES: tuple[tuple[Callable[[str, str], bool], Kind], ...] = (
    (lambda c, low: "credit" in low or "balance" in low or "quota" in low, Kind.QUOTA),
    (lambda c, low: c == "paymentRequired", Kind.QUOTA),
    (lambda c, low: "ratelimit" in low, Kind.RATE),
    (lambda c, low: c in SAFETY_CODES, Kind.SAFETY),
    (lambda c, low: c in AUTH_CODES or "apikey" in low, Kind.AUTH),
    (
        lambda c, low: "timeout" in low or c in SERVER_CODES or c in GENERATION_CODES,
        Kind.TRANSIENT,
    ),
    (lambda c, low: c in NOT_FOUND_CODES or c.endswith(("NotFound", "Expired")), Kind.NOT_FOUND),
    (lambda c, low: c.startswith("provider"), Kind.TRANSIENT),  # the model's upstream's trouble
    (
        lambda c, low: c.startswith(_VALIDATION_PREFIXES) or c in _VALIDATION_CODES,
        Kind.VALIDATION,
    ),
)


def error_kind(code: str) -> Kind:
    """The kind of a Runware error code, by pattern (as Runware's SDK), else by name."""
    low = code.lower()
    return next((kind for test, kind in KIND_RULES if test(code, low)), Kind.UNKNOWN)


CONFLICT = "conflictTaskUUID"
SYNC_WAIT_S = 60.0
NOT_FOUND = "taskFailedOrNotFound"


@dataclass(frozen=True)
class RunwareConfig:
    api_url: str
    delivery: str = "async"
    output_type: str = "URL"
    ttl_s: int | None = None
    check_content: bool = False
    webhook_url: str | None = None
    direct_upload: bool = False
    timeout_s: float = 1200.0
    request_timeout_s: float = 30.0
    poll_initial_s: float = 1.0
    poll_max_s: float = 10.0

    @classmethod
    def from_settings(cls, s: Settings) -> RunwareConfig:
        return cls(
            api_url=s.runware_api_url,
            delivery=s.runware_delivery,
            output_type=s.runware_output_type,
            ttl_s=s.runware_ttl_s,
            check_content=s.runware_check_content,
            webhook_url=s.runware_webhook_url,
            direct_upload=s.runware_direct_upload,
            timeout_s=s.runware_timeout_s,
            request_timeout_s=s.runware_request_timeout_s,
            poll_initial_s=s.runware_poll_initial_s,
            poll_max_s=s.runware_poll_max_s,
        )


# -- option mapping (pure) ---------------------------------------------------------


def output_format(spec: JobSpec) -> str:
    return spec.output_format or "JPG"


def ideogram_settings(spec: JobSpec, style_references: list[str] | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if spec.rendering_speed:
        settings["renderingSpeed"] = SPEEDS[spec.rendering_speed]
    if spec.magic_prompt:
        settings["magicPrompt"] = spec.magic_prompt
    if spec.style_type:
        settings["styleType"] = spec.style_type
    if spec.style_preset:
        settings["stylePreset"] = spec.style_preset
    if spec.style_code:
        settings["styleCode"] = spec.style_code.upper()
    if style_references:
        settings["styleReferenceImages"] = style_references
    return settings


def inference_task(
    spec: JobSpec,
    *,
    task_uuid: str,
    seed_image: str,
    style_references: list[str] | None,
    cfg: RunwareConfig,
    upload_endpoint: str | None = None,
    webhook_url: str | None = None,
) -> dict[str, Any]:
    """The imageInference task for one row. Nothing 4@5 rejects is ever sent:
    no width, height, seed, negativePrompt or top-level seedImage."""
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": task_uuid,
        "model": MODEL,
        "positivePrompt": spec.prompt,
        "inputs": {"seedImage": seed_image},
        "outputType": cfg.output_type,
        "outputFormat": output_format(spec),
        "numberResults": spec.num_results,
        "includeCost": True,
        "deliveryMethod": cfg.delivery,
    }
    ideogram = ideogram_settings(spec, style_references)
    if ideogram:
        task["providerSettings"] = {"ideogram": ideogram}
    if spec.output_quality is not None:
        task["outputQuality"] = spec.output_quality
    if cfg.ttl_s is not None and cfg.output_type == "URL":
        task["ttl"] = cfg.ttl_s
    if cfg.check_content:
        task["safety"] = {"checkContent": True}
    if cfg.webhook_url or webhook_url:  # the operator's own URL, if set, wins
        task["webhookURL"] = cfg.webhook_url or webhook_url
    if upload_endpoint:
        task["uploadEndpoint"] = upload_endpoint
    return task


def estimate_cost(spec: JobSpec) -> float:
    speed = SPEEDS[spec.rendering_speed or "BALANCED"]
    return PRICE_PER_IMAGE[speed] * spec.num_results


# -- answers and errors (pure) -------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    data: list[dict[str, Any]]
    errors: list[dict[str, Any]]


def _as_items(value: object) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def parse_payload(body: object) -> Payload:
    """Liberal: `{data, errors}`, `{error}`, a bare list or a bare object."""
    if isinstance(body, list):
        items = _as_items(body)
        return Payload(
            data=[i for i in items if "code" not in i], errors=[i for i in items if "code" in i]
        )
    if not isinstance(body, dict):
        raise ValueError("neither a JSON object nor an array")
    if "data" in body or "errors" in body or "error" in body:
        errors = _as_items(body.get("errors")) + _as_items(body.get("error"))
        return Payload(data=_as_items(body.get("data")), errors=errors)
    return Payload(data=[body], errors=[])


def describe(error: Mapping[str, Any]) -> str:
    code = error.get("code", "error")
    message = str(error.get("message", "")).strip()
    parameter = error.get("parameter")
    where = f" ({parameter})" if parameter else ""
    return f"{code}{where}: {message}"[:500] if message else f"{code}{where}"


# First match wins: the order encodes priority (the account's trouble beats everything; a
# code's kind beats its HTTP status; the status decides only for codes nobody knows).
RULES: tuple[Rule, ...] = (
    (lambda k, s: k == Kind.AUTH or s in (401, 403), ProviderAccountError, Codes.PROVIDER_AUTH),
    (lambda k, s: k == Kind.QUOTA or s == 402, ProviderAccountError, Codes.PROVIDER_CREDITS),
    (lambda k, s: k == Kind.RATE, ProviderUnavailable, Codes.PROVIDER_RATE_LIMITED),
    (lambda k, s: k == Kind.SAFETY, ProviderRejected, Codes.PROVIDER_CONTENT_POLICY),
    (lambda k, s: k == Kind.TRANSIENT, ProviderUnavailable, Codes.PROVIDER_UNAVAILABLE),
    (lambda k, s: k == Kind.NOT_FOUND, ProviderRejected, Codes.PROVIDER_TASK_NOT_FOUND),
    (lambda k, s: k == Kind.VALIDATION, ProviderRejected, Codes.PROVIDER_INVALID_REQUEST),
    (lambda k, s: s in (408, 429), ProviderUnavailable, Codes.PROVIDER_RATE_LIMITED),
    (lambda k, s: s >= 500, ProviderUnavailable, Codes.PROVIDER_UNAVAILABLE),
    (lambda k, s: True, ProviderRejected, Codes.PROVIDER_UNKNOWN_ERROR),
)


def classify(status: int, error: Mapping[str, Any], retry_after_s: float | None) -> BgswapError:
    """Map one Runware error (and the HTTP status it came with) onto the error tree."""
    kind = error_kind(str(error.get("code", "")))
    return classify_by_rules(RULES, kind, status, f"Runware {describe(error)}", retry_after_s)


@dataclass
class Progress:
    """The cumulative state of one task, merged over polls.

    An error marked ``status: "error"`` is one failed result among the task's; an unmarked
    one, about the task, means the task itself is over (``dead``): done, whatever else it
    still reported as processing."""

    successes: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    dead: bool = False

    def merge(self, payload: Payload, task_uuid: str) -> None:
        errors = [e for e in payload.errors if e.get("taskUUID") in (None, task_uuid)]
        self.dead = self.dead or any(e.get("status") != "error" for e in errors)
        for item in payload.data:
            if item.get("taskUUID") not in (None, task_uuid):
                continue
            status = item.get("status", "success" if "imageUUID" in item else None)
            if status == "success" and item.get("imageUUID"):
                self.successes[str(item["imageUUID"])] = item
            elif status == "error":
                errors.append({**item.get("error", {}), "taskUUID": task_uuid})
        # Each answer is cumulative: its errors replace the previous answer's.
        self.errors = errors

    def done(self, expected: int) -> bool:
        return self.dead or len(self.successes) + len(self.errors) >= expected

    @property
    def unknown_task(self) -> bool:
        """Runware says it has no such task (never accepted, or gone)."""
        kinds = {error_kind(str(e.get("code", ""))) for e in self.errors}
        return not self.successes and kinds == {Kind.NOT_FOUND}


@dataclass(frozen=True)
class Answer:
    """One HTTP answer of Runware's, read but not judged."""

    status: int
    payload: Payload
    retry_after_s: float | None


def poll_progress(answer: Answer, task_uuid: str) -> Progress | None:
    """What one getResponse answer says of the task, or None when this poll told nothing
    (a 429, a 5xx: the poll failed, not the task; polls are free, the next one will).

    Raises for the account's trouble (auth, credit: the batch halts), and for a refusal of
    the poll itself. Any other error about the task ends the task, whether or not it is
    marked ``status: "error"`` (``Progress.dead``): a dead task is not polled for the
    20 minutes of the deadline."""
    status, errors = answer.status, answer.payload.errors
    kinds = [error_kind(str(e.get("code", ""))) for e in errors]
    first = errors[0] if errors else {"code": f"http{status}"}
    for error, kind in zip(errors, kinds, strict=True):
        if kind in (Kind.AUTH, Kind.QUOTA):
            raise classify(status, error, answer.retry_after_s)
    if status in (401, 402, 403):
        raise classify(status, first, answer.retry_after_s)
    if status >= 500 or status in (408, 429) or Kind.RATE in kinds:
        return None
    about_task = [e for e in errors if e.get("taskUUID") == task_uuid or e.get("status")]
    if status >= 400 and not about_task:
        raise classify(status, first, answer.retry_after_s)
    progress = Progress()
    progress.merge(answer.payload, task_uuid)
    return progress


# -- HTTP ----------------------------------------------------------------------------


KINDS = {"imageInference": "submit", "getResponse": "poll", "imageUpload": "upload"}


def still_processing(answer: Answer, task_uuid: str) -> bool:
    """Does this answer say only that the task is not done yet (no result, no error, no
    failed poll)? Then its row has nothing to act on."""
    try:
        progress = poll_progress(answer, task_uuid)
    except BgswapError:
        return False
    return progress is not None and not (progress.successes or progress.errors or progress.dead)


def answer_for(answer: Answer, task_uuid: str) -> Answer:
    """One task's part of an answer to several: its items and errors, and those about no
    task in particular (a refusal of the whole request concerns every task in it)."""
    mine = (None, task_uuid)
    payload = Payload(
        [item for item in answer.payload.data if item.get("taskUUID") in mine],
        [error for error in answer.payload.errors if error.get("taskUUID") in mine],
    )
    return Answer(answer.status, payload, answer.retry_after_s)


Submit = tuple[dict[str, Any], Callable[[], None]]  # a task and the hold's guard


def request_kind(tasks: list[dict[str, Any]]) -> str:
    """What a POST is for, by its first task (the metrics' ``kind``)."""
    return KINDS.get(str(tasks[0].get("taskType")) if tasks else "", "other")


class RunwareClient:
    """POSTs task arrays; maps transport trouble and error answers onto the error tree."""

    def __init__(self, cfg: RunwareConfig, api_key: str, http: httpx.Client | None = None) -> None:
        self.cfg = cfg
        self.http = http or httpx.Client(timeout=cfg.request_timeout_s, trust_env=False)
        # The key lives only in this header; never in messages, logs or Redis.
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._shared: SharedRequests[Submit, Payload] = SharedRequests(
            self._post_shared, SUBMIT_BATCH
        )

    def exchange(self, tasks: list[dict[str, Any]], timeout_s: float | None = None) -> Answer:
        """POST the tasks and read the answer; raises only when there is none to read."""
        response = send(
            self.http,
            "POST",
            self.cfg.api_url,
            provider="Runware",
            kind=request_kind(tasks),
            json=tasks,
            headers=self._headers,
            timeout=timeout_s or self.cfg.request_timeout_s,
        )
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        try:
            payload = parse_payload(response.json())
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            if 400 <= status < 500:  # an HTML error page: the status says enough
                raise classify(status, {"code": f"http{status}"}, retry_after) from exc
            # A 2xx or 5xx we cannot read may have been accepted (a submit's).
            unsure = Ambiguous if request_kind(tasks) == "submit" else ProviderUnavailable
            raise unsure(
                Codes.PROVIDER_BAD_RESPONSE, f"Runware answered HTTP {status} without valid JSON"
            ) from exc
        return Answer(status, payload, retry_after)

    def post(self, tasks: list[dict[str, Any]], timeout_s: float | None = None) -> Payload:
        """POST tasks that must be taken (a submit, an upload): a refusal raises."""
        return judge(self.exchange(tasks, timeout_s))

    def submit(self, task: dict[str, Any], guard: Callable[[], None]) -> Payload:
        """``post([task])``, in one request with the submits other threads of this process
        make meanwhile (``SharedRequests``): Runware takes and answers each on its own.
        ``guard`` runs right before the request goes (worker/hold.py), however long the
        task waited for the one before it."""
        return self._shared.send((task, guard))

    def _post_shared(self, items: list[Submit]) -> list[Payload | Exception]:
        outcomes: list[Payload | Exception] = []
        going: list[dict[str, Any]] = []
        for task, guard in items:
            try:
                guard()
            except Exception as exc:  # this worker may not send it now: the others go
                outcomes.append(exc)
                continue
            outcomes.append(Payload([], []))  # a placeholder, replaced below
            going.append(task)
        if not going:
            return outcomes
        try:
            answer = self.exchange(going)
        except BgswapError as err:  # no answer: each submit in it is as unsure as this one
            return [copy.copy(err) if isinstance(o, Payload) else o for o in outcomes]
        judged = iter([self._judge_one(answer, task, len(going)) for task in going])
        return [next(judged) if isinstance(o, Payload) else o for o in outcomes]

    @staticmethod
    def _judge_one(answer: Answer, task: dict[str, Any], shared: int) -> Payload | Exception:
        mine = answer_for(answer, str(task["taskUUID"]))
        if (
            shared > 1
            and 400 <= answer.status < 500
            and not (mine.payload.data or mine.payload.errors)
        ):
            # Refused for another task's sake, nothing said of this one: it goes again
            # (under the same taskUUID, which Runware would refuse to run twice).
            return ProviderUnavailable(
                Codes.PROVIDER_UNAVAILABLE,
                f"Runware refused a shared request (HTTP {answer.status}) without a word "
                "on this task",
            )
        try:
            return judge(mine)
        except (BgswapError, Conflict) as err:  # this task's refusal, not the others'
            return err


def judge(answer: Answer) -> Payload:
    """The answer to tasks that must be taken: their payload, or the refusal raised (a
    5xx is ``Ambiguous``: the task may have been taken)."""
    status, payload, retry_after = answer.status, answer.payload, answer.retry_after_s
    if status >= 400 and not payload.errors:
        payload = Payload(payload.data, [{"code": f"http{status}"}])
    # At 200, errors marked `status: error` are failed generations (task outcomes, for
    # Progress to count); unmarked ones mean the request itself was refused.
    refused = [e for e in payload.errors if e.get("status") != "error"]
    if status >= 400 or (refused and not payload.data):
        first = (refused or payload.errors)[0]
        error = classify(status, first, retry_after)
        if status >= 500:
            raise Ambiguous(error.code, error.message, retry_after_s=error.retry_after_s)
        if first.get("code") == CONFLICT:
            raise Conflict(first)
        raise error
    return payload


class Conflict(Exception):
    """conflictTaskUUID: Runware already has this task (accepted by an earlier attempt)."""


# -- the provider ----------------------------------------------------------------------


class RunwareProvider:
    name = "runware"
    model = MODEL
    cpu_bound = False

    def __init__(self, settings: Settings, http: httpx.Client | None = None) -> None:
        self.cfg = RunwareConfig.from_settings(settings)
        self._key = settings.runware_api_key
        self._http = http
        self._client: RunwareClient | None = None
        # Polls the engine gathered into shared getResponse requests (``prefetch``).
        self._prefetched: Prefetched[Answer | BgswapError] = Prefetched()

    @property
    def client(self) -> RunwareClient:
        # Built on first use: a producer estimating costs needs no key, a worker does.
        if self._client is None:
            if self._key is None:
                raise ProviderAccountError(
                    Codes.PROVIDER_AUTH, "RUNWARE_API_KEY is not set on this worker"
                )
            self._client = RunwareClient(self.cfg, self._key.get_secret_value(), self._http)
        return self._client

    def estimate_cost(self, spec: JobSpec) -> float:
        return estimate_cost(spec)

    def prefetch(self, watches: Sequence[str]) -> set[str]:
        """Poll every watched task in getResponse requests of up to ``POLL_BATCH`` tasks
        each: the engine's way of polling all the rows that are due at once (Runware
        answers each task of a request on its own, matched here by taskUUID). Returns the
        tasks still plainly processing."""
        pending: set[str] = set()
        for start in range(0, len(watches), POLL_BATCH):
            chunk = watches[start : start + POLL_BATCH]
            tasks = [{"taskType": "getResponse", "taskUUID": task_uuid} for task_uuid in chunk]
            try:
                answer = self.client.exchange(tasks)
            except BgswapError as err:  # each row's step takes it as its own poll's failure
                for task_uuid in chunk:
                    self._prefetched.put(task_uuid, err)
                continue
            for task_uuid in chunk:
                mine = answer_for(answer, task_uuid)
                # Kept even when it only says "not yet": the engine may step the row anyway.
                self._prefetched.put(task_uuid, mine)
                if still_processing(mine, task_uuid):
                    self._prefetched.unready(task_uuid)
                    pending.add(task_uuid)
        return pending

    def step(self, job: Job, ctx: ProviderContext) -> ProviderResult | Wait | Deferred:
        try:
            return self._step(job, ctx)
        except GenerationFailed:
            # That task is spent; the retry submits a new one (the uploads stay valid).
            memory = ctx.memory.load()
            ctx.memory.save({"uploads": memory.get("uploads", {})})
            raise

    def _step(self, job: Job, ctx: ProviderContext) -> ProviderResult | Wait | Deferred:
        """Submit (once) or poll (once); then the results, or how long to wait."""
        self.client  # noqa: B018 - fails fast (and halts the batch) without a key
        memory = ctx.memory.load()
        # Saved with `attempted`, before the submission (_submit): before anything is paid.
        memory.setdefault("task_uuid", str(uuid.uuid4()))
        task_uuid = memory["task_uuid"]
        logs.bind(provider_task_id=task_uuid)
        direct = self._direct_destination(job, ctx)
        polled = bool(memory.get("accepted"))  # else the slot was just taken: no keep
        progress: Progress | None
        if polled:
            stop_if_canceled(ctx, f"Runware task {task_uuid}")
            progress = self._poll(task_uuid)
        else:
            submitted = self._submit(self._task(job, task_uuid, direct, memory, ctx), memory, ctx)
            if isinstance(submitted, Deferred):
                return submitted
            progress = submitted
        if progress is not None and progress.done(job.spec.num_results):
            if polled:  # a sync answer's time is the request's, not a poll schedule's
                unready = self._prefetched.unready_at(task_uuid)
                generated(ctx, memory.get("accepted_at"), memory, unready)
            if ctx.limits is not None:
                ctx.limits.release()  # Runware is done with it: the next row may go
            return self._result(job, task_uuid, progress, direct, ctx)
        if ctx.limits is not None and polled:
            ctx.limits.keep()  # still in flight: keep the slot's lease alive
        hooked = bool(ctx.webhook) and not self.cfg.webhook_url
        return next_wait(
            memory, ctx.memory, ctx,
            initial_s=self.cfg.poll_initial_s, max_s=self.cfg.poll_max_s,
            timeout_s=self.cfg.timeout_s, what=f"Runware task {task_uuid}",
            # With our completion webhook, the close polls are not needed: its call is the
            # signal (worker/completions.py), the backoff only the fallback.
            expected=None if hooked else ctx.expected,
            watch=task_uuid, close_s=None if hooked else CLOSE_POLL_S,
        )  # fmt: skip

    def _task(
        self, job: Job, task_uuid: str, direct: str | None, memory: dict[str, Any],
        ctx: ProviderContext,
    ) -> dict[str, Any]:  # fmt: skip
        return inference_task(
            job.spec,
            task_uuid=task_uuid,
            seed_image=self._reference(job.spec.image, "image", memory, ctx),
            style_references=[
                self._reference(ref, f"style_reference_images[{n}]", memory, ctx)
                for n, ref in enumerate(job.spec.style_reference_images or ())
            ]
            or None,
            cfg=self.cfg,
            upload_endpoint=ctx.storage.presign_put(direct, None)
            if direct and ctx.storage
            else None,
            webhook_url=ctx.webhook,
        )

    # submission ---------------------------------------------------------------

    def _submit(
        self, task: dict[str, Any], memory: dict[str, Any], ctx: ProviderContext
    ) -> Progress | Deferred:
        task_uuid = task["taskUUID"]
        if memory.get("accepted"):
            return Progress()
        if memory.get("attempted") and self._known(task_uuid) is not None:
            return self._accepted(memory, ctx, Progress())
        deferred = ctx.limits.admit() if ctx.limits is not None else None
        if deferred is not None:  # the account's rate or in-flight cap: not now
            return deferred
        # The intent, saved under this worker's hold (worker/hold.py) before anything is
        # sent: a worker that takes the row over asks getResponse about this uuid first.
        memory["attempted"] = True
        ctx.memory.save(memory)
        ctx.guard()
        # A sync answer is waited for up to a minute; a longer generation times out
        # into the ambiguous path, which finds the task and polls it like an async one.
        timeout = min(self.cfg.timeout_s, SYNC_WAIT_S) if self.cfg.delivery == "sync" else None
        try:
            if timeout is None:
                payload = self.client.submit(task, ctx.guard)
            else:  # a sync submit waits for its generation: alone
                payload = self.client.post([task], timeout_s=timeout)
        except Ambiguous as err:
            return self._resolve(task_uuid, memory, ctx, err)
        except ProviderUnavailable as err:
            if err.code == Codes.PROVIDER_RATE_LIMITED and ctx.limits is not None:
                ctx.limits.slow_down()  # Runware says too fast: every worker slows down
            raise
        except Conflict:
            log.info("task %s was already accepted: polling it", task_uuid)
            return self._accepted(memory, ctx, Progress())
        progress = Progress()
        progress.merge(payload, task_uuid)
        return self._accepted(memory, ctx, progress)

    def _resolve(
        self, task_uuid: str, memory: dict[str, Any], ctx: ProviderContext, err: Ambiguous
    ) -> Progress:
        """Maybe accepted, maybe not: ask before anything is sent again."""
        known = self._known(task_uuid)
        if known is None:
            # Runware never took it: the retry may send it (the same taskUUID, which
            # Runware would refuse to run a second time).
            raise ProviderUnavailable(err.code, err.message, retry_after_s=err.retry_after_s)
        return self._accepted(memory, ctx, known)

    def _accepted(
        self, memory: dict[str, Any], ctx: ProviderContext, progress: Progress
    ) -> Progress:
        # Not saved here: the wait that follows saves it (next_wait), and a row that stops
        # before that has `attempted` saved, which resolves through getResponse, not a
        # second submission. One Redis write less per row.
        memory["accepted"] = True
        # When Runware took it, for the generation-time histogram (saved with the wait).
        memory.setdefault("accepted_at", time.time())
        return progress

    def _known(self, task_uuid: str) -> Progress | None:
        """The task's state if Runware has it, None if it does not (never accepted)."""
        answer = self.client.exchange([{"taskType": "getResponse", "taskUUID": task_uuid}])
        progress = poll_progress(answer, task_uuid)
        if progress is None:
            raise ProviderUnavailable(
                Codes.PROVIDER_UNAVAILABLE,
                f"Runware could not say whether it has task {task_uuid} (HTTP {answer.status})",
                retry_after_s=answer.retry_after_s,
            )
        return None if progress.unknown_task else progress

    # waiting -------------------------------------------------------------------

    def _poll(self, task_uuid: str) -> Progress | None:
        """One getResponse (or its answer, when the engine polled ahead: ``prefetch``);
        None when the poll itself failed (polls are free: a 429, 5xx or timeout while
        polling just waits for the next one)."""
        answer = self._prefetched.take(task_uuid)
        try:
            if isinstance(answer, BgswapError):
                raise copy.copy(answer)  # one instance per row: each raise sets a traceback
            if answer is None:
                answer = self.client.exchange([{"taskType": "getResponse", "taskUUID": task_uuid}])
        except ProviderUnavailable as err:
            log.info("poll of %s: %s", task_uuid, err.code)
            return None
        return poll_progress(answer, task_uuid)

    # inputs and outputs -----------------------------------------------------------

    def _reference(
        self, ref: str, field_name: str, memory: dict[str, Any], ctx: ProviderContext
    ) -> str:
        """Public URLs and data URIs go as they are; local files and s3:// objects are
        uploaded once (imageUpload) and referred to by their imageUUID."""
        return reference_for_provider(
            ref,
            field_name,
            memory,
            ctx,
            upload=self._upload,
            passthrough=frozenset({"http", "https", "data"}),
        )

    def _upload(self, data: bytes) -> str:
        mime = Image.MIME.get(image_info(data)[0] or "", "image/png")
        image = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        task = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": image}
        try:
            payload = self.client.post([task])
        except Ambiguous as err:
            # Uploads are free: retrying one that did land costs nothing.
            raise ProviderUnavailable(
                err.code, err.message, retry_after_s=err.retry_after_s
            ) from err
        for item in payload.data:
            if item.get("imageUUID"):
                return str(item["imageUUID"])
        raise ProviderUnavailable(
            Codes.PROVIDER_BAD_RESPONSE, "Runware imageUpload gave no imageUUID"
        )

    def _direct_destination(self, job: Job, ctx: ProviderContext) -> str | None:
        """Where Runware may upload the result itself (one result, an s3:// destination:
        only there can we check that the object really arrived)."""
        if not (self.cfg.direct_upload and ctx.storage and job.spec.num_results == 1):
            return None
        dest = output_destination(job.dest, EXTENSIONS[output_format(job.spec)], 1, 1)
        return dest if reference_scheme(dest) == "s3" else None

    def _result(
        self, job: Job, task_uuid: str, progress: Progress, direct: str | None, ctx: ProviderContext
    ) -> ProviderResult:
        if not progress.successes:
            raise _generation_error(progress.errors, task_uuid)
        if progress.errors:
            log.warning("task %s: %d of %d results failed", task_uuid, len(progress.errors),
                        job.spec.num_results)  # fmt: skip
        fmt = output_format(job.spec)
        items = list(progress.successes.values())
        outputs = [self._output(item, fmt, direct, ctx) for item in items]
        cost = sum(float(item.get("cost") or 0.0) for item in items)
        return ProviderResult(outputs=outputs, cost_usd=round(cost, 6), provider_task_id=task_uuid)

    def _output(
        self, item: dict[str, Any], fmt: str, direct: str | None, ctx: ProviderContext
    ) -> OutputImage:
        content_type, ext = CONTENT_TYPES[fmt], EXTENSIONS[fmt]
        seed = item.get("seed") if isinstance(item.get("seed"), int) else None
        nsfw = item.get("NSFWContent") if isinstance(item.get("NSFWContent"), bool) else None
        stored = self._verify_direct(direct, content_type, ctx) if direct else None
        if stored is not None:
            return OutputImage(b"", content_type, ext, None, None, seed, nsfw, stored)
        data = self._download(item, ctx)
        _, width, height = image_info(data)
        return OutputImage(data, content_type, ext, width, height, seed, nsfw)

    def _verify_direct(
        self, dest: str, content_type: str, ctx: ProviderContext
    ) -> StoredObject | None:
        assert ctx.storage is not None
        # Runware's upload may land just after the task reports success.
        for delay in (0.0, 0.5, 1.5):
            ctx.sleep(delay)
            size = ctx.storage.head(dest)
            if size:
                key = dest.removeprefix("s3://").partition("/")[2]
                return StoredObject(url=dest, key=key, content_type=content_type, bytes=size)
        log.warning("Runware's upload to %s did not arrive: downloading instead", dest)
        return None

    def _download(self, item: dict[str, Any], ctx: ProviderContext) -> bytes:
        if item.get("imageBase64Data"):
            return base64.b64decode(item["imageBase64Data"])
        if item.get("imageDataURI"):
            return base64.b64decode(str(item["imageDataURI"]).partition(",")[2])
        if item.get("imageURL"):
            with metrics.timed_request("runware", "download"):
                return ctx.fetch(str(item["imageURL"]), "result")
        raise ProviderUnavailable(Codes.PROVIDER_BAD_RESPONSE, "Runware result without an image")


def _generation_error(errors: Iterable[Mapping[str, Any]], task_uuid: str) -> BgswapError:
    first = next(iter(errors), {"code": "taskFailed", "message": "no result"})
    error = classify(0, first, None)
    if isinstance(error, ProviderUnavailable):
        # A failed generation is not billed; the next attempt needs a fresh task.
        return GenerationFailed(Codes.PROVIDER_GENERATION_FAILED, error.message)
    return error


class GenerationFailed(ProviderUnavailable):
    """A generation failed on Runware's side: retried as a new task (new taskUUID)."""


SPEC = ProviderSpec(
    name="runware",
    # The seed's ideogram:4@5: up to 20 results, every style type, no palette, no seed.
    caps=ProviderCaps(
        max_results=20, style_types=frozenset(STYLE_TYPES), color_palette=False, seed=False
    ),
    make=RunwareProvider,
    account=Account(
        key_variable="RUNWARE_API_KEY",
        key=lambda settings: settings.runware_api_key,
        rate=lambda settings: settings.runware_rate,
        max_in_flight=lambda settings: settings.runware_max_in_flight,
    ),
    webhooks=True,
)
