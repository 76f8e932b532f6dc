"""Shared by the worker benchmarks (saturation, rate, overhead, memory): a manifest of rows
pointing at the fake provider's seed, real `celery -A worker worker` subprocesses configured
from the environment, an in-process submit (the `bgswap submit` path) timed to the output
manifest, and /proc figures (CPU seconds, peak RSS) of the worker processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import AWS_DUMMY_ENV
from bench.fake_provider import FakeProvider
from producer import runner
from producer.manifest import RowDefaults, read_manifest
from worker.celery_app import app, apply_config
from worker.settings import Settings
from worker.state import BatchStore

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def write_manifest(path: Path, rows: int, image_url: str) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "image", "prompt", "output_format"])
        for n in range(rows):
            out.writerow([f"r{n:05d}", image_url, "A product photo on a warm backdrop", "PNG"])


def worker_env(redis_url: str, fake: FakeProvider, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}
    env.update(AWS_DUMMY_ENV)
    env.update(fake.env())
    env.update(BGSWAP_BROKER_URL=redis_url, BGSWAP_ALLOW_PRIVATE_URLS="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def consumers(redis_url: str) -> int:
    """Connections blocked on the queue (BRPOP): worker processes ready to consume."""
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for c in client.client_list() if c.get("cmd") == "brpop")
    finally:
        client.close()


def start_worker(
    env: dict[str, str], log: Path, *args: str, redis_url: str | None = None
) -> subprocess.Popen[bytes]:
    """Start a worker and wait until one more connection consumes the queue (the worker
    logs nothing at INFO: it does not hijack the root logger)."""
    url = redis_url or env["BGSWAP_BROKER_URL"]
    before = consumers(url)
    # worker/celery_app.py sets worker_pool and worker_concurrency in the app's config,
    # and Celery lets the config win over `-P` / `-c`: a prefork worker goes through
    # `python -m bench.workers`, which sets them before starting the same worker.
    prog = (
        [sys.executable, "-m", "bench.workers"]
        if "prefork" in args
        else [str(BIN / "celery"), "-A", "worker"]
    )
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        [*prog, "worker", "--without-gossip", "--without-mingle", "--without-heartbeat",
         *args],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while consumers(url) <= before:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_worker(proc)
            raise RuntimeError(f"worker did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return proc


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def reset_redis_stats(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.config_resetstat()
    client.close()


def deliveries(redis_url: str) -> int:
    """Messages taken from the queue since the last reset (one BRPOP each; an idle BRPOP
    that times out counts too, negligible while a batch runs)."""
    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats").get("cmdstat_brpop", {})
        return int(stats.get("calls", 0))
    finally:
        client.close()


def redis_commands(redis_url: str) -> dict[str, int]:
    """Commands Redis ran since the last reset, by name (its own INFO commandstats): the
    producer's, the workers' and this benchmark's waiting for the batch, all together."""
    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (prefork children), from /proc."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out.extend(tree(int(child)))
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (and reaped ones)."""
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after ")": state(0) ... utime(11) stime(12) cutime(13) cstime(14)
        total += sum(int(x) for x in fields[11:15]) / CLK_TCK
    return total


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def submit_and_wait(
    redis_url: str, fake: FakeProvider, manifest: Path, workdir: Path, batch_id: str,
    timeout_s: float = 600,
) -> tuple[float, list[dict[str, Any]]]:  # fmt: skip
    """`bgswap submit --wait`'s path, in process: seconds from submit to the output manifest
    written, and its lines."""
    settings = Settings(
        broker_url=redis_url, redis_url=redis_url, allow_private_urls=True, **fake.env(),
    )  # fmt: skip
    apply_config(settings)
    store = BatchStore.from_url(redis_url)
    defaults = RowDefaults(
        provider=fake.provider, available_providers=frozenset({fake.provider, "local"}),
        base_dir=workdir, allow_private_urls=True,
    )  # fmt: skip
    start = time.perf_counter()
    with runner.open_manifest(str(manifest), None) as m:
        submitted = runner.submit_manifest(
            settings, app, store, read_manifest(m.stream, m.fmt, defaults), defaults=defaults,
            # an output of its own: rows of an earlier batch here would be skipped as done
            output=str(workdir / f"out-{batch_id}"), batch_id=batch_id,
        )  # fmt: skip
    if submitted.rejected:
        raise RuntimeError(f"{submitted.rejected} rows rejected: {submitted.errors[:3]}")
    meta = runner.wait_for_batch(store, batch_id, lambda c, t: None, poll_s=0.05,
                                 timeout_s=timeout_s)  # fmt: skip
    seconds = time.perf_counter() - start
    lines = [json.loads(x) for x in Path(meta["manifest_url"]).read_text().splitlines()]
    return seconds, lines


def check_all_succeeded(lines: list[dict[str, Any]], rows: int) -> None:
    failed = [(x["id"], x.get("error")) for x in lines if x["status"] != "succeeded"]
    if len(lines) != rows or failed:
        raise RuntimeError(f"{len(failed)} of {len(lines)} rows did not succeed: {failed[:3]}")


def _prefork_main(argv: list[str]) -> None:
    """`celery -A worker worker -P prefork -c N`, with the pool and concurrency honoured."""
    pool = argv[argv.index("-P") + 1]
    concurrency = int(argv[argv.index("-c") + 1])
    app.conf.update(worker_pool=pool, worker_concurrency=concurrency)
    app.worker_main(argv)


if __name__ == "__main__":
    _prefork_main(sys.argv[1:])
