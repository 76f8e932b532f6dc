"""Which signal should scale workers? The row queue's Redis list length (what KEDA's redis
scaler reads), or that plus the rows workers hold (`bgswap_rows_held`, from /metrics)?

    python -m bench.autoscale [--rows 600] [--latency-s 4]

One worker on default settings runs a batch against the fake Runware (its in-flight cap
of 100 by default); every 0.25 s the benchmark reads the rows the list's messages carry
(up to 100 a message), a scrape of the worker's metrics and the batch's counts. Work
outstanding is the rows not yet terminal. The figure is the share of outstanding work
that queue + held accounts for, averaged over the batch; the baseline, the same share for
the list alone. A worker adopts its rows and acks their message at once (up to
BGSWAP_WORKER_MAX_ROWS rows a process), so the list empties in seconds while the rows are
still being worked: an autoscaler reading the list alone sees no work and scales the
workers down under a full batch (their SIGTERM hands the rows back, the list fills, it
scales up again).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.common import Baseline, free_port, queued_rows, report
from bench.fake_provider import FakeProvider
from bench.workers import (
    check_all_succeeded,
    start_worker,
    stop_worker,
    submit_and_wait,
    worker_env,
    write_manifest,
)  # fmt: skip
from producer.embedded import redis_server
from worker.celery_app import QUEUE
from worker.state import BatchStore

ROWS = 600
LATENCY_S = 4.0
TARGET = 0.95  # queue + held must account for at least this share of the work


def held(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "bgswap_rows_held":
            return sum(s.value for s in family.samples)
    return 0.0


def sample(url: str, port: int, batch: str, total: int, stop: threading.Event,
           out: list[tuple[float, float, float]]) -> None:  # fmt: skip
    """(rows in the list's messages, rows held, rows outstanding) every 0.25 s while the
    batch runs."""
    client = redis.Redis.from_url(url)
    store = BatchStore.from_url(url)
    while not stop.wait(0.25):
        if not store.exists(batch):
            continue
        counts = store.counts(batch)
        terminal = sum(counts.get(k, 0) for k in ("succeeded", "failed", "skipped", "canceled"))
        outstanding = total - terminal
        if outstanding > 0 and counts.get("queued", 0) + counts.get("running", 0) > 0:
            out.append((float(queued_rows(client, QUEUE)), held(port), float(outstanding)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.autoscale", description=__doc__)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--latency-s", type=float, default=LATENCY_S)
    args = parser.parse_args(argv)
    samples: list[tuple[float, float, float]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bgswap-bench-") as tmp,
        redis_server(port=free_port(), use_socket=False) as url,
        FakeProvider(args.latency_s, 16_384, free_port()) as fake,
    ):
        work = Path(tmp)
        manifest = work / "scale.csv"
        write_manifest(manifest, args.rows, fake.seed_url)
        port = free_port()
        env = worker_env(url, fake, BGSWAP_METRICS_PORT=str(port),
                         PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(dir=tmp))  # fmt: skip
        worker = start_worker(env, work / "scale.log")
        stop = threading.Event()
        thread = threading.Thread(
            target=sample, args=(url, port, "scale", args.rows, stop, samples), daemon=True
        )
        thread.start()
        try:
            _, lines = submit_and_wait(url, fake, manifest, work, "scale")
        finally:
            stop.set()
            thread.join(5)
            stop_worker(worker)
        check_all_succeeded(lines, args.rows)
    if len(samples) < 10:
        raise RuntimeError(f"only {len(samples)} samples: the batch ended too soon")
    queue_share = statistics.fmean(min(1.0, q / o) for q, _, o in samples)
    both_share = statistics.fmean(min(1.0, (q + h) / o) for q, h, o in samples)
    empty = sum(1 for q, _, _ in samples if q == 0) / len(samples)
    result = report(
        "autoscale signal", 100 * both_share, "% of outstanding rows seen by queue + held",
        Baseline("the list length alone", 100 * queue_share), target=100 * TARGET,
        lower_is_better=False,
        note=f"{len(samples)} samples; the list was empty in {100 * empty:.0f}% of them",
    )  # fmt: skip
    return 0 if result.met else 1


if __name__ == "__main__":
    sys.exit(main())
