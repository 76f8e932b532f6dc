"""Saturation: with a 2 s provider latency and an in-flight cap of 200, one worker process
(threads pool, default settings) should keep the cap full: end to end, from submit to the
output manifest, at least 90% of the ideal for the batch size. Baseline, same run: a
default prefork worker (`-P prefork -c 2`) with BGSWAP_RUNWARE_DELIVERY=sync, which holds a
process for each generation (fewer rows: at about 1 row/s per process, 2,000 would take
1,000 s).

    python -m bench.saturation [--rows 2000] [--baseline-rows 40] [--poll-initial-s S]

The ideal: the cap's 200 rows every 2 s is 100 rows/s, but nothing can finish in the
first 2 s, so a perfect pipeline takes 2,000 / 100 + 2 = 22 s for 2,000 rows
(91 rows/s). The steady state is printed too: the rate at which the provider accepts
requests while the batch keeps the account full (from the 10th to the 90th percentile of
the acceptances; each acceptance takes the slot of a row that finished), against the
100 rows/s limit.

The fake Runware runs in its own process (bench/fake_provider.py). Poll spacing matters:
a row holds its slot until the poll that finds it done; the worker learns the
generation time and polls close to it (worker/providers/timing.py). `--poll-initial-s`
sets BGSWAP_RUNWARE_POLL_INITIAL_S, the first poll before anything is learned (the
worker's default unless given).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import Baseline, Result, free_port, report
from bench.fake_provider import FakeProvider
from bench.workers import (
    check_all_succeeded,
    cpu_s,
    deliveries,
    redis_commands,
    reset_redis_stats,
    start_worker,
    stop_worker,
    submit_and_wait,
    worker_env,
    write_manifest,
)  # fmt: skip
from producer.embedded import redis_server
from worker.settings import Settings

LATENCY_S = 2.0
CAP = 200
ROWS = 2000
BASELINE_ROWS = 20
RESULT_BYTES = 16_384
TARGET_SHARE = 0.9


def steady_rate(accept_times: list[float]) -> float:
    """Acceptances per second between the 10th and the 90th percentile of them."""
    times = sorted(accept_times)
    lo, hi = len(times) // 10, len(times) * 9 // 10
    return (hi - lo) / (times[hi] - times[lo])


def run(
    url: str, fake: FakeProvider, workdir: Path, rows: int, batch: str,
    extra: dict[str, str], args: tuple[str, ...],
) -> tuple[float, float, float, int, int, dict[str, int]]:  # fmt: skip
    """Rows/s from submit to output manifest, the worker's CPU seconds, the fake's, the
    deliveries (messages the workers took from the queue), the provider's requests and
    Redis's commands."""
    manifest = workdir / f"{batch}.csv"
    write_manifest(manifest, rows, fake.seed_url)
    env = worker_env(url, fake, **extra)
    worker = start_worker(env, workdir / f"{batch}.log", *args)
    before = fake.stats()
    fake_cpu0 = before["cpu_s"]
    try:
        cpu0 = cpu_s(worker.pid)
        reset_redis_stats(url)
        seconds, lines = submit_and_wait(url, fake, manifest, workdir, batch)
        cpu = cpu_s(worker.pid) - cpu0
        taken = deliveries(url)
        commands = redis_commands(url)
    finally:
        stop_worker(worker)
    check_all_succeeded(lines, rows)
    after = fake.stats()
    requests = after["requests"] - before["requests"]  # submits, polls, downloads
    return rows / seconds, cpu, after["cpu_s"] - fake_cpu0, taken, requests, commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.saturation", description=__doc__)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--baseline-rows", type=int, default=BASELINE_ROWS)
    parser.add_argument("--poll-initial-s", type=float,
                        default=Settings().runware_poll_initial_s)  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=Settings().worker_concurrency,
                        help="step threads (default: the worker's own default)")  # fmt: skip
    args = parser.parse_args(argv)
    limit = CAP / LATENCY_S
    with (
        tempfile.TemporaryDirectory(prefix="bgswap-bench-") as tmp,
        redis_server(port=free_port(), use_socket=False) as url,
        FakeProvider(LATENCY_S, RESULT_BYTES, free_port()) as fake,
    ):
        work = Path(tmp)
        base_rate, *_ = run(
            url, fake, work, args.baseline_rows, "sat-base",
            {"BGSWAP_RUNWARE_DELIVERY": "sync", "BGSWAP_RUNWARE_MAX_IN_FLIGHT": str(CAP),
             "BGSWAP_WORKER_CONCURRENCY": "1"},  # one row at a time per process
            ("-P", "prefork", "-c", "2"),
        )  # fmt: skip
        rate, cpu, fake_cpu, taken, requests, commands = run(
            url, fake, work, args.rows, "sat",
            {"BGSWAP_RUNWARE_MAX_IN_FLIGHT": str(CAP),
             "BGSWAP_WORKER_CONCURRENCY": str(args.concurrency),
             "BGSWAP_RUNWARE_POLL_INITIAL_S": str(args.poll_initial_s)},
            (),
        )  # fmt: skip
        paid = fake.stats()
    if paid["paid"] != paid["unique_paid"]:
        raise RuntimeError(f"a task was paid twice: {paid['paid']} != {paid['unique_paid']}")
    steady = steady_rate(sorted(paid["accept_times"])[-args.rows :])
    seconds = args.rows / rate
    ideal = args.rows / (args.rows / limit + LATENCY_S)
    result: Result = report(
        "saturation",
        rate,
        "rows/s",
        Baseline(f"prefork -c 2, sync delivery ({args.baseline_rows} rows)", base_rate),
        TARGET_SHARE * ideal if args.rows == ROWS else None,
        lower_is_better=False,
        what=f"{args.rows} rows, latency {LATENCY_S:g} s, cap {CAP}, end to end:",
        note=f"{100 * rate / ideal:.0f}% of the ideal {ideal:.1f} rows/s, in {seconds:.1f} s; "
        f"steady state {steady:.1f} rows/s ({100 * steady / limit:.0f}% of the {limit:g} "
        f"rows/s limit); first poll {args.poll_initial_s:g} s; {args.concurrency} threads; "
        f"worker CPU {1000 * cpu / args.rows:.1f} ms/row ({100 * cpu / seconds:.0f}% of a "
        f"core), {taken / args.rows:.2f} deliveries/row, "
        f"fake CPU {100 * fake_cpu / seconds:.0f}% of a core; "
        f"{requests / args.rows:.2f} provider requests/row; Redis "
        f"{sum(commands.values()) / args.rows:.1f} commands/row, most: "
        + ", ".join(f"{name} {n / args.rows:.1f}" for name, n in
                    sorted(commands.items(), key=lambda kv: -kv[1])[:6]),
    )  # fmt: skip
    return 0 if result.met else 1


if __name__ == "__main__":
    sys.exit(main())
