"""The fal client against the strict fake (tests/servers/fal.py): every option on the wire,
the queue protocol, and faults -- asserting through the fake's record how many times each
row was submitted (paid)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from examples.make_examples import product_shot
from servers.fal import FakeFal
from servers.files import FileServer
from servers.s3 import moto_s3, use_dummy_aws_env
from worker.errors import (
    Codes,
    ImageRejected,
    ProviderAccountError,
    ProviderRejected,
    ProviderUnavailable,
    RowCanceled,
    SourceRejected,
)
from worker.fetch import SourceFetcher
from worker.jobs import ColorPalette, Job, JobSpec, PaletteMember
from worker.providers.base import DictMemory, ProviderContext, ProviderResult, run_to_completion
from worker.providers.fal import FalProvider, fal_input
from worker.settings import Settings

KEY = "fal-id:fal-SECRET"


def png(kind: str = "box", size: tuple[int, int] = (80, 60)) -> bytes:
    buf = io.BytesIO()
    product_shot(kind, size, (240, 240, 240), 7).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


@pytest.fixture
def fake() -> Iterator[FakeFal]:
    with FakeFal(KEY, queue_s=0.05, processing_s=0.1) as server:
        yield server


def settings_for(fake: FakeFal, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "fal_key": KEY,
        "fal_queue_url": fake.queue_url,
        "fal_rest_url": fake.rest_url,
        "allow_private_urls": True,
        "fal_poll_initial_s": 0.05,
        "fal_poll_max_s": 0.2,
        "fal_http_timeout_s": 2.0,
        "fal_timeout_s": 20.0,
    }
    values.update(overrides)
    return Settings(**values)


class Runner:
    """One provider, one row's memory: `run()` is one delivery of the row's job."""

    def __init__(self, settings: Settings, spec: JobSpec) -> None:
        self.provider = FalProvider(settings)
        self.memory = DictMemory()
        self.job = Job(batch_id="b", index=0, line=2, spec=spec, dest="/nowhere/b/x")
        self.canceled = False
        self.ctx = ProviderContext(
            fetch=SourceFetcher(settings),
            max_image_pixels=settings.max_image_pixels,
            memory=self.memory,
            canceled=lambda: self.canceled,
        )

    def run(self) -> ProviderResult:
        return run_to_completion(self.provider, self.job, self.ctx)

    def run_until_done(self, attempts: int = 5) -> ProviderResult:
        for _ in range(attempts - 1):
            try:
                return self.run()
            except ProviderUnavailable:
                continue
        return self.run()


def spec(image: str, **options: Any) -> JobSpec:
    prompt = options.pop("prompt", "a sunlit picnic")
    return JobSpec(id="sku-1", image=image, prompt=prompt, provider="fal", **options)


@pytest.fixture
def seed_url(files: FileServer) -> str:
    return files.add("/seed.png", png(), "image/png")


def only_input(fake: FakeFal) -> dict[str, Any]:
    (request_id,) = fake.submitted
    body: dict[str, Any] = fake.submissions[request_id]
    return body


# -- every option reaches the wire ------------------------------------------------------

OPTION_CASES = [
    ({"prompt": "an opulent boutique window"}, "prompt", "an opulent boutique window"),
    ({"rendering_speed": "TURBO"}, "rendering_speed", "TURBO"),
    ({"rendering_speed": "QUALITY"}, "rendering_speed", "QUALITY"),
    ({"magic_prompt": "ON"}, "expand_prompt", True),
    ({"magic_prompt": "AUTO"}, "expand_prompt", True),
    ({"magic_prompt": "OFF"}, "expand_prompt", False),
    ({"style_type": "DESIGN"}, "style", "DESIGN"),
    ({"style_code": "0a1b2c3d"}, "style_codes", ["0A1B2C3D"]),
    ({"style_preset": "WATERCOLOR"}, "style_preset", "WATERCOLOR"),
    ({"color_palette": ColorPalette(name="EMBER")}, "color_palette", {"name": "EMBER"}),
    (
        {
            "color_palette": ColorPalette(
                members=(PaletteMember(rgb=(255, 0, 16), weight=0.5), PaletteMember(rgb=(1, 2, 3)))
            )
        },
        "color_palette",
        {
            "members": [
                {"rgb": {"r": 255, "g": 0, "b": 16}, "color_weight": 0.5},
                {"rgb": {"r": 1, "g": 2, "b": 3}},
            ]
        },
    ),
    ({"seed": 12345}, "seed", 12345),
    ({"num_results": 3}, "num_images", 3),
]


@pytest.mark.parametrize(("options", "field", "wire"), OPTION_CASES)
def test_option_reaches_the_wire(
    fake: FakeFal, seed_url: str, options: dict[str, Any], field: str, wire: Any
) -> None:
    result = Runner(settings_for(fake), spec(seed_url, **options)).run()
    body = only_input(fake)
    assert body[field] == wire
    assert body["image_url"] == seed_url
    assert len(result.outputs) == options.get("num_results", 1)
    assert fake.submit_count() == 1


def test_defaults_send_only_the_required_fields(fake: FakeFal, seed_url: str) -> None:
    result = Runner(settings_for(fake), spec(seed_url)).run()
    assert set(only_input(fake)) == {"prompt", "image_url", "num_images"}
    assert result.cost_usd == pytest.approx(0.06)  # BALANCED, one image
    assert result.provider_task_id == fake.submitted[0]


def test_results_seed_cost_and_images(fake: FakeFal, seed_url: str) -> None:
    result = Runner(
        settings_for(fake), spec(seed_url, num_results=3, rendering_speed="QUALITY", seed=7)
    ).run()
    assert result.cost_usd == pytest.approx(0.27)
    assert len(result.outputs) == 3 and len({o.data for o in result.outputs}) == 3
    for out in result.outputs:
        assert out.seed is not None and out.content_type == "image/png"
        assert (out.width, out.height) == (80, 60) and out.data.startswith(b"\x89PNG")


def test_output_format_is_honoured_by_re_encoding(fake: FakeFal, seed_url: str) -> None:
    result = Runner(
        settings_for(fake), spec(seed_url, output_format="JPG", output_quality=60)
    ).run()
    (out,) = result.outputs
    assert out.content_type == "image/jpeg" and out.extension == "jpg"
    with Image.open(io.BytesIO(out.data)) as img:
        assert img.format == "JPEG" and img.size == (80, 60)
    assert "output_format" not in only_input(fake)  # fal has no such field


def test_local_data_and_s3_inputs_go_through_fal_storage(
    fake: FakeFal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "seed.png"
    local.write_bytes(png("mug"))
    data_uri = "data:image/png;base64," + base64.b64encode(png("ring")).decode()
    use_dummy_aws_env(monkeypatch)
    with moto_s3() as s3:
        s3.client.put_object(Bucket=s3.bucket, Key="refs/r.png", Body=png("bottle"))
        settings = settings_for(fake, s3_endpoint_url=s3.endpoint_url)
        refs = (data_uri, f"s3://{s3.bucket}/refs/r.png", str(local))
        runner = Runner(settings, spec(str(local), style_reference_images=refs))
        runner.run()
    body = only_input(fake)
    file_urls = [u.file_url for u in fake.uploads]
    assert len(file_urls) == 3  # the local file went up once, though named twice
    assert body["image_url"] == file_urls[0]
    assert body["image_urls"] == [file_urls[1], file_urls[2], file_urls[0]]
    assert all(not u.authorization_sent for u in fake.uploads)  # the key stays with fal's API
    assert {u.content_type for u in fake.uploads} == {"image/png"}


@pytest.mark.parametrize("where", ["local", "url"])
def test_a_source_that_is_not_an_image_is_neither_uploaded_nor_passed_on(
    fake: FakeFal, files: FileServer, tmp_path: Path, where: str
) -> None:
    local = tmp_path / "shadow.png"
    local.write_bytes(b"root:$6$salt$hash:19000:0:99999:7:::\n")
    refs = {"local": str(local), "url": files.add("/x.png", b"not an image", "image/png")}
    with pytest.raises(ImageRejected) as info:
        Runner(settings_for(fake), spec(refs[where])).run()
    assert info.value.code == Codes.IMAGE_UNREADABLE
    assert fake.uploads == [] and fake.submit_count() == 0


def test_headers_from_settings(fake: FakeFal, seed_url: str) -> None:
    Runner(
        settings_for(fake, fal_start_timeout_s=120, fal_queue_priority="low"), spec(seed_url)
    ).run()
    headers = fake.headers_of(fake.submitted[0])
    assert headers["x-fal-request-timeout"] == "120" and headers["x-fal-queue-priority"] == "low"
    assert headers["authorization"] == f"Key {KEY}"


def test_polls_use_the_owner_app_urls_and_queue_position_is_kept(seed_url: str) -> None:
    with FakeFal(KEY, queue_s=0.4, processing_s=0.1, concurrency=1) as fake:
        runner = Runner(settings_for(fake), spec(seed_url))
        runner.run()
        polls = [r.path for r in fake.requests if r.method == "GET" and "/requests/" in r.path]
    assert polls and all(p.startswith("/fal-ai/ideogram/requests/") for p in polls)
    assert runner.memory.value["request_id"] == fake.submitted[0]
    assert runner.memory.value["cancel_url"].endswith(
        f"/fal-ai/ideogram/requests/{fake.submitted[0]}/cancel"
    )
    assert "queue_position" in runner.memory.value


def test_fal_input_is_pure() -> None:
    body = fal_input(spec("https://x/y.png", magic_prompt="OFF"), image_url="u", image_urls=None)
    assert body == {
        "prompt": "a sunlit picnic",
        "image_url": "u",
        "num_images": 1,
        "expand_prompt": False,
    }


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        ("content_policy_violation", Codes.PROVIDER_CONTENT_POLICY),
        ("image_too_small", "provider.image_too_small"),
        ("image_too_large", "provider.image_too_large"),
        ("image_load_error", "provider.image_load_error"),
        ("file_download_error", "provider.file_download_error"),
    ],
)
def test_model_errors_fail_the_row_with_their_type(
    fake: FakeFal, seed_url: str, error_type: str, code: str
) -> None:
    fake.inject("model_error", type=error_type)
    with pytest.raises(ProviderRejected) as info:
        Runner(settings_for(fake), spec(seed_url)).run()
    assert info.value.code == code and KEY not in str(info.value)
    assert fake.submit_count() == 1


def test_an_unreachable_image_url_fails_before_fal_is_asked(
    fake: FakeFal, files: FileServer
) -> None:
    """Every source is fetched and checked before it is passed on (fal's own
    file_download_error is still mapped: test_model_errors_fail_the_row_with_their_type)."""
    with pytest.raises(SourceRejected) as info:
        Runner(settings_for(fake), spec(files.url("/missing.png"))).run()
    assert info.value.code == "source.not_found"
    assert fake.submit_count() == 0


def test_validation_422_is_permanent(fake: FakeFal, seed_url: str) -> None:
    fake.inject(
        "status",
        status=422,
        body=b'{"detail":[{"loc":["body","prompt"],"msg":"bad","type":"value_error"}]}',
        content_type="application/json",
    )
    with pytest.raises(ProviderRejected) as info:
        Runner(settings_for(fake), spec(seed_url)).run()
    assert info.value.code == Codes.PROVIDER_INVALID_REQUEST


@pytest.mark.parametrize(
    ("lock", "code"), [(False, Codes.PROVIDER_AUTH), (True, Codes.PROVIDER_CREDITS)]
)
def test_auth_and_locked_accounts_are_account_errors(seed_url: str, lock: bool, code: str) -> None:
    with FakeFal(KEY if lock else "another:key") as fake:
        if lock:
            fake.lock_account("Exhausted balance")
        with pytest.raises(ProviderAccountError) as info:
            Runner(settings_for(fake), spec(seed_url)).run()
    assert info.value.code == code and KEY not in info.value.message


def test_missing_key_fails_before_any_request(fake: FakeFal, seed_url: str) -> None:
    with pytest.raises(ProviderAccountError):
        Runner(settings_for(fake, fal_key=None), spec(seed_url)).run()
    assert fake.requests == []


def test_a_user_start_timeout_is_never_retried(seed_url: str) -> None:
    with FakeFal(KEY, queue_s=3.0, processing_s=0.1, concurrency=1) as fake:
        runner = Runner(settings_for(fake, fal_start_timeout_s=1), spec(seed_url))
        with pytest.raises(ProviderRejected) as info:
            runner.run()
    assert info.value.code == Codes.PROVIDER_REQUEST_TIMEOUT and not info.value.retryable


def test_an_expired_result_fails_the_row(fake: FakeFal, seed_url: str) -> None:
    fake.inject("expire")
    with pytest.raises(ProviderRejected) as info:
        Runner(settings_for(fake), spec(seed_url)).run()
    assert info.value.code == Codes.PROVIDER_RESULT_EXPIRED


# -- faults: how many times each row is submitted ----------------------------------------


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("status", {"status": 429, "retry_after": "1"}),
        ("status", {"status": 502, "ingress": True}),
        ("status", {"status": 503, "ingress": True}),
        ("status", {"status": 504, "ingress": True}),
    ],
)
def test_refused_submits_are_retried_and_paid_once(
    fake: FakeFal, seed_url: str, kind: str, params: dict[str, Any]
) -> None:
    """A 429, or an ingress page (nginx, no x-fal-request-id): nothing reached the queue."""
    fake.inject(kind, **params)  # type: ignore[arg-type]
    runner = Runner(settings_for(fake), spec(seed_url))
    with pytest.raises(ProviderUnavailable) as info:
        runner.run()
    if params["status"] == 429:
        assert info.value.code == Codes.PROVIDER_RATE_LIMITED and info.value.retry_after_s == 1.0
    assert len(runner.run().outputs) == 1
    assert fake.submit_count() == 1


@pytest.mark.parametrize(
    ("kind", "params", "accepted"),
    [
        ("accept_then_drop", {}, 1),
        ("malformed", {}, 0),  # named a request fal then does not know
        ("status", {"status": 500, "error_type": "internal_error"}, 0),  # likewise
        (
            "accept_then_status",
            {"status": 502, "body": b"<html>Bad gateway</html>", "content_type": "text/html"},
            1,
        ),
        ("slow", {"delay_s": 3.0}, 1),
    ],
)
def test_unknown_outcomes_are_never_resubmitted(
    fake: FakeFal, seed_url: str, kind: str, params: dict[str, Any], accepted: int
) -> None:
    fake.inject(kind, **params)  # type: ignore[arg-type]
    runner = Runner(settings_for(fake, fal_submit_timeout_s=1.0), spec(seed_url))
    for _ in range(2):  # the first delivery, then a redelivery of the same row
        with pytest.raises(ProviderRejected) as info:
            runner.run()
        assert info.value.code == Codes.PROVIDER_SUBMIT_UNKNOWN
        assert "bgswap retry" in info.value.message
    deadline = 4.0 if kind == "slow" else 0.0
    import time

    time.sleep(deadline)  # a slow submit lands after the client gave up
    assert fake.submit_count() == accepted  # sent once, never again


def test_resubmit_unknown_opt_in(fake: FakeFal, seed_url: str) -> None:
    fake.inject("accept_then_drop")
    runner = Runner(settings_for(fake, fal_resubmit_unknown=True), spec(seed_url))
    result = runner.run_until_done()
    assert len(result.outputs) == 1
    assert fake.submit_count() == 2  # the documented price of opting in


def test_resubmit_unknown_opt_in_after_a_named_request_fal_does_not_know(
    fake: FakeFal, seed_url: str
) -> None:
    fake.inject("status", status=500, error_type="internal_error")
    runner = Runner(settings_for(fake, fal_resubmit_unknown=True), spec(seed_url))
    assert len(runner.run_until_done().outputs) == 1
    assert fake.submit_count() == 1  # the first was never queued: paid once after all


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("accept_then_status", {"status": 503, "error_type": "runner_unavailable"}),
        ("accept_then_status", {"status": 500, "error_type": "internal_error"}),
        ("malformed", {"after_accept": True}),
    ],
)
def test_an_answer_naming_its_request_is_polled_not_resent(
    fake: FakeFal, seed_url: str, kind: str, params: dict[str, Any]
) -> None:
    """fal's own 5xx (or an unreadable 2xx) carries x-fal-request-id: it reached fal, which
    named the request. fal_client never re-sends those; bgswap polls the request named."""
    fake.inject(kind, **params)  # type: ignore[arg-type]
    runner = Runner(settings_for(fake), spec(seed_url))
    result = runner.run()
    assert len(result.outputs) == 1
    assert fake.submit_count() == 1 and result.provider_task_id == fake.submitted[0]
    assert "unconfirmed" not in runner.memory.value  # fal knew it: a request like any other
    status_url = runner.memory.value["status_url"]
    assert status_url.startswith(f"{fake.queue_url}/fal-ai/ideogram/requests/")  # owner/app


def test_a_slow_queue_answer_is_waited_for(fake: FakeFal, seed_url: str) -> None:
    """The submit waits as long as fal_client does (120 s), not the 30 s of other calls."""
    fake.inject("slow", delay_s=2.0)
    runner = Runner(settings_for(fake, fal_http_timeout_s=1.0), spec(seed_url))
    assert len(runner.run().outputs) == 1
    assert fake.submit_count() == 1


def test_urls_off_the_queue_host_are_refused_and_the_key_goes_nowhere(
    fake: FakeFal, seed_url: str, files: FileServer
) -> None:
    fake.inject("foreign_urls", base=files.url(""))
    runner = Runner(settings_for(fake), spec(seed_url))
    with pytest.raises(ProviderRejected) as info:
        runner.run()
    assert info.value.code == Codes.PROVIDER_BAD_RESPONSE and not info.value.retryable
    assert "status_url" not in runner.memory.value  # never saved, so never followed
    assert not runner.provider.cancel({"cancel_url": files.url("/fal-ai/x/requests/1/cancel")})
    assert {r.path for r in files.requests} <= {"/seed.png"}  # at most the source, by fal
    assert all("authorization" not in r.headers for r in files.requests)
    assert fake.submit_count() == 1


def test_status_polls_ask_for_no_logs(fake: FakeFal, seed_url: str) -> None:
    Runner(settings_for(fake), spec(seed_url)).run()
    polls = [r for r in fake.requests if urlsplit(r.path).path.endswith("/status")]
    assert polls and all(parse_qs(urlsplit(r.path).query) == {"logs": ["0"]} for r in polls)


def test_a_resumed_job_polls_instead_of_submitting(fake: FakeFal, seed_url: str) -> None:
    first = Runner(settings_for(fake), spec(seed_url))
    first.run()
    again = Runner(settings_for(fake), spec(seed_url))
    again.memory.value = dict(first.memory.value)
    assert len(again.run().outputs) == 1
    assert fake.submit_count() == 1


def test_a_died_mid_submit_row_is_not_resubmitted(fake: FakeFal, seed_url: str) -> None:
    runner = Runner(settings_for(fake), spec(seed_url))
    runner.memory.value = {"submitting": True}  # the last worker died inside the window
    with pytest.raises(ProviderRejected) as info:
        runner.run()
    assert info.value.code == Codes.PROVIDER_SUBMIT_UNKNOWN and fake.submit_count() == 0


def test_slow_and_failing_polls_are_waited_out(fake: FakeFal, seed_url: str) -> None:
    fake.inject("slow", route="status", delay_s=2.5)
    fake.inject("status", route="status", times=2, status=503, error_type="runner_unavailable")
    fake.inject("malformed", route="status")
    result = Runner(settings_for(fake, fal_http_timeout_s=1.0), spec(seed_url)).run()
    assert len(result.outputs) == 1 and fake.submit_count() == 1


def test_a_runner_failure_is_resubmitted_as_a_new_request(fake: FakeFal, seed_url: str) -> None:
    fake.inject("model_error", type="runner_disconnected")
    runner = Runner(settings_for(fake), spec(seed_url))
    with pytest.raises(ProviderUnavailable) as info:
        runner.run()
    assert info.value.code == Codes.PROVIDER_GENERATION_FAILED
    assert "request_id" not in runner.memory.value
    assert len(runner.run().outputs) == 1
    assert fake.submit_count() == 2 and len(fake.billed()) == 1  # the failed one was not billed


def test_cancel_stops_the_wait_and_cancels_the_request(seed_url: str) -> None:
    with FakeFal(KEY, queue_s=5.0, processing_s=0.1) as fake:
        runner = Runner(settings_for(fake), spec(seed_url))
        import threading

        def cancel_soon() -> None:
            while "request_id" not in runner.memory.value:
                threading.Event().wait(0.02)
            assert runner.provider.cancel(runner.memory.value)
            runner.canceled = True

        thread = threading.Thread(target=cancel_soon)
        thread.start()
        with pytest.raises(RowCanceled):
            runner.run()
        thread.join()
        assert fake.canceled == fake.submitted
        assert fake.billed() == []  # canceled while queued: not billed


# -- the status polls of several rows in flight at once (the engine's prefetch) ----------


def status_polls(fake: FakeFal) -> int:
    with fake.lock:
        return sum(1 for call in fake.requests if call.method == "GET" and
                   call.path.split("?")[0].endswith("/status"))  # fmt: skip


def waiting_rows(fake: FakeFal, seed_url: str, n: int) -> list[Runner]:
    """``n`` rows on one provider (as in one worker process), each submitted and waiting."""
    settings = settings_for(fake)
    provider = FalProvider(settings)
    rows = []
    for _ in range(n):
        runner = Runner(settings, spec(seed_url))
        runner.provider = provider
        wait = provider.step(runner.job, runner.ctx)
        assert not isinstance(wait, ProviderResult)
        assert wait.watch == runner.memory.value["status_url"]  # what the engine gathers
        rows.append(runner)
    return rows


def test_the_status_polls_of_several_rows_go_out_together(fake: FakeFal, seed_url: str) -> None:
    rows = waiting_rows(fake, seed_url, 3)
    provider = rows[0].provider
    time.sleep(0.4)  # past the fake's queue and processing time
    before = status_polls(fake)
    provider.prefetch([row.memory.value["status_url"] for row in rows])
    assert status_polls(fake) == before + 3
    results = [provider.step(row.job, row.ctx) for row in rows]
    assert all(isinstance(r, ProviderResult) and len(r.outputs) == 1 for r in results)
    assert status_polls(fake) == before + 3  # each step read its answer, none polled again
    assert fake.submit_count() == 3  # paid once each


def test_gathered_statuses_name_the_requests_still_running(seed_url: str) -> None:
    # Those rows need no step (worker/engine.py); a queued one (its position is shown),
    # a completed one or a failed poll does.
    with FakeFal(KEY, queue_s=0.05, processing_s=1.0, concurrency=1) as slow:
        rows = waiting_rows(slow, seed_url, 2)
        provider = rows[0].provider
        urls = [row.memory.value["status_url"] for row in rows]
        time.sleep(0.2)
        assert provider.prefetch(urls) == {urls[0]}  # the second waits in the queue
        slow.inject("status", route="status", status=503)
        assert provider.prefetch(urls[:1]) == set()
        time.sleep(1.0)
        assert provider.prefetch(urls[:1]) == set()  # completed: its step has its answer
        assert isinstance(provider.step(rows[0].job, rows[0].ctx), ProviderResult)


def test_a_prefetched_status_that_failed_is_that_rows_poll_failing(
    fake: FakeFal, seed_url: str
) -> None:
    (row,) = waiting_rows(fake, seed_url, 1)
    provider = row.provider
    fake.inject("status", route="status", status=503)
    provider.prefetch([row.memory.value["status_url"]])
    polls = status_polls(fake)
    assert not isinstance(provider.step(row.job, row.ctx), ProviderResult)  # waits again
    assert status_polls(fake) == polls
    time.sleep(0.3)
    assert isinstance(run_to_completion(provider, row.job, row.ctx), ProviderResult)
    assert fake.submit_count() == 1


def test_a_status_url_off_the_queues_origin_is_not_prefetched(fake: FakeFal, seed_url: str) -> None:
    (row,) = waiting_rows(fake, seed_url, 1)
    before = status_polls(fake)
    row.provider.prefetch(["http://169.254.169.254/latest/meta-data/status"])
    assert status_polls(fake) == before
    assert row.provider._prefetched.take("http://169.254.169.254/latest/meta-data/status") is None
