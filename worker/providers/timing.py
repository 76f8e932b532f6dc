"""When to poll: learned from how long the provider has recently taken.

A row holds its in-flight slot until the poll that finds its result. On a fixed schedule
(1 s, then x1.5) a 2 s generation is seen at 2.5 s and an 8 s one at up to 10.4 s: the
account is paid for, and capped on, time in which nothing happens. So every result a poll
finds records when it was ready (estimated from the polls around it:
worker/providers/polling.py, ``generated``) in Redis, per provider and rendering speed,
the last ``KEEP`` of them, shared by every worker; each process reads them at most every
``REFRESH_S`` seconds (every second while there are too few to learn from).

The policy (``learned_wait``, pure): with at least ``MIN_SAMPLES`` times known, the first
poll comes at their low quantile (few results are ready earlier), then polls follow
each other at a short interval (a twentieth of the typical time, never under a quarter
of a second nor under the configured first poll when that is smaller; or the provider's
own, when the engine polls its rows without steps: Runware's and fal's ``CLOSE_POLL_S``),
until the row has
waited twice the high quantile: past that it is a straggler and the usual backoff
takes over. With fewer samples, the configured schedule (worker/providers/polling.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

KEY = "bgswap:gen:{provider}:{speed}"
KEEP = 200
MIN_SAMPLES = 5
REFRESH_S = 15.0
UNLEARNED_REFRESH_S = 1.0  # too few samples yet: they come fast at a batch's start
SHORT_FRACTION = 0.05
SHORT_FLOOR_S = 0.25


@dataclass(frozen=True)
class Expected:
    """What recent generations took, in seconds."""

    low_s: float  # the 10th percentile
    median_s: float
    high_s: float  # the 90th percentile
    samples: int


def expected_from(seconds: Sequence[float]) -> Expected | None:
    if len(seconds) < MIN_SAMPLES:
        return None
    ordered = sorted(seconds)
    n = len(ordered)
    return Expected(ordered[n // 10], ordered[n // 2], ordered[(n * 9) // 10], n)


def learned_wait(
    expected: Expected, waited_s: float, initial_s: float, max_s: float, backoff_s: float,
    short_s: float | None = None,
) -> float:  # fmt: skip
    """Seconds until the next poll of a row that has waited ``waited_s`` since its
    provider accepted it; ``backoff_s`` is what the configured schedule would wait;
    ``short_s``, the provider's own close interval, if it has one."""
    if waited_s < expected.low_s:
        return expected.low_s - waited_s
    if waited_s > 2 * expected.high_s:
        return backoff_s
    if short_s is None:
        short_s = max(SHORT_FRACTION * expected.median_s, min(SHORT_FLOOR_S, initial_s))
    return min(max_s, short_s)


class GenerationTimes:
    """The recent generation times of each provider and speed, in Redis."""

    def __init__(self, client: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Expected | None]] = {}

    def record(self, provider: str, speed: str | None, seconds: float) -> None:
        key = KEY.format(provider=provider, speed=speed or "default")
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(key, f"{seconds:.3f}")
        pipe.ltrim(key, 0, KEEP - 1)
        pipe.execute()

    def expected(self, provider: str, speed: str | None) -> Expected | None:
        """From this process's copy, read again from Redis every ``REFRESH_S``."""
        key = KEY.format(provider=provider, speed=speed or "default")
        now = self.clock()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                fresh_s = REFRESH_S if cached[1] is not None else UNLEARNED_REFRESH_S
                if now - cached[0] < fresh_s:
                    return cached[1]
        raw = self.client.lrange(key, 0, KEEP - 1)
        found = expected_from([float(x) for x in raw])
        with self._lock:
            self._cache[key] = (now, found)
        return found
