"""Overhead: a zero-latency provider with 64 KB results, rows from submit to the output
manifest through 2 worker processes (one per core) on default settings: at least 500
rows/s, and the workers' CPU milliseconds per row (from /proc/<pid>/stat), at most 3.

Baseline, same run: a plain loop in this process doing the same provider work per row with
no queue, no state and no retries (one sync imageInference POST, one GET of the result, one
file written). That is the honest floor for "overhead"; the `local` provider would compare
against Pillow's background replacement instead, which is not what this measures.

    python -m bench.overhead [--rows 5000] [--baseline-rows 500]

Rows go through the default async delivery (submit, then polls): the first rows are
polled on the default schedule, the rest once the worker has learned that the provider
answers at once (worker/providers/timing.py).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.common import Baseline, free_port, report
from bench.fake_provider import FakeProvider
from bench.workers import (
    check_all_succeeded,
    cpu_s,
    deliveries,
    reset_redis_stats,
    start_worker,
    stop_worker,
    submit_and_wait,
    worker_env,
    write_manifest,
)  # fmt: skip
from producer.embedded import redis_server
from worker.settings import Settings

ROWS = 5000
BASELINE_ROWS = 500
RESULT_BYTES = 65_536
WORKERS = 2
TARGET_ROWS_S = 500.0  # issue 13
TARGET_CPU_MS = 3.0


def plain_loop(fake: FakeProvider, rows: int, out: Path) -> tuple[float, float]:
    """Rows/s and CPU ms/row of the bare provider work, one row after another."""
    out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {fake.key}"}
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with httpx.Client(timeout=30) as http:
        for n in range(rows):
            task = {
                "taskType": "imageInference", "taskUUID": str(uuid.uuid4()),
                "model": "ideogram:4@5", "positivePrompt": "A product photo",
                "inputs": {"seedImage": fake.seed_url}, "outputFormat": "PNG",
                "deliveryMethod": "sync",
            }  # fmt: skip
            answer = http.post(fake.url, json=[task], headers=headers).json()
            image = http.get(answer["data"][0]["imageURL"]).content
            (out / f"r{n:05d}.png").write_bytes(image)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    return rows / seconds, 1000 * cpu / rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--baseline-rows", type=int, default=BASELINE_ROWS)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="step threads (default: the worker's own default)")  # fmt: skip
    args = parser.parse_args(argv)
    given = args.concurrency is not None
    concurrency = {"BGSWAP_WORKER_CONCURRENCY": str(args.concurrency)} if given else {}
    with (
        tempfile.TemporaryDirectory(prefix="bgswap-bench-") as tmp,
        redis_server(port=free_port(), use_socket=False) as url,
        FakeProvider(0.0, RESULT_BYTES, free_port()) as fake,
    ):
        work = Path(tmp)
        base_rate, base_ms = plain_loop(fake, args.baseline_rows, work / "loop")
        manifest = work / "overhead.csv"
        write_manifest(manifest, args.rows, fake.seed_url)
        env = worker_env(url, fake, **concurrency)
        workers = []
        fake_cpu0 = fake.stats()["cpu_s"]
        try:
            for n in range(WORKERS):
                workers.append(start_worker(env, work / f"w{n}.log"))
            cpu0 = sum(cpu_s(w.pid) for w in workers)
            reset_redis_stats(url)
            seconds, lines = submit_and_wait(url, fake, manifest, work, "overhead")
            cpu = sum(cpu_s(w.pid) for w in workers) - cpu0
            taken = deliveries(url)
        finally:
            for worker in workers:
                stop_worker(worker)
        check_all_succeeded(lines, args.rows)
        fake_cpu = fake.stats()["cpu_s"] - fake_cpu0
        result_kb = fake.result_bytes / 1024
    rate = args.rows / seconds
    rows_note = "" if args.rows == ROWS else f", scaled down from {ROWS} to stay near 2 min"
    first = report(
        "overhead",
        rate,
        "rows/s",
        Baseline(f"plain loop, 1 thread ({args.baseline_rows} rows)", base_rate),
        TARGET_ROWS_S,
        lower_is_better=False,
        what=f"{args.rows} rows, 0 s latency, {result_kb:.0f} KB results:",
        note=f"{seconds:.1f} s submit to manifest{rows_note}; {WORKERS} workers x "
        f"{args.concurrency or Settings().worker_concurrency} threads; "
        f"fake CPU {100 * fake_cpu / seconds:.0f}% of a core",
    )
    second = report(
        "overhead cpu",
        1000 * cpu / args.rows,
        "CPU-ms/row",
        Baseline("plain loop", base_ms),
        TARGET_CPU_MS,
        what="worker processes:",
        note=f"{100 * cpu / seconds:.0f}% of a core over the batch; "
        f"{taken / args.rows:.2f} deliveries/row; "
        f"fake {1000 * fake_cpu / args.rows:.1f} CPU-ms/row",
    )
    return 0 if first.met and second.met else 1


if __name__ == "__main__":
    sys.exit(main())
