"""API: requests/s of `bgswap serve` making 1,000-row batches and reading batch status.

    python -m bench.api [--rows 1000] [--posts 10] [--reads 1000]

A private redis-server on a free TCP port and a real `bgswap serve` process (uvicorn,
default settings: the per-token rate of 20/s is on, so requests go round a pool of
tokens, each under its rate, and the limiter's round trip is in every figure). No worker
runs: rows stay queued.

- ``POST /v1/batches`` with 1,000 inline rows (https sources, a template, option columns),
  one request at a time; baseline: `bgswap submit` of the same rows as a CSV file, one
  process per batch (what a script calling the CLI pays), measured in the same run.
- ``GET /v1/batches/{id}`` of a 1,000-row batch, one request at a time on one keep-alive
  connection; baseline: ``GET /healthz`` on the same server (the HTTP floor), and the
  note gives a plain Redis HGETALL loop of the batch's meta.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import Baseline, Result, free_port, report, timer
from bench.enqueue import write_manifest
from producer.embedded import redis_server

BIN = Path(sys.executable).parent
TOKENS = [f"bench-token-{n}" for n in range(100)]


def rows_of(manifest: Path) -> list[dict[str, str]]:
    import csv  # noqa: PLC0415

    with manifest.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def environment(url: str, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}
    digests = ",".join(f"write:{hashlib.sha256(t.encode()).hexdigest()}" for t in TOKENS)
    env.update(
        BGSWAP_BROKER_URL=url,
        BGSWAP_API_TOKENS=digests,
        BGSWAP_OUTPUT=str(workdir / "out"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",  # noqa: S106 - a dummy: nothing reaches AWS
    )
    return env


@contextmanager
def serving(env: dict[str, str], workdir: Path) -> Iterator[str]:
    port = free_port()
    log = (workdir / "serve.log").open("w")
    proc = subprocess.Popen(  # noqa: S603 - our own entry point and arguments
        [str(BIN / "bgswap"), "serve", "--port", str(port)],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((workdir / "serve.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


class Tokens:
    """Round the pool: each token stays under its own rate."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> dict[str, str]:
        self.n += 1
        return {"Authorization": f"Bearer {TOKENS[self.n % len(TOKENS)]}"}


def post_rate(client: httpx.Client, body: dict[str, Any], posts: int) -> tuple[float, str]:
    tokens = Tokens()
    batch_id = ""
    with timer() as t:
        for _ in range(posts):
            answer = client.post("/v1/batches", json=body, headers=tokens.next())
            if answer.status_code != 201:
                raise RuntimeError(f"POST answered {answer.status_code}: {answer.text[:300]}")
            batch_id = answer.json()["batch_id"]
    return posts / t.seconds, batch_id


def submit_rate(env: dict[str, str], manifest: Path, runs: int) -> float:
    with timer() as t:
        for _ in range(runs):
            subprocess.run(  # noqa: S603 - our own entry point and arguments
                [str(BIN / "bgswap"), "-q", "submit", str(manifest)], env=env,
                cwd=manifest.parent, check=True, capture_output=True, timeout=300,
            )  # fmt: skip
    return runs / t.seconds


def get_rate(client: httpx.Client, path: str, reads: int) -> float:
    tokens = Tokens()
    with timer() as t:
        for _ in range(reads):
            answer = client.get(path, headers=tokens.next())
            if answer.status_code != 200:
                raise RuntimeError(f"GET {path} answered {answer.status_code}")
    return reads / t.seconds


def hgetall_rate(url: str, batch_id: str, reads: int) -> float:
    client = redis.Redis.from_url(url, decode_responses=True)
    with timer() as t:
        for _ in range(reads):
            client.hgetall(f"bgswap:{batch_id}:meta")
    client.close()
    return reads / t.seconds


def measure(url: str, rows: int, posts: int, reads: int, workdir: Path) -> list[Result]:
    manifest = workdir / "manifest.csv"
    write_manifest(manifest, rows)
    body = {"rows": rows_of(manifest)}
    env = environment(url, workdir)
    with serving(env, workdir) as base, httpx.Client(base_url=base, timeout=120) as client:
        post_rps, batch_id = post_rate(client, body, posts)
        status_rps = get_rate(client, f"/v1/batches/{batch_id}", reads)
        health_rps = get_rate(client, "/healthz", reads)
    cli_rps = submit_rate(env, manifest, max(1, posts // 3))
    redis_rps = hgetall_rate(url, batch_id, reads)
    return [
        report(
            "api.post",
            post_rps,
            "requests/s",
            Baseline("bgswap submit, a process per batch", cli_rps),
            lower_is_better=False,
            what=f"POST /v1/batches of {rows} rows:",
            note=f"{post_rps * rows:.0f} rows/s",
        ),
        report(
            "api.status",
            status_rps,
            "requests/s",
            Baseline("GET /healthz", health_rps),
            lower_is_better=False,
            what=f"GET /v1/batches/{{id}} ({rows} rows):",
            note=f"Redis HGETALL loop {redis_rps:.0f}/s",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--posts", type=int, default=10)
    parser.add_argument("--reads", type=int, default=1000)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="bgswap-bench-") as tmp,
        redis_server(port=free_port(), use_socket=False) as url,
    ):
        results = measure(url, args.rows, args.posts, args.reads, Path(tmp))
    return 0 if all(r.met for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
