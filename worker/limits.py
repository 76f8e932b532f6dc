"""A provider account's global limits, as the worker's (synchronous) job code uses them.

The limiter itself (worker/ratelimit) is async; steps run in the engine's threads
(worker/engine.py), so this module owns one event loop per process, in a thread, and
runs the limiter's calls there. Every worker on every machine shares the same Redis
state, so the limits hold for the whole fleet:

- before a paid submission, ``admit(row)``: the circuit must be closed, a rate token
  free (GCRA) and an in-flight slot free (a lease held by the row);
- while the row waits on its provider, ``keep(row)`` refreshes that lease (a dead
  worker's lease runs out by itself and the slot comes back);
- once the provider says the row's generation is over (its results ready, or failed),
  ``release(row)``: the provider's concurrency counts generations, not our downloads
  and uploads, so the next row may start while this one's results are stored. (The
  row's end releases it again: nothing is sent when this process freed it already.)
  Whoever listens (``on_free``: the engine's admission line) hears of each slot this
  process frees, at once;
- a 429 from the provider ``slow_down()``s the account for a while; an auth or credit
  error ``trip()``s its circuit for every batch.

When the row may not go yet, ``admit`` returns a ``Deferred`` with the wait (not an
error: the provider's step returns it as it is, worker/providers/base.py): the engine
puts the row in its provider's admission line for that long, without counting an
attempt, and no thread or message waits meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis

from worker import metrics
from worker.errors import Codes, ProviderAccountError, ProviderUnavailable
from worker.ratelimit import CircuitBreaker, Rate, RateLimiter, Semaphore, limit_key, parse_rate
from worker.ratelimit.backends.redis import (
    DEFAULT_PREFIX,
    RedisCircuitBreaker,
    RedisRateLimiter,
    RedisSemaphore,
)
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.providers.base import Account

T = TypeVar("T")

LEASE_S = 120.0  # > the longest gap between two polls of a waiting row (10 s) + slack
SLOT_RETRY_S = 1.0  # how soon a row that found no free slot looks again
# GCRA burst: a request may come one emission interval early. With a burst of 1, every
# admission that comes late (the scheduler's wake-up, a Redis round trip: a few ms at
# 20/s) is lost for good, and the account runs 5-8% under its limit; with 2 the next
# one makes up for it, so the long-run rate is the limit; any 1-second window then holds
# at most limit + 2 (bench/rate.py measures both).
RATE_BURST = 2
PENALTY = 0.5  # a 429 halves the account's rate...
PENALTY_S = 60.0  # ...for a minute (compounding while 429s keep coming)
MAX_WAITING_TRACKED = 10_000
CIRCUIT_S = 300.0  # an auth/credit error closes the account for 5 minutes, for everyone


@dataclass(frozen=True)
class Deferred:
    """Not now: come back in ``wait_s``. Not an error of the row: no attempt counts.

    ``exact``: the wait is known (the rate limiter names the instant the next token is
    free), so it is kept to the millisecond; else it is a guess (a slot frees when some
    other row ends) and callers spread it to avoid a herd."""

    wait_s: float
    why: str
    exact: bool = False


class BackgroundLoop:
    """An asyncio loop in a daemon thread, for calling async code from sync threads."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self.loop.run_forever, name="bgswap-limits", daemon=True)
        thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except FutureTimeout as exc:
            future.cancel()
            raise ProviderUnavailable(
                Codes.PROVIDER_UNAVAILABLE, "the rate-limit store did not answer in time"
            ) from exc


@dataclass(frozen=True)
class Backends:
    rates: RateLimiter
    slots: Semaphore
    circuit: CircuitBreaker


CIRCUIT_CHECK_S = 1.0  # how stale this process's view of the circuit may be


@dataclass
class ProviderLimits:
    loop: BackgroundLoop
    backends: Backends
    key: str
    rate: Rate | None
    max_in_flight: int | None
    # (when read, the reason): the circuit is read at most once a second per process. It
    # opens on an account error, which this process records at once (trip) and others
    # see within a second: a few rows may be submitted meanwhile, and fail like the first.
    _circuit: tuple[float, str | None] = (float("-inf"), None)
    # Row -> when it was first refused (monotonic), for the admission-wait histogram.
    _waiting: dict[str, float] = field(default_factory=dict)
    # Told (with the provider's name) when this process frees a slot: rows waiting here
    # for one may go now, not when their line would next look (worker/engine.py).
    on_free: Callable[[str], None] | None = None
    # Rows whose slot this process freed since it last took one for them: a row's slot is
    # freed when its provider is done and again when the row ends (a failed or canceled
    # row), and the second is then known to be nothing. A row this process did not free
    # (taken over from another) is always sent to Redis. (A row freed here, then taken
    # by another process that took a new slot for it and died, then taken back here,
    # leaves that slot to its lease: LEASE_S.)
    _freed: set[str] = field(default_factory=set)

    @property
    def provider(self) -> str:
        return self.key.partition(":")[0]

    def _refused(self, row: str, reason: str) -> None:
        metrics.admission_refused(self.provider, reason)
        if len(self._waiting) > MAX_WAITING_TRACKED:  # rows canceled while waiting
            self._waiting.clear()
        self._waiting.setdefault(row, time.monotonic())

    def _admitted(self, row: str) -> None:
        first = self._waiting.pop(row, None)
        if first is not None:
            metrics.admitted_after(self.provider, time.monotonic() - first)

    def _circuit_reason(self) -> str | None:
        read_at, reason = self._circuit
        if time.monotonic() - read_at > CIRCUIT_CHECK_S:
            reason = self.loop.run(self.backends.circuit.reason(self.key))
            self._circuit = (time.monotonic(), reason)
        return reason

    def admit(self, row: str) -> Deferred | None:
        """None: the row may send its paid request now (it holds a slot)."""
        reason = self._circuit_reason()
        if reason is not None:
            raise ProviderAccountError(Codes.PROVIDER_HALTED, f"circuit open: {reason}")
        if self.max_in_flight is not None:
            got = self.backends.slots.try_acquire(self.key, row, self.max_in_flight, LEASE_S)
            if not self.loop.run(got):
                self._refused(row, "slots")
                return Deferred(SLOT_RETRY_S, f"{self.max_in_flight} requests already in flight")
            self._freed.discard(row)
        if self.rate is not None:
            wait = self.loop.run(self.backends.rates.acquire(self.key, self.rate, RATE_BURST))
            if wait > 0:
                self._free(row)  # no slot held while waiting for a token
                self._refused(row, "rate")
                why = f"rate limit {self.rate.count}/{self.rate.period_s:g}s"
                return Deferred(wait, why, exact=True)
        self._admitted(row)
        return None

    def keep(self, row: str) -> None:
        if self.max_in_flight is not None:
            self.loop.run(self.backends.slots.refresh(self.key, row, LEASE_S))

    def release(self, row: str) -> None:
        if self._free(row) and self.on_free is not None:
            self.on_free(self.provider)

    def _free(self, row: str) -> bool:
        """Whether the row held a slot (now free)."""
        if self.max_in_flight is None or row in self._freed:
            return False
        freed = self.loop.run(self.backends.slots.release(self.key, row))
        if len(self._freed) > MAX_WAITING_TRACKED:  # rows that ended elsewhere
            self._freed.clear()
        self._freed.add(row)
        return freed

    def slow_down(self) -> None:
        if self.rate is not None:
            self.loop.run(self.backends.rates.slow_down(self.key, PENALTY, PENALTY_S))

    def trip(self, reason: str) -> None:
        self.loop.run(self.backends.circuit.trip(self.key, CIRCUIT_S, reason))
        metrics.circuit_opened(self.provider)
        self._circuit = (time.monotonic(), reason)


@dataclass(frozen=True)
class RowLimits:
    """One row's view of its provider's limits (what a provider calls)."""

    limits: ProviderLimits
    row: str

    def admit(self) -> Deferred | None:
        return self.limits.admit(self.row)

    def keep(self) -> None:
        self.limits.keep(self.row)

    def release(self) -> None:
        """The provider has finished with the row (its results are ready): the slot is
        free for the next row while this one's results are downloaded and stored."""
        self.limits.release(self.row)

    def slow_down(self) -> None:
        self.limits.slow_down()


def redis_backends(loop: BackgroundLoop, redis_url: str) -> Backends:
    async def build() -> Backends:
        # Created on the loop that will use it: redis.asyncio binds to its loop.
        client = aioredis.Redis.from_url(redis_url)
        return Backends(
            RedisRateLimiter(client), RedisSemaphore(client), RedisCircuitBreaker(client)
        )

    return loop.run(build())


def in_flight(settings: Settings, client: Any) -> list[tuple[str, float, float | None]]:
    """(provider, requests in flight on its account, the cap) for the metrics: the live
    leases of the account's semaphore, read with Redis's clock as the limiter does."""
    from worker.providers import SPECS  # noqa: PLC0415 - the providers import this module

    seconds, micros = client.time()
    now_us = int(seconds) * 1_000_000 + int(micros)
    found: list[tuple[str, float, float | None]] = []
    for provider, spec in SPECS.items():
        if spec.account is None:
            continue
        cap = spec.account.max_in_flight(settings)
        name = account_key(provider, spec.account, settings)
        count = client.zcount(f"{DEFAULT_PREFIX}sem:{name}", f"({now_us}", "+inf")
        found.append((provider, float(count), float(cap) if cap is not None else None))
    return found


def account_key(provider: str, account: Account, settings: Settings) -> str:
    """The name the account's limits are kept under: the provider and its key's hash."""
    key = account.key(settings)
    return limit_key(provider, key.get_secret_value() if key else None)


def provider_limits(
    settings: Settings, provider: str, account: Account, loop: BackgroundLoop, backends: Backends
) -> ProviderLimits:
    """The limits configured for a paid provider's account."""
    rate = account.rate(settings)
    return ProviderLimits(
        loop=loop,
        backends=backends,
        key=account_key(provider, account, settings),
        rate=parse_rate(rate) if rate else None,
        max_in_flight=account.max_in_flight(settings),
    )
