"""The output manifest: one line per input row, in input order, with no secrets."""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from worker.errors import redact_url
from worker.state import TERMINAL_STATES, BatchStore, RowRecord

FIELDS = (
    "id", "status", "provider", "model", "prompt", "image", "outputs", "cost_usd",
    "attempts", "error", "provider_task_id", "started_at", "finished_at", "meta",
)  # fmt: skip
MANIFEST_NAME = "manifest.jsonl"
MANIFEST_CONTENT_TYPE = "application/x-ndjson"


def redact_ref(ref: str | None) -> str | None:
    """Image references as they may appear in the output: URLs lose their query."""
    if ref is None:
        return None
    return redact_url(ref) if "://" in ref or ref.startswith("data:") else ref


def manifest_line(rec: RowRecord) -> dict[str, Any]:
    """A row's line; a row not yet terminal (an interrupted batch) is ``pending``."""
    job, result = rec.job, rec.result or {}
    spec: dict[str, Any] = job.get("spec", job)
    pending = rec.state not in TERMINAL_STATES
    return {
        "id": spec.get("id"),
        "status": "pending" if pending else result.get("status", rec.state),
        "provider": result.get("provider", spec.get("provider")),
        "model": result.get("model"),
        "prompt": result.get("prompt", spec.get("prompt")),
        "image": redact_ref(spec.get("image")),
        "outputs": result.get("outputs", []),
        "cost_usd": result.get("cost_usd", 0.0),
        "attempts": rec.attempts,
        "error": result.get("error"),
        "provider_task_id": result.get("provider_task_id"),
        "started_at": result.get("started_at"),
        "finished_at": result.get("finished_at"),
        "meta": spec.get("meta", {}),
    }


def manifest_lines(store: BatchStore, batch_id: str) -> Iterator[dict[str, Any]]:
    """Every row's line; a batch still being submitted has those recorded so far."""
    total = int(store.meta(batch_id).get("total") or store.recorded(batch_id))
    for rec in store.records(batch_id, total):
        yield manifest_line(rec)


def write_jsonl(lines: Iterable[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    for line in lines:
        out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
        n += 1
    return n


# A spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """A CSV cell that no spreadsheet will run: text starting like a formula gets a
    leading ``'`` (the usual escape, shown by spreadsheets as plain text)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(lines: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """The output manifest as CSV: lists and objects as JSON, every text cell defused
    against formula injection (``spreadsheet_safe``). JSON Lines stays exact."""
    writer = csv.DictWriter(out, fieldnames=FIELDS)
    writer.writeheader()
    n = 0
    for line in lines:
        writer.writerow(csv_cells(line))
        n += 1
    return n


def csv_cells(line: dict[str, Any]) -> dict[str, object]:
    """One output manifest line as CSV cells: lists and objects as JSON, defused."""
    return {
        k: spreadsheet_safe(json.dumps(v, ensure_ascii=False) if isinstance(v, list | dict) else v)
        for k, v in line.items()
    }


def spool_manifest(store: BatchStore, batch_id: str) -> Path:
    """Write the JSONL manifest to a temporary file (the caller uploads and deletes it)."""
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", suffix=".jsonl", delete=False, newline="\n"
    ) as tmp:
        write_jsonl(manifest_lines(store, batch_id), tmp)
    return Path(tmp.name)
