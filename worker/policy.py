"""Retry policy as pure functions: clock and randomness are passed in."""

from __future__ import annotations

from collections.abc import Callable

from worker.errors import BgswapError


def compute_backoff(
    attempt: int, *, base_s: float, cap_s: float, rand: Callable[[], float]
) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1))).

    Full jitter spreads a burst of failures (a provider's 503 storm) over the whole
    window instead of re-synchronising every worker on the same instants.
    """
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return float(rand() * ceiling)


def retry_delay(
    error: BgswapError,
    attempt: int,
    *,
    max_attempts: int,
    base_s: float,
    cap_s: float,
    max_countdown_s: float,
    rand: Callable[[], float],
) -> float | None:
    """Seconds until the next attempt, or None when the row must fail now.

    Retry-After is honoured as a floor. Everything is clamped to ``max_countdown_s``
    (through the queue: a Celery countdown longer than the broker's visibility timeout
    gets the message redelivered while it waits, i.e. duplicated).
    """
    if not error.retryable or attempt >= max_attempts:
        return None
    delay = compute_backoff(attempt, base_s=base_s, cap_s=cap_s, rand=rand)
    if error.retry_after_s is not None:
        delay = max(delay, error.retry_after_s)
    return min(delay, max_countdown_s)
