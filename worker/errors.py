"""One exception tree for everything a row can fail with.

    BgswapError                      code, message, retryable
    ├── RetryableError               try again later (backoff, honour retry_after_s)
    │   ├── SourceUnavailable        source fetch: 5xx, timeout, reset
    │   ├── StorageUnavailable       upload: 5xx, SlowDown, timeout, reset
    │   └── ProviderUnavailable      provider: 408/429/5xx, timeout
    ├── Ambiguous                    a paid request that may or may not have been taken:
    │                                never retried as it is; its provider finds out first
    │                                (Runware: getResponse) or fails the row unknown (fal)
    └── PermanentError               the same input will fail again: fail the row now
        ├── InvalidInput             a manifest field is wrong (carries line and column)
        ├── SourceRejected           source missing, too large, private address, 4xx
        ├── ImageRejected            not an image, truncated, decompression bomb
        ├── StorageRejected          upload refused (403, bad URL)
        ├── RowCanceled              `bgswap cancel` stopped the row mid-wait
        └── ProviderRejected         provider refused the request (validation, policy)
            └── ProviderAccountError the account cannot pay or authenticate: stop the
                                     provider for the rest of the batch

Every error carries a stable dotted ``code`` (documented in the README); messages
never contain secrets: URLs in them go through ``redact_url`` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """Drop userinfo, query and fragment: presigned signatures and tokens live there."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable url>"
    if not parts.scheme or parts.scheme == "data":
        return "data:…" if parts.scheme == "data" else url
    host = parts.hostname or ""
    if port:
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class BgswapError(Exception):
    retryable: ClassVar[bool] = False

    def __init__(self, code: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}

    def __reduce__(self) -> tuple[Any, ...]:
        # Copied (one instance per thread that raises it) and pickled as it is, whatever
        # the subclass's __init__ takes.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[BgswapError], args: tuple[Any, ...], state: dict[str, Any]) -> BgswapError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class RetryableError(BgswapError):
    retryable: ClassVar[bool] = True


class Ambiguous(BgswapError):
    """A paid request whose outcome is unknown (a timeout or a dropped connection after
    sending, a 5xx, an unreadable 2xx): it may have been accepted and billed. Not a
    retryable error: sent again as it is, it could be paid twice, so the provider that
    sent it decides what it becomes (worker/providers/common.py: send)."""


class PermanentError(BgswapError):
    retryable: ClassVar[bool] = False


class SourceUnavailable(RetryableError):
    pass


class StorageUnavailable(RetryableError):
    pass


class ProviderUnavailable(RetryableError):
    pass


class SourceRejected(PermanentError):
    pass


class ImageRejected(PermanentError):
    pass


class StorageRejected(PermanentError):
    pass


class ProviderRejected(PermanentError):
    pass


class RowCanceled(PermanentError):
    """`bgswap cancel` stopped the batch while this row was waiting on its provider."""

    def __init__(self, message: str = "canceled while waiting for the provider") -> None:
        super().__init__(Codes.JOB_CANCELED, message)


class ProviderAccountError(ProviderRejected):
    """Auth or credit: every further request would fail the same way (or be refused
    after being paid for), so the pipeline halts this provider for the batch."""


@dataclass(frozen=True)
class FieldError:
    """A manifest problem: which line, which column, why, and a stable code."""

    line: int
    column: str
    code: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column!r}: {self.reason}"


class InvalidInput(PermanentError):
    def __init__(self, errors: list[FieldError]) -> None:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(first.code, f"{first}{more}")
        self.errors = errors


class ManifestUnreadable(Exception):
    """The file cannot be read as a manifest at all: exit 2 with this one-line reason."""


class UsageError(Exception):
    """Bad command-line usage or configuration: exit 2."""


class Unreachable(Exception):
    """Infrastructure that does not answer (broker, Redis, storage): exit 3."""


# Stable codes used outside a single module; the README lists them all.
class Codes:
    MISSING_FIELD = "input.missing_field"
    DUPLICATE_ID = "input.duplicate_id"
    EMPTY_PROMPT = "input.empty_prompt"
    PROMPT_TOO_LONG = "input.prompt_too_long"
    INVALID_ENUM = "input.invalid_enum"
    INVALID_STYLE_CODE = "input.invalid_style_code"
    INVALID_URL = "input.invalid_url"
    UNKNOWN_TEMPLATE_FIELD = "input.unknown_template_field"
    BAD_TEMPLATE = "input.bad_template"
    OUT_OF_RANGE = "input.out_of_range"
    INVALID_NUMBER = "input.invalid_number"
    INVALID_VALUE = "input.invalid_value"
    TOO_LONG = "input.too_long"
    UNSUPPORTED_OPTION = "input.unsupported_option"
    CONFLICTING_OPTIONS = "input.conflicting_options"
    INVALID_JSON = "input.invalid_json"
    EXTRA_FIELDS = "input.extra_fields"
    FILE_NOT_FOUND = "input.file_not_found"
    PATH_OUTSIDE_ROOT = "input.path_outside_root"
    OUTPUT_OUTSIDE_PREFIX = "input.output_outside_prefix"
    DUPLICATE_OUTPUT = "input.duplicate_output"
    FIELD_TOO_LARGE = "input.field_too_large"
    UNTERMINATED_QUOTE = "input.unterminated_quote"
    PRIVATE_ADDRESS = "input.private_address"
    INPUT_PROVIDER_UNAVAILABLE = "input.provider_unavailable"
    NO_CREDENTIALS = "input.no_credentials"

    SOURCE_NOT_FOUND = "source.not_found"
    SOURCE_HTTP_ERROR = "source.http_error"
    SOURCE_UNAVAILABLE = "source.unavailable"
    SOURCE_TOO_LARGE = "source.too_large"
    SOURCE_PRIVATE_ADDRESS = "source.private_address"
    SOURCE_TOO_MANY_REDIRECTS = "source.too_many_redirects"
    SOURCE_NO_CREDENTIALS = "source.no_credentials"

    IMAGE_UNREADABLE = "image.unreadable"
    IMAGE_TRUNCATED = "image.truncated"
    IMAGE_TOO_LARGE = "image.too_large"

    STORAGE_REJECTED = "storage.rejected"
    STORAGE_UNAVAILABLE = "storage.unavailable"
    STORAGE_PRIVATE_ADDRESS = "storage.private_address"
    STORAGE_URL_EXPIRED = "storage.url_expired"
    STORAGE_NO_CREDENTIALS = "storage.no_credentials"

    PROVIDER_AUTH = "provider.auth_failed"
    PROVIDER_CREDITS = "provider.insufficient_credits"
    PROVIDER_HALTED = "provider.halted"
    PROVIDER_INVALID_REQUEST = "provider.invalid_request"
    PROVIDER_CONTENT_POLICY = "provider.content_policy"
    PROVIDER_RATE_LIMITED = "provider.rate_limited"
    PROVIDER_UNAVAILABLE = "provider.unavailable"
    PROVIDER_TIMEOUT = "provider.timeout"
    PROVIDER_BAD_RESPONSE = "provider.bad_response"
    PROVIDER_GENERATION_FAILED = "provider.generation_failed"
    PROVIDER_TASK_NOT_FOUND = "provider.task_not_found"
    PROVIDER_UNKNOWN_ERROR = "provider.unknown_error"
    PROVIDER_RESULT_EXPIRED = "provider.result_expired"
    PROVIDER_SUBMIT_UNKNOWN = "provider.submit_unknown"
    PROVIDER_REQUEST_TIMEOUT = "provider.request_timeout"
    JOB_CANCELED = "job.canceled"

    JOB_TOO_MANY_DELIVERIES = "job.too_many_deliveries"
    JOB_RETRIES_EXHAUSTED = "job.retries_exhausted"
    JOB_INTERNAL = "job.internal_error"
