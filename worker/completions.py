"""Completion webhooks: a provider says when a row's generation is done, so the row is
polled at once instead of at its next scheduled poll.

With ``BGSWAP_PUBLIC_URL`` (where ``bgswap serve`` is reachable) and
``BGSWAP_PROVIDER_WEBHOOK_SECRET`` set, every paid row's submit names a URL of its own,

    {public}/v1/hooks/completions/{provider}/{batch_id}/{index}?token={token}

(Runware's ``webhookURL``, fal's ``fal_webhook``), the token an HMAC of the provider and
the row under the secret, so nobody without the secret can make one. ``bgswap serve``
checks the token and publishes the row on a Redis channel; every worker process listens
(``Listener``) and the one that holds the row polls it now (worker/engine.py: ``wake``).

A webhook is only a signal. What it says is never taken as the result: the poll that it
triggers asks the provider, as every poll does, so a forged, replayed, late or garbled
call costs one free poll at most. Polling stays the fallback: a row that asked for a
webhook polls on the configured backoff (1 s growing to 10 s), not on the close schedule
learned from recent generations, and a lost webhook only delays its row to that poll.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from typing import cast
from urllib.parse import quote

import redis

from worker.providers import SPECS
from worker.settings import Settings

log = logging.getLogger("bgswap.completions")

CHANNEL = "bgswap:completions"
# The providers that can call a completion webhook (their SPEC says).
PROVIDERS = frozenset(name for name, spec in SPECS.items() if spec.webhooks)
RETRY_S = 1.0  # a listener that lost Redis subscribes again after this long


def token(secret: str, provider: str, batch_id: str, index: int) -> str:
    message = f"{provider}\n{batch_id}\n{index}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:32]


def verify(secret: str, provider: str, batch_id: str, index: int, given: str) -> bool:
    return hmac.compare_digest(token(secret, provider, batch_id, index), given)


def webhook_url(settings: Settings, provider: str, batch_id: str, index: int) -> str | None:
    """The row's completion URL, or None when the webhooks are off."""
    if not settings.completion_webhooks or provider not in PROVIDERS:
        return None
    assert settings.public_url is not None and settings.provider_webhook_secret is not None
    secret = settings.provider_webhook_secret.get_secret_value()
    path = f"/v1/hooks/completions/{provider}/{quote(batch_id, safe='')}/{index}"
    return f"{settings.public_url}{path}?token={token(secret, provider, batch_id, index)}"


def announce(client: redis.Redis, batch_id: str, index: int) -> int:
    """Tell every worker process the row is done at its provider; returns how many
    processes listened."""
    return int(client.publish(CHANNEL, json.dumps([batch_id, index])))


def parse(data: bytes | str) -> tuple[str, int] | None:
    try:
        batch_id, index = json.loads(data)
    except (ValueError, TypeError):
        return None
    if isinstance(batch_id, str) and isinstance(index, int) and not isinstance(index, bool):
        return batch_id, index
    return None


class Listener:
    """A thread that calls ``on_done(batch_id, index)`` for every row announced, for as
    long as the process runs (Redis lost: it subscribes again; missed announcements are
    made up by the polls)."""

    def __init__(self, client: redis.Redis, on_done: Callable[[str, int], None]) -> None:
        self.client = client
        self.on_done = on_done
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bgswap-completions", daemon=True)

    def start(self) -> Listener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except redis.RedisError as exc:
                log.warning("completion webhooks: %s; listening again", type(exc).__name__)
                self._stop.wait(RETRY_S)

    def _listen(self) -> None:
        # Typed from redis 8.2 on, untyped before: the cast holds for both.
        open_pubsub = cast("Callable[..., redis.client.PubSub]", self.client.pubsub)
        pubsub = open_pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(CHANNEL)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                row = parse(message["data"])
                if row is not None:
                    self.on_done(*row)
        finally:
            pubsub.close()
