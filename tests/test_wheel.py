"""The image's install, outside the image: deploy/install.sh builds the wheels and installs
bgswap into a fresh virtualenv exactly as deploy/Dockerfile runs it, and what it installed
runs (`bgswap --version`, a `celery -A worker worker` that answers a ping)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "install.sh"


def dockerfile_stages() -> list[tuple[str, list[str]]]:
    """(FROM line, its instructions with continuation lines joined) per stage."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: list[tuple[str, list[str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        else:
            assert stages, f"{line!r} before any FROM"
            stages[-1][1].append(line)
    return stages


def script_calls(instructions: list[str]) -> list[list[str]]:
    """The install.sh invocations of a stage's RUN instructions: [subcommand, args...]."""
    calls = []
    for line in instructions:
        if not line.upper().startswith("RUN "):
            continue
        for part in re.split(r"&&|;", line):
            words = shlex.split(part)
            for i, word in enumerate(words[1:], 1):
                if words[i - 1] == "sh" and word.endswith("install.sh"):
                    calls.append(words[i + 1 :])
    return calls


def test_the_dockerfile_runs_the_install_script_and_ships_no_compiler() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    (builder_from, builder), (final_from, final) = stages
    assert builder_from.split()[1] == final_from.split()[1] == "python:3.11-slim"
    assert builder_from.split()[-1] == "builder"
    assert script_calls(builder) == [["wheels", "/wheels"]]
    assert script_calls(final) == [["install", "/wheels", "/opt/bgswap"]]
    assert any("gcc" in line for line in builder)
    # The final stage: the wheels mounted from the builder, not copied; no compiler, no
    # package manager run, no pip cache; a user that is not root.
    (run,) = [line for line in final if line.upper().startswith("RUN ")]
    assert "from=builder,source=/wheels,target=/wheels" in run
    assert "source=deploy/install.sh,target=/tmp/install.sh" in run
    assert "sh /tmp/install.sh install" in run
    assert not any(re.search(r"\b(gcc|apt-get|apk)\b", line) for line in final)
    assert not any(line.upper().startswith(("COPY ", "ADD ")) for line in final)
    assert "PIP_NO_CACHE_DIR=1" in " ".join(final)
    (user,) = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert user.split(":")[0] not in ("0", "root")
    # The virtualenv goes on PATH after the install (it has no pip of its own).
    (path,) = [i for i, line in enumerate(final) if "PATH=/opt/bgswap/bin:$PATH" in line]
    assert final[path].upper().startswith("ENV ")
    assert path > final.index(run)
    # What the builder copies is what .dockerignore lets through.
    allowed = {
        line.removeprefix("!")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = {
        src for line in builder if line.upper().startswith("COPY ") for src in line.split()[1:-1]
    }
    assert copied == {"pyproject.toml", "README.md", "worker", "producer", "deploy/install.sh"}
    assert copied <= allowed


def installed_env(**extra: str) -> dict[str, str]:
    """This test's environment (dummy AWS credentials, metadata lookups off) without any
    BGSWAP_* or a PYTHONPATH that could bring the checkout's code in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGSWAP_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    out = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, f"{argv}: {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_the_wheel_installs_and_its_worker_answers(
    tmp_path: Path, redis_url: str, redis_client: redis_lib.Redis
) -> None:
    started = time.monotonic()
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    env = installed_env(PYTHON=sys.executable)
    # The Dockerfile's own steps (the same subcommands, test_the_dockerfile_... above).
    run(["sh", str(SCRIPT), "wheels", str(wheels)], tmp_path, env)
    assert len(list(wheels.glob("bgswap-*.whl"))) == 1
    run(["sh", str(SCRIPT), "install", str(wheels), str(venv)], tmp_path, env)
    built = time.monotonic() - started

    env = installed_env()
    assert run([str(venv / "bin" / "bgswap"), "--version"], tmp_path, env).strip() == (
        "bgswap 0.1.0"
    )
    where = run(
        [str(venv / "bin" / "python"), "-c", "import worker, producer; print(worker.__file__)"],
        tmp_path, env,
    )  # fmt: skip
    assert Path(where.strip()).is_relative_to(venv), where  # the installed code, not the repo

    env = installed_env(BGSWAP_BROKER_URL=redis_url)
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [str(venv / "bin" / "celery"), "-A", "worker", "worker"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        answered = False
        while time.monotonic() < deadline and not answered:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            ping = subprocess.run(
                [str(venv / "bin" / "celery"), "-A", "worker", "inspect", "ping", "--timeout", "3"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            answered = ping.returncode == 0 and "pong" in ping.stdout
        assert answered, (tmp_path / "worker.log").read_text()
        stopping = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()
        stopped = time.monotonic() - stopping
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    print(f"wheels built and installed in {built:.1f} s; idle worker exited {stopped:.1f} s "
          f"after SIGTERM; {time.monotonic() - started:.1f} s in all")  # fmt: skip
