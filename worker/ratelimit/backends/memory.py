"""In-process rate limits: the same semantics as the Redis backend, for tests and a
one-process run. Limits are only shared inside this process.

Each method does its work without awaiting, so under asyncio it is atomic; the lock
is there for callers that also use threads (a thread-pool worker, say). The clock is
injectable so tests can jump time instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from worker.ratelimit import (
    Rate,
    check_burst,
    check_duration,
    check_lease,
    compound_penalty,
    gcra,
)

Clock = Callable[[], float]


class _Expiring:
    """A dict whose values vanish at their deadline, like Redis keys with a TTL."""

    def __init__(self, now: Clock) -> None:
        self._now = now
        self._items: dict[str, tuple[float, float | str]] = {}

    def get(self, key: str) -> float | str | None:
        item = self._items.get(key)
        if item is None:
            return None
        deadline, value = item
        if deadline <= self._now():
            del self._items[key]  # idle keys cost nothing, as with a Redis TTL
            return None
        return value

    def set(self, key: str, value: float | str, ttl_s: float) -> None:
        self._items[key] = (self._now() + ttl_s, value)


class MemoryRateLimiter:
    """GCRA per key in a dict; see ``worker.ratelimit.gcra``."""

    def __init__(self, now: Clock = time.monotonic) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._tat = _Expiring(now)
        self._penalty = _Expiring(now)

    async def acquire(self, key: str, rate: Rate, burst: int = 1) -> float:
        check_burst(burst)
        with self._lock:
            now = self._now()
            interval_s = rate.emission_interval_s / self._factor(key)
            stored = self._tat.get(key)
            decision = gcra(float(stored) if stored is not None else None, now, interval_s, burst)
            if decision.wait_s > 0:
                return decision.wait_s
            self._tat.set(key, decision.tat, decision.tat - now)
            return 0.0

    async def slow_down(self, key: str, factor: float, for_s: float) -> None:
        check_duration(for_s, "for_s")
        with self._lock:
            self._penalty.set(key, compound_penalty(self._factor(key), factor), for_s)

    def _factor(self, key: str) -> float:
        value = self._penalty.get(key)
        return 1.0 if value is None else float(value)


class MemorySemaphore:
    """Leases per key as holder -> expiry; expired leases are dropped on every call."""

    def __init__(self, now: Clock = time.monotonic) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._leases: dict[str, dict[str, float]] = {}

    async def try_acquire(self, key: str, holder: str, limit: int, lease_s: float) -> bool:
        check_lease(limit, lease_s)
        with self._lock:
            now = self._now()
            leases = self._live(key, now)
            if holder not in leases and len(leases) >= limit:
                return False
            leases[holder] = now + lease_s
            self._leases[key] = leases
            return True

    async def refresh(self, key: str, holder: str, lease_s: float) -> bool:
        check_duration(lease_s, "lease_s")
        with self._lock:
            now = self._now()
            leases = self._live(key, now)
            if holder not in leases:
                return False
            leases[holder] = now + lease_s
            return True

    async def release(self, key: str, holder: str) -> bool:
        with self._lock:
            return self._leases.get(key, {}).pop(holder, None) is not None

    async def in_use(self, key: str) -> int:
        with self._lock:
            return len(self._live(key, self._now()))

    def _live(self, key: str, now: float) -> dict[str, float]:
        leases = {h: exp for h, exp in self._leases.get(key, {}).items() if exp > now}
        if leases:
            self._leases[key] = leases
        else:
            self._leases.pop(key, None)
        return leases


class MemoryCircuitBreaker:
    """Open circuits as reasons with a deadline."""

    def __init__(self, now: Clock = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._open = _Expiring(now)

    async def trip(self, key: str, for_s: float, reason: str) -> None:
        check_duration(for_s, "for_s")
        with self._lock:
            self._open.set(key, reason, for_s)

    async def reason(self, key: str) -> str | None:
        with self._lock:
            value = self._open.get(key)
            return None if value is None else str(value)
