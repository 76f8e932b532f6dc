"""`celery -A worker beat` for real: schedules fire from the file, the rows run on a real
worker subprocess, the second firing of an unchanged manifest skips every row, and two
beats at once never fire a slot twice."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from batching import BIN, REPO, clean_env, manifest_lines, png, start_worker
from producer.scheduler import ScheduleLog
from worker.state import BatchStore

pytestmark = pytest.mark.slow


def start_beat(env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "celery"), "-A", "worker", "beat", *extra], cwd=REPO, env=env,
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(check: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(what())


def catalog(tmp_path: Path, seconds: int) -> dict[str, str]:
    roots = tmp_path / "roots"
    roots.mkdir()
    lines = ["id,image,prompt"]
    for i in range(3):
        (roots / f"p{i}.png").write_bytes(png(seed=i + 1))
        lines.append(f"sku-{i},p{i}.png,a bottle on a table")
    (roots / "m.csv").write_text("\n".join(lines) + "\n")
    schedules = tmp_path / "schedules.toml"
    schedules.write_text(
        f'[[schedule]]\nname = "n"\nevery_seconds = {seconds}\nmanifest = "roots/m.csv"\n'
        'output = "out"\nprovider = "local"\n'
    )
    return {"BGSWAP_SCHEDULES": str(schedules), "BGSWAP_LOCAL_ROOTS": str(roots),
            "BGSWAP_SCHEDULE_TICK_S": "1"}  # fmt: skip


def fired(log: ScheduleLog) -> list[dict[str, str]]:
    return [e for e in reversed(log.history("n", 100)) if e["event"] == "fired"]


def test_two_firings_two_batches_and_the_second_skips_every_unchanged_row(
    redis_url: str,
    redis_client: redis_lib.Redis,
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    env = clean_env(BGSWAP_BROKER_URL=redis_url, **catalog(tmp_path, seconds=6))
    store = BatchStore.from_url(redis_url)
    log = ScheduleLog(store.redis)
    procs.append(start_worker(env, tmp_path / "worker.log"))
    procs.append(start_beat(env, tmp_path / "beat.log"))

    def two_done() -> bool:
        batches = [e["batch_id"] for e in fired(log)]
        return len(batches) >= 2 and all(store.meta(b).get("status") == "done" for b in batches[:2])

    def logs() -> str:
        history = json.dumps(log.history("n", 100))
        return (
            history
            + (tmp_path / "worker.log").read_text()[-3000:]
            + (tmp_path / "beat.log").read_text()[-2000:]
        )

    wait_for(two_done, 90, logs)
    first, second = (e["batch_id"] for e in fired(log)[:2])
    assert first.startswith("n-") and first != second
    out = tmp_path / "out"
    one = manifest_lines(out / first / "manifest.jsonl")
    two = manifest_lines(out / second / "manifest.jsonl")
    assert [r["status"] for r in one] == ["succeeded"] * 3
    assert [r["status"] for r in two] == ["skipped"] * 3
    assert [r["outputs"] for r in two] == [r["outputs"] for r in one]  # the first batch's objects
    # no slot fired twice, nothing failed to submit
    events = list(reversed(log.history("n", 100)))
    assert not [e for e in events if e["event"] == "failed-to-submit"]
    assert len({e["slot"] for e in events}) == len(events)

    listing = subprocess.run(
        [str(BIN / "bgswap"), "schedules", "--json"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    (row,) = [json.loads(x) for x in listing.stdout.splitlines()]
    assert row["name"] == "n" and row["kind"] == "every" and row["every_s"] == 6
    assert row["last_batch"] in {e["batch_id"] for e in fired(log)}
    assert row["next_run"] > events[-1]["slot"]


def test_two_beats_at_once_do_not_double_fire(
    redis_url: str,
    redis_client: redis_lib.Redis,
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    env = clean_env(BGSWAP_BROKER_URL=redis_url, **catalog(tmp_path, seconds=2))
    log = ScheduleLog(BatchStore.from_url(redis_url).redis)
    procs.append(start_worker(env, tmp_path / "worker.log"))
    # -l INFO only to see, in their logs, that both beats sent their ticks
    procs.append(start_beat(env, tmp_path / "beat1.log", "-l", "INFO"))
    procs.append(start_beat(env, tmp_path / "beat2.log", "-l", "INFO"))
    wait_for(
        lambda: len(log.history("n", 100)) >= 4,
        90,
        lambda: (tmp_path / "worker.log").read_text()[-3000:],
    )
    for name in ("beat1.log", "beat2.log"):
        assert "Sending due task bgswap.tick" in (tmp_path / name).read_text()
    events = list(reversed(log.history("n", 100)))
    assert len({e["slot"] for e in events}) == len(events), events
    assert {e["event"] for e in events} <= {"fired", "skipped-overlap"}, events
    batches = [e["batch_id"] for e in events if e["event"] == "fired"]
    assert len(set(batches)) == len(batches)


def test_a_watched_folder_starts_one_batch_per_new_manifest_with_two_beats_and_two_workers(
    redis_url: str,
    redis_client: redis_lib.Redis,
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    roots, incoming = tmp_path / "roots", tmp_path / "roots" / "incoming"
    incoming.mkdir(parents=True)
    (roots / "p.png").write_bytes(png())
    schedules = tmp_path / "schedules.toml"
    schedules.write_text(
        f'[[schedule]]\nname = "w"\nwatch = "{incoming}"\nevery_seconds = 1\n'
        'output = "out"\nprovider = "local"\n'
    )
    env = clean_env(BGSWAP_BROKER_URL=redis_url, BGSWAP_SCHEDULES=str(schedules),
                    BGSWAP_LOCAL_ROOTS=str(roots), BGSWAP_SCHEDULE_TICK_S="1")  # fmt: skip
    store = BatchStore.from_url(redis_url)
    log = ScheduleLog(store.redis)
    for n in (1, 2):
        procs.append(start_worker(env, tmp_path / f"worker{n}.log"))
        procs.append(start_beat(env, tmp_path / f"beat{n}.log"))

    def drop(name: str) -> None:  # written elsewhere, renamed in: never read half written
        staged = roots / f".{name}"
        staged.write_text(f"id,image,prompt\n{name}-1,{roots}/p.png,a bottle on a table\n")
        staged.rename(incoming / name)

    def done(n: int) -> Callable[[], bool]:
        def check() -> bool:
            batches = [
                e["batch_id"] for e in reversed(log.history("w", 100)) if e["event"] == "fired"
            ]
            return len(batches) >= n and all(store.meta(b).get("status") == "done" for b in batches)

        return check

    def logs() -> str:
        return json.dumps(log.history("w", 100)) + (tmp_path / "worker1.log").read_text()[-3000:]

    drop("a.csv")
    wait_for(done(1), 90, logs)
    time.sleep(4)  # listed again, by both workers' ticks
    drop("b.csv")
    wait_for(done(2), 90, logs)
    time.sleep(3)
    events = list(reversed(log.history("w", 100)))
    assert [(e["event"], Path(e["manifest"]).name) for e in events] == [
        ("fired", "a.csv"),
        ("fired", "b.csv"),
    ], events
    for event in events:
        lines = manifest_lines(tmp_path / "out" / event["batch_id"] / "manifest.jsonl")
        assert [r["status"] for r in lines] == ["succeeded"]
