"""The job core without Celery: real Redis, a real HTTP source server, real local storage."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from examples.make_examples import product_shot
from producer.batch import SubmitOptions, Submitter, output_root
from producer.manifest import RowDefaults, read_manifest
from servers.files import FileServer
from worker.pipeline import Deps, finalize, handle_delivery
from worker.providers import get_provider
from worker.runtime import build_deps
from worker.settings import Settings
from worker.state import BatchStore


def png_bytes(seed: int = 1) -> bytes:
    buf = io.BytesIO()
    product_shot("box", (96, 96), (240, 240, 240), seed).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


class Harness:
    """A batch submitted through the real Submitter, processed by calling the core directly."""

    def __init__(self, redis_url: str, out: Path, **overrides: object) -> None:
        self.completed: list[str] = []
        self.settings = Settings(
            redis_url=redis_url,
            allow_private_urls=True,
            retry_base_s=0.01,
            retry_cap_s=0.01,
            **overrides,  # type: ignore[arg-type]
        )
        self.deps: Deps = build_deps(self.settings, self.completed.append)
        self.store: BatchStore = self.deps.store
        self.published: list[tuple[str, str, int]] = []
        self.out = out

    def submit(self, csv_text: str, batch_id: str = "b1") -> None:
        submitter = Submitter(
            self.store,
            self.published.extend,
            lambda name: get_provider(name, self.settings),
        )
        options = SubmitOptions(
            batch_id=batch_id,
            output=output_root(str(self.out)),
            defaults=RowDefaults(base_dir=self.out, allow_private_urls=True),
        )
        rows = read_manifest(io.BytesIO(csv_text.encode()), "csv", options.defaults)
        report = submitter.submit(rows, options)
        if report.complete:
            self.completed.append(batch_id)

    def deliver(self, index: int, batch_id: str = "b1") -> float | None:
        return handle_delivery(batch_id, index, self.deps)

    def lines(self, batch_id: str = "b1") -> list[dict[str, object]]:
        assert finalize(batch_id, self.deps) is not None
        manifest = self.out / batch_id / "manifest.jsonl"
        return [json.loads(line) for line in manifest.read_text().splitlines()]


@pytest.fixture
def harness(redis_client: object, redis_url: str, tmp_path: Path) -> Harness:
    return Harness(redis_url, tmp_path)


def test_a_row_goes_from_manifest_to_output_and_manifest(
    harness: Harness, files: FileServer
) -> None:
    url = files.add("/p.png", png_bytes(), "image/png")
    harness.submit(
        f"id,image,prompt,background,cat\nsku 1,{url}?sig=SECRET,a {{cat}} shot,#102030,toys\n"
    )
    assert harness.published == [("b1:sku_1-" + harness.published[0][0].split("-")[-1], "b1", 0)]
    assert harness.deliver(0) is None
    assert harness.completed == ["b1"]
    (line,) = harness.lines()
    assert line["status"] == "succeeded" and line["attempts"] == 1
    assert line["prompt"] == "a toys shot"
    assert line["image"] == url  # the query string (a signature) is gone
    assert "SECRET" not in json.dumps(line)
    assert line["meta"] == {"cat": "toys"}
    (out,) = line["outputs"]  # type: ignore[misc]
    written = Path(out["url"])
    assert written.parent == harness.out / "b1" and written.suffix == ".jpg"
    with Image.open(written) as img:
        assert img.size == (96, 96)
        assert max(abs(a - b) for a, b in zip(img.getpixel((2, 2)), (16, 32, 48), strict=True)) < 12
    assert out["bytes"] == written.stat().st_size


def test_transient_source_error_is_retried_then_succeeds(
    harness: Harness, files: FileServer
) -> None:
    url = files.add("/flaky.png", png_bytes(), "image/png", fail_first=1)
    harness.submit(f"id,image,prompt\nr1,{url},p\n")
    delay = harness.deliver(0)
    assert delay is not None and delay >= 0
    assert harness.store.counts("b1")["queued"] == 1  # released for its retry
    assert harness.deliver(0) is None
    (line,) = harness.lines()
    assert line["status"] == "succeeded" and line["attempts"] == 2


def test_permanent_error_fails_the_row_at_once(harness: Harness, files: FileServer) -> None:
    harness.submit(f"id,image,prompt\nr1,{files.url('/missing.png')},p\n")
    assert harness.deliver(0) is None
    (line,) = harness.lines()
    assert line["status"] == "failed" and line["attempts"] == 1
    error = line["error"]
    assert isinstance(error, dict)
    assert error["code"] == "source.not_found" and error["retryable"] is False
    assert "image" in error["message"] and "/missing.png" in error["message"]


def test_retryable_errors_give_up_after_max_attempts(
    redis_client: object, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    harness = Harness(redis_url, tmp_path, max_attempts=2)
    url = files.add("/down.png", png_bytes(), "image/png", fail_first=99)
    harness.submit(f"id,image,prompt\nr1,{url},p\n")
    assert harness.deliver(0) is not None
    assert harness.deliver(0) is None
    (line,) = harness.lines()
    assert line["error"]["code"] == "job.retries_exhausted"  # type: ignore[index]
    assert line["attempts"] == 2


def test_redelivered_message_of_a_finished_row_does_nothing(
    harness: Harness, files: FileServer
) -> None:
    url = files.add("/p.png", png_bytes(), "image/png")
    harness.submit(f"id,image,prompt\nr1,{url},p\n")
    harness.deliver(0)
    fetched = len(files.requests_to("/p.png"))
    assert harness.deliver(0) is None
    assert len(files.requests_to("/p.png")) == fetched  # not processed again
    assert harness.completed == ["b1"]  # completion fired once
    assert harness.lines()[0]["attempts"] == 1


def test_a_message_that_keeps_coming_back_fails_its_row(
    redis_client: object, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    harness = Harness(redis_url, tmp_path, max_deliveries=2)
    url = files.add("/p.png", png_bytes(), "image/png")
    harness.submit(f"id,image,prompt\nr1,{url},p\n")
    # two deliveries that died mid-row (a worker killed): started but never finished
    harness.store.adopt("b1", 0, "t", harness.deps.token, 60)
    harness.store.adopt("b1", 0, "t", harness.deps.token, 60)
    assert harness.deliver(0) is None
    (line,) = harness.lines()
    assert line["error"]["code"] == "job.too_many_deliveries"  # type: ignore[index]
    assert files.requests_to("/p.png") == []


def test_rejected_rows_keep_their_line_in_input_order(harness: Harness, files: FileServer) -> None:
    url = files.add("/p.png", png_bytes(), "image/png")
    harness.submit(
        "id,image,prompt,style_preset,note\n"
        f"a,{url},p,,first\n"
        f"b,{url},p,NOPE,second\n"
        f"a,{url},p,,dup\n"
        f"c,{url},,,no prompt\n"
    )
    assert [m[2] for m in harness.published] == [0]
    harness.deliver(0)
    lines = harness.lines()
    assert [line["id"] for line in lines] == ["a", "b", "a", "c"]
    assert [line["status"] for line in lines] == ["succeeded", "failed", "failed", "failed"]
    codes = [line["error"]["code"] for line in lines[1:]]  # type: ignore[index]
    assert codes == ["input.invalid_enum", "input.duplicate_id", "input.missing_field"]
    assert (
        "line 3" in lines[1]["error"]["message"] and "style_preset" in lines[1]["error"]["message"]
    )  # type: ignore[index]
    assert lines[1]["meta"] == {"note": "second"}


def test_a_batch_of_only_rejected_rows_is_complete_when_sealed(harness: Harness) -> None:
    harness.submit("id,image,prompt\n,x.png,p\n")
    assert harness.completed == ["b1"]
    assert harness.lines()[0]["error"]["code"] == "input.missing_field"  # type: ignore[index]


def test_a_batch_whose_finalizer_was_not_enqueued_is_finalized_by_the_watchdog(
    tmp_path: Path,
    redis_client: object,
    redis_url: str,
    files: FileServer,
) -> None:
    """The broker was away when the last row was recorded: the finalizer could not be
    enqueued, the row's step still ends well, and the watchdog enqueues it later."""
    from worker.watchdog import Watchdog

    harness = Harness(redis_url, tmp_path)

    def broker_away(batch_id: str) -> None:
        raise ConnectionError("the broker is away")

    harness.deps.on_batch_complete = broker_away
    url = files.add("/p.png", png_bytes(), "image/png")
    harness.submit(f"id,image,prompt\na,{url},p\n", batch_id="fz")
    assert harness.deliver(0, "fz") is None  # done, and no exception
    assert harness.store.meta("fz")["status"] == "finalizing"
    clock = [100.0]
    finalized: list[str] = []
    watchdog = Watchdog(harness.store, lambda b, i: None, lambda: 0, finalized.append,
                        grace_s=30, interval_s=1, clock=lambda: clock[0])  # fmt: skip
    assert watchdog.sweep() == 0 and finalized == []  # first seen finalizing
    clock[0] += 31
    assert watchdog.sweep() == 1 and finalized == ["fz"]
    assert finalize("fz", harness.deps) is not None
    assert harness.store.meta("fz")["status"] == "done"
