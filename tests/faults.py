"""A batch through two real `celery -A worker worker` processes while one of them meets a
fault, against a strict fake provider: the harness of tests/test_fencing.py and of
`python -m bench.paid_once`.

    with FileServer() as files, provider("fal") as paid:
        outcome = run_with_fault(tmp_path, redis_url, paid, "sigstop", files, rows=40)

The faults, all on the first worker, at a quiet moment (below):

- ``sigkill``: killed; its leases lapse and the other worker's watchdog takes its rows over.
- ``sigterm``: a warm shutdown; it hands its rows back and exits.
- ``sigstop``: frozen until its rows were taken over, then SIGCONT: it comes back with
  everything it held in memory.
- ``dark``: its link to Redis (broker and state) goes dark through a TCP proxy until its
  rows were taken over, then the link comes back; the provider stays reachable throughout.
- ``none``: the baseline.

Every row's output is a presigned-style URL on a recording server, so each result
object's writes can be counted; every row's prompt is its own, so the fake's record of
accepted (paid) requests can be counted per row.

The quiet moment: the fault starts when no row has an intent to submit without its
outcome. A global rate limit spaces submits apart (``rate``); a fal submit cut off between
fal's acceptance and the worker reading the answer is the documented unknown outcome (the
row fails with `provider.submit_unknown`, paid once), which is not what this measures.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batching import bgswap, clean_env, manifest_lines, png, start_worker
from producer import runner
from servers.fal import FakeFal
from servers.files import FileServer
from servers.proxy import DarkProxy
from servers.runware import FakeRunware
from worker.state import BatchStore

BATCH = "fence"
LEASE_S = 4.0  # leases lapse, and stalled workers are taken over, within seconds
KEY_RW = "rw-fencing-key"
KEY_FAL = "fal-id:fal-fencing-secret"
FAULTS = ("none", "sigkill", "sigterm", "sigstop", "dark")


@dataclass
class Provider:
    """What the harness needs of one provider's fake: its env, and its record of payments."""

    name: str
    env: dict[str, str]
    accepted_prompts: Callable[[], list[str]]  # the prompt of every accepted (paid) request
    intent_open: Callable[[dict[str, Any]], bool]  # memory: about to submit, no outcome yet
    accepted: Callable[[dict[str, Any]], bool]  # memory: the provider's id is saved


@contextmanager
def provider(name: str, rate: str = "8/s", processing_s: float = 3.0) -> Iterator[Provider]:
    common = {"BGSWAP_RETRY_BASE_S": "0.2"}
    if name == "runware":
        with FakeRunware(KEY_RW, processing_s=processing_s) as rw:
            yield Provider(
                name,
                {**common, "RUNWARE_API_KEY": KEY_RW, "RUNWARE_API_URL": rw.url,
                 "BGSWAP_RUNWARE_RATE": rate, "BGSWAP_RUNWARE_POLL_INITIAL_S": "0.3",
                 "BGSWAP_RUNWARE_POLL_MAX_S": "0.5"},
                lambda: [rw.accepted[u]["positivePrompt"] for u in list(rw.paid)],
                lambda m: bool(m.get("attempted")) and not m.get("accepted"),
                lambda m: bool(m.get("accepted")),
            )  # fmt: skip
    else:
        with FakeFal(KEY_FAL, queue_s=0.1, processing_s=processing_s) as fal:
            yield Provider(
                name,
                {**common, "FAL_KEY": KEY_FAL, "FAL_QUEUE_URL": fal.queue_url,
                 "FAL_REST_URL": fal.rest_url, "BGSWAP_FAL_RATE": rate,
                 "BGSWAP_FAL_POLL_INITIAL_S": "0.3", "BGSWAP_FAL_POLL_MAX_S": "0.5"},
                lambda: [fal.submissions[r]["prompt"] for r in list(fal.submitted)],
                lambda m: bool(m.get("submitting")) and "request_id" not in m,
                lambda m: "request_id" in m,
            )  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    lines: list[dict[str, Any]]  # the output manifest
    prompts: list[str]  # the prompt of every request the provider accepted (paid)
    puts: Counter[str]  # writes per result object
    stalled_log: str  # what the worker that met the fault logged

    @property
    def paid_per_row(self) -> float:
        return len(self.prompts) / len(self.lines)

    @property
    def paid_twice(self) -> int:
        return sum(n > 1 for n in Counter(self.prompts).values())

    @property
    def overwritten(self) -> int:
        return sum(n > 1 for n in self.puts.values())

    @property
    def failed(self) -> list[tuple[str, Any]]:
        return [(x["id"], x["error"]) for x in self.lines if x["status"] != "succeeded"]


@dataclass
class Fault:
    """How the first worker is cut off, and brought back."""

    start: Callable[[], None]
    end: Callable[[], None] = lambda: None


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


def quiet_moment(store: BatchStore, paid: Provider, at_least: int) -> None:
    """Wait until ``at_least`` rows were accepted and every submit that went out has its
    outcome saved: the next one is a rate-limit interval away."""

    def quiet() -> bool:
        memories = [m for _, m in store.provider_memories(BATCH)]
        if any(paid.intent_open(m) for m in memories):
            return False
        saved = sum(paid.accepted(m) for m in memories)
        return saved >= at_least and saved == len(paid.accepted_prompts())

    wait_until(quiet, 60, f"{at_least} rows accepted, none mid-submit", step=0.002)


def taken_over(store: BatchStore, rows: int) -> bool:
    """Some row changed hands and was adopted again (epoch 3 or more: adopt, claim or
    hand-back, adopt), and no lease has lapsed unclaimed."""
    epochs = [store.epoch(BATCH, i) for i in range(rows)]
    lapsed = store.redis.zrangebyscore(f"bgswap:{{{BATCH}}}:due", "-inf", time.time() * 1000)
    return max(epochs) >= 3 and not lapsed


def write_manifest(tmp_path: Path, files: FileServer, rows: int) -> None:
    seed = files.add("/seed.png", png(), "image/png")
    lines = "".join(f"r{i},{seed},p{i},{files.url(f'/out/r{i}.img')}\n" for i in range(rows))
    (tmp_path / "m.csv").write_text("id,image,prompt,output\n" + lines)


def stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGCONT)  # in case it is still frozen
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def first_worker(
    how: str, env: dict[str, str], log: Path, redis_url: str, stack: ExitStack
) -> tuple[subprocess.Popen[bytes], Fault]:
    """The worker that meets the fault, and the fault."""
    if how == "dark":
        port = urlsplit(redis_url).port
        assert port is not None
        proxy = stack.enter_context(DarkProxy("127.0.0.1", port))
        # Its link to Redis: the broker's too, unless the broker is elsewhere (RabbitMQ).
        link = "BGSWAP_REDIS_URL" if "BGSWAP_REDIS_URL" in env else "BGSWAP_BROKER_URL"
        return start_worker({**env, link: proxy.url}, log), Fault(proxy.dark, proxy.light)
    worker = start_worker(env, log)

    def term() -> None:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)

    faults = {
        "none": Fault(lambda: None),
        "sigkill": Fault(worker.kill),
        "sigterm": Fault(term),
        "sigstop": Fault(
            lambda: worker.send_signal(signal.SIGSTOP), lambda: worker.send_signal(signal.SIGCONT)
        ),
    }
    return worker, faults[how]


def run_with_fault(
    tmp_path: Path,
    redis_url: str,
    paid: Provider,
    how: str,
    files: FileServer,
    rows: int,
    broker_url: str | None = None,
) -> Outcome:
    """Submit ``rows`` rows to two workers; the first meets the fault once a fifth of the
    rows were accepted; wait for the batch. The broker is ``redis_url`` itself, or
    ``broker_url`` (RabbitMQ: tests/test_rabbitmq.py) with the state in ``redis_url``."""
    write_manifest(tmp_path, files, rows)
    brokers = {"BGSWAP_BROKER_URL": broker_url or redis_url}
    if broker_url:
        brokers["BGSWAP_REDIS_URL"] = redis_url
    env = clean_env(
        **paid.env, **brokers, BGSWAP_ALLOW_PRIVATE_URLS="1",
        BGSWAP_ROW_LEASE_S=str(LEASE_S), BGSWAP_VISIBILITY_TIMEOUT_S="12",
        # Half the rows each at most: both workers hold rows whichever starts first.
        BGSWAP_WORKER_MAX_ROWS=str(rows // 2),
    )  # fmt: skip
    store = BatchStore.from_url(redis_url)
    with ExitStack() as stack:
        first, fault = first_worker(how, env, tmp_path / "w1.log", redis_url, stack)
        stack.callback(stop, first)
        second = start_worker(env, tmp_path / "w2.log")
        stack.callback(stop, second)
        submit = bgswap("submit", "m.csv", "--provider", paid.name, "--output", "out",
                        "--batch-id", BATCH, cwd=tmp_path, env=env, timeout=60)  # fmt: skip
        assert submit.returncode == 0, submit.stderr
        if how != "none":

            def holders() -> set[str]:
                return set(store.redis.hvals(f"bgswap:{{{BATCH}}}:lease"))

            # The second worker may start consuming after the first adopted its share.
            wait_until(lambda: len(holders()) == 2, 60, "both workers to hold rows")
            quiet_moment(store, paid, at_least=rows // 5)
            held = holders()
            fault.start()
            assert len(held) == 2, held  # both workers held rows at the fault
            wait_until(lambda: taken_over(store, rows), 60, "the rows to be taken over")
            fault.end()
        meta = runner.wait_for_batch(store, BATCH, lambda c, t: None, timeout_s=180)
        prompts = paid.accepted_prompts()
    puts = Counter(r.path for r in files.requests if r.method == "PUT")
    return Outcome(
        manifest_lines(Path(meta["manifest_url"])),
        prompts,
        puts,
        (tmp_path / "w1.log").read_text(),
    )
