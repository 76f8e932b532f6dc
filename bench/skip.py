"""Skip: re-running an unchanged catalogue pays no provider and goes fast.

    python -m bench.skip [--rows 5000]

A catalogue of N small local PNGs with a CSV manifest runs once with `bgswap run` (the
embedded default: its own Redis and in-process worker, default settings) against the fake
Runware in its own process (bench/fake_provider.py), then again, unchanged, under a new
batch id. Figures: rows/s of the re-run (the whole command, process start to exit) and
the provider requests it made (target: 0); the baseline is the first, full run of the
same catalogue, measured in the same run. Target: >= 500 rows/s.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from bench.common import Baseline, free_port, report
from bench.fake_provider import FakeProvider

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROWS = 5000
TARGET_ROWS_S = 500.0


def product_png(n: int) -> bytes:
    """A small distinct product shot: a coloured box on a light backdrop."""
    image = Image.new("RGB", (48, 48), (236, 236, 236))
    colour = (n * 37 % 256, n * 91 % 256, n * 53 % 256)
    ImageDraw.Draw(image).rectangle((12, 10 + n % 8, 36, 38), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_catalog(folder: Path, rows: int) -> Path:
    images = folder / "images"
    images.mkdir(parents=True)
    manifest = folder / "catalog.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "image", "prompt", "category"])
        for n in range(rows):
            name = f"sku-{n:05d}.png"
            (images / name).write_bytes(product_png(n))
            out.writerow([f"sku-{n:05d}", f"images/{name}", "a {category} on oak", "kitchen"])
    return manifest


def env_for(fake: FakeProvider) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}
    env.update(
        RUNWARE_API_KEY=fake.key,
        RUNWARE_API_URL=fake.url,
        # The fake serves its results from 127.0.0.1.
        BGSWAP_ALLOW_PRIVATE_URLS="1",
        PYTHONPATH=str(REPO),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",  # noqa: S106 - a dummy: nothing reaches AWS
        AWS_DEFAULT_REGION="us-east-1",
    )
    return env


def bgswap_run(manifest: Path, out: Path, batch_id: str, env: dict[str, str]) -> float:
    """Seconds `bgswap run` took, start to exit (it must exit 0)."""
    start = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - our own entry point and arguments
        [str(BIN / "bgswap"), "run", str(manifest), "--provider", "runware",
         "--output", str(out), "--batch-id", batch_id],
        cwd=manifest.parent, env=env, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"bgswap run {batch_id} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def statuses(out: Path, batch_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in (out / batch_id / "manifest.jsonl").read_text().splitlines():
        status = json.loads(line)["status"]
        counts[status] = counts.get(status, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.skip", description=__doc__)
    parser.add_argument("--rows", type=int, default=ROWS)
    args = parser.parse_args(argv)
    rows = args.rows
    with (
        tempfile.TemporaryDirectory(prefix="bgswap-bench-") as tmp,
        FakeProvider(0.0, 4096, free_port()) as fake,
    ):
        work = Path(tmp)
        manifest = write_catalog(work, rows)
        out = work / "out"
        # The embedded default's durable state of its own, not the user's.
        env = {**env_for(fake), "BGSWAP_STATE_DIR": str(work / "state")}
        asked0 = fake.stats()["requests"]
        first_s = bgswap_run(manifest, out, "nightly-1", env)
        asked1 = fake.stats()["requests"]
        again_s = bgswap_run(manifest, out, "nightly-2", env)
        asked2 = fake.stats()["requests"]
        first, again = statuses(out, "nightly-1"), statuses(out, "nightly-2")
    if first != {"succeeded": rows} or again != {"skipped": rows}:
        raise RuntimeError(f"first run {first}, re-run {again}")
    speed = report(
        "skip",
        rows / again_s,
        "rows/s",
        Baseline("first, full run", rows / first_s),
        TARGET_ROWS_S,
        lower_is_better=False,
        what=f"{rows} unchanged local rows re-run:",
        note=f"{again_s:.1f} s for bgswap run, start to exit; first run {first_s:.1f} s",
    )
    requests = report(
        "skip requests",
        asked2 - asked1,
        "provider requests",
        None,
        0,
        what="re-run:",
        note=f"first run: {asked1 - asked0} requests for {rows} rows",
        decimals=0,
    )
    return 0 if speed.met and requests.met else 1


if __name__ == "__main__":
    sys.exit(main())
