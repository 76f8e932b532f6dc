"""Paid once even when a worker stalls (worker/hold.py), against the strict fakes.

First, step by step in one process, with a real Redis: a holder whose row was taken over
while it was not heard from (its lease made to lapse) comes back with its out-of-date
memory, and must neither submit, nor store a result, nor record a terminal state; a
holder whose lease may have lapsed does nothing until it has re-checked; a message for a
row taken over that way is adopted afresh.

Then the real thing: two real `celery -A worker worker` processes. One is frozen past
its lease (SIGSTOP, then SIGCONT: a paused VM, a throttled container), or its link to
Redis goes dark (a TCP proxy that stops forwarding, then resumes) while the provider
stays reachable; the other takes its rows over meanwhile. Each run asserts, from the
fake's own record, that every row was accepted (paid) exactly once; that every row
succeeded exactly once in the output manifest; and that no result object was written
twice (every row's output is a presigned-style URL on a recording server).
"""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from batching import png
from faults import provider, run_with_fault, wait_until
from producer.batch import SubmitOptions, Submitter, output_root
from producer.manifest import RowDefaults, read_manifest
from servers.fal import FakeFal
from servers.files import FileServer
from servers.runware import FakeRunware
from worker.engine import Engine
from worker.hold import Stale, Unsure
from worker.pipeline import Begun, Deps, LocalRows, advance, begin
from worker.providers import get_provider
from worker.runtime import build_deps
from worker.settings import Settings
from worker.state import BatchStore

KEY_RW = "rw-fencing-key"
KEY_FAL = "fal-id:fal-fencing-secret"


# -- step by step, in one process ------------------------------------------------------


class Clock:
    """A monotonic clock the test moves on (a process that was not running)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def fake_settings(
    name: str, redis_url: str, url: str, rest: str = "", **overrides: Any
) -> Settings:
    common: dict[str, Any] = {"redis_url": redis_url, "allow_private_urls": True, **overrides}
    if name == "runware":
        return Settings(**common, runware_api_key=KEY_RW, runware_api_url=url,
                        runware_poll_initial_s=0.05, runware_poll_max_s=0.1)  # fmt: skip
    return Settings(**common, fal_key=KEY_FAL, fal_queue_url=url, fal_rest_url=rest,
                    fal_poll_initial_s=0.05, fal_poll_max_s=0.1)  # fmt: skip


@contextmanager
def one_row(
    name: str,
    redis_url: str,
    files: FileServer,
    bid: str,
    settings: dict[str, Any] | None = None,
    **deps: Any,
) -> Iterator[tuple[Callable[[], int], Callable[[], Deps]]]:
    """A batch of one row on a fake provider; yields (paid count, a new process's deps)."""
    seed = files.add("/seed.png", png(), "image/png")
    out = files.url(f"/out/{bid}.img")
    fake: FakeRunware | FakeFal
    with ExitStack() as stack:
        if name == "runware":
            fake = stack.enter_context(FakeRunware(KEY_RW, processing_s=0.3))
            made_settings = fake_settings(name, redis_url, fake.url, **(settings or {}))
            paid: Callable[[], int] = lambda: len(fake.paid)  # type: ignore[union-attr]  # noqa: E731
        else:
            fake = stack.enter_context(FakeFal(KEY_FAL, queue_s=0.05, processing_s=0.3))
            made_settings = fake_settings(
                name, redis_url, fake.queue_url, fake.rest_url, **(settings or {})
            )
            paid = fake.submit_count  # type: ignore[union-attr]

        def process() -> Deps:
            made = build_deps(made_settings, lambda batch_id: None)
            for field_name, value in deps.items():
                setattr(made, field_name, value)
            made.local = LocalRows()  # as an engine has: the process's copy of its rows
            return made

        first = process()
        submitter = Submitter(
            first.store, lambda msgs: None, lambda p: get_provider(p, made_settings)
        )
        defaults = RowDefaults(provider=name, available_providers=frozenset({name}),
                               allow_private_urls=True)  # fmt: skip
        csv = f"id,image,prompt,output\nr0,{seed},p,{out}\n"
        options = SubmitOptions(batch_id=bid, output=output_root("/nowhere"), defaults=defaults)
        submitter.submit(read_manifest(io.BytesIO(csv.encode()), "csv", defaults), options)
        yield paid, process


def lapse(store: BatchStore, bid: str) -> None:
    """The holder's lease lapses (it was not heard from), and a watchdog claims the row."""
    store.redis.zadd(f"bgswap:{{{bid}}}:due", {"0": 0})
    assert store.claim_lapsed(bid, reclaim_s=60) == [0]


def run_out(deps: Deps, begun: Begun) -> None:
    """Step a held row until it is terminal (as the engine would, sleeping the waits)."""
    while (later := advance(begun.job, deps, begun.attempt, begun.hold)) is not None:
        time.sleep(later.seconds)


def taken(deps: Deps, bid: str) -> Begun:
    begun = begin(bid, 0, deps)
    assert begun is not None
    return begun


@pytest.mark.parametrize("name", ["runware", "fal"])
def test_a_holder_back_after_a_takeover_submits_nothing(
    redis_client: redis_lib.Redis, redis_url: str, name: str
) -> None:
    with FileServer() as files, one_row(name, redis_url, files, "f1") as (paid, process):
        stalled = process()
        held = taken(stalled, "f1")  # it holds the row, nothing submitted yet, and stalls
        lapse(stalled.store, "f1")
        other = process()
        run_out(other, taken(other, "f1"))  # the other worker submits and finishes it
        assert paid() == 1
        # Back, its in-process copy says "nothing submitted yet": it must not submit.
        with pytest.raises(Stale):
            advance(held.job, stalled, held.attempt, held.hold)
        assert paid() == 1
        puts = [r for r in files.requests if r.method == "PUT"]
    assert len(puts) == 1
    assert BatchStore(redis_client).counts("f1")["succeeded"] == 1


@pytest.mark.parametrize("name", ["runware", "fal"])
def test_a_holder_back_after_a_takeover_stores_and_records_nothing(
    redis_client: redis_lib.Redis, redis_url: str, name: str
) -> None:
    with FileServer() as files, one_row(name, redis_url, files, "f2") as (paid, process):
        stalled = process()
        held = taken(stalled, "f2")
        later = advance(held.job, stalled, held.attempt, held.hold)  # submitted, waiting
        assert later is not None and later.kind == "wait" and paid() == 1
        lapse(stalled.store, "f2")
        other = process()
        resumed = taken(other, "f2")
        time.sleep(1.0)  # the generation is done by now
        # Back: its request is complete at the provider, but the row is not its own.
        with pytest.raises(Stale):
            advance(held.job, stalled, held.attempt, held.hold)
        assert [r for r in files.requests if r.method == "PUT"] == []
        assert BatchStore(redis_client).counts("f2")["succeeded"] == 0
        run_out(other, resumed)  # the holder polls the same request: paid once
        assert paid() == 1
        puts = [r for r in files.requests if r.method == "PUT"]
    assert len(puts) == 1
    assert BatchStore(redis_client).counts("f2")["succeeded"] == 1


@pytest.mark.parametrize("name", ["runware", "fal"])
def test_a_holder_whose_lease_may_have_lapsed_acts_only_after_a_recheck(
    redis_client: redis_lib.Redis, redis_url: str, name: str
) -> None:
    clock = Clock()
    with (
        FileServer() as files,
        one_row(name, redis_url, files, "f3", clock=clock) as (
            paid,
            process,
        ),
    ):
        deps = process()
        held = taken(deps, "f3")
        clock.now += deps.settings.row_lease_s * 0.6  # not heard from for over half a lease
        with pytest.raises(Unsure):
            advance(held.job, deps, held.attempt, held.hold)
        assert paid() == 0
        store = deps.store
        beat = store.heartbeat("f3", [0], deps.token, deps.settings.row_lease_s)
        assert beat.renewed == {0}  # the re-check: still this process's
        held.hold.renewed(clock.now)
        run_out(deps, held)
        assert paid() == 1
    assert BatchStore(redis_client).counts("f3")["succeeded"] == 1


def test_a_redis_that_stalls_mid_step_fails_no_row(
    redis_client: redis_lib.Redis, redis_url: str
) -> None:
    """Redis holds the row's intent write past the client's timeout (CLIENT PAUSE WRITE),
    then answers again: the step stops, but the row is not failed as a bug of its own
    (job.internal_error), and the next step reads the memory afresh."""
    no_cap = {"runware_max_in_flight": None}
    with (
        FileServer() as files,
        one_row("runware", redis_url, files, "f5", no_cap) as (
            paid,
            process,
        ),
    ):
        deps = process()
        deps.store = BatchStore(
            redis_lib.Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.4)
        )
        held = taken(deps, "f5")
        redis_client.execute_command("CLIENT", "PAUSE", "600", "WRITE")
        with pytest.raises(redis_lib.RedisError):
            advance(held.job, deps, held.attempt, held.hold)
        time.sleep(0.7)
        store = BatchStore(redis_client)
        assert store.counts("f5")["failed"] == 0 and store.counts("f5")["running"] == 1
        assert paid() == 0  # nothing was sent after a write that may not have happened
        run_out(deps, held)
        assert paid() == 1
    assert BatchStore(redis_client).counts("f5")["succeeded"] == 1


def test_a_message_for_a_row_taken_over_is_adopted_afresh(
    redis_client: redis_lib.Redis, redis_url: str
) -> None:
    """A watchdog took the row over and re-published it; the message reaches the process
    that still has the row in memory. It must take the row again, not swallow the message
    as a duplicate (the row would sit queued until the stall sweep)."""
    with FileServer() as files, one_row("runware", redis_url, files, "f4") as (paid, process):
        deps = process()
        engine = Engine(deps, lambda b, i: None, threads=2, max_rows=10)
        try:
            assert engine.adopt("f4", 0, wait_s=5)
            wait_until(lambda: paid() == 1, 10, "the row submitted")
            first = deps.store.epoch("f4", 0)
            lapse(deps.store, "f4")
            assert engine.adopt("f4", 0, wait_s=5)  # the watchdog's message
            assert deps.store.epoch("f4", 0) == first + 2  # claimed, then taken again
            wait_until(lambda: deps.store.counts("f4")["succeeded"] == 1, 10, "done")
        finally:
            engine.close()
        assert paid() == 1  # taken again, it polled the same task


# -- real processes (the harness: tests/faults.py) -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigstop", "dark"])
@pytest.mark.parametrize("name", ["runware", "fal"])
def test_a_stalled_worker_pays_nothing_twice_and_overwrites_nothing(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, name: str, how: str
) -> None:
    rows = 40
    with FileServer() as files, provider(name) as paid:
        outcome = run_with_fault(tmp_path, redis_url, paid, how, files, rows)
    assert [x["id"] for x in outcome.lines] == [f"r{i}" for i in range(rows)]
    assert outcome.failed == []
    # Paid calls per row: 1.000. The fake's own record: one accepted request per row.
    assert Counter(outcome.prompts) == Counter(f"p{i}" for i in range(rows))
    assert len({x["provider_task_id"] for x in outcome.lines}) == rows
    # No result object was written twice: not by the stalled worker, not by anyone.
    assert outcome.puts == Counter(f"/out/r{i}.img" for i in range(rows))
    # The stalled worker held rows when it stopped, and let them go when it came back.
    log = outcome.stalled_log
    assert "was taken over by another worker" in log or "dropped row" in log, log[-3000:]
