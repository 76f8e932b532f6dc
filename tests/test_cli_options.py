"""What people expect of a command line: --version, shell completion, -q / -v, --json,
status --watch, failures by code, validate --strict."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pytest
import redis as redis_lib
from test_cli import BGSWAP, GOOD, bgswap

from examples.make_examples import product_shot
from producer.summary import failures_by_code, final_summary, status_fields
from worker.state import ALL_STATES, BatchStore

# Two rows rejected at validation (no image, a bad preset), two valid.
MIXED = "id,image,prompt,style_preset\na,box.png,p,\nb,,p,\nc,bottle.png,p,NOPE\nd,mug.png,p,\n"


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    for n, kind in enumerate(["box", "bottle", "mug"]):
        product_shot(kind, (64, 48), (240, 240, 240), n).save(tmp_path / f"{kind}.png")
    return tmp_path


@pytest.fixture
def broker_env(redis_client: redis_lib.Redis, redis_url: str) -> dict[str, str]:
    return {"BGSWAP_BROKER_URL": redis_url}


def submitted(shots: Path, env: dict[str, str], batch: str, manifest: str = MIXED) -> None:
    (shots / "m.csv").write_text(manifest)
    done = bgswap("submit", "m.csv", "--batch-id", batch, "--output", "out", cwd=shots, env=env)
    assert done.returncode == 0, done.stderr


def test_version_comes_from_the_package(shots: Path) -> None:
    done = bgswap("--version", cwd=shots)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"bgswap {metadata.version('bgswap')}"


def test_shell_completion_works_with_the_console_script(shots: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}
    # what the installed completion script runs on <TAB>
    complete = {**env, "_BGSWAP_COMPLETE": "complete_bash", "COMP_WORDS": "bgswap sta",
                "COMP_CWORD": "1"}  # fmt: skip
    done = subprocess.run([BGSWAP], env=complete, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0 and done.stdout.split() == ["status"], done.stderr
    # from a bash, as a user types it: the shell is detected
    home = {**env, "HOME": str(shots)}
    shown = subprocess.run(["bash", "-c", f"{BGSWAP} --show-completion"], env=home,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "_BGSWAP_COMPLETE=complete_bash" in shown.stdout
    assert "complete -o default -F _bgswap_completion bgswap" in shown.stdout
    installed = subprocess.run(["bash", "-c", f"{BGSWAP} --install-completion"], env=home,
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    assert "_bgswap_completion" in (shots / ".bash_completions" / "bgswap.sh").read_text()


def test_quiet_says_only_errors_and_the_result(shots: Path, broker_env: dict[str, str]) -> None:
    (shots / "m.csv").write_text(MIXED)
    loud = bgswap("validate", "m.csv", cwd=shots)
    assert "rejected line 3" in loud.stderr
    quiet = bgswap("-q", "validate", "m.csv", cwd=shots)
    assert quiet.returncode == 1
    assert quiet.stderr.strip().splitlines() == [
        "4 rows: 2 valid, 2 rejected; 0 would be skipped (already done); "
        "estimated cost of the rest $0.00"
    ]
    done = bgswap("--quiet", "submit", "m.csv", "--batch-id", "q1", "--output", "out", cwd=shots,
                  env=broker_env)  # fmt: skip
    assert done.returncode == 0
    assert (done.stdout, done.stderr) == ("q1\n", "")
    error = bgswap("-q", "validate", "nope.csv", cwd=shots)
    assert error.returncode == 2 and error.stderr.strip() == "error: nope.csv: no such file"


def test_verbose_logs_bgswap_at_debug_without_secrets(
    shots: Path, redis_url: str, redis_client: redis_lib.Redis
) -> None:
    port = redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0]
    redis_client.config_set("requirepass", "pw-secret-1")
    try:
        env = {"BGSWAP_BROKER_URL": f"redis://:pw-secret-1@127.0.0.1:{port}/0",
               "RUNWARE_API_KEY": "rw-secret-key-2"}  # fmt: skip
        (shots / "m.csv").write_text(GOOD)
        done = bgswap("-v", "submit", "m.csv", "--batch-id", "v1", "--output", "out",
                      "--provider", "local", cwd=shots, env=env)  # fmt: skip
    finally:
        redis_client.config_set("requirepass", "")
    assert done.returncode == 0, done.stderr
    debug = [x for x in done.stderr.splitlines() if " DEBUG " in x]
    assert any("bgswap.cli DEBUG batch v1: csv manifest m.csv, provider local" in x for x in debug)
    assert any(f"Redis at redis://127.0.0.1:{port}/0 answers" in x for x in debug), done.stderr
    assert "pw-secret-1" not in done.stderr and "rw-secret-key-2" not in done.stderr
    assert " DEBUG " not in bgswap("submit", "--help", cwd=shots).stderr
    both = bgswap("-q", "-v", "validate", "m.csv", cwd=shots)
    assert both.returncode == 2 and both.stderr.count("\n") == 1


def test_validate_json_is_one_object_on_stdout(shots: Path) -> None:
    (shots / "m.csv").write_text(MIXED)
    done = bgswap("validate", "m.csv", "--json", cwd=shots)
    assert done.returncode == 1
    assert done.stderr == ""
    result = json.loads(done.stdout)
    assert {k: result[k] for k in ("total", "valid", "rejected", "estimated_cost_usd")} == {
        "total": 4, "valid": 2, "rejected": 2, "estimated_cost_usd": 0.0,
    }  # fmt: skip
    assert [(e["line"], e["column"], e["code"]) for e in result["errors"]] == [
        (3, "image", "input.missing_field"),
        (4, "style_preset", "input.invalid_enum"),
    ]
    assert "'NOPE' is not one of the 62 style presets" in result["errors"][1]["message"]
    prompts = bgswap("validate", "m.csv", "--json", "--show-prompts", "--prompt", "x {id}",
                     cwd=shots)  # fmt: skip
    assert json.loads(prompts.stdout)["prompts"] == [
        {"id": "a", "prompt": "p"},
        {"id": "d", "prompt": "p"},
    ]


def test_validate_strict_refuses_any_bad_row(shots: Path) -> None:
    (shots / "m.csv").write_text(MIXED)
    done = bgswap("validate", "m.csv", "--strict", "--json", cwd=shots)
    assert done.returncode == 2
    assert json.loads(done.stdout)["rejected"] == 2  # the report, then the refusal
    assert done.stderr.strip() == "error: --strict: 2 of 4 rows are invalid"


def test_status_json_and_failures_by_code(
    shots: Path, broker_env: dict[str, str], redis_url: str
) -> None:
    submitted(shots, broker_env, "s1")
    store = BatchStore.from_url(redis_url)
    assert failures_by_code(store, "s1") == {"input.invalid_enum": 1, "input.missing_field": 1}
    done = bgswap("status", "s1", "--json", cwd=shots, env=broker_env)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    status = json.loads(line)
    assert set(status) >= {"batch_id", "state", "counts", "cost_usd", "created_at",
                           "finished_at", "rate_rows_per_s", "eta_s", "errors_by_code"}  # fmt: skip
    assert status["batch_id"] == "s1" and status["state"] == "running"
    assert status["counts"]["queued"] == 2 and status["counts"]["failed"] == 2
    assert status["counts"]["total"] == 4 and status["finished_at"] is None
    assert status["errors_by_code"] == {"input.invalid_enum": 1, "input.missing_field": 1}
    summary = final_summary(store, "s1", store.meta("s1"))
    assert summary["outputs"] == f"{shots / 'out'}/s1/" and summary["halted_providers"] == {}
    assert summary["errors_by_code"] == status["errors_by_code"]
    table = bgswap("status", "s1", cwd=shots, env=broker_env)
    assert "failures by code" in table.stderr
    assert any("input.missing_field" in x and x.rstrip("│ ").endswith("1")
               for x in table.stderr.splitlines())  # fmt: skip


def test_status_fields_rate_and_eta() -> None:
    from datetime import UTC, datetime

    counts = dict.fromkeys(ALL_STATES, 0) | {"succeeded": 30, "queued": 70}
    meta = {"total": "100", "status": "running", "created_at": "2026-01-01T00:00:00+00:00"}
    now = datetime(2026, 1, 1, 0, 0, 10, tzinfo=UTC)
    fields = status_fields("b", meta, counts, {}, now)
    assert (fields["rate_rows_per_s"], fields["eta_s"]) == (3.0, 23.3)
    done = meta | {"status": "done", "finished_at": "2026-01-01T00:00:20+00:00"}
    counts = counts | {"succeeded": 100, "queued": 0}
    fields = status_fields("b", done, counts, {}, datetime(2026, 1, 2, tzinfo=UTC))
    assert (fields["rate_rows_per_s"], fields["eta_s"]) == (5.0, None)  # over its own life


def test_status_watch_json_is_a_line_per_refresh_until_done(
    shots: Path, broker_env: dict[str, str], redis_url: str
) -> None:
    submitted(shots, broker_env, "w1")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}, **broker_env}
    proc = subprocess.Popen(
        [BGSWAP, "status", "w1", "--watch", "--json", "--interval", "0.2"],
        cwd=shots, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first, second = json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())
        assert first["state"] == second["state"] == "running"
        BatchStore.from_url(redis_url).set_meta("w1", status="done")
        out, errors = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, errors
    assert json.loads(out.splitlines()[-1])["state"] == "done"


def test_status_watch_off_a_terminal_prints_one_table_at_the_end(
    shots: Path, broker_env: dict[str, str], redis_url: str
) -> None:
    submitted(shots, broker_env, "w2")
    store = BatchStore.from_url(redis_url)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}, **broker_env}
    proc = subprocess.Popen(
        [BGSWAP, "status", "w2", "--watch", "--interval", "0.2"],
        cwd=shots, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.5)  # several refreshes
    store.set_meta("w2", status="done")
    _, errors = proc.communicate(timeout=30)
    assert proc.returncode == 0, errors
    assert errors.count("batch w2 (") == 1 and "batch w2 (done)" in errors, errors


def test_status_watch_on_a_terminal_redraws_in_place(
    shots: Path, broker_env: dict[str, str], redis_url: str
) -> None:
    submitted(shots, broker_env, "w3")
    store = BatchStore.from_url(redis_url)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_")}, **broker_env,
           "TERM": "xterm-256color", "COLUMNS": "100"}  # fmt: skip
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [BGSWAP, "status", "w3", "--watch", "--interval", "0.2"],
        cwd=shots, env=env, stdin=follower, stdout=follower, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while out.count(b"batch w3 (running)") < 1 and time.monotonic() < deadline:
            out += read_some(leader)
        time.sleep(1)  # a few refreshes
        store.set_meta("w3", status="done")
        proc.wait(timeout=30)
        while chunk := read_some(leader):
            out += chunk
    finally:
        proc.kill()
        os.close(leader)
    assert proc.returncode == 0, out
    text = out.decode(errors="replace")
    assert "batch w3 (running)" in text and "batch w3 (done)" in text
    assert "\x1b[2K" in text  # rich's Live erases the previous table's lines: redrawn in place


def read_some(fd: int) -> bytes:
    if not select.select([fd], [], [], 0.5)[0]:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:  # the other end closed
        return b""
