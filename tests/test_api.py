"""`bgswap serve` as clients see it: a real server process on a free port, the session
Redis, a real Celery worker where rows must run, httpx for every call."""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port

from batching import BIN, clean_env
from examples.make_examples import product_shot
from producer.embedded import inprocess_worker
from servers.files import FileServer
from worker import runtime
from worker.celery_app import app, apply_config
from worker.settings import Settings
from worker.signing import sign
from worker.state import BatchStore

READ, WRITE, WRITE2 = "read-token-1", "write-token-1", "write-token-2"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKENS = f"read:{sha(READ)},write:{sha(WRITE)},write:{sha(WRITE2)}"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = tmp_path / "shots"
    folder.mkdir()
    for n, kind in enumerate(["box", "bottle", "mug"]):
        product_shot(kind, (64, 48), (240, 240, 240), n).save(folder / f"{kind}.png")
    return folder


Serve = Callable[..., Any]


@pytest.fixture
def serve(
    tmp_path: Path, shots: Path, redis_client: object, redis_url: str
) -> Iterator[Callable[..., Any]]:
    """``serve(**env)``: a `bgswap serve` process (cwd: an empty folder) -> its base URL."""
    procs: list[subprocess.Popen[bytes]] = []

    @contextmanager
    def _noop() -> Iterator[None]:
        yield

    def start(**extra: str) -> str:
        port = free_port()
        cwd = tmp_path / f"cwd-{port}"
        cwd.mkdir()
        env = clean_env(
            BGSWAP_BROKER_URL=redis_url,
            BGSWAP_API_TOKENS=TOKENS,
            BGSWAP_LOCAL_ROOTS=str(shots),
            BGSWAP_OUTPUT=str(tmp_path / "out"),
            **extra,
        )
        log = (tmp_path / f"serve-{port}.log").open("w")
        proc = subprocess.Popen(
            [str(BIN / "bgswap"), "serve", "--port", str(port)],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / f"serve-{port}.log").read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    return base
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("bgswap serve did not start")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=15)
    for log in tmp_path.glob("serve-*.log"):  # the access log names no token
        text = log.read_text()
        assert not any(token in text for token in (READ, WRITE, WRITE2)), text[-2000:]


@contextmanager
def worker(redis_url: str, **settings: Any) -> Iterator[None]:
    config = Settings(broker_url=redis_url, redis_url=redis_url, **settings)
    apply_config(config)
    runtime.configure(config)
    with inprocess_worker(app):
        yield


def wait_done(client: httpx.Client, batch_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").json()
        if fields["state"] in ("done", "canceled", "failed"):
            return fields
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} not done: {fields}")


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body["error"]) == {"code", "message"}, body
    code: str = body["error"]["code"]
    return code


def test_serve_without_a_broker_refuses_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "bgswap"), "serve"], cwd=tmp_path, env=clean_env(), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "BGSWAP_BROKER_URL" in lines[0], done.stderr


def test_health_readiness_and_tokens(serve: Serve) -> None:
    base = serve()
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").status_code == 200
    assert httpx.get(f"{base}/openapi.json").json()["paths"]["/v1/batches"]
    assert httpx.get(f"{base}/docs").status_code == 200
    with httpx.Client(base_url=base) as c:
        assert error_code(c.get("/v1/batches")) == "auth.missing"
        assert c.get("/v1/batches").status_code == 401
        unknown = c.get("/v1/batches", headers=auth("guess"))
        assert unknown.status_code == 401 and error_code(unknown) == "auth.invalid"
        assert c.get("/v1/batches", headers={"Authorization": f"Basic {READ}"}).status_code == 401
        assert c.get("/v1/batches", headers=auth(READ)).json() == {
            "batches": [], "next_cursor": None
        }  # fmt: skip
        assert c.get("/v1/batches", headers=auth(WRITE)).status_code == 200  # write reads too
        body = {"rows": [{"id": "a", "image": "box.png", "prompt": "p"}]}
        refused = c.post("/v1/batches", json=body, headers=auth(READ))
        assert refused.status_code == 403 and error_code(refused) == "auth.scope"
        assert c.post("/v1/batches/x/cancel", headers=auth(READ)).status_code == 403
        assert c.get("/v1/batches", headers=auth(READ)).json()["batches"] == []


def test_the_api_counts_requests_by_route_template_on_its_metrics_port(serve: Serve) -> None:
    port = free_port()
    base = serve(BGSWAP_METRICS_PORT=str(port))
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["status"] == "ready" and ready["redis"] == "ok" and ready["broker"] == "ok"
    with httpx.Client(base_url=base) as c:
        assert c.get("/v1/batches/nope-1", headers=auth(READ)).status_code == 404
        assert c.get("/v1/batches/nope-2", headers=auth(READ)).status_code == 404
        assert c.get("/some/secret-looking/path").status_code == 404
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert ('bgswap_api_requests_total{method="GET",route="/v1/batches/{batch_id}",'
            'status="404"} 2.0') in text  # fmt: skip
    assert 'bgswap_api_requests_total{method="GET",route="/readyz",status="200"} 1.0' in text
    assert 'route="unmatched",status="404"} 1.0' in text
    assert "nope-1" not in text and "secret-looking" not in text  # no caller-chosen label
    assert 'bgswap_queue_messages{queue="bgswap"} 0.0' in text
    assert 'bgswap_provider_in_flight_limit{provider="fal"} 40.0' in text
    assert READ not in text


def test_readyz_answers_503_when_redis_does_not(serve: Serve) -> None:
    base = serve(BGSWAP_REDIS_URL="redis://127.0.0.1:1/0")
    ready = httpx.get(f"{base}/readyz", timeout=10)
    assert ready.status_code == 503 and error_code(ready) == "infra.unreachable"
    assert httpx.get(f"{base}/healthz").status_code == 200


@pytest.mark.slow
def test_a_batch_runs_and_its_results_come_back_as_jsonl_and_csv(
    serve: Serve, shots: Path, tmp_path: Path, redis_url: str
) -> None:
    base = serve()
    rows = [
        {"id": "a", "image": "box.png", "prompt": "a {id} on a table"},
        {"id": "b", "image": str(shots / "bottle.png"), "prompt": "=p", "shadow": False},
        {"id": "c", "image": "box.png", "prompt": "p", "style_preset": "NOPE"},
        {"id": "d", "image": "/etc/hostname", "prompt": "p"},
    ]
    with worker(redis_url), httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        made = c.post("/v1/batches", json={"rows": rows, "batch_id": "api1",
                                           "options": {"shadow": False}})  # fmt: skip
        assert made.status_code == 201, made.text
        answer = made.json()
        assert answer["batch_id"] == "api1" and answer["skipped"] == 0
        assert answer["counts"]["total"] == 4
        assert [(e["line"], e["column"]) for e in answer["rejected"]] == [
            (3, "style_preset"), (4, "image")
        ]  # fmt: skip
        assert answer["rejected"][1]["code"] == "input.path_outside_root"
        assert set(answer) == {"batch_id", "state", "counts", "rejected",
                               "estimated_cost_usd", "skipped"}  # fmt: skip
        fields = wait_done(c, "api1")
        assert fields["counts"]["succeeded"] == 2 and fields["counts"]["failed"] == 2
        assert fields["created_at"] and fields["finished_at"] and fields["eta_s"] is None
        lines = [json.loads(x) for x in c.get("/v1/batches/api1/results").text.splitlines()]
        assert [x["status"] for x in lines] == ["succeeded", "succeeded", "failed", "failed"]
        assert lines[0]["prompt"] == "a a on a table"
        assert Path(lines[0]["outputs"][0]["key"]).is_file()
        assert str(tmp_path / "out" / "api1") in lines[0]["outputs"][0]["key"]
        as_csv = c.get("/v1/batches/api1/results", headers={"Accept": "text/csv"})
        assert as_csv.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert [r["id"] for r in table] == ["a", "b", "c", "d"]
        assert table[1]["prompt"] == "'=p"  # defused for spreadsheets, as `bgswap results`
    meta = BatchStore.from_url(redis_url).meta("api1")
    assert json.loads(meta["options"])["set"] == {"shadow": "false"}
    assert not list((tmp_path).glob("cwd-*/*")), "nothing is written in the server's folder"


def test_a_raw_csv_or_jsonl_body_with_its_fields_as_query_parameters(
    serve: Serve, redis_url: str
) -> None:
    base = serve()
    with httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        made = c.post(
            "/v1/batches",
            params={"batch_id": "raw1", "options.shadow": "false", "provider": "local"},
            content=b"id,image,prompt\na,box.png,p\nb,mug.png,p\n",
            headers={"Content-Type": "text/csv"},
        )
        assert made.status_code == 201, made.text
        assert made.json()["counts"]["queued"] == 2
        lines = b'{"id": "x", "image": "box.png", "prompt": "p"}\n'
        made = c.post("/v1/batches", params={"batch_id": "raw2"}, content=lines,
                      headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
        assert made.status_code == 201 and made.json()["counts"]["total"] == 1
        bad = c.post("/v1/batches", params={"colour": "red"}, content=lines,
                     headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
        assert bad.status_code == 422 and "colour" in bad.json()["error"]["message"]
        garbage = c.post(
            "/v1/batches", content=b"\x00\x01\xff", headers={"Content-Type": "text/csv"}
        )
        assert garbage.status_code == 400 and error_code(garbage) == "manifest.unreadable"
    meta = BatchStore.from_url(redis_url).meta("raw1")
    assert meta["format"] == "csv" and json.loads(meta["options"])["set"] == {"shadow": "false"}


def test_strict_refuses_every_bad_row_and_enqueues_nothing(serve: Serve, redis_url: str) -> None:
    base = serve()
    rows = [
        {"id": "a", "image": "box.png", "prompt": "p"},
        {"id": "b", "image": "box.png", "prompt": "p", "style_preset": "NOPE"},
        {"id": "c", "prompt": "p"},
    ]
    with httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        refused = c.post("/v1/batches", json={"rows": rows, "strict": True, "batch_id": "s1"})
        assert refused.status_code == 422
        body = refused.json()
        assert body["error"]["code"] == "manifest.strict"
        assert [(e["line"], e["column"]) for e in body["rejected"]] == [
            (2, "style_preset"), (3, "image")
        ]  # fmt: skip
        assert c.get("/v1/batches/s1").status_code == 404
    assert BatchStore.from_url(redis_url).batch_ids() == []


def test_errors_have_one_shape_and_their_status(serve: Serve, tmp_path: Path) -> None:
    base = serve(BGSWAP_API_RATE="")  # many calls in a row: test_each_token_has_its_rate
    row = {"id": "a", "image": "box.png", "prompt": "p"}
    with httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        for path in ("/v1/batches/nope", "/v1/batches/nope/results", "/v1/batches/../x"):
            gone = c.get(path)
            assert gone.status_code == 404 and error_code(gone), path
        assert c.post("/v1/batches/nope/cancel").status_code == 404
        assert c.post("/v1/batches/nope/retry").status_code == 404
        assert error_code(c.get("/v1/nothing")) == "request.not_found"
        assert error_code(c.get("/v1/batches", params={"limit": 0})) == "request.invalid"
        assert c.get("/v1/batches", params={"cursor": "nope"}).status_code == 400
        for body in ({}, {"rows": [row], "manifest_url": "https://x/m.csv"},
                     {"rows": [row], "colour": 1}, {"rows": "x"}):  # fmt: skip
            bad = c.post("/v1/batches", json=body)
            assert bad.status_code == 422 and error_code(bad) == "request.invalid", body
        not_json = c.post("/v1/batches", content=b"{", headers={"Content-Type": "application/json"})
        assert not_json.status_code == 422 and error_code(not_json) == "request.invalid"
        for body in ({"rows": [row], "provider": "replicate"}, {"rows": [row], "batch_id": "../x"},
                     {"rows": [row], "output": "ftp://x/y"}):  # fmt: skip
            bad = c.post("/v1/batches", json=body)
            assert bad.status_code == 422 and error_code(bad) == "request.invalid", body
        for output in ("/tmp/elsewhere", "out", str(tmp_path / "out-other"), str(tmp_path)):
            bad = c.post("/v1/batches", json={"rows": [row], "output": output})
            assert bad.status_code == 422 and error_code(bad) == "request.output", output
        inside = c.post("/v1/batches", json={"rows": [row], "output": str(tmp_path / "out/x")})
        assert inside.status_code == 201, inside.text
        assert c.post("/v1/batches", json={"rows": [row], "batch_id": "e1"}).status_code == 201
        taken = c.post("/v1/batches", json={"rows": [row], "batch_id": "e1"})
        assert taken.status_code == 409 and error_code(taken) == "batch.exists"
        for url in ("http://93.184.215.14/hook", "https://127.0.0.1/hook", "https://10.1.2.3/x",
                    "https://localhost/x", "ftp://93.184.215.14/x"):  # fmt: skip
            bad = c.post("/v1/batches", json={"rows": [row], "callback_url": url})
            assert bad.status_code == 422 and error_code(bad) == "request.callback_url", url
        private = c.post("/v1/batches", json={"manifest_url": "https://127.0.0.1/m.csv"})
        assert private.status_code == 422 and error_code(private) == "request.manifest_url"
        hooked = c.post("/v1/batches", json={"rows": [row], "batch_id": "cb1",
                                             "callback_url": "https://93.184.215.14/hook"})  # fmt: skip
        assert hooked.status_code == 201, hooked.text


def test_callback_url_is_kept_in_the_batch_meta(serve: Serve, redis_url: str) -> None:
    base = serve()
    row = {"id": "a", "image": "box.png", "prompt": "p"}
    with httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        made = c.post("/v1/batches", json={"rows": [row], "batch_id": "cb",
                                           "callback_url": "https://93.184.215.14/h?x=1"})  # fmt: skip
        assert made.status_code == 201, made.text
    meta = BatchStore.from_url(redis_url).meta("cb")
    assert meta["callback_url"] == "https://93.184.215.14/h?x=1"


def test_body_and_row_caps_answer_413(serve: Serve, redis_url: str) -> None:
    base = serve(BGSWAP_API_MAX_BODY_BYTES="4096", BGSWAP_API_MAX_ROWS="3")
    rows = [{"id": str(n), "image": "box.png", "prompt": "p"} for n in range(4)]
    with httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        many = c.post("/v1/batches", json={"rows": rows})
        assert many.status_code == 413 and error_code(many) == "request.too_many_rows"
        csv_rows = "id,image,prompt\n" + "".join(f"{n},box.png,p\n" for n in range(4))
        many = c.post("/v1/batches", content=csv_rows, headers={"Content-Type": "text/csv"})
        assert many.status_code == 413 and error_code(many) == "request.too_many_rows"
        big = {"rows": rows[:1], "prompt": "x" * 5000}
        too_big = c.post("/v1/batches", json=big)
        assert too_big.status_code == 413 and error_code(too_big) == "request.too_large"
    # chunked, no Content-Length, and a body that never ends: refused once past the cap
    assert over_the_cap_unfinished(base, 4096).startswith(b"HTTP/1.1 413")
    with httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        assert c.post("/v1/batches", json={"rows": rows[:3]}).status_code == 201
    assert len(BatchStore.from_url(redis_url).batch_ids()) == 1


def over_the_cap_unfinished(base: str, cap: int) -> bytes:
    """Send a chunked body past ``cap`` without ever ending it; the server's answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (f"POST /v1/batches HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {WRITE}"
                "\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode())
        for _ in range(cap // 1024 + 2):
            sock.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
        return sock.recv(64)  # no final chunk: the answer cannot wait for the end


def test_each_token_has_its_rate(serve: Serve) -> None:
    base = serve(BGSWAP_API_RATE="3/m")
    with httpx.Client(base_url=base) as c:
        answers = [c.get("/v1/batches", headers=auth(READ)) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert error_code(answers[3]) == "rate.limited"
        assert 1 <= int(answers[3].headers["Retry-After"]) <= 20
        assert c.get("/v1/batches", headers=auth(WRITE)).status_code == 200  # its own rate
        assert c.get("/healthz").status_code == 200  # not limited


def test_idempotency_key_returns_the_same_batch_and_refuses_another_body(
    serve: Serve, redis_url: str
) -> None:
    base = serve()
    body = {"rows": [{"id": "a", "image": "box.png", "prompt": "p"}]}
    key = {"Idempotency-Key": "order-17"}
    with httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        first = c.post("/v1/batches", json=body, headers=key)
        assert first.status_code == 201, first.text
        again = c.post("/v1/batches", json=body, headers=key)
        assert again.status_code == 200 and again.json() == first.json()
        other = c.post("/v1/batches", json={**body, "force": True}, headers=key)
        assert other.status_code == 409 and error_code(other) == "idempotency.mismatch"
        # keys are scoped per token: another caller's key is another batch
        theirs = c.post("/v1/batches", json=body, headers={**key, **auth(WRITE2)})
        assert theirs.status_code == 201
        assert theirs.json()["batch_id"] != first.json()["batch_id"]
    store = BatchStore.from_url(redis_url)
    assert len(store.batch_ids()) == 2
    assert store.counts(first.json()["batch_id"])["queued"] == 1  # enqueued once
    ttl = store.redis.ttl(next(iter(store.redis.scan_iter("bgswap:api:idem:*"))))
    assert 23 * 3600 < ttl <= 24 * 3600


def test_concurrent_duplicates_make_one_batch(serve: Serve, redis_url: str) -> None:
    base = serve()
    rows = [{"id": str(n), "image": "box.png", "prompt": "p"} for n in range(300)]
    for attempt in range(3):
        key = {"Idempotency-Key": f"dup-{attempt}", **auth(WRITE)}
        start = threading.Barrier(2)
        answers: list[httpx.Response] = []

        def post(
            key: dict[str, str] = key,
            start: threading.Barrier = start,
            answers: list[httpx.Response] = answers,
        ) -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                start.wait()
                answers.append(c.post("/v1/batches", json={"rows": rows}, headers=key))

        threads = [threading.Thread(target=post) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(a.status_code for a in answers) == [200, 201], [a.text for a in answers]
        assert answers[0].json()["batch_id"] == answers[1].json()["batch_id"]
    store = BatchStore.from_url(redis_url)
    ids = store.batch_ids()
    assert len(ids) == 3
    assert all(store.counts(b)["queued"] == 300 for b in ids)


def test_pages_of_batches_newest_first(serve: Serve) -> None:
    base = serve()
    row = {"id": "a", "image": "box.png", "prompt": "p"}
    with httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        for n in range(5):
            assert (
                c.post("/v1/batches", json={"rows": [row], "batch_id": f"p{n}"}).status_code == 201
            )
            time.sleep(0.01)
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = c.get("/v1/batches", params=params).json()
            seen += [b["batch_id"] for b in page["batches"]]
            assert all(b["counts"]["total"] == 1 for b in page["batches"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert seen == ["p4", "p3", "p2", "p1", "p0"]


@pytest.mark.slow
def test_cancel_and_retry(serve: Serve, redis_url: str) -> None:
    base = serve(BGSWAP_ALLOW_PRIVATE_URLS="1")
    with FileServer() as files, httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        # no worker runs: cancel stops every queued row
        rows = [{"id": str(n), "image": "box.png", "prompt": "p"} for n in range(3)]
        assert c.post("/v1/batches", json={"rows": rows, "batch_id": "c1"}).status_code == 201
        canceled = c.post("/v1/batches/c1/cancel")
        assert canceled.status_code == 200 and canceled.json()["canceled_rows"] == 3
        assert canceled.json()["counts"]["canceled"] == 3
        with worker(redis_url, allow_private_urls=True):
            assert wait_done(c, "c1")["state"] == "canceled"
            lines = c.get("/v1/batches/c1/results").text.splitlines()
            assert [json.loads(x)["status"] for x in lines] == ["canceled"] * 3
            assert json.loads(lines[0])["error"]["code"] == "job.canceled"
            # a row whose source is not there yet fails; retry runs it again
            later = files.url("/later.png")
            rows = [{"id": "a", "image": "box.png", "prompt": "p"},
                    {"id": "b", "image": later, "prompt": "p"}, {"id": "c", "prompt": "p"}]  # fmt: skip
            assert c.post("/v1/batches", json={"rows": rows, "batch_id": "r1"}).status_code == 201
            first = wait_done(c, "r1")
            assert first["errors_by_code"] == {"input.missing_field": 1, "source.not_found": 1}
            buf = io.BytesIO()
            product_shot("ring", (64, 48), (240, 240, 240), 3).save(buf, "PNG")
            files.add("/later.png", buf.getvalue(), "image/png")
            retried = c.post("/v1/batches/r1/retry")
            assert retried.status_code == 200 and retried.json()["requeued_rows"] == 1
            deadline = time.monotonic() + 60
            while c.get("/v1/batches/r1").json()["counts"]["succeeded"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            wait_done(c, "r1")
        lines = [json.loads(x) for x in c.get("/v1/batches/r1/results").text.splitlines()]
        assert [x["status"] for x in lines] == ["succeeded", "succeeded", "failed"]


@pytest.mark.slow
def test_the_openapi_schema_holds_no_5xx_and_answers_conform(serve: Serve, tmp_path: Path) -> None:
    # The hooks configured, so that they are in the schema and fuzzed too.
    mapping = json.dumps({"prompt": "{title}", "provider": "local"})
    base = serve(
        BGSWAP_API_RATE="",
        BGSWAP_HOOK_SECRET="s1",
        BGSWAP_SHOPIFY_WEBHOOK_SECRET="s2",
        BGSWAP_SHOPIFY_MAPPING=mapping,
    )
    done = subprocess.run(
        [
            str(BIN / "schemathesis"), "run", f"{base}/openapi.json",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance",
            "--phases", "examples,coverage,fuzzing", "--max-examples", "15", "--workers", "1",
            "--header", f"Authorization: Bearer {WRITE}", "--request-timeout", "20",
            "--suppress-health-check", "all", "--seed", "1",
        ],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_a_manifest_by_url(serve: Serve) -> None:
    base = serve(BGSWAP_ALLOW_PRIVATE_URLS="1", BGSWAP_API_MAX_BODY_BYTES="4096")
    with FileServer() as files, httpx.Client(base_url=base, headers=auth(WRITE)) as c:
        files.add("/m.csv", b"id,image,prompt\na,box.png,p\nb,mug.png,p\n", "text/csv")
        files.add("/big.jsonl", b'{"id": "a"}\n' * 1000, "application/x-ndjson")
        made = c.post("/v1/batches", json={"manifest_url": files.url("/m.csv")})
        assert made.status_code == 201, made.text
        assert made.json()["counts"]["queued"] == 2 and made.json()["rejected"] == []
        big = c.post("/v1/batches", json={"manifest_url": files.url("/big.jsonl")})
        assert big.status_code == 413 and error_code(big) == "request.manifest_url"
        gone = c.post("/v1/batches", json={"manifest_url": files.url("/nope.csv")})
        assert gone.status_code == 422 and error_code(gone) == "request.manifest_url"


def test_tokens_are_known_by_their_sha256_and_write_implies_read() -> None:
    from producer.api import ApiError, authenticate

    settings = Settings(
        api_tokens=f"read:{sha(READ)}, write:{sha(WRITE).upper()},read:{sha(WRITE)}"
    )
    assert authenticate(settings, f"Bearer {READ}", "read").scope == "read"
    assert authenticate(settings, f"bearer {WRITE}", "write").scope == "write"  # listed twice
    assert authenticate(settings, f"Bearer {WRITE}", "read").token == sha(WRITE)
    for header, scope, status in (
        (None, "read", 401), (f"Bearer {sha(READ)}", "read", 401), ("Bearer ", "read", 401),
        (f"Token {READ}", "read", 401), (f"Bearer {READ}", "write", 403),
    ):  # fmt: skip
        with pytest.raises(ApiError) as refused:
            authenticate(settings, header, scope)
        assert refused.value.status == status, header
    with pytest.raises(ValueError, match="scope:sha256hex"):
        Settings(api_tokens=f"admin:{sha(READ)}")
    with pytest.raises(ValueError, match="scope:sha256hex"):
        Settings(api_tokens="write:my-plain-token")


def test_signed_hooks_make_their_batches_through_the_api(serve: Serve, redis_url: str) -> None:
    """The hooks mounted in `bgswap serve`: a verified delivery becomes a real batch (the
    same submit code as POST /v1/batches), once; an unsigned or replayed one none."""
    mapping = json.dumps({"prompt": "{title} on a marble counter", "provider": "local"})
    base = serve(BGSWAP_HOOK_SECRET="hook-secret", BGSWAP_SHOPIFY_WEBHOOK_SECRET="shop-secret",
                 BGSWAP_SHOPIFY_MAPPING=mapping)  # fmt: skip
    store = BatchStore.from_url(redis_url)
    body = json.dumps({"rows": [{"id": "g1", "image": "box.png", "prompt": "p"}],
                       "batch_id": "hook1"}).encode()  # fmt: skip
    signed = {"X-Bgswap-Signature": sign("hook-secret", body, int(time.time())),
              "Content-Type": "application/json"}  # fmt: skip
    made = httpx.post(f"{base}/v1/hooks/generic", content=body, headers=signed)
    assert made.status_code == 201, made.text
    assert made.json()["batch_id"] == "hook1" and store.counts("hook1")["queued"] == 1
    replayed = httpx.post(f"{base}/v1/hooks/generic", content=body, headers=signed)
    assert replayed.status_code == 401 and error_code(replayed) == "hook.replayed"
    unsigned = httpx.post(f"{base}/v1/hooks/generic", content=body.replace(b"hook1", b"hook2"),
                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert unsigned.status_code == 401 and not store.exists("hook2")

    payload = {"id": 7, "title": "Mug", "handle": "mug", "images": [
        {"id": 11, "src": "https://cdn.example.com/mug.jpg", "position": 1}]}  # fmt: skip
    raw = json.dumps(payload).encode()
    # Shopify's header, computed here without the project's code.
    mac = base64.b64encode(hmac.new(b"shop-secret", raw, hashlib.sha256).digest()).decode()
    headers = {"X-Shopify-Hmac-Sha256": mac, "X-Shopify-Topic": "products/create",
               "X-Shopify-Webhook-Id": "delivery-1", "Content-Type": "application/json"}  # fmt: skip
    first = httpx.post(f"{base}/v1/hooks/shopify", content=raw, headers=headers)
    assert first.status_code == 201, first.text
    batch = first.json()["batch_id"]
    job = json.loads(store.job(batch, 0) or "{}")
    assert job["spec"]["id"] == "7-11" and job["spec"]["prompt"] == "Mug on a marble counter"
    again = httpx.post(f"{base}/v1/hooks/shopify", content=raw, headers=headers)
    assert again.status_code == 200 and again.json() == {"batch_id": batch, "duplicate": True}
    assert len([b for b in store.batch_ids(50) if b not in ("hook1",)]) == 1  # one batch
