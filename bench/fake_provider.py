"""The fake Runware server (tests/servers/runware.py) in its own process, for benchmarks.

    python -m bench.fake_provider --port P --processing-s S --image-bytes N [--key K]

prints ``READY <api url> <seed url>`` once it serves. ``FakeProvider`` (below) starts it as a
subprocess and reads its figures from ``GET /bench/stats``: accepted (paid) tasks with the
wall-clock time of each acceptance, requests received, and the server's own CPU time.

The seed image is a noisy PNG whose size is chosen so that a result (the seed inverted and
tinted, as PNG) is about ``--image-bytes``: FakeRunware makes results from the seed, it has
no result-size knob. It is served at ``/images/seed.png`` and referred to by URL in the
manifests, so the worker passes it through without uploading anything.

Benchmark-only shortcuts, all on the provider's side (its compute is not ours to measure):
every task of a run uses the same seed, so the seed's download and decode and the rendering
of each result are memoised; without that the fake's own PNG encoding (about 0.3 s for a
5 MB noisy PNG) would be the bottleneck of the 2-core machine, not bgswap.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import resource
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# The fake lives with the tests (tests/servers/), which import each other as top-level
# `servers.*` modules (pytest puts tests/ on sys.path). It is not a package of the project
# and must stay where the tests keep it, so the benchmark reaches it the same way.
sys.path.insert(0, str(REPO / "tests"))

KEY = "rw-bench-key"
SEED_PATH = "/images/seed.png"


def noisy_png(side: int) -> bytes:
    rng = random.Random(side)
    image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def seed_for_result_bytes(target: int) -> bytes:
    """A noisy PNG seed whose rendered result (PNG) is about ``target`` bytes."""
    from servers.http import render_result  # noqa: PLC0415 - after sys.path is set

    side = max(8, int((target / 3.0) ** 0.5))
    for _ in range(3):  # noise compresses to an almost fixed number of bytes per pixel
        seed = noisy_png(side)
        got = len(render_result(Image.open(io.BytesIO(seed)), 0, "PNG", 95))
        if abs(got - target) <= 0.03 * target:
            break
        side = max(8, int(side * (target / got) ** 0.5))
    return seed


def serve(port: int, processing_s: float, image_bytes: int, key: str) -> None:  # noqa: C901
    import servers.http as http_mod  # noqa: PLC0415 - tests/ is on sys.path only now
    import servers.runware as rw  # noqa: PLC0415
    from servers.http import Reply, json_reply  # noqa: PLC0415

    seed = seed_for_result_bytes(image_bytes)
    seed_url = f"http://127.0.0.1:{port}{SEED_PATH}"

    original_fetch = rw.fetch_url
    original_open = rw.open_image
    original_render = rw.render_result

    def fetch_url(url: str) -> bytes | None:
        return seed if url == seed_url else original_fetch(url)

    def open_image(data: bytes | None, formats: frozenset[str]) -> Image.Image | None:
        if data is seed:
            return _seed_image(formats)
        return original_open(data, formats)

    @lru_cache(maxsize=4)
    def _seed_image(formats: frozenset[str]) -> Image.Image | None:
        return original_open(seed, formats)

    @lru_cache(maxsize=64)
    def _render(seed_id: int, index: int, pil_format: str, quality: int) -> bytes:
        return original_render(_seed_image(rw.SEED_FORMATS), index, pil_format, quality)

    def render_result(image: Image.Image, index: int, pil_format: str, quality: int) -> bytes:
        if image is _seed_image(rw.SEED_FORMATS):
            return _render(id(image), index, pil_format, quality)
        return original_render(image, index, pil_format, quality)

    rw.fetch_url = fetch_url
    rw.open_image = open_image
    rw.render_result = render_result
    http_mod.fetch_url = fetch_url

    class BenchRunware(rw.FakeRunware):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.accept_times: list[float] = []
            self.calls = 0

        def _accept(self, job: Any) -> None:
            super()._accept(job)
            with self.lock:
                self.accept_times.append(time.time())

        def dispatch(self, call: Any, raw: bytes) -> Reply:
            path = call.path.split("?")[0]
            if path == SEED_PATH:
                return Reply(200, seed, {"Content-Type": "image/png"})
            if path == "/bench/stats":
                usage = resource.getrusage(resource.RUSAGE_SELF)
                with self.lock:
                    stats = {
                        "paid": len(self.paid),
                        "unique_paid": len(set(self.paid)),
                        "accept_times": list(self.accept_times),
                        "requests": self.calls,
                        "cpu_s": usage.ru_utime + usage.ru_stime,
                    }
                return json_reply(200, stats)
            with self.lock:
                self.calls += 1
                # The base class keeps every request (bodies included) for the tests;
                # a benchmark only needs the count, and 5 MB seeds would pile up.
                self.requests.clear()
            return super().dispatch(call, raw)

    http_mod._Server.request_queue_size = 1024  # 200 rows in flight poll at once
    fake = BenchRunware(key, processing_s=processing_s)
    # Bind the requested port: FakeHTTPServer binds port 0, so re-create its server.
    fake._server.server_close()
    fake._server = http_mod._Server(("127.0.0.1", port), http_mod.Handler)
    fake._server.owner = fake
    fake._thread = threading.Thread(
        target=fake._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    with fake:
        result = render_result(_seed_image(rw.SEED_FORMATS), 0, "PNG", 95)
        print(f"READY {fake.url} {seed_url} {len(result)}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            sys.stdin.read()  # until the parent closes our stdin (or dies)


class FakeProvider:
    """``with FakeProvider(processing_s=2, image_bytes=65536) as fake:`` a fake Runware in
    its own process; ``fake.url``, ``fake.seed_url``, ``fake.stats()``."""

    def __init__(self, processing_s: float, image_bytes: int, port: int, key: str = KEY) -> None:
        self.args = [
            sys.executable, "-m", "bench.fake_provider", "--port", str(port),
            "--processing-s", str(processing_s), "--image-bytes", str(image_bytes),
            "--key", key,
        ]  # fmt: skip
        self.key = key
        self.proc: subprocess.Popen[str] | None = None
        self.url = self.seed_url = ""
        self.result_bytes = 0
        self.pid = 0

    def __enter__(self) -> FakeProvider:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            self.args, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "READY":
            self.proc.kill()
            raise RuntimeError(f"fake provider did not start: {line}")
        # result_bytes: one result's size (PNG), as the worker downloads it
        self.url, self.seed_url, self.result_bytes = line[1], line[2], int(line[3])
        self.pid = self.proc.pid
        self.base = self.url.rsplit("/", 1)[0]
        return self

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.base}/bench/stats", timeout=30).json())

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_provider", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processing-s", type=float, default=0.0)
    parser.add_argument("--image-bytes", type=int, default=65536)
    parser.add_argument("--key", default=KEY)
    args = parser.parse_args(argv)
    serve(args.port, args.processing_s, args.image_bytes, args.key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
