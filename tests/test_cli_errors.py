"""The common mistakes, as users make them: the real `bgswap` script, one line on stderr
(no traceback) and the documented exit code. 0 every row succeeded, 1 some rows failed,
2 usage or manifest error, 3 infrastructure unreachable."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import redis as redis_lib
from conftest import free_port
from test_cli import GOOD, bgswap

from examples.make_examples import product_shot

RUN_ARGS = ("--output", "out", "--batch-id", "b1")


def job_args(command: str) -> tuple[str, ...]:
    return RUN_ARGS if command != "validate" else RUN_ARGS[:2]


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    for n, kind in enumerate(["box", "bottle", "mug"]):
        product_shot(kind, (64, 48), (240, 240, 240), n).save(tmp_path / f"{kind}.png")
    return tmp_path


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


# -- Redis and the broker ------------------------------------------------------------------

COMMANDS = [
    ("submit", "m.csv", *RUN_ARGS),
    ("run", "m.csv", *RUN_ARGS),
    ("status", "b1"),
    ("results", "b1"),
    ("retry", "b1"),
    ("cancel", "b1"),
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: a[0])
def test_a_broker_that_does_not_answer_exits_3_naming_the_variable(
    shots: Path,
    args: tuple[str, ...],
) -> None:
    (shots / "m.csv").write_text(GOOD)
    port = free_port()  # nothing listens there
    env = {"BGSWAP_BROKER_URL": f"redis://bgswap:s3cr3t-pw@127.0.0.1:{port}/0"}
    done = bgswap(*args, cwd=shots, env=env)
    assert done.returncode == 3, done.stderr
    line = one_line(done)
    assert line.startswith("error: cannot reach Redis at"), line
    assert f"redis://127.0.0.1:{port}/0 (BGSWAP_BROKER_URL)" in line
    assert "s3cr3t" not in done.stderr + done.stdout and "bgswap:" not in line
    assert [p for p in shots.glob("out/**/*") if p.is_file()] == []  # nothing written


def test_a_redis_url_that_does_not_answer_is_named(shots: Path) -> None:
    port = free_port()
    done = bgswap("status", "b1", cwd=shots, env={"BGSWAP_REDIS_URL": f"redis://127.0.0.1:{port}"})
    assert done.returncode == 3, done.stderr
    assert f"redis://127.0.0.1:{port} (BGSWAP_REDIS_URL)" in one_line(done)


def test_a_broker_apart_from_redis_is_asked_before_a_batch_is_created(
    shots: Path,
    redis_client: redis_lib.Redis,
    redis_url: str,
) -> None:
    (shots / "m.csv").write_text(GOOD)
    port = free_port()
    env = {"BGSWAP_BROKER_URL": f"amqp://guest:pw123@127.0.0.1:{port}//",
           "BGSWAP_REDIS_URL": redis_url}  # fmt: skip
    done = bgswap("submit", "m.csv", *RUN_ARGS, cwd=shots, env=env)
    assert done.returncode == 3, done.stderr
    line = one_line(done)
    assert f"cannot reach the broker at amqp://127.0.0.1:{port}// (BGSWAP_BROKER_URL)" in line
    assert "pw123" not in done.stderr
    assert redis_client.keys("bgswap:*") == []  # no batch was created


def test_redis_refusing_the_password_exits_2_without_showing_it(
    shots: Path, redis_client: redis_lib.Redis, redis_url: str
) -> None:
    port = redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0]
    redis_client.config_set("requirepass", "the-right-one")
    try:
        env = {"BGSWAP_BROKER_URL": f"redis://:wrong-pw@127.0.0.1:{port}/0"}
        done = bgswap("status", "b1", cwd=shots, env=env)
    finally:
        redis_client.config_set("requirepass", "")
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert (
        f"Redis at redis://127.0.0.1:{port}/0 (BGSWAP_BROKER_URL) refused the credentials" in line
    )
    assert "wrong-pw" not in line and "the-right-one" not in line


# -- providers -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "submit", "run"])
@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (("--provider", "replicate"), "--provider 'replicate': no such provider"),
        (("--provider", "runwar"), "(did you mean 'runware'?)"),
        (("--provider", "runware"), "--provider runware needs RUNWARE_API_KEY, which is not set"),
        (("--set", "provider=fal"), "--set provider fal needs FAL_KEY, which is not set"),
    ],
)
def test_a_provider_for_every_row_that_cannot_run_fails_the_command_once(
    shots: Path,
    redis_client: redis_lib.Redis,
    redis_url: str,
    command: str,
    option: tuple[str, ...],
    expected: str,
) -> None:
    (shots / "m.csv").write_text(GOOD + "c,mug.png,p\n")
    env = {"BGSWAP_BROKER_URL": redis_url} if command == "submit" else {}
    done = bgswap(command, "m.csv", *option, *job_args(command), cwd=shots, env=env)
    assert done.returncode == 2, done.stderr
    assert expected in one_line(done)
    assert not (shots / "out").exists()
    assert redis_client.keys("bgswap:*") == []


def test_a_row_naming_a_provider_without_its_key_is_a_row_error(shots: Path) -> None:
    (shots / "m.csv").write_text("id,image,prompt,provider\na,box.png,p,\nb,bottle.png,p,fal\n")
    done = bgswap("validate", "m.csv", "--json", cwd=shots)
    assert done.returncode == 1, done.stderr
    (error,) = json.loads(done.stdout)["errors"]
    assert error == {
        "line": 3,
        "column": "provider",
        "code": "input.provider_unavailable",
        "message": "provider fal needs FAL_KEY, which is not set here",
    }


# -- the manifest --------------------------------------------------------------------------


def test_a_misspelt_column_is_a_warning_once_and_an_error_with_strict(
    shots: Path,
) -> None:
    (shots / "m.csv").write_text(
        "id,image,prompt,backgroud,sku\na,box.png,p,#fff,1\nb,bottle.png,p,#000,2\n"
    )
    done = bgswap("validate", "m.csv", cwd=shots)
    assert done.returncode == 0, done.stderr
    warnings = [x for x in done.stderr.splitlines() if x.startswith("warning:")]
    assert warnings == ["warning: unknown column 'backgroud': did you mean 'background'?"]
    assert "sku" not in done.stderr  # plain metadata stays silent

    refusal = "error: --strict: unknown column 'backgroud': did you mean 'background'?"
    strict = bgswap("validate", "m.csv", "--strict", cwd=shots)
    assert strict.returncode == 2, strict.stderr
    # validate reports its counts, then refuses: the warning is said once, in the error
    assert strict.stderr.strip().splitlines() == [
        "2 rows: 2 valid, 0 rejected; 0 would be skipped (already done); "
        "estimated cost of the rest $0.00",
        refusal,
    ]
    strict = bgswap("run", "m.csv", "--strict", *RUN_ARGS, cwd=shots)
    assert strict.returncode == 2, strict.stderr
    assert one_line(strict) == refusal + "; nothing enqueued"
    assert not (shots / "out").exists()


def test_misspelt_jsonl_keys_are_warned_about_once_each(shots: Path) -> None:
    rows = [
        {"id": "a", "image": "box.png", "prompt": "p", "shadows": False},
        {"id": "b", "image": "bottle.png", "prompt": "p", "shadows": False, "brand": "x"},
    ]
    (shots / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = bgswap("validate", "m.jsonl", cwd=shots)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("unknown column") == 1, done.stderr
    assert "unknown column 'shadows': did you mean 'shadow'?" in done.stderr


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_directory_as_the_manifest_exits_2(shots: Path, command: str) -> None:
    (shots / "catalog").mkdir()
    done = bgswap(command, "catalog", cwd=shots)
    assert done.returncode == 2, done.stderr
    assert one_line(done).startswith("error: catalog is a directory")


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "BGSWAP_RUNWARE_RATE",
            "fast",
            "BGSWAP_RUNWARE_RATE='fast': invalid rate 'fast': expected <count>/<period>",
        ),
        (
            "BGSWAP_WORKER_CONCURRENCY",
            "-1",
            "BGSWAP_WORKER_CONCURRENCY='-1': input should be greater than or equal to 1",
        ),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_bad_setting_exits_2_naming_variable_value_and_expectation(
    shots: Path,
    variable: str,
    value: str,
    expected: str,
    command: str,
) -> None:
    (shots / "m.csv").write_text(GOOD)
    done = bgswap(command, "m.csv", cwd=shots, env={variable: value})
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert line.startswith("error: bad setting ") and expected in line, line


# -- exit codes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_run_exits_0_when_every_row_succeeds_and_1_when_some_fail(
    shots: Path,
) -> None:
    (shots / "good.csv").write_text(GOOD)
    ok = bgswap("run", "good.csv", "--output", "out", "--batch-id", "ok", cwd=shots)
    assert ok.returncode == 0, ok.stderr
    (shots / "bad.csv").write_text(GOOD + "c,missing.png,p\n")
    bad = bgswap("run", "bad.csv", "--output", "out", "--batch-id", "bad", cwd=shots)
    assert bad.returncode == 1, bad.stderr


def test_validate_exit_codes(shots: Path) -> None:
    (shots / "good.csv").write_text(GOOD)
    (shots / "bad.csv").write_text(GOOD + "c,missing.png,p\n")
    assert bgswap("validate", "good.csv", cwd=shots).returncode == 0
    assert bgswap("validate", "good.csv", "--strict", cwd=shots).returncode == 0
    assert bgswap("validate", "bad.csv", cwd=shots).returncode == 1
    strict = bgswap("validate", "bad.csv", "--strict", cwd=shots)
    assert strict.returncode == 2
    assert strict.stderr.strip().splitlines()[-1] == "error: --strict: 1 of 3 rows are invalid"
