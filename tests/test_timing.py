"""The poll schedule learned from recent generations (worker/providers/timing.py): the
policy on its own, the times kept in a real Redis and shared between processes, and a
Runware row polled on it against the strict fake."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import redis as redis_lib

from batching import png, submit_and_deliver
from producer.batch import SubmitOptions, Submitter, output_root
from producer.manifest import RowDefaults, read_manifest
from servers.files import FileServer
from servers.runware import FakeRunware
from worker.pipeline import Deps, handle_delivery
from worker.providers import get_provider
from worker.providers.base import DictMemory, ProviderContext, Wait
from worker.providers.polling import next_wait
from worker.providers.timing import (
    KEEP,
    MIN_SAMPLES,
    Expected,
    GenerationTimes,
    expected_from,
    learned_wait,
)
from worker.runtime import build_deps
from worker.settings import Settings

KEY = "rw-timing-key"
EIGHT = Expected(low_s=6.5, median_s=8.0, high_s=9.5, samples=200)


def test_too_few_samples_teach_nothing() -> None:
    assert expected_from([8.0] * (MIN_SAMPLES - 1)) is None
    found = expected_from([float(s) for s in range(1, 21)])
    assert found == Expected(low_s=3.0, median_s=11.0, high_s=19.0, samples=20)


def test_the_first_poll_comes_at_the_low_quantile_then_polls_are_close() -> None:
    # submitted just now: the first look when the fastest tenth are done
    assert learned_wait(EIGHT, 0.0, 1.0, 10.0, backoff_s=1.0) == pytest.approx(6.5)
    assert learned_wait(EIGHT, 2.0, 1.0, 10.0, backoff_s=1.5) == pytest.approx(4.5)
    # from then on, a twentieth of the typical time (0.4 s), however many polls so far
    assert learned_wait(EIGHT, 6.6, 1.0, 10.0, backoff_s=5.0) == pytest.approx(0.4)
    assert learned_wait(EIGHT, 12.0, 1.0, 10.0, backoff_s=10.0) == pytest.approx(0.4)
    # a straggler (past twice the high quantile) goes back to the backoff
    assert learned_wait(EIGHT, 19.5, 1.0, 10.0, backoff_s=10.0) == 10.0


def test_the_close_interval_has_a_floor_and_respects_the_configuration() -> None:
    fast = Expected(low_s=0.2, median_s=0.3, high_s=0.5, samples=50)
    assert learned_wait(fast, 0.25, 1.0, 10.0, backoff_s=1.0) == 0.25  # not 15 ms
    assert learned_wait(fast, 0.25, 0.05, 10.0, backoff_s=0.05) == pytest.approx(0.05)
    assert learned_wait(EIGHT, 7.0, 1.0, 0.3, backoff_s=0.3) == 0.3  # never past max_s


def test_a_wait_names_the_pace_of_the_polls_after_it() -> None:
    # The engine polls on at ``then_s`` while gathered polls say "not yet" (no step).
    def wait(memory: dict[str, object], expected: Expected | None, **close: float) -> Wait:
        ctx = ProviderContext(fetch=lambda ref, field: b"", max_image_pixels=1, memory=DictMemory())
        return next_wait(memory, ctx.memory, ctx, initial_s=1.0, max_s=10.0, timeout_s=600.0,
                         what="t", expected=expected, watch="w", **close)  # fmt: skip

    learned = wait({}, EIGHT)  # just submitted: first at the low quantile, then close
    assert learned.seconds == pytest.approx(6.5, abs=0.01) and learned.then_s == 0.4
    # Unlearned: every poll is a step, which takes up the schedule once there is one.
    plain = wait({"polls": 2, "waiting_since": time.time()}, None)
    assert (plain.seconds, plain.then_s) == (2.25, None)
    # Unless the provider names a close interval (cheap polls): close from the first on.
    cheap = wait({"polls": 2, "waiting_since": time.time()}, None, close_s=0.1)
    assert (cheap.seconds, cheap.then_s) == (2.25, 0.1)
    # A provider's own close interval, once due...
    shared = wait({}, EIGHT, close_s=0.1)
    assert shared.seconds == pytest.approx(6.5, abs=0.01) and shared.then_s == 0.1
    # ...and back off as any other past the stragglers' mark.
    late = wait({"polls": 9, "waiting_since": time.time() - 30}, EIGHT, close_s=0.1)
    assert (late.seconds, late.then_s) == (10.0, 10.0)


def test_times_are_kept_in_redis_per_provider_and_speed_and_shared(
    redis_client: redis_lib.Redis,
) -> None:
    now = [0.0]
    one = GenerationTimes(redis_client, clock=lambda: now[0])
    other = GenerationTimes(redis_client, clock=lambda: now[0])  # another process
    assert one.expected("runware", "TURBO") is None
    for n in range(KEEP + 50):
        one.record("runware", "TURBO", 2.0 + (n % 10) / 10)
    one.record("fal", None, 30.0)
    assert redis_client.llen("bgswap:gen:runware:TURBO") == KEEP  # the last KEEP only
    seen = other.expected("runware", "TURBO")
    assert seen is not None and seen.samples == KEEP
    assert seen.low_s == pytest.approx(2.1) and seen.high_s == pytest.approx(2.9)
    assert other.expected("runware", "QUALITY") is None  # speeds apart
    assert other.expected("fal", None) is None  # one sample is not enough
    for _ in range(KEEP):
        one.record("runware", "TURBO", 9.0)
    assert other.expected("runware", "TURBO") == seen  # its copy, for REFRESH_S
    now[0] += 16.0
    changed = other.expected("runware", "TURBO")
    assert changed is not None and changed.median_s == 9.0


def test_too_few_times_are_looked_at_again_within_a_second(
    redis_client: redis_lib.Redis,
) -> None:
    # A new deployment learns in its first minute, not after REFRESH_S per process.
    now = [0.0]
    times = GenerationTimes(redis_client, clock=lambda: now[0])
    assert times.expected("fal", None) is None
    for _ in range(MIN_SAMPLES):
        times.record("fal", None, 12.0)
    assert times.expected("fal", None) is None  # its copy, for a second
    now[0] += 1.5
    learned = times.expected("fal", None)
    assert learned is not None and learned.median_s == 12.0


def test_a_runware_row_is_first_polled_when_recent_results_were_ready(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path
) -> None:
    with FileServer() as files, FakeRunware(KEY, processing_s=0.3) as fake:
        url = files.add("/s.png", png(), "image/png")
        settings = Settings(
            redis_url=redis_url,
            runware_api_key=KEY,
            runware_api_url=fake.url,
            allow_private_urls=True,
        )  # fmt: skip (default polls: 1 s, x1.5)
        rows = "".join(f"r{i},{url},p\n" for i in range(MIN_SAMPLES))
        submit_and_deliver(settings, "runware", "id,image,prompt\n" + rows, tmp_path, "t1")
        # each result was there at its first poll, 1 s after the submit: counted at 0.9 s
        learned = GenerationTimes(redis_client).expected("runware", None)
        assert learned is not None and learned.samples == MIN_SAMPLES
        assert learned.low_s == pytest.approx(0.9, abs=0.1)
        deps = build_deps(settings, lambda bid: None)  # another process: it reads Redis
        submit_rows(deps, url, tmp_path, "t2")
        wait = handle_delivery("t2", 0, deps)  # the submit; then the wait before a poll
        assert wait is not None and wait == pytest.approx(learned.low_s, abs=0.1)
        assert wait < 0.97  # not the configured first poll (1 s)
        assert len(fake.paid) == MIN_SAMPLES + 1


def submit_rows(deps: Deps, url: str, out: Path, bid: str) -> None:
    submitter = Submitter(deps.store, lambda msgs: None,
                          lambda name: get_provider(name, deps.settings))  # fmt: skip
    defaults = RowDefaults(provider="runware", available_providers=frozenset({"runware"}),
                           base_dir=out, allow_private_urls=True)  # fmt: skip
    options = SubmitOptions(batch_id=bid, output=output_root(str(out)), defaults=defaults)
    manifest = io.BytesIO(f"id,image,prompt\nq0,{url},p\n".encode())
    submitter.submit(read_manifest(manifest, "csv", defaults), options)
