"""Source fetching: the bytes behind a manifest image reference, within bounds.

Four reference forms: ``http(s)://`` (through the SSRF-guarded client, redirects followed
by hand so each hop is counted, time-boxed and never buffered), ``s3://bucket/key``
(boto3), base64 ``data:`` URIs and absolute local paths. Every form is capped at
``settings.max_source_bytes`` before the bytes are held in memory, and every failure is
a ``SourceRejected`` (permanent) or ``SourceUnavailable`` (retry) naming the manifest
field and the redacted reference: never a query string, never a data URI payload.

New error code introduced here: ``source.bad_data_uri`` (malformed or non-base64 data URI).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import os
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from worker.errors import BgswapError, Codes, SourceRejected, SourceUnavailable, redact_url
from worker.netguard import PrivateAddressRefused, guarded_http_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from worker.settings import Settings

BAD_DATA_URI = "source.bad_data_uri"

# S3 answers with these codes for throttling and transient faults: worth a retry.
S3_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
    }
)
_S3_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        return _seconds_until(text, now or datetime.now(UTC))
    return seconds if seconds >= 0 else None


def _seconds_until(http_date: str, now: datetime) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def reference_scheme(ref: str) -> str:
    """Lower-case scheme of a reference, '' for a path (or anything unparseable)."""
    try:
        return urlsplit(ref).scheme.lower()
    except ValueError:
        return ""


def split_s3_url(ref: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); the key is taken verbatim ('?' is legal in it)."""
    if ref[:5].lower() != "s3://":
        raise ValueError("not an s3:// reference")
    bucket, _, key = ref[5:].partition("/")
    if not bucket or not key:
        raise ValueError("s3:// reference needs a bucket and a key")
    return bucket, key


def build_s3_client(
    settings: Settings, *, connect_timeout_s: float, read_timeout_s: float
) -> S3Client:
    """One boto3 S3 client (thread-safe once built) for the configured endpoint."""
    config = Config(
        signature_version="s3v4",
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        # Our job retry policy (with backoff across workers) owns retries; boto3 adds one.
        retries={"max_attempts": 2, "mode": "standard"},
    )
    # A private Session: boto3's default session is not safe to create from many threads.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def s3_error_code(exc: ClientError) -> tuple[str, int]:
    """The S3 error code and HTTP status of a botocore ClientError."""
    response: Any = exc.response
    code = str(response.get("Error", {}).get("Code", "") or "")
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def source_status_error(status: int, headers: httpx.Headers, where: str) -> BgswapError:
    """The error for a non-2xx answer to a source GET (``where`` is 'field: redacted url')."""
    if status in (404, 410):
        return SourceRejected(Codes.SOURCE_NOT_FOUND, f"{where}: HTTP {status}, not found")
    if status in (408, 429) or status >= 500:
        return SourceUnavailable(
            Codes.SOURCE_UNAVAILABLE,
            f"{where}: HTTP {status}, try again later",
            retry_after_s=parse_retry_after(headers.get("retry-after")),
        )
    return SourceRejected(Codes.SOURCE_HTTP_ERROR, f"{where}: HTTP {status}")


def _too_large(where: str, limit: int) -> SourceRejected:
    return SourceRejected(Codes.SOURCE_TOO_LARGE, f"{where}: larger than {limit} bytes")


class SourceFetcher:
    """``fetcher(ref, field) -> bytes``; built once per worker process (holds its clients)."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.Client | None = None,
        s3: S3Client | None = None,
    ) -> None:
        self._settings = settings
        self._limit = settings.max_source_bytes
        if http is None:
            http = guarded_http_client(
                settings,
                timeout=self._timeout(settings.fetch_total_timeout_s),
                allow_private=settings.allow_private_urls,
            )
        self._http = http
        self._s3_client = s3

    @property
    def _s3(self) -> S3Client:
        # Built on first use: most batches never read s3:// sources, and boto3 is slow to start.
        if self._s3_client is None:
            self._s3_client = build_s3_client(
                self._settings,
                connect_timeout_s=self._settings.fetch_connect_timeout_s,
                read_timeout_s=self._settings.fetch_read_timeout_s,
            )
        return self._s3_client

    def close(self) -> None:
        self._http.close()

    def __call__(self, ref: str, field: str) -> bytes:
        where = f"{field}: {redact_url(ref)}"
        scheme = reference_scheme(ref)
        if scheme in ("http", "https"):
            return self._fetch_http(ref, where)
        if scheme == "s3":
            return self._fetch_s3(ref, where)
        if scheme == "data":
            return decode_data_uri(ref, where, self._limit)
        if not scheme and os.path.isabs(ref):
            return read_local(ref, where, self._limit)
        raise SourceRejected(
            Codes.INVALID_URL,
            f"{where}: not an http(s):// URL, s3:// reference, data: URI or absolute path",
        )

    # --- http(s) ---------------------------------------------------------------------

    def _timeout(self, remaining_s: float) -> httpx.Timeout:
        s = self._settings
        connect = min(s.fetch_connect_timeout_s, remaining_s)
        read = min(s.fetch_read_timeout_s, remaining_s)
        return httpx.Timeout(connect=connect, read=read, write=read, pool=connect)

    def _fetch_http(self, url: str, where: str) -> bytes:
        try:
            return self._get(url, where, time.monotonic() + self._settings.fetch_total_timeout_s)
        except PrivateAddressRefused as exc:
            raise SourceRejected(
                Codes.SOURCE_PRIVATE_ADDRESS,
                f"{where}: host {exc.host} is not a public address; refused",
            ) from exc
        except httpx.TimeoutException as exc:
            raise SourceUnavailable(Codes.SOURCE_UNAVAILABLE, f"{where}: timed out") from exc
        except httpx.UnsupportedProtocol as exc:
            raise SourceRejected(
                Codes.SOURCE_HTTP_ERROR, f"{where}: redirected to an unsupported URL scheme"
            ) from exc
        except httpx.DecodingError as exc:
            raise SourceRejected(
                Codes.SOURCE_HTTP_ERROR, f"{where}: body does not match its Content-Encoding"
            ) from exc
        except httpx.TransportError as exc:
            raise SourceUnavailable(
                Codes.SOURCE_UNAVAILABLE, f"{where}: {type(exc).__name__} while fetching"
            ) from exc
        except httpx.InvalidURL as exc:
            raise SourceRejected(Codes.INVALID_URL, f"{where}: invalid URL") from exc

    def _get(self, url: str, where: str, deadline: float) -> bytes:
        # Redirects by hand: httpx would read every redirect body whole, unbounded, and
        # could not give each hop only the time left before the overall deadline.
        request = self._http.build_request(
            "GET",
            url,
            headers={"Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"},
            timeout=self._timeout(self._remaining(deadline, where)),
        )
        for _hop in range(self._settings.max_redirects + 1):
            response = self._http.send(request, stream=True, follow_redirects=False)
            try:
                if response.next_request is None:
                    return self._read_body(response, where, deadline)
                request = response.next_request
            finally:
                response.close()
            remaining = self._remaining(deadline, where)
            request.extensions["timeout"] = self._timeout(remaining).as_dict()
        raise SourceRejected(
            Codes.SOURCE_TOO_MANY_REDIRECTS,
            f"{where}: more than {self._settings.max_redirects} redirects",
        )

    def _remaining(self, deadline: float, where: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SourceUnavailable(
                Codes.SOURCE_UNAVAILABLE,
                f"{where}: took longer than {self._settings.fetch_total_timeout_s:g} s",
            )
        return remaining

    def _read_body(self, response: httpx.Response, where: str, deadline: float) -> bytes:
        if not 200 <= response.status_code < 300:
            raise source_status_error(response.status_code, response.headers, where)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._limit:
            raise _too_large(where, self._limit)
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self._limit:
                raise _too_large(where, self._limit)
            # A trickling server resets the read timeout with every byte; this does not.
            self._remaining(deadline, where)
            chunks.append(chunk)
        return b"".join(chunks)

    # --- s3:// -----------------------------------------------------------------------

    def _fetch_s3(self, ref: str, where: str) -> bytes:
        try:
            bucket, key = split_s3_url(ref)
        except ValueError as exc:
            raise SourceRejected(Codes.INVALID_URL, f"{where}: {exc}") from exc
        try:
            obj = self._s3.get_object(Bucket=bucket, Key=key)
            body = obj["Body"]
            try:
                if obj.get("ContentLength", 0) > self._limit:
                    raise _too_large(where, self._limit)
                data = body.read(self._limit + 1)
            finally:
                body.close()
        except ClientError as exc:
            raise s3_source_error(exc, where) from exc
        except NoCredentialsError as exc:
            # Not a fault that passes: fail once, clearly, rather than retry it.
            raise SourceRejected(
                Codes.SOURCE_NO_CREDENTIALS,
                f"{where}: no AWS credentials to read it with (boto3 looks in the environment, "
                "~/.aws and the instance's role)",
            ) from exc
        except BotoCoreError as exc:
            raise SourceUnavailable(
                Codes.SOURCE_UNAVAILABLE, f"{where}: {type(exc).__name__} while fetching"
            ) from exc
        if len(data) > self._limit:
            raise _too_large(where, self._limit)
        return data


def s3_source_error(exc: ClientError, where: str) -> BgswapError:
    code, status = s3_error_code(exc)
    if code in _S3_MISSING_CODES or status == 404:
        return SourceRejected(Codes.SOURCE_NOT_FOUND, f"{where}: not found ({code or status})")
    if code in S3_RETRYABLE_CODES or status in (408, 429) or status >= 500:
        return SourceUnavailable(Codes.SOURCE_UNAVAILABLE, f"{where}: S3 {code or status}")
    return SourceRejected(Codes.SOURCE_HTTP_ERROR, f"{where}: S3 refused ({code or status})")


# --- data: and local paths ---------------------------------------------------------------


def decode_data_uri(ref: str, where: str, limit: int) -> bytes:
    """Bytes of a base64 ``data:`` URI, refusing anything over ``limit`` before decoding."""
    header, comma, payload = ref[5:].partition(",")
    if not comma:
        raise SourceRejected(BAD_DATA_URI, f"{where}: malformed data URI (no comma)")
    params = [p.strip().lower() for p in header.split(";")[1:]]
    if "base64" not in params:
        raise SourceRejected(BAD_DATA_URI, f"{where}: only base64 data URIs are supported")
    # Tolerate what CSV and URL tooling do to base64: percent-escapes, line breaks,
    # the URL-safe alphabet and dropped padding.
    compact = "".join(unquote(payload).split()).translate(str.maketrans("-_", "+/"))
    if len(compact) // 4 * 3 > limit + 3:
        raise _too_large(where, limit)
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SourceRejected(BAD_DATA_URI, f"{where}: data URI is not valid base64") from exc
    if not data:
        raise SourceRejected(BAD_DATA_URI, f"{where}: data URI is empty")
    if len(data) > limit:
        raise _too_large(where, limit)
    return data


def read_local(path: str, where: str, limit: int) -> bytes:
    """A regular file's bytes, capped; FIFOs and devices are refused, not read forever."""
    chunks: list[bytes] = []
    _read_local(path, where, limit, chunks.append)
    return b"".join(chunks)


def digest_local(path: str, where: str, limit: int) -> str:
    """The sha256 of a regular file, streamed (never held whole), within the same cap and
    refusals as ``read_local``."""
    digest = hashlib.sha256()
    _read_local(path, where, limit, digest.update)
    return digest.hexdigest()


def _read_local(path: str, where: str, limit: int, sink: Callable[[bytes], object]) -> None:
    try:
        # O_NONBLOCK: opening a FIFO must not hang the worker before we can refuse it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise SourceRejected(Codes.SOURCE_NOT_FOUND, f"{where}: no such file") from exc
    except PermissionError as exc:
        raise SourceRejected(Codes.SOURCE_NOT_FOUND, f"{where}: permission denied") from exc
    except OSError as exc:
        raise SourceUnavailable(Codes.SOURCE_UNAVAILABLE, f"{where}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SourceRejected(Codes.SOURCE_NOT_FOUND, f"{where}: not a regular file")
        if info.st_size > limit:
            raise _too_large(where, limit)
        if _read_at_most(fd, limit + 1, sink) > limit:
            raise _too_large(where, limit)
    finally:
        os.close(fd)


def _read_at_most(fd: int, size: int, sink: Callable[[bytes], object]) -> int:
    left = size
    while left > 0:
        chunk = os.read(fd, min(left, 1024 * 1024))
        if not chunk:
            break
        sink(chunk)
        left -= len(chunk)
    return size - left
