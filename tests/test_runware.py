"""The Runware client against the strict fake (tests/servers/runware.py): every option on
the wire, the async protocol, and faults -- asserting through the fake's own record that
every row was accepted (paid) exactly once."""

from __future__ import annotations

import base64
import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from examples.make_examples import product_shot
from servers.files import FileServer
from servers.runware import FakeRunware
from servers.s3 import moto_s3, use_dummy_aws_env
from worker.errors import (
    Ambiguous,
    BgswapError,
    Codes,
    ImageRejected,
    ProviderAccountError,
    ProviderRejected,
    ProviderUnavailable,
)
from worker.fetch import SourceFetcher
from worker.hold import Stale
from worker.jobs import Job, JobSpec
from worker.providers.base import DictMemory, ProviderContext, ProviderResult, run_to_completion
from worker.providers.common import SharedRequests
from worker.providers.runware import (
    Answer,
    Kind,
    Payload,
    RunwareConfig,
    RunwareProvider,
    answer_for,
    classify,
    error_kind,
    inference_task,
    poll_progress,
)
from worker.settings import Settings
from worker.storage import Storage

KEY = "rw-test-key-SECRET"


def png(kind: str = "box", size: tuple[int, int] = (80, 60)) -> bytes:
    buf = io.BytesIO()
    product_shot(kind, size, (240, 240, 240), 7).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


@pytest.fixture
def fake() -> Iterator[FakeRunware]:
    with FakeRunware(KEY, processing_s=0.15) as server:
        yield server


def settings_for(fake: FakeRunware, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "runware_api_key": KEY,
        "runware_api_url": fake.url,
        "allow_private_urls": True,
        "runware_poll_initial_s": 0.05,
        "runware_poll_max_s": 0.2,
        "runware_request_timeout_s": 2.0,
        "runware_timeout_s": 20.0,
    }
    values.update(overrides)
    return Settings(**values)


class Runner:
    """One provider, one row's memory: `run()` is one delivery of the row's job."""

    def __init__(
        self, settings: Settings, spec: JobSpec, dest: str, storage: Storage | None = None
    ) -> None:
        self.provider = RunwareProvider(settings)
        self.memory = DictMemory()
        self.job = Job(batch_id="b", index=0, line=2, spec=spec, dest=dest)
        self.ctx = ProviderContext(
            fetch=SourceFetcher(settings),
            max_image_pixels=settings.max_image_pixels,
            memory=self.memory,
            storage=storage,
        )

    def run(self) -> ProviderResult:
        return run_to_completion(self.provider, self.job, self.ctx)

    def run_until_done(self, attempts: int = 5) -> ProviderResult:
        """Deliveries until one succeeds, as Celery retries would do."""
        for _ in range(attempts - 1):
            try:
                return self.run()
            except ProviderUnavailable:
                continue
        return self.run()


def spec(image: str, **options: Any) -> JobSpec:
    return JobSpec(
        id="sku-1",
        image=image,
        prompt=options.pop("prompt", "a sunlit picnic"),
        provider="runware",
        **options,
    )


@pytest.fixture
def seed_url(files: FileServer) -> str:
    return files.add("/seed.png", png(), "image/png")


def only_task(fake: FakeRunware) -> dict[str, Any]:
    (task,) = fake.tasks("imageInference")
    return task


# -- every option reaches the wire with the right name and value -------------------------

OPTION_CASES = [
    ({"rendering_speed": "TURBO"}, ("providerSettings", "ideogram", "renderingSpeed"), "TURBO"),
    (
        {"rendering_speed": "BALANCED"},
        ("providerSettings", "ideogram", "renderingSpeed"),
        "DEFAULT",
    ),
    ({"rendering_speed": "QUALITY"}, ("providerSettings", "ideogram", "renderingSpeed"), "QUALITY"),
    ({"magic_prompt": "OFF"}, ("providerSettings", "ideogram", "magicPrompt"), "OFF"),
    ({"style_type": "FICTION"}, ("providerSettings", "ideogram", "styleType"), "FICTION"),
    (
        {"style_preset": "MAGAZINE_EDITORIAL"},
        ("providerSettings", "ideogram", "stylePreset"),
        "MAGAZINE_EDITORIAL",
    ),
    ({"style_code": "a1b2c3d4"}, ("providerSettings", "ideogram", "styleCode"), "A1B2C3D4"),
    ({"output_format": "WEBP"}, ("outputFormat",), "WEBP"),
    ({"output_quality": 42}, ("outputQuality",), 42),
    ({"num_results": 2}, ("numberResults",), 2),
    ({"prompt": "an opulent boutique window"}, ("positivePrompt",), "an opulent boutique window"),
]


def dig(task: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = task
    for part in path:
        value = value[part]
    return value


@pytest.mark.parametrize(("options", "path", "wire"), OPTION_CASES)
def test_option_reaches_the_wire(
    fake: FakeRunware,
    seed_url: str,
    tmp_path: Path,
    options: dict[str, Any],
    path: tuple[str, ...],
    wire: Any,
) -> None:
    result = Runner(settings_for(fake), spec(seed_url, **options), str(tmp_path / "o")).run()
    task = only_task(fake)
    assert dig(task, path) == wire
    assert task["model"] == "ideogram:4@5" and task["includeCost"] is True
    assert task["deliveryMethod"] == "async" and task["inputs"] == {"seedImage": seed_url}
    assert len(result.outputs) == options.get("num_results", 1)
    assert fake.accept_count(task["taskUUID"]) == 1


def test_defaults_send_nothing_4at5_rejects(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o")).run()
    task = only_task(fake)
    assert set(task) == {
        "taskType",
        "taskUUID",
        "model",
        "positivePrompt",
        "inputs",
        "outputType",
        "outputFormat",
        "numberResults",
        "includeCost",
        "deliveryMethod",
    }
    assert task["outputFormat"] == "JPG" and task["outputType"] == "URL"


def test_every_result_is_returned_with_cost_and_seed(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    result = Runner(
        settings_for(fake),
        spec(seed_url, num_results=3, rendering_speed="QUALITY", output_format="PNG"),
        str(tmp_path / "o"),
    ).run()
    assert len(result.outputs) == 3
    assert result.cost_usd == pytest.approx(0.27)
    assert result.provider_task_id == only_task(fake)["taskUUID"]
    for out in result.outputs:
        assert out.data.startswith(b"\x89PNG") and out.content_type == "image/png"
        assert (out.width, out.height) == (80, 60) and isinstance(out.seed, int)
    assert len({o.data for o in result.outputs}) == 3  # three different images, not one thrice


@pytest.mark.parametrize("output_type", ["base64Data", "dataURI"])
def test_output_types(fake: FakeRunware, seed_url: str, tmp_path: Path, output_type: str) -> None:
    settings = settings_for(fake, runware_output_type=output_type)
    result = Runner(settings, spec(seed_url), str(tmp_path / "o")).run()
    assert only_task(fake)["outputType"] == output_type
    with Image.open(io.BytesIO(result.outputs[0].data)) as img:
        assert img.format == "JPEG" and img.size == (80, 60)


def test_settings_options_reach_the_wire(
    files: FileServer, fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    hook = files.url("/hook?token=t")
    settings = settings_for(
        fake, runware_ttl_s=120, runware_check_content=True, runware_webhook_url=hook
    )
    result = Runner(settings, spec(seed_url), str(tmp_path / "o")).run()
    task = only_task(fake)
    assert task["ttl"] == 120 and task["safety"] == {"checkContent": True}
    assert task["webhookURL"] == hook
    assert result.outputs[0].nsfw is False


def test_sync_delivery(fake: FakeRunware, seed_url: str, tmp_path: Path) -> None:
    result = Runner(
        settings_for(fake, runware_delivery="sync"), spec(seed_url), str(tmp_path / "o")
    ).run()
    assert only_task(fake)["deliveryMethod"] == "sync"
    assert fake.tasks("getResponse") == []  # the answer carried the result
    assert len(result.outputs) == 1


def test_local_and_data_uri_inputs(fake: FakeRunware, tmp_path: Path) -> None:
    local = tmp_path / "seed.png"
    local.write_bytes(png("mug"))
    data_uri = "data:image/png;base64," + base64.b64encode(png("ring")).decode()
    runner = Runner(
        settings_for(fake),
        spec(str(local), style_reference_images=(data_uri, str(local))),
        str(tmp_path / "o"),
    )
    runner.run()
    (upload,) = fake.tasks("imageUpload")  # the same local file goes up once
    task = only_task(fake)
    uploaded = runner.memory.value["uploads"][str(local)]
    assert upload["image"].startswith("data:image/png;base64,")
    assert task["inputs"]["seedImage"] == uploaded
    assert task["providerSettings"]["ideogram"]["styleReferenceImages"] == [data_uri, uploaded]


@pytest.mark.parametrize("where", ["local", "url", "data"])
def test_a_source_that_is_not_an_image_is_neither_uploaded_nor_passed_on(
    fake: FakeRunware, files: FileServer, tmp_path: Path, where: str
) -> None:
    secret = b"AWS_SECRET_ACCESS_KEY=abc\nRUNWARE_API_KEY=def\n"
    local = tmp_path / "environ.png"
    local.write_bytes(secret)
    refs = {
        "local": str(local),
        "url": files.add("/page.png", b"<html>a login page</html>", "text/html"),
        "data": "data:image/png;base64," + base64.b64encode(secret).decode(),
    }
    with pytest.raises(ImageRejected) as info:
        Runner(settings_for(fake), spec(refs[where]), str(tmp_path / "o")).run()
    assert info.value.code == Codes.IMAGE_UNREADABLE and "image:" in info.value.message
    assert fake.requests == []  # Runware got nothing: no upload, no task


def test_s3_input_is_uploaded_by_uuid(
    fake: FakeRunware, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_dummy_aws_env(monkeypatch)
    with moto_s3() as s3:
        s3.client.put_object(Bucket=s3.bucket, Key="in/seed.png", Body=png())
        settings = settings_for(fake, s3_endpoint_url=s3.endpoint_url)
        Runner(settings, spec(f"s3://{s3.bucket}/in/seed.png"), str(tmp_path / "o")).run()
    (upload,) = fake.tasks("imageUpload")
    assert only_task(fake)["inputs"]["seedImage"] != f"s3://{s3.bucket}/in/seed.png"
    assert upload["image"].startswith("data:image/png;base64,")


def test_inference_task_is_pure_and_complete() -> None:
    cfg = RunwareConfig(api_url="x", ttl_s=60, output_type="base64Data")
    task = inference_task(
        spec("https://x/y.png"), task_uuid="u", seed_image="s", style_references=None, cfg=cfg
    )
    assert "ttl" not in task  # ttl applies to URL outputs only


# -- direct upload ---------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    use_dummy_aws_env(monkeypatch)
    with moto_s3() as server:
        yield server


@pytest.mark.parametrize("upload_fails", [False, True])
def test_direct_upload_is_verified_and_falls_back(
    s3: Any, seed_url: str, upload_fails: bool
) -> None:
    with FakeRunware(KEY, processing_s=0.1, upload_fails=upload_fails) as fake:
        settings = settings_for(fake, runware_direct_upload=True, s3_endpoint_url=s3.endpoint_url)
        storage = Storage(settings)
        dest = f"s3://{s3.bucket}/runs/{upload_fails}/sku-1"  # moto's state is per process
        result = Runner(settings, spec(seed_url), dest, storage).run()
        task = only_task(fake)
    assert "X-Amz-Signature" in task["uploadEndpoint"]
    assert "content-type" not in task["uploadEndpoint"].lower()  # no Content-Type signed
    (out,) = result.outputs
    if upload_fails:
        assert out.stored is None and out.data  # downloaded; the pipeline uploads it
    else:
        assert out.stored is not None and out.stored.url == dest + ".jpg" and out.data == b""
        head = s3.client.head_object(Bucket=s3.bucket, Key=f"runs/{upload_fails}/sku-1.jpg")
        assert head["ContentLength"] == out.stored.bytes > 0


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "kind", "ours"),
    [
        (401, "invalidApiKey", ProviderAccountError, Codes.PROVIDER_AUTH),
        (402, "insufficientCredits", ProviderAccountError, Codes.PROVIDER_CREDITS),
        (403, "forbidden", ProviderAccountError, Codes.PROVIDER_AUTH),
        (400, "contentPolicyViolation", ProviderRejected, Codes.PROVIDER_CONTENT_POLICY),
        (400, "invalidPositivePrompt", ProviderRejected, Codes.PROVIDER_INVALID_REQUEST),
        (429, "rateLimitExceeded", ProviderUnavailable, Codes.PROVIDER_RATE_LIMITED),
        (408, "timeout", ProviderUnavailable, Codes.PROVIDER_UNAVAILABLE),  # the code's kind
        (408, "", ProviderUnavailable, Codes.PROVIDER_RATE_LIMITED),  # else the status
    ],
)
def test_error_answers_are_classified(
    fake: FakeRunware,
    seed_url: str,
    tmp_path: Path,
    status: int,
    code: str,
    kind: type[BgswapError],
    ours: str,
) -> None:
    fake.inject("status", status=status, code=code, retry_after="3")
    with pytest.raises(kind) as info:
        Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o")).run()
    assert info.value.code == ours
    assert code in info.value.message and KEY not in info.value.message
    assert fake.paid == []
    if ours == Codes.PROVIDER_RATE_LIMITED:
        assert info.value.retry_after_s == 3.0


def test_a_wrong_key_is_an_account_error(seed_url: str, tmp_path: Path) -> None:
    with FakeRunware("the-right-key") as fake, pytest.raises(ProviderAccountError) as info:
        Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o")).run()
    assert info.value.code == Codes.PROVIDER_AUTH and KEY not in str(info.value)


def test_missing_key_fails_before_any_request(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    with pytest.raises(ProviderAccountError):
        Runner(settings_for(fake, runware_api_key=None), spec(seed_url), str(tmp_path / "o")).run()
    assert fake.requests == []


def test_classify_prefers_the_code_over_the_status() -> None:
    assert classify(400, {"code": "insufficientCredits"}, None).code == Codes.PROVIDER_CREDITS
    assert classify(503, {"code": "x"}, 1.0).retryable


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        # retryable, by name and by pattern (Runware's SDK: runware.errors.derive_code)
        ("taskFailed", Kind.TRANSIENT),
        ("processingFailed", Kind.TRANSIENT),
        ("downloadFailed", Kind.TRANSIENT),
        ("uploadFailed", Kind.TRANSIENT),
        ("modelNotReady", Kind.TRANSIENT),
        ("providerError", Kind.TRANSIENT),
        ("providerGatewayFailure", Kind.TRANSIENT),
        ("timeoutProvider", Kind.TRANSIENT),
        ("inferenceTimeoutExceeded", Kind.TRANSIENT),
        ("requestTimeout", Kind.TRANSIENT),
        # the account cannot pay: halt
        ("insufficientCredits", Kind.QUOTA),
        ("providerInsufficientCredits", Kind.QUOTA),  # credits beat provider*
        ("lowBalance", Kind.QUOTA),
        ("monthlyQuotaExceeded", Kind.QUOTA),
        ("quotaExceeded", Kind.QUOTA),
        ("paymentRequired", Kind.QUOTA),
        # the rest
        ("providerRateLimitExceeded", Kind.RATE),  # rate beats provider*
        ("invalidApiKey", Kind.AUTH),
        ("accountSuspended", Kind.AUTH),
        ("contentPolicyViolation", Kind.SAFETY),
        ("providerContentPolicyViolation", Kind.SAFETY),  # safety beats provider*
        ("taskFailedOrNotFound", Kind.NOT_FOUND),
        ("unsupportedParameter", Kind.VALIDATION),
        ("invalidPositivePrompt", Kind.VALIDATION),
        ("somethingBrandNew", Kind.UNKNOWN),
    ],
)
def test_error_codes_are_sorted_by_pattern(code: str, kind: Kind) -> None:
    assert error_kind(code) is kind


@pytest.mark.parametrize(
    ("code", "ours", "retryable"),
    [
        ("taskFailed", Codes.PROVIDER_UNAVAILABLE, True),
        ("providerOverloaded", Codes.PROVIDER_UNAVAILABLE, True),
        ("lowBalance", Codes.PROVIDER_CREDITS, False),
        ("somethingBrandNew", Codes.PROVIDER_UNKNOWN_ERROR, False),
    ],
)
def test_task_error_codes_map_to_ours(code: str, ours: str, retryable: bool) -> None:
    error = classify(200, {"code": code, "message": "m"}, None)
    assert (error.code, error.retryable) == (ours, retryable)
    assert code in error.message  # the provider's own code is always in the message
    assert isinstance(error, ProviderAccountError) == (ours == Codes.PROVIDER_CREDITS)


def answer(status: int, body: dict[str, Any]) -> Answer:
    return Answer(status, Payload(body.get("data", []), body.get("errors", [])), None)


T = "24cd5dff-cb81-4db5-8506-b72a9425f9d1"


def test_a_poll_that_tells_nothing_waits_for_the_next() -> None:
    assert poll_progress(answer(503, {"errors": [{"code": "serviceUnavailable"}]}), T) is None
    assert poll_progress(answer(429, {"errors": [{"code": "rateLimitExceeded"}]}), T) is None
    assert poll_progress(answer(500, {}), T) is None
    processing = poll_progress(answer(200, {"data": [{"taskUUID": T, "status": "processing"}]}), T)
    assert processing is not None and not processing.done(1)


@pytest.mark.parametrize("status", [200, 400])
def test_an_error_about_the_task_ends_it_marked_or_not(status: int) -> None:
    error = {"code": "timeoutProvider", "message": "gone", "taskUUID": T}
    progress = poll_progress(answer(status, {"errors": [error]}), T)
    assert progress is not None and progress.dead and progress.done(4)
    # A 5xx is the poll's failure, even when it names the task: the next poll tells.
    assert (
        poll_progress(answer(500, {"errors": [{**error, "code": "internalServerError"}]}), T)
        is None
    )
    marked = poll_progress(
        answer(200, {"data": [{"taskUUID": T, "status": "processing"}],
                     "errors": [{**error, "status": "error"}]}), T
    )  # fmt: skip
    assert marked is not None and not marked.dead and not marked.done(2) and marked.done(1)


def test_account_errors_in_a_poll_halt() -> None:
    with pytest.raises(ProviderAccountError) as info:
        poll_progress(answer(200, {"errors": [{"code": "insufficientCredits", "taskUUID": T}]}), T)
    assert info.value.code == Codes.PROVIDER_CREDITS
    with pytest.raises(ProviderAccountError):
        poll_progress(answer(401, {"errors": [{"code": "invalidApiKey"}]}), T)


# -- faults: each row accepted (paid) exactly once -----------------------------------------


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("status", {"status": 429, "code": "rateLimitExceeded", "retry_after": "1"}),
        ("status", {"status": 503, "code": "noAvailableServer"}),
        ("accept_then_500", {}),
        ("accept_then_drop", {}),
        ("malformed", {}),
        ("malformed", {"after_accept": True}),
        ("slow", {"delay_s": 3.0}),
    ],
)
def test_faults_on_submit_never_pay_twice(
    fake: FakeRunware, seed_url: str, tmp_path: Path, kind: str, params: dict[str, Any]
) -> None:
    fake.inject(kind, **params)  # type: ignore[arg-type]
    runner = Runner(
        settings_for(fake, runware_request_timeout_s=1.0), spec(seed_url), str(tmp_path / "o")
    )
    result = runner.run_until_done()
    assert len(result.outputs) == 1
    assert len(fake.paid) == 1
    (task_uuid,) = fake.paid
    assert fake.accept_count(task_uuid) == 1
    assert runner.memory.value["task_uuid"] == task_uuid


def test_a_resumed_job_polls_instead_of_submitting(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    first = Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o"))
    first.run()
    again = Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o"))
    again.memory.value = dict(first.memory.value)  # what Redis kept for the row
    result = again.run()
    assert len(fake.tasks("imageInference")) == 1 and len(result.outputs) == 1


def test_conflict_means_already_accepted(fake: FakeRunware, seed_url: str, tmp_path: Path) -> None:
    first = Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o"))
    first.run()
    # a redelivered job that lost the "accepted" mark submits the same uuid again
    again = Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o"))
    again.memory.value = {"task_uuid": first.memory.value["task_uuid"]}
    result = again.run()
    assert len(fake.tasks("imageInference")) == 2 and len(fake.paid) == 1
    assert len(result.outputs) == 1


def test_rate_limited_polls_are_waited_out(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    fake.inject("status", task_type="getResponse", times=2, status=429, code="rateLimitExceeded")
    result = Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o")).run()
    assert len(result.outputs) == 1 and len(fake.paid) == 1


def test_content_policy_generation_error_fails_the_row(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    fake.inject("generation_error", code="contentPolicyViolation")
    with pytest.raises(ProviderRejected) as info:
        Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o")).run()
    assert info.value.code == Codes.PROVIDER_CONTENT_POLICY


def test_transient_generation_error_retries_as_a_new_task(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    fake.inject("generation_error", code="timeoutProvider")
    runner = Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o"))
    with pytest.raises(ProviderUnavailable) as info:
        runner.run()
    assert info.value.code == Codes.PROVIDER_GENERATION_FAILED
    assert "task_uuid" not in runner.memory.value
    result = runner.run()
    assert len(result.outputs) == 1
    assert len(fake.paid) == 2 and len(set(fake.paid)) == 2  # the failed one, then a new one


@pytest.mark.parametrize("placement", ["errors", "data", "unmarked"])
@pytest.mark.parametrize("code", ["timeoutProvider", "taskFailed", "providerBusy"])
def test_a_dead_task_starts_a_new_task_at_once_however_it_is_reported(
    seed_url: str, tmp_path: Path, placement: str, code: str
) -> None:
    """A generation that died is final for its task at the first poll that says so: not
    polled on for the 20-minute deadline. A retryable code gets a new task (and attempt)."""
    with FakeRunware(KEY, processing_s=0.1, error_placement=placement) as fake:  # type: ignore[arg-type]
        fake.inject("generation_error", code=code)
        runner = Runner(settings_for(fake, runware_timeout_s=2.0), spec(seed_url),
                        str(tmp_path / "o"))  # fmt: skip
        with pytest.raises(ProviderUnavailable) as info:
            runner.run()
        assert info.value.code == Codes.PROVIDER_GENERATION_FAILED and code in info.value.message
        first = fake.paid[0]
        polls = [t for t in fake.tasks("getResponse") if t["taskUUID"] == first]
        assert len(polls) <= 4  # processing_s 0.1 at 0.05 s polls: done at the first failure
        assert len(runner.run().outputs) == 1
        assert len(fake.paid) == 2 and fake.paid[1] != first


def test_an_unknown_generation_error_code_is_permanent_and_named(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    fake.inject("generation_error", code="somethingBrandNew")
    with pytest.raises(ProviderRejected) as info:
        Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o")).run()
    assert info.value.code == Codes.PROVIDER_UNKNOWN_ERROR
    assert "somethingBrandNew" in info.value.message and len(fake.paid) == 1


@pytest.mark.parametrize("placement", ["errors", "data", "unmarked"])
def test_both_error_placements_are_understood(
    seed_url: str, tmp_path: Path, placement: str
) -> None:
    with FakeRunware(KEY, processing_s=0.1, error_placement=placement) as fake:  # type: ignore[arg-type]
        fake.inject("generation_error", code="contentPolicyViolation")
        with pytest.raises(ProviderRejected):
            Runner(settings_for(fake), spec(seed_url), str(tmp_path / "o")).run()


@pytest.mark.parametrize("ack_style", ["empty", "item"])
def test_both_ack_shapes_are_understood(seed_url: str, tmp_path: Path, ack_style: str) -> None:
    with FakeRunware(KEY, processing_s=0.1, ack_style=ack_style) as fake:  # type: ignore[arg-type]
        result = Runner(
            settings_for(fake), spec(seed_url, num_results=2), str(tmp_path / "o")
        ).run()
    assert len(result.outputs) == 2


def test_poll_timeout_is_retryable_and_resumes_the_same_task(seed_url: str, tmp_path: Path) -> None:
    with FakeRunware(KEY, processing_s=1.5) as fake:
        runner = Runner(
            settings_for(fake, runware_timeout_s=0.3), spec(seed_url), str(tmp_path / "o")
        )
        with pytest.raises(ProviderUnavailable) as info:
            runner.run()
        assert info.value.code == Codes.PROVIDER_TIMEOUT
        runner.provider = RunwareProvider(settings_for(fake))
        assert len(runner.run().outputs) == 1
        assert len(fake.paid) == 1


# -- polls of several rows in one getResponse request (the engine's prefetch) -----------


def poll_requests(fake: FakeRunware) -> list[list[str]]:
    """The taskUUIDs of each getResponse request the fake received, request by request."""
    with fake.lock:
        calls = list(fake.requests)
    return [
        [task["taskUUID"] for task in call.body]
        for call in calls
        if isinstance(call.body, list)
        and call.body
        and call.body[0].get("taskType") == "getResponse"
    ]


def submitted_rows(fake: FakeRunware, seed_url: str, tmp_path: Path, n: int) -> list[Runner]:
    """``n`` rows on one provider (as in one worker process), each submitted and waiting."""
    settings = settings_for(fake)
    provider = RunwareProvider(settings)
    rows = []
    for i in range(n):
        runner = Runner(settings, spec(seed_url), str(tmp_path / f"o{i}"))
        runner.provider = provider
        wait = provider.step(runner.job, runner.ctx)
        assert not isinstance(wait, ProviderResult)
        assert wait.watch == runner.memory.value["task_uuid"]  # what the engine gathers
        rows.append(runner)
    return rows


def test_the_polls_of_several_rows_share_one_request(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    rows = submitted_rows(fake, seed_url, tmp_path, 3)
    provider = rows[0].provider
    uuids = [row.memory.value["task_uuid"] for row in rows]
    stranger = "0b7d7f3e-5f7e-4c33-9d3e-4a1c3e0f6b11"  # a task Runware does not know
    time.sleep(0.3)  # past the fake's generation time
    provider.prefetch([*uuids, stranger])
    assert poll_requests(fake) == [[*uuids, stranger]]  # one request for all four
    results = [provider.step(row.job, row.ctx) for row in rows]
    assert all(isinstance(r, ProviderResult) and len(r.outputs) == 1 for r in results)
    assert len(poll_requests(fake)) == 1  # each step read its answer, none polled again
    assert sorted(fake.paid) == sorted(uuids)  # paid once each
    assert provider._prefetched.take(stranger) is not None  # kept for a row it is not


def test_a_shared_poll_names_the_tasks_still_processing(seed_url: str, tmp_path: Path) -> None:
    # Those rows need no step (worker/engine.py); a result, an error or a failed poll does.
    with FakeRunware(KEY, processing_s=1.0) as slow:
        rows = submitted_rows(slow, seed_url, tmp_path, 2)
        provider = rows[0].provider
        uuids = [row.memory.value["task_uuid"] for row in rows]
        stranger = "0b7d7f3e-5f7e-4c33-9d3e-4a1c3e0f6b11"  # Runware does not know it
        assert provider.prefetch([*uuids, stranger]) == set(uuids)
        slow.inject("status", task_type="getResponse", status=503, code="serviceUnavailable")
        assert provider.prefetch(uuids) == set()
        time.sleep(1.1)
        assert provider.prefetch(uuids) == set()  # done: each row's step has its answer
        assert all(isinstance(provider.step(r.job, r.ctx), ProviderResult) for r in rows)
        assert len(poll_requests(slow)) == 3


def test_a_shared_poll_that_fails_is_each_rows_poll_failing(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    rows = submitted_rows(fake, seed_url, tmp_path, 2)
    provider = rows[0].provider
    fake.inject("status", task_type="getResponse", status=503, code="serviceUnavailable")
    provider.prefetch([row.memory.value["task_uuid"] for row in rows])
    for row in rows:  # nothing learnt: each waits for its next poll, without a request now
        assert not isinstance(provider.step(row.job, row.ctx), ProviderResult)
    assert len(poll_requests(fake)) == 1
    time.sleep(0.3)
    for row in rows:  # and then polls on its own as before
        assert isinstance(run_to_completion(provider, row.job, row.ctx), ProviderResult)
    assert len(fake.paid) == 2 and len(set(fake.paid)) == 2


def test_an_account_error_in_a_shared_poll_halts_every_row_in_it(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    rows = submitted_rows(fake, seed_url, tmp_path, 2)
    provider = rows[0].provider
    fake.inject("status", task_type="getResponse", status=401, code="invalidApiKey")
    provider.prefetch([row.memory.value["task_uuid"] for row in rows])
    for row in rows:
        with pytest.raises(ProviderAccountError):
            provider.step(row.job, row.ctx)
    assert len(poll_requests(fake)) == 1


def test_one_tasks_error_in_a_shared_answer_is_that_rows_alone(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    rows = submitted_rows(fake, seed_url, tmp_path, 2)
    provider = rows[0].provider
    gone, fine = (row.memory.value["task_uuid"] for row in rows)
    time.sleep(0.3)
    # What Runware answers when one task of the request failed and the other finished.
    shared = Answer(200, Payload(
        [{"taskType": "imageInference", "taskUUID": fine, "status": "processing"}],
        [{"code": "timeoutProvider", "message": "gone", "taskUUID": gone}],
    ), None)  # fmt: skip
    assert answer_for(shared, gone).payload.data == []
    assert answer_for(shared, fine).payload.errors == []
    provider._prefetched.put(gone, answer_for(shared, gone))
    provider._prefetched.put(fine, answer_for(shared, fine))
    with pytest.raises(ProviderUnavailable):  # a dead task: retried as a new task
        provider.step(rows[0].job, rows[0].ctx)
    assert not isinstance(provider.step(rows[1].job, rows[1].ctx), ProviderResult)
    assert poll_requests(fake) == []  # both answers came from the shared one


# -- submits made at about the same time share one request ------------------------------


def test_shared_requests_batch_what_comes_while_one_is_out() -> None:
    sizes: list[int] = []
    first_out = threading.Event()
    release = threading.Event()

    def send_many(items: list[int]) -> list[int | Exception]:
        sizes.append(len(items))
        if len(sizes) == 1:
            first_out.set()
            release.wait(5)
        return [ValueError(f"bad {i}") if i == 13 else i * 10 for i in items]

    shared: SharedRequests[int, int] = SharedRequests(send_many, cap=4)
    outcomes: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            outcomes[i] = shared.send(i)
        except ValueError as exc:
            outcomes[i] = str(exc)

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    assert first_out.wait(5)
    for i in range(10, 16):  # six come while the first is out
        threads.append(threading.Thread(target=call, args=(i,)))
        threads[-1].start()
    deadline = time.monotonic() + 5
    while len(shared._queue) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(5)
    assert sizes == [1, 4, 2]  # the six went together, at most four a request
    assert outcomes == {0: 0, 10: 100, 11: 110, 12: 120, 13: "bad 13", 14: 140, 15: 150}


def submit_together(fake: FakeRunware, tasks: list[dict[str, Any]],
                    guards: list[Callable[[], None]] | None = None) -> list[object]:  # fmt: skip
    """Each task submitted by its own thread while a slow first request is out, so that
    they share the next one."""
    client = RunwareProvider(settings_for(fake)).client
    fake.inject("slow", delay_s=0.5)  # the first request is out while the others come
    outcomes: list[object] = [None] * len(tasks)

    def call(n: int) -> None:
        guard = guards[n] if guards else (lambda: None)
        try:
            outcomes[n] = client.submit(tasks[n], guard)
        except Exception as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(tasks))]
    threads[0].start()
    time.sleep(0.1)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(10)
    return outcomes


def inference_tasks(seed_url: str, n: int) -> list[dict[str, Any]]:
    cfg = RunwareConfig.from_settings(Settings(runware_api_key=KEY))
    return [inference_task(spec(seed_url), task_uuid=str(uuid.uuid4()), seed_image=seed_url,
                           style_references=None, cfg=cfg) for _ in range(n)]  # fmt: skip


def submit_requests(fake: FakeRunware) -> list[int]:
    with fake.lock:
        return [len(c.body) for c in fake.requests if isinstance(c.body, list) and c.body
                and c.body[0].get("taskType") == "imageInference"]  # fmt: skip


def test_submits_made_together_share_a_request_and_each_is_judged_alone(
    fake: FakeRunware, seed_url: str
) -> None:
    tasks = inference_tasks(seed_url, 4)
    tasks[2]["width"] = 1024  # refused by Runware for 4@5: this task alone
    outcomes = submit_together(fake, tasks)
    assert submit_requests(fake) == [1, 3]  # the three that came meanwhile went together
    assert isinstance(outcomes[2], ProviderRejected)
    assert all(isinstance(outcomes[n], Payload) for n in (0, 1, 3))
    assert sorted(fake.paid) == sorted(tasks[n]["taskUUID"] for n in (0, 1, 3))


def test_a_5xx_on_a_shared_submit_leaves_each_task_unsure_and_none_is_paid_twice(
    fake: FakeRunware, seed_url: str, tmp_path: Path
) -> None:
    tasks = inference_tasks(seed_url, 3)
    fake.inject("accept_then_500", times=2)  # the first request, and the shared one
    outcomes = submit_together(fake, tasks)
    assert submit_requests(fake) == [1, 2]
    assert all(isinstance(o, Ambiguous) for o in outcomes)  # maybe taken, maybe not
    assert sorted(fake.paid) == sorted(t["taskUUID"] for t in tasks)  # they were
    # Each row finds its own task with getResponse and polls it: nothing is sent again.
    for task in tasks:
        runner = Runner(settings_for(fake), spec(seed_url), str(tmp_path / task["taskUUID"]))
        runner.memory.value = {"task_uuid": task["taskUUID"], "attempted": True}
        assert len(runner.run().outputs) == 1
    assert len(fake.paid) == 3 and len(submit_requests(fake)) == 2


def test_a_submit_whose_hold_lapsed_while_it_waited_is_not_sent(
    fake: FakeRunware, seed_url: str
) -> None:
    tasks = inference_tasks(seed_url, 3)

    def lapsed() -> None:
        raise Stale("taken over while waiting for the shared request")

    outcomes = submit_together(fake, tasks, [lambda: None, lapsed, lambda: None])
    assert isinstance(outcomes[1], Stale)
    assert submit_requests(fake) == [1, 1]
    assert sorted(fake.paid) == sorted(tasks[n]["taskUUID"] for n in (0, 2))
