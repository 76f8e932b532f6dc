"""The realistic-account benchmark's figure (bench/account.py) on hand-made intervals."""

from __future__ import annotations

import pytest

from bench.account import busy_share, first_full, steady_window


def test_a_full_account_is_one() -> None:
    intervals = [(0.0, 10.0), (0.0, 10.0)]
    assert busy_share(intervals, 2, 2.0, 8.0) == pytest.approx(1.0)


def test_gaps_count_against_the_cap() -> None:
    # cap 2: one slot always busy, the other busy 0-4 and 5-10 (a 1 s gap)
    intervals = [(0.0, 10.0), (0.0, 4.0), (5.0, 10.0)]
    assert busy_share(intervals, 2, 0.0, 10.0) == pytest.approx(19 / 20)


def test_more_than_the_cap_counts_as_the_cap() -> None:
    intervals = [(0.0, 10.0)] * 3 + [(0.0, 5.0)]
    assert busy_share(intervals, 2, 0.0, 10.0) == pytest.approx(1.0)
    assert busy_share(intervals, 5, 0.0, 10.0) == pytest.approx((3 * 10 + 5) / 50)


def test_intervals_are_clipped_to_the_window() -> None:
    intervals = [(-5.0, 3.0), (7.0, 20.0)]
    assert busy_share(intervals, 1, 0.0, 10.0) == pytest.approx(6 / 10)


def test_a_task_ending_as_another_starts_is_not_counted_twice() -> None:
    intervals = [(0.0, 5.0), (5.0, 10.0), (0.0, 10.0)]
    assert first_full(intervals, 3) is None
    assert busy_share(intervals, 2, 0.0, 10.0) == pytest.approx(1.0)


def test_an_empty_window_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        busy_share([(0.0, 1.0)], 1, 2.0, 2.0)


def test_the_window_starts_when_the_cap_is_first_reached() -> None:
    # starts at 0, 1, ..., 19, each 3.5 s long: 4 overlap first at 3 (0, 1, 2, 3)
    intervals = [(float(n), n + 3.5) for n in range(20)]
    assert first_full(intervals, 4) == 3.0
    assert steady_window(intervals, 4) == (3.0, 18.0)  # to the 90th percentile of starts


def test_the_window_falls_back_to_the_10th_percentile() -> None:
    intervals = [(float(n), n + 0.5) for n in range(20)]  # never 2 at once
    assert first_full(intervals, 2) is None
    assert steady_window(intervals, 2) == (2.0, 18.0)
