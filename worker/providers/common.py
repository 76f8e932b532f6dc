"""What the paid providers share: sending with honest failure modes, error classification
by rule tables, per-row memory updates, and references uploaded once.

The distinction that protects the user's money is between a request that surely did
not arrive (a connect error: safe to send again) and one whose outcome is unknown (a
timeout or a dropped connection after sending, a 5xx, an unreadable 2xx: it may have
been accepted and billed). The latter raises ``Ambiguous``; each provider resolves it
its own way (Runware can ask about its client-chosen task id; fal cannot).
"""

from __future__ import annotations

import copy
import hashlib
import io
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import httpx
from PIL import Image

from worker import metrics
from worker.errors import Ambiguous, BgswapError, Codes, ImageRejected, ProviderUnavailable
from worker.fetch import reference_scheme
from worker.imaging import check_image
from worker.providers.base import Memory, ProviderContext

T = TypeVar("T")


V = TypeVar("V")


def fresh_only(items: dict[str, V], stamp: Callable[[V], float], oldest: float) -> dict[str, V]:
    """``items`` without those stamped before ``oldest``, rows let go before their step
    leave behind. Looked at only past 64 entries and when the first (the oldest) is stale:
    most calls cost nothing."""
    if len(items) > 64 and stamp(next(iter(items.values()))) < oldest:
        return {k: v for k, v in items.items() if stamp(v) >= oldest}
    return items


class Prefetched(Generic[T]):
    """Answers fetched ahead for rows' next steps (``Prefetching``, worker/providers/base.py),
    by what each row watches. Each is taken once, and only while fresh: a row let go before
    its step leaves nothing behind for long, and a late step polls afresh."""

    def __init__(self, max_age_s: float = 30.0) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, T]] = {}
        self._unready: dict[str, float] = {}

    def put(self, key: str, value: T) -> None:
        now = time.monotonic()
        with self._lock:
            self._items[key] = (now, value)
            self._items = fresh_only(self._items, lambda item: item[0], now - self.max_age_s)

    def take(self, key: str) -> T | None:
        with self._lock:
            item = self._items.pop(key, None)
        if item is None or item[0] < time.monotonic() - self.max_age_s:
            return None
        return item[1]

    def unready(self, key: str) -> None:
        """A gathered poll found ``key`` unfinished, and no step learned it: when, for the
        estimate of its generation time (worker/providers/polling.py, ``generated``)."""
        now = time.time()
        with self._lock:
            self._unready[key] = now
            self._unready = fresh_only(self._unready, lambda t: t, now - self.max_age_s)

    def unready_at(self, key: str) -> float | None:
        """When a gathered poll last found ``key`` unfinished (wall clock), once."""
        with self._lock:
            return self._unready.pop(key, None)


In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    outcome: Out | Exception | None = None
    done: bool = False


class SharedRequests(Generic[In, Out]):
    """What the threads of a process send at about the same time, sent as one request:
    while one is out, those that come meanwhile wait for it to end and go together in
    the next (up to ``cap`` in one). No timer: a request that finds none out goes at
    once. ``send_many`` answers each item, in order, with its outcome or its error."""

    def __init__(self, send_many: Callable[[list[In]], list[Out | Exception]], cap: int) -> None:
        self.send_many = send_many
        self.cap = cap
        self._cv = threading.Condition()
        self._queue: list[_Pending[In, Out]] = []
        self._out = False

    def send(self, item: In) -> Out:
        pending: _Pending[In, Out] = _Pending(item)
        batch: list[_Pending[In, Out]] = []
        with self._cv:
            self._queue.append(pending)
            # The oldest waiting leads the next request, once none is out.
            while not pending.done and (self._out or self._queue[0] is not pending):
                self._cv.wait()
            if not pending.done:
                batch, self._queue[: self.cap] = self._queue[: self.cap], []
                self._out = True
        if batch:
            try:
                outcomes = self.send_many([p.item for p in batch])
            except Exception as exc:  # a bug: every item in it fails alike
                outcomes = [exc] * len(batch)
            with self._cv:
                for p, outcome in zip(batch, outcomes, strict=True):
                    p.outcome, p.done = outcome, True
                self._out = False
                self._cv.notify_all()
        if isinstance(pending.outcome, Exception):
            raise copy.copy(pending.outcome)  # one instance per thread: a raise sets its traceback
        return cast(Out, pending.outcome)


Rule = tuple[Callable[[str, int], bool], type[BgswapError], str]


def classify_by_rules(
    rules: Iterable[Rule], code: str, status: int, text: str, retry_after_s: float | None
) -> BgswapError:
    """First matching rule wins: a rule table keeps the priority visible in one place."""
    for matches, kind, our_code in rules:
        if matches(code, status):
            return kind(our_code, text, retry_after_s=retry_after_s)
    return ProviderUnavailable(Codes.PROVIDER_BAD_RESPONSE, text, retry_after_s=retry_after_s)


def send(
    http: httpx.Client, method: str, url: str, *, provider: str, kind: str, **kwargs: Any
) -> httpx.Response:
    """One HTTP call, counted in the metrics as ``kind`` (submit, poll, upload, download);
    transport failures mapped by whether the request can have landed: for a ``submit``
    (paid) ``Ambiguous`` unless it surely did not; for the others, free to repeat, a
    retryable ``ProviderUnavailable`` either way."""
    started = time.monotonic()
    try:
        response = _request(http, method, url, provider, kind == "submit", **kwargs)
    except BgswapError:
        metrics.request_done(provider, kind, None, time.monotonic() - started)
        raise
    metrics.request_done(provider, kind, response.status_code, time.monotonic() - started)
    return response


def _request(
    http: httpx.Client, method: str, url: str, provider: str, paid: bool, **kwargs: Any
) -> httpx.Response:
    try:
        return http.request(method, url, **kwargs)
    except httpx.TransportError as exc:
        raise transport_error(exc, provider, paid) from exc


async def asend(
    http: httpx.AsyncClient, method: str, url: str, *, provider: str, kind: str, **kwargs: Any
) -> httpx.Response:
    """``send`` on an event loop (the engine's gathered polls)."""
    started = time.monotonic()
    try:
        response = await http.request(method, url, **kwargs)
    except httpx.TransportError as exc:
        metrics.request_done(provider, kind, None, time.monotonic() - started)
        raise transport_error(exc, provider, kind == "submit") from exc
    metrics.request_done(provider, kind, response.status_code, time.monotonic() - started)
    return response


def transport_error(
    exc: httpx.TransportError, provider: str, paid: bool
) -> ProviderUnavailable | Ambiguous:
    """A request that got no answer: surely not sent (safe to send again) or maybe sent
    (``Ambiguous`` when it was ``paid``)."""
    if not paid or isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        # Nothing reached the provider, or it costs nothing: sending again is safe.
        timed_out = isinstance(exc, httpx.TimeoutException) and not isinstance(
            exc, httpx.ConnectTimeout
        )
        code = Codes.PROVIDER_TIMEOUT if timed_out else None
        return ProviderUnavailable(
            code or Codes.PROVIDER_UNAVAILABLE, transport_message(exc, provider)
        )
    if isinstance(exc, httpx.TimeoutException):
        return Ambiguous(Codes.PROVIDER_TIMEOUT, transport_message(exc, provider))
    return Ambiguous(Codes.PROVIDER_UNAVAILABLE, transport_message(exc, provider))


def transport_message(exc: httpx.TransportError, provider: str) -> str:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"{provider}: cannot connect ({type(exc).__name__})"
    if isinstance(exc, httpx.TimeoutException):
        return f"{provider} did not answer in time"
    return f"{provider}: connection failed ({type(exc).__name__})"


def remember(memory: dict[str, Any], store: Memory, **values: Any) -> None:
    """Update the row's memory and save it at once (before whatever it protects)."""
    memory.update(values)
    store.save(memory)


def reference_for_provider(
    ref: str,
    field: str,
    memory: dict[str, Any],
    ctx: ProviderContext,
    *,
    upload: Callable[[bytes], str],
    passthrough: frozenset[str] = frozenset({"http", "https"}),
) -> str:
    """A reference the provider can read itself: URLs as given; anything else (a local
    file, s3://, ...) uploaded. Either way the source is first fetched (within the byte
    cap) and checked to be an image within the caps: nothing else is uploaded to the
    provider or passed on to it. Done once per row: the uploads and the checks are
    remembered across attempts (a passed-on URL by a digest, never the URL itself)."""
    passed_on = reference_scheme(ref) in passthrough
    uploads: dict[str, str] = memory.setdefault("uploads", {})
    checked: list[str] = memory.setdefault("checked", [])
    digest = hashlib.sha256(ref.encode()).hexdigest()[:16]
    if passed_on and digest in checked:
        return ref
    if not passed_on and ref in uploads:
        return uploads[ref]
    data = ctx.fetch(ref, field)
    try:
        check_image(data, ctx.max_image_pixels, ctx.image_budget)
    except ImageRejected as exc:
        raise ImageRejected(exc.code, f"{field}: {exc.message}") from exc
    if passed_on:
        checked.append(digest)
    else:
        uploads[ref] = upload(data)
    ctx.memory.save(memory)
    return ref if passed_on else uploads[ref]


def image_info(data: bytes) -> tuple[str | None, int | None, int | None]:
    """(Pillow format, width, height) of image bytes, or Nones: informative only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format, img.width, img.height
    except Exception:
        return None, None, None
