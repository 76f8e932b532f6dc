"""Memory: 200 requests in flight at once with 5 MB results, one worker process; its peak
RSS (VmHWM in /proc/<pid>/status, read before it stops) must stay at or under 400 MB.
Baseline, same run: the peak RSS of the same worker started and left idle.

    python -m bench.memory [--rows 200] [--concurrency 16]

The provider takes 5 s per generation, so every row is submitted (and in flight) before
the first finishes; the printed line gives the peak in flight seen by the fake.
"""

from __future__ import annotations

import argparse
import bisect
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Baseline, free_port, report
from bench.fake_provider import FakeProvider
from bench.workers import (
    check_all_succeeded,
    start_worker,
    status_kb,
    stop_worker,
    submit_and_wait,
    worker_env,
    write_manifest,
)  # fmt: skip
from producer.embedded import redis_server

ROWS = 200
LATENCY_S = 5.0
RESULT_BYTES = 5 * 1024 * 1024
TARGET_MB = 400.0


def peak_in_flight(accepts: list[float], latency_s: float) -> int:
    """The most tasks accepted and not yet due at any acceptance."""
    times = sorted(accepts)
    return max(
        (i + 1 - bisect.bisect_right(times, t - latency_s) for i, t in enumerate(times)),
        default=0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="bgswap-bench-") as tmp,
        redis_server(port=free_port(), use_socket=False) as url,
        FakeProvider(LATENCY_S, RESULT_BYTES, free_port()) as fake,
    ):
        work = Path(tmp)
        env = worker_env(
            url, fake, BGSWAP_RUNWARE_MAX_IN_FLIGHT=str(args.rows),
            BGSWAP_WORKER_CONCURRENCY=str(args.concurrency),
        )  # fmt: skip
        idle = start_worker(env, work / "idle.log")
        try:
            time.sleep(2)
            idle_mb = status_kb(idle.pid, "VmHWM") / 1024
        finally:
            stop_worker(idle)

        manifest = work / "memory.csv"
        write_manifest(manifest, args.rows, fake.seed_url)
        worker = start_worker(env, work / "worker.log")
        try:
            seconds, lines = submit_and_wait(url, fake, manifest, work, "memory")
            peak_mb = status_kb(worker.pid, "VmHWM") / 1024
        finally:
            stop_worker(worker)
        check_all_succeeded(lines, args.rows)
        stats = fake.stats()
        result_mb = fake.result_bytes / 1024 / 1024
    in_flight = peak_in_flight(stats["accept_times"], LATENCY_S)
    result = report(
        "memory",
        peak_mb,
        "MB peak RSS",
        Baseline("idle worker", idle_mb),
        TARGET_MB,
        what=f"{args.rows} rows, {result_mb:.1f} MB results, {in_flight} in flight at peak:",
        note=f"{args.concurrency} threads; batch {seconds:.1f} s; "
        f"{peak_mb - idle_mb:.0f} MB above idle",
    )
    return 0 if result.met else 1


if __name__ == "__main__":
    sys.exit(main())
