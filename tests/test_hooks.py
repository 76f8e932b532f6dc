"""producer/hooks.py: the webhook router in a small FastAPI app, served by a real uvicorn on
a free port, called by a real httpx client, with a real Redis. ``submit`` stands for the
API's POST /v1/batches and records its calls."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
import uvicorn
from conftest import free_port
from fastapi import FastAPI

from producer.hooks import hooks_router
from worker.settings import Settings
from worker.signing import sign

SHOPIFY_SECRET = "shpss_test_secret"
HOOK_SECRET = "hook-secret-1"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], str]] = []
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any], key: str) -> tuple[int, Any]:
        with self.lock:
            self.calls.append((body, key))
            n = len(self.calls)
        return 202, {"batch_id": f"b{n}", "state": "submitting"}


def product() -> dict[str, Any]:
    return {
        "id": 632910392, "title": "IPod Nano - 8GB", "vendor": "Apple", "product_type": "Cult Products",
        "handle": "ipod-nano", "tags": "Emotive, Flash Memory",
        "images": [
            {"id": 850703190, "position": 1, "src": "https://cdn.shopify.com/s/files/1/ipod-nano.png"},
            {"id": 562641783, "position": 2, "src": "https://cdn.shopify.com/s/files/1/ipod-nano-2.png"},
        ],
    }  # fmt: skip


@pytest.fixture
def served(
    redis_url: str, redis_client: redis_lib.Redis, tmp_path: Path
) -> Iterator[tuple[str, Recorder]]:
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        'prompt = "the {title} by {vendor} on a marble counter"\nprovider = "local"\n'
    )
    settings = Settings(
        redis_url=redis_url,
        shopify_webhook_secret=SHOPIFY_SECRET,
        hook_secret=HOOK_SECRET,
        shopify_mapping=str(mapping),
    )
    recorder = Recorder()
    with serve(settings, recorder) as base:
        yield base, recorder


@contextmanager
def serve(settings: Settings, recorder: Recorder) -> Iterator[str]:
    """The router in a FastAPI app on a real uvicorn, on a free port: its base URL."""
    app = FastAPI()
    app.include_router(hooks_router(settings, recorder))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def shopify_headers(body: bytes, webhook_id: str, topic: str = "products/create") -> dict[str, str]:
    digest = hmac.new(SHOPIFY_SECRET.encode(), body, hashlib.sha256).digest()
    return {
        "Content-Type": "application/json",
        "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
        "X-Shopify-Topic": topic,
        "X-Shopify-Webhook-Id": webhook_id,
        "X-Shopify-Shop-Domain": "example.myshopify.com",
    }


def test_shopify_delivery_submits_one_batch_of_the_images(served: tuple[str, Recorder]) -> None:
    base, recorder = served
    body = json.dumps(product()).encode()
    r = httpx.post(f"{base}/v1/hooks/shopify", content=body, headers=shopify_headers(body, "wh-1"))
    assert r.status_code == 202, r.text
    assert r.json()["batch_id"] == "b1"
    [(submitted, key)] = recorder.calls
    assert key == "shopify-wh-1"
    assert submitted["provider"] == "local"
    assert [row["id"] for row in submitted["rows"]] == [
        "632910392-850703190",
        "632910392-562641783",
    ]
    assert submitted["rows"][0]["prompt"] == "the IPod Nano - 8GB by Apple on a marble counter"
    assert submitted["rows"][0]["image"] == "https://cdn.shopify.com/s/files/1/ipod-nano.png"


def test_shopify_duplicate_delivery_answers_the_first_batch(served: tuple[str, Recorder]) -> None:
    base, recorder = served
    body = json.dumps(product()).encode()
    first = httpx.post(
        f"{base}/v1/hooks/shopify", content=body, headers=shopify_headers(body, "wh-2")
    )
    again = httpx.post(
        f"{base}/v1/hooks/shopify", content=body, headers=shopify_headers(body, "wh-2")
    )
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json() == {"batch_id": "b1", "duplicate": True}
    assert len(recorder.calls) == 1
    update = httpx.post(f"{base}/v1/hooks/shopify", content=body,
                        headers=shopify_headers(body, "wh-3", "products/update"))  # fmt: skip
    assert update.status_code == 202
    assert update.json()["batch_id"] == "b2"


def test_shopify_dedup_key_expires_in_a_day(
    served: tuple[str, Recorder], redis_client: redis_lib.Redis
) -> None:
    base, _ = served
    body = json.dumps(product()).encode()
    httpx.post(f"{base}/v1/hooks/shopify", content=body, headers=shopify_headers(body, "wh-ttl"))
    assert redis_client.get("bgswap:hook:shopify:wh-ttl") == "b1"
    assert 86_000 < redis_client.ttl("bgswap:hook:shopify:wh-ttl") <= 86_400


def test_shopify_bad_hmac_is_401_and_submits_nothing(served: tuple[str, Recorder]) -> None:
    base, recorder = served
    body = json.dumps(product()).encode()
    headers = shopify_headers(body, "wh-4")
    r = httpx.post(f"{base}/v1/hooks/shopify", content=body + b" ", headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "hook.bad_signature"
    assert r.json()["error"]["message"]
    headers.pop("X-Shopify-Hmac-Sha256")
    assert httpx.post(f"{base}/v1/hooks/shopify", content=body, headers=headers).status_code == 401
    assert recorder.calls == []


def test_shopify_other_topics_are_ignored(served: tuple[str, Recorder]) -> None:
    base, recorder = served
    body = json.dumps({"id": 1}).encode()
    r = httpx.post(f"{base}/v1/hooks/shopify", content=body,
                   headers=shopify_headers(body, "wh-5", "orders/create"))  # fmt: skip
    assert r.status_code == 200
    assert r.json()["ignored"] is True
    no_images = json.dumps({"id": 2, "images": []}).encode()
    r = httpx.post(
        f"{base}/v1/hooks/shopify", content=no_images, headers=shopify_headers(no_images, "wh-6")
    )
    assert r.status_code == 200
    assert r.json()["ignored"] is True
    assert recorder.calls == []


def generic_headers(body: bytes, t: int | None = None, secret: str = HOOK_SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Bgswap-Signature": sign(secret, body, int(time.time()) if t is None else t),
    }


def test_generic_hook_passes_the_body_to_submit(served: tuple[str, Recorder]) -> None:
    base, recorder = served
    body = json.dumps(
        {"rows": [{"id": "a", "image": "https://x.test/a.png"}], "provider": "local"}
    ).encode()
    r = httpx.post(f"{base}/v1/hooks/generic", content=body,
                   headers={**generic_headers(body), "Idempotency-Key": "order-77"})  # fmt: skip
    assert r.status_code == 202, r.text
    assert recorder.calls == [(json.loads(body), "order-77")]


def test_generic_hook_refuses_replays_stale_and_bad_signatures(
    served: tuple[str, Recorder],
) -> None:
    base, recorder = served
    body = b'{"rows": []}'
    headers = generic_headers(body)
    assert httpx.post(f"{base}/v1/hooks/generic", content=body, headers=headers).status_code == 202
    replay = httpx.post(f"{base}/v1/hooks/generic", content=body, headers=headers)
    assert replay.status_code == 401
    assert replay.json()["error"]["code"] == "hook.replayed"
    stale = generic_headers(body, t=int(time.time()) - 301)
    r = httpx.post(f"{base}/v1/hooks/generic", content=body, headers=stale)
    assert r.status_code == 401
    assert "from now" in r.json()["error"]["message"]
    future = generic_headers(body, t=int(time.time()) + 400)
    assert httpx.post(f"{base}/v1/hooks/generic", content=body, headers=future).status_code == 401
    wrong = generic_headers(body, secret="other")
    assert httpx.post(f"{base}/v1/hooks/generic", content=body, headers=wrong).status_code == 401
    none = httpx.post(f"{base}/v1/hooks/generic", content=body)
    assert none.status_code == 401
    assert none.json()["error"]["code"] == "hook.bad_signature"
    assert len(recorder.calls) == 1


def test_generic_hook_refuses_a_body_that_is_not_an_object(served: tuple[str, Recorder]) -> None:
    base, recorder = served
    body = b"[1, 2]"
    r = httpx.post(f"{base}/v1/hooks/generic", content=body, headers=generic_headers(body))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "hook.bad_request"
    assert recorder.calls == []


def test_unconfigured_secrets_refuse(redis_url: str, redis_client: redis_lib.Redis) -> None:
    with serve(Settings(redis_url=redis_url), Recorder()) as base:
        for path in ("shopify", "generic"):
            r = httpx.post(f"{base}/v1/hooks/{path}", content=b"{}")
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "hook.not_configured"
