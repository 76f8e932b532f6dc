"""The `bgswap` command as users run it: a subprocess, its exit code, its messages."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from examples.make_examples import product_shot
from producer import runner
from producer.embedded import inprocess_worker
from servers.files import FileServer
from worker import runtime
from worker.celery_app import app, apply_config
from worker.settings import Settings
from worker.state import BatchStore

BGSWAP = str(Path(sys.executable).parent / "bgswap")


def bgswap(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}
    return subprocess.run(
        [BGSWAP, *args],
        cwd=cwd,
        env={**base, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    for n, kind in enumerate(["box", "bottle", "mug"]):
        product_shot(kind, (64, 48), (240, 240, 240), n).save(tmp_path / f"{kind}.png")
    return tmp_path


GOOD = "id,image,prompt\na,box.png,p\nb,bottle.png,p {id}\n"
BAD = "id,image,prompt,style_preset\na,box.png,p,\nb,bottle.png,p,NOT_A_PRESET\n"


def test_validate_reports_each_bad_row_and_exits_1(shots: Path) -> None:
    (shots / "bad.csv").write_text(BAD)
    done = bgswap("validate", "bad.csv", cwd=shots)
    assert done.returncode == 1
    assert "line 3, column 'style_preset'" in done.stderr
    assert "2 rows: 1 valid, 1 rejected" in done.stderr


def test_validate_renders_prompts(shots: Path) -> None:
    (shots / "good.csv").write_text(GOOD)
    done = bgswap("validate", "good.csv", "--show-prompts", cwd=shots)
    assert done.returncode == 0, done.stderr
    assert [json.loads(x)["prompt"] for x in done.stdout.splitlines()] == ["p", "p b"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x00\x01\x02\xff\xfe garbage", "binary"),
        (b"name,colour\nx,red\n", "id"),
        (b"", "empty"),
    ],
)
def test_unreadable_manifest_exits_2_with_one_line(
    shots: Path, content: bytes, reason: str
) -> None:
    (shots / "m.csv").write_bytes(content)
    done = bgswap("run", "m.csv", cwd=shots)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert reason in lines[0].lower()


def test_missing_manifest_and_bad_usage_exit_2(shots: Path) -> None:
    assert bgswap("run", "nope.csv", cwd=shots).returncode == 2
    (shots / "good.csv").write_text(GOOD)
    unknown = bgswap("validate", "good.csv", "--set", "colour=red", cwd=shots)
    assert unknown.returncode == 2 and "colour" in unknown.stderr
    typo = bgswap("validate", "good.csv", cwd=shots, env={"BGSWAP_OUTPUTT": "x"})
    assert typo.returncode == 2 and "BGSWAP_OUTPUTT" in typo.stderr


@pytest.mark.parametrize("bid", ["../../../x", "a:b", "x" * 300, ".."])
def test_a_batch_id_that_could_leave_the_output_is_refused_before_anything_starts(
    shots: Path, bid: str
) -> None:
    (shots / "good.csv").write_text(GOOD)
    done = bgswap("run", "good.csv", "--output", "out/inner", "--batch-id", bid, cwd=shots)
    assert done.returncode == 2, done.stderr
    assert "batch id" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (shots / "out").exists() and not (shots.parent / "x").exists()


def test_strict_refuses_the_whole_manifest(shots: Path) -> None:
    (shots / "bad.csv").write_text(BAD)
    done = bgswap("run", "bad.csv", "--strict", "--output", "out", cwd=shots)
    assert done.returncode == 2
    assert "line 3, column 'style_preset'" in done.stderr
    assert not (shots / "out").exists()


@pytest.mark.slow
def test_run_embedded_from_stdin_with_defaults_exits_1_when_a_row_fails(shots: Path) -> None:
    jsonl = "\n".join(
        json.dumps(row)
        for row in [
            {"id": "a", "image": "box.png", "sku": "A-1"},
            {"id": "b", "image": "bottle.png", "background": "#ff0000"},
            {"id": "c", "image": "missing.png"},
        ]
    )
    done = bgswap(
        "run",
        "-",
        "--format",
        "jsonl",
        "--prompt",
        "shot of {id}",
        "--set",
        "output_format=PNG",
        "--output",
        "out",
        "--batch-id",
        "stdin1",
        "--json",
        cwd=shots,
        stdin=jsonl,
    )
    assert done.returncode == 1, done.stderr
    # The end of the run: failures by code on stderr, the summary as JSON on stdout.
    assert "failed by code: input.file_not_found 1" in done.stderr
    summary = json.loads(done.stdout)
    assert summary["batch_id"] == "stdin1" and summary["state"] == "done"
    assert summary["counts"]["succeeded"] == 2 and summary["counts"]["failed"] == 1
    assert summary["errors_by_code"] == {"input.file_not_found": 1}
    assert "process" not in done.stderr  # --json: no progress bars
    lines = [json.loads(x) for x in (shots / "out/stdin1/manifest.jsonl").read_text().splitlines()]
    assert [(x["id"], x["status"]) for x in lines] == [
        ("a", "succeeded"),
        ("b", "succeeded"),
        ("c", "failed"),
    ]
    assert lines[0]["prompt"] == "shot of a" and lines[0]["meta"] == {"sku": "A-1"}
    assert lines[0]["outputs"][0]["content_type"] == "image/png"
    assert lines[2]["error"]["code"] == "input.file_not_found"


@pytest.fixture
def broker_env(redis_client: object, redis_url: str) -> dict[str, str]:
    return {"BGSWAP_BROKER_URL": redis_url}


def test_submit_status_cancel_results_retry(
    shots: Path, broker_env: dict[str, str], redis_url: str
) -> None:
    (shots / "m.csv").write_text(GOOD + "c,mug.png,p\n")
    done = bgswap(
        "submit", "m.csv", "--batch-id", "cli1", "--output", "out", cwd=shots, env=broker_env
    )
    assert done.returncode == 0 and done.stdout.strip() == "cli1", done.stderr
    status = bgswap("status", "cli1", cwd=shots, env=broker_env)
    assert "queued" in status.stderr and "│ 3" in status.stderr.replace("┃", "│")
    # no worker runs: cancel stops every queued row
    cancel = bgswap("cancel", "cli1", cwd=shots, env=broker_env)
    assert "3 queued rows canceled" in cancel.stderr
    results = bgswap("results", "cli1", cwd=shots, env=broker_env)
    assert [json.loads(x)["status"] for x in results.stdout.splitlines()] == ["canceled"] * 3
    assert bgswap("status", "nope", cwd=shots, env=broker_env).returncode == 2


def test_run_with_a_broker_submits_there_and_waits(
    shots: Path, broker_env: dict[str, str], redis_url: str
) -> None:
    (shots / "m.csv").write_text(GOOD)
    settings = Settings(broker_url=redis_url, redis_url=redis_url)
    apply_config(settings)
    runtime.configure(settings)
    with inprocess_worker(app):
        done = bgswap(
            "run",
            "m.csv",
            "--batch-id",
            "brk",
            "--output",
            "out",
            "--set",
            "shadow=false",
            cwd=shots,
            env=broker_env,
        )
    assert done.returncode == 0, done.stderr
    assert [x["status"] for x in manifest(shots / "out/brk")] == ["succeeded"] * 2
    meta = BatchStore.from_url(redis_url).meta("brk")
    assert json.loads(meta["options"]) == {"prompt": None, "set": {"shadow": "false"}}
    assert meta["total"] == "2" and meta["created_at"]


def test_retry_reenqueues_failed_rows(
    shots: Path, broker_env: dict[str, str], redis_url: str
) -> None:
    with FileServer() as files:
        later = files.url("/later.png")
        (shots / "m.csv").write_text(f"id,image,prompt\na,box.png,p\nb,{later},p\nc,,p\n")
        env = {**broker_env, "BGSWAP_ALLOW_PRIVATE_URLS": "1"}
        settings = Settings(broker_url=redis_url, redis_url=redis_url, allow_private_urls=True)
        apply_config(settings)
        runtime.configure(settings)
        with inprocess_worker(app):
            first = bgswap(
                "submit",
                "m.csv",
                "--batch-id",
                "r1",
                "--output",
                "out",
                "--wait",
                cwd=shots,
                env=env,
            )
            assert first.returncode == 1, first.stderr  # b's source is not there yet
            codes = [x["error"] and x["error"]["code"] for x in manifest(shots / "out/r1")]
            assert codes == [None, "source.not_found", "input.missing_field"]
            buf = io.BytesIO()
            product_shot("ring", (64, 48), (240, 240, 240), 3).save(buf, "PNG")
            files.add("/later.png", buf.getvalue(), "image/png")
            retry = bgswap("retry", "r1", cwd=shots, env=env)
            # the row rejected by validation stays failed: retrying cannot fix its input
            assert "1 failed rows re-enqueued" in retry.stderr, retry.stderr
            runner.wait_for_batch(
                BatchStore.from_url(redis_url), "r1", lambda c, t: None, timeout_s=60
            )
        lines = manifest(shots / "out/r1")
        assert [x["status"] for x in lines] == ["succeeded", "succeeded", "failed"]
        assert lines[1]["attempts"] == 1  # attempts restart with the retry


def manifest(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]


# -- fail fast on destinations and credentials -------------------------------------------


def without_aws() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BGSWAP_", "AWS_"))}
    return {**env, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}  # fmt: skip


@pytest.mark.parametrize("output", ["/dev/null/out", "/proc/bgswap-out"])
def test_an_output_that_cannot_be_written_exits_2_before_anything_starts(
    shots: Path, output: str
) -> None:
    (shots / "good.csv").write_text(GOOD)
    done = bgswap("run", "good.csv", "--output", output, "--batch-id", "p1", cwd=shots)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"cannot write to {output}/p1" in line, line
    assert "enqueued" not in done.stderr


def test_an_s3_output_that_refuses_exits_2_naming_the_s3_error(
    shots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from servers.s3 import moto_s3

    (shots / "good.csv").write_text(GOOD)
    with moto_s3() as s3:
        env = {"BGSWAP_S3_ENDPOINT_URL": s3.endpoint_url}
        done = bgswap("submit", "good.csv", "--output", "s3://no-such-bucket/x", cwd=shots,
                      env={**env, "BGSWAP_BROKER_URL": "redis://127.0.0.1:1/0"})  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "cannot write to s3://no-such-bucket/x/" in done.stderr
    assert "NoSuchBucket" in done.stderr


def test_s3_rows_without_credentials_are_refused_clearly_at_validation(shots: Path) -> None:
    (shots / "m.csv").write_text("id,image,prompt\na,box.png,p\nb,s3://catalog/raw/b.png,p\n")
    done = subprocess.run(
        [BGSWAP, "validate", "m.csv"], cwd=shots, env=without_aws(), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "line 3, column 'image'" in done.stderr and "input.no_credentials" in done.stderr
    assert "2 rows: 1 valid, 1 rejected" in done.stderr


def test_an_output_manifest_that_cannot_be_written_fails_the_batch_in_seconds(
    shots: Path,
) -> None:
    (shots / "good.csv").write_text(GOOD)
    (shots / "out" / "m1" / "manifest.jsonl").mkdir(parents=True)  # the probe passes, this not
    started = time.monotonic()
    done = bgswap("run", "good.csv", "--output", "out", "--batch-id", "m1", cwd=shots)
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 60
    last = done.stderr.strip().splitlines()[-1]
    assert "batch m1 failed: the output manifest could not be written" in last, done.stderr
    assert sorted(p.name for p in (shots / "out" / "m1").iterdir()) == ["a.jpg", "b.jpg",
                                                                        "manifest.jsonl"]  # fmt: skip


def test_an_s3_output_that_does_not_answer_exits_3(shots: Path) -> None:
    from conftest import free_port

    (shots / "good.csv").write_text(GOOD)
    env = {"BGSWAP_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens
    done = bgswap("run", "good.csv", "--output", "s3://bucket/x", cwd=shots, env=env)
    assert done.returncode == 3, done.stderr
    assert "cannot write to s3://bucket/x/" in done.stderr
