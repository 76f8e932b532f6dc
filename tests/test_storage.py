"""Storage against real servers: presigned PUTs to moto and to a strict SigV4 test server."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config

from servers.files import FileServer
from servers.s3 import DUMMY_AWS_ENV, MotoS3, SigV4Verifier, moto_s3, use_dummy_aws_env
from worker.errors import Codes, StorageRejected, StorageUnavailable
from worker.netguard import guarded_http_client
from worker.settings import Settings
from worker.storage import (
    PRESIGNED_SINGLE_RESULT,
    Storage,
    StoredObject,
    output_destination,
)

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(4096)


def settings(**overrides: Any) -> Settings:
    return Settings(**{"upload_timeout_s": 2.0, "fetch_connect_timeout_s": 1.0, **overrides})


def local_only_storage(**overrides: Any) -> Storage:
    s = settings(**overrides)
    http = guarded_http_client(
        s,
        timeout=httpx.Timeout(2.0),
        allow_private=False,
        allowed_networks=[ipaddress.ip_network("127.0.0.1/32")],
    )
    return Storage(s, http=http)


@pytest.fixture(scope="module", autouse=True)
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        use_dummy_aws_env(mp)
        yield


@pytest.fixture(scope="module")
def s3(aws_env: None) -> Iterator[MotoS3]:
    with moto_s3() as moto:
        yield moto


@pytest.fixture(scope="module")
def strict() -> Iterator[FileServer]:
    """A presigned-URL target that checks SigV4 like S3 (moto does not)."""
    verifier = SigV4Verifier(
        DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"], DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"]
    )
    with FileServer(put_verifier=verifier) as srv:
        yield srv


# --- output_destination ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "ext", "n", "count", "expected"),
    [
        ("s3://b/out/batch1/sku-1", "png", 1, 1, "s3://b/out/batch1/sku-1.png"),
        ("s3://b/out/batch1/sku-1", "PNG", 2, 3, "s3://b/out/batch1/sku-1-2.png"),
        ("s3://b/out/batch1/sku-1", ".webp", 1, 2, "s3://b/out/batch1/sku-1-1.webp"),
        ("s3://b/custom/name.png", "jpg", 1, 1, "s3://b/custom/name.png"),
        ("s3://b/custom/name.png", "jpg", 2, 2, "s3://b/custom/name-2.jpg"),
        ("s3://b/out/v1.2/sku.v2", "png", 1, 1, "s3://b/out/v1.2/sku.v2.png"),
        ("/data/out/batch1/sku-1", "jpg", 1, 1, "/data/out/batch1/sku-1.jpg"),
        ("/data/out/batch1/sku-1", "jpg", 3, 3, "/data/out/batch1/sku-1-3.jpg"),
        ("/data/out/photo.JPEG", "png", 1, 1, "/data/out/photo.JPEG"),
        (
            "https://b.s3.amazonaws.com/k.png?X-Amz-Signature=abc",
            "png",
            1,
            1,
            "https://b.s3.amazonaws.com/k.png?X-Amz-Signature=abc",
        ),
    ],
)
def test_output_destination(base: str, ext: str, n: int, count: int, expected: str) -> None:
    assert output_destination(base, ext, n, count) == expected


def test_output_destination_presigned_takes_one_result() -> None:
    with pytest.raises(StorageRejected) as info:
        output_destination("https://b.s3.amazonaws.com/k.png?X-Amz-Signature=abc", "png", 1, 2)
    assert info.value.code == PRESIGNED_SINGLE_RESULT
    assert "abc" not in info.value.message
    with pytest.raises(ValueError):
        output_destination("s3://b/k", "png", 3, 2)


# --- s3:// through moto -------------------------------------------------------------------


def test_s3_put_is_a_presigned_put_that_lands(s3: MotoS3, tmp_path: Path) -> None:
    storage = Storage(settings(s3_endpoint_url=s3.endpoint_url))
    stored = storage.put(f"s3://{s3.bucket}/out/b1/sku.png", PNG, "image/png")
    assert stored == StoredObject(
        url=f"s3://{s3.bucket}/out/b1/sku.png",
        key="out/b1/sku.png",
        content_type="image/png",
        bytes=len(PNG),
    )
    obj = s3.client.get_object(Bucket=s3.bucket, Key="out/b1/sku.png")
    assert obj["Body"].read() == PNG
    assert obj["ContentType"] == "image/png"

    big = tmp_path / "big.webp"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    stored = storage.put_file(f"s3://{s3.bucket}/out/b1/big.webp", big, "image/webp")
    assert stored.bytes == big.stat().st_size
    head = s3.client.head_object(Bucket=s3.bucket, Key="out/b1/big.webp")
    assert head["ContentLength"] == big.stat().st_size
    assert head["ContentType"] == "image/webp"
    assert storage.head(f"s3://{s3.bucket}/out/b1/big.webp") == big.stat().st_size
    assert storage.head(f"s3://{s3.bucket}/out/b1/none.webp") is None


def test_s3_put_sends_a_valid_signature_and_the_signed_content_type(strict: FileServer) -> None:
    # The strict server as the S3 endpoint: it answers 403 unless SigV4 verifies.
    storage = Storage(settings(s3_endpoint_url=strict.base_url))
    stored = storage.put("s3://bucket/out/sku.jpg", PNG, "image/jpeg")
    assert stored.url == "s3://bucket/out/sku.jpg"
    (request,) = strict.requests_to("/bucket/out/sku.jpg")
    assert request.method == "PUT"
    assert request.body == PNG
    assert request.headers["content-type"] == "image/jpeg"
    assert request.query["X-Amz-SignedHeaders"] == ["content-type;host"]
    assert request.query["X-Amz-Expires"] == ["900"]


def test_tampered_content_type_and_expired_url_are_rejected(strict: FileServer) -> None:
    signer = boto3.session.Session().client(
        "s3", endpoint_url=strict.base_url, config=Config(signature_version="s3v4")
    )
    url = signer.generate_presigned_url(
        "put_object", Params={"Bucket": "b", "Key": "k.png", "ContentType": "image/png"}
    )
    storage = local_only_storage()
    assert storage.put(url, PNG, "image/png").url == f"{strict.base_url}/b/k.png"
    with pytest.raises(StorageRejected) as info:
        storage.put(url, PNG, "image/jpeg")
    assert info.value.code == Codes.STORAGE_REJECTED
    assert "SignatureDoesNotMatch" in info.value.message
    assert "X-Amz" not in info.value.message and "StringToSign" not in info.value.message

    later = SigV4Verifier("testing", "testing-secret", clock=lambda: time.time() + 7200)
    with FileServer(put_verifier=later) as expired:
        url = signer.generate_presigned_url(
            "put_object", Params={"Bucket": "b", "Key": "k.png"}, ExpiresIn=3600
        ).replace(strict.base_url, expired.base_url)
        with pytest.raises(StorageRejected) as info:
            storage.put(url, PNG, "image/png")
    assert "AccessDenied" in info.value.message
    assert "Request has expired" in info.value.message


# --- user-presigned URLs -------------------------------------------------------------------


def test_user_presigned_put_records_method_body_and_type(strict: FileServer) -> None:
    with FileServer() as target:
        url = target.url("/bucket/out/sku.png?X-Amz-Signature=secret123&X-Amz-Credential=AKIA")
        stored = local_only_storage().put(url, PNG, "image/png")
        (request,) = target.requests_to("/bucket/out/sku.png")
    assert request.method == "PUT"
    assert request.body == PNG
    assert request.headers["content-type"] == "image/png"
    assert request.query["X-Amz-Signature"] == ["secret123"]
    assert stored.url == target.url("/bucket/out/sku.png")
    assert stored.key == "/bucket/out/sku.png"


def test_put_file_streams_with_content_length(tmp_path: Path) -> None:
    path = tmp_path / "result.png"
    path.write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    with FileServer() as target:
        local_only_storage().put_file(target.url("/up/result.png?sig=x"), path, "image/png")
        (request,) = target.requests_to("/up/result.png")
    assert request.headers["content-length"] == str(path.stat().st_size)
    assert "transfer-encoding" not in request.headers
    assert request.body == path.read_bytes()


def test_user_presigned_url_to_a_private_address_is_refused() -> None:
    with FileServer() as target:
        with pytest.raises(StorageRejected) as info:
            Storage(settings()).put(
                target.url("/k.png?X-Amz-Signature=secret123"), PNG, "image/png"
            )
        assert target.requests == []
    assert info.value.code == Codes.STORAGE_PRIVATE_ADDRESS
    assert "127.0.0.1" in info.value.message
    assert "secret123" not in info.value.message


def test_403_with_s3_error_body_is_rejected_with_its_code() -> None:
    with FileServer() as target:
        url = target.url("/s3error/403/AccessDenied?message=Access+Denied&X-Amz-Signature=s3cr3t")
        with pytest.raises(StorageRejected) as info:
            local_only_storage().put(url, PNG, "image/png")
    assert info.value.code == Codes.STORAGE_REJECTED
    assert "AccessDenied" in info.value.message
    assert "Access Denied" in info.value.message  # (an expired URL: tests/test_storage_faults.py)
    assert "s3cr3t" not in info.value.message


def test_503_slowdown_is_retryable_with_retry_after() -> None:
    with FileServer() as target:
        url = target.url("/s3error/503/SlowDown?retry_after=3&X-Amz-Signature=s3cr3t")
        with pytest.raises(StorageUnavailable) as info:
            local_only_storage().put(url, PNG, "image/png")
    assert info.value.code == Codes.STORAGE_UNAVAILABLE
    assert info.value.retry_after_s == 3.0
    assert "SlowDown" in info.value.message
    assert "s3cr3t" not in info.value.message


def test_unreachable_endpoint_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StorageUnavailable):
        local_only_storage().put(f"http://127.0.0.1:{port}/k.png?sig=x", PNG, "image/png")
    with pytest.raises(StorageUnavailable):
        Storage(settings(s3_endpoint_url=f"http://127.0.0.1:{port}")).put(
            "s3://b/k.png", PNG, "image/png"
        )


# --- local files ---------------------------------------------------------------------------


def test_local_put_is_atomic_and_creates_directories(tmp_path: Path) -> None:
    storage = Storage(settings())
    dest = tmp_path / "out" / "batch1" / "sku.png"
    stored = storage.put(str(dest), PNG, "image/png")
    assert stored == StoredObject(
        url=str(dest), key=str(dest), content_type="image/png", bytes=len(PNG)
    )
    assert dest.read_bytes() == PNG
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask
    assert storage.head(str(dest)) == len(PNG)
    assert storage.head(str(tmp_path / "nope.png")) is None

    # A failed write leaves the previous result whole and no temporary files behind.
    with pytest.raises(StorageRejected):
        storage.put_file(str(dest), tmp_path / "out", "image/png")
    assert dest.read_bytes() == PNG
    assert sorted(p.name for p in dest.parent.iterdir()) == ["sku.png"]

    source = tmp_path / "new.png"
    source.write_bytes(b"new result")
    assert storage.put_file(str(dest), source, "image/png").bytes == 10
    assert dest.read_bytes() == b"new result"


def test_local_put_relative_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    stored = Storage(settings()).put("bgswap-output/b1/x.png", PNG, "image/png")
    assert stored.url == str(tmp_path / "bgswap-output" / "b1" / "x.png")
    assert Path(stored.url).read_bytes() == PNG


def test_unsupported_destination_scheme() -> None:
    with pytest.raises(StorageRejected) as info:
        Storage(settings()).put("gs://bucket/k.png?token=abc", PNG, "image/png")
    assert info.value.code == Codes.STORAGE_REJECTED
    assert "abc" not in info.value.message
