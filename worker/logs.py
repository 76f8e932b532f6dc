"""Log lines for people and for machines, with no secret in either.

``BGSWAP_LOG_FORMAT=text`` (the default) prints one readable line per record;
``json`` prints one JSON object a line, for a log pipeline, with the row a line is about
(``batch_id``, ``row_id``, ``provider``, ``provider_task_id``) as fields of its own.
Which row is set by the engine around each step (``row_context``) and the provider's
task id by the provider once it knows it (``bind``): call sites keep their messages.

Every line, in either format, goes through the same redaction: URLs lose their userinfo
and query strings (presigned signatures), and the values of every secret setting in the
environment are replaced by ``***``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import urlsplit

from worker.errors import redact_url

_URL_WITH_SECRETS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]*(?:@|\?)[^\s'\"]*", re.I)
# A query's token wherever a path is logged (uvicorn's access log: the completion webhooks'
# per-row tokens, worker/completions.py).
_TOKEN_PARAM = re.compile(r"([?&]token=)[^\s&'\"]+")
# Environment variables whose values are secrets, and those holding URLs with passwords.
SECRET_VARIABLES = (
    "RUNWARE_API_KEY", "FAL_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "BGSWAP_HOOK_SECRET", "BGSWAP_CALLBACK_SECRET", "BGSWAP_SHOPIFY_WEBHOOK_SECRET",
    "BGSWAP_PROVIDER_WEBHOOK_SECRET",
    "REDIS_PASSWORD",  # deploy/k8s builds the broker URL from it
)  # fmt: skip
URL_VARIABLES = ("BGSWAP_BROKER_URL", "BGSWAP_REDIS_URL")
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"
# Libraries that log request lines at INFO (httpx: presigned query strings, signatures
# included) only speak up for warnings.
QUIET_LIBRARIES = ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer")

_row: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "bgswap_row", default=None
)


@contextlib.contextmanager
def row_context(batch_id: str, row_id: str, provider: str) -> Iterator[None]:
    """Lines logged inside are about this row (a step runs on one thread: a contextvar
    is that thread's own)."""
    token = _row.set({"batch_id": batch_id, "row_id": row_id, "provider": provider})
    try:
        yield
    finally:
        _row.reset(token)


def bind(**fields: str | None) -> None:
    """Add fields (``provider_task_id``) to the current row's lines."""
    current = _row.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v})


def secrets_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """The values no log line may show: keys, hook secrets and the passwords in URLs."""
    env = os.environ if environ is None else environ
    found = [env.get(name, "") for name in SECRET_VARIABLES]
    for name in URL_VARIABLES:
        try:
            found.append(urlsplit(env.get(name, "")).password or "")
        except ValueError:
            continue
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


class Redactor:
    def __init__(self, secrets: list[str]) -> None:
        self.secrets = secrets

    def __call__(self, text: str) -> str:
        text = _URL_WITH_SECRETS.sub(lambda m: redact_url(m.group(0)), text)
        text = _TOKEN_PARAM.sub(r"\1***", text)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


class RedactingFormatter(logging.Formatter):
    """Formats a record, traceback included, then drops URLs' userinfo and query strings
    and every known secret from the text."""

    def __init__(self, secrets: list[str], fmt: str | None = None) -> None:
        super().__init__(fmt or "%(asctime)s %(name)s %(levelname)s %(message)s")
        self.redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the row's fields, and the
    traceback as one string. Each value is redacted before it is encoded (a secret
    escaped inside JSON would no longer match)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self.redact(record.getMessage()),
            "process": record.process,
        }
        row = _row.get()
        if row:
            entry.update({k: self.redact(v) for k, v in row.items()})
        if record.exc_info:
            entry["exception"] = self.redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def formatter(log_format: str, secrets: list[str] | None = None) -> logging.Formatter:
    found = secrets_from_env() if secrets is None else secrets
    if log_format == "json":
        return JsonFormatter(found)
    return RedactingFormatter(found, TEXT_FORMAT)


def configure(
    log_format: str, level: int | str = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """The process's logging: one handler on the root logger (stderr), in the format
    asked for. Used by the worker and beat (Celery's ``setup_logging``) and by serve."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    quiet_libraries()
    logging.captureWarnings(True)  # Python's warnings too, in the same format
    return handler


def quiet_libraries() -> None:
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
