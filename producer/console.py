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
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from worker import logs

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


def enable_debug_logging(stream: TextIO | None = None) -> logging.Handler:
    """bgswap's loggers (``bgswap.*``) at DEBUG on stderr, secrets filtered out; other
    libraries keep their own levels (httpx would log presigned URLs at INFO)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    # Read before the settings are (-v must cover their errors too); a bad value is
    # reported by the settings themselves.
    secrets = logs.secrets_from_env()
    if os.environ.get("BGSWAP_LOG_FORMAT") == "json":
        handler.setFormatter(logs.JsonFormatter(secrets))
    else:
        handler.setFormatter(logs.RedactingFormatter(secrets))
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.propagate = False  # a root handler (Celery's) would print every line twice
    return handler
