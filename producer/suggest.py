"""Did-you-mean: a close known name for a misspelt one (columns, providers).

Unknown manifest columns are metadata by design, so a suggestion must be confident
enough not to flag ordinary metadata names (``product``, ``price``, ``image_url``): the
cutoff is high, the comparison ignores case, and a known column the row already has is
never suggested (a row with both ``image`` and ``images`` did not misspell ``image``).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable

from producer.validation import KNOWN_COLUMNS

# 0.6 (difflib's default) takes `product` for `prompt` and `price` for `provider`.
CUTOFF = 0.8
# Longer names are not typos of a column name; difflib's cost grows with the length.
MAX_NAME = 64


def close_match(name: str, candidates: Iterable[str]) -> str | None:
    """The known name ``name`` most likely misspells, if one is close enough."""
    if len(name) > MAX_NAME:
        return None
    matches = difflib.get_close_matches(name.lower(), sorted(candidates), n=1, cutoff=CUTOFF)
    return matches[0] if matches else None


def column_suggestion(name: str, present: Collection[str]) -> str | None:
    """The known column an unknown column ``name`` misspells, or None (plain metadata)."""
    if name in KNOWN_COLUMNS:
        return None
    return close_match(name, KNOWN_COLUMNS.difference(present))


def unknown_column_warning(name: str, suggestion: str) -> str:
    return f"unknown column {name!r}: did you mean {suggestion!r}?"


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a close candidate, else empty."""
    match = close_match(name, candidates)
    return f" (did you mean {match!r}?)" if match else ""
