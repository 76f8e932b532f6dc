"""Completion webhooks (worker/completions.py): per-row tokens, the `bgswap serve` route
that checks them and tells the workers, and a real engine whose rows are polled when
their provider calls, not at their next scheduled poll (the strict fakes call the URL
each submit names, as Runware and fal do)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
from pydantic import ValidationError
from test_engine import submit, wait_for

from batching import clean_env, png, serving
from servers.fal import FakeFal
from servers.files import FileServer
from servers.runware import FakeRunware
from worker import completions
from worker.engine import Engine
from worker.logs import Redactor
from worker.runtime import build_deps
from worker.settings import Settings

SECRET = "completion-secret-0123"
PUBLIC = "https://bgswap.example.com"


def settings(**values: object) -> Settings:
    return Settings(**values)  # type: ignore[arg-type]


def test_each_rows_url_has_a_token_of_its_own_that_only_the_secret_makes() -> None:
    on = settings(public_url=PUBLIC + "/", provider_webhook_secret=SECRET)
    url = completions.webhook_url(on, "runware", "b 1", 7)
    assert url is not None
    assert url.startswith(f"{PUBLIC}/v1/hooks/completions/runware/b%201/7?token=")
    given = url.rpartition("token=")[2]
    assert completions.verify(SECRET, "runware", "b 1", 7, given)
    assert not completions.verify(SECRET, "runware", "b 1", 8, given)  # another row
    assert not completions.verify(SECRET, "fal", "b 1", 7, given)  # another provider
    assert not completions.verify("another-secret", "runware", "b 1", 7, given)
    assert completions.webhook_url(on, "local", "b", 1) is None  # nothing to call back
    assert completions.webhook_url(settings(public_url=PUBLIC), "runware", "b", 1) is None
    assert completions.webhook_url(settings(provider_webhook_secret=SECRET), "fal", "b", 1) is None
    assert completions.parse(json.dumps(["b", 3])) == ("b", 3)
    assert completions.parse(b'["b", true]') is None and completions.parse(b"{") is None


@pytest.mark.parametrize(
    "bad", ["ftp://bgswap.example.com", "https://h/x?a=1", "https://u:p@h", "bgswap.example.com"]
)
def test_the_public_url_must_be_a_plain_http_url(bad: str) -> None:
    with pytest.raises(ValidationError):
        settings(public_url=bad)


def test_the_token_in_a_logged_path_is_redacted() -> None:
    line = '"POST /v1/hooks/completions/fal/b/1?token=0123abcd4567 HTTP/1.1" 200'
    assert "0123abcd4567" not in Redactor([])(line)


def test_serve_checks_the_token_and_tells_the_workers(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path
) -> None:
    env = clean_env(BGSWAP_BROKER_URL=redis_url, BGSWAP_PUBLIC_URL=PUBLIC,
                    BGSWAP_PROVIDER_WEBHOOK_SECRET=SECRET)  # fmt: skip
    heard: list[tuple[str, int]] = []
    listener = completions.Listener(
        redis_lib.Redis.from_url(redis_url), lambda b, i: heard.append((b, i))
    ).start()
    log = tmp_path / "serve.log"
    try:
        with serving(env, log) as base:
            url = completions.webhook_url(settings(public_url=base,
                                                   provider_webhook_secret=SECRET),
                                          "runware", "batch-1", 4)  # fmt: skip
            assert url is not None
            time.sleep(0.3)  # the listener has subscribed
            good = httpx.post(url, json={"data": [{"imageURL": "https://elsewhere/x.png"}]})
            assert good.status_code == 200, good.text
            wait_for(lambda: heard == [("batch-1", 4)], 5, "the row announced")
            forged = httpx.post(url.replace("/4?", "/5?"), json={})  # another row's token
            assert forged.status_code == 401
            assert httpx.post(url.split("?")[0], json={}).status_code == 401  # no token
            other = httpx.post(url.replace("/runware/", "/local/"), json={})
            assert other.status_code == 404
            time.sleep(0.3)
            assert heard == [("batch-1", 4)]  # nothing else was announced
    finally:
        listener.stop()
    token = url.rpartition("token=")[2]
    assert "completions/runware/batch-1/4" in log.read_text()  # the access log has the path
    assert token not in log.read_text()  # but not its token


def test_without_the_secret_there_is_no_such_route(redis_url: str, tmp_path: Path) -> None:
    with serving(clean_env(BGSWAP_BROKER_URL=redis_url), tmp_path / "serve.log") as base:
        assert httpx.post(f"{base}/v1/hooks/completions/runware/b/1?token=x").status_code == 404


def engine_settings(redis_url: str, base: str, provider: str, fake: FakeRunware | FakeFal,
                    **extra: object) -> Settings:  # fmt: skip
    endpoints: dict[str, object] = (
        {"runware_api_key": "rw-key", "runware_api_url": fake.url}
        if isinstance(fake, FakeRunware)
        else {"fal_key": "fal-key", "fal_queue_url": fake.queue_url, "fal_rest_url": fake.rest_url}
    )
    # The first poll 8 s after the submit: without the webhook no row is done sooner.
    slow_polls = {f"{provider}_poll_initial_s": 8.0, f"{provider}_poll_max_s": 10.0}
    return settings(
        redis_url=redis_url, allow_private_urls=True, public_url=base,
        provider_webhook_secret=SECRET, **endpoints, **slow_polls, **extra,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["runware", "fal"])
def test_a_row_is_polled_when_its_provider_calls_not_at_its_next_poll(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, provider: str
) -> None:
    env = clean_env(BGSWAP_BROKER_URL=redis_url, BGSWAP_PUBLIC_URL=PUBLIC,
                    BGSWAP_PROVIDER_WEBHOOK_SECRET=SECRET)  # fmt: skip
    fake: FakeRunware | FakeFal = (
        FakeRunware("rw-key", processing_s=0.3)
        if provider == "runware"
        else FakeFal("fal-key", queue_s=0.05, processing_s=0.3)
    )
    with FileServer() as files, fake, serving(env, tmp_path / "serve.log") as base:
        url = files.add("/s.png", png(), "image/png")
        deps = build_deps(engine_settings(redis_url, base, provider, fake), lambda b: None)
        submit(deps, 4, url, tmp_path, "hooked", provider=provider)
        engine = Engine(deps, lambda b, i: None, threads=2, max_rows=100)
        started = time.monotonic()
        try:
            for index in range(4):
                assert engine.adopt("hooked", index, wait_s=5)
            wait_for(lambda: deps.store.counts("hooked")["succeeded"] == 4, 7, "rows done early")
        finally:
            engine.close()
        took = time.monotonic() - started
    assert took < 7.0  # before the first scheduled poll: the webhooks woke the rows
    calls = fake.webhooks
    assert len(calls) == 4 and all(status == 200 for _, status, _ in calls)
    assert all(hook.startswith(f"{base}/v1/hooks/completions/{provider}/hooked/")
               for hook, _, _ in calls)  # fmt: skip
