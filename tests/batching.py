"""Helpers for the paid-provider batch tests (Runware, fal): real Submitter, real pipeline,
real Redis, real Celery worker subprocesses."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis as redis_lib
from conftest import free_port

from examples.make_examples import product_shot
from producer import runner
from producer.batch import SubmitOptions, Submitter, output_root
from producer.manifest import RowDefaults, read_manifest
from worker.pipeline import finalize, handle_delivery
from worker.providers import get_provider
from worker.runtime import build_deps
from worker.settings import Settings
from worker.state import BatchStore

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def png(kind: str = "box", seed: int = 1) -> bytes:
    buf = io.BytesIO()
    product_shot(kind, (72, 54), (240, 240, 240), seed).save(buf, "PNG")
    return buf.getvalue()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}
    env.update(extra)
    return env


def manifest_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def submit_and_deliver(
    settings: Settings, provider: str, csv_text: str, out: Path, bid: str
) -> BatchStore:
    """Submit through the real Submitter, then deliver queued rows (in order, as retries
    and waits would come back) until none is left, and write the output manifest."""
    deps = build_deps(settings, lambda batch_id: None)
    submitter = Submitter(deps.store, lambda msgs: None, lambda name: get_provider(name, settings))
    defaults = RowDefaults(
        provider=provider,
        available_providers=frozenset({provider, "local"}),
        base_dir=out,
        allow_private_urls=True,
    )
    options = SubmitOptions(batch_id=bid, output=output_root(str(out)), defaults=defaults)
    submitter.submit(read_manifest(io.BytesIO(csv_text.encode()), "csv", defaults), options)
    deadline = time.monotonic() + 60
    while deps.store.counts(bid)["queued"] and time.monotonic() < deadline:
        waits = [
            handle_delivery(bid, i, deps)
            for i in sorted(deps.store.indices_in_state(bid, "queued"))
        ]
        # rows that wait on their provider come back after their countdown, as Celery would
        time.sleep(min([w for w in waits if w is not None] or [0.0]))
    assert deps.store.counts(bid)["queued"] == 0
    finalize(bid, deps)
    return deps.store


def redis_values(client: redis_lib.Redis) -> str:
    """Every value in the Redis database (hashes, lists, strings), as one text."""
    values: list[str] = []
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == "hash":
            values.append(json.dumps(client.hgetall(key)))
        elif kind == "list":
            values.extend(client.lrange(key, 0, -1))
        elif kind == "string":
            values.append(str(client.get(key)))
    return "\n".join(values)


def bgswap(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "bgswap"), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "celery"), "-A", "worker", "worker"], cwd=REPO, env=env,
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def kill_mid_wait_and_resume(
    env: dict[str, str], tmp_path: Path, provider: str, rows: int, accepted: Callable[[], int]
) -> dict[str, str]:
    """Submit `rows` rows, SIGKILL the worker once the provider accepted all of them (and
    before any finished), start another worker, and wait for the batch: its meta."""
    env = {**env, "BGSWAP_VISIBILITY_TIMEOUT_S": "12", "BGSWAP_WORKER_CONCURRENCY": str(rows + 1),
           "BGSWAP_ROW_LEASE_S": "6"}  # fmt: skip
    first = start_worker(env, tmp_path / "w1.log")
    submit = bgswap("submit", "m.csv", "--provider", provider, "--output", "out",
                    "--batch-id", "kill1", cwd=tmp_path, env=env, timeout=60)  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    deadline = time.monotonic() + 30
    while accepted() < rows and time.monotonic() < deadline:
        time.sleep(0.1)
    assert accepted() == rows, (tmp_path / "w1.log").read_text()[-2000:]
    first.send_signal(signal.SIGKILL)  # mid-wait: every request accepted, none finished
    first.wait()
    second = start_worker(env, tmp_path / "w2.log")
    try:
        store = BatchStore.from_url(env["BGSWAP_BROKER_URL"])
        return runner.wait_for_batch(store, "kill1", lambda c, t: None, timeout_s=120)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)


@contextmanager
def serving(env: dict[str, str], log: Path) -> Iterator[str]:
    """A `bgswap serve` process on a free port -> its base URL; stopped on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "bgswap"), "serve", "--port", str(port)], cwd=log.parent, env=env,
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "bgswap serve did not start"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=15)
