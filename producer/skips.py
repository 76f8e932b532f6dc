"""Incremental runs on the producer's side: rows whose source it can read cheaply (local
files, data URIs) are fingerprinted here and looked up in the output location's index; a
row whose work is already there is recorded ``skipped`` at submit time, with no message,
no staging and no cost. The other rows (URL and ``s3://`` sources) are decided by their
worker, once it has fetched the source (worker/incremental.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from worker.errors import BgswapError
from worker.fetch import decode_data_uri, digest_local
from worker.fingerprint import by_content, fingerprint, indexable, references
from worker.index import FingerprintIndex
from worker.jobs import JobSpec
from worker.providers.base import Provider

# S3 lookups are round trips (a GET, then a HEAD per output): enough in flight that a
# 10,000-row catalogue is not 10,000 sequential waits.
REMOTE_LOOKUP_THREADS = 16


@dataclass(frozen=True)
class Decision:
    """A row the producer fingerprinted: ``entry`` is the index entry of a hit whose
    objects are all still there (the row is skipped), None for a miss (it runs)."""

    fingerprint: str
    entry: dict[str, Any] | None


class Skipper:
    def __init__(
        self,
        index: FingerprintIndex,
        providers: Callable[[str], Provider],
        max_source_bytes: int,
    ) -> None:
        self.index = index
        self.providers = providers
        self.max_source_bytes = max_source_bytes

    def decide(self, specs: Sequence[JobSpec]) -> list[Decision | None]:
        """One decision per row, None where the producer cannot tell (its worker will)."""
        models = [self.providers(spec.provider).model for spec in specs]
        if not self.index.remote or len(specs) < 2:
            return [self._decide(s, m) for s, m in zip(specs, models, strict=True)]
        with ThreadPoolExecutor(REMOTE_LOOKUP_THREADS, thread_name_prefix="bgswap-index") as pool:
            return list(pool.map(self._decide, specs, models))

    def _decide(self, spec: JobSpec, model: str) -> Decision | None:
        if not indexable(spec) or not by_content(spec.image):
            return None
        try:
            source = self._digest(spec.image, "image")
            extra = {ref: self._digest(ref, field) for field, ref in references(spec)
                     if by_content(ref)}  # fmt: skip
        except (BgswapError, OSError):
            return None  # the row runs, and fails with its own error where it is read
        fp = fingerprint(spec, source, model, extra)
        return Decision(fp, self.index.lookup(fp))

    def _digest(self, ref: str, field: str) -> str:
        if ref[:5].lower() == "data:":
            data = decode_data_uri(ref, field, self.max_source_bytes)
            return hashlib.sha256(data).hexdigest()
        return digest_local(ref, field, self.max_source_bytes)
