"""Image memory: a worker fed hostile images stays small. One worker process, default
settings, the local provider (it decodes images itself, one per core at a time):

- eight PNGs of about 200 KB that declare 7999 x 7999 pixels, just under the 64 MP pixel
  cap (decoded and worked on, each would take about 1.4 GB);
- one file of 600 MB (sparse on disk), twelve times the source byte cap.

Each must fail its row (``image.too_large``, ``source.too_large``) with the worker's peak
RSS (VmHWM, read before it stops) at or under 600 MB. Baseline, same run: the peak RSS
of the same worker started and left idle.

    python -m bench.image_memory
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bench.common import Baseline, free_port, report
from bench.workers import start_worker, status_kb, stop_worker
from producer import runner
from producer.embedded import redis_server
from producer.manifest import read_manifest
from worker.celery_app import app, apply_config
from worker.settings import Settings
from worker.state import BatchStore

REPO = Path(__file__).resolve().parent.parent
TARGET_MB = 600.0
SIDE = 7999
BOMBS = 8
BIG_BYTES = 600 << 20


def declared_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 240).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def run_batch(url: str, work: Path, name: str, files: list[str]) -> list[dict[str, Any]]:
    """Submit rows for ``files`` to the worker, wait for the output manifest: its lines."""
    manifest = work / f"{name}.csv"
    manifest.write_text("id,image,prompt\n" + "".join(f"r{n},{f},p\n" for n, f in enumerate(files)))
    settings = Settings(broker_url=url, redis_url=url)
    apply_config(settings)
    store = BatchStore.from_url(url)
    root = str(work / "out")
    defaults = runner.row_defaults(settings, provider="local", prompt=None, set_items=(),
                                   base_dir=work, root=root, batch_id=name)  # fmt: skip
    with runner.open_manifest(str(manifest), None) as m:
        runner.submit_manifest(settings, app, store, read_manifest(m.stream, m.fmt, defaults),
                               defaults=defaults, output=root, batch_id=name)  # fmt: skip
    meta = runner.wait_for_batch(store, name, lambda c, t: None, poll_s=0.05, timeout_s=600)
    return [json.loads(x) for x in Path(meta["manifest_url"]).read_text().splitlines()]


def fed(
    url: str, work: Path, env: dict[str, str], name: str, files: list[str]
) -> tuple[float, list[str]]:
    """Peak RSS (MB) of a fresh worker fed ``files``, and the error codes of its rows."""
    worker = start_worker(env, work / f"{name}.log")
    try:
        lines = run_batch(url, work, name, files)
        peak = status_kb(worker.pid, "VmHWM") / 1024
    finally:
        stop_worker(worker)
    return peak, [(x.get("error") or {}).get("code", x["status"]) for x in lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.image_memory", description=__doc__)
    parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="bgswap-bench-") as tmp,
        redis_server(port=free_port(), use_socket=False) as url,
    ):
        work = Path(tmp)
        bomb = declared_png(SIDE)
        bombs = []
        for n in range(BOMBS):
            (work / f"bomb{n}.png").write_bytes(bomb)
            bombs.append(f"bomb{n}.png")
        with (work / "big.png").open("wb") as fh:
            fh.truncate(BIG_BYTES)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}
        env.update(BGSWAP_BROKER_URL=url, PYTHONPATH=str(REPO), AWS_EC2_METADATA_DISABLED="true")
        idle = start_worker(env, work / "idle.log")
        try:
            time.sleep(2)
            idle_mb = status_kb(idle.pid, "VmHWM") / 1024
        finally:
            stop_worker(idle)
        bomb_mb, bomb_codes = fed(url, work, env, "bombs", bombs)
        big_mb, big_codes = fed(url, work, env, "big", ["big.png"])
    ok = bomb_codes == ["image.too_large"] * BOMBS and big_codes == ["source.too_large"]
    if not ok:
        print(f"image memory: rows did not fail as expected: {bomb_codes} {big_codes}", flush=True)
    first = report(
        "image memory (declared 64 MP images)",
        bomb_mb,
        "MB peak RSS",
        Baseline("idle worker", idle_mb),
        TARGET_MB,
        what=f"{BOMBS} PNGs of {len(bomb) // 1024} KB declaring {SIDE}x{SIDE}:",
        note=f"rows: {', '.join(sorted(set(bomb_codes)))}",
    )
    second = report(
        "image memory (600 MB file)",
        big_mb,
        "MB peak RSS",
        Baseline("idle worker", idle_mb),
        TARGET_MB,
        what=f"one {BIG_BYTES >> 20} MB file:",
        note=f"rows: {', '.join(big_codes)}",
    )
    return 0 if ok and first.met and second.met else 1


if __name__ == "__main__":
    sys.exit(main())
