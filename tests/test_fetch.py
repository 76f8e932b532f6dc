"""SourceFetcher against real servers: the HTTP file server, moto's S3, files, data URIs."""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers.files import FileServer
from servers.s3 import MotoS3, moto_s3, use_dummy_aws_env
from worker.errors import BgswapError, Codes, SourceRejected, SourceUnavailable
from worker.fetch import BAD_DATA_URI, SourceFetcher, parse_retry_after
from worker.netguard import guarded_http_client
from worker.settings import Settings

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
SECRET_QUERY = "X-Amz-Signature=deadbeefsecret&token=hunter2"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "fetch_connect_timeout_s": 1.0,
        "fetch_read_timeout_s": 1.0,
        "fetch_total_timeout_s": 3.0,
        "max_redirects": 3,
        "max_source_bytes": 10_000,
        **overrides,
    }
    return Settings(**values)


def local_only_fetcher(**overrides: Any) -> SourceFetcher:
    """Private addresses refused, except exactly 127.0.0.1 (where the test server is)."""
    s = settings(**overrides)
    http = guarded_http_client(
        s,
        timeout=httpx.Timeout(1.0),
        allow_private=False,
        allowed_networks=[ipaddress.ip_network("127.0.0.1/32")],
    )
    return SourceFetcher(s, http=http)


def fetch_error(fetcher: SourceFetcher, ref: str, field: str = "image") -> BgswapError:
    with pytest.raises(BgswapError) as info:
        fetcher(ref, field)
    message = info.value.message
    assert message.startswith(f"{field}: "), message
    assert "hunter2" not in message and "deadbeef" not in message, message
    assert "?" not in message, message
    return info.value


@pytest.fixture(scope="module")
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        srv.add("/cat.png", PNG, "image/png")
        yield srv


@pytest.fixture(scope="module")
def open_fetcher() -> SourceFetcher:
    return SourceFetcher(settings(allow_private_urls=True))


# --- http(s) ---------------------------------------------------------------------------


def test_private_address_refused_by_default(server: FileServer) -> None:
    err = fetch_error(SourceFetcher(settings()), server.url(f"/cat.png?{SECRET_QUERY}"))
    assert isinstance(err, SourceRejected)
    assert err.code == Codes.SOURCE_PRIVATE_ADDRESS
    assert "127.0.0.1" in err.message
    assert server.requests_to("/cat.png") == []


def test_allow_private_fetches(server: FileServer, open_fetcher: SourceFetcher) -> None:
    assert open_fetcher(server.url("/cat.png"), "image") == PNG


def test_redirect_to_another_loopback_address_is_refused(server: FileServer) -> None:
    fetcher = local_only_fetcher()
    assert fetcher(server.url(f"/redirect?to={server.url('/cat.png')}"), "image") == PNG
    target = server.url(f"/cat.png?{SECRET_QUERY}", host="127.0.0.2")
    err = fetch_error(fetcher, server.url(f"/redirect?to={target}"), "style_reference_images")
    assert err.code == Codes.SOURCE_PRIVATE_ADDRESS
    assert "127.0.0.2" in err.message


def test_redirect_to_another_scheme_is_refused(server: FileServer) -> None:
    err = fetch_error(local_only_fetcher(), server.url("/redirect?to=file:///etc/passwd"))
    assert err.code == Codes.SOURCE_HTTP_ERROR


def test_redirect_chain_limit(server: FileServer) -> None:
    fetcher = local_only_fetcher(max_redirects=3)
    assert fetcher(server.url("/chain/3"), "image") == b"chain-end"
    err = fetch_error(fetcher, server.url(f"/chain/4?{SECRET_QUERY}"))
    assert err.code == Codes.SOURCE_TOO_MANY_REDIRECTS


def test_declared_size_over_the_cap_is_refused_before_reading(server: FileServer) -> None:
    started = time.monotonic()
    err = fetch_error(local_only_fetcher(), server.url("/declared?size=10001"))
    assert err.code == Codes.SOURCE_TOO_LARGE
    assert time.monotonic() - started < 1.0


def test_streamed_body_over_the_cap_is_cut_off(server: FileServer) -> None:
    fetcher = local_only_fetcher()
    assert fetcher(server.url("/stream?chunk=1000&count=10"), "image") == b"z" * 10_000
    err = fetch_error(fetcher, server.url("/stream?chunk=1000"))  # unbounded
    assert err.code == Codes.SOURCE_TOO_LARGE


def test_slow_server_times_out(server: FileServer) -> None:
    fetcher = local_only_fetcher(fetch_read_timeout_s=0.3)
    started = time.monotonic()
    err = fetch_error(fetcher, server.url("/slow?delay=5"))
    assert isinstance(err, SourceUnavailable)
    assert err.code == Codes.SOURCE_UNAVAILABLE
    assert time.monotonic() - started < 1.5


def test_trickling_server_hits_the_overall_deadline(server: FileServer) -> None:
    # Each byte arrives well within the read timeout; only the total deadline stops it.
    fetcher = local_only_fetcher(fetch_read_timeout_s=1.0, fetch_total_timeout_s=0.8)
    started = time.monotonic()
    err = fetch_error(fetcher, server.url("/trickle?delay=0.1&count=100"))
    assert err.code == Codes.SOURCE_UNAVAILABLE
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (404, Codes.SOURCE_NOT_FOUND, SourceRejected),
        (410, Codes.SOURCE_NOT_FOUND, SourceRejected),
        (403, Codes.SOURCE_HTTP_ERROR, SourceRejected),
        (400, Codes.SOURCE_HTTP_ERROR, SourceRejected),
        (500, Codes.SOURCE_UNAVAILABLE, SourceUnavailable),
        (502, Codes.SOURCE_UNAVAILABLE, SourceUnavailable),
    ],
)
def test_http_status_classification(
    server: FileServer, status: int, code: str, kind: type[BgswapError]
) -> None:
    err = fetch_error(local_only_fetcher(), server.url(f"/status/{status}?{SECRET_QUERY}"))
    assert isinstance(err, kind)
    assert err.code == code


@pytest.mark.parametrize("status", [503, 429, 408])
def test_retry_after_is_honoured(server: FileServer, status: int) -> None:
    err = fetch_error(local_only_fetcher(), server.url(f"/status/{status}?retry_after=7"))
    assert isinstance(err, SourceUnavailable)
    assert err.retryable
    assert err.retry_after_s == 7.0


def test_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    err = fetch_error(local_only_fetcher(), f"http://127.0.0.1:{port}/x.png?{SECRET_QUERY}")
    assert isinstance(err, SourceUnavailable)


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("1.5", now) == 1.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-5", now) is None
    assert parse_retry_after(None, now) is None


# --- data: URIs and local paths ----------------------------------------------------------


def test_data_uri(open_fetcher: SourceFetcher) -> None:
    encoded = base64.b64encode(PNG).decode()
    assert open_fetcher(f"data:image/png;base64,{encoded}", "image") == PNG
    # URL-safe alphabet, no padding, line breaks: what spreadsheets and URL tools produce.
    urlsafe = base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    wrapped = "\n".join(urlsafe[i : i + 76] for i in range(0, len(urlsafe), 76))
    assert open_fetcher(f"data:image/png;base64,{wrapped}", "image") == PNG


@pytest.mark.parametrize(
    "ref",
    [
        "data:image/png;base64,hunter2!!!",
        "data:image/png,hunter2",
        "data:image/png;base64",
        "data:image/png;base64,",
    ],
)
def test_bad_data_uri(open_fetcher: SourceFetcher, ref: str) -> None:
    err = fetch_error(open_fetcher, ref, "background")
    assert err.code == BAD_DATA_URI
    assert "data:…" in err.message


def test_data_uri_over_the_cap(open_fetcher: SourceFetcher) -> None:
    encoded = base64.b64encode(b"x" * 10_001).decode()
    err = fetch_error(open_fetcher, f"data:image/png;base64,{encoded}")
    assert err.code == Codes.SOURCE_TOO_LARGE


def test_local_paths(tmp_path: Path, open_fetcher: SourceFetcher) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(PNG)
    assert open_fetcher(str(image), "image") == PNG

    assert fetch_error(open_fetcher, str(tmp_path / "missing.png")).code == Codes.SOURCE_NOT_FOUND
    assert fetch_error(open_fetcher, str(tmp_path)).code == Codes.SOURCE_NOT_FOUND
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 10_001)
    assert fetch_error(open_fetcher, str(big)).code == Codes.SOURCE_TOO_LARGE
    assert fetch_error(open_fetcher, "relative/cat.png").code == Codes.INVALID_URL
    assert fetch_error(open_fetcher, "ftp://example.com/cat.png").code == Codes.INVALID_URL


def test_fifo_is_refused_without_blocking(tmp_path: Path, open_fetcher: SourceFetcher) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert fetch_error(open_fetcher, str(fifo)).code == Codes.SOURCE_NOT_FOUND


# --- s3:// ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with pytest.MonkeyPatch.context() as mp:
        use_dummy_aws_env(mp)
        with moto_s3() as moto:
            yield moto


def test_s3_source(s3: MotoS3) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key="in/cat.png", Body=PNG)
    s3.client.put_object(Bucket=s3.bucket, Key="in/big.png", Body=b"x" * 10_001)
    fetcher = SourceFetcher(settings(s3_endpoint_url=s3.endpoint_url))
    assert fetcher(f"s3://{s3.bucket}/in/cat.png", "image") == PNG

    missing_key = fetch_error(fetcher, f"s3://{s3.bucket}/in/nope.png")
    assert missing_key.code == Codes.SOURCE_NOT_FOUND
    assert f"s3://{s3.bucket}/in/nope.png" in missing_key.message
    assert fetch_error(fetcher, "s3://no-such-bucket/x.png").code == Codes.SOURCE_NOT_FOUND
    assert fetch_error(fetcher, f"s3://{s3.bucket}/in/big.png").code == Codes.SOURCE_TOO_LARGE
    assert fetch_error(fetcher, f"s3://{s3.bucket}").code == Codes.INVALID_URL


def test_s3_endpoint_down_is_retryable(s3: MotoS3) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fetcher = SourceFetcher(settings(s3_endpoint_url=f"http://127.0.0.1:{port}"))
    err = fetch_error(fetcher, f"s3://{s3.bucket}/in/cat.png")
    assert isinstance(err, SourceUnavailable)
