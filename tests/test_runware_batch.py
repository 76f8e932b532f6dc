"""Runware through the whole system: the pipeline and Redis (halting, secrets), `bgswap run
--provider runware` with every option column, and a worker SIGKILLed between submit and
result -- the fake's own record proving every row was paid exactly once."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from batching import (
    bgswap,
    clean_env,
    kill_mid_wait_and_resume,
    png,
    redis_values,
    submit_and_deliver,
)
from servers.files import FileServer
from servers.runware import FakeRunware
from worker.settings import Settings

KEY = "rw-SECRET-key-0123456789"


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def runware_env(fake: FakeRunware) -> dict[str, str]:
    return clean_env(
        RUNWARE_API_KEY=KEY,
        RUNWARE_API_URL=fake.url,
        BGSWAP_ALLOW_PRIVATE_URLS="1",
        BGSWAP_RUNWARE_POLL_INITIAL_S="0.1",
        BGSWAP_RUNWARE_POLL_MAX_S="0.3",
        BGSWAP_RETRY_BASE_S="0.1",
    )


def test_an_auth_error_stops_runware_for_the_batch_after_one_request(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    rows = "".join(f"r{i},{url},p\n" for i in range(5))
    with FakeRunware("a-different-key") as fake:
        settings = Settings(
            redis_url=redis_url,
            runware_api_key=KEY,
            runware_api_url=fake.url,
            allow_private_urls=True,
        )
        store = submit_and_deliver(settings, "runware", "id,image,prompt\n" + rows, tmp_path, "h1")
        assert len(fake.requests) == 1  # one refused request, not five
    lines = [json.loads(x) for x in (tmp_path / "h1" / "manifest.jsonl").read_text().splitlines()]
    codes = [x["error"]["code"] for x in lines]
    assert codes == ["provider.auth_failed"] + ["provider.halted"] * 4
    assert "invalidApiKey" in lines[3]["error"]["message"]
    assert "invalidApiKey" in store.halts("h1")["runware"]


def test_the_api_key_never_reaches_redis_logs_or_the_manifest(
    redis_client: redis_lib.Redis,
    redis_url: str,
    tmp_path: Path,
    files: FileServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = files.add("/s.png", png(), "image/png")
    caplog.set_level(logging.DEBUG)
    with FakeRunware(KEY, processing_s=0.1) as fake:
        settings = Settings(
            redis_url=redis_url,
            runware_api_key=KEY,
            runware_api_url=fake.url,
            allow_private_urls=True,
            runware_poll_initial_s=0.05,
        )
        fake.inject("status", status=503, code="noAvailableServer")  # an error message too
        submit_and_deliver(
            settings, "runware", f"id,image,prompt\na,{url},p\nb,{url},p\n", tmp_path, "s1"
        )
        # another prompt: the same row again would be skipped (the work is in the index)
        submit_and_deliver(settings, "runware", f"id,image,prompt\na,{url},q\n", tmp_path, "s2")
        assert len(fake.paid) == 3  # three rows, each paid once
    everything = redis_values(redis_client)
    assert everything and KEY not in everything
    assert KEY not in caplog.text and KEY not in repr(settings)
    manifest = (tmp_path / "s1" / "manifest.jsonl").read_text()
    assert KEY not in manifest and '"provider":"runware"' in manifest


@pytest.mark.slow
def test_bgswap_run_with_runware_and_every_option_column(tmp_path: Path, files: FileServer) -> None:
    url = files.add("/bottle.png", png("bottle"), "image/png")
    ref = files.add("/ref.png", png("ring", 3), "image/png")
    (tmp_path / "mug.png").write_bytes(png("mug"))
    data_uri = "data:image/png;base64," + base64.b64encode(png("box", 5)).decode()
    header = (
        "id,image,prompt,rendering_speed,magic_prompt,style_type,style_preset,style_code,"
        "style_reference_images,num_results,output_format,output_quality,category\n"
    )
    rows = [
        f"a,{url},a {{category}} on a sunlit riverside picnic,TURBO,ON,REALISTIC,EDITORIAL,,,2,PNG,80,bakery",
        f"b,mug.png,an opulent boutique window,QUALITY,OFF,,MAGAZINE_EDITORIAL,,{ref}|mug.png,1,WEBP,,gifts",
        f'c,"{data_uri}",a marble counter,BALANCED,AUTO,,,0a1b2c3d,,3,JPG,95,skincare',
        f"d,{url},x,,,GENERAL,,0a1b2c3d,,,,,conflict",  # style_code with style_type: refused
    ]
    (tmp_path / "m.csv").write_text(header + "\n".join(rows) + "\n")
    with FakeRunware(KEY, processing_s=0.2) as fake:
        done = bgswap("run", "m.csv", "--provider", "runware", "--output", "out",
                      "--batch-id", "rw", cwd=tmp_path, env=runware_env(fake))  # fmt: skip
        assert done.returncode == 1, done.stderr  # row d is refused
        tasks = {t["positivePrompt"]: t for t in fake.tasks("imageInference")}
        assert len(fake.paid) == 3 and all(fake.accept_count(u) == 1 for u in fake.paid)
    lines = [json.loads(x) for x in (tmp_path / "out/rw/manifest.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["succeeded"] * 3 + ["failed"]
    assert lines[3]["error"]["code"] == "input.conflicting_options"
    assert [len(x["outputs"]) for x in lines] == [2, 1, 3, 0]
    assert lines[0]["cost_usd"] == pytest.approx(0.06) and lines[1]["cost_usd"] == pytest.approx(
        0.09
    )
    assert all(x["provider_task_id"] in fake.paid for x in lines[:3])
    a = tasks["a bakery on a sunlit riverside picnic"]
    assert a["providerSettings"]["ideogram"] == {
        "renderingSpeed": "TURBO",
        "magicPrompt": "ON",
        "styleType": "REALISTIC",
        "stylePreset": "EDITORIAL",
    }
    assert (a["numberResults"], a["outputFormat"], a["outputQuality"]) == (2, "PNG", 80)
    assert a["inputs"]["seedImage"] == url
    b = tasks["an opulent boutique window"]
    refs = b["providerSettings"]["ideogram"]["styleReferenceImages"]
    assert refs[0] == ref and refs[1] == b["inputs"]["seedImage"]  # mug.png went up once
    assert b["outputFormat"] == "WEBP" and "outputQuality" not in b
    c = tasks["a marble counter"]
    assert c["inputs"]["seedImage"] == data_uri
    assert c["providerSettings"]["ideogram"]["styleCode"] == "0A1B2C3D"
    assert c["providerSettings"]["ideogram"]["renderingSpeed"] == "DEFAULT"
    assert [o["url"].rsplit("/", 1)[1] for o in lines[0]["outputs"]] == ["a-1.png", "a-2.png"]
    assert lines[1]["outputs"][0]["content_type"] == "image/webp"


@pytest.mark.slow
def test_a_worker_killed_between_submit_and_result_pays_each_row_once(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/s.png", png(), "image/png")
    (tmp_path / "m.csv").write_text(
        "id,image,prompt\n" + "".join(f"r{i},{url},p\n" for i in range(3))
    )
    with FakeRunware(KEY, processing_s=8.0) as fake:
        env = {**runware_env(fake), "BGSWAP_BROKER_URL": redis_url}
        meta = kill_mid_wait_and_resume(env, tmp_path, "runware", 3, lambda: len(fake.paid))
        assert len(fake.tasks("imageInference")) == 3  # resumed by polling, never re-submitted
        assert sorted(fake.paid) == sorted(set(fake.paid)) and len(fake.paid) == 3
    lines = [json.loads(x) for x in Path(meta["manifest_url"]).read_text().splitlines()]
    assert [x["status"] for x in lines] == ["succeeded"] * 3
    # waits are not tries; a delivery that died with its worker is (1 if the kill hit a
    # row between steps, 2 if it hit one mid-step)
    assert all(x["attempts"] in (1, 2) for x in lines)
    assert {x["provider_task_id"] for x in lines} == set(fake.paid)
    # the key went to workers through their environment only: not in any Redis value
    assert KEY not in redis_values(redis_client)
