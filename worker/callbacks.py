"""Completion callbacks: when a batch ends, POST one signed event to its ``callback_url``.

    {"event_id", "type": "batch.completed" | "batch.canceled" | "batch.failed",
     "batch_id", "counts", "cost_usd", "manifest_url"}

signed with ``BGSWAP_CALLBACK_SECRET`` (``X-Bgswap-Signature: t=...,v1=...``, see
worker/signing.py; unset: sent unsigned, with one warning per process).

At least once, surviving any worker's death. The schedule lives in Redis, not in broker
messages: ``bgswap:callbacks`` is a sorted set of batch ids scored by the time of their
next attempt. A batch that ends (``schedule``: finalize, fail_batch) is added at "now";
an attempt first *claims* its batch (the score moves a lease ahead, atomically, so one
worker of many sends it), and its outcome removes it (delivered, refused, expired) or
scores it at the next attempt. Every worker's watchdog enqueues the attempts that are
due (``due``), and a claim whose worker died comes due again when its lease ends. A
broker message with a countdown is only a nudge for short waits (a countdown message is
held unacked by a worker until it runs, so one longer than the visibility timeout would
be handed out twice; the watchdog covers the long ones).

The event id is ``evt_`` + sha256(batch id, type)[:32]: the same on every attempt and on
every re-delivery, so a receiver de-duplicates by it. Delivery state is in the batch's
meta: ``callback_status`` (retrying, delivered, refused, expired), ``callback_attempts``,
``callback_next_at``, ``callback_error``.

The URL passes the sources' address guard (worker/netguard.py: no private or loopback
address unless BGSWAP_ALLOW_PRIVATE_URLS; https, or http only then); redirects are not
followed. Neither the secret nor the signature is ever logged.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore
import httpx

from worker.netguard import (
    GuardedBackend,
    PrivateAddressRefused,
    guarded_http_client,
    is_public_address,
)
from worker.settings import Settings
from worker.signing import HEADER, sign
from worker.state import BatchNotFound, BatchStore

log = logging.getLogger("bgswap.callbacks")

DUE_KEY = "bgswap:callbacks"
CLAIM_LEASE_S = 60.0  # far above an attempt's timeout (BGSWAP_CALLBACK_TIMEOUT_S <= 30)
NUDGE_MAX_S = 60.0  # waits up to this long also get a countdown message (< visibility)
TYPES = ("batch.completed", "batch.canceled", "batch.failed")

# ARGV: batch id, now, lease. Claim a due entry: move it a lease ahead; 1 if taken.
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return 1
"""

_warned_unsigned = threading.Event()


class CallbackUrlError(ValueError):
    """A callback URL the guard refuses (scheme, or a private address)."""


def check_callback_url(url: str, allow_private: bool) -> str:
    """The URL if its form is acceptable: https (http only with private URLs allowed),
    a host, no credentials. The address itself is checked at connect time."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise CallbackUrlError(f"callback URL {url!r}: {exc}") from None
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme.lower() not in allowed:
        need = (
            "http:// or https://"
            if allow_private
            else ("https:// (http:// only with BGSWAP_ALLOW_PRIVATE_URLS=1)")
        )
        raise CallbackUrlError(f"callback URL must be {need}")
    if not host:
        raise CallbackUrlError("callback URL has no host")
    if parts.username or parts.password:
        raise CallbackUrlError("callback URL must not carry credentials")
    if not allow_private:
        _refuse_literal_private(host)
    return url


def _refuse_literal_private(host: str) -> None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            raise CallbackUrlError(f"callback URL host {host} is not public") from None
        return  # a name: resolved and checked when the callback is sent
    if not is_public_address(ip):
        raise CallbackUrlError(f"callback URL host {host} is not a public address")


def event_id(batch_id: str, kind: str) -> str:
    return "evt_" + hashlib.sha256(f"{batch_id}\n{kind}".encode()).hexdigest()[:32]


def event_type(meta: dict[str, str]) -> str | None:
    """The event a batch that ended is owed, from its meta (None: it has not ended)."""
    if meta.get("status") == "failed":
        return "batch.failed"
    if meta.get("status") == "done":
        return "batch.canceled" if meta.get("canceled") else "batch.completed"
    return None


def schedule(store: BatchStore, batch_id: str, now: float | None = None) -> bool:
    """Owe the batch's callback, if it has a ``callback_url`` and has not been sent this
    event already (finalize may run more than once). True if newly scheduled."""
    meta = store.meta(batch_id)
    kind = event_type(meta)
    if not meta.get("callback_url") or kind is None:
        return False
    eid = event_id(batch_id, kind)
    if meta.get("callback_event_id") == eid:
        return False
    when = time.time() if now is None else now
    # The entry first: a crash before the meta is written still sends (``deliver`` reads
    # the event from the meta, whatever was recorded).
    store.redis.zadd(DUE_KEY, {batch_id: when}, nx=True)
    store.set_meta(batch_id, callback_event_id=eid, callback_status="retrying",
                   callback_attempts="0", callback_first_at=f"{when:.3f}")  # fmt: skip
    return True


def due(store: BatchStore, now: float, limit: int = 100) -> list[str]:
    """Batches whose callback attempt is due (the watchdog enqueues them)."""
    found: list[str] = store.redis.zrangebyscore(DUE_KEY, "-inf", now, start=0, num=limit)
    return found


def pending(store: BatchStore, batch_id: str) -> bool:
    """Whether the batch has a callback attempt scheduled."""
    return store.redis.zscore(DUE_KEY, batch_id) is not None


def build_event(store: BatchStore, batch_id: str, meta: dict[str, str], kind: str) -> bytes:
    counts = store.counts(batch_id)
    event = {
        "event_id": event_id(batch_id, kind),
        "type": kind,
        "batch_id": batch_id,
        "counts": {**counts, "total": int(meta.get("total", 0) or 0)},
        "cost_usd": round(float(meta.get("cost_usd", 0) or 0), 6),
        "manifest_url": meta.get("manifest_url"),
    }
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Outcome:
    status: str  # delivered, refused, retrying
    detail: str  # for the log and meta: never a secret or a signature
    retry_after_s: float | None = None


def classify(response: httpx.Response) -> Outcome:
    code = response.status_code
    if 200 <= code < 300:
        return Outcome("delivered", f"HTTP {code}")
    if code in (408, 429) or code >= 500:
        return Outcome("retrying", f"HTTP {code}", _retry_after(response))
    if 300 <= code < 400:
        return Outcome("refused", f"HTTP {code}: redirects are not followed")
    return Outcome("refused", f"HTTP {code}")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def backoff_s(settings: Settings, attempts: int, rand: float) -> float:
    """Exponential with jitter: the n-th retry waits base * 2^(n-1), capped, times a
    random factor in [0.5, 1)."""
    raw = min(settings.callback_retry_cap_s, settings.callback_retry_base_s * 2.0 ** (attempts - 1))
    return raw * (0.5 + rand / 2)


class Callbacks:
    """Sends callbacks for one worker process (one guarded HTTP client)."""

    def __init__(
        self,
        settings: Settings,
        store: BatchStore,
        *,
        rand: Callable[[], float],
        clock: Callable[[], float] = time.time,
        nudge: Callable[[str, float], None] = lambda batch_id, countdown: None,
        http: httpx.Client | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.rand = rand
        self.clock = clock
        self.nudge = nudge
        self._claim = store.redis.register_script(_CLAIM)
        self.http = http or guarded_http_client(
            settings,
            timeout=httpx.Timeout(settings.callback_timeout_s),
            allow_private=settings.allow_private_urls,
        )

    def close(self) -> None:
        self.http.close()

    def claim(self, batch_id: str) -> bool:
        # A nudge may fire a little before its entry's time: half a second of slack.
        return bool(self._claim(keys=[DUE_KEY], args=[batch_id, self.clock() + 0.5, CLAIM_LEASE_S]))

    def deliver(self, batch_id: str) -> str | None:
        """One attempt, if the batch's callback is due and this process claims it;
        returns the resulting ``callback_status`` (None: not due or taken elsewhere)."""
        if not self.claim(batch_id):
            return None
        try:
            meta = self.store.meta(batch_id)
        except BatchNotFound:
            meta = {}
        kind = event_type(meta)
        if kind is None or not meta.get("callback_url"):
            self.store.redis.zrem(DUE_KEY, batch_id)  # nothing (left) to send
            return None
        eid = event_id(batch_id, kind)
        if meta.get("callback_event_id") != eid:
            meta["callback_attempts"] = "0"
            meta["callback_first_at"] = f"{self.clock():.3f}"
        attempts = int(meta.get("callback_attempts", 0) or 0) + 1
        first_at = float(meta.get("callback_first_at") or self.clock())
        outcome = self._send(meta["callback_url"], build_event(self.store, batch_id, meta, kind))
        status, next_at = outcome.status, None
        if status == "retrying":
            status, next_at = self._retry(batch_id, attempts, first_at, outcome)
        else:
            self.store.redis.zrem(DUE_KEY, batch_id)
        self.store.set_meta(
            batch_id,
            callback_event_id=eid,
            callback_status=status,
            callback_attempts=str(attempts),
            callback_first_at=f"{first_at:.3f}",
            callback_next_at="" if next_at is None else f"{next_at:.3f}",
            callback_error="" if status == "delivered" else outcome.detail,
        )
        level = logging.INFO if status == "delivered" else logging.WARNING
        log.log(level, "batch %s: callback %s %s (attempt %d, %s)", batch_id, eid, status,
                attempts, outcome.detail)  # fmt: skip
        return status

    def _retry(
        self, batch_id: str, attempts: int, first_at: float, outcome: Outcome
    ) -> tuple[str, float | None]:
        """Score the next attempt (and nudge it when it is soon), or give up past the
        deadline: ``(status, next attempt time)``."""
        wait = backoff_s(self.settings, attempts, self.rand())
        if outcome.retry_after_s is not None:
            wait = max(wait, min(outcome.retry_after_s, self.settings.callback_retry_cap_s))
        now = self.clock()
        if now + wait > first_at + self.settings.callback_deadline_s:
            self.store.redis.zrem(DUE_KEY, batch_id)
            return "expired", None
        self.store.redis.zadd(DUE_KEY, {batch_id: now + wait})
        if wait <= NUDGE_MAX_S:
            try:
                self.nudge(batch_id, wait)
            except Exception as exc:  # the watchdog sends it when it is due
                log.warning("batch %s: callback retry not enqueued (%s)", batch_id,
                            type(exc).__name__)  # fmt: skip
        return "retrying", now + wait

    def _send(self, url: str, body: bytes) -> Outcome:
        try:
            check_callback_url(url, self.settings.allow_private_urls)
        except CallbackUrlError as exc:
            return Outcome("refused", str(exc))
        headers = {"Content-Type": "application/json", "User-Agent": "bgswap-callbacks"}
        secret = self.settings.callback_secret
        if secret is not None:
            headers[HEADER] = sign(secret.get_secret_value(), body, int(self.clock()))
        elif not _warned_unsigned.is_set():
            _warned_unsigned.set()
            log.warning("BGSWAP_CALLBACK_SECRET is not set: callbacks are sent unsigned")
        try:
            response = self.http.post(url, content=body, headers=headers, follow_redirects=False)
        except PrivateAddressRefused as exc:
            return Outcome("refused", f"{exc.host} is not a public address")
        except httpx.TimeoutException as exc:
            return Outcome("retrying", f"timeout ({type(exc).__name__})")
        except httpx.TransportError as exc:
            return Outcome("retrying", f"connection failed ({type(exc).__name__})")
        return classify(response)


_lock = threading.Lock()
_process: Callbacks | None = None


def process_callbacks(
    settings: Settings,
    store: BatchStore,
    rand: Callable[[], float],
    nudge: Callable[[str, float], None],
) -> Callbacks:
    """This worker process's sender (built on first use, one HTTP client)."""
    global _process  # noqa: PLW0603 - one per process, like worker/runtime.py's context
    with _lock:
        if _process is None or _process.settings is not settings:
            _process = Callbacks(settings, store, rand=rand, nudge=nudge)
        return _process


def owe(store: BatchStore, batch_id: str) -> bool:
    """``schedule`` for the places a batch ends (finalize, fail_batch): a failure is
    logged, never raised, since the batch's end is already recorded. True if owed."""
    try:
        return schedule(store, batch_id)
    except Exception as exc:
        log.warning("batch %s: callback not scheduled (%s)", batch_id, type(exc).__name__)
        return False


def check_callback_destination(url: str, allow_private: bool) -> str:
    """``check_callback_url``, then the host's addresses through the sources' guard (at
    submit time; every attempt is checked again when it connects)."""
    check_callback_url(url, allow_private)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        GuardedBackend(allow_private=allow_private).resolve(parts.hostname or "", port)
    except PrivateAddressRefused as exc:
        raise CallbackUrlError(f"callback URL host {exc.host} resolves to a non-public "
                               f"address ({exc.address})") from None  # fmt: skip
    except httpcore.ConnectError as exc:
        raise CallbackUrlError(f"callback URL: {exc}") from None
    return url
