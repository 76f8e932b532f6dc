"""End to end through real Celery workers: in-process, a `celery -A worker worker`
subprocess, and the embedded `bgswap run` -- with a real Redis, a real HTTP source
server and moto's S3 server receiving the presigned PUTs."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from examples.make_examples import product_shot, write_examples
from examples.repeat_manifest import repeat_manifest
from producer import runner
from producer.embedded import inprocess_worker
from producer.manifest import RowDefaults, read_manifest
from servers.files import FileServer
from servers.s3 import DUMMY_AWS_ENV, moto_s3, use_dummy_aws_env
from worker import runtime
from worker.celery_app import app, apply_config
from worker.settings import Settings
from worker.state import BatchStore

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def image_bytes(kind: str = "box", fmt: str = "PNG", seed: int = 1) -> bytes:
    buf = io.BytesIO()
    product_shot(kind, (120, 100), (238, 238, 238), seed).convert("RGB").save(buf, fmt)
    return buf.getvalue()


def read_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def test_inprocess_worker_retries_through_celery_and_writes_the_manifest(
    redis_client: object, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    settings = Settings(
        broker_url=redis_url, redis_url=redis_url, allow_private_urls=True, retry_base_s=0.05
    )
    apply_config(settings)
    runtime.configure(settings)
    flaky = files.add("/flaky.png", image_bytes(), "image/png", fail_first=1)
    good = files.add("/good.jpg", image_bytes("bottle", "JPEG"), "image/jpeg")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,image,prompt\nflaky,{flaky},p\ngood,{good},p\nbad,{good},\n")
    store = BatchStore.from_url(redis_url)
    defaults = RowDefaults(base_dir=tmp_path, allow_private_urls=True)
    with inprocess_worker(app), runner.open_manifest(str(manifest), None) as m:
        report = runner.submit_manifest(
            settings,
            app,
            store,
            read_manifest(m.stream, m.fmt, defaults),
            defaults=defaults,
            output=str(tmp_path / "out"),
            batch_id="celery1",
        )
        meta = runner.wait_for_batch(store, report.batch_id, lambda c, t: None, timeout_s=60)
    lines = read_lines(Path(meta["manifest_url"]).read_text())
    assert [(x["id"], x["status"], x["attempts"]) for x in lines] == [
        ("flaky", "succeeded", 2),
        ("good", "succeeded", 1),
        ("bad", "failed", 0),
    ]
    assert len(files.requests_to("/flaky.png")) == 2


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    use_dummy_aws_env(monkeypatch)
    with moto_s3() as s3:
        yield s3


@pytest.mark.slow
def test_celery_worker_subprocess_with_s3_outputs(
    redis_client: object, redis_url: str, tmp_path: Path, files: FileServer, s3_env: object
) -> None:
    s3 = s3_env
    bucket = s3.bucket  # type: ignore[attr-defined]
    client = s3.client  # type: ignore[attr-defined]
    client.put_object(Bucket=bucket, Key="raw/mug.png", Body=image_bytes("mug"))
    url = files.add("/bottle.jpg", image_bytes("bottle", "JPEG"), "image/jpeg")
    local = tmp_path / "ring.png"
    local.write_bytes(image_bytes("ring"))
    data_uri = "data:image/png;base64," + base64.b64encode(image_bytes("sneaker")).decode()
    presigned = files.url("/upload/custom.png") + "?X-Amz-Signature=TOPSECRET&X-Amz-Expires=60"
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(
        "id,image,prompt,output,output_format,background\n"
        f"url-row,{url}?token=SECRET2,p,,PNG,#336699\n"
        f's3-row,s3://{bucket}/raw/mug.png,p,,WEBP,"#ffffff,#000000"\n'
        f"local-row,ring.png,p,s3://{bucket}/custom/ring-final.jpg,JPG,\n"
        f'data-row,"{data_uri}",p,,,\n'  # a data URI has a comma: quoted
        f"presigned-row,{url},p,{presigned},PNG,\n"
        f"missing-row,{files.url('/nope.png')},p,,,\n"
        f"bad-row,{url},p,,GIF,\n"
    )
    env = {
        **os.environ,
        **DUMMY_AWS_ENV,
        "BGSWAP_BROKER_URL": redis_url,
        "BGSWAP_S3_ENDPOINT_URL": s3.endpoint_url,  # type: ignore[attr-defined]
        "BGSWAP_ALLOW_PRIVATE_URLS": "1",
        "BGSWAP_MAX_ATTEMPTS": "2",
        "BGSWAP_RETRY_BASE_S": "0.1",
        # local-row writes outside --output: only where the operator allows it
        "BGSWAP_OUTPUT_PREFIXES": f"s3://{bucket}/custom",
    }
    log = tmp_path / "worker.log"
    # No readiness wait needed: messages wait in Redis until the worker consumes them.
    worker = subprocess.Popen(
        [str(BIN / "celery"), "-A", "worker", "worker"],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        done = subprocess.run(
            [
                str(BIN / "bgswap"),
                "submit",
                str(manifest),
                "--output",
                f"s3://{bucket}/runs/",
                "--batch-id",
                "e2e1",
                "--wait",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert done.returncode == 1, done.stderr + log.read_text()[-3000:]  # some rows failed
    assert "X-Amz-Signature" not in log.read_text() + done.stderr  # no secret in logs
    assert done.stdout.strip() == "e2e1"
    assert "line 8, column 'output_format'" in done.stderr

    body = client.get_object(Bucket=bucket, Key="runs/e2e1/manifest.jsonl")["Body"].read().decode()
    assert "SECRET" not in body
    lines = read_lines(body)
    assert [x["id"] for x in lines] == [
        "url-row",
        "s3-row",
        "local-row",
        "data-row",
        "presigned-row",
        "missing-row",
        "bad-row",
    ]
    status = {x["id"]: x["status"] for x in lines}
    good = ["url-row", "s3-row", "local-row", "data-row", "presigned-row"]
    assert status == {
        **dict.fromkeys(good, "succeeded"),
        "missing-row": "failed",
        "bad-row": "failed",
    }
    by_id = {x["id"]: x for x in lines}
    expect = {
        "url-row": ("runs/e2e1/url-row.png", "image/png"),
        "s3-row": ("runs/e2e1/s3-row.webp", "image/webp"),
        "local-row": ("custom/ring-final.jpg", "image/jpeg"),
        "data-row": ("runs/e2e1/data-row.jpg", "image/jpeg"),
    }
    for row_id, (key, content_type) in expect.items():
        (out,) = by_id[row_id]["outputs"]  # type: ignore[misc]
        assert out["url"] == f"s3://{bucket}/{key}"
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["ContentType"] == content_type and head["ContentLength"] == out["bytes"]
        with Image.open(
            io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        ) as img:
            assert img.size == (120, 100)
    # the local file was staged next to the outputs so a remote worker could read it
    staged = client.list_objects_v2(Bucket=bucket, Prefix="runs/e2e1/_sources/")["Contents"]
    assert [o["Key"] for o in staged] == ["runs/e2e1/_sources/local-row-image.png"]
    # the user's presigned URL got a PUT with the Content-Type; the manifest drops the query
    (put,) = files.requests_to("/upload/custom.png")
    assert put.method == "PUT" and put.headers["content-type"] == "image/png"
    assert by_id["presigned-row"]["outputs"][0]["url"] == files.url("/upload/custom.png")  # type: ignore[index]
    assert by_id["missing-row"]["error"]["code"] == "source.not_found"  # type: ignore[index]
    assert by_id["bad-row"]["error"]["code"] == "input.invalid_enum"  # type: ignore[index]

    results = subprocess.run(
        [str(BIN / "bgswap"), "results", "e2e1", "--format", "csv"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert results.stdout.splitlines()[0].startswith("id,status,provider,model,prompt")
    assert len(results.stdout.splitlines()) == 8


@pytest.mark.slow
def test_bgswap_run_embedded_on_the_examples(tmp_path: Path) -> None:
    """What `make demo` does, in a scratch copy: no broker, no keys, local outputs."""
    (tmp_path / "manifest.csv").write_text((REPO / "examples" / "manifest.csv").read_text())
    sources = write_examples(tmp_path / "products")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}
    done = subprocess.run(
        [str(BIN / "bgswap"), "run", "manifest.csv", "--output", "out", "--batch-id", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = read_lines((tmp_path / "out" / "demo" / "manifest.jsonl").read_text())
    rows = (tmp_path / "manifest.csv").read_text().splitlines()[1:]
    assert len(lines) == len(rows) and all(x["status"] == "succeeded" for x in lines)
    for line in lines:
        (out,) = line["outputs"]  # type: ignore[misc]
        src = Path(str(line["image"]))
        assert (src.parent == tmp_path / "products" and src in sources) or src.exists()
        with Image.open(out["url"]) as result, Image.open(src) as original:
            assert result.size == (out["width"], out["height"])
            rotated = original.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            assert result.size == (original.size[::-1] if rotated else original.size)


@pytest.mark.slow
def test_bgswap_run_accounts_for_every_row_of_a_1000_row_manifest(tmp_path: Path) -> None:
    write_examples(tmp_path / "products", scale=0.15)
    repeat_manifest(REPO / "examples" / "manifest.csv", 1000, tmp_path / "m.csv")
    with (tmp_path / "m.csv").open("a") as fh:  # one bad row among them
        fh.write("broken,products/none.png,p,,,,\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}
    done = subprocess.run(
        [str(BIN / "bgswap"), "run", "m.csv", "--output", "out", "--batch-id", "k"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    lines = read_lines((tmp_path / "out" / "k" / "manifest.jsonl").read_text())
    assert len(lines) == 1001
    assert [x["id"] for x in lines[:3]] == [
        "bottle-white-000000",
        "box-grey-000001",
        "mug-blue-000002",
    ]
    assert sum(x["status"] == "succeeded" for x in lines) == 1000
    assert lines[-1]["id"] == "broken" and lines[-1]["error"]["code"] == "input.file_not_found"  # type: ignore[index]
    written = {p.name for p in (tmp_path / "out" / "k").iterdir()}
    assert len(written) == 1001  # 1000 images + the manifest


def test_the_watchdog_brings_back_lost_messages_and_dead_workers_rows(
    redis_client: object, redis_url: str, tmp_path: Path, files: FileServer
) -> None:
    """A queued row whose message vanished (a worker killed between the broker handing it
    out and kombu recording it) is re-enqueued once the queue stayed empty for the grace;
    a row whose holder died is re-enqueued once its lease lapsed."""
    from producer.batch import SubmitOptions, Submitter, output_root
    from worker.providers import get_provider
    from worker.tasks import enqueue_finalize, queue_depth, republish
    from worker.watchdog import Watchdog

    settings = Settings(broker_url=redis_url, redis_url=redis_url, allow_private_urls=True)
    apply_config(settings)
    runtime.configure(settings)
    store = BatchStore.from_url(redis_url)
    url = files.add("/p.png", image_bytes(), "image/png")
    defaults = RowDefaults(base_dir=tmp_path, allow_private_urls=True)
    lost: list[object] = []
    submitter = Submitter(store, lost.extend, lambda name: get_provider(name, settings))
    options = SubmitOptions(batch_id="lost1", output=output_root(str(tmp_path / "out")),
                            defaults=defaults)  # fmt: skip
    manifest = f"id,image,prompt\nr,{url},p\nheld,{url},p\n"
    submitter.submit(read_manifest(io.BytesIO(manifest.encode()), "csv", defaults), options)
    assert len(lost) == 2 and redis_client.llen("bgswap") == 0  # type: ignore[attr-defined]
    # Row 1 was adopted by a worker process that died at once: its lease lapses.
    store.adopt("lost1", 1, "t", "dead-worker", 0.3)
    watchdog = Watchdog(store, republish, queue_depth, enqueue_finalize, grace_s=0.5,
                        interval_s=0.2)  # fmt: skip
    with inprocess_worker(app):
        watchdog.start()
        try:
            meta = runner.wait_for_batch(store, "lost1", lambda c, t: None, timeout_s=30)
        finally:
            watchdog.stop()
    lines = read_lines(Path(meta["manifest_url"]).read_text())
    assert [(x["id"], x["status"]) for x in lines] == [("r", "succeeded"), ("held", "succeeded")]
    assert lines[1]["attempts"] == 2  # the dead worker's adoption, then the new one
    assert "lost1" not in store.live_batches()  # done: the watchdog stops looking
