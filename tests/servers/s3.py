"""S3 for tests: moto's real HTTP server, and a strict SigV4 check for presigned PUTs.

moto accepts presigned PUTs without checking signatures or expiry, so the failure paths
(tampered Content-Type, expired URL) are tested with ``SigV4Verifier`` plugged into the
file server, which answers exactly what S3 would: 403 with S3's XML error body.
"""

from __future__ import annotations

import time
from calendar import timegm
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import boto3
import pytest
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from moto.server import ThreadedMotoServer

from servers.files import RecordedRequest, s3_error_xml
from servers.http import Reply

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # boto3 never asks a cloud metadata address for credentials or a region.
    "AWS_EC2_METADATA_DISABLED": "true",
    # Keep a developer's real profile and config out of the tests.
    "AWS_CONFIG_FILE": "/nonexistent/bgswap-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/bgswap-test-aws-credentials",
}


def use_dummy_aws_env(mp: pytest.MonkeyPatch) -> None:
    """Dummy credentials for anything that builds a boto3 client under ``mp``."""
    for name, value in DUMMY_AWS_ENV.items():
        mp.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)


@dataclass(frozen=True)
class MotoS3:
    endpoint_url: str
    bucket: str
    client: S3Client


@contextmanager
def moto_s3(bucket: str = "bgswap-test") -> Iterator[MotoS3]:
    """moto's S3 server on 127.0.0.1 and a free port, with ``bucket`` created.

    Needs the DUMMY_AWS_ENV credentials in the environment already.
    """
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.session.Session().client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=bucket)
        yield MotoS3(endpoint_url=endpoint, bucket=bucket, client=client)
    finally:
        server.stop()


class SigV4Verifier:
    """Checks a presigned PUT the way S3 does; returns S3's 403 answer, or None if valid."""

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._credentials = Credentials(access_key, secret_key)
        self._region = region
        self._clock = clock

    def __call__(self, request: RecordedRequest) -> Reply | None:
        path, _, query = request.target.partition("?")
        params = dict(parse_qsl(query, keep_blank_values=True))
        if "X-Amz-Signature" not in params:
            return _denied("AccessDenied", "Query-string authentication is required")
        if self._expired(params):
            return _denied("AccessDenied", "Request has expired")
        if self._signature(request, path, query, params) != params["X-Amz-Signature"]:
            return _denied(
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you "
                "provided. Check your key and signing method.",
            )
        return None

    def _expired(self, params: dict[str, str]) -> bool:
        signed_at = timegm(time.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
        return self._clock() > signed_at + int(params["X-Amz-Expires"])

    def _signature(
        self, request: RecordedRequest, path: str, query: str, params: dict[str, str]
    ) -> str:
        unsigned_query = "&".join(
            part for part in query.split("&") if not part.startswith("X-Amz-Signature=")
        )
        signed = params["X-Amz-SignedHeaders"].split(";")
        headers = {name: request.headers.get(name, "") for name in signed}
        aws_request = AWSRequest(
            method=request.method,
            url=f"http://{request.headers['host']}{path}?{unsigned_query}",
            headers=headers,
        )
        aws_request.context["timestamp"] = params["X-Amz-Date"]
        auth = S3SigV4QueryAuth(
            self._credentials, "s3", self._region, expires=int(params["X-Amz-Expires"])
        )
        canonical = auth.canonical_request(aws_request)
        return str(auth.signature(auth.string_to_sign(aws_request, canonical), aws_request))


def _denied(code: str, message: str) -> Reply:
    return Reply(403, s3_error_xml(code, message), {"Content-Type": "application/xml"})
