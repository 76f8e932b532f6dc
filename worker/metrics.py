"""Prometheus metrics: what every worker process and the API count, and how they are served.

Each ``celery -A worker worker`` (and ``bgswap serve``) with ``BGSWAP_METRICS_PORT`` set
serves ``GET /metrics`` on that port. A pod may run several worker processes: started with
one ``PROMETHEUS_MULTIPROC_DIR`` and one port, the first serves and every one counts
(prometheus-client's multiprocess mode: each process writes its values to files in that
folder and the serving process reads them all at each scrape). That variable must be set before
prometheus-client is imported (it picks its storage at import), so this module, the only
one that imports it, sets it first: to a fresh folder when the operator gave none.

Account-wide figures (requests in flight against a provider's cap, the queue's depth) are
read from Redis and the broker at scrape time by the serving process, not counted.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

_DIR = "PROMETHEUS_MULTIPROC_DIR"
if os.environ.get("BGSWAP_METRICS_PORT") and not os.environ.get(_DIR):
    # Read here, not from the settings object: it must happen before the import below.
    os.environ[_DIR] = tempfile.mkdtemp(prefix="bgswap-metrics-")

from prometheus_client import (  # noqa: E402 - after the folder is chosen, on purpose
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

# Request round trips: tens of milliseconds to a provider's two-minute submit timeout.
_LATENCY = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A generation: seconds (the local provider) to many minutes (a provider's queue).
_GENERATION = (0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

ROWS_FINISHED = Counter(
    "bgswap_rows_finished",
    "Rows that reached a terminal state, by provider, status and error code",
    ["provider", "status", "code"],
)
PROVIDER_REQUESTS = Counter(
    "bgswap_provider_requests",
    "HTTP requests to a provider, by kind (submit, poll, upload, download) and outcome",
    ["provider", "kind", "outcome"],
)
REQUEST_DURATION = Histogram(
    "bgswap_provider_request_duration_seconds",
    "Round trip of one provider request",
    ["provider", "kind"],
    buckets=_LATENCY,
)
GENERATION_DURATION = Histogram(
    "bgswap_generation_duration_seconds",
    "From the provider accepting a row's request to its result being ready",
    ["provider"],
    buckets=_GENERATION,
)
ADMISSION_WAITS = Counter(
    "bgswap_admission_waits",
    "Times a row was told to wait for a rate token or an in-flight slot",
    ["provider", "reason"],
)
ADMISSION_WAIT = Histogram(
    "bgswap_admission_wait_seconds",
    "How long a row waited for admission, from its first refusal to its admission",
    ["provider"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0),
)
THROTTLED = Counter("bgswap_provider_throttled", "HTTP 429 answers from a provider", ["provider"])
CIRCUIT_OPENINGS = Counter(
    "bgswap_circuit_openings",
    "A provider account's circuit opened (an auth or credit error stops it for everyone)",
    ["provider"],
)
COST = Counter("bgswap_cost_usd", "What finished rows cost, in US dollars", ["provider"])
ROWS_HELD = Gauge(
    "bgswap_rows_held",
    "Rows this worker process holds: running, waiting on their provider or for admission",
    multiprocess_mode="livesum",
)
HEARTBEAT = Gauge(
    "bgswap_worker_heartbeat_timestamp_seconds",
    "When a worker process on this host last wrote its heartbeat to Redis",
    ["host"],
    multiprocess_mode="max",
)
API_REQUESTS = Counter(
    "bgswap_api_requests",
    "HTTP requests to bgswap serve, by method, route template and status",
    ["method", "route", "status"],
)
API_DURATION = Histogram(
    "bgswap_api_request_duration_seconds",
    "Time bgswap serve took to answer",
    ["method", "route"],
    buckets=_LATENCY,
)

STATUSES = frozenset({"succeeded", "failed", "skipped", "canceled"})
_CODE = re.compile(r"(?:[a-z_]+\.[a-z_]+)?")  # bgswap's codes: input.missing_field

# Read at scrape time (ScrapeCollector), not counted by any process.
IN_FLIGHT = "bgswap_provider_in_flight"
IN_FLIGHT_LIMIT = "bgswap_provider_in_flight_limit"
QUEUE_MESSAGES = "bgswap_queue_messages"

_COUNTED: tuple[Counter | Gauge | Histogram, ...] = (
    ROWS_FINISHED, PROVIDER_REQUESTS, REQUEST_DURATION, GENERATION_DURATION, ADMISSION_WAITS,
    ADMISSION_WAIT, THROTTLED, CIRCUIT_OPENINGS, COST, ROWS_HELD, HEARTBEAT, API_REQUESTS,
    API_DURATION,
)  # fmt: skip


def series_names() -> set[str]:
    """Every metric family bgswap exposes, counters with their ``_total``."""
    names = {IN_FLIGHT, IN_FLIGHT_LIMIT, QUEUE_MESSAGES}
    for metric in _COUNTED:
        name = metric._name  # prometheus-client keeps the name without _total
        names.add(f"{name}_total" if isinstance(metric, Counter) else name)
    return names


# -- what the code records ----------------------------------------------------------------


def provider_label(name: str) -> str:
    """ "Runware", "fal storage" -> "runware", "fal": the account, not the endpoint."""
    return name.split(maxsplit=1)[0].lower() if name.strip() else "unknown"


def outcome_of(status: int | None) -> str:
    if status is None:
        return "network"
    if status == 429:
        return "throttled"
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "client_error"
    return "ok"


def request_done(provider: str, kind: str, status: int | None, seconds: float) -> None:
    """One provider request answered (``status``) or not (None: a transport failure)."""
    label = provider_label(provider)
    PROVIDER_REQUESTS.labels(label, kind, outcome_of(status)).inc()
    REQUEST_DURATION.labels(label, kind).observe(seconds)
    if status == 429:
        THROTTLED.labels(label).inc()


@contextlib.contextmanager
def timed_request(provider: str, kind: str) -> Iterator[None]:
    """A request made by other code (a download through the source fetcher): ok unless it
    raised. Its status is not seen, so a failure counts as ``network``."""
    started = time.monotonic()
    try:
        yield
    except BaseException:
        request_done(provider, kind, None, time.monotonic() - started)
        raise
    request_done(provider, kind, 200, time.monotonic() - started)


@functools.cache
def providers() -> frozenset[str]:
    """The registry's names (label values); read late: the providers import this module."""
    from worker.providers import SPECS  # noqa: PLC0415

    return frozenset(SPECS)


def row_finished(record: dict[str, Any]) -> None:
    """A terminal row. A refused row's provider is whatever its manifest said: only the
    providers bgswap has become label values (anything else is ``other``), as only
    bgswap's own statuses and error codes do."""
    provider = str(record.get("provider") or "")
    provider = provider if provider in providers() else "other"
    status = str(record.get("status"))
    status = status if status in STATUSES else "other"
    error = record.get("error") or {}
    code = str(error.get("code", "")) if isinstance(error, dict) else ""
    ROWS_FINISHED.labels(provider, status, code if _CODE.fullmatch(code) else "other").inc()
    cost = float(record.get("cost_usd") or 0.0)
    if cost:
        COST.labels(provider).inc(cost)


def generation_took(provider: str, seconds: float) -> None:
    """A polled-for result is ready ``seconds`` after its provider accepted the request
    (the row may have moved between processes meanwhile: the time is from its memory)."""
    GENERATION_DURATION.labels(provider_label(provider)).observe(seconds)


def admission_refused(provider: str, reason: str) -> None:
    ADMISSION_WAITS.labels(provider, reason).inc()


def admitted_after(provider: str, seconds: float) -> None:
    ADMISSION_WAIT.labels(provider).observe(seconds)


def circuit_opened(provider: str) -> None:
    CIRCUIT_OPENINGS.labels(provider).inc()


def rows_held(count: int) -> None:
    ROWS_HELD.set(count)


def heartbeat_written(now: float) -> None:
    HEARTBEAT.labels(socket.gethostname()).set(now)


def api_request(method: str, route: str, status: int, seconds: float) -> None:
    API_REQUESTS.labels(method, route, str(status)).inc()
    API_DURATION.labels(method, route).observe(seconds)


# -- serving ------------------------------------------------------------------------------


class ScrapeCollector(Collector):
    """Figures read when Prometheus scrapes: each callable returns (labels, value) pairs;
    one that fails (Redis away) leaves its family empty rather than failing the scrape."""

    def __init__(
        self,
        in_flight: Callable[[], Iterable[tuple[str, float, float | None]]],
        queue_depth: Callable[[], Iterable[tuple[str, float]]],
    ) -> None:
        self.in_flight = in_flight
        self.queue_depth = queue_depth

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily(
            IN_FLIGHT, "Requests in flight on the provider account (all workers)",
            labels=["provider"],
        )  # fmt: skip
        cap = GaugeMetricFamily(
            IN_FLIGHT_LIMIT, "The account's in-flight cap (BGSWAP_*_MAX_IN_FLIGHT)",
            labels=["provider"],
        )  # fmt: skip
        depth = GaugeMetricFamily(
            QUEUE_MESSAGES, "Messages waiting in the broker's queue", labels=["queue"]
        )
        with contextlib.suppress(Exception):
            for provider, count, limit in self.in_flight():
                used.add_metric([provider], count)
                if limit is not None:
                    cap.add_metric([provider], limit)
        with contextlib.suppress(Exception):
            for queue, count in self.queue_depth():
                depth.add_metric([queue], count)
        yield used
        yield cap
        yield depth


def multiprocess_dir() -> Path | None:
    value = os.environ.get(_DIR)
    return Path(value) if value else None


def forget_dead_processes(folder: Path) -> None:
    """Drop the live gauges of processes that are gone (a crashed worker's last value
    would be added forever); their counters stay, as counters must."""
    for path in folder.glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), str(folder))  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_exited(pid: int | None = None) -> None:
    """A process of this pool is done: its live gauges no longer count."""
    folder = multiprocess_dir()
    if folder is not None:
        multiprocess.mark_process_dead(pid or os.getpid(), str(folder))  # type: ignore[no-untyped-call]


def serve(host: str, port: int, collector: Collector | None = None) -> bool:
    """Serve /metrics for every process writing to this folder; False if another process
    serves it already (the port is taken: several workers sharing one folder)."""
    registry = CollectorRegistry()
    folder = multiprocess_dir()
    if folder is not None:
        forget_dead_processes(folder)
        multiprocess.MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    else:  # pragma: no cover - the folder is always set when a port is
        for metric in _COUNTED:
            registry.register(metric)
    if collector is not None:
        registry.register(collector)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError:
        return False
    return True
