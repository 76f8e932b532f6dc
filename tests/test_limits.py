"""Global provider limits wired into the jobs (worker/limits.py): in-flight cap, rate,
429 slow-down and the account circuit, on the real Redis with the fake providers."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis as redis_lib
from prometheus_client import REGISTRY

from batching import png
from producer.batch import SubmitOptions, Submitter, output_root
from producer.manifest import RowDefaults, read_manifest
from servers.fal import FakeFal
from servers.files import FileServer
from servers.runware import FakeRunware
from worker.limits import RATE_BURST, Deferred, in_flight
from worker.pipeline import Deps, handle_delivery
from worker.providers import get_provider
from worker.runtime import build_deps, limits_factory
from worker.settings import Settings

RW_KEY = "rw-limits-key"
FAL_KEY = "fal-id:fal-limits-secret"


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def counted(name: str, **labels: str) -> float:
    """A metric of this process (worker/metrics.py), 0 before its first count."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def submit(deps: Deps, provider: str, rows: int, url: str, out: Path, bid: str) -> None:
    settings = deps.settings
    submitter = Submitter(deps.store, lambda msgs: None, lambda name: get_provider(name, settings))
    defaults = RowDefaults(provider=provider, available_providers=frozenset({provider}),
                           base_dir=out, allow_private_urls=True)  # fmt: skip
    csv = "id,image,prompt\n" + "".join(f"r{i},{url},p\n" for i in range(rows))
    options = SubmitOptions(batch_id=bid, output=output_root(str(out)), defaults=defaults)
    submitter.submit(read_manifest(io.BytesIO(csv.encode()), "csv", defaults), options)


def deliver_all(deps: Deps, bid: str, rows: int) -> list[float | None]:
    with ThreadPoolExecutor(rows) as pool:
        return list(pool.map(lambda i: handle_delivery(bid, i, deps), range(rows)))


def test_the_in_flight_cap_defers_rows_without_counting_attempts(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    with FakeFal(FAL_KEY, queue_s=0.05, processing_s=1.0) as fake:
        settings = Settings(redis_url=redis_url, fal_key=FAL_KEY, fal_queue_url=fake.queue_url,
                            fal_rest_url=fake.rest_url, allow_private_urls=True,
                            fal_poll_initial_s=0.05, fal_max_in_flight=1)  # fmt: skip
        deps = build_deps(settings, lambda bid: None)
        submit(deps, "fal", 3, url, tmp_path, "cap")
        refused = counted("bgswap_admission_waits_total", provider="fal", reason="slots")
        waited = counted("bgswap_admission_wait_seconds_count", provider="fal")
        delays = deliver_all(deps, "cap", 3)
        assert fake.submit_count() == 1  # one request in flight at a time
        after = counted("bgswap_admission_waits_total", provider="fal", reason="slots")
        assert after - refused == 2
        assert ("fal", 1.0, 1.0) in in_flight(settings, redis_client)  # what /metrics reads
        assert all(d is not None and 0 < d < 5 for d in delays)  # one polls, two wait a slot
        assert deps.store.counts("cap")["queued"] == 3
        assert [r.attempts for r in deps.store.records("cap", 3)] == [
            0,
            0,
            0,
        ]  # waits are not attempts
        deliver_all(deps, "cap", 3)  # row 0 still generating: nobody else may submit
        assert fake.submit_count() == 1
        deadline = time.monotonic() + 30
        while deps.store.counts("cap")["succeeded"] < 3 and time.monotonic() < deadline:
            for index in sorted(deps.store.indices_in_state("cap", "queued")):
                handle_delivery("cap", index, deps)
            time.sleep(0.05)
        assert deps.store.counts("cap")["succeeded"] == 3 and fake.submit_count() == 3
        # the two rows that waited were admitted in the end, each timed once
        assert counted("bgswap_admission_wait_seconds_count", provider="fal") - waited == 2
        assert ("fal", 0.0, 1.0) in in_flight(settings, redis_client)


def test_the_rate_limit_spaces_submissions_across_the_fleet(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    with FakeRunware(RW_KEY, processing_s=0.05) as fake:
        settings = Settings(redis_url=redis_url, runware_api_key=RW_KEY, runware_api_url=fake.url,
                            allow_private_urls=True, runware_poll_initial_s=0.05,
                            runware_rate="2/s")  # fmt: skip
        deps = build_deps(settings, lambda bid: None)
        # Another worker process (a second Deps) shares the same limiter through Redis;
        # built first, as building it can take longer than the half second a token lasts.
        other = build_deps(settings, lambda bid: None)
        limits = other.limits("runware")
        submit(deps, "runware", 3, url, tmp_path, "rate")
        refused = counted("bgswap_admission_waits_total", provider="runware", reason="rate")
        delays = deliver_all(deps, "rate", 3)
        assert counted("bgswap_admission_waits_total", provider="runware", reason="rate") > refused
        assert len(fake.paid) == RATE_BURST == 2  # the burst goes, the third waits its token
        waits = sorted(d for d in delays if d is not None and d > 0.2)
        assert len(waits) == 1 and all(w < 1.0 for w in waits)
        assert limits is not None
        assert isinstance(limits.admit("someone-else"), Deferred)


def test_a_429_slows_the_account_down(redis_client: redis_lib.Redis, redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, runware_api_key=RW_KEY, runware_rate="10/s")
    limits = build_deps(settings, lambda bid: None).limits("runware")
    assert limits is not None and limits.rate is not None
    rates, key, rate = limits.backends.rates, limits.key, limits.rate
    limits.loop.run(rates.acquire(key, rate))
    normal = limits.loop.run(rates.acquire(key, rate))  # the next slot: 1/10 s away
    limits.slow_down()
    time.sleep(normal + 0.01)
    assert limits.loop.run(rates.acquire(key, rate)) == 0.0
    slowed = limits.loop.run(rates.acquire(key, rate))  # spaced at half the rate now
    assert 0.05 < normal <= 0.1 and 0.15 < slowed <= 0.2


def test_an_auth_error_opens_the_circuit_for_every_batch_on_the_account(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    with FakeRunware("the-right-key") as fake:
        settings = Settings(redis_url=redis_url, runware_api_key=RW_KEY, runware_api_url=fake.url,
                            allow_private_urls=True)  # fmt: skip
        deps = build_deps(settings, lambda bid: None)
        submit(deps, "runware", 1, url, tmp_path, "a1")
        submit(deps, "runware", 2, url, tmp_path, "a2")
        opened = counted("bgswap_circuit_openings_total", provider="runware")
        handle_delivery("a1", 0, deps)
        handle_delivery("a2", 0, deps)
        handle_delivery("a2", 1, deps)
        assert len(fake.requests) == 1  # batch a2 never reached Runware
        assert counted("bgswap_circuit_openings_total", provider="runware") - opened == 1
    errors = [r.result["error"] for r in deps.store.records("a2", 2) if r.result]
    assert {e["code"] for e in errors} == {"provider.halted"}
    assert "circuit open" in errors[0]["message"] and "invalidApiKey" in errors[0]["message"]


def zrems(client: redis_lib.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_zrem", {}).get("calls", 0))


def test_a_slot_freed_once_is_not_freed_again_but_one_taken_over_is(
    redis_client: redis_lib.Redis, redis_url: str
) -> None:
    settings = Settings(redis_url=redis_url, runware_api_key=RW_KEY, runware_max_in_flight=5)
    here = limits_factory(settings)("runware")
    elsewhere = limits_factory(settings)("runware")  # another process's, on the same account
    assert here is not None and elsewhere is not None
    assert here.admit("b:0") is None
    before = zrems(redis_client)
    here.release("b:0")  # the provider is done with it
    here.release("b:0")  # the row ends: known to be nothing
    assert zrems(redis_client) - before == 1
    assert here.admit("b:0") is None  # a retry takes a slot again: freed again at its end
    here.release("b:0")
    assert zrems(redis_client) - before == 2
    # A row another process took a slot for (and died): this one frees it all the same.
    assert elsewhere.admit("b:1") is None
    assert ("runware", 1.0, 5.0) in in_flight(settings, redis_client)
    here.release("b:1")
    assert ("runware", 0.0, 5.0) in in_flight(settings, redis_client)
