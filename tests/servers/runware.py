"""A fake Runware REST API (``imageInference`` on ``ideogram:4@5``), as strict as the real one.

Written from Runware's API docs, its SDK and the model's page, not from our client.

    with FakeRunware("rw-test-key", processing_s=0.2) as fake:
        httpx.post(fake.url, json=[task], headers={"Authorization": "Bearer rw-test-key"})
        assert fake.accept_count(task["taskUUID"]) == 1

What it enforces
----------------
Transport: only ``POST /v1`` (other methods on /v1: 405; other paths: 404, except
``GET|HEAD /images/<imageUUID>.<ext>`` for finished results); ``Authorization: Bearer <key>``
(checked first: 401 ``missingApiKey`` / ``invalidApiKey``, ``parameter: "apiKey"``,
``taskType: "authentication"``); ``Content-Type: application/json``; the body a non-empty JSON
array of objects (else 400 ``invalidPayload``). Errors are per task: the answer is
``{"data": [...], "errors": [...]}`` with empty keys left out (except ``{"data": []}`` when
tasks succeeded with nothing to show, e.g. an empty async ack); status 200 when at least one
task succeeded (async acks and getResponse polls count as successes), else the status of the
first error.

``imageInference``: required taskType, taskUUID (canonical lower-case UUID v4), model exactly
``ideogram:4@5``, positivePrompt (1-2000 chars), ``inputs.seedImage``; only the top-level keys
of ``_TOP_LEVEL`` (width, height, seed, negativePrompt, a top-level seedImage... are refused),
only ``inputs.seedImage``, only ``providerSettings.ideogram`` with its six options; enums,
integer ranges (bool is not an int), booleans and http(s) URLs checked; styleCode with
styleType or styleReferenceImages, and ttl with a non-URL outputType, are incompatible.
seedImage and styleReferenceImages are really resolved: an imageUpload UUID of this fake, an
http(s) URL fetched with urllib (5 s timeout, no proxy), a data URI or bare base64; the bytes
must open with Pillow as PNG, JPEG or WEBP. A taskUUID already accepted is refused (not run,
not billed again).

Acceptance = payment: ``accepted``, ``paid`` and ``accept_count()`` record it. An accepted
task produces ``numberResults`` images (the seed image inverted and tinted per result index,
same size, in outputFormat/outputQuality); the whole task takes ``processing_s``, result i of
n finishing at ``start + processing_s * (i + 1) / n``. With ``processing_spread=f`` each task
takes its own time instead, drawn uniformly from ``processing_s * (1 +- f)`` by an RNG seeded
with ``spread_seed``; the job keeps it (``accepted_at``, ``processing_s``). A job thread completes results in
order: PUT to uploadEndpoint first (so a success is only reported once its upload was tried),
then the result becomes visible, then the webhook POST.

Error codes (HTTP status)
-------------------------
401 missingApiKey, invalidApiKey; 405 methodNotAllowed; 404 notFound;
400 invalidPayload (not a JSON array of objects, wrong Content-Type), invalidTaskType (missing
or unknown taskType), invalidTaskUUID, unsupportedParameter (unknown key; ``parameter`` is its
dotted path, e.g. ``inputs.mask``), invalidParameterValue (wrong type, enum or range;
``parameter`` is the dotted path, e.g. ``providerSettings.ideogram.stylePreset``), invalidModel
(missing or wrong model), missingPositivePrompt, invalidPositivePrompt, missingSeedImage,
invalidSeedImage, invalidStyleReferenceImage (``parameter`` like
``providerSettings.ideogram.styleReferenceImages[1]``), incompatibleParameters,
conflictTaskUUID, taskFailedOrNotFound (getResponse of an unknown task), missingImage /
invalidImage (imageUpload). Generation failures (``inject("generation_error", code=...)``):
the given code; for sync delivery the status is 400 for contentPolicyViolation and
nsfwContentDetected, 504 for timeoutProvider, else 500 (``status=`` overrides).

Choices made where the reference is UNCONFIRMED
-----------------------------------------------
- Async acknowledgement: ``{"data": []}`` (``ack_style="empty"``) or
  ``{"data": [{"taskType", "taskUUID"}]}`` (``"item"``, the default).
- Failed generations in getResponse: in ``errors`` with ``status: "error"`` (default), inside
  ``data`` as ``{"taskType", "taskUUID", "status": "error", "error": {code, message}}``
  (``"data"``), or in ``errors`` without any ``status`` (``"unmarked"``: the task's error as a
  refusal of the poll would look, which Runware's SDK treats as the task's end all the same);
  one entry per failed result, repeated in every later poll like successes. A poll of a known
  task answers 200 even when all its results failed.
- getResponse: success items carry ``status: "success"``; one ``status: "processing"`` item
  stands for all unfinished results. Sync items carry no ``status`` (as the seed page shows).
- imageUpload: ``data`` is a list, or a bare object with ``upload_data_as_object=True`` (when
  the answer holds exactly one upload item). Images are stored as PNG, at most 2048 px.
- uploadEndpoint: raw bytes of every result (all to the same URL),
  ``Content-Type: image/jpeg|png|webp``; a failed PUT does not fail
  the task (the client must verify). ``uploads`` records ``(url, status)``: the HTTP status,
  0 for a network failure, -1 when skipped by ``upload_fails=True``.
- webhookURL: one POST per result of ``{"data": [item]}`` (a sync-style item) or, for a failed
  generation, ``{"errors": [error]}``; recorded in ``webhooks`` as ``(url, status, payload)``;
  not retried.
- cost (0.03 TURBO, 0.06 DEFAULT or absent, 0.09 QUALITY, per result) only with
  ``includeCost: true`` (the seed page's responses show cost without it: the dashboard may add
  it); ``NSFWContent: false`` only with ``safety.checkContent: true``.
- ``Authorization`` is the only way to authenticate: a body ``authentication`` task is an
  unknown taskType here.
- An accepted task whose generation fails is still counted in ``paid``.

Fault injection (``inject``; consumable, thread-safe; ``task_type=None`` matches any request,
otherwise a request matches when one of its tasks has that taskType): ``status`` (answer
``status`` with ``{"errors": [{code, message}]}`` and optional Retry-After, before accepting),
``accept_then_500`` (accept, then answer ``status`` (500) with a gateway's HTML page),
``accept_then_drop`` (accept, then close the connection without an answer), ``malformed``
(200 with a truncated JSON body; before accepting, or after with ``after_accept=True``),
``slow`` (wait ``delay_s`` first, then handle normally, possibly accepting after the client
gave up), ``generation_error`` (the next accepted imageInference fails with ``code``).
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from PIL import Image

from servers.http import (
    INPUT_FORMATS,
    WEB_FORMATS,
    FakeHTTPServer,
    Fault,
    Faults,
    RecordedCall,
    Reply,
    decode_base64,
    decode_data_uri,
    deliver,
    fetch_url,
    is_http_url,
    json_reply,
    open_image,
    render_result,
)
from worker.jobs import STYLE_PRESETS

MODEL = "ideogram:4@5"
API_PATH = "/v1"
SIGNUP_URL = "https://my.runware.ai/signup"
DOCS_URL = "https://runware.ai/docs/en/image-inference/api-reference"
UPLOAD_MAX_SIDE = 2048

STYLE_TYPES = ("AUTO", "GENERAL", "REALISTIC", "DESIGN", "RENDER_3D", "ANIME", "FICTION")
COST_PER_RESULT = {"TURBO": 0.03, "DEFAULT": 0.06, "QUALITY": 0.09}
OUTPUT_FORMATS = {"JPG": ("JPEG", "jpg", "image/jpeg"), "PNG": ("PNG", "png", "image/png"),
                  "WEBP": ("WEBP", "webp", "image/webp")}  # fmt: skip
SEED_FORMATS = WEB_FORMATS
UPLOAD_FORMATS = INPUT_FORMATS

AckStyle = Literal["empty", "item"]
ErrorPlacement = Literal["errors", "data", "unmarked"]
FaultKind = Literal[
    "status", "accept_then_500", "accept_then_drop", "malformed", "slow", "generation_error"
]
FAULT_KINDS = frozenset(
    {"status", "accept_then_500", "accept_then_drop", "malformed", "slow", "generation_error"}
)
_FAULT_REQUIRED: dict[str, tuple[str, ...]] = {
    "status": ("status", "code"),
    "slow": ("delay_s",),
    "generation_error": ("code",),
}
_GENERATION_FAILURES: dict[str, tuple[int, str]] = {
    "contentPolicyViolation": (400, "The request was rejected by the provider's content policy."),
    "nsfwContentDetected": (400, "NSFW content was detected in the generated image."),
    "timeoutProvider": (504, "The external provider did not respond within the timeout window."),
}
_UUID4_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_ANY_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_STYLE_CODE_RE = re.compile(r"[0-9A-Fa-f]{8}")
_GATEWAY_500 = b"<html><body><h1>500 Internal Server Error</h1></body></html>\n"
_TRUNCATED_JSON = b'{"data": [{"taskType": "imageInference", "taskU'


# --- errors ----------------------------------------------------------------------------------


class TaskError(Exception):
    """One task's error: becomes an entry of ``errors`` (and the status if nothing succeeded)."""

    def __init__(self, status: int, code: str, message: str, parameter: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.parameter = parameter

    def as_json(self, task: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.parameter is not None:
            out["parameter"] = self.parameter
        for key in ("taskType", "taskUUID"):
            if isinstance(task.get(key), str):
                out[key] = task[key]
        if task.get("taskType") == "imageInference":
            out["documentation"] = DOCS_URL
        return out


def _invalid(path: str, message: str) -> TaskError:
    return TaskError(400, "invalidParameterValue", message, path)


def _unsupported(path: str) -> TaskError:
    return TaskError(
        400, "unsupportedParameter", f"Unsupported parameter '{path}' for model {MODEL}.", path
    )


# --- field validators, driven by tables ------------------------------------------------------

Validator = Callable[[Any, str], None]


def _enum(*allowed: str) -> Validator:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str) or value not in allowed:
            shown = ", ".join(allowed) if len(allowed) <= 8 else f"one of {len(allowed)} values"
            raise _invalid(path, f"Invalid value {value!r} for '{path}'. Allowed: {shown}.")

    return check


def _integer(low: int, high: int | None = None) -> Validator:
    def check(value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(path, f"'{path}' must be an integer, not {value!r}.")
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise _invalid(path, f"'{path}' must be {bounds}, not {value}.")

    return check


def _boolean(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        raise _invalid(path, f"'{path}' must be a boolean, not {value!r}.")


def _http_url(value: Any, path: str) -> None:
    if not is_http_url(value):
        raise _invalid(path, f"'{path}' must be an http(s) URL, not {value!r}.")


def _style_code(value: Any, path: str) -> None:
    if not isinstance(value, str) or not _STYLE_CODE_RE.fullmatch(value):
        raise _invalid(path, f"'{path}' must be 8 hexadecimal characters, not {value!r}.")


def _string_list(low: int, high: int) -> Validator:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list) or not low <= len(value) <= high:
            raise _invalid(path, f"'{path}' must be a list of {low} to {high} images.")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise _invalid(f"{path}[{index}]", f"'{path}[{index}]' must be a string.")

    return check


def _object(fields: Mapping[str, Validator]) -> Validator:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _invalid(path, f"'{path}' must be an object.")
        for key in value:
            if key not in fields:
                raise _unsupported(f"{path}.{key}")
        for key, item in value.items():
            fields[key](item, f"{path}.{key}")

    return check


def _elsewhere(value: Any, path: str) -> None:
    """A required field, checked by its own rule."""


_IDEOGRAM = _object(
    {
        "renderingSpeed": _enum("TURBO", "DEFAULT", "QUALITY"),
        "magicPrompt": _enum("AUTO", "ON", "OFF"),
        "styleType": _enum(*STYLE_TYPES),
        "stylePreset": _enum(*STYLE_PRESETS),
        "styleCode": _style_code,
        "styleReferenceImages": _string_list(1, 4),
    }
)
_TOP_LEVEL: dict[str, Validator] = {
    "taskType": _elsewhere,
    "taskUUID": _elsewhere,
    "model": _elsewhere,
    "positivePrompt": _elsewhere,
    "inputs": _elsewhere,
    "providerSettings": _object({"ideogram": _IDEOGRAM}),
    "outputType": _enum("URL", "base64Data", "dataURI"),
    "outputFormat": _enum(*OUTPUT_FORMATS),
    "outputQuality": _integer(20, 99),
    "webhookURL": _http_url,
    "deliveryMethod": _enum("sync", "async"),
    "uploadEndpoint": _http_url,
    "safety": _object({"checkContent": _boolean, "mode": _enum("none", "fast")}),
    "ttl": _integer(60),
    "includeCost": _boolean,
    "numberResults": _integer(1, 20),
}


def _check_task_uuid(task: Mapping[str, Any]) -> None:
    value = task.get("taskUUID")
    if not isinstance(value, str) or not _UUID4_RE.fullmatch(value):
        raise TaskError(
            400,
            "invalidTaskUUID",
            f"Invalid taskUUID {value!r}: a UUID v4 in canonical form is required.",
            "taskUUID",
        )


def _check_keys(task: Mapping[str, Any], allowed: Mapping[str, object] | frozenset[str]) -> None:
    for key in task:
        if key not in allowed:
            raise _unsupported(key)


def _check_top_level_keys(task: Mapping[str, Any]) -> None:
    _check_keys(task, _TOP_LEVEL)


def _check_model(task: Mapping[str, Any]) -> None:
    if task.get("model") != MODEL:
        raise TaskError(
            400, "invalidModel", f"Invalid model {task.get('model')!r}: expected {MODEL}.", "model"
        )


def _check_prompt(task: Mapping[str, Any]) -> None:
    if "positivePrompt" not in task:
        raise TaskError(
            400, "missingPositivePrompt", "positivePrompt is required.", "positivePrompt"
        )
    prompt = task["positivePrompt"]
    if not isinstance(prompt, str) or not 1 <= len(prompt) <= 2000:
        raise TaskError(
            400,
            "invalidPositivePrompt",
            "positivePrompt must be a string of 1 to 2000 characters.",
            "positivePrompt",
        )


def _check_inputs(task: Mapping[str, Any]) -> None:
    if "inputs" not in task:
        raise TaskError(
            400, "missingSeedImage", "inputs.seedImage is required.", "inputs.seedImage"
        )
    inputs = task["inputs"]
    if not isinstance(inputs, dict):
        raise _invalid("inputs", "'inputs' must be an object.")
    for key in inputs:
        if key != "seedImage":
            raise _unsupported(f"inputs.{key}")
    if "seedImage" not in inputs:
        raise TaskError(
            400, "missingSeedImage", "inputs.seedImage is required.", "inputs.seedImage"
        )
    if not isinstance(inputs["seedImage"], str) or not inputs["seedImage"]:
        raise TaskError(
            400, "invalidSeedImage", "inputs.seedImage must be a string.", "inputs.seedImage"
        )


def _check_optional_fields(task: Mapping[str, Any]) -> None:
    for key, value in task.items():
        _TOP_LEVEL[key](value, key)


def _check_combinations(task: Mapping[str, Any]) -> None:
    ideogram = task.get("providerSettings", {}).get("ideogram", {})
    for other in ("styleType", "styleReferenceImages"):
        if "styleCode" in ideogram and other in ideogram:
            raise TaskError(
                400,
                "incompatibleParameters",
                f"styleCode cannot be combined with {other}.",
                "providerSettings.ideogram.styleCode",
            )
    if "ttl" in task and task.get("outputType", "URL") != "URL":
        raise TaskError(
            400, "incompatibleParameters", "ttl only applies when outputType is URL.", "ttl"
        )


_INFERENCE_RULES: tuple[Callable[[Mapping[str, Any]], None], ...] = (
    _check_task_uuid,
    _check_top_level_keys,
    _check_model,
    _check_prompt,
    _check_inputs,
    _check_optional_fields,
    _check_combinations,
)


# --- jobs --------------------------------------------------------------------------------------


@dataclass
class _Result:
    index: int
    image_uuid: str
    seed: int
    data: bytes
    due: float = 0.0
    finished: bool = False


@dataclass(frozen=True)
class _Failure:
    code: str
    message: str
    status: int


@dataclass
class _Job:
    task_uuid: str
    body: dict[str, Any]
    results: list[_Result]
    output_type: str
    output_format: str
    cost: float | None
    check_content: bool
    sync: bool
    failure: _Failure | None = None
    accepted_at: float = 0.0  # monotonic
    processing_s: float = 0.0

    @property
    def extension(self) -> str:
        return OUTPUT_FORMATS[self.output_format][1]

    @property
    def content_type(self) -> str:
        return OUTPUT_FORMATS[self.output_format][2]


@dataclass
class _Outcome:
    """What one task contributes to the answer."""

    data: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_status: int | None = None  # None: the task succeeded
    wait_for: _Job | None = None  # a sync task: answer once it is done


def _errors_reply(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: str
) -> Reply:
    return json_reply(status, {"errors": [{"code": code, "message": message, **extra}]}, headers)


def _fault_reply(fault: Fault) -> Reply:
    params = fault.params
    if fault.kind == "status":
        headers = {}
        if params.get("retry_after") is not None:
            headers["Retry-After"] = str(params["retry_after"])
        message = params.get("message", f"Injected {params['code']}.")
        error = {"code": params["code"], "message": message}
        return json_reply(int(params["status"]), {"errors": [error]}, headers)
    if fault.kind == "malformed":
        body = params.get("body", _TRUNCATED_JSON)
        return Reply(200, body, {"Content-Type": "application/json"})
    if fault.kind == "accept_then_500":
        body = params.get("body", _GATEWAY_500)
        return Reply(int(params.get("status", 500)), body, {"Content-Type": "text/html"})
    return Reply(0, drop=True)


# --- the fake ----------------------------------------------------------------------------------


class FakeRunware(FakeHTTPServer):
    """Context manager: a strict fake of Runware's REST API on 127.0.0.1 and a free port."""

    def __init__(
        self,
        api_key: str = "rw-test-key",
        *,
        processing_s: float = 0.2,
        ack_style: AckStyle = "item",
        error_placement: ErrorPlacement = "errors",
        upload_data_as_object: bool = False,
        upload_fails: bool = False,
        processing_spread: float = 0.0,
        spread_seed: int = 0,
        download_delay_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        # The results' CDN is a server of its own, and can be slow while the API is not.
        self.download_delay_s = download_delay_s
        self.processing_s = processing_s
        self.processing_spread = processing_spread
        self._spread_rng = random.Random(spread_seed)
        self.ack_style = ack_style
        self.error_placement = error_placement
        self.upload_data_as_object = upload_data_as_object
        self.upload_fails = upload_fails
        self.requests: list[RecordedCall] = []
        self.accepted: dict[str, dict[str, Any]] = {}
        self.paid: list[str] = []
        self.uploads: list[tuple[str, int]] = []
        self.webhooks: list[tuple[str, int, dict[str, Any]]] = []
        self._received: list[dict[str, Any]] = []
        self._accept_counts: Counter[str] = Counter()
        self._jobs: dict[str, _Job] = {}
        self._uploaded: dict[str, bytes] = {}
        self._images: dict[str, tuple[bytes, str]] = {}  # "<imageUUID>.<ext>" -> data, type
        self._faults = Faults(FAULT_KINDS, _FAULT_REQUIRED)
        self._rng = random.Random()
        self._handlers: dict[str, Callable[[dict[str, Any]], _Outcome]] = {
            "imageInference": self._image_inference,
            "getResponse": self._get_response,
            "imageUpload": self._image_upload,
        }

    # --- public API --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The API endpoint."""
        return f"{self.base_url}{API_PATH}"

    def inject(
        self,
        kind: FaultKind,
        *,
        task_type: str | None = "imageInference",
        times: int = 1,
        **params: Any,
    ) -> None:
        """Arm a fault for the next ``times`` matching requests (or accepted tasks)."""
        self._faults.arm(kind, task_type, times, params)

    def tasks(self, task_type: str) -> list[dict[str, Any]]:
        """Every task object received with that taskType, accepted or not, in order."""
        with self.lock:
            return [task for task in self._received if task.get("taskType") == task_type]

    def accept_count(self, task_uuid: str) -> int:
        with self.lock:
            return self._accept_counts[task_uuid]

    def add_image(self, data: bytes) -> str:
        """Store an image as if uploaded with imageUpload; returns its imageUUID."""
        image = open_image(data, UPLOAD_FORMATS)
        if image is None:
            raise ValueError("not an image Pillow can open")
        return self._store_upload(image)

    def image(self, image_uuid: str) -> bytes | None:
        """The bytes of a finished result, whatever its outputType."""
        with self.lock:
            for name, (data, _) in self._images.items():
                if name.split(".", 1)[0] == image_uuid:
                    return data
        return None

    def pending_faults(self, task_type: str | None = None) -> int:
        return self._faults.pending(task_type)

    # --- routing -----------------------------------------------------------------------------

    def dispatch(self, call: RecordedCall, raw: bytes) -> Reply:
        with self.lock:
            self.requests.append(call)
        path = urlsplit(call.path).path
        if path == API_PATH:
            if call.method != "POST":
                return _errors_reply(405, "methodNotAllowed", "Use POST.", {"Allow": "POST"})
            return self._api(call)
        if path.startswith("/images/") and call.method in ("GET", "HEAD"):
            if self.download_delay_s and self.stopping.wait(self.download_delay_s):
                return Reply(0, drop=True)
            with self.lock:
                found = self._images.get(path.removeprefix("/images/"))
            if found is not None:
                return Reply(200, found[0], {"Content-Type": found[1]})
        return _errors_reply(404, "notFound", f"No route for {call.method} {path}.")

    def _api(self, call: RecordedCall) -> Reply:
        tasks = self._parse_tasks(call.body)
        task_types = {str(task.get("taskType")) for task in tasks or []}
        slow = self._faults.take(task_types, lambda f: f.kind == "slow")
        if slow is not None and self.stopping.wait(float(slow.params["delay_s"])):
            return Reply(0, drop=True)
        refusal = self._check_transport(call, tasks)
        if refusal is not None or tasks is None:
            return refusal or _errors_reply(400, "invalidPayload", "Invalid payload.")
        pre = self._faults.take(task_types, Fault.is_pre_accept)
        if pre is not None:
            return _fault_reply(pre)
        post = self._faults.take(task_types, Fault.is_post_accept)
        outcomes = [self._run_task(task) for task in tasks]
        if post is not None:
            return _fault_reply(post)
        return self._assemble([self._finish_sync(outcome) for outcome in outcomes])

    def _parse_tasks(self, body: Any) -> list[dict[str, Any]] | None:
        if not isinstance(body, list) or not body:
            return None
        if not all(isinstance(task, dict) for task in body):
            return None
        with self.lock:
            self._received.extend(body)
        return body

    def _check_transport(self, call: RecordedCall, tasks: list[Any] | None) -> Reply | None:
        authorization = call.headers.get("authorization", "")
        scheme, _, key = authorization.partition(" ")
        if not authorization.strip():
            return _errors_reply(
                401,
                "missingApiKey",
                f"Missing API key. Get one at {SIGNUP_URL}",
                parameter="apiKey",
                taskType="authentication",
            )
        if scheme != "Bearer" or key != self.api_key:
            return _errors_reply(
                401,
                "invalidApiKey",
                f"Invalid API key. Get one at {SIGNUP_URL}",
                parameter="apiKey",
                taskType="authentication",
            )
        content_type = call.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return _errors_reply(
                400,
                "invalidPayload",
                f"Content-Type must be application/json, not {content_type!r}.",
            )
        if tasks is None:
            return _errors_reply(
                400, "invalidPayload", "The body must be a non-empty JSON array of task objects."
            )
        return None

    def _run_task(self, task: dict[str, Any]) -> _Outcome:
        handler = self._handlers.get(str(task.get("taskType")))
        try:
            if handler is None:
                raise TaskError(
                    400,
                    "invalidTaskType",
                    f"Unknown taskType {task.get('taskType')!r}.",
                    "taskType",
                )
            return handler(task)
        except TaskError as error:
            return _Outcome(errors=[error.as_json(task)], error_status=error.status)

    def _assemble(self, outcomes: list[_Outcome]) -> Reply:
        data = [item for outcome in outcomes for item in outcome.data]
        errors = [error for outcome in outcomes for error in outcome.errors]
        statuses = [outcome.error_status for outcome in outcomes]
        succeeded = None in statuses
        payload: dict[str, Any] = {}
        if data or (succeeded and not errors):
            payload["data"] = data
        if errors:
            payload["errors"] = errors
        if self.upload_data_as_object and len(data) == 1 and data[0]["taskType"] == "imageUpload":
            payload["data"] = data[0]
        status = 200 if succeeded else next(s for s in statuses if s is not None)
        return json_reply(status, payload)

    # --- imageInference ----------------------------------------------------------------------

    def _image_inference(self, task: dict[str, Any]) -> _Outcome:
        for rule in _INFERENCE_RULES:
            rule(task)
        self._check_unused(task["taskUUID"])
        seed = self._resolve(
            task["inputs"]["seedImage"], "inputs.seedImage", "invalidSeedImage", SEED_FORMATS
        )
        references = task.get("providerSettings", {}).get("ideogram", {})
        for index, reference in enumerate(references.get("styleReferenceImages", [])):
            self._resolve(
                reference,
                f"providerSettings.ideogram.styleReferenceImages[{index}]",
                "invalidStyleReferenceImage",
                SEED_FORMATS,
            )
        job = self._new_job(task, seed)
        self._accept(job)
        if job.sync:
            return _Outcome(wait_for=job)
        ack = {"taskType": "imageInference", "taskUUID": job.task_uuid}
        return _Outcome(data=[ack] if self.ack_style == "item" else [])

    def _check_unused(self, task_uuid: str) -> None:
        with self.lock:
            used = task_uuid in self.accepted
        if used:
            raise TaskError(
                400,
                "conflictTaskUUID",
                f"A task with taskUUID {task_uuid} was already submitted.",
                "taskUUID",
            )

    def _resolve(
        self, reference: str, parameter: str, code: str, formats: frozenset[str]
    ) -> Image.Image:
        image = open_image(self._load(reference), formats)
        if image is None:
            raise TaskError(
                400,
                code,
                f"Could not load '{parameter}': not an uploaded image UUID, a reachable image "
                "URL, a data URI or base64 of a PNG, JPG or WEBP image.",
                parameter,
            )
        return image

    def _load(self, reference: str) -> bytes | None:
        if _ANY_UUID_RE.fullmatch(reference):
            with self.lock:
                return self._uploaded.get(reference.lower())
        if reference.startswith(("http://", "https://")):
            return fetch_url(reference)
        if reference.startswith("data:"):
            return decode_data_uri(reference)
        return decode_base64(reference)

    def _new_job(self, task: dict[str, Any], seed: Image.Image) -> _Job:
        output_format = task.get("outputFormat", "JPG")
        quality = task.get("outputQuality", 95)
        speed = task.get("providerSettings", {}).get("ideogram", {}).get("renderingSpeed")
        pil_format = OUTPUT_FORMATS[output_format][0]
        results = [
            _Result(i, str(uuid.uuid4()), self._rng.randint(0, 2**31 - 1),
                    render_result(seed, i, pil_format, quality))
            for i in range(task.get("numberResults", 1))
        ]  # fmt: skip
        return _Job(
            task_uuid=task["taskUUID"],
            body=task,
            results=results,
            output_type=task.get("outputType", "URL"),
            output_format=output_format,
            cost=COST_PER_RESULT[speed or "DEFAULT"] if task.get("includeCost") else None,
            check_content=bool(task.get("safety", {}).get("checkContent")),
            sync=task.get("deliveryMethod", "sync") == "sync",
        )

    def _accept(self, job: _Job) -> None:
        """Accepting is paying: at most once per taskUUID, even for concurrent requests."""
        with self.lock:
            self._check_unused(job.task_uuid)
            self.accepted[job.task_uuid] = job.body
            self._accept_counts[job.task_uuid] += 1
            self.paid.append(job.task_uuid)
            fault = self._faults.take({"imageInference"}, lambda f: f.kind == "generation_error")
            if fault is not None:
                code = str(fault.params["code"])
                status, message = _GENERATION_FAILURES.get(
                    code, (500, f"Generation failed: {code}.")
                )
                job.failure = _Failure(
                    code, fault.params.get("message", message), fault.params.get("status", status)
                )
            start = time.monotonic()
            job.accepted_at = start
            job.processing_s = self.processing_s
            if self.processing_spread:
                spread = self.processing_spread * self._spread_rng.uniform(-1.0, 1.0)
                job.processing_s = self.processing_s * (1.0 + spread)
            for result in job.results:
                result.due = start + job.processing_s * (result.index + 1) / len(job.results)
            self._jobs[job.task_uuid] = job
            self.spawn(self._run_job, job)

    def _run_job(self, job: _Job) -> None:
        for result in job.results:
            if self.stopping.wait(max(0.0, result.due - time.monotonic())):
                return
            self._upload(job, result)
            with self._changed:
                result.finished = True
                if job.failure is None:
                    key = f"{result.image_uuid}.{job.extension}"
                    self._images[key] = (result.data, job.content_type)
                self._changed.notify_all()
            self._webhook(job, result)

    def _upload(self, job: _Job, result: _Result) -> None:
        endpoint = job.body.get("uploadEndpoint")
        if endpoint is None or job.failure is not None:
            return
        status = (
            -1 if self.upload_fails else deliver(endpoint, "PUT", result.data, job.content_type)
        )
        with self.lock:
            self.uploads.append((endpoint, status))

    def _webhook(self, job: _Job, result: _Result) -> None:
        url = job.body.get("webhookURL")
        if url is None:
            return
        if job.failure is None:
            payload: dict[str, Any] = {"data": [self._item(job, result, polled=False)]}
        else:
            payload = {"errors": [self._error_entry(job)]}
        status = deliver(url, "POST", json.dumps(payload).encode(), "application/json")
        with self.lock:
            self.webhooks.append((url, status, payload))

    def _finish_sync(self, outcome: _Outcome) -> _Outcome:
        job = outcome.wait_for
        if job is None:
            return outcome
        with self._changed:
            self._changed.wait_for(
                lambda: self.stopping.is_set() or all(r.finished for r in job.results)
            )
        if job.failure is not None:
            errors = [self._error_entry(job) for _ in job.results]
            return _Outcome(errors=errors, error_status=job.failure.status)
        return _Outcome(data=[self._item(job, result, polled=False) for result in job.results])

    # --- result items ------------------------------------------------------------------------

    def _item(self, job: _Job, result: _Result, *, polled: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"taskType": "imageInference", "taskUUID": job.task_uuid}
        if polled:
            item["status"] = "success"
        item["imageUUID"] = result.image_uuid
        encoded = base64.b64encode(result.data).decode()
        if job.output_type == "URL":
            item["imageURL"] = f"{self.base_url}/images/{result.image_uuid}.{job.extension}"
        elif job.output_type == "base64Data":
            item["imageBase64Data"] = encoded
        else:
            item["imageDataURI"] = f"data:{job.content_type};base64,{encoded}"
        item["seed"] = result.seed
        if job.cost is not None:
            item["cost"] = job.cost
        if job.check_content:
            item["NSFWContent"] = False
        return item

    def _error_entry(self, job: _Job) -> dict[str, Any]:
        assert job.failure is not None
        return {
            "code": job.failure.code,
            "message": job.failure.message,
            "status": "error",
            "taskType": "imageInference",
            "taskUUID": job.task_uuid,
        }

    # --- getResponse -------------------------------------------------------------------------

    def _get_response(self, task: dict[str, Any]) -> _Outcome:
        _check_task_uuid(task)
        _check_keys(task, frozenset({"taskType", "taskUUID"}))
        with self.lock:
            job = self._jobs.get(task["taskUUID"])
            finished = [r for r in job.results if r.finished] if job is not None else []
        if job is None:
            raise TaskError(
                400,
                "taskFailedOrNotFound",
                f"No task with taskUUID {task['taskUUID']} was found, or it failed.",
                "taskUUID",
            )
        outcome = _Outcome()
        for result in finished:
            self._report(job, result, outcome)
        if len(finished) < len(job.results):
            outcome.data.append(
                {"taskType": "imageInference", "taskUUID": job.task_uuid, "status": "processing"}
            )
        return outcome

    def _report(self, job: _Job, result: _Result, outcome: _Outcome) -> None:
        if job.failure is None:
            outcome.data.append(self._item(job, result, polled=True))
        elif self.error_placement == "errors":
            outcome.errors.append(self._error_entry(job))
        elif self.error_placement == "unmarked":
            entry = self._error_entry(job)
            del entry["status"]
            outcome.errors.append(entry)
        else:
            error = {"code": job.failure.code, "message": job.failure.message}
            outcome.data.append(
                {"taskType": "imageInference", "taskUUID": job.task_uuid, "status": "error",
                 "error": error}
            )  # fmt: skip

    # --- imageUpload -------------------------------------------------------------------------

    def _image_upload(self, task: dict[str, Any]) -> _Outcome:
        _check_task_uuid(task)
        _check_keys(task, frozenset({"taskType", "taskUUID", "image"}))
        if "image" not in task:
            raise TaskError(400, "missingImage", "image is required.", "image")
        if not isinstance(task["image"], str) or not task["image"]:
            raise TaskError(400, "invalidImage", "image must be a string.", "image")
        image = self._resolve(task["image"], "image", "invalidImage", UPLOAD_FORMATS)
        image_uuid = self._store_upload(image)
        item = {"taskType": "imageUpload", "taskUUID": task["taskUUID"], "imageUUID": image_uuid}
        return _Outcome(data=[item])

    def _store_upload(self, image: Image.Image) -> str:
        image.thumbnail((UPLOAD_MAX_SIDE, UPLOAD_MAX_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image_uuid = str(uuid.uuid4())
        with self.lock:
            self._uploaded[image_uuid] = buffer.getvalue()
        return image_uuid
