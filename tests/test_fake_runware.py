"""The fake Runware server is a fixture, but a wrong fake makes every client test meaningless.

Plain httpx calls against ``servers.runware.FakeRunware``, checked against the reference and
the model's seed page (whose four real request bodies are the valid examples here).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from servers.files import FileServer
from servers.runware import FakeRunware

KEY = "rw-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEED_SIZE = (64, 48)
# One client for the module: building one per call (an SSL context each) dominates the run time.
HTTP = httpx.Client(timeout=10.0)

# The seed page's four real requests (seedImage is replaced by a local URL).
SEED_EXAMPLES: list[dict[str, Any]] = [
    {
        "taskType": "imageInference",
        "taskUUID": "82c6b0a1-1f8b-41e1-9c11-b265be23939e",
        "model": "ideogram:4@5",
        "positivePrompt": "Replace the plain background with an opulent boutique window display "
        "scene that keeps the velvet jewelry gift box perfectly preserved as the main "
        "foreground subject. Premium luxury branding mood, no text, no extra boxes, no people.",
        "providerSettings": {
            "ideogram": {
                "renderingSpeed": "QUALITY",
                "magicPrompt": "ON",
                "stylePreset": "MAGAZINE_EDITORIAL",
            }
        },
        "inputs": {"seedImage": "SEED"},
    },
    {
        "taskType": "imageInference",
        "taskUUID": "d963c8d0-5652-40d4-a1e6-50fcd0ecd4a9",
        "model": "ideogram:4@5",
        "positivePrompt": "Replace the plain background with a bright mountain chalet breakfast "
        "scene seen through wide windows, keep the cereal box unchanged as the main foreground "
        "product and maintain its position and readability",
        "providerSettings": {
            "ideogram": {
                "renderingSpeed": "QUALITY",
                "magicPrompt": "ON",
                "stylePreset": "EDITORIAL",
            }
        },
        "inputs": {"seedImage": "SEED"},
    },
    {
        "taskType": "imageInference",
        "taskUUID": "e945a056-648d-4d6d-9c3c-403a9839e511",
        "model": "ideogram:4@5",
        "positivePrompt": "Replace the plain background with a luxurious surreal spa scene while "
        "keeping the serum bottle unchanged, centered, crisp, and fully readable.",
        "providerSettings": {
            "ideogram": {
                "renderingSpeed": "QUALITY",
                "magicPrompt": "ON",
                "stylePreset": "EDITORIAL",
            }
        },
        "inputs": {"seedImage": "SEED"},
    },
    {
        "taskType": "imageInference",
        "taskUUID": "5251a83f-45d6-491f-a782-5b7308c30cad",
        "model": "ideogram:4@5",
        "positivePrompt": "Replace the plain studio background with a sunlit riverside promenade "
        "picnic scene in early autumn, preserving the saffron-yellow delivery scooter.",
        "providerSettings": {
            "ideogram": {"magicPrompt": "ON", "stylePreset": "MAGAZINE_EDITORIAL"}
        },
        "inputs": {"seedImage": "SEED"},
    },
]
# Their real responses' costs: QUALITY 0.09, default speed 0.06.
SEED_COSTS = [0.09, 0.09, 0.09, 0.06]


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = SEED_SIZE) -> bytes:
    image = Image.new("RGB", size, (200, 180, 40))
    image.paste((20, 60, 200), (8, 8, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _close_http_client() -> Iterator[None]:
    yield
    HTTP.close()


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        server.add("/seed.jpg", image_bytes(), "image/jpeg")
        server.add("/style.png", image_bytes("PNG", (32, 32)), "image/png")
        server.add("/notes.txt", b"not an image at all", "text/plain")
        server.add("/hook", b"ok", "text/plain")
        yield server


@pytest.fixture
def fake() -> Iterator[FakeRunware]:
    with FakeRunware(KEY, processing_s=0.05) as server:
        yield server


def seed_url(files: FileServer) -> str:
    return files.url("/seed.jpg")


def make_task(files: FileServer, example: int = 0, **changes: Any) -> dict[str, Any]:
    """A seed-page request with a fresh taskUUID; ``changes`` keys are dotted paths
    (``__`` stands for the dot), a value of ``DROP`` removes the key."""
    task = copy.deepcopy(SEED_EXAMPLES[example])
    task["taskUUID"] = str(uuid.uuid4())
    task["inputs"]["seedImage"] = seed_url(files)
    for dotted, value in changes.items():
        set_path(task, dotted.replace("__", "."), value)
    return task


DROP = object()


def set_path(task: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = task
    for name in parents:
        node = node.setdefault(name, {})
    if value is DROP:
        node.pop(last, None)
    else:
        node[last] = value


def post(
    fake: FakeRunware,
    tasks: Any,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> httpx.Response:
    return HTTP.post(
        fake.url, json=tasks, headers=AUTH if headers is None else headers, timeout=timeout
    )


def poll(fake: FakeRunware, task_uuid: str) -> dict[str, Any]:
    response = post(fake, [{"taskType": "getResponse", "taskUUID": task_uuid}])
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def poll_until(fake: FakeRunware, task_uuid: str, terminal: int) -> list[dict[str, Any]]:
    """Every poll's body until ``terminal`` results are final."""
    bodies: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        body = poll(fake, task_uuid)
        bodies.append(body)
        items = body.get("data", []) + body.get("errors", [])
        final = [i for i in items if i.get("status") in ("success", "error") or "code" in i]
        if len(final) >= terminal:
            return bodies
        time.sleep(0.02)
    raise AssertionError(f"not done: {bodies[-1]}")


def only_error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert "data" not in body, body
    (error,) = body["errors"]
    assert isinstance(error, dict)
    return error


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- transport -------------------------------------------------------------------------------


def test_api_key_is_required_and_checked(fake: FakeRunware, files: FileServer) -> None:
    task = make_task(files)
    missing = post(fake, [task], headers={})
    assert missing.status_code == 401
    assert only_error(missing)["code"] == "missingApiKey"
    wrong = post(fake, [task], headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert only_error(wrong) == {
        "code": "invalidApiKey",
        "message": "Invalid API key. Get one at https://my.runware.ai/signup",
        "parameter": "apiKey",
        "taskType": "authentication",
    }
    not_bearer = post(fake, [task], headers={"Authorization": KEY})
    assert not_bearer.status_code == 401
    assert fake.paid == []
    assert fake.tasks("imageInference") == [task, task, task]


def test_body_must_be_a_json_array_of_tasks_posted_to_v1(
    fake: FakeRunware, files: FileServer
) -> None:
    task = make_task(files)
    for body in (task, [], [task, "x"], {"data": [task]}):
        response = post(fake, body)
        assert response.status_code == 400
        assert only_error(response)["code"] == "invalidPayload"
    not_json = HTTP.post(
        fake.url, content=b"[{", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert only_error(not_json)["code"] == "invalidPayload"
    form = HTTP.post(
        fake.url, content=json.dumps([task]), headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert form.status_code == 400
    assert only_error(form)["code"] == "invalidPayload"
    assert HTTP.get(fake.url, headers=AUTH).status_code == 405
    assert HTTP.post(fake.base_url + "/v2", json=[task], headers=AUTH).status_code == 404
    assert HTTP.post(fake.base_url + "/", json=[task], headers=AUTH).status_code == 404
    assert fake.paid == []
    assert [call.method for call in fake.requests][:2] == ["POST", "POST"]


@pytest.mark.parametrize("example", range(4))
def test_seed_page_requests_are_valid_and_answered_like_the_seed_page(
    fake: FakeRunware, files: FileServer, example: int
) -> None:
    task = make_task(files, example, includeCost=True)
    task["taskUUID"] = SEED_EXAMPLES[example]["taskUUID"]
    response = post(fake, [task])
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    assert set(item) == {"taskType", "taskUUID", "imageUUID", "imageURL", "seed", "cost"}
    assert item["taskUUID"] == task["taskUUID"]
    assert item["cost"] == SEED_COSTS[example]
    assert isinstance(item["seed"], int)
    assert item["imageURL"] == f"{fake.base_url}/images/{item['imageUUID']}.jpg"
    fetched = HTTP.get(item["imageURL"])
    assert fetched.headers["content-type"] == "image/jpeg"
    image = open_image(fetched.content)
    assert (image.format, image.size) == ("JPEG", SEED_SIZE)
    assert fake.paid == [task["taskUUID"]]
    assert fake.accepted[task["taskUUID"]] == task


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "parameter"),
    [
        ("width", 1024, "width"),
        ("height", 1024, "height"),
        ("seed", 42, "seed"),
        ("negativePrompt", "blurry", "negativePrompt"),
        ("seedImage", "SEED", "seedImage"),
        ("positivPrompt", "typo", "positivPrompt"),
        ("inputs__mask", "x", "inputs.mask"),
        (
            "providerSettings__ideogram__colorPalette",
            {"name": "EMBER"},
            "providerSettings.ideogram.colorPalette",
        ),
        ("providerSettings__fal", {}, "providerSettings.fal"),
        ("safety__level", 1, "safety.level"),
    ],
)
def test_unknown_keys_are_rejected(
    fake: FakeRunware, files: FileServer, key: str, value: Any, parameter: str
) -> None:
    task = make_task(files, **{key: value})
    response = post(fake, [task])
    assert response.status_code == 400
    error = only_error(response)
    assert (error["code"], error["parameter"]) == ("unsupportedParameter", parameter)
    assert (error["taskType"], error["taskUUID"]) == ("imageInference", task["taskUUID"])
    assert fake.paid == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("providerSettings__ideogram__renderingSpeed", "BALANCED"),
        ("providerSettings__ideogram__magicPrompt", "on"),
        ("providerSettings__ideogram__styleType", "PHOTO"),
        ("providerSettings__ideogram__stylePreset", "NOT_A_PRESET"),
        ("providerSettings__ideogram__styleCode", "12345g78"),
        ("providerSettings__ideogram__styleCode", "1234567"),
        ("providerSettings__ideogram__styleReferenceImages", []),
        ("providerSettings__ideogram__styleReferenceImages", ["a", "b", "c", "d", "e"]),
        ("providerSettings__ideogram__styleReferenceImages", "https://x/y.png"),
        ("providerSettings__ideogram", "QUALITY"),
        ("outputType", "url"),
        ("outputFormat", "JPEG"),
        ("outputQuality", 19),
        ("outputQuality", 100),
        ("outputQuality", True),
        ("outputQuality", "95"),
        ("numberResults", 0),
        ("numberResults", 21),
        ("numberResults", 2.0),
        ("ttl", 59),
        ("deliveryMethod", "stream"),
        ("safety__mode", "full"),
        ("safety__checkContent", "yes"),
        ("safety", True),
        ("includeCost", 1),
        ("webhookURL", "ftp://example.com/hook"),
        ("uploadEndpoint", "not a url"),
    ],
)
def test_bad_values_are_rejected_with_their_dotted_path(
    fake: FakeRunware, files: FileServer, key: str, value: Any
) -> None:
    response = post(fake, [make_task(files, **{key: value})])
    assert response.status_code == 400
    error = only_error(response)
    assert error["code"] == "invalidParameterValue"
    assert error["parameter"].startswith(key.replace("__", "."))
    assert fake.paid == []


@pytest.mark.parametrize(
    ("key", "value", "code"),
    [
        ("taskUUID", DROP, "invalidTaskUUID"),
        ("taskUUID", "not-a-uuid", "invalidTaskUUID"),
        ("taskUUID", str(uuid.uuid1()), "invalidTaskUUID"),
        ("taskUUID", str(uuid.uuid4()).upper(), "invalidTaskUUID"),
        ("taskType", DROP, "invalidTaskType"),
        ("taskType", "imageInferance", "invalidTaskType"),
        ("model", DROP, "invalidModel"),
        ("model", "ideogram:4@1", "invalidModel"),
        ("positivePrompt", DROP, "missingPositivePrompt"),
        ("positivePrompt", "", "invalidPositivePrompt"),
        ("positivePrompt", "x" * 2001, "invalidPositivePrompt"),
        ("positivePrompt", ["a"], "invalidPositivePrompt"),
        ("inputs", DROP, "missingSeedImage"),
        ("inputs__seedImage", DROP, "missingSeedImage"),
        ("inputs__seedImage", 7, "invalidSeedImage"),
    ],
)
def test_required_fields(
    fake: FakeRunware, files: FileServer, key: str, value: Any, code: str
) -> None:
    response = post(fake, [make_task(files, **{key: value})])
    assert response.status_code == 400
    assert only_error(response)["code"] == code
    assert fake.paid == []


def test_limits_that_are_valid(fake: FakeRunware, files: FileServer) -> None:
    task = make_task(
        files,
        positivePrompt="x" * 2000,
        outputQuality=20,
        ttl=60,
        numberResults=2,
        outputType="URL",
        providerSettings__ideogram__styleCode="0A1b2C3d",
        providerSettings__ideogram__styleType=DROP,
    )
    assert post(fake, [task]).status_code == 200


@pytest.mark.parametrize(
    ("changes", "parameter"),
    [
        (
            {
                "providerSettings__ideogram__styleCode": "deadbeef",
                "providerSettings__ideogram__styleType": "AUTO",
            },
            "providerSettings.ideogram.styleCode",
        ),
        (
            {
                "providerSettings__ideogram__styleCode": "deadbeef",
                "providerSettings__ideogram__styleReferenceImages": ["STYLE"],
            },
            "providerSettings.ideogram.styleCode",
        ),
        ({"ttl": 3600, "outputType": "base64Data"}, "ttl"),
    ],
)
def test_incompatible_parameters(
    fake: FakeRunware, files: FileServer, changes: dict[str, Any], parameter: str
) -> None:
    response = post(fake, [make_task(files, **changes)])
    assert response.status_code == 400
    error = only_error(response)
    assert (error["code"], error["parameter"]) == ("incompatibleParameters", parameter)


# --- taskUUID reuse and billing ----------------------------------------------------------------


def test_a_used_task_uuid_is_refused_and_not_billed_twice(
    fake: FakeRunware, files: FileServer
) -> None:
    task = make_task(files)
    assert post(fake, [task]).status_code == 200
    again = post(fake, [task])
    assert again.status_code == 400
    error = only_error(again)
    assert (error["code"], error["taskUUID"]) == ("conflictTaskUUID", task["taskUUID"])
    assert fake.accept_count(task["taskUUID"]) == 1
    assert fake.paid == [task["taskUUID"]]
    assert len(fake.tasks("imageInference")) == 2


def test_concurrent_submissions_of_one_task_uuid_are_accepted_once(
    fake: FakeRunware, files: FileServer
) -> None:
    task = make_task(files, deliveryMethod="async")
    statuses: list[int] = []

    def submit() -> None:
        statuses.append(post(fake, [task]).status_code)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 400, 400, 400]
    assert fake.accept_count(task["taskUUID"]) == 1


def test_a_rejected_task_uuid_can_be_used_again(fake: FakeRunware, files: FileServer) -> None:
    task = make_task(files, width=512)
    assert post(fake, [task]).status_code == 400
    del task["width"]
    assert post(fake, [task]).status_code == 200
    assert fake.accept_count(task["taskUUID"]) == 1


# --- async and getResponse ---------------------------------------------------------------------


@pytest.mark.parametrize("ack_style", ["item", "empty"])
def test_async_ack_then_processing_then_success(files: FileServer, ack_style: Any) -> None:
    with FakeRunware(KEY, processing_s=0.3, ack_style=ack_style) as fake:
        task = make_task(files, deliveryMethod="async")
        started = time.monotonic()
        ack = post(fake, [task])
        assert time.monotonic() - started < 0.3
        assert ack.status_code == 200
        expected = [{"taskType": "imageInference", "taskUUID": task["taskUUID"]}]
        assert ack.json() == {"data": expected if ack_style == "item" else []}
        assert fake.paid == [task["taskUUID"]]
        assert poll(fake, task["taskUUID"]) == {"data": [{**expected[0], "status": "processing"}]}
        final = poll_until(fake, task["taskUUID"], 1)[-1]
        (item,) = final["data"]
        assert item["status"] == "success"
        assert {"imageUUID", "imageURL", "seed"} <= set(item)
        assert "cost" not in item and "NSFWContent" not in item
        assert HTTP.get(item["imageURL"]).status_code == 200


def test_results_are_cumulative_and_dedupable_by_image_uuid(files: FileServer) -> None:
    with FakeRunware(KEY, processing_s=0.6) as fake:
        task = make_task(files, deliveryMethod="async", numberResults=3)
        assert post(fake, [task]).status_code == 200
        bodies = poll_until(fake, task["taskUUID"], 3)
    seen: list[set[str]] = []
    for body in bodies:
        successes = {item["imageUUID"] for item in body["data"] if item["status"] == "success"}
        processing = [item for item in body["data"] if item["status"] == "processing"]
        assert len(processing) == (0 if len(successes) == 3 else 1)
        assert not seen or seen[-1] <= successes  # nothing reported is ever dropped
        seen.append(successes)
    assert len(seen[-1]) == 3
    assert {1, 2} & {len(s) for s in seen}, "a partial state was observed"
    final = [item for item in bodies[-1]["data"]]
    assert len({item["seed"] for item in final}) == 3
    images = [fake.image(item["imageUUID"]) for item in final]
    assert len(set(images)) == 3  # each result is its own image


def test_get_response_for_an_unknown_task(fake: FakeRunware) -> None:
    response = post(fake, [{"taskType": "getResponse", "taskUUID": str(uuid.uuid4())}])
    assert response.status_code == 400
    assert only_error(response)["code"] == "taskFailedOrNotFound"


def test_sync_delivery_waits_for_all_results(files: FileServer) -> None:
    with FakeRunware(KEY, processing_s=0.3) as fake:
        task = make_task(files, numberResults=2, deliveryMethod="sync")
        started = time.monotonic()
        response = post(fake, [task])
        assert time.monotonic() - started >= 0.3
    items = response.json()["data"]
    assert len(items) == 2
    assert all("status" not in item for item in items)
    assert len({item["imageUUID"] for item in items}) == 2


def test_several_tasks_in_one_request_fail_separately(fake: FakeRunware, files: FileServer) -> None:
    good = make_task(files, deliveryMethod="async")
    bad = make_task(files, width=1)
    response = post(fake, [good, bad])
    assert response.status_code == 200
    body = response.json()
    assert body["data"] == [{"taskType": "imageInference", "taskUUID": good["taskUUID"]}]
    (error,) = body["errors"]
    assert (error["code"], error["taskUUID"]) == ("unsupportedParameter", bad["taskUUID"])
    both_bad = post(fake, [make_task(files, model="x"), make_task(files, seed=1)])
    assert both_bad.status_code == 400
    assert [e["code"] for e in both_bad.json()["errors"]] == [
        "invalidModel",
        "unsupportedParameter",
    ]
    assert fake.paid == [good["taskUUID"]]


# --- images in and out -------------------------------------------------------------------------


def test_image_upload_then_seed_image_by_uuid(files: FileServer) -> None:
    with FakeRunware(KEY, processing_s=0.0, upload_data_as_object=True) as fake:
        png = image_bytes("PNG", (40, 30))
        upload = {
            "taskType": "imageUpload",
            "taskUUID": str(uuid.uuid4()),
            "image": "data:image/png;base64," + base64.b64encode(png).decode(),
        }
        response = post(fake, [upload])
        assert response.status_code == 200
        item = response.json()["data"]
        assert isinstance(item, dict)  # the docs example's bare object
        assert item["taskUUID"] == upload["taskUUID"]
        task = make_task(files, inputs__seedImage=item["imageUUID"])
        (result,) = post(fake, [task]).json()["data"]
        assert open_image(HTTP.get(result["imageURL"]).content).size == (40, 30)
        bare = {**upload, "taskUUID": str(uuid.uuid4()), "image": base64.b64encode(png).decode()}
        by_url = {**upload, "taskUUID": str(uuid.uuid4()), "image": seed_url(files)}
        listed = post(fake, [bare, by_url]).json()["data"]
        assert [entry["taskType"] for entry in listed] == ["imageUpload", "imageUpload"]
        unknown = post(fake, [make_task(files, inputs__seedImage=str(uuid.uuid4()))])
        assert unknown.status_code == 400
        assert only_error(unknown)["code"] == "invalidSeedImage"
        not_image = {**upload, "taskUUID": str(uuid.uuid4()), "image": "aGVsbG8="}
        assert only_error(post(fake, [not_image]))["code"] == "invalidImage"
        assert len(fake.tasks("imageUpload")) == 4


@pytest.mark.parametrize(
    ("where", "code"),
    [
        ("inputs__seedImage", "invalidSeedImage"),
        ("providerSettings__ideogram__styleReferenceImages", "invalidStyleReferenceImage"),
    ],
)
def test_image_references_that_cannot_be_loaded(
    fake: FakeRunware, files: FileServer, where: str, code: str
) -> None:
    bad_refs = [
        files.url("/status/404"),
        files.url("/notes.txt"),
        "http://127.0.0.1:1/unreachable.jpg",
        "data:image/png;base64,bm90IGFuIGltYWdl",
        "!!! not base64 !!!",
    ]
    for ref in bad_refs:
        value: Any = [files.url("/style.png"), ref] if "style" in where else ref
        response = post(fake, [make_task(files, **{where: value})])
        assert response.status_code == 400, ref
        error = only_error(response)
        assert error["code"] == code
        assert error["parameter"].startswith(where.replace("__", "."))
    assert fake.paid == []
    fine = make_task(
        files, providerSettings__ideogram__styleReferenceImages=[files.url("/style.png")]
    )
    assert post(fake, [fine]).status_code == 200


@pytest.mark.parametrize(
    ("output_type", "output_format", "pil_format"),
    [("base64Data", "PNG", "PNG"), ("dataURI", "WEBP", "WEBP"), ("dataURI", "JPG", "JPEG")],
)
def test_inline_outputs(
    fake: FakeRunware, files: FileServer, output_type: str, output_format: str, pil_format: str
) -> None:
    task = make_task(files, outputType=output_type, outputFormat=output_format, outputQuality=50)
    (item,) = post(fake, [task]).json()["data"]
    assert "imageURL" not in item
    if output_type == "base64Data":
        data = base64.b64decode(item["imageBase64Data"], validate=True)
    else:
        prefix, encoded = item["imageDataURI"].split(",", 1)
        assert prefix == f"data:image/{pil_format.lower()};base64"
        data = base64.b64decode(encoded, validate=True)
    image = open_image(data)
    assert (image.format, image.size) == (pil_format, SEED_SIZE)


def test_cost_only_with_include_cost_and_nsfw_only_with_safety(
    fake: FakeRunware, files: FileServer
) -> None:
    def item(**changes: Any) -> dict[str, Any]:
        (only,) = post(fake, [make_task(files, 3, **changes)]).json()["data"]
        assert isinstance(only, dict)
        return only

    assert "cost" not in item()
    assert item(includeCost=True)["cost"] == 0.06
    assert (
        item(includeCost=True, providerSettings__ideogram__renderingSpeed="TURBO")["cost"] == 0.03
    )
    assert "cost" not in item(includeCost=False)
    assert (
        item(includeCost=True, providerSettings__ideogram__renderingSpeed="QUALITY")["cost"] == 0.09
    )
    assert "NSFWContent" not in item()
    assert "NSFWContent" not in item(safety={"mode": "fast"})
    assert item(safety={"checkContent": True, "mode": "fast"})["NSFWContent"] is False


# --- deliveries --------------------------------------------------------------------------------


def test_upload_endpoint_gets_a_put_of_the_raw_bytes(fake: FakeRunware, files: FileServer) -> None:
    target = files.url("/bucket/out-1.webp?X-Amz-Signature=abc")
    task = make_task(files, uploadEndpoint=target, outputFormat="WEBP")
    (item,) = post(fake, [task]).json()["data"]
    (put,) = files.requests_to("/bucket/out-1.webp")
    assert put.method == "PUT"
    assert put.headers["content-type"] == "image/webp"
    assert put.body == HTTP.get(item["imageURL"]).content == fake.image(item["imageUUID"])
    assert fake.uploads == [(target, 200)]


def test_upload_fails_skips_the_put(files: FileServer) -> None:
    with FakeRunware(KEY, processing_s=0.0, upload_fails=True) as fake:
        target = files.url("/bucket/out-2.jpg")
        assert post(fake, [make_task(files, uploadEndpoint=target)]).status_code == 200
        assert files.requests_to("/bucket/out-2.jpg") == []
        assert fake.uploads == [(target, -1)]


def test_webhook_gets_one_post_per_result(fake: FakeRunware, files: FileServer) -> None:
    hook = files.url("/hook") + "?token=s3cret"
    before = len(files.requests_to("/hook"))
    task = make_task(files, webhookURL=hook, numberResults=2)
    items = post(fake, [task]).json()["data"]
    deadline = time.monotonic() + 2
    while len(fake.webhooks) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(url, status) for url, status, _ in fake.webhooks] == [(hook, 200), (hook, 200)]
    calls = files.requests_to("/hook")[before:]
    assert [json.loads(call.body) for call in calls] == [{"data": [item]} for item in items]


# --- faults ------------------------------------------------------------------------------------


def test_status_fault_answers_before_accepting(fake: FakeRunware, files: FileServer) -> None:
    fake.inject("status", status=429, code="rateLimitExceeded", retry_after=3, times=2)
    task = make_task(files)
    for _ in range(2):
        response = post(fake, [task])
        assert response.status_code == 429
        assert response.headers["retry-after"] == "3"
        assert only_error(response)["code"] == "rateLimitExceeded"
    assert fake.paid == []
    assert post(fake, [task]).status_code == 200
    fake.inject("status", status=402, code="insufficientCredits")
    response = post(fake, [make_task(files)])
    assert (response.status_code, only_error(response)["code"]) == (402, "insufficientCredits")
    assert "retry-after" not in response.headers
    assert fake.paid == [task["taskUUID"]]


def test_faults_match_their_task_type(fake: FakeRunware, files: FileServer) -> None:
    fake.inject("status", task_type="getResponse", status=503, code="noAvailableServer")
    task = make_task(files, deliveryMethod="async")
    assert post(fake, [task]).status_code == 200
    response = post(fake, [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
    assert response.status_code == 503
    assert fake.pending_faults() == 0


def test_accept_then_500_bills_and_runs_the_task(fake: FakeRunware, files: FileServer) -> None:
    fake.inject("accept_then_500")
    task = make_task(files)
    response = post(fake, [task])
    assert response.status_code == 500
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert fake.paid == [task["taskUUID"]]
    assert only_error(post(fake, [task]))["code"] == "conflictTaskUUID"
    assert poll_until(fake, task["taskUUID"], 1)[-1]["data"][0]["status"] == "success"
    assert fake.accept_count(task["taskUUID"]) == 1


def test_accept_then_drop(fake: FakeRunware, files: FileServer) -> None:
    fake.inject("accept_then_drop")
    task = make_task(files, deliveryMethod="async")
    with pytest.raises(httpx.RemoteProtocolError):
        post(fake, [task])
    assert fake.paid == [task["taskUUID"]]
    assert post(fake, [make_task(files)]).status_code == 200


@pytest.mark.parametrize("after_accept", [False, True])
def test_malformed_answer(fake: FakeRunware, files: FileServer, after_accept: bool) -> None:
    fake.inject("malformed", after_accept=after_accept)
    task = make_task(files)
    response = post(fake, [task])
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert fake.paid == ([task["taskUUID"]] if after_accept else [])


def test_slow_answer_still_accepts_after_the_client_gave_up(
    fake: FakeRunware, files: FileServer
) -> None:
    fake.inject("slow", delay_s=0.4)
    task = make_task(files, deliveryMethod="async")
    with pytest.raises(httpx.ReadTimeout):
        post(fake, [task], timeout=0.15)
    assert fake.paid == []
    deadline = time.monotonic() + 3
    while fake.accept_count(task["taskUUID"]) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.accept_count(task["taskUUID"]) == 1
    assert only_error(post(fake, [task]))["code"] == "conflictTaskUUID"


@pytest.mark.parametrize("placement", ["errors", "data", "unmarked"])
def test_generation_error_is_reported_by_get_response(files: FileServer, placement: Any) -> None:
    with FakeRunware(KEY, processing_s=0.05, error_placement=placement) as fake:
        fake.inject("generation_error", code="timeoutProvider")
        task = make_task(files, deliveryMethod="async", numberResults=2)
        assert post(fake, [task]).status_code == 200
        body = poll_until(fake, task["taskUUID"], 2)[-1]
        if placement != "data":
            assert "data" not in body
            assert [e["code"] for e in body["errors"]] == ["timeoutProvider"] * 2
            marks = {e.get("status") for e in body["errors"]}
            assert marks == ({"error"} if placement == "errors" else {None})
            assert {e["taskUUID"] for e in body["errors"]} == {task["taskUUID"]}
        else:
            assert "errors" not in body
            assert [(i["status"], i["error"]["code"]) for i in body["data"]] == [
                ("error", "timeoutProvider")
            ] * 2
        assert fake.paid == [task["taskUUID"]]
        # Consumed: the next task succeeds.
        assert post(fake, [make_task(files)]).status_code == 200


def test_generation_error_in_sync_delivery(fake: FakeRunware, files: FileServer) -> None:
    fake.inject("generation_error", code="contentPolicyViolation")
    response = post(fake, [make_task(files)])
    assert response.status_code == 400
    assert only_error(response)["code"] == "contentPolicyViolation"


def test_inject_refuses_incomplete_faults(fake: FakeRunware) -> None:
    with pytest.raises(ValueError, match="needs"):
        fake.inject("status", status=429)
    with pytest.raises(ValueError, match="unknown"):
        fake.inject("explode")  # type: ignore[arg-type]
