"""Contract tests for worker.ratelimit: every case runs against every backend.

The memory backend runs on a fake clock (sleeping jumps time), the Redis backend on
the session's private redis-server in real time, with short periods to stay fast.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import multiprocessing
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from worker.ratelimit import (
    PENALTY_FLOOR,
    CircuitBreaker,
    Rate,
    RateLimiter,
    Semaphore,
    gcra,
    limit_key,
    parse_rate,
)
from worker.ratelimit.backends.memory import (
    MemoryCircuitBreaker,
    MemoryRateLimiter,
    MemorySemaphore,
)
from worker.ratelimit.backends.redis import (
    DEFAULT_PREFIX,
    RedisCircuitBreaker,
    RedisRateLimiter,
    RedisSemaphore,
)

FAST = Rate(20, 1.0)  # 50 ms between requests: short, yet well above a round trip
T = FAST.emission_interval_s


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Backend:
    limiter: RateLimiter
    semaphore: Semaphore
    breaker: CircuitBreaker
    sleep: Callable[[float], Awaitable[None]]
    now: Callable[[], float]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()
        yield Backend(
            MemoryRateLimiter(clock.now),
            MemorySemaphore(clock.now),
            MemoryCircuitBreaker(clock.now),
            clock.sleep,
            clock.now,
        )
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    await client.flushdb()
    try:
        yield Backend(
            RedisRateLimiter(client),
            RedisSemaphore(client),
            RedisCircuitBreaker(client),
            asyncio.sleep,
            time.monotonic,
        )
    finally:
        await client.aclose()


def assert_wait(backend: Backend, wait: float, expected: float, since: float) -> None:
    """``wait`` is ``expected`` less the time gone since the slot was taken at ``since``.

    The elapsed time is the caller's round trips (a few ms, more on a loaded machine);
    it is measured rather than guessed so that the bound stays exact. 1 us: rounding.
    """
    elapsed = backend.now() - since
    assert expected - elapsed - 1e-6 <= wait <= expected + 1e-6, (wait, expected, elapsed)


# -- rate limiter ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_burst_at_once_then_spaced_by_the_emission_interval(backend: Backend) -> None:
    lim = backend.limiter
    since = backend.now()
    assert [await lim.acquire("k", FAST, burst=3) for _ in range(3)] == [0.0, 0.0, 0.0]
    asked = backend.now()
    wait = await lim.acquire("k", FAST, burst=3)
    assert_wait(backend, wait, T, since)

    await backend.sleep(wait)
    assert await lim.acquire("k", FAST, burst=3) == 0.0
    # That request had the slot at asked + wait, however late the sleep woke us.
    since = asked + wait
    assert_wait(backend, await lim.acquire("k", FAST, burst=3), T, since)


@pytest.mark.anyio
async def test_a_refusal_counts_nothing(backend: Backend) -> None:
    lim = backend.limiter
    assert await lim.acquire("k", FAST) == 0.0
    waits = [await lim.acquire("k", FAST) for _ in range(5)]
    # Asking again while refused does not push the next slot back.
    assert all(w <= T + 1e-6 for w in waits), waits
    await backend.sleep(waits[-1])
    assert await lim.acquire("k", FAST) == 0.0


@pytest.mark.anyio
async def test_keys_are_independent(backend: Backend) -> None:
    lim, slow = backend.limiter, Rate(1, 60.0)
    assert await lim.acquire("a", slow) == 0.0
    assert await lim.acquire("a", slow) > 0
    assert await lim.acquire("b", slow) == 0.0
    assert await lim.acquire("a", slow) > 0


@pytest.mark.anyio
async def test_slow_down_halves_the_rate_then_expires(backend: Backend) -> None:
    lim = backend.limiter
    await lim.slow_down("k", 0.5, for_s=0.5)
    since = backend.now()
    assert await lim.acquire("k", FAST) == 0.0
    assert_wait(backend, await lim.acquire("k", FAST), 2 * T, since)

    await backend.sleep(0.55)
    since = backend.now()
    assert await lim.acquire("k", FAST) == 0.0
    assert_wait(backend, await lim.acquire("k", FAST), T, since)


@pytest.mark.anyio
async def test_slow_down_compounds_down_to_the_floor(backend: Backend) -> None:
    lim = backend.limiter
    for _ in range(2):
        await lim.slow_down("twice", 0.5, for_s=5)
    since = backend.now()
    assert await lim.acquire("twice", FAST) == 0.0
    assert_wait(backend, await lim.acquire("twice", FAST), 4 * T, since)

    for _ in range(10):
        await lim.slow_down("floor", 0.5, for_s=5)
    since = backend.now()
    assert await lim.acquire("floor", FAST) == 0.0
    assert_wait(backend, await lim.acquire("floor", FAST), T / PENALTY_FLOOR, since)


@pytest.mark.anyio
async def test_bad_arguments_are_rejected(backend: Backend) -> None:
    for factor in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="factor"):
            await backend.limiter.slow_down("k", factor, for_s=1)
    with pytest.raises(ValueError, match="burst"):
        await backend.limiter.acquire("k", FAST, burst=0)
    with pytest.raises(ValueError, match="limit"):
        await backend.semaphore.try_acquire("k", "a", limit=0, lease_s=1)
    with pytest.raises(ValueError, match="lease_s"):
        await backend.semaphore.try_acquire("k", "a", limit=1, lease_s=0)
    with pytest.raises(ValueError, match="for_s"):
        await backend.breaker.trip("k", 0, "x")


# -- semaphore ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_semaphore_respects_the_limit_and_release_frees(backend: Backend) -> None:
    sem = backend.semaphore
    assert await sem.try_acquire("k", "a", limit=2, lease_s=10)
    assert await sem.try_acquire("k", "b", limit=2, lease_s=10)
    assert not await sem.try_acquire("k", "c", limit=2, lease_s=10)
    assert await sem.try_acquire("k", "a", limit=2, lease_s=10)  # renewing is not a new slot
    assert await sem.in_use("k") == 2

    assert await sem.release("k", "a") is True
    assert await sem.release("k", "nobody") is False  # says whether a slot came free
    assert await sem.release("k", "a") is False
    assert await sem.in_use("k") == 1
    assert await sem.try_acquire("k", "c", limit=2, lease_s=10)
    assert await sem.try_acquire("other", "a", limit=1, lease_s=10)


@pytest.mark.anyio
async def test_expired_leases_are_reclaimed(backend: Backend) -> None:
    sem = backend.semaphore
    assert await sem.try_acquire("k", "dead", limit=2, lease_s=0.2)
    assert await sem.try_acquire("k", "alive", limit=2, lease_s=10)
    assert await sem.in_use("k") == 2

    await backend.sleep(0.25)
    assert await sem.in_use("k") == 1  # before any acquire sweeps it
    assert await sem.try_acquire("k", "new", limit=2, lease_s=10)
    assert not await sem.try_acquire("k", "more", limit=2, lease_s=10)


@pytest.mark.anyio
async def test_refresh_keeps_a_lease_alive_and_fails_after_expiry(backend: Backend) -> None:
    sem = backend.semaphore
    assert not await sem.refresh("k", "a", lease_s=0.2)  # never held
    assert await sem.try_acquire("k", "a", limit=1, lease_s=0.2)
    for _ in range(3):  # 0.3 s in all, beyond the first lease
        await backend.sleep(0.1)
        assert await sem.refresh("k", "a", lease_s=0.2)
    assert await sem.in_use("k") == 1
    assert not await sem.try_acquire("k", "b", limit=1, lease_s=0.2)

    await backend.sleep(0.25)
    assert not await sem.refresh("k", "a", lease_s=0.2)
    assert await sem.in_use("k") == 0
    assert await sem.try_acquire("k", "b", limit=1, lease_s=0.2)


# -- circuit breaker ------------------------------------------------------------------


@pytest.mark.anyio
async def test_circuit_trips_with_a_reason_and_closes_by_itself(backend: Backend) -> None:
    cb = backend.breaker
    assert await cb.reason("k") is None
    await cb.trip("k", for_s=0.3, reason="401 invalid key")
    assert await cb.reason("k") == "401 invalid key"
    assert await cb.reason("other") is None
    await cb.trip("k", for_s=0.3, reason="402 out of credits")
    assert await cb.reason("k") == "402 out of credits"

    await backend.sleep(0.35)
    assert await cb.reason("k") is None


# -- Redis only -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_redis_keys_all_have_a_ttl(redis_url: str, anyio_backend: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.flushdb()
        await RedisRateLimiter(client).acquire("runware:abc", Rate(1, 5.0))
        await RedisRateLimiter(client).slow_down("runware:abc", 0.5, for_s=5)
        await RedisSemaphore(client).try_acquire("runware:abc", "w1", limit=2, lease_s=5)
        await RedisCircuitBreaker(client).trip("runware:abc", 5, "reason")
        keys = [k async for k in client.scan_iter(f"{DEFAULT_PREFIX}*")]
        assert len(keys) == 4, keys
        for key in keys:
            assert 0 < await client.pttl(key) <= 5000, key
    finally:
        await client.aclose()


SHARED = Rate(20, 1.0)
SHARED_BURST = 2
PROCESSES = 4
RUN_S = 3.0


async def _hammer(url: str, barrier: Any, key: str) -> list[float]:
    client = aioredis.Redis.from_url(url)
    limiter = RedisRateLimiter(client)
    await limiter.acquire("warm-up", SHARED)  # connect and load the script before the start
    stamps: list[float] = []
    barrier.wait()
    deadline = time.monotonic() + RUN_S
    while (now := time.monotonic()) < deadline:
        wait = await limiter.acquire(key, SHARED, burst=SHARED_BURST)
        if wait == 0.0:
            stamps.append(time.monotonic())
        else:
            await asyncio.sleep(min(wait, deadline - now))
    await client.aclose()
    return stamps


def _hammer_process(url: str, barrier: Any, key: str, out: Any) -> None:
    out.put(asyncio.run(_hammer(url, barrier, key)))


def test_processes_share_one_limit(redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer_process, args=(redis_url, barrier, "shared", out))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        per_process = [out.get(timeout=30) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    stamps = sorted(s for chunk in per_process for s in chunk)

    achieved = (len(stamps) - SHARED_BURST) / ((stamps[-1] - stamps[0]) * SHARED.count)
    worst = max(bisect.bisect_left(stamps, s + 1.0) - i for i, s in enumerate(stamps))
    print(  # shown with -s: the numbers for the report
        f"\n{PROCESSES} processes, {len(stamps)} requests in {stamps[-1] - stamps[0]:.3f} s: "
        f"{achieved:.1%} of {SHARED.count}/s, worst 1-s window {worst}, "
        f"per process {[len(c) for c in per_process]}"
    )
    assert all(per_process), "every process got some requests through"
    assert 0.95 <= achieved <= 1.01
    assert worst <= SHARED.count + SHARED_BURST


# -- pure -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("20/s", Rate(20, 1.0)),
        ("600/m", Rate(600, 60.0)),
        ("3600/h", Rate(3600, 3600.0)),
        ("5/10s", Rate(5, 10.0)),
        (" 1 / 2.5m ", Rate(1, 150.0)),
    ],
)
def test_parse_rate(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "20", "20/", "/s", "20/d", "0/s", "-1/s", "2.5/s", "5/0s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_emission_interval() -> None:
    assert parse_rate("20/s").emission_interval_s == 0.05
    assert parse_rate("5/10s").emission_interval_s == 2.0


def test_limit_key_is_per_account_without_the_secret() -> None:
    secret = "rw_live_0123456789abcdef0123456789abcdef"
    key = limit_key("Runware", secret)
    assert key == f"runware:{hashlib.sha256(secret.encode()).hexdigest()[:12]}"
    assert secret not in key and secret[:8] not in key
    assert limit_key("runware", "other-key") != key
    assert limit_key("fal", secret) != key
    assert limit_key("local", None) == limit_key("local", "") == "local:nokey"
    for bad in ["", "run ware", "a:b", "{x}", "x" * 65]:
        with pytest.raises(ValueError, match="provider"):
            limit_key(bad, secret)


def test_gcra_pure_step() -> None:
    first = gcra(None, now=10.0, interval_s=1.0, burst=2)
    assert first == (0.0, 11.0)
    second = gcra(first.tat, now=10.0, interval_s=1.0, burst=2)
    assert second == (0.0, 12.0)
    refused = gcra(second.tat, now=10.25, interval_s=1.0, burst=2)
    assert refused == (0.75, 12.0)
    assert gcra(second.tat, now=11.0, interval_s=1.0, burst=2) == (0.0, 13.0)
