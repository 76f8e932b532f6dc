"""Storage under transient faults and expired signatures, against real servers.

Faults are played by ``FaultyS3``, a tiny HTTP server of this file that answers the first
PUTs with scripted faults (503 SlowDown, a reset half-way through the body, a stall, an
expired signature) and forwards the rest to moto's S3 server, so a success is an object
that really landed. Signature expiry is also checked for real with ``SigV4Verifier``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from xml.sax.saxutils import escape

import boto3
import httpx
import pytest
from botocore.compat import get_current_datetime
from botocore.config import Config

from servers.files import FileServer
from servers.s3 import DUMMY_AWS_ENV, MotoS3, SigV4Verifier, moto_s3, use_dummy_aws_env
from worker.errors import Codes, StorageRejected, StorageUnavailable
from worker.netguard import guarded_http_client
from worker.settings import Settings
from worker.storage import Storage

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(4096)
# Bigger than one read and than what a socket buffers, so a reset lands mid-body.
BIG = 4 * 1024 * 1024 + 7


# --- a scripted fault server in front of moto ----------------------------------------------


def s3_error(
    status: int, code: str, message: str, **headers: str
) -> tuple[int, bytes, dict[str, str]]:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code>'
        f"<Message>{escape(message)}</Message><RequestId>R1</RequestId></Error>"
    ).encode()
    return status, body, {"Content-Type": "application/xml", **headers}


SLOWDOWN = s3_error(503, "SlowDown", "Please reduce your request rate.")
EXPIRED = s3_error(403, "AccessDenied", "Request has expired")
EXPIRED_TOKEN = s3_error(400, "ExpiredToken", "The provided token has expired.")
DENIED = s3_error(403, "AccessDenied", "Access Denied")
RESET = "reset"  # read half the body, then reset the connection
STALL = "stall"  # read the body, never answer

Fault = tuple[int, bytes, dict[str, str]] | str


@dataclass(frozen=True)
class Seen:
    target: str
    fault: Fault | None  # None: forwarded upstream
    body: bytes  # what arrived before the answer (or the reset)
    declared: int  # Content-Length


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FaultyS3

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets are the point here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_PUT(self) -> None:
        owner = self.server.owner
        fault = owner.next_fault()
        declared = int(self.headers["Content-Length"])
        body = self.rfile.read(declared // 2 if fault == RESET else declared)
        owner.record(Seen(self.path, fault, body, declared))
        if fault == RESET:
            self._reset()
        elif fault == STALL:
            owner.stopping.wait(5)
            self.close_connection = True
        elif isinstance(fault, tuple):
            self._answer(*fault)
        else:
            self._answer(*owner.forward(self.path, body, self.headers.get("Content-Type", "")))

    def _reset(self) -> None:
        # SO_LINGER 0 and no shutdown() first: close() sends a RST rather than a FIN, as a
        # load balancer dropping the connection would.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.wfile.close()
        self.connection.close()
        self.close_connection = True

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class FaultyS3:
    """Plays ``faults`` on the first PUTs, then forwards PUTs to ``upstream`` (moto)."""

    def __init__(self, upstream: str, faults: list[Fault]) -> None:
        self.upstream = upstream
        self.faults = list(faults)
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def next_fault(self) -> Fault | None:
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    def record(self, seen: Seen) -> None:
        with self.lock:
            self.seen.append(seen)

    def forward(
        self, target: str, body: bytes, content_type: str
    ) -> tuple[int, bytes, dict[str, str]]:
        # moto does not check signatures, so a URL signed for this host is fine there.
        response = httpx.put(
            self.upstream + target, content=body, headers={"Content-Type": content_type}
        )
        return response.status_code, response.content, {"ETag": response.headers.get("etag", "")}

    @property
    def forwarded(self) -> list[Seen]:
        return [s for s in self.seen if s.fault is None]

    def __enter__(self) -> FaultyS3:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        use_dummy_aws_env(mp)
        yield


@pytest.fixture(scope="module")
def s3(aws_env: None) -> Iterator[MotoS3]:
    with moto_s3() as moto:
        yield moto


class Sleeps(list[float]):
    """Records the backoff instead of sleeping it."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def settings(**overrides: Any) -> Settings:
    return Settings(**{"upload_timeout_s": 2.0, "fetch_connect_timeout_s": 1.0, **overrides})


def s3_storage(endpoint: str, sleeps: Sleeps, rand: float = 0.5, **overrides: Any) -> Storage:
    return Storage(settings(s3_endpoint_url=endpoint, **overrides), sleep=sleeps, rand=lambda: rand)


def user_storage(sleeps: Sleeps) -> Storage:
    """For user-presigned URLs: the SSRF guard, letting only 127.0.0.1 through."""
    s = settings()
    http = guarded_http_client(
        s,
        timeout=httpx.Timeout(2.0),
        allow_private=False,
        allowed_networks=[ipaddress.ip_network("127.0.0.1/32")],
    )
    return Storage(s, http=http, sleep=sleeps, rand=lambda: 0.5)


def landed(s3: MotoS3, key: str) -> bytes:
    return bytes(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())


def is_missing(s3: MotoS3, key: str) -> bool:
    listing = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=key)
    return not listing.get("Contents")


# --- transient faults ----------------------------------------------------------------------


def test_slowdown_then_success_lands_once(s3: MotoS3, sleeps: Sleeps) -> None:
    with FaultyS3(s3.endpoint_url, [SLOWDOWN]) as proxy:
        stored = s3_storage(proxy.base_url, sleeps).put(
            f"s3://{s3.bucket}/f/slow.png", PNG, "image/png"
        )
    assert stored.bytes == len(PNG)
    assert [s.fault for s in proxy.seen] == [SLOWDOWN, None]
    assert proxy.forwarded[0].body == PNG
    assert landed(s3, "f/slow.png") == PNG
    # Full jitter: rand() * base for the first retry.
    assert sleeps == pytest.approx([0.1])


def test_three_slowdowns_give_up_with_the_s3_code(s3: MotoS3, sleeps: Sleeps) -> None:
    with FaultyS3(s3.endpoint_url, [SLOWDOWN] * 3) as proxy:
        storage = s3_storage(proxy.base_url, sleeps, rand=1.0)
        with pytest.raises(StorageUnavailable) as info:
            storage.put(f"s3://{s3.bucket}/f/never.png", PNG, "image/png")
    assert info.value.code == Codes.STORAGE_UNAVAILABLE
    assert "SlowDown" in info.value.message
    assert "3 attempts" in info.value.message
    assert "X-Amz" not in info.value.message
    assert len(proxy.seen) == 3
    assert proxy.forwarded == []
    assert is_missing(s3, "f/never.png")
    # Exponential: base, then 2 * base (rand() = 1 takes the whole window).
    assert sleeps == pytest.approx([0.2, 0.4])


def test_retry_after_is_a_floor_up_to_the_cap(s3: MotoS3, sleeps: Sleeps) -> None:
    slow_1s = s3_error(503, "SlowDown", "Please reduce your request rate.", **{"Retry-After": "1"})
    with FaultyS3(s3.endpoint_url, [slow_1s]) as proxy:
        s3_storage(proxy.base_url, sleeps).put(f"s3://{s3.bucket}/f/ra.png", PNG, "image/png")
    assert sleeps == [1.0]
    assert landed(s3, "f/ra.png") == PNG


def test_a_retry_after_beyond_the_cap_goes_to_the_caller(s3: MotoS3, sleeps: Sleeps) -> None:
    slow_30s = s3_error(
        503, "SlowDown", "Please reduce your request rate.", **{"Retry-After": "30"}
    )
    with (
        FaultyS3(s3.endpoint_url, [slow_30s]) as proxy,
        pytest.raises(StorageUnavailable) as info,
    ):
        s3_storage(proxy.base_url, sleeps).put(f"s3://{s3.bucket}/f/later.png", PNG, "image/png")
    # Not retried sooner than asked, and not slept here: Celery's retry waits 30 s.
    assert len(proxy.seen) == 1
    assert sleeps == []
    assert info.value.retry_after_s == 30.0


def test_a_refusal_is_not_retried(s3: MotoS3, sleeps: Sleeps) -> None:
    with (
        FaultyS3(s3.endpoint_url, [DENIED]) as proxy,
        pytest.raises(StorageRejected) as info,
    ):
        s3_storage(proxy.base_url, sleeps).put(f"s3://{s3.bucket}/f/denied.png", PNG, "image/png")
    assert info.value.code == Codes.STORAGE_REJECTED
    assert len(proxy.seen) == 1
    assert sleeps == []


def test_reset_mid_upload_then_success(s3: MotoS3, sleeps: Sleeps) -> None:
    data = os.urandom(BIG)
    with FaultyS3(s3.endpoint_url, [RESET]) as proxy:
        s3_storage(proxy.base_url, sleeps).put(f"s3://{s3.bucket}/f/reset.png", data, "image/png")
    first, second = proxy.seen
    assert first.fault == RESET
    assert len(first.body) == BIG // 2  # the server really hung up half-way
    assert second.body == data
    assert landed(s3, "f/reset.png") == data
    assert len(sleeps) == 1


def test_put_file_retry_streams_the_file_again(s3: MotoS3, sleeps: Sleeps, tmp_path: Path) -> None:
    path = tmp_path / "result.webp"
    data = os.urandom(BIG)
    path.write_bytes(data)
    with FaultyS3(s3.endpoint_url, [RESET, SLOWDOWN]) as proxy:
        stored = s3_storage(proxy.base_url, sleeps).put_file(
            f"s3://{s3.bucket}/f/file.webp", path, "image/webp"
        )
    assert stored.bytes == BIG
    reset, slowdown, ok = proxy.seen
    assert len(reset.body) == BIG // 2
    # Each attempt re-opened the file and sent it from its first byte, with its length.
    assert slowdown.body == data and slowdown.declared == BIG
    assert ok.body == data and ok.declared == BIG
    assert landed(s3, "f/file.webp") == data


def test_timeout_then_success(s3: MotoS3, sleeps: Sleeps) -> None:
    with FaultyS3(s3.endpoint_url, [STALL]) as proxy:
        storage = s3_storage(proxy.base_url, sleeps, upload_timeout_s=0.3)
        storage.put(f"s3://{s3.bucket}/f/stall.png", PNG, "image/png")
    assert [s.fault for s in proxy.seen] == [STALL, None]
    assert landed(s3, "f/stall.png") == PNG


def test_user_url_is_retried_too(s3: MotoS3, sleeps: Sleeps) -> None:
    with FaultyS3(s3.endpoint_url, [SLOWDOWN]) as proxy:
        url = f"{proxy.base_url}/{s3.bucket}/f/user.png?X-Amz-Signature=s3cr3t"
        stored = user_storage(sleeps).put(url, PNG, "image/png")
    assert stored.url == f"{proxy.base_url}/{s3.bucket}/f/user.png"
    assert len(proxy.seen) == 2
    assert landed(s3, "f/user.png") == PNG


# --- expired signatures -------------------------------------------------------------------


def test_our_expired_url_is_resigned(monkeypatch: pytest.MonkeyPatch, sleeps: Sleeps) -> None:
    """The first URL is signed two hours ago (a worker stalled between signing and
    sending); S3's real expiry and signature checks pass the second, signed now."""
    stale = iter([get_current_datetime() - datetime.timedelta(hours=2)])

    def signing_clock(remove_tzinfo: bool = True) -> datetime.datetime:
        when: datetime.datetime = next(stale, None) or get_current_datetime(remove_tzinfo)
        return when

    monkeypatch.setattr("botocore.auth.get_current_datetime", signing_clock)
    verifier = SigV4Verifier(
        DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"], DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"]
    )
    with FileServer(put_verifier=verifier) as strict:
        storage = Storage(settings(s3_endpoint_url=strict.base_url), sleep=sleeps)
        stored = storage.put("s3://bucket/out/sku.png", PNG, "image/png")
        first, second = strict.requests_to("/bucket/out/sku.png")
    assert stored.url == "s3://bucket/out/sku.png"
    assert first.query["X-Amz-Date"] < second.query["X-Amz-Date"]
    assert verifier(second) is None  # a valid, fresh signature
    assert second.body == PNG
    assert sleeps == []  # a new signature is not a transient fault: no backoff


def test_our_expired_token_is_resigned(s3: MotoS3, sleeps: Sleeps) -> None:
    with FaultyS3(s3.endpoint_url, [EXPIRED_TOKEN]) as proxy:
        s3_storage(proxy.base_url, sleeps).put(f"s3://{s3.bucket}/f/token.png", PNG, "image/png")
    assert len(proxy.seen) == 2
    assert landed(s3, "f/token.png") == PNG


def test_our_url_expired_again_after_resigning_points_at_the_clock(
    s3: MotoS3, sleeps: Sleeps
) -> None:
    with (
        FaultyS3(s3.endpoint_url, [EXPIRED, EXPIRED]) as proxy,
        pytest.raises(StorageRejected) as info,
    ):
        s3_storage(proxy.base_url, sleeps).put(f"s3://{s3.bucket}/f/clock.png", PNG, "image/png")
    assert len(proxy.seen) == 2  # re-signed once, not forever
    assert info.value.code == Codes.STORAGE_REJECTED
    assert "Request has expired" in info.value.message
    assert "clock" in info.value.message
    assert is_missing(s3, "f/clock.png")


def test_an_expired_manifest_url_fails_as_url_expired(sleeps: Sleeps) -> None:
    verifier = SigV4Verifier("testing", "testing-secret", clock=lambda: time.time() + 7200)
    with FileServer(put_verifier=verifier) as target:
        signer = boto3.session.Session().client(
            "s3", endpoint_url=target.base_url, config=Config(signature_version="s3v4")
        )
        url = signer.generate_presigned_url(
            "put_object", Params={"Bucket": "b", "Key": "k.png"}, ExpiresIn=3600
        )
        with pytest.raises(StorageRejected) as info:
            user_storage(sleeps).put(url, PNG, "image/png")
        assert len(target.requests_to("/b/k.png")) == 1  # not ours to re-sign: no retry
    assert info.value.code == Codes.STORAGE_URL_EXPIRED
    assert not info.value.retryable
    assert "manifest" in info.value.message
    assert "Request has expired" in info.value.message
    assert "X-Amz-Signature" not in info.value.message
    assert sleeps == []


def test_an_expired_token_on_a_manifest_url_fails_as_url_expired(sleeps: Sleeps) -> None:
    with FileServer() as target:
        url = target.url("/s3error/400/ExpiredToken?X-Amz-Security-Token=t0k3n")
        with pytest.raises(StorageRejected) as info:
            user_storage(sleeps).put(url, PNG, "image/png")
        assert len(target.requests) == 1
    assert info.value.code == Codes.STORAGE_URL_EXPIRED
    assert "ExpiredToken" in info.value.message
    assert "t0k3n" not in info.value.message
