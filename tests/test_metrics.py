"""Metrics and logs of real workers: two `celery -A worker worker` processes sharing one
metrics folder and port (as in one pod) run a Runware batch against the strict fake with
JSON logs on, and a scrape of their /metrics is checked against the output manifest (rows by status and code, cost) and the
fake's own record of the requests it received (by kind, the 429 it answered). The same run
carries canary secrets, looked for in every log line, the scrape, every Redis key and value.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis as redis_lib
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families

from batching import BIN, REPO, bgswap, clean_env, manifest_lines, png, redis_values
from faults import wait_until
from servers.files import FileServer
from servers.runware import FakeRunware
from servers.s3 import DUMMY_AWS_ENV
from worker import heartbeats, metrics

KEY = "rw-CANARY-9d3f0a7c5e1b"
HOOK = "hook-CANARY-4b8e2f6a1c9d"
CALLBACK = "callback-CANARY-7a1c3e5b9f2d"
ROWS = 7


@dataclass
class Run:
    scrape: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    lines: list[dict[str, Any]]
    requests: Counter[str]
    log: str  # the worker's stderr: its logs
    stdout: str
    redis_dump: str
    health: dict[str, Any]
    health_after: subprocess.CompletedProcess[str]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(
            v for (n, ls), v in self.samples.items() if n == name and set(labels.items()) <= set(ls)
        )


def request_kinds(fake: FakeRunware) -> Counter[str]:
    """What the fake received, by the metrics' kinds."""
    kinds: Counter[str] = Counter()
    names = {"imageInference": "submit", "getResponse": "poll", "imageUpload": "upload"}
    for call in fake.requests:
        if call.method == "POST" and isinstance(call.body, list) and call.body:
            kinds[names[call.body[0]["taskType"]]] += 1
            kinds["submitted task"] += sum(
                1 for task in call.body if task.get("taskType") == "imageInference"
            )
        elif call.method == "GET" and call.path.startswith("/images/"):
            kinds["download"] += 1
    return kinds


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture(scope="module")
def run(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("metrics")
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    port = free_port()
    with FileServer() as files, FakeRunware(KEY, processing_s=0.3) as fake:
        url = files.add("/s.png", png(), "image/png")
        (tmp / "mug.png").write_bytes(png("mug"))
        rows = [f"r{i},{url},a scene {i}" for i in range(ROWS - 1)] + ["local,mug.png,a table"]
        (tmp / "m.csv").write_text("id,image,prompt\n" + "\n".join(rows) + "\n")
        fake.inject("status", status=429, code="rateLimitExceeded")  # one submit throttled
        fake.inject("generation_error", code="contentPolicyViolation")  # one row fails
        env = clean_env(
            **DUMMY_AWS_ENV,
            XDG_STATE_HOME=str(tmp / "state"),
            RUNWARE_API_KEY=KEY,
            RUNWARE_API_URL=fake.url,
            BGSWAP_HOOK_SECRET=HOOK,
            BGSWAP_CALLBACK_SECRET=CALLBACK,
            BGSWAP_BROKER_URL=redis_url,
            BGSWAP_ALLOW_PRIVATE_URLS="1",
            BGSWAP_RUNWARE_POLL_INITIAL_S="0.1",
            BGSWAP_RUNWARE_POLL_MAX_S="0.3",
            BGSWAP_RETRY_BASE_S="0.1",
            BGSWAP_METRICS_PORT=str(port),
            BGSWAP_LOG_FORMAT="json",
        )
        # One folder for both, and at most 4 rows each: both must take rows.
        env.update(PROMETHEUS_MULTIPROC_DIR=str(tmp / "prom"), BGSWAP_WORKER_MAX_ROWS="4")
        (tmp / "prom").mkdir()
        workers = []
        for n in (1, 2):
            workers.append(subprocess.Popen(
                [str(BIN / "celery"), "-A", "worker", "-q", "worker", "--loglevel", "INFO",
                 "--hostname", f"w{n}@%h"],
                cwd=REPO, env=env, stdout=(tmp / f"stdout{n}").open("w"),
                stderr=(tmp / f"worker{n}.log").open("w"),
            ))  # fmt: skip
            time.sleep(1.0 if n == 1 else 0)  # the first one binds the port
        try:
            # both ready (a worker's heartbeat is written when it is): both take rows
            wait_until(lambda: client.zcard(heartbeats.KEY) == 2, 60, "two workers ready")
            done = bgswap("submit", "m.csv", "--provider", "runware", "--output", "out",
                          "--batch-id", "met1", "--wait", cwd=tmp, env=env)  # fmt: skip
            assert done.returncode == 1, done.stderr + (tmp / "worker1.log").read_text()[-3000:]
            text = scrape(port)
            health = bgswap("health", "--require-workers", "--json", cwd=tmp, env=env)
            assert health.returncode == 0, health.stdout + health.stderr
            requests = request_kinds(fake)
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker in workers:
                worker.wait(timeout=60)
        after = bgswap("health", "--require-workers", cwd=tmp, env=env)
    print(text)  # the closing note quotes one such scrape (pytest -s)
    yield Run(
        scrape=text,
        samples=parse(text),
        lines=manifest_lines(tmp / "out" / "met1" / "manifest.jsonl"),
        requests=requests,
        log=(tmp / "worker1.log").read_text() + (tmp / "worker2.log").read_text(),
        stdout=(tmp / "stdout1").read_text() + (tmp / "stdout2").read_text(),
        redis_dump="\n".join(client.keys("*")) + "\n" + redis_values(client),
        health=json.loads(health.stdout),
        health_after=after,
    )
    client.close()


@pytest.mark.slow
def test_rows_by_status_and_code_and_the_cost_match_the_output_manifest(run: Run) -> None:
    assert len(run.lines) == ROWS
    statuses = Counter(x["status"] for x in run.lines)
    assert statuses == {"succeeded": ROWS - 1, "failed": 1}
    for status, count in statuses.items():
        got = run.value("bgswap_rows_finished_total", provider="runware", status=status)
        assert got == count, status
    (failed,) = [x for x in run.lines if x["status"] == "failed"]
    code = failed["error"]["code"]
    assert run.value("bgswap_rows_finished_total", status="failed", code=code) == 1
    cost = sum(x["cost_usd"] for x in run.lines)
    assert cost > 0
    assert run.value("bgswap_cost_usd_total", provider="runware") == pytest.approx(cost)


@pytest.mark.slow
def test_provider_requests_by_kind_match_what_the_provider_received(run: Run) -> None:
    # submits share requests, so count the imageInference tasks the fake received
    assert run.requests["submitted task"] >= ROWS + 1  # the throttled one was sent again
    assert run.requests["upload"] == 1 and run.requests["download"] == ROWS - 1
    for kind in ("submit", "poll", "upload", "download"):
        counted = run.value("bgswap_provider_requests_total", provider="runware", kind=kind)
        assert counted == run.requests[kind], kind
        timed = run.value("bgswap_provider_request_duration_seconds_count", kind=kind)
        assert timed == run.requests[kind], kind
    throttled = run.value("bgswap_provider_requests_total", kind="submit", outcome="throttled")
    assert throttled == 1
    assert run.value("bgswap_provider_throttled_total", provider="runware") == 1
    # every row's task was accepted and came to an end (one of them in an error)
    assert run.value("bgswap_generation_duration_seconds_count", provider="runware") == ROWS
    assert run.value("bgswap_generation_duration_seconds_sum", provider="runware") >= 0.3 * ROWS


@pytest.mark.slow
def test_gauges_read_at_scrape_time_and_the_heartbeat(run: Run) -> None:
    assert run.value("bgswap_rows_held") == 0  # the batch is done: nothing held
    assert ("bgswap_queue_messages", (("queue", "bgswap"),)) in run.samples
    assert run.value("bgswap_provider_in_flight", provider="runware") == 0
    assert run.value("bgswap_provider_in_flight_limit", provider="runware") == 100
    host = socket.gethostname()
    beat = run.value("bgswap_worker_heartbeat_timestamp_seconds", host=host)
    assert time.time() - 300 < beat <= time.time()
    assert run.health["status"] == "ok" and run.health["workers_fresh"] == 2
    # a worker stopped with SIGTERM takes its heartbeat with it
    assert run.health_after.returncode == 3
    assert "no worker wrote a heartbeat" in run.health_after.stderr


@pytest.mark.slow
def test_every_series_is_named_by_the_metrics_module_and_follows_conventions(run: Run) -> None:
    families = {f.name for f in text_string_to_metric_families(run.scrape)}
    known = metrics.series_names()
    exposed = {n for n in families if n.startswith("bgswap_")}
    # the parser drops _total from counter family names
    assert {n if n in known else n + "_total" for n in exposed} <= known
    for name in known:
        assert name.startswith("bgswap_")
        assert not name.endswith("_ms") and "millis" not in name


@pytest.mark.slow
def test_json_logs_carry_the_row_and_no_secret_is_anywhere(run: Run) -> None:
    lines = [x for x in run.log.splitlines() if x.strip()]
    assert lines
    entries = [json.loads(x) for x in lines]  # every line is one JSON object
    # Celery writes one notice of its own straight to stdout, outside logging; with -q
    # (the deploy files' choice) its banner is not printed at all.
    assert set(run.stdout.splitlines()) <= {"", "worker: Warm shutdown (MainProcess)"}
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    about_rows = [e for e in entries if e.get("row_id")]
    assert about_rows, run.log[-2000:]
    for entry in about_rows:
        assert entry["batch_id"] == "met1" and entry["provider"] == "runware"
    assert len({e["process"] for e in about_rows}) == 2  # both processes worked rows
    assert any("another process serves these metrics" in e["message"] for e in entries)
    assert any(e.get("provider_task_id") for e in about_rows)
    for canary in (KEY, HOOK, CALLBACK, DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"]):
        assert canary not in run.log
        assert canary not in run.scrape
        assert canary not in run.redis_dump
