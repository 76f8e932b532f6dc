"""fal through the whole system: the pipeline and Redis (halting, secrets), `bgswap run
--provider fal` with every option column, `bgswap cancel` of in-flight requests, and a
worker SIGKILLed between submit and result -- the fake's record proving each row was
submitted exactly once."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from batching import (
    bgswap,
    clean_env,
    kill_mid_wait_and_resume,
    manifest_lines,
    png,
    redis_values,
    start_worker,
    submit_and_deliver,
)
from servers.fal import FakeFal
from servers.files import FileServer
from worker.settings import Settings

KEY = "fal-id:fal-SECRET-0123456789"


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def fal_env(fake: FakeFal, **extra: str) -> dict[str, str]:
    return clean_env(
        FAL_KEY=KEY,
        FAL_QUEUE_URL=fake.queue_url,
        FAL_REST_URL=fake.rest_url,
        BGSWAP_ALLOW_PRIVATE_URLS="1",
        BGSWAP_FAL_POLL_INITIAL_S="0.1",
        BGSWAP_FAL_POLL_MAX_S="0.3",
        BGSWAP_RETRY_BASE_S="0.1",
        **extra,
    )


def fal_settings(fake: FakeFal, redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, fal_key=KEY, fal_queue_url=fake.queue_url,
                    fal_rest_url=fake.rest_url, allow_private_urls=True,
                    fal_poll_initial_s=0.05)  # fmt: skip


def test_a_locked_account_stops_fal_for_the_batch_after_one_request(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    rows = "".join(f"r{i},{url},p\n" for i in range(4))
    with FakeFal(KEY) as fake:
        fake.lock_account("Exhausted balance")
        store = submit_and_deliver(
            fal_settings(fake, redis_url), "fal", "id,image,prompt\n" + rows, tmp_path, "h1"
        )
        assert len(fake.requests) == 1 and fake.submit_count() == 0
    codes = [x["error"]["code"] for x in manifest_lines(tmp_path / "h1" / "manifest.jsonl")]
    assert codes == ["provider.insufficient_credits"] + ["provider.halted"] * 3
    assert "Exhausted balance" in store.halts("h1")["fal"]


def test_fal_key_never_reaches_redis_logs_or_the_manifest(
    redis_client: redis_lib.Redis,
    redis_url: str,
    tmp_path: Path,
    files: FileServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = files.add("/s.png", png(), "image/png")
    (tmp_path / "local.png").write_bytes(png("mug"))
    caplog.set_level(logging.DEBUG)
    with FakeFal(KEY, queue_s=0.05, processing_s=0.05) as fake:
        fake.inject("status", status=503, ingress=True)  # retried: it never reached fal
        submit_and_deliver(
            fal_settings(fake, redis_url),
            "fal",
            f"id,image,prompt\na,{url},p\nb,local.png,p\n",
            tmp_path,
            "s1",
        )
        assert fake.submit_count() == 2
    lines = manifest_lines(tmp_path / "s1" / "manifest.jsonl")
    assert [x["status"] for x in lines] == ["succeeded", "succeeded"]
    assert KEY not in redis_values(redis_client) and KEY not in caplog.text
    assert KEY not in (tmp_path / "s1" / "manifest.jsonl").read_text()


@pytest.mark.slow
def test_bgswap_run_with_fal_and_every_option_column(tmp_path: Path, files: FileServer) -> None:
    url = files.add("/bottle.png", png("bottle"), "image/png")
    ref = files.add("/ref.png", png("ring", 3), "image/png")
    (tmp_path / "mug.png").write_bytes(png("mug"))
    data_uri = "data:image/png;base64," + base64.b64encode(png("box", 5)).decode()
    header = (
        "id,image,prompt,rendering_speed,magic_prompt,style_type,style_preset,style_code,"
        "style_reference_images,color_palette,seed,num_results,output_format,output_quality,category\n"
    )
    rows = [
        f"a,{url},a {{category}} on a sunlit riverside picnic,TURBO,ON,REALISTIC,EDITORIAL,,,EMBER,42,2,,,bakery",
        f"b,mug.png,an opulent boutique window,QUALITY,OFF,,WATERCOLOR,,{ref}|mug.png,#ff0000:0.7|#00ff00,,1,JPG,70,gifts",
        f'c,"{data_uri}",a marble counter,BALANCED,AUTO,,,0a1b2c3d,,,,3,WEBP,,skincare',
        f"d,{url},x,,,ANIME,,,,,,,,,refused",  # fal has no ANIME style: refused, unpaid
    ]
    (tmp_path / "m.csv").write_text(header + "\n".join(rows) + "\n")
    with FakeFal(KEY, queue_s=0.1, processing_s=0.2) as fake:
        done = bgswap("run", "m.csv", "--provider", "fal", "--output", "out", "--batch-id", "f1",
                      cwd=tmp_path, env=fal_env(fake))  # fmt: skip
        assert done.returncode == 1, done.stderr
        inputs = {body["prompt"]: body for body in fake.submissions.values()}
        assert fake.submit_count() == 3
        uploads = [u.file_url for u in fake.uploads]
    lines = manifest_lines(tmp_path / "out/f1/manifest.jsonl")
    assert [x["status"] for x in lines] == ["succeeded"] * 3 + ["failed"]
    assert lines[3]["error"]["code"] == "input.unsupported_option"
    assert [len(x["outputs"]) for x in lines] == [2, 1, 3, 0]
    assert [x["cost_usd"] for x in lines[:3]] == pytest.approx([0.06, 0.09, 0.18])
    assert all(x["provider_task_id"] in fake.submitted for x in lines[:3])
    a = inputs["a bakery on a sunlit riverside picnic"]
    assert a == {
        "prompt": "a bakery on a sunlit riverside picnic", "image_url": url, "num_images": 2,
        "rendering_speed": "TURBO", "expand_prompt": True, "style": "REALISTIC",
        "style_preset": "EDITORIAL", "color_palette": {"name": "EMBER"}, "seed": 42,
    }  # fmt: skip
    assert all(o["seed"] is not None for o in lines[0]["outputs"])
    b = inputs["an opulent boutique window"]
    assert b["expand_prompt"] is False and b["image_url"] in uploads
    assert b["image_urls"] == [ref, b["image_url"]]  # mug.png went up once
    assert b["color_palette"] == {"members": [{"rgb": {"r": 255, "g": 0, "b": 0}, "color_weight": 0.7},
                                              {"rgb": {"r": 0, "g": 255, "b": 0}}]}  # fmt: skip
    assert lines[1]["outputs"][0]["content_type"] == "image/jpeg"
    c = inputs["a marble counter"]
    assert c["style_codes"] == ["0A1B2C3D"] and c["image_url"] in uploads
    assert {o["content_type"] for o in lines[2]["outputs"]} == {"image/webp"}


@pytest.mark.slow
def test_a_worker_killed_between_submit_and_result_submits_each_row_once(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    (tmp_path / "m.csv").write_text(
        "id,image,prompt\n" + "".join(f"r{i},{url},p\n" for i in range(3))
    )
    with FakeFal(KEY, queue_s=0.1, processing_s=8.0) as fake:
        env = {**fal_env(fake), "BGSWAP_BROKER_URL": redis_url}
        meta = kill_mid_wait_and_resume(env, tmp_path, "fal", 3, fake.submit_count)
        assert fake.submit_count() == 3  # resumed by polling the saved request ids
    lines = manifest_lines(Path(meta["manifest_url"]))
    assert [x["status"] for x in lines] == ["succeeded"] * 3
    # waits are not tries; a delivery that died with its worker is (1 if the kill hit a
    # row between steps, 2 if it hit one mid-step)
    assert all(x["attempts"] in (1, 2) for x in lines)
    assert {x["provider_task_id"] for x in lines} == set(fake.submitted)
    assert KEY not in redis_values(redis_client)


@pytest.mark.slow
def test_bgswap_cancel_cancels_in_flight_requests(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    (tmp_path / "m.csv").write_text(
        "id,image,prompt\n" + "".join(f"r{i},{url},p\n" for i in range(2))
    )
    with FakeFal(KEY, queue_s=30.0, processing_s=0.1) as fake:
        env = {**fal_env(fake), "BGSWAP_BROKER_URL": redis_url, "BGSWAP_WORKER_CONCURRENCY": "3"}
        worker = start_worker(env, tmp_path / "w.log")
        try:
            submit = bgswap("submit", "m.csv", "--provider", "fal", "--batch-id", "c1",
                            "--output", "out", cwd=tmp_path, env=env)  # fmt: skip
            assert submit.returncode == 0, submit.stderr
            deadline = time.monotonic() + 30
            while fake.submit_count() < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # the request ids are saved right after the submit answer
            cancel = bgswap("cancel", "c1", cwd=tmp_path, env=env)
            assert "2 in-flight provider requests canceled" in cancel.stderr, cancel.stderr
            status = bgswap("status", "c1", "--watch", cwd=tmp_path, env=env, timeout=60)
            assert status.returncode == 0
        finally:
            worker.terminate()
            worker.wait(timeout=30)
        assert sorted(fake.canceled) == sorted(fake.submitted) and fake.billed() == []
    lines = manifest_lines(tmp_path / "out/c1/manifest.jsonl")
    assert [x["status"] for x in lines] == ["canceled", "canceled"], [x["error"] for x in lines]
    assert {x["error"]["code"] for x in lines} == {"job.canceled"}
