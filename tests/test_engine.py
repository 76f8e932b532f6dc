"""The worker's engine (worker/engine.py) on a real Redis against the strict fake Runware:
rows held between steps without a thread each, the admission line under an in-flight cap,
the hand-back at shutdown, and rows taken over by another process."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from batching import png
from producer.batch import SubmitOptions, Submitter, output_root
from producer.manifest import RowDefaults, read_manifest
from servers.files import FileServer
from servers.runware import FakeRunware
from worker.engine import Engine
from worker.pipeline import Deps
from worker.providers import get_provider
from worker.runtime import build_deps
from worker.settings import Settings
from worker.state import BatchStore, StartVerdict

KEY = "rw-engine-key"


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def make_deps(redis_url: str, fake: FakeRunware, **overrides: object) -> Deps:
    settings = Settings(
        redis_url=redis_url, runware_api_key=KEY, runware_api_url=fake.url,
        allow_private_urls=True, runware_poll_initial_s=0.1, runware_poll_max_s=0.2,
        **overrides,  # type: ignore[arg-type]
    )  # fmt: skip
    return build_deps(settings, lambda batch_id: None)


def submit(deps: Deps, rows: int, url: str, out: Path, bid: str, provider: str = "runware") -> None:
    settings = deps.settings
    submitter = Submitter(deps.store, lambda msgs: None, lambda name: get_provider(name, settings))
    defaults = RowDefaults(provider=provider, available_providers=frozenset({provider}),
                           base_dir=out, allow_private_urls=True)  # fmt: skip
    csv = "id,image,prompt\n" + "".join(f"r{i},{url},p\n" for i in range(rows))
    options = SubmitOptions(batch_id=bid, output=output_root(str(out)), defaults=defaults)
    submitter.submit(read_manifest(io.BytesIO(csv.encode()), "csv", defaults), options)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.02)


def test_two_threads_keep_twenty_generations_in_flight(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    with FakeRunware(KEY, processing_s=3.0) as fake:
        deps = make_deps(redis_url, fake)
        submit(deps, 20, url, tmp_path, "many")
        engine = Engine(deps, lambda b, i: None, threads=2, max_rows=100)
        try:
            for index in range(20):
                assert engine.adopt("many", index, wait_s=5)
            wait_for(lambda: len(fake.paid) == 20, 10, "20 tasks accepted")
            # 20 generations in flight at once on 2 threads: no thread waits on one
            assert deps.store.counts("many")["succeeded"] == 0
            assert engine.held() == 20
            wait_for(lambda: deps.store.counts("many")["succeeded"] == 20, 20, "all done")
        finally:
            engine.close()
        assert engine.held() == 0
    assert sorted(fake.paid) == sorted(set(fake.paid))  # each paid once


def test_the_polls_of_rows_due_together_share_requests_off_the_step_threads(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    with FakeRunware(KEY, processing_s=1.0) as fake:
        deps = make_deps(redis_url, fake)
        submit(deps, 30, url, tmp_path, "gathered")
        # One step thread: were each poll its own request on it, 30 rows polled every
        # 0.1-0.2 s would keep it busy; gathered, a round is one request for all.
        engine = Engine(deps, lambda b, i: None, threads=1, max_rows=100)
        try:
            for index in range(30):
                assert engine.adopt("gathered", index, wait_s=5)
            wait_for(lambda: deps.store.counts("gathered")["succeeded"] == 30, 30, "all done")
        finally:
            engine.close()
        with fake.lock:
            polls = [c.body for c in fake.requests if isinstance(c.body, list)
                     and c.body and c.body[0].get("taskType") == "getResponse"]  # fmt: skip
    polled = sum(len(tasks) for tasks in polls)
    assert polled >= 30  # every row was polled at least once
    assert len(polls) * 3 <= polled  # at least three rows a request, on average
    assert max(len(tasks) for tasks in polls) >= 10
    assert sorted(fake.paid) == sorted(set(fake.paid)) and len(fake.paid) == 30


def test_a_gathered_poll_that_says_not_yet_gives_its_row_no_step(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    # A step would only count the poll (a Redis write) and set the next one: the engine
    # polls on by itself, and the result's time is still learned from the last "not yet".
    url = files.add("/s.png", png(), "image/png")
    # Recent generations took 4 s: polls from 4 s on, 0.1 s apart (Runware's shared ones).
    redis_client.lpush("bgswap:gen:runware:default", *["4.0"] * 5)
    with FakeRunware(KEY, processing_s=6.0) as fake:
        deps = make_deps(redis_url, fake)
        submit(deps, 1, url, tmp_path, "quiet")
        engine = Engine(deps, lambda b, i: None, threads=2, max_rows=10)
        try:
            assert engine.adopt("quiet", 0, wait_s=5)
            wait_for(lambda: len(fake.paid) == 1, 10, "accepted")
            time.sleep(5.5)  # still generating
            memory = json.loads(redis_client.hget("bgswap:{quiet}:provider", "0") or "{}")
            with fake.lock:
                polls = sum(1 for c in fake.requests if isinstance(c.body, list)
                            and any(t.get("taskType") == "getResponse" for t in c.body))  # fmt: skip
            wait_for(lambda: deps.store.counts("quiet")["succeeded"] == 1, 10, "done")
        finally:
            engine.close()
    assert polls >= 10  # polled every 0.1 s from 4 s on...
    assert memory["polls"] <= 2  # ...with a step for the first poll only
    learned = redis_client.lindex("bgswap:gen:runware:default", 0)
    assert learned is not None and redis_client.llen("bgswap:gen:runware:default") == 6
    # The middle between the last "not yet" and the done (with no step's record of a
    # "not yet", it would be 0.9 x the time seen: 0.6 s early).
    assert abs(float(learned) - 6.0) < 0.35


def test_the_admission_line_keeps_the_cap_and_moves_when_slots_free(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    with FakeRunware(KEY, processing_s=0.3) as fake:
        deps = make_deps(redis_url, fake, runware_max_in_flight=3)
        limits = deps.limits("runware")
        assert limits is not None
        submit(deps, 12, url, tmp_path, "line")
        engine = Engine(deps, lambda b, i: None, threads=4, max_rows=100)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.01):
                in_use = limits.loop.run(limits.backends.slots.in_use(limits.key))
                peak = max(peak, in_use)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            for index in range(12):
                assert engine.adopt("line", index, wait_s=5)
            wait_for(lambda: deps.store.counts("line")["succeeded"] == 12, 30, "all done")
        finally:
            stop.set()
            sampler.join()
            engine.close()
    assert peak == 3  # the cap was used, never exceeded
    assert len(fake.paid) == 12
    assert all(r.attempts == 1 for r in deps.store.records("line", 12))  # waits: no attempt


def test_a_slot_is_free_once_the_provider_is_done_not_once_the_result_is_stored(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    # The cap counts the provider's generations: the next row goes while this one's
    # result is still downloading (a slow CDN here), and at once, not at its next look.
    url = files.add("/s.png", png(), "image/png")
    with FakeRunware(KEY, processing_s=0.3, download_delay_s=3.0) as fake:
        deps = make_deps(redis_url, fake, runware_max_in_flight=1)
        submit(deps, 2, url, tmp_path, "early")
        engine = Engine(deps, lambda b, i: None, threads=4, max_rows=10)
        try:
            for index in range(2):
                assert engine.adopt("early", index, wait_s=5)
            wait_for(lambda: len(fake.tasks("imageInference")) == 2, 10, "the second submit")
            assert deps.store.counts("early")["succeeded"] == 0  # row 0 is still downloading
            with fake.lock:
                download = next(c.at for c in fake.requests if c.path.startswith("/images/"))
                second = [c.at for c in fake.requests if isinstance(c.body, list) and c.body
                          and c.body[0].get("taskType") == "imageInference"][-1]  # fmt: skip
            # Freed in row 0's step, heard by the admission line then (its own next look
            # would come a second after the refusal, while the download takes three).
            assert second - download < 0.5
            wait_for(lambda: deps.store.counts("early")["succeeded"] == 2, 20, "both done")
        finally:
            engine.close()
    assert len(fake.paid) == 2


def test_close_hands_every_held_row_back_to_the_queue(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    with FakeRunware(KEY, processing_s=30.0) as fake:
        deps = make_deps(redis_url, fake)
        submit(deps, 3, url, tmp_path, "back")
        republished: list[tuple[str, int]] = []
        engine = Engine(deps, lambda b, i: republished.append((b, i)), threads=2, max_rows=10)
        for index in range(3):
            assert engine.adopt("back", index, wait_s=5)
        wait_for(lambda: len(fake.paid) == 3, 10, "3 tasks accepted")
        assert engine.close() == 3
        assert sorted(republished) == [("back", 0), ("back", 1), ("back", 2)]
        assert deps.store.counts("back")["queued"] == 3
        assert not engine.adopt("back", 0, wait_s=0.1)  # closed: takes nothing more
        # another process takes them at once (no lease left to lapse) and resumes polling
        other = make_deps(redis_url, fake)
        taken = other.store.adopt("back", 0, "t", other.token, 60)
        assert taken.verdict is StartVerdict.RUN
        assert json.loads(taken.memory)["task_uuid"] in fake.paid


def test_a_row_taken_over_by_another_process_is_dropped(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    with FakeRunware(KEY, processing_s=30.0) as fake:
        deps = make_deps(redis_url, fake)
        submit(deps, 1, url, tmp_path, "lost")
        engine = Engine(deps, lambda b, i: None, threads=1, max_rows=10)
        try:
            assert engine.adopt("lost", 0, wait_s=5)
            wait_for(lambda: len(fake.paid) == 1, 10, "accepted")
            assert engine.beat() == 0
            # This process was presumed dead: a watchdog released the row, another took it.
            store = BatchStore(deps.store.redis)
            assert store.release("lost", 0, store.epoch("lost", 0))
            assert store.adopt("lost", 0, "t", "another-process", 60).verdict is StartVerdict.RUN
            assert engine.beat() == 1
            wait_for(lambda: engine.held() == 0, 5, "the row dropped at its next step")
        finally:
            engine.close()
        assert store.counts("lost")["running"] == 1  # still the other process's
        assert len(fake.paid) == 1


def test_a_resumed_row_does_not_wait_behind_rows_that_need_its_slot(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    """Cap 1: row 0 was submitted by a process that is gone (its slot still leased to the
    row), row 1 waits in the admission line for that slot. Row 0, taken over, must poll
    at once: behind row 1 it would wait for its own slot's lease to lapse (minutes)."""
    from worker.pipeline import handle_delivery

    url = files.add("/s.png", png(), "image/png")
    with FakeRunware(KEY, processing_s=0.5) as fake:
        deps = make_deps(redis_url, fake, runware_max_in_flight=1)
        submit(deps, 2, url, tmp_path, "resume")
        assert handle_delivery("resume", 0, deps) is not None  # submitted, slot held, queued
        assert len(fake.paid) == 1
        engine = Engine(deps, lambda b, i: None, threads=2, max_rows=10)
        try:
            assert engine.adopt("resume", 1, wait_s=5)  # refused a slot: into the line
            wait_for(lambda: engine.waiting("runware") == 1, 5, "row 1 in line")
            assert engine.adopt("resume", 0, wait_s=5)
            wait_for(lambda: deps.store.counts("resume")["succeeded"] == 2, 15, "both done")
        finally:
            engine.close()
    assert len(fake.paid) == 2 and len(set(fake.paid)) == 2
