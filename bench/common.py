"""Small helpers shared by the benchmarks: timing, and one result line per figure.

A line reads ``name: figure unit; baseline ...: x; ratio 7.9x; target <= 10 s: met`` so
that every benchmark reports the same way, and its baseline is measured in the same run
(same machine, same load) rather than quoted from elsewhere.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from worker.jobs import TASK_PROCESS_ROWS

T = TypeVar("T")

# For every process a benchmark starts: boto3 never asks a cloud metadata address, and
# finds credentials that reach nothing.
AWS_DUMMY_ENV = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Elapsed:
    seconds: float = 0.0


@contextmanager
def timer() -> Iterator[Elapsed]:
    """``with timer() as t: ...`` then ``t.seconds`` (monotonic, wall-clock)."""
    elapsed = Elapsed()
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed.seconds = time.perf_counter() - start


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()``'s result and how long it took, in seconds."""
    with timer() as t:
        result = fn()
    return result, t.seconds


@dataclass(frozen=True)
class Baseline:
    label: str  # what was measured, e.g. "apply_async loop"
    figure: float  # in the same unit as the figure it is compared with


@dataclass(frozen=True)
class Result:
    line: str
    met: bool  # the target was met (True when there is no target)


def fmt(value: float, decimals: int | None = None) -> str:
    """3 significant figures, without scientific notation for everyday magnitudes; or a
    fixed number of ``decimals`` (a figure whose every unit counts: 1.005 is not 1)."""
    if decimals is not None:
        return f"{value:.{decimals}f}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def report(
    name: str,
    figure: float,
    unit: str,
    baseline: Baseline | None = None,
    target: float | None = None,
    *,
    lower_is_better: bool = True,
    what: str = "",
    note: str = "",
    decimals: int | None = None,
) -> Result:
    """Print and return one result line.

    ``what`` prefixes the figure ("100000 rows in"), ``note`` follows it in parentheses
    ("16340 rows/s"). The ratio is how many times better than the baseline the figure is.
    """
    parts = [f"{name}: {what + ' ' if what else ''}{fmt(figure, decimals)} {unit}"]
    if note:
        parts[0] += f" ({note})"
    if baseline is not None:
        parts.append(f"baseline {baseline.label}: {fmt(baseline.figure, decimals)} {unit}")
        ratio = baseline.figure / figure if lower_is_better else figure / baseline.figure
        parts.append(f"ratio {ratio:.1f}x")
    met = True
    if target is not None:
        met = figure <= target if lower_is_better else figure >= target
        sign = "<=" if lower_is_better else ">="
        parts.append(f"target {sign} {fmt(target, decimals)} {unit}: {'met' if met else 'NOT met'}")
    line = "; ".join(parts)
    print(line, flush=True)
    return Result(line=line, met=met)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for a private server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def queued_rows(client: Any, queue: str) -> int:
    """Rows the queue's messages carry: one per `bgswap.process_row`, a chunk's worth per
    `bgswap.process_rows` (producer/publish.py)."""
    rows = 0
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        rows += len(args[1]) if message["headers"]["task"] == TASK_PROCESS_ROWS else 1
    return rows
