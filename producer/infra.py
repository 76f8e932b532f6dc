"""Servers that do not answer: one line naming the address and the variable to check.

Redis (batch state) and the broker are reached through ``BGSWAP_REDIS_URL`` and
``BGSWAP_BROKER_URL``; when one does not answer the command exits 3 with a line that
says which of the two to look at, never a client library's traceback. Credentials in a
URL never reach the line (``redact_url``).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import kombu.exceptions
import redis.exceptions

from worker.errors import Unreachable, UsageError, redact_url
from worker.settings import Settings
from worker.state import BatchStore

log = logging.getLogger("bgswap.producer")

# What the Redis client and kombu raise when a server is down, refuses or times out.
INFRA_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
)
# A broker client (py-amqp) may also give a plain socket error.
_BROKER_ERRORS: tuple[type[Exception], ...] = (*INFRA_ERRORS, OSError)


def redis_variable(settings: Settings) -> str:
    """Where the Redis address came from, as the user would fix it."""
    if settings.redis_url:
        return "BGSWAP_REDIS_URL"
    if settings.broker_url:
        return "BGSWAP_BROKER_URL"
    return "the default: neither BGSWAP_REDIS_URL nor BGSWAP_BROKER_URL is set"


def _reason(exc: BaseException, *urls: str | None) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    for url in urls:
        password = _password(url)
        if password:
            text = text.replace(password, "***")
    return text


def _password(url: str | None) -> str | None:
    try:
        return urlsplit(url or "").password
    except ValueError:
        return None


def describe(exc: BaseException, settings: Settings, *, broker: bool = False) -> Exception:
    """The one-line error for ``exc``, raised while talking to Redis (or the broker):
    ``Unreachable`` (exit 3), or ``UsageError`` (exit 2) for refused credentials."""
    redis_url = settings.effective_redis_url
    broker_url = settings.effective_broker_url
    reason = _reason(exc, redis_url, broker_url)
    if broker or (isinstance(exc, kombu.exceptions.OperationalError) and broker_url != redis_url):
        where, variable = f"the broker at {redact_url(broker_url)}", "BGSWAP_BROKER_URL"
    else:
        where, variable = f"Redis at {redact_url(redis_url)}", redis_variable(settings)
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return UsageError(f"{where} ({variable}) refused the credentials: {reason}")
    return Unreachable(f"cannot reach {where} ({variable}): {reason}")


def check_reachable(settings: Settings, celery_app: Any, store: BatchStore) -> None:
    """Ask Redis, and the broker when it is another server, before a batch is created."""
    try:
        store.redis.ping()
    except INFRA_ERRORS as exc:
        raise describe(exc, settings) from None
    log.debug("Redis at %s answers", redact_url(settings.effective_redis_url))
    if settings.effective_broker_url == settings.effective_redis_url:
        return
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0)
    except _BROKER_ERRORS as exc:
        raise describe(exc, settings, broker=True) from None
    log.debug("the broker at %s answers", redact_url(settings.effective_broker_url))
