"""How much the CLI says, and where: the global -q / -v options and --json output.

``state`` is set once by the command line's callback and read by every command:

- ``quiet``: only errors and the final result (no progress bars, no per-row lines);
- ``verbose``: bgswap's loggers at DEBUG on stderr, through a filter that keeps
  secrets (provider keys, URL passwords, presigned query strings) out;
- ``json``: the command's result is one JSON object on stdout; stderr carries only
  errors, so a script can parse stdout whatever happens.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit

from worker.errors import redact_url

LOGGER = "bgswap"


@dataclass
class State:
    quiet: bool = False
    verbose: bool = False
    json: bool = False

    @property
    def chatty(self) -> bool:
        """Progress, per-row lines and notes: not in quiet or JSON mode."""
        return not (self.quiet or self.json)


state = State()


def configure(*, quiet: bool = False, verbose: bool = False) -> None:
    state.quiet = quiet
    state.verbose = verbose
    state.json = False
    if verbose:
        enable_debug_logging()


def print_json(obj: Any, stream: TextIO | None = None) -> None:
    """One JSON object on one line of stdout, flushed (a watcher reads it at once)."""
    out = stream or sys.stdout
    out.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    out.flush()


# -- verbose logging ----------------------------------------------------------------------

_URL_WITH_SECRETS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]*(?:@|\?)[^\s'\"]*", re.I)


def _secrets_from_env() -> list[str]:
    """The values no log line may show: provider keys and the passwords in server URLs."""
    found = [os.environ.get(name, "") for name in ("RUNWARE_API_KEY", "FAL_KEY")]
    for name in ("BGSWAP_BROKER_URL", "BGSWAP_REDIS_URL"):
        try:
            found.append(urlsplit(os.environ.get(name, "")).password or "")
        except ValueError:
            continue
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


class RedactingFormatter(logging.Formatter):
    """Formats a record, traceback included, then drops URLs' userinfo and query strings
    and every known secret from the text."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")
        self.secrets = secrets

    def redact(self, text: str) -> str:
        text = _URL_WITH_SECRETS.sub(lambda m: redact_url(m.group(0)), text)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


def enable_debug_logging(stream: TextIO | None = None) -> logging.Handler:
    """bgswap's loggers (``bgswap.*``) at DEBUG on stderr, secrets filtered out; other
    libraries keep their own levels (httpx would log presigned URLs at INFO)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter(_secrets_from_env()))
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.propagate = False  # a root handler (Celery's) would print every line twice
    return handler
