"""A fake fal.ai queue API for ``fal-ai/ideogram/v3/replace-background``, as strict as the real one.

Written from fal's queue API docs, its client fal_client and the endpoint's page, not from
our client.

    with FakeFal("fal-key-id:fal-key-secret", queue_s=0.05, processing_s=0.1) as fal:
        submit = httpx.post(fal.submit_url, json={"prompt": "...", "image_url": url},
                            headers={"Authorization": "Key fal-key-id:fal-key-secret"})
        status_url = submit.json()["status_url"]  # .../fal-ai/ideogram/requests/<id>/status
        assert fal.submit_count() == 1

Hosts
-----
One server on 127.0.0.1 and a free port stands for three hosts: ``queue_url``
(``http://127.0.0.1:PORT``, for https://queue.fal.run), ``rest_url``
(``http://127.0.0.1:PORT/rest``, for https://rest.fal.ai: a client must append to it, not
replace its path) and ``cdn_url`` (``http://127.0.0.1:PORT/cdn``, for https://v3.fal.media).

What it enforces
----------------
Routes: ``POST /fal-ai/ideogram/v3/replace-background`` (submit); ``GET|PUT
/fal-ai/ideogram/requests/<id>[/status|/cancel]`` (result, status, cancel: ONLY the owner/app
form, the endpoint-path form answers 404); ``POST /rest/storage/upload/initiate``; the upload
target ``PUT /cdn-upload/<token>``; ``GET|HEAD /cdn/files/<token>/<name>``. A known route with
another method: 405. Anything else: 404 ``{"detail": "Not Found"}``.

Auth on the queue and REST routes (not on the CDN nor the upload target, which stand for
public and presigned URLs): ``Authorization: Key <key>`` exactly, else 401
``{"detail": "No user found for Key ID and Secret"}``; after ``lock_account()``, 403
``{"detail": "User is locked. Reason: <reason>. ..."}``.

Submit: a JSON object (Content-Type application/json when given), the model input with no
envelope, validated like pydantic v2 with ``extra="forbid"``; every problem is listed in one 422
``{"detail": [{"type", "loc": ["body", ...], "msg", "input"[, "ctx"]}]}``: ``missing``,
``extra_forbidden``, ``string_type``, ``string_too_short``, ``string_pattern_mismatch``,
``enum``, ``int_type`` (a bool or a float is not an int), ``bool_type``, ``float_type``,
``list_type``, ``too_short``, ``model_type``, ``model_attributes_type``, ``json_invalid``,
``greater_than``, ``greater_than_equal``, ``less_than_equal``, ``value_error`` (model rules:
``style`` with ``style_codes``; ``color_palette`` needs exactly one of ``name``/``members``).
Fields: prompt (required, non-empty), image_url (required string), rendering_speed, style,
style_codes (8 hex chars each), style_preset (``worker.jobs.STYLE_PRESETS``), image_urls,
color_palette (``{"name"}`` from ``PALETTE_PRESETS`` or ``{"members": [{"rgb": {"r", "g", "b"}
0-255, "color_weight" in (0, 1]}]}``), expand_prompt, seed, num_images (1-8), sync_mode.
Optional fields whose pydantic type is ``Optional`` (style, style_codes, style_preset,
image_urls, color_palette, seed) accept ``null``; the others do not.
Headers: ``X-Fal-Request-Timeout`` (positive seconds: the deadline to START),
``X-Fal-Queue-Priority`` (``normal|low``, recorded, no effect on order); query
``fal_webhook`` (an http(s) URL) and ``fal_max_queue_length`` (429 when that many requests
already wait); a bad value of any of them: 400 ``{"detail"}``.

Every answer of fal's own queue server (submit, status, result, cancel; its refusals and
errors too) carries ``x-fal-request-id``: the accepted request's id, the id in the path,
or a fresh id for a refused submit (fal named it, nothing was queued). Answers from in
front of fal -- an ingress page (``ingress=True``: nginx's HTML, 502/503/504) or any raw
``body`` a fault gives -- carry none, nor does a dropped connection.

Every accepted submit is a new request (no idempotency): ``submitted``, ``submissions``,
``submit_count()``. ``billed()`` is what fal would charge: the requests that started, minus
runner (5xx) failures.

Lifecycle, computed from timestamps under one lock: IN_QUEUE at least ``queue_s``, FIFO, at
most ``concurrency`` requests IN_PROGRESS, then IN_PROGRESS for ``processing_s`` (longer if
fetching the inputs takes longer), then COMPLETED. With ``processing_spread=f`` each request
takes its own time instead, drawn at submit uniformly from ``processing_s * (1 +- f)`` by an
RNG seeded with ``spread_seed``. Inputs are really fetched when the request
starts (urllib, 5 s, no proxy): unreachable or non-2xx -> ``file_download_error``; not an
image (PNG, JPEG, WEBP, BMP, GIF; style references PNG, JPEG, WEBP) -> ``image_load_error``;
a side under 32 px -> ``image_too_small``; style references over 10 MB in total ->
``image_too_large``. A request not started within its ``X-Fal-Request-Timeout`` completes as
``request_timeout`` (result 504 with ``X-Fal-Request-Timeout-Type: user``, never billed).
Results: one PNG per image (the source inverted and tinted per index, same size) served at
``{cdn_url}/files/<token>/image.png``; ``{"images": [{"url", "content_type", "file_name",
"file_size", "width", "height"}], "seed"}``. A result (and its status) is gone, 404, after
``result_ttl_s``, or after ``large_result_ttl_s`` when its images total at least
``large_result_bytes``. The CDN files themselves stay.

Choices made where the reference is UNCONFIRMED
-----------------------------------------------
- Validation happens at submit (422, nothing accepted) with ``validation="submit"`` (default);
  with ``validation="result"`` the submit is accepted (and counted) and the request completes
  with that 422 as its result, the reading the reference's "422 with detail" suggests.
- Error types are pydantic v2's (``missing``); ``error_style="v1"`` gives v1's
  (``value_error.missing``, ``value_error.extra``, ``type_error.integer``...) as the
  reference's example shows.
- ``image_url`` is checked as a string only (the schema's type); a non-URL fails at download.
  Data URIs are refused (``file_download_error``) unless ``data_uris=True``.
- Status without ``?logs=1`` carries ``"logs": null``; with it, a list of
  ``{"message", "timestamp", "level", "source"}``. IN_QUEUE bodies carry no logs. Failed
  requests carry ``"metrics": {}``.
- Model errors at the result: 422 ``{"detail": [{"loc", "msg", "type", "url", "input"}]}``;
  status ``error`` is the msg and ``error_type`` the type (for a deferred validation failure,
  the first issue's type). Runner errors: the flat ``{"detail", "error_type"}`` with
  ``X-Fal-Error-Type``; 504 request/startup timeout, 503 ``runner_*``, 502
  runner_incomplete_response, 500 runner_server_error/internal_error, 400 bad_request,
  downstream_service_error.
- Cancel: a queued request completes at once and is never billed; an IN_PROGRESS one
  completes at once too and is billed. Both are in ``canceled``; the result answers 400
  ``{"detail": "Request was cancelled", "error_type": "request_cancelled"}``.
- An expired request is gone for status, result and cancel alike (404).
- ``fal_max_queue_length=N``: 429 when N or more requests are waiting.
- Upload: ``storage_type`` must be ``fal-cdn-v3`` (or absent); the initiate body has exactly
  ``file_name`` and ``content_type``; the PUT must carry exactly the declared Content-Type
  (else 403 with a storage XML error, as a presigned URL would); an ``Authorization`` header
  on the PUT is accepted but noted (``StoredUpload.authorization_sent``: the key leaked to the
  storage host). The newer ``/storage/auth/token`` path is not implemented (404).
- ``sync_mode: true`` makes the image URLs ``data:image/png;base64,...`` data URIs.
- Webhooks: one POST of ``{"request_id", "gateway_request_id", "status": "OK"|"ERROR",
  "payload"[, "error"]}``, unsigned, not retried; recorded as ``(url, status, payload)``.

Fault injection (``inject``; consumable, thread-safe; ``route="auto"`` is ``"submit"`` or the
kind's only route, ``None`` any API route): ``status`` (answer ``status`` before anything is
accepted: 429 ``{"detail"}`` + ``X-Fal-needs-retry: 1`` (``needs_retry=False`` to leave it
out); 5xx the flat ``{"detail", "error_type"}`` (``error_type``, default
runner_server_error) + ``X-Fal-Error-Type``, or with ``ingress=True`` the ingress's nginx page;
others ``{"detail"}``; ``retry_after``, ``detail``, a raw ``body`` (+ ``content_type``)
optional), ``accept_then_status`` (submit: accept, then answer ``status``, default 502,
built the same way: fal's own 5xx names the accepted request), ``accept_then_drop`` (submit: accept, then
close the connection unanswered), ``malformed`` (200 with a non-JSON ``body``;
``after_accept=True``: submit, accepted first), ``slow`` (wait ``delay_s``, then handle
normally), ``model_error`` (the next accepted request completes with ``type``; optional
``message``, ``status``, ``loc``), ``expire`` (the next read of a completed result answers 404
and the request is gone from then on; optional ``request_id``), ``foreign_urls`` (submit:
the next accepted request's status, response and cancel URLs name ``base``, another host).
"""

from __future__ import annotations

import base64
import json
import math
import operator
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

from PIL import Image

from servers.files import s3_error_xml
from servers.http import (
    INPUT_FORMATS,
    WEB_FORMATS,
    FakeHTTPServer,
    Fault,
    Faults,
    RecordedCall,
    Reply,
    decode_data_uri,
    deliver,
    fetch_url,
    is_http_url,
    json_reply,
    open_image,
    render_result,
)
from worker.jobs import PALETTE_PRESETS, STYLE_PRESETS

ENDPOINT = "fal-ai/ideogram/v3/replace-background"
APP = "fal-ai/ideogram"
SUBMIT_PATH = f"/{ENDPOINT}"
REST_PREFIX = "/rest"
INITIATE_PATH = f"{REST_PREFIX}/storage/upload/initiate"
CDN_PREFIX = "/cdn"
CDN_FILES_PREFIX = f"{CDN_PREFIX}/files/"
UPLOAD_PREFIX = "/cdn-upload/"
STORAGE_TYPE = "fal-cdn-v3"
ERRORS_DOCS = "https://docs.fal.ai/errors"
MIN_SIDE = 32
REFERENCES_MAX_BYTES = 10 * 1024 * 1024
TICK_S = 0.01
UNKNOWN_KEY = "No user found for Key ID and Secret"
NOT_FOUND = "Request not found"

Route = Literal["submit", "status", "result", "cancel", "initiate"]
FaultKind = Literal[
    "status", "accept_then_status", "accept_then_drop", "malformed", "slow", "model_error",
    "expire", "foreign_urls",
]  # fmt: skip
FAULT_KINDS = frozenset(
    {"status", "accept_then_status", "accept_then_drop", "malformed", "slow", "model_error",
     "expire", "foreign_urls"}
)  # fmt: skip
REQUEST_ID_HEADER = "x-fal-request-id"
ROUTES: tuple[str, ...] = ("submit", "status", "result", "cancel", "initiate")
_METHODS: dict[str, str] = {
    "submit": "POST", "status": "GET", "result": "GET", "cancel": "PUT", "initiate": "POST",
}  # fmt: skip
_FAULT_REQUIRED: dict[str, tuple[str, ...]] = {
    "status": ("status",),
    "slow": ("delay_s",),
    "model_error": ("type",),
    "foreign_urls": ("base",),
}
_FIXED_ROUTES: dict[str, str] = {
    "accept_then_status": "submit",
    "accept_then_drop": "submit",
    "model_error": "submit",
    "expire": "result",
    "foreign_urls": "submit",
}
# Infrastructure errors: the flat body, with their status and default message.
_INFRA: dict[str, tuple[int, str]] = {
    "request_timeout": (504, "Request timed out"),
    "startup_timeout": (504, "Runner startup timed out"),
    "runner_disconnected": (503, "Runner disconnected"),
    "runner_scheduling_failure": (503, "Could not schedule a runner"),
    "runner_connection_timeout": (503, "Runner connection timed out"),
    "runner_incomplete_response": (502, "Runner returned an incomplete response"),
    "runner_server_error": (500, "Runner server error"),
    "internal_error": (500, "Internal error"),
    "bad_request": (400, "Bad request"),
    "downstream_service_error": (400, "Downstream service error"),
    "request_cancelled": (400, "Request was cancelled"),
}
_MODEL_MESSAGES: dict[str, str] = {
    "file_download_error": "Failed to download the file. Please check if the URL is accessible.",
    "image_load_error": "Failed to load the image. Please ensure the image file is not "
    "corrupted and is in a supported format.",
    "image_too_small": f"Image dimensions are too small. Minimum dimensions are "
    f"{MIN_SIDE}x{MIN_SIDE} pixels.",
    "image_too_large": "Image dimensions or file size exceed the maximum allowed.",
    "content_policy_violation": "The content could not be processed because it contained "
    "material flagged by a content checker.",
}
# pydantic v1's names for v2's error types (``error_style="v1"``); None keeps the v2 msg.
_V1_TYPES: dict[str, tuple[str, str | None]] = {
    "missing": ("value_error.missing", "field required"),
    "extra_forbidden": ("value_error.extra", "extra fields not permitted"),
    "string_type": ("type_error.str", "str type expected"),
    "string_too_short": ("value_error.any_str.min_length", None),
    "string_pattern_mismatch": ("value_error.str.regex", None),
    "enum": ("type_error.enum", "value is not a valid enumeration member"),
    "int_type": ("type_error.integer", "value is not a valid integer"),
    "bool_type": ("type_error.bool", "value could not be parsed to a boolean"),
    "float_type": ("type_error.float", "value is not a valid float"),
    "list_type": ("type_error.list", "value is not a valid list"),
    "too_short": ("value_error.list.min_items", None),
    "model_type": ("type_error.dict", "value is not a valid dict"),
    "model_attributes_type": ("type_error.dict", "value is not a valid dict"),
    "json_invalid": ("value_error.jsondecode", None),
    "greater_than": ("value_error.number.not_gt", None),
    "greater_than_equal": ("value_error.number.not_ge", None),
    "less_than_equal": ("value_error.number.not_le", None),
    "value_error": ("value_error", None),
}
_REQUEST_RE = re.compile(rf"/{re.escape(APP)}/requests/(?P<id>[^/]+)(?P<tail>/status|/cancel)?")
_DICT_MSG = "Input should be a valid dictionary or object to extract fields from"
_TRUNCATED_JSON = b'{"request_id": "80e732af-660e-45cd-bd63-'


# --- validation, driven by tables -----------------------------------------------------------

Loc = tuple[str | int, ...]
Issue = dict[str, Any]
Check = Callable[[Any, Loc], list[Issue]]
ModelRule = Callable[[Mapping[str, Any], Loc], list[Issue]]


def _issue(loc: Loc, kind: str, msg: str, value: Any, **ctx: Any) -> Issue:
    issue: Issue = {"type": kind, "loc": list(loc), "msg": msg, "input": value}
    if ctx:
        issue["ctx"] = ctx
    return issue


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _string(min_length: int = 0) -> Check:
    def check(value: Any, loc: Loc) -> list[Issue]:
        if not isinstance(value, str):
            return [_issue(loc, "string_type", "Input should be a valid string", value)]
        if len(value) < min_length:
            msg = f"String should have at least {_plural(min_length, 'character')}"
            return [_issue(loc, "string_too_short", msg, value, min_length=min_length)]
        return []

    return check


def _pattern(regex: str) -> Check:
    compiled = re.compile(regex)

    def check(value: Any, loc: Loc) -> list[Issue]:
        if not isinstance(value, str):
            return [_issue(loc, "string_type", "Input should be a valid string", value)]
        if not compiled.fullmatch(value):
            msg = f"String should match pattern '{regex}'"
            return [_issue(loc, "string_pattern_mismatch", msg, value, pattern=regex)]
        return []

    return check


def _enum(*allowed: str) -> Check:
    expected = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"

    def check(value: Any, loc: Loc) -> list[Issue]:
        if not isinstance(value, str) or value not in allowed:
            return [_issue(loc, "enum", f"Input should be {expected}", value, expected=expected)]
        return []

    return check


_BOUNDS: tuple[tuple[str, str, Callable[[Any, Any], bool], str], ...] = (
    ("gt", "greater_than", operator.gt, "greater than"),
    ("ge", "greater_than_equal", operator.ge, "greater than or equal to"),
    ("le", "less_than_equal", operator.le, "less than or equal to"),
)


def _bounded(value: float, loc: Loc, limits: Mapping[str, float | None]) -> list[Issue]:
    for key, kind, holds, words in _BOUNDS:
        limit = limits.get(key)
        if limit is not None and not holds(value, limit):
            return [_issue(loc, kind, f"Input should be {words} {limit}", value, **{key: limit})]
    return []


def _integer(ge: int | None = None, le: int | None = None) -> Check:
    def check(value: Any, loc: Loc) -> list[Issue]:
        if isinstance(value, bool) or not isinstance(value, int):
            return [_issue(loc, "int_type", "Input should be a valid integer", value)]
        return _bounded(value, loc, {"ge": ge, "le": le})

    return check


def _number(gt: float | None = None, le: float | None = None) -> Check:
    def check(value: Any, loc: Loc) -> list[Issue]:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return [_issue(loc, "float_type", "Input should be a valid number", value)]
        return _bounded(value, loc, {"gt": gt, "le": le})

    return check


def _boolean(value: Any, loc: Loc) -> list[Issue]:
    if not isinstance(value, bool):
        return [_issue(loc, "bool_type", "Input should be a valid boolean", value)]
    return []


def _list_of(item: Check, min_length: int = 0) -> Check:
    def check(value: Any, loc: Loc) -> list[Issue]:
        if not isinstance(value, list):
            return [_issue(loc, "list_type", "Input should be a valid list", value)]
        if len(value) < min_length:
            msg = (
                f"List should have at least {_plural(min_length, 'item')} after validation, "
                f"not {len(value)}"
            )
            return [_issue(loc, "too_short", msg, value, min_length=min_length)]
        return [issue for i, element in enumerate(value) for issue in item(element, (*loc, i))]

    return check


@dataclass(frozen=True)
class _Field:
    check: Check
    required: bool = False
    nullable: bool = False  # an Optional[...] field: null is valid


def _field_issues(spec: _Field, obj: Mapping[str, Any], name: str, loc: Loc) -> list[Issue]:
    if name not in obj:
        return (
            [_issue((*loc, name), "missing", "Field required", dict(obj))] if spec.required else []
        )
    if obj[name] is None and spec.nullable:
        return []
    return spec.check(obj[name], (*loc, name))


def _model(fields: Mapping[str, _Field], *rules: ModelRule, name: str | None = None) -> Check:
    """An object with exactly ``fields`` (extra forbidden); ``rules`` run once fields are valid.

    ``name`` None is the request body itself (pydantic's ``model_attributes_type``)."""

    def check(value: Any, loc: Loc) -> list[Issue]:
        if not isinstance(value, dict):
            if name is None:
                return [_issue(loc, "model_attributes_type", _DICT_MSG, value)]
            msg = f"Input should be a valid dictionary or instance of {name}"
            return [_issue(loc, "model_type", msg, value, class_name=name)]
        issues = [i for key, spec in fields.items() for i in _field_issues(spec, value, key, loc)]
        issues += [
            _issue((*loc, key), "extra_forbidden", "Extra inputs are not permitted", item)
            for key, item in value.items()
            if key not in fields
        ]
        if issues:
            return issues
        return [issue for rule in rules for issue in rule(value, loc)]

    return check


def _value_error(loc: Loc, message: str, value: Any) -> list[Issue]:
    return [_issue(loc, "value_error", f"Value error, {message}", value, error=message)]


def _style_without_codes(obj: Mapping[str, Any], loc: Loc) -> list[Issue]:
    if obj.get("style") is not None and obj.get("style_codes") is not None:
        return _value_error(loc, "style_codes cannot be used together with style", dict(obj))
    return []


def _name_or_members(obj: Mapping[str, Any], loc: Loc) -> list[Issue]:
    given = [key for key in ("name", "members") if obj.get(key) is not None]
    if len(given) != 1:
        message = "a color palette needs exactly one of name (a preset) or members"
        return _value_error(loc, message, dict(obj))
    return []


_BYTE = _Field(_integer(0, 255), required=True)
_RGB = _model({"r": _BYTE, "g": _BYTE, "b": _BYTE}, name="RGBColor")
_MEMBER = _model(
    {"rgb": _Field(_RGB, required=True), "color_weight": _Field(_number(gt=0, le=1))},
    name="ColorPaletteMember",
)
_PALETTE = _model(
    {
        "name": _Field(_enum(*PALETTE_PRESETS), nullable=True),
        "members": _Field(_list_of(_MEMBER, min_length=1), nullable=True),
    },
    _name_or_members,
    name="ColorPalette",
)
_INPUT = _model(
    {
        "prompt": _Field(_string(min_length=1), required=True),
        "image_url": _Field(_string(), required=True),
        "rendering_speed": _Field(_enum("TURBO", "BALANCED", "QUALITY")),
        "style": _Field(_enum("AUTO", "GENERAL", "REALISTIC", "DESIGN"), nullable=True),
        "style_codes": _Field(_list_of(_pattern("^[0-9a-fA-F]{8}$")), nullable=True),
        "style_preset": _Field(_enum(*STYLE_PRESETS), nullable=True),
        "image_urls": _Field(_list_of(_string()), nullable=True),
        "color_palette": _Field(_PALETTE, nullable=True),
        "expand_prompt": _Field(_boolean),
        "seed": _Field(_integer(), nullable=True),
        "num_images": _Field(_integer(1, 8)),
        "sync_mode": _Field(_boolean),
    },
    _style_without_codes,
)
_INITIATE = _model(
    {
        "file_name": _Field(_string(min_length=1), required=True),
        "content_type": _Field(_string(min_length=1), required=True),
    }
)


def _parse_json_body(headers: Mapping[str, str], raw: bytes) -> tuple[Any, list[Issue]]:
    """The JSON body, or FastAPI's issue when there is none."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and content_type != "application/json":
        text = raw.decode("utf-8", errors="replace")
        return None, [_issue(("body",), "model_attributes_type", _DICT_MSG, text)]
    if not raw.strip():
        return None, [_issue(("body",), "missing", "Field required", None)]
    try:
        return json.loads(raw), []
    except json.JSONDecodeError as exc:
        return None, [_issue(("body", exc.pos), "json_invalid", "JSON decode error", {},
                             error=exc.msg)]  # fmt: skip
    except ValueError:
        return None, [_issue(("body", 0), "json_invalid", "JSON decode error", {})]


def _as_v1(issue: Issue) -> Issue:
    kind, msg = _V1_TYPES.get(issue["type"], (issue["type"], None))
    return {"loc": issue["loc"], "msg": msg or issue["msg"], "type": kind}


# --- submit options --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    timeout_s: float | None = None
    webhook: str | None = None
    max_queue: int | None = None


def _positive_seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _submit_options(call: RecordedCall) -> _Options | str:
    """The submit's headers and query, or what is wrong with them."""
    query = parse_qs(urlsplit(call.path).query, keep_blank_values=True)
    timeout = call.headers.get("x-fal-request-timeout")
    timeout_s = _positive_seconds(timeout) if timeout is not None else None
    if timeout is not None and timeout_s is None:
        return f"X-Fal-Request-Timeout must be a positive number of seconds, not {timeout!r}"
    priority = call.headers.get("x-fal-queue-priority")
    if priority is not None and priority not in ("normal", "low"):
        return f"X-Fal-Queue-Priority must be 'normal' or 'low', not {priority!r}"
    webhook = query.get("fal_webhook", [None])[0]
    if webhook is not None and not is_http_url(webhook):
        return f"fal_webhook must be an http(s) URL, not {webhook!r}"
    length = query.get("fal_max_queue_length", [None])[0]
    if length is not None and not (length.isdigit() and length.isascii()):
        return f"fal_max_queue_length must be a non-negative integer, not {length!r}"
    return _Options(timeout_s, webhook, int(length) if length is not None else None)


# --- outcomes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Output:
    images: list[dict[str, Any]]
    seed: int
    size: int  # total image bytes

    def as_json(self) -> dict[str, Any]:
        return {"images": self.images, "seed": self.seed}


@dataclass(frozen=True)
class _Failure:
    status: int
    payload: dict[str, Any]
    error: str
    error_type: str
    headers: dict[str, str] = field(default_factory=dict)


def _is_infra(kind: str) -> bool:
    return kind in _INFRA or kind.startswith("runner_")


def _flat_failure(
    kind: str,
    status: int | None = None,
    message: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> _Failure:
    default_status, default_message = _INFRA.get(kind, (503, f"Runner failure: {kind}"))
    text = message or default_message
    return _Failure(
        status or default_status,
        {"detail": text, "error_type": kind},
        text,
        kind,
        {"X-Fal-Error-Type": kind, **(headers or {})},
    )


def _model_failure(
    kind: str, loc: Loc, value: Any, message: str | None = None, status: int = 422
) -> _Failure:
    text = message or _MODEL_MESSAGES.get(kind, f"Model error: {kind}")
    detail = {"loc": list(loc), "msg": text, "type": kind, "url": f"{ERRORS_DOCS}#{kind}",
              "input": value}  # fmt: skip
    return _Failure(status, {"detail": [detail]}, text, kind)


def _injected_failure(params: Mapping[str, Any], body: Mapping[str, Any]) -> _Failure:
    kind = str(params["type"])
    if _is_infra(kind):
        return _flat_failure(kind, params.get("status"), params.get("message"))
    default_loc: Loc = ("body",)
    if kind == "content_policy_violation":
        default_loc = ("body", "prompt")
    elif kind.startswith(("image_", "file_")):
        default_loc = ("body", "image_url")
    loc = tuple(params.get("loc", default_loc))
    value = body.get(str(loc[1])) if len(loc) > 1 else None
    return _model_failure(kind, loc, value, params.get("message"), params.get("status", 422))


# --- records ---------------------------------------------------------------------------------


@dataclass
class StoredUpload:
    """One ``storage/upload/initiate`` and what was PUT to its upload_url."""

    file_name: str
    content_type: str
    upload_url: str
    file_url: str
    data: bytes | None = None  # None until a PUT was accepted
    puts: int = 0
    authorization_sent: bool = False  # a PUT carried an Authorization header


@dataclass
class _Request:
    request_id: str
    body: Any
    headers: dict[str, str]
    submitted_at: float
    ready_at: float
    deadline: float | None
    webhook: str | None
    processing_s: float
    invalid: _Failure | None = None  # validation="result": fails without running
    injected: _Failure | None = None  # model_error fault
    started_at: float | None = None
    ends_at: float = math.inf
    work: _Output | _Failure | None = None
    work_done_at: float = math.inf
    completed_at: float | None = None
    outcome: _Output | _Failure | None = None
    expired: bool = False


_REASONS = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}


def _ingress_page(status: int) -> bytes:
    """What nginx in front of fal answers when it cannot reach fal behind it."""
    title = f"{status} {_REASONS.get(status, 'Error')}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def _by_fal(fault: Fault) -> bool:
    """Whether the fault's answer comes from fal's own server (and so names a request)."""
    params = fault.params
    return fault.kind != "accept_then_drop" and "body" not in params and not params.get("ingress")


def _named(reply: Reply, request_id: str) -> Reply:
    """``reply`` as fal's server sends it: with the id of the request it is about."""
    headers = {**reply.headers, REQUEST_ID_HEADER: request_id or str(uuid.uuid4())}
    return Reply(reply.status, reply.body, headers, reply.drop)


def _status_fault_reply(status: int, params: Mapping[str, Any]) -> Reply:
    headers: dict[str, str] = {}
    if params.get("retry_after") is not None:
        headers["Retry-After"] = str(params["retry_after"])
    if params.get("ingress"):
        if status not in _REASONS:
            raise ValueError(f"the ingress answers 502, 503 or 504, not {status}")
        return Reply(status, _ingress_page(status), {"Content-Type": "text/html", **headers})
    if "body" in params:
        content_type = params.get("content_type", "text/html")
        return Reply(status, params["body"], {"Content-Type": content_type, **headers})
    if status == 429:
        if params.get("needs_retry", True):
            headers["X-Fal-needs-retry"] = "1"
        detail = params.get("detail", "Too many requests: concurrency limit reached")
        return json_reply(429, {"detail": detail}, headers)
    if status >= 500:
        failure = _flat_failure(
            params.get("error_type", "runner_server_error"), status, params.get("detail")
        )
        return json_reply(status, failure.payload, {**failure.headers, **headers})
    return json_reply(status, {"detail": params.get("detail", f"Injected {status}")}, headers)


def _fault_reply(fault: Fault) -> Reply:
    if fault.kind == "malformed":
        body = fault.params.get("body", _TRUNCATED_JSON)
        return Reply(200, body, {"Content-Type": "application/json"})
    if fault.kind == "accept_then_drop":
        return Reply(0, drop=True)
    default = 502 if fault.kind == "accept_then_status" else 500
    return _status_fault_reply(int(fault.params.get("status", default)), fault.params)


def _api_route(path: str) -> tuple[str, str] | None:
    """(route, request id) of a queue or REST path; None for anything else."""
    if path == SUBMIT_PATH:
        return "submit", ""
    if path == INITIATE_PATH:
        return "initiate", ""
    match = _REQUEST_RE.fullmatch(path)
    if match is None:
        return None
    tail = match["tail"]
    route = "status" if tail == "/status" else "cancel" if tail == "/cancel" else "result"
    return route, match["id"]


# --- the fake ----------------------------------------------------------------------------------


class FakeFal(FakeHTTPServer):
    """Context manager: a strict fake of fal's queue, REST storage and CDN on 127.0.0.1."""

    def __init__(
        self,
        key: str = "fal-key-id:fal-key-secret",
        *,
        queue_s: float = 0.1,
        processing_s: float = 0.2,
        result_ttl_s: float = 3600.0,
        large_result_ttl_s: float = 360.0,
        large_result_bytes: int = 10_240,
        concurrency: int = 40,
        validation: Literal["submit", "result"] = "submit",
        error_style: Literal["v2", "v1"] = "v2",
        data_uris: bool = False,
        processing_spread: float = 0.0,
        spread_seed: int = 0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        super().__init__()
        self.key = key
        self.queue_s = queue_s
        self.processing_s = processing_s
        self.processing_spread = processing_spread
        self._spread_rng = random.Random(spread_seed)
        self.result_ttl_s = result_ttl_s
        self.large_result_ttl_s = large_result_ttl_s
        self.large_result_bytes = large_result_bytes
        self.concurrency = concurrency
        self.validation = validation
        self.error_style = error_style
        self.data_uris = data_uris
        self.requests: list[RecordedCall] = []
        self.submitted: list[str] = []
        self.submissions: dict[str, Any] = {}
        self.canceled: list[str] = []
        self.timed_out: list[str] = []
        self.uploads: list[StoredUpload] = []
        self.webhooks: list[tuple[str, int, dict[str, Any]]] = []
        self.result_reads: Counter[str] = Counter()
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._files: dict[str, tuple[bytes, str]] = {}  # CDN path -> data, content type
        self._upload_slots: dict[str, tuple[StoredUpload, str]] = {}  # token -> record, path
        self._faults = Faults(FAULT_KINDS, _FAULT_REQUIRED)
        self._locked_reason: str | None = None
        self._rng = random.Random()
        self._clock = (time.monotonic(), time.time())
        self._routes: dict[str, Callable[[RecordedCall, bytes, str], Reply]] = {
            "submit": self._submit,
            "status": self._status,
            "result": self._result,
            "cancel": self._cancel,
            "initiate": self._initiate,
        }

    # --- public API --------------------------------------------------------------------------

    @property
    def queue_url(self) -> str:
        """Stands for https://queue.fal.run."""
        return self.base_url

    @property
    def rest_url(self) -> str:
        """Stands for https://rest.fal.ai (a path prefix on the same server)."""
        return f"{self.base_url}{REST_PREFIX}"

    @property
    def cdn_url(self) -> str:
        """Stands for https://v3.fal.media: stored files and results live under ``/files/``."""
        return f"{self.base_url}{CDN_PREFIX}"

    @property
    def submit_url(self) -> str:
        return f"{self.queue_url}/{ENDPOINT}"

    def started(self) -> None:
        """The ticker: requests start, complete and call their webhooks without a poll."""
        self.spawn(self._tick)

    def lock_account(self, reason: str = "Exhausted balance") -> None:
        """Every later authenticated call answers 403."""
        with self.lock:
            self._locked_reason = reason

    def inject(
        self,
        kind: FaultKind,
        *,
        route: Route | Literal["auto"] | None = "auto",
        times: int = 1,
        **params: Any,
    ) -> None:
        """Arm a fault for the next ``times`` matching calls (or accepted requests)."""
        self._faults.check(kind, times, params)
        if route not in (*ROUTES, "auto", None):
            raise ValueError(f"unknown route {route!r}")
        fixed = _FIXED_ROUTES.get(kind)
        if kind == "malformed" and params.get("after_accept"):
            fixed = "submit"
        if fixed is not None and route not in ("auto", fixed):
            raise ValueError(f"fault {kind!r} only applies to route {fixed!r}")
        resolved: str | None = fixed or ("submit" if route == "auto" else route)
        self._faults.arm(kind, resolved, times, params)

    def pending_faults(self) -> int:
        return self._faults.pending()

    def submit_count(self) -> int:
        """Accepted submits: each one a new request, and a payment from the client's view."""
        with self.lock:
            return len(self.submitted)

    def billed(self) -> list[str]:
        """What fal would charge: requests that started, minus runner (5xx) failures."""
        with self.lock:
            return [rid for rid in self.submitted if self._billable(self._requests[rid])]

    def headers_of(self, request_id: str) -> dict[str, str]:
        """The submit's headers (lower-case names)."""
        with self.lock:
            return dict(self._requests[request_id].headers)

    def status_of(self, request_id: str) -> str | None:
        """IN_QUEUE, IN_PROGRESS or COMPLETED now; None when unknown or gone."""
        with self.lock:
            now = time.monotonic()
            self._advance(now)
            request = self._live(request_id, now)
            return None if request is None else self._state(request)

    def add_file(self, data: bytes, content_type: str, file_name: str = "file.bin") -> str:
        """Store a file on the fake CDN as if uploaded; returns its URL."""
        path = f"{CDN_FILES_PREFIX}{uuid.uuid4().hex}/{quote(file_name, safe='')}"
        with self.lock:
            self._files[path] = (data, content_type)
        return f"{self.base_url}{path}"

    # --- routing -----------------------------------------------------------------------------

    def dispatch(self, call: RecordedCall, raw: bytes) -> Reply:
        with self.lock:
            self.requests.append(call)
        path = urlsplit(call.path).path
        api = _api_route(path)
        if api is not None:
            return self._api(call, raw, *api)
        if path.startswith(UPLOAD_PREFIX):
            return self._put_upload(call, raw, path.removeprefix(UPLOAD_PREFIX))
        if path.startswith(CDN_FILES_PREFIX) and call.method in ("GET", "HEAD"):
            with self.lock:
                found = self._files.get(path)
            if found is not None:
                return Reply(200, found[0], {"Content-Type": found[1]})
        return json_reply(404, {"detail": "Not Found"})

    def _api(self, call: RecordedCall, raw: bytes, route: str, request_id: str) -> Reply:
        slow = self._faults.take((route,), lambda f: f.kind == "slow")
        if slow is not None and self.stopping.wait(float(slow.params["delay_s"])):
            return Reply(0, drop=True)
        if call.method != _METHODS[route]:
            allow = {"Allow": _METHODS[route]}
            return _named(json_reply(405, {"detail": "Method Not Allowed"}, allow), request_id)
        refusal = self._check_auth(call)
        if refusal is not None:
            return _named(refusal, request_id)
        pre = self._faults.take((route,), Fault.is_pre_accept)
        if pre is not None:
            reply = _fault_reply(pre)
            return _named(reply, request_id) if _by_fal(pre) else reply
        reply = self._routes[route](call, raw, request_id)
        # The submit names its own request; storage (rest.fal.ai) is another service.
        return reply if route in ("submit", "initiate") else _named(reply, request_id)

    def _check_auth(self, call: RecordedCall) -> Reply | None:
        scheme, _, key = call.headers.get("authorization", "").partition(" ")
        if scheme != "Key" or key != self.key:
            return json_reply(401, {"detail": UNKNOWN_KEY})
        with self.lock:
            reason = self._locked_reason
        if reason is not None:
            detail = (
                f"User is locked. Reason: {reason}. "
                "Top up your balance at https://fal.ai/dashboard/billing."
            )
            return json_reply(403, {"detail": detail})
        return None

    # --- submit ------------------------------------------------------------------------------

    def _submit(self, call: RecordedCall, raw: bytes, _: str) -> Reply:
        body, issues = _parse_json_body(call.headers, raw)
        if not issues:
            issues = _INPUT(body, ("body",))
        if issues and self.validation == "submit":
            return _named(json_reply(422, {"detail": self._styled(issues)}), "")
        options = _submit_options(call)
        if isinstance(options, str):
            return _named(json_reply(400, {"detail": options}), "")
        with self.lock:
            now = time.monotonic()
            self._advance(now)
            if options.max_queue is not None and len(self._waiting) >= options.max_queue:
                detail = f"Queue is full: {len(self._waiting)} requests are waiting"
                return _named(json_reply(429, {"detail": detail}), "")
            request = self._accept(call, body, issues, options, now)
            position = len(self._waiting) - 1
            post = self._faults.take(("submit",), Fault.is_post_accept)
            foreign = self._faults.take(("submit",), lambda f: f.kind == "foreign_urls")
        if post is not None:
            reply = _fault_reply(post)
            return _named(reply, request.request_id) if _by_fal(post) else reply
        links = self._links(request, foreign.params["base"] if foreign else None)
        return _named(json_reply(200, {**links, "queue_position": position}), request.request_id)

    def _styled(self, issues: list[Issue]) -> list[Issue]:
        return [_as_v1(issue) for issue in issues] if self.error_style == "v1" else issues

    def _accept(
        self, call: RecordedCall, body: Any, issues: list[Issue], options: _Options, now: float
    ) -> _Request:
        """Accepting is ordering: every accepted submit is a new request (call with the lock)."""
        request = _Request(
            request_id=str(uuid.uuid4()),
            body=body,
            headers=dict(call.headers),
            submitted_at=now,
            ready_at=now + self.queue_s,
            deadline=now + options.timeout_s if options.timeout_s is not None else None,
            webhook=options.webhook,
            processing_s=self._processing_s(),
        )
        if issues:
            styled = self._styled(issues)
            request.invalid = _Failure(422, {"detail": styled}, styled[0]["msg"], styled[0]["type"])
        else:
            fault = self._faults.take(("submit",), lambda f: f.kind == "model_error")
            if fault is not None:
                request.injected = _injected_failure(fault.params, body)
        self._requests[request.request_id] = request
        self._waiting.append(request)
        self.submitted.append(request.request_id)
        self.submissions[request.request_id] = body
        return request

    def _processing_s(self) -> float:
        if not self.processing_spread:
            return self.processing_s
        spread = self.processing_spread * self._spread_rng.uniform(-1.0, 1.0)
        return self.processing_s * (1.0 + spread)

    def _links(self, request: _Request, base: str | None = None) -> dict[str, str]:
        response_url = f"{base or self.queue_url}/{APP}/requests/{request.request_id}"
        return {
            "request_id": request.request_id,
            "response_url": response_url,
            "status_url": f"{response_url}/status",
            "cancel_url": f"{response_url}/cancel",
        }

    # --- the lifecycle (every method below: call with the lock held) -------------------------

    def _tick(self) -> None:
        """Starts requests, completes them and sends webhooks without waiting for a poll."""
        with self._changed:
            while not self.stopping.is_set():
                self._advance(time.monotonic())
                self._changed.wait(timeout=TICK_S)

    def _advance(self, now: float) -> None:
        """Bring every request to where it is at ``now``: FIFO, ``concurrency`` slots."""
        self._complete_running(now)
        while self._waiting:
            head = self._waiting[0]
            start = max(head.ready_at, self._slot_free_at())
            if start > now:
                break
            self._waiting.popleft()
            if head.deadline is not None and start > head.deadline:
                self._time_out(head)
            else:
                self._start(head, start)
        self._running = [r for r in self._running if r.completed_at is None or r.completed_at > now]
        for request in [r for r in self._waiting if r.deadline is not None and r.deadline <= now]:
            self._waiting.remove(request)
            self._time_out(request)

    def _slot_free_at(self) -> float:
        if len(self._running) < self.concurrency:
            return -math.inf
        return min(
            r.completed_at if r.completed_at is not None else math.inf for r in self._running
        )

    def _complete_running(self, now: float) -> None:
        for request in self._running:
            done = request.work is not None and now >= request.ends_at
            if request.completed_at is None and done and request.work is not None:
                self._complete(request, max(request.ends_at, request.work_done_at), request.work)

    def _start(self, request: _Request, at: float) -> None:
        self._running = [r for r in self._running if r.completed_at is None or r.completed_at > at]
        request.started_at = at
        request.ends_at = at + request.processing_s
        self._running.append(request)
        self.spawn(self._process, request)

    def _time_out(self, request: _Request) -> None:
        assert request.deadline is not None
        failure = _flat_failure("request_timeout", headers={"X-Fal-Request-Timeout-Type": "user"})
        self.timed_out.append(request.request_id)
        self._complete(request, request.deadline, failure)

    def _complete(self, request: _Request, at: float, outcome: _Output | _Failure) -> None:
        request.completed_at = at
        request.outcome = outcome
        if request.webhook is not None:
            self.spawn(self._deliver, request)

    def _state(self, request: _Request) -> str:
        if request.completed_at is not None:
            return "COMPLETED"
        return "IN_PROGRESS" if request.started_at is not None else "IN_QUEUE"

    def _live(self, request_id: str, now: float) -> _Request | None:
        """The request, unless unknown or expired."""
        request = self._requests.get(request_id)
        if request is None or request.expired:
            return None
        if request.completed_at is not None and now >= request.completed_at + self._ttl(request):
            request.expired = True
            return None
        return request

    def _ttl(self, request: _Request) -> float:
        output = request.outcome
        large = isinstance(output, _Output) and output.size >= self.large_result_bytes
        return self.large_result_ttl_s if large else self.result_ttl_s

    def _billable(self, request: _Request) -> bool:
        failure = request.outcome if isinstance(request.outcome, _Failure) else None
        return request.started_at is not None and (failure is None or failure.status < 500)

    # --- processing (worker threads, without the lock) ---------------------------------------

    def _process(self, request: _Request) -> None:
        work = self._produce(request)
        with self._changed:
            request.work = work
            request.work_done_at = time.monotonic()
            self._changed.notify_all()

    def _produce(self, request: _Request) -> _Output | _Failure:
        if request.invalid is not None:
            return request.invalid
        source = self._load_inputs(request.body)
        if isinstance(source, _Failure):
            return source
        if request.injected is not None:
            return request.injected
        body = request.body
        inline = bool(body.get("sync_mode", False))
        images = [
            self._publish(render_result(source, index, "PNG", 95), source.size, inline)
            for index in range(body.get("num_images", 1))
        ]
        seed = body.get("seed")
        if seed is None:
            seed = self._rng.randint(0, 2**31 - 1)
        return _Output(images, seed, sum(image["file_size"] for image in images))

    def _load_inputs(self, body: dict[str, Any]) -> Image.Image | _Failure:
        loaded = self._load_image(body["image_url"], ("body", "image_url"), INPUT_FORMATS)
        if isinstance(loaded, _Failure):
            return loaded
        total = 0
        for index, url in enumerate(body.get("image_urls") or []):
            reference = self._load_image(url, ("body", "image_urls", index), WEB_FORMATS)
            if isinstance(reference, _Failure):
                return reference
            total += reference[0]
        if total > REFERENCES_MAX_BYTES:
            return _model_failure("image_too_large", ("body", "image_urls"), body["image_urls"])
        return loaded[1]

    def _load_image(
        self, url: str, loc: Loc, formats: frozenset[str]
    ) -> tuple[int, Image.Image] | _Failure:
        data = self._download(url)
        if data is None:
            return _model_failure("file_download_error", loc, url)
        image = open_image(data, formats)
        if image is None:
            return _model_failure("image_load_error", loc, url)
        if min(image.size) < MIN_SIDE:
            return _model_failure("image_too_small", loc, url)
        return len(data), image

    def _download(self, url: str) -> bytes | None:
        if url.startswith("data:"):
            return decode_data_uri(url) if self.data_uris else None
        if not is_http_url(url):
            return None
        return fetch_url(url)

    def _publish(self, data: bytes, size: tuple[int, int], inline: bool) -> dict[str, Any]:
        if inline:
            url = "data:image/png;base64," + base64.b64encode(data).decode()
        else:
            path = f"{CDN_FILES_PREFIX}{uuid.uuid4().hex}/image.png"
            with self.lock:
                self._files[path] = (data, "image/png")
            url = f"{self.base_url}{path}"
        return {"url": url, "content_type": "image/png", "file_name": "image.png",
                "file_size": len(data), "width": size[0], "height": size[1]}  # fmt: skip

    def _deliver(self, request: _Request) -> None:
        assert request.webhook is not None
        base = {"request_id": request.request_id, "gateway_request_id": request.request_id}
        outcome = request.outcome
        if isinstance(outcome, _Output):
            payload: dict[str, Any] = {**base, "status": "OK", "payload": outcome.as_json()}
        else:
            assert outcome is not None
            error = f"Invalid status code: {outcome.status}"
            payload = {**base, "status": "ERROR", "error": error, "payload": outcome.payload}
        status = deliver(request.webhook, "POST", json.dumps(payload).encode(), "application/json")
        with self.lock:
            self.webhooks.append((request.webhook, status, payload))

    # --- status, result, cancel --------------------------------------------------------------

    def _status(self, call: RecordedCall, raw: bytes, request_id: str) -> Reply:
        query = parse_qs(urlsplit(call.path).query)
        with_logs = query.get("logs", ["0"])[0].lower() in ("1", "true")
        with self.lock:
            now = time.monotonic()
            self._advance(now)
            request = self._live(request_id, now)
            if request is None:
                return json_reply(404, {"detail": NOT_FOUND})
            state = self._state(request)
            response_url = self._links(request)["response_url"]
            body: dict[str, Any] = {
                "status": state,
                "request_id": request_id,
                "response_url": response_url,
            }
            if state == "IN_QUEUE":
                body["queue_position"] = self._waiting.index(request)
                return json_reply(202, body)
            body["logs"] = self._logs(request, now) if with_logs else None
            if state == "IN_PROGRESS":
                return json_reply(202, body)
            return json_reply(200, {**body, **self._completion(request)})

    def _completion(self, request: _Request) -> dict[str, Any]:
        outcome = request.outcome
        if isinstance(outcome, _Failure):
            return {"metrics": {}, "error": outcome.error, "error_type": outcome.error_type}
        assert request.started_at is not None and request.completed_at is not None
        return {"metrics": {"inference_time": round(request.completed_at - request.started_at, 3)}}

    def _logs(self, request: _Request, now: float) -> list[dict[str, str]]:
        events: list[tuple[float, str]] = []
        if request.started_at is not None:
            events.append((request.started_at, "Downloading input images..."))
            events.append((request.started_at + request.processing_s / 2, "Generating image..."))
        if request.completed_at is not None:
            failed = isinstance(request.outcome, _Failure)
            events.append((request.completed_at, "Request failed" if failed else "Done"))
        return [
            {"message": message, "timestamp": self._iso(at), "level": "INFO", "source": "user"}
            for at, message in events
            if at <= now
        ]

    def _iso(self, at: float) -> str:
        wall = self._clock[1] + (at - self._clock[0])
        stamp = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
        return stamp.replace("+00:00", "Z")

    def _result(self, call: RecordedCall, raw: bytes, request_id: str) -> Reply:
        with self.lock:
            now = time.monotonic()
            self._advance(now)
            if request_id in self._requests:
                self.result_reads[request_id] += 1
            request = self._live(request_id, now)
            if request is None:
                return json_reply(404, {"detail": NOT_FOUND})
            if request.completed_at is None:
                return json_reply(400, {"detail": "Request is still in progress"})
            expire = self._faults.take(
                ("result",),
                lambda f: f.kind == "expire" and f.params.get("request_id") in (None, request_id),
            )
            if expire is not None:
                request.expired = True
                return json_reply(404, {"detail": NOT_FOUND})
            outcome = request.outcome
        if isinstance(outcome, _Output):
            return json_reply(200, outcome.as_json())
        assert outcome is not None
        return json_reply(outcome.status, outcome.payload, outcome.headers)

    def _cancel(self, call: RecordedCall, raw: bytes, request_id: str) -> Reply:
        with self.lock:
            now = time.monotonic()
            self._advance(now)
            request = self._live(request_id, now)
            if request is None:
                return json_reply(404, {"status": "NOT_FOUND"})
            if request.completed_at is not None:
                return json_reply(400, {"status": "ALREADY_COMPLETED"})
            if request.started_at is None:
                self._waiting.remove(request)
            self.canceled.append(request_id)
            self._complete(request, now, _flat_failure("request_cancelled"))
        return json_reply(202, {"status": "CANCELLATION_REQUESTED"})

    # --- storage -----------------------------------------------------------------------------

    def _initiate(self, call: RecordedCall, raw: bytes, _: str) -> Reply:
        query = parse_qs(urlsplit(call.path).query, keep_blank_values=True)
        storage_type = query.get("storage_type", [STORAGE_TYPE])[0]
        issues = _enum(STORAGE_TYPE)(storage_type, ("query", "storage_type"))
        body, parse_issues = _parse_json_body(call.headers, raw)
        issues += parse_issues or _INITIATE(body, ("body",))
        if issues:
            return json_reply(422, {"detail": self._styled(issues)})
        token = uuid.uuid4().hex
        path = f"{CDN_FILES_PREFIX}{token}/{quote(body['file_name'], safe='')}"
        record = StoredUpload(
            file_name=body["file_name"],
            content_type=body["content_type"],
            upload_url=f"{self.base_url}{UPLOAD_PREFIX}{token}",
            file_url=f"{self.base_url}{path}",
        )
        with self.lock:
            self.uploads.append(record)
            self._upload_slots[token] = (record, path)
        return json_reply(200, {"upload_url": record.upload_url, "file_url": record.file_url})

    def _put_upload(self, call: RecordedCall, raw: bytes, token: str) -> Reply:
        """The presigned upload target: the exact declared Content-Type, no auth needed."""
        with self.lock:
            slot = self._upload_slots.get(token)
        xml = {"Content-Type": "application/xml"}
        if slot is None:
            return Reply(404, s3_error_xml("NoSuchUpload", "Unknown upload URL."), xml)
        if call.method != "PUT":
            return Reply(405, s3_error_xml("MethodNotAllowed", "Use PUT."), xml)
        record, path = slot
        given = call.headers.get("content-type", "").split(";")[0].strip().lower()
        if given != record.content_type.lower():
            message = f"Content-Type {given!r} does not match the signed {record.content_type!r}."
            return Reply(403, s3_error_xml("SignatureDoesNotMatch", message), xml)
        with self.lock:
            record.data = raw
            record.puts += 1
            record.authorization_sent |= "authorization" in call.headers
            self._files[path] = (raw, record.content_type)
        return Reply(200, b"", {"ETag": f'"{uuid.uuid4().hex}"'})
