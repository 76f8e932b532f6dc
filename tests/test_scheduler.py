"""Firing schedules against a real Redis, real submission (producer/scheduler.py): claims,
overlap skips, failures recorded, watched prefixes taken once (a folder and moto S3)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis as redis_lib

from batching import bgswap, clean_env, png
from producer.scheduler import ScheduleLog, describe, tick
from servers.s3 import MotoS3, moto_s3
from worker.celery_app import app, apply_config
from worker.settings import Settings
from worker.state import BatchStore

T0 = datetime(2026, 1, 11, 1, 0, 0, tzinfo=UTC)


class Setup:
    def __init__(self, redis_url: str, tmp_path: Path, **overrides: Any) -> None:
        self.root = tmp_path / "roots"
        self.root.mkdir()
        self.out = tmp_path / "out"
        self.file = tmp_path / "schedules.toml"
        self.settings = Settings(
            broker_url=redis_url, local_roots=str(self.root), schedule_tick_s=1, **overrides
        )
        apply_config(self.settings)
        self.store = BatchStore.from_url(redis_url)
        self.log = ScheduleLog(self.store.redis)

    def manifest(self, name: str = "m.csv", rows: int = 2, folder: Path | None = None) -> Path:
        folder = folder or self.root
        folder.mkdir(exist_ok=True)
        lines = ["id,image,prompt"]
        for i in range(rows):
            (folder / f"p{i}.png").write_bytes(png(seed=i + 1))
            lines.append(f"sku-{i},p{i}.png,a bottle on a table")
        path = folder / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def schedules(self, text: str) -> None:
        self.file.write_text(text)

    def tick(self, now: datetime) -> list[str]:
        return tick(self.settings, app, self.store, str(self.file), now)

    def events(self, name: str) -> list[dict[str, str]]:
        return list(reversed(self.log.history(name, 100)))


@pytest.fixture
def setup(redis_url: str, redis_client: redis_lib.Redis, tmp_path: Path) -> Setup:
    return Setup(redis_url, tmp_path)


def every(setup: Setup, seconds: int = 60, **extra: str) -> None:
    lines = "".join(f'{k} = "{v}"\n' for k, v in extra.items())
    setup.schedules(
        f'[[schedule]]\nname = "n"\nevery_seconds = {seconds}\nmanifest = "{setup.root}/m.csv"\n'
        f'output = "{setup.out}"\nprovider = "local"\ncallback_url = "https://h.example/cb"\n'
        + lines
    )


def test_a_due_slot_submits_a_batch_with_the_schedules_meta(setup: Setup) -> None:
    setup.manifest()
    every(setup)
    assert setup.tick(T0 + timedelta(seconds=5)) == ["n"]
    meta = setup.store.meta("n-20260111-0100")
    assert meta["callback_url"] == "https://h.example/cb" and meta["schedule"] == "n"
    assert meta["output"] == str(setup.out) and meta["manifest"] == str(setup.root / "m.csv")
    assert int(meta["total"]) == 2 and setup.store.counts("n-20260111-0100")["queued"] == 2
    assert [e["event"] for e in setup.events("n")] == ["fired"]
    # the same slot again (another tick, another beat): nothing more
    assert setup.tick(T0 + timedelta(seconds=20)) == []
    assert len(setup.events("n")) == 1


def test_two_ticks_at_once_fire_a_slot_once(setup: Setup) -> None:
    setup.manifest()
    every(setup)
    fired: list[list[str]] = []
    threads = [
        threading.Thread(target=lambda: fired.append(setup.tick(T0 + timedelta(seconds=3))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(fired) == [[], [], [], ["n"]]
    assert [e["event"] for e in setup.events("n")] == ["fired"]


def test_a_firing_while_the_previous_batch_runs_is_skipped_and_recorded(setup: Setup) -> None:
    setup.manifest()
    every(setup)
    setup.tick(T0 + timedelta(seconds=1))  # no worker: the batch stays queued
    assert setup.tick(T0 + timedelta(seconds=61)) == ["n"]
    events = setup.events("n")
    assert [e["event"] for e in events] == ["fired", "skipped-overlap"]
    assert events[1]["reason"] == "previous batch n-20260111-0100 is still running"
    assert not setup.store.exists("n-20260111-0101")
    status = setup.log.status("n")
    assert status["last_batch"] == "n-20260111-0100"
    assert status["last_skip_reason"] == events[1]["reason"]
    # once it is done, the next slot fires
    setup.store.set_meta("n-20260111-0100", status="done")
    setup.tick(T0 + timedelta(seconds=121))
    assert setup.events("n")[-1]["event"] == "fired" and setup.store.exists("n-20260111-0102")


def test_two_slots_fired_at_once_start_one_batch_and_skip_the_other(setup: Setup) -> None:
    setup.manifest(rows=40)  # a submission that takes a while
    every(setup)
    threads = [
        threading.Thread(target=setup.tick, args=(T0 + timedelta(seconds=n),)) for n in (1, 61)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = setup.events("n")
    assert sorted(e["event"] for e in events) == ["fired", "skipped-overlap"], events
    assert [setup.store.exists(b) for b in ("n-20260111-0100", "n-20260111-0101")].count(True) == 1


def test_a_submission_that_fails_is_recorded_with_its_reason(setup: Setup) -> None:
    every(setup)  # the manifest does not exist
    setup.tick(T0 + timedelta(seconds=1))
    event = setup.events("n")[-1]
    assert event["event"] == "failed-to-submit"
    assert event["reason"] == f"{setup.root}/m.csv: no such file"
    assert "active_batch" not in setup.log.status("n")  # it blocks no later slot
    setup.manifest()
    setup.tick(T0 + timedelta(seconds=61))
    assert setup.events("n")[-1]["event"] == "fired"


def test_describe_lists_next_run_and_the_last_batch(setup: Setup) -> None:
    setup.manifest()
    every(setup)
    setup.tick(T0 + timedelta(seconds=1))
    (row,) = describe(setup.settings, setup.store, str(setup.file), T0 + timedelta(seconds=2))
    assert row["name"] == "n" and row["kind"] == "every" and row["every_s"] == 60
    assert row["next_run"] == "2026-01-11T01:01:00+00:00"
    assert row["last_batch"] == "n-20260111-0100" and row["last_batch_state"] == "running"
    assert row["last_skip_reason"] is None


def watch_file(setup: Setup, where: str) -> None:
    setup.schedules(
        f'[[schedule]]\nname = "w"\nwatch = "{where}"\nevery_minutes = 1\n'
        f'output = "{setup.out}"\nprovider = "local"\n'
    )


def test_a_watched_folder_takes_each_new_manifest_once(setup: Setup, redis_url: str) -> None:
    incoming = setup.root / "incoming"
    setup.manifest("a.csv", folder=incoming)
    (incoming / "notes.txt").write_text("not a manifest")
    watch_file(setup, str(incoming))
    setup.tick(T0 + timedelta(seconds=1))
    assert [e["event"] for e in setup.events("w")] == ["fired"]
    # listed again (next slot), and by a second watcher on another connection: not again
    setup.tick(T0 + timedelta(seconds=61))
    other = Setup.__new__(Setup)
    other.__dict__.update(setup.__dict__, store=BatchStore.from_url(redis_url))
    other.tick(T0 + timedelta(seconds=121))
    assert len(setup.events("w")) == 1
    setup.manifest("b.csv", folder=incoming)
    stat = (incoming / "a.csv").stat()
    os.utime(incoming / "a.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version
    setup.tick(T0 + timedelta(seconds=181))
    fired = [e for e in setup.events("w") if e["event"] == "fired"]
    assert sorted(Path(e["manifest"]).name for e in fired) == ["a.csv", "a.csv", "b.csv"]
    assert len({e["batch_id"] for e in fired}) == 3
    assert all(setup.store.exists(e["batch_id"]) for e in fired)


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


def test_a_watched_s3_prefix_takes_a_new_manifest_once_with_two_watchers(
    redis_url: str, redis_client: redis_lib.Redis, tmp_path: Path, s3: MotoS3
) -> None:
    setup = Setup(redis_url, tmp_path, s3_endpoint_url=s3.endpoint_url)
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    client.put_object(Bucket=s3.bucket, Key="img/p.png", Body=png())
    body = f"id,image,prompt\nsku-1,s3://{s3.bucket}/img/p.png,a mug\n".encode()
    client.put_object(Bucket=s3.bucket, Key="incoming/a.csv", Body=body)
    client.put_object(Bucket=s3.bucket, Key="incoming/deeper/x.csv", Body=body)
    client.put_object(Bucket=s3.bucket, Key="incoming/readme.md", Body=b"#")
    watch_file(setup, f"s3://{s3.bucket}/incoming/")
    results: list[list[str]] = []
    threads = [
        threading.Thread(target=lambda n=n: results.append(setup.tick(T0 + timedelta(seconds=n))))
        for n in (1, 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    setup.tick(T0 + timedelta(seconds=61))  # listed again
    events = setup.events("w")
    assert [(e["event"], e["manifest"]) for e in events] == [
        ("fired", f"s3://{s3.bucket}/incoming/a.csv")
    ]
    meta = setup.store.meta(events[0]["batch_id"])
    assert meta["manifest"] == f"s3://{s3.bucket}/incoming/a.csv" and meta["total"] == "1"
    # a new version of the object (another ETag) is a new manifest
    client.put_object(Bucket=s3.bucket, Key="incoming/a.csv", Body=body + b"sku-2,s3://x/y.png,z\n")
    setup.tick(T0 + timedelta(seconds=121))
    assert [e["event"] for e in setup.events("w")] == ["fired", "fired"]


def test_bgswap_schedules_lists_the_last_batch_and_the_last_skip(
    setup: Setup, redis_url: str
) -> None:
    setup.manifest()
    every(setup)
    setup.tick(T0 + timedelta(seconds=1))
    setup.tick(T0 + timedelta(seconds=61))  # skipped: the first batch is still queued
    env = clean_env(BGSWAP_BROKER_URL=redis_url, BGSWAP_SCHEDULES=str(setup.file),
                    BGSWAP_LOCAL_ROOTS=str(setup.root))  # fmt: skip
    table = bgswap("schedules", cwd=setup.root, env=env, timeout=60)
    assert table.returncode == 0, table.stderr
    (line,) = [x for x in table.stdout.splitlines() if x.startswith("n ")]
    assert "every 1m" in line and "n-20260111-0100" in line and "running" in line
    assert "previous batch n-20260111-0100 is still running" in line
    (row,) = [
        json.loads(x)
        for x in bgswap("schedules", "--json", cwd=setup.root, env=env).stdout.splitlines()
    ]
    assert row["last_event"] == "skipped-overlap" and row["last_batch_state"] == "running"

    unset = bgswap(
        "schedules", cwd=setup.root, env={k: v for k, v in env.items() if k != "BGSWAP_SCHEDULES"}
    )
    assert unset.returncode == 2 and unset.stderr.startswith("error: BGSWAP_SCHEDULES is not set")
    setup.file.write_text('[[schedule]]\nname = "n"\ncron = "61 * * * *"\nmanifest = "m.csv"\n')
    bad = bgswap("schedules", cwd=setup.root, env=env)
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(
        f"error: {setup.file}: schedule 'n', field 'cron': '61 * * * *' is not a cron expression"
    )
