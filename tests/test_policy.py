"""Retry policy: pure functions, clock and randomness passed in."""

from __future__ import annotations

import pytest

from worker.errors import ImageRejected, SourceUnavailable
from worker.policy import compute_backoff, retry_delay


def test_backoff_grows_exponentially_and_is_capped() -> None:
    top = [compute_backoff(a, base_s=1.0, cap_s=30.0, rand=lambda: 1.0) for a in range(1, 8)]
    assert top == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_backoff_uses_full_jitter() -> None:
    assert compute_backoff(4, base_s=1.0, cap_s=30.0, rand=lambda: 0.25) == 2.0
    assert compute_backoff(4, base_s=1.0, cap_s=30.0, rand=lambda: 0.0) == 0.0


KW = dict(max_attempts=3, base_s=1.0, cap_s=30.0, max_countdown_s=900.0, rand=lambda: 0.5)


def test_permanent_errors_are_never_retried() -> None:
    assert retry_delay(ImageRejected("image.unreadable", "x"), 1, **KW) is None  # type: ignore[arg-type]


def test_retryable_errors_stop_at_max_attempts() -> None:
    err = SourceUnavailable("source.unavailable", "x")
    assert retry_delay(err, 1, **KW) == 0.5  # type: ignore[arg-type]
    assert retry_delay(err, 2, **KW) == 1.0  # type: ignore[arg-type]
    assert retry_delay(err, 3, **KW) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("retry_after", "expected"), [(10.0, 10.0), (0.1, 0.5), (5000.0, 900.0)])
def test_retry_after_is_a_floor_but_never_beyond_the_visibility_window(
    retry_after: float, expected: float
) -> None:
    err = SourceUnavailable("source.unavailable", "x", retry_after_s=retry_after)
    assert retry_delay(err, 1, **KW) == expected  # type: ignore[arg-type]
