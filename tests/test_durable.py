"""The embedded default's durable state, interrupts and resume, with the real `bgswap`
console script, real signals, the real redis-server and the strict fake Runware: every
batch a run made stays visible, an interrupted run hands its rows back and says how to
resume, a resumed batch polls its saved tasks instead of paying again, and no
redis-server outlives bgswap."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from batching import BIN, bgswap, clean_env, manifest_lines, png, start_worker
from faults import wait_until
from producer import runner
from producer.embedded import state_dir_for
from servers.files import FileServer
from servers.runware import FakeRunware
from worker.state import BatchStore

KEY = "rw-durable-key"
ROWS = 5


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def state_dir() -> Path:
    return state_dir_for(None)  # under this test's XDG_STATE_HOME (conftest)


def servers_of(state: Path) -> list[int]:
    """Live (not zombie) processes whose command line names the state directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            zombie = " Z " in (proc / "stat").read_text().split(")", 1)[1][:4]
        except OSError:
            continue
        if b"redis-server" in cmdline and str(state).encode() in cmdline and not zombie:
            pids.append(int(proc.name))
    return pids


def local_manifest(tmp_path: Path, rows: int = 3) -> None:
    for i in range(rows):
        (tmp_path / f"p{i}.png").write_bytes(png(seed=i))
    (tmp_path / "m.csv").write_text(
        "id,image,prompt\n" + "".join(f"p{i},p{i}.png,on oak\n" for i in range(rows))
    )


def test_a_run_s_batch_stays_for_status_results_and_batches(tmp_path: Path) -> None:
    local_manifest(tmp_path)
    env = clean_env()
    done = bgswap("run", "m.csv", "--output", "out", "--batch-id", "d1", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    progress = next(x for x in done.stderr.splitlines() if x.startswith("process"))
    assert "local" in progress and "rows/s" in progress and "$0.00" in progress
    assert servers_of(state_dir()) == []  # the run's server ended with it
    status = bgswap("status", "d1", cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    assert "succeeded" in status.stderr and "3" in status.stderr
    results = bgswap("results", "d1", cwd=tmp_path, env=env)
    assert [json.loads(x)["status"] for x in results.stdout.splitlines()] == ["succeeded"] * 3
    listed = bgswap("batches", "--json", cwd=tmp_path, env=env)
    summary = json.loads(listed.stdout.splitlines()[0])
    assert summary["batch_id"] == "d1" and summary["state"] == "done"
    assert summary["counts"]["succeeded"] == 3 and summary["counts"]["total"] == 3
    assert servers_of(state_dir()) == []  # started on demand, ended with the command
    assert bgswap("status", "nope", cwd=tmp_path, env=env).returncode == 2
    unknown = bgswap("resume", "nope", cwd=tmp_path, env=env)
    assert unknown.returncode == 2 and unknown.stderr.strip() == "error: no batch nope"


def test_run_with_the_id_of_a_finished_batch_from_another_manifest_is_refused(
    tmp_path: Path,
) -> None:
    local_manifest(tmp_path)
    env = clean_env()
    assert bgswap("run", "m.csv", "--output", "out", "--batch-id", "d2",
                  cwd=tmp_path, env=env).returncode == 0  # fmt: skip
    again = bgswap("run", "m.csv", "--output", "out", "--batch-id", "d2", cwd=tmp_path, env=env)
    assert again.returncode == 0 and "has ended already" in again.stderr
    (tmp_path / "m.csv").write_text("id,image,prompt\np0,p0.png,on slate\n")
    other = bgswap("run", "m.csv", "--output", "out", "--batch-id", "d2", cwd=tmp_path, env=env)
    assert other.returncode == 2
    assert "made from another manifest" in other.stderr


def runware_env(fake: FakeRunware) -> dict[str, str]:
    return clean_env(
        RUNWARE_API_KEY=KEY, RUNWARE_API_URL=fake.url, BGSWAP_ALLOW_PRIVATE_URLS="1",
        BGSWAP_RUNWARE_POLL_INITIAL_S="0.3", BGSWAP_RUNWARE_POLL_MAX_S="0.5",
    )  # fmt: skip


def start_run(tmp_path: Path, env: dict[str, str], batch: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "bgswap"), "run", "m.csv", "--provider", "runware", "--output", "out",
         "--batch-id", batch],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def url_manifest(tmp_path: Path, files: FileServer) -> None:
    url = files.add("/s.png", png(), "image/png")
    (tmp_path / "m.csv").write_text(
        "id,image,prompt\n" + "".join(f"r{i},{url},p\n" for i in range(ROWS))
    )


def assert_paid_once(fake: FakeRunware, lines: list[dict[str, object]]) -> None:
    assert [x["status"] for x in lines] == ["succeeded"] * ROWS, [x["error"] for x in lines]
    task_ids = sorted(str(x["provider_task_id"]) for x in lines)
    assert task_ids == sorted(fake.paid)  # each row's own task, each paid exactly once
    assert all(fake.accept_count(u) == 1 for u in fake.paid)


@pytest.mark.slow
def test_ctrl_c_hands_rows_back_writes_a_partial_manifest_and_resume_pays_nothing_again(
    tmp_path: Path, files: FileServer
) -> None:
    url_manifest(tmp_path, files)
    with FakeRunware(KEY, processing_s=4.0) as fake:
        env = runware_env(fake)
        proc = start_run(tmp_path, env, "int1")
        wait_until(lambda: len(fake.paid) == ROWS, 60, "every row accepted")
        # Another command meanwhile uses the run's server.
        status = bgswap("status", "int1", cwd=tmp_path, env=env, timeout=30)
        assert status.returncode == 0, status.stderr
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("interrupted:") and "bgswap resume int1" in last
        partial = manifest_lines(tmp_path / "out/int1/manifest.jsonl")
        assert [x["status"] for x in partial] == ["pending"] * ROWS
        assert servers_of(state_dir()) == []
        assert not (state_dir() / "redis.pid").exists()

        listed = bgswap("batches", "--json", cwd=tmp_path, env=env)
        assert json.loads(listed.stdout.splitlines()[0])["state"] == "interrupted"
        # Another run meanwhile does not take up the interrupted batch's rows.
        (tmp_path / "p.png").write_bytes(png())
        (tmp_path / "o.csv").write_text("id,image,prompt\no1,p.png,on oak\n")
        other = bgswap("run", "o.csv", "--provider", "local", "--output", "out",
                       cwd=tmp_path, env=env, timeout=60)  # fmt: skip
        assert other.returncode == 0, other.stderr
        listed = bgswap("batches", "--json", cwd=tmp_path, env=env)
        int1 = next(json.loads(x) for x in listed.stdout.splitlines() if '"int1"' in x)
        assert int1["state"] == "interrupted" and int1["counts"]["queued"] == ROWS
        resumed = bgswap("resume", "int1", cwd=tmp_path, env=env, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert_paid_once(fake, manifest_lines(tmp_path / "out/int1/manifest.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c twice", "sigkill"])
def test_a_run_ended_any_way_leaves_no_server_and_goes_on_without_paying_twice(
    tmp_path: Path, files: FileServer, how: str
) -> None:
    url_manifest(tmp_path, files)
    with FakeRunware(KEY, processing_s=4.0) as fake:
        env = runware_env(fake)
        proc = start_run(tmp_path, env, "k1")
        wait_until(lambda: len(fake.paid) == ROWS, 60, "every row accepted")
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif how == "ctrl-c twice":
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
        else:
            proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == {"sigterm": 143, "ctrl-c twice": 130, "sigkill": -9}[how]
        assert "Traceback" not in stderr
        if how == "ctrl-c twice":
            assert stderr.strip().splitlines()[-1] == "interrupted again: exiting now"
        # The parent-death signal ends the server even when its parent could do nothing.
        wait_until(lambda: servers_of(state_dir()) == [], 15, "the redis-server to end")

        # Going on: `run` with the batch's id and the same file continues it.
        again = bgswap("run", "m.csv", "--provider", "runware", "--output", "out",
                       "--batch-id", "k1", cwd=tmp_path, env=env, timeout=120)  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert "resuming batch" in again.stderr
        assert_paid_once(fake, manifest_lines(tmp_path / "out/k1/manifest.jsonl"))


def state_client(state: Path) -> redis_lib.Redis:
    return redis_lib.Redis(unix_socket_path=str(state / "redis.sock"), decode_responses=True)


def start(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "bgswap"), *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def recorded(state: Path, batch: str) -> int:
    try:
        return int(state_client(state).hlen(f"bgswap:{{{batch}}}:jobs"))
    except (redis_lib.ConnectionError, FileNotFoundError):
        return 0


@pytest.mark.slow
def test_a_run_interrupted_while_reading_its_manifest_resumes_with_the_rest(
    tmp_path: Path,
) -> None:
    """Rows not yet read when the signal came are read from the same file on resume."""
    rows = 20_000
    (tmp_path / "p.png").write_bytes(png())
    (tmp_path / "m.csv").write_text(
        "id,image,prompt\n" + "".join(f"p{i},p.png,on oak\n" for i in range(rows))
    )
    state = tmp_path / "state"
    env = clean_env(BGSWAP_STATE_DIR=str(state))
    proc = start(tmp_path, env, "run", "m.csv", "--output", "out", "--batch-id", "e1")
    wait_until(lambda: recorded(state, "e1") >= 500, 60, "the first chunk")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    first = json.loads(bgswap("batches", "--json", cwd=tmp_path, env=env).stdout.splitlines()[0])
    assert first["state"] == "interrupted"
    assert first["counts"]["total"] < rows, "interrupted too late to test the rest"

    # Resumed, it reads the rest of the file; interrupted again once all is enqueued.
    again = start(tmp_path, env, "resume", "e1")
    wait_until(lambda: recorded(state, "e1") == rows, 120, "the rest enqueued")
    wait_until(lambda: state_client(state).hget("bgswap:{e1}:meta", "total"), 30, "sealed")
    again.send_signal(signal.SIGINT)
    _, stderr = again.communicate(timeout=60)
    assert again.returncode == 130, stderr
    results = bgswap("results", "e1", cwd=tmp_path, env=env)
    lines = [json.loads(x) for x in results.stdout.splitlines()]
    assert [x["id"] for x in lines] == [f"p{i}" for i in range(rows)]  # each row once, in order


@pytest.mark.slow
def test_with_a_broker_an_interrupted_run_stops_waiting_and_the_workers_go_on(
    redis_url: str, redis_client: redis_lib.Redis, tmp_path: Path, files: FileServer
) -> None:
    url_manifest(tmp_path, files)
    with FakeRunware(KEY, processing_s=3.0) as fake:
        env = {**runware_env(fake), "BGSWAP_BROKER_URL": redis_url}
        worker = start_worker(env, tmp_path / "w.log")
        try:
            proc = start_run(tmp_path, env, "b1")
            wait_until(lambda: len(fake.paid) == ROWS, 60, "every row accepted")
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 130, stderr
            assert "the workers go on" in stderr.strip().splitlines()[-1]
            store = BatchStore.from_url(redis_url)
            meta = runner.wait_for_batch(store, "b1", lambda c, t: None, timeout_s=60)
            assert meta["status"] == "done"
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
        assert_paid_once(fake, manifest_lines(tmp_path / "out/b1/manifest.jsonl"))
