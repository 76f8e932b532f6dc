"""Result storage: where each result goes, and putting it there.

Every remote write is one HTTP PUT to a presigned URL, so the worker only ever needs
"PUT these bytes here": for ``s3://bucket/key`` the worker signs the URL itself (boto3,
with the Content-Type signed in, and it sends exactly that Content-Type); a user's
presigned ``http(s)`` URL is PUT as-is, through the SSRF-guarded client. Local
destinations (the embedded default) are written atomically. Failures map to
``StorageUnavailable`` (5xx, SlowDown, timeouts, resets: retry) or ``StorageRejected``
(403 and other 4xx, with S3's error code from the XML body; private addresses).

Transient upload failures are retried here a few times with a short backoff; the long
waits between attempts belong to the caller's Celery retry. A presigned URL that S3
calls expired is signed again if bgswap signed it (``s3://``); one from the manifest
cannot be, and fails with ``storage.url_expired``.

New error code introduced here: ``storage.presigned_single_result`` (a presigned URL
names exactly one object, so it cannot receive a row's several results).
"""

from __future__ import annotations

import errno
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from worker.errors import (
    BgswapError,
    Codes,
    StorageRejected,
    StorageUnavailable,
    redact_url,
)
from worker.fetch import (
    S3_RETRYABLE_CODES,
    build_s3_client,
    parse_retry_after,
    reference_scheme,
    s3_error_code,
    split_s3_url,
)
from worker.netguard import PrivateAddressRefused, guarded_http_client
from worker.policy import compute_backoff

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from worker.settings import Settings

PRESIGNED_SINGLE_RESULT = "storage.presigned_single_result"

# Only these count as "the user already named the file": a safe id may contain dots.
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp"})
_CHUNK = 1024 * 1024
_ERROR_BODY_LIMIT = 64 * 1024
_XML_CODE = re.compile(r"<Code>\s*([^<]{1,128}?)\s*</Code>")
_XML_MESSAGE = re.compile(r"<Message>\s*([^<]{1,300}?)\s*</Message>")
# S3's codes for a request signed with temporary credentials that have run out.
_EXPIRED_TOKEN_CODES = frozenset({"ExpiredToken", "TokenRefreshRequired"})


def output_destination(dest_base: str, extension: str, n: int, count: int) -> str:
    """Where result ``n`` (1-based) of ``count`` goes, from the row's destination base.

    ``{base}.{ext}`` for one result, ``{base}-{n}.{ext}`` for several. A base that already
    ends in an image extension (``s3://b/x.png``) is the user's own name: kept as-is for
    one result, and numbered before that extension is replaced for several. A presigned
    URL is used as-is and only for a single result: changing its path would void the
    signature, so several results raise ``StorageRejected(storage.presigned_single_result)``.
    """
    if not 1 <= n <= count:
        raise ValueError(f"result number {n} is outside 1..{count}")
    ext = extension.lower().lstrip(".")
    if reference_scheme(dest_base) in ("http", "https"):
        if count == 1:
            return dest_base
        raise StorageRejected(
            PRESIGNED_SINGLE_RESULT,
            f"{redact_url(dest_base)}: a presigned URL takes one result, this row makes {count}",
        )
    stem, user_ext = split_image_extension(dest_base)
    if count == 1:
        return dest_base if user_ext else f"{dest_base}.{ext}"
    return f"{stem}-{n}.{ext}"


def split_image_extension(dest: str) -> tuple[str, str | None]:
    """('s3://b/x', 'png') for 's3://b/x.png'; (dest, None) when the name has none."""
    name = dest.rsplit("/", 1)[-1]
    stem, dot, suffix = name.rpartition(".")
    if dot and stem and suffix.lower() in IMAGE_EXTENSIONS:
        return dest[: -len(suffix) - 1], suffix
    return dest, None


@dataclass(frozen=True)
class StoredObject:
    """Where a result landed: ``url`` is safe to publish (no presigned query string)."""

    url: str
    key: str
    content_type: str
    bytes: int


@dataclass(frozen=True)
class _Body:
    """Bytes in memory or a file on disk, with the size known up front for Content-Length."""

    size: int
    data: bytes | None = None
    path: Path | None = None

    def chunks(self) -> Generator[bytes, None, None]:
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        with self.path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                yield chunk

    @contextmanager
    def content(self) -> Iterator[bytes | Iterator[bytes]]:
        """The body for one request. A file is opened afresh on every call, so a retried
        PUT streams it whole again (never buffered), and closed when the request ends
        rather than whenever the garbage collector reaches an abandoned generator."""
        if self.data is not None:
            yield self.data
            return
        chunks = self.chunks()
        try:
            yield chunks
        finally:
            chunks.close()


class _UrlExpired(StorageRejected):
    """S3 refused a presigned URL as expired. Internal: ``Storage`` turns it into an error
    worded for whoever can fix it (re-signing its own URLs first)."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(
            Codes.STORAGE_URL_EXPIRED, f"{where}: the presigned URL has expired ({detail})"
        )
        self.where = where
        self.detail = detail


def s3_error_details(body: bytes) -> tuple[str | None, str | None]:
    """(Code, Message) from an S3 XML error body; only those two, never the echoed request."""
    text = body.decode("utf-8", errors="replace")
    code = _XML_CODE.search(text)
    message = _XML_MESSAGE.search(text)
    return (code.group(1) if code else None, message.group(1) if message else None)


def storage_status_error(
    status: int, headers: httpx.Headers, body: bytes, where: str
) -> BgswapError:
    """The error for a non-2xx answer to a PUT (``where`` is the redacted destination).

    An expired signature gives ``StorageRejected`` with code ``storage.url_expired``.
    """
    code, message = s3_error_details(body)
    detail = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if _signature_expired(code, message):
        return _UrlExpired(where, detail)
    if status in (408, 429) or status >= 500 or code in S3_RETRYABLE_CODES:
        return StorageUnavailable(
            Codes.STORAGE_UNAVAILABLE,
            f"{where}: {detail}",
            retry_after_s=parse_retry_after(headers.get("retry-after")),
        )
    return StorageRejected(Codes.STORAGE_REJECTED, f"{where}: upload refused, {detail}")


def _signature_expired(code: str | None, message: str | None) -> bool:
    if code in _EXPIRED_TOKEN_CODES:
        return True
    # A lapsed X-Amz-Expires is a plain AccessDenied: only the message tells it apart from
    # a missing permission, which a new signature would not fix.
    return code == "AccessDenied" and "request has expired" in (message or "").lower()


class Storage:
    """Puts results; built once per worker process (holds its HTTP and S3 clients).

    A remote PUT that fails transiently (5xx incl. S3's 503 SlowDown, 408/429, timeouts,
    connection resets, also mid-body) is made up to ``upload_attempts`` times in all,
    sleeping a full-jitter exponential backoff in between: uniform(0, min(
    ``backoff_cap_s``, ``backoff_base_s`` * 2**(n-1))). A Retry-After is honoured as a
    floor up to ``backoff_cap_s``; a longer one ends the attempts here and travels as
    the error's ``retry_after_s`` to the caller's Celery retry, which owns long waits
    (sleeping here would hold the worker). These are keyword arguments rather than
    Settings fields: the caller may wire settings to them later. ``sleep`` and ``rand``
    are injectable for tests.
    """

    def __init__(
        self,
        settings: Settings,
        http: httpx.Client | None = None,
        s3: S3Client | None = None,
        *,
        upload_attempts: int = 3,
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if upload_attempts < 1:
            raise ValueError(f"upload_attempts must be at least 1, not {upload_attempts}")
        self._settings = settings
        self._upload_attempts = upload_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._sleep = sleep
        self._rand = rand
        timeout = httpx.Timeout(
            settings.upload_timeout_s,
            connect=min(settings.fetch_connect_timeout_s, settings.upload_timeout_s),
        )
        if http is None:
            http = guarded_http_client(
                settings, timeout=timeout, allow_private=settings.allow_private_urls
            )
        self._user_http = http
        # Our own signed URLs point at the operator's endpoint (AWS, or a local MinIO):
        # no address guard there, and proxies from the environment apply as for boto3.
        self._own_http = httpx.Client(timeout=timeout)
        self._s3_client = s3

    @property
    def _s3(self) -> S3Client:
        if self._s3_client is None:
            self._s3_client = build_s3_client(
                self._settings,
                connect_timeout_s=self._settings.fetch_connect_timeout_s,
                read_timeout_s=self._settings.upload_timeout_s,
            )
        return self._s3_client

    def close(self) -> None:
        self._own_http.close()
        self._user_http.close()

    def put(self, dest: str, data: bytes, content_type: str) -> StoredObject:
        return self._store(dest, _Body(size=len(data), data=data), content_type)

    def put_file(self, dest: str, path: Path, content_type: str) -> StoredObject:
        """Stream a file (never whole in memory) with an explicit Content-Length.

        S3 refuses chunked transfer encoding on presigned PUTs, hence the size up front.
        """
        return self._store(dest, _Body(size=path.stat().st_size, path=path), content_type)

    def probe(self, root: str) -> None:
        """Write a small object under ``root`` (an s3:// prefix or a folder), then delete
        it: a destination that refuses it fails here, before any row is enqueued."""
        dest = f"{root.rstrip('/')}/.bgswap-probe-{uuid.uuid4().hex}"
        self.put(dest, b"bgswap can write here\n", "text/plain")
        self.delete(dest)

    def delete(self, dest: str) -> None:
        """Remove an object bgswap wrote (a probe); a missing one is no error."""
        if reference_scheme(dest) == "s3":
            bucket, key = _s3_parts(dest)
            try:
                self._s3.delete_object(Bucket=bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                raise StorageUnavailable(
                    Codes.STORAGE_UNAVAILABLE, f"s3://{bucket}/{key}: cannot delete"
                ) from exc
            return
        Path(dest).unlink(missing_ok=True)

    def head(self, dest: str) -> int | None:
        """Size of an existing object, None if missing (or unknowable: a presigned URL
        grants PUT only, so it cannot be asked)."""
        scheme = reference_scheme(dest)
        if scheme == "s3":
            return self._head_s3(dest)
        if scheme:
            return None
        try:
            return os.stat(dest).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_small(self, dest: str, limit: int) -> bytes | None:
        """The bytes of a small object bgswap wrote (an index entry), None if there is none.
        Only ``s3://`` keys and local paths: bgswap cannot read through a presigned URL."""
        if reference_scheme(dest) == "s3":
            return self._read_s3(dest, limit)
        try:
            with open(dest, "rb") as handle:
                data = handle.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageUnavailable(Codes.STORAGE_UNAVAILABLE, f"{dest}: {exc.strerror}") from exc
        if len(data) > limit:
            raise StorageRejected(Codes.STORAGE_REJECTED, f"{dest}: larger than {limit} bytes")
        return data

    def any_under(self, root: str) -> bool:
        """Is there anything under ``root`` (an ``s3://`` prefix or a folder)? One listing."""
        if reference_scheme(root) == "s3":
            bucket, _, prefix = root[5:].partition("/")
            prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
            try:
                listed = self._s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
            except (ClientError, BotoCoreError) as exc:
                raise StorageUnavailable(
                    Codes.STORAGE_UNAVAILABLE, f"s3://{bucket}/{prefix}: cannot list"
                ) from exc
            return bool(listed.get("KeyCount", 0))
        try:
            with os.scandir(root) as entries:
                return any(True for _ in entries)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise StorageUnavailable(Codes.STORAGE_UNAVAILABLE, f"{root}: {exc.strerror}") from exc

    def _read_s3(self, dest: str, limit: int) -> bytes | None:
        bucket, key = _s3_parts(dest)
        where = f"s3://{bucket}/{key}"
        try:
            obj = self._s3.get_object(Bucket=bucket, Key=key)
            body = obj["Body"]
            try:
                data = body.read(limit + 1)
            finally:
                body.close()
        except ClientError as exc:
            code, status = s3_error_code(exc)
            if status == 404 or code in ("NoSuchKey", "NotFound", "404"):
                return None
            raise StorageUnavailable(
                Codes.STORAGE_UNAVAILABLE, f"{where}: S3 {code or status}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(
                Codes.STORAGE_UNAVAILABLE, f"{where}: {type(exc).__name__}"
            ) from exc
        if len(data) > limit:
            raise StorageRejected(Codes.STORAGE_REJECTED, f"{where}: larger than {limit} bytes")
        return data

    def _store(self, dest: str, body: _Body, content_type: str) -> StoredObject:
        scheme = reference_scheme(dest)
        if scheme == "s3":
            return self._put_s3(dest, body, content_type)
        if scheme in ("http", "https"):
            return self._put_user_url(dest, body, content_type)
        if not scheme:
            return _put_local(dest, body, content_type)
        raise StorageRejected(
            Codes.STORAGE_REJECTED,
            f"{redact_url(dest)}: not an s3:// reference, presigned http(s) URL or path",
        )

    def presign_put(self, dest: str, content_type: str | None) -> str:
        """A presigned PUT URL for an ``s3://`` destination.

        ``content_type=None`` signs none, for uploaders whose Content-Type we cannot know
        (a provider uploading its result itself): a signed one must then match exactly.
        """
        bucket, key = _s3_parts(dest)
        params: dict[str, str] = {"Bucket": bucket, "Key": key}
        if content_type is not None:
            params["ContentType"] = content_type
        try:
            return self._s3.generate_presigned_url(
                "put_object", Params=params, ExpiresIn=self._settings.presign_expires_s
            )
        except NoCredentialsError as exc:
            # Permanent until the operator acts: no retry would find credentials.
            raise StorageRejected(
                Codes.STORAGE_NO_CREDENTIALS,
                f"s3://{bucket}/{key}: no AWS credentials to sign the upload with (boto3 "
                "looks in the environment, ~/.aws and the instance's role)",
            ) from exc
        except BotoCoreError as exc:
            # Typically credentials not (yet) available, e.g. instance metadata lagging.
            raise StorageUnavailable(
                Codes.STORAGE_UNAVAILABLE,
                f"s3://{bucket}/{key}: cannot sign upload ({type(exc).__name__})",
            ) from exc

    def _put_s3(self, dest: str, body: _Body, content_type: str) -> StoredObject:
        bucket, key = _s3_parts(dest)
        where = f"s3://{bucket}/{key}"

        def put_signed() -> None:
            # Signed for every attempt: backoff may outlast a URL's expiry, and boto3 signs
            # with its refreshed credentials if the old ones rotated meanwhile.
            url = self.presign_put(dest, content_type)
            self._put_url(self._own_http, url, body, content_type, where)

        try:
            self._put_retrying(put_signed)
        except _UrlExpired:
            # Our URL went stale between signing and sending (a stalled worker, rotated
            # credentials): we hold the keys, so sign again and retry, once.
            try:
                self._put_retrying(put_signed)
            except _UrlExpired as again:
                raise StorageRejected(
                    Codes.STORAGE_REJECTED,
                    f"{where}: S3 refused a URL signed moments ago as expired ({again.detail});"
                    " check this worker's clock and AWS credentials",
                ) from again
        return StoredObject(url=where, key=key, content_type=content_type, bytes=body.size)

    def _put_user_url(self, url: str, body: _Body, content_type: str) -> StoredObject:
        where = redact_url(url)
        try:
            self._put_retrying(
                lambda: self._put_url(self._user_http, url, body, content_type, where)
            )
        except _UrlExpired as exc:
            # Only whoever issued the URL holds the credentials to sign a new one.
            raise StorageRejected(
                Codes.STORAGE_URL_EXPIRED,
                f"{where}: the presigned URL given in the manifest has expired ({exc.detail});"
                " bgswap cannot re-sign it: put a fresh URL in the row's destination",
            ) from exc
        key = httpx.URL(url).path
        return StoredObject(url=where, key=key, content_type=content_type, bytes=body.size)

    def _put_retrying(self, put: Callable[[], None]) -> None:
        """Run ``put``, retrying ``StorageUnavailable`` with backoff while attempts last.

        A PUT is idempotent (same key, same bytes), so repeating one that may have landed
        already (a timeout after the whole body went out) is harmless.
        """
        attempt = 1
        while True:
            try:
                put()
                return
            except StorageUnavailable as exc:
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    plural = "s" if attempt > 1 else ""
                    raise StorageUnavailable(
                        exc.code,
                        f"{exc.message} (after {attempt} attempt{plural})",
                        retry_after_s=exc.retry_after_s,
                    ) from exc
                self._sleep(delay)
            attempt += 1

    def _retry_delay(self, error: StorageUnavailable, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to hand ``error`` back."""
        if attempt >= self._upload_attempts:
            return None
        asked = error.retry_after_s
        if asked is not None and asked > self._backoff_cap_s:
            # Retrying sooner than the server asked only earns more throttling; the caller's
            # retry waits at least retry_after_s.
            return None
        delay = compute_backoff(
            attempt, base_s=self._backoff_base_s, cap_s=self._backoff_cap_s, rand=self._rand
        )
        return max(delay, asked or 0.0)

    def _put_url(
        self, client: httpx.Client, url: str, body: _Body, content_type: str, where: str
    ) -> None:
        headers = {"Content-Type": content_type, "Content-Length": str(body.size)}
        try:
            with (
                body.content() as content,
                client.stream("PUT", url, content=content, headers=headers) as response,
            ):
                if 200 <= response.status_code < 300:
                    return
                error_body = _read_capped(response, _ERROR_BODY_LIMIT)
                raise storage_status_error(
                    response.status_code, response.headers, error_body, where
                )
        except PrivateAddressRefused as exc:
            raise StorageRejected(
                Codes.STORAGE_PRIVATE_ADDRESS,
                f"{where}: host {exc.host} is not a public address; refused",
            ) from exc
        except httpx.TimeoutException as exc:
            raise StorageUnavailable(Codes.STORAGE_UNAVAILABLE, f"{where}: timed out") from exc
        except httpx.UnsupportedProtocol as exc:
            raise StorageRejected(Codes.STORAGE_REJECTED, f"{where}: unsupported URL") from exc
        except httpx.TransportError as exc:
            raise StorageUnavailable(
                Codes.STORAGE_UNAVAILABLE, f"{where}: {type(exc).__name__} while uploading"
            ) from exc
        except httpx.InvalidURL as exc:
            raise StorageRejected(Codes.STORAGE_REJECTED, f"{where}: invalid URL") from exc

    def _head_s3(self, dest: str) -> int | None:
        bucket, key = _s3_parts(dest)
        try:
            return self._s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except ClientError as exc:
            code, status = s3_error_code(exc)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return None
            if status >= 500 or status in (408, 429) or code in S3_RETRYABLE_CODES:
                raise StorageUnavailable(
                    Codes.STORAGE_UNAVAILABLE, f"s3://{bucket}/{key}: S3 {code or status}"
                ) from exc
            raise StorageRejected(
                Codes.STORAGE_REJECTED, f"s3://{bucket}/{key}: S3 refused ({code or status})"
            ) from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(
                Codes.STORAGE_UNAVAILABLE, f"s3://{bucket}/{key}: {type(exc).__name__}"
            ) from exc


def _s3_parts(dest: str) -> tuple[str, str]:
    try:
        return split_s3_url(dest)
    except ValueError as exc:
        raise StorageRejected(Codes.STORAGE_REJECTED, f"{redact_url(dest)}: {exc}") from exc


def _read_capped(response: httpx.Response, limit: int) -> bytes:
    # An error body is for the message only: a hostile endpoint must not make us buffer GBs.
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


# What a local write answers when trying again cannot help: a permission, a path that
# cannot be (a file where a folder should be, a folder that cannot be made), read-only.
_REFUSALS = frozenset({
    errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOENT,
    errno.EROFS, errno.ENAMETOOLONG, errno.EINVAL,
})  # fmt: skip


def _put_local(dest: str, body: _Body, content_type: str) -> StoredObject:
    """Write atomically: readers see the old file or the whole new one, never a torn one."""
    target = Path(dest).absolute()
    where = str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, body)
    except OSError as exc:
        if exc.errno in _REFUSALS:
            raise StorageRejected(Codes.STORAGE_REJECTED, f"{where}: {exc.strerror}") from exc
        # Disk full, I/O errors, a flaky network mount: may well work on the next try.
        raise StorageUnavailable(Codes.STORAGE_UNAVAILABLE, f"{where}: {exc.strerror}") from exc
    return StoredObject(url=where, key=where, content_type=content_type, bytes=body.size)


def _write_atomically(target: Path, body: _Body) -> None:
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 lets the umask decide the final mode, as a plain open() would
    # (tempfile would leave results readable by their owner only).
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in body.chunks():
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
