"""The fake Runware server (tests/servers/runware.py), or the fake fal (tests/servers/fal.py),
in its own process, for benchmarks.

    python -m bench.fake_provider --port P --processing-s S --image-bytes N [--key K]
        [--provider runware|fal] [--spread F] [--spread-seed N] [--request-delay-s D]

prints ``READY <api url> <seed url> <result bytes>`` once it serves. ``FakeProvider`` (below)
starts it as a subprocess and reads its figures from ``GET /bench/stats``: accepted (paid)
tasks with the wall-clock time of each acceptance, each task's generating interval (the
fake's monotonic clock), requests received (in all and by kind), and the server's own CPU
time.

A real account, for bench/account.py: ``--spread F`` draws each task's generation time
uniformly from ``S * (1 +- F)`` (a seeded RNG, so that runs are comparable), and
``--request-delay-s D`` holds every request D seconds before it is handled (the round trip
to a distant API; each connection has its own thread, so they overlap). Both are off by
default, as are the fakes' own options behind them.

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
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from bench.common import AWS_DUMMY_ENV

REPO = Path(__file__).resolve().parent.parent
# The fake lives with the tests (tests/servers/), which import each other as top-level
# `servers.*` modules (pytest puts tests/ on sys.path). It is not a package of the project
# and must stay where the tests keep it, so the benchmark reaches it the same way.
sys.path.insert(0, str(REPO / "tests"))

KEY = "rw-bench-key"
FAL_KEY = "fal-bench-id:fal-bench-secret"
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


def _memoise(module: Any, seed: bytes, seed_url: str) -> Callable[[], Image.Image]:
    """Patch a fake's module so that the seed is fetched, decoded and each result rendered
    only once; returns the decoded seed."""
    import servers.http as http_mod  # noqa: PLC0415 - tests/ is on sys.path only now

    original_fetch = http_mod.fetch_url
    original_open = http_mod.open_image
    original_render = http_mod.render_result
    decoded: list[Image.Image] = []  # one per format set a fake opens the seed with

    def fetch_url(url: str) -> bytes | None:
        return seed if url == seed_url else original_fetch(url)

    @lru_cache(maxsize=4)
    def _seed_image(formats: frozenset[str]) -> Image.Image | None:
        image = original_open(seed, formats)
        if image is not None:
            decoded.append(image)
        return image

    def open_image(data: bytes | None, formats: frozenset[str]) -> Image.Image | None:
        if data is seed:
            return _seed_image(formats)
        return original_open(data, formats)

    def seed_image() -> Image.Image:
        image = _seed_image(frozenset({"PNG"}))
        assert image is not None
        return image

    @lru_cache(maxsize=64)
    def _render(index: int, pil_format: str, quality: int) -> bytes:
        return original_render(seed_image(), index, pil_format, quality)

    def render_result(image: Image.Image, index: int, pil_format: str, quality: int) -> bytes:
        if any(image is d for d in decoded):
            return _render(index, pil_format, quality)
        return original_render(image, index, pil_format, quality)

    module.fetch_url = fetch_url
    module.open_image = open_image
    module.render_result = render_result
    http_mod.fetch_url = fetch_url
    return seed_image


def _request_kind(provider: str, call: Any) -> str:
    """submit, poll, result (fal's result read), download (a result image), or other."""
    path = call.path.split("?")[0]
    if provider == "runware":
        if path.startswith("/images/"):
            return "download"
        tasks = call.body if isinstance(call.body, list) else []
        first = tasks[0].get("taskType") if tasks and isinstance(tasks[0], dict) else None
        return {"imageInference": "submit", "getResponse": "poll"}.get(str(first), "other")
    from servers.fal import CDN_FILES_PREFIX, _api_route  # noqa: PLC0415

    if path.startswith(CDN_FILES_PREFIX):
        return "download"
    route = _api_route(path)
    return {"submit": "submit", "status": "poll", "result": "result"}.get(
        route[0] if route else "", "other"
    )


def serve(  # noqa: C901
    port: int, processing_s: float, image_bytes: int, key: str, provider: str = "runware",
    spread: float = 0.0, spread_seed: int = 0, request_delay_s: float = 0.0,
) -> None:  # fmt: skip
    import servers.fal as fal_mod  # noqa: PLC0415 - tests/ is on sys.path only now
    import servers.http as http_mod  # noqa: PLC0415
    import servers.runware as rw  # noqa: PLC0415
    from servers.http import Reply, json_reply  # noqa: PLC0415

    seed = seed_for_result_bytes(image_bytes)
    seed_url = f"http://127.0.0.1:{port}{SEED_PATH}"
    seed_image = _memoise(rw if provider == "runware" else fal_mod, seed, seed_url)

    class Bench:
        """What both benchmark fakes add: the seed, the stats, the delay, the counts."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.accept_times: list[float] = []
            self.calls = 0
            self.kinds: Counter[str] = Counter()
            self.seen: dict[str, float] = {}  # task -> when a poll first answered it done
            self.fetched: dict[str, float] = {}  # result path -> when it was first served

        def handle(self, handler: Any, raw: bytes) -> None:
            if request_delay_s and handler.path.split("?")[0] != "/bench/stats":
                time.sleep(request_delay_s)
            super().handle(handler, raw)  # type: ignore[misc]

        def dispatch(self, call: Any, raw: bytes) -> Reply:
            path = call.path.split("?")[0]
            if path == SEED_PATH:
                with self.lock:  # type: ignore[attr-defined]
                    self.kinds["source"] += 1  # the worker's, not the provider's
                return Reply(200, seed, {"Content-Type": "image/png"})
            if path == "/bench/stats":
                return json_reply(200, self.stats())
            with self.lock:  # type: ignore[attr-defined]
                self.calls += 1
                self.kinds[_request_kind(provider, call)] += 1
                # The base class keeps every request (bodies included) for the tests;
                # a benchmark only needs the count, and 5 MB seeds would pile up.
                self.requests.clear()  # type: ignore[attr-defined]
            reply: Reply = super().dispatch(call, raw)  # type: ignore[misc]
            if reply.status == 200 and call.method == "GET":
                with self.lock:  # type: ignore[attr-defined]
                    self.fetched.setdefault(path, time.monotonic())
            return reply

        def stats(self) -> dict[str, Any]:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            with self.lock:  # type: ignore[attr-defined]
                paid = self.paid_ids()
                return {
                    "paid": len(paid),
                    "unique_paid": len(set(paid)),
                    "paid_prompts": self.paid_prompts(),
                    "accept_times": list(self.accept_times),
                    "tasks": self.intervals(),
                    "now": time.monotonic(),
                    "requests": self.calls,
                    "kinds": dict(self.kinds),
                    "cpu_s": usage.ru_utime + usage.ru_stime,
                }

        def paid_ids(self) -> list[str]:
            raise NotImplementedError

        def paid_prompts(self) -> list[str]:
            """The prompt of every paid task, in order: a row paid twice under two task
            ids shows as its prompt twice."""
            raise NotImplementedError

        def intervals(self) -> list[tuple[float, float, float | None, float | None]]:
            """Per task, in order of acceptance: when it started generating, when it was
            done, when a poll first said so, when its result was first downloaded (None:
            never)."""
            raise NotImplementedError

    class BenchRunware(Bench, rw.FakeRunware):
        def _accept(self, job: Any) -> None:
            super()._accept(job)
            with self.lock:
                self.accept_times.append(time.time())

        def paid_ids(self) -> list[str]:
            return list(self.paid)

        def paid_prompts(self) -> list[str]:
            return [str(self.accepted[u]["positivePrompt"]) for u in self.paid]

        def _get_response(self, task: dict[str, Any]) -> Any:
            outcome = super()._get_response(task)
            states = [item.get("status") for item in outcome.data]
            if states and "processing" not in states:
                with self.lock:
                    self.seen.setdefault(str(task["taskUUID"]), time.monotonic())
            return outcome

        def intervals(self) -> list[tuple[float, float, float | None, float | None]]:
            return [
                (job.accepted_at, job.accepted_at + job.processing_s, self.seen.get(uuid),
                 self.fetched.get(f"/images/{job.results[-1].image_uuid}.{job.extension}"))
                for uuid, job in self._jobs.items()
            ]  # fmt: skip

    class BenchFal(Bench, fal_mod.FakeFal):
        def _accept(self, *args: Any) -> Any:
            request = super()._accept(*args)
            self.accept_times.append(time.time())  # the caller holds the lock
            return request

        def paid_ids(self) -> list[str]:
            return list(self.submitted)  # every accepted submit is a new request

        def paid_prompts(self) -> list[str]:
            return [str(self.submissions[r]["prompt"]) for r in self.submitted]

        def _status(self, call: Any, raw: bytes, request_id: str) -> Reply:
            reply = super()._status(call, raw, request_id)
            if reply.status == 200:
                with self.lock:
                    self.seen.setdefault(request_id, time.monotonic())
            return reply

        def intervals(self) -> list[tuple[float, float, float | None, float | None]]:
            return [
                (r.started_at, r.ends_at, self.seen.get(rid), self.fetched.get(self._path(r)))
                for rid, r in self._requests.items()
                if r.started_at is not None
            ]

        def _path(self, request: Any) -> str:
            images = getattr(request.outcome, "images", None)
            return urlsplit(images[-1]["url"]).path if images else ""

    http_mod._Server.request_queue_size = 1024  # 200 rows in flight poll at once
    fake: Any
    if provider == "runware":
        fake = BenchRunware(key, processing_s=processing_s, processing_spread=spread,
                            spread_seed=spread_seed)  # fmt: skip
    else:
        # No queue of the fake's own: a request starts generating when it is accepted.
        fake = BenchFal(key, queue_s=0.0, processing_s=processing_s, processing_spread=spread,
                        spread_seed=spread_seed)  # fmt: skip
    # Bind the requested port: FakeHTTPServer binds port 0, so re-create its server.
    fake._server.server_close()
    fake._server = http_mod._Server(("127.0.0.1", port), http_mod.Handler)
    fake._server.owner = fake
    fake._thread = threading.Thread(
        target=fake._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    api_url = fake.url if provider == "runware" else fake.queue_url
    with fake:
        result = http_mod.render_result(seed_image(), 0, "PNG", 95)
        print(f"READY {api_url} {seed_url} {len(result)}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            sys.stdin.read()  # until the parent closes our stdin (or dies)


class FakeProvider:
    """``with FakeProvider(processing_s=2, image_bytes=65536) as fake:`` a fake Runware (or
    with ``provider="fal"``, a fake fal) in its own process; ``fake.url``, ``fake.seed_url``,
    ``fake.stats()``, and ``fake.env()`` for a worker to reach it."""

    def __init__(
        self, processing_s: float, image_bytes: int, port: int, key: str | None = None, *,
        provider: str = "runware", spread: float = 0.0, spread_seed: int = 0,
        request_delay_s: float = 0.0,
    ) -> None:  # fmt: skip
        key = key or (KEY if provider == "runware" else FAL_KEY)
        self.args = [
            sys.executable, "-m", "bench.fake_provider", "--port", str(port),
            "--processing-s", str(processing_s), "--image-bytes", str(image_bytes),
            "--key", key, "--provider", provider, "--spread", str(spread),
            "--spread-seed", str(spread_seed), "--request-delay-s", str(request_delay_s),
        ]  # fmt: skip
        self.key = key
        self.provider = provider
        self.proc: subprocess.Popen[str] | None = None
        self.url = self.seed_url = self.base = ""
        self.result_bytes = 0
        self.pid = 0

    def __enter__(self) -> FakeProvider:
        env = {**os.environ, **AWS_DUMMY_ENV, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            self.args, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "READY":
            self.proc.kill()
            raise RuntimeError(f"fake provider did not start: {line}")
        # url: Runware's API endpoint, or fal's queue; result_bytes: one result's size (PNG),
        # as the worker downloads it
        self.url, self.seed_url, self.result_bytes = line[1], line[2], int(line[3])
        self.pid = self.proc.pid
        self.base = self.seed_url.removesuffix(SEED_PATH)
        return self

    def env(self) -> dict[str, str]:
        """The variables that point a worker (or `Settings()`) at this fake."""
        if self.provider == "runware":
            return {"RUNWARE_API_KEY": self.key, "RUNWARE_API_URL": self.url}
        return {"FAL_KEY": self.key, "FAL_QUEUE_URL": self.url, "FAL_REST_URL": f"{self.base}/rest"}

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
    parser.add_argument("--key", default=None)
    parser.add_argument("--provider", choices=("runware", "fal"), default="runware")
    parser.add_argument("--spread", type=float, default=0.0)
    parser.add_argument("--spread-seed", type=int, default=0)
    parser.add_argument("--request-delay-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    key = args.key or (KEY if args.provider == "runware" else FAL_KEY)
    serve(args.port, args.processing_s, args.image_bytes, key, args.provider, args.spread,
          args.spread_seed, args.request_delay_s)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
