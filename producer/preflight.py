"""Checks that fail a whole command once, before a row is read or anything enqueued.

A row's own `provider` column is the row's business (a row error, the others go on);
a provider named for every row (`--provider`, `--set provider=...`) that is unknown or
has no key would fail every row the same way, so the command stops with one line.
"""

from __future__ import annotations

from collections.abc import Sequence

from producer.suggest import did_you_mean
from worker.errors import UsageError
from worker.providers import available, missing_key
from worker.settings import Settings


def check_provider(settings: Settings, name: str, option: str) -> str:
    """``name`` as a registered provider whose key is set here, or UsageError (exit 2)."""
    wanted = name.strip().lower()
    names = available()
    if wanted not in names:
        raise UsageError(
            f"{option} {name!r}: no such provider (one of {', '.join(names)})"
            f"{did_you_mean(wanted, names)}"
        )
    variable = missing_key(wanted, settings)
    if variable is not None:
        raise UsageError(f"{option} {wanted} needs {variable}, which is not set")
    return wanted


def strict_refusal(rejected: int, total: int, warnings: Sequence[str]) -> str | None:
    """Why ``--strict`` refuses a manifest (bad rows, misspelt columns), or None."""
    reasons = [f"{rejected} of {total} rows are invalid"] if rejected else []
    reasons.extend(warnings)
    return "--strict: " + "; ".join(reasons) if reasons else None
