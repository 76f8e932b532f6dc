"""The fingerprint index of an output location (worker/fingerprint.py says what is in it).

It lives in the output folder or bucket itself, so every machine writing there sees it:
``{root}/_index/{fp[:2]}/{fp}.json``. An entry is written whole (a local file is renamed
into place, an S3 object is one PUT), so a reader never sees a torn one; two writers of one
fingerprint each write a complete entry for objects that exist, and the last one stays.
A re-run (``--force``, or objects that were deleted) writes the entry again with its own
objects.

Reading is a hint, never an obligation: an entry that cannot be read, is malformed, or
names an object that is gone or changed size is a miss, and the row runs.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from worker.errors import BgswapError
from worker.fingerprint import INDEX_DIR, entry_outputs, index_location
from worker.storage import Storage

log = logging.getLogger("bgswap.index")

ENTRY_MAX_BYTES = 1024 * 1024
CONTENT_TYPE = "application/json"
MAX_LOGGED_FAILURES = 3


class FingerprintIndex:
    def __init__(self, storage: Storage, root: str) -> None:
        self.storage = storage
        self.root = root.rstrip("/")
        self.remote = self.root.startswith("s3://")
        self.failures = 0

    def present(self) -> bool:
        """Has anything ever been indexed here? One listing (an absent index: no lookups)."""
        try:
            return self.storage.any_under(f"{self.root}/{INDEX_DIR}")
        except BgswapError as exc:
            log.warning("index %s/%s: cannot list (%s)", self.root, INDEX_DIR, exc.code)
            return True  # unsure: look rows up (each lookup fails on its own, as a miss)

    def lookup(self, fp: str) -> dict[str, Any] | None:
        """The entry for ``fp`` if every object it names is still there (same size)."""
        try:
            raw = self.storage.read_small(index_location(self.root, fp), ENTRY_MAX_BYTES)
            if raw is None:
                return None
            entry = json.loads(raw)
            outputs = entry_outputs(entry, fp)
            if outputs is None or not all(self._still_there(o) for o in outputs):
                return None
        except (BgswapError, ValueError) as exc:
            self._unreadable(fp, exc)
            return None
        result: dict[str, Any] = entry
        return result

    def _unreadable(self, fp: str, exc: Exception) -> None:
        # A storage that fails does so for every row: a few lines say it, not 10,000.
        self.failures += 1
        if self.failures <= MAX_LOGGED_FAILURES:
            more = " (further failures not logged)" if self.failures == MAX_LOGGED_FAILURES else ""
            log.warning("index entry %s unreadable (%s): the row runs%s", fp, _reason(exc), more)

    def _still_there(self, output: dict[str, Any]) -> bool:
        size = self.storage.head(output["url"])
        expected = output.get("bytes")
        return size is not None and (not isinstance(expected, int) or size == expected)

    def record(self, fp: str, entry: dict[str, Any]) -> None:
        """Write the entry for ``fp`` (raises the storage's errors)."""
        data = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode()
        self.storage.put(index_location(self.root, fp), data, CONTENT_TYPE)


def _reason(exc: Exception) -> str:
    return exc.code if isinstance(exc, BgswapError) else type(exc).__name__
