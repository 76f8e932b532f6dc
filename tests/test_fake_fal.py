"""The fake fal server is a fixture, but a wrong fake makes every client test meaningless.

Plain httpx calls against ``servers.fal.FakeFal``, checked against ``reference/fal.md`` and
the endpoint's seed page (whose two request bodies are the valid examples here).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from servers.fal import ENDPOINT, FakeFal
from servers.files import FileServer
from worker.jobs import PALETTE_PRESETS

KEY = "fal-key-id:fal-key-secret"
AUTH = {"Authorization": f"Key {KEY}"}
SOURCE_SIZE = (64, 48)
PROMPT = "A beautiful sunset over mountains that writes Ideogram v3 in fal.ai"
# One client for the module: building one per call (an SSL context each) dominates the run time.
HTTP = httpx.Client(timeout=10.0)
DROP = object()


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = SOURCE_SIZE) -> bytes:
    image = Image.new("RGB", size, (200, 180, 40))
    image.paste((20, 60, 200), (4, 4, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.png"


@pytest.fixture(scope="module", autouse=True)
def _close_http_client() -> Iterator[None]:
    yield
    HTTP.close()


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        server.add("/src.png", image_bytes(), "image/png")
        server.add("/src.jpg", image_bytes("JPEG"), "image/jpeg")
        server.add("/style.webp", image_bytes("WEBP", (40, 40)), "image/webp")
        server.add("/style.bmp", image_bytes("BMP", (40, 40)), "image/bmp")
        server.add("/tiny.png", image_bytes("PNG", (31, 64)), "image/png")
        server.add("/notes.txt", b"not an image at all", "text/plain")
        server.add("/hook", b"ok", "text/plain")
        yield server


@pytest.fixture
def fake() -> Iterator[FakeFal]:
    with FakeFal(KEY, queue_s=0.02, processing_s=0.05) as server:
        yield server


def make_body(files: FileServer, **changes: Any) -> dict[str, Any]:
    """The seed page's required example with a local image; ``DROP`` removes a key."""
    body: dict[str, Any] = {"prompt": PROMPT, "image_url": files.url("/src.png")}
    for key, value in changes.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def submit(
    fake: FakeFal,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> httpx.Response:
    return HTTP.post(
        fake.submit_url, json=body, headers=AUTH if headers is None else headers, params=params
    )


def accepted(fake: FakeFal, body: Any, **kwargs: Any) -> dict[str, Any]:
    response = submit(fake, body, **kwargs)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def wait_completed(reply: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = HTTP.get(reply["status_url"], headers=AUTH)
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            assert body["status"] == "COMPLETED"
            return body
        assert response.status_code == 202, response.text
        time.sleep(0.01)
    raise AssertionError("not completed in time")


def run(fake: FakeFal, body: Any, **kwargs: Any) -> tuple[dict[str, Any], httpx.Response]:
    """Submit, wait, read: (the completed status body, the result response)."""
    reply = accepted(fake, body, **kwargs)
    status = wait_completed(reply)
    return status, HTTP.get(reply["response_url"], headers=AUTH)


def issues(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text
    detail: list[dict[str, Any]] = response.json()["detail"]
    return detail


# --- auth and routes ---------------------------------------------------------------------------


def test_key_header_is_required(fake: FakeFal, files: FileServer) -> None:
    body = make_body(files)
    for headers in ({}, {"Authorization": "Key wrong:key"}, {"Authorization": f"Bearer {KEY}"},
                    {"Authorization": KEY}):  # fmt: skip
        response = submit(fake, body, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"detail": "No user found for Key ID and Secret"}
    reply = accepted(fake, body)
    for url in (reply["status_url"], reply["response_url"]):
        assert HTTP.get(url).status_code == 401
    assert HTTP.put(reply["cancel_url"]).status_code == 401
    initiate = HTTP.post(
        f"{fake.rest_url}/storage/upload/initiate",
        json={"file_name": "a.png", "content_type": "image/png"},
    )
    assert initiate.status_code == 401
    assert fake.submitted == [reply["request_id"]]


def test_a_locked_account_gets_403_everywhere(fake: FakeFal, files: FileServer) -> None:
    reply = accepted(fake, make_body(files))
    fake.lock_account()
    response = submit(fake, make_body(files))
    assert response.status_code == 403
    assert response.json()["detail"].startswith("User is locked. Reason: Exhausted balance. ")
    assert HTTP.get(reply["status_url"], headers=AUTH).status_code == 403
    assert HTTP.get(reply["response_url"], headers=AUTH).status_code == 403
    assert submit(fake, make_body(files), headers={}).status_code == 401
    assert fake.submit_count() == 1


def test_submit_reply_uses_owner_app_urls_only(fake: FakeFal, files: FileServer) -> None:
    reply = accepted(fake, make_body(files))
    request_id = reply["request_id"]
    base = f"{fake.queue_url}/fal-ai/ideogram/requests/{request_id}"
    assert reply == {
        "request_id": request_id,
        "response_url": base,
        "status_url": f"{base}/status",
        "cancel_url": f"{base}/cancel",
        "queue_position": 0,
    }
    wait_completed(reply)
    wrong = f"{fake.queue_url}/{ENDPOINT}/requests/{request_id}"
    assert HTTP.get(f"{wrong}/status", headers=AUTH).status_code == 404
    assert HTTP.get(wrong, headers=AUTH).status_code == 404
    assert HTTP.put(f"{wrong}/cancel", headers=AUTH).status_code == 404
    assert HTTP.get(base, headers=AUTH).status_code == 200
    assert HTTP.get(fake.submit_url, headers=AUTH).status_code == 405
    assert HTTP.post(f"{base}/status", headers=AUTH).status_code == 405
    assert (
        HTTP.get(f"{fake.queue_url}/fal-ai/ideogram/requests/nope", headers=AUTH).status_code == 404
    )
    other = HTTP.post(f"{fake.queue_url}/fal-ai/ideogram/v3/edit", json={}, headers=AUTH)
    assert other.status_code == 404


def test_identical_submits_are_two_requests(fake: FakeFal, files: FileServer) -> None:
    body = make_body(files, seed=7)
    first, second = accepted(fake, body), accepted(fake, body)
    assert first["request_id"] != second["request_id"]
    assert fake.submitted == [first["request_id"], second["request_id"]]
    assert fake.submissions[first["request_id"]] == body
    assert fake.submit_count() == 2
    wait_completed(first)
    wait_completed(second)
    assert fake.billed() == fake.submitted


# --- the input schema --------------------------------------------------------------------------


def test_seed_page_examples_are_valid(fake: FakeFal, files: FileServer) -> None:
    full = make_body(files, rendering_speed="BALANCED", expand_prompt=True, num_images=1)
    for body in (make_body(files), full):
        status, result = run(fake, body)
        assert "error" not in status
        assert result.status_code == 200


BAD_FIELDS: list[tuple[dict[str, Any], list[Any], str]] = [
    ({"prompt": DROP}, ["body", "prompt"], "missing"),
    ({"image_url": DROP}, ["body", "image_url"], "missing"),
    ({"prompt": ""}, ["body", "prompt"], "string_too_short"),
    ({"prompt": 5}, ["body", "prompt"], "string_type"),
    ({"prompt": None}, ["body", "prompt"], "string_type"),
    ({"image_url": 7}, ["body", "image_url"], "string_type"),
    ({"rendering_speed": "DEFAULT"}, ["body", "rendering_speed"], "enum"),
    ({"rendering_speed": "turbo"}, ["body", "rendering_speed"], "enum"),
    ({"rendering_speed": None}, ["body", "rendering_speed"], "enum"),
    ({"style": "ANIME"}, ["body", "style"], "enum"),
    ({"style_codes": "deadbeef"}, ["body", "style_codes"], "list_type"),
    ({"style_codes": ["deadbee"]}, ["body", "style_codes", 0], "string_pattern_mismatch"),
    ({"style_codes": ["DEADBEEF", "deadbeeg"]}, ["body", "style_codes", 1],
     "string_pattern_mismatch"),
    ({"style_preset": "NOT_A_PRESET"}, ["body", "style_preset"], "enum"),
    ({"image_urls": "https://x/y.png"}, ["body", "image_urls"], "list_type"),
    ({"image_urls": [3]}, ["body", "image_urls", 0], "string_type"),
    ({"color_palette": "EMBER"}, ["body", "color_palette"], "model_type"),
    ({"color_palette": {"name": "RED"}}, ["body", "color_palette", "name"], "enum"),
    ({"color_palette": {"name": "EMBER", "weight": 1}}, ["body", "color_palette", "weight"],
     "extra_forbidden"),
    ({"color_palette": {"members": []}}, ["body", "color_palette", "members"], "too_short"),
    ({"color_palette": {"members": [{"rgb": [1, 2, 3]}]}},
     ["body", "color_palette", "members", 0, "rgb"], "model_type"),
    ({"color_palette": {"members": [{"rgb": {"r": 256, "g": 0, "b": 0}}]}},
     ["body", "color_palette", "members", 0, "rgb", "r"], "less_than_equal"),
    ({"color_palette": {"members": [{"rgb": {"r": 1, "g": -1, "b": 0}}]}},
     ["body", "color_palette", "members", 0, "rgb", "g"], "greater_than_equal"),
    ({"color_palette": {"members": [{"rgb": {"r": 1, "g": 0}}]}},
     ["body", "color_palette", "members", 0, "rgb", "b"], "missing"),
    ({"color_palette": {"members": [{"rgb": {"r": 1.0, "g": 0, "b": 0}}]}},
     ["body", "color_palette", "members", 0, "rgb", "r"], "int_type"),
    ({"color_palette": {"members": [{"rgb": {"r": 1, "g": 0, "b": 0}, "color_weight": 0}]}},
     ["body", "color_palette", "members", 0, "color_weight"], "greater_than"),
    ({"color_palette": {"members": [{"rgb": {"r": 1, "g": 0, "b": 0}, "color_weight": 1.5}]}},
     ["body", "color_palette", "members", 0, "color_weight"], "less_than_equal"),
    ({"color_palette": {"members": [{"rgb": {"r": 1, "g": 0, "b": 0}, "color_weight": True}]}},
     ["body", "color_palette", "members", 0, "color_weight"], "float_type"),
    ({"color_palette": {"members": [{"rgb": {"r": 1, "g": 0, "b": 0}, "hex": "#010000"}]}},
     ["body", "color_palette", "members", 0, "hex"], "extra_forbidden"),
    ({"expand_prompt": "true"}, ["body", "expand_prompt"], "bool_type"),
    ({"expand_prompt": 1}, ["body", "expand_prompt"], "bool_type"),
    ({"seed": True}, ["body", "seed"], "int_type"),
    ({"seed": 1.0}, ["body", "seed"], "int_type"),
    ({"seed": "42"}, ["body", "seed"], "int_type"),
    ({"num_images": 0}, ["body", "num_images"], "greater_than_equal"),
    ({"num_images": 9}, ["body", "num_images"], "less_than_equal"),
    ({"num_images": True}, ["body", "num_images"], "int_type"),
    ({"sync_mode": "no"}, ["body", "sync_mode"], "bool_type"),
    ({"negative_prompt": "blurry"}, ["body", "negative_prompt"], "extra_forbidden"),
    ({"magic_prompt": "ON"}, ["body", "magic_prompt"], "extra_forbidden"),
    ({"input": {}}, ["body", "input"], "extra_forbidden"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "loc", "kind"), BAD_FIELDS)
def test_bad_fields_are_422_with_loc_and_type(
    fake: FakeFal, files: FileServer, changes: dict[str, Any], loc: list[Any], kind: str
) -> None:
    detail = issues(submit(fake, make_body(files, **changes)))
    assert [(issue["loc"], issue["type"]) for issue in detail] == [(loc, kind)]
    assert all(isinstance(issue["msg"], str) and issue["msg"] for issue in detail)
    assert fake.submitted == []


def test_every_problem_is_listed(fake: FakeFal) -> None:
    detail = issues(submit(fake, {"num_images": 20, "extra": 1}))
    assert [(issue["loc"], issue["type"]) for issue in detail] == [
        (["body", "prompt"], "missing"),
        (["body", "image_url"], "missing"),
        (["body", "num_images"], "less_than_equal"),
        (["body", "extra"], "extra_forbidden"),
    ]


@pytest.mark.parametrize(
    ("changes", "loc"),
    [
        ({"style": "AUTO", "style_codes": ["deadbeef"]}, ["body"]),
        ({"color_palette": {"name": "EMBER", "members": [{"rgb": {"r": 1, "g": 2, "b": 3}}]}},
         ["body", "color_palette"]),
        ({"color_palette": {}}, ["body", "color_palette"]),
        ({"color_palette": {"name": None, "members": None}}, ["body", "color_palette"]),
    ],
)  # fmt: skip
def test_model_rules_are_value_errors(
    fake: FakeFal, files: FileServer, changes: dict[str, Any], loc: list[Any]
) -> None:
    (issue,) = issues(submit(fake, make_body(files, **changes)))
    assert (issue["loc"], issue["type"]) == (loc, "value_error")
    assert issue["msg"].startswith("Value error, ")


@pytest.mark.parametrize(
    "changes",
    [
        {"rendering_speed": "TURBO", "style": "DESIGN", "style_preset": "BAUHAUS"},
        {"rendering_speed": "QUALITY", "style_codes": ["0A1b2C3d", "deadbeef"], "style": None},
        {"style": None, "style_codes": None, "style_preset": None, "image_urls": None,
         "color_palette": None, "seed": None},
        {"color_palette": {"name": "ULTRAMARINE"}, "seed": -5, "num_images": 8,
         "expand_prompt": False, "sync_mode": False},
        {"color_palette": {"members": [{"rgb": {"r": 0, "g": 128, "b": 255}, "color_weight": 1},
                                       {"rgb": {"r": 255, "g": 0, "b": 0}}]}},
        {"color_palette": {"members": [{"rgb": {"r": 0, "g": 0, "b": 0}, "color_weight": 0.01}]},
         "image_urls": []},
    ],
)  # fmt: skip
def test_valid_inputs_are_accepted(
    fake: FakeFal, files: FileServer, changes: dict[str, Any]
) -> None:
    accepted(fake, make_body(files, **changes))


@pytest.mark.parametrize("name", PALETTE_PRESETS)
def test_every_palette_preset(fake: FakeFal, files: FileServer, name: str) -> None:
    accepted(fake, make_body(files, color_palette={"name": name}))


def test_body_must_be_a_json_object(fake: FakeFal, files: FileServer) -> None:
    url = fake.submit_url
    json_type = {**AUTH, "Content-Type": "application/json"}
    not_json = issues(HTTP.post(url, content=b'{"prompt": ', headers=json_type))
    assert [issue["type"] for issue in not_json] == ["json_invalid"]
    for payload in ([make_body(files)], "prompt", 3):
        (issue,) = issues(submit(fake, payload))
        assert (issue["loc"], issue["type"]) == (["body"], "model_attributes_type")
    (empty,) = issues(HTTP.post(url, content=b"", headers=json_type))
    assert (empty["loc"], empty["type"]) == (["body"], "missing")
    text = json.dumps(make_body(files))
    (form,) = issues(HTTP.post(url, content=text, headers={**AUTH, "Content-Type": "text/plain"}))
    assert form["type"] == "model_attributes_type"
    assert fake.submitted == []


def test_pydantic_v1_error_style(files: FileServer) -> None:
    with FakeFal(KEY, error_style="v1") as fake:
        detail = issues(submit(fake, make_body(files, prompt=DROP, extra=1)))
    assert detail == [
        {"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"},
        {
            "loc": ["body", "extra"],
            "msg": "extra fields not permitted",
            "type": "value_error.extra",
        },
    ]


def test_validation_at_result_accepts_then_fails(files: FileServer) -> None:
    with FakeFal(KEY, queue_s=0.01, processing_s=0.02, validation="result") as fake:
        status, result = run(fake, make_body(files, num_images=0))
        assert fake.submit_count() == 1
    assert status["error_type"] == "greater_than_equal"
    (issue,) = issues(result)
    assert issue["loc"] == ["body", "num_images"]


def test_bad_submit_headers_and_query(fake: FakeFal, files: FileServer) -> None:
    body = make_body(files)
    for headers in ({"X-Fal-Request-Timeout": "soon"}, {"X-Fal-Request-Timeout": "0"},
                    {"X-Fal-Queue-Priority": "high"}):  # fmt: skip
        assert submit(fake, body, headers={**AUTH, **headers}).status_code == 400
    for params in ({"fal_webhook": "not a url"}, {"fal_max_queue_length": "-1"}):
        assert submit(fake, body, params=params).status_code == 400
    assert fake.submitted == []


# --- the lifecycle -----------------------------------------------------------------------------


def test_in_queue_then_in_progress_then_completed(files: FileServer) -> None:
    with FakeFal(KEY, queue_s=0.15, processing_s=0.3) as fake:
        reply = accepted(fake, make_body(files))
        first = HTTP.get(reply["status_url"], headers=AUTH)
        assert first.status_code == 202
        assert first.json() == {
            "status": "IN_QUEUE",
            "request_id": reply["request_id"],
            "queue_position": 0,
            "response_url": reply["response_url"],
        }
        early = HTTP.get(reply["response_url"], headers=AUTH)
        assert (early.status_code, early.json()) == (
            400,
            {"detail": "Request is still in progress"},
        )
        seen: list[str] = []
        bodies: dict[str, dict[str, Any]] = {}
        while not seen or seen[-1] != "COMPLETED":
            response = HTTP.get(reply["status_url"], params={"logs": "1"}, headers=AUTH)
            body = response.json()
            assert response.status_code == (200 if body["status"] == "COMPLETED" else 202)
            seen.append(body["status"])
            bodies[body["status"]] = body
            time.sleep(0.02)
        plain = HTTP.get(reply["status_url"], headers=AUTH).json()
    order = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]
    assert order == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    progress = bodies["IN_PROGRESS"]
    assert set(progress) == {"status", "request_id", "response_url", "logs"}
    assert all(set(log) >= {"message", "timestamp"} for log in progress["logs"])
    assert progress["logs"][0]["timestamp"].endswith("Z")
    done = bodies["COMPLETED"]
    assert set(done) == {"status", "request_id", "response_url", "logs", "metrics"}
    assert done["metrics"]["inference_time"] >= 0.3
    assert plain["logs"] is None


def test_result_images_num_images_and_seed(fake: FakeFal, files: FileServer) -> None:
    _, result = run(fake, make_body(files, num_images=3, seed=1234))
    assert result.status_code == 200
    output = result.json()
    assert set(output) == {"images", "seed"}
    assert output["seed"] == 1234
    contents = []
    for image in output["images"]:
        assert set(image) == {"url", "content_type", "file_name", "file_size", "width", "height"}
        assert image["url"].startswith(f"{fake.cdn_url}/files/")
        fetched = HTTP.get(image["url"])  # the CDN needs no key
        assert fetched.status_code == 200
        assert fetched.headers["content-type"] == image["content_type"] == "image/png"
        assert len(fetched.content) == image["file_size"]
        opened = open_image(fetched.content)
        assert (opened.format, opened.size) == ("PNG", SOURCE_SIZE)
        assert (image["width"], image["height"]) == SOURCE_SIZE
        contents.append(fetched.content)
    assert len(set(contents)) == 3
    _, unseeded = run(fake, make_body(files))
    assert isinstance(unseeded.json()["seed"], int)
    assert len(unseeded.json()["images"]) == 1


def test_sync_mode_gives_data_uris(fake: FakeFal, files: FileServer) -> None:
    _, result = run(fake, make_body(files, sync_mode=True))
    (image,) = result.json()["images"]
    prefix = "data:image/png;base64,"
    assert image["url"].startswith(prefix)
    assert open_image(base64.b64decode(image["url"][len(prefix) :])).size == SOURCE_SIZE


def test_concurrency_limits_in_progress_and_queue_positions(files: FileServer) -> None:
    # Every request spends queue_s in the queue first: the four submits (100+ ms under
    # load) all land while none has left it, and processing_s outlasts the checks below.
    with FakeFal(KEY, queue_s=0.8, processing_s=2.0, concurrency=2) as fake:
        replies = [accepted(fake, make_body(files)) for _ in range(4)]
        assert [reply["queue_position"] for reply in replies] == [0, 1, 2, 3]
        time.sleep(1.2)
        bodies = [HTTP.get(reply["status_url"], headers=AUTH).json() for reply in replies]
        assert [body["status"] for body in bodies] == [
            "IN_PROGRESS", "IN_PROGRESS", "IN_QUEUE", "IN_QUEUE"
        ]  # fmt: skip
        assert [body.get("queue_position") for body in bodies[2:]] == [0, 1]
        started = time.monotonic()
        wait_completed(replies[3])
        assert time.monotonic() - started > 1.0  # waited for a slot, then ran


def test_image_url_is_fetched_when_processing_starts(files: FileServer) -> None:
    files.add("/late.png", image_bytes(), "image/png")
    with FakeFal(KEY, queue_s=0.3, processing_s=0.02) as fake:
        reply = accepted(fake, make_body(files, image_url=files.url("/late.png")))
        assert files.requests_to("/late.png") == []
        wait_completed(reply)
        assert [r.method for r in files.requests_to("/late.png")] == ["GET"]


@pytest.mark.parametrize(
    ("changes", "loc", "kind"),
    [
        ({"image_url": "CLOSED"}, ["body", "image_url"], "file_download_error"),
        ({"image_url": "/status/404"}, ["body", "image_url"], "file_download_error"),
        ({"image_url": "ftp://example.com/a.png"}, ["body", "image_url"], "file_download_error"),
        ({"image_url": "not a url"}, ["body", "image_url"], "file_download_error"),
        ({"image_url": "DATA_URI"}, ["body", "image_url"], "file_download_error"),
        ({"image_url": "/notes.txt"}, ["body", "image_url"], "image_load_error"),
        ({"image_url": "/tiny.png"}, ["body", "image_url"], "image_too_small"),
        ({"image_urls": ["/style.webp", "CLOSED"]}, ["body", "image_urls", 1],
         "file_download_error"),
        ({"image_urls": ["/style.bmp"]}, ["body", "image_urls", 0], "image_load_error"),
    ],
)  # fmt: skip
def test_inputs_that_cannot_be_used_complete_with_an_error(
    fake: FakeFal, files: FileServer, changes: dict[str, Any], loc: list[Any], kind: str
) -> None:
    def resolve(value: str) -> str:
        if value == "CLOSED":
            return closed_port_url()
        if value == "DATA_URI":
            return "data:image/png;base64," + base64.b64encode(image_bytes()).decode()
        return files.url(value) if value.startswith("/") else value

    resolved = {
        key: [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
        for key, value in changes.items()
    }
    status, result = run(fake, make_body(files, **resolved))
    assert (status["error_type"], status["metrics"]) == (kind, {})
    assert isinstance(status["error"], str)
    (issue,) = issues(result)
    assert (issue["loc"], issue["type"]) == (loc, kind)
    assert fake.billed() == fake.submitted  # it ran: a model error may be billed


def test_data_uris_when_enabled(files: FileServer) -> None:
    uri = "data:image/jpeg;base64," + base64.b64encode(image_bytes("JPEG")).decode()
    with FakeFal(KEY, queue_s=0.01, processing_s=0.02, data_uris=True) as fake:
        _, result = run(fake, make_body(files, image_url=uri))
    assert result.status_code == 200


def test_style_references_are_fetched(fake: FakeFal, files: FileServer) -> None:
    references = [files.url("/style.webp"), files.url("/src.jpg")]
    before = len(files.requests_to("/style.webp"))
    _, result = run(fake, make_body(files, image_urls=references))
    assert result.status_code == 200
    assert len(files.requests_to("/style.webp")) == before + 1


# --- storage -----------------------------------------------------------------------------------


def test_upload_then_use_the_file_url(fake: FakeFal) -> None:
    initiate_url = f"{fake.rest_url}/storage/upload/initiate"
    declared = {"file_name": "product shot.png", "content_type": "image/png"}
    response = HTTP.post(
        initiate_url, params={"storage_type": "fal-cdn-v3"}, json=declared, headers=AUTH
    )
    assert response.status_code == 200, response.text
    urls = response.json()
    assert set(urls) == {"upload_url", "file_url"}
    assert urls["file_url"].startswith(f"{fake.cdn_url}/files/")
    assert HTTP.get(urls["file_url"]).status_code == 404  # nothing uploaded yet
    data = image_bytes()
    wrong = HTTP.put(urls["upload_url"], content=data, headers={"Content-Type": "image/jpeg"})
    assert wrong.status_code == 403
    put = HTTP.put(urls["upload_url"], content=data, headers={"Content-Type": "image/png"})
    assert put.status_code == 200
    served = HTTP.get(urls["file_url"])
    assert (served.content, served.headers["content-type"]) == (data, "image/png")
    (upload,) = fake.uploads
    assert (upload.file_name, upload.data, upload.puts) == ("product shot.png", data, 1)
    assert not upload.authorization_sent
    _, result = run(fake, {"prompt": PROMPT, "image_url": urls["file_url"]})
    assert result.status_code == 200


def test_initiate_is_strict(fake: FakeFal) -> None:
    url = f"{fake.rest_url}/storage/upload/initiate"
    good = {"file_name": "a.png", "content_type": "image/png"}
    wrong_type = HTTP.post(url, params={"storage_type": "gcs"}, json=good, headers=AUTH)
    assert issues(wrong_type)[0]["loc"] == ["query", "storage_type"]
    (missing,) = issues(HTTP.post(url, json={"file_name": "a.png"}, headers=AUTH))
    assert (missing["loc"], missing["type"]) == (["body", "content_type"], "missing")
    assert HTTP.post(f"{fake.queue_url}/storage/upload/initiate", json=good,
                     headers=AUTH).status_code == 404  # fmt: skip
    assert HTTP.put(f"{fake.base_url}/cdn-upload/nope", content=b"x").status_code == 404
    assert fake.uploads == []


# --- cancel, timeouts, expiry ------------------------------------------------------------------


def test_cancel_answers(files: FileServer) -> None:
    with FakeFal(KEY, queue_s=0.01, processing_s=0.5, concurrency=1) as fake:
        running, queued = accepted(fake, make_body(files)), accepted(fake, make_body(files))
        time.sleep(0.05)
        cancel = HTTP.put(queued["cancel_url"], headers=AUTH)
        assert (cancel.status_code, cancel.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
        status = wait_completed(queued, timeout_s=0.1)
        assert status["error_type"] == "request_cancelled"
        result = HTTP.get(queued["response_url"], headers=AUTH)
        assert result.status_code == 400
        assert result.json()["error_type"] == "request_cancelled"
        again = HTTP.put(queued["cancel_url"], headers=AUTH)
        assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})
        unknown = HTTP.put(f"{fake.queue_url}/fal-ai/ideogram/requests/nope/cancel", headers=AUTH)
        assert (unknown.status_code, unknown.json()) == (404, {"status": "NOT_FOUND"})
        assert HTTP.put(running["cancel_url"], headers=AUTH).status_code == 202
        assert fake.status_of(running["request_id"]) == "COMPLETED"
        assert fake.canceled == [queued["request_id"], running["request_id"]]
        assert fake.billed() == [running["request_id"]]  # it had started


def test_request_timeout_expires_before_start(files: FileServer) -> None:
    with FakeFal(KEY, queue_s=0.01, processing_s=0.5, concurrency=1) as fake:
        accepted(fake, make_body(files))
        headers = {**AUTH, "X-Fal-Request-Timeout": "0.15", "X-Fal-Queue-Priority": "low"}
        late = accepted(fake, make_body(files), headers=headers)
        time.sleep(0.05)
        assert fake.status_of(late["request_id"]) == "IN_QUEUE"
        status = wait_completed(late, timeout_s=1.0)
        result = HTTP.get(late["response_url"], headers=AUTH)
        assert fake.timed_out == [late["request_id"]]
        assert late["request_id"] not in fake.billed()
        recorded = fake.headers_of(late["request_id"])
    assert (status["error_type"], status["error"]) == ("request_timeout", "Request timed out")
    assert result.status_code == 504
    assert result.headers["x-fal-request-timeout-type"] == "user"
    assert result.headers["x-fal-error-type"] == "request_timeout"
    assert result.json() == {"detail": "Request timed out", "error_type": "request_timeout"}
    assert recorded["x-fal-request-timeout"] == "0.15"
    assert recorded["x-fal-queue-priority"] == "low"


def test_a_started_request_is_not_timed_out(files: FileServer) -> None:
    with FakeFal(KEY, queue_s=0.01, processing_s=0.3) as fake:
        headers = {**AUTH, "X-Fal-Request-Timeout": "0.1"}
        status, result = run(fake, make_body(files), headers=headers)
    assert "error" not in status
    assert result.status_code == 200


def test_results_expire(files: FileServer) -> None:
    with FakeFal(KEY, queue_s=0.01, processing_s=0.02, result_ttl_s=0.3) as fake:
        reply = accepted(fake, make_body(files))
        wait_completed(reply)
        assert HTTP.get(reply["response_url"], headers=AUTH).status_code == 200
        time.sleep(0.35)
        assert HTTP.get(reply["response_url"], headers=AUTH).status_code == 404
        assert HTTP.get(reply["status_url"], headers=AUTH).status_code == 404
        assert fake.result_reads[reply["request_id"]] == 2


def test_large_results_expire_sooner(files: FileServer) -> None:
    with FakeFal(KEY, queue_s=0.01, processing_s=0.02, large_result_ttl_s=0.2,
                 large_result_bytes=2 * len(image_bytes())) as fake:  # fmt: skip
        small, large = (
            accepted(fake, make_body(files)),
            accepted(fake, make_body(files, num_images=8)),
        )
        wait_completed(small)
        wait_completed(large)
        time.sleep(0.25)
        assert HTTP.get(small["response_url"], headers=AUTH).status_code == 200
        assert HTTP.get(large["response_url"], headers=AUTH).status_code == 404


def test_max_queue_length(files: FileServer) -> None:
    with FakeFal(KEY, queue_s=1.0) as fake:
        accepted(fake, make_body(files))
        full = submit(fake, make_body(files), params={"fal_max_queue_length": "1"})
        assert full.status_code == 429
        accepted(fake, make_body(files), params={"fal_max_queue_length": "2"})
        assert fake.submit_count() == 2


def test_webhook_is_posted_on_completion(fake: FakeFal, files: FileServer) -> None:
    hook = files.url("/hook")
    ok = accepted(fake, make_body(files), params={"fal_webhook": hook})
    failed = accepted(
        fake, make_body(files, image_url=closed_port_url()), params={"fal_webhook": hook}
    )
    wait_completed(ok)
    wait_completed(failed)
    deadline = time.monotonic() + 2
    while len(fake.webhooks) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    by_id = {
        payload["request_id"]: (url, status, payload) for url, status, payload in fake.webhooks
    }
    url, status, payload = by_id[ok["request_id"]]
    assert (url, status, payload["status"]) == (hook, 200, "OK")
    assert len(payload["payload"]["images"]) == 1
    _, _, error = by_id[failed["request_id"]]
    assert error["status"] == "ERROR"
    assert error["payload"]["detail"][0]["type"] == "file_download_error"
    posted = [r for r in files.requests_to("/hook") if r.method == "POST"]
    assert {json.loads(r.body)["request_id"] for r in posted} >= set(by_id)


# --- faults ------------------------------------------------------------------------------------


def test_status_fault_429_before_accepting(fake: FakeFal, files: FileServer) -> None:
    fake.inject("status", status=429, retry_after=2)
    response = submit(fake, make_body(files))
    assert response.status_code == 429
    assert set(response.json()) == {"detail"}
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-fal-needs-retry"] == "1"
    assert fake.submitted == []
    accepted(fake, make_body(files))
    assert fake.pending_faults() == 0


def test_status_fault_5xx_on_a_route(fake: FakeFal, files: FileServer) -> None:
    reply = accepted(fake, make_body(files))
    fake.inject("status", route="status", status=503, error_type="runner_disconnected")
    response = HTTP.get(reply["status_url"], headers=AUTH)
    assert response.status_code == 503
    assert response.json() == {"detail": "Runner disconnected", "error_type": "runner_disconnected"}
    assert response.headers["x-fal-error-type"] == "runner_disconnected"
    fake.inject("status", route=None, status=500)
    initiate = HTTP.post(
        f"{fake.rest_url}/storage/upload/initiate",
        json={"file_name": "a.png", "content_type": "image/png"},
        headers=AUTH,
    )
    assert initiate.json()["error_type"] == "runner_server_error"
    wait_completed(reply)


def test_fal_names_the_request_in_every_answer_of_its_own(fake: FakeFal, files: FileServer) -> None:
    reply = accepted(fake, make_body(files))
    response = submit(fake, make_body(files))
    assert response.headers["x-fal-request-id"] == response.json()["request_id"]
    for url in (reply["status_url"], reply["response_url"]):
        assert HTTP.get(url, headers=AUTH).headers["x-fal-request-id"] == reply["request_id"]
    refused = submit(fake, {"prompt": "no image"})
    assert refused.status_code == 422
    named = refused.headers["x-fal-request-id"]
    assert named not in fake.submitted  # named, but nothing queued under it
    assert HTTP.get(reply["status_url"].replace(reply["request_id"], named),
                    headers=AUTH).status_code == 404  # fmt: skip
    fake.inject("status", status=500, error_type="internal_error")
    own_5xx = submit(fake, make_body(files))
    assert own_5xx.status_code == 500 and "x-fal-request-id" in own_5xx.headers


@pytest.mark.parametrize("status", [502, 503, 504])
def test_an_ingress_page_names_no_request(fake: FakeFal, files: FileServer, status: int) -> None:
    fake.inject("status", status=status, ingress=True)
    response = submit(fake, make_body(files))
    assert response.status_code == status
    assert "nginx" in response.text and response.headers["content-type"] == "text/html"
    assert "x-fal-request-id" not in response.headers
    assert fake.submitted == []


def test_foreign_urls_name_another_host(fake: FakeFal, files: FileServer) -> None:
    fake.inject("foreign_urls", base="http://elsewhere.invalid:81")
    reply = accepted(fake, make_body(files))
    for name in ("status_url", "response_url", "cancel_url"):
        assert reply[name].startswith("http://elsewhere.invalid:81/fal-ai/ideogram/requests/")
    assert accepted(fake, make_body(files))["status_url"].startswith(fake.queue_url)


def test_accept_then_status_bills_and_runs(fake: FakeFal, files: FileServer) -> None:
    fake.inject("accept_then_status")
    response = submit(fake, make_body(files))
    assert response.status_code == 502
    assert "error_type" in response.json()
    (request_id,) = fake.submitted
    assert response.headers["x-fal-request-id"] == request_id  # fal's own: it names it
    deadline = time.monotonic() + 2
    while fake.status_of(request_id) != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.status_of(request_id) == "COMPLETED"


def test_accept_then_drop(fake: FakeFal, files: FileServer) -> None:
    fake.inject("accept_then_drop")
    with pytest.raises(httpx.TransportError):
        submit(fake, make_body(files))
    assert fake.submit_count() == 1


@pytest.mark.parametrize("after_accept", [False, True])
def test_malformed_answer(fake: FakeFal, files: FileServer, after_accept: bool) -> None:
    fake.inject("malformed", after_accept=after_accept)
    response = submit(fake, make_body(files))
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    assert fake.submit_count() == (1 if after_accept else 0)


def test_slow_answer(fake: FakeFal, files: FileServer) -> None:
    fake.inject("slow", delay_s=0.3)
    started = time.monotonic()
    accepted(fake, make_body(files))
    assert time.monotonic() - started >= 0.3


def test_model_error_faults(fake: FakeFal, files: FileServer) -> None:
    fake.inject("model_error", type="content_policy_violation")
    status, result = run(fake, make_body(files))
    assert status["error_type"] == "content_policy_violation"
    (issue,) = issues(result)
    assert (issue["loc"], issue["type"]) == (["body", "prompt"], "content_policy_violation")
    fake.inject("model_error", type="runner_disconnected")
    status, result = run(fake, make_body(files))
    assert (status["error_type"], status["error"]) == ("runner_disconnected", "Runner disconnected")
    assert result.status_code == 503
    assert result.json()["error_type"] == "runner_disconnected"
    assert result.headers["x-fal-error-type"] == "runner_disconnected"
    assert len(fake.billed()) == 1  # the runner failure is not billed


def test_expire_fault(fake: FakeFal, files: FileServer) -> None:
    reply = accepted(fake, make_body(files))
    fake.inject("expire")
    early = HTTP.get(reply["response_url"], headers=AUTH)
    assert early.status_code == 400  # not completed: the fault waits
    wait_completed(reply)
    assert HTTP.get(reply["response_url"], headers=AUTH).status_code == 404
    assert HTTP.get(reply["status_url"], headers=AUTH).status_code == 404
    assert fake.result_reads[reply["request_id"]] == 2


def test_inject_refuses_bad_faults(fake: FakeFal) -> None:
    with pytest.raises(ValueError):
        fake.inject("status")
    with pytest.raises(ValueError):
        fake.inject("slow", delay_s=1, times=0)
    with pytest.raises(ValueError):
        fake.inject("accept_then_drop", route="status")
    with pytest.raises(ValueError):
        fake.inject("nope", status=500)  # type: ignore[arg-type]
    assert fake.pending_faults() == 0
