"""Realistic account: how full one worker on default settings keeps a provider account
whose generations take 8 s +- 25% and whose every request costs 120 ms.

    python -m bench.account [--provider runware|fal|both] [--rows N]

The fake (bench/fake_provider.py, in its own process) draws each task's generation time
uniformly from 6-10 s (a seeded RNG: every run, and the baseline, get the same sequence)
and holds every request it answers 120 ms before handling it: submits, polls, result
reads, result downloads, and the worker's fetch of the source, which the fake serves too.
bgswap runs as deployed: one `celery -A worker worker`, no options, default settings
(in-flight caps 100 for Runware and 40 for fal), only pointed at the fake. A fresh Redis
per provider, so the poll schedule starts unlearned, as on a new deployment.

The figure is the provider's busy share of the cap over the steady window: busy(t) is the
number of tasks generating at t (from the fake's record of when each was accepted and
when its drawn time ran out), and share = integral of min(busy, cap) dt / (cap x window).
It is what the account does for its price; it does not count the time a row holds a slot
after its generation ended (the poll that finds it, the result's download, the next
submit): that is what it measures.

The steady window runs from the moment the cap was first reached (the 10th percentile of
the acceptances if it never was) to the 90th percentile of the acceptances: before, the
batch is still filling the account; after, fewer rows than the cap are left to submit.
With the default rows (10 x the cap) the start is also about the 10th percentile.

Baseline, same run, against a fresh fake with the same draws: an ideal client (a thread
per slot, http.client) that keeps exactly `cap` tasks in flight, polls each one every
0.25 s after its submit's answer, submits the next as soon as a poll says done and
downloads the result meanwhile. It shows what the fake allows: about 0.25 s lost per 8 s
task (the poll comes 0.125 s late on average, then the submit's 120 ms), 97%.

Also printed: rows/s from submit to the output manifest and in the steady window,
provider requests per row (polls separately), source fetches per row, the worker's CPU
per row and the fake's CPU, the median time from a generation's end to the poll that
said so and from there to the result's download, and how long a slot stayed empty per task
on average (from the share: the poll's lateness and the download, then storing the
result, finishing the row, the next row's admission and submit).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import Baseline, free_port, report
from bench.fake_provider import FakeProvider
from bench.workers import (
    check_all_succeeded,
    cpu_s,
    start_worker,
    stop_worker,
    submit_and_wait,
    worker_env,
)  # fmt: skip
from producer.embedded import redis_server
from worker.providers.runware import MODEL
from worker.settings import Settings

GENERATION_S = 8.0
SPREAD = 0.25
SPREAD_SEED = 2026
REQUEST_DELAY_S = 0.12
RESULT_BYTES = 16_384
BASELINE_POLL_S = 0.25
TARGET_SHARE = 0.97
ROWS = {"runware": 1000, "fal": 400}
FAL_ENDPOINT = "fal-ai/ideogram/v3/replace-background"

Interval = tuple[float, float]


# --- the figure (pure) -----------------------------------------------------------------------


def first_full(intervals: Sequence[Interval], cap: int) -> float | None:
    """The first moment at least ``cap`` of the intervals overlap; None if never."""
    busy = 0
    for _, delta, at in _edges(intervals, -float("inf"), float("inf")):
        busy += delta
        if busy >= cap:
            return at
    return None


def steady_window(intervals: Sequence[Interval], cap: int) -> Interval:
    """(start, end): from the cap first reached (else the 10th percentile of the starts) to
    the 90th percentile of the starts."""
    starts = sorted(a for a, _ in intervals)
    end = starts[len(starts) * 9 // 10]
    full = first_full(intervals, cap)
    start = full if full is not None and full < end else starts[len(starts) // 10]
    return start, end


def busy_share(intervals: Sequence[Interval], cap: int, start: float, end: float) -> float:
    """The integral over [start, end] of min(intervals overlapping, cap), over cap x
    (end - start)."""
    if end <= start:
        raise ValueError("an empty window")
    busy, last, area = 0, start, 0.0
    for at, delta, _ in _edges(intervals, start, end):
        area += min(busy, cap) * (at - last)
        busy, last = busy + delta, at
    area += min(busy, cap) * (end - last)
    return area / (cap * (end - start))


def _edges(intervals: Sequence[Interval], lo: float, hi: float) -> list[tuple[float, int, float]]:
    """Each interval clipped to [lo, hi], as (time, +1 | -1, time) in time order, ends first
    at a tie (a task that ends as another starts never counts twice)."""
    edges = []
    for begin, end in intervals:
        a, b = max(begin, lo), min(end, hi)
        if b > a:
            edges += [(a, 1, a), (b, -1, b)]
    return sorted(edges)


# --- one measurement ---------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    share: float
    window: Interval
    rows_per_s: float  # end to end
    steady_rows_per_s: float  # acceptances per second in the window
    kinds: Counter[str]  # requests the fake answered, by kind
    late_s: float | None  # median: generation done -> the poll that said so
    late_mean_s: float | None  # the same, mean (a slot's time counts every late poll)
    fetch_s: float | None  # median: that poll -> the result downloaded
    idle_s: float  # per task in the window: the slot's time without a generation
    cpu_s: float | None  # the worker's
    fake_cpu_s: float


def measure(
    stats: dict[str, Any], cap: int, rows: int, seconds: float, cpu: float | None,
    fake_cpu0: float = 0.0,
) -> Measured:  # fmt: skip
    """The figures of a run from the fake's stats (a fresh fake: its tasks are the run's)."""
    prompts = Counter(stats["paid_prompts"])
    twice = [p for p, n in prompts.items() if n > 1]
    if twice or len(prompts) != rows:
        raise RuntimeError(f"{len(prompts)} rows paid for {rows}; paid twice: {twice[:3]}")
    tasks = stats["tasks"]
    intervals = [(a, b) for a, b, *_ in tasks]
    start, end = steady_window(intervals, cap)
    share = busy_share(intervals, cap, start, end)
    in_window = sum(start <= a < end for a, _ in intervals)
    late = [seen - b for _, b, seen, _ in tasks if seen is not None]
    fetch = [got - seen for _, _, seen, got in tasks if seen is not None and got is not None]
    return Measured(
        share=share,
        window=(start, end),
        rows_per_s=rows / seconds,
        steady_rows_per_s=in_window / (end - start),
        kinds=Counter(stats["kinds"]),
        late_s=statistics.median(late) if late else None,
        late_mean_s=statistics.mean(late) if late else None,
        fetch_s=statistics.median(fetch) if fetch else None,
        idle_s=(1 - share) * cap * (end - start) / max(1, in_window),
        cpu_s=cpu,
        fake_cpu_s=stats["cpu_s"] - fake_cpu0,
    )


def write_manifest(path: Path, rows: int, image_url: str) -> None:
    """A prompt per row: the fake's record of paid prompts then names the rows."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "image", "prompt", "output_format"])
        for n in range(rows):
            prompt = f"Product {n:05d} on a warm backdrop"
            out.writerow([f"r{n:05d}", image_url, prompt, "PNG"])


def fake_for(provider: str) -> FakeProvider:
    return FakeProvider(
        GENERATION_S, RESULT_BYTES, free_port(), provider=provider, spread=SPREAD,
        spread_seed=SPREAD_SEED, request_delay_s=REQUEST_DELAY_S,
    )  # fmt: skip


def run_bgswap(provider: str, rows: int, cap: int, workdir: Path) -> Measured:
    with redis_server(port=free_port(), use_socket=False) as url, fake_for(provider) as fake:
        manifest = workdir / f"{provider}.csv"
        write_manifest(manifest, rows, fake.seed_url)
        worker = start_worker(worker_env(url, fake), workdir / f"{provider}.log")
        fake_cpu0 = fake.stats()["cpu_s"]
        try:
            cpu0 = cpu_s(worker.pid)
            seconds, lines = submit_and_wait(url, fake, manifest, workdir, f"acct-{provider}")
            cpu = cpu_s(worker.pid) - cpu0
        finally:
            stop_worker(worker)
        check_all_succeeded(lines, rows)
        return measure(fake.stats(), cap, rows, seconds, cpu, fake_cpu0)


# --- the baseline: an ideal client -------------------------------------------------------


class Ideal:
    """Keeps ``cap`` tasks in flight: a thread per slot submits, polls every ``poll_s``
    from the submit's answer, hands the result's collection to a pool, submits again.

    Plain http.client, one kept-alive connection per thread: httpx's shared pool, under a
    hundred threads polling four times a second, took more CPU than the machine had, and
    the polls came late (0.6 s apart instead of 0.25 s)."""

    def __init__(self, fake: FakeProvider, cap: int, poll_s: float) -> None:
        self.fake = fake
        self.cap = cap
        self.poll_s = poll_s
        self.local = threading.local()
        proto: dict[str, tuple[Callable[[int], Any], Callable[[Any], Any]]] = {
            "runware": (self._rw_submit, self._rw_poll),
            "fal": (self._fal_submit, self._fal_poll),
        }
        self.submit, self.poll = proto[fake.provider]
        self.collect = self._rw_collect if fake.provider == "runware" else self._fal_collect
        self.auth = f"Bearer {fake.key}" if fake.provider == "runware" else f"Key {fake.key}"

    def run(self, rows: int) -> float:
        numbers = itertools.count()
        lock = threading.Lock()
        collected: list[Future[int]] = []
        errors: list[BaseException] = []

        def slot() -> None:
            try:
                while True:
                    with lock:
                        n = next(numbers)
                    if n >= rows:
                        return
                    handle = self.submit(n)
                    answered = time.monotonic()
                    done = None
                    for k in itertools.count(1):
                        time.sleep(max(0.0, answered + k * self.poll_s - time.monotonic()))
                        done = self.poll(handle)
                        if done is not None:
                            break
                    with lock:
                        collected.append(pool.submit(self.collect, done))
            except BaseException as exc:
                errors.append(exc)

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.cap) as pool:
            threads = [threading.Thread(target=slot, daemon=True) for _ in range(self.cap)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            sizes = [f.result() for f in collected]
        seconds = time.perf_counter() - start
        if errors or len(sizes) != rows or min(sizes, default=0) == 0:
            raise RuntimeError(f"ideal client: {len(sizes)} of {rows} results; {errors[:1]}")
        return seconds

    def _request(self, method: str, url: str, body: Any = None) -> tuple[int, bytes]:
        """One request on this thread's connection (opened again if the fake closed it)."""
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {"Authorization": self.auth}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            connection = getattr(self.local, "connection", None)
            if connection is None:
                connection = http.client.HTTPConnection(parts.netloc, timeout=60)
                self.local.connection = connection
            try:
                connection.request(method, path, data, headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                connection.close()
                self.local.connection = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _json(self, method: str, url: str, body: Any = None) -> Any:
        status, data = self._request(method, url, body)
        if status >= 300:
            raise RuntimeError(f"ideal client: {method} {url}: {status} {data[:200]!r}")
        return json.loads(data)

    def _rw_submit(self, n: int) -> str:
        task_uuid = str(uuid.uuid4())
        self._json("POST", self.fake.url, [{
            "taskType": "imageInference", "taskUUID": task_uuid, "model": MODEL,
            "positivePrompt": f"Product {n:05d} on a warm backdrop",
            "inputs": {"seedImage": self.fake.seed_url}, "outputType": "URL",
            "outputFormat": "PNG", "numberResults": 1, "deliveryMethod": "async",
        }])  # fmt: skip
        return task_uuid

    def _rw_poll(self, task_uuid: str) -> str | None:
        answer = self._json("POST", self.fake.url, [{"taskType": "getResponse",
                                                     "taskUUID": task_uuid}])  # fmt: skip
        done = [x for x in answer.get("data", []) if x.get("status") == "success"]
        return str(done[0]["imageURL"]) if done else None

    def _rw_collect(self, image_url: str) -> int:
        status, data = self._request("GET", image_url)
        return len(data) if status == 200 else 0

    def _fal_submit(self, n: int) -> dict[str, Any]:
        body = {"prompt": f"Product {n:05d} on a warm backdrop", "image_url": self.fake.seed_url,
                "num_images": 1}  # fmt: skip
        return dict(self._json("POST", f"{self.fake.url}/{FAL_ENDPOINT}", body))

    def _fal_poll(self, queued: dict[str, Any]) -> str | None:
        status, data = self._request("GET", queued["status_url"])
        if status == 200 and json.loads(data)["status"] == "COMPLETED":
            return str(queued["response_url"])
        if status != 202:
            raise RuntimeError(f"ideal client: fal status {status} {data[:200]!r}")
        return None

    def _fal_collect(self, response_url: str) -> int:
        return self._rw_collect(self._json("GET", response_url)["images"][0]["url"])


def run_ideal(provider: str, rows: int, cap: int) -> Measured:
    with fake_for(provider) as fake:
        fake_cpu0 = fake.stats()["cpu_s"]
        seconds = Ideal(fake, cap, BASELINE_POLL_S).run(rows)
        return measure(fake.stats(), cap, rows, seconds, None, fake_cpu0)


# --- main ----------------------------------------------------------------------------------


def cap_of(provider: str) -> int:
    settings = Settings()
    cap = settings.runware_max_in_flight if provider == "runware" else settings.fal_max_in_flight
    if cap is None:
        raise RuntimeError(f"{provider} has no in-flight cap in this environment")
    return cap


def describe(m: Measured, rows: int) -> str:
    requests = sum(n for kind, n in m.kinds.items() if kind != "source")
    late = "n/a"
    if m.late_s is not None and m.late_mean_s is not None:
        late = f"{m.late_s:.2f} s (mean {m.late_mean_s:.2f} s)"
    fetch = f"{m.fetch_s:.2f} s" if m.fetch_s is not None else "n/a"
    parts = [
        f"window {m.window[1] - m.window[0]:.0f} s",
        f"{m.rows_per_s:.2f} rows/s end to end, {m.steady_rows_per_s:.2f} steady",
        f"{requests / rows:.2f} provider requests/row ("
        + ", ".join(f"{k} {m.kinds[k] / rows:.2f}" for k in sorted(m.kinds) if k != "source")
        + ")",
        f"{m.kinds['source'] / rows:.2f} source fetches/row",
        f"result seen {late} after it was done and downloaded {fetch} after that (medians)",
        f"a slot empty {m.idle_s:.2f} s per task",
    ]
    if m.cpu_s is not None:
        parts.append(f"worker CPU {1000 * m.cpu_s / rows:.1f} ms/row")
    parts.append(f"fake CPU {100 * m.fake_cpu_s * m.rows_per_s / rows:.0f}% of a core")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.account", description=__doc__)
    parser.add_argument("--provider", choices=("runware", "fal", "both"), default="both")
    parser.add_argument(
        "--rows", type=int, default=None, help="rows per provider (default: 1000 Runware, 400 fal)"
    )
    args = parser.parse_args(argv)
    providers = ("runware", "fal") if args.provider == "both" else (args.provider,)
    met = True
    with tempfile.TemporaryDirectory(prefix="bgswap-bench-") as tmp:
        for provider in providers:
            rows = args.rows or ROWS[provider]
            cap = cap_of(provider)
            ideal = run_ideal(provider, rows, cap)
            print(f"account {provider} baseline: {describe(ideal, rows)}", flush=True)
            got = run_bgswap(provider, rows, cap, Path(tmp))
            baseline = Baseline(
                f"ideal client, {cap} in flight, polls every {BASELINE_POLL_S:g} s", ideal.share
            )
            result = report(
                f"account {provider}",
                got.share,
                "of the cap busy",
                baseline,
                TARGET_SHARE,
                lower_is_better=False,
                what=f"{rows} rows, cap {cap}, generations {GENERATION_S:g} s +-{SPREAD:.0%}, "
                f"{1000 * REQUEST_DELAY_S:.0f} ms a request, steady window:",
                note=describe(got, rows),
                decimals=3,
            )
            met &= result.met
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
