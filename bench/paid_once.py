"""Paid once through faults, at the scale the problem was found: 200 rows through two real
`celery -A worker worker` processes, against the strict fake Runware and fal. Once a
fifth of the rows were accepted the first worker is SIGKILLed, SIGTERMed, SIGSTOPped past
its lease (then SIGCONTed), or cut off from Redis past its lease by a TCP proxy that goes
dark (then comes back) while the provider stays reachable.

Each run prints paid calls per row (the fake's own record of accepted requests, per row),
and how many rows were paid twice, result objects written twice and rows failed. The
baseline is the same batch without a fault, in the same run. Target: 1.000 paid calls
per row, nothing written twice, nothing failed.

Two settings differ from the defaults, in the baseline as in the fault runs: the lease
is 4 s (a stalled worker is taken over in seconds instead of a minute: the test is the
same, only sooner), and submits are rate-limited to 20/s, so that the fault can start
between two submits (tests/faults.py says why).

    python -m bench.paid_once [--rows 200] [--provider runware fal] [--fault sigstop dark]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.common import Baseline, free_port, report
from producer.embedded import redis_server

REPO = Path(__file__).resolve().parent.parent
# The harness and the fakes live with the tests (tests/faults.py, tests/servers/), which
# import each other as top-level modules: reached the way pytest reaches them.
sys.path.insert(0, str(REPO / "tests"))

from faults import FAULTS, Outcome, provider, run_with_fault  # noqa: E402
from servers.files import FileServer  # noqa: E402

ROWS = 200
RATE = "20/s"
PROVIDERS = ("runware", "fal")


def run(redis_url: str, name: str, fault: str, rows: int) -> tuple[Outcome, float]:
    redis.Redis.from_url(redis_url).flushdb()
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="bgswap-bench-") as tmp,
        FileServer() as files,
        provider(name, rate=RATE) as paid,
    ):
        outcome = run_with_fault(Path(tmp), redis_url, paid, fault, files, rows)
    return outcome, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paid_once", description=__doc__)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--provider", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--fault", nargs="+", choices=FAULTS[1:], default=list(FAULTS[1:]))
    args = parser.parse_args(argv)
    # Nothing the workers start may ask a cloud metadata address for credentials.
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    met = True
    with redis_server(port=free_port(), use_socket=False) as url:
        for name in args.provider:
            baseline, _ = run(url, name, "none", args.rows)
            for fault in args.fault:
                outcome, seconds = run(url, name, fault, args.rows)
                wrong = len(outcome.failed) + outcome.overwritten
                result = report(
                    f"paid once ({name}, {fault})",
                    outcome.paid_per_row,
                    "paid calls/row",
                    Baseline("no fault", baseline.paid_per_row),
                    1.0,
                    what=f"{args.rows} rows, 2 workers:",
                    note=f"{outcome.paid_twice} rows paid twice, {outcome.overwritten} results "
                    f"written twice, {len(outcome.failed)} rows failed; {seconds:.0f} s",
                    decimals=3,
                )
                if wrong:
                    print(f"paid once ({name}, {fault}): {wrong} rows wrong: NOT met", flush=True)
                met = met and result.met and not wrong
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
